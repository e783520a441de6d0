//! `storage-load`: a deterministic GPU-node-shaped dataset for `cargo xtask bench storage`,
//! streamed into a `vigil-aggregator` over plaintext gRPC and, the same values, written as
//! OpenMetrics text for `promtool tsdb create-blocks-from openmetrics` (Prometheus's TSDB as
//! the peer to compare bytes per sample with).
//!
//! ```text
//! storage-load --shape node|histograms [--nodes N] [--hours H] [--end-ms MS]
//!              [--endpoint 127.0.0.1:PORT] [--openmetrics FILE] [--batch-seconds S]
//!              [--no-histograms]
//! ```
//!
//! Shapes (one reading per series per second):
//! - `node`: one GPU node, 1,000 series: 8 GPUs x 15 gauges and counters (120), 48 model-server
//!   processes x 12 (576), 184 host series, and 120 syscall-latency histograms (40 processes x
//!   read/write/futex). Values move like real ones: quantised random walks (utilization in
//!   percent steps, temperatures in whole degrees, power in milliwatts), counters with noisy
//!   rates, constants (limits, clocks), rare 0/1 flags.
//!   `--no-histograms` leaves the histograms out (float samples only, to compare bytes per
//!   float sample with Prometheus).
//! - `histograms`: `--nodes` nodes x 10 syscall-latency histograms, for the
//!   `histogram_quantile` over many nodes query.
//!
//! Each series has its own random generator seeded by its index, so the values do not depend
//! on the order they are produced in: the gRPC stream goes time-major (a batch holds
//! `--batch-seconds` of every series), the OpenMetrics file series-major (the format wants a
//! metric family's lines together). Histograms are not written to the OpenMetrics file
//! (Prometheus would store them as classic per-bucket series, a different thing to compare).
//!
//! Prints one JSON line: series, float and histogram samples sent, batches, seconds.

use std::{
    io::{BufWriter, Write},
    net::SocketAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{codec::CompressionEncoding, transport::Endpoint};
use vigil_agent_common::histogram::bucket_lower_bound_ns;
use vigil_proto::v1::{
    AgentMessage, Batch, Hello, Histogram, Label, MetricType, Sample, Series, agent_message,
    aggregator_message, ingest_client::IngestClient,
};

/// Batches sent before waiting for acks.
const WINDOW: u64 = 4;

struct Config {
    shape: Shape,
    nodes: usize,
    hours: f64,
    end_ms: i64,
    endpoint: Option<SocketAddr>,
    openmetrics: Option<std::path::PathBuf>,
    batch_seconds: i64,
    no_histograms: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Node,
    Histograms,
}

fn parse_args() -> Result<Config, String> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_millis() as i64;
    let mut config = Config {
        shape: Shape::Node,
        nodes: 1,
        hours: 24.0,
        // Whole seconds, a minute back, so nothing is "in the future" for the aggregator.
        end_ms: (now_ms / 1000 - 60) * 1000,
        endpoint: None,
        openmetrics: None,
        batch_seconds: 60,
        no_histograms: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--shape" => {
                config.shape = match value()?.as_str() {
                    "node" => Shape::Node,
                    "histograms" => Shape::Histograms,
                    other => return Err(format!("--shape {other}: node or histograms")),
                }
            }
            "--nodes" => config.nodes = value()?.parse().map_err(|e| format!("--nodes: {e}"))?,
            "--hours" => config.hours = value()?.parse().map_err(|e| format!("--hours: {e}"))?,
            "--end-ms" => config.end_ms = value()?.parse().map_err(|e| format!("--end-ms: {e}"))?,
            "--endpoint" => {
                config.endpoint = Some(value()?.parse().map_err(|e| format!("--endpoint: {e}"))?)
            }
            "--no-histograms" => config.no_histograms = true,
            "--openmetrics" => config.openmetrics = Some(value()?.into()),
            "--batch-seconds" => {
                config.batch_seconds = value()?
                    .parse()
                    .map_err(|e| format!("--batch-seconds: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if config.nodes == 0 || config.hours <= 0.0 || config.batch_seconds <= 0 {
        return Err("--nodes, --hours and --batch-seconds must be positive".into());
    }
    Ok(config)
}

/// xorshift64*: small, fast, deterministic.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How a float series moves from one second to the next.
#[derive(Clone)]
enum Motion {
    Constant,
    /// Random walk: each second, with probability `p`, a step of up to `step` either way;
    /// clamped to [min, max] and rounded to a multiple of `quantum`.
    Walk {
        p: f64,
        step: f64,
        min: f64,
        max: f64,
        quantum: f64,
    },
    /// A counter growing by `rate` per second, +-30 %, in multiples of `quantum`.
    Counter {
        rate: f64,
        quantum: f64,
    },
    /// 0 most of the time; 1 for a while now and then.
    Flag,
}

#[derive(Clone)]
struct FloatSeries {
    name: String,
    labels: Vec<(String, String)>,
    counter: bool,
    motion: Motion,
    start: f64,
}

#[derive(Clone)]
struct HistogramSeries {
    name: String,
    labels: Vec<(String, String)>,
    /// Bucket index around which observations fall.
    center: u32,
    /// Mean observations per second.
    rate: f64,
}

struct Dataset {
    node: String,
    floats: Vec<FloatSeries>,
    histograms: Vec<HistogramSeries>,
}

fn labels(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect()
}

fn walk(p: f64, step: f64, min: f64, max: f64, quantum: f64) -> Motion {
    Motion::Walk {
        p,
        step,
        min,
        max,
        quantum,
    }
}

fn node_dataset(node: &str) -> Dataset {
    let mut floats = Vec::new();
    let mut add = |name: &str, labels: Vec<(String, String)>, motion: Motion, start: f64| {
        floats.push(FloatSeries {
            name: name.to_owned(),
            counter: matches!(motion, Motion::Counter { .. }),
            labels,
            motion,
            start,
        })
    };
    for gpu in 0..8 {
        let l = labels(&[
            ("gpu", gpu.to_string()),
            (
                "uuid",
                format!("GPU-5e1f{gpu:04x}-0000-4000-8000-00000000{gpu:04x}"),
            ),
            ("model", "NVIDIA H200".into()),
        ]);
        let gb = 1024.0 * 1024.0 * 1024.0;
        add(
            "vigil_gpu_utilization_ratio",
            l.clone(),
            walk(0.5, 0.05, 0.0, 1.0, 0.01),
            0.6,
        );
        add(
            "vigil_gpu_memory_used_bytes",
            l.clone(),
            walk(0.05, 0.2 * gb, 0.0, 140.0 * gb, 2.0 * 1024.0 * 1024.0),
            60.0 * gb,
        );
        add(
            "vigil_gpu_memory_total_bytes",
            l.clone(),
            Motion::Constant,
            143_771_000_832.0,
        );
        add(
            "vigil_gpu_power_watts",
            l.clone(),
            walk(0.9, 25.0, 80.0, 700.0, 0.001),
            420.0,
        );
        add(
            "vigil_gpu_power_limit_watts",
            l.clone(),
            Motion::Constant,
            700.0,
        );
        add(
            "vigil_gpu_energy_joules_total",
            l.clone(),
            Motion::Counter {
                rate: 420.0,
                quantum: 0.001,
            },
            1.2e9,
        );
        add(
            "vigil_gpu_temperature_celsius",
            l.clone(),
            walk(0.1, 1.0, 30.0, 90.0, 1.0),
            61.0,
        );
        add(
            "vigil_gpu_fan_speed_ratio",
            l.clone(),
            walk(0.01, 0.05, 0.3, 1.0, 0.01),
            0.45,
        );
        add(
            "vigil_gpu_sm_clock_hertz",
            l.clone(),
            walk(0.05, 100e6, 345e6, 1980e6, 15e6),
            1755e6,
        );
        add(
            "vigil_gpu_memory_clock_hertz",
            l.clone(),
            Motion::Constant,
            2619e6,
        );
        add(
            "vigil_gpu_pcie_tx_bytes_per_second",
            l.clone(),
            walk(1.0, 2e8, 0.0, 6e10, 1024.0),
            2e9,
        );
        add(
            "vigil_gpu_pcie_rx_bytes_per_second",
            l.clone(),
            walk(1.0, 2e8, 0.0, 6e10, 1024.0),
            3e9,
        );
        add(
            "vigil_gpu_throttled",
            labels(&[("gpu", gpu.to_string()), ("reason", "sw_power_cap".into())]),
            Motion::Flag,
            0.0,
        );
        add(
            "vigil_gpu_ecc_errors_total",
            l.clone(),
            Motion::Constant,
            0.0,
        );
        add("vigil_gpu_performance_state", l, Motion::Constant, 0.0);
    }
    let servers = ["triton", "vllm", "torchserve", "tfserving"];
    for process in 0..48u32 {
        let l = labels(&[
            ("pid", (4000 + process * 37).to_string()),
            (
                "comm",
                format!("{}-{}", servers[process as usize % 4], process / 4),
            ),
            ("server", servers[process as usize % 4].into()),
        ]);
        let mib = 1024.0 * 1024.0;
        add(
            "vigil_process_cpu_seconds_total",
            l.clone(),
            Motion::Counter {
                rate: 0.8,
                quantum: 0.01,
            },
            5000.0,
        );
        add(
            "vigil_process_resident_memory_bytes",
            l.clone(),
            walk(0.3, 4.0 * mib, 1000.0 * mib, 9000.0 * mib, 4096.0),
            3000.0 * mib,
        );
        add(
            "vigil_process_virtual_memory_bytes",
            l.clone(),
            walk(0.05, 16.0 * mib, 20000.0 * mib, 90000.0 * mib, 4096.0),
            40000.0 * mib,
        );
        add(
            "vigil_process_threads",
            l.clone(),
            walk(0.02, 2.0, 8.0, 300.0, 1.0),
            96.0,
        );
        add(
            "vigil_process_open_fds",
            l.clone(),
            walk(0.1, 3.0, 20.0, 4000.0, 1.0),
            180.0,
        );
        add(
            "vigil_process_gpu_memory_bytes",
            l.clone(),
            walk(0.02, 64.0 * mib, 0.0, 80000.0 * mib, 2.0 * mib),
            16000.0 * mib,
        );
        add(
            "vigil_process_read_bytes_total",
            l.clone(),
            Motion::Counter {
                rate: 2e6,
                quantum: 4096.0,
            },
            1e10,
        );
        add(
            "vigil_process_write_bytes_total",
            l.clone(),
            Motion::Counter {
                rate: 5e5,
                quantum: 4096.0,
            },
            1e9,
        );
        add(
            "vigil_process_voluntary_context_switches_total",
            l.clone(),
            Motion::Counter {
                rate: 900.0,
                quantum: 1.0,
            },
            1e7,
        );
        add(
            "vigil_process_involuntary_context_switches_total",
            l.clone(),
            Motion::Counter {
                rate: 40.0,
                quantum: 1.0,
            },
            1e5,
        );
        add(
            "vigil_process_syscalls_total",
            l.clone(),
            Motion::Counter {
                rate: 20000.0,
                quantum: 1.0,
            },
            1e9,
        );
        add(
            "vigil_process_gpu_utilization_ratio",
            l,
            walk(0.5, 0.05, 0.0, 1.0, 0.01),
            0.3,
        );
    }
    // Host: 2 x 64 cores' worth of CPU mode counters are too many; 16 cores x 8 modes = 128.
    let modes = [
        "user", "system", "idle", "iowait", "irq", "softirq", "steal", "nice",
    ];
    for cpu in 0..16 {
        for (m, mode) in modes.iter().enumerate() {
            let rate = [0.45, 0.12, 0.38, 0.01, 0.005, 0.02, 0.0, 0.0][m];
            let motion = if rate == 0.0 {
                Motion::Constant
            } else {
                Motion::Counter {
                    rate,
                    quantum: 0.01,
                }
            };
            add(
                "vigil_host_cpu_seconds_total",
                labels(&[("cpu", cpu.to_string()), ("mode", mode.to_string())]),
                motion,
                1e6,
            );
        }
    }
    for (i, name) in [
        "vigil_host_memory_available_bytes",
        "vigil_host_memory_cached_bytes",
        "vigil_host_memory_buffers_bytes",
        "vigil_host_memory_dirty_bytes",
    ]
    .iter()
    .enumerate()
    {
        add(
            name,
            vec![],
            walk(0.8, 64e6, 1e9, 1e12, 4096.0),
            4e11 / (i + 1) as f64,
        );
    }
    add(
        "vigil_host_memory_total_bytes",
        vec![],
        Motion::Constant,
        2.06e12,
    );
    for resource in ["cpu", "memory", "io"] {
        for kind in ["some", "full"] {
            let l = labels(&[("resource", resource.into()), ("kind", kind.into())]);
            add(
                "vigil_host_pressure_ratio",
                l.clone(),
                walk(0.3, 0.01, 0.0, 1.0, 0.0001),
                0.02,
            );
            add(
                "vigil_host_pressure_stalled_seconds_total",
                l,
                Motion::Counter {
                    rate: 0.02,
                    quantum: 1e-6,
                },
                1e3,
            );
        }
    }
    for device in ["eth0", "eth1", "ib0", "ib1"] {
        let l = labels(&[("device", device.into())]);
        add(
            "vigil_host_network_receive_bytes_total",
            l.clone(),
            Motion::Counter {
                rate: 3e8,
                quantum: 1.0,
            },
            1e14,
        );
        add(
            "vigil_host_network_transmit_bytes_total",
            l.clone(),
            Motion::Counter {
                rate: 1e8,
                quantum: 1.0,
            },
            1e14,
        );
        add(
            "vigil_host_network_receive_packets_total",
            l.clone(),
            Motion::Counter {
                rate: 2e5,
                quantum: 1.0,
            },
            1e11,
        );
        add(
            "vigil_host_network_transmit_packets_total",
            l.clone(),
            Motion::Counter {
                rate: 1e5,
                quantum: 1.0,
            },
            1e11,
        );
        add(
            "vigil_host_network_receive_drops_total",
            l.clone(),
            Motion::Constant,
            12.0,
        );
        add("vigil_host_network_up", l, Motion::Constant, 1.0);
    }
    for disk in ["nvme0n1", "nvme1n1"] {
        let l = labels(&[("device", disk.into())]);
        add(
            "vigil_host_disk_read_bytes_total",
            l.clone(),
            Motion::Counter {
                rate: 5e7,
                quantum: 512.0,
            },
            1e13,
        );
        add(
            "vigil_host_disk_written_bytes_total",
            l.clone(),
            Motion::Counter {
                rate: 2e7,
                quantum: 512.0,
            },
            1e13,
        );
        add(
            "vigil_host_disk_io_seconds_total",
            l,
            Motion::Counter {
                rate: 0.05,
                quantum: 0.001,
            },
            1e5,
        );
    }
    for (name, start) in [
        ("vigil_host_load1", 12.0),
        ("vigil_host_load5", 11.0),
        ("vigil_host_load15", 10.0),
    ] {
        add(name, vec![], walk(1.0, 0.3, 0.0, 200.0, 0.01), start);
    }
    add(
        "vigil_host_context_switches_total",
        vec![],
        Motion::Counter {
            rate: 8e4,
            quantum: 1.0,
        },
        1e12,
    );
    add(
        "vigil_host_interrupts_total",
        vec![],
        Motion::Counter {
            rate: 5e4,
            quantum: 1.0,
        },
        1e12,
    );
    add(
        "vigil_host_forks_total",
        vec![],
        Motion::Counter {
            rate: 3.0,
            quantum: 1.0,
        },
        1e7,
    );
    add(
        "vigil_host_procs_running",
        vec![],
        walk(1.0, 3.0, 0.0, 128.0, 1.0),
        10.0,
    );
    add(
        "vigil_host_procs_blocked",
        vec![],
        walk(0.3, 1.0, 0.0, 20.0, 1.0),
        0.0,
    );
    add(
        "vigil_host_boot_time_seconds",
        vec![],
        Motion::Constant,
        1.7e9,
    );
    add(
        "vigil_host_entropy_bits",
        vec![],
        walk(0.5, 10.0, 200.0, 4096.0, 1.0),
        3800.0,
    );
    add(
        "vigil_host_filefd_allocated",
        vec![],
        walk(0.8, 20.0, 1000.0, 1e6, 1.0),
        25000.0,
    );
    add(
        "vigil_host_time_offset_seconds",
        vec![],
        walk(1.0, 1e-6, -1e-3, 1e-3, 1e-9),
        0.0,
    );
    add("vigil_host_up", vec![], Motion::Constant, 1.0);
    add(
        "vigil_agent_spool_bytes",
        vec![],
        walk(0.2, 4096.0, 0.0, 1e9, 512.0),
        0.0,
    );
    add(
        "vigil_agent_collect_seconds",
        vec![],
        walk(1.0, 0.0005, 0.001, 0.05, 1e-6),
        0.004,
    );
    add(
        "vigil_agent_resident_memory_bytes",
        vec![],
        walk(0.1, 65536.0, 1e7, 1e8, 4096.0),
        3.2e7,
    );
    // Board sensors fill the float series up to 880.
    while floats.len() < 880 {
        let i = floats.len();
        floats.push(FloatSeries {
            name: "vigil_host_hwmon_temperature_celsius".into(),
            labels: labels(&[("sensor", format!("temp{i}"))]),
            counter: false,
            motion: walk(0.05, 1.0, 20.0, 100.0, 1.0),
            start: 45.0,
        });
    }
    floats.truncate(880);

    let mut histograms = Vec::new();
    for process in 0..40u32 {
        for (s, syscall) in ["read", "write", "futex"].iter().enumerate() {
            histograms.push(HistogramSeries {
                name: "vigil_syscall_latency_seconds".into(),
                labels: labels(&[
                    ("pid", (4000 + process * 37).to_string()),
                    ("server", servers[process as usize % 4].into()),
                    ("syscall", syscall.to_string()),
                ]),
                center: 60 + 16 * s as u32 + process % 8,
                rate: 200.0 + 50.0 * (process % 5) as f64,
            });
        }
    }
    Dataset {
        node: node.to_owned(),
        floats,
        histograms,
    }
}

fn histogram_dataset(node: &str) -> Dataset {
    let servers = ["triton", "vllm"];
    let histograms = (0..10u32)
        .map(|i| HistogramSeries {
            name: "vigil_syscall_latency_seconds".into(),
            labels: labels(&[
                ("pid", (7000 + i / 5).to_string()),
                ("server", servers[(i / 5) as usize].into()),
                (
                    "syscall",
                    ["read", "write", "futex", "epoll_wait", "sendmsg"][i as usize % 5].into(),
                ),
            ]),
            center: 55 + 8 * (i % 5) + i / 5,
            rate: 300.0,
        })
        .collect();
    Dataset {
        node: node.to_owned(),
        floats: Vec::new(),
        histograms,
    }
}

/// A float series' generator state.
struct FloatState {
    rng: Rng,
    value: f64,
    /// Flag: seconds left in the current 1-stretch.
    flag_left: u32,
}

impl FloatState {
    fn new(seed: u64, series: &FloatSeries) -> FloatState {
        FloatState {
            rng: Rng::new(seed),
            value: series.start,
            flag_left: 0,
        }
    }

    fn next(&mut self, motion: &Motion) -> f64 {
        match *motion {
            Motion::Constant => {}
            Motion::Walk {
                p,
                step,
                min,
                max,
                quantum,
            } => {
                if self.rng.unit() < p {
                    let moved = self.value + (self.rng.unit() * 2.0 - 1.0) * step;
                    self.value = ((moved.clamp(min, max)) / quantum).round() * quantum;
                }
            }
            Motion::Counter { rate, quantum } => {
                let grown = rate * (0.7 + 0.6 * self.rng.unit());
                self.value += (grown / quantum).round() * quantum;
            }
            Motion::Flag => {
                if self.flag_left > 0 {
                    self.flag_left -= 1;
                } else if self.rng.unit() < 0.0005 {
                    self.flag_left = 30 + (self.rng.next() % 300) as u32;
                }
                self.value = if self.flag_left > 0 { 1.0 } else { 0.0 };
            }
        }
        self.value
    }
}

/// A histogram series' generator state: cumulative per-bucket counts.
struct HistogramState {
    rng: Rng,
    buckets: std::collections::BTreeMap<u32, u64>,
    count: u64,
    sum_seconds: f64,
}

impl HistogramState {
    fn new(seed: u64) -> HistogramState {
        HistogramState {
            rng: Rng::new(seed ^ 0xABCD_EF01),
            buckets: Default::default(),
            count: 0,
            sum_seconds: 0.0,
        }
    }

    fn next(&mut self, series: &HistogramSeries) -> Histogram {
        let observations = (series.rate * (0.5 + self.rng.unit())) as u64;
        for _ in 0..observations {
            // Mostly near the center, a tail of slow calls above it.
            let u = self.rng.unit();
            let offset = if u < 0.9 {
                (self.rng.unit() * 12.0) as i64 - 6
            } else {
                6 + (self.rng.unit() * 24.0) as i64
            };
            let index = (series.center as i64 + offset).max(0) as u32;
            *self.buckets.entry(index).or_default() += 1;
            self.count += 1;
            let lower = bucket_lower_bound_ns(index as usize) as f64 / 1e9;
            self.sum_seconds += lower * (1.0 + self.rng.unit() / 16.0);
        }
        let mut previous = 0u32;
        let mut deltas = Vec::with_capacity(self.buckets.len());
        let mut counts = Vec::with_capacity(self.buckets.len());
        for (&index, &count) in &self.buckets {
            deltas.push(index - previous);
            counts.push(count);
            previous = index;
        }
        Histogram {
            series_id: 0,
            time_delta_ms: 0,
            count: self.count,
            sum_seconds: self.sum_seconds,
            bucket_index_deltas: deltas,
            bucket_counts: counts,
        }
    }
}

fn wire_labels(labels: &[(String, String)]) -> Vec<Label> {
    labels
        .iter()
        .map(|(name, value)| Label {
            name: name.clone(),
            value: value.clone(),
        })
        .collect()
}

fn declarations(dataset: &Dataset) -> Vec<Series> {
    let floats = dataset.floats.iter().enumerate().map(|(i, s)| Series {
        id: i as u64,
        name: s.name.clone(),
        labels: wire_labels(&s.labels),
        r#type: if s.counter {
            MetricType::Counter
        } else {
            MetricType::Gauge
        } as i32,
    });
    let base = dataset.floats.len();
    let histograms = dataset.histograms.iter().enumerate().map(|(i, s)| Series {
        id: (base + i) as u64,
        name: s.name.clone(),
        labels: wire_labels(&s.labels),
        r#type: MetricType::Histogram as i32,
    });
    floats.chain(histograms).collect()
}

fn seed(node_index: usize, series_index: usize) -> u64 {
    ((node_index as u64) << 32) ^ series_index as u64 ^ 0x5EED
}

/// Writes the float series as OpenMetrics, series-major.
fn write_openmetrics(
    out: &mut impl Write,
    datasets: &[Dataset],
    start_ms: i64,
    seconds: i64,
) -> std::io::Result<u64> {
    let mut samples = 0u64;
    let mut families: Vec<&str> = datasets
        .iter()
        .flat_map(|d| d.floats.iter().map(|s| s.name.as_str()))
        .collect();
    families.sort_unstable();
    families.dedup();
    for family in families {
        writeln!(out, "# TYPE {family} gauge")?;
        for (node_index, dataset) in datasets.iter().enumerate() {
            for (i, series) in dataset.floats.iter().enumerate() {
                if series.name != family {
                    continue;
                }
                let mut text = format!("{family}{{node=\"{}\"", dataset.node);
                for (name, value) in &series.labels {
                    text.push_str(&format!(",{name}=\"{value}\""));
                }
                text.push('}');
                let mut state = FloatState::new(seed(node_index, i), series);
                for second in 0..seconds {
                    let value = state.next(&series.motion);
                    let t = start_ms / 1000 + second;
                    writeln!(out, "{text} {value} {t}")?;
                    samples += 1;
                }
            }
        }
    }
    writeln!(out, "# EOF")?;
    Ok(samples)
}

struct Sent {
    floats: u64,
    histograms: u64,
    batches: u64,
}

/// Streams one node's dataset as one agent, time-major, `batch_seconds` per batch.
async fn stream_node(
    endpoint: SocketAddr,
    node_index: usize,
    dataset: &Dataset,
    start_ms: i64,
    seconds: i64,
    batch_seconds: i64,
) -> Result<Sent, String> {
    let channel = Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connecting to {endpoint}: {e}"))?;
    let (tx, rx) = mpsc::channel::<AgentMessage>(WINDOW as usize + 1);
    tx.send(AgentMessage {
        body: Some(agent_message::Body::Hello(Hello {
            node: dataset.node.clone(),
            agent_version: "storage-load".into(),
            boot_id: "storage-load".into(),
            agent_instance: format!("storage-load-{node_index}"),
            capabilities: vec![],
        })),
    })
    .await
    .map_err(|e| e.to_string())?;
    let mut client = IngestClient::new(channel)
        .send_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(64 << 20);
    let mut inbound = client
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|status| format!("stream refused: {status}"))?
        .into_inner();

    let mut floats: Vec<FloatState> = dataset
        .floats
        .iter()
        .enumerate()
        .map(|(i, s)| FloatState::new(seed(node_index, i), s))
        .collect();
    let mut histograms: Vec<HistogramState> = (0..dataset.histograms.len())
        .map(|i| HistogramState::new(seed(node_index, dataset.floats.len() + i)))
        .collect();
    let mut sent = Sent {
        floats: 0,
        histograms: 0,
        batches: 0,
    };
    let mut acked = 0u64;
    let mut second = 0i64;
    while second < seconds {
        let span = batch_seconds.min(seconds - second);
        let base = start_ms + second * 1000;
        let mut batch = Batch {
            sequence: sent.batches + 1,
            series: if sent.batches == 0 {
                declarations(dataset)
            } else {
                vec![]
            },
            base_time_ms: base,
            ..Default::default()
        };
        for offset in 0..span {
            for (i, (series, state)) in dataset.floats.iter().zip(&mut floats).enumerate() {
                batch.samples.push(Sample {
                    series_id: i as u64,
                    time_delta_ms: offset * 1000,
                    value: state.next(&series.motion),
                });
            }
            for (i, (series, state)) in dataset.histograms.iter().zip(&mut histograms).enumerate() {
                let mut histogram = state.next(series);
                histogram.series_id = (dataset.floats.len() + i) as u64;
                histogram.time_delta_ms = offset * 1000;
                batch.histograms.push(histogram);
            }
        }
        sent.floats += batch.samples.len() as u64;
        sent.histograms += batch.histograms.len() as u64;
        sent.batches += 1;
        second += span;
        tx.send(AgentMessage {
            body: Some(agent_message::Body::Batch(batch)),
        })
        .await
        .map_err(|_| "the stream closed".to_string())?;
        // Keep at most WINDOW batches unacked.
        while sent.batches - acked >= WINDOW || (second >= seconds && acked < sent.batches) {
            match tokio::time::timeout(Duration::from_secs(120), inbound.message()).await {
                Err(_) => return Err(format!("no ack for 120 s (acked {acked})")),
                Ok(Err(status)) => return Err(format!("stream failed: {status}")),
                Ok(Ok(None)) => return Err("stream ended".into()),
                Ok(Ok(Some(message))) => match message.body {
                    Some(aggregator_message::Body::Ack(ack)) => acked = ack.sequence,
                    Some(aggregator_message::Body::Rejection(rejection)) => {
                        return Err(format!("batch rejected in part: {rejection:?}"));
                    }
                    None => {}
                },
            }
        }
    }
    Ok(sent)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let config = match parse_args() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("storage-load: {error}");
            std::process::exit(2);
        }
    };
    let seconds = (config.hours * 3600.0).round() as i64;
    let start_ms = config.end_ms - seconds * 1000;
    let datasets: Vec<Dataset> = (0..config.nodes)
        .map(|n| {
            let node = format!("gpu-node-{n:03}");
            let mut dataset = match config.shape {
                Shape::Node => node_dataset(&node),
                Shape::Histograms => histogram_dataset(&node),
            };
            if config.no_histograms {
                dataset.histograms.clear();
            }
            dataset
        })
        .collect();
    let started = Instant::now();
    let mut openmetrics_samples = 0;
    if let Some(path) = &config.openmetrics {
        let file = std::fs::File::create(path).unwrap_or_else(|e| {
            eprintln!("storage-load: {}: {e}", path.display());
            std::process::exit(1);
        });
        let mut out = BufWriter::with_capacity(1 << 20, file);
        openmetrics_samples = write_openmetrics(&mut out, &datasets, start_ms, seconds)
            .and_then(|n| out.flush().map(|_| n))
            .unwrap_or_else(|e| {
                eprintln!("storage-load: writing {}: {e}", path.display());
                std::process::exit(1);
            });
    }
    let written_s = started.elapsed().as_secs_f64();
    let mut totals = Sent {
        floats: 0,
        histograms: 0,
        batches: 0,
    };
    if let Some(endpoint) = config.endpoint {
        // Nodes one after another: the figure of interest is what is stored, not ingest speed.
        for (node_index, dataset) in datasets.iter().enumerate() {
            match stream_node(
                endpoint,
                node_index,
                dataset,
                start_ms,
                seconds,
                config.batch_seconds,
            )
            .await
            {
                Ok(sent) => {
                    totals.floats += sent.floats;
                    totals.histograms += sent.histograms;
                    totals.batches += sent.batches;
                }
                Err(error) => {
                    eprintln!("storage-load: node {}: {error}", dataset.node);
                    std::process::exit(1);
                }
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "nodes": config.nodes,
            "float_series": datasets.iter().map(|d| d.floats.len()).sum::<usize>(),
            "histogram_series": datasets.iter().map(|d| d.histograms.len()).sum::<usize>(),
            "start_ms": start_ms,
            "end_ms": config.end_ms,
            "float_samples_sent": totals.floats,
            "histogram_samples_sent": totals.histograms,
            "batches": totals.batches,
            "openmetrics_samples": openmetrics_samples,
            "openmetrics_seconds": written_s,
            "stream_seconds": started.elapsed().as_secs_f64() - written_s,
        })
    );
}
