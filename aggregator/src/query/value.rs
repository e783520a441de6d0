//! What a query evaluates to, in the shapes of the Prometheus HTTP API.

use super::source::Labels;
use crate::storage::HistogramPoint;

/// The bits of Prometheus's staleness marker (`value.StaleNaN`): a NaN written when a series
/// stops (a rule's result or an alert that is gone). Selectors treat a series whose latest
/// sample is the marker as absent, and range functions skip markers, as Prometheus does.
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

/// Whether `value` is the staleness marker (and not any other NaN).
pub fn is_stale_marker(value: f64) -> bool {
    value.to_bits() == STALE_NAN_BITS
}

/// A histogram as queries compute it: like a stored [`HistogramPoint`], but with float counts,
/// because `rate`, `avg` and friends make fractional counts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FloatHistogram {
    pub count: f64,
    pub sum_seconds: f64,
    /// `(bucket index, count)`: non-cumulative log-linear buckets in increasing index order.
    pub buckets: Vec<(u32, f64)>,
}

impl From<&HistogramPoint> for FloatHistogram {
    fn from(point: &HistogramPoint) -> FloatHistogram {
        FloatHistogram {
            count: point.count as f64,
            sum_seconds: point.sum_seconds,
            buckets: point
                .buckets
                .iter()
                .map(|(index, count)| (*index, *count as f64))
                .collect(),
        }
    }
}

/// One instant-vector element or one scalar's value.
#[derive(Debug, Clone, PartialEq)]
pub enum SampleValue {
    Float(f64),
    Histogram(FloatHistogram),
}

/// An element of an instant vector.
#[derive(Debug, Clone, PartialEq)]
pub struct InstantSample {
    pub labels: Labels,
    pub time_ms: i64,
    pub value: SampleValue,
}

/// A series of a range vector or of a range query's result.
#[derive(Debug, Clone, PartialEq)]
pub struct RangeSeries {
    pub labels: Labels,
    pub points: Vec<(i64, SampleValue)>,
}

/// A query's result.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Scalar { time_ms: i64, value: f64 },
    String { time_ms: i64, value: String },
    Vector(Vec<InstantSample>),
    Matrix(Vec<RangeSeries>),
}

impl Value {
    /// The `resultType` of the Prometheus API.
    pub fn result_type(&self) -> &'static str {
        match self {
            Value::Scalar { .. } => "scalar",
            Value::String { .. } => "string",
            Value::Vector(_) => "vector",
            Value::Matrix(_) => "matrix",
        }
    }
}

/// Why a query failed, with the Prometheus API's `errorType`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueryError {
    /// The expression does not parse, or uses something the engine does not support (the
    /// message names the unsupported part). errorType `bad_data`, HTTP 400.
    #[error("{0}")]
    BadData(String),
    /// The expression is valid but cannot be evaluated (wrong types at run time, too many
    /// points). errorType `execution`, HTTP 422.
    #[error("{0}")]
    Execution(String),
    /// errorType `timeout`, HTTP 503.
    #[error("query timed out: {0}")]
    Timeout(String),
}

impl QueryError {
    pub fn error_type(&self) -> &'static str {
        match self {
            QueryError::BadData(_) => "bad_data",
            QueryError::Execution(_) => "execution",
            QueryError::Timeout(_) => "timeout",
        }
    }
}
