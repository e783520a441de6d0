//! Binary operators: arithmetic, comparison (with `bool`) and set operators, with vector
//! matching (`on`, `ignoring`, `group_left`, `group_right`) as Prometheus's `VectorBinop`.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use promql_parser::parser::{BinaryExpr, LabelModifier, VectorMatchCardinality};

use super::{
    eval::{Evaluator, Sample, Sv, Val, drop_name, label_value},
    source::Labels,
    value::QueryError,
};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Pow,
    Atan2,
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    And,
    Or,
    Unless,
}

impl Op {
    fn parse(text: &str) -> Result<Op, QueryError> {
        Ok(match text {
            "+" => Op::Add,
            "-" => Op::Sub,
            "*" => Op::Mul,
            "/" => Op::Div,
            "%" => Op::Mod,
            "^" => Op::Pow,
            "atan2" => Op::Atan2,
            "==" => Op::Eq,
            "!=" => Op::Ne,
            ">" => Op::Gt,
            "<" => Op::Lt,
            ">=" => Op::Ge,
            "<=" => Op::Le,
            "and" => Op::And,
            "or" => Op::Or,
            "unless" => Op::Unless,
            other => {
                return Err(QueryError::BadData(format!(
                    "binary operator {other:?} is not supported"
                )));
            }
        })
    }

    fn is_comparison(self) -> bool {
        matches!(self, Op::Eq | Op::Ne | Op::Gt | Op::Lt | Op::Ge | Op::Le)
    }

    fn is_set(self) -> bool {
        matches!(self, Op::And | Op::Or | Op::Unless)
    }

    /// Arithmetic drops the metric name; comparisons without `bool` filter and keep it.
    /// Prometheus 2 keeps it for `atan2` too (the differential test shows it).
    fn drops_name(self) -> bool {
        matches!(
            self,
            Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Mod | Op::Pow
        )
    }

    /// The result and whether to keep it (comparisons: the left value and the condition).
    fn apply(self, lhs: f64, rhs: f64) -> (f64, bool) {
        match self {
            Op::Add => (lhs + rhs, true),
            Op::Sub => (lhs - rhs, true),
            Op::Mul => (lhs * rhs, true),
            Op::Div => (lhs / rhs, true),
            // Rust's `%` on floats is C's fmod, as Go's math.Mod: the sign of the dividend.
            Op::Mod => (lhs % rhs, true),
            Op::Pow => (lhs.powf(rhs), true),
            Op::Atan2 => (lhs.atan2(rhs), true),
            Op::Eq => (lhs, lhs == rhs),
            Op::Ne => (lhs, lhs != rhs),
            Op::Gt => (lhs, lhs > rhs),
            Op::Lt => (lhs, lhs < rhs),
            Op::Ge => (lhs, lhs >= rhs),
            Op::Le => (lhs, lhs <= rhs),
            Op::And | Op::Or | Op::Unless => (f64::NAN, false),
        }
    }
}

/// How the two sides are matched.
struct Matching {
    on: bool,
    labels: Vec<String>,
    card: VectorMatchCardinality,
    include: Vec<String>,
}

impl Matching {
    fn of(expr: &BinaryExpr, set: bool) -> Result<Matching, QueryError> {
        let Some(modifier) = &expr.modifier else {
            return Ok(Matching {
                on: false,
                labels: Vec::new(),
                card: if set {
                    VectorMatchCardinality::ManyToMany
                } else {
                    VectorMatchCardinality::OneToOne
                },
                include: Vec::new(),
            });
        };
        if modifier.fill_values.lhs.is_some() || modifier.fill_values.rhs.is_some() {
            return Err(QueryError::BadData(
                "fill modifiers on binary operators are not supported".into(),
            ));
        }
        let (on, labels) = match &modifier.matching {
            Some(LabelModifier::Include(labels)) => (true, labels.labels.clone()),
            Some(LabelModifier::Exclude(labels)) => (false, labels.labels.clone()),
            None => (false, Vec::new()),
        };
        let include = modifier
            .card
            .labels()
            .map(|labels| labels.labels.clone())
            .unwrap_or_default();
        let card = if set {
            VectorMatchCardinality::ManyToMany
        } else {
            modifier.card.clone()
        };
        Ok(Matching {
            on,
            labels,
            card,
            include,
        })
    }

    /// The match-group signature of a label set.
    fn signature(&self, labels: &Labels) -> Vec<(String, String)> {
        if self.on {
            labels
                .iter()
                .filter(|(name, _)| self.labels.contains(name))
                .cloned()
                .collect()
        } else {
            labels
                .iter()
                .filter(|(name, _)| name != "__name__" && !self.labels.contains(name))
                .cloned()
                .collect()
        }
    }
}

pub fn eval<'a>(ev: &Evaluator<'a>, expr: &BinaryExpr, ts: i64) -> Result<Val<'a>, QueryError> {
    let op = Op::parse(&expr.op.to_string())?;
    let return_bool = expr.return_bool();
    let lhs = ev.eval(&expr.lhs, ts)?;
    let rhs = ev.eval(&expr.rhs, ts)?;
    match (lhs, rhs) {
        (Val::Scalar(lhs), Val::Scalar(rhs)) => {
            if op.is_set() {
                return Err(QueryError::BadData(
                    "set operators are only allowed between instant vectors".into(),
                ));
            }
            let (value, keep) = op.apply(lhs, rhs);
            Ok(Val::Scalar(if op.is_comparison() {
                if keep { 1.0 } else { 0.0 }
            } else {
                value
            }))
        }
        (Val::Vector(lhs), Val::Scalar(rhs)) => {
            vector_scalar(op, lhs, rhs, false, return_bool, ts).map(Val::Vector)
        }
        (Val::Scalar(lhs), Val::Vector(rhs)) => {
            vector_scalar(op, rhs, lhs, true, return_bool, ts).map(Val::Vector)
        }
        (Val::Vector(lhs), Val::Vector(rhs)) => {
            let matching = Matching::of(expr, op.is_set())?;
            match op {
                Op::And => Ok(Val::Vector(and(&matching, lhs, rhs, ts))),
                Op::Or => Ok(Val::Vector(or(&matching, lhs, rhs, ts))),
                Op::Unless => Ok(Val::Vector(unless(&matching, lhs, rhs, ts))),
                _ => vector_vector(op, &matching, lhs, rhs, return_bool, ts).map(Val::Vector),
            }
        }
        (lhs, rhs) => Err(QueryError::Execution(format!(
            "binary operator {} between a {} and a {} is not allowed",
            expr.op,
            lhs.type_name(),
            rhs.type_name()
        ))),
    }
}

fn float_of(sample: &Sample) -> Result<f64, QueryError> {
    match sample.v {
        Sv::F(value) => Ok(value),
        Sv::H(_) => Err(QueryError::Execution(
            "binary operators on histogram samples are not supported (use histogram_quantile, histogram_count or histogram_sum first)".into(),
        )),
    }
}

fn vector_scalar(
    op: Op,
    vector: Vec<Sample>,
    scalar: f64,
    scalar_on_left: bool,
    return_bool: bool,
    ts: i64,
) -> Result<Vec<Sample>, QueryError> {
    if op.is_set() {
        return Err(QueryError::BadData(
            "set operators are only allowed between instant vectors".into(),
        ));
    }
    let mut out = Vec::with_capacity(vector.len());
    for sample in vector {
        let element = float_of(&sample)?;
        let (lv, rv) = if scalar_on_left {
            (scalar, element)
        } else {
            (element, scalar)
        };
        let (mut value, mut keep) = op.apply(lv, rv);
        // A comparison keeps the vector element's value, even when the scalar is on the left.
        if op.is_comparison() && scalar_on_left {
            value = rv;
        }
        if return_bool {
            value = if keep { 1.0 } else { 0.0 };
            keep = true;
        }
        if keep {
            let labels = if op.drops_name() || return_bool {
                drop_name(&sample.labels)
            } else {
                sample.labels
            };
            out.push(Sample {
                labels,
                t: ts,
                v: Sv::F(value),
            });
        }
    }
    Ok(out)
}

/// The labels of a vector-vector result, as Prometheus's `resultMetric`.
fn result_labels(lhs: &Labels, rhs: &Labels, op: Op, matching: &Matching) -> Labels {
    let mut labels: Labels = lhs
        .iter()
        .filter(|(name, _)| !(op.drops_name() && name == "__name__"))
        .cloned()
        .collect();
    if matches!(matching.card, VectorMatchCardinality::OneToOne) {
        if matching.on {
            labels.retain(|(name, _)| matching.labels.contains(name));
        } else {
            labels.retain(|(name, _)| !matching.labels.contains(name));
        }
    }
    for name in &matching.include {
        super::eval::set_label(&mut labels, name, label_value(rhs, name).to_owned());
    }
    labels
}

fn vector_vector(
    op: Op,
    matching: &Matching,
    lhs: Vec<Sample>,
    rhs: Vec<Sample>,
    return_bool: bool,
    ts: i64,
) -> Result<Vec<Sample>, QueryError> {
    let one_to_many = matches!(matching.card, VectorMatchCardinality::OneToMany(_));
    // For group_right, swap the sides so the right is always the "one" side.
    let (lhs, rhs) = if one_to_many { (rhs, lhs) } else { (lhs, rhs) };
    let mut right: HashMap<Vec<(String, String)>, &Sample> = HashMap::with_capacity(rhs.len());
    for sample in &rhs {
        let signature = matching.signature(&sample.labels);
        if let Some(previous) = right.get(&signature) {
            let side = if one_to_many { "left" } else { "right" };
            return Err(QueryError::Execution(format!(
                "found duplicate series for the match group {} on the {side} hand-side of the operation: [{}, {}];many-to-many matching not allowed: matching labels must be unique on one side",
                format_labels(&signature),
                format_labels(&previous.labels),
                format_labels(&sample.labels)
            )));
        }
        right.insert(signature, sample);
    }
    let mut matched: HashMap<Vec<(String, String)>, HashSet<Labels>> = HashMap::new();
    let mut out = Vec::new();
    for sample in &lhs {
        let signature = matching.signature(&sample.labels);
        let Some(other) = right.get(&signature) else {
            continue;
        };
        let (mut lv, mut rv) = (float_of(sample)?, float_of(other)?);
        if one_to_many {
            std::mem::swap(&mut lv, &mut rv);
        }
        let (mut value, keep) = op.apply(lv, rv);
        if return_bool {
            value = if keep { 1.0 } else { 0.0 };
        } else if !keep {
            continue;
        }
        let mut labels = result_labels(&sample.labels, &other.labels, op, matching);
        if return_bool {
            labels.retain(|(name, _)| name != "__name__");
        }
        match matching.card {
            VectorMatchCardinality::OneToOne => {
                if matched.insert(signature, HashSet::new()).is_some() {
                    return Err(QueryError::Execution(
                        "multiple matches for labels: many-to-one matching must be explicit (group_left/group_right)".into(),
                    ));
                }
            }
            _ => {
                if !matched.entry(signature).or_default().insert(labels.clone()) {
                    return Err(QueryError::Execution(
                        "multiple matches for labels: grouping labels must ensure unique matches"
                            .into(),
                    ));
                }
            }
        }
        out.push(Sample {
            labels: Arc::new(labels),
            t: ts,
            v: Sv::F(value),
        });
    }
    Ok(out)
}

fn and(matching: &Matching, lhs: Vec<Sample>, rhs: Vec<Sample>, ts: i64) -> Vec<Sample> {
    let right: HashSet<_> = rhs.iter().map(|s| matching.signature(&s.labels)).collect();
    lhs.into_iter()
        .filter(|s| right.contains(&matching.signature(&s.labels)))
        .map(|s| Sample { t: ts, ..s })
        .collect()
}

fn or(matching: &Matching, lhs: Vec<Sample>, rhs: Vec<Sample>, ts: i64) -> Vec<Sample> {
    let left: HashSet<_> = lhs.iter().map(|s| matching.signature(&s.labels)).collect();
    let mut out: Vec<Sample> = lhs.into_iter().map(|s| Sample { t: ts, ..s }).collect();
    out.extend(
        rhs.into_iter()
            .filter(|s| !left.contains(&matching.signature(&s.labels)))
            .map(|s| Sample { t: ts, ..s }),
    );
    out
}

fn unless(matching: &Matching, lhs: Vec<Sample>, rhs: Vec<Sample>, ts: i64) -> Vec<Sample> {
    let right: HashSet<_> = rhs.iter().map(|s| matching.signature(&s.labels)).collect();
    lhs.into_iter()
        .filter(|s| !right.contains(&matching.signature(&s.labels)))
        .map(|s| Sample { t: ts, ..s })
        .collect()
}

/// `{a="1", b="2"}`, for error messages.
pub fn format_labels(labels: &[(String, String)]) -> String {
    let inner: Vec<String> = labels
        .iter()
        .map(|(name, value)| format!("{name}={value:?}"))
        .collect();
    format!("{{{}}}", inner.join(", "))
}
