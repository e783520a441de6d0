//! Sending alerts: to Alertmanager's API v2 (`POST <url>/api/v2/alerts`, a JSON list of
//! `{labels, annotations, startsAt, endsAt, generatorURL}`) and to generic JSON webhooks.
//!
//! Rule evaluation only pushes onto a bounded in-memory queue per target and returns; one task
//! per target sends in batches and retries with exponential backoff. A target that stays down
//! never slows evaluation: when its queue is full the oldest alerts are dropped and counted
//! (firing alerts are sent again at the next resend anyway).

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode, Uri, header};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::{Map, Value as Json, json};
use tokio::sync::{Notify, watch};

use super::{
    config::{AlertmanagerConfig, WebhookConfig},
    group::{Alert, AlertState},
};

/// Most alerts waiting per target.
const QUEUE_CAPACITY: usize = 10_000;
/// Most alerts in one POST.
const MAX_BATCH: usize = 256;
const MAX_ANSWER_BYTES: usize = 64 * 1024;

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// What kind of receiver a target is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TargetKind {
    Alertmanager,
    Webhook,
}

impl TargetKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            TargetKind::Alertmanager => "alertmanager",
            TargetKind::Webhook => "webhook",
        }
    }
}

/// One target's delivery counters.
#[derive(Debug, Default)]
pub struct TargetStats {
    /// Alerts delivered (accepted with a 2xx).
    pub sent: AtomicU64,
    /// POSTs that failed (each attempt).
    pub errors: AtomicU64,
    /// Alerts given up on after the retries, or refused with a 4xx.
    pub failed: AtomicU64,
    /// Alerts dropped because the queue was full.
    pub dropped: AtomicU64,
}

struct Target {
    kind: TargetKind,
    url: Uri,
    /// As configured (for metrics labels).
    name: String,
    timeout: Duration,
    max_retries: u32,
    min_backoff: Duration,
    max_backoff: Duration,
    /// Alert documents, each with whether it is resolved.
    queue: Mutex<VecDeque<(Json, bool)>>,
    wake: Notify,
    stats: TargetStats,
}

/// Every configured target.
pub struct Notifier {
    targets: Vec<Arc<Target>>,
    external_labels: Vec<(String, String)>,
    /// Where a receiver links back to (the rules page); omitted when HTTP is not served.
    generator_url: Option<String>,
}

impl Notifier {
    /// Checks the URLs and starts one sender task per target; they stop when `shutdown` turns
    /// true.
    pub fn start(
        alertmanagers: &[AlertmanagerConfig],
        webhooks: &[WebhookConfig],
        external_labels: Vec<(String, String)>,
        generator_url: Option<String>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Notifier, String> {
        let mut targets = Vec::new();
        for config in alertmanagers {
            let base = config.url.trim_end_matches('/');
            let url = format!("{base}/api/v2/alerts");
            targets.push(Target {
                kind: TargetKind::Alertmanager,
                url: parse_url(&url, "alerting.alertmanager.url")?,
                name: config.url.clone(),
                timeout: config.timeout,
                max_retries: config.max_retries,
                min_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(5),
                queue: Mutex::new(VecDeque::new()),
                wake: Notify::new(),
                stats: TargetStats::default(),
            });
        }
        for config in webhooks {
            if config.min_backoff > config.max_backoff {
                return Err(format!(
                    "alerting.webhook {}: min_backoff is longer than max_backoff",
                    config.url
                ));
            }
            targets.push(Target {
                kind: TargetKind::Webhook,
                url: parse_url(&config.url, "alerting.webhook.url")?,
                name: config.url.clone(),
                timeout: config.timeout,
                max_retries: config.max_retries,
                min_backoff: config.min_backoff,
                max_backoff: config.max_backoff,
                queue: Mutex::new(VecDeque::new()),
                wake: Notify::new(),
                stats: TargetStats::default(),
            });
        }
        let targets: Vec<Arc<Target>> = targets.into_iter().map(Arc::new).collect();
        if !targets.is_empty() {
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
                .map_err(|error| format!("TLS for notifications: {error}"))?
                .https_or_http()
                .enable_http1()
                .build();
            let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
            for target in &targets {
                tokio::spawn(run_sender(target.clone(), client.clone(), shutdown.clone()));
            }
        }
        Ok(Notifier {
            targets,
            external_labels,
            generator_url,
        })
    }

    /// Queues alerts for every target; never blocks.
    pub fn send(&self, alerts: &[Alert]) {
        if alerts.is_empty() || self.targets.is_empty() {
            return;
        }
        let documents: Vec<(Json, bool)> = alerts
            .iter()
            .map(|alert| {
                (
                    alert_json(alert, &self.external_labels, self.generator_url.as_deref()),
                    alert.state == AlertState::Inactive,
                )
            })
            .collect();
        for target in &self.targets {
            let mut queue = target.queue.lock().unwrap_or_else(|p| p.into_inner());
            for document in &documents {
                if queue.len() >= QUEUE_CAPACITY {
                    queue.pop_front();
                    target.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
                queue.push_back(document.clone());
            }
            drop(queue);
            target.wake.notify_one();
        }
    }

    /// `(kind, url, stats)` of every target, for `/metrics`.
    pub fn stats(&self) -> Vec<(TargetKind, &str, &TargetStats)> {
        self.targets
            .iter()
            .map(|target| (target.kind, target.name.as_str(), &target.stats))
            .collect()
    }

    /// Alerts waiting in the queues.
    pub fn queued(&self) -> usize {
        self.targets
            .iter()
            .map(|target| target.queue.lock().map(|q| q.len()).unwrap_or(0))
            .sum()
    }
}

fn parse_url(url: &str, what: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|error| format!("{what} {url:?} is not a URL: {error}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") if uri.host().is_some() => Ok(uri),
        _ => Err(format!("{what} {url:?} must be an http:// or https:// URL")),
    }
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(ms: i64) -> String {
    let time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    time.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn labels_json(labels: &[(String, String)]) -> Json {
    Json::Object(
        labels
            .iter()
            .map(|(name, value)| (name.clone(), Json::String(value.clone())))
            .collect::<Map<String, Json>>(),
    )
}

/// An alert in Alertmanager's API v2 shape (`postableAlert`), with the external labels.
fn alert_json(alert: &Alert, external: &[(String, String)], generator_url: Option<&str>) -> Json {
    let mut labels = alert.labels.clone();
    for (name, value) in external {
        if !labels.iter().any(|(label, _)| label == name) {
            labels.push((name.clone(), value.clone()));
        }
    }
    labels.sort();
    let ends_at = match alert.state {
        AlertState::Inactive => alert.resolved_at_ms.unwrap_or(alert.valid_until_ms),
        _ => alert.valid_until_ms,
    };
    let alertname = alert
        .labels
        .iter()
        .find(|(name, _)| name == "alertname")
        .map(|(_, value)| value.as_str())
        .unwrap_or_default();
    let mut out = json!({
        "labels": labels_json(&labels),
        "annotations": labels_json(&alert.annotations),
        "startsAt": rfc3339(alert.fired_at_ms.unwrap_or(alert.active_at_ms)),
        "endsAt": rfc3339(ends_at),
    });
    if let Some(url) = generator_url {
        out["generatorURL"] = json!(format!("{url}?alert={alertname}"));
    }
    out
}

/// The body of one POST.
fn body(kind: TargetKind, alerts: &[(Json, bool)]) -> Json {
    match kind {
        TargetKind::Alertmanager => Json::Array(alerts.iter().map(|(a, _)| a.clone()).collect()),
        TargetKind::Webhook => {
            let firing = alerts.iter().any(|(_, resolved)| !resolved);
            // Each alert carries its own status; the top-level one is "firing" if any is.
            let alerts: Vec<Json> = alerts
                .iter()
                .map(|(alert, resolved)| {
                    let mut alert = alert.clone();
                    alert["status"] = json!(if *resolved { "resolved" } else { "firing" });
                    alert
                })
                .collect();
            json!({
                "version": "1",
                "sender": "vigil-aggregator",
                "status": if firing { "firing" } else { "resolved" },
                "alerts": alerts,
            })
        }
    }
}

enum Attempt {
    Delivered,
    Retry(String),
    Refused(String),
}

async fn post(target: &Target, client: &HttpClient, payload: Bytes) -> Attempt {
    let request = Request::post(target.url.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("vigil-aggregator/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(payload));
    let request = match request {
        Ok(request) => request,
        Err(error) => return Attempt::Refused(error.to_string()),
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
        let answer = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map(|body| String::from_utf8_lossy(&body.to_bytes()).trim().to_owned())
            .unwrap_or_default();
        Ok::<_, String>((status, answer))
    };
    match tokio::time::timeout(target.timeout, exchange).await {
        Err(_) => Attempt::Retry(format!("no answer within {:?}", target.timeout)),
        Ok(Err(error)) => Attempt::Retry(error),
        Ok(Ok((status, _))) if status.is_success() => Attempt::Delivered,
        Ok(Ok((status, answer)))
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS =>
        {
            Attempt::Retry(format!("{status}: {answer}"))
        }
        Ok(Ok((status, answer))) => Attempt::Refused(format!("{status}: {answer}")),
    }
}

async fn run_sender(target: Arc<Target>, client: HttpClient, mut shutdown: watch::Receiver<bool>) {
    loop {
        let batch: Vec<(Json, bool)> = {
            let mut queue = target.queue.lock().unwrap_or_else(|p| p.into_inner());
            let take = queue.len().min(MAX_BATCH);
            queue.drain(..take).collect()
        };
        if batch.is_empty() {
            tokio::select! {
                _ = target.wake.notified() => continue,
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
        let payload = Bytes::from(body(target.kind, &batch).to_string());
        let mut backoff = target.min_backoff;
        let mut attempt = 0u32;
        loop {
            match post(&target, &client, payload.clone()).await {
                Attempt::Delivered => {
                    target
                        .stats
                        .sent
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    break;
                }
                Attempt::Refused(why) => {
                    target.stats.errors.fetch_add(1, Ordering::Relaxed);
                    target
                        .stats
                        .failed
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    tracing::warn!(
                        target = %target.name,
                        "{} refused {} alerts: {why}",
                        target.kind.as_str(),
                        batch.len()
                    );
                    break;
                }
                Attempt::Retry(why) => {
                    target.stats.errors.fetch_add(1, Ordering::Relaxed);
                    if attempt >= target.max_retries {
                        target
                            .stats
                            .failed
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        tracing::warn!(
                            target = %target.name,
                            "giving up on {} alerts for {} after {} attempts: {why}",
                            batch.len(),
                            target.kind.as_str(),
                            attempt + 1
                        );
                        break;
                    }
                    attempt += 1;
                    tracing::debug!(target = %target.name, "alert delivery failed, retrying in {backoff:?}: {why}");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                    backoff = (backoff * 2).min(target.max_backoff);
                }
            }
        }
    }
}
