//! The on-disk part of the store: one redb database, `<data_dir>/store.redb`, written by
//! checkpoints in single transactions (redb commits are atomic and crash-safe: after a crash
//! the database is the last committed checkpoint, whole).
//!
//! Tables (rows other than chunks are protobuf messages defined here):
//! - `meta`: `&str -> u64`: `wal_start_segment`, `next_chunk_id`, `next_event_id`,
//!   `raw_floor_ms` (i64 bits), `format`.
//! - `series`: `ref -> SeriesRow` (node, name, labels, kind).
//! - `chunks`: `chunk id -> chunk bytes` (codec.rs), closed chunks. Ids only grow and each
//!   checkpoint inserts them in order, so the table is appended to and its B-tree leaves stay
//!   packed (keyed by series, every series' inserts would split leaves that are then left
//!   half empty).
//! - `chunk_index`: `(ref, max time ms, chunk id) -> ()`, to find a series' chunks by time.
//! - `heads`: `ref -> chunk bytes`, each series' open chunk as of the last checkpoint.
//! - `events`: `event id -> EventRow`, in store order.
//! - `instances`: `(node, agent instance) -> InstanceRow` (high-water sequence, id map).
//! - `rollups`: `(ref, hour start ms) -> RollupHourRow`: the hour's 1-minute rollups, as
//!   columns (codec.rs column encodings), one row per hour to keep per-row overhead small.
//! - `blocks`: `(window start ms, ref, part) -> bytes`: a series' points of one complete 2 h
//!   window ([`BLOCK_SPAN_MS`]) as one chunk (optionally zstd'd, [`encode_block`]), compacted
//!   from its closed chunks (one encoding over 7,200 values), stored in parts of
//!   [`BLOCK_PART_BYTES`] so that redb's pages stay full.

use std::{
    path::{Path, PathBuf},
    sync::{RwLock, RwLockReadGuard},
};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use std::collections::BTreeMap;

use super::codec::{
    Chunk, ChunkError, decode_float_column, decode_int_column, encode_float_column,
    encode_int_column,
};

pub(crate) const MINUTE_MS: i64 = 60_000;
pub(crate) const HOUR_MS: i64 = 3_600_000;

pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(crate) const SERIES: TableDefinition<u64, &[u8]> = TableDefinition::new("series");
pub(crate) const CHUNKS: TableDefinition<u64, &[u8]> = TableDefinition::new("chunks");
pub(crate) const CHUNK_INDEX: TableDefinition<(u64, i64, u64), ()> =
    TableDefinition::new("chunk_index");
pub(crate) const HEADS: TableDefinition<u64, &[u8]> = TableDefinition::new("heads");
pub(crate) const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
pub(crate) const INSTANCES: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("instances");
pub(crate) const ROLLUPS: TableDefinition<(u64, i64), &[u8]> = TableDefinition::new("rollups");
pub(crate) const BLOCKS: TableDefinition<(i64, u64, u32), &[u8]> = TableDefinition::new("blocks");

/// A block row is stored in parts of at most this many bytes, keyed `(window, ref, part)`.
/// redb gives a leaf that one large value overflows a power-of-two run of 4 KiB pages (a
/// 17 KB block would take 32 KiB); four parts of this size and their 20-byte keys fill one
/// page. Keyed by window first, a window's compaction (every series at once) appends.
pub(crate) const BLOCK_PART_BYTES: usize = 992;

/// The layout version in `meta.format`; a newer one is refused. Version 1 lacked `blocks`
/// and is upgraded in place (the table is created empty).
pub(crate) const FORMAT: u64 = 2;

/// A block holds one series' points of one aligned window of this length (2 h, as
/// Prometheus's blocks), re-encoded as one chunk once the window is complete.
pub(crate) const BLOCK_SPAN_MS: i64 = 2 * HOUR_MS;

/// The start of the block window holding `time_ms` (saturating: reads pass `i64::MIN`).
pub(crate) fn block_window(time_ms: i64) -> i64 {
    time_ms
        .div_euclid(BLOCK_SPAN_MS)
        .saturating_mul(BLOCK_SPAN_MS)
}

/// redb's page cache: reads of recent blocks hit it, and it is what the process keeps
/// resident for the database beyond what queries copy out. redb's default (1 GiB) would let
/// a long-running aggregator grow far past its series' needs.
const CACHE_BYTES: usize = 16 << 20;

/// A block row: one format byte, then the chunk's stored form (`0`) or that compressed
/// with zstd (`1`), whichever is smaller. Bit-packed float chunks rarely shrink; histogram
/// chunks (byte-aligned varints, bucket after bucket) shrink several times.
pub(crate) fn encode_block(chunk: &Chunk) -> Vec<u8> {
    let plain = chunk.to_bytes();
    match zstd::bulk::compress(&plain, 9) {
        Ok(compressed) if compressed.len() + 16 < plain.len() => {
            let mut out = Vec::with_capacity(compressed.len() + 1);
            out.push(1u8);
            out.extend_from_slice(&compressed);
            out
        }
        _ => {
            let mut out = Vec::with_capacity(plain.len() + 1);
            out.push(0u8);
            out.extend_from_slice(&plain);
            out
        }
    }
}

/// The first byte of a `chunks` row that holds a zstd-compressed chunk (plain rows start with
/// the chunk kind, 1-3). Only histogram chunks are tried: their varints compress several
/// times, bit-packed float chunks do not.
const ZSTD_CHUNK: u8 = 0x80;

/// A `chunks` row.
pub(crate) fn encode_chunk_row(chunk: &Chunk) -> Vec<u8> {
    let plain = chunk.to_bytes();
    if chunk.kind == super::codec::ChunkKind::Histogram
        && let Ok(compressed) = zstd::bulk::compress(&plain, 3)
        && compressed.len() + 16 < plain.len()
    {
        let mut out = Vec::with_capacity(compressed.len() + 1);
        out.push(ZSTD_CHUNK);
        out.extend_from_slice(&compressed);
        return out;
    }
    plain
}

pub(crate) fn decode_block(bytes: &[u8]) -> Result<Chunk, ChunkError> {
    match bytes.split_first() {
        Some((0, plain)) => Chunk::from_bytes(plain),
        // Streamed: the frame's declared size must not size an allocation up front.
        Some((1, compressed)) => Chunk::from_bytes(
            &zstd::stream::decode_all(compressed)
                .map_err(|error| ChunkError(format!("block: zstd: {error}")))?,
        ),
        _ => Err(ChunkError("block: unknown format".into())),
    }
}

/// Why the store cannot be opened, read or checkpointed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {what}; check the data directory's permissions and free space")]
    Db { path: PathBuf, what: String },
    #[error("store {path} is corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error(transparent)]
    Wal(#[from] super::WalError),
    #[error("this store keeps everything in memory (no data directory): {0} is not possible")]
    InMemory(&'static str),
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct LabelRow {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SeriesRow {
    #[prost(string, tag = "1")]
    pub node: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "3")]
    pub labels: Vec<LabelRow>,
    /// 1 gauge, 2 counter, 3 histogram.
    #[prost(uint32, tag = "4")]
    pub kind: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct EventRow {
    #[prost(string, tag = "1")]
    pub node: String,
    #[prost(int64, tag = "2")]
    pub time_ms: i64,
    #[prost(string, tag = "3")]
    pub kind: String,
    #[prost(message, repeated, tag = "4")]
    pub labels: Vec<LabelRow>,
    #[prost(string, tag = "5")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct InstanceRow {
    #[prost(uint64, tag = "1")]
    pub high_water: u64,
    /// The agent's series ids and the stored series they map to, pairwise.
    #[prost(uint64, repeated, tag = "2")]
    pub agent_ids: Vec<u64>,
    #[prost(uint64, repeated, tag = "3")]
    pub refs: Vec<u64>,
}

/// One minute of one series, kept for `storage.rollup_retention` after raw data is gone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rollup {
    /// Samples in the minute.
    pub count: u64,
    /// Floats: the values' minimum, maximum and sum; histograms: of their counts.
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    /// The latest sample's value (histograms: its count) and time.
    pub last: f64,
    pub last_time_ms: i64,
    /// Histograms: the latest sample's sum.
    pub last_sum: f64,
}

impl Rollup {
    pub(crate) fn of(time_ms: i64, value: f64, last_sum: f64) -> Rollup {
        Rollup {
            count: 1,
            min: value,
            max: value,
            sum: value,
            last: value,
            last_time_ms: time_ms,
            last_sum,
        }
    }

    /// Both minutes' samples together; `later` wins a tie on the latest time (it was stored
    /// after).
    pub(crate) fn merge(self, later: Rollup) -> Rollup {
        let latest = if later.last_time_ms >= self.last_time_ms {
            later
        } else {
            self
        };
        Rollup {
            count: self.count + later.count,
            min: self.min.min(later.min),
            max: self.max.max(later.max),
            sum: self.sum + later.sum,
            last: latest.last,
            last_time_ms: latest.last_time_ms,
            last_sum: latest.last_sum,
        }
    }
}

/// One hour of one series' minute rollups, column by column.
#[derive(Clone, PartialEq, prost::Message)]
struct RollupHourRow {
    #[prost(uint32, tag = "1")]
    len: u32,
    /// Minutes after the hour's start.
    #[prost(bytes = "vec", tag = "2")]
    minutes: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    counts: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    min: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    max: Vec<u8>,
    #[prost(bytes = "vec", tag = "6")]
    sum: Vec<u8>,
    #[prost(bytes = "vec", tag = "7")]
    last: Vec<u8>,
    #[prost(bytes = "vec", tag = "8")]
    last_sum: Vec<u8>,
    /// The latest sample's time after its minute's start.
    #[prost(bytes = "vec", tag = "9")]
    last_time: Vec<u8>,
}

/// Encodes the minutes (start ms -> rollup) of the hour starting at `hour`.
pub(crate) fn encode_rollup_hour(hour: i64, minutes: &BTreeMap<i64, Rollup>) -> Vec<u8> {
    let column = |f: &dyn Fn(&Rollup) -> f64| {
        encode_float_column(&minutes.values().map(f).collect::<Vec<_>>())
    };
    let row = RollupHourRow {
        len: minutes.len() as u32,
        minutes: encode_int_column(
            &minutes
                .keys()
                .map(|minute| (minute - hour) / MINUTE_MS)
                .collect::<Vec<_>>(),
        ),
        counts: encode_int_column(&minutes.values().map(|r| r.count as i64).collect::<Vec<_>>()),
        min: column(&|r| r.min),
        max: column(&|r| r.max),
        sum: column(&|r| r.sum),
        last: column(&|r| r.last),
        last_sum: column(&|r| r.last_sum),
        last_time: encode_int_column(
            &minutes
                .iter()
                .map(|(minute, r)| r.last_time_ms.wrapping_sub(*minute))
                .collect::<Vec<_>>(),
        ),
    };
    // Columns of small varints and repeated values compress well; one byte says how it is.
    let plain = prost::Message::encode_to_vec(&row);
    match zstd::bulk::compress(&plain, 3) {
        Ok(compressed) if compressed.len() < plain.len() => {
            let mut out = vec![1u8];
            out.extend_from_slice(&compressed);
            out
        }
        _ => {
            let mut out = vec![0u8];
            out.extend_from_slice(&plain);
            out
        }
    }
}

/// Largest decompressed rollup row: 60 minutes of columns are far below it.
const MAX_ROLLUP_ROW_BYTES: usize = 1 << 20;

pub(crate) fn decode_rollup_hour(
    hour: i64,
    bytes: &[u8],
) -> Result<BTreeMap<i64, Rollup>, ChunkError> {
    let plain = match bytes.split_first() {
        Some((0, plain)) => std::borrow::Cow::Borrowed(plain),
        Some((1, compressed)) => std::borrow::Cow::Owned(
            zstd::bulk::decompress(compressed, MAX_ROLLUP_ROW_BYTES)
                .map_err(|error| ChunkError(format!("rollup row: zstd: {error}")))?,
        ),
        _ => return Err(ChunkError("rollup row: unknown format".into())),
    };
    let row = <RollupHourRow as prost::Message>::decode(&*plain)
        .map_err(|error| ChunkError(format!("rollup row: {error}")))?;
    let len = row.len as usize;
    if len > 60 {
        return Err(ChunkError(format!("{len} minutes in an hour")));
    }
    let minutes = decode_int_column(&row.minutes, len)?;
    let counts = decode_int_column(&row.counts, len)?;
    let last_time = decode_int_column(&row.last_time, len)?;
    let [min, max, sum, last, last_sum] = [row.min, row.max, row.sum, row.last, row.last_sum]
        .map(|column| decode_float_column(&column, len));
    let (min, max, sum, last, last_sum) = (min?, max?, sum?, last?, last_sum?);
    Ok((0..len)
        .map(|n| {
            let minute = hour + minutes[n] * MINUTE_MS;
            (
                minute,
                Rollup {
                    count: counts[n] as u64,
                    min: min[n],
                    max: max[n],
                    sum: sum[n],
                    last: last[n],
                    last_time_ms: minute.wrapping_add(last_time[n]),
                    last_sum: last_sum[n],
                },
            )
        })
        .collect())
}

/// The open database.
pub(crate) struct Disk {
    pub path: PathBuf,
    /// Transactions take the read side only to begin (they do not borrow the database);
    /// [`Disk::compact`] needs it exclusively.
    db: RwLock<Database>,
}

impl Disk {
    pub fn open(path: &Path) -> Result<Disk, StoreError> {
        // redb repairs a file that was not closed cleanly (a crash) by walking it all: say so,
        // it explains a slow start.
        let repaired = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = repaired.clone();
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .set_repair_callback(move |_| flag.store(true, std::sync::atomic::Ordering::Relaxed))
            .create(path)
            .map_err(|error| StoreError::Db {
                path: path.to_owned(),
                what: error.to_string(),
            })?;
        let disk = Disk {
            path: path.to_owned(),
            db: RwLock::new(db),
        };
        if repaired.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                "{} was not closed cleanly; redb checked and repaired it",
                path.display()
            );
        }
        // Create every table, so readers never meet a missing one.
        let txn = disk.db().begin_write().map_err(|e| disk.error(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| disk.error(e))?;
            let format = meta
                .get("format")
                .map_err(|e| disk.error(e))?
                .map(|v| v.value());
            match format {
                None | Some(1) => {
                    meta.insert("format", FORMAT).map_err(|e| disk.error(e))?;
                }
                Some(FORMAT) => {}
                Some(other) => {
                    return Err(disk.corrupt(format!(
                        "layout version {other} was written by a newer aggregator (this one \
                         reads {FORMAT})"
                    )));
                }
            }
            txn.open_table(SERIES).map_err(|e| disk.error(e))?;
            txn.open_table(CHUNKS).map_err(|e| disk.error(e))?;
            txn.open_table(CHUNK_INDEX).map_err(|e| disk.error(e))?;
            txn.open_table(HEADS).map_err(|e| disk.error(e))?;
            txn.open_table(EVENTS).map_err(|e| disk.error(e))?;
            txn.open_table(INSTANCES).map_err(|e| disk.error(e))?;
            txn.open_table(ROLLUPS).map_err(|e| disk.error(e))?;
            txn.open_table(BLOCKS).map_err(|e| disk.error(e))?;
        }
        txn.commit().map_err(|e| disk.error(e))?;
        Ok(disk)
    }

    pub fn db(&self) -> RwLockReadGuard<'_, Database> {
        self.db.read().expect("database lock poisoned")
    }

    /// Compacts the file until redb finds nothing more to move (bounded: each pass moves
    /// what it can). Fails while a transaction is open.
    pub fn compact(&self) -> Result<(), StoreError> {
        let mut db = self.db.write().expect("database lock poisoned");
        for _ in 0..16 {
            if !db.compact().map_err(|e| self.error(e))? {
                break;
            }
        }
        Ok(())
    }

    pub fn error(&self, error: impl std::fmt::Display) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            what: error.to_string(),
        }
    }

    pub fn corrupt(&self, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    /// A `chunks` row ([`encode_chunk_row`]).
    pub fn chunk(&self, bytes: &[u8]) -> Result<Chunk, StoreError> {
        match bytes.split_first() {
            Some((&ZSTD_CHUNK, compressed)) => zstd::stream::decode_all(compressed)
                .map_err(|error| ChunkError(format!("chunk: zstd: {error}")))
                .and_then(|plain| Chunk::from_bytes(&plain)),
            _ => Chunk::from_bytes(bytes),
        }
        .map_err(|ChunkError(what)| self.corrupt(what))
    }

    pub fn block(&self, bytes: &[u8]) -> Result<Chunk, StoreError> {
        decode_block(bytes).map_err(|ChunkError(what)| self.corrupt(what))
    }

    pub fn meta(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let txn = self.db().begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(META).map_err(|e| self.error(e))?;
        Ok(table
            .get(key)
            .map_err(|e| self.error(e))?
            .map(|v| v.value()))
    }

    /// The database file's length, and the bytes it occupies on disk (less: redb grows the
    /// file ahead of need, and the unwritten part is sparse).
    pub fn file_bytes(&self) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).map_or((0, 0), |m| (m.len(), m.blocks() * 512))
    }
}
