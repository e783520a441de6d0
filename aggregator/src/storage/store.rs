//! What the aggregator has stored: series, their points and events, and per agent instance the
//! series-id mapping and the highest stored batch sequence.
//!
//! Recent points live in memory: per series the open ("head") chunk, encoded as points come
//! (codec.rs), closed at [`CHUNK_MAX_SAMPLES`] points or a [`CHUNK_MAX_SPAN_MS`] time span.
//! Closed chunks, events, new series and instance state wait in memory for the next
//! checkpoint ([`Store::checkpoint`]), which writes them, with a snapshot of the open chunks,
//! to the embedded database (disk.rs) in one transaction and then deletes the write-ahead log
//! segments that held them. Reads see every batch applied, including ones whose fsync (and so
//! whose ack) is still pending. docs/storage.md has the layout and the crash-safety argument.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    hash::BuildHasher,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use redb::{ReadableDatabase, ReadableTable};
use vigil_proto::v1::{Batch, MetricType, Series};

use super::{
    codec::{Chunk, ChunkEncoder, ChunkKind},
    disk::{
        BLOCK_PART_BYTES, BLOCK_SPAN_MS, BLOCKS, CHUNK_INDEX, CHUNKS, Disk, EVENTS, EventRow,
        HEADS, HOUR_MS, INSTANCES, InstanceRow, LabelRow, META, MINUTE_MS, ROLLUPS, Rollup, SERIES,
        SeriesRow, StoreError, block_window, decode_rollup_hour, encode_block, encode_chunk_row,
        encode_rollup_hour,
    },
    index::Index,
    live::{IngestSink, IngestedBatch},
    wal::{Lsn, Wal, WalRecord},
};
use crate::query::Matcher;

/// A head chunk closes once it holds this many points (as Prometheus does)...
pub const CHUNK_MAX_SAMPLES: u32 = 120;
/// ... or when a point would stretch it over more than this (2 h).
pub const CHUNK_MAX_SPAN_MS: i64 = 2 * 3600 * 1000;

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

/// What the store keeps, and for how long (`[limits]`, `[storage]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StoreOptions {
    /// Raw chunks and events older than this are deleted (`limits.retention`).
    pub retention: Duration,
    /// 1-minute rollups older than this are deleted (`storage.rollup_retention`).
    pub rollup_retention: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            retention: Duration::from_secs(15 * 86_400),
            rollup_retention: Duration::from_secs(90 * 86_400),
        }
    }
}

/// The store's own figures, for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StorageStats {
    pub series: usize,
    /// Open (head) chunks in memory and their encoded bytes.
    pub head_chunks: usize,
    pub head_bytes: usize,
    /// Closed chunks in memory that wait for the next checkpoint.
    pub pending_chunks: usize,
    /// The database file's length, the bytes it occupies on disk (allocated blocks: the file
    /// is sparse where redb grew it ahead of need), and the bytes its tables hold as of the
    /// last retention pass (hourly; the rest is free pages).
    pub file_bytes: u64,
    pub disk_bytes: u64,
    pub stored_bytes: u64,
    /// Encoded bytes of the chunks written since start.
    pub chunk_bytes_written: u64,
    /// When the last checkpoint finished (Unix ms) and how long it took.
    pub last_checkpoint_unix_ms: Option<i64>,
    pub last_checkpoint_seconds: f64,
    pub checkpoints: u64,
    pub checkpoint_failures: u64,
    /// Chunks written to disk since start.
    pub chunks_written: u64,
    /// Write-ahead log segment files now on disk.
    pub wal_segments: usize,
}

/// What one checkpoint wrote.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckpointReport {
    pub series: usize,
    pub chunks: usize,
    /// Their encoded bytes.
    pub chunk_bytes: u64,
    pub heads: usize,
    pub events: usize,
    pub instances: usize,
    pub rollups: usize,
    /// Blocks written by the compaction in the checkpoint, the chunks they took in, and
    /// their bytes.
    pub blocks: usize,
    pub chunks_compacted: usize,
    pub block_bytes: u64,
    /// The first write-ahead log segment still needed.
    pub wal_start_segment: u64,
    pub wal_segments_removed: usize,
    pub duration: Duration,
}

#[derive(Debug, Default)]
struct Counters {
    last_checkpoint_unix_ms: Option<i64>,
    last_checkpoint_seconds: f64,
    checkpoints: u64,
    checkpoint_failures: u64,
    chunks_written: u64,
    chunk_bytes_written: u64,
    /// As of the last retention pass (redb counts it by walking every table).
    stored_bytes: u64,
}

/// Everything stored. Cheap to share (`Arc<Store>`); each read takes a short lock.
pub struct Store {
    state: Mutex<StoreState>,
    disk: Option<Disk>,
    /// Held for writing while a checkpoint commits and forgets what it wrote, and for reading
    /// while a query takes its view of memory and opens its database snapshot, so a query sees
    /// a chunk either in memory or on disk, never both or neither.
    persist: RwLock<()>,
    data_dir: Option<PathBuf>,
    wal_start_segment: u64,
    options: StoreOptions,
    counters: Mutex<Counters>,
    /// One checkpoint at a time (the periodic one and the shutdown's may meet).
    checkpointing: Mutex<()>,
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn kind_code(kind: MetricKind) -> u32 {
    match kind {
        MetricKind::Gauge => 1,
        MetricKind::Counter => 2,
        MetricKind::Histogram => 3,
    }
}

fn chunk_kind(kind: MetricKind) -> ChunkKind {
    match kind {
        MetricKind::Histogram => ChunkKind::Histogram,
        MetricKind::Gauge | MetricKind::Counter => ChunkKind::Float,
    }
}

impl Store {
    /// A store in memory only, without a data directory (fuzz targets and unit tests): chunks
    /// stay in memory and there are no checkpoints.
    pub fn new() -> Store {
        Store {
            state: Mutex::new(StoreState::default()),
            disk: None,
            persist: RwLock::new(()),
            data_dir: None,
            wal_start_segment: 0,
            options: StoreOptions::default(),
            counters: Mutex::new(Counters::default()),
            checkpointing: Mutex::new(()),
        }
    }

    /// Opens (or creates) the store in `data_dir` (`store.redb`) and loads its index, instance
    /// state and open chunks as of the last checkpoint. The write-ahead log's segments from
    /// [`Store::wal_start_segment`] on hold everything stored after it: replay them into
    /// [`StoreState::replay`].
    pub fn open(data_dir: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|error| StoreError::Db {
            path: data_dir.to_owned(),
            what: error.to_string(),
        })?;
        let disk = Disk::open(&data_dir.join("store.redb"))?;
        let mut state = StoreState::default();
        let wal_start_segment = disk.meta("wal_start_segment")?.unwrap_or(0);
        state.next_chunk_id = disk.meta("next_chunk_id")?.unwrap_or(0);
        state.next_event_id = disk.meta("next_event_id")?.unwrap_or(0);
        state.raw_floor_ms = disk.meta("raw_floor_ms")?.map_or(i64::MIN, |v| v as i64);
        let txn = disk.db().begin_read().map_err(|e| disk.error(e))?;
        let series = txn.open_table(SERIES).map_err(|e| disk.error(e))?;
        for entry in series.iter().map_err(|e| disk.error(e))? {
            let (key, value) = entry.map_err(|e| disk.error(e))?;
            let row = <SeriesRow as prost::Message>::decode(value.value())
                .map_err(|e| disk.corrupt(format!("series {}: {e}", key.value())))?;
            if key.value() != state.series.len() as u64 {
                return Err(disk.corrupt(format!(
                    "series refs are not dense: {} after {}",
                    key.value(),
                    state.series.len()
                )));
            }
            let kind = match row.kind {
                1 => MetricKind::Gauge,
                2 => MetricKind::Counter,
                3 => MetricKind::Histogram,
                other => return Err(disk.corrupt(format!("series kind {other}"))),
            };
            state.add_series(StoredSeries {
                id: SeriesRef(key.value()),
                node: row.node,
                name: row.name,
                labels: row.labels.into_iter().map(|l| (l.name, l.value)).collect(),
                kind,
            });
        }
        state.persisted_series = state.series.len();
        let instances = txn.open_table(INSTANCES).map_err(|e| disk.error(e))?;
        for entry in instances.iter().map_err(|e| disk.error(e))? {
            let (key, value) = entry.map_err(|e| disk.error(e))?;
            let (node, agent_instance) = key.value();
            let row = <InstanceRow as prost::Message>::decode(value.value())
                .map_err(|e| disk.corrupt(format!("instance {node}/{agent_instance}: {e}")))?;
            let mut instance = InstanceState {
                high_water: row.high_water,
                ..InstanceState::default()
            };
            for (agent_id, stored) in row.agent_ids.iter().zip(&row.refs) {
                if *stored >= state.series.len() as u64 {
                    return Err(disk.corrupt(format!("instance maps to unknown series {stored}")));
                }
                instance.ids.insert(*agent_id, SeriesRef(*stored));
            }
            state
                .instances
                .insert((node.to_owned(), agent_instance.to_owned()), instance);
        }
        let heads = txn.open_table(HEADS).map_err(|e| disk.error(e))?;
        for entry in heads.iter().map_err(|e| disk.error(e))? {
            let (key, value) = entry.map_err(|e| disk.error(e))?;
            let chunk = disk.chunk(value.value())?;
            let encoder = ChunkEncoder::resume(&chunk)
                .map_err(|e| disk.corrupt(format!("head of series {}: {e}", key.value())))?;
            let data = state
                .data
                .get_mut(key.value() as usize)
                .ok_or_else(|| disk.corrupt(format!("head of unknown series {}", key.value())))?;
            data.head = Some(Box::new(encoder));
        }
        drop((series, instances, heads, txn));
        Ok(Store {
            state: Mutex::new(state),
            disk: Some(disk),
            persist: RwLock::new(()),
            data_dir: Some(data_dir.to_owned()),
            wal_start_segment,
            options,
            counters: Mutex::new(Counters::default()),
            checkpointing: Mutex::new(()),
        })
    }

    /// The first write-ahead log segment the last checkpoint did not cover.
    pub fn wal_start_segment(&self) -> u64 {
        self.wal_start_segment
    }

    /// Calls `sink` once per batch stored from a live stream from now on (live.rs).
    pub fn add_sink(&self, sink: Arc<dyn IngestSink>) {
        self.lock().sinks.push(sink);
    }

    /// Every stored series, in the order first declared.
    pub fn series(&self) -> Vec<StoredSeries> {
        self.lock()
            .series
            .iter()
            .map(|series| StoredSeries::clone(series))
            .collect()
    }

    /// The raw points of a series still kept, in the order stored (per agent, batch order).
    pub fn samples_of(&self, series: SeriesRef) -> Vec<Point> {
        let mut chunks = self
            .chunks_of(&[series], i64::MIN, i64::MAX)
            .pop()
            .unwrap_or_default();
        chunks.sort_by_key(|(id, _)| *id);
        chunks
            .iter()
            .flat_map(|(_, chunk)| self.decode(chunk))
            .collect()
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
        self.lock().series_by_key(&key).map(|series| series.id)
    }

    /// Every stored event still kept, in the order stored.
    pub fn events(&self) -> Vec<StoredEvent> {
        let persist = self.persist.read().expect("persist lock poisoned");
        let (pending, txn) = {
            let state = self.lock();
            let txn = self
                .disk
                .as_ref()
                .and_then(|disk| disk.db().begin_read().ok());
            (state.pending_events.clone(), txn)
        };
        drop(persist);
        let mut events = Vec::new();
        if let (Some(disk), Some(txn)) = (&self.disk, txn) {
            let mut read = || -> Result<(), StoreError> {
                let table = txn.open_table(EVENTS).map_err(|e| disk.error(e))?;
                for entry in table.iter().map_err(|e| disk.error(e))? {
                    let (_, value) = entry.map_err(|e| disk.error(e))?;
                    let row = <EventRow as prost::Message>::decode(value.value())
                        .map_err(|e| disk.corrupt(format!("event: {e}")))?;
                    events.push(StoredEvent {
                        node: row.node,
                        time_ms: row.time_ms,
                        kind: row.kind,
                        labels: row.labels.into_iter().map(|l| (l.name, l.value)).collect(),
                        message: row.message,
                    });
                }
                Ok(())
            };
            if let Err(error) = read() {
                tracing::error!("reading events: {error}");
            }
        }
        events.extend(pending);
        events
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

    /// The series that may pass every matcher (a superset, from the inverted index).
    pub(crate) fn candidates(&self, matchers: &[Matcher]) -> Vec<Arc<StoredSeries>> {
        let state = self.lock();
        state
            .index
            .candidates(matchers, state.series.len())
            .into_iter()
            .map(|id| state.series[id.0 as usize].clone())
            .collect()
    }

    fn decode(&self, chunk: &Chunk) -> Vec<Point> {
        chunk.points().unwrap_or_else(|error| {
            tracing::error!("skipping an unreadable chunk: {error}");
            Vec::new()
        })
    }

    /// Per series, `(chunk id, chunk)` of every chunk (memory and disk; the open one with id
    /// `u64::MAX`) that may hold points in the range.
    fn chunks_of(&self, refs: &[SeriesRef], start_ms: i64, end_ms: i64) -> Vec<Vec<(u64, Chunk)>> {
        let persist = self.persist.read().expect("persist lock poisoned");
        let (mut out, txn) = {
            let state = self.lock();
            let txn = self.disk.as_ref().and_then(|disk| {
                disk.db()
                    .begin_read()
                    .map_err(|error| tracing::error!("store read: {error}"))
                    .ok()
            });
            let out: Vec<Vec<(u64, Chunk)>> = refs
                .iter()
                .map(|id| {
                    let Some(data) = state.data.get(id.0 as usize) else {
                        return Vec::new();
                    };
                    let mut chunks: Vec<(u64, Chunk)> = data
                        .closed
                        .iter()
                        .filter(|(_, chunk)| chunk.overlaps(start_ms, end_ms))
                        .cloned()
                        .collect();
                    if let Some(head) = &data.head {
                        let chunk = head.snapshot();
                        if chunk.overlaps(start_ms, end_ms) {
                            chunks.push((u64::MAX, chunk));
                        }
                    }
                    chunks
                })
                .collect();
            (out, txn)
        };
        drop(persist);
        let (Some(disk), Some(txn)) = (&self.disk, txn) else {
            return out;
        };
        let read = |out: &mut Vec<Vec<(u64, Chunk)>>| -> Result<(), StoreError> {
            let index = txn.open_table(CHUNK_INDEX).map_err(|e| disk.error(e))?;
            let table = txn.open_table(CHUNKS).map_err(|e| disk.error(e))?;
            let blocks = txn.open_table(BLOCKS).map_err(|e| disk.error(e))?;
            // The windows to look at: those of the range that lie between the first and the
            // last stored window (the range may be unbounded).
            let stored = match (
                blocks.first().map_err(|e| disk.error(e))?,
                blocks.last().map_err(|e| disk.error(e))?,
            ) {
                (Some(first), Some(last)) => Some((first.0.value().0, last.0.value().0)),
                _ => None,
            };
            for (id, chunks) in refs.iter().zip(out.iter_mut()) {
                let mut on_disk = Vec::new();
                // Blocks first (id 0: they hold what was compacted before any chunk still
                // stored as a chunk was written, and a stable sort by id keeps them first).
                if let Some((first, last)) = stored {
                    let mut window = block_window(start_ms).max(first);
                    while window <= last.min(end_ms) {
                        if let Some(chunk) = read_block(disk, &blocks, window, *id)?
                            && chunk.overlaps(start_ms, end_ms)
                        {
                            on_disk.push((0, chunk));
                        }
                        window = window.saturating_add(BLOCK_SPAN_MS);
                    }
                }
                // Keys hold the chunk's latest time; a chunk spans at most CHUNK_MAX_SPAN_MS.
                let upper = end_ms.saturating_add(CHUNK_MAX_SPAN_MS);
                for entry in index
                    .range((id.0, start_ms, 0)..=(id.0, upper, u64::MAX))
                    .map_err(|e| disk.error(e))?
                {
                    let (key, _) = entry.map_err(|e| disk.error(e))?;
                    let chunk_id = key.value().2;
                    let value = table
                        .get(chunk_id)
                        .map_err(|e| disk.error(e))?
                        .ok_or_else(|| disk.corrupt(format!("indexed chunk {chunk_id} missing")))?;
                    let chunk = disk.chunk(value.value())?;
                    if chunk.overlaps(start_ms, end_ms) {
                        on_disk.push((chunk_id, chunk));
                    }
                }
                on_disk.append(chunks);
                *chunks = on_disk;
            }
            Ok(())
        };
        if let Err(error) = read(&mut out) {
            tracing::error!("store read: {error}");
        }
        out
    }

    /// Per series, its points in `[start_ms, end_ms]`, oldest first: raw points, and for the
    /// part of the range that raw retention already dropped, each minute's rollup (its last
    /// value at its time; histograms as their count and sum only).
    pub(crate) fn points_in_range(
        &self,
        series: &[Arc<StoredSeries>],
        start_ms: i64,
        end_ms: i64,
    ) -> Vec<Vec<Point>> {
        let refs: Vec<SeriesRef> = series.iter().map(|s| s.id).collect();
        let raw_floor = self.lock().raw_floor_ms;
        let chunks = self.chunks_of(&refs, start_ms.max(raw_floor), end_ms);
        let floor = start_ms.max(raw_floor);
        let mut out: Vec<Vec<Point>> = chunks
            .iter()
            .map(|chunks| {
                // Sized once: growing it chunk by chunk copied every point again (rule
                // evaluation spent a tenth of its time in those copies).
                let mut points =
                    Vec::with_capacity(chunks.iter().map(|(_, c)| c.count as usize).sum());
                for (_, chunk) in chunks {
                    let decoded = self.decode(chunk).into_iter();
                    points.extend(decoded.filter(|p| p.time_ms >= floor && p.time_ms <= end_ms));
                }
                points
            })
            .collect();
        if start_ms < raw_floor {
            let rollup_end = end_ms.min(raw_floor.saturating_sub(1));
            for ((series, points), rollups) in series
                .iter()
                .zip(out.iter_mut())
                .zip(self.rollups_of(&refs, start_ms, rollup_end))
            {
                for (_, rollup) in rollups {
                    if rollup.last_time_ms < start_ms || rollup.last_time_ms > rollup_end {
                        continue;
                    }
                    points.push(Point {
                        time_ms: rollup.last_time_ms,
                        value: match series.kind {
                            MetricKind::Histogram => PointValue::Histogram(HistogramPoint {
                                count: rollup.last as u64,
                                sum_seconds: rollup.last_sum,
                                buckets: Vec::new(),
                            }),
                            _ => PointValue::Value(rollup.last),
                        },
                    });
                }
            }
        }
        for points in &mut out {
            points.sort_by_key(|p| p.time_ms);
        }
        out
    }

    /// Per float series, its newest point in `[start_ms, end_ms]`: what an instant selector
    /// reads. Rule evaluation and instant queries select thousands of series at every
    /// evaluation; decoding every chunk of the lookback window to keep one point was most of
    /// their time. Here a chunk is decoded only if it may hold the answer: the newest chunk
    /// ending inside the range (not even that one when it is the open chunk and its last point
    /// is its newest: the encoder knows it), and chunks that straddle `end_ms`. Ties on time go
    /// to the later chunk, and within a chunk to the later point, as in
    /// [`Store::points_in_range`]'s stable sort.
    pub(crate) fn latest_floats(
        &self,
        series: &[Arc<StoredSeries>],
        start_ms: i64,
        end_ms: i64,
    ) -> Vec<Option<(i64, f64)>> {
        let raw_floor = self.lock().raw_floor_ms;
        if start_ms < raw_floor {
            // Rollups answer for the older part: take the exact path.
            return self
                .points_in_range(series, start_ms, end_ms)
                .into_iter()
                .map(|points| {
                    points.last().and_then(|point| match point.value {
                        PointValue::Value(v) => Some((point.time_ms, v)),
                        PointValue::Histogram(_) => None,
                    })
                })
                .collect();
        }
        let refs: Vec<SeriesRef> = series.iter().map(|s| s.id).collect();
        let head_last: Vec<Option<(i64, f64)>> = {
            let state = self.lock();
            refs.iter()
                .map(|id| state.data.get(id.0 as usize)?.head.as_ref()?.last_float())
                .collect()
        };
        let in_range = |time: i64| time >= start_ms && time <= end_ms;
        self.chunks_of(&refs, start_ms, end_ms)
            .into_iter()
            .zip(head_last)
            .map(|(chunks, head_last)| {
                // (time, chunk position, value): the newest wins; on a tie the later chunk,
                // and within a chunk the later point (offered in decoding order).
                let mut best: Option<(i64, usize, f64)> = None;
                let mut offer = |time: i64, position: usize, value: f64| {
                    if best.is_none_or(|(t, p, _)| (time, position) >= (t, p)) {
                        best = Some((time, position, value));
                    }
                };
                let newest_inside = chunks
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, chunk))| chunk.max_time <= end_ms && chunk.count > 0)
                    .max_by_key(|(position, (_, chunk))| (chunk.max_time, *position));
                let mut to_decode: Vec<usize> = chunks
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, chunk))| chunk.max_time > end_ms)
                    .map(|(position, _)| position)
                    .collect();
                if let Some((position, (id, chunk))) = newest_inside {
                    match head_last {
                        // The open chunk's snapshot, unchanged since its last point was read,
                        // and that point is its newest.
                        Some((time, value)) if *id == u64::MAX && time == chunk.max_time => {
                            if in_range(time) {
                                offer(time, position, value);
                            }
                        }
                        _ => to_decode.push(position),
                    }
                }
                for position in to_decode {
                    for point in self.decode(&chunks[position].1) {
                        if let PointValue::Value(value) = point.value
                            && in_range(point.time_ms)
                        {
                            offer(point.time_ms, position, value);
                        }
                    }
                }
                best.map(|(time, _, value)| (time, value))
            })
            .collect()
    }

    /// Per series, whether it has a point in `[start_ms, end_ms]`. A chunk wholly inside the
    /// range answers without decoding; others are decoded only while no point is found.
    pub(crate) fn have_points(
        &self,
        series: &[Arc<StoredSeries>],
        start_ms: i64,
        end_ms: i64,
    ) -> Vec<bool> {
        let raw_floor = self.lock().raw_floor_ms;
        if start_ms < raw_floor {
            // Rollups answer for the older part: take the exact path.
            return self
                .points_in_range(series, start_ms, end_ms)
                .iter()
                .map(|points| !points.is_empty())
                .collect();
        }
        let refs: Vec<SeriesRef> = series.iter().map(|s| s.id).collect();
        self.chunks_of(&refs, start_ms, end_ms)
            .iter()
            .map(|chunks| {
                chunks
                    .iter()
                    .any(|(_, c)| c.min_time >= start_ms && c.max_time <= end_ms && c.count > 0)
                    || chunks.iter().any(|(_, chunk)| {
                        self.decode(chunk)
                            .iter()
                            .any(|p| p.time_ms >= start_ms && p.time_ms <= end_ms)
                    })
            })
            .collect()
    }

    /// Per series, its 1-minute rollups (minute start, rollup) overlapping the range, from
    /// closed chunks (the open chunk is rolled up when it closes).
    pub fn rollups(&self, series: SeriesRef, start_ms: i64, end_ms: i64) -> Vec<(i64, Rollup)> {
        self.rollups_of(&[series], start_ms, end_ms)
            .pop()
            .unwrap_or_default()
    }

    fn rollups_of(
        &self,
        refs: &[SeriesRef],
        start_ms: i64,
        end_ms: i64,
    ) -> Vec<Vec<(i64, Rollup)>> {
        let first_minute = start_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
        let persist = self.persist.read().expect("persist lock poisoned");
        let (memory, txn) = {
            let state = self.lock();
            let txn = self
                .disk
                .as_ref()
                .and_then(|disk| disk.db().begin_read().ok());
            let memory: Vec<BTreeMap<i64, Rollup>> = refs
                .iter()
                .map(|id| {
                    let mut minutes = BTreeMap::new();
                    for source in [&state.persisting_rollups, &state.pending_rollups] {
                        for (&(_, minute), rollup) in
                            source.range((id.0, first_minute)..=(id.0, end_ms))
                        {
                            merge_into(&mut minutes, minute, *rollup);
                        }
                    }
                    minutes
                })
                .collect();
            (memory, txn)
        };
        drop(persist);
        refs.iter()
            .zip(memory)
            .map(|(id, memory)| {
                let mut minutes = BTreeMap::new();
                if let (Some(disk), Some(txn)) = (&self.disk, &txn) {
                    let read = |minutes: &mut BTreeMap<i64, Rollup>| -> Result<(), StoreError> {
                        let table = txn.open_table(ROLLUPS).map_err(|e| disk.error(e))?;
                        let first_hour = first_minute.div_euclid(HOUR_MS) * HOUR_MS;
                        for entry in table
                            .range((id.0, first_hour)..=(id.0, end_ms))
                            .map_err(|e| disk.error(e))?
                        {
                            let (key, value) = entry.map_err(|e| disk.error(e))?;
                            let hour = decode_rollup_hour(key.value().1, value.value())
                                .map_err(|e| disk.corrupt(e.0))?;
                            minutes.extend(hour.range(first_minute..=end_ms));
                        }
                        Ok(())
                    };
                    if let Err(error) = read(&mut minutes) {
                        tracing::error!("reading rollups: {error}");
                    }
                }
                for (minute, rollup) in memory {
                    merge_into(&mut minutes, minute, rollup);
                }
                minutes.into_iter().collect()
            })
            .collect()
    }

    /// Writes everything stored since the last checkpoint, then deletes the log segments that
    /// held it. See docs/storage.md for why this is crash-safe at every step.
    pub fn checkpoint(&self, wal: &Wal) -> Result<CheckpointReport, StoreError> {
        let started = Instant::now();
        let disk = self
            .disk
            .as_ref()
            .ok_or(StoreError::InMemory("a checkpoint"))?;
        let _one = self.checkpointing.lock().expect("checkpoint lock poisoned");
        let result = (|| {
            let snapshot = {
                let mut state = self.lock();
                // No record can be appended while the store lock is held (admission appends
                // under it), so the new segment starts exactly after this snapshot.
                let wal_start = wal.rotate()?;
                state.close_idle_heads(now_unix_ms());
                state.snapshot(wal_start)
            };
            let persist = self.persist.write().expect("persist lock poisoned");
            let (chunk_bytes, (blocks, chunks_compacted, block_bytes)) =
                match write_snapshot(disk, &snapshot) {
                    Ok(written) => written,
                    Err(error) => {
                        self.lock().restore(snapshot);
                        return Err(error);
                    }
                };
            self.lock().forget(&snapshot);
            drop(persist);
            let removed = wal.remove_segments_before(snapshot.wal_start)?;
            Ok(CheckpointReport {
                blocks,
                chunks_compacted,
                block_bytes,
                series: snapshot.new_series.len(),
                chunks: snapshot.chunks.len(),
                chunk_bytes,
                heads: snapshot.heads.len(),
                events: snapshot.events.len(),
                instances: snapshot.instances.len(),
                rollups: snapshot.rollups.len(),
                wal_start_segment: snapshot.wal_start,
                wal_segments_removed: removed,
                duration: started.elapsed(),
            })
        })();
        let mut counters = self.counters.lock().expect("counters lock poisoned");
        match &result {
            Ok(report) => {
                counters.checkpoints += 1;
                counters.chunks_written += report.chunks as u64;
                counters.chunk_bytes_written += report.chunk_bytes;
                counters.last_checkpoint_unix_ms = Some(now_unix_ms());
                counters.last_checkpoint_seconds = report.duration.as_secs_f64();
            }
            Err(_) => counters.checkpoint_failures += 1,
        }
        result
    }

    /// Deletes raw chunks and events older than the retention, and rollups older than the
    /// rollup retention, as of `now_ms`. Queries read rollups for times before the raw cutoff.
    pub fn apply_retention(&self, now_ms: i64) -> Result<(), StoreError> {
        let cutoff = now_ms.saturating_sub(self.options.retention.as_millis() as i64);
        let rollup_cutoff = now_ms.saturating_sub(self.options.rollup_retention.as_millis() as i64);
        let Some(disk) = &self.disk else {
            let mut state = self.lock();
            state.raw_floor_ms = state.raw_floor_ms.max(cutoff);
            for data in &mut state.data {
                data.closed.retain(|(_, chunk)| chunk.max_time >= cutoff);
            }
            state.pending_events.retain(|event| event.time_ms >= cutoff);
            return Ok(());
        };
        let _persist = self.persist.write().expect("persist lock poisoned");
        let (series_count, raw_floor) = {
            let state = self.lock();
            (state.series.len() as u64, state.raw_floor_ms.max(cutoff))
        };
        let txn = disk.db().begin_write().map_err(|e| disk.error(e))?;
        {
            let mut index = txn.open_table(CHUNK_INDEX).map_err(|e| disk.error(e))?;
            let mut chunks = txn.open_table(CHUNKS).map_err(|e| disk.error(e))?;
            let mut rollups = txn.open_table(ROLLUPS).map_err(|e| disk.error(e))?;
            let mut blocks = txn.open_table(BLOCKS).map_err(|e| disk.error(e))?;
            // Whole windows that ended before the cutoff (a block straddling it is kept;
            // reads start at the raw floor).
            let block_end = cutoff.saturating_sub(BLOCK_SPAN_MS).saturating_add(1);
            blocks
                .retain_in((i64::MIN, 0, 0)..(block_end, 0, 0), |_, _| false)
                .map_err(|e| disk.error(e))?;
            for id in 0..series_count {
                let mut old = Vec::new();
                for entry in index
                    .range((id, i64::MIN, 0)..(id, cutoff, 0))
                    .map_err(|e| disk.error(e))?
                {
                    old.push(entry.map_err(|e| disk.error(e))?.0.value());
                }
                for key in old {
                    index.remove(key).map_err(|e| disk.error(e))?;
                    chunks.remove(key.2).map_err(|e| disk.error(e))?;
                }
                // Whole hours that ended before the cutoff.
                let hour = rollup_cutoff.div_euclid(HOUR_MS) * HOUR_MS;
                rollups
                    .retain_in((id, i64::MIN)..(id, hour), |_, _| false)
                    .map_err(|e| disk.error(e))?;
            }
            let mut events = txn.open_table(EVENTS).map_err(|e| disk.error(e))?;
            // Events are kept in store order, which is close to time order: drop from the
            // oldest until one is recent enough.
            let mut old = Vec::new();
            for entry in events.iter().map_err(|e| disk.error(e))? {
                let (key, value) = entry.map_err(|e| disk.error(e))?;
                let row = <EventRow as prost::Message>::decode(value.value())
                    .map_err(|e| disk.corrupt(format!("event: {e}")))?;
                if row.time_ms >= cutoff {
                    break;
                }
                old.push(key.value());
            }
            for key in old {
                events.remove(key).map_err(|e| disk.error(e))?;
            }
            let mut meta = txn.open_table(META).map_err(|e| disk.error(e))?;
            meta.insert("raw_floor_ms", raw_floor as u64)
                .map_err(|e| disk.error(e))?;
        }
        let stored_bytes = txn
            .stats()
            .map_or(0, |stats| stats.stored_bytes() + stats.metadata_bytes());
        txn.commit().map_err(|e| disk.error(e))?;
        self.counters
            .lock()
            .expect("counters lock poisoned")
            .stored_bytes = stored_bytes;
        self.lock().raw_floor_ms = raw_floor;
        Ok(())
    }

    /// Compacts the database file (redb moves pages into the free space that checkpoints and
    /// block compaction left and truncates the file), for a clean stop after its last
    /// checkpoint: running queries' snapshots would keep pages in place, so it is skipped
    /// (logged) while one is open. Contents do not change; a crash meanwhile leaves the file
    /// as redb's last commit.
    pub fn compact_file(&self) {
        let Some(disk) = &self.disk else {
            return;
        };
        let _one = self.checkpointing.lock().expect("checkpoint lock poisoned");
        let _persist = self.persist.write().expect("persist lock poisoned");
        let started = Instant::now();
        let before = disk.file_bytes().0;
        match disk.compact() {
            Ok(()) => tracing::info!(
                "store file compacted from {before} to {} bytes in {:.1} s",
                disk.file_bytes().0,
                started.elapsed().as_secs_f64()
            ),
            Err(error) => tracing::warn!("store file not compacted: {error}"),
        }
    }

    /// The store's figures now.
    pub fn stats(&self) -> StorageStats {
        let mut stats = {
            let state = self.lock();
            let mut stats = StorageStats {
                series: state.series.len(),
                ..StorageStats::default()
            };
            for data in &state.data {
                if let Some(head) = &data.head {
                    stats.head_chunks += 1;
                    stats.head_bytes += head.memory_bytes();
                }
                stats.pending_chunks += data.closed.len();
            }
            stats
        };
        (stats.file_bytes, stats.disk_bytes) = self.disk.as_ref().map_or((0, 0), Disk::file_bytes);

        stats.wal_segments = self.data_dir.as_ref().map_or(0, |dir| {
            std::fs::read_dir(dir.join("wal")).map_or(0, |entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "wal"))
                    .count()
            })
        });
        let counters = self.counters.lock().expect("counters lock poisoned");
        stats.last_checkpoint_unix_ms = counters.last_checkpoint_unix_ms;
        stats.last_checkpoint_seconds = counters.last_checkpoint_seconds;
        stats.checkpoints = counters.checkpoints;
        stats.checkpoint_failures = counters.checkpoint_failures;
        stats.chunks_written = counters.chunks_written;
        stats.chunk_bytes_written = counters.chunk_bytes_written;
        stats.stored_bytes = counters.stored_bytes;
        stats
    }
}

fn merge_into(minutes: &mut BTreeMap<i64, Rollup>, minute: i64, rollup: Rollup) {
    let merged = match minutes.get(&minute) {
        Some(older) => older.merge(rollup),
        None => rollup,
    };
    minutes.insert(minute, merged);
}

fn label_rows(labels: &[(String, String)]) -> Vec<LabelRow> {
    labels
        .iter()
        .map(|(name, value)| LabelRow {
            name: name.clone(),
            value: value.clone(),
        })
        .collect()
}

/// Writes one checkpoint in one transaction; returns the bytes of its closed chunks in their
/// stored form (also those that went straight into blocks), and the blocks written, the
/// chunks they took in and their bytes.
fn write_snapshot(
    disk: &Disk,
    snapshot: &Snapshot,
) -> Result<(u64, (usize, usize, u64)), StoreError> {
    let mut chunk_bytes = 0u64;
    let (mut blocks_written, mut compacted, mut block_bytes) = (0usize, 0usize, 0u64);
    let txn = disk.db().begin_write().map_err(|e| disk.error(e))?;
    {
        let mut series = txn.open_table(SERIES).map_err(|e| disk.error(e))?;
        for stored in &snapshot.new_series {
            let row = SeriesRow {
                node: stored.node.clone(),
                name: stored.name.clone(),
                labels: label_rows(&stored.labels),
                kind: kind_code(stored.kind),
            };
            series
                .insert(stored.id.0, prost::Message::encode_to_vec(&row).as_slice())
                .map_err(|e| disk.error(e))?;
        }
        let mut chunks = txn.open_table(CHUNKS).map_err(|e| disk.error(e))?;
        let mut index = txn.open_table(CHUNK_INDEX).map_err(|e| disk.error(e))?;
        let mut blocks = txn.open_table(BLOCKS).map_err(|e| disk.error(e))?;
        let boundaries: HashMap<SeriesRef, i64> = snapshot.compact.iter().copied().collect();
        let mut into_blocks: HashMap<SeriesRef, Vec<(u64, &Chunk)>> = HashMap::new();
        // In id order: every id is above those already written, so this appends.
        let mut ordered: Vec<&(SeriesRef, u64, Chunk)> = snapshot.chunks.iter().collect();
        ordered.sort_by_key(|(_, chunk_id, _)| *chunk_id);
        for (id, chunk_id, chunk) in ordered {
            if boundaries.get(id).is_some_and(|b| chunk.max_time < *b) {
                // Its window is complete: it goes straight into the block.
                chunk_bytes += chunk.to_bytes().len() as u64;
                into_blocks.entry(*id).or_default().push((*chunk_id, chunk));
                continue;
            }
            let bytes = encode_chunk_row(chunk);
            chunk_bytes += bytes.len() as u64;
            chunks
                .insert(*chunk_id, bytes.as_slice())
                .map_err(|e| disk.error(e))?;
            index
                .insert((id.0, chunk.max_time, *chunk_id), ())
                .map_err(|e| disk.error(e))?;
        }
        for &(id, boundary) in &snapshot.compact {
            let memory = into_blocks.remove(&id).unwrap_or_default();
            let (written, replaced, bytes) = compact_series(
                disk,
                (&mut index, &mut chunks, &mut blocks),
                id,
                boundary,
                memory,
            )?;
            blocks_written += written;
            compacted += replaced;
            block_bytes += bytes;
        }
        let mut heads = txn.open_table(HEADS).map_err(|e| disk.error(e))?;
        for (id, head) in &snapshot.heads {
            match head {
                Some(chunk) => {
                    heads
                        .insert(id.0, encode_chunk_row(chunk).as_slice())
                        .map_err(|e| disk.error(e))?;
                }
                None => {
                    heads.remove(id.0).map_err(|e| disk.error(e))?;
                }
            }
        }
        let mut events = txn.open_table(EVENTS).map_err(|e| disk.error(e))?;
        for (id, event) in &snapshot.events {
            let row = EventRow {
                node: event.node.clone(),
                time_ms: event.time_ms,
                kind: event.kind.clone(),
                labels: label_rows(&event.labels),
                message: event.message.clone(),
            };
            events
                .insert(*id, prost::Message::encode_to_vec(&row).as_slice())
                .map_err(|e| disk.error(e))?;
        }
        let mut instances = txn.open_table(INSTANCES).map_err(|e| disk.error(e))?;
        for ((node, agent_instance), row) in &snapshot.instances {
            instances
                .insert(
                    (node.as_str(), agent_instance.as_str()),
                    prost::Message::encode_to_vec(row).as_slice(),
                )
                .map_err(|e| disk.error(e))?;
        }
        let mut rollups = txn.open_table(ROLLUPS).map_err(|e| disk.error(e))?;
        let mut hours: BTreeMap<(u64, i64), Vec<(i64, Rollup)>> = BTreeMap::new();
        for (&(id, minute), rollup) in &snapshot.rollups {
            let hour = minute.div_euclid(HOUR_MS) * HOUR_MS;
            hours.entry((id, hour)).or_default().push((minute, *rollup));
        }
        for ((id, hour), newer) in hours {
            let mut minutes = match rollups.get((id, hour)).map_err(|e| disk.error(e))? {
                Some(row) => {
                    decode_rollup_hour(hour, row.value()).map_err(|e| disk.corrupt(e.0))?
                }
                None => BTreeMap::new(),
            };
            for (minute, rollup) in newer {
                merge_into(&mut minutes, minute, rollup);
            }
            rollups
                .insert((id, hour), encode_rollup_hour(hour, &minutes).as_slice())
                .map_err(|e| disk.error(e))?;
        }
        let mut meta = txn.open_table(META).map_err(|e| disk.error(e))?;
        for (key, value) in [
            ("wal_start_segment", snapshot.wal_start),
            ("next_chunk_id", snapshot.next_chunk_id),
            ("next_event_id", snapshot.next_event_id),
        ] {
            meta.insert(key, value).map_err(|e| disk.error(e))?;
        }
    }
    txn.commit().map_err(|e| disk.error(e))?;
    Ok((chunk_bytes, (blocks_written, compacted, block_bytes)))
}

type CompactTables<'a, 't> = (
    &'a mut redb::Table<'t, (u64, i64, u64), ()>,
    &'a mut redb::Table<'t, u64, &'static [u8]>,
    &'a mut redb::Table<'t, (i64, u64, u32), &'static [u8]>,
);

/// A series' block of one window, its parts put together; `None` when there is none.
fn read_block(
    disk: &Disk,
    blocks: &impl ReadableTable<(i64, u64, u32), &'static [u8]>,
    window: i64,
    id: SeriesRef,
) -> Result<Option<Chunk>, StoreError> {
    let mut bytes = Vec::new();
    for entry in blocks
        .range((window, id.0, 0)..=(window, id.0, u32::MAX))
        .map_err(|e| disk.error(e))?
    {
        bytes.extend_from_slice(entry.map_err(|e| disk.error(e))?.1.value());
    }
    if bytes.is_empty() {
        return Ok(None);
    }
    disk.block(&bytes).map(Some)
}

/// Rewrites a series' stored chunks that end before `boundary`, with `memory` (closed chunks
/// of this checkpoint that end before it too), as one block per window, merged with the
/// window's block if one exists (late points). Runs inside the checkpoint's transaction.
/// Returns the blocks written, the chunks they took in, and the blocks' bytes.
fn compact_series(
    disk: &Disk,
    (index, chunks, blocks): CompactTables<'_, '_>,
    id: SeriesRef,
    boundary: i64,
    memory: Vec<(u64, &Chunk)>,
) -> Result<(usize, usize, u64), StoreError> {
    let mut keys = Vec::new();
    for entry in index
        .range((id.0, i64::MIN, 0)..(id.0, boundary, 0))
        .map_err(|e| disk.error(e))?
    {
        keys.push(entry.map_err(|e| disk.error(e))?.0.value());
    }
    if keys.is_empty() && memory.is_empty() {
        return Ok((0, 0, 0));
    }
    let mut sources: Vec<(u64, Chunk)> = Vec::with_capacity(keys.len() + memory.len());
    for key in &keys {
        let bytes = chunks
            .get(key.2)
            .map_err(|e| disk.error(e))?
            .ok_or_else(|| disk.corrupt(format!("indexed chunk {} missing", key.2)))?;
        sources.push((key.2, disk.chunk(bytes.value())?));
    }
    sources.extend(memory.into_iter().map(|(n, chunk)| (n, chunk.clone())));
    // In store order (chunk ids grow), so points of equal times keep their order.
    sources.sort_by_key(|(n, _)| *n);
    let kind = sources
        .first()
        .map_or(ChunkKind::Float, |(_, chunk)| chunk.kind.open_kind());
    let mut windows: BTreeMap<i64, Vec<Point>> = BTreeMap::new();
    for (n, chunk) in &sources {
        let points = chunk
            .points()
            .map_err(|e| disk.corrupt(format!("chunk {n}: {}", e.0)))?;
        for point in points {
            windows
                .entry(block_window(point.time_ms))
                .or_default()
                .push(point);
        }
    }
    let (mut written, mut bytes_written) = (0usize, 0u64);
    for (window, newer) in windows {
        let mut points = match read_block(disk, &*blocks, window, id)? {
            Some(block) => block
                .points()
                .map_err(|e| disk.corrupt(format!("block of series {}: {}", id.0, e.0)))?,
            None => Vec::new(),
        };
        points.extend(newer);
        // Stable: equal times keep store order.
        points.sort_by_key(|p| p.time_ms);
        let mut encoder = ChunkEncoder::new(kind);
        for point in &points {
            if !encoder.append(point) {
                return Err(disk.corrupt(format!("series {} holds chunks of both kinds", id.0)));
            }
        }
        let row = encode_block(&encoder.seal());
        bytes_written += row.len() as u64;
        blocks
            .retain_in((window, id.0, 0)..=(window, id.0, u32::MAX), |_, _| false)
            .map_err(|e| disk.error(e))?;
        for (part, bytes) in row.chunks(BLOCK_PART_BYTES).enumerate() {
            blocks
                .insert((window, id.0, part as u32), bytes)
                .map_err(|e| disk.error(e))?;
        }
        written += 1;
    }
    for key in &keys {
        index.remove(*key).map_err(|e| disk.error(e))?;
        chunks.remove(key.2).map_err(|e| disk.error(e))?;
    }
    Ok((written, sources.len(), bytes_written))
}

/// What one checkpoint writes, taken under the store lock.
struct Snapshot {
    wal_start: u64,
    first_new_series: usize,
    new_series: Vec<Arc<StoredSeries>>,
    chunks: Vec<(SeriesRef, u64, Chunk)>,
    /// Per series, how many of its closed chunks are in `chunks`.
    drained: Vec<(usize, usize)>,
    heads: Vec<(SeriesRef, Option<Chunk>)>,
    events: Vec<(u64, StoredEvent)>,
    instances: Vec<((String, String), InstanceRow)>,
    rollups: BTreeMap<(u64, i64), Rollup>,
    /// Series whose chunks before this time are compacted into blocks ([`compact_series`]).
    compact: Vec<(SeriesRef, i64)>,
    next_chunk_id: u64,
    next_event_id: u64,
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

    fn is(&self, series: &StoredSeries) -> bool {
        self.node == series.node && self.name == series.name && self.labels == series.labels
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

/// A series' points in memory.
#[derive(Debug, Default)]
struct SeriesData {
    /// The open chunk (boxed: most of a series' memory, absent for idle series).
    head: Option<Box<ChunkEncoder>>,
    /// Changed since the last checkpoint's head snapshot.
    head_dirty: bool,
    /// Closed chunks not yet written by a checkpoint, with their ids.
    closed: Vec<(u64, Chunk)>,
}

#[derive(Default)]
pub(crate) struct StoreState {
    series: Vec<Arc<StoredSeries>>,
    data: Vec<SeriesData>,
    /// Series by the hash of their key (collisions share a bucket).
    by_key: HashMap<u64, Vec<SeriesRef>>,
    hasher: std::hash::RandomState,
    index: Index,
    series_per_node: HashMap<String, usize>,
    instances: HashMap<(String, String), InstanceState>,
    dirty_instances: HashSet<(String, String)>,
    /// Events not yet written by a checkpoint (all of them without a data directory).
    pending_events: Vec<StoredEvent>,
    /// Rollups of chunks closed since the last checkpoint, and of those a running checkpoint
    /// is writing.
    pending_rollups: BTreeMap<(u64, i64), Rollup>,
    persisting_rollups: BTreeMap<(u64, i64), Rollup>,
    /// Series `[..persisted_series]` are on disk.
    persisted_series: usize,
    next_chunk_id: u64,
    next_event_id: u64,
    /// Raw points before this were deleted by retention; queries read rollups there.
    raw_floor_ms: i64,
    sinks: Vec<Arc<dyn IngestSink>>,
}

impl StoreState {
    pub(crate) fn instance(&self, node: &str, agent_instance: &str) -> Option<&InstanceState> {
        self.instances
            .get(&(node.to_owned(), agent_instance.to_owned()))
    }

    pub(crate) fn series_by_key(&self, key: &SeriesKey) -> Option<&StoredSeries> {
        let hash = self.hasher.hash_one(key);
        self.by_key
            .get(&hash)?
            .iter()
            .map(|id| &*self.series[id.0 as usize])
            .find(|series| key.is(series))
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

    /// Stores a batch that was checked by the ingest path (a live stream): every declaration
    /// and sample in it is accepted as is, and every sink sees it.
    pub(crate) fn apply(&mut self, record: &WalRecord, lsn: Lsn) {
        self.store_record(record, lsn, true);
    }

    /// Stores a batch read back from the write-ahead log at startup (no sinks).
    pub(crate) fn replay(&mut self, record: &WalRecord) {
        self.store_record(record, Lsn::default(), false);
    }

    fn store_record(&mut self, record: &WalRecord, lsn: Lsn, live: bool) {
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
        let sinks = live && !self.sinks.is_empty();
        let stored = self.store_points(node, &instance, batch, sinks);
        self.instances.insert(instance_key.clone(), instance);
        self.dirty_instances.insert(instance_key);
        if let Some((points, events)) = stored {
            let batch = Arc::new(IngestedBatch {
                node: record.node.clone(),
                agent_instance: record.agent_instance.clone(),
                points,
                events,
            });
            for sink in &self.sinks {
                sink.on_ingested(&batch);
            }
        }
    }

    fn add_series(&mut self, series: StoredSeries) -> SeriesRef {
        let id = series.id;
        let key = SeriesKey {
            node: series.node.clone(),
            name: series.name.clone(),
            labels: series.labels.clone(),
        };
        self.by_key
            .entry(self.hasher.hash_one(&key))
            .or_default()
            .push(id);
        self.index.add(&series);
        *self.series_per_node.entry(series.node.clone()).or_default() += 1;
        self.series.push(Arc::new(series));
        self.data.push(SeriesData::default());
        id
    }

    fn declare(&mut self, node: &str, declaration: &Series, kind: MetricKind) -> SeriesRef {
        let key = SeriesKey::of_declaration(node, declaration);
        if let Some(series) = self.series_by_key(&key) {
            return series.id;
        }
        self.add_series(StoredSeries {
            id: SeriesRef(self.series.len() as u64),
            node: key.node,
            name: key.name,
            labels: key.labels,
            kind,
        })
    }

    /// Appends one point to its series' open chunk, closing that first when it is full or the
    /// point would stretch it too far.
    fn append_point(&mut self, id: SeriesRef, point: &Point) {
        let kind = chunk_kind(self.series[id.0 as usize].kind);
        let data = &mut self.data[id.0 as usize];
        let close = data.head.as_ref().is_some_and(|head| {
            let (min, max) = head.time_range();
            head.len() >= CHUNK_MAX_SAMPLES
                || max
                    .max(point.time_ms)
                    .saturating_sub(min.min(point.time_ms))
                    > CHUNK_MAX_SPAN_MS
        });
        if close {
            self.close_head(id);
        }
        let data = &mut self.data[id.0 as usize];
        let head = data
            .head
            .get_or_insert_with(|| Box::new(ChunkEncoder::new(kind)));
        if head.append(point) {
            data.head_dirty = true;
        } else {
            // The ingest path checks kinds; only a log from a buggy aggregator gets here.
            tracing::warn!(
                "skipped a point that does not fit the kind of series {}",
                id.0
            );
            if head.is_empty() {
                data.head = None;
            }
        }
    }

    /// Seals the open chunk of a series and rolls it up.
    fn close_head(&mut self, id: SeriesRef) {
        let data = &mut self.data[id.0 as usize];
        let Some(head) = data.head.take() else {
            return;
        };
        data.head_dirty = true;
        let chunk = head.seal();
        let chunk_id = self.next_chunk_id;
        self.next_chunk_id += 1;
        for point in chunk.points().unwrap_or_default() {
            // A staleness marker is not a sample (queries skip it): it has no rollup.
            if let PointValue::Value(v) = &point.value
                && crate::query::value::is_stale_marker(*v)
            {
                continue;
            }
            let rollup = match &point.value {
                PointValue::Value(v) => Rollup::of(point.time_ms, *v, 0.0),
                PointValue::Histogram(h) => {
                    Rollup::of(point.time_ms, h.count as f64, h.sum_seconds)
                }
            };
            let key = (id.0, point.time_ms.div_euclid(MINUTE_MS) * MINUTE_MS);
            let merged = match self.pending_rollups.get(&key) {
                Some(older) => older.merge(rollup),
                None => rollup,
            };
            self.pending_rollups.insert(key, merged);
        }
        self.data[id.0 as usize].closed.push((chunk_id, chunk));
    }

    /// Closes open chunks with nothing new for a chunk span: idle series then take no memory
    /// for points, and their data gets rolled up.
    fn close_idle_heads(&mut self, now_ms: i64) {
        let idle: Vec<SeriesRef> = self
            .data
            .iter()
            .enumerate()
            .filter(|(_, data)| {
                data.head.as_ref().is_some_and(|head| {
                    head.time_range().1 < now_ms.saturating_sub(CHUNK_MAX_SPAN_MS)
                })
            })
            .map(|(n, _)| SeriesRef(n as u64))
            .collect();
        for id in idle {
            self.close_head(id);
        }
    }

    /// Stores a batch's points and events; with `for_sinks`, also returns them as sinks see
    /// them.
    #[allow(clippy::type_complexity)]
    fn store_points(
        &mut self,
        node: &str,
        instance: &InstanceState,
        batch: &Batch,
        for_sinks: bool,
    ) -> Option<(Vec<(Arc<StoredSeries>, Point)>, Vec<StoredEvent>)> {
        let base = batch.base_time_ms;
        let mut unresolved = 0usize;
        let mut seen = Vec::new();
        for sample in &batch.samples {
            let Some(id) = instance.ids.get(&sample.series_id) else {
                unresolved += 1;
                continue;
            };
            let point = Point {
                time_ms: base.saturating_add(sample.time_delta_ms),
                value: PointValue::Value(sample.value),
            };
            self.append_point(*id, &point);
            if for_sinks {
                seen.push((self.series[id.0 as usize].clone(), point));
            }
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
            let point = Point {
                time_ms: base.saturating_add(histogram.time_delta_ms),
                value: PointValue::Histogram(HistogramPoint {
                    count: histogram.count,
                    sum_seconds: histogram.sum_seconds,
                    buckets,
                }),
            };
            self.append_point(*id, &point);
            if for_sinks {
                seen.push((self.series[id.0 as usize].clone(), point));
            }
        }
        let first_event = self.pending_events.len();
        for event in &batch.events {
            self.pending_events.push(StoredEvent {
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
        for_sinks.then(|| (seen, self.pending_events[first_event..].to_vec()))
    }

    /// Takes what a checkpoint writes. Closed chunks and events stay in memory (queries still
    /// read them) until [`StoreState::forget`] after the commit.
    fn snapshot(&mut self, wal_start: u64) -> Snapshot {
        let first_new_series = self.persisted_series;
        let new_series = self.series[first_new_series..].to_vec();
        self.persisted_series = self.series.len();
        let mut chunks = Vec::new();
        let mut drained = Vec::new();
        let mut heads = Vec::new();
        let mut compact = Vec::new();
        for (n, data) in self.data.iter_mut().enumerate() {
            let id = SeriesRef(n as u64);
            if !data.closed.is_empty() {
                // A series that closed a chunk may have completed a window: compact its
                // chunks that end before the window its open chunk starts in; without an
                // open chunk (closed idle), all of them. Points that come later for a
                // compacted window land in a new chunk, merged into the block next time.
                let boundary = match &data.head {
                    Some(head) => block_window(head.time_range().0),
                    None => i64::MAX,
                };
                compact.push((id, boundary));
                drained.push((n, data.closed.len()));
                chunks.extend(
                    data.closed
                        .iter()
                        .map(|(chunk_id, chunk)| (id, *chunk_id, chunk.clone())),
                );
            }
            if data.head_dirty {
                data.head_dirty = false;
                heads.push((id, data.head.as_ref().map(|head| head.snapshot())));
            }
        }
        let events = self
            .pending_events
            .iter()
            .cloned()
            .enumerate()
            .map(|(n, event)| (self.next_event_id + n as u64, event))
            .collect::<Vec<_>>();
        self.next_event_id += events.len() as u64;
        let instances = std::mem::take(&mut self.dirty_instances)
            .into_iter()
            .filter_map(|key| {
                let instance = self.instances.get(&key)?;
                let (agent_ids, refs) = instance.ids.iter().map(|(a, r)| (*a, r.0)).unzip();
                Some((
                    key,
                    InstanceRow {
                        high_water: instance.high_water,
                        agent_ids,
                        refs,
                    },
                ))
            })
            .collect();
        self.persisting_rollups = std::mem::take(&mut self.pending_rollups);
        Snapshot {
            wal_start,
            first_new_series,
            new_series,
            chunks,
            drained,
            heads,
            events,
            instances,
            rollups: self.persisting_rollups.clone(),
            compact,
            next_chunk_id: self.next_chunk_id,
            next_event_id: self.next_event_id,
        }
    }

    /// After a committed checkpoint: drops from memory what it wrote.
    fn forget(&mut self, snapshot: &Snapshot) {
        for &(n, count) in &snapshot.drained {
            self.data[n].closed.drain(..count);
        }
        self.pending_events.drain(..snapshot.events.len());
        self.persisting_rollups.clear();
    }

    /// After a failed checkpoint: what it took is again waiting for the next one.
    fn restore(&mut self, snapshot: Snapshot) {
        self.persisted_series = self.persisted_series.min(snapshot.first_new_series);
        for (id, _) in snapshot.heads {
            self.data[id.0 as usize].head_dirty = true;
        }
        self.dirty_instances
            .extend(snapshot.instances.into_iter().map(|(key, _)| key));
        let persisting = std::mem::take(&mut self.persisting_rollups);
        let newer = std::mem::replace(&mut self.pending_rollups, persisting);
        for (key, rollup) in newer {
            let merged = match self.pending_rollups.get(&key) {
                Some(older) => older.merge(rollup),
                None => rollup,
            };
            self.pending_rollups.insert(key, merged);
        }
    }
}
