//! `syscalls` collector: per model-server process, per syscall, latency histograms measured in
//! the kernel, plus call and error counts.
//!
//! The eBPF programs (agent-ebpf) time every syscall of tracked processes; this module decides
//! which processes are tracked (one slot each), reads the counters, and turns them into
//! `vigil_syscall_latency_seconds`, `vigil_syscalls_total` and `vigil_syscall_errors_total`.

mod kernel;
pub mod names;

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use vigil_agent_common::{
    histogram::BUCKET_COUNT,
    maps::{LATENCY_COLUMNS, OTHER_COLUMN, ProcessColumns, SYSCALL_NR_LIMIT, SyscallCount},
};

pub use kernel::{
    ProbeError, SyscallProbes, attach_empty_programs, map_memory_bytes, node_pid_max,
};

use crate::{
    collectors::{Collector, CollectorStatus, UnavailableCollector, error_chain},
    sample::{Event, Labels, LatencyHistogram, Sample, SampleValue},
    selection::{ModelServerProcess, PassSelection},
};

/// The collector's name in snapshots.
pub const NAME: &str = "syscalls";

pub const LATENCY_METRIC: &str = "vigil_syscall_latency_seconds";
pub const CALLS_METRIC: &str = "vigil_syscalls_total";
pub const ERRORS_METRIC: &str = "vigil_syscall_errors_total";
/// The collector's own state, so operators can see the budget and the kernel memory it takes.
pub const TRACED_METRIC: &str = "vigil_syscall_traced_processes";
pub const OVER_BUDGET_METRIC: &str = "vigil_syscall_untraced_processes";
pub const MEMORY_METRIC: &str = "vigil_syscall_probe_memory_bytes";

/// `[syscalls]` in the agent config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyscallsConfig {
    /// Trace syscall latency of model-server processes (default true).
    pub enabled: bool,
    /// Most processes traced at once (default 256). Kernel memory grows by ~71 KiB per process
    /// (see docs/syscall-latency.md); processes over the budget are not traced, and the
    /// collector reports how many (`vigil_syscall_untraced_processes`).
    pub max_tracked_processes: u32,
    /// Syscalls with their own latency histogram from a process's first call (default: I/O,
    /// waiting, GPU ioctl). Others get one once seen, while a process has columns left (31).
    pub histogram_syscalls: Vec<String>,
}

impl Default for SyscallsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_tracked_processes: 256,
            histogram_syscalls: names::DEFAULT_HISTOGRAM_SYSCALLS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// A config the collector cannot honour.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SyscallsConfigError {
    #[error("syscalls.histogram_syscalls: unknown syscall {0:?} on this architecture")]
    UnknownSyscall(String),
    #[error(
        "syscalls.histogram_syscalls lists {0} syscalls; at most {max} fit",
        max = LATENCY_COLUMNS - 1
    )]
    TooManyHistograms(usize),
    #[error("syscalls.max_tracked_processes must be between 1 and 65535, not {0}")]
    BadProcessBudget(u32),
}

impl SyscallsConfig {
    /// Syscall numbers of `histogram_syscalls`. Names missing on this architecture that are in
    /// the default list are skipped; a name the user wrote must exist.
    pub fn histogram_syscall_numbers(&self) -> Result<Vec<u32>, SyscallsConfigError> {
        if !(1..=u16::MAX as u32).contains(&self.max_tracked_processes) {
            return Err(SyscallsConfigError::BadProcessBudget(
                self.max_tracked_processes,
            ));
        }
        let mut numbers = Vec::new();
        for name in &self.histogram_syscalls {
            match names::syscall_number(name) {
                Some(nr) if !numbers.contains(&nr) => numbers.push(nr),
                Some(_) => {}
                None if names::DEFAULT_HISTOGRAM_SYSCALLS.contains(&name.as_str()) => {}
                None => return Err(SyscallsConfigError::UnknownSyscall(name.clone())),
            }
        }
        if numbers.len() >= LATENCY_COLUMNS as usize {
            return Err(SyscallsConfigError::TooManyHistograms(numbers.len()));
        }
        Ok(numbers)
    }
}

/// The `syscalls` collector for this config: the real one, or one that says why it is not
/// running (disabled, no privileges, a kernel that refuses the programs).
pub fn start(config: &SyscallsConfig) -> Result<Box<dyn Collector>, SyscallsConfigError> {
    let histogram_syscalls = config.histogram_syscall_numbers()?;
    let unavailable = |reason: String| Box::new(UnavailableCollector { name: NAME, reason });
    if !config.enabled {
        return Ok(unavailable(
            "disabled in the config (syscalls.enabled = false)".into(),
        ));
    }
    Ok(
        match SyscallLatencyCollector::start(config, histogram_syscalls) {
            Ok(collector) => Box::new(collector),
            Err(error) => {
                let reason = format!("{}; syscall latency is not collected", error_chain(&error));
                tracing::warn!("syscalls collector unavailable: {reason}");
                unavailable(reason)
            }
        },
    )
}

/// A traced process: its kernel slot and the running totals read from it.
struct TracedProcess {
    process: ModelServerProcess,
    slot: u16,
    columns: ProcessColumns,
    /// Syscall number of each column in use (column 0, `other`, has none).
    column_syscalls: Vec<Option<u32>>,
    /// Latest `SYSCALL_COUNTS` entries per syscall number (64-bit totals; see
    /// [`Self::calls_per_syscall`] for what they count).
    counts: BTreeMap<u32, SyscallCount>,
    /// Running latency totals per column, and the last raw 32-bit kernel buckets behind them.
    latency: Vec<LatencyHistogram>,
    last_raw: Vec<[u32; BUCKET_COUNT]>,
    last_sum_ns: Vec<u64>,
}

impl TracedProcess {
    fn labels(&self, syscall: String) -> Labels {
        Labels::from([
            ("pid".to_string(), self.process.pid.to_string()),
            ("comm".to_string(), self.process.comm.clone()),
            ("server".to_string(), self.process.server.clone()),
            ("syscall".to_string(), syscall),
        ])
    }

    /// Calls and errors per syscall: the kernel counts a call either in `SYSCALL_COUNTS`
    /// (no row of its own yet) or in the syscall's latency row, never both.
    fn calls_per_syscall(&self) -> BTreeMap<u32, SyscallCount> {
        let mut per_syscall = self.counts.clone();
        for (column, nr) in self.column_syscalls.iter().enumerate() {
            let in_row = self.latency[column].count();
            if let (Some(nr), true) = (nr, in_row > 0) {
                per_syscall.entry(*nr).or_default().calls += in_row;
            }
        }
        per_syscall
    }

    fn samples(&self, out: &mut Vec<Sample>) {
        for (nr, count) in self.calls_per_syscall() {
            let name = names::syscall_name(nr);
            out.push(Sample {
                name: CALLS_METRIC,
                labels: self.labels(name.clone()),
                value: SampleValue::Value(count.calls as f64),
            });
            out.push(Sample {
                name: ERRORS_METRIC,
                labels: self.labels(name),
                value: SampleValue::Value(count.errors as f64),
            });
        }
        for (column, histogram) in self.latency.iter().enumerate() {
            if histogram.count() == 0 {
                continue;
            }
            let syscall = match self.column_syscalls[column] {
                Some(nr) => names::syscall_name(nr),
                None => "other".to_string(),
            };
            out.push(Sample {
                name: LATENCY_METRIC,
                labels: self.labels(syscall),
                value: SampleValue::Histogram(histogram.snapshot()),
            });
        }
    }
}

/// Traces syscall latency of the processes it is given, one kernel slot per process.
pub struct SyscallLatencyCollector {
    probes: SyscallProbes,
    preassigned: Vec<u32>,
    traced: BTreeMap<u32, TracedProcess>,
    /// Processes that stopped being traced; their final totals stay visible until
    /// [`Self::forget_retired`].
    retired: Vec<TracedProcess>,
    free_slots: BTreeSet<u16>,
    over_budget: usize,
    events: Vec<Event>,
    /// What went wrong in the latest pass (a map update the kernel refused).
    last_error: Option<String>,
}

impl SyscallLatencyCollector {
    /// Loads and attaches the eBPF programs. Fails when the kernel or our privileges do not allow
    /// it; the error says why.
    pub fn start(config: &SyscallsConfig, preassigned: Vec<u32>) -> Result<Self, ProbeError> {
        let slots = config.max_tracked_processes;
        let probes = SyscallProbes::attach(slots)?;
        tracing::info!(
            slots,
            pid_max = probes.pid_max(),
            map_bytes = map_memory_bytes(slots, probes.pid_max()),
            "syscall latency probes attached"
        );
        Ok(Self {
            probes,
            preassigned,
            traced: BTreeMap::new(),
            retired: Vec::new(),
            free_slots: (1..=slots as u16).collect(),
            over_budget: 0,
            events: Vec::new(),
            last_error: None,
        })
    }

    pub fn status(&self) -> CollectorStatus {
        if let Some(error) = &self.last_error {
            return CollectorStatus::Degraded(error.clone());
        }
        if self.over_budget > 0 {
            return CollectorStatus::Degraded(format!(
                "{} model-server processes are not traced: over the budget of {} \
                 (syscalls.max_tracked_processes)",
                self.over_budget,
                self.probes.slots()
            ));
        }
        CollectorStatus::Ok
    }

    /// Pids currently traced.
    pub fn traced_pids(&self) -> Vec<u32> {
        self.traced.keys().copied().collect()
    }

    /// The kernel's view of a pid's slot (0 when untraced), for checks and tests.
    pub fn kernel_slot(&self, pid: u32) -> u16 {
        self.probes.process_slot(pid)
    }

    /// Makes the traced set equal to `processes`: new ones get a zeroed slot; processes that
    /// exited, no longer match, or whose pid now belongs to another process (start time
    /// differs) get a final read and free their slot for reuse.
    ///
    /// Each collection pass starts here, so the status reflects the latest pass.
    pub fn update_tracked(&mut self, processes: &[ModelServerProcess]) {
        self.last_error = None;
        let wanted: BTreeMap<u32, &ModelServerProcess> =
            processes.iter().map(|p| (p.pid, p)).collect();
        let stale: Vec<u32> = self
            .traced
            .iter()
            .filter(|(pid, traced)| {
                wanted
                    .get(pid)
                    .is_none_or(|p| p.start_time_ticks != traced.process.start_time_ticks)
            })
            .map(|(pid, _)| *pid)
            .collect();
        for pid in stale {
            self.release(pid);
        }
        self.over_budget = 0;
        for process in processes {
            if self.traced.contains_key(&process.pid) {
                continue;
            }
            let Some(slot) = self.free_slots.pop_first() else {
                self.over_budget += 1;
                continue;
            };
            if let Err(error) = self.assign(slot, process) {
                self.free_slots.insert(slot);
                self.last_error = Some(error_chain(&error));
            }
        }
    }

    fn assign(&mut self, slot: u16, process: &ModelServerProcess) -> Result<(), ProbeError> {
        let mut columns = ProcessColumns {
            columns: [OTHER_COLUMN; SYSCALL_NR_LIMIT as usize],
        };
        let mut column_syscalls = vec![None];
        for &nr in &self.preassigned {
            columns.columns[nr as usize] = column_syscalls.len() as u8;
            column_syscalls.push(Some(nr));
        }
        // Zero the slot and install its columns before the kernel can see the process.
        self.probes.reset_slot(slot, &columns)?;
        self.probes.set_process_slot(process.pid, slot)?;
        let columns_in_use = column_syscalls.len();
        self.traced.insert(
            process.pid,
            TracedProcess {
                process: process.clone(),
                slot,
                columns,
                column_syscalls,
                counts: BTreeMap::new(),
                latency: vec![LatencyHistogram::default(); columns_in_use],
                last_raw: vec![[0; BUCKET_COUNT]; columns_in_use],
                last_sum_ns: vec![0; columns_in_use],
            },
        );
        self.events.push(Event::now(
            "process_traced",
            process_labels(process),
            format!(
                "tracing syscalls of {} (pid {}, server {})",
                process.comm, process.pid, process.server
            ),
        ));
        Ok(())
    }

    fn release(&mut self, pid: u32) {
        let Some(mut traced) = self.traced.remove(&pid) else {
            return;
        };
        Self::read_slot(&mut self.probes, &mut traced);
        if let Err(error) = self.probes.set_process_slot(pid, 0) {
            // Leave the slot out of the free set: the kernel may still count into it.
            self.last_error = Some(error_chain(&error));
        } else {
            self.free_slots.insert(traced.slot);
        }
        let process = &traced.process;
        let (kind, why) = if still_running(process) {
            ("process_untraced", "no longer selected as a model server")
        } else {
            ("process_exited", "exited")
        };
        self.events.push(Event::now(
            kind,
            process_labels(process),
            format!(
                "stopped tracing syscalls of {} (pid {}, server {}): {why}",
                process.comm, process.pid, process.server
            ),
        ));
        self.retired.push(traced);
    }

    /// Reads every traced process's counters into running totals and gives histograms to
    /// syscalls seen for the first time. Call at least every few seconds: kernel buckets are
    /// 32-bit and wrap.
    pub fn refresh(&mut self) {
        for traced in self.traced.values_mut() {
            Self::read_slot(&mut self.probes, traced);
            if let Err(error) = Self::assign_new_columns(&mut self.probes, traced) {
                self.last_error = Some(error_chain(&error));
            }
        }
    }

    fn read_slot(probes: &mut SyscallProbes, traced: &mut TracedProcess) {
        for nr in 0..SYSCALL_NR_LIMIT {
            let count = probes.syscall_count(traced.slot, nr);
            if count.calls > 0 || count.errors > 0 {
                traced.counts.insert(nr, count);
            }
        }
        let mut raw = [0u32; BUCKET_COUNT];
        for column in 0..traced.column_syscalls.len() {
            let sum_ns = probes.read_latency_row(traced.slot, column as u8, &mut raw);
            let histogram = &mut traced.latency[column];
            histogram.add_sum_ns(sum_ns.wrapping_sub(traced.last_sum_ns[column]));
            traced.last_sum_ns[column] = sum_ns;
            let last = &mut traced.last_raw[column];
            for (index, (now, before)) in raw.iter().zip(last.iter_mut()).enumerate() {
                if now != before {
                    histogram.add_bucket(index, now.wrapping_sub(*before) as u64);
                    *before = *now;
                }
            }
        }
    }

    /// Gives a column of its own to each syscall that has calls but no histogram yet.
    fn assign_new_columns(
        probes: &mut SyscallProbes,
        traced: &mut TracedProcess,
    ) -> Result<(), ProbeError> {
        let mut changed = false;
        for &nr in traced.counts.keys() {
            if traced.column_syscalls.len() >= LATENCY_COLUMNS as usize {
                break;
            }
            if traced.columns.columns[nr as usize] == OTHER_COLUMN {
                traced.columns.columns[nr as usize] = traced.column_syscalls.len() as u8;
                traced.column_syscalls.push(Some(nr));
                traced.latency.push(LatencyHistogram::default());
                traced.last_raw.push([0; BUCKET_COUNT]);
                traced.last_sum_ns.push(0);
                changed = true;
            }
        }
        if changed {
            probes.set_columns(traced.slot, &traced.columns)?;
        }
        Ok(())
    }

    /// Samples for every traced process and every retired one not yet forgotten, and the
    /// collector's own gauges.
    pub fn samples(&self) -> Vec<Sample> {
        let gauge = |name, value: usize| Sample {
            name,
            labels: Labels::new(),
            value: SampleValue::Value(value as f64),
        };
        let memory = map_memory_bytes(self.probes.slots(), self.probes.pid_max());
        let mut out = vec![
            gauge(TRACED_METRIC, self.traced.len()),
            gauge(OVER_BUDGET_METRIC, self.over_budget),
            gauge(MEMORY_METRIC, memory as usize),
        ];
        for traced in self.traced.values().chain(self.retired.iter()) {
            traced.samples(&mut out);
        }
        out
    }

    /// Drops the final totals of processes no longer traced (after they have been shipped).
    pub fn forget_retired(&mut self) {
        self.retired.clear();
    }

    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }
}

/// Whether the process still runs (same pid and start time), as opposed to having exited.
fn still_running(process: &ModelServerProcess) -> bool {
    procfs::process::Process::new(process.pid as i32)
        .and_then(|p| p.stat())
        .is_ok_and(|stat| stat.starttime == process.start_time_ticks)
}

impl Collector for SyscallLatencyCollector {
    fn name(&self) -> &'static str {
        NAME
    }

    fn collect(&mut self, selection: &PassSelection) {
        // Processes folded by the budget are not traced: they get no kernel slot.
        self.update_tracked(&selection.tracked);
        self.refresh();
    }

    fn samples(&self) -> Vec<Sample> {
        SyscallLatencyCollector::samples(self)
    }

    fn take_events(&mut self) -> Vec<Event> {
        SyscallLatencyCollector::take_events(self)
    }

    fn status(&self) -> CollectorStatus {
        SyscallLatencyCollector::status(self)
    }
}

fn process_labels(process: &ModelServerProcess) -> Labels {
    Labels::from([
        ("pid".to_string(), process.pid.to_string()),
        ("comm".to_string(), process.comm.clone()),
        ("server".to_string(), process.server.clone()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_rejects_unknown_keys_and_syscalls() {
        let err = toml::from_str::<SyscallsConfig>("max_tracked = 3").unwrap_err();
        assert!(
            err.to_string().contains("unknown field `max_tracked`"),
            "{err}"
        );
        let config: SyscallsConfig =
            toml::from_str(r#"histogram_syscalls = ["read", "reed"]"#).unwrap();
        assert_eq!(
            config.histogram_syscall_numbers(),
            Err(SyscallsConfigError::UnknownSyscall("reed".into()))
        );
        let config = SyscallsConfig {
            max_tracked_processes: 0,
            ..Default::default()
        };
        assert_eq!(
            config.histogram_syscall_numbers(),
            Err(SyscallsConfigError::BadProcessBudget(0))
        );
    }

    #[test]
    fn default_histogram_syscalls_resolve_on_this_architecture() {
        let numbers = SyscallsConfig::default()
            .histogram_syscall_numbers()
            .unwrap();
        assert!(numbers.contains(&names::syscall_number("read").unwrap()));
        assert!(numbers.contains(&names::syscall_number("ioctl").unwrap()));
    }

    #[test]
    fn map_memory_stays_within_32_mib_for_256_processes_at_the_default_pid_max() {
        let bytes = map_memory_bytes(256, 32768);
        assert!(bytes <= 32 << 20, "{bytes}");
        // 256 slots x (512 x 16 B counts + 512 B columns + 32 x 2000 B rows) + 10 B per pid
        assert_eq!(
            bytes,
            256 * (512 * 16 + 512 + 32 * 2000) + 32768 / 4 * 8 + 32768 * 8
        );
        // systemd raises pid_max to 2^22 on 64-bit hosts: the per-thread start times then
        // dominate (see docs/syscall-latency.md).
        assert_eq!(map_memory_bytes(256, 4_194_304) >> 20, 57);
    }
}
