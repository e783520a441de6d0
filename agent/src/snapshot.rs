//! `vigil-agent snapshot`: run the collectors for a while and print one JSON document of what
//! they saw (the format in ARCHITECTURE.md, "Interfaces others rely on").

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    collectors::CollectorStatus,
    config::AgentConfig,
    pass::{CollectionPass, PassSetupError},
    sample::{Event, Sample},
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
) -> Result<SnapshotDocument, PassSetupError> {
    let mut pass = CollectionPass::new(config, track)?;
    let deadline = Instant::now() + duration;
    loop {
        pass.run();
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        std::thread::sleep(PASS_INTERVAL.min(deadline - now));
    }

    let mut statuses = BTreeMap::new();
    let mut samples = Vec::new();
    let mut events = Vec::new();
    for collector in pass.collectors_mut() {
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
