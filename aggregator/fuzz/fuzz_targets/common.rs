//! What the fuzz targets and the seed generator share.

#![allow(dead_code)]

use vigil_aggregator::ingest::admission::Limits;

/// The aggregator's clock during a run: 2026-01-01T00:00:00Z.
pub const NOW_MS: i64 = 1_767_225_600_000;

/// Limits as configured by default, except a series limit small enough to reach.
pub const LIMITS: Limits = Limits {
    max_series_per_node: 4,
    retention_ms: 15 * 24 * 3600 * 1000,
    max_future_skew_ms: 5 * 60 * 1000,
};

/// Most messages one input is read as (keeps a run short).
pub const MAX_MESSAGES: usize = 64;
