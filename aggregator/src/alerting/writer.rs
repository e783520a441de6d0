//! Stores what rules compute (recording-rule results, `ALERTS`, `ALERTS_FOR_STATE`) the way
//! agents' batches are stored: admitted, appended to the write-ahead log, applied to the store.
//! So recorded series survive a restart, count against the same limits, and queries see them
//! like any other series.
//!
//! A sample's `node` label becomes the series' node (so `vigil_x{node="gpu-1"}` recorded from
//! an agent's series stays that node's); samples without one go to the configured
//! `alerting.node`. The rule manager writes as its own agent instance, named after its start
//! time (and a per-process count), so its series ids never clash with an earlier run's in the
//! replayed log.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use vigil_proto::v1::{Batch, Label, MetricType, Sample, Series};

use crate::{
    ingest::{
        admission::{self, Admission, Limits, Writer},
        counters::IngestCounters,
    },
    query::Labels,
    storage::{Store, Wal},
};

/// Writers made by this process: with the start time, a unique agent instance per writer.
static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How the agent instances of the aggregator's own writers begin (rules, verdicts, anomaly
/// scores): ingest sinks that react to agents' data tell computed batches by it.
pub const COMPUTED_INSTANCE_PREFIX: &str = "vigil-rules-";

/// Metric name, labels without name and node, value.
type NamedSample = (String, Vec<(String, String)>, f64);

/// Where recorded samples go.
pub struct SampleWriter {
    store: Arc<Store>,
    /// `None` once closed (the aggregator is shutting down and checkpoints the log).
    wal: Mutex<Option<Arc<Wal>>>,
    counters: Arc<IngestCounters>,
    limits: Limits,
    default_node: String,
    agent_instance: String,
    state: Mutex<WriterState>,
}

#[derive(Default)]
struct WriterState {
    /// Per node: the next batch sequence and the ids of series declared so far.
    nodes: HashMap<String, NodeState>,
}

#[derive(Default)]
struct NodeState {
    next_sequence: u64,
    ids: HashMap<(String, Vec<(String, String)>), u64>,
}

/// What one write did.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct WriteReport {
    pub stored: usize,
    pub rejected: usize,
}

impl SampleWriter {
    pub fn new(
        store: Arc<Store>,
        wal: Arc<Wal>,
        counters: Arc<IngestCounters>,
        limits: Limits,
        default_node: &str,
        started_ms: i64,
    ) -> SampleWriter {
        SampleWriter {
            store,
            wal: Mutex::new(Some(wal)),
            counters,
            limits,
            default_node: default_node.to_owned(),
            agent_instance: format!(
                "{COMPUTED_INSTANCE_PREFIX}{started_ms}-{}",
                WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
            state: Mutex::new(WriterState::default()),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Stops writing: waits for a write in progress, then lets go of the write-ahead log so
    /// the aggregator can take its last checkpoint. Later writes fail.
    pub fn close(&self) {
        let _state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.wal.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Stores float samples at `time_ms`; each `Labels` includes `__name__`. Labels with empty
    /// values are dropped (PromQL treats them as absent). Errors are the write-ahead log's.
    pub fn write(
        &self,
        time_ms: i64,
        now_ms: i64,
        samples: Vec<(Labels, f64)>,
    ) -> Result<WriteReport, String> {
        let mut by_node: BTreeMap<String, Vec<NamedSample>> = BTreeMap::new();
        for (labels, value) in samples {
            let mut name = String::new();
            let mut node = None;
            let mut rest = Vec::new();
            for (label, text) in labels {
                if text.is_empty() {
                    continue;
                }
                match label.as_str() {
                    "__name__" => name = text,
                    "node" => node = Some(text),
                    _ => rest.push((label, text)),
                }
            }
            rest.sort();
            by_node
                .entry(node.unwrap_or_else(|| self.default_node.clone()))
                .or_default()
                .push((name, rest, value));
        }
        let mut report = WriteReport::default();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let wal = self
            .wal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| "the aggregator is shutting down".to_string())?;
        for (node, samples) in by_node {
            let node_state = state.nodes.entry(node.clone()).or_default();
            let mut series = Vec::new();
            let mut points = Vec::new();
            for (name, labels, value) in samples {
                let next_id = node_state.ids.len() as u64 + 1;
                let key = (name, labels);
                let id = match node_state.ids.get(&key) {
                    Some(id) => *id,
                    None => {
                        node_state.ids.insert(key.clone(), next_id);
                        next_id
                    }
                };
                // Declared in every batch: cheap, and a declaration refused once (series
                // limit) is tried again rather than leaving the id unknown for good.
                series.push(Series {
                    id,
                    name: key.0.clone(),
                    labels: key
                        .1
                        .iter()
                        .map(|(name, value)| Label {
                            name: name.clone(),
                            value: value.clone(),
                        })
                        .collect(),
                    r#type: MetricType::Gauge as i32,
                });
                points.push(Sample {
                    series_id: id,
                    time_delta_ms: 0,
                    value,
                });
            }
            node_state.next_sequence += 1;
            let count = points.len();
            let batch = Batch {
                sequence: node_state.next_sequence,
                series,
                base_time_ms: time_ms,
                samples: points,
                ..Batch::default()
            };
            let writer = Writer {
                node: &node,
                agent_instance: &self.agent_instance,
            };
            let admission = admission::admit(
                &self.store,
                &wal,
                &self.counters,
                &self.limits,
                &writer,
                batch,
                now_ms,
            )
            .map_err(|error| format!("write-ahead log: {error}"))?;
            match admission {
                Admission::Stored { rejections, .. } | Admission::Refused { rejections } => {
                    let rejected: usize =
                        rejections.iter().map(|r| r.rejected_samples as usize).sum();
                    for rejection in &rejections {
                        tracing::warn!(
                            node = %node,
                            "recorded samples refused: {}",
                            rejection.message
                        );
                    }
                    report.rejected += rejected;
                    report.stored += count.saturating_sub(rejected);
                }
                Admission::Duplicate { .. } => report.rejected += count,
            }
        }
        Ok(report)
    }
}
