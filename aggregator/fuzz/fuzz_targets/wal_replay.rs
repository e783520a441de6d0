//! Arbitrary bytes as the only (so the last) segment of a write-ahead log, opened with
//! `Wal::open` in a fresh temporary directory (`TMPDIR=/dev/shm` keeps it off the disk) and
//! replayed into a `Store` as the aggregator does at startup.
//!
//! The first input byte picks how the rest becomes the segment: bit 0 set: as is; clear: after
//! a valid header (magic + version). Bit 1 set: the CRC of every whole record is made right,
//! so the payloads reach the protobuf decoder and the store.
//!
//! Checks: never panics; a bad header is an error, anything else opens, a torn tail is cut;
//! opening the same directory again replays the same records into the same store, with nothing
//! torn.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_aggregator::{
    ingest::admission::apply_replayed,
    storage::{Store, Wal},
};

const HEADER: &[u8] = b"VIGILWAL\x01\x00\x00\x00";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut segment = Vec::with_capacity(rest.len() + HEADER.len());
    if mode & 1 == 0 {
        segment.extend_from_slice(HEADER);
    }
    segment.extend_from_slice(rest);
    if mode & 2 != 0 {
        fix_crcs(&mut segment);
    }

    let dir = tempfile::tempdir().expect("temporary directory");
    std::fs::write(dir.path().join("00000000000000000001.wal"), &segment).expect("write segment");

    let first = Store::new();
    let report = match Wal::open(dir.path(), 1 << 20, |record| {
        apply_replayed(&first, &record)
    }) {
        Ok((wal, report)) => {
            drop(wal);
            report
        }
        Err(error) => {
            // Only a segment that is not a Vigil segment (or a newer one) stops the open.
            assert!(
                segment.len() >= HEADER.len() && segment[..HEADER.len()] != *HEADER,
                "{error}"
            );
            return;
        }
    };
    if let Some(torn) = &report.torn_tail {
        assert_eq!(torn.offset + torn.bytes_cut, segment.len() as u64);
    }

    let again = Store::new();
    let (wal, second) = Wal::open(dir.path(), 1 << 20, |record| {
        apply_replayed(&again, &record)
    })
    .expect("a log that opened once opens again");
    drop(wal);
    assert_eq!(second.records, report.records);
    assert_eq!(second.torn_tail, None);
    assert_eq!(snapshot(&again), snapshot(&first));
});

/// Sets the CRC of every whole record after the header to the right value.
fn fix_crcs(segment: &mut [u8]) {
    let mut offset = HEADER.len();
    while offset + 8 <= segment.len() {
        let len = u32::from_le_bytes(segment[offset..offset + 4].try_into().unwrap()) as usize;
        let end = offset + 8 + len;
        if end > segment.len() {
            break;
        }
        let crc = crc32fast::hash(&segment[offset + 8..end]);
        segment[offset + 4..offset + 8].copy_from_slice(&crc.to_le_bytes());
        offset = end;
    }
}

/// The store as text (f64 NaN is not equal to itself, its Debug form is).
fn snapshot(store: &Store) -> String {
    let mut text = String::new();
    for series in store.series() {
        text += &format!("{series:?} {:?}\n", store.samples_of(series.id));
    }
    text + &format!("{:?}", store.events())
}
