//! The sender: one tokio task that streams spooled batches to an aggregator (`Ingest.Stream`).
//!
//! Per connection it sends a Hello, then every unacked batch in the spool oldest first, then
//! new batches as the collection loop spools them. Every stream is self-sufficient: each batch
//! sent also declares (from the spool's series dictionary) the series it uses that were not
//! declared on this stream yet, so a resend to another aggregator, or to one that lost its
//! data, stores every sample. Acks trim the spool; Rejections are counted and logged once per
//! reason, and UNKNOWN_SERIES (a safety net) makes the stream declare those series again and
//! the next batch declare every series again. A broken stream or a failed connect moves on to
//! the next endpoint after an exponential backoff with jitter. Memory stays bounded: batches wait on disk, and at most
//! `OUTBOUND_QUEUE` of them wait in memory for the connection.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    codec::CompressionEncoding,
    metadata::MetadataValue,
    transport::{ClientTlsConfig, Endpoint},
};
use vigil_proto::delta::DeltaEncoder;
use vigil_proto::v1::{
    AgentMessage, Hello, agent_message, aggregator_message, ingest_client::IngestClient,
    rejection::Reason,
};

use super::{config::Compression, spool::Spool, spool::SpoolError};
use crate::collectors::error_chain;

/// Batches waiting in memory for the connection (the rest wait in the spool).
const OUTBOUND_QUEUE: usize = 32;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A stream with batches in flight and no answer for this long is considered dead.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// The most series ids a Rejection lists (docs/protocol.md).
const MAX_IDS_PER_REJECTION: usize = 1000;

/// How the sender reaches the aggregators.
#[derive(Clone)]
pub struct SenderSettings {
    /// Tried in order; the next one after a failure.
    pub endpoints: Vec<String>,
    /// For `https://` endpoints.
    pub tls: Option<ClientTlsConfig>,
    /// Sent as `authorization: Bearer <token>`.
    pub token: Option<String>,
    pub compression: Compression,
    /// Use the stream-delta encoding where the aggregator offers it.
    pub delta_encoding: bool,
    pub hello: Hello,
    pub backoff: Backoff,
    /// After shutdown is asked for, how long to keep sending and waiting for acks.
    pub shutdown_grace: Duration,
}

impl std::fmt::Debug for SenderSettings {
    // By hand, so the token never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderSettings")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("compression", &self.compression)
            .field("delta_encoding", &self.delta_encoding)
            .field("hello", &self.hello)
            .finish()
    }
}

/// Reconnect delays: doubling from `min` to `max`, each picked at random in its upper half.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

/// What the sender tells the collection loop.
#[derive(Debug, Default)]
pub struct SenderFeedback {
    /// The aggregator asked for series declarations again (UNKNOWN_SERIES).
    redeclare: AtomicBool,
    /// Rejected samples per reason (`vigil_agent_rejected_samples_total{reason}`).
    rejected_samples: Mutex<BTreeMap<&'static str, u64>>,
    /// Reasons already logged.
    logged_reasons: Mutex<HashSet<i32>>,
}

impl SenderFeedback {
    /// Whether the next batch must declare every series again (clears the request).
    pub fn take_redeclare(&self) -> bool {
        self.redeclare.swap(false, Ordering::Relaxed)
    }

    pub fn rejected_samples(&self) -> BTreeMap<&'static str, u64> {
        self.rejected_samples.lock().unwrap().clone()
    }
}

/// Runs until `shutdown` turns true (then keeps sending for at most `shutdown_grace`).
/// `spooled` is bumped by the collection loop after each append.
pub async fn run_sender(
    settings: SenderSettings,
    spool: Arc<Mutex<Spool>>,
    mut spooled: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
    feedback: Arc<SenderFeedback>,
) {
    let mut rng = Jitter::seeded();
    let mut delay = settings.backoff.min;
    let mut endpoint_index = 0;
    let mut drain_deadline = None;
    // Turned off for good when an aggregator could not decode what this agent's encoder wrote
    // (a bug on one side): plain batches cost bytes but arrive.
    let mut delta_encoding = settings.delta_encoding;
    loop {
        let endpoint = &settings.endpoints[endpoint_index % settings.endpoints.len()];
        let outcome = session(
            &settings,
            delta_encoding,
            endpoint,
            &spool,
            &mut spooled,
            &mut shutdown,
            &mut drain_deadline,
            &feedback,
        )
        .await;
        match outcome {
            SessionEnd::Shutdown => return,
            SessionEnd::Failed { error, acked } => {
                if delta_encoding && error.contains(UNDECODABLE_DELTA) {
                    tracing::error!(
                        "the aggregator could not decode a delta-encoded batch: sending plain \
                         batches from now on (transport.delta_encoding)"
                    );
                    delta_encoding = false;
                }
                if acked {
                    // The endpoint worked: start over with short delays, same endpoint first.
                    delay = settings.backoff.min;
                } else {
                    endpoint_index += 1;
                }
                if drain_deadline.is_some() {
                    // Shutting down and the connection is gone: the spool keeps the rest.
                    return;
                }
                let wait = rng.between(delay / 2, delay);
                tracing::warn!(
                    endpoint = %endpoint,
                    retry_in_ms = wait.as_millis() as u64,
                    "aggregator stream ended: {error}; batches wait in the spool"
                );
                delay = (delay * 2).min(settings.backoff.max);
                let wake = tokio::time::sleep(wait);
                tokio::pin!(wake);
                loop {
                    tokio::select! {
                        _ = &mut wake => break,
                        changed = shutdown.changed() => {
                            if changed.is_err() || *shutdown.borrow() {
                                // No connection to drain through.
                                return;
                            }
                        }
                    }
                }
            }
        }
    }
}

enum SessionEnd {
    Shutdown,
    Failed { error: String, acked: bool },
}

/// What the aggregator's status says when a delta block does not decode
/// (`vigil_proto::delta::DeltaError`).
const UNDECODABLE_DELTA: &str = "undecodable delta block";

#[allow(clippy::too_many_arguments)]
async fn session(
    settings: &SenderSettings,
    delta_encoding: bool,
    endpoint_url: &str,
    spool: &Arc<Mutex<Spool>>,
    spooled: &mut watch::Receiver<u64>,
    shutdown: &mut watch::Receiver<bool>,
    drain_deadline: &mut Option<Instant>,
    feedback: &SenderFeedback,
) -> SessionEnd {
    let failed = |error: String| SessionEnd::Failed {
        error,
        acked: false,
    };
    let mut endpoint = match Endpoint::from_shared(endpoint_url.to_string()) {
        Ok(e) => e
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(15))
            .keep_alive_timeout(Duration::from_secs(10)),
        Err(e) => return failed(format!("invalid endpoint: {}", error_chain(&e))),
    };
    if endpoint_url.starts_with("https://")
        && let Some(tls) = &settings.tls
    {
        endpoint = match endpoint.tls_config(tls.clone()) {
            Ok(e) => e,
            Err(e) => return failed(format!("TLS setup: {}", error_chain(&e))),
        };
    }
    let channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(e) => return failed(format!("cannot connect: {}", error_chain(&e))),
    };
    let authorization = match settings.token.as_deref().map(|token| {
        MetadataValue::try_from(format!("Bearer {token}")).map(|mut value| {
            value.set_sensitive(true);
            value
        })
    }) {
        None => None,
        Some(Ok(value)) => Some(value),
        Some(Err(_)) => {
            return failed("the token in transport.token_file is not valid header text".into());
        }
    };
    let mut client =
        IngestClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            if let Some(value) = &authorization {
                request
                    .metadata_mut()
                    .insert("authorization", value.clone());
            }
            Ok(request)
        })
        .accept_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Gzip);
    client = match settings.compression {
        Compression::Zstd => client.send_compressed(CompressionEncoding::Zstd),
        Compression::Gzip => client.send_compressed(CompressionEncoding::Gzip),
        Compression::None => client,
    };

    let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_QUEUE);
    let hello = AgentMessage {
        body: Some(agent_message::Body::Hello(settings.hello.clone())),
    };
    if outbound.send(hello).await.is_err() {
        return failed("outbound queue closed".into());
    }
    let response =
        match tokio::time::timeout(ACK_TIMEOUT, client.stream(ReceiverStream::new(outbound_rx)))
            .await
        {
            Ok(Ok(response)) => response,
            Ok(Err(status)) => return failed(describe_status(&status)),
            Err(_) => return failed("no answer to the stream request".into()),
        };
    // The stream-delta encoding only when this aggregator offers it (an older one would ignore
    // the blocks and lose their samples).
    let offered = vigil_proto::delta::offered(response.metadata());
    let mut delta = (delta_encoding && offered).then(DeltaEncoder::new);
    tracing::info!(
        endpoint = %endpoint_url,
        delta_encoding = delta.is_some(),
        "streaming to the aggregator"
    );
    let mut inbound = response.into_inner();

    let mut acked_any = false;
    let mut next = spool.lock().unwrap().acked() + 1;
    let mut pending = None;
    let mut last_answer = Instant::now();
    let mut collection_stopped = false;
    // Series declared on this stream (the aggregator may not know any other).
    let mut declared = HashSet::new();
    loop {
        let (acked, spooled_until) = {
            let spool = spool.lock().unwrap();
            (spool.acked(), spool.next_sequence() - 1)
        };
        next = next.max(acked + 1);
        if let Some(deadline) = *drain_deadline
            && (acked >= spooled_until || Instant::now() >= deadline)
        {
            return SessionEnd::Shutdown;
        }
        if pending.is_none() {
            match spool.lock().unwrap().read_from(next) {
                Ok(batch) => pending = batch,
                Err(SpoolError::Corrupt { sequence, .. }) if sequence >= next => {
                    tracing::error!(sequence, "spooled batch is corrupt: skipped");
                    next = sequence + 1;
                    continue;
                }
                Err(e) => {
                    tracing::error!("cannot read the spool: {}", error_chain(&e));
                }
            }
        }
        // Sent on this stream and not acked yet.
        let in_flight = next > acked + 1;
        let ack_wait = if in_flight {
            ACK_TIMEOUT.saturating_sub(last_answer.elapsed())
        } else {
            ACK_TIMEOUT
        };
        let drain_wait = drain_deadline.map_or(Duration::from_secs(3600), |d| {
            d.saturating_duration_since(Instant::now())
        });
        tokio::select! {
            biased;
            changed = shutdown.changed(), if drain_deadline.is_none() => {
                if changed.is_err() || *shutdown.borrow() {
                    *drain_deadline = Some(Instant::now() + settings.shutdown_grace);
                }
            }
            message = inbound.message() => {
                last_answer = Instant::now();
                match message {
                    Ok(Some(message)) => match message.body {
                        Some(aggregator_message::Body::Ack(ack)) => {
                            if let Err(e) = spool.lock().unwrap().ack(ack.sequence) {
                                tracing::error!("cannot trim the spool: {}", error_chain(&e));
                            }
                            acked_any = true;
                        }
                        Some(aggregator_message::Body::Rejection(rejection)) => {
                            handle_rejection(&rejection, feedback, &mut declared);
                        }
                        None => {}
                    },
                    Ok(None) => {
                        return SessionEnd::Failed {
                            error: "the aggregator closed the stream".into(),
                            acked: acked_any,
                        };
                    }
                    Err(status) => {
                        return SessionEnd::Failed {
                            error: describe_status(&status),
                            acked: acked_any,
                        };
                    }
                }
            }
            permit = outbound.reserve(), if pending.is_some() => {
                let Ok(permit) = permit else {
                    return SessionEnd::Failed {
                        error: "the request stream closed".into(),
                        acked: acked_any,
                    };
                };
                let mut batch = pending.take().expect("a pending batch");
                match spool.lock().unwrap().declare_for_stream(&mut batch, &mut declared) {
                    Ok(missing) if !missing.is_empty() => tracing::warn!(
                        sequence = batch.sequence,
                        series_ids = ?missing,
                        "batch uses series missing from the spool's dictionary: the aggregator may reject their samples"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::error!(
                        "cannot update the series dictionary: {}",
                        error_chain(&e)
                    ),
                }
                if !in_flight {
                    last_answer = Instant::now();
                }
                next = batch.sequence + 1;
                if let Some(encoder) = delta.as_mut() {
                    encoder.encode(&mut batch);
                }
                permit.send(AgentMessage { body: Some(agent_message::Body::Batch(batch)) });
            }
            changed = spooled.changed(), if pending.is_none() && !collection_stopped => {
                // The collection loop has stopped: nothing new will be spooled.
                collection_stopped = changed.is_err();
            }
            _ = tokio::time::sleep(ack_wait), if in_flight => {
                return SessionEnd::Failed {
                    error: format!("no ack for {} s", ACK_TIMEOUT.as_secs()),
                    acked: acked_any,
                };
            }
            _ = tokio::time::sleep(drain_wait), if drain_deadline.is_some() => {}
        }
    }
}

fn handle_rejection(
    rejection: &vigil_proto::v1::Rejection,
    feedback: &SenderFeedback,
    declared: &mut HashSet<u64>,
) {
    let reason = Reason::try_from(rejection.reason).unwrap_or(Reason::Unspecified);
    let name = reason_label(reason);
    *feedback
        .rejected_samples
        .lock()
        .unwrap()
        .entry(name)
        .or_default() += u64::from(rejection.rejected_samples);
    if reason == Reason::UnknownSeries {
        // Declare them again on this stream (a Rejection lists at most 1000 ids: when it may be
        // cut short, all of them), and every series in the next batch.
        if rejection.series_ids.len() < MAX_IDS_PER_REJECTION {
            for id in &rejection.series_ids {
                declared.remove(id);
            }
        } else {
            declared.clear();
        }
        feedback.redeclare.store(true, Ordering::Relaxed);
    }
    if feedback
        .logged_reasons
        .lock()
        .unwrap()
        .insert(rejection.reason)
    {
        tracing::warn!(
            reason = name,
            sequence = rejection.sequence,
            rejected_samples = rejection.rejected_samples,
            "the aggregator rejected part of a batch: {} (logged once per reason; counted in vigil_agent_rejected_samples_total)",
            rejection.message
        );
    }
}

/// The `reason` label of `vigil_agent_rejected_samples_total`.
pub fn reason_label(reason: Reason) -> &'static str {
    match reason {
        Reason::Unspecified => "unspecified",
        Reason::InvalidValue => "invalid_value",
        Reason::FutureTimestamp => "future_timestamp",
        Reason::TooOld => "too_old",
        Reason::SeriesLimit => "series_limit",
        Reason::UnknownSeries => "unknown_series",
        Reason::Malformed => "malformed",
    }
}

fn describe_status(status: &tonic::Status) -> String {
    match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => format!(
            "the aggregator refused this agent ({:?}: {}); check transport.token_file and the client certificate",
            status.code(),
            status.message()
        ),
        code => format!("{code:?}: {}", status.message()),
    }
}

/// Random delays for reconnects, so a fleet does not reconnect in lockstep.
struct Jitter(u64);

impl Jitter {
    fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self(nanos ^ (u64::from(std::process::id()) << 32) | 1)
    }

    fn between(&mut self, low: Duration, high: Duration) -> Duration {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let span = high.saturating_sub(low).as_micros() as u64;
        low + Duration::from_micros(if span == 0 { 0 } else { self.0 % span })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_its_bounds() {
        let mut jitter = Jitter::seeded();
        for _ in 0..1000 {
            let d = jitter.between(Duration::from_millis(250), Duration::from_millis(500));
            assert!(d >= Duration::from_millis(250) && d < Duration::from_millis(500));
        }
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let settings = SenderSettings {
            endpoints: vec!["http://127.0.0.1:1".into()],
            tls: None,
            token: Some("s3cret-token".into()),
            compression: Compression::Zstd,
            delta_encoding: true,
            hello: Hello::default(),
            backoff: Backoff::default(),
            shutdown_grace: Duration::from_secs(1),
        };
        let text = format!("{settings:?}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}
