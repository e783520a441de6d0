//! Alert history: every alert that fired, with its start, end, labels and peak value, kept in
//! `<data_dir>/alerts/history.jsonl` for the data's retention.
//!
//! The file is a log of JSON lines, one per firing (`"event": "fired"`) and one per resolution
//! (`"event": "resolved"`, with the peak value): appending is cheap and a crash loses at most
//! the last line. It is folded into records at startup and rewritten, without what is older
//! than the retention, at startup and then hourly. An alert still firing when the aggregator
//! stopped is closed at the restart with `interrupted: true`; if it still holds, it fires again
//! after the restart as a new record.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::group::Alert;
use crate::query::Labels;

/// One alert's firing, as the history API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// Identifies the record (fingerprint of the labels + firing time).
    pub id: String,
    pub labels: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
    /// When the condition first held (pending began), ms since the epoch.
    pub active_at_ms: i64,
    /// When it fired.
    pub started_at_ms: i64,
    /// When it resolved; `None` while firing.
    pub ended_at_ms: Option<i64>,
    pub peak_value: f64,
    /// Closed by an aggregator restart rather than by resolving.
    #[serde(default)]
    pub interrupted: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Line {
    Fired {
        id: String,
        labels: Vec<(String, String)>,
        annotations: Vec<(String, String)>,
        active_at_ms: i64,
        started_at_ms: i64,
        value: f64,
    },
    Resolved {
        id: String,
        ended_at_ms: i64,
        peak_value: f64,
        #[serde(default)]
        interrupted: bool,
    },
    /// A whole record (what a rewrite writes).
    Record(HistoryRecord),
}

/// The history, in memory and on disk.
pub struct AlertHistory {
    path: Option<PathBuf>,
    retention: Duration,
    state: Mutex<HistoryState>,
}

struct HistoryState {
    records: Vec<HistoryRecord>,
    /// Open records by label set.
    open: HashMap<Labels, usize>,
    file: Option<File>,
    last_compaction_ms: i64,
}

const COMPACTION_EVERY_MS: i64 = 3600 * 1000;

impl AlertHistory {
    /// In memory only (tests, `check-rules`).
    pub fn in_memory(retention: Duration) -> AlertHistory {
        AlertHistory {
            path: None,
            retention,
            state: Mutex::new(HistoryState {
                records: Vec::new(),
                open: HashMap::new(),
                file: None,
                last_compaction_ms: 0,
            }),
        }
    }

    /// Opens (or creates) the history under `dir`, closing records left open by the last run
    /// at `now_ms` and dropping those older than `retention`.
    pub fn open(dir: &Path, retention: Duration, now_ms: i64) -> std::io::Result<AlertHistory> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("history.jsonl");
        let mut records: Vec<HistoryRecord> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        if path.exists() {
            let reader = BufReader::new(File::open(&path)?);
            for (number, line) in reader.lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                let parsed: Line = match serde_json::from_str(&line) {
                    Ok(parsed) => parsed,
                    Err(error) => {
                        // A torn last line after a crash: skip it, keep the rest.
                        tracing::warn!(
                            "{}:{}: skipping an unreadable alert history line: {error}",
                            path.display(),
                            number + 1
                        );
                        continue;
                    }
                };
                match parsed {
                    Line::Fired {
                        id,
                        labels,
                        annotations,
                        active_at_ms,
                        started_at_ms,
                        value,
                    } => {
                        index.insert(id.clone(), records.len());
                        records.push(HistoryRecord {
                            id,
                            labels,
                            annotations,
                            active_at_ms,
                            started_at_ms,
                            ended_at_ms: None,
                            peak_value: value,
                            interrupted: false,
                        });
                    }
                    Line::Resolved {
                        id,
                        ended_at_ms,
                        peak_value,
                        interrupted,
                    } => {
                        if let Some(record) = index.get(&id).and_then(|i| records.get_mut(*i)) {
                            record.ended_at_ms = Some(ended_at_ms);
                            record.peak_value = record.peak_value.max(peak_value);
                            record.interrupted = interrupted;
                        }
                    }
                    Line::Record(record) => {
                        index.insert(record.id.clone(), records.len());
                        records.push(record);
                    }
                }
            }
        }
        for record in &mut records {
            if record.ended_at_ms.is_none() {
                record.ended_at_ms = Some(now_ms);
                record.interrupted = true;
            }
        }
        let history = AlertHistory {
            path: Some(path),
            retention,
            state: Mutex::new(HistoryState {
                records,
                open: HashMap::new(),
                file: None,
                last_compaction_ms: 0,
            }),
        };
        {
            let mut state = history.lock();
            history.compact(&mut state, now_ms)?;
        }
        Ok(history)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HistoryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops records that ended before the retention and rewrites the file.
    fn compact(&self, state: &mut HistoryState, now_ms: i64) -> std::io::Result<()> {
        let horizon = now_ms - self.retention.as_millis() as i64;
        state
            .records
            .retain(|record| record.ended_at_ms.is_none_or(|end| end >= horizon));
        state.open = state
            .records
            .iter()
            .enumerate()
            .filter(|(_, record)| record.ended_at_ms.is_none())
            .map(|(index, record)| (record.labels.clone(), index))
            .collect();
        state.last_compaction_ms = now_ms;
        let Some(path) = &self.path else {
            return Ok(());
        };
        let temporary = path.with_extension("jsonl.tmp");
        {
            let mut file = File::create(&temporary)?;
            for record in &state.records {
                let line = serde_json::to_string(&Line::Record(record.clone()))
                    .map_err(std::io::Error::other)?;
                writeln!(file, "{line}")?;
            }
            file.sync_all()?;
        }
        std::fs::rename(&temporary, path)?;
        state.file = Some(OpenOptions::new().append(true).open(path)?);
        Ok(())
    }

    fn append(&self, state: &mut HistoryState, line: &Line) {
        let Some(file) = state.file.as_mut() else {
            return;
        };
        let result = serde_json::to_string(line)
            .map_err(std::io::Error::other)
            .and_then(|text| writeln!(file, "{text}"));
        if let Err(error) = result {
            tracing::warn!("cannot write the alert history: {error}");
        }
    }

    /// Records a firing.
    pub fn fired(&self, alert: &Alert) {
        let mut state = self.lock();
        let started = alert.fired_at_ms.unwrap_or(alert.active_at_ms);
        let id = format!("{:016x}-{started}", fingerprint(&alert.labels));
        let record = HistoryRecord {
            id: id.clone(),
            labels: alert.labels.clone(),
            annotations: alert.annotations.clone(),
            active_at_ms: alert.active_at_ms,
            started_at_ms: started,
            ended_at_ms: None,
            peak_value: alert.peak,
            interrupted: false,
        };
        let index = state.records.len();
        state.records.push(record);
        state.open.insert(alert.labels.clone(), index);
        self.append(
            &mut state,
            &Line::Fired {
                id,
                labels: alert.labels.clone(),
                annotations: alert.annotations.clone(),
                active_at_ms: alert.active_at_ms,
                started_at_ms: started,
                value: alert.peak,
            },
        );
    }

    /// Keeps the peak of a firing alert current (memory only; written at resolution).
    pub fn observe(&self, alert: &Alert) {
        let mut state = self.lock();
        if let Some(index) = state.open.get(&alert.labels).copied()
            && let Some(record) = state.records.get_mut(index)
        {
            record.peak_value = record.peak_value.max(alert.peak);
        }
    }

    /// Records a resolution.
    pub fn resolved(&self, alert: &Alert) {
        let mut state = self.lock();
        let Some(index) = state.open.remove(&alert.labels) else {
            return;
        };
        let Some(record) = state.records.get_mut(index) else {
            return;
        };
        let ended = alert.resolved_at_ms.unwrap_or(alert.active_at_ms);
        record.ended_at_ms = Some(ended);
        record.peak_value = record.peak_value.max(alert.peak);
        let line = Line::Resolved {
            id: record.id.clone(),
            ended_at_ms: ended,
            peak_value: record.peak_value,
            interrupted: false,
        };
        self.append(&mut state, &line);
        if ended - state.last_compaction_ms > COMPACTION_EVERY_MS
            && let Err(error) = self.compact(&mut state, ended)
        {
            tracing::warn!("cannot rewrite the alert history: {error}");
        }
    }

    /// Drops what is older than the retention, at most hourly.
    pub fn maintain(&self, now_ms: i64) {
        let mut state = self.lock();
        if now_ms - state.last_compaction_ms > COMPACTION_EVERY_MS
            && let Err(error) = self.compact(&mut state, now_ms)
        {
            tracing::warn!("cannot rewrite the alert history: {error}");
        }
    }

    /// Records that overlap `[start_ms, end_ms]`, oldest first.
    pub fn query(&self, start_ms: i64, end_ms: i64) -> Vec<HistoryRecord> {
        let state = self.lock();
        let mut out: Vec<HistoryRecord> = state
            .records
            .iter()
            .filter(|record| {
                record.started_at_ms <= end_ms && record.ended_at_ms.is_none_or(|e| e >= start_ms)
            })
            .cloned()
            .collect();
        out.sort_by_key(|record| record.started_at_ms);
        out
    }
}

/// FNV-1a over the labels: stable across runs (unlike `DefaultHasher`'s seed).
pub fn fingerprint(labels: &[(String, String)]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, value) in labels {
        for byte in name
            .bytes()
            .chain([0xff])
            .chain(value.bytes())
            .chain([0xff])
        {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerting::group::AlertState;

    fn alert(name: &str, active: i64, fired: i64, peak: f64) -> Alert {
        Alert {
            labels: vec![("alertname".into(), name.into())],
            annotations: vec![("summary".into(), "s".into())],
            state: AlertState::Firing,
            value: peak,
            peak,
            active_at_ms: active,
            fired_at_ms: Some(fired),
            resolved_at_ms: None,
            last_sent_ms: None,
            valid_until_ms: 0,
            keep_firing_since_ms: None,
        }
    }

    #[test]
    fn records_survive_a_restart_and_age_out_with_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let day = 24 * 3600 * 1000;
        let retention = Duration::from_secs(2 * 24 * 3600);
        let history = AlertHistory::open(dir.path(), retention, 10 * day).unwrap();
        // An alert that fires and resolves, with a higher value in between.
        let mut old = alert("Old", 10 * day, 10 * day + 60_000, 5.0);
        history.fired(&old);
        old.peak = 9.0;
        history.observe(&old);
        old.state = AlertState::Inactive;
        old.resolved_at_ms = Some(10 * day + 120_000);
        history.resolved(&old);
        // One still firing when the aggregator stops.
        history.fired(&alert("Open", 11 * day, 11 * day, 1.0));
        drop(history);
        // A torn last line (a crash mid-append) is skipped.
        let path = dir.path().join("history.jsonl");
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        write!(file, "{{\"event\":\"fired\",\"id\":").unwrap();
        drop(file);

        let history = AlertHistory::open(dir.path(), retention, 11 * day + 5_000).unwrap();
        let records = history.query(0, i64::MAX);
        assert_eq!(records.len(), 2, "{records:?}");
        assert_eq!(records[0].peak_value, 9.0);
        assert_eq!(records[0].started_at_ms, 10 * day + 60_000);
        assert_eq!(records[0].ended_at_ms, Some(10 * day + 120_000));
        assert!(!records[0].interrupted);
        assert_eq!(records[1].ended_at_ms, Some(11 * day + 5_000));
        assert!(records[1].interrupted, "closed by the restart");
        // Range queries pick overlapping records.
        assert_eq!(history.query(10 * day + 130_000, 11 * day - 1).len(), 0);
        assert_eq!(history.query(10 * day, 10 * day + 70_000).len(), 1);
        drop(history);

        // Past the retention, the first record is dropped (the second ended later).
        let history = AlertHistory::open(dir.path(), retention, 12 * day + 200_000).unwrap();
        let records = history.query(0, i64::MAX);
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(label_of(&records[0]), "Open");
    }

    fn label_of(record: &HistoryRecord) -> &str {
        &record.labels[0].1
    }
}
