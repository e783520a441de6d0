//! Sending what the aggregator stores on to Prometheus-compatible systems.

pub mod prompb;
