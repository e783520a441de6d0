//! Anomaly detection: per-series adaptive baselines that score each sample as it arrives
//! ([`detector`]), and the evaluation that measures how well they find injected anomalies
//! ([`evaluation`], figures in docs/benchmarks.md), and the scorer that runs them on chosen
//! series as they are ingested and records `vigil_anomaly_score` ([`scorer`]).

pub mod detector;
pub mod evaluation;
pub mod scorer;

pub use detector::{Detector, DetectorConfig, Observation};
