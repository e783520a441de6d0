//! Prometheus remote-write export: per `[[export.remote_write]]` target, an [`IngestSink`]
//! whose batches go through a durable on-disk [`Queue`] to the target's URL.
//!
//! Three parts per target, so that the store's lock is never held for disk or network:
//! - the sink ([`RemoteWriteExporter::on_ingested`]) hands the batch (an `Arc`) to a bounded
//!   channel and returns; when the channel is full the batch is dropped and counted;
//! - the queue-writer thread turns batches into remote-write time series, appends them to the
//!   queue and fsyncs it at least once a second (and when stopping);
//! - the sender task reads the queue oldest first, POSTs up to `max_samples_per_send` samples
//!   at a time and moves the queue's read position past what was accepted. Connection errors,
//!   timeouts, 5xx and 429 are retried with exponential backoff and jitter; any other answer
//!   outside 2xx (Prometheus answers out-of-order samples with 400) drops that request's
//!   samples with a counter and a warning naming the target and the answer.
//!
//! Series are exported as the query API shows them: `__name__`, `node` and the series'
//! labels; a histogram as classic cumulative `name_bucket{le}` series (with `le` from
//! [`le_label`]) plus `name_count` and `name_sum`. Events are not exported.

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc as std_mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode, Uri, header};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use prost::Message;
use tokio::sync::{Notify, watch};
use vigil_agent_common::histogram::OVERFLOW_BUCKET;

use super::{
    prompb::{self, Label, Sample, TimeSeries, WriteRequest},
    queue::{Peeked, Queue},
};
use crate::{
    config::RemoteWriteConfig,
    http::metrics::Exposition,
    storage::{IngestSink, IngestedBatch, PointValue, StoredSeries, query_view::le_label},
};

/// The queue reaches the disk at least this often.
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// Batches waiting for the queue writer; past this the sink drops (and counts) them.
const CHANNEL_BATCHES: usize = 4096;
/// How much of a refusing answer's body is kept for the warning.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Warnings about dropped samples are logged at most this often per target.
const DROP_WARNING_EVERY: Duration = Duration::from_secs(10);

/// Why an exporter cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("export.remote_write {target:?}: {message}")]
    Config { target: String, message: String },
    #[error("export.remote_write {target:?}: cannot read bearer_token_file {path}: {source}")]
    Token {
        target: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("export.remote_write {target:?}: cannot open its queue: {source}")]
    Queue {
        target: String,
        source: std::io::Error,
    },
    #[error("export.remote_write {target:?}: TLS setup: {message}")]
    Tls { target: String, message: String },
}

/// A target's counters, as `write_metrics` prints them.
#[derive(Debug, Default)]
struct Stats {
    queued: AtomicU64,
    sent: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    retries: AtomicU64,
    /// Milliseconds since the epoch of the last accepted send (0: none yet).
    last_send_ms: AtomicU64,
}

/// A snapshot of one target's telemetry.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExportStats {
    /// Samples appended to the queue.
    pub queued: u64,
    /// Samples the target accepted.
    pub sent: u64,
    /// Samples the target refused (4xx other than 429), dropped.
    pub failed: u64,
    /// Samples dropped before they were sent: queue or channel full, or a disk error.
    pub dropped: u64,
    /// Sends retried (connection errors, timeouts, 5xx, 429).
    pub retries: u64,
    /// Samples in the queue not yet sent.
    pub pending: u64,
    pub queue_bytes: u64,
    /// When the target last accepted a send, ms since the epoch (0: never).
    pub last_send_ms: u64,
}

enum ToWriter {
    Batch(Arc<IngestedBatch>),
    Stop,
}

/// State shared by the sink, the writer thread and the sender task.
struct Shared {
    config: RemoteWriteConfig,
    url: Uri,
    token: Option<String>,
    queue: Mutex<Queue>,
    stats: Stats,
    /// Woken by the writer after each append.
    appended: Notify,
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().expect("export queue lock poisoned")
    }
}

/// One remote-write target: register it as a sink of the store, then [`Self::stop`] it at
/// shutdown.
pub struct RemoteWriteExporter {
    shared: Arc<Shared>,
    to_writer: std_mpsc::SyncSender<ToWriter>,
    writer: Mutex<Option<JoinHandle<()>>>,
    sender: Mutex<Option<tokio::task::JoinHandle<()>>>,
    shutdown: watch::Sender<bool>,
}

impl RemoteWriteExporter {
    /// Opens the target's queue under `<data_dir>/export/<name>/` and starts its writer thread
    /// and its sender task (on the current tokio runtime). What was queued before a restart
    /// is sent first.
    pub fn start(
        config: &RemoteWriteConfig,
        data_dir: &Path,
    ) -> Result<Arc<RemoteWriteExporter>, ExportError> {
        let target = config.name.clone();
        config.check().map_err(|message| ExportError::Config {
            target: target.clone(),
            message,
        })?;
        let url: Uri = config.url.parse().map_err(|e| ExportError::Config {
            target: target.clone(),
            message: format!("url {:?}: {e}", config.url),
        })?;
        let token = match &config.bearer_token_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ExportError::Token {
                    target: target.clone(),
                    path: path.clone(),
                    source,
                })?;
                let token = text.trim().to_owned();
                if token.is_empty() {
                    return Err(ExportError::Config {
                        target,
                        message: format!("bearer_token_file {} is empty", path.display()),
                    });
                }
                Some(token)
            }
        };
        let dir = data_dir.join("export").join(&config.name);
        let (queue, report) =
            Queue::open(&dir, config.queue_max_bytes).map_err(|source| ExportError::Queue {
                target: target.clone(),
                source,
            })?;
        if report.pending_samples > 0 || report.cut_bytes > 0 {
            tracing::info!(
                target = %config.name,
                "remote-write queue {}: {} samples still to send ({} torn bytes cut)",
                dir.display(),
                report.pending_samples,
                report.cut_bytes
            );
        }
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| ExportError::Tls {
                target: target.clone(),
                message: e.to_string(),
            })?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);

        let shared = Arc::new(Shared {
            config: config.clone(),
            url,
            token,
            queue: Mutex::new(queue),
            stats: Stats::default(),
            appended: Notify::new(),
        });
        let (to_writer, from_sink) = std_mpsc::sync_channel(CHANNEL_BATCHES);
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("export-{}", config.name))
                .spawn(move || run_writer(&shared, &from_sink))
                .map_err(|source| ExportError::Queue {
                    target: target.clone(),
                    source,
                })?
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let sender = tokio::spawn(run_sender(shared.clone(), client, shutdown_rx));
        Ok(Arc::new(RemoteWriteExporter {
            shared,
            to_writer,
            writer: Mutex::new(Some(writer)),
            sender: Mutex::new(Some(sender)),
            shutdown,
        }))
    }

    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    /// Stops sending (an in-flight request is abandoned and sent again at the next start),
    /// writes what the sink handed over to the queue and fsyncs it.
    pub async fn stop(&self) {
        let _ = self.shutdown.send(true);
        let sender = self.sender.lock().expect("lock").take();
        if let Some(sender) = sender {
            let _ = sender.await;
        }
        let writer = self.writer.lock().expect("lock").take();
        if let Some(writer) = writer {
            let to_writer = self.to_writer.clone();
            let _ = tokio::task::spawn_blocking(move || {
                // Behind every batch already handed over, so those are written first.
                let _ = to_writer.send(ToWriter::Stop);
                let _ = writer.join();
            })
            .await;
        }
    }

    /// The target's counters and queue now.
    pub fn stats(&self) -> ExportStats {
        let stats = &self.shared.stats;
        let (pending, queue_bytes) = {
            let queue = self.shared.queue();
            (queue.pending_samples(), queue.bytes())
        };
        ExportStats {
            queued: stats.queued.load(Ordering::Relaxed),
            sent: stats.sent.load(Ordering::Relaxed),
            failed: stats.failed.load(Ordering::Relaxed),
            dropped: stats.dropped.load(Ordering::Relaxed),
            retries: stats.retries.load(Ordering::Relaxed),
            pending,
            queue_bytes,
            last_send_ms: stats.last_send_ms.load(Ordering::Relaxed),
        }
    }

    /// Appends this target's lines in the Prometheus text exposition format (with HELP and
    /// TYPE lines; for several targets use [`write_metrics`], which writes those once).
    pub fn write_metrics(&self, out: &mut String) {
        write_metrics(std::slice::from_ref(&self), out);
    }
}

/// The Prometheus text exposition of every target's telemetry, one family at a time, each
/// line labelled with `target`.
pub fn write_metrics<E: std::ops::Deref<Target = RemoteWriteExporter>>(
    exporters: &[E],
    out: &mut String,
) {
    if exporters.is_empty() {
        return;
    }
    let stats: Vec<(&str, ExportStats)> = exporters
        .iter()
        .map(|exporter| (exporter.name(), exporter.stats()))
        .collect();
    type Field = fn(&ExportStats) -> f64;
    let families: [(&str, &str, &str, Field); 8] = [
        (
            "vigil_export_samples_queued_total",
            "counter",
            "Samples appended to the remote-write queue.",
            |s| s.queued as f64,
        ),
        (
            "vigil_export_samples_sent_total",
            "counter",
            "Samples the remote-write target accepted.",
            |s| s.sent as f64,
        ),
        (
            "vigil_export_samples_failed_total",
            "counter",
            "Samples the remote-write target refused with a 4xx answer, dropped.",
            |s| s.failed as f64,
        ),
        (
            "vigil_export_samples_dropped_total",
            "counter",
            "Samples dropped before sending: queue full, exporter behind, or a disk error.",
            |s| s.dropped as f64,
        ),
        (
            "vigil_export_retries_total",
            "counter",
            "Remote-write sends retried after a connection error, timeout, 5xx or 429.",
            |s| s.retries as f64,
        ),
        (
            "vigil_export_queue_pending_samples",
            "gauge",
            "Samples in the remote-write queue not yet sent.",
            |s| s.pending as f64,
        ),
        (
            "vigil_export_queue_bytes",
            "gauge",
            "Bytes of the remote-write queue on disk.",
            |s| s.queue_bytes as f64,
        ),
        (
            "vigil_export_last_send_timestamp_seconds",
            "gauge",
            "When the remote-write target last accepted a send (0: never).",
            |s| s.last_send_ms as f64 / 1000.0,
        ),
    ];
    let mut text = Exposition::default();
    for (name, kind, help, field) in families {
        text.family(name, kind, help);
        for (target, stats) in &stats {
            text.sample(name, &[("target", target)], field(stats));
        }
    }
    out.push_str(&text.finish());
}

impl IngestSink for RemoteWriteExporter {
    fn on_ingested(&self, batch: &Arc<IngestedBatch>) {
        if batch.points.is_empty() {
            return;
        }
        match self.to_writer.try_send(ToWriter::Batch(batch.clone())) {
            Ok(()) => {}
            Err(std_mpsc::TrySendError::Full(_)) => {
                let samples: u64 = batch
                    .points
                    .iter()
                    .map(|(_, point)| exported_samples(&point.value) as u64)
                    .sum();
                self.shared
                    .stats
                    .dropped
                    .fetch_add(samples, Ordering::Relaxed);
            }
            // Stopping: the aggregator is shutting down.
            Err(std_mpsc::TrySendError::Disconnected(_)) => {}
        }
    }
}

/// How many remote-write samples one stored point becomes.
fn exported_samples(value: &PointValue) -> usize {
    match value {
        PointValue::Value(_) => 1,
        PointValue::Histogram(h) => {
            h.buckets
                .iter()
                .filter(|(index, _)| (*index as usize) < OVERFLOW_BUCKET)
                .count()
                + 3
        }
    }
}

fn labels_of(series: &StoredSeries, name: &str, le: Option<String>) -> Vec<Label> {
    let mut labels = Vec::with_capacity(series.labels.len() + 3);
    labels.push(Label {
        name: "__name__".into(),
        value: name.to_owned(),
    });
    labels.push(Label {
        name: "node".into(),
        value: series.node.clone(),
    });
    labels.extend(series.labels.iter().map(|(name, value)| Label {
        name: name.clone(),
        value: value.clone(),
    }));
    if let Some(le) = le {
        labels.push(Label {
            name: "le".into(),
            value: le,
        });
    }
    // Receivers require labels sorted by name.
    labels.sort_by(|a, b| a.name.cmp(&b.name));
    labels
}

/// The remote-write time series of a stored batch, one per point (per bucket for histograms).
pub fn time_series_of(batch: &IngestedBatch) -> Vec<TimeSeries> {
    let mut out = Vec::new();
    let one = |labels, value, timestamp| TimeSeries {
        labels,
        samples: vec![Sample { value, timestamp }],
    };
    for (series, point) in &batch.points {
        let at = point.time_ms;
        match &point.value {
            PointValue::Value(value) => {
                out.push(one(labels_of(series, &series.name, None), *value, at))
            }
            PointValue::Histogram(h) => {
                let bucket_name = format!("{}_bucket", series.name);
                let mut cumulative = 0u64;
                for (index, count) in &h.buckets {
                    // The overflow bucket has no finite bound: it counts only in +Inf.
                    if *index as usize >= OVERFLOW_BUCKET {
                        continue;
                    }
                    cumulative += count;
                    let labels = labels_of(series, &bucket_name, Some(le_label(Some(*index))));
                    out.push(one(labels, cumulative as f64, at));
                }
                let labels = labels_of(series, &bucket_name, Some(le_label(None)));
                out.push(one(labels, h.count as f64, at));
                let count_name = format!("{}_count", series.name);
                out.push(one(
                    labels_of(series, &count_name, None),
                    h.count as f64,
                    at,
                ));
                let sum_name = format!("{}_sum", series.name);
                out.push(one(labels_of(series, &sum_name, None), h.sum_seconds, at));
            }
        }
    }
    out
}

/// The queue records of a batch: encoded `WriteRequest`s of at most `max_samples` samples.
fn records_of(batch: &IngestedBatch, max_samples: usize) -> Vec<(Vec<u8>, u32)> {
    time_series_of(batch)
        .chunks(max_samples.max(1))
        .map(|chunk| {
            let request = WriteRequest {
                timeseries: chunk.to_vec(),
            };
            (request.encode_to_vec(), chunk.len() as u32)
        })
        .collect()
}

/// The queue-writer thread: appends what the sink hands over, fsyncs at least once a second,
/// and on `Stop` (or when the sink is gone) fsyncs and returns.
fn run_writer(shared: &Shared, from_sink: &std_mpsc::Receiver<ToWriter>) {
    let target = shared.config.name.as_str();
    let mut last_sync = Instant::now();
    let mut last_drop_warning: Option<Instant> = None;
    let sync = |queue: &mut Queue| {
        if let Err(error) = queue.sync() {
            tracing::error!(target, "cannot fsync the remote-write queue: {error}");
        }
    };
    loop {
        let wait = SYNC_EVERY.saturating_sub(last_sync.elapsed());
        match from_sink.recv_timeout(wait) {
            Ok(ToWriter::Batch(batch)) => {
                let records = records_of(&batch, shared.config.max_samples_per_send);
                let mut dropped = 0;
                {
                    let mut queue = shared.queue();
                    for (payload, samples) in records {
                        match queue.append(&payload, samples) {
                            Ok(gone) => {
                                dropped += gone;
                                shared
                                    .stats
                                    .queued
                                    .fetch_add(samples as u64, Ordering::Relaxed);
                            }
                            Err(error) => {
                                dropped += samples as u64;
                                tracing::error!(
                                    target,
                                    "cannot append to the remote-write queue, {samples} samples \
                                     lost: {error}"
                                );
                            }
                        }
                    }
                }
                shared.appended.notify_one();
                if dropped > 0 {
                    shared.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
                    if last_drop_warning.is_none_or(|at| at.elapsed() >= DROP_WARNING_EVERY) {
                        last_drop_warning = Some(Instant::now());
                        tracing::warn!(
                            target,
                            "remote-write queue full (queue_max_bytes {}): dropped {dropped} of \
                             the oldest unsent samples",
                            shared.config.queue_max_bytes
                        );
                    }
                }
            }
            Ok(ToWriter::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                sync(&mut shared.queue());
                return;
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
        }
        if last_sync.elapsed() >= SYNC_EVERY {
            sync(&mut shared.queue());
            last_sync = Instant::now();
        }
    }
}

/// What one POST came to.
enum Outcome {
    Accepted,
    /// Worth trying again: connection error, timeout, 5xx, 429.
    Retry(String),
    /// Refused for good (other 4xx, or an unexpected status).
    Refused(StatusCode, String),
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

async fn post(shared: &Shared, client: &HttpClient, body: Bytes) -> Outcome {
    let mut request = Request::post(shared.url.clone())
        .header(header::CONTENT_ENCODING, "snappy")
        .header(header::CONTENT_TYPE, "application/x-protobuf")
        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
        .header(
            header::USER_AGENT,
            concat!("vigil-aggregator/", env!("CARGO_PKG_VERSION")),
        );
    if let Some(token) = &shared.token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = match request.body(Full::new(body)) {
        Ok(request) => request,
        Err(error) => return Outcome::Refused(StatusCode::BAD_REQUEST, error.to_string()),
    };
    let exchange = async {
        let response = client.request(request).await.map_err(|error| {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map(|body| String::from_utf8_lossy(&body.to_bytes()).trim().to_owned())
            .unwrap_or_else(|error| format!("(answer unreadable: {error})"));
        Ok::<_, String>((status, body))
    };
    match tokio::time::timeout(shared.config.timeout, exchange).await {
        Err(_) => Outcome::Retry(format!(
            "no answer within {:?} (timeout)",
            shared.config.timeout
        )),
        Ok(Err(error)) => Outcome::Retry(error),
        Ok(Ok((status, _))) if status.is_success() => Outcome::Accepted,
        Ok(Ok((status, body)))
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS =>
        {
            Outcome::Retry(format!("{status}: {body}"))
        }
        Ok(Ok((status, body))) => Outcome::Refused(status, body),
    }
}

/// `backoff` with jitter: a random duration in `[backoff / 2, backoff]`, so targets that
/// failed together do not retry together.
fn jittered(backoff: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let fraction = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64;
    backoff.mul_f64(0.5 + 0.5 * fraction)
}

/// The sender task: queue -> POST -> commit, until shutdown.
async fn run_sender(shared: Arc<Shared>, client: HttpClient, mut shutdown: watch::Receiver<bool>) {
    let target = shared.config.name.clone();
    let max_samples = shared.config.max_samples_per_send as u64;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let peeked = {
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || shared.queue().peek(max_samples)).await
        };
        let peeked: Peeked = match peeked {
            Ok(Ok(peeked)) => peeked,
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::InvalidData => {
                // A damaged record would stop the queue for good: give up on its segment.
                let skipped = shared.queue().skip_segment();
                match skipped {
                    Ok(skipped) => {
                        shared.stats.dropped.fetch_add(skipped, Ordering::Relaxed);
                        tracing::error!(
                            target,
                            "remote-write queue damaged ({error}); dropped the {skipped} unsent \
                             samples of that segment"
                        );
                        continue;
                    }
                    Err(skip_error) => {
                        tracing::error!(
                            target,
                            "remote-write queue damaged ({error}) and the damaged segment \
                             cannot be skipped: {skip_error}"
                        );
                        tokio::select! {
                            _ = tokio::time::sleep(SYNC_EVERY) => continue,
                            _ = shutdown.wait_for(|stop| *stop) => return,
                        }
                    }
                }
            }
            Ok(Err(error)) => {
                tracing::error!(target, "cannot read the remote-write queue: {error}");
                tokio::select! {
                    _ = tokio::time::sleep(SYNC_EVERY) => continue,
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
            Err(_) => return,
        };
        if peeked.records == 0 {
            tokio::select! {
                _ = shared.appended.notified() => {}
                // A safety net in case a wake-up raced the peek.
                _ = tokio::time::sleep(SYNC_EVERY) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            continue;
        }
        let body = Bytes::from(prompb::compress(&peeked.payload));
        let mut backoff = shared.config.min_backoff;
        let mut failures = 0u32;
        loop {
            let outcome = tokio::select! {
                outcome = post(&shared, &client, body.clone()) => outcome,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            match outcome {
                Outcome::Accepted => {
                    shared
                        .stats
                        .sent
                        .fetch_add(peeked.samples, Ordering::Relaxed);
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_millis() as u64;
                    shared.stats.last_send_ms.store(now, Ordering::Relaxed);
                    if failures > 0 {
                        tracing::info!(target, "remote write works again after {failures} retries");
                    }
                    break;
                }
                Outcome::Refused(status, body) => {
                    shared
                        .stats
                        .failed
                        .fetch_add(peeked.samples, Ordering::Relaxed);
                    tracing::warn!(
                        target,
                        url = %shared.url,
                        "remote-write target refused {} samples with {status}; dropping them: {body}",
                        peeked.samples
                    );
                    break;
                }
                Outcome::Retry(why) => {
                    failures += 1;
                    shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                    // The first failure of a run and then every tenth, so an outage is seen
                    // without flooding the log.
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(
                            target,
                            url = %shared.url,
                            "remote write failed ({failures} tries), retrying in up to \
                             {backoff:?}: {why}"
                        );
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(jittered(backoff)) => {}
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                    backoff = (backoff * 2).min(shared.config.max_backoff);
                }
            }
        }
        let committed = {
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || shared.queue().commit(&peeked)).await
        };
        if let Ok(Err(error)) = committed {
            tracing::error!(
                target,
                "cannot record the remote-write queue's position: {error}"
            );
        }
    }
}

/// Every configured remote-write target.
#[derive(Default)]
pub struct Exporters {
    exporters: Vec<Arc<RemoteWriteExporter>>,
}

impl Exporters {
    /// Starts one exporter per target; none when any fails (those started are stopped).
    pub async fn start(
        targets: &[RemoteWriteConfig],
        data_dir: &Path,
    ) -> Result<Exporters, ExportError> {
        let mut exporters = Exporters::default();
        for target in targets {
            match RemoteWriteExporter::start(target, data_dir) {
                Ok(exporter) => exporters.exporters.push(exporter),
                Err(error) => {
                    exporters.stop().await;
                    return Err(error);
                }
            }
        }
        Ok(exporters)
    }

    pub fn all(&self) -> &[Arc<RemoteWriteExporter>] {
        &self.exporters
    }

    /// Stops every exporter, each queue written and fsynced.
    pub async fn stop(&self) {
        for exporter in &self.exporters {
            exporter.stop().await;
        }
    }

    /// The Prometheus text exposition of every target's telemetry (nothing without targets).
    pub fn write_metrics(&self, out: &mut String) {
        write_metrics(&self.exporters, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{HistogramPoint, MetricKind, Point, SeriesRef};

    fn series(name: &str, kind: MetricKind) -> Arc<StoredSeries> {
        Arc::new(StoredSeries {
            id: SeriesRef(0),
            node: "gpu-7".into(),
            name: name.into(),
            labels: vec![("gpu".into(), "0".into()), ("comm".into(), "vllm".into())],
            kind,
        })
    }

    fn labels(ts: &TimeSeries) -> Vec<(String, String)> {
        ts.labels
            .iter()
            .map(|l| (l.name.clone(), l.value.clone()))
            .collect()
    }

    #[test]
    fn histograms_become_cumulative_buckets_count_and_sum() {
        let batch = IngestedBatch {
            node: "gpu-7".into(),
            agent_instance: "a".into(),
            points: vec![
                (
                    series("vigil_gpu_power_watts", MetricKind::Gauge),
                    Point {
                        time_ms: 1_000,
                        value: PointValue::Value(250.5),
                    },
                ),
                (
                    series("vigil_syscall_latency_seconds", MetricKind::Histogram),
                    Point {
                        time_ms: 2_000,
                        value: PointValue::Histogram(HistogramPoint {
                            count: 10,
                            sum_seconds: 0.25,
                            buckets: vec![(0, 2), (20, 5), (OVERFLOW_BUCKET as u32, 3)],
                        }),
                    },
                ),
            ],
            events: Vec::new(),
        };
        let out = time_series_of(&batch);
        type Flat = (Vec<(String, String)>, f64, i64);
        let flat: Vec<Flat> = out
            .iter()
            .map(|ts| (labels(ts), ts.samples[0].value, ts.samples[0].timestamp))
            .collect();
        let l = |name: &str, le: Option<&str>| {
            let mut v = vec![
                ("__name__".to_string(), name.to_string()),
                ("comm".into(), "vllm".into()),
                ("gpu".into(), "0".into()),
                ("node".into(), "gpu-7".into()),
            ];
            if let Some(le) = le {
                v.push(("le".into(), le.into()));
            }
            v.sort();
            v
        };
        let bucket = "vigil_syscall_latency_seconds_bucket";
        assert_eq!(
            flat,
            vec![
                (l("vigil_gpu_power_watts", None), 250.5, 1_000),
                (l(bucket, Some(&le_label(Some(0)))), 2.0, 2_000),
                (l(bucket, Some(&le_label(Some(20)))), 7.0, 2_000),
                (l(bucket, Some("+Inf")), 10.0, 2_000),
                (l("vigil_syscall_latency_seconds_count", None), 10.0, 2_000),
                (l("vigil_syscall_latency_seconds_sum", None), 0.25, 2_000),
            ]
        );
        assert_eq!(le_label(Some(0)), "0.000000064");
        let samples: usize = batch
            .points
            .iter()
            .map(|(_, p)| exported_samples(&p.value))
            .sum();
        assert_eq!(samples, out.len());

        // Records respect max_samples_per_send and concatenate back into the same request.
        let records = records_of(&batch, 4);
        assert_eq!(
            records.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
            vec![4, 2]
        );
        let joined: Vec<u8> = records.iter().flat_map(|(p, _)| p.clone()).collect();
        let decoded = prompb::decode(&prompb::compress(&joined)).unwrap();
        assert_eq!(decoded.timeseries, out);
    }

    #[test]
    fn jitter_stays_within_half_to_full_backoff() {
        for _ in 0..100 {
            let d = jittered(Duration::from_millis(1000));
            assert!(
                d >= Duration::from_millis(500) && d <= Duration::from_millis(1000),
                "{d:?}"
            );
        }
    }
}
