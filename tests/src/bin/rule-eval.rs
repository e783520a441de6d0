//! `rule-eval`: the cost of one rule-evaluation round, for the rule-eval part of
//! `cargo xtask bench alert-latency`. Prints one JSON report on stdout.
//!
//! ```text
//! rule-eval --catalog packaging/rules/vigil-gpu-serving.yml [--nodes 100] [--hours 2]
//!           [--step-s 5] [--rounds 30] [--rules 200]
//! ```
//!
//! An aggregator runs in this process (plaintext gRPC on 127.0.0.1, data under a temporary
//! folder). Its store is filled through real `Ingest.Stream`s with `--hours` of data at one
//! point per `--step-s` for `--nodes` GPU nodes, each with 8 GPUs (19 series each: utilization,
//! temperature, memory, power and its limit, 5 throttle reasons, ECC counters and events, row
//! remapping, up), 4 model-server processes of 2 servers (RSS, start time, CPU time, GPU
//! memory), 10 syscall-latency histograms (2 servers x 5 syscalls, ~20 buckets), host series
//! (CPU by mode, PSI, memory) and the agent's own spool gauges, plus an hour of the catalog's
//! two recordings as if the rules had been running. Mostly healthy, with a few hot GPUs and a
//! leaking process, so some alerts fire and write `ALERTS` like in production.
//!
//! The rules are the shipped catalog plus generated variants of its indicators (other
//! thresholds, windows, quantiles and aggregations over the same series) up to `--rules`, in
//! groups of 20. A round evaluates every group once, one after the other (as
//! `RuleManager::evaluate_at` does), including storing recordings and `ALERTS` through the
//! write-ahead log. The first round (which also restores `for` state) is reported apart; the
//! median and p99 are over the `--rounds` after it.

/// The allocator of the `vigil-aggregator` binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use vigil_aggregator::{
    AggregatorConfig,
    alerting::{
        AlertHistory, AlertState, AlertingConfig, ManagerParts, Notifier, RuleManager, SampleWriter,
    },
    ingest::{admission::Limits, counters::IngestCounters},
    query::Engine,
    storage::Wal,
};
use vigil_proto::v1::{
    AgentMessage, Batch, Hello, Histogram, Label, MetricType, Sample, Series, agent_message,
    aggregator_message, ingest_client::IngestClient,
};

struct Args {
    catalog: PathBuf,
    nodes: usize,
    hours: f64,
    step_s: u64,
    rounds: usize,
    rules: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        catalog: PathBuf::new(),
        nodes: 100,
        hours: 2.0,
        step_s: 5,
        rounds: 30,
        rules: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let positive = |text: String| -> Result<f64, String> {
            text.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| format!("{flag}: {text:?} is not a positive number"))
        };
        match flag.as_str() {
            "--catalog" => args.catalog = PathBuf::from(value()?),
            "--nodes" => args.nodes = positive(value()?)? as usize,
            "--hours" => args.hours = positive(value()?)?,
            "--step-s" => args.step_s = positive(value()?)? as u64,
            "--rounds" => args.rounds = positive(value()?)? as usize,
            "--rules" => args.rules = positive(value()?)? as usize,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.catalog.as_os_str().is_empty() {
        return Err("--catalog FILE (the shipped rule file) is required".into());
    }
    if args.step_s == 0 || args.nodes == 0 || args.rounds < 2 {
        return Err("--step-s and --nodes must be at least 1, --rounds at least 2".into());
    }
    Ok(args)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

/// A small deterministic noise in [-1, 1] (no dependency on a random crate).
fn noise(seed: u64, t: i64) -> f64 {
    let mut x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(t as u64);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x % 2001) as f64 / 1000.0 - 1.0
}

/// How a float series' value at time `t` (ms) is made.
type Value = Box<dyn Fn(i64) -> f64 + Send + Sync>;

/// One node's series: floats and histograms, with their declarations.
struct NodeSeries {
    declarations: Vec<Series>,
    floats: Vec<(u64, Value)>,
    /// Histogram series ids with their syscall's typical latency (ns) and calls per second.
    histograms: Vec<(u64, u64, f64)>,
}

fn declare(out: &mut NodeSeries, name: &str, labels: &[(&str, String)], kind: MetricType) -> u64 {
    let id = out.declarations.len() as u64 + 1;
    out.declarations.push(Series {
        id,
        name: name.into(),
        labels: labels
            .iter()
            .map(|(name, value)| Label {
                name: (*name).into(),
                value: value.clone(),
            })
            .collect(),
        r#type: kind as i32,
    });
    id
}

fn node_series(node: usize, start_ms: i64) -> NodeSeries {
    let mut out = NodeSeries {
        declarations: Vec::new(),
        floats: Vec::new(),
        histograms: Vec::new(),
    };
    let gauge = MetricType::Gauge;
    let counter = MetricType::Counter;
    let seed = node as u64 * 1000;
    for gpu in 0..8usize {
        let base = vec![
            ("gpu", gpu.to_string()),
            (
                "uuid",
                format!("GPU-5a1c0d3e-0000-4000-8000-{node:06}{gpu:06}"),
            ),
            ("model", "NVIDIA H100 80GB HBM3".to_string()),
        ];
        let s = seed + gpu as u64 * 10;
        let mut float = |name: &str, labels: &[(&str, String)], kind, value: Value| {
            let mut all = base.clone();
            all.extend(labels.iter().cloned());
            let id = declare(&mut out, name, &all, kind);
            out.floats.push((id, value));
        };
        // A few GPUs run hot (GPUTemperatureHigh and variants fire for them).
        let hot = if (node + gpu).is_multiple_of(37) {
            30.0
        } else {
            0.0
        };
        float("vigil_gpu_up", &[], gauge, Box::new(|_| 1.0));
        float(
            "vigil_gpu_temperature_celsius",
            &[],
            gauge,
            Box::new(move |t| {
                55.0 + hot + 8.0 * ((t as f64 / 1.8e6) + s as f64).sin() + 2.0 * noise(s, t)
            }),
        );
        float(
            "vigil_gpu_utilization_ratio",
            &[],
            gauge,
            Box::new(move |t| {
                (0.6 + 0.3 * ((t as f64 / 3.6e6) + s as f64).sin() + 0.05 * noise(s + 1, t))
                    .clamp(0.0, 1.0)
            }),
        );
        float(
            "vigil_gpu_memory_used_bytes",
            &[],
            gauge,
            Box::new(move |t| 60e9 + 5e9 * noise(s + 2, t / 60_000)),
        );
        float(
            "vigil_gpu_memory_total_bytes",
            &[],
            gauge,
            Box::new(|_| 85_520_809_984.0),
        );
        float(
            "vigil_gpu_power_watts",
            &[],
            gauge,
            Box::new(move |t| 420.0 + 150.0 * noise(s + 3, t)),
        );
        float(
            "vigil_gpu_power_limit_watts",
            &[],
            gauge,
            Box::new(|_| 700.0),
        );
        for (n, reason) in [
            "sw_power_cap",
            "hw_slowdown",
            "sw_thermal_slowdown",
            "hw_thermal_slowdown",
            "hw_power_brake_slowdown",
        ]
        .into_iter()
        .enumerate()
        {
            let on = n == 0 && hot > 0.0;
            float(
                "vigil_gpu_throttle_reason",
                &[("reason", reason.into())],
                gauge,
                Box::new(move |_| if on { 1.0 } else { 0.0 }),
            );
        }
        for (kind, rate) in [("corrected", 0.001), ("uncorrected", 0.0)] {
            for counter_kind in ["volatile", "aggregate"] {
                float(
                    "vigil_gpu_ecc_errors_total",
                    &[("type", kind.into()), ("counter", counter_kind.into())],
                    counter,
                    Box::new(move |t| ((t - start_ms) as f64 / 1000.0 * rate).floor()),
                );
            }
        }
        for kind in ["single_bit", "double_bit"] {
            float(
                "vigil_gpu_ecc_error_events_total",
                &[("type", kind.into())],
                counter,
                Box::new(|_| 0.0),
            );
        }
        float("vigil_gpu_row_remap_failed", &[], gauge, Box::new(|_| 0.0));
    }
    // 4 processes of 2 model servers, each on 2 GPUs.
    for process in 0..4usize {
        let server = if process < 2 { "triton" } else { "vllm" };
        let pid = (1000 + process).to_string();
        let labels = vec![
            ("pid", pid.clone()),
            ("comm", server.to_string()),
            ("server", server.to_string()),
        ];
        let leaking = node.is_multiple_of(25) && process == 0;
        let id = declare(
            &mut out,
            "vigil_process_resident_memory_bytes",
            &labels,
            gauge,
        );
        out.floats.push((
            id,
            Box::new(move |t| {
                let growth = if leaking {
                    (t - start_ms) as f64 / 3.6e6 * 500e6
                } else {
                    0.0
                };
                8e9 + growth + 50e6 * noise(seed + process as u64, t / 60_000)
            }),
        ));
        let started = (start_ms / 1000 - 86_400) as f64;
        let id = declare(&mut out, "vigil_process_start_time_seconds", &labels, gauge);
        out.floats.push((id, Box::new(move |_| started)));
        let id = declare(
            &mut out,
            "vigil_process_cpu_seconds_total",
            &labels,
            counter,
        );
        out.floats
            .push((id, Box::new(move |t| (t - start_ms) as f64 / 1000.0 * 2.5)));
        for gpu in [process * 2, process * 2 + 1] {
            let mut with_gpu = labels.clone();
            with_gpu.push(("gpu", gpu.to_string()));
            let id = declare(
                &mut out,
                "vigil_gpu_process_memory_used_bytes",
                &with_gpu,
                gauge,
            );
            out.floats.push((id, Box::new(|_| 20e9)));
        }
    }
    for server in ["triton", "vllm"] {
        for (syscall, latency_ns) in [
            ("read", 20_000u64),
            ("write", 30_000),
            ("futex", 80_000),
            ("epoll_wait", 500_000),
            ("recvfrom", 15_000),
        ] {
            let id = declare(
                &mut out,
                "vigil_syscall_latency_seconds",
                &[
                    ("server", server.to_string()),
                    ("syscall", syscall.to_string()),
                ],
                MetricType::Histogram,
            );
            out.histograms.push((id, latency_ns, 2_000.0));
        }
    }
    for mode in ["user", "system", "iowait", "idle"] {
        let share = match mode {
            "idle" => 40.0,
            "user" => 20.0,
            _ => 2.0,
        };
        let id = declare(
            &mut out,
            "vigil_host_cpu_seconds_total",
            &[("mode", mode.into())],
            counter,
        );
        out.floats.push((
            id,
            Box::new(move |t| (t - start_ms) as f64 / 1000.0 * share),
        ));
    }
    let pressure = if node % 20 == 3 { 0.2 } else { 0.01 };
    let id = declare(
        &mut out,
        "vigil_host_pressure_cpu_full_seconds_total",
        &[],
        counter,
    );
    out.floats.push((
        id,
        Box::new(move |t| (t - start_ms) as f64 / 1000.0 * pressure),
    ));
    let id = declare(&mut out, "vigil_host_memory_available_bytes", &[], gauge);
    out.floats.push((
        id,
        Box::new(move |t| 200e9 + 10e9 * noise(seed + 77, t / 60_000)),
    ));
    let id = declare(&mut out, "vigil_agent_spool_bytes", &[], gauge);
    out.floats.push((id, Box::new(|_| 4096.0)));
    let id = declare(&mut out, "vigil_agent_spool_unacked_batches", &[], gauge);
    out.floats.push((id, Box::new(|_| 0.0)));
    out
}

/// Sends one node's data over its own stream, `per_batch` steps a batch, each acked.
async fn fill_node(
    endpoint: String,
    node: usize,
    times: Arc<Vec<i64>>,
    per_batch: usize,
) -> Result<usize, String> {
    use vigil_agent_common::histogram::bucket_index;
    let name = format!("gpu-node-{node:03}");
    let series = node_series(node, times[0]);
    let channel = Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{name}: connect: {e}"))?;
    let (outbound, rx) = mpsc::channel(4);
    let send = |body| {
        let outbound = outbound.clone();
        async move {
            outbound
                .send(AgentMessage { body: Some(body) })
                .await
                .map_err(|_| "stream closed".to_string())
        }
    };
    send(agent_message::Body::Hello(Hello {
        node: name.clone(),
        agent_version: "rule-eval".into(),
        boot_id: "rule-eval".into(),
        agent_instance: format!("{name}-rule-eval"),
        capabilities: Vec::new(),
    }))
    .await?;
    let mut inbound = IngestClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|status| format!("{name}: stream refused: {status}"))?
        .into_inner();
    // Histogram running totals: per series, per bucket (three buckets around its latency).
    let mut running: Vec<(Vec<(u32, u64)>, f64)> = series
        .histograms
        .iter()
        .map(|(_, latency, _)| {
            let buckets = [latency / 2, *latency, latency * 3]
                .into_iter()
                .map(|ns| (bucket_index(ns) as u32, 0u64))
                .collect();
            (buckets, 0.0)
        })
        .collect();
    let mut samples_sent = 0usize;
    for (n, chunk) in times.chunks(per_batch).enumerate() {
        let base = chunk[0];
        let mut batch = Batch {
            sequence: n as u64 + 1,
            series: if n == 0 {
                series.declarations.clone()
            } else {
                Vec::new()
            },
            base_time_ms: base,
            ..Batch::default()
        };
        for &t in chunk {
            for (id, value) in &series.floats {
                batch.samples.push(Sample {
                    series_id: *id,
                    time_delta_ms: t - base,
                    value: value(t),
                });
            }
            for ((id, latency, rate), (buckets, sum)) in series.histograms.iter().zip(&mut running)
            {
                let calls = (rate * (1.0 + 0.2 * noise(*id, t))) as u64;
                // 25% fast, 70% typical, 5% slow.
                let split = [calls / 4, calls * 70 / 100, calls / 20];
                for ((_, count), add) in buckets.iter_mut().zip(split) {
                    *count += add;
                }
                *sum += calls as f64 * *latency as f64 * 1e-9;
                let mut previous = 0;
                batch.histograms.push(Histogram {
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
                });
            }
        }
        samples_sent += batch.samples.len() + batch.histograms.len();
        let sequence = batch.sequence;
        send(agent_message::Body::Batch(batch)).await?;
        loop {
            let message = tokio::time::timeout(Duration::from_secs(60), inbound.message())
                .await
                .map_err(|_| format!("{name}: no ack within 60 s"))?
                .map_err(|status| format!("{name}: stream failed: {status}"))?
                .ok_or_else(|| format!("{name}: stream ended"))?;
            match message.body {
                Some(aggregator_message::Body::Ack(ack)) if ack.sequence == sequence => break,
                Some(aggregator_message::Body::Rejection(rejection)) => {
                    return Err(format!("{name}: rejected: {}", rejection.message));
                }
                _ => {}
            }
        }
    }
    Ok(samples_sent)
}

/// A generated rule: its expression and `for`, from a variant number.
type Template = Box<dyn Fn(usize) -> (String, &'static str)>;

/// Variants of the catalog's indicators over the same series, `count` of them, in groups of
/// 20 (as YAML).
fn variant_rules(count: usize) -> String {
    let templates: Vec<Template> = vec![
        Box::new(|k| {
            (
                format!("vigil_gpu_temperature_celsius > {}", 60 + k % 35),
                "2m",
            )
        }),
        Box::new(|k| {
            (
                format!(
                    "max_over_time(vigil_gpu_temperature_celsius[{}m]) > {}",
                    1 + k % 10,
                    65 + k % 30
                ),
                "0s",
            )
        }),
        Box::new(|k| {
            (
                format!(
                    "avg_over_time(vigil_gpu_utilization_ratio[{}m]) < 0.0{}",
                    5 + k % 15,
                    1 + k % 9
                ),
                "5m",
            )
        }),
        Box::new(|k| {
            (
                format!(
                    "avg by (node) (vigil_gpu_utilization_ratio) < 0.{}",
                    1 + k % 5
                ),
                "10m",
            )
        }),
        Box::new(|k| {
            (
                format!(
                    "vigil_gpu_memory_used_bytes / vigil_gpu_memory_total_bytes > 0.{}",
                    80 + k % 19
                ),
                "5m",
            )
        }),
        Box::new(|k| {
            (
                format!(
                    "vigil_gpu_power_watts / vigil_gpu_power_limit_watts > 0.{}",
                    85 + k % 14
                ),
                "5m",
            )
        }),
        Box::new(|k| {
            (
                format!(
                    "rate(vigil_process_cpu_seconds_total{{server!=\"\"}}[{}m]) > {}",
                    1 + k % 5,
                    4 + k % 8
                ),
                "5m",
            )
        }),
        Box::new(|k| {
            (
                format!(
                    "deriv(vigil_process_resident_memory_bytes{{server!=\"\"}}[{}m]) * 3600 > {}e6",
                    10 + k % 20,
                    50 + 10 * (k % 20)
                ),
                "30m",
            )
        }),
        Box::new(|k| {
            (
                format!(
                    "histogram_quantile(0.{}, sum by (node, server, le) \
                     (rate(vigil_syscall_latency_seconds_bucket{{server!=\"\"}}[{}m]))) > 0.00{}",
                    90 + k % 9,
                    1 + k % 10,
                    1 + k % 9
                ),
                "5m",
            )
        }),
        Box::new(|k| {
            (
                format!(
                    "sum by (node, server) (rate(vigil_syscall_latency_seconds_count[{}m])) < {}",
                    1 + k % 10,
                    100 + k
                ),
                "5m",
            )
        }),
        Box::new(|k| {
            (
                format!(
                    "rate(vigil_host_pressure_cpu_full_seconds_total[{}m]) > 0.{}",
                    1 + k % 5,
                    5 + k % 4
                ),
                "5m",
            )
        }),
        Box::new(|k| {
            (
                format!(
                    "sum by (node) (rate(vigil_host_cpu_seconds_total{{mode!=\"idle\"}}[{}m])) > {}",
                    1 + k % 5,
                    30 + k % 20
                ),
                "5m",
            )
        }),
        Box::new(|k| {
            (
                format!("vigil_host_memory_available_bytes < {}e9", 5 + k % 20),
                "5m",
            )
        }),
        Box::new(|k| {
            (
                format!(
                    "increase(vigil_gpu_ecc_errors_total{{type=\"corrected\"}}[{}m]) > {}",
                    5 + k % 25,
                    10 + k % 40
                ),
                "0s",
            )
        }),
        Box::new(|k| {
            let reasons = ["sw_power_cap", "hw_slowdown", "sw_thermal_slowdown"];
            (
                format!(
                    "vigil_gpu_throttle_reason{{reason=\"{}\"}} == 1",
                    reasons[k % reasons.len()]
                ),
                "5m",
            )
        }),
        Box::new(|k| {
            (
                format!("count by (node) (vigil_gpu_up) < {}", 2 + k % 7),
                "1m",
            )
        }),
        Box::new(|k| {
            (
                format!(
                    "time() - vigil_process_start_time_seconds{{server!=\"\"}} < {}",
                    60 + 30 * (k % 10)
                ),
                "0s",
            )
        }),
        Box::new(|k| {
            (
                format!(
                    "quantile_over_time(0.{}, vigil_gpu_temperature_celsius[{}m]) > {}",
                    5 + k % 4,
                    10 + k % 20,
                    70 + k % 20
                ),
                "5m",
            )
        }),
    ];
    let mut yaml = String::from("groups:\n");
    for n in 0..count {
        if n % 20 == 0 {
            yaml.push_str(&format!(
                "  - name: variants-{:02}\n    rules:\n",
                n / 20 + 1
            ));
        }
        let (expr, hold) = templates[n % templates.len()](n / templates.len() + n);
        yaml.push_str(&format!(
            "      - alert: Variant{n:03}\n        expr: '{expr}'\n        for: {hold}\n        \
             labels:\n          severity: warning\n        annotations:\n          \
             summary: \"{{{{ $labels.node }}}} at {{{{ $value }}}}\"\n"
        ));
    }
    yaml
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run(args: Args) -> Result<serde_json::Value, String> {
    let dir = std::env::temp_dir().join(format!("vigil-rule-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut config = AggregatorConfig {
        data_dir: dir.join("data"),
        ..AggregatorConfig::default()
    };
    config.grpc.listen = "127.0.0.1:0".parse().unwrap();
    config.tls.plaintext = true;
    config.audit.path = Some(dir.join("audit.log"));
    config.grpc.max_message_bytes = 64 << 20;
    let aggregator = vigil_aggregator::start(&config)
        .await
        .map_err(|e| format!("aggregator: {e}"))?;
    let endpoint = aggregator.grpc_addr().to_string();

    // Data up to a minute ago; rounds are evaluated at the following seconds.
    let end_ms = (now_ms() / 1000 - 60) * 1000;
    let span_ms = (args.hours * 3.6e6) as i64;
    let step_ms = args.step_s as i64 * 1000;
    let times: Arc<Vec<i64>> = Arc::new(
        (0..=span_ms / step_ms)
            .map(|k| end_ms - span_ms + k * step_ms)
            .collect(),
    );
    let per_batch = (300_000 / step_ms).max(1) as usize;
    let fill_started = Instant::now();
    let mut samples = 0usize;
    // Two nodes at a time: enough to keep the store busy without starving it.
    for pair in (0..args.nodes).collect::<Vec<_>>().chunks(2) {
        let tasks: Vec<_> = pair
            .iter()
            .map(|&node| tokio::spawn(fill_node(endpoint.clone(), node, times.clone(), per_batch)))
            .collect();
        for task in tasks {
            samples += task.await.map_err(|e| e.to_string())??;
        }
    }
    let fill_s = fill_started.elapsed().as_secs_f64();
    let store = aggregator.store().clone();
    let series = store.series().len();
    eprintln!(
        "rule-eval: {} nodes, {series} series, {samples} samples stored in {fill_s:.1} s",
        args.nodes
    );

    // The catalog's recordings over the last hour, as if its rules had been running.
    let wal_dir = dir.join("rules-wal");
    std::fs::create_dir_all(&wal_dir).map_err(|e| e.to_string())?;
    let (wal, _) = Wal::open(&wal_dir, 64 << 20, |_| {}).map_err(|e| e.to_string())?;
    let limits = Limits {
        max_series_per_node: 100_000,
        retention_ms: 15 * 86_400_000,
        max_future_skew_ms: 300_000,
    };
    let writer = SampleWriter::new(
        store.clone(),
        Arc::new(wal),
        Arc::new(IngestCounters::default()),
        limits,
        "vigil-aggregator",
        now_ms(),
    );
    let hour_start = end_ms - 3_600_000;
    for t in (hour_start..=end_ms).step_by(5_000) {
        let mut recorded = Vec::new();
        for node in 0..args.nodes {
            let name = format!("gpu-node-{node:03}");
            let labels = |metric: &str, extra: &[(&str, &str)]| {
                let mut labels = vec![
                    ("__name__".to_string(), metric.to_string()),
                    ("node".to_string(), name.clone()),
                ];
                labels.extend(extra.iter().map(|(n, v)| (n.to_string(), v.to_string())));
                labels.sort();
                labels
            };
            recorded.push((
                labels("vigil:agent_last_seen_timestamp_seconds", &[]),
                t as f64 / 1000.0,
            ));
            for server in ["triton", "vllm"] {
                recorded.push((
                    labels(
                        "vigil:syscall_latency_seconds:p99_5m",
                        &[("server", server)],
                    ),
                    0.0006 + 0.0001 * noise(node as u64, t),
                ));
            }
        }
        writer.write(t, now_ms(), recorded)?;
    }

    let rules_file = dir.join("variants.yml");
    let catalog_rules = {
        let text = std::fs::read_to_string(&args.catalog)
            .map_err(|e| format!("{}: {e}", args.catalog.display()))?;
        text.lines()
            .filter(|line| {
                let line = line.trim_start();
                line.starts_with("- alert:") || line.starts_with("- record:")
            })
            .count()
    };
    let variants = args.rules.saturating_sub(catalog_rules);
    std::fs::write(&rules_file, variant_rules(variants)).map_err(|e| e.to_string())?;
    let (_stop, shutdown) = watch::channel(false);
    let alerting = AlertingConfig {
        rule_files: vec![
            args.catalog.display().to_string(),
            rules_file.display().to_string(),
        ],
        ..AlertingConfig::default()
    };
    let manager = RuleManager::new(ManagerParts {
        engine: Engine::new(store.clone()),
        writer: SampleWriter::new(
            store.clone(),
            Arc::new(
                Wal::open(&dir.join("manager-wal"), 64 << 20, |_| {})
                    .map_err(|e| e.to_string())?
                    .0,
            ),
            Arc::new(IngestCounters::default()),
            limits,
            "vigil-aggregator",
            now_ms(),
        ),
        history: AlertHistory::in_memory(Duration::from_secs(86_400)),
        notifier: Notifier::start(&[], &[], Vec::new(), None, shutdown)?,
        config: alerting,
    })
    .map_err(|e| e.to_string())?;
    let groups = manager.groups();
    let rules: usize = groups.iter().map(|g| g.rules.len()).sum();

    let mut round_ms = Vec::new();
    let mut per_group: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for round in 0..=args.rounds {
        let ts = end_ms + 1_000 * (round as i64 + 1);
        let manager = manager.clone();
        let (elapsed, groups) = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            manager.evaluate_at(ts);
            (started.elapsed(), manager.groups())
        })
        .await
        .map_err(|e| e.to_string())?;
        round_ms.push(elapsed.as_secs_f64() * 1000.0);
        if round > 0 {
            for group in groups {
                per_group
                    .entry(group.group.name.clone())
                    .or_default()
                    .push(group.evaluation_seconds * 1000.0);
            }
        }
    }
    let failing: Vec<String> = manager
        .groups()
        .iter()
        .flat_map(|g| g.rules.iter())
        .filter_map(|r| {
            r.health
                .last_error
                .as_ref()
                .map(|e| format!("{}: {e}", r.rule.name))
        })
        .collect();
    if !failing.is_empty() {
        return Err(format!("rules failed: {failing:?}"));
    }
    // The slowest rules of the last round, with their expressions: where a round's time goes.
    let mut slowest: Vec<(f64, String, String)> = manager
        .groups()
        .iter()
        .flat_map(|g| g.rules.iter())
        .map(|r| {
            (
                r.health.evaluation_seconds * 1000.0,
                r.rule.name.clone(),
                r.rule.expr.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect();
    slowest.sort_by(|a, b| b.0.total_cmp(&a.0));
    let slowest: Vec<_> = slowest
        .into_iter()
        .take(12)
        .map(|(ms, name, expr)| json!({"rule": name, "ms": ms, "expr": expr}))
        .collect();
    // The shipped catalog's rules (last round): what the fast path waits for at this scale.
    let catalog: serde_json::Map<String, serde_json::Value> = manager
        .groups()
        .iter()
        .filter(|g| !g.group.name.starts_with("variants-"))
        .flat_map(|g| g.rules.iter())
        .map(|r| {
            (
                r.rule.name.clone(),
                json!(r.health.evaluation_seconds * 1000.0),
            )
        })
        .collect();
    let active = manager.active_alerts();
    let firing = active
        .iter()
        .filter(|a| a.state == AlertState::Firing)
        .count();
    let first = round_ms[0];
    let mut measured = round_ms[1..].to_vec();
    measured.sort_by(f64::total_cmp);
    let groups_json: Vec<_> = per_group
        .into_iter()
        .map(|(name, mut times)| {
            times.sort_by(f64::total_cmp);
            json!({"group": name, "median_ms": percentile(&times, 50.0)})
        })
        .collect();
    let report = json!({
        "nodes": args.nodes,
        "hours": args.hours,
        "step_s": args.step_s,
        "series": series,
        "samples": samples,
        "fill_s": fill_s,
        "rules": rules,
        "groups": groups.len(),
        "alerts_active": active.len(),
        "alerts_firing": firing,
        "rounds": measured.len(),
        "first_round_ms": first,
        "median_ms": percentile(&measured, 50.0),
        "p99_ms": percentile(&measured, 99.0),
        "max_ms": measured.last().copied().unwrap_or(0.0),
        "round_ms": round_ms,
        "per_group": groups_json,
        "slowest_rules": slowest,
        "catalog_rule_ms": catalog,
    });
    manager.stop().await;
    aggregator.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("rule-eval: {error}");
            std::process::exit(2);
        }
    };
    match run(args).await {
        Ok(report) => println!("{report}"),
        Err(error) => {
            eprintln!("rule-eval: {error}");
            std::process::exit(1);
        }
    }
}
