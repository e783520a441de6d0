//! Collectors turn what the node exposes (kernel probes, NVML, /proc) into samples and events.
//!
//! Each collector lives in its own folder and reports its own status, so one that cannot run
//! (no BPF, no GPU driver) says why and the others carry on.

pub mod gpu;
pub mod host;
pub mod process;
pub mod syscalls;

use std::collections::HashMap;

use serde::Serialize;

use crate::{
    config::AgentConfig,
    sample::{Event, Sample},
    selection::PassSelection,
};

/// What every collector does once per collection pass. The snapshot (and later the daemon)
/// drives a list of these, so a collector that cannot run never stops the others.
pub trait Collector {
    /// Its name under `collectors` in a snapshot (`syscalls`, `gpu`, ...).
    fn name(&self) -> &'static str;
    /// One collection pass over the model servers selected for it.
    fn collect(&mut self, selection: &PassSelection);
    /// Current samples: running totals of counters and histograms, latest gauge values.
    fn samples(&self) -> Vec<Sample>;
    /// Events since the last call.
    fn take_events(&mut self) -> Vec<Event>;
    fn status(&self) -> CollectorStatus;
    /// GPU use per host pid (1.0 = one whole GPU), which the cardinality budget ranks model
    /// servers by together with CPU. Only the gpu collector knows it.
    fn gpu_use_by_pid(&self) -> HashMap<u32, f64> {
        HashMap::new()
    }
}

/// Stands in for a collector that is disabled or could not start, and says why on every pass.
pub struct UnavailableCollector {
    pub name: &'static str,
    pub reason: String,
}

impl Collector for UnavailableCollector {
    fn name(&self) -> &'static str {
        self.name
    }
    fn collect(&mut self, _selection: &PassSelection) {}
    fn samples(&self) -> Vec<Sample> {
        Vec::new()
    }
    fn take_events(&mut self) -> Vec<Event> {
        Vec::new()
    }
    fn status(&self) -> CollectorStatus {
        CollectorStatus::Unavailable(self.reason.clone())
    }
}

/// A config that no collector can run with (as opposed to a collector that cannot run here,
/// which is reported in its status).
#[derive(Debug, thiserror::Error)]
pub enum CollectorConfigError {
    #[error(transparent)]
    Syscalls(#[from] syscalls::SyscallsConfigError),
}

/// Starts every collector, in a fixed order. Adding a collector touches only this function.
pub fn start_collectors(
    config: &AgentConfig,
) -> Result<Vec<Box<dyn Collector>>, CollectorConfigError> {
    let syscalls = syscalls::start(&config.syscalls)?;
    let host = host::start(&config.host);
    let process = process::start(&config.process, &config.attribution);
    let gpu = gpu::start(&config.gpu);
    Ok(vec![syscalls, gpu, process, host])
}

/// Whether a collector is producing data, as printed under `collectors` in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "reason", rename_all = "lowercase")]
pub enum CollectorStatus {
    Ok,
    /// Running, but some data is missing; the reason says which and why.
    Degraded(String),
    /// Not running at all; the reason says why and what to do about it.
    Unavailable(String),
}

/// Renders an error with its chain of causes on one line (`a: b: c`).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_serializes_with_reason_only_when_not_ok() {
        assert_eq!(
            serde_json::to_string(&CollectorStatus::Ok).unwrap(),
            r#"{"status":"ok"}"#
        );
        assert_eq!(
            serde_json::to_string(&CollectorStatus::Unavailable("no BPF".into())).unwrap(),
            r#"{"status":"unavailable","reason":"no BPF"}"#
        );
    }
}
