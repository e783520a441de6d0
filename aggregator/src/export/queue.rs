//! A remote-write target's durable queue: what was stored and not yet accepted by the target,
//! oldest first, in append-only segment files under `<data_dir>/export/<target>/`.
//!
//! Each record is `[payload length: u32 LE][CRC32 of the rest: u32 LE][samples: u32 LE]
//! [payload]`, the payload being an encoded (uncompressed) `WriteRequest`. Encoded
//! `WriteRequest`s concatenate into one valid `WriteRequest` (its only field is repeated), so
//! the sender joins records without decoding them.
//!
//! The read position (segment, offset) lives in the `position` file, replaced atomically after
//! each accepted send. Segments wholly behind it are deleted. A crash can lose the latest
//! position update; the records after the persisted position are then sent again, which
//! Prometheus-compatible receivers accept as duplicates of identical samples.
//!
//! At open, every segment is checked record by record and cut at the first record that is
//! incomplete or fails its CRC (a write torn by a crash), so appends continue after the last
//! good record. When the queue would grow past its bound, whole segments are dropped oldest
//! first and their unsent samples counted.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

const HEADER_BYTES: u64 = 12;
/// No single record may be larger than this (a corrupt length is not an allocation size).
const MAX_RECORD_BYTES: u64 = 256 * 1024 * 1024;
const POSITION_FILE: &str = "position";

/// Where the reader is: a segment id and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

#[derive(Debug)]
struct Segment {
    id: u64,
    bytes: u64,
    samples: u64,
}

/// Records read from the queue and not yet committed.
#[derive(Debug, Default)]
pub struct Peeked {
    /// The concatenated payloads: one encoded `WriteRequest`.
    pub payload: Vec<u8>,
    pub samples: u64,
    pub records: usize,
    /// Where the reader is after these records.
    pub end: Position,
}

/// What opening found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct OpenReport {
    pub segments: usize,
    pub pending_samples: u64,
    /// Bytes cut from segment ends (torn or corrupt records).
    pub cut_bytes: u64,
}

#[derive(Debug)]
pub struct Queue {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    /// Oldest first; never empty after open (the last is the one appended to).
    segments: Vec<Segment>,
    writer: File,
    /// Committed read position.
    position: Position,
    /// Samples in the reader's segment before `position.offset`.
    samples_read_in_segment: u64,
    pending_samples: u64,
    dirty: bool,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

fn io_context(path: &Path, what: &str, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{what} {}: {error}", path.display()))
}

/// Reads one record at the file's current offset: `Ok(None)` at a clean end, `Err` for an
/// incomplete or corrupt record (the caller cuts there).
fn read_record(file: &mut impl Read) -> Result<Option<(u32, Vec<u8>)>, String> {
    let mut header = [0u8; HEADER_BYTES as usize];
    let mut filled = 0;
    while filled < header.len() {
        match file.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err("incomplete record header".into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as u64;
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    let samples = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if len > MAX_RECORD_BYTES {
        return Err(format!("record length {len} is implausible"));
    }
    let mut payload = vec![0u8; len as usize];
    file.read_exact(&mut payload)
        .map_err(|_| "incomplete record payload".to_string())?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[8..12]);
    hasher.update(&payload);
    if hasher.finalize() != crc {
        return Err("record CRC mismatch".into());
    }
    Ok(Some((samples, payload)))
}

impl Queue {
    /// Opens (or creates) the queue in `dir`, holding at most about `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<(Queue, OpenReport)> {
        fs::create_dir_all(dir).map_err(|e| io_context(dir, "cannot create", e))?;
        let mut ids = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| io_context(dir, "cannot list", e))? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name
                .strip_suffix(".seg")
                .and_then(|s| s.parse::<u64>().ok())
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut report = OpenReport::default();
        let position = read_position(dir);
        let mut segments = Vec::new();
        let mut samples_read_in_segment = 0;
        for id in ids {
            let path = segment_path(dir, id);
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_context(&path, "cannot open", e))?;
            let file_len = file.metadata()?.len();
            let mut reader = io::BufReader::new(&mut file);
            let (mut good, mut samples) = (0u64, 0u64);
            loop {
                if id == position.segment && good == position.offset {
                    samples_read_in_segment = samples;
                }
                match read_record(&mut reader) {
                    Ok(Some((n, payload))) => {
                        good += HEADER_BYTES + payload.len() as u64;
                        samples += n as u64;
                    }
                    Ok(None) => break,
                    Err(why) => {
                        tracing::warn!(
                            "export queue {}: {why} at byte {good}; cutting {} bytes",
                            path.display(),
                            file_len - good
                        );
                        break;
                    }
                }
            }
            drop(reader);
            if good < file_len {
                report.cut_bytes += file_len - good;
                file.set_len(good)
                    .map_err(|e| io_context(&path, "cannot cut", e))?;
                file.sync_all()?;
            }
            segments.push(Segment {
                id,
                bytes: good,
                samples,
            });
        }
        if segments.is_empty() {
            segments.push(Segment {
                id: position.segment.max(1),
                bytes: 0,
                samples: 0,
            });
        }
        let last = segments.last().expect("one segment");
        let writer_path = segment_path(dir, last.id);
        let writer = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&writer_path)
            .map_err(|e| io_context(&writer_path, "cannot open", e))?;
        // A position in a deleted (fully sent or dropped) segment, or past a cut: clamp it.
        let first = segments.first().expect("one segment");
        let mut position = position;
        if position.segment < first.id {
            position = Position {
                segment: first.id,
                offset: 0,
            };
            samples_read_in_segment = 0;
        }
        match segments.iter().find(|s| s.id == position.segment) {
            Some(segment) if position.offset > segment.bytes => {
                position.offset = segment.bytes;
                samples_read_in_segment = segment.samples;
            }
            Some(_) => {}
            None => {
                // Past every segment (they were all sent): start at the newest.
                position = Position {
                    segment: last.id,
                    offset: last.bytes,
                };
                samples_read_in_segment = last.samples;
            }
        }
        let pending_samples = segments
            .iter()
            .filter(|s| s.id >= position.segment)
            .map(|s| s.samples)
            .sum::<u64>()
            - samples_read_in_segment;
        report.segments = segments.len();
        report.pending_samples = pending_samples;
        let queue = Queue {
            dir: dir.to_owned(),
            max_bytes,
            // Small enough that dropping one segment frees a modest share of the bound.
            segment_bytes: (max_bytes / 8).clamp(64 * 1024, 64 * 1024 * 1024),
            segments,
            writer,
            position,
            samples_read_in_segment,
            pending_samples,
            dirty: false,
        };
        Ok((queue, report))
    }

    /// Bytes on disk in the queue's segments.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Samples appended and not yet committed as sent.
    pub fn pending_samples(&self) -> u64 {
        self.pending_samples
    }

    pub fn position(&self) -> Position {
        self.position
    }

    /// Appends one record (not yet fsynced: see [`Queue::sync`]). Returns the samples of
    /// unsent records dropped to stay within the bound.
    pub fn append(&mut self, payload: &[u8], samples: u32) -> io::Result<u64> {
        let record_bytes = HEADER_BYTES + payload.len() as u64;
        if record_bytes > MAX_RECORD_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a {record_bytes}-byte export record is too large"),
            ));
        }
        let mut dropped = 0;
        if self.segments.last().expect("one segment").bytes + record_bytes > self.segment_bytes
            && self.segments.last().expect("one segment").bytes > 0
        {
            self.roll()?;
        }
        while self.bytes() + record_bytes > self.max_bytes && self.segments.len() > 1 {
            dropped += self.drop_oldest()?;
        }
        let mut record = Vec::with_capacity(record_bytes as usize);
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&samples.to_le_bytes());
        hasher.update(payload);
        record.extend_from_slice(&hasher.finalize().to_le_bytes());
        record.extend_from_slice(&samples.to_le_bytes());
        record.extend_from_slice(payload);
        let last = self.segments.last_mut().expect("one segment");
        if let Err(error) = self.writer.write_all(&record) {
            // Cut whatever part was written, so the next append starts on a record boundary.
            let _ = self.writer.set_len(last.bytes);
            return Err(io_context(
                &segment_path(&self.dir, last.id),
                "cannot append to",
                error,
            ));
        }
        last.bytes += record_bytes;
        last.samples += samples as u64;
        self.pending_samples += samples as u64;
        self.dirty = true;
        Ok(dropped)
    }

    fn roll(&mut self) -> io::Result<()> {
        self.sync()?;
        let id = self.segments.last().expect("one segment").id + 1;
        let path = segment_path(&self.dir, id);
        self.writer = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_context(&path, "cannot create", e))?;
        self.segments.push(Segment {
            id,
            bytes: 0,
            samples: 0,
        });
        sync_dir(&self.dir);
        Ok(())
    }

    /// Deletes the oldest segment (never the one appended to); returns its unsent samples.
    fn drop_oldest(&mut self) -> io::Result<u64> {
        let oldest = self.segments.remove(0);
        let unsent = if oldest.id < self.position.segment {
            0
        } else if oldest.id == self.position.segment {
            oldest.samples - self.samples_read_in_segment
        } else {
            oldest.samples
        };
        self.pending_samples -= unsent;
        let next = &self.segments[0];
        if self.position.segment <= oldest.id {
            self.position = Position {
                segment: next.id,
                offset: 0,
            };
            self.samples_read_in_segment = 0;
            self.write_position()?;
        }
        let path = segment_path(&self.dir, oldest.id);
        fs::remove_file(&path).map_err(|e| io_context(&path, "cannot delete", e))?;
        Ok(unsent)
    }

    /// fsyncs the segment appended to, if anything was appended since the last sync.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.dirty {
            self.writer.sync_data()?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Reads records from the committed position on, up to `max_samples` samples (always at
    /// least one record when any is pending), without moving the position.
    pub fn peek(&self, max_samples: u64) -> io::Result<Peeked> {
        let mut peeked = Peeked {
            end: self.position,
            ..Peeked::default()
        };
        let start = self
            .segments
            .iter()
            .position(|s| s.id == self.position.segment)
            .unwrap_or(0);
        for segment in &self.segments[start..] {
            let offset = if segment.id == peeked.end.segment {
                peeked.end.offset
            } else {
                0
            };
            if offset >= segment.bytes {
                continue;
            }
            let path = segment_path(&self.dir, segment.id);
            let mut file = File::open(&path).map_err(|e| io_context(&path, "cannot open", e))?;
            file.seek(SeekFrom::Start(offset))?;
            // Only the bytes known to hold whole records (a concurrent append is not possible
            // under the queue's lock, but the segment's size is the authority).
            let mut reader = io::BufReader::new(file.take(segment.bytes - offset));
            let mut at = offset;
            while at < segment.bytes {
                let (samples, payload) = match read_record(&mut reader) {
                    Ok(Some(record)) => record,
                    Ok(None) => break,
                    Err(why) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("{}: {why} at byte {at}", path.display()),
                        ));
                    }
                };
                if peeked.records > 0 && peeked.samples + samples as u64 > max_samples {
                    return Ok(peeked);
                }
                at += HEADER_BYTES + payload.len() as u64;
                peeked.payload.extend_from_slice(&payload);
                peeked.samples += samples as u64;
                peeked.records += 1;
                peeked.end = Position {
                    segment: segment.id,
                    offset: at,
                };
            }
        }
        Ok(peeked)
    }

    /// Moves the read position past what was peeked (sent or given up on), deletes the
    /// segments wholly behind it, and persists it.
    pub fn commit(&mut self, peeked: &Peeked) -> io::Result<()> {
        if peeked.end <= self.position {
            // Nothing, or records already dropped for the bound while they were in flight.
            return Ok(());
        }
        let mut remaining = peeked.samples;
        if peeked.end.segment != self.position.segment {
            // The reader crossed segments: what it read of earlier ones is their remainder.
            for segment in &self.segments {
                if segment.id >= self.position.segment && segment.id < peeked.end.segment {
                    let unread = if segment.id == self.position.segment {
                        segment.samples - self.samples_read_in_segment
                    } else {
                        segment.samples
                    };
                    remaining = remaining.saturating_sub(unread);
                }
            }
            self.samples_read_in_segment = 0;
        }
        self.samples_read_in_segment += remaining;
        self.pending_samples = self.pending_samples.saturating_sub(peeked.samples);
        self.position = peeked.end;
        let last_id = self.segments.last().expect("one segment").id;
        while self.segments.len() > 1
            && self.segments[0].id < self.position.segment
            && self.segments[0].id < last_id
        {
            let gone = self.segments.remove(0);
            let path = segment_path(&self.dir, gone.id);
            fs::remove_file(&path).map_err(|e| io_context(&path, "cannot delete", e))?;
        }
        self.write_position()
    }

    /// Gives up on the rest of the reader's segment (a record in it cannot be read back:
    /// the disk changed under the queue) and moves on to the next one. Returns the samples
    /// given up, counted as dropped by the caller.
    pub fn skip_segment(&mut self) -> io::Result<u64> {
        if self.segments.last().expect("one segment").id <= self.position.segment {
            // Appends continue in a fresh segment, so the damaged one can go.
            self.roll()?;
        }
        let index = self
            .segments
            .iter()
            .position(|s| s.id >= self.position.segment)
            .expect("the reader's segment or a later one");
        let segment = &self.segments[index];
        let unread = if segment.id == self.position.segment {
            segment.samples - self.samples_read_in_segment
        } else {
            segment.samples
        };
        let next = self.segments[index + 1].id;
        self.pending_samples = self.pending_samples.saturating_sub(unread);
        self.position = Position {
            segment: next,
            offset: 0,
        };
        self.samples_read_in_segment = 0;
        for gone in self.segments.drain(..=index) {
            let path = segment_path(&self.dir, gone.id);
            fs::remove_file(&path).map_err(|e| io_context(&path, "cannot delete", e))?;
        }
        self.write_position()?;
        Ok(unread)
    }

    fn write_position(&self) -> io::Result<()> {
        let path = self.dir.join(POSITION_FILE);
        let tmp = self.dir.join("position.tmp");
        let text = format!("{} {}\n", self.position.segment, self.position.offset);
        fs::write(&tmp, text).map_err(|e| io_context(&tmp, "cannot write", e))?;
        fs::rename(&tmp, &path).map_err(|e| io_context(&path, "cannot replace", e))
    }
}

/// The persisted read position; the start when missing or unreadable.
fn read_position(dir: &Path) -> Position {
    let text = fs::read_to_string(dir.join(POSITION_FILE)).unwrap_or_default();
    let mut parts = text.split_whitespace().map(str::parse::<u64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(segment)), Some(Ok(offset))) => Position { segment, offset },
        _ => Position::default(),
    }
}

/// Makes a new or deleted file name durable (best effort: some filesystems refuse it).
fn sync_dir(dir: &Path) {
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(i: u32) -> Vec<u8> {
        format!("record-{i:04}").into_bytes()
    }

    fn drain(queue: &mut Queue, max_samples: u64) -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let peeked = queue.peek(max_samples).unwrap();
            if peeked.records == 0 {
                return all;
            }
            all.extend_from_slice(&peeked.payload);
            queue.commit(&peeked).unwrap();
        }
    }

    #[test]
    fn records_survive_a_reopen_and_are_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut queue, report) = Queue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(report.pending_samples, 0);
        for i in 0..10 {
            queue.append(&payload(i), 3).unwrap();
        }
        queue.sync().unwrap();
        // Read four records (12 samples) and commit them.
        let peeked = queue.peek(12).unwrap();
        assert_eq!((peeked.records, peeked.samples), (4, 12));
        queue.commit(&peeked).unwrap();
        assert_eq!(queue.pending_samples(), 18);
        drop(queue);

        let (mut queue, report) = Queue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(report.pending_samples, 18);
        let expected: Vec<u8> = (4..10).flat_map(payload).collect();
        assert_eq!(drain(&mut queue, 7), expected);
        assert_eq!(queue.pending_samples(), 0);
        // One record larger than the limit still goes out alone.
        queue.append(&payload(99), 50).unwrap();
        let peeked = queue.peek(7).unwrap();
        assert_eq!((peeked.records, peeked.samples), (1, 50));
    }

    #[test]
    fn a_torn_tail_is_cut_at_open_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let (mut queue, _) = Queue::open(dir.path(), 1 << 20).unwrap();
        for i in 0..3 {
            queue.append(&payload(i), 1).unwrap();
        }
        queue.sync().unwrap();
        let bytes = queue.bytes();
        drop(queue);
        let segment = segment_path(dir.path(), 1);
        // Half a record more, as a crash mid-write leaves it.
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(&[20, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(file);

        let (mut queue, report) = Queue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(report.cut_bytes, 7);
        assert_eq!(fs::metadata(&segment).unwrap().len(), bytes);
        queue.append(&payload(3), 1).unwrap();
        let expected: Vec<u8> = (0..4).flat_map(payload).collect();
        assert_eq!(drain(&mut queue, 100), expected);

        // A flipped byte inside the last record: cut from there.
        drop(queue);
        let (mut queue, _) = Queue::open(dir.path(), 1 << 20).unwrap();
        queue.append(&payload(4), 1).unwrap();
        queue.append(&payload(5), 1).unwrap();
        drop(queue);
        let mut data = fs::read(&segment).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0xff;
        fs::write(&segment, &data).unwrap();
        let (mut queue, report) = Queue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(report.cut_bytes, HEADER_BYTES + payload(5).len() as u64);
        assert_eq!(drain(&mut queue, 100), payload(4));
    }

    #[test]
    fn a_record_damaged_after_open_is_skipped_with_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (mut queue, _) = Queue::open(dir.path(), 1 << 20).unwrap();
        for i in 0..3 {
            queue.append(&payload(i), 2).unwrap();
        }
        // Flip a payload byte of the second record behind the queue's back.
        let segment = segment_path(dir.path(), 1);
        let mut data = fs::read(&segment).unwrap();
        let second = (HEADER_BYTES as usize + payload(0).len()) + HEADER_BYTES as usize;
        data[second] ^= 0xff;
        fs::write(&segment, &data).unwrap();
        let error = queue.peek(1).map(|_| ()).unwrap_err();
        assert!(error.to_string().contains("CRC"), "{error}");
        assert_eq!(queue.skip_segment().unwrap(), 6);
        assert_eq!(queue.pending_samples(), 0);
        assert!(!segment.exists());
        queue.append(&payload(3), 1).unwrap();
        assert_eq!(drain(&mut queue, 10), payload(3));
    }

    #[test]
    fn a_full_queue_drops_the_oldest_segments_and_counts_their_samples() {
        let dir = tempfile::tempdir().unwrap();
        // 256 KiB bound: 64 KiB segments.
        let max = 256 * 1024;
        let (mut queue, _) = Queue::open(dir.path(), max).unwrap();
        let record = vec![7u8; 1000];
        let mut dropped = 0;
        let appended = 1000u64;
        for _ in 0..appended {
            dropped += queue.append(&record, 2).unwrap();
        }
        assert!(queue.bytes() <= max, "{} bytes", queue.bytes());
        assert!(dropped > 0);
        assert_eq!(queue.pending_samples() + dropped, appended * 2);
        let mut read = 0;
        loop {
            let peeked = queue.peek(500).unwrap();
            if peeked.records == 0 {
                break;
            }
            read += peeked.samples;
            queue.commit(&peeked).unwrap();
        }
        assert_eq!(read + dropped, appended * 2);
        assert_eq!(queue.pending_samples(), 0);
        // Fully read segments are gone but the one appended to.
        let segments = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".seg")
            })
            .count();
        assert_eq!(segments, 1);
        // And the position survives a reopen: nothing is pending.
        drop(queue);
        let (queue, report) = Queue::open(dir.path(), max).unwrap();
        assert_eq!(report.pending_samples, 0);
        assert_eq!(queue.peek(10).unwrap().records, 0);
    }
}
