//! The fleet inventory: which nodes' agents have connected, with what agent, when they were
//! last heard from, and whether a stream is open now; plus what each node's stored series say
//! about its GPUs and tracked model servers.
//!
//! The ingest path updates the [`NodeRegistry`] when it accepts a Hello, admits a batch and
//! when a stream ends. It is kept in memory only: after a restart a node is listed again (from
//! its stored series, without agent details) until its agent reconnects, which agents do at
//! once because their streams are cut.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use vigil_proto::v1::Hello;

use crate::storage::{Store, StoredSeries};

/// What the aggregator knows about one node's agent from its streams.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeState {
    pub agent_version: String,
    pub agent_instance: String,
    pub boot_id: String,
    pub capabilities: Vec<String>,
    /// Milliseconds since the Unix epoch.
    pub first_seen_ms: i64,
    /// The latest accepted Hello or admitted batch.
    pub last_seen_ms: i64,
    /// Open agent streams from this node (an agent may briefly hold two while reconnecting).
    pub streams: u32,
}

/// Every node heard from since the aggregator started. Cheap to share (`Arc`).
#[derive(Debug, Default)]
pub struct NodeRegistry {
    nodes: Mutex<HashMap<String, NodeState>>,
}

/// An open stream's presence: the node counts as connected while it lives.
#[must_use = "the node counts as disconnected once this is dropped"]
pub struct NodePresence {
    registry: Arc<NodeRegistry>,
    node: String,
}

impl Drop for NodePresence {
    fn drop(&mut self) {
        let mut nodes = self.registry.lock();
        if let Some(state) = nodes.get_mut(&self.node) {
            state.streams = state.streams.saturating_sub(1);
            state.last_seen_ms = state.last_seen_ms.max(now_ms());
        }
    }
}

impl NodeRegistry {
    pub fn new() -> NodeRegistry {
        NodeRegistry::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeState>> {
        // A panic elsewhere while holding this lock leaves plain data behind: keep using it.
        self.nodes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records an accepted Hello; the node counts as connected until the returned presence
    /// is dropped (when the stream ends).
    pub fn connected(self: &Arc<Self>, hello: &Hello) -> NodePresence {
        let now = now_ms();
        let mut nodes = self.lock();
        let state = nodes
            .entry(hello.node.clone())
            .or_insert_with(|| NodeState {
                first_seen_ms: now,
                ..NodeState::default()
            });
        state.agent_version = hello.agent_version.clone();
        state.agent_instance = hello.agent_instance.clone();
        state.boot_id = hello.boot_id.clone();
        state.capabilities = hello.capabilities.clone();
        state.last_seen_ms = state.last_seen_ms.max(now);
        state.streams += 1;
        NodePresence {
            registry: self.clone(),
            node: hello.node.clone(),
        }
    }

    /// Records that a node's agent sent a batch now.
    pub fn seen(&self, node: &str) {
        if let Some(state) = self.lock().get_mut(node) {
            state.last_seen_ms = state.last_seen_ms.max(now_ms());
        }
    }

    /// Every node heard from, by name.
    pub fn snapshot(&self) -> BTreeMap<String, NodeState> {
        self.lock()
            .iter()
            .map(|(node, state)| (node.clone(), state.clone()))
            .collect()
    }

    /// How many nodes have an open stream, and how many streams are open in all.
    pub fn connected_counts(&self) -> (usize, u64) {
        let nodes = self.lock();
        let connected = nodes.values().filter(|state| state.streams > 0).count();
        let streams = nodes.values().map(|state| u64::from(state.streams)).sum();
        (connected, streams)
    }
}

/// A GPU as its series' labels describe it.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Gpu {
    /// The `gpu` label (device index).
    pub index: String,
    pub uuid: String,
    pub model: String,
}

/// A tracked model-server process as its series' labels describe it.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ModelServer {
    pub server: String,
    pub comm: String,
    pub pid: String,
}

/// One node of the inventory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeInventory {
    pub node: String,
    /// `None` for a node known only from stored series (not heard from since the start).
    pub state: Option<NodeState>,
    pub series: u64,
    pub gpus: Vec<Gpu>,
    pub model_servers: Vec<ModelServer>,
}

/// The fleet inventory: every node of the registry or the store, sorted by name.
pub fn inventory(registry: &NodeRegistry, store: &Store) -> Vec<NodeInventory> {
    inventory_of(registry, store.series())
}

fn inventory_of(registry: &NodeRegistry, stored: Vec<StoredSeries>) -> Vec<NodeInventory> {
    #[derive(Default)]
    struct FromSeries {
        series: u64,
        gpus: BTreeMap<String, Gpu>,
        servers: BTreeSet<ModelServer>,
    }
    let mut by_node: BTreeMap<String, FromSeries> = BTreeMap::new();
    for series in stored {
        let entry = by_node.entry(series.node.clone()).or_default();
        entry.series += 1;
        let label = |name: &str| {
            series
                .labels
                .iter()
                .find(|(label, _)| label == name)
                .map(|(_, value)| value.clone())
        };
        if series.name.starts_with("vigil_gpu_")
            && let Some(index) = label("gpu")
        {
            // Per-process and per-MIG series carry the index too, often without uuid or
            // model: merge what each series knows into one GPU.
            let gpu = entry.gpus.entry(index.clone()).or_insert_with(|| Gpu {
                index,
                ..Gpu::default()
            });
            if gpu.uuid.is_empty()
                && let Some(uuid) = label("uuid")
            {
                gpu.uuid = uuid;
            }
            if gpu.model.is_empty()
                && let Some(model) = label("model")
            {
                gpu.model = model;
            }
        }
        if series.name.starts_with("vigil_process_")
            && let Some(pid) = label("pid")
        {
            // Series without a pid (the folded "other" processes) are no tracked server.
            entry.servers.insert(ModelServer {
                server: label("server").unwrap_or_default(),
                comm: label("comm").unwrap_or_default(),
                pid,
            });
        }
    }
    let mut states = registry.snapshot();
    let mut names: BTreeSet<String> = by_node.keys().cloned().collect();
    names.extend(states.keys().cloned());
    names
        .into_iter()
        .map(|node| {
            let from_series = by_node.remove(&node).unwrap_or_default();
            let mut gpus: Vec<Gpu> = from_series.gpus.into_values().collect();
            // Numeric order for indexes ("2" before "10").
            gpus.sort_by(|a, b| {
                let key = |gpu: &Gpu| (gpu.index.parse::<u64>().unwrap_or(u64::MAX), gpu.clone());
                key(a).cmp(&key(b))
            });
            NodeInventory {
                state: states.remove(&node),
                node,
                series: from_series.series,
                gpus,
                model_servers: from_series.servers.into_iter().collect(),
            }
        })
        .collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(node: &str, version: &str) -> Hello {
        Hello {
            node: node.into(),
            agent_version: version.into(),
            boot_id: "b".into(),
            agent_instance: "i".into(),
            capabilities: vec![],
        }
    }

    #[test]
    fn a_node_is_connected_while_any_stream_is_open() {
        let registry = Arc::new(NodeRegistry::new());
        let first = registry.connected(&hello("n1", "1.0"));
        let second = registry.connected(&hello("n1", "1.1"));
        assert_eq!(registry.connected_counts(), (1, 2));
        drop(first);
        let state = registry.snapshot()["n1"].clone();
        assert_eq!(state.streams, 1);
        assert_eq!(state.agent_version, "1.1", "the latest Hello wins");
        drop(second);
        assert_eq!(registry.connected_counts(), (0, 0));
        let state = registry.snapshot()["n1"].clone();
        assert!(state.first_seen_ms > 0 && state.last_seen_ms >= state.first_seen_ms);
    }

    fn series(node: &str, name: &str, labels: &[(&str, &str)]) -> StoredSeries {
        StoredSeries {
            id: crate::storage::SeriesRef(0),
            node: node.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            kind: crate::storage::MetricKind::Gauge,
        }
    }

    #[test]
    fn gpus_and_servers_come_from_series_labels() {
        let registry = Arc::new(NodeRegistry::new());
        let _presence = registry.connected(&hello("n2", "2.0"));
        let stored = vec![
            // A per-process GPU series knows only the index; the device series adds the rest.
            series(
                "n1",
                "vigil_gpu_process_memory_used_bytes",
                &[("gpu", "10"), ("pid", "7")],
            ),
            series(
                "n1",
                "vigil_gpu_power_watts",
                &[("gpu", "10"), ("uuid", "GPU-b"), ("model", "H200")],
            ),
            series(
                "n1",
                "vigil_gpu_power_watts",
                &[("gpu", "2"), ("uuid", "GPU-a"), ("model", "H200")],
            ),
            series(
                "n1",
                "vigil_process_cpu_seconds_total",
                &[("pid", "7"), ("comm", "vllm"), ("server", "vllm")],
            ),
            series(
                "n1",
                "vigil_process_threads",
                &[("pid", "7"), ("comm", "vllm"), ("server", "vllm")],
            ),
            // The folded "other" processes are no tracked server.
            series(
                "n1",
                "vigil_process_cpu_seconds_total",
                &[("server", "other")],
            ),
            // Not a GPU series, though it has a gpu label.
            series("n1", "vigil_test_gauge", &[("gpu", "99")]),
        ];
        let nodes = inventory_of(&registry, stored);
        assert_eq!(nodes.len(), 2);
        let n1 = &nodes[0];
        assert_eq!(n1.node, "n1");
        assert!(n1.state.is_none(), "not heard from since the start");
        assert_eq!(n1.series, 7);
        let gpu = |index: &str, uuid: &str| Gpu {
            index: index.into(),
            uuid: uuid.into(),
            model: "H200".into(),
        };
        assert_eq!(n1.gpus, vec![gpu("2", "GPU-a"), gpu("10", "GPU-b")]);
        assert_eq!(
            n1.model_servers,
            vec![ModelServer {
                server: "vllm".into(),
                comm: "vllm".into(),
                pid: "7".into()
            }]
        );
        let n2 = &nodes[1];
        assert_eq!(n2.node, "n2");
        assert_eq!(n2.series, 0);
        assert_eq!(n2.state.as_ref().unwrap().agent_version, "2.0");
    }

    #[test]
    fn unknown_nodes_are_not_created_by_batches() {
        let registry = NodeRegistry::new();
        registry.seen("ghost");
        assert!(registry.snapshot().is_empty());
    }
}
