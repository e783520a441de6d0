//! PromQL functions, following Prometheus 2's `functions.go`: the rate family with its
//! extrapolation, `*_over_time`, math, labels, `absent`, time and histogram functions.

use std::sync::Arc;

use promql_parser::parser::{Call, Expr};
use regex::Regex;

use super::{
    binary::format_labels,
    eval::{
        Evaluator, Points, RangeSeries, Sample, Sv, Val, drop_name, label_value, selector_matchers,
        set_label, valid_label_name,
    },
    histogram::{self, Bucket},
    source::{Labels, MatchOp},
    value::{FloatHistogram, QueryError},
};

const MATH: &[&str] = &[
    "abs", "ceil", "floor", "exp", "ln", "log2", "log10", "sqrt", "sgn", "acos", "acosh", "asin",
    "asinh", "atan", "atanh", "cos", "cosh", "sin", "sinh", "tan", "tanh", "deg", "rad",
];

const RANGE: &[&str] = &[
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "changes",
    "resets",
    "deriv",
    "predict_linear",
    "avg_over_time",
    "min_over_time",
    "max_over_time",
    "sum_over_time",
    "count_over_time",
    "last_over_time",
    "quantile_over_time",
    "stddev_over_time",
    "stdvar_over_time",
    "present_over_time",
];

const OTHER: &[&str] = &[
    "round",
    "clamp",
    "clamp_min",
    "clamp_max",
    "time",
    "timestamp",
    "vector",
    "scalar",
    "sort",
    "sort_desc",
    "label_replace",
    "label_join",
    "absent",
    "absent_over_time",
    "pi",
    "histogram_quantile",
    "histogram_count",
    "histogram_sum",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "hour",
    "minute",
    "month",
    "year",
];

/// Refuses, before any data is read, a function the engine does not evaluate.
pub fn check_supported(name: &str) -> Result<(), QueryError> {
    if MATH.contains(&name) || RANGE.contains(&name) || OTHER.contains(&name) {
        Ok(())
    } else {
        Err(QueryError::BadData(format!(
            "function {name}() is not supported"
        )))
    }
}

/// Prometheus's `quantile`: linear interpolation between the closest ranks.
pub fn quantile(q: f64, mut values: Vec<f64>) -> f64 {
    if values.is_empty() || q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len() as f64;
    let rank = q * (n - 1.0);
    let lower = rank.floor().max(0.0);
    let upper = (n - 1.0).min(lower + 1.0);
    let weight = rank - rank.floor();
    values[lower as usize] * (1.0 - weight) + values[upper as usize] * weight
}

fn arg(call: &Call, index: usize) -> Result<&Expr, QueryError> {
    call.args
        .args
        .get(index)
        .map(|arg| arg.as_ref())
        .ok_or_else(|| {
            QueryError::BadData(format!(
                "function {}() needs at least {} arguments",
                call.func.name,
                index + 1
            ))
        })
}

fn string_arg(
    ev: &Evaluator<'_>,
    call: &Call,
    index: usize,
    ts: i64,
) -> Result<String, QueryError> {
    match ev.eval(arg(call, index)?, ts)? {
        Val::Str(value) => Ok(value),
        other => Err(QueryError::BadData(format!(
            "argument {} of {}() must be a string, got a {}",
            index + 1,
            call.func.name,
            other.type_name()
        ))),
    }
}

/// Applies `f` to every float sample, dropping the metric name.
fn map_floats(samples: Vec<Sample>, ts: i64, f: impl Fn(f64) -> f64) -> Vec<Sample> {
    samples
        .into_iter()
        .filter_map(|sample| match sample.v {
            Sv::F(value) => Some(Sample {
                labels: drop_name(&sample.labels),
                t: ts,
                v: Sv::F(f(value)),
            }),
            // Prometheus 2 skips histogram samples in float functions.
            Sv::H(_) => None,
        })
        .collect()
}

fn math(name: &str) -> fn(f64) -> f64 {
    match name {
        "abs" => f64::abs,
        "ceil" => f64::ceil,
        "floor" => f64::floor,
        "exp" => f64::exp,
        "ln" => f64::ln,
        "log2" => f64::log2,
        "log10" => f64::log10,
        "sqrt" => f64::sqrt,
        "sgn" => |v: f64| {
            if v > 0.0 {
                1.0
            } else if v < 0.0 {
                -1.0
            } else {
                v
            }
        },
        "acos" => f64::acos,
        "acosh" => f64::acosh,
        "asin" => f64::asin,
        "asinh" => f64::asinh,
        "atan" => f64::atan,
        "atanh" => f64::atanh,
        "cos" => f64::cos,
        "cosh" => f64::cosh,
        "sin" => f64::sin,
        "sinh" => f64::sinh,
        "tan" => f64::tan,
        "tanh" => f64::tanh,
        "deg" => f64::to_degrees,
        _ => f64::to_radians,
    }
}

pub fn eval<'a>(ev: &Evaluator<'a>, call: &Call, ts: i64) -> Result<Val<'a>, QueryError> {
    let name = call.func.name;
    check_supported(name)?;
    if MATH.contains(&name) {
        let samples = ev.eval_vector(arg(call, 0)?, ts)?;
        return Ok(Val::Vector(map_floats(samples, ts, math(name))));
    }
    if RANGE.contains(&name) {
        return range_function(ev, call, ts);
    }
    match name {
        "pi" => Ok(Val::Scalar(std::f64::consts::PI)),
        "time" => Ok(Val::Scalar(ts as f64 / 1000.0)),
        "round" => {
            let samples = ev.eval_vector(arg(call, 0)?, ts)?;
            let to_nearest = match call.args.args.get(1) {
                Some(expr) => ev.eval_scalar(expr, ts)?,
                None => 1.0,
            };
            let inverse = 1.0 / to_nearest;
            Ok(Val::Vector(map_floats(samples, ts, |v| {
                (v * inverse + 0.5).floor() / inverse
            })))
        }
        "clamp" => {
            let samples = ev.eval_vector(arg(call, 0)?, ts)?;
            let min = ev.eval_scalar(arg(call, 1)?, ts)?;
            let max = ev.eval_scalar(arg(call, 2)?, ts)?;
            if max < min {
                return Ok(Val::Vector(Vec::new()));
            }
            Ok(Val::Vector(map_floats(samples, ts, |v| {
                go_max(min, go_min(max, v))
            })))
        }
        "clamp_min" => {
            let samples = ev.eval_vector(arg(call, 0)?, ts)?;
            let min = ev.eval_scalar(arg(call, 1)?, ts)?;
            Ok(Val::Vector(map_floats(samples, ts, |v| go_max(v, min))))
        }
        "clamp_max" => {
            let samples = ev.eval_vector(arg(call, 0)?, ts)?;
            let max = ev.eval_scalar(arg(call, 1)?, ts)?;
            Ok(Val::Vector(map_floats(samples, ts, |v| go_min(v, max))))
        }
        "timestamp" => {
            let argument = unwrap_parens(arg(call, 0)?);
            // Of a plain selector, the samples' own times; of anything else, the evaluation
            // time (Prometheus's special case).
            let samples = match argument {
                Expr::VectorSelector(selector) => ev.vector_selector(selector, ts, true),
                other => ev.eval_vector(other, ts)?,
            };
            Ok(Val::Vector(
                samples
                    .into_iter()
                    .map(|sample| Sample {
                        labels: drop_name(&sample.labels),
                        t: ts,
                        v: Sv::F(sample.t as f64 / 1000.0),
                    })
                    .collect(),
            ))
        }
        "vector" => {
            let value = ev.eval_scalar(arg(call, 0)?, ts)?;
            Ok(Val::Vector(vec![Sample {
                labels: Arc::new(Vec::new()),
                t: ts,
                v: Sv::F(value),
            }]))
        }
        "scalar" => {
            let samples = ev.eval_vector(arg(call, 0)?, ts)?;
            Ok(Val::Scalar(match samples.as_slice() {
                [
                    Sample {
                        v: Sv::F(value), ..
                    },
                ] => *value,
                _ => f64::NAN,
            }))
        }
        "sort" | "sort_desc" => {
            let mut samples = ev.eval_vector(arg(call, 0)?, ts)?;
            let descending = name == "sort_desc";
            let key = |s: &Sample| match s.v {
                Sv::F(v) => v,
                Sv::H(_) => f64::NAN,
            };
            // NaN last either way, as Prometheus's sorters.
            samples.sort_by(|a, b| {
                let (x, y) = (key(a), key(b));
                match (x.is_nan(), y.is_nan()) {
                    (true, true) => std::cmp::Ordering::Equal,
                    (true, false) => std::cmp::Ordering::Greater,
                    (false, true) => std::cmp::Ordering::Less,
                    _ if descending => y.total_cmp(&x),
                    _ => x.total_cmp(&y),
                }
            });
            Ok(Val::Vector(
                samples.into_iter().map(|s| Sample { t: ts, ..s }).collect(),
            ))
        }
        "label_replace" => label_replace(ev, call, ts),
        "label_join" => label_join(ev, call, ts),
        "absent" => {
            let samples = ev.eval_vector(arg(call, 0)?, ts)?;
            Ok(Val::Vector(absent(samples.is_empty(), arg(call, 0)?, ts)?))
        }
        "absent_over_time" => {
            let Val::Matrix { series, .. } = ev.eval(arg(call, 0)?, ts)? else {
                return Err(QueryError::BadData(
                    "absent_over_time() needs a range vector".into(),
                ));
            };
            Ok(Val::Vector(absent(series.is_empty(), arg(call, 0)?, ts)?))
        }
        "histogram_quantile" => {
            let q = ev.eval_scalar(arg(call, 0)?, ts)?;
            let samples = ev.eval_vector(arg(call, 1)?, ts)?;
            Ok(Val::Vector(histogram_quantile(q, samples, ts)))
        }
        "histogram_count" | "histogram_sum" => {
            let samples = ev.eval_vector(arg(call, 0)?, ts)?;
            let count = name == "histogram_count";
            Ok(Val::Vector(
                samples
                    .into_iter()
                    .filter_map(|sample| match &sample.v {
                        Sv::H(h) => Some(Sample {
                            labels: drop_name(&sample.labels),
                            t: ts,
                            v: Sv::F(if count { h.count } else { h.sum_seconds }),
                        }),
                        Sv::F(_) => None,
                    })
                    .collect(),
            ))
        }
        _ => date_function(ev, call, ts),
    }
}

/// Go's `math.Max`/`math.Min`: NaN wins.
fn go_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

fn go_min(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.min(b)
    }
}

fn unwrap_parens(mut expr: &Expr) -> &Expr {
    while let Expr::Paren(paren) = expr {
        expr = &paren.expr;
    }
    expr
}

fn date_function<'a>(ev: &Evaluator<'a>, call: &Call, ts: i64) -> Result<Val<'a>, QueryError> {
    let name = call.func.name;
    let samples = match call.args.args.first() {
        Some(expr) => ev.eval_vector(expr, ts)?,
        None => vec![Sample {
            labels: Arc::new(Vec::new()),
            t: ts,
            v: Sv::F(ts as f64 / 1000.0),
        }],
    };
    let part = |seconds: f64| -> f64 {
        if !seconds.is_finite() {
            return f64::NAN;
        }
        let Ok(date) = time::OffsetDateTime::from_unix_timestamp(seconds as i64) else {
            return f64::NAN;
        };
        match name {
            "day_of_month" => date.day() as f64,
            "day_of_week" => date.weekday().number_days_from_sunday() as f64,
            "day_of_year" => date.ordinal() as f64,
            "days_in_month" => time::util::days_in_month(date.month(), date.year()) as f64,
            "hour" => date.hour() as f64,
            "minute" => date.minute() as f64,
            "month" => u8::from(date.month()) as f64,
            _ => date.year() as f64,
        }
    };
    Ok(Val::Vector(map_floats(samples, ts, part)))
}

/// `absent()`'s one sample: labels from the selector's equality matchers.
fn absent(empty: bool, argument: &Expr, ts: i64) -> Result<Vec<Sample>, QueryError> {
    if !empty {
        return Ok(Vec::new());
    }
    let selector = match unwrap_parens(argument) {
        Expr::VectorSelector(selector) => Some(selector),
        Expr::MatrixSelector(matrix) => Some(&matrix.vs),
        _ => None,
    };
    let mut labels: Labels = Vec::new();
    let mut repeated: Vec<String> = Vec::new();
    if let Some(selector) = selector {
        for matcher in selector_matchers(selector)? {
            if matcher.name == "__name__" {
                continue;
            }
            let seen = labels.iter().any(|(name, _)| *name == matcher.name);
            if matches!(matcher.op, MatchOp::Equal) && !seen && !repeated.contains(&matcher.name) {
                set_label(&mut labels, &matcher.name, matcher.value.clone());
            } else if seen {
                labels.retain(|(name, _)| *name != matcher.name);
                repeated.push(matcher.name.clone());
            }
        }
    }
    Ok(vec![Sample {
        labels: Arc::new(labels),
        t: ts,
        v: Sv::F(1.0),
    }])
}

fn label_replace<'a>(ev: &Evaluator<'a>, call: &Call, ts: i64) -> Result<Val<'a>, QueryError> {
    let samples = ev.eval_vector(arg(call, 0)?, ts)?;
    let destination = string_arg(ev, call, 1, ts)?;
    let replacement = string_arg(ev, call, 2, ts)?;
    let source = string_arg(ev, call, 3, ts)?;
    let pattern = string_arg(ev, call, 4, ts)?;
    let regex = Regex::new(&format!("^(?:{pattern})$")).map_err(|error| {
        QueryError::BadData(format!(
            "invalid regular expression in label_replace(): {error}"
        ))
    })?;
    if !valid_label_name(&destination) {
        return Err(QueryError::BadData(format!(
            "invalid destination label name in label_replace(): {destination}"
        )));
    }
    let mut out = Vec::with_capacity(samples.len());
    for sample in samples {
        let value = label_value(&sample.labels, &source);
        let labels = match regex.captures(value) {
            Some(captures) => {
                let mut result = String::new();
                captures.expand(&replacement, &mut result);
                let mut labels = (*sample.labels).clone();
                set_label(&mut labels, &destination, result);
                Arc::new(labels)
            }
            None => sample.labels,
        };
        out.push(Sample {
            labels,
            t: ts,
            v: sample.v,
        });
    }
    Ok(Val::Vector(out))
}

fn label_join<'a>(ev: &Evaluator<'a>, call: &Call, ts: i64) -> Result<Val<'a>, QueryError> {
    let samples = ev.eval_vector(arg(call, 0)?, ts)?;
    let destination = string_arg(ev, call, 1, ts)?;
    let separator = string_arg(ev, call, 2, ts)?;
    let sources: Vec<String> = (3..call.args.args.len())
        .map(|index| string_arg(ev, call, index, ts))
        .collect::<Result<_, _>>()?;
    if !valid_label_name(&destination) {
        return Err(QueryError::BadData(format!(
            "invalid destination label name in label_join(): {destination}"
        )));
    }
    let mut out = Vec::with_capacity(samples.len());
    for sample in samples {
        let joined = sources
            .iter()
            .map(|source| label_value(&sample.labels, source))
            .collect::<Vec<_>>()
            .join(&separator);
        let mut labels = (*sample.labels).clone();
        set_label(&mut labels, &destination, joined);
        out.push(Sample {
            labels: Arc::new(labels),
            t: ts,
            v: sample.v,
        });
    }
    Ok(Val::Vector(out))
}

fn histogram_quantile(q: f64, samples: Vec<Sample>, ts: i64) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut groups: Vec<(Labels, Vec<Bucket>)> = Vec::new();
    let mut index: std::collections::HashMap<Labels, usize> = std::collections::HashMap::new();
    for sample in samples {
        match &sample.v {
            Sv::H(h) => out.push(Sample {
                labels: drop_name(&sample.labels),
                t: ts,
                v: Sv::F(histogram::native_quantile(q, h)),
            }),
            Sv::F(count) => {
                // A float sample without a parsable `le` is not a bucket: skipped.
                let Ok(upper) = label_value(&sample.labels, "le").parse::<f64>() else {
                    continue;
                };
                let key: Labels = sample
                    .labels
                    .iter()
                    .filter(|(name, _)| name != "le" && name != "__name__")
                    .cloned()
                    .collect();
                let at = *index.entry(key.clone()).or_insert_with(|| {
                    groups.push((key, Vec::new()));
                    groups.len() - 1
                });
                groups[at].1.push(Bucket {
                    upper,
                    count: *count,
                });
            }
        }
    }
    for (labels, buckets) in groups {
        out.push(Sample {
            labels: Arc::new(labels),
            t: ts,
            v: Sv::F(histogram::bucket_quantile(q, buckets)),
        });
    }
    out
}

/// Functions of a range vector: one output sample per input series (or none).
fn range_function<'a>(ev: &Evaluator<'a>, call: &Call, ts: i64) -> Result<Val<'a>, QueryError> {
    let name = call.func.name;
    let (matrix_arg, scalar) = match name {
        "quantile_over_time" => (1, Some(ev.eval_scalar(arg(call, 0)?, ts)?)),
        "predict_linear" => (0, Some(ev.eval_scalar(arg(call, 1)?, ts)?)),
        _ => (0, None),
    };
    let Val::Matrix { series, start, end } = ev.eval(arg(call, matrix_arg)?, ts)? else {
        return Err(QueryError::BadData(format!(
            "function {name}() needs a range vector (subqueries are not supported)"
        )));
    };
    let scalar = scalar.unwrap_or(f64::NAN);
    let mut out = Vec::with_capacity(series.len());
    for RangeSeries {
        labels,
        unnamed,
        points,
    } in series
    {
        let value = match points {
            Points::F(points) => float_range(name, &points, start, end, ts, scalar).map(Sv::F),
            Points::H(points) => histogram_range(name, points, start, end),
        };
        if let Some(value) = value {
            out.push(Sample {
                labels: if name == "last_over_time" {
                    labels
                } else {
                    unnamed
                },
                t: ts,
                v: value,
            });
        }
    }
    check_unique(&out)?;
    Ok(Val::Vector(out))
}

/// Dropping the metric name can make two results alike, which Prometheus refuses.
pub fn check_unique(samples: &[Sample]) -> Result<(), QueryError> {
    if samples.len() < 2 {
        return Ok(());
    }
    let mut seen = std::collections::HashSet::with_capacity(samples.len());
    for sample in samples {
        if !seen.insert(&*sample.labels) {
            return Err(QueryError::Execution(format!(
                "vector cannot contain metrics with the same labelset {}",
                format_labels(&sample.labels)
            )));
        }
    }
    Ok(())
}

fn float_range(
    name: &str,
    points: &[(i64, f64)],
    start: i64,
    end: i64,
    ts: i64,
    scalar: f64,
) -> Option<f64> {
    let values = || points.iter().map(|(_, v)| *v);
    Some(match name {
        "rate" => extrapolated_rate(points, start, end, true, true)?,
        "increase" => extrapolated_rate(points, start, end, true, false)?,
        "delta" => extrapolated_rate(points, start, end, false, false)?,
        "irate" => instant_value(points, true)?,
        "idelta" => instant_value(points, false)?,
        "changes" => points
            .windows(2)
            .filter(|w| w[1].1 != w[0].1 && !(w[1].1.is_nan() && w[0].1.is_nan()))
            .count() as f64,
        "resets" => points.windows(2).filter(|w| w[1].1 < w[0].1).count() as f64,
        "deriv" => {
            if points.len() < 2 {
                return None;
            }
            linear_regression(points, points[0].0).0
        }
        "predict_linear" => {
            if points.len() < 2 {
                return None;
            }
            let (slope, intercept) = linear_regression(points, ts);
            slope * scalar + intercept
        }
        "avg_over_time" => {
            let (mut mean, mut count) = (0.0f64, 0.0f64);
            for v in values() {
                count += 1.0;
                if mean.is_infinite() {
                    if v.is_infinite() && (mean > 0.0) == (v > 0.0) {
                        continue;
                    }
                    if !v.is_infinite() && !v.is_nan() {
                        continue;
                    }
                }
                mean += v / count - mean / count;
            }
            mean
        }
        "min_over_time" => {
            values().fold(
                points[0].1,
                |min, v| {
                    if v < min || min.is_nan() { v } else { min }
                },
            )
        }
        "max_over_time" => {
            values().fold(
                points[0].1,
                |max, v| {
                    if v > max || max.is_nan() { v } else { max }
                },
            )
        }
        "sum_over_time" => values().sum(),
        "count_over_time" => points.len() as f64,
        "last_over_time" => points[points.len() - 1].1,
        "present_over_time" => 1.0,
        "quantile_over_time" => quantile(scalar, values().collect()),
        "stddev_over_time" | "stdvar_over_time" => {
            let (mut count, mut mean, mut aux) = (0.0, 0.0, 0.0);
            for v in values() {
                count += 1.0;
                let delta = v - mean;
                mean += delta / count;
                aux += delta * (v - mean);
            }
            if name == "stddev_over_time" {
                (aux / count).sqrt()
            } else {
                aux / count
            }
        }
        _ => return None,
    })
}

fn histogram_range(
    name: &str,
    points: &[(i64, crate::storage::HistogramPoint)],
    start: i64,
    end: i64,
) -> Option<Sv> {
    match name {
        "rate" | "increase" | "delta" => {
            histogram_rate(points, start, end, name != "delta", name == "rate")
                .map(|h| Sv::H(Arc::new(h)))
        }
        "count_over_time" => Some(Sv::F(points.len() as f64)),
        "present_over_time" => Some(Sv::F(1.0)),
        "last_over_time" => points
            .last()
            .map(|(_, h)| Sv::H(Arc::new(FloatHistogram::from(h)))),
        // Prometheus 2 skips histogram samples in the other range functions.
        _ => None,
    }
}

/// How far to stretch a sampled interval towards the window's ends (Prometheus's
/// `extrapolatedRate`): to the edge when the gap is under 1.1 average intervals, else half an
/// interval; a counter is not stretched below zero.
fn extrapolation_factor(
    first_t: i64,
    last_t: i64,
    count: usize,
    start: i64,
    end: i64,
    zero_limit: Option<f64>,
) -> f64 {
    let mut to_start = (first_t - start) as f64 / 1000.0;
    let to_end = (end - last_t) as f64 / 1000.0;
    let sampled = (last_t - first_t) as f64 / 1000.0;
    let average = sampled / (count - 1) as f64;
    if let Some(to_zero) = zero_limit
        && to_zero < to_start
    {
        to_start = to_zero;
    }
    let threshold = average * 1.1;
    let mut interval = sampled;
    interval += if to_start < threshold {
        to_start
    } else {
        average / 2.0
    };
    interval += if to_end < threshold {
        to_end
    } else {
        average / 2.0
    };
    interval / sampled
}

fn extrapolated_rate(
    points: &[(i64, f64)],
    start: i64,
    end: i64,
    counter: bool,
    rate: bool,
) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let (first_t, first_v) = points[0];
    let (last_t, last_v) = points[points.len() - 1];
    let mut result = last_v - first_v;
    if counter {
        let mut previous = 0.0;
        for (_, value) in points {
            if *value < previous {
                result += previous;
            }
            previous = *value;
        }
    }
    let sampled = (last_t - first_t) as f64 / 1000.0;
    let zero_limit =
        (counter && result > 0.0 && first_v >= 0.0).then(|| sampled * (first_v / result));
    result *= extrapolation_factor(first_t, last_t, points.len(), start, end, zero_limit);
    if rate {
        result /= (end - start) as f64 / 1000.0;
    }
    Some(result)
}

fn histogram_rate(
    points: &[(i64, crate::storage::HistogramPoint)],
    start: i64,
    end: i64,
    counter: bool,
    rate: bool,
) -> Option<FloatHistogram> {
    if points.len() < 2 {
        return None;
    }
    let mut result = FloatHistogram::default();
    histogram::add_point_into(&mut result, &points[points.len() - 1].1, 1.0);
    histogram::add_point_into(&mut result, &points[0].1, -1.0);
    if counter {
        for pair in points.windows(2) {
            if histogram::is_reset(&pair[0].1, &pair[1].1) {
                histogram::add_point_into(&mut result, &pair[0].1, 1.0);
            }
        }
    }
    let mut factor = extrapolation_factor(
        points[0].0,
        points[points.len() - 1].0,
        points.len(),
        start,
        end,
        None,
    );
    if rate {
        factor /= (end - start) as f64 / 1000.0;
    }
    histogram::scale(&mut result, factor);
    Some(result)
}

/// `irate`/`idelta`: from the last two samples.
fn instant_value(points: &[(i64, f64)], rate: bool) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let (last_t, last_v) = points[points.len() - 1];
    let (previous_t, previous_v) = points[points.len() - 2];
    let mut result = if rate && last_v < previous_v {
        last_v
    } else {
        last_v - previous_v
    };
    let interval = last_t - previous_t;
    if interval == 0 {
        return None;
    }
    if rate {
        result /= interval as f64 / 1000.0;
    }
    Some(result)
}

/// Kahan summation step, as Prometheus's `kahanSumInc`.
fn kahan_add(value: f64, sum: f64, compensation: f64) -> (f64, f64) {
    let total = sum + value;
    let compensation = if total.is_infinite() {
        0.0
    } else if sum.abs() >= value.abs() {
        compensation + ((sum - total) + value)
    } else {
        compensation + ((value - total) + sum)
    };
    (total, compensation)
}

/// Least-squares slope and intercept (at `intercept_time`), as Prometheus's
/// `linearRegression`.
fn linear_regression(points: &[(i64, f64)], intercept_time: i64) -> (f64, f64) {
    let (mut n, mut sum_x, mut c_x, mut sum_y, mut c_y) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let (mut sum_xy, mut c_xy, mut sum_x2, mut c_x2) = (0.0, 0.0, 0.0, 0.0);
    let initial = points[0].1;
    let mut constant = true;
    for (i, (t, v)) in points.iter().enumerate() {
        if constant && i > 0 && *v != initial {
            constant = false;
        }
        n += 1.0;
        let x = (*t - intercept_time) as f64 / 1e3;
        (sum_x, c_x) = kahan_add(x, sum_x, c_x);
        (sum_y, c_y) = kahan_add(*v, sum_y, c_y);
        (sum_xy, c_xy) = kahan_add(x * v, sum_xy, c_xy);
        (sum_x2, c_x2) = kahan_add(x * x, sum_x2, c_x2);
    }
    if constant {
        if initial.is_infinite() {
            return (f64::NAN, f64::NAN);
        }
        return (0.0, initial);
    }
    let (sum_x, sum_y, sum_xy, sum_x2) = (sum_x + c_x, sum_y + c_y, sum_xy + c_xy, sum_x2 + c_x2);
    let cov_xy = sum_xy - sum_x * sum_y / n;
    let var_x = sum_x2 - sum_x * sum_x / n;
    let slope = cov_xy / var_x;
    let intercept = sum_y / n - slope * sum_x / n;
    (slope, intercept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_interpolates_between_ranks() {
        assert_eq!(quantile(0.5, vec![1.0, 3.0, 2.0, 4.0]), 2.5);
        assert_eq!(quantile(0.0, vec![5.0, 1.0]), 1.0);
        assert_eq!(quantile(1.0, vec![5.0, 1.0]), 5.0);
        assert_eq!(quantile(-0.1, vec![1.0]), f64::NEG_INFINITY);
        assert!(quantile(0.5, vec![]).is_nan());
    }

    #[test]
    fn rate_extrapolates_to_the_window_and_counts_resets() {
        // 10 samples 10 s apart, +10 per sample, window [0, 100 s] ending 10 s after the last.
        let points: Vec<(i64, f64)> = (1..=9).map(|i| (i * 10_000, i as f64 * 10.0)).collect();
        let rate = extrapolated_rate(&points, 0, 100_000, true, true).unwrap();
        // 80 over 80 s sampled; both gaps (10 s) are under 1.1 x 10 s, but the counter would
        // hit zero 10 s before the first sample, so the start stretches 10 s: 100/80 * 80.
        assert!((rate - 1.0).abs() < 1e-12, "{rate}");
        let reset = [(0, 5.0), (10_000, 10.0), (20_000, 2.0), (30_000, 7.0)];
        let increase = extrapolated_rate(&reset, 0, 30_000, true, false).unwrap();
        assert!((increase - 12.0).abs() < 1e-12, "{increase}");
        assert_eq!(extrapolated_rate(&[(0, 1.0)], 0, 10, true, true), None);
    }

    #[test]
    fn irate_uses_the_last_two_samples() {
        let points = [(0, 1.0), (10_000, 5.0), (12_000, 9.0)];
        assert_eq!(instant_value(&points, true), Some(2.0));
        let reset = [(0, 10.0), (2_000, 4.0)];
        assert_eq!(instant_value(&reset, true), Some(2.0));
        assert_eq!(instant_value(&reset, false), Some(-6.0));
    }

    #[test]
    fn linear_regression_finds_the_line() {
        let points: Vec<(i64, f64)> = (0..10).map(|i| (i * 1000, 3.0 + 2.0 * i as f64)).collect();
        let (slope, intercept) = linear_regression(&points, 0);
        assert!((slope - 2.0).abs() < 1e-12 && (intercept - 3.0).abs() < 1e-12);
        assert_eq!(linear_regression(&[(0, 4.0), (1000, 4.0)], 0), (0.0, 4.0));
    }
}
