//! Admission of one batch: checks every declaration, sample, histogram and event, drops the bad
//! ones (each with a [`Rejection`] that says why), appends the rest to the write-ahead log and
//! applies it to the store, all under the store's lock so batches of one agent instance are
//! stored in one order and resends are recognised.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use vigil_agent_common::histogram::BUCKET_COUNT;
use vigil_proto::v1::{Batch, Event, Histogram, Rejection, Sample, Series, rejection::Reason};

use super::counters::IngestCounters;
use crate::storage::{
    Lsn, MetricKind, Store, Wal, WalError, WalRecord,
    store::{InstanceState, SeriesKey, StoreState},
};

/// Most series ids one Rejection lists; its count covers all.
const MAX_IDS_PER_REJECTION: usize = 1000;

/// What the ingest path accepts (from `[limits]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_series_per_node: usize,
    pub retention_ms: i64,
    pub max_future_skew_ms: i64,
}

impl Limits {
    pub fn from_config(limits: &crate::config::LimitsConfig) -> Limits {
        Limits {
            max_series_per_node: limits.max_series_per_node,
            retention_ms: limits.retention.as_millis() as i64,
            max_future_skew_ms: limits.max_future_skew.as_millis() as i64,
        }
    }
}

/// The outcome of one batch.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Appended to the log as record `lsn`: ack `sequence` once that is durable, after sending
    /// the rejections.
    Stored {
        sequence: u64,
        lsn: Lsn,
        rejections: Vec<Rejection>,
    },
    /// A resend of a stored batch: ack it once the original (`lsn`) is durable.
    Duplicate { sequence: u64, lsn: Lsn },
    /// Nothing stored, nothing to ack.
    Refused { rejections: Vec<Rejection> },
}

/// The agent instance a stream writes for.
pub(crate) struct Writer<'a> {
    pub node: &'a str,
    pub agent_instance: &'a str,
}

pub(crate) fn admit(
    store: &Store,
    wal: &Wal,
    counters: &IngestCounters,
    limits: &Limits,
    writer: &Writer<'_>,
    batch: Batch,
    now_ms: i64,
) -> Result<Admission, WalError> {
    wal.durable_through()?;
    Ok(admit_with(
        store,
        counters,
        limits,
        writer,
        batch,
        now_ms,
        |record| wal.append(record),
    ))
}

/// What [`admit_batch`] did with a batch: [`Admission`] without the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Stored; `record` is what the ingest path appends to the write-ahead log.
    Stored {
        sequence: u64,
        record: WalRecord,
        rejections: Vec<Rejection>,
    },
    /// A resend of a stored batch: not stored again.
    Duplicate { sequence: u64 },
    /// Nothing stored.
    Refused { rejections: Vec<Rejection> },
}

/// Admits one batch of `node`'s `agent_instance` into `store` exactly as the ingest stream
/// does, but without a write-ahead log (no disk, no fsync): the record it would append is
/// returned instead. For the fuzz targets (`aggregator/fuzz/`) and tests.
pub fn admit_batch(
    store: &Store,
    counters: &IngestCounters,
    limits: &Limits,
    node: &str,
    agent_instance: &str,
    batch: Batch,
    now_ms: i64,
) -> Outcome {
    let writer = Writer {
        node,
        agent_instance,
    };
    let mut appended = None;
    let admission = admit_with(store, counters, limits, &writer, batch, now_ms, |record| {
        appended = Some(record.clone());
        Lsn::default()
    });
    match admission {
        Admission::Stored {
            sequence,
            rejections,
            ..
        } => Outcome::Stored {
            sequence,
            record: appended.expect("a stored batch is appended"),
            rejections,
        },
        Admission::Duplicate { sequence, .. } => Outcome::Duplicate { sequence },
        Admission::Refused { rejections } => Outcome::Refused { rejections },
    }
}

/// Applies a record read back from the write-ahead log to `store`, as the aggregator does at
/// startup (`server::start`).
pub fn apply_replayed(store: &Store, record: &WalRecord) {
    store.lock().replay(record);
}

/// [`admit`] after the log check: `append` puts the record into the log (under the store's
/// lock) and returns its [`Lsn`].
fn admit_with(
    store: &Store,
    counters: &IngestCounters,
    limits: &Limits,
    writer: &Writer<'_>,
    mut batch: Batch,
    now_ms: i64,
    append: impl FnOnce(&WalRecord) -> Lsn,
) -> Admission {
    if batch.sequence == 0 {
        IngestCounters::add(&counters.batches_malformed, 1);
        return Admission::Refused {
            rejections: vec![Rejection {
                sequence: 0,
                reason: Reason::Malformed as i32,
                message: "batch sequence 0: sequences start at 1 per agent instance; nothing of \
                          this batch was stored"
                    .into(),
                series_ids: Vec::new(),
                rejected_samples: (batch.samples.len()
                    + batch.histograms.len()
                    + batch.events.len()) as u32,
            }],
        };
    }
    let mut state = store.lock();
    if let Some(instance) = state.instance(writer.node, writer.agent_instance)
        && batch.sequence <= instance.high_water
    {
        IngestCounters::add(&counters.batches_duplicate, 1);
        return Admission::Duplicate {
            sequence: batch.sequence,
            lsn: instance.last_lsn,
        };
    }

    let mut check = BatchCheck {
        state: &state,
        instance: state.instance(writer.node, writer.agent_instance),
        writer,
        limits,
        now_ms,
        base_time_ms: batch.base_time_ms,
        kinds: HashMap::new(),
        rejections: Rejections::default(),
    };
    let (series, refused_for_limit) = check.declarations(std::mem::take(&mut batch.series));
    let samples: Vec<Sample> = std::mem::take(&mut batch.samples)
        .into_iter()
        .filter(|sample| check.sample(sample))
        .collect();
    let histograms: Vec<Histogram> = std::mem::take(&mut batch.histograms)
        .into_iter()
        .filter(|histogram| check.histogram(histogram))
        .collect();
    let events: Vec<Event> = std::mem::take(&mut batch.events)
        .into_iter()
        .filter(|event| check.event(event))
        .collect();
    let rejections = check.rejections;

    let counts = [
        (&counters.series_declared, series.len()),
        (&counters.samples_stored, samples.len()),
        (&counters.histograms_stored, histograms.len()),
        (&counters.events_stored, events.len()),
        (&counters.batches_stored, 1),
    ];
    for (reason, tally) in &rejections.by_reason {
        let counter = match Reason::try_from(*reason) {
            Ok(Reason::InvalidValue) => &counters.rejected_invalid_value,
            Ok(Reason::FutureTimestamp) => &counters.rejected_future_timestamp,
            Ok(Reason::TooOld) => &counters.rejected_too_old,
            Ok(Reason::SeriesLimit) => &counters.rejected_series_limit,
            Ok(Reason::UnknownSeries) => &counters.rejected_unknown_series,
            _ => &counters.rejected_malformed,
        };
        IngestCounters::add(counter, u64::from(tally.rejected));
    }
    for (counter, n) in counts {
        IngestCounters::add(counter, n as u64);
    }

    let record = WalRecord {
        node: writer.node.to_owned(),
        agent_instance: writer.agent_instance.to_owned(),
        batch: Some(Batch {
            sequence: batch.sequence,
            series,
            base_time_ms: batch.base_time_ms,
            samples,
            histograms,
            events,
            delta: None,
        }),
    };
    let lsn = append(&record);
    state.apply(&record, lsn);
    state.remember_refused(
        writer.node,
        writer.agent_instance,
        refused_for_limit,
        limits.max_series_per_node,
    );
    Admission::Stored {
        sequence: batch.sequence,
        lsn,
        rejections: rejections.into_messages(batch.sequence),
    }
}

/// The checks of one batch against the store as it is.
struct BatchCheck<'a> {
    state: &'a StoreState,
    /// The writer's agent instance as stored (looked up once: every sample needs it).
    instance: Option<&'a InstanceState>,
    writer: &'a Writer<'a>,
    limits: &'a Limits,
    now_ms: i64,
    base_time_ms: i64,
    /// Series declared in this batch: their kind, or why their samples are rejected.
    kinds: HashMap<u64, Result<MetricKind, Reason>>,
    rejections: Rejections,
}

impl BatchCheck<'_> {
    /// Accepted declarations, and the ids refused for the node's series limit.
    fn declarations(&mut self, declarations: Vec<Series>) -> (Vec<Series>, Vec<u64>) {
        let instance = self.instance;
        let stored_count = self.state.series_count(self.writer.node);
        // New series of this batch (neither stored nor refused), with their kind.
        let mut new_keys: HashMap<SeriesKey, MetricKind> = HashMap::new();
        let mut keys_in_batch: HashMap<u64, SeriesKey> = HashMap::new();
        let mut accepted = Vec::new();
        let mut refused_for_limit = Vec::new();
        for declaration in declarations {
            let id = declaration.id;
            let kind = match check_declaration(&declaration) {
                Ok(kind) => kind,
                Err(why) => {
                    self.reject_declaration(id, Reason::Malformed, || {
                        format!("series {id} ({}): {why}", declaration.name)
                    });
                    continue;
                }
            };
            let key = SeriesKey::of_declaration(self.writer.node, &declaration);
            let earlier = keys_in_batch.get(&id).cloned().or_else(|| {
                let stored = instance?.ids.get(&id)?;
                let series = self.state.series(*stored);
                Some(SeriesKey::new(
                    &series.node,
                    &series.name,
                    series.labels.clone(),
                ))
            });
            if let Some(earlier) = earlier
                && earlier != key
            {
                self.reject_declaration(id, Reason::Malformed, || {
                    format!(
                        "series id {id} is already declared for another name or label set; \
                         ids are never reused within an agent instance"
                    )
                });
                continue;
            }
            // The kind the series already has: stored, or declared earlier in this batch
            // (under this id or another). A repeated declaration must keep it too.
            let known_kind = new_keys
                .get(&key)
                .copied()
                .or_else(|| Some(self.state.series_by_key(&key)?.kind));
            if let Some(known_kind) = known_kind {
                if known_kind != kind {
                    self.reject_declaration(id, Reason::Malformed, || {
                        format!(
                            "series {id} ({}) is declared {kind:?}, but node {} already has it \
                             as {known_kind:?}",
                            declaration.name, self.writer.node
                        )
                    });
                    continue;
                }
            } else {
                if stored_count + new_keys.len() >= self.limits.max_series_per_node {
                    let limit = self.limits.max_series_per_node;
                    self.reject_declaration(id, Reason::SeriesLimit, || {
                        format!(
                            "series {id} ({}): node {} has {limit} series, its limit \
                             (limits.max_series_per_node); reduce label cardinality or raise \
                             the limit",
                            declaration.name, self.writer.node
                        )
                    });
                    refused_for_limit.push(id);
                    continue;
                }
                new_keys.insert(key.clone(), kind);
            }
            keys_in_batch.insert(id, key);
            self.kinds.insert(id, Ok(kind));
            accepted.push(declaration);
        }
        (accepted, refused_for_limit)
    }

    fn reject_declaration(&mut self, id: u64, reason: Reason, why: impl FnOnce() -> String) {
        if !matches!(self.kinds.get(&id), Some(Ok(_))) {
            self.kinds.insert(id, Err(reason));
        }
        self.rejections.add(reason, Some(id), 0, why);
    }

    /// The kind of the series `id`, or why its samples are rejected.
    fn kind_of(&self, id: u64) -> Result<MetricKind, Reason> {
        // Most batches declare nothing: skip hashing into an empty map.
        if !self.kinds.is_empty()
            && let Some(kind) = self.kinds.get(&id)
        {
            return *kind;
        }
        match self.instance {
            Some(instance) => match instance.ids.get(&id) {
                Some(stored) => Ok(self.state.series(*stored).kind),
                None if instance.refused.contains(&id) => Err(Reason::SeriesLimit),
                None => Err(Reason::UnknownSeries),
            },
            None => Err(Reason::UnknownSeries),
        }
    }

    /// Rejects a sample of a series that cannot take it; `true` when the series is usable.
    fn series_accepts(&mut self, id: u64, expected: &[MetricKind], what: &str) -> bool {
        match self.kind_of(id) {
            Ok(kind) if expected.contains(&kind) => true,
            Ok(kind) => {
                self.rejections.add(Reason::Malformed, Some(id), 1, || {
                    format!("a {what} for series {id}, which is declared {kind:?}")
                });
                false
            }
            Err(Reason::UnknownSeries) => {
                self.rejections.add(Reason::UnknownSeries, Some(id), 1, || {
                    format!(
                        "series id {id} was never declared for agent instance {}; declare the \
                         series again (id, name, labels, type) and resend",
                        self.writer.agent_instance
                    )
                });
                false
            }
            Err(reason) => {
                self.rejections.add(reason, Some(id), 1, || {
                    format!("series {id}: its declaration was rejected (see above)")
                });
                false
            }
        }
    }

    /// Rejects a time outside `[now - retention, now + skew]`; `true` when it is inside.
    fn time_ok(&mut self, delta_ms: i64, series: Option<u64>, what: &str) -> bool {
        let Some(time_ms) = self.base_time_ms.checked_add(delta_ms) else {
            self.rejections.add(Reason::Malformed, series, 1, || {
                format!("a {what} whose time (base_time_ms + delta) overflows")
            });
            return false;
        };
        if time_ms > self.now_ms.saturating_add(self.limits.max_future_skew_ms) {
            let ahead = time_ms - self.now_ms;
            self.rejections.add(Reason::FutureTimestamp, series, 1, || {
                format!(
                    "a {what} {ahead} ms ahead of the aggregator's clock (limit {} ms); check the \
                     node's clock (NTP)",
                    self.limits.max_future_skew_ms
                )
            });
            return false;
        }
        if time_ms < self.now_ms.saturating_sub(self.limits.retention_ms) {
            let age = self.now_ms.saturating_sub(time_ms);
            self.rejections.add(Reason::TooOld, series, 1, || {
                format!(
                    "a {what} {age} ms old, older than the retention ({} ms, limits.retention)",
                    self.limits.retention_ms
                )
            });
            return false;
        }
        true
    }

    fn sample(&mut self, sample: &Sample) -> bool {
        let id = sample.series_id;
        if !self.series_accepts(
            id,
            &[MetricKind::Gauge, MetricKind::Counter],
            "plain sample",
        ) {
            return false;
        }
        if !self.time_ok(sample.time_delta_ms, Some(id), "sample") {
            return false;
        }
        // Gauges may be NaN or infinite, as in Prometheus; a counter is a finite running total.
        let kind = self.kind_of(id);
        let value = sample.value;
        if kind == Ok(MetricKind::Counter) && !(value.is_finite() && value >= 0.0) {
            self.rejections.add(Reason::InvalidValue, Some(id), 1, || {
                format!("counter series {id} has value {value}: counters must be finite and non-negative")
            });
            return false;
        }
        true
    }

    fn histogram(&mut self, histogram: &Histogram) -> bool {
        let id = histogram.series_id;
        if !self.series_accepts(id, &[MetricKind::Histogram], "histogram") {
            return false;
        }
        if let Err(why) = check_buckets(histogram) {
            self.rejections.add(Reason::Malformed, Some(id), 1, || {
                format!("histogram of series {id}: {why}")
            });
            return false;
        }
        if !self.time_ok(histogram.time_delta_ms, Some(id), "histogram") {
            return false;
        }
        let sum = histogram.sum_seconds;
        if !(sum.is_finite() && sum >= 0.0) {
            self.rejections.add(Reason::InvalidValue, Some(id), 1, || {
                format!("histogram of series {id} has sum_seconds {sum}: it must be finite and non-negative")
            });
            return false;
        }
        true
    }

    fn event(&mut self, event: &Event) -> bool {
        if event.kind.is_empty() {
            self.rejections.add(Reason::Malformed, None, 1, || {
                "an event without a kind".to_string()
            });
            return false;
        }
        self.time_ok(event.time_delta_ms, None, "event")
    }
}

/// A declaration's kind, or what is wrong with it.
fn check_declaration(series: &Series) -> Result<MetricKind, String> {
    let kind = MetricKind::from_wire(series.r#type).ok_or_else(|| {
        format!(
            "metric type {} is not one this aggregator knows (GAUGE, COUNTER, HISTOGRAM)",
            series.r#type
        )
    })?;
    if !is_metric_name(&series.name) {
        return Err("not a valid metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)".into());
    }
    let mut names = HashSet::new();
    for label in &series.labels {
        if !is_label_name(&label.name) || label.name.starts_with("__") {
            return Err(format!(
                "label name {:?} is not valid ([a-zA-Z_][a-zA-Z0-9_]*, no leading __)",
                label.name
            ));
        }
        if !names.insert(label.name.as_str()) {
            return Err(format!("label {:?} appears twice", label.name));
        }
    }
    Ok(kind)
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The sparse buckets must pair up, ascend, stay below BUCKET_COUNT and add up to `count`.
fn check_buckets(histogram: &Histogram) -> Result<(), String> {
    let deltas = &histogram.bucket_index_deltas;
    let counts = &histogram.bucket_counts;
    if deltas.len() != counts.len() {
        return Err(format!(
            "{} bucket index deltas but {} bucket counts",
            deltas.len(),
            counts.len()
        ));
    }
    let mut index = 0u64;
    let mut total = 0u64;
    for (k, (delta, count)) in deltas.iter().zip(counts).enumerate() {
        if k > 0 && *delta == 0 {
            return Err(format!("bucket {index} is listed twice"));
        }
        index += u64::from(*delta);
        if index >= BUCKET_COUNT as u64 {
            return Err(format!(
                "bucket index {index} is beyond the last bucket ({})",
                BUCKET_COUNT - 1
            ));
        }
        total = total
            .checked_add(*count)
            .ok_or_else(|| "bucket counts overflow".to_string())?;
    }
    if total != histogram.count {
        return Err(format!(
            "count is {} but the buckets hold {total}",
            histogram.count
        ));
    }
    Ok(())
}

/// Rejections of one batch, one per reason.
#[derive(Default)]
struct Rejections {
    by_reason: BTreeMap<i32, Tally>,
}

#[derive(Default)]
struct Tally {
    series_ids: BTreeSet<u64>,
    rejected: u32,
    first: String,
}

impl Rejections {
    fn add(
        &mut self,
        reason: Reason,
        series: Option<u64>,
        rejected: u32,
        why: impl FnOnce() -> String,
    ) {
        let tally = self.by_reason.entry(reason as i32).or_default();
        if tally.first.is_empty() {
            tally.first = why();
        }
        tally.rejected = tally.rejected.saturating_add(rejected);
        if let Some(id) = series
            && tally.series_ids.len() < MAX_IDS_PER_REJECTION
        {
            tally.series_ids.insert(id);
        }
    }

    fn into_messages(self, sequence: u64) -> Vec<Rejection> {
        self.by_reason
            .into_iter()
            .map(|(reason, tally)| Rejection {
                sequence,
                reason,
                message: format!(
                    "{} rejected in batch {sequence}, the rest is stored; first: {}",
                    match tally.rejected {
                        0 => "series declarations".to_string(),
                        1 => "1 sample".to_string(),
                        n => format!("{n} samples"),
                    },
                    tally.first
                ),
                series_ids: tally.series_ids.into_iter().collect(),
                rejected_samples: tally.rejected,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::PointValue;
    use vigil_proto::v1::{Histogram, MetricType};

    const NOW_MS: i64 = 1_767_225_600_000;
    const LIMITS: Limits = Limits {
        max_series_per_node: 100,
        retention_ms: 15 * 24 * 3600 * 1000,
        max_future_skew_ms: 5 * 60 * 1000,
    };

    fn declare(id: u64, name: &str, metric_type: MetricType) -> Series {
        Series {
            id,
            name: name.into(),
            labels: Vec::new(),
            r#type: metric_type as i32,
        }
    }

    fn sample(series_id: u64, value: f64) -> Sample {
        Sample {
            series_id,
            time_delta_ms: 0,
            value,
        }
    }

    fn admit_one(store: &Store, sequence: u64, series: Vec<Series>, samples: Vec<Sample>) {
        let batch = Batch {
            sequence,
            series,
            base_time_ms: NOW_MS,
            samples,
            ..Batch::default()
        };
        let counters = IngestCounters::default();
        let outcome = admit_batch(
            store, &counters, &LIMITS, "node-a", "spool-1", batch, NOW_MS,
        );
        assert!(matches!(outcome, Outcome::Stored { .. }), "{outcome:?}");
    }

    /// Every stored point fits the kind of its series.
    fn assert_points_fit_kinds(store: &Store) {
        for series in store.series() {
            for point in store.samples_of(series.id) {
                let fits = match (&point.value, series.kind) {
                    (PointValue::Value(_), MetricKind::Gauge) => true,
                    (PointValue::Value(v), MetricKind::Counter) => v.is_finite() && *v >= 0.0,
                    (PointValue::Histogram(_), MetricKind::Histogram) => true,
                    _ => false,
                };
                assert!(fits, "{series:?}: {point:?}");
            }
        }
    }

    /// Found by `cargo fuzz run batch` (aggregator/fuzz/): a series stored as a histogram,
    /// declared again under its id as a counter, took plain samples (and a gauge redeclared
    /// from a counter took negative ones), because a repeated declaration's type was not
    /// checked.
    #[test]
    fn a_repeated_declaration_must_keep_the_stored_type() {
        let store = Store::new();
        admit_one(
            &store,
            1,
            vec![
                declare(1, "latency_seconds", MetricType::Histogram),
                declare(2, "errors_total", MetricType::Counter),
            ],
            vec![sample(2, 1.0)],
        );
        admit_one(
            &store,
            2,
            vec![
                declare(1, "latency_seconds", MetricType::Counter),
                declare(2, "errors_total", MetricType::Gauge),
            ],
            vec![sample(1, 540.0), sample(2, -3.0)],
        );
        assert_points_fit_kinds(&store);
        let kinds: Vec<_> = store.series().iter().map(|s| s.kind).collect();
        assert_eq!(kinds, [MetricKind::Histogram, MetricKind::Counter]);
        assert_eq!(store.samples_of(store.series()[0].id), []);
        assert_eq!(store.samples_of(store.series()[1].id).len(), 1);
    }

    #[test]
    fn one_batch_cannot_declare_a_series_with_two_types() {
        let store = Store::new();
        let counters = IngestCounters::default();
        let batch = Batch {
            sequence: 1,
            series: vec![
                declare(1, "power_watts", MetricType::Counter),
                declare(2, "power_watts", MetricType::Gauge),
                declare(3, "temp_celsius", MetricType::Gauge),
                declare(3, "temp_celsius", MetricType::Histogram),
            ],
            base_time_ms: NOW_MS,
            samples: vec![sample(1, 5.0), sample(2, -1.0), sample(3, 40.0)],
            ..Batch::default()
        };
        let Outcome::Stored { rejections, .. } = admit_batch(
            &store, &counters, &LIMITS, "node-a", "spool-1", batch, NOW_MS,
        ) else {
            panic!("the batch is stored");
        };
        assert_points_fit_kinds(&store);
        assert_eq!(rejections.len(), 1, "{rejections:?}");
        assert_eq!(rejections[0].reason, Reason::Malformed as i32);
        assert_eq!(rejections[0].series_ids, [2, 3]);
        assert_eq!(rejections[0].rejected_samples, 1);
        let stored: Vec<_> = store
            .series()
            .iter()
            .map(|s| (s.name.clone(), s.kind, store.samples_of(s.id).len()))
            .collect();
        assert_eq!(
            stored,
            [
                ("power_watts".to_string(), MetricKind::Counter, 1),
                ("temp_celsius".to_string(), MetricKind::Gauge, 1),
            ]
        );
    }

    fn histogram(deltas: &[u32], counts: &[u64], count: u64) -> Histogram {
        Histogram {
            bucket_index_deltas: deltas.to_vec(),
            bucket_counts: counts.to_vec(),
            count,
            ..Histogram::default()
        }
    }

    #[test]
    fn sparse_buckets_must_pair_ascend_fit_and_add_up() {
        assert_eq!(
            check_buckets(&histogram(&[3, 1, 10], &[1, 2, 3], 6)),
            Ok(())
        );
        assert_eq!(check_buckets(&histogram(&[], &[], 0)), Ok(()));
        let last = BUCKET_COUNT as u32 - 1;
        assert_eq!(check_buckets(&histogram(&[last], &[1], 1)), Ok(()));
        for (bad, why) in [
            (
                histogram(&[3, 1], &[1], 1),
                "2 bucket index deltas but 1 bucket counts",
            ),
            (histogram(&[3, 0], &[1, 1], 2), "bucket 3 is listed twice"),
            (histogram(&[last + 1], &[1], 1), "beyond the last bucket"),
            (
                histogram(&[1, 2], &[1, 1], 3),
                "count is 3 but the buckets hold 2",
            ),
        ] {
            let error = check_buckets(&bad).unwrap_err();
            assert!(error.contains(why), "{error}");
        }
    }

    #[test]
    fn names_follow_prometheus() {
        assert!(is_metric_name("vigil_gpu_power_watts"));
        assert!(is_metric_name("ns:rule_total"));
        assert!(!is_metric_name("9lives"));
        assert!(!is_metric_name(""));
        assert!(!is_metric_name("a-b"));
        assert!(is_label_name("gpu"));
        assert!(!is_label_name("gpu:index"));
    }
}
