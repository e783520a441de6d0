//! Evaluating one group: recording rules store their results, alerting rules move their alerts
//! through inactive -> pending -> firing -> resolved exactly as Prometheus's `AlertingRule.Eval`
//! does (`for`, `keep_firing_for`, a resolved alert kept 15 minutes so it is reported as
//! resolved), and write `ALERTS` / `ALERTS_FOR_STATE`.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use super::{
    rules::{Rule, RuleGroup, RuleKind},
    template::TemplateData,
};
use crate::query::{Engine, Labels, Matcher, SampleValue, Samples, Value, value::STALE_NAN_BITS};

/// How long a resolved alert is kept so notifiers learn it resolved (Prometheus's value).
pub const RESOLVED_RETENTION: Duration = Duration::from_secs(15 * 60);

/// How far back `ALERTS_FOR_STATE` is read to restore `for` timers after a restart
/// (Prometheus's `rules.alert.for-outage-tolerance`).
pub const OUTAGE_TOLERANCE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertState {
    Inactive,
    Pending,
    Firing,
}

impl AlertState {
    pub fn as_str(&self) -> &'static str {
        match self {
            AlertState::Inactive => "inactive",
            AlertState::Pending => "pending",
            AlertState::Firing => "firing",
        }
    }
}

/// One alert of an alerting rule: a label set its expression produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// The rule's labels over the expression's, with `alertname`; sorted.
    pub labels: Labels,
    pub annotations: Vec<(String, String)>,
    pub state: AlertState,
    /// The expression's latest value for this alert.
    pub value: f64,
    /// The highest value seen since it became active.
    pub peak: f64,
    pub active_at_ms: i64,
    pub fired_at_ms: Option<i64>,
    pub resolved_at_ms: Option<i64>,
    pub last_sent_ms: Option<i64>,
    /// `endsAt` sent for a firing alert: if no resend comes before it, receivers resolve it.
    pub valid_until_ms: i64,
    pub keep_firing_since_ms: Option<i64>,
}

/// A rule's health, as `/api/v1/rules` reports it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RuleHealth {
    pub last_error: Option<String>,
    pub last_evaluation_ms: Option<i64>,
    pub evaluation_seconds: f64,
}

impl RuleHealth {
    pub fn as_str(&self) -> &'static str {
        match (&self.last_error, self.last_evaluation_ms) {
            (Some(_), _) => "err",
            (None, Some(_)) => "ok",
            (None, None) => "unknown",
        }
    }
}

/// A rule with its alerts and health.
#[derive(Debug, Clone)]
pub struct RuleState {
    pub rule: Rule,
    pub alerts: BTreeMap<Labels, Alert>,
    pub health: RuleHealth,
    /// Until the rule's first evaluation: new alerts take their `activeAt` from the stored
    /// `ALERTS_FOR_STATE`, so an aggregator restart does not restart `for` timers.
    pub restore_pending: bool,
    /// The series the last successful evaluation wrote: one that the next does not write gets
    /// a staleness marker, so it ends at once (as in Prometheus) instead of lingering for the
    /// 5-minute lookback.
    pub written: BTreeSet<Labels>,
}

/// What an evaluation changed that others care about.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Pending -> firing (or firing at once, `for: 0`).
    Fired(Alert),
    /// Firing -> resolved.
    Resolved(Alert),
}

/// A group with the state of its rules.
#[derive(Debug, Clone)]
pub struct GroupState {
    pub group: RuleGroup,
    pub rules: Vec<RuleState>,
    pub last_evaluation_ms: Option<i64>,
    pub evaluation_seconds: f64,
}

/// What evaluations need besides the group.
pub struct EvalContext<'a> {
    pub engine: &'a Engine,
    pub external_labels: &'a [(String, String)],
    pub resend_interval: Duration,
    /// Takes the alerts due to be sent as soon as their rule is evaluated (before its
    /// `ALERTS` are stored and before the group's later rules run), so a firing alert does
    /// not wait for the rest of its group. They are in `EvalOutcome::to_send` too.
    pub notify: &'a dyn Fn(&[Alert]),
}

/// The outcome of one group evaluation.
#[derive(Debug, Default)]
pub struct EvalOutcome {
    pub transitions: Vec<Transition>,
    /// Alerts due to be (re)sent to notifiers.
    pub to_send: Vec<Alert>,
    /// Rules that failed, with why.
    pub failures: usize,
}

impl GroupState {
    pub fn new(group: RuleGroup) -> GroupState {
        let rules = group
            .rules
            .iter()
            .map(|rule| RuleState {
                rule: rule.clone(),
                alerts: BTreeMap::new(),
                health: RuleHealth::default(),
                restore_pending: true,
                written: BTreeSet::new(),
            })
            .collect();
        GroupState {
            group,
            rules,
            last_evaluation_ms: None,
            evaluation_seconds: 0.0,
        }
    }

    /// Takes over the alerts and health of unchanged rules of `old` (same identity), so a
    /// reload does not reset `for` timers or re-notify.
    /// Returns the series the old rules that no rule took over had written, which need
    /// staleness markers now that nothing writes them.
    pub fn inherit(&mut self, old: &GroupState) -> Vec<Labels> {
        let mut donors: Vec<&RuleState> = old.rules.iter().collect();
        for rule in &mut self.rules {
            let identity = rule.rule.identity();
            if let Some(position) = donors.iter().position(|d| d.rule.identity() == identity) {
                let donor = donors.remove(position);
                rule.alerts = donor.alerts.clone();
                rule.health = donor.health.clone();
                rule.restore_pending = donor.restore_pending;
                rule.written = donor.written.clone();
            }
        }
        self.last_evaluation_ms = old.last_evaluation_ms;
        donors
            .into_iter()
            .flat_map(|donor| donor.written.iter().cloned())
            .collect()
    }

    /// Every series the group's rules wrote at their last evaluation.
    pub fn written(&self) -> Vec<Labels> {
        self.rules
            .iter()
            .flat_map(|rule| rule.written.iter().cloned())
            .collect()
    }

    /// Evaluates every rule in order at `ts_ms`. `write` stores samples (recording results
    /// and `ALERTS`) before the next rule runs, so later rules see earlier rules' results.
    pub fn evaluate(
        &mut self,
        ts_ms: i64,
        ctx: &EvalContext<'_>,
        write: &mut dyn FnMut(Vec<(Labels, f64)>) -> Result<(), String>,
    ) -> EvalOutcome {
        let started = Instant::now();
        let mut outcome = EvalOutcome::default();
        let interval = self.group.interval;
        let limit = self.group.limit;
        for state in &mut self.rules {
            let rule_started = Instant::now();
            let queued = outcome.to_send.len();
            let result = match &state.rule.kind {
                RuleKind::Recording => record(&state.rule, ts_ms, ctx, limit),
                RuleKind::Alerting { .. } => {
                    alert(state, ts_ms, ctx, interval, limit, &mut outcome)
                }
            };
            if outcome.to_send.len() > queued {
                (ctx.notify)(&outcome.to_send[queued..]);
            }
            let result = result.map(|samples| with_staleness_markers(samples, &mut state.written));
            let result = result.and_then(|samples| {
                if samples.is_empty() {
                    Ok(())
                } else {
                    write(samples).map_err(|why| format!("storing the results: {why}"))
                }
            });
            state.health.last_evaluation_ms = Some(ts_ms);
            state.health.evaluation_seconds = rule_started.elapsed().as_secs_f64();
            match result {
                Ok(()) => state.health.last_error = None,
                Err(why) => {
                    tracing::warn!(
                        group = %self.group.name,
                        rule = %state.rule.name,
                        "rule evaluation failed: {why}"
                    );
                    state.health.last_error = Some(why);
                    outcome.failures += 1;
                }
            }
        }
        self.last_evaluation_ms = Some(ts_ms);
        self.evaluation_seconds = started.elapsed().as_secs_f64();
        outcome
    }
}

/// `samples` plus a staleness marker for every series `written` last time and not now;
/// `written` becomes this evaluation's series.
fn with_staleness_markers(
    mut samples: Vec<(Labels, f64)>,
    written: &mut BTreeSet<Labels>,
) -> Vec<(Labels, f64)> {
    let now: BTreeSet<Labels> = samples.iter().map(|(labels, _)| labels.clone()).collect();
    let stale = f64::from_bits(STALE_NAN_BITS);
    samples.extend(
        written
            .difference(&now)
            .map(|labels| (labels.clone(), stale)),
    );
    *written = now;
    samples
}

/// The float samples of a query result (a scalar is one sample without labels).
fn float_samples(value: Value) -> Result<Vec<(Labels, f64)>, String> {
    match value {
        Value::Scalar { value, .. } => Ok(vec![(Vec::new(), value)]),
        Value::Vector(samples) => samples
            .into_iter()
            .map(|sample| match sample.value {
                SampleValue::Float(value) => Ok((sample.labels, value)),
                SampleValue::Histogram(_) => Err(
                    "the expression returns native histograms; rules need floats (use \
                     histogram_quantile, histogram_count, ...)"
                        .to_string(),
                ),
            })
            .collect(),
        other => Err(format!(
            "the expression returns a {}, not an instant vector",
            other.result_type()
        )),
    }
}

fn without_name(labels: Labels) -> Labels {
    labels
        .into_iter()
        .filter(|(name, _)| name != "__name__")
        .collect()
}

/// Sets `name` in sorted `labels` (an empty value removes it).
fn set_label(labels: &mut Labels, name: &str, value: String) {
    labels.retain(|(label, _)| label != name);
    if !value.is_empty() {
        labels.push((name.to_owned(), value));
    }
    labels.sort();
}

/// When an alert with these labels became active, from the newest `ALERTS_FOR_STATE` sample of
/// the last hour (a previous run's), if any.
fn restored_active_at(ctx: &EvalContext<'_>, labels: &Labels, ts_ms: i64) -> Option<i64> {
    let mut matchers = vec![Matcher::equal("__name__", "ALERTS_FOR_STATE")];
    matchers.extend(
        labels
            .iter()
            .map(|(name, value)| Matcher::equal(name, value)),
    );
    let start = ts_ms - OUTAGE_TOLERANCE.as_millis() as i64;
    let newest = ctx
        .engine
        .source()
        .select(&matchers, start, ts_ms)
        .into_iter()
        .filter_map(|series| match series.samples {
            Samples::Floats(points) => points.last().copied(),
            Samples::Histograms(_) => None,
        })
        .max_by_key(|(time, _)| *time)?;
    // A staleness marker (the alert resolved) is NaN: it casts to 0 and restores nothing.
    let active_at = (newest.1 * 1000.0) as i64;
    (active_at > 0 && active_at <= ts_ms).then_some(active_at)
}

fn record(
    rule: &Rule,
    ts_ms: i64,
    ctx: &EvalContext<'_>,
    limit: usize,
) -> Result<Vec<(Labels, f64)>, String> {
    let value = ctx
        .engine
        .instant(&rule.expr, ts_ms)
        .map_err(|error| error.to_string())?;
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (labels, value) in float_samples(value)? {
        let mut labels = without_name(labels);
        for (name, template) in &rule.labels {
            set_label(&mut labels, name, template.source().to_owned());
        }
        set_label(&mut labels, "__name__", rule.name.clone());
        if !seen.insert(labels.clone()) {
            return Err(format!(
                "the result has two series with labels {labels:?} after applying the rule's labels"
            ));
        }
        out.push((labels, value));
    }
    if limit > 0 && out.len() > limit {
        return Err(format!(
            "{} series exceed the group's limit of {limit}; nothing was recorded",
            out.len()
        ));
    }
    Ok(out)
}

fn alert(
    state: &mut RuleState,
    ts_ms: i64,
    ctx: &EvalContext<'_>,
    interval: Duration,
    limit: usize,
    outcome: &mut EvalOutcome,
) -> Result<Vec<(Labels, f64)>, String> {
    let RuleKind::Alerting {
        hold,
        keep_firing_for,
        annotations,
    } = &state.rule.kind
    else {
        return Ok(Vec::new());
    };
    let hold_ms = hold.as_millis() as i64;
    let keep_ms = keep_firing_for.as_millis() as i64;
    let value = ctx
        .engine
        .instant(&state.rule.expr, ts_ms)
        .map_err(|error| error.to_string())?;
    let mut results: BTreeMap<Labels, (Vec<(String, String)>, f64)> = BTreeMap::new();
    for (labels, value) in float_samples(value)? {
        let expr_labels = without_name(labels);
        let data = TemplateData {
            labels: &expr_labels,
            external_labels: ctx.external_labels,
            value,
        };
        let mut labels = expr_labels.clone();
        for (name, template) in &state.rule.labels {
            set_label(&mut labels, name, template.expand(&data));
        }
        set_label(&mut labels, "alertname", state.rule.name.clone());
        let annotations: Vec<(String, String)> = annotations
            .iter()
            .map(|(name, template)| (name.clone(), template.expand(&data)))
            .collect();
        if results
            .insert(labels.clone(), (annotations, value))
            .is_some()
        {
            return Err(format!(
                "the result has two series with labels {labels:?} after applying the alert's \
                 labels"
            ));
        }
    }

    for (labels, (annotations, value)) in &results {
        match state.alerts.get_mut(labels) {
            Some(alert) if alert.state != AlertState::Inactive => {
                alert.value = *value;
                alert.peak = alert.peak.max(*value);
                alert.annotations = annotations.clone();
            }
            _ => {
                let active_at_ms = if state.restore_pending && hold_ms > 0 {
                    restored_active_at(ctx, labels, ts_ms).unwrap_or(ts_ms)
                } else {
                    ts_ms
                };
                state.alerts.insert(
                    labels.clone(),
                    Alert {
                        labels: labels.clone(),
                        annotations: annotations.clone(),
                        state: AlertState::Pending,
                        value: *value,
                        peak: *value,
                        active_at_ms,
                        fired_at_ms: None,
                        resolved_at_ms: None,
                        last_sent_ms: None,
                        valid_until_ms: 0,
                        keep_firing_since_ms: None,
                    },
                );
            }
        }
    }

    state.restore_pending = false;
    let mut active = 0usize;
    let mut removed = Vec::new();
    for (labels, alert) in state.alerts.iter_mut() {
        if !results.contains_key(labels) {
            let mut keep_firing = false;
            if alert.state == AlertState::Firing && keep_ms > 0 {
                let since = *alert.keep_firing_since_ms.get_or_insert(ts_ms);
                keep_firing = ts_ms - since < keep_ms;
            }
            let resolved_long_ago = alert
                .resolved_at_ms
                .is_some_and(|at| ts_ms - at > RESOLVED_RETENTION.as_millis() as i64);
            if alert.state == AlertState::Pending || resolved_long_ago {
                removed.push(labels.clone());
            }
            if alert.state != AlertState::Inactive && !keep_firing {
                let was_firing = alert.state == AlertState::Firing;
                alert.state = AlertState::Inactive;
                alert.resolved_at_ms = Some(ts_ms);
                if was_firing {
                    outcome
                        .transitions
                        .push(Transition::Resolved(alert.clone()));
                }
            }
            if !keep_firing {
                continue;
            }
        } else {
            alert.keep_firing_since_ms = None;
        }
        active += 1;
        if alert.state == AlertState::Pending && ts_ms - alert.active_at_ms >= hold_ms {
            alert.state = AlertState::Firing;
            alert.fired_at_ms = Some(ts_ms);
            outcome.transitions.push(Transition::Fired(alert.clone()));
        }
    }
    for labels in removed {
        state.alerts.remove(&labels);
    }
    if limit > 0 && active > limit {
        state.alerts.clear();
        return Err(format!(
            "{active} alerts exceed the group's limit of {limit}; all of this rule's alerts \
             were dropped"
        ));
    }

    // Notifications, as Prometheus's sendAlerts: resolved ones once, firing ones at every
    // resend interval, each valid for four intervals in case the next send is lost.
    let resend_ms = ctx.resend_interval.as_millis() as i64;
    let valid_for_ms = 4 * ctx.resend_interval.max(interval).as_millis() as i64;
    for alert in state.alerts.values_mut() {
        let due = match alert.state {
            AlertState::Pending => false,
            _ if alert.resolved_at_ms > alert.last_sent_ms => true,
            AlertState::Inactive => false,
            AlertState::Firing => alert
                .last_sent_ms
                .is_none_or(|sent| sent + resend_ms <= ts_ms),
        };
        if due {
            alert.last_sent_ms = Some(ts_ms);
            alert.valid_until_ms = ts_ms + valid_for_ms;
            outcome.to_send.push(alert.clone());
        }
    }

    let mut samples = Vec::new();
    for alert in state.alerts.values() {
        if alert.state == AlertState::Inactive {
            continue;
        }
        let mut labels = alert.labels.clone();
        set_label(&mut labels, "__name__", "ALERTS".into());
        set_label(&mut labels, "alertstate", alert.state.as_str().into());
        samples.push((labels, 1.0));
        let mut labels = alert.labels.clone();
        set_label(&mut labels, "__name__", "ALERTS_FOR_STATE".into());
        samples.push((labels, alert.active_at_ms as f64 / 1000.0));
    }
    Ok(samples)
}
