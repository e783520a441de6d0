//! Evaluates PromQL expressions: parses with `promql-parser`, fetches every selector's series
//! once for the whole query, then evaluates the expression at each step ([`super::eval`]).

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use promql_parser::parser::{self, Expr};

use super::{
    eval::{Evaluator, Fetch, Points, Sv, Val},
    functions::check_unique,
    source::{Labels, SeriesSource},
    value::{FloatHistogram, InstantSample, QueryError, RangeSeries, SampleValue, Value},
};

/// The default lookback for instant selectors, as Prometheus.
pub const DEFAULT_LOOKBACK: Duration = Duration::from_secs(5 * 60);

/// How long a query may evaluate, as Prometheus's default `--query.timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The most steps a range query may have, as Prometheus's API (11,000 points per series).
pub const MAX_STEPS: i64 = 11_000;

/// Evaluates PromQL over a series source. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    source: Arc<dyn SeriesSource>,
    lookback_ms: i64,
    timeout: Duration,
}

/// Parses an expression, answering `bad_data` with the parser's message.
pub fn parse(expr: &str) -> Result<Expr, QueryError> {
    parser::parse(expr).map_err(|error| QueryError::BadData(format!("invalid expression: {error}")))
}

fn to_sample_value(value: Sv) -> SampleValue {
    match value {
        Sv::F(value) => SampleValue::Float(value),
        Sv::H(histogram) => {
            SampleValue::Histogram(Arc::try_unwrap(histogram).unwrap_or_else(|h| (*h).clone()))
        }
    }
}

impl Engine {
    pub fn new(source: Arc<dyn SeriesSource>) -> Engine {
        Engine {
            source,
            lookback_ms: DEFAULT_LOOKBACK.as_millis() as i64,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same engine with another evaluation time limit (errorType `timeout` past it).
    pub fn with_timeout(mut self, timeout: Duration) -> Engine {
        self.timeout = timeout;
        self
    }

    /// The series source queries read.
    pub fn source(&self) -> &Arc<dyn SeriesSource> {
        &self.source
    }

    /// Evaluates `expr` at one instant (milliseconds since the epoch).
    pub fn instant(&self, expr: &str, time_ms: i64) -> Result<Value, QueryError> {
        let deadline = Instant::now() + self.timeout;
        let parsed = parse(expr)?;
        let fetch = Fetch::prepare(
            self.source.as_ref(),
            &parsed,
            time_ms,
            time_ms,
            self.lookback_ms,
        )?;
        let evaluator = Evaluator {
            fetch: &fetch,
            lookback_ms: self.lookback_ms,
            start_ms: time_ms,
            end_ms: time_ms,
            deadline,
        };
        Ok(match evaluator.eval(&parsed, time_ms)? {
            Val::Scalar(value) => Value::Scalar { time_ms, value },
            Val::Str(value) => Value::String { time_ms, value },
            Val::Vector(samples) => {
                check_unique(&samples)?;
                Value::Vector(
                    samples
                        .into_iter()
                        .map(|sample| InstantSample {
                            labels: Arc::try_unwrap(sample.labels)
                                .unwrap_or_else(|labels| (*labels).clone()),
                            time_ms,
                            value: to_sample_value(sample.v),
                        })
                        .collect(),
                )
            }
            Val::Matrix { series, .. } => {
                let mut out: Vec<RangeSeries> = series
                    .into_iter()
                    .map(|series| RangeSeries {
                        labels: (*series.labels).clone(),
                        points: match series.points {
                            Points::F(points) => points
                                .iter()
                                .map(|(t, v)| (*t, SampleValue::Float(*v)))
                                .collect(),
                            Points::H(points) => points
                                .iter()
                                .map(|(t, h)| (*t, SampleValue::Histogram(FloatHistogram::from(h))))
                                .collect(),
                        },
                    })
                    .collect();
                out.sort_by(|a, b| a.labels.cmp(&b.labels));
                Value::Matrix(out)
            }
        })
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
        if step_ms <= 0 {
            return Err(QueryError::BadData(
                "zero or negative query resolution step widths are not accepted. Try a positive integer".into(),
            ));
        }
        if end_ms < start_ms {
            return Err(QueryError::BadData(
                "end timestamp must not be before start time".into(),
            ));
        }
        if (end_ms - start_ms) / step_ms > MAX_STEPS {
            return Err(QueryError::BadData(format!(
                "exceeded maximum resolution of {MAX_STEPS} points per timeseries. Try decreasing the query resolution (?step=XX)"
            )));
        }
        let deadline = Instant::now() + self.timeout;
        let parsed = parse(expr)?;
        match parsed.value_type() {
            parser::value::ValueType::Vector | parser::value::ValueType::Scalar => {}
            other => {
                return Err(QueryError::BadData(format!(
                    "invalid expression type \"{}\" for range query, must be Scalar or instant Vector",
                    match other {
                        parser::value::ValueType::Matrix => "range vector",
                        _ => "string",
                    }
                )));
            }
        }
        let fetch = Fetch::prepare(
            self.source.as_ref(),
            &parsed,
            start_ms,
            end_ms,
            self.lookback_ms,
        )?;
        let evaluator = Evaluator {
            fetch: &fetch,
            lookback_ms: self.lookback_ms,
            start_ms,
            end_ms,
            deadline,
        };
        let mut series: BTreeMap<Labels, Vec<(i64, SampleValue)>> = BTreeMap::new();
        let mut ts = start_ms;
        while ts <= end_ms {
            evaluator.check_deadline()?;
            match evaluator.eval(&parsed, ts)? {
                Val::Scalar(value) => series
                    .entry(Vec::new())
                    .or_default()
                    .push((ts, SampleValue::Float(value))),
                Val::Vector(samples) => {
                    check_unique(&samples)?;
                    for sample in samples {
                        let value = to_sample_value(sample.v);
                        match series.get_mut(sample.labels.as_slice()) {
                            Some(points) => points.push((ts, value)),
                            None => {
                                series.insert((*sample.labels).clone(), vec![(ts, value)]);
                            }
                        }
                    }
                }
                other => {
                    return Err(QueryError::Execution(format!(
                        "a range query must evaluate to a scalar or an instant vector, got a {}",
                        other.type_name()
                    )));
                }
            }
            ts += step_ms;
        }
        Ok(Value::Matrix(
            series
                .into_iter()
                .map(|(labels, points)| RangeSeries { labels, points })
                .collect(),
        ))
    }
}
