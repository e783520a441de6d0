//! `vigil-agent run`: collection passes on a wall-clock-aligned interval, each encoded into a
//! batch, spooled and sent, until SIGTERM or SIGINT.
//!
//! The passes run on their own thread (collectors block on the kernel, NVML and /proc); the
//! sender runs on a single-threaded tokio runtime. They meet at the spool: the collection
//! thread appends and fsyncs, then wakes the sender.
//!
//! GPU health events (XID errors, ECC errors, a GPU falling off the bus) do not wait for the
//! next pass: between passes the collection thread waits on the health-event thread's
//! doorbell, and each ring sends the events queued so far at once in a batch of their own
//! (with the health counters the alert rules read, and the agent's own metrics).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, mpsc as std_mpsc},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use vigil_proto::v1::Hello;

use super::{
    config::TransportConfigError,
    encode::BatchEncoder,
    sender::{Backoff, SenderFeedback, SenderSettings, run_sender},
    spool::{Spool, SpoolError},
};
use crate::{
    collectors::{CollectorStatus, error_chain, gpu},
    config::AgentConfig,
    exposition::Exposition,
    pass::{CollectionPass, PassSetupError},
    sample::{Event, Labels, Sample, SampleValue},
    snapshot::node_name,
};

/// After SIGTERM, how long the agent keeps sending to get the last batches acked (whatever is
/// left is resent at the next start).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Spooled batches reach the disk at least this often.
const SYNC_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] TransportConfigError),
    #[error("cannot read {key} {path}")]
    ReadFile {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("transport.token_file {0} is empty")]
    EmptyToken(PathBuf),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Pass(#[from] PassSetupError),
    #[error("the collection thread failed while starting the collectors (see the log above)")]
    CollectionStart,
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen for SIGTERM")]
    Signal(#[source] std::io::Error),
    #[error("cannot serve /metrics on {addr} (metrics.listen)")]
    MetricsListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run_agent(config: &AgentConfig, track: &[String]) -> Result<(), RunError> {
    let transport = &config.transport;
    transport.validate()?;
    let read = |key: &'static str, path: &PathBuf| {
        std::fs::read(path).map_err(|source| RunError::ReadFile {
            key,
            path: path.clone(),
            source,
        })
    };
    let token = match &transport.token_file {
        Some(path) => {
            let token = String::from_utf8_lossy(&read("transport.token_file", path)?)
                .trim()
                .to_string();
            if token.is_empty() {
                return Err(RunError::EmptyToken(path.clone()));
            }
            Some(token)
        }
        None => None,
    };
    let tls = match &transport.ca_file {
        Some(ca) => {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read("transport.ca_file", ca)?));
            if let (Some(cert), Some(key)) =
                (&transport.client_cert_file, &transport.client_key_file)
            {
                tls = tls.identity(Identity::from_pem(
                    read("transport.client_cert_file", cert)?,
                    read("transport.client_key_file", key)?,
                ));
            }
            Some(tls)
        }
        None => None,
    };

    // Bound before anything starts, so a taken port fails the start.
    let metrics_listener = match config.metrics.listen {
        None => None,
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
                .map_err(|source| RunError::MetricsListen { addr, source })?;
            tracing::info!(
                "serving /metrics on {}",
                listener.local_addr().unwrap_or(addr)
            );
            Some((addr, listener))
        }
    };
    let spool = Spool::open(&transport.spool_dir, transport.spool_max_bytes)?;
    tracing::info!(
        spool = %transport.spool_dir.display(),
        agent_instance = spool.agent_instance(),
        unacked_batches = spool.unacked_batches(),
        next_sequence = spool.next_sequence(),
        "spool opened"
    );
    let settings = SenderSettings {
        endpoints: transport.endpoints.clone(),
        tls,
        token,
        compression: transport.compression,
        delta_encoding: transport.delta_encoding,
        hello: Hello {
            node: node_name(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            agent_instance: spool.agent_instance().to_string(),
            capabilities: if transport.delta_encoding {
                vec![vigil_proto::delta::DELTA_V1.to_string()]
            } else {
                Vec::new()
            },
        },
        backoff: Backoff::default(),
        shutdown_grace: SHUTDOWN_GRACE,
    };
    let first_series_id = spool.next_series_id();
    let spool = Arc::new(Mutex::new(spool));
    let feedback = Arc::new(SenderFeedback::default());
    let (spooled_tx, spooled_rx) = watch::channel(0u64);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // `/metrics` (when `[metrics] listen` is set) shows what each pass collected.
    let exposition = config
        .metrics
        .listen
        .map(|_| Arc::new(Exposition::new(node_name())));

    // The collection thread: started first so a config it cannot run with fails fast.
    let (stop_tx, stop_rx) = std_mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std_mpsc::sync_channel::<Result<(), PassSetupError>>(1);
    let collection = {
        let config = config.clone();
        let track = track.to_vec();
        let spool = spool.clone();
        let feedback = feedback.clone();
        let exposition = exposition.clone();
        std::thread::Builder::new()
            .name("collection".into())
            .spawn(move || {
                let pass = match CollectionPass::new(&config, &track) {
                    Ok(pass) => {
                        let _ = ready_tx.send(Ok(()));
                        pass
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                CollectionLoop {
                    pass,
                    encoder: BatchEncoder::new(first_series_id),
                    interval: config.transport.interval,
                    spool,
                    feedback,
                    spooled: spooled_tx,
                    statuses: BTreeMap::new(),
                    exposition,
                }
                .run(&stop_rx);
            })
            .map_err(RunError::Runtime)?
    };
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = collection.join();
            return Err(e.into());
        }
        Err(_) => return Err(RunError::CollectionStart),
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    let result = runtime.block_on(async {
        let metrics = match (metrics_listener, exposition) {
            (Some((addr, listener)), Some(exposition)) => {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .map_err(|source| RunError::MetricsListen { addr, source })?;
                let mut stop = shutdown_rx.clone();
                Some(tokio::spawn(crate::exposition::serve(
                    listener,
                    exposition,
                    async move {
                        let _ = stop.wait_for(|stop| *stop).await;
                    },
                )))
            }
            _ => None,
        };
        let sender = tokio::spawn(run_sender(
            settings,
            spool.clone(),
            spooled_rx,
            shutdown_rx,
            feedback,
        ));
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(RunError::Signal)?;
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        }
        let _ = stop_tx.send(());
        // The collection thread waits on the doorbell between passes: wake it to see the stop.
        gpu::HEALTH_EVENTS.ring();
        let _ = tokio::task::spawn_blocking(move || collection.join()).await;
        if let Err(e) = spool.lock().unwrap().sync() {
            tracing::error!("cannot sync the spool: {}", error_chain(&e));
        }
        let _ = shutdown_tx.send(true);
        let _ = sender.await;
        if let Some(metrics) = metrics {
            let _ = metrics.await;
        }
        Ok(())
    });
    let spool = spool.lock().unwrap();
    tracing::info!(
        unacked_batches = spool.unacked_batches(),
        acked = spool.acked(),
        "stopped; unacked batches are resent at the next start"
    );
    result
}

struct CollectionLoop {
    pass: CollectionPass,
    encoder: BatchEncoder,
    interval: Duration,
    spool: Arc<Mutex<Spool>>,
    feedback: Arc<SenderFeedback>,
    spooled: watch::Sender<u64>,
    statuses: BTreeMap<&'static str, CollectorStatus>,
    exposition: Option<Arc<Exposition>>,
}

impl CollectionLoop {
    fn run(mut self, stop: &std_mpsc::Receiver<()>) {
        // Sticky: `try_recv` takes the stop message, and it must be seen by every later check.
        let stop_seen = std::cell::Cell::new(false);
        let stopped = || {
            if !matches!(stop.try_recv(), Err(std_mpsc::TryRecvError::Empty)) {
                stop_seen.set(true);
            }
            stop_seen.get()
        };
        let mut rings = gpu::HEALTH_EVENTS.rings();
        loop {
            let (tick, wait) = next_tick(SystemTime::now(), self.interval);
            let until = Instant::now() + wait;
            // Until the tick, send health events the moment they are queued.
            loop {
                if stopped() {
                    return;
                }
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                if gpu::HEALTH_EVENTS.wait(&mut rings, left) && !stopped() {
                    self.spool_health_events();
                }
            }
            self.pass.run();
            let time_ms = tick.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis()) as i64;
            self.spool_pass(time_ms);
        }
    }

    /// A batch of the events queued since the last pass (health events were what rang), with
    /// the health counters as they are now and the agent's own metrics; nothing when no event
    /// is waiting (another agent in this process took the ring, or a pass took the events).
    fn spool_health_events(&mut self) {
        let mut samples = Vec::new();
        let mut events = Vec::new();
        for collector in self.pass.collectors_mut() {
            events.extend(collector.take_events());
            if collector.name() == gpu::NAME {
                samples.extend(
                    collector
                        .samples()
                        .into_iter()
                        .filter(|sample| gpu::HEALTH_EVENT_METRICS.contains(&sample.name)),
                );
            }
        }
        if events.is_empty() {
            return;
        }
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis()) as i64;
        tracing::debug!(events = events.len(), "sending health events at once");
        self.spool_batch(time_ms, samples, &events, false);
    }

    fn spool_pass(&mut self, time_ms: i64) {
        let mut samples = Vec::new();
        let mut events = Vec::new();
        for collector in self.pass.collectors_mut() {
            let status = collector.status();
            if self.statuses.get(collector.name()) != Some(&status) {
                match &status {
                    CollectorStatus::Ok => tracing::info!(collector = collector.name(), "ok"),
                    CollectorStatus::Degraded(reason) => {
                        tracing::warn!(collector = collector.name(), "degraded: {reason}")
                    }
                    CollectorStatus::Unavailable(reason) => {
                        tracing::warn!(collector = collector.name(), "unavailable: {reason}")
                    }
                }
                // Told to the aggregator too, so the dashboard can say why a view is empty.
                let (name, reason) = match &status {
                    CollectorStatus::Ok => ("ok", String::new()),
                    CollectorStatus::Degraded(reason) => ("degraded", reason.clone()),
                    CollectorStatus::Unavailable(reason) => ("unavailable", reason.clone()),
                };
                let labels = Labels::from([
                    ("collector".to_string(), collector.name().to_string()),
                    ("status".to_string(), name.to_string()),
                ]);
                events.push(crate::sample::Event::now(
                    "collector_status",
                    labels,
                    reason,
                ));
                self.statuses.insert(collector.name(), status);
            }
            samples.push(Sample {
                name: "vigil_agent_collector_up",
                labels: Labels::from([("collector".to_string(), collector.name().to_string())]),
                value: SampleValue::Value(match self.statuses.get(collector.name()) {
                    Some(CollectorStatus::Unavailable(_)) => 0.0,
                    _ => 1.0,
                }),
            });
            samples.extend(collector.samples());
            events.extend(collector.take_events());
        }
        self.spool_batch(time_ms, samples, &events, true);
    }

    /// Encodes one batch (with the agent's own metrics), spools it and wakes the sender. A
    /// pass (`is_pass`) is also what the agent's `/metrics` shows.
    fn spool_batch(
        &mut self,
        time_ms: i64,
        mut samples: Vec<Sample>,
        events: &[Event],
        is_pass: bool,
    ) {
        if self.feedback.take_redeclare() {
            self.encoder.redeclare_all();
        }
        let mut spool = self.spool.lock().unwrap();
        samples.extend(self_metrics(&spool, &self.feedback));
        if is_pass && let Some(exposition) = &self.exposition {
            exposition.record_pass(&samples, &self.statuses, spool.acked());
        }
        let batch = self
            .encoder
            .encode(spool.next_sequence(), time_ms, &samples, events);
        match spool.append(&batch) {
            Ok(outcome) => {
                if outcome.dropped_batches > 0 {
                    // Dropped batches may have declared series that later ones use.
                    self.encoder.redeclare_all();
                }
            }
            Err(e) => {
                tracing::error!(
                    sequence = batch.sequence,
                    "cannot spool a batch, it is lost: {}",
                    error_chain(&e)
                );
                self.encoder.redeclare_all();
            }
        }
        // fsync so that no spooled batch waits a second for the disk (each pass when the
        // interval is 1 s or more).
        if spool.last_sync().elapsed() + self.interval >= SYNC_EVERY
            && let Err(e) = spool.sync()
        {
            tracing::error!("cannot fsync the spool: {}", error_chain(&e));
        }
        let _ = self.spooled.send(batch.sequence);
    }
}

/// The agent's own telemetry, sent in the same batches.
fn self_metrics(spool: &Spool, feedback: &SenderFeedback) -> Vec<Sample> {
    let value = |name, labels: Labels, value: f64| Sample {
        name,
        labels,
        value: SampleValue::Value(value),
    };
    let mut samples = vec![
        value(
            "vigil_agent_spool_dropped_batches_total",
            Labels::new(),
            spool.dropped_batches() as f64,
        ),
        value(
            "vigil_agent_spool_bytes",
            Labels::new(),
            spool.bytes() as f64,
        ),
        value(
            "vigil_agent_spool_unacked_batches",
            Labels::new(),
            spool.unacked_batches() as f64,
        ),
    ];
    for (reason, count) in feedback.rejected_samples() {
        let labels = Labels::from([("reason".to_string(), reason.to_string())]);
        samples.push(value(
            "vigil_agent_rejected_samples_total",
            labels,
            count as f64,
        ));
    }
    samples
}

/// The next whole multiple of `interval` since the epoch after `now`, and how long until then.
pub fn next_tick(now: SystemTime, interval: Duration) -> (SystemTime, Duration) {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let interval_ns = interval.as_nanos().max(1);
    let ticks = since_epoch.as_nanos() / interval_ns + 1;
    let tick = UNIX_EPOCH + Duration::from_nanos((ticks * interval_ns) as u64);
    (tick, tick.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_align_to_whole_interval_boundaries() {
        let now = UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
        let (tick, wait) = next_tick(now, Duration::from_secs(1));
        assert_eq!(tick, UNIX_EPOCH + Duration::from_secs(1_700_000_001));
        assert_eq!(wait, Duration::from_millis(750));
        let (tick, _) = next_tick(now, Duration::from_secs(15));
        assert_eq!(tick, UNIX_EPOCH + Duration::from_secs(1_700_000_010));
        // Exactly on a boundary: the next one.
        let (_, wait) = next_tick(UNIX_EPOCH + Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(wait, Duration::from_secs(1));
    }
}
