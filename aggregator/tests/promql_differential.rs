//! Differential test of the query engine against a real Prometheus (Debian's 2.42): the same
//! generated GPU-node data goes into our aggregator (gRPC ingest) and into Prometheus
//! (remote-write receiver), then `promtool query instant|range -o json` runs every query
//! below against both servers, and the answers must agree: the same label sets, values within
//! 1e-9 relative (NaN equals NaN), the same timestamps, or an error from both.

mod common;

use std::{
    collections::BTreeMap,
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;
use vigil_agent_common::histogram::bucket_index;
use vigil_aggregator::{
    export::prompb::{Label, Sample as PromSample, TimeSeries, WriteRequest, encode},
    storage::query_view::le_label,
};
use vigil_proto::v1::{Batch, Histogram, MetricType, Sample, Series};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";
const NODES: [&str; 3] = ["gpu-node-1", "gpu-node-2", "gpu-node-3"];
const MINUTE: i64 = 60_000;

/// Deterministic noise in [0, 1).
fn noise(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

fn hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// A histogram sample: time, sum of observed seconds, and `(bucket index, cumulative-in-time
/// count)` in index order.
type HistogramSample = (i64, f64, Vec<(u32, u64)>);

/// A query window for promtool: start, end (ms) and step.
type RangeWindow<'a> = (i64, i64, &'a str);

/// One generated series: a float series, or a histogram (cumulative counters per bucket).
enum Data {
    Floats(Vec<(i64, f64)>),
    Histograms(Vec<HistogramSample>),
}

struct Generated {
    node: &'static str,
    name: &'static str,
    labels: Vec<(&'static str, String)>,
    kind: MetricType,
    data: Data,
}

/// Sample times from `start` to `end` every `every` ms, with up to 300 ms of jitter so the
/// extrapolation paths of rate() see irregular intervals, as real agents produce.
fn times(start: i64, end: i64, every: i64, seed: u64) -> Vec<i64> {
    (0..)
        .map(|i| start + i * every + (noise(seed ^ i as u64) * 300.0) as i64)
        .take_while(|t| *t <= end)
        .collect()
}

fn generate(start: i64, end: i64) -> Vec<Generated> {
    let mut out = Vec::new();
    for (n, node) in NODES.into_iter().enumerate() {
        for gpu in ["0", "1"] {
            let seed = hash(node) ^ hash(gpu);
            let utilization = times(start, end, 1000, seed)
                .into_iter()
                .enumerate()
                .map(|(i, t)| {
                    (
                        t,
                        (0.5 + 0.4 * (i as f64 / 200.0).sin() * noise(seed + i as u64))
                            .clamp(0.0, 1.0),
                    )
                })
                .collect();
            out.push(Generated {
                node,
                name: "vigil_gpu_utilization_ratio",
                labels: vec![("gpu", gpu.into())],
                kind: MetricType::Gauge,
                data: Data::Floats(utilization),
            });
            let temperature = times(start, end, 5000, seed ^ 1)
                .into_iter()
                .enumerate()
                .map(|(i, t)| {
                    (
                        t,
                        60.0 + n as f64 * 5.0
                            + 8.0 * noise(seed ^ 7 ^ i as u64)
                            + (i % 90) as f64 / 10.0,
                    )
                })
                .collect();
            out.push(Generated {
                node,
                name: "vigil_gpu_temperature_celsius",
                labels: vec![("gpu", gpu.into())],
                kind: MetricType::Gauge,
                data: Data::Floats(temperature),
            });
        }
        for syscall in ["read", "write"] {
            let seed = hash(node) ^ hash(syscall);
            let mut total = 1000.0 * noise(seed);
            let reset_at = start + 15 * MINUTE;
            let mut reset_done = false;
            let counter = times(start, end, 1000, seed)
                .into_iter()
                .enumerate()
                .map(|(i, t)| {
                    // Node 2's agent restarts a quarter of an hour in: its counters start over.
                    if n == 1 && !reset_done && t >= reset_at {
                        reset_done = true;
                        total = 0.0;
                    }
                    total += (100.0 * noise(seed ^ i as u64)).floor();
                    (t, total)
                })
                .collect();
            out.push(Generated {
                node,
                name: "vigil_syscalls_total",
                labels: vec![("syscall", syscall.into())],
                kind: MetricType::Counter,
                data: Data::Floats(counter),
            });
            for comm in ["tritonserver", "python3"] {
                let seed = seed ^ hash(comm);
                // Six buckets per series, each non-empty from the first sample on, so the set of
                // `le` series is the same in any window (as in a classic Prometheus histogram).
                let typical = if syscall == "read" { 20_000 } else { 150_000 };
                let indices: Vec<u32> = [0u32, 4, 9, 15, 22, 31]
                    .iter()
                    .map(|offset| bucket_index(typical) as u32 + offset)
                    .collect();
                let mut counts: Vec<u64> = indices.iter().map(|_| 1).collect();
                let mut sum = 0.0;
                let restart_at = start + 12 * MINUTE;
                let mut restarted = false;
                let points = times(start, end, 5000, seed)
                    .into_iter()
                    .enumerate()
                    .map(|(i, t)| {
                        if n == 2 && comm == "python3" && !restarted && t >= restart_at {
                            restarted = true;
                            counts.iter_mut().for_each(|c| *c = 1);
                            sum = 0.0;
                        }
                        for (k, (index, count)) in indices.iter().zip(counts.iter_mut()).enumerate()
                        {
                            let weight = [40.0, 25.0, 15.0, 8.0, 3.0, 1.0][k];
                            let added =
                                (weight * noise(seed ^ (i as u64 * 8 + k as u64))).floor() as u64;
                            *count += added;
                            let mid = vigil_agent_common::histogram::bucket_upper_bound_ns(
                                *index as usize,
                            ) as f64
                                / 1e9;
                            sum += added as f64 * mid;
                        }
                        (
                            t,
                            sum,
                            indices
                                .iter()
                                .copied()
                                .zip(counts.iter().copied())
                                .collect(),
                        )
                    })
                    .collect();
                out.push(Generated {
                    node,
                    name: "vigil_syscall_latency_seconds",
                    labels: vec![("comm", comm.into()), ("syscall", syscall.into())],
                    kind: MetricType::Histogram,
                    data: Data::Histograms(points),
                });
            }
        }
        // A process that exits 20 minutes in: its series goes quiet, and stays visible for the
        // 5-minute lookback only.
        let up = times(start, start + 20 * MINUTE, 5000, hash(node) ^ 99)
            .into_iter()
            .map(|t| (t, 1.0))
            .collect();
        out.push(Generated {
            node,
            name: "vigil_process_up",
            labels: vec![("comm", "vllm".into())],
            kind: MetricType::Gauge,
            data: Data::Floats(up),
        });
    }
    out
}

/// Sends every series of each node to the aggregator over one gRPC stream, a minute per batch.
async fn ingest_into_aggregator(
    aggregator: &vigil_aggregator::RunningAggregator,
    data: &[Generated],
    start: i64,
    end: i64,
) {
    for node in NODES {
        let mine: Vec<(u64, &Generated)> = data
            .iter()
            .filter(|g| g.node == node)
            .enumerate()
            .map(|(i, g)| (i as u64 + 1, g))
            .collect();
        let mut stream = open_plaintext(aggregator, hello(node, "differential")).await;
        let declarations: Vec<Series> = mine
            .iter()
            .map(|(id, g)| {
                let labels: Vec<(&str, &str)> =
                    g.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                declare(*id, g.name, &labels, g.kind)
            })
            .collect();
        let mut sequence = 0;
        let mut from = start;
        while from <= end {
            let to = from + MINUTE;
            let base = from;
            let mut samples = Vec::new();
            let mut histograms = Vec::new();
            for (id, g) in &mine {
                match &g.data {
                    Data::Floats(points) => {
                        samples.extend(points.iter().filter(|(t, _)| *t >= from && *t < to).map(
                            |(t, v)| Sample {
                                series_id: *id,
                                time_delta_ms: t - base,
                                value: *v,
                            },
                        ))
                    }
                    Data::Histograms(points) => histograms.extend(
                        points.iter().filter(|(t, _, _)| *t >= from && *t < to).map(
                            |(t, sum, buckets)| {
                                let mut previous = 0;
                                Histogram {
                                    series_id: *id,
                                    time_delta_ms: t - base,
                                    count: buckets.iter().map(|(_, c)| c).sum(),
                                    sum_seconds: *sum,
                                    bucket_index_deltas: buckets
                                        .iter()
                                        .map(|(index, _)| {
                                            let delta = index - previous;
                                            previous = *index;
                                            delta
                                        })
                                        .collect(),
                                    bucket_counts: buckets.iter().map(|(_, c)| *c).collect(),
                                }
                            },
                        ),
                    ),
                }
            }
            sequence += 1;
            let batch = Batch {
                sequence,
                series: if sequence == 1 {
                    declarations.clone()
                } else {
                    Vec::new()
                },
                base_time_ms: base,
                samples,
                histograms,
                ..Batch::default()
            };
            let rejections = stream.store(batch).await;
            assert!(
                rejections.is_empty(),
                "the aggregator refused samples: {rejections:?}"
            );
            from = to;
        }
    }
}

fn prom_series(
    name: &str,
    node: &str,
    labels: &[(&str, String)],
    extra: Option<(&str, String)>,
    samples: Vec<PromSample>,
) -> TimeSeries {
    let mut all: Vec<(String, String)> = vec![
        ("__name__".into(), name.into()),
        ("node".into(), node.into()),
    ];
    all.extend(labels.iter().map(|(k, v)| (k.to_string(), v.clone())));
    all.extend(extra.map(|(k, v)| (k.to_string(), v)));
    all.sort();
    TimeSeries {
        labels: all
            .into_iter()
            .map(|(name, value)| Label { name, value })
            .collect(),
        samples,
    }
}

/// The same data as Prometheus sees it: histograms as classic `_bucket`/`_count`/`_sum`.
fn remote_write_requests(data: &[Generated]) -> Vec<WriteRequest> {
    let mut requests = Vec::new();
    for g in data {
        let mut timeseries = Vec::new();
        match &g.data {
            Data::Floats(points) => timeseries.push(prom_series(
                g.name,
                g.node,
                &g.labels,
                None,
                points
                    .iter()
                    .map(|(t, v)| PromSample {
                        value: *v,
                        timestamp: *t,
                    })
                    .collect(),
            )),
            Data::Histograms(points) => {
                let indices: Vec<u32> = points[0].2.iter().map(|(index, _)| *index).collect();
                for (k, index) in indices.iter().enumerate() {
                    timeseries.push(prom_series(
                        &format!("{}_bucket", g.name),
                        g.node,
                        &g.labels,
                        Some(("le", le_label(Some(*index)))),
                        points
                            .iter()
                            .map(|(t, _, buckets)| PromSample {
                                value: buckets[..=k].iter().map(|(_, c)| *c as f64).sum(),
                                timestamp: *t,
                            })
                            .collect(),
                    ));
                }
                let count =
                    |buckets: &Vec<(u32, u64)>| buckets.iter().map(|(_, c)| *c as f64).sum::<f64>();
                timeseries.push(prom_series(
                    &format!("{}_bucket", g.name),
                    g.node,
                    &g.labels,
                    Some(("le", le_label(None))),
                    points
                        .iter()
                        .map(|(t, _, b)| PromSample {
                            value: count(b),
                            timestamp: *t,
                        })
                        .collect(),
                ));
                timeseries.push(prom_series(
                    &format!("{}_count", g.name),
                    g.node,
                    &g.labels,
                    None,
                    points
                        .iter()
                        .map(|(t, _, b)| PromSample {
                            value: count(b),
                            timestamp: *t,
                        })
                        .collect(),
                ));
                timeseries.push(prom_series(
                    &format!("{}_sum", g.name),
                    g.node,
                    &g.labels,
                    None,
                    points
                        .iter()
                        .map(|(t, sum, _)| PromSample {
                            value: *sum,
                            timestamp: *t,
                        })
                        .collect(),
                ));
            }
        }
        requests.push(WriteRequest { timeseries });
    }
    requests
}

/// A Prometheus on a free loopback port, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_prometheus(dir: &Path) -> Prometheus {
    assert!(
        Path::new(PROMETHEUS).exists() && Path::new(PROMTOOL).exists(),
        "{PROMETHEUS} and {PROMTOOL} are needed (Debian package prometheus; cargo xtask setup installs it)"
    );
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        "global:\n  scrape_interval: 1m\nscrape_configs: []\n",
    )
    .unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new(PROMETHEUS)
        .arg("--web.enable-remote-write-receiver")
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg(format!("--config.file={}", config.display()))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    let prometheus = Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = client
            .get(format!("{}/-/ready", prometheus.url))
            .send()
            .await
            && response.status().is_success()
        {
            return prometheus;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus not ready within 60 s: {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn remote_write(prometheus: &Prometheus, requests: Vec<WriteRequest>) {
    let client = reqwest::Client::new();
    for request in requests {
        let response = client
            .post(format!("{}/api/v1/write", prometheus.url))
            .header("Content-Encoding", "snappy")
            .header("Content-Type", "application/x-protobuf")
            .header("X-Prometheus-Remote-Write-Version", "0.1.0")
            .body(encode(&request))
            .send()
            .await
            .expect("remote write");
        let status = response.status();
        assert!(
            status.is_success(),
            "remote write: {status}: {}",
            response.text().await.unwrap_or_default()
        );
    }
}

/// What `promtool query ... -o json` answered: the JSON result, or the error text.
fn promtool(
    server: &str,
    expr: &str,
    range: Option<RangeWindow>,
    at: i64,
) -> Result<Value, String> {
    let mut command = Command::new(PROMTOOL);
    command.arg("query");
    match range {
        None => {
            command.args([
                "instant",
                "-o",
                "json",
                &format!("--time={}", seconds(at)),
                "--",
                server,
                expr,
            ]);
        }
        Some((start, end, step)) => {
            command.args([
                "range",
                "-o",
                "json",
                &format!("--start={}", seconds(start)),
                &format!("--end={}", seconds(end)),
                &format!("--step={step}"),
                "--",
                server,
                expr,
            ]);
        }
    }
    let output = command.output().expect("run promtool");
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
    }
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.trim())
        .map_err(|error| format!("promtool printed no JSON ({error}): {text}"))
}

fn seconds(ms: i64) -> String {
    format!("{}.{:03}", ms / 1000, ms % 1000)
}

fn number(value: &Value) -> f64 {
    match value.as_str() {
        Some("NaN") => f64::NAN,
        Some("+Inf") => f64::INFINITY,
        Some("-Inf") => f64::NEG_INFINITY,
        Some(text) => text.parse().unwrap_or(f64::NAN),
        None => value.as_f64().unwrap_or(f64::NAN),
    }
}

fn same_value(a: f64, b: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if a == b {
        return true;
    }
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// A result as comparable data: label set -> points (time in ms, value).
fn normalize(result: &Value) -> BTreeMap<String, Vec<(i64, f64)>> {
    let mut out = BTreeMap::new();
    let point = |p: &Value| {
        (
            (p[0].as_f64().unwrap_or(f64::NAN) * 1000.0).round() as i64,
            number(&p[1]),
        )
    };
    match result {
        Value::Array(items) if items.len() == 2 && !items[0].is_object() => {
            out.insert("scalar".into(), vec![point(result)]);
        }
        Value::Array(items) => {
            for item in items {
                let key = item["metric"].to_string();
                let points = if let Some(values) = item["values"].as_array() {
                    values.iter().map(point).collect()
                } else {
                    vec![point(&item["value"])]
                };
                out.insert(key, points);
            }
        }
        other => {
            out.insert("unexpected".into(), vec![(0, f64::NAN)]);
            eprintln!("unexpected promtool output {other}");
        }
    }
    out
}

fn compare(ours: &Result<Value, String>, theirs: &Result<Value, String>) -> Result<usize, String> {
    match (ours, theirs) {
        (Err(ours), Err(theirs)) => Err(format!("both failed: {ours}; {theirs}")),
        (Ok(_), Err(error)) => Err(format!("Prometheus failed ({error}) but we answered")),
        (Err(error), Ok(_)) => Err(format!("we failed: {error}")),
        (Ok(ours), Ok(theirs)) => {
            let (ours, theirs) = (normalize(ours), normalize(theirs));
            let our_keys: Vec<_> = ours.keys().collect();
            let their_keys: Vec<_> = theirs.keys().collect();
            if our_keys != their_keys {
                return Err(format!(
                    "label sets differ:\n  ours:       {our_keys:?}\n  Prometheus: {their_keys:?}"
                ));
            }
            for (key, our_points) in &ours {
                let their_points = &theirs[key];
                if our_points.len() != their_points.len() {
                    return Err(format!(
                        "{key}: {} points here, {} in Prometheus (first ours {:?}, theirs {:?})",
                        our_points.len(),
                        their_points.len(),
                        our_points.first(),
                        their_points.first()
                    ));
                }
                for (a, b) in our_points.iter().zip(their_points) {
                    if a.0 != b.0 || !same_value(a.1, b.1) {
                        return Err(format!("{key}: ours {a:?}, Prometheus {b:?}"));
                    }
                }
            }
            Ok(ours.len())
        }
    }
}

/// How a query runs: instant and range, instant only (range vectors, sorting), or as a query
/// both servers must refuse.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Both,
    Instant,
    Fails,
}

use Mode::{Both, Fails, Instant as InstantOnly};

const QUERIES: &[(&str, Mode)] = &[
    // Selectors with all four matchers, offset, @, range vectors.
    ("vigil_gpu_utilization_ratio", Both),
    ("vigil_gpu_utilization_ratio{node=\"gpu-node-1\"}", Both),
    (
        "vigil_gpu_utilization_ratio{node!=\"gpu-node-1\", gpu=~\"0|1\"}",
        Both,
    ),
    (
        "vigil_gpu_temperature_celsius{node!~\"gpu-node-[12]\"}",
        Both,
    ),
    ("{__name__=~\"vigil_gpu_.*\", gpu=\"1\"}", Both),
    ("vigil_gpu_temperature_celsius offset 5m", Both),
    ("vigil_gpu_temperature_celsius @ end()", Both),
    ("vigil_gpu_temperature_celsius{gpu=\"1\"}[1m]", InstantOnly),
    ("vigil_process_up", Both),
    // The rate family.
    ("rate(vigil_syscalls_total[1m])", Both),
    ("rate(vigil_syscalls_total[5m] offset 2m)", Both),
    ("irate(vigil_syscalls_total[1m])", Both),
    ("increase(vigil_syscalls_total[10m])", Both),
    ("delta(vigil_gpu_temperature_celsius[3m])", Both),
    ("idelta(vigil_gpu_temperature_celsius[1m])", Both),
    ("changes(vigil_gpu_temperature_celsius[5m])", Both),
    ("resets(vigil_syscalls_total[30m])", Both),
    ("deriv(vigil_gpu_temperature_celsius[5m])", Both),
    (
        "predict_linear(vigil_gpu_temperature_celsius[5m], 600)",
        Both,
    ),
    // *_over_time.
    ("avg_over_time(vigil_gpu_utilization_ratio[2m])", Both),
    ("min_over_time(vigil_gpu_utilization_ratio[2m])", Both),
    ("max_over_time(vigil_gpu_utilization_ratio[2m])", Both),
    ("sum_over_time(vigil_gpu_temperature_celsius[2m])", Both),
    ("count_over_time(vigil_gpu_utilization_ratio[90s])", Both),
    ("last_over_time(vigil_gpu_temperature_celsius[1m])", Both),
    (
        "quantile_over_time(0.9, vigil_gpu_utilization_ratio[2m])",
        Both,
    ),
    ("stddev_over_time(vigil_gpu_utilization_ratio[2m])", Both),
    ("stdvar_over_time(vigil_gpu_temperature_celsius[5m])", Both),
    ("present_over_time(vigil_process_up[10m])", Both),
    ("absent_over_time(vigil_process_up[1m])", Both),
    // Aggregations.
    ("sum by (node) (rate(vigil_syscalls_total[2m]))", Both),
    ("sum without (syscall) (vigil_syscalls_total)", Both),
    ("avg without (gpu) (vigil_gpu_utilization_ratio)", Both),
    ("min by (gpu) (vigil_gpu_temperature_celsius)", Both),
    ("max(vigil_gpu_temperature_celsius)", Both),
    ("count by (node) (vigil_gpu_utilization_ratio)", Both),
    ("topk(2, vigil_gpu_utilization_ratio)", Both),
    ("bottomk by (node) (1, vigil_gpu_temperature_celsius)", Both),
    (
        "quantile by (gpu) (0.75, vigil_gpu_utilization_ratio)",
        Both,
    ),
    ("stddev(vigil_gpu_temperature_celsius)", Both),
    ("stdvar by (node) (vigil_gpu_utilization_ratio)", Both),
    (
        "count_values(\"temp\", round(vigil_gpu_temperature_celsius))",
        Both,
    ),
    ("group by (node) (vigil_gpu_utilization_ratio)", Both),
    // Operators and vector matching.
    ("vigil_gpu_utilization_ratio * 100", Both),
    ("-vigil_gpu_temperature_celsius + 2 ^ 3 % 5", Both),
    ("sum(rate(vigil_syscalls_total[1m])", Fails),
    ("vigil_gpu_temperature_celsius > 70", Both),
    ("vigil_gpu_temperature_celsius > bool 70", Both),
    ("72 >= vigil_gpu_temperature_celsius", Both),
    (
        "vigil_gpu_utilization_ratio / on(node, gpu) vigil_gpu_temperature_celsius",
        Both,
    ),
    (
        "vigil_gpu_utilization_ratio != ignoring(__name__) vigil_gpu_temperature_celsius",
        Both,
    ),
    (
        "vigil_gpu_temperature_celsius - ignoring(gpu) group_left avg without (gpu) (vigil_gpu_temperature_celsius)",
        Both,
    ),
    (
        "max by (node) (vigil_gpu_temperature_celsius) / on(node) group_right vigil_gpu_temperature_celsius",
        Both,
    ),
    (
        "vigil_syscalls_total * on(node) group_left(comm) vigil_process_up",
        Both,
    ),
    (
        "vigil_gpu_utilization_ratio > 0.5 and on(node, gpu) vigil_gpu_temperature_celsius > 65",
        Both,
    ),
    ("vigil_gpu_utilization_ratio or vigil_process_up", Both),
    (
        "vigil_gpu_temperature_celsius unless on(node) vigil_process_up",
        Both,
    ),
    (
        "vigil_syscalls_total + ignoring(node) vigil_syscalls_total",
        Fails,
    ),
    // Histograms (classic view of our log-linear buckets).
    (
        "histogram_quantile(0.99, sum by (le) (rate(vigil_syscall_latency_seconds_bucket[1m])))",
        Both,
    ),
    (
        "histogram_quantile(0.5, sum by (le, node) (rate(vigil_syscall_latency_seconds_bucket[5m])))",
        Both,
    ),
    (
        "histogram_quantile(0.9, rate(vigil_syscall_latency_seconds_bucket{syscall=\"read\"}[2m]))",
        Both,
    ),
    (
        "rate(vigil_syscall_latency_seconds_sum[1m]) / rate(vigil_syscall_latency_seconds_count[1m])",
        Both,
    ),
    ("count(vigil_syscall_latency_seconds_bucket)", Both),
    // Other functions.
    ("abs(vigil_gpu_temperature_celsius - 70)", Both),
    (
        "ceil(vigil_gpu_temperature_celsius) - floor(vigil_gpu_temperature_celsius)",
        Both,
    ),
    (
        "exp(vigil_gpu_utilization_ratio) + ln(vigil_gpu_utilization_ratio)",
        Both,
    ),
    (
        "log2(vigil_gpu_temperature_celsius) * log10(vigil_gpu_temperature_celsius)",
        Both,
    ),
    ("sqrt(vigil_gpu_utilization_ratio)", Both),
    ("clamp(vigil_gpu_temperature_celsius, 65, 75)", Both),
    ("clamp_min(vigil_gpu_temperature_celsius, 70)", Both),
    ("clamp_max(vigil_gpu_temperature_celsius, 70)", Both),
    ("round(vigil_gpu_temperature_celsius, 0.5)", Both),
    ("time()", Both),
    ("vector(1)", Both),
    ("scalar(sum(vigil_process_up))", Both),
    ("timestamp(vigil_gpu_temperature_celsius)", Both),
    ("sort(vigil_gpu_temperature_celsius)", InstantOnly),
    ("sort_desc(vigil_gpu_temperature_celsius)", InstantOnly),
    (
        "label_replace(vigil_gpu_utilization_ratio, \"host\", \"h-$1\", \"node\", \"gpu-(.*)\")",
        Both,
    ),
    (
        "label_join(vigil_gpu_utilization_ratio, \"id\", \"/\", \"node\", \"gpu\")",
        Both,
    ),
    ("absent(vigil_nothing{node=\"x\"})", Both),
    ("absent(vigil_gpu_utilization_ratio)", Both),
    (
        "vigil_gpu_temperature_celsius{gpu=\"1\"}[1m] offset 2m",
        InstantOnly,
    ),
    (
        "vigil_gpu_temperature_celsius{gpu=\"0\"}[30s] @ end()",
        InstantOnly,
    ),
    (
        "sum_over_time(vigil_gpu_utilization_ratio[1m] @ start())",
        Both,
    ),
    // Subqueries.
    (
        "max_over_time(rate(vigil_syscalls_total[1m])[10m:1m])",
        Both,
    ),
    ("avg_over_time(vigil_gpu_temperature_celsius[5m:30s])", Both),
    ("rate(vigil_syscalls_total[5m:10s] offset 1m)", Both),
    (
        "min_over_time(sum by (node) (vigil_gpu_utilization_ratio)[3m:])",
        Both,
    ),
    (
        "quantile_over_time(0.9, histogram_quantile(0.9, sum by (le) (rate(vigil_syscall_latency_seconds_bucket[1m])))[15m:2m])",
        Both,
    ),
    (
        "vigil_gpu_temperature_celsius{gpu=\"0\"}[2m:45s]",
        InstantOnly,
    ),
    // Spelling of special values, and a few more combinations.
    ("vigil_gpu_temperature_celsius / 0", Both),
    ("ln(vigil_gpu_utilization_ratio - 1)", Both),
    ("scalar(vigil_gpu_temperature_celsius)", Both),
    (
        "vigil_gpu_utilization_ratio atan2 vigil_gpu_temperature_celsius",
        Both,
    ),
    (
        "vigil_gpu_utilization_ratio and vigil_gpu_temperature_celsius",
        Both,
    ),
    (
        "sum by (node) (vigil_syscalls_total) / ignoring(node) group_left sum(vigil_syscalls_total)",
        Both,
    ),
    ("sum by (node) (vigil_gpu_utilization_ratio) > bool 1", Both),
    ("quantile(0.5, rate(vigil_syscalls_total[1m]))", Both),
    ("topk by (node) (1, rate(vigil_syscalls_total[1m]))", Both),
    ("count_values by (node) (\"up\", vigil_process_up)", Both),
    ("rate(vigil_syscalls_total[1m] @ end())", Both),
    (
        "minute(timestamp(vigil_gpu_temperature_celsius)) + hour() * 0",
        Both,
    ),
    (
        "histogram_quantile(0.99, sum by (le, syscall) (increase(vigil_syscall_latency_seconds_bucket[10m])))",
        Both,
    ),
    (
        "histogram_quantile(0.75, sum without (comm, node) (rate(vigil_syscall_latency_seconds_bucket[3m])))",
        Both,
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_answers_match_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let prometheus = start_prometheus(dir.path()).await;

    let mut config = plaintext_config(&dir.path().join("aggregator"));
    std::fs::create_dir_all(&config.data_dir).unwrap();
    config.http.listen = Some("127.0.0.1:0".parse().unwrap());
    let aggregator = start(&config).await;

    // Thirty minutes ending a minute ago, on whole seconds.
    let end = now_ms() / 1000 * 1000 - MINUTE;
    let start = end - 30 * MINUTE;
    let data = generate(start, end);
    ingest_into_aggregator(&aggregator, &data, start, end).await;
    remote_write(&prometheus, remote_write_requests(&data)).await;

    let ours = format!("http://{}", aggregator.http_addr().unwrap());
    // An instant between samples, one at the very end, and a range over the last 20 minutes
    // (the process series ends inside it).
    let instants = [end - 95_500, end, start + 22 * MINUTE];
    let range = (start + 10 * MINUTE, end, "30s");
    let mut failures = Vec::new();
    let mut compared = 0;
    for (expr, mode) in QUERIES {
        let mut runs: Vec<(String, Option<RangeWindow>, i64)> = instants
            .iter()
            .map(|at| (format!("instant@{}", seconds(*at)), None, *at))
            .collect();
        if *mode == Both {
            runs.push(("range".into(), Some(range), 0));
        }
        for (what, range, at) in runs {
            let our_answer = promtool(&ours, expr, range, at);
            let their_answer = promtool(&prometheus.url, expr, range, at);
            let outcome = match (*mode, &our_answer, &their_answer) {
                (Fails, Err(_), Err(_)) => Ok(0),
                (Fails, _, _) => Err(format!(
                    "both should refuse it: ours {our_answer:?}, Prometheus {their_answer:?}"
                )),
                (_, Err(ours), Err(theirs)) => {
                    Err(format!("both failed: ours {ours:?}, Prometheus {theirs:?}"))
                }
                _ => compare(&our_answer, &their_answer),
            };
            match outcome {
                Ok(series) => {
                    compared += 1;
                    println!("ok       {what:<22} {series:>3} series  {expr}");
                }
                Err(why) => {
                    println!("MISMATCH {what:<22} {expr}\n         {why}");
                    failures.push(format!("{what} {expr}: {why}"));
                }
            }
        }
    }
    println!(
        "{compared} answers matched, {} differed, over {} queries",
        failures.len(),
        QUERIES.len()
    );
    aggregator.shutdown().await;
    drop(prometheus);
    assert!(
        failures.is_empty(),
        "{} answers differ from Prometheus:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_comparison_catches_differences() {
    let vector = |labels: &str, value: &str| -> Result<Value, String> {
        Ok(serde_json::from_str(&format!(
            r#"[{{"metric":{labels},"value":[1700000000.5,"{value}"]}}]"#
        ))
        .unwrap())
    };
    let a = vector(r#"{"node":"a"}"#, "1.5");
    assert_eq!(
        compare(&a, &vector(r#"{"node":"a"}"#, "1.5000000000001")),
        Ok(1)
    );
    assert!(compare(&a, &vector(r#"{"node":"a"}"#, "1.50001")).is_err());
    assert!(compare(&a, &vector(r#"{"node":"b"}"#, "1.5")).is_err());
    assert!(compare(&a, &Err("refused".into())).is_err());
    assert!(compare(&Err("x".into()), &Err("y".into())).is_err());
    let nan = vector(r#"{"node":"a"}"#, "NaN");
    assert_eq!(compare(&nan, &nan), Ok(1));
    assert!(compare(&nan, &a).is_err());
    let scalar: Result<Value, String> = Ok(serde_json::json!([1700000000.5, "2"]));
    let later: Result<Value, String> = Ok(serde_json::json!([1700000001, "2"]));
    assert!(compare(&scalar, &later).is_err());
}
