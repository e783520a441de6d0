//! `vigil-agent snapshot`: run the collectors for a while and print one JSON document of what
//! they saw (the format in ARCHITECTURE.md, "Interfaces others rely on").

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    collectors::{CollectorConfigError, CollectorStatus, start_collectors},
    config::AgentConfig,
    sample::{Event, Sample},
    selection::{PassSelection, ProcessSelector, SelectionError},
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
    CollectorConfig(#[from] CollectorConfigError),
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
    let mut collectors = start_collectors(config)?;

    let deadline = Instant::now() + duration;
    loop {
        let selection = PassSelection {
            tracked: selector.scan(),
            folded: Vec::new(),
        };
        for collector in collectors.iter_mut() {
            collector.collect(&selection);
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        std::thread::sleep(PASS_INTERVAL.min(deadline - now));
    }

    let mut statuses = BTreeMap::new();
    let mut samples = Vec::new();
    let mut events = Vec::new();
    for collector in collectors.iter_mut() {
        statuses.insert(collector.name(), collector.status());
        samples.extend(collector.samples());
        events.extend(collector.take_events());
    }
    Ok(SnapshotDocument {
        node: node_name(),
        collectors: statuses,
        samples,
        events,
    })
}
