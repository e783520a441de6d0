//! One collection pass -> one wire `Batch` (proto/vigil/v1/ingest.proto).
//!
//! Series are declared (id -> name, labels, type) in the first batch that uses them and referred
//! to by id after that; ids are scoped to the agent instance and never reused. The spool keeps
//! every declaration (its series dictionary) and the sender adds to each batch it sends the
//! declarations that stream has not seen yet, so resends stay self-sufficient. When the
//! aggregator says it does not know a series (Rejection UNKNOWN_SERIES), the next batch declares
//! every known series again.

use std::collections::HashMap;

use vigil_agent_common::histogram::{OVERFLOW_BUCKET, bucket_index};
use vigil_proto::v1::{self as wire, MetricType};

use crate::sample::{Event, HistogramSnapshot, Labels, Sample, SampleValue};

/// A series unused for this many passes is forgotten (checked every sixth of it; its id is never
/// reused: if it comes back it gets a new one), so churning label values (pids) do not grow the agent's memory forever.
pub(crate) const FORGET_AFTER_PASSES: u64 = 3600;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    name: &'static str,
    labels: Labels,
}

struct KnownSeries {
    declaration: wire::Series,
    last_used_pass: u64,
}

/// Turns passes into batches, remembering which series the aggregator already knows.
pub struct BatchEncoder {
    ids: HashMap<SeriesKey, u64>,
    known: HashMap<u64, KnownSeries>,
    next_series_id: u64,
    passes: u64,
    redeclare_all: bool,
}

impl BatchEncoder {
    /// `first_series_id`: the lowest id never used by this agent instance (from the spool).
    pub fn new(first_series_id: u64) -> Self {
        Self {
            ids: HashMap::new(),
            known: HashMap::new(),
            next_series_id: first_series_id.max(1),
            passes: 0,
            redeclare_all: false,
        }
    }

    /// The next batch declares every known series again (after UNKNOWN_SERIES, or when batches
    /// that declared series were dropped from the spool unsent).
    pub fn redeclare_all(&mut self) {
        self.redeclare_all = true;
    }

    /// The lowest series id not handed out yet.
    pub fn next_series_id(&self) -> u64 {
        self.next_series_id
    }

    /// Encodes one pass taken at `time_ms` (Unix epoch milliseconds) as batch `sequence`.
    pub fn encode(
        &mut self,
        sequence: u64,
        time_ms: i64,
        samples: &[Sample],
        events: &[Event],
    ) -> wire::Batch {
        self.passes += 1;
        let mut batch = wire::Batch {
            sequence,
            base_time_ms: time_ms,
            ..Default::default()
        };
        let redeclare_all = std::mem::take(&mut self.redeclare_all);
        for sample in samples {
            let (series_id, new) = self.series_id(sample);
            if new && !redeclare_all {
                batch
                    .series
                    .push(self.known[&series_id].declaration.clone());
            }
            match &sample.value {
                SampleValue::Value(value) => batch.samples.push(wire::Sample {
                    series_id,
                    time_delta_ms: 0,
                    value: *value,
                }),
                SampleValue::Histogram(histogram) => {
                    let (bucket_index_deltas, bucket_counts) = sparse_buckets(histogram);
                    batch.histograms.push(wire::Histogram {
                        series_id,
                        time_delta_ms: 0,
                        count: histogram.count,
                        sum_seconds: histogram.sum,
                        bucket_index_deltas,
                        bucket_counts,
                    });
                }
            }
        }
        if redeclare_all {
            let mut all: Vec<_> = self.known.values().map(|k| k.declaration.clone()).collect();
            all.sort_by_key(|s| s.id);
            batch.series = all;
        }
        batch.events = events
            .iter()
            .map(|event| wire::Event {
                time_delta_ms: event_time_ms(event).map_or(0, |t| t - time_ms),
                kind: event.kind.to_string(),
                labels: wire_labels(&event.labels),
                message: event.message.clone(),
            })
            .collect();
        if self.passes.is_multiple_of(FORGET_AFTER_PASSES / 6) {
            self.forget_unused();
        }
        batch
    }

    /// The series' id, and whether it was new.
    fn series_id(&mut self, sample: &Sample) -> (u64, bool) {
        let key = SeriesKey {
            name: sample.name,
            labels: sample.labels.clone(),
        };
        if let Some(&id) = self.ids.get(&key) {
            if let Some(known) = self.known.get_mut(&id) {
                known.last_used_pass = self.passes;
            }
            return (id, false);
        }
        let id = self.next_series_id;
        self.next_series_id += 1;
        let metric_type = match &sample.value {
            SampleValue::Histogram(_) => MetricType::Histogram,
            SampleValue::Value(_) if sample.name.ends_with("_total") => MetricType::Counter,
            SampleValue::Value(_) => MetricType::Gauge,
        };
        let declaration = wire::Series {
            id,
            name: sample.name.to_string(),
            labels: wire_labels(&sample.labels),
            r#type: metric_type as i32,
        };
        self.ids.insert(key, id);
        self.known.insert(
            id,
            KnownSeries {
                declaration,
                last_used_pass: self.passes,
            },
        );
        (id, true)
    }

    fn forget_unused(&mut self) {
        let passes = self.passes;
        self.known
            .retain(|_, k| passes - k.last_used_pass < FORGET_AFTER_PASSES);
        let known = &self.known;
        self.ids.retain(|_, id| known.contains_key(id));
    }
}

fn wire_labels(labels: &Labels) -> Vec<wire::Label> {
    labels
        .iter()
        .map(|(name, value)| wire::Label {
            name: name.clone(),
            value: value.clone(),
        })
        .collect()
}

fn event_time_ms(event: &Event) -> Option<i64> {
    let time =
        time::OffsetDateTime::parse(&event.time, &time::format_description::well_known::Rfc3339)
            .ok()?;
    Some((time.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// The non-empty buckets of a histogram as (index deltas, per-bucket counts), from the
/// snapshot's cumulative `[le, count]` pairs: each `le` is a bucket's exact upper bound in
/// seconds, and observations above the last finite bound (counted only in `count`) go to the
/// overflow bucket.
pub fn sparse_buckets(histogram: &HistogramSnapshot) -> (Vec<u32>, Vec<u64>) {
    let mut deltas = Vec::with_capacity(histogram.buckets.len() + 1);
    let mut counts = Vec::with_capacity(histogram.buckets.len() + 1);
    let mut previous_index = 0;
    let mut previous_cumulative = 0;
    let mut push = |index: usize, count: u64| {
        deltas.push((index - previous_index) as u32);
        counts.push(count);
        previous_index = index;
    };
    for &(le_seconds, cumulative) in &histogram.buckets {
        let count = cumulative.saturating_sub(previous_cumulative);
        if count == 0 {
            continue;
        }
        previous_cumulative = cumulative;
        let index = bucket_index((le_seconds * 1e9).round() as u64);
        push(index, count);
    }
    let overflow = histogram.count.saturating_sub(previous_cumulative);
    if overflow > 0 {
        push(OVERFLOW_BUCKET, overflow);
    }
    (deltas, counts)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use vigil_agent_common::histogram::BUCKET_COUNT;

    use super::*;
    use crate::sample::LatencyHistogram;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn value(name: &'static str, l: &[(&str, &str)], v: f64) -> Sample {
        Sample {
            name,
            labels: labels(l),
            value: SampleValue::Value(v),
        }
    }

    /// What an aggregator reconstructs: (name, labels) -> value, with the declarations it has
    /// seen so far in `dictionary`.
    fn decode(
        batch: &wire::Batch,
        dictionary: &mut HashMap<u64, wire::Series>,
    ) -> BTreeMap<(String, Vec<(String, String)>), f64> {
        for s in &batch.series {
            dictionary.insert(s.id, s.clone());
        }
        let key = |id: u64| {
            let s = dictionary.get(&id).expect("series declared");
            let l = s
                .labels
                .iter()
                .map(|l| (l.name.clone(), l.value.clone()))
                .collect();
            (s.name.clone(), l)
        };
        batch
            .samples
            .iter()
            .map(|s| (key(s.series_id), s.value))
            .collect()
    }

    #[test]
    fn series_are_declared_once_and_values_round_trip() {
        let mut encoder = BatchEncoder::new(1);
        let pass = [
            value("vigil_gpu_power_watts", &[("gpu", "0")], 250.5),
            value("vigil_process_cpu_seconds_total", &[("pid", "42")], 12.25),
        ];
        let first = encoder.encode(1, 1_000, &pass, &[]);
        assert_eq!(first.sequence, 1);
        assert_eq!(first.base_time_ms, 1_000);
        assert_eq!(first.series.len(), 2);
        assert_eq!(first.series[0].r#type, MetricType::Gauge as i32);
        assert_eq!(first.series[1].r#type, MetricType::Counter as i32);

        let second_pass = [
            value("vigil_gpu_power_watts", &[("gpu", "0")], 251.0),
            value("vigil_gpu_power_watts", &[("gpu", "1")], 99.0),
        ];
        let second = encoder.encode(2, 2_000, &second_pass, &[]);
        assert_eq!(second.series.len(), 1, "only the new series is declared");
        assert_eq!(second.series[0].labels[0].value, "1");

        let mut dictionary = HashMap::new();
        let decoded = decode(&first, &mut dictionary);
        assert_eq!(
            decoded[&(
                "vigil_process_cpu_seconds_total".to_string(),
                vec![("pid".to_string(), "42".to_string())]
            )],
            12.25
        );
        let decoded = decode(&second, &mut dictionary);
        assert_eq!(decoded.len(), 2);
        assert_eq!(
            decoded[&(
                "vigil_gpu_power_watts".to_string(),
                vec![("gpu".to_string(), "0".to_string())]
            )],
            251.0
        );
        // Survives the wire encoding too.
        let bytes = prost::Message::encode_to_vec(&second);
        let back: wire::Batch = prost::Message::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, second);
    }

    #[test]
    fn redeclare_all_declares_every_known_series_once_in_the_next_batch() {
        let mut encoder = BatchEncoder::new(7);
        let pass = [
            value("vigil_a", &[], 1.0),
            value("vigil_b", &[], 2.0),
            value("vigil_c", &[], 3.0),
        ];
        encoder.encode(1, 0, &pass, &[]);
        encoder.redeclare_all();
        let again = encoder.encode(2, 1000, &pass[..1], &[]);
        let ids: Vec<u64> = again.series.iter().map(|s| s.id).collect();
        assert_eq!(ids, [7, 8, 9]);
        let after = encoder.encode(3, 2000, &pass, &[]);
        assert!(after.series.is_empty());
        assert_eq!(encoder.next_series_id(), 10);
    }

    #[test]
    fn histograms_carry_exact_per_bucket_counts_for_every_bucket() {
        // Every bucket, including the first and the overflow one, survives snapshot -> wire.
        let mut histogram = LatencyHistogram::default();
        for index in 0..BUCKET_COUNT {
            histogram.add_bucket(index, index as u64 + 1);
        }
        histogram.add_sum_ns(5_000_000_000);
        let sample = Sample {
            name: "vigil_syscall_latency_seconds",
            labels: labels(&[("syscall", "read")]),
            value: SampleValue::Histogram(histogram.snapshot()),
        };
        let batch = BatchEncoder::new(1).encode(1, 0, std::slice::from_ref(&sample), &[]);
        assert_eq!(batch.series[0].r#type, MetricType::Histogram as i32);
        let wire = &batch.histograms[0];
        assert_eq!(wire.count, histogram.count());
        assert_eq!(wire.sum_seconds, 5.0);
        assert_eq!(wire.bucket_index_deltas.len(), wire.bucket_counts.len());
        let mut rebuilt = vec![0u64; BUCKET_COUNT];
        let mut index = 0usize;
        for (delta, count) in wire.bucket_index_deltas.iter().zip(&wire.bucket_counts) {
            index += *delta as usize;
            rebuilt[index] += count;
        }
        assert_eq!(&rebuilt[..], &histogram.bucket_counts()[..]);
    }

    #[test]
    fn sparse_histograms_list_only_non_empty_buckets() {
        let mut histogram = LatencyHistogram::default();
        histogram.record(100);
        histogram.record(100);
        histogram.record(2_000_000);
        histogram.record(200_000_000_000); // overflow
        let (deltas, counts) = sparse_buckets(&histogram.snapshot());
        let first = bucket_index(100);
        let second = bucket_index(2_000_000);
        assert_eq!(
            deltas,
            [
                first as u32,
                (second - first) as u32,
                (OVERFLOW_BUCKET - second) as u32
            ]
        );
        assert_eq!(counts, [2, 1, 1]);
        assert_eq!(
            sparse_buckets(&LatencyHistogram::default().snapshot()),
            (vec![], vec![])
        );
    }

    #[test]
    fn event_times_are_deltas_from_the_batch_base_time() {
        let event = Event {
            time: "2026-11-29T01:00:00.250Z".to_string(),
            kind: "process_exited",
            labels: labels(&[("pid", "42")]),
            message: "exited with 0".to_string(),
        };
        let base = 1_795_914_000_000; // 2026-11-29T01:00:00Z
        let batch = BatchEncoder::new(1).encode(1, base, &[], &[event]);
        assert_eq!(batch.events[0].time_delta_ms, 250);
        assert_eq!(batch.events[0].kind, "process_exited");
        assert_eq!(batch.events[0].labels[0].name, "pid");
    }

    #[test]
    fn series_unused_for_an_hour_are_forgotten_and_come_back_with_a_new_id() {
        let mut encoder = BatchEncoder::new(1);
        let gone = [value("vigil_a", &[("pid", "1")], 1.0)];
        let stays = [value("vigil_b", &[], 1.0)];
        encoder.encode(1, 0, &gone, &[]);
        // Forgetting happens every FORGET_AFTER_PASSES / 6 passes.
        for sequence in 2..=2 * FORGET_AFTER_PASSES {
            encoder.encode(sequence, 0, &stays, &[]);
        }
        let back = encoder.encode(2 * FORGET_AFTER_PASSES + 1, 0, &gone, &[]);
        assert_eq!(back.series.len(), 1);
        assert_eq!(back.series[0].id, 3, "ids are never reused");
    }
}
