//! The fast path: evaluating a group the moment something can make one of its alerts fire,
//! instead of at its next interval tick.
//!
//! Only alerting rules without `for` ("fast rules") can fire at the moment their input
//! changes; a rule with `for` fires no earlier than `for` later, so its interval adds little.
//! The rule files carry no marks for this (promtool refuses unknown keys): which groups take
//! part is derived from the fast rules' expressions, in two kinds.
//!
//! - **Change-triggered.** A fast rule's result can only start containing a new alert when one
//!   of the series it reads changes (a new value, or a new series), so the group is evaluated
//!   when a stored batch brings a *changed* value of a metric name the rule selects (by name:
//!   `vigil_gpu_xid_errors_total`, or the inputs of a recording rule it reads, transitively). A
//!   value equal to the series' previous one triggers nothing, so counters that stay at 0 and
//!   flags that stay clear (sent with every agent pass) cost nothing; an XID bumps its counter
//!   (or makes its series appear) and triggers at once. Selectors without a metric name cannot
//!   be matched this way and leave their rule to the interval.
//! - **Deadline-scheduled.** A fast rule of the shape `time() - X > N` (or `>=`, or
//!   `N < time() - X`) compares an age with a constant: it starts firing N seconds (plus its
//!   `for`) after X stops advancing, by time passing, never by a new sample. So a change never
//!   triggers it; instead, for every node, the group is evaluated just after (newest sample
//!   time of the node + N + `for`). The catalog's AgentSilent is such a rule.
//!
//! The store calls [`FastSink::on_ingested`] for every batch with its lock held, so the sink only
//! looks at the batch, records what it needs, and signals: each group has a [`Trigger`] (a
//! `Notify` holding at most one permit), so however many batches arrive while a group
//! evaluates, at most one extra evaluation follows. Batches written by the aggregator itself
//! (rule results, verdicts, anomaly scores) are ignored: evaluation must not feed itself.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use promql_parser::parser::{self, Expr};
use tokio::sync::{Notify, watch};

use super::{
    manager::now_ms,
    rules::{RuleGroup, RuleKind},
    writer::COMPUTED_INSTANCE_PREFIX,
};
use crate::storage::{IngestSink, IngestedBatch, PointValue};

/// How long a triggered evaluation waits for a trigger sample stamped ahead of the
/// aggregator's clock (an agent whose clock runs ahead) to become visible to queries.
pub const MAX_FUTURE_WAIT: Duration = Duration::from_secs(2);
/// The deadline scheduler rescans the nodes at least this often (new nodes, moved deadlines).
const RESCAN: Duration = Duration::from_secs(1);
/// Nodes silent for longer than this past their last deadline are forgotten.
const FORGET_AFTER_MS: i64 = 2 * 3600 * 1000;
/// Most series whose last value the change detector remembers; past it, it starts over (which
/// costs at most one extra evaluation per watched group).
const MAX_REMEMBERED: usize = 1_000_000;

/// One group's wake-up: set by the sink or the scheduler, taken by the group's task.
#[derive(Debug, Default)]
pub struct Trigger {
    pub notify: Notify,
    /// Evaluate no earlier than this (ms): the newest triggering sample must be visible.
    pub not_before_ms: AtomicI64,
}

impl Trigger {
    fn fire(&self, not_before_ms: i64) {
        self.not_before_ms
            .fetch_max(not_before_ms, Ordering::Relaxed);
        self.notify.notify_one();
    }
}

/// What each group takes part in, derived from its rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupPlan {
    /// Metric names whose changes trigger the group.
    pub watched: BTreeSet<String>,
    /// Ages after a node's newest sample at which the group must be evaluated (ms).
    pub deadlines_ms: BTreeSet<i64>,
}

/// The plans of every group, in the manager's group order.
pub fn plan(groups: &[RuleGroup]) -> Vec<GroupPlan> {
    // Recording name -> the metric names its expression reads (for rules reading recordings).
    let mut recorded: HashMap<String, BTreeSet<String>> = HashMap::new();
    for group in groups {
        for rule in &group.rules {
            if matches!(rule.kind, RuleKind::Recording)
                && let Ok(expr) = parser::parse(&rule.expr)
            {
                let mut names = BTreeSet::new();
                metric_names(&expr, &mut names);
                recorded.entry(rule.name.clone()).or_default().extend(names);
            }
        }
    }
    groups
        .iter()
        .map(|group| {
            let mut plan = GroupPlan::default();
            for rule in &group.rules {
                let RuleKind::Alerting { hold, .. } = &rule.kind else {
                    continue;
                };
                let Ok(expr) = parser::parse(&rule.expr) else {
                    continue;
                };
                let mut ages = Vec::new();
                age_thresholds(&expr, &mut ages);
                if !ages.is_empty() {
                    for age in ages {
                        let age_ms = (age * 1000.0).ceil() as i64 + hold.as_millis() as i64;
                        plan.deadlines_ms.insert(age_ms.max(0));
                    }
                    continue;
                }
                if !hold.is_zero() {
                    continue;
                }
                let mut names = BTreeSet::new();
                metric_names(&expr, &mut names);
                plan.watched.extend(expand_recordings(names, &recorded));
            }
            plan
        })
        .collect()
}

/// `names` with every recorded name replaced by what its recording rule reads, transitively.
fn expand_recordings(
    names: BTreeSet<String>,
    recorded: &HashMap<String, BTreeSet<String>>,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo: Vec<String> = names.into_iter().collect();
    let mut seen = BTreeSet::new();
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        match recorded.get(&name) {
            Some(inputs) => todo.extend(inputs.iter().cloned()),
            None => {
                out.insert(name);
            }
        }
    }
    out
}

fn unparen(expr: &Expr) -> &Expr {
    match expr {
        Expr::Paren(paren) => unparen(&paren.expr),
        other => other,
    }
}

/// The metric names the expression's selectors name (`name{...}` or `{__name__="name"}`).
pub fn metric_names(expr: &Expr, out: &mut BTreeSet<String>) {
    match expr {
        Expr::VectorSelector(selector) => selector_name(selector, out),
        Expr::MatrixSelector(matrix) => selector_name(&matrix.vs, out),
        Expr::Aggregate(aggregate) => {
            metric_names(&aggregate.expr, out);
            if let Some(param) = &aggregate.param {
                metric_names(param, out);
            }
        }
        Expr::Unary(unary) => metric_names(&unary.expr, out),
        Expr::Binary(binary) => {
            metric_names(&binary.lhs, out);
            metric_names(&binary.rhs, out);
        }
        Expr::Paren(paren) => metric_names(&paren.expr, out),
        Expr::Subquery(subquery) => metric_names(&subquery.expr, out),
        Expr::Call(call) => {
            for arg in &call.args.args {
                metric_names(arg, out);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

fn selector_name(selector: &parser::VectorSelector, out: &mut BTreeSet<String>) {
    if let Some(name) = &selector.name {
        out.insert(name.clone());
        return;
    }
    for matcher in &selector.matchers.matchers {
        if matcher.name == "__name__" && matches!(matcher.op, promql_parser::label::MatchOp::Equal)
        {
            out.insert(matcher.value.clone());
        }
    }
}

/// `time() - X` (possibly in parentheses)?
fn is_age(expr: &Expr) -> bool {
    match unparen(expr) {
        Expr::Binary(binary) if binary.op.to_string() == "-" => matches!(
            unparen(&binary.lhs),
            Expr::Call(call) if call.func.name == "time"
        ),
        _ => false,
    }
}

fn number(expr: &Expr) -> Option<f64> {
    match unparen(expr) {
        Expr::NumberLiteral(number) => Some(number.val),
        _ => None,
    }
}

/// The N of every `time() - X > N` (`>=`; or `N < time() - X`, `<=`) in the expression.
pub fn age_thresholds(expr: &Expr, out: &mut Vec<f64>) {
    match expr {
        Expr::Binary(binary) => {
            let op = binary.op.to_string();
            let threshold = match op.as_str() {
                ">" | ">=" if is_age(&binary.lhs) => number(&binary.rhs),
                "<" | "<=" if is_age(&binary.rhs) => number(&binary.lhs),
                _ => None,
            };
            if let Some(n) = threshold.filter(|n| n.is_finite()) {
                out.push(n);
            }
            age_thresholds(&binary.lhs, out);
            age_thresholds(&binary.rhs, out);
        }
        Expr::Paren(paren) => age_thresholds(&paren.expr, out),
        Expr::Aggregate(aggregate) => age_thresholds(&aggregate.expr, out),
        Expr::Unary(unary) => age_thresholds(&unary.expr, out),
        Expr::Call(call) => {
            for arg in &call.args.args {
                age_thresholds(arg, out);
            }
        }
        _ => {}
    }
}

/// Counts of evaluations the fast path asked for.
#[derive(Debug, Default)]
pub struct FastCounters {
    /// Group wake-ups by a changed watched series.
    pub changes: AtomicU64,
    /// Group wake-ups at a node's silence deadline.
    pub deadlines: AtomicU64,
}

/// The plans with their groups' triggers, replaced as a whole on reload.
#[derive(Default)]
struct Armed {
    /// Metric name -> triggers of the groups watching it.
    watched: HashMap<String, Vec<Arc<Trigger>>>,
    /// (age ms, trigger) of every deadline-scheduled group.
    deadlines: Vec<(i64, Arc<Trigger>)>,
}

/// What the change detector knows of a series (indexed by its dense `SeriesRef`).
#[derive(Clone, Copy, PartialEq)]
enum Known {
    Unseen,
    Ignored,
    Watched,
}

#[derive(Default)]
struct Detector {
    known: Vec<Known>,
    /// Last value (bits; histograms: their count) of watched series.
    last: HashMap<u64, u64>,
}

#[derive(Debug, Clone, Copy)]
struct NodeSeen {
    newest_ms: i64,
    /// The latest deadline already acted on.
    fired_upto_ms: i64,
}

/// The ingest sink of the fast path, and the state of its deadline scheduler.
pub struct FastSink {
    armed: RwLock<Arc<Armed>>,
    detector: Mutex<Detector>,
    nodes: Mutex<HashMap<String, NodeSeen>>,
    /// Wakes the scheduler when deadlines appear (after a reload).
    rescan: Notify,
    pub counters: FastCounters,
}

impl FastSink {
    pub fn new() -> FastSink {
        FastSink {
            armed: RwLock::new(Arc::new(Armed::default())),
            detector: Mutex::new(Detector::default()),
            nodes: Mutex::new(HashMap::new()),
            rescan: Notify::new(),
            counters: FastCounters::default(),
        }
    }

    /// Installs the plans of the current groups with their triggers (same order).
    pub fn arm(&self, plans: &[GroupPlan], triggers: &[Arc<Trigger>]) {
        let mut armed = Armed::default();
        for (plan, trigger) in plans.iter().zip(triggers) {
            for name in &plan.watched {
                armed
                    .watched
                    .entry(name.clone())
                    .or_default()
                    .push(trigger.clone());
            }
            for age in &plan.deadlines_ms {
                armed.deadlines.push((*age, trigger.clone()));
            }
        }
        *self.armed.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(armed);
        // Which series are watched may have changed: classify them again.
        let mut detector = lock(&self.detector);
        detector.known.clear();
        detector.last.clear();
        drop(detector);
        self.rescan.notify_one();
    }

    fn armed(&self) -> Arc<Armed> {
        self.armed.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs the deadline scheduler until `shutdown` turns true.
    pub async fn schedule_deadlines(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let next = self.fire_due_deadlines(now_ms());
            let wait = match next {
                Some(at) => Duration::from_millis((at - now_ms()).clamp(0, 1000) as u64),
                None => RESCAN,
            }
            .min(RESCAN);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.rescan.notified() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Fires the groups of every node deadline that has passed and was not acted on; returns
    /// the earliest deadline still ahead.
    fn fire_due_deadlines(&self, now: i64) -> Option<i64> {
        let armed = self.armed();
        if armed.deadlines.is_empty() {
            return None;
        }
        let mut due: Vec<&Arc<Trigger>> = Vec::new();
        let mut next: Option<i64> = None;
        let mut nodes = lock(&self.nodes);
        let longest = armed
            .deadlines
            .iter()
            .map(|(age, _)| *age)
            .max()
            .unwrap_or(0);
        nodes.retain(|_, seen| now - (seen.newest_ms + longest) < FORGET_AFTER_MS);
        for seen in nodes.values_mut() {
            for (age, trigger) in &armed.deadlines {
                // One millisecond past the threshold: the rules compare with `>`.
                let deadline = seen.newest_ms + age + 1;
                if deadline <= seen.fired_upto_ms {
                    continue;
                }
                if deadline <= now {
                    seen.fired_upto_ms = seen.fired_upto_ms.max(deadline);
                    if !due.iter().any(|t| Arc::ptr_eq(t, trigger)) {
                        due.push(trigger);
                    }
                } else {
                    next = Some(next.map_or(deadline, |n: i64| n.min(deadline)));
                }
            }
        }
        drop(nodes);
        for trigger in due {
            self.counters.deadlines.fetch_add(1, Ordering::Relaxed);
            trigger.fire(now);
        }
        next
    }
}

impl Default for FastSink {
    fn default() -> Self {
        FastSink::new()
    }
}

impl IngestSink for FastSink {
    fn on_ingested(&self, batch: &Arc<IngestedBatch>) {
        if batch.agent_instance.starts_with(COMPUTED_INSTANCE_PREFIX) {
            return;
        }
        let armed = self.armed();
        if !armed.deadlines.is_empty()
            && let Some(newest) = batch.points.iter().map(|(_, p)| p.time_ms).max()
        {
            let mut nodes = lock(&self.nodes);
            match nodes.get_mut(&batch.node) {
                Some(seen) => seen.newest_ms = seen.newest_ms.max(newest),
                None => {
                    nodes.insert(
                        batch.node.clone(),
                        NodeSeen {
                            newest_ms: newest,
                            fired_upto_ms: i64::MIN,
                        },
                    );
                }
            }
        }
        if armed.watched.is_empty() {
            return;
        }
        let mut fire: Vec<(&Arc<Trigger>, i64)> = Vec::new();
        let mut detector = lock(&self.detector);
        if detector.last.len() > MAX_REMEMBERED {
            detector.last.clear();
            detector.known.clear();
        }
        for (series, point) in &batch.points {
            let index = series.id.0 as usize;
            if detector.known.len() <= index {
                detector.known.resize(index + 1, Known::Unseen);
            }
            let known = match detector.known[index] {
                Known::Unseen => {
                    let known = if armed.watched.contains_key(&series.name) {
                        Known::Watched
                    } else {
                        Known::Ignored
                    };
                    detector.known[index] = known;
                    known
                }
                known => known,
            };
            if known != Known::Watched {
                continue;
            }
            let value = match &point.value {
                PointValue::Value(value) => value.to_bits(),
                PointValue::Histogram(histogram) => histogram.count,
            };
            // A series seen for the first time is a change: it appeared.
            if detector.last.insert(series.id.0, value) == Some(value) {
                continue;
            }
            for trigger in armed.watched.get(&series.name).into_iter().flatten() {
                match fire.iter_mut().find(|(t, _)| Arc::ptr_eq(t, trigger)) {
                    Some((_, at)) => *at = (*at).max(point.time_ms),
                    None => fire.push((trigger, point.time_ms)),
                }
            }
        }
        drop(detector);
        for (trigger, at) in fire {
            self.counters.changes.fetch_add(1, Ordering::Relaxed);
            trigger.fire(at);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use super::*;
    use crate::alerting::rules::Rule;

    fn rule(name: &str, expr: &str, hold_s: u64) -> Rule {
        Rule {
            name: name.into(),
            expr: expr.into(),
            labels: Vec::new(),
            kind: RuleKind::Alerting {
                hold: Duration::from_secs(hold_s),
                keep_firing_for: Duration::ZERO,
                annotations: Vec::new(),
            },
            line: 1,
        }
    }

    fn record(name: &str, expr: &str) -> Rule {
        Rule {
            name: name.into(),
            expr: expr.into(),
            labels: Vec::new(),
            kind: RuleKind::Recording,
            line: 1,
        }
    }

    fn group(rules: Vec<Rule>) -> RuleGroup {
        RuleGroup {
            name: "g".into(),
            file: PathBuf::from("r.yml"),
            interval: Duration::from_secs(5),
            limit: 0,
            rules,
        }
    }

    #[test]
    fn fast_rules_watch_their_metric_names_and_rules_with_for_do_not() {
        let plans = plan(&[
            group(vec![
                rule(
                    "Xid",
                    "increase(vigil_gpu_xid_errors_total[10m]) > 0 or \
                     (vigil_gpu_xid_errors_total unless vigil_gpu_xid_errors_total offset 10m)",
                    0,
                ),
                rule("Hot", "vigil_gpu_temperature_celsius > 85", 120),
                rule("ByName", "max by (node) ({__name__=\"vigil_x\"}) == 1", 0),
            ]),
            group(vec![rule("Slow", "vigil_gpu_temperature_celsius > 85", 60)]),
        ]);
        assert_eq!(
            plans[0].watched,
            BTreeSet::from(["vigil_gpu_xid_errors_total".into(), "vigil_x".into()])
        );
        assert!(plans[0].deadlines_ms.is_empty());
        assert_eq!(plans[1], GroupPlan::default());
    }

    #[test]
    fn age_rules_get_deadlines_and_recordings_expand_to_their_inputs() {
        let plans = plan(&[group(vec![
            record(
                "vigil:agent_last_seen_timestamp_seconds",
                "max by (node) (timestamp(vigil_agent_spool_bytes))",
            ),
            rule(
                "AgentSilent",
                "time() - max by (node) (max_over_time(vigil:agent_last_seen_timestamp_seconds[1h])) > 30",
                0,
            ),
            rule("Mirror", "(20 <= (time() - vigil_last_seen))", 10),
            rule("Recorded", "vigil:agent_last_seen_timestamp_seconds > 5", 0),
        ])]);
        // AgentSilent: 30 s; `20 <= time() - x` with `for: 10s`: 30 s too.
        assert_eq!(plans[0].deadlines_ms, BTreeSet::from([30_000]));
        assert_eq!(
            plans[0].watched,
            BTreeSet::from(["vigil_agent_spool_bytes".into()])
        );
        let plans = plan(&[group(vec![rule("Mirror", "20 <= (time() - x)", 15)])]);
        assert_eq!(plans[0].deadlines_ms, BTreeSet::from([35_000]));
    }

    #[test]
    fn the_shipped_catalog_plans_as_docs_alerts_md_says() {
        let catalog = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging/rules/vigil-gpu-serving.yml");
        let groups = crate::alerting::rules::load_files(
            &[catalog],
            Duration::from_secs(5),
            &Default::default(),
        )
        .unwrap();
        let plans: HashMap<String, GroupPlan> = groups
            .iter()
            .map(|g| g.name.clone())
            .zip(plan(&groups))
            .collect();
        let names = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
        let health = &plans["vigil-gpu-health"];
        assert_eq!(
            health.watched,
            names(&[
                "vigil_gpu_ecc_error_events_total",
                "vigil_gpu_ecc_errors_total",
                "vigil_gpu_row_remap_failed",
                "vigil_gpu_xid_errors_total",
            ])
        );
        assert!(health.deadlines_ms.is_empty());
        assert_eq!(
            plans["vigil-model-servers"].watched,
            names(&["vigil_process_start_time_seconds"])
        );
        let nodes = &plans["vigil-nodes"];
        assert_eq!(nodes.deadlines_ms, BTreeSet::from([30_000]));
        assert!(nodes.watched.is_empty(), "{:?}", nodes.watched);
        assert_eq!(plans["vigil-anomaly"], GroupPlan::default());
    }

    fn batch(instance: &str, node: &str, points: &[(u64, &str, i64, f64)]) -> Arc<IngestedBatch> {
        use crate::storage::{MetricKind, Point, SeriesRef, StoredSeries};
        Arc::new(IngestedBatch {
            node: node.into(),
            agent_instance: instance.into(),
            points: points
                .iter()
                .map(|(id, name, time_ms, value)| {
                    let series = StoredSeries {
                        id: SeriesRef(*id),
                        node: node.into(),
                        name: (*name).into(),
                        labels: Vec::new(),
                        kind: MetricKind::Gauge,
                    };
                    let point = Point {
                        time_ms: *time_ms,
                        value: PointValue::Value(*value),
                    };
                    (Arc::new(series), point)
                })
                .collect(),
            events: Vec::new(),
        })
    }

    #[test]
    fn the_sink_fires_on_changes_of_watched_series_only_and_at_node_deadlines() {
        let sink = FastSink::new();
        let plans = vec![
            GroupPlan {
                watched: BTreeSet::from(["xid".to_string()]),
                deadlines_ms: BTreeSet::new(),
            },
            GroupPlan {
                watched: BTreeSet::new(),
                deadlines_ms: BTreeSet::from([30_000]),
            },
        ];
        let triggers: Vec<Arc<Trigger>> = vec![Arc::default(), Arc::default()];
        sink.arm(&plans, &triggers);
        let changes = || sink.counters.changes.load(Ordering::Relaxed);
        // A new watched series is a change; the same value again is not; a new value is.
        sink.on_ingested(&batch(
            "a1",
            "n1",
            &[(7, "xid", 1_000, 0.0), (8, "temp", 1_000, 50.0)],
        ));
        assert_eq!(changes(), 1);
        assert_eq!(triggers[0].not_before_ms.load(Ordering::Relaxed), 1_000);
        sink.on_ingested(&batch(
            "a1",
            "n1",
            &[(7, "xid", 2_000, 0.0), (8, "temp", 2_000, 60.0)],
        ));
        assert_eq!(
            changes(),
            1,
            "unchanged counters and unwatched series trigger nothing"
        );
        sink.on_ingested(&batch("a1", "n1", &[(7, "xid", 3_000, 1.0)]));
        assert_eq!(changes(), 2);
        // The aggregator's own writes never trigger.
        let computed = format!("{COMPUTED_INSTANCE_PREFIX}1-0");
        sink.on_ingested(&batch(&computed, "n1", &[(7, "xid", 4_000, 2.0)]));
        assert_eq!(changes(), 2);

        // n1's newest sample is at 3 s: its deadline is 33 s (+1 ms), once.
        let deadlines = || sink.counters.deadlines.load(Ordering::Relaxed);
        assert_eq!(sink.fire_due_deadlines(20_000), Some(33_001));
        assert_eq!(deadlines(), 0);
        assert_eq!(sink.fire_due_deadlines(33_001), None);
        assert_eq!(deadlines(), 1);
        assert_eq!(sink.fire_due_deadlines(40_000), None);
        assert_eq!(deadlines(), 1, "a deadline is acted on once");
        // The node speaks again: a new deadline.
        sink.on_ingested(&batch("a1", "n1", &[(8, "temp", 50_000, 61.0)]));
        assert_eq!(sink.fire_due_deadlines(60_000), Some(80_001));
    }

    #[test]
    fn other_comparisons_with_time_are_not_ages() {
        let mut ages = Vec::new();
        let expr = parser::parse("max_over_time(x[15m]) > time() - 900").unwrap();
        age_thresholds(&expr, &mut ages);
        assert!(ages.is_empty(), "{ages:?}");
        let expr = parser::parse("time() + x > 30").unwrap();
        age_thresholds(&expr, &mut ages);
        assert!(ages.is_empty(), "{ages:?}");
    }
}
