//! `vigil-agent snapshot`: run the collectors for a while and print one JSON document of what
//! they saw (the format in ARCHITECTURE.md, "Interfaces others rely on").

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    collectors::{
        CollectorStatus, error_chain,
        syscalls::{SyscallLatencyCollector, SyscallsConfigError},
    },
    config::AgentConfig,
    sample::{Event, Sample},
    selection::{ProcessSelector, SelectionError},
};

/// Collection passes happen at least this often: kernel histogram counters are 32-bit, and new
/// model-server processes should be picked up quickly.
const PASS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Serialize)]
pub struct SnapshotDocument {
    pub node: String,
    pub collectors: BTreeMap<&'static str, CollectorStatus>,
    pub samples: Vec<Sample>,
    pub events: Vec<Event>,
}

/// Input the snapshot cannot run with (as opposed to a collector that cannot run, which is
/// reported in the document).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Selection(#[from] SelectionError),
    #[error(transparent)]
    SyscallsConfig(#[from] SyscallsConfigError),
}

/// This node's name (the kernel hostname).
pub fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

pub fn take_snapshot(
    config: &AgentConfig,
    track: &[String],
    duration: Duration,
) -> Result<SnapshotDocument, SnapshotError> {
    let selector = ProcessSelector::new(&config.selection, track)?;
    let histogram_syscalls = config.syscalls.histogram_syscall_numbers()?;

    let mut collectors = BTreeMap::new();
    let mut syscalls = None;
    if !config.syscalls.enabled {
        collectors.insert(
            "syscalls",
            CollectorStatus::Unavailable(
                "disabled in the config (syscalls.enabled = false)".into(),
            ),
        );
    } else {
        match SyscallLatencyCollector::start(&config.syscalls, histogram_syscalls) {
            Ok(collector) => syscalls = Some(collector),
            Err(error) => {
                let reason = format!("{}; syscall latency is not collected", error_chain(&error));
                tracing::warn!("syscalls collector unavailable: {reason}");
                collectors.insert("syscalls", CollectorStatus::Unavailable(reason));
            }
        }
    }

    let deadline = Instant::now() + duration;
    loop {
        if let Some(collector) = syscalls.as_mut() {
            collector.update_tracked(&selector.scan());
            collector.refresh();
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        std::thread::sleep(PASS_INTERVAL.min(deadline - now));
    }

    let mut samples = Vec::new();
    let mut events = Vec::new();
    if let Some(mut collector) = syscalls {
        collectors.insert("syscalls", collector.status());
        samples.extend(collector.samples());
        events.extend(collector.take_events());
    }
    Ok(SnapshotDocument {
        node: node_name(),
        collectors,
        samples,
        events,
    })
}
