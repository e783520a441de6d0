//! `ingest-load`: simulates N Vigil agents streaming to a `vigil-aggregator` over plaintext gRPC
//! on loopback, for `cargo xtask bench ingest`. Prints one JSON report on stdout.
//!
//! ```text
//! ingest-load --endpoint 127.0.0.1:PORT --agents N --duration-s S
//!             [--mode throughput|interval] [--window W] [--interval-ms MS] [--threads T]
//!             [--encoding delta|plain]
//! ```
//!
//! Each agent is one TCP connection with one `Ingest.Stream`: a Hello, then batch 1, which
//! declares the agent's series (8 GPUs x 30 gauges, 64 model-server processes x 15 metrics, 80
//! host series, and 10 syscall latency histograms per process with 20-40 non-empty buckets),
//! then batches 2, 3, ... each with one reading of every series (1,280 values + 640 histograms
//! = 1,920 samples, a histogram counting as one). Requests are zstd-compressed by tonic, as the
//! agent's are. Sending starts once every agent has had its declarations acked (the time that
//! takes is reported as `declare_s`, and the line `ingest-load: sending` marks it on stdout), so
//! the figures are of the steady state.
//!
//! To keep the generator cheap, 128 consecutive readings (a second apart: gauges around their
//! base, counters growing, histogram buckets gaining Poisson-distributed observations) are
//! encoded once, shared by all agents (series ids are the same on every agent; labels differ);
//! each send only writes the sequence number and base time in front of a reading's bytes.
//! `--encoding delta` (default) codes each reading against the previous one as the real agent
//! does against an aggregator that offers it (vigil_proto::delta; the ring carries one more
//! entry, reading 0 coded against reading 127, so a stream cycles through the ring with its
//! encoding state right); `--encoding plain` sends plain Batches, each compressed alone.
//!
//! Modes: `throughput` sends as fast as acks allow (at most `--window` batches unacked per
//! agent) for the duration; `interval` sends one batch per agent per `--interval-ms`, agents
//! spread evenly over the interval. Either way an agent then waits (up to 10 s) for its last
//! acks; batches still unacked then count with the time they waited (so percentiles become
//! lower bounds, and `batches_unacked_at_end` says so). Ack latency is the time from a batch's
//! send (in `interval` mode, its scheduled time) to the Ack that covers it. Bytes on the wire
//! are counted on the client sockets (every byte written: HTTP/2 frames, gRPC frames).

use std::{
    collections::VecDeque,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::{BufMut, Bytes};
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{Notify, mpsc, watch},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Status,
    codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::{Endpoint, Uri},
};
use vigil_proto::delta::{DELTA_V1, DeltaEncoder, ENCODINGS_HEADER};
use vigil_proto::v1::{
    self as wire, AgentMessage, AggregatorMessage, MetricType, agent_message, aggregator_message,
};

const GPUS: usize = 8;
const PROCESSES: usize = 64;
const SYSCALLS: [&str; 10] = [
    "read",
    "write",
    "futex",
    "epoll_wait",
    "mmap",
    "ioctl",
    "recvfrom",
    "sendto",
    "openat",
    "close",
];
/// Consecutive readings encoded ahead of time, cycled through by every agent.
const RING: usize = 128;
/// How long an agent waits for its last acks once it stops sending.
const DRAIN: Duration = Duration::from_secs(10);
/// zstd level tonic compresses with (zstd's default).
const ZSTD_LEVEL: i32 = 3;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Throughput,
    Interval,
}

struct Config {
    endpoint: SocketAddr,
    agents: usize,
    duration: Duration,
    mode: Mode,
    window: usize,
    interval: Duration,
    threads: usize,
    encoding: Encoding,
}

fn parse_args() -> Result<Config, String> {
    let mut config = Config {
        endpoint: "127.0.0.1:7401".parse().unwrap(),
        agents: 64,
        duration: Duration::from_secs(10),
        mode: Mode::Throughput,
        window: 8,
        interval: Duration::from_secs(1),
        threads: 2,
        encoding: Encoding::Delta,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--endpoint" => {
                config.endpoint = value.parse().map_err(|e| format!("--endpoint: {e}"))?;
                if !config.endpoint.ip().is_loopback() {
                    return Err("--endpoint must be a loopback address".into());
                }
            }
            "--agents" => config.agents = number()?.clamp(1, 20_000) as usize,
            "--duration-s" => config.duration = Duration::from_secs(number()?.clamp(1, 600)),
            "--window" => config.window = number()?.clamp(1, 256) as usize,
            "--interval-ms" => config.interval = Duration::from_millis(number()?.max(1)),
            "--threads" => config.threads = number()?.clamp(1, 64) as usize,
            "--encoding" => {
                config.encoding = match value.as_str() {
                    "delta" => Encoding::Delta,
                    "plain" => Encoding::Plain,
                    other => return Err(format!("--encoding {other}: delta or plain")),
                }
            }
            "--mode" => {
                config.mode = match value.as_str() {
                    "throughput" => Mode::Throughput,
                    "interval" => Mode::Interval,
                    other => return Err(format!("--mode {other}: throughput or interval")),
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(config)
}

// ---------------------------------------------------------------------------------------------
// The simulated node: series and their values.

/// splitmix64: deterministic and cheap.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// How a series' value moves from one reading to the next.
#[derive(Clone, Copy)]
enum Shape {
    /// Never changes (limits, totals, error counters at 0).
    Const(f64),
    /// Integer readings: bytes, MHz, degrees, running counts; `step` per reading plus jitter.
    Int { base: f64, step: f64, jitter: f64 },
    /// Fractional readings at a fixed resolution (`1/div`): watts from milliwatts, ratios from
    /// percent, CPU seconds from clock ticks; `step` per reading (counters) plus jitter.
    Frac {
        base: f64,
        step: f64,
        jitter: f64,
        div: f64,
    },
}

impl Shape {
    fn value(self, reading: u64, rng: &mut Rng) -> f64 {
        match self {
            Shape::Const(value) => value,
            Shape::Int { base, step, jitter } => {
                (base + step * reading as f64 + (rng.unit() * jitter).floor()).round()
            }
            Shape::Frac {
                base,
                step,
                jitter,
                div,
            } => ((base + step * reading as f64 + rng.unit() * jitter) * div).round() / div,
        }
    }
}

struct ValueSeries {
    name: &'static str,
    labels: Vec<(&'static str, String)>,
    counter: bool,
    shape: Shape,
}

struct HistogramSeries {
    labels: Vec<(&'static str, String)>,
    /// Index steps between non-empty buckets (the first is the first bucket's index).
    deltas: Vec<u32>,
    /// Relative weight of each non-empty bucket.
    weights: Vec<f64>,
    /// Observations so far and per reading.
    base: f64,
    rate: f64,
}

struct Node {
    values: Vec<ValueSeries>,
    histograms: Vec<HistogramSeries>,
}

fn gauge(
    name: &'static str,
    labels: Vec<(&'static str, String)>,
    counter: bool,
    shape: Shape,
) -> ValueSeries {
    ValueSeries {
        name,
        labels,
        counter,
        shape,
    }
}

/// The series of one simulated node. Shapes depend only on the series (so every agent shares
/// the encoded samples); `agent` only changes label values (GPU UUIDs, pids).
fn node(agent: usize) -> Node {
    use Shape::{Const, Frac, Int};
    let mut rng = Rng(0x5eed);
    let mut values = Vec::new();
    for gpu in 0..GPUS {
        let labels = || {
            vec![
                ("gpu", gpu.to_string()),
                ("uuid", format!("GPU-{agent:08x}-4000-8000-{gpu:012x}")),
                ("model", "NVIDIA H100 80GB HBM3".to_string()),
            ]
        };
        let util = rng.unit() * 40.0 + 55.0;
        let int = |base: f64, step: f64, jitter: f64| Int { base, step, jitter };
        let frac = |base: f64, jitter: f64, div: f64| Frac {
            base,
            step: 0.0,
            jitter,
            div,
        };
        let specs: [(&'static str, bool, Shape); 30] = [
            (
                "vigil_gpu_memory_total_bytes",
                false,
                Const(85_520_809_984.0),
            ),
            ("vigil_gpu_power_limit_watts", false, Const(700.0)),
            ("vigil_gpu_sm_clock_max_hertz", false, Const(1.98e9)),
            ("vigil_gpu_memory_clock_max_hertz", false, Const(2.619e9)),
            ("vigil_gpu_ecc_corrected_errors_total", true, Const(0.0)),
            ("vigil_gpu_ecc_uncorrected_errors_total", true, Const(0.0)),
            ("vigil_gpu_xid_errors_total", true, Const(0.0)),
            ("vigil_gpu_retired_pages", false, Const(0.0)),
            ("vigil_gpu_pcie_link_generation", false, Const(5.0)),
            ("vigil_gpu_pcie_link_width", false, Const(16.0)),
            (
                "vigil_gpu_memory_used_bytes",
                false,
                int(6.8e10, 0.0, 2.0e8),
            ),
            (
                "vigil_gpu_memory_free_bytes",
                false,
                int(1.6e10, 0.0, 2.0e8),
            ),
            ("vigil_gpu_sm_clock_hertz", false, int(1.755e9, 0.0, 4.0)),
            ("vigil_gpu_memory_clock_hertz", false, Const(2.619e9)),
            ("vigil_gpu_temperature_celsius", false, int(68.0, 0.0, 6.0)),
            (
                "vigil_gpu_memory_temperature_celsius",
                false,
                int(74.0, 0.0, 5.0),
            ),
            (
                "vigil_gpu_pcie_tx_bytes_total",
                true,
                int(4.1e12, 2.3e9, 1.0e8),
            ),
            (
                "vigil_gpu_pcie_rx_bytes_total",
                true,
                int(9.7e12, 5.1e9, 1.0e8),
            ),
            (
                "vigil_gpu_nvlink_tx_bytes_total",
                true,
                int(8.8e13, 4.0e10, 1.0e9),
            ),
            (
                "vigil_gpu_nvlink_rx_bytes_total",
                true,
                int(8.7e13, 4.0e10, 1.0e9),
            ),
            ("vigil_gpu_throttle_reasons", false, int(4.0, 0.0, 1.0)),
            (
                "vigil_gpu_utilization_ratio",
                false,
                frac(util / 100.0, 0.05, 100.0),
            ),
            (
                "vigil_gpu_memory_utilization_ratio",
                false,
                frac(0.45, 0.2, 100.0),
            ),
            ("vigil_gpu_power_watts", false, frac(560.0, 120.0, 1000.0)),
            (
                "vigil_gpu_energy_joules_total",
                true,
                Frac {
                    base: 2.1e8,
                    step: 600.0,
                    jitter: 100.0,
                    div: 1000.0,
                },
            ),
            ("vigil_gpu_sm_active_ratio", false, frac(0.7, 0.2, 1000.0)),
            (
                "vigil_gpu_sm_occupancy_ratio",
                false,
                frac(0.4, 0.2, 1000.0),
            ),
            (
                "vigil_gpu_tensor_active_ratio",
                false,
                frac(0.3, 0.3, 1000.0),
            ),
            ("vigil_gpu_dram_active_ratio", false, frac(0.5, 0.3, 1000.0)),
            ("vigil_gpu_encoder_utilization_ratio", false, Const(0.0)),
        ];
        for (name, counter, shape) in specs {
            values.push(gauge(name, labels(), counter, shape));
        }
    }
    let mut histograms = Vec::new();
    for process in 0..PROCESSES {
        let pid = 20_000 + (agent * 131 + process * 17) % 40_000;
        let labels = || {
            vec![
                ("pid", pid.to_string()),
                ("comm", "model-server".to_string()),
                ("pod", format!("inference-{}", process / 8)),
            ]
        };
        let int = |base: f64, step: f64, jitter: f64| Int { base, step, jitter };
        let specs: [(&'static str, bool, Shape); 15] = [
            (
                "vigil_process_cpu_user_seconds_total",
                true,
                Frac {
                    base: 5.0e4,
                    step: 2.5,
                    jitter: 0.5,
                    div: 100.0,
                },
            ),
            (
                "vigil_process_cpu_system_seconds_total",
                true,
                Frac {
                    base: 9.0e3,
                    step: 0.3,
                    jitter: 0.2,
                    div: 100.0,
                },
            ),
            (
                "vigil_process_io_wait_seconds_total",
                true,
                Frac {
                    base: 120.0,
                    step: 0.05,
                    jitter: 0.05,
                    div: 100.0,
                },
            ),
            (
                "vigil_process_resident_memory_bytes",
                false,
                int(1.2e10, 0.0, 1.0e6),
            ),
            (
                "vigil_process_virtual_memory_bytes",
                false,
                int(3.4e11, 0.0, 1.0e6),
            ),
            (
                "vigil_process_threads",
                false,
                Const(96.0 + (process % 5) as f64),
            ),
            (
                "vigil_process_open_fds",
                false,
                Const(512.0 + process as f64),
            ),
            (
                "vigil_process_start_time_seconds",
                false,
                Const(1.7643e9 + process as f64),
            ),
            (
                "vigil_process_read_bytes_total",
                true,
                int(3.1e10, 1.0e6, 4.0e5),
            ),
            (
                "vigil_process_write_bytes_total",
                true,
                int(8.0e9, 2.0e5, 1.0e5),
            ),
            (
                "vigil_process_voluntary_context_switches_total",
                true,
                int(4.0e8, 9.0e3, 2.0e3),
            ),
            (
                "vigil_process_involuntary_context_switches_total",
                true,
                int(2.0e6, 40.0, 30.0),
            ),
            (
                "vigil_process_minor_faults_total",
                true,
                int(7.0e7, 300.0, 200.0),
            ),
            ("vigil_process_major_faults_total", true, Const(12.0)),
            (
                "vigil_process_gpu_memory_bytes",
                false,
                int(8.5e9, 0.0, 1.0),
            ),
        ];
        for (name, counter, shape) in specs {
            values.push(gauge(name, labels(), counter, shape));
        }
        for syscall in SYSCALLS {
            let buckets = 20 + rng.below(21) as usize;
            let first_bucket = 20 + rng.below(60) as u32;
            let deltas = (0..buckets)
                .map(|k| match k {
                    0 => first_bucket,
                    _ if rng.below(8) == 0 => 2,
                    _ => 1,
                })
                .collect();
            let peak = rng.unit() * buckets as f64;
            let weights = (0..buckets)
                .map(|k| {
                    let d = (k as f64 - peak) / 4.0;
                    (-d * d).exp() + 0.002
                })
                .collect();
            let mut labels = labels();
            labels.push(("syscall", syscall.to_string()));
            histograms.push(HistogramSeries {
                labels,
                deltas,
                weights,
                base: 10f64.powf(4.0 + rng.unit() * 4.0),
                rate: 10f64.powf(1.0 + rng.unit() * 3.5),
            });
        }
    }
    // Host: 80 series.
    let host = |name: &'static str, labels: Vec<(&'static str, String)>, counter, shape| {
        gauge(name, labels, counter, shape)
    };
    // CPU seconds per second of a 224-CPU node, by mode.
    for (mode, step) in [
        ("user", 60.0),
        ("system", 10.0),
        ("idle", 150.0),
        ("iowait", 1.0),
        ("irq", 0.5),
        ("softirq", 2.0),
        ("steal", 0.0),
        ("nice", 0.2),
    ] {
        values.push(host(
            "vigil_host_cpu_seconds_total",
            vec![("mode", mode.to_string())],
            true,
            Frac {
                base: 4.0e6,
                step,
                jitter: step * 0.2,
                div: 100.0,
            },
        ));
    }
    for (i, name) in ["vigil_host_load1", "vigil_host_load5", "vigil_host_load15"]
        .into_iter()
        .enumerate()
    {
        values.push(host(
            name,
            vec![],
            false,
            Frac {
                base: 40.0 + i as f64,
                step: 0.0,
                jitter: 3.0,
                div: 100.0,
            },
        ));
    }
    for field in [
        "total",
        "free",
        "available",
        "buffers",
        "cached",
        "shmem",
        "slab",
        "swap_total",
        "swap_free",
        "dirty",
    ] {
        values.push(host(
            "vigil_host_memory_bytes",
            vec![("field", field.to_string())],
            false,
            Int {
                base: 1.0e12,
                step: 0.0,
                jitter: 4.0e7,
            },
        ));
    }
    for device in ["eth0", "eth1", "ib0", "ib1"] {
        for counter in [
            "receive_bytes",
            "transmit_bytes",
            "receive_packets",
            "transmit_packets",
            "receive_errors",
            "transmit_errors",
            "receive_drops",
            "transmit_drops",
        ] {
            let busy = !counter.ends_with("errors") && !counter.ends_with("drops");
            values.push(host(
                "vigil_host_network_total",
                vec![
                    ("device", device.to_string()),
                    ("counter", counter.to_string()),
                ],
                true,
                if busy {
                    Int {
                        base: 1.0e13,
                        step: 1.2e8,
                        jitter: 1.0e6,
                    }
                } else {
                    Const(3.0)
                },
            ));
        }
    }
    for device in ["nvme0n1", "nvme1n1"] {
        for counter in [
            "reads_completed",
            "writes_completed",
            "read_bytes",
            "written_bytes",
            "read_time_seconds",
            "write_time_seconds",
            "io_time_seconds",
            "ios_in_progress",
        ] {
            values.push(host(
                "vigil_host_disk_total",
                vec![
                    ("device", device.to_string()),
                    ("counter", counter.to_string()),
                ],
                true,
                if counter.ends_with("seconds") {
                    Frac {
                        base: 9.0e4,
                        step: 2.0,
                        jitter: 1.0,
                        div: 1000.0,
                    }
                } else {
                    Int {
                        base: 5.0e10,
                        step: 4.0e5,
                        jitter: 1.0e4,
                    }
                },
            ));
        }
    }
    for (name, counter, shape) in [
        (
            "vigil_host_procs_running",
            false,
            Int {
                base: 60.0,
                step: 0.0,
                jitter: 20.0,
            },
        ),
        ("vigil_host_procs_blocked", false, Const(0.0)),
        (
            "vigil_host_context_switches_total",
            true,
            Int {
                base: 9.0e11,
                step: 1.5e6,
                jitter: 1.0e5,
            },
        ),
        (
            "vigil_host_interrupts_total",
            true,
            Int {
                base: 4.0e11,
                step: 8.0e5,
                jitter: 1.0e5,
            },
        ),
        (
            "vigil_host_forks_total",
            true,
            Int {
                base: 2.0e7,
                step: 30.0,
                jitter: 10.0,
            },
        ),
        (
            "vigil_host_uptime_seconds",
            false,
            Frac {
                base: 1.2e6,
                step: 1.0,
                jitter: 0.01,
                div: 100.0,
            },
        ),
        ("vigil_host_entropy_bits", false, Const(256.0)),
        (
            "vigil_host_file_descriptors",
            false,
            Int {
                base: 40_000.0,
                step: 0.0,
                jitter: 100.0,
            },
        ),
        (
            "vigil_host_tcp_connections",
            false,
            Int {
                base: 900.0,
                step: 0.0,
                jitter: 40.0,
            },
        ),
        ("vigil_host_boot_time_seconds", false, Const(1.7631e9)),
        ("vigil_host_cpus", false, Const(224.0)),
    ] {
        values.push(host(name, vec![], counter, shape));
    }
    Node { values, histograms }
}

fn wire_labels(labels: &[(&'static str, String)]) -> Vec<wire::Label> {
    labels
        .iter()
        .map(|(name, value)| wire::Label {
            name: name.to_string(),
            value: value.clone(),
        })
        .collect()
}

/// Series ids: the values from 1, then the histograms.
fn declarations(node: &Node) -> Bytes {
    let mut series = Vec::with_capacity(node.values.len() + node.histograms.len());
    for (i, v) in node.values.iter().enumerate() {
        series.push(wire::Series {
            id: i as u64 + 1,
            name: v.name.to_string(),
            labels: wire_labels(&v.labels),
            r#type: if v.counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            } as i32,
        });
    }
    for (i, h) in node.histograms.iter().enumerate() {
        series.push(wire::Series {
            id: (node.values.len() + i) as u64 + 1,
            name: "vigil_process_syscall_latency_seconds".to_string(),
            labels: wire_labels(&h.labels),
            r#type: MetricType::Histogram as i32,
        });
    }
    wire::Batch {
        series,
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

/// One reading of every series of a node: what one pass of an agent yields.
#[derive(Clone)]
struct Reading {
    samples: Vec<wire::Sample>,
    histograms: Vec<wire::Histogram>,
}

/// A Poisson-distributed count with mean `lambda` (Knuth's method for small means, the normal
/// approximation above).
fn poisson(lambda: f64, rng: &mut Rng) -> u64 {
    if lambda <= 0.0 {
        return 0;
    }
    if lambda < 30.0 {
        let limit = (-lambda).exp();
        let mut product = 1.0;
        let mut k = 0;
        loop {
            product *= rng.unit();
            if product <= limit {
                return k;
            }
            k += 1;
        }
    }
    let gauss =
        (-2.0 * (1.0 - rng.unit()).ln()).sqrt() * (std::f64::consts::TAU * rng.unit()).cos();
    (lambda + lambda.sqrt() * gauss).round().max(0.0) as u64
}

/// `count` consecutive readings of `node`, a second apart, as an agent takes them: gauges move
/// around their base, counters grow by their step, and every histogram gets a Poisson number
/// of new observations per bucket (its rate, +-50% from second to second, spread by the
/// bucket weights), with the latency sum kept in integer nanoseconds as the agent's eBPF
/// counters keep it.
fn consecutive_readings(node: &Node, count: usize) -> Vec<Reading> {
    let mut rng = Rng(0xfeed);
    let mut histograms: Vec<(Vec<u64>, u64)> = node
        .histograms
        .iter()
        .map(|h| {
            let total: f64 = h.weights.iter().sum();
            let mut index = 0;
            let mut sum_ns = 0u64;
            let counts = h
                .deltas
                .iter()
                .zip(&h.weights)
                .map(|(d, w)| {
                    index += d;
                    let count = (w / total * h.base) as u64 + 1;
                    sum_ns += count * bucket_ns(index);
                    count
                })
                .collect();
            (counts, sum_ns)
        })
        .collect();
    (0..count as u64)
        .map(|reading| {
            let samples = node
                .values
                .iter()
                .enumerate()
                .map(|(i, v)| wire::Sample {
                    series_id: i as u64 + 1,
                    time_delta_ms: 0,
                    value: v.shape.value(reading, &mut rng),
                })
                .collect();
            let histograms = node
                .histograms
                .iter()
                .zip(histograms.iter_mut())
                .enumerate()
                .map(|(i, (h, (counts, sum_ns)))| {
                    if reading > 0 {
                        let total: f64 = h.weights.iter().sum();
                        let rate = h.rate * (0.5 + rng.unit());
                        let mut index = 0;
                        for ((d, w), count) in
                            h.deltas.iter().zip(&h.weights).zip(counts.iter_mut())
                        {
                            index += d;
                            let new = poisson(rate * w / total, &mut rng);
                            *count += new;
                            // Each observation somewhere inside its bucket.
                            *sum_ns +=
                                (new as f64 * bucket_ns(index) as f64 * (0.75 + 0.25 * rng.unit()))
                                    as u64;
                        }
                    }
                    wire::Histogram {
                        series_id: (node.values.len() + i) as u64 + 1,
                        time_delta_ms: 0,
                        count: counts.iter().sum(),
                        sum_seconds: *sum_ns as f64 / 1e9,
                        bucket_index_deltas: h.deltas.clone(),
                        bucket_counts: counts.clone(),
                    }
                })
                .collect();
            Reading {
                samples,
                histograms,
            }
        })
        .collect()
}

/// About the upper bound of Vigil's log-linear bucket `index`: 2^(6 + index / 16) ns.
fn bucket_ns(index: u32) -> u64 {
    2f64.powf(6.0 + index as f64 / 16.0) as u64
}

/// How readings go on the wire.
#[derive(Clone, Copy, PartialEq)]
enum Encoding {
    /// `Batch.samples` and `Batch.histograms`, each message compressed alone.
    Plain,
    /// `Batch.delta`: coded against the previous batch of the stream (vigil_proto::delta).
    Delta,
}

/// The readings of `ring`, encoded as the body of consecutive Batches of one stream (their
/// fields after sequence and base time). Plain: one entry per reading. Delta: entry k is
/// reading k coded against reading k - 1 (entry 0 against nothing, after the declaring
/// batch), plus one last entry with reading 0 coded against the last reading, so that a
/// stream can cycle through the ring without its encoding state going wrong.
fn encode_ring(ring: &[Reading], encoding: Encoding) -> Vec<Bytes> {
    let body = |batch: wire::Batch| -> Bytes { batch.encode_to_vec().into() };
    let batch = |reading: &Reading| wire::Batch {
        samples: reading.samples.clone(),
        histograms: reading.histograms.clone(),
        ..Default::default()
    };
    match encoding {
        Encoding::Plain => ring.iter().map(|r| body(batch(r))).collect(),
        Encoding::Delta => {
            let mut encoder = DeltaEncoder::new();
            // The declaring batch (no readings) is the stream's first.
            encoder.encode(&mut wire::Batch::default());
            ring.iter()
                .chain(ring.first())
                .map(|r| {
                    let mut batch = batch(r);
                    encoder.encode(&mut batch);
                    body(batch)
                })
                .collect()
        }
    }
}

/// The body of the `k`-th batch of readings (0-based) a stream sends, from [`encode_ring`].
fn ring_entry(entries: &[Bytes], encoding: Encoding, k: usize) -> &Bytes {
    match encoding {
        Encoding::Plain => &entries[k % entries.len()],
        Encoding::Delta => {
            let n = entries.len() - 1;
            if k >= n && k.is_multiple_of(n) {
                &entries[n]
            } else {
                &entries[k % n]
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The wire: pre-encoded messages, and a connection that counts the bytes it writes.

/// An `AgentMessage`, encoded by [`RawEncoder`].
enum Out {
    /// Already encoded (the Hello).
    Raw(Bytes),
    /// `AgentMessage { batch: Batch { sequence, base_time_ms } + declarations + readings }`.
    Batch {
        sequence: u64,
        base_time_ms: i64,
        declarations: Option<Bytes>,
        readings: Bytes,
    },
}

fn encode_out(item: &Out, dst: &mut impl BufMut) {
    use prost::encoding::{encode_varint, encoded_len_varint};
    match item {
        Out::Raw(bytes) => dst.put_slice(bytes),
        Out::Batch {
            sequence,
            base_time_ms,
            declarations,
            readings,
        } => {
            let declarations = declarations.as_deref().unwrap_or_default();
            let inner = 1
                + encoded_len_varint(*sequence)
                + 1
                + encoded_len_varint(*base_time_ms as u64)
                + declarations.len()
                + readings.len();
            dst.put_u8(0x12); // AgentMessage.batch, length-delimited
            encode_varint(inner as u64, dst);
            dst.put_u8(0x08); // Batch.sequence, varint
            encode_varint(*sequence, dst);
            dst.put_u8(0x18); // Batch.base_time_ms, varint
            encode_varint(*base_time_ms as u64, dst);
            dst.put_slice(declarations);
            dst.put_slice(readings);
        }
    }
}

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Out;
    type Error = Status;

    fn encode(&mut self, item: Out, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        encode_out(&item, dst);
        Ok(())
    }
}

struct AckDecoder(tonic_prost::ProstDecoder<AggregatorMessage>);

impl Decoder for AckDecoder {
    type Item = AggregatorMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<AggregatorMessage>, Status> {
        self.0.decode(src)
    }
}

struct RawCodec;

impl Codec for RawCodec {
    type Encode = Out;
    type Decode = AggregatorMessage;
    type Encoder = RawEncoder;
    type Decoder = AckDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> AckDecoder {
        AckDecoder(tonic_prost::ProstDecoder::default())
    }
}

/// A TCP stream that adds the bytes written to it (HTTP/2 frames: headers, gRPC frames of
/// compressed messages, window updates, pings) to a shared count.
struct CountingStream {
    inner: TcpStream,
    written: Arc<AtomicU64>,
}

impl CountingStream {
    fn count(&self, result: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = result {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
    }
}

impl AsyncRead for CountingStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountingStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.count(&result);
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.count(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// Agents.

struct Shared {
    config: Config,
    readings: Vec<Bytes>,
    samples_per_batch: u64,
    written: Arc<AtomicU64>,
    /// When every agent has connected and declared its series: (start, end) of sending.
    window: watch::Receiver<Option<(Instant, Instant)>>,
    /// Agents whose declarations were acked, or which failed before that.
    declared: AtomicUsize,
    failed: AtomicUsize,
    progress: Notify,
}

#[derive(Default)]
struct AgentResult {
    sent_batches: u64,
    acked_batches: u64,
    acked_samples: u64,
    unacked_batches: u64,
    rejected_samples: u64,
    latencies_us: Vec<u32>,
    first_rejection: Option<String>,
    error: Option<String>,
    declared: bool,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn agent(index: usize, shared: Arc<Shared>) -> AgentResult {
    let mut result = AgentResult::default();
    if let Err(error) = agent_inner(index, &shared, &mut result).await {
        result.error = Some(error);
        if !result.declared {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            shared.progress.notify_one();
        }
    }
    result
}

async fn agent_inner(
    index: usize,
    shared: &Shared,
    result: &mut AgentResult,
) -> Result<(), String> {
    let config = &shared.config;
    let addr = config.endpoint;
    let written = shared.written.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let written = written.clone();
        async move {
            let inner = TcpStream::connect(addr).await?;
            inner.set_nodelay(true)?;
            Ok::<_, io::Error>(TokioIo::new(CountingStream { inner, written }))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(20))
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut grpc = tonic::client::Grpc::new(channel)
        .send_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(16 << 20);
    let node_name = format!("load-node-{index:05}");
    let hello = AgentMessage {
        body: Some(agent_message::Body::Hello(wire::Hello {
            node: node_name.clone(),
            agent_version: "ingest-load".into(),
            boot_id: format!("00000000-0000-4000-8000-{index:012}"),
            agent_instance: format!("load-{index:05}-{}", std::process::id()),
            capabilities: match config.encoding {
                Encoding::Delta => vec![DELTA_V1.to_string()],
                Encoding::Plain => vec![],
            },
        })),
    };
    let (tx, rx) = mpsc::channel::<Out>(1);
    tx.send(Out::Raw(hello.encode_to_vec().into()))
        .await
        .map_err(|_| "outbound closed")?;
    grpc.ready().await.map_err(|e| format!("not ready: {e}"))?;
    let response = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            PathAndQuery::from_static("/vigil.v1.Ingest/Stream"),
            RawCodec,
        )
        .await
        .map_err(|status| format!("stream: {status}"))?;
    if config.encoding == Encoding::Delta && !vigil_proto::delta::offered(response.metadata()) {
        return Err(format!(
            "the aggregator does not offer {DELTA_V1} (response header {ENCODINGS_HEADER})"
        ));
    }
    let mut inbound = response.into_inner();

    // Batch 1 declares the series (and carries no readings); sending starts once every agent
    // has had its declarations acked, so the figures are of the steady state.
    tx.send(Out::Batch {
        sequence: 1,
        base_time_ms: now_ms(),
        declarations: Some(declarations(&node(index))),
        readings: Bytes::new(),
    })
    .await
    .map_err(|_| "outbound closed")?;
    loop {
        match inbound.message().await {
            Ok(Some(AggregatorMessage {
                body: Some(aggregator_message::Body::Ack(ack)),
            })) if ack.sequence >= 1 => break,
            Ok(Some(AggregatorMessage {
                body: Some(aggregator_message::Body::Rejection(rejection)),
            })) => {
                result.first_rejection.get_or_insert(rejection.message);
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err("the aggregator closed the stream".into()),
            Err(status) => return Err(format!("stream failed: {status}")),
        }
    }
    result.declared = true;
    shared.declared.fetch_add(1, Ordering::Relaxed);
    shared.progress.notify_one();
    let mut window = shared.window.clone();
    let (start, end) = window
        .wait_for(Option::is_some)
        .await
        .map_err(|_| "no start")?
        .expect("waited for Some");

    // Interval mode: this agent's phase within the interval.
    let phase = config.interval.mul_f64(index as f64 / config.agents as f64);
    let mut next_tick = start + phase;
    let mut sequence = 1u64;
    // (sequence, sent at)
    let mut in_flight: VecDeque<(u64, Instant)> = VecDeque::new();
    let drain_until = end + DRAIN;
    loop {
        let now = Instant::now();
        let sending = now < end;
        if !sending && in_flight.is_empty() {
            break;
        }
        if now >= drain_until {
            // Counted at what they waited so far: the percentiles are then lower bounds.
            result.unacked_batches = in_flight.len() as u64;
            for &(_, sent) in &in_flight {
                let us = now.duration_since(sent).as_micros();
                result.latencies_us.push(us.min(u32::MAX as u128) as u32);
            }
            return Err(format!(
                "{} batches still unacked {DRAIN:?} after the end",
                in_flight.len()
            ));
        }
        let may_send = sending
            && in_flight.len() < config.window
            && match config.mode {
                Mode::Throughput => now >= start,
                Mode::Interval => now >= next_tick,
            };
        let wake = if !sending {
            drain_until
        } else if in_flight.len() >= config.window {
            // Only an ack can let the next batch go.
            end
        } else if config.mode == Mode::Interval {
            next_tick.min(end)
        } else {
            start.max(now).min(end)
        };
        tokio::select! {
            biased;
            message = inbound.message() => match message {
                Ok(Some(AggregatorMessage { body: Some(body) })) => match body {
                    aggregator_message::Body::Ack(ack) => {
                        let at = Instant::now();
                        while let Some(&(seq, sent)) = in_flight.front() {
                            if seq > ack.sequence {
                                break;
                            }
                            in_flight.pop_front();
                            result.acked_batches += 1;
                            result.acked_samples += shared.samples_per_batch;
                            let us = at.duration_since(sent).as_micros();
                            result.latencies_us.push(us.min(u32::MAX as u128) as u32);
                        }
                    }
                    aggregator_message::Body::Rejection(rejection) => {
                        result.rejected_samples += u64::from(rejection.rejected_samples);
                        result.first_rejection.get_or_insert(rejection.message);
                    }
                },
                Ok(Some(_)) => {}
                Ok(None) => return Err("the aggregator closed the stream".into()),
                Err(status) => return Err(format!("stream failed: {status}")),
            },
            permit = tx.reserve(), if may_send => {
                let permit = permit.map_err(|_| "outbound closed")?;
                sequence += 1;
                let sent = match config.mode {
                    Mode::Throughput => Instant::now(),
                    Mode::Interval => next_tick,
                };
                next_tick += config.interval;
                in_flight.push_back((sequence, sent));
                result.sent_batches += 1;
                permit.send(Out::Batch {
                    sequence,
                    base_time_ms: now_ms(),
                    declarations: None,
                    readings: ring_entry(&shared.readings, config.encoding, sequence as usize - 2)
                        .clone(),
                });
            },
            _ = tokio::time::sleep_until(wake.into()), if !may_send => {},
        }
    }
    drop(tx);
    Ok(())
}

fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn percentile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

fn main() {
    let config = match parse_args() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("ingest-load: {error}");
            std::process::exit(2);
        }
    };
    raise_nofile();
    let cpu_at_start = cpu_seconds();
    let template = node(0);
    let values_per_batch = template.values.len() as u64;
    let histograms_per_batch = template.histograms.len() as u64;
    let ring = consecutive_readings(&template, RING);
    let readings = encode_ring(&ring, config.encoding);
    // What tonic puts in a gRPC frame for a steady-state batch: the message, zstd-compressed
    // at tonic's level, plus the 5-byte frame header. Delta: the ring's coded readings after
    // the first (which is coded against nothing).
    let steady = |entries: &[Bytes]| -> Vec<Bytes> {
        match config.encoding {
            Encoding::Plain => entries.to_vec(),
            Encoding::Delta => entries[1..RING].to_vec(),
        }
    };
    let zstd_len = |bytes: &[u8]| {
        zstd::bulk::compress(bytes, ZSTD_LEVEL)
            .map(|c| c.len())
            .unwrap_or(0)
    };
    let steady_entries = steady(&readings);
    let mut message_bytes = 0usize;
    let mut compressed_bytes = 0usize;
    for (r, body) in steady_entries.iter().enumerate() {
        let mut encoded = Vec::new();
        encode_out(
            &Out::Batch {
                sequence: 100 + r as u64,
                base_time_ms: now_ms(),
                declarations: None,
                readings: body.clone(),
            },
            &mut encoded,
        );
        debug_assert!(AgentMessage::decode(encoded.as_slice()).is_ok());
        message_bytes += encoded.len();
        compressed_bytes += zstd_len(&encoded) + 5;
    }
    let declaration_bytes = declarations(&template).len();
    // The same, for the values and the histograms apart (each part on a stream of its own).
    let part = |keep_values: bool| -> (f64, f64) {
        let only: Vec<Reading> = ring
            .iter()
            .map(|r| Reading {
                samples: if keep_values {
                    r.samples.clone()
                } else {
                    Vec::new()
                },
                histograms: if keep_values {
                    Vec::new()
                } else {
                    r.histograms.clone()
                },
            })
            .collect();
        let entries = steady(&encode_ring(&only, config.encoding));
        let n = entries.len() as f64;
        (
            entries.iter().map(|e| e.len()).sum::<usize>() as f64 / n,
            entries.iter().map(|e| zstd_len(e)).sum::<usize>() as f64 / n,
        )
    };
    let (values_raw, values_zstd) = part(true);
    let (histograms_raw, histograms_zstd) = part(false);
    let part_bytes = serde_json::json!({
        "values_raw": values_raw,
        "values_zstd": values_zstd,
        "histograms_raw": histograms_raw,
        "histograms_zstd": histograms_zstd,
    });
    let samples_per_batch = values_per_batch + histograms_per_batch;
    let message_bytes = message_bytes as f64 / steady_entries.len() as f64;
    let compressed_bytes = compressed_bytes as f64 / steady_entries.len() as f64;
    drop((template, ring, steady_entries));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (window_tx, window) = watch::channel(None);
    let shared = Arc::new(Shared {
        readings,
        samples_per_batch,
        written: Arc::new(AtomicU64::new(0)),
        config,
        window,
        declared: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        progress: Notify::new(),
    });
    let began = Instant::now();
    let (results, declare_s, start, cpu_at_send, written_at_send) = runtime.block_on(async {
        let tasks: Vec<_> = (0..shared.config.agents)
            .map(|index| tokio::spawn(agent(index, shared.clone())))
            .collect();
        // Every agent connects and declares its series first (at most 3 minutes).
        let deadline = began + Duration::from_secs(180);
        while shared.declared.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed)
            < shared.config.agents
            && Instant::now() < deadline
        {
            let _ =
                tokio::time::timeout(Duration::from_millis(100), shared.progress.notified()).await;
        }
        let declare_s = began.elapsed().as_secs_f64();
        let cpu_at_send = cpu_seconds();
        let written_at_send = shared.written.load(Ordering::Relaxed);
        // The line `cargo xtask bench ingest` starts measuring the aggregator's CPU at.
        println!("ingest-load: sending");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        let start = Instant::now() + Duration::from_millis(100);
        let _ = window_tx.send(Some((start, start + shared.config.duration)));
        let mut results = Vec::with_capacity(tasks.len());
        for task in tasks {
            results.push(task.await.unwrap_or_else(|e| AgentResult {
                error: Some(format!("agent task: {e}")),
                ..AgentResult::default()
            }));
        }
        (results, declare_s, start, cpu_at_send, written_at_send)
    });
    let finished = Instant::now();
    let cpu_end = cpu_seconds();
    drop(runtime);

    let mut latencies: Vec<u32> = results
        .iter()
        .flat_map(|r| r.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let sum = |f: fn(&AgentResult) -> u64| results.iter().map(f).sum::<u64>();
    let errors: Vec<&String> = results.iter().filter_map(|r| r.error.as_ref()).collect();
    let acked_samples = sum(|r| r.acked_samples);
    let config = &shared.config;
    let sending_s = config.duration.as_secs_f64();
    let run_s = finished.duration_since(start).as_secs_f64();
    let report = serde_json::json!({
        "encoding": match config.encoding { Encoding::Delta => "delta", Encoding::Plain => "plain" },
        "mode": match config.mode { Mode::Throughput => "throughput", Mode::Interval => "interval" },
        "agents": config.agents,
        "window": config.window,
        "interval_ms": config.interval.as_millis() as u64,
        "threads": config.threads,
        "sending_s": sending_s,
        // From the start of sending to the last ack (or give-up).
        "run_s": run_s,
        "declare_s": declare_s,
        "values_per_batch": values_per_batch,
        "histograms_per_batch": histograms_per_batch,
        "samples_per_batch": samples_per_batch,
        "batches_sent": sum(|r| r.sent_batches),
        "batches_acked": sum(|r| r.acked_batches),
        "batches_unacked_at_end": sum(|r| r.unacked_batches),
        "samples_acked": acked_samples,
        "samples_acked_per_s": acked_samples as f64 / run_s,
        "rejected_samples": sum(|r| r.rejected_samples),
        "first_rejection": results.iter().find_map(|r| r.first_rejection.clone()),
        "agents_failed": errors.len(),
        "first_errors": errors.iter().take(3).collect::<Vec<_>>(),
        "latency_ms": {
            "count": latencies.len(),
            "p50": percentile_ms(&latencies, 0.50),
            "p90": percentile_ms(&latencies, 0.90),
            "p99": percentile_ms(&latencies, 0.99),
            "p999": percentile_ms(&latencies, 0.999),
            "max": percentile_ms(&latencies, 1.0),
        },
        "wire": {
            "tcp_bytes_written": shared.written.load(Ordering::Relaxed),
            "tcp_bytes_written_while_sending":
                shared.written.load(Ordering::Relaxed) - written_at_send,
            "message_bytes_per_batch": message_bytes,
            "grpc_frame_bytes_per_batch_zstd": compressed_bytes,
            "declaration_bytes_per_agent": declaration_bytes,
            "parts_of_one_batch": part_bytes,
        },
        "generator_cpu_s": cpu_end - cpu_at_start,
        "generator_cpu_s_while_sending": cpu_end - cpu_at_send,
    });
    println!("{report}");
}
