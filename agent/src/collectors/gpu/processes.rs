//! GPU use per process, joined to the tracked model servers by pid, so one model server
//! carries its GPU memory and utilization under the same `pid`, `comm` and `server` labels as
//! its syscall latency. Processes that are not tracked count only towards a per-device total,
//! which keeps cardinality bounded.
//!
//! NVML may report a containerized process by its pid inside the container's PID namespace
//! (as when the driver is asked from within another namespace). Such a pid is mapped to the host
//! pid of the one tracked process whose innermost namespace pid it is (`NSpid` in
//! /proc/PID/status); when several tracked processes share it, it stays unmapped rather than
//! being credited to the wrong one.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use nvml_wrapper::{
    Nvml, enums::device::UsedGpuMemory, error::NvmlError,
    struct_wrappers::device::ProcessUtilizationSample,
};

use super::{
    PROCESS_DECODER_UTILIZATION_METRIC, PROCESS_ENCODER_UTILIZATION_METRIC, PROCESS_MEMORY_METRIC,
    PROCESS_MEMORY_UTILIZATION_METRIC, PROCESS_SM_UTILIZATION_METRIC,
    UNTRACKED_PROCESS_MEMORY_METRIC, device::DeviceState, value_sample,
};
use crate::{
    sample::{Labels, Sample},
    selection::ModelServerProcess,
};

/// Without NVML's process lists, a process whose last utilization sample is this much older
/// than the newest one is taken to have ended.
const STALE_SAMPLE_US: u64 = 30_000_000;

/// A process on one GPU, as NVML lists it.
#[derive(Debug, Clone, Copy, Default)]
struct GpuProcess {
    memory_bytes: Option<u64>,
    /// MIG GPU and compute instance, where NVML gives them.
    gpu_instance: Option<u32>,
    compute_instance: Option<u32>,
}

/// Per device: the latest utilization sample of each process and NVML's timestamp of the
/// newest one seen, passed back so samples are neither lost nor counted twice.
pub(super) struct ProcessTable {
    last_seen_us: Vec<u64>,
    utilization: Vec<BTreeMap<u32, ProcessUtilizationSample>>,
    namespace_pids: NamespacePids,
}

impl ProcessTable {
    /// `proc_root` is where the tracked processes' namespace pids are read (`/proc`).
    pub fn new(devices: usize, proc_root: PathBuf) -> Self {
        Self {
            last_seen_us: vec![0; devices],
            utilization: vec![BTreeMap::new(); devices],
            namespace_pids: NamespacePids {
                proc_root,
                innermost: BTreeMap::new(),
            },
        }
    }

    /// Each process's SM utilization summed over the GPUs it runs on (1.0 = one whole GPU),
    /// from the latest samples: what the cardinality budget ranks GPU use by.
    pub fn sm_use_by_pid(&self) -> HashMap<u32, f64> {
        let mut by_pid = HashMap::new();
        for device in &self.utilization {
            for (&pid, sample) in device {
                *by_pid.entry(pid).or_insert(0.0) += sample.sm_util as f64 / 100.0;
            }
        }
        by_pid
    }

    /// One pass over every device on the bus.
    pub fn read(
        &mut self,
        nvml: &Nvml,
        devices: &mut [DeviceState],
        tracked: &[ModelServerProcess],
        out: &mut Vec<Sample>,
        errors: &mut Vec<String>,
    ) {
        let to_host = self.namespace_pids.refresh(tracked);
        let tracked: BTreeMap<u32, &ModelServerProcess> =
            tracked.iter().map(|p| (p.pid, p)).collect();
        // A pid NVML reports: the host pid it stands for.
        let host_pid = |pid: u32| match tracked.contains_key(&pid) {
            true => pid,
            false => to_host.get(&pid).copied().unwrap_or(pid),
        };
        for device in devices.iter_mut() {
            if device.is_lost() {
                continue;
            }
            let slot = device.index as usize;
            let Ok(handle) = nvml.device_by_index(device.index) else {
                continue;
            };
            let mut listed = None;
            if !device.not_supported.contains("processes") {
                let both = handle.running_compute_processes().and_then(|compute| {
                    Ok(compute
                        .into_iter()
                        .chain(handle.running_graphics_processes()?))
                });
                match both {
                    Ok(processes) => {
                        let mut by_pid: BTreeMap<u32, GpuProcess> = BTreeMap::new();
                        for info in processes {
                            let entry = by_pid.entry(host_pid(info.pid)).or_default();
                            // A process with compute and graphics contexts is listed twice
                            // with the same memory.
                            if let UsedGpuMemory::Used(bytes) = info.used_gpu_memory {
                                entry.memory_bytes =
                                    Some(entry.memory_bytes.unwrap_or(0).max(bytes));
                            }
                            entry.gpu_instance = info.gpu_instance_id;
                            entry.compute_instance = info.compute_instance_id;
                        }
                        listed = Some(by_pid);
                    }
                    Err(error) => note(device, "processes", &error, errors),
                }
            }
            if !device.not_supported.contains("process_utilization") {
                match handle.process_utilization_stats(self.last_seen_us[slot]) {
                    Ok(samples) => {
                        for sample in samples {
                            self.last_seen_us[slot] = self.last_seen_us[slot].max(sample.timestamp);
                            self.utilization[slot].insert(host_pid(sample.pid), sample);
                        }
                    }
                    // No sample newer than the last one seen.
                    Err(NvmlError::NotFound) => {}
                    Err(error) => note(device, "process_utilization", &error, errors),
                }
            }
            let utilization = &mut self.utilization[slot];
            match &listed {
                Some(listed) => utilization.retain(|pid, _| listed.contains_key(pid)),
                // Without a process list, a process that stopped sending samples has ended.
                None => {
                    let oldest = self.last_seen_us[slot].saturating_sub(STALE_SAMPLE_US);
                    utilization.retain(|_, sample| sample.timestamp >= oldest);
                }
            }
            let mut untracked_bytes = 0;
            let mut pids: Vec<u32> = listed.iter().flat_map(|l| l.keys().copied()).collect();
            pids.extend(utilization.keys().copied());
            pids.sort_unstable();
            pids.dedup();
            for pid in pids {
                let process = listed.as_ref().and_then(|l| l.get(&pid)).copied();
                let Some(server) = tracked.get(&pid) else {
                    untracked_bytes += process.and_then(|p| p.memory_bytes).unwrap_or(0);
                    continue;
                };
                let labels = process_labels(device, server, process);
                if let Some(bytes) = process.and_then(|p| p.memory_bytes) {
                    out.push(value_sample(
                        PROCESS_MEMORY_METRIC,
                        labels.clone(),
                        bytes as f64,
                    ));
                }
                if let Some(sample) = utilization.get(&pid) {
                    for (name, percent) in [
                        (PROCESS_SM_UTILIZATION_METRIC, sample.sm_util),
                        (PROCESS_MEMORY_UTILIZATION_METRIC, sample.mem_util),
                        (PROCESS_ENCODER_UTILIZATION_METRIC, sample.enc_util),
                        (PROCESS_DECODER_UTILIZATION_METRIC, sample.dec_util),
                    ] {
                        out.push(value_sample(name, labels.clone(), percent as f64 / 100.0));
                    }
                }
            }
            if listed.is_some() {
                out.push(value_sample(
                    UNTRACKED_PROCESS_MEMORY_METRIC,
                    device.labels(),
                    untracked_bytes as f64,
                ));
            }
        }
    }
}

/// Innermost PID-namespace pids of tracked processes, read once per process.
struct NamespacePids {
    proc_root: PathBuf,
    /// (host pid, start time) -> innermost namespace pid, if readable.
    innermost: BTreeMap<(u32, u64), Option<u32>>,
}

impl NamespacePids {
    /// Namespace pid -> host pid, for tracked processes whose pids differ and whose namespace
    /// pid no other tracked process shares.
    fn refresh(&mut self, tracked: &[ModelServerProcess]) -> BTreeMap<u32, u32> {
        self.innermost.retain(|(pid, start), _| {
            tracked
                .iter()
                .any(|p| p.pid == *pid && p.start_time_ticks == *start)
        });
        let mut hosts_by_inner: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for process in tracked {
            let inner = *self
                .innermost
                .entry((process.pid, process.start_time_ticks))
                .or_insert_with(|| innermost_pid(&self.proc_root, process.pid));
            if let Some(inner) = inner.filter(|inner| *inner != process.pid) {
                hosts_by_inner.entry(inner).or_default().push(process.pid);
            }
        }
        hosts_by_inner
            .into_iter()
            .filter_map(|(inner, hosts)| (hosts.len() == 1).then(|| (inner, hosts[0])))
            .collect()
    }
}

/// The last `NSpid` entry of /proc/PID/status: the pid in the process's own namespace.
fn innermost_pid(proc_root: &Path, pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    let pids = status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))?;
    pids.split_whitespace().last()?.parse().ok()
}

fn process_labels(
    device: &DeviceState,
    server: &ModelServerProcess,
    process: Option<GpuProcess>,
) -> Labels {
    let mut labels = device.labels();
    labels.insert("pid".into(), server.pid.to_string());
    labels.insert("comm".into(), server.comm.clone());
    labels.insert("server".into(), server.server.clone());
    if let Some(process) = process {
        if let Some(id) = process.gpu_instance {
            labels.insert("gpu_instance".into(), id.to_string());
        }
        if let Some(id) = process.compute_instance {
            labels.insert("compute_instance".into(), id.to_string());
        }
    }
    labels
}

/// Records a failed per-process call: NotSupported once per device, a lost device for the next
/// pass to report, anything else in this pass's errors.
fn note(
    device: &mut DeviceState,
    field: &'static str,
    error: &NvmlError,
    errors: &mut Vec<String>,
) {
    match error {
        NvmlError::NotSupported => {
            device.not_supported.insert(field);
        }
        NvmlError::GpuLost => {}
        other => errors.push(format!(
            "gpu {} {field}: {}",
            device.index,
            crate::collectors::error_chain(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked(pid: u32) -> ModelServerProcess {
        ModelServerProcess {
            pid,
            start_time_ticks: 7,
            comm: "python3".into(),
            server: "vllm".into(),
        }
    }

    #[test]
    fn container_pids_map_to_host_pids_only_when_unambiguous() {
        let proc_root = tempfile::tempdir().unwrap();
        for (pid, nspid) in [
            (4242, "4242 57"),
            (5151, "5151 1"),
            (6161, "6161 1"),
            (7171, "7171"),
        ] {
            let dir = proc_root.path().join(pid.to_string());
            std::fs::create_dir(&dir).unwrap();
            let status = format!("Name:\tpython3\nTgid:\t{pid}\nNSpid:\t{nspid}\nPPid:\t1\n");
            std::fs::write(dir.join("status"), status).unwrap();
        }
        let mut pids = NamespacePids {
            proc_root: proc_root.path().to_owned(),
            innermost: BTreeMap::new(),
        };
        let processes: Vec<_> = [4242, 5151, 6161, 7171, 8181].map(tracked).into();
        // 57 is only 4242's; 1 is both 5151's and 6161's; 7171 shares the host namespace;
        // 8181 has no status file (exited).
        assert_eq!(pids.refresh(&processes), BTreeMap::from([(57, 4242)]));
        // Processes no longer tracked are forgotten.
        pids.refresh(&processes[..1]);
        assert_eq!(pids.innermost.len(), 1);
    }
}
