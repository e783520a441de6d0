//! The evaluator: walks a parsed PromQL expression at one evaluation time, over series that
//! were fetched once for the whole query (every step of a range query reads the same data).

use std::{borrow::Cow, collections::BTreeMap, collections::HashMap, sync::Arc, time::UNIX_EPOCH};

use promql_parser::{
    label::MatchOp as ParserMatchOp,
    parser::{AtModifier, Expr, MatrixSelector, Offset, SubqueryExpr, VectorSelector},
};

use super::{
    aggregate, binary, functions,
    source::{Labels, Matcher, Samples, SeriesSource},
    value::{FloatHistogram, QueryError, is_stale_marker},
};
use crate::storage::HistogramPoint;

/// Prometheus's default `--query.max-samples`: a query that would hold more points than this
/// in memory fails instead of exhausting the aggregator.
pub const MAX_SAMPLES: usize = 50_000_000;

/// A value of one sample of an instant vector.
#[derive(Debug, Clone, PartialEq)]
pub enum Sv {
    F(f64),
    H(Arc<FloatHistogram>),
}

/// An instant-vector element. `t` is the evaluation time, except right out of a vector
/// selector evaluated for `timestamp()`, where it is the sample's own time (as Prometheus).
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: Arc<Labels>,
    pub t: i64,
    pub v: Sv,
}

/// The points of one series of a range vector: borrowed from the fetched data, or computed
/// by a subquery.
#[derive(Debug, Clone)]
pub enum Points<'a> {
    F(Cow<'a, [(i64, f64)]>),
    H(&'a [(i64, HistogramPoint)]),
}

/// The step of a subquery without one (`x[1h:]`): Prometheus's default evaluation interval.
pub const DEFAULT_SUBQUERY_STEP_MS: i64 = 60_000;

impl Points<'_> {
    pub fn len(&self) -> usize {
        match self {
            Points::F(points) => points.len(),
            Points::H(points) => points.len(),
        }
    }
}

/// One series of a range vector.
#[derive(Debug, Clone)]
pub struct RangeSeries<'a> {
    pub labels: Arc<Labels>,
    /// `labels` without `__name__`, made once per query rather than once per step.
    pub unnamed: Arc<Labels>,
    pub points: Points<'a>,
}

/// What an expression evaluates to at one time.
#[derive(Debug, Clone)]
pub enum Val<'a> {
    Scalar(f64),
    Str(String),
    Vector(Vec<Sample>),
    /// A range vector, with the window `[start, end]` it was cut from (offset applied), which
    /// the rate functions extrapolate to.
    Matrix {
        series: Vec<RangeSeries<'a>>,
        start: i64,
        end: i64,
    },
}

impl Val<'_> {
    pub fn type_name(&self) -> &'static str {
        match self {
            Val::Scalar(_) => "scalar",
            Val::Str(_) => "string",
            Val::Vector(_) => "instant vector",
            Val::Matrix { .. } => "range vector",
        }
    }
}

/// A fetched series.
pub struct Fetched {
    pub labels: Arc<Labels>,
    pub unnamed: Arc<Labels>,
    pub samples: Samples,
}

/// The series of every selector of an expression, fetched once for the whole query.
pub struct Fetch {
    by_selector: HashMap<usize, Vec<Fetched>>,
}

/// Where the evaluation of one query stands: the data, and what `@ start()`/`@ end()` mean.
pub struct Evaluator<'a> {
    pub fetch: &'a Fetch,
    pub lookback_ms: i64,
    pub start_ms: i64,
    pub end_ms: i64,
    /// When the query has run too long (checked at every step).
    pub deadline: std::time::Instant,
}

fn selector_key(selector: &VectorSelector) -> usize {
    selector as *const VectorSelector as usize
}

pub fn offset_ms(offset: &Option<Offset>) -> i64 {
    match offset {
        None => 0,
        Some(Offset::Pos(duration)) => duration.as_millis() as i64,
        Some(Offset::Neg(duration)) => -(duration.as_millis() as i64),
    }
}

/// The label matchers of a selector, in the source's terms: the metric name becomes a
/// `__name__` matcher, regexes are anchored. PromQL requires one matcher that does not match
/// the empty string.
pub fn selector_matchers(selector: &VectorSelector) -> Result<Vec<Matcher>, QueryError> {
    if !selector.matchers.or_matchers.is_empty() {
        return Err(QueryError::BadData(
            "selectors with `or` between matchers are not supported".into(),
        ));
    }
    let mut out = Vec::new();
    if let Some(name) = &selector.name {
        out.push(Matcher::equal("__name__", name));
    }
    for matcher in &selector.matchers.matchers {
        out.push(match &matcher.op {
            ParserMatchOp::Equal => Matcher::equal(&matcher.name, &matcher.value),
            ParserMatchOp::NotEqual => Matcher {
                name: matcher.name.clone(),
                op: super::MatchOp::NotEqual,
                value: matcher.value.clone(),
            },
            ParserMatchOp::Re(_) | ParserMatchOp::NotRe(_) => Matcher::regex(
                &matcher.name,
                &matcher.value,
                matches!(matcher.op, ParserMatchOp::NotRe(_)),
            )
            .map_err(|error| {
                QueryError::BadData(format!("invalid regular expression in {matcher}: {error}"))
            })?,
        });
    }
    if out.iter().all(|matcher| matcher.matches("")) {
        return Err(QueryError::BadData(
            "vector selector must contain at least one non-empty matcher".into(),
        ));
    }
    Ok(out)
}

/// The evaluation time a selector reads at, for evaluation time `ts`: `@` pins it, `offset`
/// moves it back.
fn reference_time(selector: &VectorSelector, ts: i64, start_ms: i64, end_ms: i64) -> i64 {
    pinned_time(&selector.at, &selector.offset, ts, start_ms, end_ms)
}

fn pinned_time(
    at: &Option<AtModifier>,
    offset: &Option<Offset>,
    ts: i64,
    start_ms: i64,
    end_ms: i64,
) -> i64 {
    let base = match at {
        None => ts,
        Some(AtModifier::Start) => start_ms,
        Some(AtModifier::End) => end_ms,
        Some(AtModifier::At(time)) => match time.duration_since(UNIX_EPOCH) {
            Ok(after) => after.as_millis() as i64,
            Err(before) => -(before.duration().as_millis() as i64),
        },
    };
    base - offset_ms(offset)
}

impl Fetch {
    /// Fetches the series of every selector in `expr` for evaluation times
    /// `[start_ms, end_ms]`, refusing what the engine does not evaluate.
    pub fn prepare(
        source: &dyn SeriesSource,
        expr: &Expr,
        start_ms: i64,
        end_ms: i64,
        lookback_ms: i64,
    ) -> Result<Fetch, QueryError> {
        let mut fetch = Fetch {
            by_selector: HashMap::new(),
        };
        let mut loaded = 0usize;
        fetch.walk(source, expr, start_ms, end_ms, lookback_ms, &mut loaded)?;
        Ok(fetch)
    }

    /// Fetches one selector's series over the windows of evaluation times
    /// `[start_ms, end_ms]`. `latest_only`: an instant selector evaluated at one time reads
    /// only each series' newest sample in its lookback window, so only that is fetched.
    #[allow(clippy::too_many_arguments)]
    fn load(
        &mut self,
        source: &dyn SeriesSource,
        selector: &VectorSelector,
        window_ms: i64,
        start_ms: i64,
        end_ms: i64,
        latest_only: bool,
        loaded: &mut usize,
    ) -> Result<(), QueryError> {
        let matchers = selector_matchers(selector)?;
        let first = reference_time(selector, start_ms, start_ms, end_ms);
        let last = reference_time(selector, end_ms, start_ms, end_ms);
        let series = if latest_only && first == last {
            source.select_latest(&matchers, first - window_ms, last)
        } else {
            source.select(&matchers, first - window_ms, last)
        };
        let mut fetched = Vec::with_capacity(series.len());
        for series in series {
            *loaded += series.samples.len();
            if *loaded > MAX_SAMPLES {
                return Err(QueryError::Execution(format!(
                    "query processing would load too many samples into memory (more than {MAX_SAMPLES})"
                )));
            }
            let labels = Arc::new(series.labels);
            fetched.push(Fetched {
                unnamed: drop_name(&labels),
                labels,
                samples: series.samples,
            });
        }
        self.by_selector.insert(selector_key(selector), fetched);
        Ok(())
    }

    fn walk(
        &mut self,
        source: &dyn SeriesSource,
        expr: &Expr,
        start_ms: i64,
        end_ms: i64,
        lookback_ms: i64,
        loaded: &mut usize,
    ) -> Result<(), QueryError> {
        match expr {
            Expr::VectorSelector(selector) => self.load(
                source,
                selector,
                lookback_ms,
                start_ms,
                end_ms,
                true,
                loaded,
            ),
            Expr::MatrixSelector(MatrixSelector { vs, range }) => self.load(
                source,
                vs,
                range.as_millis() as i64,
                start_ms,
                end_ms,
                false,
                loaded,
            ),
            Expr::Aggregate(aggregate) => {
                if let Some(param) = &aggregate.param {
                    self.walk(source, param, start_ms, end_ms, lookback_ms, loaded)?;
                }
                self.walk(
                    source,
                    &aggregate.expr,
                    start_ms,
                    end_ms,
                    lookback_ms,
                    loaded,
                )
            }
            Expr::Unary(unary) => {
                self.walk(source, &unary.expr, start_ms, end_ms, lookback_ms, loaded)
            }
            Expr::Binary(binary) => {
                self.walk(source, &binary.lhs, start_ms, end_ms, lookback_ms, loaded)?;
                self.walk(source, &binary.rhs, start_ms, end_ms, lookback_ms, loaded)
            }
            Expr::Paren(paren) => {
                self.walk(source, &paren.expr, start_ms, end_ms, lookback_ms, loaded)
            }
            Expr::Call(call) => {
                functions::check_supported(call.func.name)?;
                for arg in &call.args.args {
                    self.walk(source, arg, start_ms, end_ms, lookback_ms, loaded)?;
                }
                Ok(())
            }
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) => Ok(()),
            Expr::Subquery(subquery) => {
                // The inner expression runs at every subquery step in the windows of all
                // outer steps.
                let first = pinned_time(&subquery.at, &subquery.offset, start_ms, start_ms, end_ms);
                let last = pinned_time(&subquery.at, &subquery.offset, end_ms, start_ms, end_ms);
                let range = subquery.range.as_millis() as i64;
                self.walk(
                    source,
                    &subquery.expr,
                    first - range,
                    last,
                    lookback_ms,
                    loaded,
                )
            }
            Expr::Extension(_) => Err(QueryError::BadData(
                "extension expressions are not supported".into(),
            )),
        }
    }
}

impl<'a> Evaluator<'a> {
    fn fetched(&self, selector: &VectorSelector) -> &'a [Fetched] {
        self.fetch
            .by_selector
            .get(&selector_key(selector))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// An instant vector selector at `ts`: each series' latest sample at most `lookback` old.
    pub fn vector_selector(
        &self,
        selector: &VectorSelector,
        ts: i64,
        sample_time: bool,
    ) -> Vec<Sample> {
        let reference = reference_time(selector, ts, self.start_ms, self.end_ms);
        let oldest = reference - self.lookback_ms;
        let mut out = Vec::new();
        for series in self.fetched(selector) {
            let found = match &series.samples {
                Samples::Floats(points) => {
                    let end = points.partition_point(|(t, _)| *t <= reference);
                    // A staleness marker ends the series at once, lookback or not.
                    (end > 0 && points[end - 1].0 >= oldest && !is_stale_marker(points[end - 1].1))
                        .then(|| (points[end - 1].0, Sv::F(points[end - 1].1)))
                }
                Samples::Histograms(points) => {
                    let end = points.partition_point(|(t, _)| *t <= reference);
                    (end > 0 && points[end - 1].0 >= oldest).then(|| {
                        (
                            points[end - 1].0,
                            Sv::H(Arc::new(FloatHistogram::from(&points[end - 1].1))),
                        )
                    })
                }
            };
            if let Some((t, v)) = found {
                out.push(Sample {
                    labels: series.labels.clone(),
                    t: if sample_time { t } else { ts },
                    v,
                });
            }
        }
        out
    }

    /// A range vector selector at `ts`: each series' samples in `[ts - range, ts]` (both ends
    /// included, as Prometheus 2).
    pub fn matrix_selector(&self, selector: &MatrixSelector, ts: i64) -> Val<'a> {
        let end = reference_time(&selector.vs, ts, self.start_ms, self.end_ms);
        let start = end - selector.range.as_millis() as i64;
        let mut series = Vec::new();
        for fetched in self.fetched(&selector.vs) {
            let points = match &fetched.samples {
                Samples::Floats(points) => {
                    let from = points.partition_point(|(t, _)| *t < start);
                    let to = points.partition_point(|(t, _)| *t <= end);
                    let window = &points[from..to];
                    // Staleness markers are not samples: range functions never see them
                    // (copied only when the window has one).
                    if window.iter().any(|(_, v)| is_stale_marker(*v)) {
                        Points::F(Cow::Owned(
                            window
                                .iter()
                                .filter(|(_, v)| !is_stale_marker(*v))
                                .copied()
                                .collect(),
                        ))
                    } else {
                        Points::F(Cow::Borrowed(window))
                    }
                }
                Samples::Histograms(points) => {
                    let from = points.partition_point(|(t, _)| *t < start);
                    let to = points.partition_point(|(t, _)| *t <= end);
                    Points::H(&points[from..to])
                }
            };
            if points.len() > 0 {
                series.push(RangeSeries {
                    labels: fetched.labels.clone(),
                    unnamed: fetched.unnamed.clone(),
                    points,
                });
            }
        }
        Val::Matrix { series, start, end }
    }

    pub fn eval(&self, expr: &Expr, ts: i64) -> Result<Val<'a>, QueryError> {
        match expr {
            Expr::NumberLiteral(number) => Ok(Val::Scalar(number.val)),
            Expr::StringLiteral(string) => Ok(Val::Str(string.val.clone())),
            Expr::Paren(paren) => self.eval(&paren.expr, ts),
            Expr::VectorSelector(selector) => {
                Ok(Val::Vector(self.vector_selector(selector, ts, false)))
            }
            Expr::MatrixSelector(selector) => Ok(self.matrix_selector(selector, ts)),
            Expr::Unary(unary) => match self.eval(&unary.expr, ts)? {
                Val::Scalar(value) => Ok(Val::Scalar(-value)),
                Val::Vector(samples) => samples
                    .into_iter()
                    .map(|sample| match sample.v {
                        Sv::F(value) => Ok(Sample {
                            labels: drop_name(&sample.labels),
                            t: ts,
                            v: Sv::F(-value),
                        }),
                        Sv::H(_) => Err(QueryError::Execution(
                            "unary minus on histogram samples is not supported".into(),
                        )),
                    })
                    .collect::<Result<_, _>>()
                    .map(Val::Vector),
                other => Err(QueryError::Execution(format!(
                    "unary minus on a {} is not allowed",
                    other.type_name()
                ))),
            },
            Expr::Binary(expr) => binary::eval(self, expr, ts),
            Expr::Aggregate(expr) => aggregate::eval(self, expr, ts),
            Expr::Call(call) => functions::eval(self, call, ts),
            Expr::Subquery(subquery) => self.subquery(subquery, ts),
            Expr::Extension(_) => Err(QueryError::BadData(
                "extension expressions are not supported".into(),
            )),
        }
    }

    /// A subquery at `ts`: the inner expression at every multiple of the step in
    /// `[ts - offset - range, ts - offset]` (both ends included, as Prometheus 2).
    fn subquery(&self, subquery: &SubqueryExpr, ts: i64) -> Result<Val<'a>, QueryError> {
        let step = subquery
            .step
            .map(|step| step.as_millis() as i64)
            .unwrap_or(DEFAULT_SUBQUERY_STEP_MS);
        if step <= 0 {
            return Err(QueryError::BadData(
                "a subquery step must be positive".into(),
            ));
        }
        let end = pinned_time(
            &subquery.at,
            &subquery.offset,
            ts,
            self.start_ms,
            self.end_ms,
        );
        let start = end - subquery.range.as_millis() as i64;
        if (end - start) / step > 11_000 {
            return Err(QueryError::BadData(
                "a subquery may have at most 11000 steps per evaluation".into(),
            ));
        }
        let mut t = step * start.div_euclid(step);
        if t < start {
            t += step;
        }
        let mut series: BTreeMap<Arc<Labels>, Vec<(i64, f64)>> = BTreeMap::new();
        while t <= end {
            self.check_deadline()?;
            match self.eval(&subquery.expr, t)? {
                Val::Vector(samples) => {
                    for sample in samples {
                        let Sv::F(value) = sample.v else {
                            return Err(QueryError::Execution(
                                "subqueries over histogram samples are not supported".into(),
                            ));
                        };
                        series.entry(sample.labels).or_default().push((t, value));
                    }
                }
                Val::Scalar(value) => series
                    .entry(Arc::new(Vec::new()))
                    .or_default()
                    .push((t, value)),
                other => {
                    return Err(QueryError::BadData(format!(
                        "a subquery needs an instant vector or a scalar, got a {}",
                        other.type_name()
                    )));
                }
            }
            t += step;
        }
        Ok(Val::Matrix {
            series: series
                .into_iter()
                .map(|(labels, points)| RangeSeries {
                    unnamed: drop_name(&labels),
                    labels,
                    points: Points::F(Cow::Owned(points)),
                })
                .collect(),
            start,
            end,
        })
    }

    /// Fails a query that has run past its deadline.
    pub fn check_deadline(&self) -> Result<(), QueryError> {
        if std::time::Instant::now() > self.deadline {
            return Err(QueryError::Timeout(
                "query evaluation ran past its time limit".into(),
            ));
        }
        Ok(())
    }

    /// Evaluates an expression that must be an instant vector.
    pub fn eval_vector(&self, expr: &Expr, ts: i64) -> Result<Vec<Sample>, QueryError> {
        match self.eval(expr, ts)? {
            Val::Vector(samples) => Ok(samples),
            other => Err(QueryError::Execution(format!(
                "expected an instant vector, got a {}",
                other.type_name()
            ))),
        }
    }

    /// Evaluates an expression that must be a scalar.
    pub fn eval_scalar(&self, expr: &Expr, ts: i64) -> Result<f64, QueryError> {
        match self.eval(expr, ts)? {
            Val::Scalar(value) => Ok(value),
            other => Err(QueryError::Execution(format!(
                "expected a scalar, got a {}",
                other.type_name()
            ))),
        }
    }
}

/// The labels without `__name__`.
pub fn drop_name(labels: &Arc<Labels>) -> Arc<Labels> {
    if labels.iter().any(|(name, _)| name == "__name__") {
        Arc::new(
            labels
                .iter()
                .filter(|(name, _)| name != "__name__")
                .cloned()
                .collect(),
        )
    } else {
        labels.clone()
    }
}

/// The value of a label ("" when absent).
pub fn label_value<'l>(labels: &'l Labels, name: &str) -> &'l str {
    labels
        .iter()
        .find(|(label, _)| label == name)
        .map(|(_, value)| value.as_str())
        .unwrap_or("")
}

/// Sets (or, with an empty value, removes) a label, keeping the labels sorted.
pub fn set_label(labels: &mut Labels, name: &str, value: String) {
    match labels.binary_search_by(|(label, _)| label.as_str().cmp(name)) {
        Ok(at) if value.is_empty() => {
            labels.remove(at);
        }
        Ok(at) => labels[at].1 = value,
        Err(_) if value.is_empty() => {}
        Err(at) => labels.insert(at, (name.to_owned(), value)),
    }
}

/// Whether a string is a valid Prometheus label name.
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}
