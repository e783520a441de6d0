//! The agent's on-disk spool: batches survive restarts until acked, torn writes are cut, the
//! bound drops the oldest batches and says so.

use std::{fs, path::Path};

use vigil_agent::transport::spool::{Spool, SpoolError};
use vigil_proto::v1::{Batch, Sample, Series};

const MIB: u64 = 1 << 20;

/// A batch of `sequence` declaring `declared` series and carrying `samples` samples.
fn batch(sequence: u64, declared: &[u64], samples: usize) -> Batch {
    Batch {
        sequence,
        series: declared
            .iter()
            .map(|&id| Series {
                id,
                name: format!("vigil_test_{id}"),
                ..Default::default()
            })
            .collect(),
        base_time_ms: 1_795_914_000_000 + sequence as i64 * 1000,
        samples: (0..samples)
            .map(|i| Sample {
                series_id: i as u64 + 1,
                time_delta_ms: 0,
                value: sequence as f64 + i as f64 / 1000.0,
            })
            .collect(),
        ..Default::default()
    }
}

fn append_range(spool: &mut Spool, sequences: std::ops::RangeInclusive<u64>, samples: usize) {
    for sequence in sequences {
        assert_eq!(spool.next_sequence(), sequence);
        spool.append(&batch(sequence, &[], samples)).unwrap();
    }
}

/// Sequences the sender would send, oldest first.
fn unacked_sequences(spool: &Spool) -> Vec<u64> {
    let mut sequences = Vec::new();
    let mut from = 0;
    while let Some(batch) = spool.read_from(from).unwrap() {
        sequences.push(batch.sequence);
        from = batch.sequence + 1;
    }
    sequences
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("segment-"))
        .collect();
    names.sort();
    names
}

#[test]
fn unacked_batches_survive_a_restart_and_come_back_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let instance;
    {
        let mut spool = Spool::open(dir.path(), 64 * MIB).unwrap();
        instance = spool.agent_instance().to_string();
        append_range(&mut spool, 1..=5, 3);
        spool.ack(2).unwrap();
    }
    let spool = Spool::open(dir.path(), 64 * MIB).unwrap();
    assert_eq!(spool.agent_instance(), instance, "the instance id is kept");
    assert_eq!(spool.acked(), 2);
    assert_eq!(spool.next_sequence(), 6);
    assert_eq!(unacked_sequences(&spool), [3, 4, 5]);
    assert_eq!(spool.unacked_batches(), 3);
    let third = spool.read_from(0).unwrap().unwrap();
    assert_eq!(
        third,
        batch(3, &[], 3),
        "the batch comes back byte for byte"
    );
}

#[test]
fn each_spool_has_its_own_random_instance_id() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let id_a = Spool::open(a.path(), MIB)
        .unwrap()
        .agent_instance()
        .to_string();
    let id_b = Spool::open(b.path(), MIB)
        .unwrap()
        .agent_instance()
        .to_string();
    assert_eq!(id_a.len(), 36, "a UUID: {id_a}");
    assert_ne!(id_a, id_b);
}

#[test]
fn a_second_agent_on_the_same_spool_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Spool::open(dir.path(), MIB).unwrap();
    let err = Spool::open(dir.path(), MIB).err().expect("refused");
    assert!(matches!(err, SpoolError::InUse(_)), "{err}");
    assert!(err.to_string().contains("transport.spool_dir"), "{err}");
}

#[test]
fn fully_acked_segments_are_deleted_and_the_ack_mark_persists() {
    let dir = tempfile::tempdir().unwrap();
    {
        // 64 KiB bound -> 4 KiB segments; each batch is ~250 bytes.
        let mut spool = Spool::open(dir.path(), 64 << 10).unwrap();
        append_range(&mut spool, 1..=60, 20);
        spool.sync().unwrap();
        let before = segment_files(dir.path());
        assert!(before.len() >= 3, "{before:?}");
        spool.ack(40).unwrap();
        let after = segment_files(dir.path());
        assert!(after.len() < before.len(), "{before:?} -> {after:?}");
        assert!(
            after[0] > before[0],
            "the oldest segments went: {before:?} -> {after:?}"
        );
        assert_eq!(unacked_sequences(&spool), (41..=60).collect::<Vec<_>>());
        spool.sync().unwrap();
    }
    let spool = Spool::open(dir.path(), 64 << 10).unwrap();
    assert_eq!(spool.acked(), 40);
    assert_eq!(unacked_sequences(&spool), (41..=60).collect::<Vec<_>>());
}

#[test]
fn sequences_and_series_ids_continue_after_a_restart_with_everything_acked() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut spool = Spool::open(dir.path(), MIB).unwrap();
        spool.append(&batch(1, &[1, 2], 2)).unwrap();
        spool.append(&batch(2, &[3], 3)).unwrap();
        assert_eq!(spool.next_series_id(), 4);
        spool.ack(2).unwrap();
        assert!(segment_files(dir.path()).is_empty(), "all acked: deleted");
    }
    let spool = Spool::open(dir.path(), MIB).unwrap();
    assert_eq!(spool.next_sequence(), 3, "sequences are never reused");
    assert_eq!(spool.next_series_id(), 4, "series ids are never reused");
    assert_eq!(spool.read_from(0).unwrap(), None);
}

#[test]
fn series_ids_are_recovered_from_segments_when_the_state_is_stale() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut spool = Spool::open(dir.path(), MIB).unwrap();
        spool.append(&batch(1, &[1, 2, 3, 4, 5], 1)).unwrap();
        spool.sync().unwrap();
        spool.append(&batch(2, &[6, 7], 1)).unwrap();
    }
    // As if killed before the state file caught up.
    fs::write(
        dir.path().join("state"),
        "acked 0\nnext_sequence 1\nnext_series_id 1\n",
    )
    .unwrap();
    let spool = Spool::open(dir.path(), MIB).unwrap();
    assert_eq!(spool.next_sequence(), 3);
    assert_eq!(spool.next_series_id(), 8);
}

#[test]
fn a_torn_last_record_is_cut_off_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut spool = Spool::open(dir.path(), MIB).unwrap();
        append_range(&mut spool, 1..=3, 5);
    }
    fs::write(
        dir.path().join("state"),
        "acked 0\nnext_sequence 1\nnext_series_id 1\n",
    )
    .unwrap();
    let segment = dir.path().join(&segment_files(dir.path())[0]);
    let full = fs::metadata(&segment).unwrap().len();
    let record = full / 3;
    // The agent died in the middle of writing batch 3.
    let torn = full - record / 2;
    fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(torn)
        .unwrap();

    let mut spool = Spool::open(dir.path(), MIB).unwrap();
    assert_eq!(fs::metadata(&segment).unwrap().len(), 2 * record, "cut");
    assert_eq!(unacked_sequences(&spool), [1, 2]);
    assert_eq!(spool.next_sequence(), 3);
    spool.append(&batch(3, &[], 5)).unwrap();
    spool.append(&batch(4, &[], 5)).unwrap();
    drop(spool);
    let spool = Spool::open(dir.path(), MIB).unwrap();
    assert_eq!(unacked_sequences(&spool), [1, 2, 3, 4]);
}

#[test]
fn a_record_with_a_bad_checksum_at_the_tail_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut spool = Spool::open(dir.path(), MIB).unwrap();
        append_range(&mut spool, 1..=3, 5);
    }
    let segment = dir.path().join(&segment_files(dir.path())[0]);
    let mut bytes = fs::read(&segment).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0xff;
    fs::write(&segment, &bytes).unwrap();
    let spool = Spool::open(dir.path(), MIB).unwrap();
    assert_eq!(unacked_sequences(&spool), [1, 2]);
    // The state remembers that 3 was handed out: it is not reused.
    assert_eq!(spool.next_sequence(), 4);
}

#[test]
fn a_full_spool_drops_the_oldest_batches_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let bound = 64 << 10;
    let dropped;
    {
        let mut spool = Spool::open(dir.path(), bound).unwrap();
        let mut reported = 0;
        for sequence in 1..=400 {
            // ~1 KiB each: 400 KiB into a 64 KiB spool.
            reported += spool
                .append(&batch(sequence, &[], 80))
                .unwrap()
                .dropped_batches;
            assert!(spool.bytes() <= bound, "{} > {bound}", spool.bytes());
        }
        dropped = spool.dropped_batches();
        assert_eq!(reported, dropped);
        assert!(dropped > 300, "{dropped}");
        let kept = unacked_sequences(&spool);
        assert_eq!(
            kept,
            (dropped + 1..=400).collect::<Vec<_>>(),
            "the newest are kept, nothing in between is missing"
        );
        let on_disk: u64 = segment_files(dir.path())
            .iter()
            .map(|n| fs::metadata(dir.path().join(n)).unwrap().len())
            .sum();
        assert_eq!(on_disk, spool.bytes());
    }
    let spool = Spool::open(dir.path(), bound).unwrap();
    assert_eq!(spool.dropped_batches(), dropped, "the count is kept");
    assert_eq!(spool.read_from(0).unwrap().unwrap().sequence, dropped + 1);
}

#[test]
fn acked_batches_are_not_counted_as_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 64 << 10).unwrap();
    for sequence in 1..=400 {
        spool.append(&batch(sequence, &[], 80)).unwrap();
        spool.ack(sequence).unwrap();
    }
    assert_eq!(spool.dropped_batches(), 0);
    assert_eq!(spool.unacked_batches(), 0);
}

#[test]
fn batches_must_be_appended_in_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), MIB).unwrap();
    let err = spool.append(&batch(2, &[], 1)).unwrap_err();
    assert!(matches!(
        err,
        SpoolError::OutOfOrder {
            expected: 1,
            got: 2
        }
    ));
}

/// A batch declaring series `declared` with `name` and using it and series 1.
fn declaring_batch(sequence: u64, declared: u64, name: &str) -> Batch {
    Batch {
        sequence,
        series: vec![Series {
            id: declared,
            name: name.to_string(),
            labels: vec![vigil_proto::v1::Label {
                name: "pod".into(),
                value: "x".repeat(120),
            }],
            r#type: 1,
        }],
        samples: [1, declared]
            .into_iter()
            .map(|series_id| Sample {
                series_id,
                time_delta_ms: 0,
                value: 1.0,
            })
            .collect(),
        ..Default::default()
    }
}

#[test]
fn declarations_outlive_the_batches_that_made_them() {
    let dir = tempfile::tempdir().unwrap();
    let bound = 64 << 10;
    let dropped;
    {
        let mut spool = Spool::open(dir.path(), bound).unwrap();
        spool.append(&declaring_batch(1, 1, "vigil_first")).unwrap();
        spool
            .append(&declaring_batch(2, 2, "vigil_second"))
            .unwrap();
        spool.ack(1).unwrap();
        // Batch 2 is dropped for space with many others.
        for sequence in 3..=400 {
            spool.append(&batch(sequence, &[], 80)).unwrap();
        }
        dropped = spool.dropped_batches();
        assert!(dropped > 300, "{dropped}");
        spool.sync().unwrap();
    }
    let mut spool = Spool::open(dir.path(), bound).unwrap();
    assert_eq!(spool.next_series_id(), 3);
    let mut next = spool.read_from(0).unwrap().unwrap();
    assert!(next.series.is_empty());
    let mut declared = std::collections::HashSet::new();
    // Its samples use series 1 and 2 (80 samples: ids 1..=80, only 1 and 2 are known).
    let missing = spool.declare_for_stream(&mut next, &mut declared).unwrap();
    let ids: Vec<u64> = next.series.iter().map(|s| s.id).collect();
    assert_eq!(ids, [1, 2]);
    assert_eq!(next.series[1].name, "vigil_second");
    assert_eq!(missing, (3..=80).collect::<Vec<_>>());
    // Declared on this stream now: the next batch does not declare them again.
    let mut after = spool.read_from(next.sequence + 1).unwrap().unwrap();
    spool.declare_for_stream(&mut after, &mut declared).unwrap();
    assert!(after.series.is_empty());
}

#[test]
fn the_dictionary_is_compacted_keeping_the_series_still_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let mut last = 0;
    {
        let mut spool = Spool::open(dir.path(), 64 * MIB).unwrap();
        spool
            .append(&declaring_batch(1, 1, "vigil_always"))
            .unwrap();
        let mut largest = 0;
        for sequence in 2..=30_000 {
            spool
                .append(&declaring_batch(sequence, sequence, "vigil_once"))
                .unwrap();
            if sequence % 500 == 0 {
                spool.ack(sequence).unwrap();
            }
            last = sequence;
            let bytes = spool.dictionary_bytes();
            if bytes < largest && spool.known_series() < sequence as usize {
                break;
            }
            largest = largest.max(bytes);
        }
        assert!(last < 30_000, "compacted, dropping series");
        // Series 1 is used by every batch; the newest may still be used by the encoder.
        assert!(spool.series(1).is_some());
        assert!(
            spool.series(2).is_none(),
            "unused for long and acked: dropped"
        );
        assert!(spool.series(last).is_some());
        assert!(spool.series(last - 7000).is_some());
        spool.sync().unwrap();
    }
    let spool = Spool::open(dir.path(), 64 * MIB).unwrap();
    assert!(spool.series(1).is_some());
    assert!(spool.series(2).is_none());
    assert!(spool.series(last).is_some());
    assert_eq!(spool.next_series_id(), last + 1);
}
