//! The bottleneck verdict: every interval, for each tracked model server, what is most likely
//! slowing it, computed from the signals its node's agent sends (GPU utilization of the GPUs it
//! uses, its CPU time against CPU pressure, its share of time blocked in syscalls, memory
//! pressure), with the figures that led there.
//!
//! The verdict is stored like any series, `vigil_server_bottleneck{node, server, kind}` (1 for
//! the current kind, 0 for the others, so `vigil_server_bottleneck == 1` lists every verdict and
//! alert rules can use it), written through the same admission + write-ahead log path as the
//! rule manager's results ([`SampleWriter`]), and kept in memory with its evidence for the
//! dashboard (`/api/vigil/v1/verdicts`).
//!
//! The rules, first match wins (thresholds below, all over the last minute):
//! 1. `memory_pressure`: the node's memory PSI ("some") is high, or almost no memory is left.
//! 2. `cpu_starved`: the server has runnable threads but the node's CPU PSI ("some") is high.
//! 3. `kernel_blocked`: the server spends a large share of its busy time blocked in syscalls
//!    that are not idle waits (read, write, fsync, ioctl, ...; idle waits such as `epoll_wait`
//!    or `futex` are how an idle server sleeps, so they do not count).
//! 4. `gpu_bound`: a GPU the server uses is busy while the server's CPU is not the limit.
//! 5. `gpu_idle`: the server uses (or its node has) GPUs, and they are idle.
//! 6. `healthy`: none of the above.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;

use crate::{
    alerting::SampleWriter,
    query::{Engine, Labels, SampleValue, Value},
};

/// How often verdicts are computed.
pub const VERDICT_INTERVAL: Duration = Duration::from_secs(5);
/// The metric verdicts are stored as.
pub const METRIC: &str = "vigil_server_bottleneck";
/// The window rates are taken over.
const WINDOW: &str = "1m";

/// Memory PSI "some" (share of wall time some task stalled on memory) at or above this.
pub const MEMORY_PSI_HIGH: f64 = 0.10;
/// Available memory below this share of the total.
pub const MEMORY_AVAILABLE_LOW: f64 = 0.05;
/// CPU PSI "some" at or above this, with runnable threads of the server.
pub const CPU_PSI_HIGH: f64 = 0.20;
/// Share of busy time (blocking syscall time + user CPU time) spent in blocking syscalls.
pub const KERNEL_SHARE_HIGH: f64 = 0.5;
/// ... and at least this much blocking-syscall time per second (thread-seconds/s), so that a
/// nearly idle server with one slow read is not called blocked.
pub const KERNEL_SECONDS_MIN: f64 = 0.2;
/// A GPU this busy (utilization ratio) is the limit.
pub const GPU_BUSY: f64 = 0.85;
/// A GPU at or below this is idle.
pub const GPU_IDLE: f64 = 0.05;

/// Syscalls a server's threads sleep in while they have nothing to do (waiting for events, a
/// lock, a timer or the next request on a socket): time in them is not time lost to the
/// kernel. `read` stays counted: it is mostly files and pipes, where waiting is the problem.
pub const IDLE_WAIT_SYSCALLS: &[&str] = &[
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "poll",
    "ppoll",
    "select",
    "pselect6",
    "futex",
    "futex_waitv",
    "nanosleep",
    "clock_nanosleep",
    "accept",
    "accept4",
    "wait4",
    "waitid",
    "rt_sigtimedwait",
    "rt_sigsuspend",
    "pause",
    "io_getevents",
    "io_uring_enter",
    // Waiting for the next request from a peer: a server's idle state too.
    "recvfrom",
    "recvmsg",
    "recvmmsg",
];

/// The kinds of verdict, in the order the rules are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    MemoryPressure,
    CpuStarved,
    KernelBlocked,
    GpuBound,
    GpuIdle,
    Healthy,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::GpuBound,
        Kind::CpuStarved,
        Kind::KernelBlocked,
        Kind::GpuIdle,
        Kind::MemoryPressure,
        Kind::Healthy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::MemoryPressure => "memory_pressure",
            Kind::CpuStarved => "cpu_starved",
            Kind::KernelBlocked => "kernel_blocked",
            Kind::GpuBound => "gpu_bound",
            Kind::GpuIdle => "gpu_idle",
            Kind::Healthy => "healthy",
        }
    }
}

/// What is known about one server over the window (absent signals are `None`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Signals {
    /// CPU cores the server used (user + system), and user only.
    pub cpu_cores: Option<f64>,
    pub user_cpu_cores: Option<f64>,
    pub threads: Option<f64>,
    /// Threads in state running (runnable or on a CPU).
    pub running_threads: Option<f64>,
    pub rss_bytes: Option<f64>,
    /// Its node's figures.
    pub host_cpus: Option<f64>,
    pub cpu_psi_some: Option<f64>,
    pub memory_psi_some: Option<f64>,
    pub memory_available_ratio: Option<f64>,
    /// Seconds per second spent in each syscall (summed over threads), largest first.
    pub syscall_seconds: Vec<(String, f64)>,
    /// Utilization of each GPU the server uses (`gpu` label -> ratio).
    pub server_gpus: BTreeMap<String, f64>,
    /// Utilization of every GPU of the node.
    pub node_gpus: BTreeMap<String, f64>,
}

impl Signals {
    /// Blocking (not idle-wait) syscall time per second, and the syscalls it went to.
    pub fn blocking_syscalls(&self) -> (f64, Vec<(String, f64)>) {
        let blocking: Vec<(String, f64)> = self
            .syscall_seconds
            .iter()
            .filter(|(name, _)| !IDLE_WAIT_SYSCALLS.contains(&name.as_str()))
            .cloned()
            .collect();
        (blocking.iter().map(|(_, s)| s).sum(), blocking)
    }
}

/// A verdict with the figures behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub node: String,
    pub server: String,
    pub kind: Kind,
    pub time_ms: i64,
    /// One line that says why.
    pub summary: String,
    /// The figures the rules looked at, by name.
    pub evidence: BTreeMap<String, f64>,
    /// For `kernel_blocked`: the blocking syscalls by time, largest first.
    pub syscalls: Vec<(String, f64)>,
}

fn pct(ratio: f64) -> String {
    format!("{:.0}%", ratio * 100.0)
}

/// Applies the rules (module docs) to one server's signals.
pub fn classify(signals: &Signals) -> (Kind, String) {
    let running = signals.running_threads.unwrap_or(0.0);
    if let Some(psi) = signals.memory_psi_some
        && psi >= MEMORY_PSI_HIGH
    {
        return (
            Kind::MemoryPressure,
            format!("tasks stalled on memory {} of the time", pct(psi)),
        );
    }
    if let Some(available) = signals.memory_available_ratio
        && available < MEMORY_AVAILABLE_LOW
    {
        return (
            Kind::MemoryPressure,
            format!("only {} of the node's memory is available", pct(available)),
        );
    }
    if let Some(psi) = signals.cpu_psi_some
        && psi >= CPU_PSI_HIGH
        && running >= 1.0
    {
        return (
            Kind::CpuStarved,
            format!(
                "{running:.0} runnable threads while tasks waited for a CPU {} of the time",
                pct(psi)
            ),
        );
    }
    let (blocked, syscalls) = signals.blocking_syscalls();
    let user = signals.user_cpu_cores.unwrap_or(0.0);
    if blocked >= KERNEL_SECONDS_MIN && blocked / (blocked + user) >= KERNEL_SHARE_HIGH {
        let top: Vec<String> = syscalls
            .iter()
            .take(3)
            .map(|(name, seconds)| format!("{name} {seconds:.2}s/s"))
            .collect();
        return (
            Kind::KernelBlocked,
            format!(
                "{} of busy time blocked in syscalls ({})",
                pct(blocked / (blocked + user)),
                top.join(", ")
            ),
        );
    }
    let busiest = signals.server_gpus.iter().max_by(|a, b| a.1.total_cmp(b.1));
    if let Some((gpu, util)) = busiest
        && *util >= GPU_BUSY
    {
        return (
            Kind::GpuBound,
            format!(
                "GPU {gpu} busy {} while the server used {:.2} CPU cores",
                pct(*util),
                signals.cpu_cores.unwrap_or(0.0)
            ),
        );
    }
    // The GPUs it uses; a server that holds no GPU memory yet on a GPU node is judged by the
    // node's GPUs (it may have failed to start its GPU work).
    let gpus = if signals.server_gpus.is_empty() {
        &signals.node_gpus
    } else {
        &signals.server_gpus
    };
    if !gpus.is_empty() && gpus.values().all(|util| *util <= GPU_IDLE) {
        return (
            Kind::GpuIdle,
            format!(
                "the server is up but its GPU{} {} idle",
                if gpus.len() == 1 { "" } else { "s" },
                if gpus.len() == 1 { "is" } else { "are" }
            ),
        );
    }
    (Kind::Healthy, "no bottleneck signal".to_owned())
}

/// A server's identity: (node, server).
type Key = (String, String);

fn label<'a>(labels: &'a Labels, name: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(label, _)| label == name)
        .map(|(_, value)| value.as_str())
}

/// An instant query's float results with the labels asked for.
fn query(engine: &Engine, expr: &str, time_ms: i64) -> Vec<(Labels, f64)> {
    match engine.instant(expr, time_ms) {
        Ok(Value::Vector(samples)) => samples
            .into_iter()
            .filter_map(|s| match s.value {
                SampleValue::Float(v) if v.is_finite() => Some((s.labels, v)),
                _ => None,
            })
            .collect(),
        Ok(_) => Vec::new(),
        Err(error) => {
            tracing::warn!("verdict query {expr:?} failed: {error}");
            Vec::new()
        }
    }
}

fn by_server(engine: &Engine, expr: &str, time_ms: i64) -> HashMap<Key, f64> {
    query(engine, expr, time_ms)
        .into_iter()
        .filter_map(|(labels, v)| {
            Some((
                (
                    label(&labels, "node")?.to_owned(),
                    label(&labels, "server")?.to_owned(),
                ),
                v,
            ))
        })
        .collect()
}

fn by_node(engine: &Engine, expr: &str, time_ms: i64) -> HashMap<String, f64> {
    query(engine, expr, time_ms)
        .into_iter()
        .filter_map(|(labels, v)| Some((label(&labels, "node")?.to_owned(), v)))
        .collect()
}

/// Gathers every tracked server's signals at `time_ms` (servers with process series).
pub fn gather(engine: &Engine, time_ms: i64) -> BTreeMap<Key, Signals> {
    let cpu = by_server(
        engine,
        &format!("sum by (node, server) (rate(vigil_process_cpu_seconds_total[{WINDOW}]))"),
        time_ms,
    );
    let user = by_server(
        engine,
        &format!(
            "sum by (node, server) (rate(vigil_process_cpu_seconds_total{{mode=\"user\"}}[{WINDOW}]))"
        ),
        time_ms,
    );
    let threads = by_server(
        engine,
        "sum by (node, server) (vigil_process_threads)",
        time_ms,
    );
    let running = by_server(
        engine,
        "sum by (node, server) (vigil_process_state{state=\"running\"})",
        time_ms,
    );
    let rss = by_server(
        engine,
        "sum by (node, server) (vigil_process_resident_memory_bytes)",
        time_ms,
    );
    let host_cpus = by_node(engine, "max by (node) (vigil_host_cpus)", time_ms);
    let cpu_psi = by_node(
        engine,
        &format!("max by (node) (rate(vigil_host_pressure_cpu_some_seconds_total[{WINDOW}]))"),
        time_ms,
    );
    let memory_psi = by_node(
        engine,
        &format!("max by (node) (rate(vigil_host_pressure_memory_some_seconds_total[{WINDOW}]))"),
        time_ms,
    );
    let available = by_node(
        engine,
        "max by (node) (vigil_host_memory_available_bytes / vigil_host_memory_total_bytes)",
        time_ms,
    );
    let syscalls = query(
        engine,
        &format!(
            "sum by (node, server, syscall) (rate(vigil_syscall_latency_seconds_sum[{WINDOW}]))"
        ),
        time_ms,
    );
    // The GPUs a server uses: those it holds memory on; their device utilization.
    let server_gpus = query(
        engine,
        "max by (node, server, gpu) (vigil_gpu_process_memory_used_bytes)",
        time_ms,
    );
    let node_gpus = query(
        engine,
        "max by (node, gpu) (vigil_gpu_utilization_ratio)",
        time_ms,
    );
    let mut gpu_util: HashMap<(String, String), f64> = HashMap::new();
    let mut node_gpu_map: HashMap<String, BTreeMap<String, f64>> = HashMap::new();
    for (labels, v) in node_gpus {
        if let (Some(node), Some(gpu)) = (label(&labels, "node"), label(&labels, "gpu")) {
            gpu_util.insert((node.to_owned(), gpu.to_owned()), v);
            node_gpu_map
                .entry(node.to_owned())
                .or_default()
                .insert(gpu.to_owned(), v);
        }
    }

    let mut out: BTreeMap<Key, Signals> = BTreeMap::new();
    for (key, cores) in &cpu {
        let (node, _) = key;
        out.insert(
            key.clone(),
            Signals {
                cpu_cores: Some(*cores),
                user_cpu_cores: user.get(key).copied(),
                threads: threads.get(key).copied(),
                running_threads: running.get(key).copied(),
                rss_bytes: rss.get(key).copied(),
                host_cpus: host_cpus.get(node).copied(),
                cpu_psi_some: cpu_psi.get(node).copied(),
                memory_psi_some: memory_psi.get(node).copied(),
                memory_available_ratio: available.get(node).copied(),
                node_gpus: node_gpu_map.get(node).cloned().unwrap_or_default(),
                ..Signals::default()
            },
        );
    }
    for (labels, seconds) in syscalls {
        let (Some(node), Some(server), Some(syscall)) = (
            label(&labels, "node"),
            label(&labels, "server"),
            label(&labels, "syscall"),
        ) else {
            continue;
        };
        if let Some(signals) = out.get_mut(&(node.to_owned(), server.to_owned())) {
            signals.syscall_seconds.push((syscall.to_owned(), seconds));
        }
    }
    for signals in out.values_mut() {
        signals
            .syscall_seconds
            .sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    }
    for (labels, used_bytes) in server_gpus {
        let (Some(node), Some(server), Some(gpu)) = (
            label(&labels, "node"),
            label(&labels, "server"),
            label(&labels, "gpu"),
        ) else {
            continue;
        };
        if used_bytes <= 0.0 {
            continue;
        }
        if let Some(signals) = out.get_mut(&(node.to_owned(), server.to_owned())) {
            let util = gpu_util
                .get(&(node.to_owned(), gpu.to_owned()))
                .copied()
                .unwrap_or(0.0);
            signals.server_gpus.insert(gpu.to_owned(), util);
        }
    }
    out
}

/// Every server's verdict at `time_ms`.
pub fn evaluate(engine: &Engine, time_ms: i64) -> Vec<Verdict> {
    gather(engine, time_ms)
        .into_iter()
        .map(|((node, server), signals)| {
            let (kind, summary) = classify(&signals);
            let mut evidence = BTreeMap::new();
            let mut put = |name: &str, value: Option<f64>| {
                if let Some(value) = value {
                    evidence.insert(name.to_owned(), value);
                }
            };
            put("cpu_cores", signals.cpu_cores);
            put("user_cpu_cores", signals.user_cpu_cores);
            put("threads", signals.threads);
            put("running_threads", signals.running_threads);
            put("rss_bytes", signals.rss_bytes);
            put("host_cpus", signals.host_cpus);
            put("cpu_psi_some", signals.cpu_psi_some);
            put("memory_psi_some", signals.memory_psi_some);
            put("memory_available_ratio", signals.memory_available_ratio);
            let (blocked, syscalls) = signals.blocking_syscalls();
            put("blocking_syscall_seconds", Some(blocked));
            let gpus = if signals.server_gpus.is_empty() {
                &signals.node_gpus
            } else {
                &signals.server_gpus
            };
            if let Some(max) = gpus.values().copied().reduce(f64::max) {
                put("gpu_utilization_max", Some(max));
            }
            put("gpus", Some(gpus.len() as f64));
            Verdict {
                node,
                server,
                kind,
                time_ms,
                summary,
                evidence,
                syscalls,
            }
        })
        .collect()
}

/// The latest verdicts, for the dashboard.
#[derive(Debug, Default)]
pub struct Verdicts {
    latest: Mutex<Vec<Verdict>>,
}

impl Verdicts {
    pub fn new() -> Verdicts {
        Verdicts::default()
    }

    pub fn latest(&self) -> Vec<Verdict> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set(&self, verdicts: Vec<Verdict>) {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = verdicts;
    }
}

/// The samples a round of verdicts stores: every kind per server, 1 for the verdict's.
pub fn samples(verdicts: &[Verdict]) -> Vec<(Labels, f64)> {
    let mut out = Vec::with_capacity(verdicts.len() * Kind::ALL.len());
    for verdict in verdicts {
        for kind in Kind::ALL {
            out.push((
                vec![
                    ("__name__".to_owned(), METRIC.to_owned()),
                    ("kind".to_owned(), kind.as_str().to_owned()),
                    ("node".to_owned(), verdict.node.clone()),
                    ("server".to_owned(), verdict.server.clone()),
                ],
                if kind == verdict.kind { 1.0 } else { 0.0 },
            ));
        }
    }
    out
}

fn now_ms() -> i64 {
    crate::alerting::manager::now_ms()
}

/// Computes verdicts every `interval` until shutdown: stores them and keeps them for the
/// dashboard. The queries run on a blocking thread (they scan the store).
pub fn start(
    engine: Engine,
    writer: Arc<SampleWriter>,
    verdicts: Arc<Verdicts>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let (engine, writer, verdicts) = (engine.clone(), writer.clone(), verdicts.clone());
            let round = tokio::task::spawn_blocking(move || {
                let time_ms = now_ms();
                let round = evaluate(&engine, time_ms);
                if !round.is_empty()
                    && let Err(error) = writer.write(time_ms, now_ms(), samples(&round))
                {
                    tracing::error!("cannot store verdicts: {error}");
                }
                verdicts.set(round);
            });
            if let Err(error) = round.await {
                tracing::error!("verdict round failed: {error}");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::{MemorySource, Samples};

    const T0: i64 = 1_700_000_000_000;
    const STEP: i64 = 1_000;
    const POINTS: i64 = 120;
    const NODE: &str = "n1";
    const SERVER: &str = "ranker";

    /// A generated node with one server, sampled every second for two minutes.
    struct Scenario {
        source: MemorySource,
    }

    impl Scenario {
        fn new() -> Scenario {
            let mut scenario = Scenario {
                source: MemorySource::new(),
            };
            // Baseline: a calm 8-CPU node with plenty of memory.
            scenario.gauge("vigil_host_cpus", &[], 8.0);
            scenario.gauge("vigil_host_memory_total_bytes", &[], 64e9);
            scenario.gauge("vigil_host_memory_available_bytes", &[], 40e9);
            scenario.gauge("vigil_process_threads", &[("pid", "100")], 16.0);
            scenario.gauge(
                "vigil_process_resident_memory_bytes",
                &[("pid", "100")],
                4e9,
            );
            scenario
        }

        fn labels<'a>(
            name: &'a str,
            extra: &[(&'a str, &'a str)],
            server: bool,
        ) -> Vec<(&'a str, &'a str)> {
            let mut labels = vec![("__name__", name), ("node", NODE)];
            if server {
                labels.push(("server", SERVER));
                labels.push(("comm", "ranker_main"));
            }
            labels.extend_from_slice(extra);
            labels
        }

        fn is_server_metric(name: &str) -> bool {
            name.starts_with("vigil_process_")
                || name.starts_with("vigil_syscall_")
                || name.starts_with("vigil_gpu_process_")
        }

        fn gauge(&mut self, name: &str, extra: &[(&str, &str)], value: f64) {
            let labels = Self::labels(name, extra, Self::is_server_metric(name));
            self.source.add(
                &labels,
                Samples::Floats((0..POINTS).map(|i| (T0 + i * STEP, value)).collect()),
            );
        }

        /// A counter growing by `per_second`.
        fn counter(&mut self, name: &str, extra: &[(&str, &str)], per_second: f64) {
            let labels = Self::labels(name, extra, Self::is_server_metric(name));
            self.source.add(
                &labels,
                Samples::Floats(
                    (0..POINTS)
                        .map(|i| (T0 + i * STEP, 1000.0 + per_second * i as f64))
                        .collect(),
                ),
            );
        }

        fn cpu(mut self, user: f64, system: f64) -> Self {
            self.counter(
                "vigil_process_cpu_seconds_total",
                &[("pid", "100"), ("mode", "user")],
                user,
            );
            self.counter(
                "vigil_process_cpu_seconds_total",
                &[("pid", "100"), ("mode", "system")],
                system,
            );
            self
        }

        fn running(mut self, threads: f64) -> Self {
            self.gauge(
                "vigil_process_state",
                &[("pid", "100"), ("state", "running")],
                threads,
            );
            self
        }

        fn psi(mut self, cpu: f64, memory: f64) -> Self {
            self.counter("vigil_host_pressure_cpu_some_seconds_total", &[], cpu);
            self.counter("vigil_host_pressure_memory_some_seconds_total", &[], memory);
            self
        }

        fn syscall(mut self, syscall: &str, seconds_per_second: f64) -> Self {
            self.counter(
                "vigil_syscall_latency_seconds_sum",
                &[("pid", "100"), ("syscall", syscall)],
                seconds_per_second,
            );
            self
        }

        fn gpu(mut self, gpu: &str, util: f64, server_memory: Option<f64>) -> Self {
            self.gauge(
                "vigil_gpu_utilization_ratio",
                &[("gpu", gpu), ("uuid", "GPU-x")],
                util,
            );
            if let Some(bytes) = server_memory {
                self.gauge(
                    "vigil_gpu_process_memory_used_bytes",
                    &[("pid", "100"), ("gpu", gpu)],
                    bytes,
                );
            }
            self
        }

        fn verdict(self) -> Verdict {
            let engine = Engine::new(Arc::new(self.source));
            let mut verdicts = evaluate(&engine, T0 + (POINTS - 1) * STEP);
            assert_eq!(verdicts.len(), 1, "{verdicts:?}");
            let verdict = verdicts.remove(0);
            assert_eq!(
                (verdict.node.as_str(), verdict.server.as_str()),
                (NODE, SERVER)
            );
            verdict
        }
    }

    #[test]
    fn gpu_bound_when_its_gpu_is_busy_and_cpu_is_not_the_limit() {
        let verdict = Scenario::new()
            .cpu(0.3, 0.1)
            .running(1.0)
            .psi(0.01, 0.0)
            .syscall("epoll_wait", 10.0)
            .syscall("ioctl", 0.05)
            .gpu("0", 0.97, Some(20e9))
            .gpu("1", 0.0, None)
            .verdict();
        assert_eq!(verdict.kind, Kind::GpuBound, "{verdict:?}");
        assert!(verdict.summary.contains("GPU 0"), "{}", verdict.summary);
        assert!((verdict.evidence["gpu_utilization_max"] - 0.97).abs() < 1e-9);
        assert!((verdict.evidence["cpu_cores"] - 0.4).abs() < 1e-6);
    }

    #[test]
    fn cpu_starved_when_runnable_under_cpu_pressure() {
        let verdict = Scenario::new()
            .cpu(3.0, 0.5)
            .running(12.0)
            .psi(0.45, 0.0)
            .gpu("0", 0.40, Some(20e9))
            .verdict();
        assert_eq!(verdict.kind, Kind::CpuStarved, "{verdict:?}");
        assert!((verdict.evidence["cpu_psi_some"] - 0.45).abs() < 1e-6);
        assert!(
            verdict.summary.contains("12 runnable"),
            "{}",
            verdict.summary
        );
    }

    #[test]
    fn cpu_pressure_without_runnable_threads_is_not_starvation() {
        let verdict = Scenario::new()
            .cpu(0.1, 0.0)
            .running(0.0)
            .psi(0.45, 0.0)
            .verdict();
        assert_eq!(verdict.kind, Kind::Healthy, "{verdict:?}");
    }

    #[test]
    fn kernel_blocked_names_the_syscalls() {
        let verdict = Scenario::new()
            .cpu(0.2, 0.3)
            .running(1.0)
            .psi(0.02, 0.0)
            .syscall("fsync", 0.7)
            .syscall("pread64", 0.2)
            // Idle waits do not count, however long.
            .syscall("epoll_wait", 12.0)
            .syscall("futex", 5.0)
            .verdict();
        assert_eq!(verdict.kind, Kind::KernelBlocked, "{verdict:?}");
        let names: Vec<&str> = verdict.syscalls.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["fsync", "pread64"]);
        assert!(verdict.summary.contains("fsync"), "{}", verdict.summary);
        assert!((verdict.evidence["blocking_syscall_seconds"] - 0.9).abs() < 1e-6);
    }

    #[test]
    fn gpu_idle_when_the_server_is_up_and_its_gpu_does_nothing() {
        let verdict = Scenario::new()
            .cpu(0.05, 0.01)
            .running(0.0)
            .psi(0.0, 0.0)
            .syscall("epoll_wait", 15.0)
            // Waiting for requests is idle too.
            .syscall("recvfrom", 0.9)
            .gpu("0", 0.0, Some(10e9))
            .verdict();
        assert_eq!(verdict.kind, Kind::GpuIdle, "{verdict:?}");
    }

    #[test]
    fn memory_pressure_from_psi_or_exhaustion() {
        let verdict = Scenario::new()
            .cpu(1.0, 0.2)
            .running(2.0)
            .psi(0.3, 0.25)
            .gpu("0", 0.95, Some(10e9))
            .verdict();
        assert_eq!(verdict.kind, Kind::MemoryPressure, "{verdict:?}");
        assert!((verdict.evidence["memory_psi_some"] - 0.25).abs() < 1e-6);

        let mut exhausted = Scenario {
            source: MemorySource::new(),
        };
        exhausted.gauge("vigil_host_memory_total_bytes", &[], 64e9);
        exhausted.gauge("vigil_host_memory_available_bytes", &[], 1e9);
        let verdict = exhausted.cpu(0.5, 0.1).psi(0.0, 0.0).verdict();
        assert_eq!(verdict.kind, Kind::MemoryPressure, "{verdict:?}");
        assert!(verdict.summary.contains("2%"), "{}", verdict.summary);
    }

    #[test]
    fn healthy_when_nothing_stands_out() {
        let verdict = Scenario::new()
            .cpu(1.0, 0.2)
            .running(1.0)
            .psi(0.05, 0.01)
            .syscall("read", 0.05)
            .syscall("epoll_wait", 3.0)
            .gpu("0", 0.6, Some(10e9))
            .verdict();
        assert_eq!(verdict.kind, Kind::Healthy, "{verdict:?}");
        // Without any GPU, a calm server is healthy too (not gpu_idle).
        let verdict = Scenario::new().cpu(1.0, 0.1).psi(0.0, 0.0).verdict();
        assert_eq!(verdict.kind, Kind::Healthy, "{verdict:?}");
    }

    #[test]
    fn stored_samples_mark_exactly_the_verdict_kind() {
        let verdict = Scenario::new()
            .cpu(0.2, 0.3)
            .syscall("fsync", 0.9)
            .psi(0.0, 0.0)
            .verdict();
        let samples = samples(&[verdict]);
        assert_eq!(samples.len(), Kind::ALL.len());
        let ones: Vec<&str> = samples
            .iter()
            .filter(|(_, v)| *v == 1.0)
            .map(|(labels, _)| label(labels, "kind").unwrap())
            .collect();
        assert_eq!(ones, ["kernel_blocked"]);
        assert!(
            samples
                .iter()
                .all(|(labels, _)| label(labels, "node") == Some(NODE)
                    && label(labels, "__name__") == Some(METRIC))
        );
    }
}
