//! Remote-write export against real receivers: Prometheus (`--web.enable-remote-write-receiver`)
//! and VictoriaMetrics, both started here on free loopback ports. Every sample ingested over
//! gRPC must land in both with the right labels, timestamps and values; a target that is down
//! gets everything once it is up (across an aggregator restart); a target answering 400 has
//! its samples dropped and counted, without retries.

mod common;

use std::{
    collections::BTreeMap,
    net::TcpListener as StdListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use common::*;
use vigil_aggregator::{
    AggregatorConfig, RunningAggregator, config::RemoteWriteConfig, export::prompb,
    storage::query_view::le_label,
};
use vigil_proto::v1::{Batch, Histogram, MetricType};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const VICTORIA_METRICS: &str = "/usr/bin/victoria-metrics";

/// Labels (sorted, `__name__` included) -> samples (ms, value), oldest first.
type Landed = BTreeMap<Vec<(String, String)>, Vec<(i64, f64)>>;

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when the test ends, however it ends.
struct Server {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn spawn(name: &'static str, program: &str, args: &[String], dir: &Path) -> Server {
        assert!(
            Path::new(program).exists(),
            "{program} is missing: install it (cargo xtask setup)"
        );
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Server {
            child,
            name,
            log: dir.join(format!("{name}.err")),
        }
    }

    /// Waits until `url` answers 200.
    async fn wait_ready(&mut self, url: &str) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = client.get(url).send().await
                && response.status().is_success()
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before it was ready: {}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready at {url} after 60 s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn start_prometheus(dir: &Path) -> (Server, u16) {
    let port = free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(&config, "global:\n  scrape_interval: 1m\n").unwrap();
    let data = dir.join("prometheus-data");
    let args = vec![
        "--web.enable-remote-write-receiver".to_string(),
        format!("--storage.tsdb.path={}", data.display()),
        format!("--web.listen-address=127.0.0.1:{port}"),
        format!("--config.file={}", config.display()),
    ];
    let mut server = Server::spawn("prometheus", PROMETHEUS, &args, dir);
    server
        .wait_ready(&format!("http://127.0.0.1:{port}/-/ready"))
        .await;
    (server, port)
}

async fn start_victoria_metrics(dir: &Path, port: u16) -> Server {
    let args = vec![
        format!("-storageDataPath={}", dir.join("vm-data").display()),
        format!("-httpListenAddr=127.0.0.1:{port}"),
    ];
    let mut server = Server::spawn("victoria-metrics", VICTORIA_METRICS, &args, dir);
    server
        .wait_ready(&format!("http://127.0.0.1:{port}/health"))
        .await;
    server
}

fn sorted(labels: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut labels: Vec<_> = labels.into_iter().collect();
    labels.sort();
    labels
}

fn labels_of_json(metric: &serde_json::Value) -> Vec<(String, String)> {
    sorted(
        metric
            .as_object()
            .expect("metric is an object")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())),
    )
}

/// Every raw sample of the `vigil_rwtest_*` series Prometheus holds.
async fn prometheus_samples(port: u16) -> Landed {
    let response = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/api/v1/query"))
        .query(&[("query", "{__name__=~\"vigil_rwtest_.*\"}[1h]")])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let response: serde_json::Value = serde_json::from_str(&response).unwrap();
    assert_eq!(response["status"], "success", "{response}");
    let mut landed = Landed::new();
    for series in response["data"]["result"].as_array().unwrap() {
        let samples = series["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|pair| {
                let seconds = pair[0].as_f64().unwrap();
                let value: f64 = pair[1].as_str().unwrap().parse().unwrap();
                ((seconds * 1000.0).round() as i64, value)
            })
            .collect();
        landed.insert(labels_of_json(&series["metric"]), samples);
    }
    landed
}

/// Every raw sample of the `vigil_rwtest_*` series VictoriaMetrics holds (after a flush).
async fn victoria_samples(port: u16) -> Landed {
    let client = reqwest::Client::new();
    let flush = client
        .get(format!("http://127.0.0.1:{port}/internal/force_flush"))
        .send()
        .await
        .unwrap();
    assert!(
        flush.status().is_success(),
        "force_flush: {}",
        flush.status()
    );
    let text = client
        .get(format!("http://127.0.0.1:{port}/api/v1/export"))
        .query(&[("match[]", "{__name__=~\"vigil_rwtest_.*\"}")])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut landed = Landed::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let series: serde_json::Value = serde_json::from_str(line).unwrap();
        let values = series["values"].as_array().unwrap();
        let times = series["timestamps"].as_array().unwrap();
        let mut samples: Vec<(i64, f64)> = times
            .iter()
            .zip(values)
            .map(|(t, v)| (t.as_i64().unwrap(), v.as_f64().unwrap()))
            .collect();
        samples.sort_by_key(|(t, _)| *t);
        landed
            .entry(labels_of_json(&series["metric"]))
            .or_default()
            .extend(samples);
    }
    landed
}

fn same(landed: &Landed, expected: &Landed) -> bool {
    landed.len() == expected.len()
        && landed.iter().zip(expected).all(|((l1, s1), (l2, s2))| {
            l1 == l2
                && s1.len() == s2.len()
                && s1.iter().zip(s2).all(|((t1, v1), (t2, v2))| {
                    t1 == t2 && (v1 - v2).abs() <= 1e-9 * v2.abs().max(1.0)
                })
        })
}

/// Polls `fetch` until it returns `expected` (60 s at most).
async fn wait_landed<F: Future<Output = Landed>>(
    what: &str,
    expected: &Landed,
    fetch: impl Fn() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let landed = fetch().await;
        if same(&landed, expected) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{what} does not hold what was ingested\n got: {landed:#?}\n expected: {expected:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The test workload: two GPU power gauges, a request counter and a latency histogram, one
/// batch per 10 s step, and what remote write must deliver for it.
struct Workload {
    node: String,
    base_ms: i64,
    expected: Landed,
}

impl Workload {
    fn new(node: &str) -> Workload {
        Workload {
            node: node.into(),
            // Recent (Prometheus refuses samples far behind its head), whole seconds, and in
            // the past so that steps stay before now.
            base_ms: (now_ms() / 1000 - 120) * 1000,
            expected: Landed::new(),
        }
    }

    fn expect(&mut self, name: &str, labels: &[(&str, &str)], time_ms: i64, value: f64) {
        let labels = sorted(
            [
                ("__name__".to_string(), name.to_string()),
                ("node".to_string(), self.node.clone()),
            ]
            .into_iter()
            .chain(labels.iter().map(|(k, v)| (k.to_string(), v.to_string()))),
        );
        self.expected
            .entry(labels)
            .or_default()
            .push((time_ms, value));
    }

    /// Batch `step` (1-based; step 1 declares the series).
    fn batch(&mut self, step: u64) -> Batch {
        let time_ms = self.base_ms + step as i64 * 10_000;
        let series = if step == 1 {
            vec![
                declare(
                    1,
                    "vigil_rwtest_gpu_power_watts",
                    &[("gpu", "0")],
                    MetricType::Gauge,
                ),
                declare(
                    2,
                    "vigil_rwtest_gpu_power_watts",
                    &[("gpu", "1")],
                    MetricType::Gauge,
                ),
                declare(
                    3,
                    "vigil_rwtest_requests_total",
                    &[("server", "ranker")],
                    MetricType::Counter,
                ),
                declare(
                    4,
                    "vigil_rwtest_syscall_latency_seconds",
                    &[("syscall", "read"), ("server", "ranker")],
                    MetricType::Histogram,
                ),
            ]
        } else {
            Vec::new()
        };
        let step_f = step as f64;
        let power = [200.5 + step_f, 310.25 - step_f];
        let requests = 1000.0 * step_f;
        // Running totals: buckets 100 and 180 grow each step.
        let (low, high) = (3 * step, 2 * step);
        let count = low + high;
        let sum = 0.5 * step_f;
        self.expect(
            "vigil_rwtest_gpu_power_watts",
            &[("gpu", "0")],
            time_ms,
            power[0],
        );
        self.expect(
            "vigil_rwtest_gpu_power_watts",
            &[("gpu", "1")],
            time_ms,
            power[1],
        );
        self.expect(
            "vigil_rwtest_requests_total",
            &[("server", "ranker")],
            time_ms,
            requests,
        );
        let h = [("server", "ranker"), ("syscall", "read")];
        let bucket = "vigil_rwtest_syscall_latency_seconds_bucket";
        for (le, value) in [
            (le_label(Some(100)), low),
            (le_label(Some(180)), low + high),
            ("+Inf".to_string(), count),
        ] {
            let labels = [h[0], h[1], ("le", le.as_str())];
            self.expect(bucket, &labels, time_ms, value as f64);
        }
        self.expect(
            "vigil_rwtest_syscall_latency_seconds_count",
            &h,
            time_ms,
            count as f64,
        );
        self.expect("vigil_rwtest_syscall_latency_seconds_sum", &h, time_ms, sum);
        Batch {
            sequence: step,
            series,
            base_time_ms: time_ms,
            samples: vec![
                sample(1, 0, power[0]),
                sample(2, 0, power[1]),
                sample(3, 0, requests),
            ],
            histograms: vec![Histogram {
                series_id: 4,
                time_delta_ms: 0,
                count,
                sum_seconds: sum,
                bucket_index_deltas: vec![100, 80],
                bucket_counts: vec![low, high],
            }],
            ..Batch::default()
        }
    }
}

fn target(name: &str, url: String) -> RemoteWriteConfig {
    RemoteWriteConfig {
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(400),
        timeout: Duration::from_secs(5),
        // Small, so a few batches take several sends.
        max_samples_per_send: 5,
        ..RemoteWriteConfig::new(name, &url)
    }
}

fn config_with(dir: &Path, targets: Vec<RemoteWriteConfig>) -> AggregatorConfig {
    let mut config = plaintext_config(dir);
    config.export.remote_write = targets;
    config
}

/// Waits until the target has nothing queued, then returns its stats.
async fn wait_drained(
    aggregator: &RunningAggregator,
    name: &str,
    done: impl Fn(&vigil_aggregator::export::ExportStats) -> bool,
) -> vigil_aggregator::export::ExportStats {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let exporter = aggregator
            .exporters()
            .all()
            .iter()
            .find(|e| e.name() == name)
            .expect("target configured")
            .clone();
        let stats = exporter.stats();
        if done(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "target {name} not done after 60 s: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sample_lands_in_prometheus_and_victoria_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (_prometheus, prom_port) = start_prometheus(dir.path()).await;
    let vm_port = free_port();
    let _vm = start_victoria_metrics(dir.path(), vm_port).await;
    let data = dir.path().join("aggregator");
    let aggregator = start(&config_with(
        &data,
        vec![
            target("prom", format!("http://127.0.0.1:{prom_port}/api/v1/write")),
            target("vm", format!("http://127.0.0.1:{vm_port}/api/v1/write")),
        ],
    ))
    .await;
    let mut stream = open_plaintext(&aggregator, hello("gpu-node-1", "agent-a")).await;
    let mut workload = Workload::new("gpu-node-1");
    for step in 1..=4 {
        assert!(stream.store(workload.batch(step)).await.is_empty());
    }
    // 4 steps x (2 gauges + 1 counter + 3 buckets + count + sum).
    let total = 4 * 8;
    for name in ["prom", "vm"] {
        let stats = wait_drained(&aggregator, name, |s| s.sent == total).await;
        assert_eq!(
            (stats.queued, stats.failed, stats.dropped, stats.pending),
            (total, 0, 0, 0),
            "{name}: {stats:?}"
        );
        assert!(stats.last_send_ms > 0);
    }
    wait_landed("Prometheus", &workload.expected, || {
        prometheus_samples(prom_port)
    })
    .await;
    wait_landed("VictoriaMetrics", &workload.expected, || {
        victoria_samples(vm_port)
    })
    .await;

    // The exporter's own telemetry, per target.
    let mut text = String::new();
    aggregator.exporters().write_metrics(&mut text);
    assert!(
        text.contains(&format!(
            "vigil_export_samples_sent_total{{target=\"prom\"}} {total}"
        )),
        "{text}"
    );
    assert!(
        text.contains("vigil_export_queue_pending_samples{target=\"vm\"} 0"),
        "{text}"
    );
    assert_eq!(
        text.matches("# TYPE vigil_export_samples_sent_total counter")
            .count(),
        1
    );
    let metrics = dir.path().join("export.prom");
    std::fs::write(&metrics, &text).unwrap();
    let check = Command::new("/usr/bin/promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&metrics).unwrap())
        .output()
        .expect("promtool runs");
    assert!(
        check.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    aggregator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_is_down_gets_everything_once_up_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens here until VictoriaMetrics starts on it.
    let vm_port = free_port();
    let data = dir.path().join("aggregator");
    let config = config_with(
        &data,
        vec![target(
            "vm",
            format!("http://127.0.0.1:{vm_port}/api/v1/write"),
        )],
    );
    let mut workload = Workload::new("gpu-node-2");

    let aggregator = start(&config).await;
    let mut stream = open_plaintext(&aggregator, hello("gpu-node-2", "agent-b")).await;
    for step in 1..=3 {
        assert!(stream.store(workload.batch(step)).await.is_empty());
    }
    let stats = wait_drained(&aggregator, "vm", |s| s.queued == 24 && s.retries >= 3).await;
    assert_eq!(
        (stats.sent, stats.pending, stats.dropped),
        (0, 24, 0),
        "{stats:?}"
    );
    drop(stream);
    aggregator.shutdown().await;

    // The target comes up while the aggregator is down; the restarted aggregator sends the
    // queue first, then what arrives after the restart.
    let _vm = start_victoria_metrics(dir.path(), vm_port).await;
    let aggregator = start(&config).await;
    assert_eq!(aggregator.exporters().all()[0].stats().pending, 24);
    let mut stream = open_plaintext(&aggregator, hello("gpu-node-2", "agent-b")).await;
    assert!(stream.store(workload.batch(4)).await.is_empty());
    let stats = wait_drained(&aggregator, "vm", |s| s.sent == 32 && s.pending == 0).await;
    assert_eq!((stats.failed, stats.dropped), (0, 0), "{stats:?}");
    wait_landed("VictoriaMetrics", &workload.expected, || {
        victoria_samples(vm_port)
    })
    .await;
    aggregator.shutdown().await;
}

/// What the refusing receiver saw.
#[derive(Default)]
struct Seen {
    requests: Vec<(HeaderMap, prompb::WriteRequest)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_answering_400_has_its_samples_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    // The first request gets 503 (retried), every later one 400 (dropped), as Prometheus
    // answers out-of-order samples.
    let app = Router::new().route(
        "/api/v1/write",
        post({
            let seen = seen.clone();
            move |headers: HeaderMap, body: Bytes| {
                let seen = seen.clone();
                async move {
                    let request = prompb::decode(&body).expect("a remote-write body");
                    let mut seen = seen.lock().unwrap();
                    seen.requests.push((headers, request));
                    if seen.requests.len() == 1 {
                        (StatusCode::SERVICE_UNAVAILABLE, "busy".to_string())
                    } else {
                        (StatusCode::BAD_REQUEST, "out of order sample".to_string())
                    }
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let mut refusing = target("strict", format!("http://{addr}/api/v1/write"));
    refusing.bearer_token_file = Some(token_file);
    refusing.max_samples_per_send = 100;
    let aggregator = start(&config_with(&dir.path().join("aggregator"), vec![refusing])).await;
    let mut stream = open_plaintext(&aggregator, hello("gpu-node-3", "agent-c")).await;
    let mut workload = Workload::new("gpu-node-3");
    assert!(stream.store(workload.batch(1)).await.is_empty());
    let stats = wait_drained(&aggregator, "strict", |s| s.failed == 8 && s.pending == 0).await;
    assert_eq!(
        (stats.sent, stats.retries, stats.dropped),
        (0, 1, 0),
        "{stats:?}"
    );

    aggregator.shutdown().await;
    let seen = std::mem::take(&mut seen.lock().unwrap().requests);
    assert_eq!(seen.len(), 2, "one retry after 503, none after 400");
    let (headers, request) = &seen[1];
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(header("content-encoding").as_deref(), Some("snappy"));
    assert_eq!(
        header("content-type").as_deref(),
        Some("application/x-protobuf")
    );
    assert_eq!(
        header("x-prometheus-remote-write-version").as_deref(),
        Some("0.1.0")
    );
    assert!(
        header("user-agent")
            .unwrap()
            .starts_with("vigil-aggregator/")
    );
    assert_eq!(
        header("authorization").as_deref(),
        Some("Bearer s3cret-token")
    );
    // The same request both times, labels sorted by name as receivers require.
    assert_eq!(request, &seen[0].1);
    assert_eq!(request.timeseries.len(), 8);
    for series in &request.timeseries {
        let names: Vec<&str> = series.labels.iter().map(|l| l.name.as_str()).collect();
        let mut sorted_names = names.clone();
        sorted_names.sort();
        assert_eq!(names, sorted_names);
        assert!(names.contains(&"node"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_prometheus_refuses_as_out_of_order_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (_prometheus, prom_port) = start_prometheus(dir.path()).await;
    let aggregator = start(&config_with(
        &dir.path().join("aggregator"),
        vec![target(
            "prom",
            format!("http://127.0.0.1:{prom_port}/api/v1/write"),
        )],
    ))
    .await;
    let mut stream = open_plaintext(&aggregator, hello("gpu-node-4", "agent-d")).await;
    let mut workload = Workload::new("gpu-node-4");
    assert!(stream.store(workload.batch(1)).await.is_empty());
    wait_drained(&aggregator, "prom", |s| s.sent == 8).await;
    // The same series 5 s earlier: the aggregator stores it, Prometheus answers 400.
    let landed_before = workload.expected.clone();
    let mut older = workload.batch(2);
    older.base_time_ms = workload.base_ms + 5_000;
    assert!(stream.store(older).await.is_empty());
    let stats = wait_drained(&aggregator, "prom", |s| s.failed == 8 && s.pending == 0).await;
    assert_eq!(
        (stats.sent, stats.retries, stats.dropped),
        (8, 0, 0),
        "{stats:?}"
    );
    wait_landed("Prometheus", &landed_before, || {
        prometheus_samples(prom_port)
    })
    .await;
    aggregator.shutdown().await;
}
