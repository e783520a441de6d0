//! Where accepted batches go: the write-ahead log ([`wal`]) and the store built from it
//! ([`store`]).

pub mod live;
pub mod query_view;
pub mod store;
pub mod wal;

pub use live::{IngestSink, IngestedBatch};
pub use store::{
    HistogramPoint, MetricKind, Point, PointValue, SeriesRef, Store, StoredEvent, StoredSeries,
};
pub use wal::{Lsn, ReplayReport, TornTail, Wal, WalError, WalRecord};
