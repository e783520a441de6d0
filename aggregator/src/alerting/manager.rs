//! The rule manager: loads the rule files, evaluates each group on its own interval, stores
//! results, keeps alert history, hands alerts to the notifier, and reloads on SIGHUP or when a
//! rule file changes. A reload that fails (a file that does not parse) is refused with the
//! file, line and reason, and the rules that were running keep running.
//!
//! Besides its interval, a group is evaluated at once when the fast path ([`super::fast`])
//! wakes it: a stored batch changed a series one of its `for`-less alerts reads, or a node's
//! data became old enough for one of its age rules (`time() - x > N`) to fire.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{sync::watch, task::JoinHandle};

use super::{
    config::AlertingConfig,
    fast::{self, FastSink, Trigger},
    group::{Alert, AlertState, EvalContext, GroupState, Transition},
    history::AlertHistory,
    notify::Notifier,
    rules::{self, RuleError, RuleGroup},
    writer::SampleWriter,
};
use crate::{http::metrics::Exposition, query::Engine};

/// The outcome of the latest (re)load.
#[derive(Debug, Clone, PartialEq)]
pub struct ReloadStatus {
    pub ok: bool,
    pub at_ms: i64,
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct Counters {
    evaluations: AtomicU64,
    rule_failures: AtomicU64,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
}

/// What the rule manager is built from.
pub struct ManagerParts {
    pub config: AlertingConfig,
    pub engine: Engine,
    pub writer: SampleWriter,
    pub history: AlertHistory,
    pub notifier: Notifier,
}

/// Evaluates the configured rules. Cheap to clone.
#[derive(Clone)]
pub struct RuleManager {
    shared: Arc<Shared>,
}

struct Shared {
    config: AlertingConfig,
    external_labels: Vec<(String, String)>,
    engine: Engine,
    writer: SampleWriter,
    history: AlertHistory,
    notifier: Notifier,
    groups: Mutex<Vec<Arc<Mutex<GroupState>>>>,
    /// Each group's fast-path trigger, in the order of `groups` (replaced with them).
    triggers: Mutex<Vec<Arc<Trigger>>>,
    fast: Arc<FastSink>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Whether groups run on their own (after `start`).
    running: Mutex<Option<watch::Receiver<bool>>>,
    reload_status: Mutex<ReloadStatus>,
    stamps: Mutex<Vec<(PathBuf, Option<SystemTime>, u64)>>,
    counters: Counters,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The rule files of a config, loaded and checked (what `check-rules` and startup do).
pub fn load_rules(config: &AlertingConfig) -> Result<Vec<RuleGroup>, RuleError> {
    let files = rules::expand_globs(
        &config.rule_files,
        &std::env::current_dir().unwrap_or_default(),
    )?;
    rules::load_files(&files, config.evaluation_interval, &config.thresholds)
}

impl RuleManager {
    /// Loads the rules; a rule file that does not load is an error (startup refuses it).
    pub fn new(parts: ManagerParts) -> Result<RuleManager, RuleError> {
        let groups = load_rules(&parts.config)?;
        let fast = Arc::new(FastSink::new());
        let triggers = arm(&fast, &groups);
        let external_labels = parts
            .config
            .external_labels
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        let manager = RuleManager {
            shared: Arc::new(Shared {
                config: parts.config,
                external_labels,
                engine: parts.engine,
                writer: parts.writer,
                history: parts.history,
                notifier: parts.notifier,
                groups: Mutex::new(
                    groups
                        .into_iter()
                        .map(|group| Arc::new(Mutex::new(GroupState::new(group))))
                        .collect(),
                ),
                triggers: Mutex::new(triggers),
                fast,
                tasks: Mutex::new(Vec::new()),
                running: Mutex::new(None),
                reload_status: Mutex::new(ReloadStatus {
                    ok: true,
                    at_ms: now_ms(),
                    error: None,
                }),
                stamps: Mutex::new(Vec::new()),
                counters: Counters::default(),
            }),
        };
        *lock(&manager.shared.stamps) = manager.file_stamps();
        Ok(manager)
    }

    /// Starts evaluating every group on its interval, and watching for SIGHUP and rule-file
    /// changes, until `shutdown` turns true.
    pub fn start(&self, shutdown: watch::Receiver<bool>) {
        *lock(&self.shared.running) = Some(shutdown.clone());
        self.spawn_groups();
        tokio::spawn(
            self.shared
                .fast
                .clone()
                .schedule_deadlines(shutdown.clone()),
        );
        let manager = self.clone();
        tokio::spawn(async move { manager.watch_for_reloads(shutdown).await });
    }

    fn spawn_groups(&self) {
        let Some(shutdown) = lock(&self.shared.running).clone() else {
            return;
        };
        let groups = lock(&self.shared.groups).clone();
        let triggers = lock(&self.shared.triggers).clone();
        let mut tasks = lock(&self.shared.tasks);
        for task in tasks.drain(..) {
            task.abort();
        }
        for (group, trigger) in groups.into_iter().zip(triggers) {
            let manager = self.clone();
            let mut shutdown = shutdown.clone();
            let interval = lock(&group).group.interval;
            tasks.push(tokio::spawn(async move {
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    let triggered = tokio::select! {
                        _ = ticker.tick() => false,
                        // The fast path: at most one permit is stored, so batches arriving
                        // during an evaluation add one more evaluation, not one each.
                        _ = trigger.notify.notified() => true,
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    };
                    let ahead = trigger.not_before_ms.load(Ordering::Relaxed) - now_ms();
                    if triggered && ahead > 0 {
                        // The triggering sample is stamped ahead of this clock: wait until
                        // queries see it.
                        let wait = Duration::from_millis(ahead as u64).min(fast::MAX_FUTURE_WAIT);
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = shutdown.wait_for(|stop| *stop) => return,
                        }
                    }
                    let manager = manager.clone();
                    let group = group.clone();
                    // The engine's work is CPU-bound: off the async workers.
                    let _ = tokio::task::spawn_blocking(move || {
                        manager.evaluate_group(&group, now_ms());
                    })
                    .await;
                }
            }));
        }
    }

    /// Stops evaluating and writing (aggregator shutdown): no group runs after this returns,
    /// and the write-ahead log is no longer held.
    pub async fn stop(&self) {
        *lock(&self.shared.running) = None;
        for task in lock(&self.shared.tasks).drain(..) {
            task.abort();
        }
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            // An evaluation already running holds its group's lock: wait for each.
            for group in lock(&shared.groups).iter() {
                drop(lock(group));
            }
            shared.writer.close();
        })
        .await;
    }

    async fn watch_for_reloads(&self, mut shutdown: watch::Receiver<bool>) {
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut ticker = tokio::time::interval(self.shared.config.file_check_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let signalled = async {
                match hangup.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => {
                    for task in lock(&self.shared.tasks).drain(..) {
                        task.abort();
                    }
                    return;
                }
                _ = signalled => {
                    tracing::info!("SIGHUP: reloading the rule files");
                    let _ = self.reload();
                }
                _ = ticker.tick() => {
                    let stamps = self.file_stamps();
                    if stamps != *lock(&self.shared.stamps) {
                        tracing::info!("a rule file changed: reloading the rule files");
                        let _ = self.reload();
                    }
                }
            }
        }
    }

    /// Every rule file with its modification time and size, to notice changes.
    fn file_stamps(&self) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
        let base = std::env::current_dir().unwrap_or_default();
        let files = rules::expand_globs(&self.shared.config.rule_files, &base).unwrap_or_default();
        files
            .into_iter()
            .map(|file| {
                let metadata = std::fs::metadata(&file).ok();
                let modified = metadata.as_ref().and_then(|m| m.modified().ok());
                let size = metadata.map(|m| m.len()).unwrap_or(0);
                (file, modified, size)
            })
            .collect()
    }

    /// Loads the rule files again. On success the new rules replace the old (unchanged rules
    /// keep their alerts); on failure the old rules stay and the error is returned, logged and
    /// shown by `/api/v1/rules`' status.
    pub fn reload(&self) -> Result<(), RuleError> {
        self.shared.counters.reloads.fetch_add(1, Ordering::Relaxed);
        // Remember what was seen even when it fails, so a broken file is reported once, and
        // fixing it (a new stamp) triggers the next reload.
        *lock(&self.shared.stamps) = self.file_stamps();
        match load_rules(&self.shared.config) {
            Err(error) => {
                self.shared
                    .counters
                    .reload_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!("rule reload refused, the previous rules stay active: {error}");
                *lock(&self.shared.reload_status) = ReloadStatus {
                    ok: false,
                    at_ms: now_ms(),
                    error: Some(error.to_string()),
                };
                Err(error)
            }
            Ok(groups) => {
                // Series written by rules that are gone: they get staleness markers, as
                // Prometheus writes them when it stops a group.
                let mut orphaned = Vec::new();
                {
                    *lock(&self.shared.triggers) = arm(&self.shared.fast, &groups);
                    let mut current = lock(&self.shared.groups);
                    let mut inherited = vec![false; current.len()];
                    let replaced: Vec<Arc<Mutex<GroupState>>> = groups
                        .into_iter()
                        .map(|group| {
                            let mut state = GroupState::new(group);
                            if let Some(position) = current.iter().position(|old| {
                                let old = lock(old);
                                old.group.file == state.group.file
                                    && old.group.name == state.group.name
                            }) {
                                inherited[position] = true;
                                orphaned.extend(state.inherit(&lock(&current[position])));
                            }
                            Arc::new(Mutex::new(state))
                        })
                        .collect();
                    for (old, taken) in current.iter().zip(inherited) {
                        if !taken {
                            orphaned.extend(lock(old).written());
                        }
                    }
                    *current = replaced;
                }
                if !orphaned.is_empty() {
                    let now = now_ms();
                    let stale = f64::from_bits(crate::query::value::STALE_NAN_BITS);
                    let markers = orphaned.into_iter().map(|labels| (labels, stale)).collect();
                    if let Err(why) = self.shared.writer.write(now, now, markers) {
                        tracing::warn!("staleness markers for removed rules not stored: {why}");
                    }
                }
                *lock(&self.shared.reload_status) = ReloadStatus {
                    ok: true,
                    at_ms: now_ms(),
                    error: None,
                };
                tracing::info!(
                    "rules loaded: {} groups, {} rules",
                    self.groups().len(),
                    self.groups().iter().map(|g| g.rules.len()).sum::<usize>()
                );
                self.spawn_groups();
                Ok(())
            }
        }
    }

    /// Evaluates one group at `ts_ms` and acts on the outcome.
    fn evaluate_group(&self, group: &Mutex<GroupState>, ts_ms: i64) {
        let shared = &self.shared;
        let ctx = EvalContext {
            engine: &shared.engine,
            external_labels: &shared.external_labels,
            resend_interval: shared.config.resend_interval,
            // Each rule's alerts are queued for the notifiers as soon as it is evaluated:
            // what the fast path is for.
            notify: &|alerts| shared.notifier.send(alerts),
        };
        let now = now_ms();
        let (outcome, firing) = {
            let mut state = lock(group);
            let outcome = state.evaluate(ts_ms, &ctx, &mut |samples| {
                shared.writer.write(ts_ms, now, samples).map(|_| ())
            });
            let firing: Vec<Alert> = state
                .rules
                .iter()
                .flat_map(|rule| rule.alerts.values())
                .filter(|alert| alert.state == AlertState::Firing)
                .cloned()
                .collect();
            (outcome, firing)
        };
        shared.counters.evaluations.fetch_add(1, Ordering::Relaxed);
        shared
            .counters
            .rule_failures
            .fetch_add(outcome.failures as u64, Ordering::Relaxed);
        for transition in &outcome.transitions {
            match transition {
                Transition::Fired(alert) => shared.history.fired(alert),
                Transition::Resolved(alert) => shared.history.resolved(alert),
            }
        }
        for alert in &firing {
            shared.history.observe(alert);
        }
        shared.history.maintain(now);
    }

    /// Evaluates every group once at `ts_ms`, in order (tests and tools choose the time).
    pub fn evaluate_at(&self, ts_ms: i64) {
        let groups = lock(&self.shared.groups).clone();
        for group in groups {
            self.evaluate_group(&group, ts_ms);
        }
    }

    /// A snapshot of every group with its rules' state.
    pub fn groups(&self) -> Vec<GroupState> {
        lock(&self.shared.groups)
            .iter()
            .map(|group| lock(group).clone())
            .collect()
    }

    /// Pending and firing alerts.
    pub fn active_alerts(&self) -> Vec<Alert> {
        self.groups()
            .into_iter()
            .flat_map(|group| group.rules.into_iter())
            .flat_map(|rule| rule.alerts.into_values())
            .filter(|alert| alert.state != AlertState::Inactive)
            .collect()
    }

    pub fn history(&self) -> &AlertHistory {
        &self.shared.history
    }

    pub fn notifier(&self) -> &Notifier {
        &self.shared.notifier
    }

    /// The fast path's ingest sink: register it with the store (`Store::add_sink`) so stored
    /// batches can wake groups.
    pub fn fast_sink(&self) -> Arc<FastSink> {
        self.shared.fast.clone()
    }

    pub fn reload_status(&self) -> ReloadStatus {
        lock(&self.shared.reload_status).clone()
    }

    /// The rule manager's families for `/metrics`.
    pub fn write_metrics(&self, out: &mut String) {
        let counters = &self.shared.counters;
        let mut text = Exposition::default();
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        text.counter(
            "vigil_aggregator_rule_group_evaluations_total",
            "Rule group evaluations.",
            get(&counters.evaluations),
        );
        text.counter(
            "vigil_aggregator_rule_evaluation_failures_total",
            "Rule evaluations that failed (query error, or results that could not be stored).",
            get(&counters.rule_failures),
        );
        let fast = &self.shared.fast.counters;
        text.family(
            "vigil_aggregator_rule_group_fast_evaluations_total",
            "counter",
            "Group evaluations the fast path asked for: a changed series a `for`-less alert \
             reads (change), or a node's data reaching an age rule's threshold (deadline).",
        );
        for (reason, counter) in [("change", &fast.changes), ("deadline", &fast.deadlines)] {
            text.sample(
                "vigil_aggregator_rule_group_fast_evaluations_total",
                &[("trigger", reason)],
                get(counter) as f64,
            );
        }
        text.counter(
            "vigil_aggregator_rule_reloads_total",
            "Rule reloads (SIGHUP or a changed file).",
            get(&counters.reloads),
        );
        text.counter(
            "vigil_aggregator_rule_reload_failures_total",
            "Rule reloads refused because a file did not load (the previous rules stayed).",
            get(&counters.reload_failures),
        );
        let active = self.active_alerts();
        let count = |state: AlertState| active.iter().filter(|a| a.state == state).count() as f64;
        text.family(
            "vigil_aggregator_alerts",
            "gauge",
            "Active alerts by state.",
        );
        for (state, name) in [
            (AlertState::Pending, "pending"),
            (AlertState::Firing, "firing"),
        ] {
            text.sample("vigil_aggregator_alerts", &[("state", name)], count(state));
        }
        let stats = self.shared.notifier.stats();
        type Pick = fn(&super::notify::TargetStats) -> u64;
        let per_target: [(&str, &str, Pick); 4] = [
            (
                "vigil_aggregator_notifications_sent_total",
                "Alerts delivered to Alertmanager or webhooks.",
                |s| s.sent.load(Ordering::Relaxed),
            ),
            (
                "vigil_aggregator_notification_errors_total",
                "Failed delivery attempts (each retry counts).",
                |s| s.errors.load(Ordering::Relaxed),
            ),
            (
                "vigil_aggregator_notifications_failed_total",
                "Alerts given up on after the retries, or refused by the receiver.",
                |s| s.failed.load(Ordering::Relaxed),
            ),
            (
                "vigil_aggregator_notifications_dropped_total",
                "Alerts dropped because a target's queue was full.",
                |s| s.dropped.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, pick) in per_target {
            text.family(name, "counter", help);
            for (kind, url, target) in &stats {
                text.sample(
                    name,
                    &[("kind", kind.as_str()), ("url", url)],
                    pick(target) as f64,
                );
            }
        }
        out.push_str(&text.finish());
    }
}

/// New triggers for `groups` (in order), armed in the fast path's sink.
fn arm(fast: &FastSink, groups: &[RuleGroup]) -> Vec<Arc<Trigger>> {
    let triggers: Vec<Arc<Trigger>> = groups.iter().map(|_| Arc::default()).collect();
    fast.arm(&fast::plan(groups), &triggers);
    triggers
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
