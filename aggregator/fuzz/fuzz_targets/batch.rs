//! Arbitrary bytes as a stream of length-delimited `AgentMessage`s (what `Ingest.Stream`
//! reads after gRPC framing), each `Batch` run through the aggregator's real admission path
//! (`admission::admit_batch`: the same checks and store updates as `admit`, without the WAL)
//! against an in-memory `Store`. A `Hello` switches the node and agent instance written as and
//! starts a new stream: each Batch first goes through the stream's delta decoder
//! (`vigil_proto::delta`, as `ingest::read_batches` does); a block that does not decode ends the
//! stream, which here ends the input.
//!
//! Besides "never panics", it checks what admission promises:
//! - every offered sample, histogram and event is either stored or counted in a Rejection;
//! - sequence 0 is refused whole, resends are recognised, the high-water mark follows;
//! - everything stored fits its series' kind (gauge: any value; counter: finite, >= 0;
//!   histogram: valid sparse buckets that add up, finite sum >= 0), lies inside
//!   [now - retention, now + skew], and no node exceeds its series limit;
//! - replaying the WAL records (encoded and decoded again) into a fresh store rebuilds the
//!   same store.

#![no_main]

#[path = "common.rs"]
mod common;

use common::{LIMITS, MAX_MESSAGES, NOW_MS};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use vigil_agent_common::histogram::BUCKET_COUNT;
use vigil_aggregator::{
    ingest::{
        admission::{Outcome, admit_batch, apply_replayed},
        counters::IngestCounters,
    },
    storage::{MetricKind, PointValue, Store, WalRecord},
};
use vigil_proto::{
    delta::DeltaDecoder,
    v1::{AgentMessage, agent_message::Body},
};

fuzz_target!(|data: &[u8]| {
    let store = Store::new();
    let counters = IngestCounters::default();
    let mut node = "node-a".to_string();
    let mut instance = "spool-1".to_string();
    let mut nodes = vec![node.clone()];
    let mut records = Vec::new();
    let new_decoder = || DeltaDecoder::new(LIMITS.max_series_per_node * 2);
    let mut decoder = new_decoder();

    let mut input = data;
    for _ in 0..MAX_MESSAGES {
        if input.is_empty() {
            break;
        }
        let Ok(message) = AgentMessage::decode_length_delimited(&mut input) else {
            break;
        };
        match message.body {
            Some(Body::Hello(hello)) => {
                // As ingest::check_hello: the stream ends otherwise.
                let printable = |s: &str| !s.chars().any(char::is_control);
                if (1..=253).contains(&hello.node.len())
                    && (1..=128).contains(&hello.agent_instance.len())
                    && printable(&hello.node)
                    && printable(&hello.agent_instance)
                {
                    node = hello.node;
                    instance = hello.agent_instance;
                    decoder = new_decoder();
                    nodes.push(node.clone());
                }
            }
            Some(Body::Batch(mut batch)) => {
                if decoder.decode(&mut batch).is_err() {
                    break;
                }
                assert!(batch.delta.is_none());
                let sequence = batch.sequence;
                let offered = batch.samples.len() + batch.histograms.len() + batch.events.len();
                let before = store.high_water(&node, &instance);
                match admit_batch(&store, &counters, &LIMITS, &node, &instance, batch, NOW_MS) {
                    Outcome::Stored {
                        sequence: stored,
                        record,
                        rejections,
                    } => {
                        assert_eq!(stored, sequence);
                        assert!(sequence > 0 && before.is_none_or(|high| sequence > high));
                        assert_eq!(store.high_water(&node, &instance), Some(sequence));
                        let kept = record
                            .batch
                            .as_ref()
                            .map_or(0, |b| b.samples.len() + b.histograms.len() + b.events.len());
                        let rejected: usize =
                            rejections.iter().map(|r| r.rejected_samples as usize).sum();
                        assert_eq!(kept + rejected, offered, "{rejections:?}");
                        let mut reasons: Vec<i32> = rejections.iter().map(|r| r.reason).collect();
                        reasons.dedup();
                        assert_eq!(reasons.len(), rejections.len(), "one Rejection per reason");
                        records.push(record);
                    }
                    Outcome::Duplicate { sequence: resent } => {
                        assert_eq!(resent, sequence);
                        assert!(before.is_some_and(|high| sequence <= high));
                        assert_eq!(store.high_water(&node, &instance), before);
                    }
                    Outcome::Refused { rejections } => {
                        assert_eq!(sequence, 0);
                        assert_eq!(rejections.len(), 1);
                        assert_eq!(rejections[0].rejected_samples as usize, offered);
                    }
                }
            }
            None => {}
        }
    }

    check_stored(&store, &nodes);

    // The WAL holds what was stored: replaying it rebuilds the same store.
    let replayed = Store::new();
    for record in &records {
        let decoded = WalRecord::decode(record.encode_to_vec().as_slice()).expect("round trip");
        apply_replayed(&replayed, &decoded);
    }
    assert_eq!(snapshot(&replayed), snapshot(&store));
});

fn check_stored(store: &Store, nodes: &[String]) {
    let earliest = NOW_MS - LIMITS.retention_ms;
    let latest = NOW_MS + LIMITS.max_future_skew_ms;
    for node in nodes {
        assert!(store.series_count(node) <= LIMITS.max_series_per_node);
    }
    for series in store.series() {
        for point in store.samples_of(series.id) {
            assert!(
                (earliest..=latest).contains(&point.time_ms),
                "{series:?}: {point:?}"
            );
            match (&point.value, series.kind) {
                (PointValue::Value(_), MetricKind::Gauge) => {}
                (PointValue::Value(value), MetricKind::Counter) => {
                    assert!(value.is_finite() && *value >= 0.0, "{series:?}: {point:?}")
                }
                (PointValue::Histogram(histogram), MetricKind::Histogram) => {
                    assert!(
                        histogram.sum_seconds.is_finite() && histogram.sum_seconds >= 0.0,
                        "{series:?}: {point:?}"
                    );
                    let mut total = 0u64;
                    for (k, (index, count)) in histogram.buckets.iter().enumerate() {
                        assert!((*index as usize) < BUCKET_COUNT, "{series:?}: {point:?}");
                        assert!(
                            k == 0 || histogram.buckets[k - 1].0 < *index,
                            "{series:?}: {point:?}"
                        );
                        total += count;
                    }
                    assert_eq!(total, histogram.count, "{series:?}: {point:?}");
                }
                _ => panic!("a point that does not fit its series' kind: {series:?}: {point:?}"),
            }
        }
    }
    for event in store.events() {
        assert!(!event.kind.is_empty());
        assert!((earliest..=latest).contains(&event.time_ms), "{event:?}");
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
