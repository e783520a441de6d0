//! Vigil's aggregator: agents stream batches over gRPC ([`ingest`]); each accepted batch is
//! appended to a write-ahead log and fsynced before it is acked, then kept in the
//! [`storage::Store`] (memory, checkpointed to an embedded database; docs/storage.md). [`security`] decides who may connect and write, and audits it.
//! [`server::start`] runs it all in-process (the binary is a thin wrapper around it).

#![forbid(unsafe_code)]

pub mod alerting;
pub mod anomaly;
pub mod config;
pub mod export;
pub mod http;
pub mod ingest;
pub mod nodes;
pub mod query;
pub mod query_service;
pub mod security;
pub mod server;
pub mod storage;
pub mod verdict;

pub use config::AggregatorConfig;
pub use ingest::counters::CountersSnapshot;
pub use server::{RunningAggregator, StartError, start};
pub use storage::{Point, PointValue, SeriesRef, Store, StoredSeries};
