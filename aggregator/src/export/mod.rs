//! Sending what the aggregator stores on to Prometheus-compatible systems.

pub mod prompb;
pub mod queue;
pub mod remote_write;

pub use remote_write::{ExportError, ExportStats, Exporters, RemoteWriteExporter};
