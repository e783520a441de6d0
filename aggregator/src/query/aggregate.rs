//! Aggregation operators (`sum`, `avg`, `min`, `max`, `count`, `group`, `stddev`, `stdvar`,
//! `quantile`, `topk`, `bottomk`, `count_values`) with `by`/`without`, following Prometheus's
//! `aggregation` (including its incremental mean and Welford variance, so results agree to the
//! last bits). `sum` and `avg` add histogram samples bucket-wise.

use std::{collections::HashMap, sync::Arc};

use promql_parser::parser::{AggregateExpr, LabelModifier};

use super::{
    eval::{Evaluator, Sample, Sv, Val, set_label, valid_label_name},
    functions::quantile,
    histogram,
    source::Labels,
    value::{FloatHistogram, QueryError},
};

struct Group {
    labels: Labels,
    value: f64,
    mean: f64,
    count: f64,
    histogram: Option<FloatHistogram>,
    /// topk/bottomk: the kept samples; quantile: every value.
    samples: Vec<Sample>,
}

fn float(sample: &Sample, op: &str) -> Result<f64, QueryError> {
    match sample.v {
        Sv::F(value) => Ok(value),
        Sv::H(_) => Err(histogram_unsupported(op)),
    }
}

fn histogram_unsupported(op: &str) -> QueryError {
    QueryError::Execution(format!(
        "{op} over histogram samples is not supported (sum, avg, count and group are)"
    ))
}

/// Go's float formatting with `'f', -1`: the shortest decimal that round-trips, no exponent.
pub fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{value}")
    }
}

pub fn eval<'a>(ev: &Evaluator<'a>, expr: &AggregateExpr, ts: i64) -> Result<Val<'a>, QueryError> {
    let op = expr.op.to_string();
    let vector = ev.eval_vector(&expr.expr, ts)?;
    let (without, mut grouping) = match &expr.modifier {
        Some(LabelModifier::Include(labels)) => (false, labels.labels.clone()),
        Some(LabelModifier::Exclude(labels)) => (true, labels.labels.clone()),
        None => (false, Vec::new()),
    };
    let mut k = 0i64;
    let mut q = 0.0;
    let mut value_label = String::new();
    match op.as_str() {
        "topk" | "bottomk" | "quantile" => {
            let param = expr
                .param
                .as_ref()
                .ok_or_else(|| QueryError::BadData(format!("{op} needs a parameter")))?;
            let value = ev.eval_scalar(param, ts)?;
            if op == "quantile" {
                q = value;
            } else {
                // Go's int64(float64) conversion; NaN and out-of-range values have no sane k.
                if value.is_nan() {
                    return Err(QueryError::Execution(format!(
                        "Parameter value is NaN for {op}"
                    )));
                }
                k = value as i64;
                if k < 1 {
                    return Ok(Val::Vector(Vec::new()));
                }
            }
        }
        "count_values" => {
            let param = expr
                .param
                .as_ref()
                .ok_or_else(|| QueryError::BadData("count_values needs a label name".into()))?;
            value_label = match ev.eval(param, ts)? {
                Val::Str(label) => label,
                other => {
                    return Err(QueryError::Execution(format!(
                        "count_values needs a string label name, got a {}",
                        other.type_name()
                    )));
                }
            };
            if !valid_label_name(&value_label) {
                return Err(QueryError::Execution(format!(
                    "invalid label name {value_label:?}"
                )));
            }
            if !without {
                grouping.push(value_label.clone());
            }
        }
        "sum" | "avg" | "min" | "max" | "count" | "group" | "stddev" | "stdvar" => {}
        other => {
            return Err(QueryError::BadData(format!(
                "aggregation {other} is not supported"
            )));
        }
    }
    grouping.sort();

    let mut order: Vec<Vec<(String, String)>> = Vec::new();
    let mut groups: HashMap<Vec<(String, String)>, Group> = HashMap::new();
    for sample in vector {
        // Only count_values changes the labels; the others share them (no copy per sample).
        let labels: Arc<Labels> = if op == "count_values" {
            let value = float(&sample, &op)?;
            let mut labels = (*sample.labels).clone();
            set_label(&mut labels, &value_label, format_value(value));
            Arc::new(labels)
        } else {
            sample.labels.clone()
        };
        let key: Labels = if without {
            labels
                .iter()
                .filter(|(name, _)| name != "__name__" && !grouping.contains(name))
                .cloned()
                .collect()
        } else {
            labels
                .iter()
                .filter(|(name, _)| grouping.contains(name))
                .cloned()
                .collect()
        };
        let Some(group) = groups.get_mut(&key) else {
            let (value, histogram) = match &sample.v {
                Sv::F(value) => (*value, None),
                Sv::H(h) => match op.as_str() {
                    "sum" | "avg" => (0.0, Some((**h).clone())),
                    "count" | "group" => (0.0, None),
                    _ => return Err(histogram_unsupported(&op)),
                },
            };
            let mut group = Group {
                labels: key.clone(),
                value,
                mean: value,
                count: 1.0,
                histogram,
                samples: Vec::new(),
            };
            match op.as_str() {
                "stddev" | "stdvar" => group.value = 0.0,
                "group" => group.value = 1.0,
                "topk" | "bottomk" | "quantile" => {
                    float(&sample, &op)?;
                    group.samples.push(Sample { labels, ..sample });
                }
                _ => {}
            }
            order.push(key.clone());
            groups.insert(key, group);
            continue;
        };
        match op.as_str() {
            "sum" => match (&sample.v, &mut group.histogram) {
                (Sv::F(value), None) => group.value += value,
                (Sv::H(h), Some(acc)) => histogram::add_into(acc, h, 1.0),
                _ => {
                    return Err(QueryError::Execution(
                        "sum over a mix of float and histogram samples is not supported".into(),
                    ));
                }
            },
            "avg" => {
                group.count += 1.0;
                match (&sample.v, &mut group.histogram) {
                    (Sv::F(value), None) => {
                        let value = *value;
                        if group.mean.is_infinite() {
                            if value.is_infinite() && (group.mean > 0.0) == (value > 0.0) {
                                continue;
                            }
                            if !value.is_infinite() && !value.is_nan() {
                                continue;
                            }
                        }
                        group.mean += value / group.count - group.mean / group.count;
                    }
                    (Sv::H(h), Some(acc)) => histogram::add_into(acc, h, 1.0),
                    _ => {
                        return Err(QueryError::Execution(
                            "avg over a mix of float and histogram samples is not supported".into(),
                        ));
                    }
                }
            }
            "group" => {}
            "max" => {
                let value = float(&sample, &op)?;
                if group.value < value || group.value.is_nan() {
                    group.value = value;
                }
            }
            "min" => {
                let value = float(&sample, &op)?;
                if group.value > value || group.value.is_nan() {
                    group.value = value;
                }
            }
            "count" | "count_values" => group.count += 1.0,
            "stddev" | "stdvar" => {
                let value = float(&sample, &op)?;
                group.count += 1.0;
                let delta = value - group.mean;
                group.mean += delta / group.count;
                group.value += delta * (value - group.mean);
            }
            "topk" | "bottomk" => {
                float(&sample, &op)?;
                group.samples.push(Sample { labels, ..sample });
            }
            "quantile" => {
                float(&sample, &op)?;
                group.samples.push(sample);
            }
            _ => {}
        }
    }

    let mut out = Vec::with_capacity(order.len());
    for key in order {
        let group = groups.remove(&key).expect("every ordered key has a group");
        let value = match op.as_str() {
            "sum" => match group.histogram {
                Some(h) => Sv::H(Arc::new(h)),
                None => Sv::F(group.value),
            },
            "avg" => match group.histogram {
                Some(mut h) => {
                    histogram::scale(&mut h, 1.0 / group.count);
                    Sv::H(Arc::new(h))
                }
                None => Sv::F(group.mean),
            },
            "count" | "count_values" => Sv::F(group.count),
            "stdvar" => Sv::F(group.value / group.count),
            "stddev" => Sv::F((group.value / group.count).sqrt()),
            "quantile" => {
                let values: Vec<f64> = group
                    .samples
                    .iter()
                    .map(|s| match s.v {
                        Sv::F(v) => v,
                        Sv::H(_) => f64::NAN,
                    })
                    .collect();
                Sv::F(quantile(q, values))
            }
            "topk" | "bottomk" => {
                let mut samples = group.samples;
                let top = op == "topk";
                // Highest first for topk, lowest first for bottomk; NaN always last.
                samples.sort_by(|a, b| {
                    let (Sv::F(x), Sv::F(y)) = (&a.v, &b.v) else {
                        return std::cmp::Ordering::Equal;
                    };
                    match (x.is_nan(), y.is_nan()) {
                        (true, true) => std::cmp::Ordering::Equal,
                        (true, false) => std::cmp::Ordering::Greater,
                        (false, true) => std::cmp::Ordering::Less,
                        _ if top => y.total_cmp(x),
                        _ => x.total_cmp(y),
                    }
                });
                samples.truncate(k.min(i64::from(u32::MAX)) as usize);
                for sample in samples {
                    out.push(Sample { t: ts, ..sample });
                }
                continue;
            }
            _ => Sv::F(group.value),
        };
        out.push(Sample {
            labels: Arc::new(group.labels),
            t: ts,
            v: value,
        });
    }
    Ok(Val::Vector(out))
}
