//! The on-disk spool: every batch is appended here before it is sent, and stays until the
//! aggregator acks it, so outages, aggregator restarts and agent restarts (`kill -9` included)
//! lose nothing that was spooled.
//!
//! Layout of the spool directory:
//! - `instance`: this agent's random instance id, created once (sequences and series ids are
//!   scoped to it);
//! - `state`: the ack high-water mark, the next sequence and series id, dropped batches;
//! - `segment-<first sequence>.log`: append-only records, each
//!   `[payload length u32][crc32 u32][sequence u64][next series id u64][payload]` (little
//!   endian; the CRC covers everything after itself), the payload being the encoded `Batch`;
//! - `series`: the series dictionary (id -> name, labels, type) of every series declared by a
//!   spooled batch (`dictionary.rs`), so the sender can declare on each stream the series its
//!   batches use even after the batch that first declared them was acked and trimmed, or
//!   dropped for space. An entry is kept while a batch that is not acked uses it, or while the
//!   encoder may still use it (used by one of the last `2 * FORGET_AFTER_PASSES` batches: the
//!   encoder forgets a series unused for `FORGET_AFTER_PASSES` passes, and a pass makes at
//!   most one batch); others are dropped when the file is compacted. Entries read at start
//!   count as used by the newest spooled batch.
//!
//! Whole segments are deleted once every batch in them is acked. A record cut short by a crash
//! is cut off at the next start. The spool is bounded: past `max_bytes` the oldest segment is
//! dropped, and its unacked batches are counted as dropped.

use std::{
    collections::{HashSet, VecDeque},
    fs::{self, File, OpenOptions},
    io::{Read, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    time::Instant,
};

use prost::Message;
use vigil_proto::v1::Batch;

use super::{dictionary::SeriesDictionary, encode::FORGET_AFTER_PASSES};

const HEADER_BYTES: usize = 24;
const INSTANCE_FILE: &str = "instance";
const STATE_FILE: &str = "state";
const LOCK_FILE: &str = "lock";
/// Segments are at most this large, and at most 1/16 of the bound (so dropping one for space
/// drops a small part of the spool).
const MAX_SEGMENT_BYTES: u64 = 64 << 20;
const MIN_SEGMENT_BYTES: u64 = 4 << 10;
/// Dictionary entries used by one of this many of the newest batches are kept (the encoder may
/// still use them without declaring them again).
const ENCODER_MEMORY_BATCHES: u64 = 2 * FORGET_AFTER_PASSES;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {action}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "spool {0} is in use by another vigil-agent; give each agent its own transport.spool_dir"
    )]
    InUse(PathBuf),
    #[error("spool {path}: record of batch {sequence} is corrupt ({reason})")]
    Corrupt {
        path: PathBuf,
        sequence: u64,
        reason: String,
    },
    #[error("spool: batch {got} appended, but the next sequence is {expected}")]
    OutOfOrder { expected: u64, got: u64 },
}

pub(crate) fn io_error(
    path: &Path,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> SpoolError {
    let path = path.to_owned();
    move |source| SpoolError::Io {
        path,
        action,
        source,
    }
}

#[derive(Debug, Clone, Copy)]
struct RecordIndex {
    sequence: u64,
    offset: u64,
    /// Header and payload.
    len: u32,
}

/// One segment file and the records in it, in sequence order.
#[derive(Debug)]
struct SpoolSegment {
    path: PathBuf,
    records: Vec<RecordIndex>,
    bytes: u64,
}

impl SpoolSegment {
    fn last_sequence(&self) -> Option<u64> {
        self.records.last().map(|r| r.sequence)
    }
}

/// What `append` did besides appending.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Unacked batches dropped (oldest first) to stay within the bound.
    pub dropped_batches: u64,
}

/// The agent's spool of batches not yet acked by the aggregator.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_max_bytes: u64,
    instance: String,
    segments: VecDeque<SpoolSegment>,
    /// The segment appends go to (always the last one); `None` until the first append after
    /// opening, so a segment recovered from disk is never appended to.
    active: Option<File>,
    total_bytes: u64,
    acked: u64,
    next_sequence: u64,
    next_series_id: u64,
    dropped_batches: u64,
    unsynced_data: bool,
    state_dirty: bool,
    last_sync: Instant,
    dictionary: SeriesDictionary,
    _lock: File,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, recovering what a previous run left: unacked
    /// batches are kept, a torn last record is cut, fully acked segments are deleted.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        fs::create_dir_all(dir).map_err(io_error(dir, "cannot create the directory"))?;
        let lock = lock_dir(dir)?;
        let instance = load_or_create_instance(dir)?;
        let state = SpoolState::load(dir)?;
        let segment_max_bytes = (max_bytes / 16).clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES);
        let dictionary = SeriesDictionary::open(dir)?;

        let mut names: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(io_error(dir, "cannot list the directory"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("segment-") && n.ends_with(".log"))
            })
            .collect();
        names.sort();

        let mut spool = Self {
            dir: dir.to_owned(),
            max_bytes,
            segment_max_bytes,
            instance,
            segments: VecDeque::new(),
            active: None,
            total_bytes: 0,
            acked: state.acked,
            next_sequence: state.next_sequence.max(state.acked + 1).max(1),
            next_series_id: state.next_series_id.max(1),
            dropped_batches: state.dropped_batches,
            unsynced_data: false,
            state_dirty: false,
            last_sync: Instant::now(),
            dictionary,
            _lock: lock,
        };
        for path in names {
            let (segment, next_series_id) = recover_segment(&path)?;
            if let Some(last) = segment.last_sequence() {
                spool.next_sequence = spool.next_sequence.max(last + 1);
                spool.next_series_id = spool.next_series_id.max(next_series_id);
            }
            spool.total_bytes += segment.bytes;
            spool.segments.push_back(segment);
        }
        // Conservative: every entry read counts as used by the newest spooled batch.
        spool.dictionary.touch_all(spool.next_sequence - 1);
        if let Some(max_id) = spool.dictionary.max_id() {
            spool.next_series_id = spool.next_series_id.max(max_id + 1);
        }
        spool.trim()?;
        Ok(spool)
    }

    /// The random id of this agent instance, kept across restarts.
    pub fn agent_instance(&self) -> &str {
        &self.instance
    }

    /// The sequence the next appended batch must have.
    pub fn next_sequence(&self) -> u64 {
        self.next_sequence
    }

    /// The lowest series id no spooled or acked batch has used.
    pub fn next_series_id(&self) -> u64 {
        self.next_series_id
    }

    /// The highest sequence the aggregator acked.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Batches dropped for space, since the spool was created.
    pub fn dropped_batches(&self) -> u64 {
        self.dropped_batches
    }

    /// Bytes of segment files on disk.
    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Batches spooled and not acked.
    pub fn unacked_batches(&self) -> u64 {
        self.segments
            .iter()
            .flat_map(|s| &s.records)
            .filter(|r| r.sequence > self.acked)
            .count() as u64
    }

    /// Appends `batch`, whose sequence must be `next_sequence()`. The data reaches the disk at
    /// the next `sync`.
    pub fn append(&mut self, batch: &Batch) -> Result<AppendOutcome, SpoolError> {
        if batch.sequence != self.next_sequence {
            return Err(SpoolError::OutOfOrder {
                expected: self.next_sequence,
                got: batch.sequence,
            });
        }
        let declared_next = batch.series.iter().map(|s| s.id + 1).max().unwrap_or(0);
        // The declarations reach the dictionary file before the batch reaches its segment (and
        // are synced first).
        self.dictionary.insert(&batch.series, batch.sequence)?;
        for id in referenced_ids(batch) {
            self.dictionary.touch(id, batch.sequence);
        }
        let next_series_id = self.next_series_id.max(declared_next);
        let payload = batch.encode_to_vec();
        let mut record = Vec::with_capacity(HEADER_BYTES + payload.len());
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&[0; 4]);
        record.extend_from_slice(&batch.sequence.to_le_bytes());
        record.extend_from_slice(&next_series_id.to_le_bytes());
        record.extend_from_slice(&payload);
        let crc = crc32fast::hash(&record[8..]);
        record[4..8].copy_from_slice(&crc.to_le_bytes());

        let rotate = match (self.active.as_ref(), self.segments.back()) {
            (Some(_), Some(last)) => {
                last.bytes > 0 && last.bytes + record.len() as u64 > self.segment_max_bytes
            }
            _ => true,
        };
        if rotate {
            self.start_segment(batch.sequence)?;
        }
        let segment = self.segments.back_mut().expect("an active segment");
        let file = self.active.as_mut().expect("an active segment file");
        file.write_all(&record)
            .map_err(io_error(&segment.path, "cannot append a batch"))?;
        segment.records.push(RecordIndex {
            sequence: batch.sequence,
            offset: segment.bytes,
            len: record.len() as u32,
        });
        segment.bytes += record.len() as u64;
        self.total_bytes += record.len() as u64;
        self.next_sequence += 1;
        self.next_series_id = next_series_id;
        self.unsynced_data = true;
        // Also saved at the next sync, so that a sequence is not handed out twice even when
        // the record holding it is lost.
        self.state_dirty = true;
        let outcome = self.enforce_bound()?;
        if self.dictionary.wants_compaction() {
            let (acked, newest) = (self.acked, self.next_sequence - 1);
            self.dictionary.compact(|_, last_used| {
                last_used > acked || last_used + ENCODER_MEMORY_BATCHES > newest
            })?;
        }
        Ok(outcome)
    }

    /// The declaration of series `id` in the spool's dictionary.
    pub fn series(&self, id: u64) -> Option<&vigil_proto::v1::Series> {
        self.dictionary.get(id)
    }

    /// Series in the spool's dictionary.
    pub fn known_series(&self) -> usize {
        self.dictionary.len()
    }

    /// Bytes of the dictionary file.
    pub fn dictionary_bytes(&self) -> u64 {
        self.dictionary.bytes()
    }

    /// Makes `batch` self-sufficient on a stream where the series in `declared` were declared
    /// already: adds to `batch.series` the declaration of every series the batch uses that is
    /// neither in `declared` nor declared by the batch itself, and adds them all to `declared`.
    /// Returns the ids it has no declaration for (the aggregator will answer UNKNOWN_SERIES).
    pub fn declare_for_stream(
        &mut self,
        batch: &mut Batch,
        declared: &mut HashSet<u64>,
    ) -> Result<Vec<u64>, SpoolError> {
        // A batch read back from the spool: its own declarations are in the dictionary (added
        // again here in case the dictionary lost them in a crash).
        self.dictionary.insert(&batch.series, batch.sequence)?;
        declared.extend(batch.series.iter().map(|s| s.id));
        let mut missing = Vec::new();
        let mut added = Vec::new();
        for id in referenced_ids(batch) {
            if declared.insert(id) {
                match self.dictionary.get(id) {
                    Some(series) => added.push(series.clone()),
                    None => missing.push(id),
                }
            }
        }
        batch.series.extend(added);
        Ok(missing)
    }

    /// Flushes appended batches and the state to disk (fsync).
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        self.dictionary.sync()?;
        if self.unsynced_data
            && let (Some(file), Some(segment)) = (self.active.as_ref(), self.segments.back())
        {
            file.sync_data()
                .map_err(io_error(&segment.path, "cannot fsync"))?;
        }
        self.unsynced_data = false;
        if self.state_dirty {
            self.write_state()?;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// When the spool was last synced.
    pub fn last_sync(&self) -> Instant {
        self.last_sync
    }

    /// Records that every batch up to `sequence` is durably stored by the aggregator, and
    /// deletes the segments that held only acked batches.
    pub fn ack(&mut self, sequence: u64) -> Result<(), SpoolError> {
        let sequence = sequence.min(self.next_sequence - 1);
        if sequence <= self.acked {
            return Ok(());
        }
        self.acked = sequence;
        self.state_dirty = true;
        self.trim()
    }

    /// The oldest spooled, unacked batch with a sequence of at least `from`.
    pub fn read_from(&self, from: u64) -> Result<Option<Batch>, SpoolError> {
        let from = from.max(self.acked + 1);
        for segment in &self.segments {
            if segment.last_sequence().is_none_or(|last| last < from) {
                continue;
            }
            let at = segment.records.partition_point(|r| r.sequence < from);
            let record = segment.records[at];
            return read_record(&segment.path, record).map(Some);
        }
        Ok(None)
    }

    fn start_segment(&mut self, first_sequence: u64) -> Result<(), SpoolError> {
        if let (Some(file), Some(segment)) = (self.active.as_ref(), self.segments.back())
            && self.unsynced_data
        {
            file.sync_data()
                .map_err(io_error(&segment.path, "cannot fsync"))?;
        }
        let path = self.dir.join(format!("segment-{first_sequence:020}.log"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_error(&path, "cannot create a segment"))?;
        sync_dir(&self.dir)?;
        self.segments.push_back(SpoolSegment {
            path,
            records: Vec::new(),
            bytes: 0,
        });
        self.active = Some(file);
        Ok(())
    }

    /// Deletes segments whose batches are all acked (the state is saved first, so the ack
    /// high-water mark and counters outlive them).
    fn trim(&mut self) -> Result<(), SpoolError> {
        let removable = self
            .segments
            .iter()
            .take_while(|s| s.last_sequence().is_none_or(|last| last <= self.acked))
            .count();
        // An empty segment that is being appended to stays.
        let removable = if removable == self.segments.len()
            && self.active.is_some()
            && self.segments.back().is_some_and(|s| s.records.is_empty())
        {
            removable - 1
        } else {
            removable
        };
        if removable == 0 {
            return Ok(());
        }
        self.write_state()?;
        for _ in 0..removable {
            self.remove_oldest_segment()?;
        }
        Ok(())
    }

    fn enforce_bound(&mut self) -> Result<AppendOutcome, SpoolError> {
        let mut outcome = AppendOutcome::default();
        while self.total_bytes > self.max_bytes && self.segments.len() > 1 {
            let oldest = &self.segments[0];
            let dropped = oldest
                .records
                .iter()
                .filter(|r| r.sequence > self.acked)
                .count() as u64;
            if dropped > 0 {
                let first = oldest.records.iter().find(|r| r.sequence > self.acked);
                tracing::warn!(
                    spool = %self.dir.display(),
                    dropped_batches = dropped,
                    first_sequence = first.map_or(0, |r| r.sequence),
                    last_sequence = oldest.last_sequence().unwrap_or(0),
                    max_bytes = self.max_bytes,
                    "spool full: dropped the oldest unacked batches (the aggregator has been unreachable or slow for too long; raise transport.spool_max_bytes to keep more)"
                );
                // Those batches will never be acked: move the ack mark past them so the sender
                // and the next start skip them.
                self.acked = self.acked.max(oldest.last_sequence().unwrap_or(0));
            }
            outcome.dropped_batches += dropped;
            self.dropped_batches += dropped;
            self.state_dirty = true;
            self.write_state()?;
            self.remove_oldest_segment()?;
        }
        Ok(outcome)
    }

    fn remove_oldest_segment(&mut self) -> Result<(), SpoolError> {
        let Some(segment) = self.segments.pop_front() else {
            return Ok(());
        };
        if self.segments.is_empty() {
            self.active = None;
        }
        self.total_bytes -= segment.bytes;
        match fs::remove_file(&segment.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(&segment.path, "cannot delete an acked segment")(e)),
        }
    }

    fn write_state(&mut self) -> Result<(), SpoolError> {
        // Batches acked (or dropped) past the state's mark may be deleted: the declarations
        // they made must be on disk first.
        self.dictionary.sync()?;
        SpoolState {
            acked: self.acked,
            next_sequence: self.next_sequence,
            next_series_id: self.next_series_id,
            dropped_batches: self.dropped_batches,
        }
        .save(&self.dir)?;
        self.state_dirty = false;
        Ok(())
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            tracing::warn!("spool not synced on shutdown: {e}");
        }
    }
}

/// The series ids `batch` uses (samples and histograms), each once, in first-use order.
fn referenced_ids(batch: &Batch) -> impl Iterator<Item = u64> + '_ {
    let mut seen = HashSet::new();
    batch
        .samples
        .iter()
        .map(|s| s.series_id)
        .chain(batch.histograms.iter().map(|h| h.series_id))
        .filter(move |id| seen.insert(*id))
}

/// What `state` holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SpoolState {
    acked: u64,
    next_sequence: u64,
    next_series_id: u64,
    dropped_batches: u64,
}

impl SpoolState {
    fn load(dir: &Path) -> Result<Self, SpoolError> {
        let path = dir.join(STATE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(io_error(&path, "cannot read the state")(e)),
        };
        let mut state = Self::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<u64>() else {
                continue;
            };
            match key {
                "acked" => state.acked = value,
                "next_sequence" => state.next_sequence = value,
                "next_series_id" => state.next_series_id = value,
                "dropped_batches" => state.dropped_batches = value,
                _ => {}
            }
        }
        Ok(state)
    }

    fn save(&self, dir: &Path) -> Result<(), SpoolError> {
        let text = format!(
            "acked {}\nnext_sequence {}\nnext_series_id {}\ndropped_batches {}\n",
            self.acked, self.next_sequence, self.next_series_id, self.dropped_batches
        );
        write_atomically(dir, STATE_FILE, text.as_bytes())
    }
}

/// Writes `name` in `dir` so that a crash leaves the old or the new content, never a mix.
pub(crate) fn write_atomically(dir: &Path, name: &str, content: &[u8]) -> Result<(), SpoolError> {
    let path = dir.join(name);
    let temporary = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&temporary).map_err(io_error(&temporary, "cannot write"))?;
    file.write_all(content)
        .and_then(|()| file.sync_data())
        .map_err(io_error(&temporary, "cannot write"))?;
    fs::rename(&temporary, &path).map_err(io_error(&path, "cannot replace"))?;
    sync_dir(dir)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir, "cannot fsync the directory"))
}

fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    use std::os::fd::AsRawFd;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error(&path, "cannot open the lock file"))?;
    // SAFETY: flock on a file descriptor we own; it is released when the file is closed.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        return Err(SpoolError::InUse(dir.to_owned()));
    }
    Ok(file)
}

fn load_or_create_instance(dir: &Path) -> Result<String, SpoolError> {
    let path = dir.join(INSTANCE_FILE);
    match fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&path, "cannot read the agent instance id")(e)),
    }
    let uuid_path = Path::new("/proc/sys/kernel/random/uuid");
    let instance = fs::read_to_string(uuid_path)
        .map_err(io_error(
            uuid_path,
            "cannot make a random agent instance id",
        ))?
        .trim()
        .to_string();
    write_atomically(dir, INSTANCE_FILE, format!("{instance}\n").as_bytes())?;
    Ok(instance)
}

/// Reads a segment's valid records, cutting off a torn or corrupt tail. Returns the segment
/// and the next series id its last record recorded.
fn recover_segment(path: &Path) -> Result<(SpoolSegment, u64), SpoolError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(io_error(path, "cannot read a segment"))?;
    let mut records = Vec::new();
    let mut offset = 0usize;
    let mut next_series_id = 0;
    let mut previous_sequence = 0;
    let valid_end = loop {
        let rest = &data[offset..];
        if rest.is_empty() {
            break offset;
        }
        let Some(header) = rest.get(..HEADER_BYTES) else {
            break offset;
        };
        let payload_len = u32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().unwrap());
        let sequence = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let Some(checked) = rest.get(8..HEADER_BYTES + payload_len) else {
            break offset;
        };
        if crc32fast::hash(checked) != crc || sequence <= previous_sequence {
            break offset;
        }
        previous_sequence = sequence;
        next_series_id = u64::from_le_bytes(header[16..24].try_into().unwrap());
        records.push(RecordIndex {
            sequence,
            offset: offset as u64,
            len: (HEADER_BYTES + payload_len) as u32,
        });
        offset += HEADER_BYTES + payload_len;
    };
    if valid_end < data.len() {
        tracing::warn!(
            segment = %path.display(),
            kept_bytes = valid_end,
            cut_bytes = data.len() - valid_end,
            "spool segment ends in a torn or corrupt record (the agent stopped mid-write): cut it off"
        );
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| {
                f.set_len(valid_end as u64)?;
                f.sync_all()
            })
            .map_err(io_error(path, "cannot cut a torn record"))?;
    }
    Ok((
        SpoolSegment {
            path: path.to_owned(),
            records,
            bytes: valid_end as u64,
        },
        next_series_id,
    ))
}

fn read_record(path: &Path, record: RecordIndex) -> Result<Batch, SpoolError> {
    let mut data = vec![0; record.len as usize];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut data, record.offset))
        .map_err(io_error(path, "cannot read a spooled batch"))?;
    let corrupt = |reason: String| SpoolError::Corrupt {
        path: path.to_owned(),
        sequence: record.sequence,
        reason,
    };
    let crc = u32::from_le_bytes(data[4..8].try_into().unwrap());
    if crc32fast::hash(&data[8..]) != crc {
        return Err(corrupt("CRC mismatch".into()));
    }
    Batch::decode(&data[HEADER_BYTES..]).map_err(|e| corrupt(e.to_string()))
}
