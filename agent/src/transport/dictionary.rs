//! The agent's series dictionary (id -> name, labels, type), kept in the spool directory so that
//! every stream can declare the series its batches use, whichever aggregator it reaches and
//! whenever the batch that first declared a series was acked and trimmed (or dropped for space).
//!
//! File `series`: append-only records `[payload length u32][crc32 u32][payload]` (little
//! endian; the CRC covers the payload), the payload being an encoded `Series`. A later record for
//! an id replaces an earlier one (the agent never changes a declaration: ids are not reused). A
//! record cut short or with a bad CRC at the end (a crash mid-write) is cut off at the next
//! start. When the file grows past twice its size after the last compaction (and at least
//! `COMPACT_MIN_BYTES`), it is rewritten (atomically) with only the entries the spool keeps; see
//! `Spool` for which.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{Read, Write},
    path::{Path, PathBuf},
};

use prost::Message;
use vigil_proto::v1::Series;

use super::spool::{SpoolError, io_error, sync_dir, write_atomically};

pub(crate) const DICTIONARY_FILE: &str = "series";
const HEADER_BYTES: usize = 8;
/// Below this size the file is never compacted.
const COMPACT_MIN_BYTES: u64 = 1 << 20;

struct Entry {
    series: Series,
    /// The sequence of the latest batch known to use the series.
    last_used: u64,
}

/// The series dictionary of one spool.
pub struct SeriesDictionary {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    entries: HashMap<u64, Entry>,
    bytes: u64,
    /// Size of the file after the last compaction (or at open).
    compacted_bytes: u64,
    unsynced: bool,
}

impl SeriesDictionary {
    /// Opens (or creates) the dictionary in `dir`, cutting off a torn tail. Entries read count as
    /// used by no batch until `touch`ed.
    pub fn open(dir: &Path) -> Result<Self, SpoolError> {
        let path = dir.join(DICTIONARY_FILE);
        let mut data = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut data)
                    .map_err(io_error(&path, "cannot read the series dictionary"))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&path, "cannot read the series dictionary")(e)),
        }
        let mut entries = HashMap::new();
        let mut offset = 0usize;
        let valid_end = loop {
            let rest = &data[offset..];
            let Some(header) = rest.get(..HEADER_BYTES) else {
                break offset;
            };
            let len = u32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(header[4..8].try_into().unwrap());
            let Some(payload) = rest.get(HEADER_BYTES..HEADER_BYTES + len) else {
                break offset;
            };
            if crc32fast::hash(payload) != crc {
                break offset;
            }
            let Ok(series) = Series::decode(payload) else {
                break offset;
            };
            entries.insert(
                series.id,
                Entry {
                    series,
                    last_used: 0,
                },
            );
            offset += HEADER_BYTES + len;
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_error(&path, "cannot open the series dictionary"))?;
        if valid_end < data.len() {
            tracing::warn!(
                dictionary = %path.display(),
                kept_bytes = valid_end,
                cut_bytes = data.len() - valid_end,
                "series dictionary ends in a torn or corrupt record (the agent stopped mid-write): cut it off"
            );
            file.set_len(valid_end as u64)
                .and_then(|()| file.sync_all())
                .map_err(io_error(&path, "cannot cut a torn record"))?;
        }
        if data.is_empty() {
            sync_dir(dir)?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            path,
            file,
            entries,
            bytes: valid_end as u64,
            compacted_bytes: valid_end as u64,
            unsynced: false,
        })
    }

    /// The declaration of series `id`, if known.
    pub fn get(&self, id: u64) -> Option<&Series> {
        self.entries.get(&id).map(|e| &e.series)
    }

    /// Series known.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The highest id known.
    pub fn max_id(&self) -> Option<u64> {
        self.entries.keys().copied().max()
    }

    /// Bytes of the file.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Adds (or updates) declarations, used by batch `sequence`; writes the new ones to the
    /// file (on disk at the next `sync`).
    pub fn insert<'a>(
        &mut self,
        declarations: impl IntoIterator<Item = &'a Series>,
        sequence: u64,
    ) -> Result<(), SpoolError> {
        let mut records = Vec::new();
        for series in declarations {
            match self.entries.get_mut(&series.id) {
                Some(entry) if entry.series == *series => {
                    entry.last_used = entry.last_used.max(sequence);
                    continue;
                }
                Some(entry) => {
                    tracing::warn!(
                        series_id = series.id,
                        old = %entry.series.name,
                        new = %series.name,
                        "series id declared again with other content (ids are never reused): the newest wins"
                    );
                }
                None => {}
            }
            frame(series, &mut records);
            self.entries.insert(
                series.id,
                Entry {
                    series: series.clone(),
                    last_used: sequence,
                },
            );
        }
        if !records.is_empty() {
            self.file.write_all(&records).map_err(io_error(
                &self.path,
                "cannot append to the series dictionary",
            ))?;
            self.bytes += records.len() as u64;
            self.unsynced = true;
        }
        Ok(())
    }

    /// Records that batch `sequence` uses series `id`.
    pub fn touch(&mut self, id: u64, sequence: u64) {
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.last_used = entry.last_used.max(sequence);
        }
    }

    /// Records that batch `sequence` uses every known series.
    pub fn touch_all(&mut self, sequence: u64) {
        for entry in self.entries.values_mut() {
            entry.last_used = entry.last_used.max(sequence);
        }
    }

    /// Whether the file grew enough since the last compaction to compact it.
    pub fn wants_compaction(&self) -> bool {
        self.bytes > COMPACT_MIN_BYTES.max(2 * self.compacted_bytes)
    }

    /// Rewrites the file with the entries for which `keep(id, last_used)` holds (atomically:
    /// a crash leaves the old or the new file).
    pub fn compact(&mut self, keep: impl Fn(u64, u64) -> bool) -> Result<(), SpoolError> {
        let before = self.entries.len();
        self.entries.retain(|&id, e| keep(id, e.last_used));
        let mut ids: Vec<u64> = self.entries.keys().copied().collect();
        ids.sort_unstable();
        let mut content = Vec::new();
        for id in ids {
            frame(&self.entries[&id].series, &mut content);
        }
        write_atomically(&self.dir, DICTIONARY_FILE, &content)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io_error(&self.path, "cannot open the series dictionary"))?;
        tracing::debug!(
            kept = self.entries.len(),
            dropped = before - self.entries.len(),
            bytes = content.len(),
            "series dictionary compacted"
        );
        self.bytes = content.len() as u64;
        self.compacted_bytes = self.bytes;
        self.unsynced = false;
        Ok(())
    }

    /// Flushes appended declarations to disk (fsync).
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if self.unsynced {
            self.file
                .sync_data()
                .map_err(io_error(&self.path, "cannot fsync"))?;
            self.unsynced = false;
        }
        Ok(())
    }
}

fn frame(series: &Series, out: &mut Vec<u8>) {
    let payload = series.encode_to_vec();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

#[cfg(test)]
mod tests {
    use vigil_proto::v1::Label;

    use super::*;

    fn series(id: u64) -> Series {
        Series {
            id,
            name: format!("vigil_test_{id}"),
            labels: vec![Label {
                name: "gpu".into(),
                value: id.to_string(),
            }],
            r#type: 1,
        }
    }

    #[test]
    fn declarations_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut dictionary = SeriesDictionary::open(dir.path()).unwrap();
            dictionary.insert(&[series(1), series(2)], 1).unwrap();
            dictionary.insert(&[series(3)], 2).unwrap();
            // Identical again: nothing written.
            let bytes = dictionary.bytes();
            dictionary.insert(&[series(1)], 3).unwrap();
            assert_eq!(dictionary.bytes(), bytes);
            dictionary.sync().unwrap();
        }
        let dictionary = SeriesDictionary::open(dir.path()).unwrap();
        assert_eq!(dictionary.len(), 3);
        for id in 1..=3 {
            assert_eq!(dictionary.get(id), Some(&series(id)));
        }
        assert_eq!(dictionary.max_id(), Some(3));
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DICTIONARY_FILE);
        {
            let mut dictionary = SeriesDictionary::open(dir.path()).unwrap();
            dictionary.insert(&[series(1), series(2)], 1).unwrap();
            dictionary.sync().unwrap();
        }
        let whole = std::fs::metadata(&path).unwrap().len();
        // A third record cut short by a crash.
        let mut torn = Vec::new();
        frame(&series(3), &mut torn);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&torn[..torn.len() - 3]).unwrap();
        drop(file);
        {
            let mut dictionary = SeriesDictionary::open(dir.path()).unwrap();
            assert_eq!(dictionary.len(), 2);
            assert!(dictionary.get(3).is_none());
            assert_eq!(std::fs::metadata(&path).unwrap().len(), whole, "cut off");
            dictionary.insert(&[series(4)], 2).unwrap();
            dictionary.sync().unwrap();
        }
        let dictionary = SeriesDictionary::open(dir.path()).unwrap();
        let mut ids: Vec<u64> = dictionary.entries.keys().copied().collect();
        ids.sort_unstable();
        assert_eq!(ids, [1, 2, 4]);
    }

    #[test]
    fn a_corrupt_tail_record_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DICTIONARY_FILE);
        {
            let mut dictionary = SeriesDictionary::open(dir.path()).unwrap();
            dictionary.insert(&[series(1), series(2)], 1).unwrap();
            dictionary.sync().unwrap();
        }
        let mut data = std::fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0xff;
        std::fs::write(&path, &data).unwrap();
        let dictionary = SeriesDictionary::open(dir.path()).unwrap();
        assert_eq!(dictionary.len(), 1);
        assert_eq!(dictionary.get(1), Some(&series(1)));
    }

    #[test]
    fn compaction_keeps_what_is_asked_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut dictionary = SeriesDictionary::open(dir.path()).unwrap();
            for id in 1..=10 {
                dictionary.insert(&[series(id)], id).unwrap();
            }
            dictionary.touch(2, 20);
            // Keep the series used by batches after 8.
            dictionary.compact(|_, last_used| last_used > 8).unwrap();
            assert_eq!(dictionary.len(), 3);
            dictionary.insert(&[series(11)], 11).unwrap();
            dictionary.sync().unwrap();
        }
        let dictionary = SeriesDictionary::open(dir.path()).unwrap();
        let mut ids: Vec<u64> = dictionary.entries.keys().copied().collect();
        ids.sort_unstable();
        assert_eq!(ids, [2, 9, 10, 11]);
    }

    #[test]
    fn compaction_is_wanted_only_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut dictionary = SeriesDictionary::open(dir.path()).unwrap();
        let mut id = 0;
        while !dictionary.wants_compaction() {
            id += 1;
            dictionary.insert(&[series(id)], id).unwrap();
        }
        assert!(dictionary.bytes() > COMPACT_MIN_BYTES);
        // Nothing to drop: the bound doubles.
        dictionary.compact(|_, _| true).unwrap();
        assert!(!dictionary.wants_compaction());
        assert_eq!(dictionary.len() as u64, id);
    }
}
