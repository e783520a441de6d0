//! `process` collector: CPU, memory, threads, descriptors, storage I/O, context switches, page
//! faults, start time and scheduler state of each model-server process, from /proc.
//!
//! Tracked processes (within the cardinality budget, see `selection::budget`) get series
//! labelled `pid`, `comm` and `server`; folded ones are summed into one series per metric
//! labelled `server="other"`, so the number of series stays bounded however many workers a
//! node runs. Values are the kernel's own running totals and current readings, taken once per
//! pass; [`proc_files`] says how a pass keeps its reads cheap.

mod proc_files;

use std::collections::{HashMap, HashSet, hash_map::Entry};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use self::proc_files::{ProcDir, ProcFile, ProcessReading, ProcessState, ReadFailure};
use crate::{
    attribution::{Attribution, AttributionConfig, ContainerIdentityCache, PodDirectory},
    collectors::{Collector, CollectorStatus, UnavailableCollector},
    sample::{Event, Labels, Sample, SampleValue},
    selection::{ModelServerProcess, PassSelection},
};

/// The collector's name in snapshots.
pub const NAME: &str = "process";

/// `mode="user"|"system"`.
pub const CPU_METRIC: &str = "vigil_process_cpu_seconds_total";
pub const RESIDENT_MEMORY_METRIC: &str = "vigil_process_resident_memory_bytes";
pub const VIRTUAL_MEMORY_METRIC: &str = "vigil_process_virtual_memory_bytes";
pub const THREADS_METRIC: &str = "vigil_process_threads";
pub const OPEN_FDS_METRIC: &str = "vigil_process_open_fds";
/// The soft `RLIMIT_NOFILE`, re-read every 10 passes (limits rarely change).
pub const MAX_FDS_METRIC: &str = "vigil_process_max_fds";
/// Bytes fetched from storage (`/proc/PID/io` `read_bytes`).
pub const READ_BYTES_METRIC: &str = "vigil_process_read_bytes_total";
/// Bytes sent to storage (`/proc/PID/io` `write_bytes`).
pub const WRITTEN_BYTES_METRIC: &str = "vigil_process_written_bytes_total";
/// `kind="voluntary"|"involuntary"`.
pub const CONTEXT_SWITCHES_METRIC: &str = "vigil_process_context_switches_total";
/// `kind="major"|"minor"`.
pub const PAGE_FAULTS_METRIC: &str = "vigil_process_page_faults_total";
/// Unix time the process started (tracked processes only: a sum of start times means nothing).
pub const START_TIME_METRIC: &str = "vigil_process_start_time_seconds";
/// 1 for the current `state` (`running`, `sleeping`, `disk_sleep`, `stopped`, `zombie`,
/// `other`) and 0 for the others; for `server="other"`, how many folded processes are in each.
pub const STATE_METRIC: &str = "vigil_process_state";
/// How many processes the `server="other"` series sum (unlabelled).
pub const FOLDED_PROCESSES_METRIC: &str = "vigil_process_folded_processes";

/// The `server` label of the series that sum folded processes.
pub const FOLDED_SERVER: &str = "other";

/// `[process]` in the agent config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessConfig {
    /// Report per model-server process stats from /proc (default true). Which processes get
    /// series of their own is `selection.max_tracked_processes`.
    pub enabled: bool,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// The `process` collector for this config, or one that says it is disabled. Its series carry
/// container and pod labels from `attribution` (pod names only inside a Kubernetes cluster).
pub fn start(config: &ProcessConfig, attribution: &AttributionConfig) -> Box<dyn Collector> {
    if !config.enabled {
        return Box::new(UnavailableCollector {
            name: NAME,
            reason: "disabled in the config (process.enabled = false)".into(),
        });
    }
    let mut collector = ProcessCollector::new();
    collector.attribution.pods = PodDirectory::start(attribution);
    Box::new(collector)
}

/// Container and pod labels of tracked processes: the container from the process's cgroup
/// (read once per process), names from the Kubernetes API when in a cluster.
#[derive(Default)]
struct ProcessAttribution {
    identities: ContainerIdentityCache,
    pods: Option<PodDirectory>,
}

impl ProcessAttribution {
    fn labels(&mut self, process: &ModelServerProcess) -> Labels {
        let mut labels = process_labels(process);
        if let Some(identity) = self
            .identities
            .identity(process.pid, process.start_time_ticks)
        {
            let attribution = match &self.pods {
                Some(pods) => pods.attribute(identity),
                None => Attribution::from_cgroup(identity),
            };
            attribution.append_labels(&mut labels);
        }
        labels
    }

    /// Why pod names may be stale or missing (the API is unreachable), if so.
    fn problem(&self) -> Option<String> {
        let error = self.pods.as_ref()?.status().error?;
        Some(format!("pod names from the Kubernetes API: {error}"))
    }
}

/// The labels that identify a tracked process's series. Every per-process series is labelled
/// from here, so attribution (`container`, `pod`, `namespace`) is added in this one place.
fn process_labels(process: &ModelServerProcess) -> Labels {
    Labels::from([
        ("pid".to_string(), process.pid.to_string()),
        ("comm".to_string(), process.comm.clone()),
        ("server".to_string(), process.server.clone()),
    ])
}

/// The labels of the series that sum all folded processes.
fn folded_labels() -> Labels {
    Labels::from([("server".to_string(), FOLDED_SERVER.to_string())])
}

/// A file that could not be read in the latest pass, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ReadProblem {
    pid: u32,
    comm: String,
    file: ProcFile,
    why: String,
}

/// Reads /proc for the processes of each pass.
pub struct ProcessCollector {
    proc_root: PathBuf,
    ticks_per_second: f64,
    /// `btime` of /proc/stat, read once: it is derived from the wall clock and can wobble by a
    /// second between reads, which would make start times jump.
    boot_time_seconds: Option<u64>,
    /// Open `/proc/PID` directories of tracked processes, by pid.
    dirs: HashMap<u32, ProcDir>,
    buffer: Vec<u8>,
    /// Each tracked process's labels (with attribution) and reading of this pass.
    tracked: Vec<(Labels, ProcessReading)>,
    attribution: ProcessAttribution,
    folded: Vec<ProcessReading>,
    problems: Vec<ReadProblem>,
    /// (pid, file) problems already logged, so a lasting problem is logged once.
    logged: HashSet<(u32, ProcFile)>,
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessCollector {
    /// Reads the real /proc. Clock ticks and boot time are read once, here.
    pub fn new() -> Self {
        let proc_root = PathBuf::from("/proc");
        let boot_time_seconds = read_boot_time(&proc_root);
        if boot_time_seconds.is_none() {
            tracing::warn!("no btime in /proc/stat: process start times are not reported");
        }
        Self {
            proc_root,
            ticks_per_second: procfs::ticks_per_second() as f64,
            boot_time_seconds,
            dirs: HashMap::new(),
            buffer: proc_files::read_buffer(),
            tracked: Vec::new(),
            attribution: ProcessAttribution::default(),
            folded: Vec::new(),
            problems: Vec::new(),
            logged: HashSet::new(),
        }
    }

    /// Reads every process of the pass. Tracked processes keep their `/proc/PID` open between
    /// passes; folded ones are opened for the pass only, so the agent's descriptors stay
    /// bounded by the budget.
    fn read_pass(&mut self, selection: &PassSelection) {
        self.problems.clear();
        self.tracked.clear();
        self.folded.clear();
        let tracked: HashMap<u32, u64> = selection
            .tracked
            .iter()
            .map(|p| (p.pid, p.start_time_ticks))
            .collect();
        self.dirs
            .retain(|pid, dir| tracked.get(pid) == Some(&dir.start_time_ticks()));

        for process in &selection.tracked {
            let dir = match self.dirs.entry(process.pid) {
                Entry::Occupied(entry) => entry.into_mut(),
                Entry::Vacant(entry) => {
                    match ProcDir::open(&self.proc_root, process.pid, process.start_time_ticks) {
                        Ok(dir) => entry.insert(dir),
                        Err(failure) => {
                            record_failure(&mut self.problems, process, failure);
                            continue;
                        }
                    }
                }
            };
            match read_process(dir, process, &mut self.buffer, &mut self.problems) {
                Some(reading) => self
                    .tracked
                    .push((self.attribution.labels(process), reading)),
                // Gone: if the pid is selected again, it is opened afresh.
                None => {
                    self.dirs.remove(&process.pid);
                }
            }
        }
        // Forget the container identities of processes no longer tracked.
        self.attribution.identities.end_pass();
        for process in &selection.folded {
            let mut dir =
                match ProcDir::open(&self.proc_root, process.pid, process.start_time_ticks) {
                    Ok(dir) => dir,
                    Err(failure) => {
                        record_failure(&mut self.problems, process, failure);
                        continue;
                    }
                };
            if let Some(reading) =
                read_process(&mut dir, process, &mut self.buffer, &mut self.problems)
            {
                self.folded.push(reading);
            }
        }

        // Log each lasting problem once, while the process stays selected.
        let selected: HashSet<u32> = selection
            .tracked
            .iter()
            .chain(&selection.folded)
            .map(|p| p.pid)
            .collect();
        self.logged.retain(|(pid, _)| selected.contains(pid));
        for problem in &self.problems {
            if self.logged.insert((problem.pid, problem.file)) {
                tracing::warn!("{}", describe(problem));
            }
        }
    }

    fn values(&self, reading: &ProcessReading, with_start_time: bool) -> ProcessValues {
        let start_time_seconds = self
            .boot_time_seconds
            .filter(|_| with_start_time)
            .map(|boot| boot as f64 + reading.stat.start_time_ticks as f64 / self.ticks_per_second);
        ProcessValues::from_reading(reading, start_time_seconds)
    }
}

/// One process's reading, or `None` when it is gone or its stat is unreadable; problems with
/// other files are recorded and leave their metrics out.
fn read_process(
    dir: &mut ProcDir,
    process: &ModelServerProcess,
    buffer: &mut Vec<u8>,
    problems: &mut Vec<ReadProblem>,
) -> Option<ProcessReading> {
    let problem = |file, why| {
        record_failure(problems, process, ReadFailure::Unreadable(file, why));
    };
    match dir.read_all(buffer, problem) {
        Ok(reading) => Some(reading),
        Err(failure) => {
            record_failure(problems, process, failure);
            None
        }
    }
}

/// A process that is gone is no problem (it shows as exited); anything else is.
fn record_failure(
    problems: &mut Vec<ReadProblem>,
    process: &ModelServerProcess,
    failure: ReadFailure,
) {
    if let ReadFailure::Unreadable(file, why) = failure {
        problems.push(ReadProblem {
            pid: process.pid,
            comm: process.comm.clone(),
            file,
            why,
        });
    }
}

fn read_boot_time(proc_root: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_root.join("stat")).ok()?;
    stat.lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// The metrics a file feeds, for saying what is missing when it cannot be read.
fn metrics_from(file: ProcFile) -> &'static str {
    match file {
        ProcFile::Directory | ProcFile::Stat => "all metrics",
        ProcFile::Status => {
            "vigil_process_resident_memory_bytes and vigil_process_context_switches_total"
        }
        ProcFile::Io => "vigil_process_read_bytes_total and vigil_process_written_bytes_total",
        ProcFile::Limits => "vigil_process_max_fds",
        ProcFile::Fd => "vigil_process_open_fds",
    }
}

fn describe(problem: &ReadProblem) -> String {
    let ReadProblem {
        pid,
        comm,
        file,
        why,
    } = problem;
    let mut text = format!(
        "cannot read /proc/{pid}/{file} of {comm} (pid {pid}): {why}; {metrics} missing for it",
        file = file.name(),
        metrics = metrics_from(*file),
    );
    if why == "permission denied" {
        text.push_str(
            " (run the agent as root, or give it CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH)",
        );
    }
    text
}

/// At most this many problems are spelled out in the status; the rest are counted.
const PROBLEMS_SHOWN: usize = 3;

fn degraded_reason(problems: &[ReadProblem]) -> Option<String> {
    let mut parts: Vec<String> = problems.iter().take(PROBLEMS_SHOWN).map(describe).collect();
    if problems.len() > PROBLEMS_SHOWN {
        parts.push(format!(
            "and {} more unreadable files",
            problems.len() - PROBLEMS_SHOWN
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// One process's values in the units of the metrics, or a sum of several processes' values.
/// A metric whose file could not be read is `None` (in a sum: `None` only if no process had it).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct ProcessValues {
    user_ticks: u64,
    system_ticks: u64,
    resident_bytes: Option<u64>,
    virtual_bytes: u64,
    threads: u64,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
    read_bytes: Option<u64>,
    written_bytes: Option<u64>,
    voluntary_switches: Option<u64>,
    involuntary_switches: Option<u64>,
    minor_faults: u64,
    major_faults: u64,
    start_time_seconds: Option<f64>,
    /// Processes in each state, indexed like [`ProcessState::ALL`].
    states: [u64; ProcessState::ALL.len()],
}

impl ProcessValues {
    fn from_reading(reading: &ProcessReading, start_time_seconds: Option<f64>) -> Self {
        let stat = &reading.stat;
        let status = reading.status.unwrap_or_default();
        let mut states = [0; ProcessState::ALL.len()];
        if let Some(index) = ProcessState::ALL.iter().position(|s| *s == stat.state) {
            states[index] = 1;
        }
        Self {
            user_ticks: stat.user_ticks,
            system_ticks: stat.system_ticks,
            resident_bytes: status.resident_bytes,
            virtual_bytes: stat.virtual_bytes,
            threads: stat.threads,
            open_fds: reading.open_fds,
            max_fds: reading.max_fds,
            read_bytes: reading.io.map(|io| io.read_bytes),
            written_bytes: reading.io.map(|io| io.written_bytes),
            voluntary_switches: status.voluntary_switches,
            involuntary_switches: status.involuntary_switches,
            minor_faults: stat.minor_faults,
            major_faults: stat.major_faults,
            start_time_seconds,
            states,
        }
    }

    /// Adds another process's values (start times are not summed).
    fn add(&mut self, other: &ProcessValues) {
        fn add(a: Option<u64>, b: Option<u64>) -> Option<u64> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            }
        }
        self.user_ticks += other.user_ticks;
        self.system_ticks += other.system_ticks;
        self.resident_bytes = add(self.resident_bytes, other.resident_bytes);
        self.virtual_bytes += other.virtual_bytes;
        self.threads += other.threads;
        self.open_fds = add(self.open_fds, other.open_fds);
        self.max_fds = add(self.max_fds, other.max_fds);
        self.read_bytes = add(self.read_bytes, other.read_bytes);
        self.written_bytes = add(self.written_bytes, other.written_bytes);
        self.voluntary_switches = add(self.voluntary_switches, other.voluntary_switches);
        self.involuntary_switches = add(self.involuntary_switches, other.involuntary_switches);
        self.minor_faults += other.minor_faults;
        self.major_faults += other.major_faults;
        for (mine, theirs) in self.states.iter_mut().zip(other.states) {
            *mine += theirs;
        }
    }

    /// Appends one sample per metric (and per mode, kind or state) with `labels`.
    fn push_samples(&self, labels: &Labels, ticks_per_second: f64, out: &mut Vec<Sample>) {
        let mut push = |name: &'static str, extra: Option<(&str, &str)>, value: f64| {
            let mut labels = labels.clone();
            if let Some((key, value)) = extra {
                labels.insert(key.to_string(), value.to_string());
            }
            out.push(Sample {
                name,
                labels,
                value: SampleValue::Value(value),
            });
        };
        let seconds = |ticks: u64| ticks as f64 / ticks_per_second;
        push(CPU_METRIC, Some(("mode", "user")), seconds(self.user_ticks));
        push(
            CPU_METRIC,
            Some(("mode", "system")),
            seconds(self.system_ticks),
        );
        if let Some(bytes) = self.resident_bytes {
            push(RESIDENT_MEMORY_METRIC, None, bytes as f64);
        }
        push(VIRTUAL_MEMORY_METRIC, None, self.virtual_bytes as f64);
        push(THREADS_METRIC, None, self.threads as f64);
        if let Some(fds) = self.open_fds {
            push(OPEN_FDS_METRIC, None, fds as f64);
        }
        if let Some(fds) = self.max_fds {
            push(MAX_FDS_METRIC, None, fds as f64);
        }
        if let Some(bytes) = self.read_bytes {
            push(READ_BYTES_METRIC, None, bytes as f64);
        }
        if let Some(bytes) = self.written_bytes {
            push(WRITTEN_BYTES_METRIC, None, bytes as f64);
        }
        if let Some(switches) = self.voluntary_switches {
            push(
                CONTEXT_SWITCHES_METRIC,
                Some(("kind", "voluntary")),
                switches as f64,
            );
        }
        if let Some(switches) = self.involuntary_switches {
            push(
                CONTEXT_SWITCHES_METRIC,
                Some(("kind", "involuntary")),
                switches as f64,
            );
        }
        push(
            PAGE_FAULTS_METRIC,
            Some(("kind", "major")),
            self.major_faults as f64,
        );
        push(
            PAGE_FAULTS_METRIC,
            Some(("kind", "minor")),
            self.minor_faults as f64,
        );
        if let Some(seconds) = self.start_time_seconds {
            push(START_TIME_METRIC, None, seconds);
        }
        for (state, count) in ProcessState::ALL.iter().zip(self.states) {
            push(STATE_METRIC, Some(("state", state.label())), count as f64);
        }
    }
}

impl Collector for ProcessCollector {
    fn name(&self) -> &'static str {
        NAME
    }

    fn collect(&mut self, selection: &PassSelection) {
        self.read_pass(selection);
    }

    fn samples(&self) -> Vec<Sample> {
        // 2 cpu + 7 single + 2 switches + 2 faults + 6 states, per series set.
        let mut out = Vec::with_capacity((self.tracked.len() + 1) * 20 + 1);
        for (labels, reading) in &self.tracked {
            self.values(reading, true)
                .push_samples(labels, self.ticks_per_second, &mut out);
        }
        if !self.folded.is_empty() {
            let mut sum = ProcessValues::default();
            for reading in &self.folded {
                sum.add(&self.values(reading, false));
            }
            sum.push_samples(&folded_labels(), self.ticks_per_second, &mut out);
        }
        out.push(Sample {
            name: FOLDED_PROCESSES_METRIC,
            labels: Labels::new(),
            value: SampleValue::Value(self.folded.len() as f64),
        });
        out
    }

    fn take_events(&mut self) -> Vec<Event> {
        Vec::new()
    }

    fn status(&self) -> CollectorStatus {
        let reasons: Vec<String> = degraded_reason(&self.problems)
            .into_iter()
            .chain(self.attribution.problem())
            .collect();
        if reasons.is_empty() {
            CollectorStatus::Ok
        } else {
            CollectorStatus::Degraded(reasons.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::proc_files::{IoFields, StatFields, StatusFields};
    use super::*;

    fn reading(state: ProcessState) -> ProcessReading {
        ProcessReading {
            stat: StatFields {
                state,
                minor_faults: 2_405,
                major_faults: 12,
                user_ticks: 130,
                system_ticks: 41,
                threads: 24,
                start_time_ticks: 987_654,
                virtual_bytes: 9_061_220_352,
            },
            status: Some(StatusFields {
                resident_bytes: Some(1_649_380 * 1024),
                voluntary_switches: Some(98_765),
                involuntary_switches: Some(4_321),
            }),
            io: Some(IoFields {
                read_bytes: 40_960,
                written_bytes: 8_192,
            }),
            max_fds: Some(1_024),
            open_fds: Some(57),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    fn sample(name: &'static str, pairs: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            name,
            labels: labels(pairs),
            value: SampleValue::Value(value),
        }
    }

    fn process() -> ModelServerProcess {
        ModelServerProcess {
            pid: 4242,
            start_time_ticks: 987_654,
            comm: "tritonserver".into(),
            server: "triton".into(),
        }
    }

    #[test]
    fn a_tracked_process_gets_every_metric_labelled_pid_comm_server() {
        let base = [
            ("comm", "tritonserver"),
            ("pid", "4242"),
            ("server", "triton"),
        ];
        let with = |key, value| {
            let mut pairs = base.to_vec();
            pairs.push((key, value));
            pairs
        };
        let values = ProcessValues::from_reading(&reading(ProcessState::DiskSleep), Some(1.5e9));
        let mut out = Vec::new();
        values.push_samples(&process_labels(&process()), 100.0, &mut out);
        assert_eq!(
            out,
            [
                sample(CPU_METRIC, &with("mode", "user"), 1.3),
                sample(CPU_METRIC, &with("mode", "system"), 0.41),
                sample(RESIDENT_MEMORY_METRIC, &base, 1_688_965_120.0),
                sample(VIRTUAL_MEMORY_METRIC, &base, 9_061_220_352.0),
                sample(THREADS_METRIC, &base, 24.0),
                sample(OPEN_FDS_METRIC, &base, 57.0),
                sample(MAX_FDS_METRIC, &base, 1_024.0),
                sample(READ_BYTES_METRIC, &base, 40_960.0),
                sample(WRITTEN_BYTES_METRIC, &base, 8_192.0),
                sample(
                    CONTEXT_SWITCHES_METRIC,
                    &with("kind", "voluntary"),
                    98_765.0
                ),
                sample(
                    CONTEXT_SWITCHES_METRIC,
                    &with("kind", "involuntary"),
                    4_321.0
                ),
                sample(PAGE_FAULTS_METRIC, &with("kind", "major"), 12.0),
                sample(PAGE_FAULTS_METRIC, &with("kind", "minor"), 2_405.0),
                sample(START_TIME_METRIC, &base, 1.5e9),
                sample(STATE_METRIC, &with("state", "running"), 0.0),
                sample(STATE_METRIC, &with("state", "sleeping"), 0.0),
                sample(STATE_METRIC, &with("state", "disk_sleep"), 1.0),
                sample(STATE_METRIC, &with("state", "stopped"), 0.0),
                sample(STATE_METRIC, &with("state", "zombie"), 0.0),
                sample(STATE_METRIC, &with("state", "other"), 0.0),
            ]
        );
    }

    #[test]
    fn an_unreadable_file_leaves_out_only_its_metrics() {
        let mut partial = reading(ProcessState::Sleeping);
        partial.io = None;
        partial.open_fds = None;
        let mut out = Vec::new();
        ProcessValues::from_reading(&partial, None).push_samples(
            &process_labels(&process()),
            100.0,
            &mut out,
        );
        let names: Vec<&str> = out.iter().map(|s| s.name).collect();
        for missing in [
            READ_BYTES_METRIC,
            WRITTEN_BYTES_METRIC,
            OPEN_FDS_METRIC,
            START_TIME_METRIC,
        ] {
            assert!(!names.contains(&missing), "{missing} in {names:?}");
        }
        for present in [
            CPU_METRIC,
            RESIDENT_MEMORY_METRIC,
            MAX_FDS_METRIC,
            STATE_METRIC,
        ] {
            assert!(names.contains(&present), "{present} missing from {names:?}");
        }
        assert_eq!(out.len(), 20 - 4);
    }

    #[test]
    fn folded_values_are_sums_with_state_counts_and_no_start_time() {
        let mut second = reading(ProcessState::Running);
        second.stat.user_ticks = 1_000;
        second.io = None;
        let mut sum = ProcessValues::default();
        sum.add(&ProcessValues::from_reading(
            &reading(ProcessState::Sleeping),
            Some(1.0),
        ));
        sum.add(&ProcessValues::from_reading(&second, Some(2.0)));
        sum.add(&ProcessValues::from_reading(
            &reading(ProcessState::Sleeping),
            Some(3.0),
        ));
        assert_eq!(
            sum,
            ProcessValues {
                user_ticks: 130 + 1_000 + 130,
                system_ticks: 3 * 41,
                resident_bytes: Some(3 * 1_649_380 * 1024),
                virtual_bytes: 3 * 9_061_220_352,
                threads: 3 * 24,
                open_fds: Some(3 * 57),
                max_fds: Some(3 * 1_024),
                // The process whose io was unreadable adds nothing.
                read_bytes: Some(2 * 40_960),
                written_bytes: Some(2 * 8_192),
                voluntary_switches: Some(3 * 98_765),
                involuntary_switches: Some(3 * 4_321),
                minor_faults: 3 * 2_405,
                major_faults: 3 * 12,
                start_time_seconds: None,
                states: [1, 2, 0, 0, 0, 0],
            }
        );
        let mut out = Vec::new();
        sum.push_samples(&folded_labels(), 100.0, &mut out);
        assert!(out.iter().all(
            |s| s.labels.get("server").map(String::as_str) == Some("other")
                && !s.labels.contains_key("pid")
                && !s.labels.contains_key("comm")
        ));
        assert!(out.contains(&sample(
            STATE_METRIC,
            &[("server", "other"), ("state", "sleeping")],
            2.0
        )));
    }

    #[test]
    fn the_degraded_reason_names_the_file_the_process_and_the_missing_metrics() {
        let problem = |pid, file| ReadProblem {
            pid,
            comm: "vllm".into(),
            file,
            why: "permission denied".into(),
        };
        assert_eq!(degraded_reason(&[]), None);
        assert_eq!(
            degraded_reason(&[problem(7, ProcFile::Io)]).unwrap(),
            "cannot read /proc/7/io of vllm (pid 7): permission denied; \
             vigil_process_read_bytes_total and vigil_process_written_bytes_total missing for it \
             (run the agent as root, or give it CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH)"
        );
        let many = [
            problem(1, ProcFile::Io),
            problem(1, ProcFile::Fd),
            problem(2, ProcFile::Io),
            problem(2, ProcFile::Fd),
            problem(3, ProcFile::Io),
        ];
        let reason = degraded_reason(&many).unwrap();
        assert_eq!(reason.matches("cannot read").count(), 3, "{reason}");
        assert!(
            reason.ends_with("; and 2 more unreadable files"),
            "{reason}"
        );
    }

    #[derive(Debug, Deserialize)]
    struct AgentConfig {
        #[serde(default)]
        process: ProcessConfig,
    }

    #[test]
    fn process_config_parses_defaults_and_rejects_unknown_keys() {
        let absent: AgentConfig = toml::from_str("").unwrap();
        assert_eq!(absent.process, ProcessConfig { enabled: true });
        let disabled: AgentConfig = toml::from_str("[process]\nenabled = false\n").unwrap();
        assert_eq!(disabled.process, ProcessConfig { enabled: false });
        let error = toml::from_str::<AgentConfig>("[process]\nenable = false\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("unknown field `enable`, expected `enabled`"),
            "{error}"
        );
    }

    #[test]
    fn a_disabled_collector_says_so_and_reports_nothing() {
        let mut collector = start(
            &ProcessConfig { enabled: false },
            &AttributionConfig::default(),
        );
        collector.collect(&PassSelection {
            tracked: vec![process()],
            folded: Vec::new(),
        });
        assert_eq!(collector.name(), NAME);
        assert_eq!(
            collector.status(),
            CollectorStatus::Unavailable("disabled in the config (process.enabled = false)".into())
        );
        assert_eq!(collector.samples(), []);
    }

    #[test]
    fn an_enabled_collector_with_nothing_selected_reports_zero_folded_processes() {
        let mut collector = start(&ProcessConfig::default(), &AttributionConfig::default());
        collector.collect(&PassSelection::default());
        assert_eq!(collector.status(), CollectorStatus::Ok);
        assert_eq!(
            collector.samples(),
            [sample(FOLDED_PROCESSES_METRIC, &[], 0.0)]
        );
    }
}
