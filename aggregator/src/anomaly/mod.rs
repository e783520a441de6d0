//! Anomaly detection: per-series adaptive baselines that score each sample as it arrives
//! ([`detector`]), and the evaluation that measures how well they find injected anomalies
//! ([`evaluation`], figures in docs/benchmarks.md).

pub mod detector;
pub mod evaluation;

pub use detector::{Detector, DetectorConfig, Observation};
