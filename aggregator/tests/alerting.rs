//! Alerting: rule files (errors with file:line, reloads that keep the old rules), the alert
//! state machine, templating, ALERTS series, the shipped catalog against data that should and
//! should not trigger each alert, webhooks with retries, and a real Alertmanager end to end.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use vigil_aggregator::{
    RunningAggregator,
    alerting::{
        AlertHistory, AlertState, AlertingConfig, ManagerParts, Notifier, RuleManager,
        SampleWriter, WebhookConfig, rules,
    },
    ingest::{admission::Limits, counters::IngestCounters},
    query::{Engine, SampleValue, Value},
    storage::Wal,
};
use vigil_proto::v1::{
    ActiveAlertsRequest, AlertHistoryRequest, Batch, Histogram, MetricType, Sample, Series,
    alerts_client::AlertsClient,
};

const MINUTE: i64 = 60_000;

// ----- Helpers -------------------------------------------------------------------------------

/// A rule manager over the aggregator's store, evaluated by hand (`evaluate_at`), storing its
/// results through its own write-ahead log in `dir`.
fn manager_for(
    aggregator: &RunningAggregator,
    dir: &Path,
    config: AlertingConfig,
    webhooks: &[WebhookConfig],
    shutdown: watch::Receiver<bool>,
) -> Result<RuleManager, rules::RuleError> {
    let wal_dir = dir.join("rules-wal");
    std::fs::create_dir_all(&wal_dir).unwrap();
    let (wal, _) = Wal::open(&wal_dir, 64 << 20, |_| {}).unwrap();
    let limits = Limits {
        max_series_per_node: 20_000,
        retention_ms: 15 * 24 * 3600 * 1000,
        max_future_skew_ms: 5 * MINUTE,
    };
    let store = aggregator.store().clone();
    let notifier = Notifier::start(
        &[],
        webhooks,
        config
            .external_labels
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
        Some("http://vigil.test/api/v1/rules".into()),
        shutdown,
    )
    .unwrap();
    RuleManager::new(ManagerParts {
        engine: Engine::new(store.clone()),
        writer: SampleWriter::new(
            store,
            Arc::new(wal),
            Arc::new(IngestCounters::default()),
            limits,
            &config.node,
            common::now_ms(),
        ),
        history: AlertHistory::in_memory(Duration::from_secs(15 * 86_400)),
        notifier,
        config,
    })
}

fn config_with(files: &[&Path]) -> AlertingConfig {
    AlertingConfig {
        rule_files: files.iter().map(|f| f.display().to_string()).collect(),
        external_labels: BTreeMap::from([("cluster".into(), "test".into())]),
        ..AlertingConfig::default()
    }
}

/// Series id, time, `(bucket index, running count)` of the non-empty buckets, running sum.
type HistogramPoint = (u64, i64, Vec<(u32, u64)>, f64);

/// One node's generated series, sent as one batch through a real agent stream.
struct NodeData {
    node: String,
    series: Vec<Series>,
    samples: Vec<(u64, i64, f64)>,
    histograms: Vec<HistogramPoint>,
}

impl NodeData {
    fn new(node: &str) -> NodeData {
        NodeData {
            node: node.into(),
            series: Vec::new(),
            samples: Vec::new(),
            histograms: Vec::new(),
        }
    }

    fn declare(&mut self, name: &str, labels: &[(&str, &str)], kind: MetricType) -> u64 {
        let id = self.series.len() as u64 + 1;
        self.series.push(common::declare(id, name, labels, kind));
        id
    }

    /// A float series with a sample at each of `times` where `value` gives one.
    fn gauge(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        times: &[i64],
        value: impl Fn(i64) -> Option<f64>,
    ) {
        let id = self.declare(name, labels, MetricType::Gauge);
        for &t in times {
            if let Some(v) = value(t) {
                self.samples.push((id, t, v));
            }
        }
    }

    async fn send(self, aggregator: &RunningAggregator, base_ms: i64) {
        let mut stream =
            common::open_plaintext(aggregator, common::hello(&self.node, "agent-1")).await;
        let batch = Batch {
            sequence: 1,
            series: self.series,
            base_time_ms: base_ms,
            samples: self
                .samples
                .iter()
                .map(|(id, t, v)| Sample {
                    series_id: *id,
                    time_delta_ms: t - base_ms,
                    value: *v,
                })
                .collect(),
            histograms: self
                .histograms
                .iter()
                .map(|(id, t, buckets, sum)| {
                    let mut previous = 0;
                    let deltas = buckets
                        .iter()
                        .map(|(index, _)| {
                            let delta = index - previous;
                            previous = *index;
                            delta
                        })
                        .collect();
                    Histogram {
                        series_id: *id,
                        time_delta_ms: t - base_ms,
                        count: buckets.iter().map(|(_, c)| c).sum(),
                        sum_seconds: *sum,
                        bucket_index_deltas: deltas,
                        bucket_counts: buckets.iter().map(|(_, c)| *c).collect(),
                    }
                })
                .collect(),
            ..Batch::default()
        };
        let rejections = stream.store(batch).await;
        assert!(rejections.is_empty(), "{}: {rejections:?}", self.node);
    }
}

fn label<'a>(labels: &'a [(String, String)], name: &str) -> &'a str {
    labels
        .iter()
        .find(|(label, _)| label == name)
        .map(|(_, value)| value.as_str())
        .unwrap_or("")
}

fn floats(value: Value) -> Vec<(Vec<(String, String)>, f64)> {
    match value {
        Value::Vector(samples) => samples
            .into_iter()
            .map(|sample| match sample.value {
                SampleValue::Float(v) => (sample.labels, v),
                SampleValue::Histogram(_) => panic!("unexpected histogram"),
            })
            .collect(),
        other => panic!("expected a vector, got {other:?}"),
    }
}

async fn wait_for<T>(what: &str, seconds: u64, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {seconds} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ----- Rule files ------------------------------------------------------------------------------

#[test]
fn broken_rule_files_are_refused_with_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up > 1\n        labls: {}\n",
            6,
            "labls",
        ),
        (
            "groups:\n  - name: g\n    rules:\n      - alert: Fine\n        expr: up\n      - alert: Broken\n        expr: sum(rate(up[5m])\n",
            6,
            "Broken",
        ),
        (
            "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up\n        annotations:\n          summary: '{{ range $labels }}'\n",
            4,
            "unsupported template action",
        ),
        (
            "groups:\n  - name: g\n    interval: 1s\n    rules: []\n  - name: g\n    rules: []\n",
            5,
            "repeated",
        ),
        ("groups:\n  - name: g\n    rules:\n    - alert: [\n", 4, ""),
    ];
    for (index, (text, line, reason)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{index}.yml"));
        std::fs::write(&path, text).unwrap();
        let error = rules::load_files(
            std::slice::from_ref(&path),
            Duration::from_secs(5),
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert_eq!(error.file, path);
        assert_eq!(error.line, Some(*line), "case {index}: {error}");
        assert!(error.message.contains(reason), "case {index}: {error}");
        let shown = error.to_string();
        assert!(
            shown.starts_with(&format!("{}:{line}", path.display())),
            "{shown}"
        );

        // The same through `vigil-aggregator check-rules`.
        let output = Command::new(env!("CARGO_BIN_EXE_vigil-aggregator"))
            .arg("check-rules")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "case {index}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("{}:{line}", path.display())),
            "{stderr}"
        );
    }
}

#[test]
fn check_rules_accepts_the_shipped_catalog_and_applies_config_thresholds() {
    let catalog = catalog_path();
    let output = Command::new(env!("CARGO_BIN_EXE_vigil-aggregator"))
        .arg("check-rules")
        .arg(&catalog)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("SUCCESS: 4 groups, 14 alerting and 2 recording rules"),
        "{stdout}"
    );

    // Defaults come from the file; the config's [alerting.thresholds] override them.
    let groups = rules::load_files(
        std::slice::from_ref(&catalog),
        Duration::from_secs(5),
        &BTreeMap::new(),
    )
    .unwrap();
    let expr_of = |groups: &[rules::RuleGroup], name: &str| {
        groups
            .iter()
            .flat_map(|g| g.rules.iter())
            .find(|r| r.name == name)
            .unwrap()
            .expr
            .clone()
    };
    assert_eq!(
        expr_of(&groups, "GPUTemperatureHigh"),
        "vigil_gpu_temperature_celsius > 85"
    );
    let overridden = rules::load_files(
        std::slice::from_ref(&catalog),
        Duration::from_secs(5),
        &BTreeMap::from([("gpu_temperature_max_celsius".to_string(), "78".to_string())]),
    )
    .unwrap();
    assert_eq!(
        expr_of(&overridden, "GPUTemperatureHigh"),
        "vigil_gpu_temperature_celsius > 78"
    );
    // Every shipped alert carries what the runbook needs.
    for rule in groups.iter().flat_map(|g| g.rules.iter()) {
        if let rules::RuleKind::Alerting { annotations, .. } = &rule.kind {
            let names: BTreeSet<&str> = annotations.iter().map(|(n, _)| n.as_str()).collect();
            for needed in ["summary", "description", "runbook_url"] {
                assert!(names.contains(needed), "{}: no {needed}", rule.name);
            }
            assert!(
                rule.labels.iter().any(|(n, _)| n == "severity"),
                "{}: no severity",
                rule.name
            );
        }
    }
}

fn catalog_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/rules/vigil-gpu-serving.yml")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_reload_keeps_the_running_rules_and_changes_are_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = common::start(&common::plaintext_config(dir.path())).await;
    let rule_file = dir.path().join("rules.yml");
    std::fs::write(
        &rule_file,
        "groups:\n  - name: g\n    rules:\n      - alert: First\n        expr: vector(1)\n",
    )
    .unwrap();
    let mut config = config_with(&[&rule_file]);
    config.file_check_interval = Duration::from_millis(100);
    let (stop, shutdown) = watch::channel(false);
    let manager = manager_for(&aggregator, dir.path(), config, &[], shutdown.clone()).unwrap();
    let names = |manager: &RuleManager| -> Vec<String> {
        manager
            .groups()
            .iter()
            .flat_map(|g| g.rules.iter().map(|r| r.rule.name.clone()))
            .collect()
    };
    manager.evaluate_at(common::now_ms());
    assert_eq!(manager.active_alerts().len(), 1);

    // A file that does not parse: refused, the old rules and their alerts stay.
    std::fs::write(
        &rule_file,
        "groups:\n  - name: g\n    rules:\n      - alert: Second\n        expr: vector(1) +\n",
    )
    .unwrap();
    let error = manager.reload().unwrap_err();
    assert_eq!(error.line, Some(4), "{error}");
    assert_eq!(names(&manager), ["First"]);
    assert_eq!(manager.active_alerts().len(), 1);
    let status = manager.reload_status();
    assert!(!status.ok);
    assert!(
        status.error.unwrap().contains("rules.yml:4"),
        "the status names file and line"
    );
    manager.evaluate_at(common::now_ms());
    assert_eq!(manager.active_alerts().len(), 1, "the old rules still run");

    // Watching: a fixed file is loaded without being asked.
    manager.start(shutdown);
    std::fs::write(
        &rule_file,
        "groups:\n  - name: g\n    rules:\n      - alert: First\n        expr: vector(1)\n      - alert: Third\n        expr: vector(2)\n",
    )
    .unwrap();
    wait_for("the changed rule file to be loaded", 20, async || {
        (names(&manager) == ["First", "Third"]).then_some(())
    })
    .await;
    assert!(manager.reload_status().ok);

    let _ = stop.send(true);

    // SIGHUP reloads too: a manager that checks its files only hourly sees the change at once.
    let (stop, shutdown) = watch::channel(false);
    let mut config = config_with(&[&rule_file]);
    config.file_check_interval = Duration::from_secs(3600);
    let manager = manager_for(&aggregator, dir.path(), config, &[], shutdown.clone()).unwrap();
    manager.start(shutdown);
    // Past the watcher's first (immediate) file check, with its signal handler installed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(
        &rule_file,
        "groups:\n  - name: g\n    rules:\n      - alert: Fourth\n        expr: vector(1)\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        names(&manager),
        ["First", "Third"],
        "no reload without the signal"
    );
    let status = Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for("SIGHUP to reload the rules", 20, async || {
        (names(&manager) == ["Fourth"]).then_some(())
    })
    .await;
    let _ = stop.send(true);
    aggregator.shutdown().await;
}

#[tokio::test]
async fn a_reload_that_removes_rules_marks_their_series_stale() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = common::start(&common::plaintext_config(dir.path())).await;
    let rule_file = dir.path().join("rules.yml");
    std::fs::write(
        &rule_file,
        "groups:\n  - name: kept\n    rules:\n      - record: test:kept\n        expr: vector(1)\n      - record: test:dropped\n        expr: vector(2)\n  - name: gone\n    rules:\n      - alert: Gone\n        expr: vector(3)\n",
    )
    .unwrap();
    let (_stop, shutdown) = watch::channel(false);
    let manager = manager_for(
        &aggregator,
        dir.path(),
        config_with(&[&rule_file]),
        &[],
        shutdown,
    )
    .unwrap();
    let engine = Engine::new(aggregator.store().clone());
    let evaluated = common::now_ms() - 1_000;
    manager.evaluate_at(evaluated);
    let present =
        |query: &str| !floats(engine.instant(query, common::now_ms() + 1_000).unwrap()).is_empty();
    for query in ["test:kept", "test:dropped", "ALERTS{alertname=\"Gone\"}"] {
        assert!(present(query), "{query} written");
    }
    // One rule of a kept group and a whole group go away.
    std::fs::write(
        &rule_file,
        "groups:\n  - name: kept\n    rules:\n      - record: test:kept\n        expr: vector(1)\n",
    )
    .unwrap();
    manager.reload().unwrap();
    assert!(present("test:kept"), "a kept rule's series stays");
    for query in [
        "test:dropped",
        "ALERTS{alertname=\"Gone\"}",
        "ALERTS_FOR_STATE",
    ] {
        assert!(!present(query), "{query} is stale once its rule is gone");
    }
    aggregator.shutdown().await;
}

// ----- The state machine -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_go_pending_firing_resolved_with_for_keep_firing_for_and_templates() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = common::start(&common::plaintext_config(dir.path())).await;
    let now = common::now_ms() / 1000 * 1000;
    let t0 = now - 30 * MINUTE;
    // Temperature: 70, then 95 from +5m to +15m, then 70 again.
    let times: Vec<i64> = (0..=30 * 4).map(|k| t0 + k * 15_000).collect();
    let mut data = NodeData::new("gpu-a");
    data.gauge(
        "vigil_gpu_temperature_celsius",
        &[("gpu", "3")],
        &times,
        |t| {
            Some(if (t0 + 5 * MINUTE..t0 + 15 * MINUTE).contains(&t) {
                95.0
            } else {
                70.0
            })
        },
    );
    data.send(&aggregator, t0).await;

    let rule_file = dir.path().join("rules.yml");
    std::fs::write(
        &rule_file,
        r#"groups:
  - name: temps
    interval: 1s
    rules:
      - alert: Hot
        expr: vigil_gpu_temperature_celsius > ${limit:-90}
        for: 2m
        keep_firing_for: 3m
        labels:
          severity: "{{ if_not_supported }}"
"#,
    )
    .unwrap();
    let (_stop, shutdown) = watch::channel(false);
    let error = manager_for(
        &aggregator,
        dir.path(),
        config_with(&[&rule_file]),
        &[],
        shutdown.clone(),
    )
    .err()
    .expect("a label template outside the subset is refused");
    assert!(error.to_string().contains("rules.yml:5"), "{error}");

    std::fs::write(
        &rule_file,
        r#"groups:
  - name: temps
    interval: 1s
    rules:
      - alert: Hot
        expr: vigil_gpu_temperature_celsius > ${limit:-90}
        for: 2m
        keep_firing_for: 3m
        labels:
          severity: critical
          where: "{{ $labels.node }}/{{ $labels.gpu }}"
        annotations:
          summary: "GPU {{ $labels.gpu }} on {{ $labels.node }} is at {{ $value }} C (limit ${limit:-90}, {{ $externalLabels.cluster }})"
"#,
    )
    .unwrap();
    let manager = manager_for(
        &aggregator,
        dir.path(),
        config_with(&[&rule_file]),
        &[],
        shutdown,
    )
    .unwrap();
    let engine = Engine::new(aggregator.store().clone());
    let state_at = |ts: i64| {
        manager.evaluate_at(ts);
        let alerts = manager.active_alerts();
        assert!(alerts.len() <= 1, "{alerts:?}");
        alerts.into_iter().next()
    };

    assert_eq!(state_at(t0 + 4 * MINUTE), None, "70 C is fine");
    let pending = state_at(t0 + 5 * MINUTE).expect("pending as soon as it is hot");
    assert_eq!(pending.state, AlertState::Pending);
    assert_eq!(pending.active_at_ms, t0 + 5 * MINUTE);
    assert_eq!(
        state_at(t0 + 6 * MINUTE).unwrap().state,
        AlertState::Pending,
        "1 minute < for: 2m"
    );
    let firing = state_at(t0 + 7 * MINUTE).unwrap();
    assert_eq!(firing.state, AlertState::Firing, "2 minutes = for");
    assert_eq!(firing.fired_at_ms, Some(t0 + 7 * MINUTE));
    assert_eq!(label(&firing.labels, "alertname"), "Hot");
    assert_eq!(label(&firing.labels, "severity"), "critical");
    assert_eq!(label(&firing.labels, "where"), "gpu-a/3");
    assert_eq!(label(&firing.labels, "node"), "gpu-a");
    assert_eq!(
        firing.annotations,
        [(
            "summary".to_string(),
            "GPU 3 on gpu-a is at 95 C (limit 90, test)".to_string()
        )]
    );

    // ALERTS and ALERTS_FOR_STATE are stored and queryable like any series.
    let alerts = floats(
        engine
            .instant(
                "ALERTS{alertname=\"Hot\", alertstate=\"firing\"}",
                t0 + 7 * MINUTE,
            )
            .unwrap(),
    );
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(label(&alerts[0].0, "node"), "gpu-a");
    assert_eq!(label(&alerts[0].0, "severity"), "critical");
    assert_eq!(alerts[0].1, 1.0);
    let for_state = floats(
        engine
            .instant("ALERTS_FOR_STATE{alertname=\"Hot\"}", t0 + 7 * MINUTE)
            .unwrap(),
    );
    assert_eq!(for_state.len(), 1);
    assert_eq!(for_state[0].1, ((t0 + 5 * MINUTE) / 1000) as f64);

    // Back to 70 C at +15m: keep_firing_for holds it 3 more minutes, then it resolves.
    for minute in 8..=15 {
        assert_eq!(
            state_at(t0 + minute * MINUTE).unwrap().state,
            AlertState::Firing,
            "minute {minute}"
        );
    }
    let kept = state_at(t0 + 17 * MINUTE).unwrap();
    assert_eq!(kept.state, AlertState::Firing, "keep_firing_for");
    assert_eq!(kept.keep_firing_since_ms, Some(t0 + 15 * MINUTE));
    assert_eq!(
        state_at(t0 + 18 * MINUTE),
        None,
        "resolved after keep_firing_for"
    );
    let history = manager.history().query(t0, now);
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].started_at_ms, t0 + 7 * MINUTE);
    assert_eq!(history[0].ended_at_ms, Some(t0 + 18 * MINUTE));
    assert_eq!(history[0].peak_value, 95.0);
    // A resolved alert is no longer written to ALERTS: the last sample is from the last
    // firing evaluation, and the evaluation that resolved it wrote a staleness marker, so the
    // series is gone at once rather than 5 minutes later (as in Prometheus).
    let last_firing = floats(
        engine
            .instant(
                "timestamp(ALERTS{alertname=\"Hot\", alertstate=\"firing\"})",
                t0 + 17 * MINUTE + 30_000,
            )
            .unwrap(),
    );
    assert_eq!(
        last_firing[0].1,
        ((t0 + 17 * MINUTE) / 1000) as f64,
        "the last ALERTS sample is from the last firing evaluation"
    );
    for query in [
        "ALERTS{alertname=\"Hot\"}",
        "ALERTS_FOR_STATE{alertname=\"Hot\"}",
    ] {
        assert!(
            floats(engine.instant(query, t0 + 18 * MINUTE).unwrap()).is_empty(),
            "{query} is stale once resolved"
        );
    }
    // The pending series ended when the alert fired.
    assert!(
        floats(
            engine
                .instant(
                    "ALERTS{alertname=\"Hot\", alertstate=\"pending\"}",
                    t0 + 7 * MINUTE,
                )
                .unwrap()
        )
        .is_empty()
    );
    assert_eq!(
        floats(
            engine
                .instant(
                    "count_over_time(ALERTS{alertname=\"Hot\", alertstate=\"firing\"}[30m])",
                    t0 + 30 * MINUTE,
                )
                .unwrap()
        )[0]
        .1,
        10.0,
        "firing samples at minutes 7-15 and 17; range functions skip the marker"
    );
    aggregator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn for_timers_survive_a_restart_through_alerts_for_state() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = common::start(&common::plaintext_config(dir.path())).await;
    let t0 = common::now_ms() / 1000 * 1000 - 20 * MINUTE;
    let times: Vec<i64> = (0..=20 * 4).map(|k| t0 + k * 15_000).collect();
    let mut data = NodeData::new("gpu-b");
    data.gauge(
        "vigil_gpu_temperature_celsius",
        &[("gpu", "0")],
        &times,
        |_| Some(99.0),
    );
    data.send(&aggregator, t0).await;
    let rule_file = dir.path().join("rules.yml");
    std::fs::write(
        &rule_file,
        "groups:\n  - name: g\n    rules:\n      - alert: Hot\n        expr: vigil_gpu_temperature_celsius > 90\n        for: 10m\n",
    )
    .unwrap();
    let (_stop, shutdown) = watch::channel(false);
    let first = manager_for(
        &aggregator,
        dir.path().join("first").as_path(),
        config_with(&[&rule_file]),
        &[],
        shutdown.clone(),
    )
    .unwrap();
    for minute in 0..=4 {
        first.evaluate_at(t0 + minute * MINUTE);
    }
    assert_eq!(first.active_alerts()[0].state, AlertState::Pending);
    drop(first);

    // A new manager (an aggregator restart) picks the timer up where it was.
    let second = manager_for(
        &aggregator,
        dir.path().join("second").as_path(),
        config_with(&[&rule_file]),
        &[],
        shutdown,
    )
    .unwrap();
    second.evaluate_at(t0 + 6 * MINUTE);
    let alert = second.active_alerts().remove(0);
    assert_eq!(alert.state, AlertState::Pending);
    assert_eq!(
        alert.active_at_ms, t0,
        "activeAt restored from ALERTS_FOR_STATE"
    );
    second.evaluate_at(t0 + 10 * MINUTE);
    assert_eq!(
        second.active_alerts()[0].state,
        AlertState::Firing,
        "10 minutes after the condition began, not after the restart"
    );
    aggregator.shutdown().await;
}

// ----- The shipped catalog ---------------------------------------------------------------------

/// The GPU series of a healthy GPU node (overridden per scenario).
struct Gpu {
    utilization: Box<dyn Fn(i64) -> Option<f64>>,
    temperature: Box<dyn Fn(i64) -> Option<f64>>,
    memory_used_ratio: Box<dyn Fn(i64) -> Option<f64>>,
    thermal_throttle: Box<dyn Fn(i64) -> Option<f64>>,
    remap_failed: Box<dyn Fn(i64) -> Option<f64>>,
    ecc_uncorrected: Box<dyn Fn(i64) -> Option<f64>>,
    xid_79: Option<Box<dyn Fn(i64) -> Option<f64>>>,
    server_on_gpu: bool,
    until: i64,
}

impl Gpu {
    fn healthy(until: i64) -> Gpu {
        Gpu {
            utilization: Box::new(|_| Some(0.6)),
            temperature: Box::new(|_| Some(70.0)),
            memory_used_ratio: Box::new(|_| Some(0.5)),
            thermal_throttle: Box::new(|_| Some(0.0)),
            remap_failed: Box::new(|_| Some(0.0)),
            ecc_uncorrected: Box::new(|_| Some(0.0)),
            xid_79: None,
            server_on_gpu: true,
            until,
        }
    }

    fn add(self, data: &mut NodeData, times: &[i64]) {
        let uuid = format!("GPU-{}", data.node);
        let gpu: Vec<(&str, &str)> = vec![
            ("gpu", "0"),
            ("uuid", &uuid),
            ("model", "NVIDIA H100"),
            ("pci_bus_id", "00000000:01:00.0"),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut labels = gpu.clone();
            labels.extend_from_slice(extra);
            labels
        };
        let until = self.until;
        let live = move |f: &dyn Fn(i64) -> Option<f64>, t: i64| {
            if t <= until { f(t) } else { None }
        };
        let total = 80e9;
        data.gauge("vigil_gpu_up", &gpu, times, |t| (t <= until).then_some(1.0));
        data.gauge("vigil_gpu_utilization_ratio", &gpu, times, |t| {
            live(&*self.utilization, t)
        });
        data.gauge("vigil_gpu_temperature_celsius", &gpu, times, |t| {
            live(&*self.temperature, t)
        });
        data.gauge("vigil_gpu_memory_total_bytes", &gpu, times, |t| {
            (t <= until).then_some(total)
        });
        data.gauge("vigil_gpu_memory_used_bytes", &gpu, times, |t| {
            live(&*self.memory_used_ratio, t).map(|r| r * total)
        });
        data.gauge(
            "vigil_gpu_throttle_reason",
            &with(&[("reason", "hw_thermal_slowdown")]),
            times,
            |t| live(&*self.thermal_throttle, t),
        );
        // An idle GPU reports gpu_idle: not a throttling alert.
        data.gauge(
            "vigil_gpu_throttle_reason",
            &with(&[("reason", "gpu_idle")]),
            times,
            |t| (t <= until).then_some(1.0),
        );
        data.gauge("vigil_gpu_row_remap_failed", &gpu, times, |t| {
            live(&*self.remap_failed, t)
        });
        data.gauge(
            "vigil_gpu_ecc_errors_total",
            &with(&[("type", "uncorrected"), ("counter", "volatile")]),
            times,
            |t| live(&*self.ecc_uncorrected, t),
        );
        data.gauge(
            "vigil_gpu_ecc_errors_total",
            &with(&[("type", "corrected"), ("counter", "volatile")]),
            times,
            |t| (t <= until).then_some(12.0),
        );
        data.gauge(
            "vigil_gpu_ecc_error_events_total",
            &with(&[("type", "double_bit")]),
            times,
            |t| (t <= until).then_some(0.0),
        );
        if let Some(xid) = &self.xid_79 {
            data.gauge(
                "vigil_gpu_xid_errors_total",
                &with(&[("xid", "79")]),
                times,
                |t| live(&**xid, t),
            );
        }
        if self.server_on_gpu {
            data.gauge(
                "vigil_gpu_process_memory_used_bytes",
                &with(&[
                    ("pid", "4242"),
                    ("comm", "tritonserver"),
                    ("server", "triton"),
                ]),
                times,
                |t| (t <= until).then_some(20e9),
            );
        }
    }
}

/// Syscall latency histograms of one server: `per_step` calls per sample, at `slow(t)`'s
/// latency (20 µs normally, 200 µs when slow).
fn add_syscalls(data: &mut NodeData, times: &[i64], slow: impl Fn(i64) -> bool) {
    use vigil_agent_common::histogram::bucket_index;
    let id = data.declare(
        "vigil_syscall_latency_seconds",
        &[
            ("server", "vllm"),
            ("syscall", "read"),
            ("pid", "77"),
            ("comm", "vllm"),
        ],
        MetricType::Histogram,
    );
    let fast = bucket_index(20_000) as u32;
    let slow_bucket = bucket_index(200_000) as u32;
    let per_step = 1_000u64;
    let (mut fast_count, mut slow_count, mut sum) = (0u64, 0u64, 0.0f64);
    for &t in times {
        if slow(t) {
            slow_count += per_step;
            sum += per_step as f64 * 200e-6;
        } else {
            fast_count += per_step;
            sum += per_step as f64 * 20e-6;
        }
        let mut buckets = vec![(fast, fast_count)];
        if slow_count > 0 {
            buckets.push((slow_bucket, slow_count));
        }
        buckets.retain(|(_, count)| *count > 0);
        data.histograms.push((id, t, buckets, sum));
    }
}

/// A model-server process alive over `[from, to]`, started at `started`.
fn add_process(
    data: &mut NodeData,
    times: &[i64],
    pid: &str,
    server: &str,
    started: i64,
    (from, to): (i64, i64),
    rss: impl Fn(i64) -> f64,
) {
    let labels = [("pid", pid), ("comm", server), ("server", server)];
    data.gauge("vigil_process_start_time_seconds", &labels, times, |t| {
        (from..=to).contains(&t).then_some((started / 1000) as f64)
    });
    data.gauge("vigil_process_resident_memory_bytes", &labels, times, |t| {
        (from..=to).contains(&t).then(|| rss(t))
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_catalog_alert_fires_on_data_that_should_trigger_it_and_only_there() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = common::start(&common::plaintext_config(dir.path())).await;
    let end = common::now_ms() / 15_000 * 15_000;
    let start = end - 80 * MINUTE;
    let times: Vec<i64> = (0..=80 * 4).map(|k| start + k * 15_000).collect();
    let day = 24 * 60 * MINUTE;
    let after = |from: i64, value: f64, before: f64| {
        Box::new(move |t: i64| Some(if t >= from { value } else { before }))
            as Box<dyn Fn(i64) -> Option<f64>>
    };

    // (node, GPU, syscalls slow from, processes, CPU pressure from, spool growth (unacked), last sample)
    let mut nodes: Vec<NodeData> = Vec::new();
    let mut node = |name: &str, gpu: Option<Gpu>, build: &dyn Fn(&mut NodeData)| {
        let mut data = NodeData::new(name);
        if let Some(gpu) = gpu {
            gpu.add(&mut data, &times);
        }
        build(&mut data);
        nodes.push(data);
    };
    let heartbeat = |data: &mut NodeData, until: i64| {
        data.gauge("vigil_agent_spool_bytes", &[], &times, |t| {
            (t <= until).then_some(0.0)
        });
        data.gauge("vigil_agent_spool_unacked_batches", &[], &times, |t| {
            (t <= until).then_some(0.0)
        });
    };
    let pressure = |data: &mut NodeData, from: Option<i64>| {
        data.gauge(
            "vigil_host_pressure_cpu_full_seconds_total",
            &[],
            &times,
            |t| {
                let base = 0.01 * (t - start) as f64 / 1000.0;
                Some(match from {
                    Some(from) if t >= from => base + 0.3 * (t - from) as f64 / 1000.0,
                    _ => base,
                })
            },
        );
    };

    node("n-ok", Some(Gpu::healthy(end)), &|data| {
        heartbeat(data, end);
        pressure(data, None);
        add_syscalls(data, &times, |_| false);
        add_process(
            data,
            &times,
            "400",
            "triton",
            end - day,
            (start, end),
            |_| 4e9,
        );
    });
    let gpu = |f: &dyn Fn(&mut Gpu)| {
        let mut gpu = Gpu::healthy(end);
        f(&mut gpu);
        Some(gpu)
    };
    let just_gpu = |data: &mut NodeData| heartbeat(data, end);
    node(
        "n-xid",
        gpu(&|g| g.xid_79 = Some(Box::new(move |t| (t >= end - 3 * MINUTE).then_some(1.0)))),
        &just_gpu,
    );
    node(
        "n-xid-old",
        gpu(&|g| g.xid_79 = Some(Box::new(move |t| (t >= end - 40 * MINUTE).then_some(1.0)))),
        &just_gpu,
    );
    node(
        "n-ecc",
        gpu(&|g| g.ecc_uncorrected = after(end - 4 * MINUTE, 2.0, 0.0)),
        &just_gpu,
    );
    node(
        "n-remap",
        gpu(&|g| g.remap_failed = after(end - 2 * MINUTE, 1.0, 0.0)),
        &just_gpu,
    );
    node(
        "n-hot",
        gpu(&|g| g.temperature = after(end - 5 * MINUTE, 90.0, 70.0)),
        &just_gpu,
    );
    node(
        "n-warm",
        gpu(&|g| g.temperature = after(end - MINUTE, 90.0, 70.0)),
        &just_gpu,
    );
    node(
        "n-throttle",
        gpu(&|g| g.thermal_throttle = after(end - 10 * MINUTE, 1.0, 0.0)),
        &just_gpu,
    );
    node(
        "n-mem",
        gpu(&|g| g.memory_used_ratio = after(end - 10 * MINUTE, 0.97, 0.5)),
        &just_gpu,
    );
    node(
        "n-idle",
        gpu(&|g| g.utilization = Box::new(|_| Some(0.01))),
        &just_gpu,
    );
    node(
        "n-idle-noserver",
        gpu(&|g| {
            g.utilization = Box::new(|_| Some(0.01));
            g.server_on_gpu = false;
        }),
        &just_gpu,
    );
    node("n-slow", gpu(&|_| {}), &|data| {
        heartbeat(data, end);
        add_syscalls(data, &times, |t| t >= end - 8 * MINUTE);
    });
    node("n-leak", gpu(&|_| {}), &|data| {
        heartbeat(data, end);
        let growth_from = end - 50 * MINUTE;
        add_process(
            data,
            &times,
            "100",
            "triton",
            end - day,
            (start, end),
            |t| 1e9 + (t - growth_from).max(0) as f64 / 3_600_000.0 * 200.0 * 1024.0 * 1024.0,
        );
    });
    node("n-crash", gpu(&|_| {}), &|data| {
        heartbeat(data, end);
        for k in 0..7 {
            let started = end - 14 * MINUTE + k * 2 * MINUTE;
            let to = if k == 6 {
                end
            } else {
                started + 2 * MINUTE - 15_000
            };
            add_process(
                data,
                &times,
                &format!("{}", 200 + k),
                "torchserve",
                started,
                (started, to),
                |_| 2e9,
            );
        }
    });
    node("n-rolling", gpu(&|_| {}), &|data| {
        heartbeat(data, end);
        for k in 0..4 {
            add_process(
                data,
                &times,
                &format!("{}", 300 + k),
                "torchserve",
                end - day,
                (start, end - 10 * MINUTE),
                |_| 2e9,
            );
            add_process(
                data,
                &times,
                &format!("{}", 310 + k),
                "torchserve",
                end - 10 * MINUTE,
                (end - 10 * MINUTE, end),
                |_| 2e9,
            );
        }
    });
    node("n-cpu", gpu(&|_| {}), &|data| {
        heartbeat(data, end);
        pressure(data, Some(end - 10 * MINUTE));
    });
    node("n-cpu-nogpu", None, &|data| {
        heartbeat(data, end);
        pressure(data, Some(end - 10 * MINUTE));
    });
    node("n-silent", Some(Gpu::healthy(end - 3 * MINUTE)), &|data| {
        heartbeat(data, end - 3 * MINUTE);
    });
    for (name, unacked) in [("n-spool", 150.0), ("n-spool-small", 20.0)] {
        node(name, None, &|data| {
            let from = end - 10 * MINUTE;
            data.gauge("vigil_agent_spool_bytes", &[], &times, |t| {
                Some(10_000.0 * (t - from).max(0) as f64 / 1000.0)
            });
            data.gauge("vigil_agent_spool_unacked_batches", &[], &times, |t| {
                Some(if t >= from { unacked } else { 0.0 })
            });
        });
    }
    for data in nodes {
        data.send(&aggregator, start).await;
    }

    let (_stop, shutdown) = watch::channel(false);
    let manager = manager_for(
        &aggregator,
        dir.path(),
        config_with(&[&catalog_path()]),
        &[],
        shutdown,
    )
    .unwrap();
    let evaluate = {
        let manager = manager.clone();
        tokio::task::spawn_blocking(move || {
            // Every minute over the last 75 (the syscall baseline needs an hour of its
            // recorded p99).
            for minute in (0..=75).rev() {
                manager.evaluate_at(end - minute * MINUTE);
            }
        })
    };
    evaluate.await.unwrap();

    for group in manager.groups() {
        for rule in &group.rules {
            assert_eq!(
                rule.health.last_error, None,
                "{} failed to evaluate",
                rule.rule.name
            );
        }
    }
    let mut firing: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut pending: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for alert in manager.active_alerts() {
        let into = match alert.state {
            AlertState::Firing => &mut firing,
            _ => &mut pending,
        };
        into.entry(label(&alert.labels, "alertname").to_owned())
            .or_default()
            .insert(label(&alert.labels, "node").to_owned());
    }
    let mut ever: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for record in manager.history().query(start, end) {
        ever.entry(label(&record.labels, "alertname").to_owned())
            .or_default()
            .insert(label(&record.labels, "node").to_owned());
    }
    let set = |nodes: &[&str]| nodes.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
    let expected: &[(&str, &[&str], &[&str])] = &[
        // (alert, firing at the end, fired at some point)
        ("GPUXidError", &["n-xid"], &["n-xid", "n-xid-old"]),
        ("GPUUncorrectableECCError", &["n-ecc"], &["n-ecc"]),
        ("GPURowRemapFailure", &["n-remap"], &["n-remap"]),
        ("GPUTemperatureHigh", &["n-hot"], &["n-hot"]),
        ("GPUThrottling", &["n-throttle"], &["n-throttle"]),
        ("GPUMemoryNearlyFull", &["n-mem"], &["n-mem"]),
        ("GPUIdleWhileServing", &["n-idle"], &["n-idle"]),
        ("ModelServerSyscallLatencyHigh", &["n-slow"], &["n-slow"]),
        ("ModelServerMemoryLeak", &["n-leak"], &["n-leak"]),
        ("ModelServerRestarting", &["n-crash"], &["n-crash"]),
        ("NodeCPUPressureHigh", &["n-cpu"], &["n-cpu"]),
        ("AgentSilent", &["n-silent"], &["n-silent"]),
        ("AgentSpoolGrowing", &["n-spool"], &["n-spool"]),
    ];
    for (alert, at_end, fired) in expected {
        assert_eq!(
            firing.get(*alert).cloned().unwrap_or_default(),
            set(at_end),
            "{alert}: nodes firing at the end"
        );
        assert_eq!(
            ever.get(*alert).cloned().unwrap_or_default(),
            set(fired),
            "{alert}: nodes that ever fired"
        );
    }
    assert_eq!(
        firing.len(),
        expected.len(),
        "no other alert fires: {firing:?}"
    );
    // Two minutes of a hot GPU but only one of them at the limit: pending, not firing.
    assert_eq!(
        pending
            .get("GPUTemperatureHigh")
            .cloned()
            .unwrap_or_default(),
        set(&["n-warm"])
    );
    // The annotations are rendered from the alert's labels and value.
    let summary = |alertname: &str| {
        let alert = manager
            .active_alerts()
            .into_iter()
            .find(|a| label(&a.labels, "alertname") == alertname)
            .unwrap();
        alert
            .annotations
            .iter()
            .find(|(name, _)| name == "summary")
            .unwrap()
            .1
            .clone()
    };
    assert_eq!(summary("GPUTemperatureHigh"), "GPU 0 on n-hot at 90 C");
    assert_eq!(
        summary("GPUMemoryNearlyFull"),
        "GPU 0 on n-mem memory 97% full"
    );
    assert_eq!(
        summary("AgentSilent"),
        "No data from the agent on n-silent for 3m 0s"
    );
    assert_eq!(summary("GPUXidError"), "GPU 0 on n-xid reported XID 79");
    // The XID that happened 40 minutes ago fired and resolved.
    let old_xid = manager
        .history()
        .query(start, end)
        .into_iter()
        .find(|r| label(&r.labels, "node") == "n-xid-old")
        .unwrap();
    assert!(old_xid.ended_at_ms.is_some_and(|e| e < end), "{old_xid:?}");
    assert_eq!(label(&old_xid.labels, "xid"), "79");
    assert_eq!(label(&old_xid.labels, "severity"), "critical");
    aggregator.shutdown().await;
}

// ----- Webhooks --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_get_the_json_and_failures_are_retried_without_blocking_evaluation() {
    use axum::{Router, extract::State, http::StatusCode, routing::post};

    #[derive(Clone, Default)]
    struct Receiver {
        calls: Arc<Mutex<Vec<String>>>,
    }
    async fn hook(State(receiver): State<Receiver>, body: String) -> StatusCode {
        let mut calls = receiver.calls.lock().unwrap();
        calls.push(body);
        // The first two attempts fail as a receiver that is restarting would.
        if calls.len() <= 2 {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        }
    }
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    // A port nobody listens on: delivery fails for good.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);

    let dir = tempfile::tempdir().unwrap();
    let aggregator = common::start(&common::plaintext_config(dir.path())).await;
    let rule_file = dir.path().join("rules.yml");
    std::fs::write(
        &rule_file,
        "groups:\n  - name: g\n    rules:\n      - alert: Always\n        expr: vector(42)\n        labels: {severity: info}\n        annotations: {summary: 'value {{ $value }}'}\n",
    )
    .unwrap();
    let webhook = |url: String, retries: u32| WebhookConfig {
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        max_retries: retries,
        timeout: Duration::from_secs(2),
        ..WebhookConfig::new(&url)
    };
    let (stop, shutdown) = watch::channel(false);
    let manager = manager_for(
        &aggregator,
        dir.path(),
        config_with(&[&rule_file]),
        &[
            webhook(format!("http://{hook_addr}/hook"), 5),
            webhook(format!("http://{dead_addr}/hook"), 2),
        ],
        shutdown,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let first = common::now_ms();
    manager.evaluate_at(first);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "evaluation does not wait for deliveries"
    );

    let body = wait_for("the webhook delivery", 20, async || {
        let calls = receiver.calls.lock().unwrap();
        (calls.len() >= 3).then(|| calls[2].clone())
    })
    .await;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["status"], "firing");
    let alert = &json["alerts"][0];
    assert_eq!(alert["status"], "firing");
    assert_eq!(alert["labels"]["alertname"], "Always");
    assert_eq!(alert["labels"]["severity"], "info");
    assert_eq!(alert["labels"]["cluster"], "test", "external labels");
    assert_eq!(alert["annotations"]["summary"], "value 42");
    assert!(alert["startsAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        alert["generatorURL"],
        "http://vigil.test/api/v1/rules?alert=Always"
    );

    let stats = |index: usize| {
        let stats = manager.notifier().stats();
        let (_, _, s) = stats[index];
        use std::sync::atomic::Ordering::Relaxed;
        (
            s.sent.load(Relaxed),
            s.errors.load(Relaxed),
            s.failed.load(Relaxed),
        )
    };
    // Two failed attempts, then delivered.
    wait_for("the delivery to be counted", 20, async || {
        (stats(0) == (1, 2, 0)).then_some(())
    })
    .await;
    wait_for("the dead webhook to give up", 20, async || {
        (stats(1) == (0, 3, 1)).then_some(())
    })
    .await;
    let mut metrics = String::new();
    manager.write_metrics(&mut metrics);
    assert!(
        metrics.contains(&format!(
            "vigil_aggregator_notifications_failed_total{{kind=\"webhook\",url=\"http://{dead_addr}/hook\"}} 1"
        )),
        "{metrics}"
    );
    // Firing alerts are sent again once per resend interval (1 minute by default), not at
    // every evaluation.
    manager.evaluate_at(first + 10_000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        receiver.calls.lock().unwrap().len(),
        3,
        "not resent within the interval"
    );
    manager.evaluate_at(first + 61_000);
    let resent = wait_for("the resend", 20, async || {
        let calls = receiver.calls.lock().unwrap();
        (calls.len() >= 4).then(|| calls[3].clone())
    })
    .await;
    let resent: serde_json::Value = serde_json::from_str(&resent).unwrap();
    assert_eq!(resent["alerts"][0]["labels"]["alertname"], "Always");
    assert_eq!(resent["alerts"][0]["status"], "firing");

    let _ = stop.send(true);
    aggregator.shutdown().await;
}

// ----- A real Alertmanager ---------------------------------------------------------------------

struct Alertmanager {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_alertmanager() -> Alertmanager {
    let binary = "/usr/bin/prometheus-alertmanager";
    assert!(
        Path::new(binary).exists(),
        "{binary} is missing: install Debian's prometheus-alertmanager (cargo xtask setup)"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("alertmanager.yml");
    std::fs::write(
        &config,
        "route:\n  receiver: 'null'\n  group_wait: 1s\n  group_interval: 1s\nreceivers:\n  - name: 'null'\n",
    )
    .unwrap();
    let port = free_port();
    let child = Command::new(binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus-alertmanager");
    let alertmanager = Alertmanager {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    };
    let ready = format!("{}/-/ready", alertmanager.url);
    wait_for("Alertmanager to be ready", 30, async || {
        let response = reqwest::get(&ready).await.ok()?;
        response.status().is_success().then_some(())
    })
    .await;
    alertmanager
}

/// `amtool alert query` output (active alerts) for one alert name.
fn amtool_query(url: &str, alertname: &str) -> String {
    let output = Command::new("/usr/bin/amtool")
        .args([
            "alert",
            "query",
            &format!("--alertmanager.url={url}"),
            &format!("alertname={alertname}"),
        ])
        .output()
        .expect("run /usr/bin/amtool (Debian's prometheus-alertmanager)");
    assert!(
        output.status.success(),
        "amtool failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_a_real_alertmanager_and_resolve_there() {
    let alertmanager = start_alertmanager().await;
    let dir = tempfile::tempdir().unwrap();
    let rule_file = dir.path().join("rules.yml");
    std::fs::write(
        &rule_file,
        r#"groups:
  - name: e2e
    interval: 1s
    rules:
      - alert: VigilE2EHot
        expr: vigil_gpu_temperature_celsius > 90
        labels:
          severity: critical
        annotations:
          summary: "GPU {{ $labels.gpu }} on {{ $labels.node }} at {{ $value }} C"
"#,
    )
    .unwrap();
    let mut config = common::plaintext_config(dir.path());
    config.http.listen = Some("127.0.0.1:0".parse().unwrap());
    config.alerting = AlertingConfig {
        rule_files: vec![rule_file.display().to_string()],
        evaluation_interval: Duration::from_secs(1),
        resend_interval: Duration::from_secs(1),
        file_check_interval: Duration::from_millis(200),
        external_labels: BTreeMap::from([("cluster".into(), "e2e".into())]),
        alertmanager: vec![vigil_aggregator::alerting::AlertmanagerConfig::new(
            &alertmanager.url,
        )],
        ..AlertingConfig::default()
    };
    let aggregator = common::start(&config).await;
    let http = format!("http://{}", aggregator.http_addr().unwrap());
    let mut stream = common::open_plaintext(&aggregator, common::hello("e2e-node", "a1")).await;
    let declaration = common::declare(
        1,
        "vigil_gpu_temperature_celsius",
        &[("gpu", "2")],
        MetricType::Gauge,
    );
    let rejections = stream
        .store(common::batch(
            1,
            vec![declaration],
            vec![common::sample(1, 0, 96.0)],
        ))
        .await;
    assert!(rejections.is_empty(), "{rejections:?}");

    // It fires and arrives: amtool sees it, and the v2 API has its labels and annotations.
    let shown = wait_for("amtool to show the alert", 30, async || {
        let shown = amtool_query(&alertmanager.url, "VigilE2EHot");
        shown.contains("VigilE2EHot").then_some(shown)
    })
    .await;
    assert!(shown.contains("GPU 2 on e2e-node at 96 C"), "{shown}");
    let api = reqwest::get(format!("{}/api/v2/alerts", alertmanager.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let alerts: serde_json::Value = serde_json::from_str(&api).unwrap();
    let alert = alerts
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == "VigilE2EHot")
        .expect("the alert in /api/v2/alerts");
    assert_eq!(alert["labels"]["node"], "e2e-node");
    assert_eq!(alert["labels"]["cluster"], "e2e");
    assert_eq!(alert["labels"]["severity"], "critical");
    assert_eq!(alert["status"]["state"], "active");

    // Vigil's own API shows it, in Prometheus's shapes.
    let active: serde_json::Value = serde_json::from_str(
        &reqwest::get(format!("{http}/api/v1/alerts"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(active["status"], "success");
    let listed = &active["data"]["alerts"][0];
    assert_eq!(listed["labels"]["alertname"], "VigilE2EHot");
    assert_eq!(listed["state"], "firing");
    assert_eq!(listed["value"], "96");
    let rules_json = || async {
        let text = reqwest::get(format!("{http}/api/v1/rules"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    };
    let listed = rules_json().await;
    let rule = &listed["data"]["groups"][0]["rules"][0];
    assert_eq!(rule["name"], "VigilE2EHot");
    assert_eq!(rule["type"], "alerting");
    assert_eq!(rule["state"], "firing");
    assert_eq!(rule["health"], "ok");
    assert_eq!(listed["data"]["groups"][0]["interval"], 1.0);

    // And over gRPC.
    let mut client = AlertsClient::new(common::plaintext_channel(&aggregator).await);
    let active = client
        .active_alerts(ActiveAlertsRequest {})
        .await
        .unwrap()
        .into_inner()
        .alerts;
    assert_eq!(active.len(), 1, "{active:?}");
    assert_eq!(active[0].state, "firing");
    assert_eq!(active[0].value, 96.0);
    assert!(
        active[0]
            .labels
            .iter()
            .any(|l| l.name == "alertname" && l.value == "VigilE2EHot")
    );

    // Cooling down resolves it in Alertmanager too.
    let rejections = stream
        .store(common::batch(2, vec![], vec![common::sample(1, 0, 60.0)]))
        .await;
    assert!(rejections.is_empty(), "{rejections:?}");
    wait_for("Alertmanager to drop the resolved alert", 30, async || {
        let shown = amtool_query(&alertmanager.url, "VigilE2EHot");
        (!shown.contains("VigilE2EHot")).then_some(())
    })
    .await;
    let history: serde_json::Value = serde_json::from_str(
        &reqwest::get(format!(
            "{http}/api/v1/alerts/history?alertname=VigilE2EHot"
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap(),
    )
    .unwrap();
    let records = history["data"]["alerts"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{history}");
    assert_eq!(records[0]["peakValue"], "96");
    assert!(records[0]["endsAt"].is_string(), "{history}");
    let records = client
        .alert_history(AlertHistoryRequest {
            alertname: "VigilE2EHot".into(),
            ..AlertHistoryRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .alerts;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].peak_value, 96.0);
    assert!(
        records[0]
            .ended_at_ms
            .is_some_and(|end| end > records[0].started_at_ms)
    );
    assert!(
        client
            .active_alerts(ActiveAlertsRequest {})
            .await
            .unwrap()
            .into_inner()
            .alerts
            .is_empty()
    );

    // A broken edit of the rule file is refused; the running rules stay and keep evaluating.
    let before = rules_json().await["data"]["groups"][0]["lastEvaluation"].clone();
    std::fs::write(
        &rule_file,
        "groups:\n  - name: e2e\n    rules:\n      - alert: X\n        expr: (\n",
    )
    .unwrap();
    let listed = wait_for("the broken reload to be reported", 20, async || {
        let listed = rules_json().await;
        (listed["data"]["lastReload"]["success"] == false).then_some(listed)
    })
    .await;
    assert!(
        listed["data"]["lastReload"]["error"]
            .as_str()
            .unwrap()
            .contains("rules.yml:4"),
        "{listed}"
    );
    assert_eq!(
        listed["data"]["groups"][0]["rules"][0]["name"],
        "VigilE2EHot"
    );
    wait_for("the old rules to keep evaluating", 20, async || {
        let now = rules_json().await["data"]["groups"][0]["lastEvaluation"].clone();
        (now != before).then_some(())
    })
    .await;
    aggregator.shutdown().await;
}

// ----- The fast path ---------------------------------------------------------------------------
//
// Groups here are evaluated every minute, so an alert that arrives within seconds can only have
// come through the fast path (alerting/fast.rs): a stored batch that changed a series a
// `for`-less alert reads, or a node's data reaching an age rule's threshold.

/// `target/<profile>/NAME` (or under `deps/`): built by `cargo test --workspace`.
fn workspace_artifact(names: &[&str], build: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let candidates: Vec<PathBuf> = names
        .iter()
        .flat_map(|name| [deps.join(name), deps.parent().unwrap().join(name)])
        .collect();
    candidates
        .iter()
        .find(|path| path.exists())
        .cloned()
        .unwrap_or_else(|| {
            panic!("none of {candidates:?} exists: build it with `{build}` (`cargo test --workspace` does)")
        })
}

fn unix_ms() -> i64 {
    common::now_ms()
}

/// Polls Alertmanager's v2 API every 20 ms until an active alert matches `wanted`; the wall
/// time (ms) it was first seen.
async fn first_seen_in_alertmanager(
    url: &str,
    seconds: u64,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> i64 {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        let answer = client
            .get(format!("{url}/api/v2/alerts?active=true"))
            .send()
            .await;
        let seen_at = unix_ms();
        if let Ok(response) = answer
            && let Ok(text) = response.text().await
            && let Ok(alerts) = serde_json::from_str::<serde_json::Value>(&text)
            && alerts
                .as_array()
                .is_some_and(|list| list.iter().any(&wanted))
        {
            return seen_at;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no matching alert in Alertmanager after {seconds} s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fast_path_config(
    dir: &Path,
    rules: &str,
    alertmanager: &Alertmanager,
) -> vigil_aggregator::AggregatorConfig {
    let rule_file = dir.join("rules.yml");
    std::fs::write(&rule_file, rules).unwrap();
    let mut config = common::plaintext_config(dir);
    config.alerting = AlertingConfig {
        rule_files: vec![rule_file.display().to_string()],
        evaluation_interval: Duration::from_secs(60),
        resend_interval: Duration::from_secs(60),
        alertmanager: vec![vigil_aggregator::alerting::AlertmanagerConfig::new(
            &alertmanager.url,
        )],
        ..AlertingConfig::default()
    };
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xid_from_the_driver_reaches_alertmanager_at_once_not_at_the_group_interval() {
    let agent_binary = workspace_artifact(&["vigil-agent"], "cargo build -p vigil-agent");
    let fake_nvml = workspace_artifact(&["libfake_nvml.so"], "cargo build -p fake-nvml");
    let alertmanager = start_alertmanager().await;
    let dir = tempfile::tempdir().unwrap();
    // The catalog's GPUXidError expression, in a group evaluated once a minute.
    let config = fast_path_config(
        dir.path(),
        r#"groups:
  - name: xid
    interval: 1m
    rules:
      - alert: VigilFastXid
        expr: >-
          increase(vigil_gpu_xid_errors_total[10m]) > 0
          or (vigil_gpu_xid_errors_total unless vigil_gpu_xid_errors_total offset 10m)
        labels:
          severity: critical
"#,
        &alertmanager,
    );
    let aggregator = common::start(&config).await;

    // The stand-in driver: one GPU with XID 79 four seconds after the agent loads it.
    let driver = dir.path().join("driver");
    std::fs::create_dir_all(&driver).unwrap();
    let library = driver.join("libnvidia-ml.so.1");
    std::fs::copy(&fake_nvml, &library).unwrap();
    std::fs::write(
        driver.join("fake-nvml-scenario.json"),
        serde_json::json!({"devices": [{
            "uuid": "GPU-5a1c0d3e-0000-4000-8000-00000000fa57",
            "name": "NVIDIA H100 80GB HBM3",
            "pci_bus_id": "00000000:17:00.0",
            "memory_total_bytes": 85_520_809_984u64,
            "timeline": [{"at_s": 0, "gpu_util": 50, "temperature_c": 60}],
            "events": [{"at_s": 4.0, "type": "xid", "xid": 79}],
        }]})
        .to_string(),
    )
    .unwrap();
    let agent_config = dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "[syscalls]\nenabled = false\n[gpu]\nnvml_library = \"{}\"\n[transport]\n\
             endpoints = [\"http://{}\"]\nplaintext = true\nspool_dir = \"{}\"\n\
             interval = \"1s\"\n",
            library.display(),
            aggregator.grpc_addr(),
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let event_log = dir.path().join("nvml-events.log");
    let agent = KillOnDrop(
        Command::new(&agent_binary)
            .arg("run")
            .arg("--config")
            .arg(&agent_config)
            .env_remove("FAKE_NVML_SCENARIO")
            .env("VIGIL_FAKE_NVML_EVENT_LOG", &event_log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vigil-agent run"),
    );

    // When the driver delivered the XID (the stand-in logs `UNIX_NS GPU xid 79`).
    let delivered_ms = wait_for("the stand-in to deliver the XID", 30, async || {
        let log = std::fs::read_to_string(&event_log).ok()?;
        let line = log.lines().find(|line| line.ends_with(" xid 79"))?;
        let ns: i128 = line.split(' ').next()?.parse().ok()?;
        Some((ns / 1_000_000) as i64)
    })
    .await;
    let seen_ms = first_seen_in_alertmanager(&alertmanager.url, 30, |alert| {
        alert["labels"]["alertname"] == "VigilFastXid" && alert["labels"]["xid"] == "79"
    })
    .await;
    let latency = seen_ms - delivered_ms;
    eprintln!("XID: driver -> Alertmanager {latency} ms");
    assert!(
        (0..5_000).contains(&latency),
        "the XID reached Alertmanager {latency} ms after the driver delivered it; the group is \
         evaluated once a minute, so only the fast path gets it there within seconds"
    );

    // The agent sent it at once, in a batch of its own: the counter's first sample is stamped
    // when the event was taken, not at the next whole-second pass.
    let store = aggregator.store().clone();
    let series = store
        .series()
        .into_iter()
        .find(|s| s.name == "vigil_gpu_xid_errors_total")
        .expect("the XID counter is stored");
    let first = store.samples_of(series.id)[0].time_ms;
    assert!(
        (delivered_ms - 5..delivered_ms + 250).contains(&first) && first % 1000 != 0,
        "the XID counter's first sample is stamped {} ms after the delivery ({first}): it \
         waited for a pass",
        first - delivered_ms
    );

    // SIGTERM still stops it promptly: the collection thread waits on the health-event
    // doorbell between passes and must see the stop.
    let mut agent = agent;
    let status = Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let exited = wait_for("the agent to stop after SIGTERM", 10, async || {
        agent.0.try_wait().unwrap()
    })
    .await;
    assert!(exited.success(), "the agent exited with {exited}");
    aggregator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_reaches_alertmanager_within_the_threshold_plus_3_s() {
    let alertmanager = start_alertmanager().await;
    let dir = tempfile::tempdir().unwrap();
    // The catalog's recording and AgentSilent, with a 5 s threshold, evaluated once a minute.
    let config = fast_path_config(
        dir.path(),
        r#"groups:
  - name: agents
    interval: 1m
    rules:
      - record: vigil:agent_last_seen_timestamp_seconds
        expr: max by (node) (timestamp(vigil_agent_spool_bytes))
      - alert: VigilFastSilent
        expr: >-
          time() - max by (node) (max_over_time(vigil:agent_last_seen_timestamp_seconds[1h]))
            > 5
        labels:
          severity: critical
"#,
        &alertmanager,
    );
    let aggregator = common::start(&config).await;
    let mut stream = common::open_plaintext(&aggregator, common::hello("quiet-node", "a1")).await;
    let mut last_ms = 0;
    for sequence in 1..=6u64 {
        let declarations = if sequence == 1 {
            vec![common::declare(
                1,
                "vigil_agent_spool_bytes",
                &[],
                MetricType::Gauge,
            )]
        } else {
            Vec::new()
        };
        let batch = common::batch(sequence, declarations, vec![common::sample(1, 0, 4096.0)]);
        last_ms = batch.base_time_ms;
        let rejections = stream.store(batch).await;
        assert!(rejections.is_empty(), "{rejections:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(stream);
    let seen_ms = first_seen_in_alertmanager(&alertmanager.url, 30, |alert| {
        alert["labels"]["alertname"] == "VigilFastSilent" && alert["labels"]["node"] == "quiet-node"
    })
    .await;
    let after_threshold = seen_ms - (last_ms + 5_000);
    eprintln!("agent silent: threshold -> Alertmanager {after_threshold} ms");
    assert!(
        (0..3_000).contains(&after_threshold),
        "AgentSilent reached Alertmanager {after_threshold} ms after the node's 5 s threshold \
         passed (the group is evaluated once a minute; the deadline evaluation should get it \
         there within 3 s, and never before the threshold)"
    );
    aggregator.shutdown().await;
}
