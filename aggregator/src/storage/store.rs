//! What the aggregator has stored: series, their points and events, and per agent instance the
//! series-id mapping and the highest stored batch sequence.
//!
//! For now everything lives in memory and is rebuilt from the write-ahead log at startup; the
//! storage issue replaces the point lists with on-disk blocks behind the same read API
//! ([`Store::series`], [`Store::samples_of`], [`Store::events`]). Reads see every batch appended
//! to the log, including ones whose fsync (and so whose ack) is still pending.

use std::{
    collections::{HashMap, HashSet},
    sync::{Mutex, MutexGuard},
};

use vigil_proto::v1::{Batch, MetricType, Series};

use super::wal::{Lsn, WalRecord};

/// A stored series, the same for every agent instance of a node that declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesRef(pub u64);

/// What a series measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    Gauge,
    Counter,
    Histogram,
}

impl MetricKind {
    /// The kind of a declared `MetricType`; `None` for unspecified or unknown values.
    pub fn from_wire(metric_type: i32) -> Option<MetricKind> {
        match MetricType::try_from(metric_type).ok()? {
            MetricType::Gauge => Some(MetricKind::Gauge),
            MetricType::Counter => Some(MetricKind::Counter),
            MetricType::Histogram => Some(MetricKind::Histogram),
            MetricType::Unspecified => None,
        }
    }
}

/// A series: node, metric name and labels (sorted by name; the node is not among them).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSeries {
    pub id: SeriesRef,
    pub node: String,
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub kind: MetricKind,
}

/// One stored point of a series.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    pub value: PointValue,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PointValue {
    /// A gauge reading or a counter's running total.
    Value(f64),
    Histogram(HistogramPoint),
}

/// A histogram's running totals, with its non-empty log-linear buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramPoint {
    pub count: u64,
    pub sum_seconds: f64,
    /// `(bucket index, count)` in increasing index order (agent-common/src/histogram.rs).
    pub buckets: Vec<(u32, u64)>,
}

/// A stored event (GPU XID, process start/exit, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub node: String,
    pub time_ms: i64,
    pub kind: String,
    pub labels: Vec<(String, String)>,
    pub message: String,
}

/// Everything stored. Cheap to share (`Arc<Store>`); each read takes a short lock.
#[derive(Default)]
pub struct Store {
    state: Mutex<StoreState>,
}

impl Store {
    pub fn new() -> Store {
        Store::default()
    }

    /// Every stored series, in the order first declared.
    pub fn series(&self) -> Vec<StoredSeries> {
        self.lock().series.clone()
    }

    /// The points of a series, in the order stored (per agent, batch order).
    pub fn samples_of(&self, series: SeriesRef) -> Vec<Point> {
        self.lock()
            .points
            .get(series.0 as usize)
            .cloned()
            .unwrap_or_default()
    }

    /// The series with this node, name and labels (in any order), if stored.
    pub fn find_series(
        &self,
        node: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Option<SeriesRef> {
        let key = SeriesKey::new(
            node,
            name,
            labels.iter().map(|(n, v)| (n.to_string(), v.to_string())),
        );
        self.lock().by_key.get(&key).copied()
    }

    /// Every stored event, in the order stored.
    pub fn events(&self) -> Vec<StoredEvent> {
        self.lock().events.clone()
    }

    /// The highest batch sequence stored for this node's agent instance.
    pub fn high_water(&self, node: &str, agent_instance: &str) -> Option<u64> {
        self.lock()
            .instance(node, agent_instance)
            .map(|instance| instance.high_water)
    }

    /// How many distinct series the node has.
    pub fn series_count(&self, node: &str) -> usize {
        self.lock().series_count(node)
    }

    /// The state itself, for the ingest path, which checks and applies a batch under one lock.
    pub(crate) fn lock(&self) -> MutexGuard<'_, StoreState> {
        self.state.lock().expect("store lock poisoned")
    }
}

/// A series' identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SeriesKey {
    node: String,
    name: String,
    labels: Vec<(String, String)>,
}

impl SeriesKey {
    pub(crate) fn new(
        node: &str,
        name: &str,
        labels: impl IntoIterator<Item = (String, String)>,
    ) -> SeriesKey {
        let mut labels: Vec<_> = labels.into_iter().collect();
        labels.sort();
        SeriesKey {
            node: node.to_owned(),
            name: name.to_owned(),
            labels,
        }
    }

    pub(crate) fn of_declaration(node: &str, series: &Series) -> SeriesKey {
        SeriesKey::new(
            node,
            &series.name,
            series
                .labels
                .iter()
                .map(|label| (label.name.clone(), label.value.clone())),
        )
    }
}

/// What is known about one agent instance (spool) of a node.
#[derive(Debug, Default)]
pub(crate) struct InstanceState {
    /// Highest batch sequence stored; batches at or below it are resends.
    pub high_water: u64,
    /// The log record of the latest stored batch: a resend is acked once it is durable.
    pub last_lsn: Lsn,
    /// The agent's series ids.
    pub ids: HashMap<u64, SeriesRef>,
    /// Ids refused for the node's series limit (in memory only; bounded by that limit).
    pub refused: HashSet<u64>,
}

#[derive(Default)]
pub(crate) struct StoreState {
    series: Vec<StoredSeries>,
    points: Vec<Vec<Point>>,
    by_key: HashMap<SeriesKey, SeriesRef>,
    series_per_node: HashMap<String, usize>,
    instances: HashMap<(String, String), InstanceState>,
    events: Vec<StoredEvent>,
}

impl StoreState {
    pub(crate) fn instance(&self, node: &str, agent_instance: &str) -> Option<&InstanceState> {
        self.instances
            .get(&(node.to_owned(), agent_instance.to_owned()))
    }

    pub(crate) fn series_by_key(&self, key: &SeriesKey) -> Option<&StoredSeries> {
        let id = self.by_key.get(key)?;
        self.series.get(id.0 as usize)
    }

    pub(crate) fn series(&self, id: SeriesRef) -> &StoredSeries {
        &self.series[id.0 as usize]
    }

    pub(crate) fn series_count(&self, node: &str) -> usize {
        self.series_per_node.get(node).copied().unwrap_or(0)
    }

    /// Remembers ids refused for the series limit, so their samples get SERIES_LIMIT rather
    /// than UNKNOWN_SERIES (which would make the agent declare them again and again).
    pub(crate) fn remember_refused(
        &mut self,
        node: &str,
        agent_instance: &str,
        ids: impl IntoIterator<Item = u64>,
        bound: usize,
    ) {
        let instance = self
            .instances
            .entry((node.to_owned(), agent_instance.to_owned()))
            .or_default();
        for id in ids {
            if instance.refused.len() >= bound {
                break;
            }
            instance.refused.insert(id);
        }
    }

    /// Stores a batch that was checked (live) or read back from the log (replay): every
    /// declaration and sample in it is accepted as is.
    pub(crate) fn apply(&mut self, record: &WalRecord, lsn: Lsn) {
        let Some(batch) = &record.batch else {
            return;
        };
        let node = record.node.as_str();
        let instance_key = (record.node.clone(), record.agent_instance.clone());
        let mut instance = self.instances.remove(&instance_key).unwrap_or_default();
        instance.high_water = instance.high_water.max(batch.sequence);
        instance.last_lsn = lsn;
        for declaration in &batch.series {
            let Some(kind) = MetricKind::from_wire(declaration.r#type) else {
                continue;
            };
            let id = self.declare(node, declaration, kind);
            instance.refused.remove(&declaration.id);
            instance.ids.insert(declaration.id, id);
        }
        self.store_points(node, &instance, batch);
        self.instances.insert(instance_key, instance);
    }

    fn declare(&mut self, node: &str, declaration: &Series, kind: MetricKind) -> SeriesRef {
        let key = SeriesKey::of_declaration(node, declaration);
        if let Some(id) = self.by_key.get(&key) {
            return *id;
        }
        let id = SeriesRef(self.series.len() as u64);
        self.series.push(StoredSeries {
            id,
            node: key.node.clone(),
            name: key.name.clone(),
            labels: key.labels.clone(),
            kind,
        });
        self.points.push(Vec::new());
        *self.series_per_node.entry(node.to_owned()).or_default() += 1;
        self.by_key.insert(key, id);
        id
    }

    fn store_points(&mut self, node: &str, instance: &InstanceState, batch: &Batch) {
        let base = batch.base_time_ms;
        let mut unresolved = 0usize;
        for sample in &batch.samples {
            let Some(id) = instance.ids.get(&sample.series_id) else {
                unresolved += 1;
                continue;
            };
            self.points[id.0 as usize].push(Point {
                time_ms: base.saturating_add(sample.time_delta_ms),
                value: PointValue::Value(sample.value),
            });
        }
        for histogram in &batch.histograms {
            let Some(id) = instance.ids.get(&histogram.series_id) else {
                unresolved += 1;
                continue;
            };
            let mut index = 0u32;
            let buckets = histogram
                .bucket_index_deltas
                .iter()
                .zip(&histogram.bucket_counts)
                .map(|(delta, count)| {
                    index = index.saturating_add(*delta);
                    (index, *count)
                })
                .collect();
            self.points[id.0 as usize].push(Point {
                time_ms: base.saturating_add(histogram.time_delta_ms),
                value: PointValue::Histogram(HistogramPoint {
                    count: histogram.count,
                    sum_seconds: histogram.sum_seconds,
                    buckets,
                }),
            });
        }
        for event in &batch.events {
            self.events.push(StoredEvent {
                node: node.to_owned(),
                time_ms: base.saturating_add(event.time_delta_ms),
                kind: event.kind.clone(),
                labels: event
                    .labels
                    .iter()
                    .map(|label| (label.name.clone(), label.value.clone()))
                    .collect(),
                message: event.message.clone(),
            });
        }
        if unresolved > 0 {
            // Only a log written by a buggy aggregator can hold these: the ingest path stores
            // samples of declared series only.
            tracing::warn!(
                "skipped {unresolved} stored samples of undeclared series ids (node {node}, batch {})",
                batch.sequence
            );
        }
    }
}
