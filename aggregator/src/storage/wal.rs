//! The write-ahead log: every accepted batch is appended here and fsynced before it is acked.
//!
//! Layout: `<data_dir>/wal/<20-digit segment number>.wal`. A segment starts with the 8-byte
//! magic `VIGILWAL` and a little-endian u32 format version (1); then records, each a
//! little-endian u32 payload length, a little-endian u32 CRC32 (IEEE) of the payload, and the
//! payload: a protobuf [`WalRecord`].
//!
//! Group commit: appends go into a shared buffer; one flusher thread writes whatever has
//! accumulated and calls `fdatasync` once for all of it, then publishes the highest durable
//! [`Lsn`]. While it syncs, new appends gather for the next round.
//!
//! Checkpoints ([`Wal::rotate`], then [`Wal::remove_segments_before`]): the store rotates the
//! log to a new segment while no record can be appended, saves everything the older segments
//! hold, and then deletes them. [`Wal::open_from`] replays only the segments from the first one
//! after the last checkpoint and deletes older ones left by a crash before their deletion.
//!
//! On open, every segment is replayed in order. A record that is cut short or fails its CRC in
//! the last segment is a torn write from a crash: the segment is truncated there, reported,
//! and the aggregator starts. The same in an earlier segment is real corruption and stops it.
//! Writing always continues in a new segment.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
};

use prost::Message;
use tokio::sync::watch;
use vigil_proto::v1::Batch;

const MAGIC: &[u8; 8] = b"VIGILWAL";
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: u64 = 12;
const RECORD_HEADER_LEN: usize = 8;
/// No record is larger: a length beyond it is garbage, not a record.
const MAX_RECORD_BYTES: u32 = 1 << 30;

/// One accepted batch: what was stored of it, for which node and agent instance.
#[derive(Clone, PartialEq, Message)]
pub struct WalRecord {
    /// The node the stream was authorised to write as.
    #[prost(string, tag = "1")]
    pub node: String,
    /// The agent instance (spool id) from the Hello.
    #[prost(string, tag = "2")]
    pub agent_instance: String,
    /// The batch as stored: the rejected samples and declarations are left out.
    #[prost(message, optional, tag = "3")]
    pub batch: Option<Batch>,
}

/// Log sequence number: records appended since this process opened the log, counting from 1.
/// Records replayed at open are all durable and have none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Lsn(pub u64);

/// What the flusher has made durable so far.
#[derive(Debug, Clone, PartialEq)]
enum Durability {
    Through(Lsn),
    /// A write or fsync failed: nothing from here on can be acknowledged.
    Failed(String),
}

/// Why the log cannot be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error(
        "write-ahead log {path}: {source}; check the data directory's permissions and free space"
    )]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "write-ahead log segment {path} is corrupt at byte {offset} ({what}), and it is not the last \
         segment, so this is not a torn write from a crash; move the segment away to start without it"
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    #[error(
        "write-ahead log failed ({0}): batches are no longer acknowledged; restart the aggregator \
         once the disk is healthy (agents keep and resend what was not acknowledged)"
    )]
    Failed(String),
}

/// A torn record cut from the end of the last segment during replay.
#[derive(Debug, Clone, PartialEq)]
pub struct TornTail {
    pub segment: PathBuf,
    /// Where the segment now ends.
    pub offset: u64,
    /// Bytes removed.
    pub bytes_cut: u64,
    /// What was wrong with the record there.
    pub what: String,
}

/// What replay found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayReport {
    pub segments: usize,
    pub records: u64,
    pub torn_tail: Option<TornTail>,
}

struct Pending {
    buffer: Vec<u8>,
    last_appended: Lsn,
    shutting_down: bool,
    /// A checkpoint asked for a new segment after what is buffered.
    rotate_requested: bool,
    /// The flusher's answer: the new segment's number.
    rotated: Option<Result<u64, String>>,
    /// The flusher has ended (shutdown or failure).
    flusher_stopped: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake_flusher: Condvar,
    /// Signalled when a rotation is done or the flusher stops.
    rotated: Condvar,
}

/// The open write-ahead log.
pub struct Wal {
    dir: PathBuf,
    shared: Arc<Shared>,
    durable: watch::Receiver<Durability>,
    flusher: Option<JoinHandle<()>>,
}

impl Wal {
    /// Opens the log in `dir` (created if missing), replays every record into `apply` in the
    /// order written, and starts a new segment for writing.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        apply: impl FnMut(WalRecord),
    ) -> Result<(Wal, ReplayReport), WalError> {
        Wal::open_from(dir, segment_bytes, 0, apply)
    }

    /// [`Wal::open`] after a checkpoint that holds everything before segment `first_segment`:
    /// older segments are deleted unread, the rest replayed.
    pub fn open_from(
        dir: &Path,
        segment_bytes: u64,
        first_segment: u64,
        mut apply: impl FnMut(WalRecord),
    ) -> Result<(Wal, ReplayReport), WalError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| WalError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        remove_segments(dir, first_segment)?;
        let segments = list_segments(dir)?;
        let mut report = ReplayReport {
            segments: segments.len(),
            ..ReplayReport::default()
        };
        for (position, (_, path)) in segments.iter().enumerate() {
            let is_last = position + 1 == segments.len();
            replay_segment(path, is_last, &mut report, &mut apply)?;
        }
        // Never below `first_segment`: a segment numbered lower would be deleted unread.
        let next_number = segments
            .last()
            .map_or(1, |(number, _)| number + 1)
            .max(first_segment);
        let segment = Segment::create(dir, next_number)?;

        let (durable_tx, durable) = watch::channel(Durability::Through(Lsn(0)));
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                buffer: Vec::new(),
                last_appended: Lsn(0),
                shutting_down: false,
                rotate_requested: false,
                rotated: None,
                flusher_stopped: false,
            }),
            wake_flusher: Condvar::new(),
            rotated: Condvar::new(),
        });
        let flusher = {
            let shared = shared.clone();
            let flusher_dir = dir.to_owned();
            std::thread::Builder::new()
                .name("vigil-wal-flush".into())
                .spawn(move || {
                    flush_loop(&shared, flusher_dir, segment, segment_bytes, durable_tx);
                    if let Ok(mut pending) = shared.pending.lock() {
                        pending.flusher_stopped = true;
                    }
                    shared.rotated.notify_all();
                })
                .map_err(io(dir))?
        };
        Ok((
            Wal {
                dir: dir.to_owned(),
                shared,
                durable,
                flusher: Some(flusher),
            },
            report,
        ))
    }

    /// Buffers a record for the next group commit and returns its [`Lsn`]; it is durable once
    /// [`Wal::wait_durable`] for it returns.
    pub fn append(&self, record: &WalRecord) -> Lsn {
        let payload = record.encode_to_vec();
        let mut pending = self.shared.pending.lock().expect("wal lock poisoned");
        pending
            .buffer
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        pending
            .buffer
            .extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        pending.buffer.extend_from_slice(&payload);
        pending.last_appended.0 += 1;
        let lsn = pending.last_appended;
        drop(pending);
        self.shared.wake_flusher.notify_one();
        lsn
    }

    /// Waits until the record `lsn` (and every one before it) is fsynced.
    pub async fn wait_durable(&self, lsn: Lsn) -> Result<(), WalError> {
        let mut durable = self.durable.clone();
        let state = durable
            .wait_for(|state| match state {
                Durability::Through(through) => *through >= lsn,
                Durability::Failed(_) => true,
            })
            .await
            .map_err(|_| WalError::Failed("the flusher stopped".into()))?
            .clone();
        match state {
            Durability::Through(_) => Ok(()),
            Durability::Failed(why) => Err(WalError::Failed(why)),
        }
    }

    /// Writes and syncs everything appended so far, then starts a new segment and returns its
    /// number: every record appended before the call is in an older segment, every later one
    /// in this one or a newer one. The caller keeps appends out while it runs (the store lock).
    pub fn rotate(&self) -> Result<u64, WalError> {
        self.durable_through()?;
        let mut pending = self.shared.pending.lock().expect("wal lock poisoned");
        pending.rotate_requested = true;
        pending.rotated = None;
        self.shared.wake_flusher.notify_one();
        loop {
            if let Some(result) = pending.rotated.take() {
                return result.map_err(WalError::Failed);
            }
            if pending.flusher_stopped {
                return Err(WalError::Failed("the flusher stopped".into()));
            }
            pending = self
                .shared
                .rotated
                .wait(pending)
                .expect("wal lock poisoned");
        }
    }

    /// Deletes the segments numbered below `number` (after a checkpoint saved what they hold).
    pub fn remove_segments_before(&self, number: u64) -> Result<usize, WalError> {
        remove_segments(&self.dir, number)
    }

    /// The segment files now in the log's folder.
    pub fn segment_count(&self) -> usize {
        list_segments(&self.dir).map_or(0, |segments| segments.len())
    }

    /// The highest durable record, or the failure that stopped the log.
    pub fn durable_through(&self) -> Result<Lsn, WalError> {
        match &*self.durable.borrow() {
            Durability::Through(lsn) => Ok(*lsn),
            Durability::Failed(why) => Err(WalError::Failed(why.clone())),
        }
    }
}

impl Drop for Wal {
    /// Flushes what is buffered, then stops the flusher.
    fn drop(&mut self) {
        if let Ok(mut pending) = self.shared.pending.lock() {
            pending.shutting_down = true;
        }
        self.shared.wake_flusher.notify_one();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
    }
}

struct Segment {
    file: File,
    path: PathBuf,
    len: u64,
}

impl Segment {
    fn create(dir: &Path, number: u64) -> Result<Segment, WalError> {
        let path = dir.join(format!("{number:020}.wal"));
        let io = |source| WalError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        file.write_all(&header).map_err(io)?;
        file.sync_all().map_err(io)?;
        // The new file's name must survive a crash too.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| WalError::Io {
                path: dir.to_owned(),
                source,
            })?;
        Ok(Segment {
            file,
            path,
            len: HEADER_LEN,
        })
    }
}

fn flush_loop(
    shared: &Shared,
    dir: PathBuf,
    mut segment: Segment,
    segment_bytes: u64,
    durable: watch::Sender<Durability>,
) {
    let mut spare = Vec::new();
    loop {
        let (buffer, through, rotate) = {
            let mut pending = shared.pending.lock().expect("wal lock poisoned");
            while pending.buffer.is_empty() && !pending.shutting_down && !pending.rotate_requested {
                pending = shared
                    .wake_flusher
                    .wait(pending)
                    .expect("wal lock poisoned");
            }
            if pending.buffer.is_empty() && !pending.rotate_requested {
                return;
            }
            spare.clear();
            (
                std::mem::replace(&mut pending.buffer, std::mem::take(&mut spare)),
                pending.last_appended,
                std::mem::take(&mut pending.rotate_requested),
            )
        };
        let result = (|| {
            if buffer.is_empty() {
                return Ok(());
            }
            if segment.len >= segment_bytes {
                let number = segment_number(&segment.path).unwrap_or(0) + 1;
                segment = Segment::create(&dir, number)?;
            }
            let io = |source| WalError::Io {
                path: segment.path.clone(),
                source,
            };
            segment.file.write_all(&buffer).map_err(io)?;
            segment.file.sync_data().map_err(io)?;
            segment.len += buffer.len() as u64;
            Ok::<(), WalError>(())
        })()
        .and_then(|()| {
            if rotate {
                let number = segment_number(&segment.path).unwrap_or(0) + 1;
                segment = Segment::create(&dir, number)?;
            }
            Ok(())
        });
        spare = buffer;
        let answer = |result: Result<u64, String>| {
            if rotate {
                if let Ok(mut pending) = shared.pending.lock() {
                    pending.rotated = Some(result);
                }
                shared.rotated.notify_all();
            }
        };
        match result {
            Ok(()) => {
                durable.send_replace(Durability::Through(through));
                answer(Ok(segment_number(&segment.path).unwrap_or(0)));
            }
            Err(error) => {
                // After a failed fsync the page cache cannot be trusted: stop acknowledging
                // for good rather than retry (the "fsyncgate" lesson).
                tracing::error!("{error}");
                durable.send_replace(Durability::Failed(error.to_string()));
                answer(Err(error.to_string()));
                return;
            }
        }
    }
}

fn segment_number(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_suffix(".wal")?
        .parse()
        .ok()
}

/// Deletes the segments numbered below `number`, then syncs the folder.
fn remove_segments(dir: &Path, number: u64) -> Result<usize, WalError> {
    let mut removed = 0;
    for (n, path) in list_segments(dir)? {
        if n < number {
            std::fs::remove_file(&path).map_err(|source| WalError::Io {
                path: path.clone(),
                source,
            })?;
            removed += 1;
        }
    }
    if removed > 0 {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| WalError::Io {
                path: dir.to_owned(),
                source,
            })?;
    }
    Ok(removed)
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let io = |source| WalError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if let Some(number) = segment_number(&path) {
            segments.push((number, path));
        }
    }
    segments.sort();
    Ok(segments)
}

fn replay_segment(
    path: &Path,
    is_last: bool,
    report: &mut ReplayReport,
    apply: &mut impl FnMut(WalRecord),
) -> Result<(), WalError> {
    let io = |source| WalError::Io {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .map_err(io)?;
    let mut offset = 0usize;
    let problem = if bytes.len() < HEADER_LEN as usize {
        Some("segment header cut short".to_string())
    } else if &bytes[..8] != MAGIC {
        return Err(WalError::Corrupt {
            path: path.to_owned(),
            offset: 0,
            what: "not a Vigil write-ahead log segment (bad magic)".into(),
        });
    } else if u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) != FORMAT_VERSION {
        return Err(WalError::Corrupt {
            path: path.to_owned(),
            offset: 8,
            what: "written by a newer aggregator (unknown format version)".into(),
        });
    } else {
        offset = HEADER_LEN as usize;
        loop {
            match next_record(&bytes[offset..]) {
                RecordRead::End => break None,
                RecordRead::Bad(what) => break Some(what),
                RecordRead::Record(record, len) => {
                    apply(record);
                    report.records += 1;
                    offset += len;
                }
            }
        }
    };
    let Some(what) = problem else {
        return Ok(());
    };
    if !is_last {
        return Err(WalError::Corrupt {
            path: path.to_owned(),
            offset: offset as u64,
            what,
        });
    }
    // A torn write from a crash: keep what is whole, cut the rest. A segment whose header
    // never made it to disk holds nothing and goes entirely.
    let keep = offset as u64;
    if keep == 0 {
        std::fs::remove_file(path).map_err(io)?;
    } else {
        let file = OpenOptions::new().write(true).open(path).map_err(io)?;
        file.set_len(keep).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    let torn = TornTail {
        segment: path.to_owned(),
        offset: keep,
        bytes_cut: bytes.len() as u64 - keep,
        what,
    };
    tracing::warn!(
        "write-ahead log: cut a torn record from {} at byte {} ({} bytes, {}); it was never \
         acknowledged, so its agent still has it and will resend it",
        torn.segment.display(),
        torn.offset,
        torn.bytes_cut,
        torn.what
    );
    report.torn_tail = Some(torn);
    Ok(())
}

enum RecordRead {
    End,
    Record(WalRecord, usize),
    Bad(String),
}

fn next_record(bytes: &[u8]) -> RecordRead {
    if bytes.is_empty() {
        return RecordRead::End;
    }
    if bytes.len() < RECORD_HEADER_LEN {
        return RecordRead::Bad(format!("record header cut short ({} bytes)", bytes.len()));
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if len > MAX_RECORD_BYTES {
        return RecordRead::Bad(format!("implausible record length {len}"));
    }
    let end = RECORD_HEADER_LEN + len as usize;
    if bytes.len() < end {
        return RecordRead::Bad(format!(
            "record of {len} bytes cut short at {} bytes",
            bytes.len() - RECORD_HEADER_LEN
        ));
    }
    let payload = &bytes[RECORD_HEADER_LEN..end];
    if crc32fast::hash(payload) != crc {
        return RecordRead::Bad("CRC mismatch".into());
    }
    match WalRecord::decode(payload) {
        Ok(record) => RecordRead::Record(record, end),
        Err(error) => RecordRead::Bad(format!("undecodable record with a good CRC: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sequence: u64) -> WalRecord {
        WalRecord {
            node: "node-a".into(),
            agent_instance: "spool-1".into(),
            batch: Some(Batch {
                sequence,
                ..Batch::default()
            }),
        }
    }

    fn sequences(dir: &Path) -> (Vec<u64>, ReplayReport) {
        let mut seen = Vec::new();
        let (_wal, report) =
            Wal::open(dir, 1 << 20, |r| seen.push(r.batch.unwrap().sequence)).unwrap();
        (seen, report)
    }

    #[tokio::test]
    async fn records_survive_a_reopen_in_order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Tiny segments: every flush after the first starts a new one.
            let (wal, _) = Wal::open(dir.path(), 1, |_| {}).unwrap();
            for sequence in 1..=5 {
                let lsn = wal.append(&record(sequence));
                wal.wait_durable(lsn).await.unwrap();
            }
        }
        let (seen, report) = sequences(dir.path());
        assert_eq!(seen, vec![1, 2, 3, 4, 5]);
        assert!(report.segments >= 5, "{report:?}");
        assert_eq!(report.torn_tail, None);
    }

    #[tokio::test]
    async fn a_torn_last_record_is_cut_and_later_writes_replay() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, _) = Wal::open(dir.path(), 1 << 20, |_| {}).unwrap();
            let lsn = wal.append(&record(1));
            wal.wait_durable(lsn).await.unwrap();
        }
        let (_, path) = list_segments(dir.path()).unwrap().pop().unwrap();
        let whole = std::fs::metadata(&path).unwrap().len();
        // Half a record: a length that promises more than follows.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&100u32.to_le_bytes()).unwrap();
        file.write_all(&[1, 2, 3, 4, 5, 6]).unwrap();
        drop(file);

        let (seen, report) = sequences(dir.path());
        assert_eq!(seen, vec![1]);
        let torn = report.torn_tail.expect("the torn record is reported");
        assert_eq!((torn.offset, torn.bytes_cut), (whole, 10));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
    }

    #[tokio::test]
    async fn rotation_splits_the_log_and_open_from_skips_and_deletes_older_segments() {
        let dir = tempfile::tempdir().unwrap();
        let start = {
            let (wal, _) = Wal::open(dir.path(), 1 << 20, |_| {}).unwrap();
            for sequence in 1..=3 {
                wal.append(&record(sequence));
            }
            // Buffered records go to the old segment before the new one starts.
            let start = wal.rotate().unwrap();
            wal.wait_durable(Lsn(3)).await.unwrap();
            let lsn = wal.append(&record(4));
            wal.wait_durable(lsn).await.unwrap();
            assert_eq!(wal.segment_count(), 2);
            start
        };
        let mut seen = Vec::new();
        let (wal, report) = Wal::open_from(dir.path(), 1 << 20, start, |r| {
            seen.push(r.batch.unwrap().sequence)
        })
        .unwrap();
        assert_eq!(seen, vec![4]);
        assert_eq!(report.records, 1);
        // The older segment is gone; the log goes on in a new one after `start`.
        let numbers: Vec<u64> = list_segments(dir.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(numbers, vec![start, start + 1]);
        assert_eq!(wal.remove_segments_before(start + 1).unwrap(), 1);
        // Opening from a segment past all of them keeps numbering at or above it.
        drop(wal);
        let (_wal, report) = Wal::open_from(dir.path(), 1 << 20, start + 10, |_| {}).unwrap();
        assert_eq!(report.records, 0);
        let numbers: Vec<u64> = list_segments(dir.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(numbers, vec![start + 10]);
    }

    #[tokio::test]
    async fn a_bad_crc_in_an_earlier_segment_stops_the_open() {
        let dir = tempfile::tempdir().unwrap();
        for sequence in 1..=2 {
            let (wal, _) = Wal::open(dir.path(), 1 << 20, |_| {}).unwrap();
            let lsn = wal.append(&record(sequence));
            wal.wait_durable(lsn).await.unwrap();
        }
        let (_, first) = list_segments(dir.path()).unwrap().remove(0);
        let mut bytes = std::fs::read(&first).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&first, bytes).unwrap();
        let error = Wal::open(dir.path(), 1 << 20, |_| {})
            .err()
            .expect("corruption is fatal");
        assert!(error.to_string().contains("CRC mismatch"), "{error}");
    }
}
