//! Shipping batches to the aggregator (`vigil-agent run`), at least once.
//!
//! Data flow: `daemon` runs a collection pass per interval, `encode` turns it into a wire
//! `Batch`, `spool` appends it to an on-disk log, and `sender` streams the spool to an
//! aggregator over gRPC (`Ingest.Stream`) and trims it as acks come back. `config` is the
//! `[transport]` section of the agent's config file.

pub mod config;
pub mod daemon;
pub mod dictionary;
pub mod encode;
pub mod sender;
pub mod spool;

pub use config::{Compression, TransportConfig};
pub use daemon::{RunError, run_agent};
