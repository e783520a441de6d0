//! GPU use per process, joined to the tracked model servers by pid, so one model server
//! carries its GPU memory and utilization under the same `pid`, `comm` and `server` labels as
//! its syscall latency. Processes that are not tracked count only towards a per-device total,
//! which keeps cardinality bounded.

use std::collections::BTreeMap;

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
}

impl ProcessTable {
    pub fn new(devices: usize) -> Self {
        Self {
            last_seen_us: vec![0; devices],
            utilization: vec![BTreeMap::new(); devices],
        }
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
        let tracked: BTreeMap<u32, &ModelServerProcess> =
            tracked.iter().map(|p| (p.pid, p)).collect();
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
                            let entry = by_pid.entry(info.pid).or_default();
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
                            self.utilization[slot].insert(sample.pid, sample);
                        }
                    }
                    // No sample newer than the last one seen.
                    Err(NvmlError::NotFound) => {}
                    Err(error) => note(device, "process_utilization", &error, errors),
                }
            }
            let utilization = &mut self.utilization[slot];
            if let Some(listed) = &listed {
                utilization.retain(|pid, _| listed.contains_key(pid));
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
