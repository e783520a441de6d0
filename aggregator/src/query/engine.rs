//! Evaluates PromQL expressions.

use std::{sync::Arc, time::Duration};

use super::{
    source::SeriesSource,
    value::{QueryError, Value},
};

/// The default lookback for instant selectors, as Prometheus.
pub const DEFAULT_LOOKBACK: Duration = Duration::from_secs(5 * 60);

/// Evaluates PromQL over a series source. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    source: Arc<dyn SeriesSource>,
    lookback_ms: i64,
}

impl Engine {
    pub fn new(source: Arc<dyn SeriesSource>) -> Engine {
        Engine {
            source,
            lookback_ms: DEFAULT_LOOKBACK.as_millis() as i64,
        }
    }

    /// The series source queries read.
    pub fn source(&self) -> &Arc<dyn SeriesSource> {
        &self.source
    }

    /// Evaluates `expr` at one instant (milliseconds since the epoch).
    pub fn instant(&self, expr: &str, time_ms: i64) -> Result<Value, QueryError> {
        let _ = (expr, time_ms, self.lookback_ms);
        Err(QueryError::BadData(
            "the query engine is not built yet".into(),
        ))
    }

    /// Evaluates `expr` at every step from `start_ms` to `end_ms` (inclusive); the result is a
    /// matrix (or an error for expressions that are not instant vectors or scalars).
    pub fn range(
        &self,
        expr: &str,
        start_ms: i64,
        end_ms: i64,
        step_ms: i64,
    ) -> Result<Value, QueryError> {
        let _ = (expr, start_ms, end_ms, step_ms);
        Err(QueryError::BadData(
            "the query engine is not built yet".into(),
        ))
    }
}
