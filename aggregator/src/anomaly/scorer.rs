//! Scores chosen series as they are ingested and records the result as
//! `vigil_anomaly_score{metric="<scored name>", node=..., <the series' labels>}`, so rules
//! alert on it like on anything else (packaging/rules: `VigilAnomaly`).
//!
//! The store hands every stored batch to [`ScorerSink`] (an [`IngestSink`]), which only
//! passes it on through a bounded channel (a full channel drops the batch and counts it:
//! ingest never waits for scoring). A thread of its own keeps one [`Detector`] per scored
//! series (at most `anomaly.max_series`; ~700 bytes each), feeds it each new value — for
//! counters, the per-second rate between consecutive values, restarting after a reset — and
//! every `anomaly.interval` writes, per series that had values, the highest score of the
//! interval (so a one-sample spike is not lost between writes) through the same path rule
//! results take (write-ahead log, then store).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, Instant},
};

use serde::Deserialize;
use tokio::sync::watch;

use super::{Detector, DetectorConfig};
use crate::{
    alerting::SampleWriter,
    http::metrics::Exposition,
    query::{Labels, Matcher, parse_selector},
    storage::{IngestSink, IngestedBatch, MetricKind, PointValue, SeriesRef, StoredSeries},
};

/// The scored series' metric.
pub const SCORE_METRIC: &str = "vigil_anomaly_score";
/// Batches waiting for the scoring thread before new ones are dropped.
const CHANNEL_BATCHES: usize = 4096;

/// `[anomaly]` in the aggregator config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    /// Score series at all (default true).
    pub enabled: bool,
    /// PromQL series selectors of the series to score. Gauges are scored as they are,
    /// counters by their per-second rate; histograms are not scored.
    pub series: Vec<String>,
    /// How often scores are written (default 10 s); each is the highest of its interval.
    #[serde(deserialize_with = "crate::config::human_duration")]
    pub interval: Duration,
    /// Series scored at most (default 10,000); more are counted, not scored.
    pub max_series: usize,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            enabled: true,
            series: [
                "vigil_gpu_utilization_ratio",
                "vigil_gpu_temperature_celsius",
                "vigil_gpu_power_watts",
                "vigil_gpu_memory_used_bytes",
                "vigil_process_cpu_seconds_total",
                "vigil_process_resident_memory_bytes",
                "vigil_host_pressure_cpu_some_seconds_total",
                "vigil_host_pressure_memory_some_seconds_total",
            ]
            .map(String::from)
            .to_vec(),
            interval: Duration::from_secs(10),
            max_series: 10_000,
        }
    }
}

/// What the scorer has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct ScorerStats {
    pub series_scored: AtomicU64,
    pub series_over_limit: AtomicU64,
    pub samples_scored: AtomicU64,
    pub batches_dropped: AtomicU64,
    pub anomalous_now: AtomicU64,
    pub write_errors: AtomicU64,
}

impl ScorerStats {
    /// Prometheus text exposition of these counters.
    pub fn write_metrics(&self, out: &mut String) {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut text = Exposition::default();
        text.gauge(
            "vigil_anomaly_scored_series",
            "Series with an anomaly detector.",
            get(&self.series_scored) as f64,
        );
        text.gauge(
            "vigil_anomaly_series_over_limit",
            "Matching series not scored because anomaly.max_series was reached.",
            get(&self.series_over_limit) as f64,
        );
        text.counter(
            "vigil_anomaly_scored_samples_total",
            "Values fed to anomaly detectors.",
            get(&self.samples_scored),
        );
        text.counter(
            "vigil_anomaly_dropped_batches_total",
            "Stored batches the scorer could not keep up with and skipped.",
            get(&self.batches_dropped),
        );
        text.gauge(
            "vigil_anomaly_anomalous_series",
            "Series whose last written score was 1 or more.",
            get(&self.anomalous_now) as f64,
        );
        text.counter(
            "vigil_anomaly_write_errors_total",
            "Score writes the write-ahead log refused.",
            get(&self.write_errors),
        );
        out.push_str(&text.finish());
    }
}

/// The ingest sink: hands batches to the scoring thread without waiting.
pub struct ScorerSink {
    sender: SyncSender<Arc<IngestedBatch>>,
    stats: Arc<ScorerStats>,
}

impl IngestSink for ScorerSink {
    fn on_ingested(&self, batch: &Arc<IngestedBatch>) {
        match self.sender.try_send(batch.clone()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.stats.batches_dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The scorer stopped (shutdown): nothing to do.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// Parses the configured selectors; the error names the bad one.
pub fn parse_selectors(config: &AnomalyConfig) -> Result<Vec<Vec<Matcher>>, String> {
    config
        .series
        .iter()
        .map(|text| {
            parse_selector(text).map_err(|error| {
                format!("anomaly.series {text:?} is not a series selector: {error}")
            })
        })
        .collect()
}

/// Starts the scoring thread; `None` when scoring is disabled or no series are chosen.
pub fn start(
    config: &AnomalyConfig,
    writer: Arc<SampleWriter>,
    stats: Arc<ScorerStats>,
    shutdown: watch::Receiver<bool>,
) -> Result<Option<Arc<ScorerSink>>, String> {
    if !config.enabled || config.series.is_empty() {
        return Ok(None);
    }
    let selectors = parse_selectors(config)?;
    if config.interval < Duration::from_secs(1) {
        return Err(format!(
            "anomaly.interval {:?} is below 1s",
            config.interval
        ));
    }
    let (sender, receiver) = sync_channel(CHANNEL_BATCHES);
    let mut scorer = Scorer {
        selectors,
        max_series: config.max_series,
        matched: HashMap::new(),
        scored: Vec::new(),
        stats: stats.clone(),
    };
    let interval = config.interval;
    std::thread::Builder::new()
        .name("vigil-anomaly".into())
        .spawn(move || scorer.run(receiver, interval, &writer, shutdown))
        .map_err(|error| format!("cannot start the anomaly scorer thread: {error}"))?;
    Ok(Some(Arc::new(ScorerSink { sender, stats })))
}

/// One scored series.
struct Scored {
    /// The labels its score is written with.
    score_labels: Labels,
    counter: bool,
    detector: Detector,
    /// The last counter value (time in seconds, value), for rates.
    previous: Option<(f64, f64)>,
    /// The highest score since the last write, and the time of the last value.
    pending: Option<f64>,
}

struct Scorer {
    selectors: Vec<Vec<Matcher>>,
    max_series: usize,
    /// Per stored series: its index in `scored`, or `None` when it is not scored.
    matched: HashMap<SeriesRef, Option<usize>>,
    scored: Vec<Scored>,
    stats: Arc<ScorerStats>,
}

impl Scorer {
    fn run(
        &mut self,
        receiver: Receiver<Arc<IngestedBatch>>,
        interval: Duration,
        writer: &SampleWriter,
        shutdown: watch::Receiver<bool>,
    ) {
        let mut next_write = Instant::now() + interval;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let wait = next_write.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(wait.min(Duration::from_millis(500))) {
                Ok(batch) => self.observe(&batch),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if Instant::now() >= next_write {
                next_write += interval;
                let now_ms = crate::alerting::manager::now_ms();
                let samples = self.take_scores();
                if !samples.is_empty() && writer.write(now_ms, now_ms, samples).is_err() {
                    self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The index of a series' detector, creating it when the series matches (and there is
    /// room).
    fn slot(&mut self, series: &StoredSeries) -> Option<usize> {
        if let Some(slot) = self.matched.get(&series.id) {
            return *slot;
        }
        let slot = self.new_slot(series);
        self.matched.insert(series.id, slot);
        slot
    }

    fn new_slot(&mut self, series: &StoredSeries) -> Option<usize> {
        if series.kind == MetricKind::Histogram || series.name == SCORE_METRIC {
            return None;
        }
        let mut labels: Labels = Vec::with_capacity(series.labels.len() + 2);
        labels.push(("__name__".to_owned(), series.name.clone()));
        labels.push(("node".to_owned(), series.node.clone()));
        labels.extend(series.labels.iter().cloned());
        labels.sort();
        let matches = self
            .selectors
            .iter()
            .any(|matchers| matchers.iter().all(|m| m.matches_labels(&labels)));
        if !matches {
            return None;
        }
        if self.scored.len() >= self.max_series {
            self.stats.series_over_limit.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut score_labels: Labels = labels
            .into_iter()
            .filter(|(name, _)| name != "__name__")
            .collect();
        score_labels.push(("__name__".to_owned(), SCORE_METRIC.to_owned()));
        score_labels.push(("metric".to_owned(), series.name.clone()));
        score_labels.sort();
        self.scored.push(Scored {
            score_labels,
            counter: series.kind == MetricKind::Counter,
            detector: Detector::new(DetectorConfig::default()),
            previous: None,
            pending: None,
        });
        self.stats
            .series_scored
            .store(self.scored.len() as u64, Ordering::Relaxed);
        Some(self.scored.len() - 1)
    }

    fn observe(&mut self, batch: &IngestedBatch) {
        for (series, point) in &batch.points {
            let PointValue::Value(value) = point.value else {
                continue;
            };
            let Some(slot) = self.slot(series) else {
                continue;
            };
            let scored = &mut self.scored[slot];
            let time_s = point.time_ms as f64 / 1000.0;
            let input = if scored.counter {
                let previous = scored.previous.replace((time_s, value));
                match previous {
                    // A reset (the process restarted): start over from this value.
                    Some((before_s, before)) if time_s > before_s && value >= before => {
                        (value - before) / (time_s - before_s)
                    }
                    _ => continue,
                }
            } else {
                value
            };
            if let Some(observation) = scored.detector.observe(time_s, input) {
                self.stats.samples_scored.fetch_add(1, Ordering::Relaxed);
                let highest = scored.pending.unwrap_or(0.0).max(observation.score);
                scored.pending = Some(highest);
            }
        }
    }

    /// The highest score of the interval per series that had values, and clears them.
    fn take_scores(&mut self) -> Vec<(Labels, f64)> {
        let mut anomalous = 0;
        let scores: Vec<(Labels, f64)> = self
            .scored
            .iter_mut()
            .filter_map(|scored| {
                let score = scored.pending.take()?;
                if score >= 1.0 {
                    anomalous += 1;
                }
                Some((scored.score_labels.clone(), score))
            })
            .collect();
        self.stats.anomalous_now.store(anomalous, Ordering::Relaxed);
        scores
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Point;

    fn series(id: u64, name: &str, kind: MetricKind, labels: &[(&str, &str)]) -> Arc<StoredSeries> {
        Arc::new(StoredSeries {
            id: SeriesRef(id),
            node: "n1".into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            kind,
        })
    }

    fn scorer(selectors: &[&str], max_series: usize) -> Scorer {
        let config = AnomalyConfig {
            series: selectors.iter().map(|s| s.to_string()).collect(),
            max_series,
            ..AnomalyConfig::default()
        };
        Scorer {
            selectors: parse_selectors(&config).unwrap(),
            max_series,
            matched: HashMap::new(),
            scored: Vec::new(),
            stats: Arc::new(ScorerStats::default()),
        }
    }

    fn batch(points: Vec<(Arc<StoredSeries>, i64, f64)>) -> IngestedBatch {
        IngestedBatch {
            node: "n1".into(),
            agent_instance: "a".into(),
            points: points
                .into_iter()
                .map(|(series, time_ms, value)| {
                    (
                        series,
                        Point {
                            time_ms,
                            value: PointValue::Value(value),
                        },
                    )
                })
                .collect(),
            events: vec![],
        }
    }

    #[test]
    fn scores_matching_series_only_and_writes_the_interval_maximum() {
        let mut scorer = scorer(&[r#"vigil_gpu_temperature_celsius{gpu="0"}"#], 10);
        let gpu0 = series(
            1,
            "vigil_gpu_temperature_celsius",
            MetricKind::Gauge,
            &[("gpu", "0")],
        );
        let gpu1 = series(
            2,
            "vigil_gpu_temperature_celsius",
            MetricKind::Gauge,
            &[("gpu", "1")],
        );
        // Two hours of a steady 60 C with a little noise, then a jump to 95 C.
        let mut points = Vec::new();
        for i in 0..720i64 {
            let noise = ((i * 7919) % 11) as f64 / 10.0 - 0.5;
            points.push((gpu0.clone(), i * 10_000, 60.0 + noise));
            points.push((gpu1.clone(), i * 10_000, 60.0 + noise));
        }
        scorer.observe(&batch(points));
        let quiet = scorer.take_scores();
        assert_eq!(quiet.len(), 1, "only gpu 0 is scored: {quiet:?}");
        assert!(quiet[0].1 < 1.0, "{quiet:?}");
        assert!(
            quiet[0]
                .0
                .contains(&("metric".into(), "vigil_gpu_temperature_celsius".into()))
        );
        assert!(
            quiet[0]
                .0
                .contains(&("__name__".into(), SCORE_METRIC.into()))
        );
        assert!(quiet[0].0.contains(&("node".into(), "n1".into())));
        scorer.observe(&batch(vec![
            (gpu0.clone(), 7_200_000, 95.0),
            (gpu0.clone(), 7_210_000, 60.0),
        ]));
        let spiked = scorer.take_scores();
        assert!(
            spiked[0].1 >= 1.0,
            "the jump is kept as the interval's maximum: {spiked:?}"
        );
        assert!(
            scorer.take_scores().is_empty(),
            "nothing new, nothing written"
        );
    }

    #[test]
    fn counters_are_scored_by_rate_and_resets_restart_them() {
        let mut scorer = scorer(&["vigil_process_cpu_seconds_total"], 10);
        let cpu = series(
            1,
            "vigil_process_cpu_seconds_total",
            MetricKind::Counter,
            &[("pid", "7")],
        );
        let mut points = Vec::new();
        for i in 0..720i64 {
            points.push((cpu.clone(), i * 10_000, 1000.0 + i as f64 * 5.0));
        }
        // A restart: the counter starts again from 0; not a rate of minus thousands.
        points.push((cpu.clone(), 7_200_000, 3.0));
        points.push((cpu.clone(), 7_210_000, 8.0));
        scorer.observe(&batch(points));
        let scores = scorer.take_scores();
        assert!(scores[0].1 < 1.0, "{scores:?}");
        assert_eq!(scorer.stats.samples_scored.load(Ordering::Relaxed), 719 + 1);
    }

    #[test]
    fn the_series_bound_is_kept_and_counted() {
        let mut scorer = scorer(&["vigil_gpu_power_watts"], 2);
        let points = (0..5)
            .map(|i| {
                let gpu = i.to_string();
                (
                    series(
                        i,
                        "vigil_gpu_power_watts",
                        MetricKind::Gauge,
                        &[("gpu", &gpu)],
                    ),
                    0,
                    300.0,
                )
            })
            .collect();
        scorer.observe(&batch(points));
        assert_eq!(scorer.scored.len(), 2);
        assert_eq!(scorer.stats.series_over_limit.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn bad_selectors_are_refused_by_name() {
        let config = AnomalyConfig {
            series: vec!["rate(x[5m])".into()],
            ..AnomalyConfig::default()
        };
        let error = parse_selectors(&config).unwrap_err();
        assert!(error.contains("rate(x[5m])"), "{error}");
    }
}
