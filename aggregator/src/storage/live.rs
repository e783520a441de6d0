//! What was just stored, for whoever wants it as it happens: live subscriptions (gRPC
//! `Subscribe`, the dashboard) and exporters (remote-write).
//!
//! The store calls every registered [`IngestSink`] once per batch it stores from a live stream
//! (not for batches replayed from the write-ahead log at startup), after the batch is in the
//! store and while the store's lock is held, so sinks see batches in store order. Sinks must
//! therefore be quick and must never block: hand the batch to a channel or a buffer and return.

use std::sync::Arc;

use super::{Point, StoredEvent, StoredSeries};

/// One stored batch: its node, its points with their series, and its events.
#[derive(Debug, Clone)]
pub struct IngestedBatch {
    pub node: String,
    /// The agent instance (spool id) that sent it.
    pub agent_instance: String,
    pub points: Vec<(Arc<StoredSeries>, Point)>,
    pub events: Vec<StoredEvent>,
}

/// Receives every batch as it is stored.
pub trait IngestSink: Send + Sync {
    fn on_ingested(&self, batch: &Arc<IngestedBatch>);
}
