//! Starting and stopping the aggregator: checks the config's security choices, replays the
//! write-ahead log into the store, and serves `Ingest` over gRPC and the query API over HTTP
//! until told to stop.

use std::{fs::File, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use vigil_proto::v1::{ingest_server::IngestServer, query_server::QueryServer};

use crate::{
    config::AggregatorConfig,
    export::{ExportError, Exporters},
    http::{self, metrics::Telemetry},
    ingest::{
        IngestService, IngestShared,
        admission::Limits,
        counters::{CountersSnapshot, IngestCounters},
    },
    nodes::NodeRegistry,
    query::Engine,
    query_service::{LIVE_FEED_CAPACITY, LiveFeed, QueryService, QueryShared, QueryStats},
    security::{
        AuditLog, Authenticator, TokenTable, connection::accept_loop, tls, tokens::TokensError,
    },
    storage::{ReplayReport, Store, StoreError, StoreOptions, Wal, WalError},
};

/// How long a shutdown waits for streams to close before cutting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the aggregator cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Insecure(String),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Tokens(#[from] TokensError),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("{0}")]
    Alerting(String),
    #[error("{0}")]
    Anomaly(String),
    #[error(
        "data directory {path} is in use by another aggregator (lock held on its LOCK file); \
         stop that one or choose another --data-dir"
    )]
    DataDirInUse { path: PathBuf },
    #[error("cannot open {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open audit log {path}: {source}")]
    Audit {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} (http.listen / --http-listen): {source}")]
    BindHttp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} (grpc.listen / --grpc-listen): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running aggregator.
pub struct RunningAggregator {
    grpc_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    http_server: Option<JoinHandle<std::io::Result<()>>>,
    store: Arc<Store>,
    counters: Arc<IngestCounters>,
    telemetry: Arc<Telemetry>,
    replay: ReplayReport,
    audit_path: PathBuf,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    wal: Arc<Wal>,
    /// Checkpoints every `storage.checkpoint_interval` until shutdown.
    checkpointer: Option<JoinHandle<()>>,
    _lock: File,
    alerting: Option<crate::alerting::RuleManager>,
    exporters: Arc<Exporters>,
}

impl RunningAggregator {
    /// The address the gRPC server listens on (the real port when the config said 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The address the HTTP API listens on, when `http.listen` is set.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// What is stored.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The ingest counters now.
    pub fn counters(&self) -> CountersSnapshot {
        self.counters.snapshot()
    }

    /// What `/metrics` reads (the fleet inventory, the Query service's counters); add more
    /// families to `/metrics` with [`Telemetry::add_writer`].
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// The rule manager, when `[alerting]` has rule files.
    pub fn alerting(&self) -> Option<&crate::alerting::RuleManager> {
        self.alerting.as_ref()
    }

    /// The remote-write exporters (`[[export.remote_write]]`).
    pub fn exporters(&self) -> &Arc<Exporters> {
        &self.exporters
    }

    /// What the write-ahead log replay found at startup.
    pub fn replay_report(&self) -> &ReplayReport {
        &self.replay
    }

    pub fn audit_path(&self) -> &std::path::Path {
        &self.audit_path
    }

    /// Runs until the server fails or [`RunningAggregator::shutdown`] is called elsewhere.
    pub async fn serve_until(
        mut self,
        stop: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        tokio::select! {
            _ = stop => {}
            result = &mut self.server => {
                return result.unwrap_or(Ok(()));
            }
        }
        self.shutdown().await;
        Ok(())
    }

    /// Ends every stream with `unavailable`, stops accepting, flushes and closes the log.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(http) = self.http_server.take() {
            // Graceful: in-flight queries finish; a hung one is cut after the grace period.
            if tokio::time::timeout(SHUTDOWN_GRACE, http).await.is_err() {
                tracing::warn!(
                    "HTTP requests still running after {SHUTDOWN_GRACE:?}; cutting them"
                );
            }
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut self.server)
            .await
            .is_err()
        {
            tracing::warn!("streams still open after {SHUTDOWN_GRACE:?}; cutting them");
            self.server.abort();
            let _ = (&mut self.server).await;
        }
        if let Some(checkpointer) = self.checkpointer.take() {
            let _ = checkpointer.await;
        }
        if let Some(alerting) = &self.alerting {
            alerting.stop().await;
        }
        // Connections hold the service and with it the log: wait until they are gone.
        for _ in 0..100 {
            if Arc::strong_count(&self.wal) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The last checkpoint: the next start replays (almost) nothing.
        let (store, wal) = (self.store.clone(), self.wal.clone());
        // Then the file gives back the space checkpoints freed (storage/store.rs).
        match tokio::task::spawn_blocking(move || {
            let report = store.checkpoint(&wal);
            if report.is_ok() {
                store.compact_file();
            }
            report
        })
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::error!("checkpoint at shutdown: {error}"),
            Err(error) => tracing::error!("checkpoint at shutdown: {error}"),
        }
        // No batch is stored any more: write what the exporters were handed to their queues.
        self.exporters.stop().await;
    }
}

/// Checks the security choices, replays the log, binds and starts serving.
pub async fn start(config: &AggregatorConfig) -> Result<RunningAggregator, StartError> {
    let acceptor = check_security(config)?;
    let tokens = config
        .auth
        .tokens_file
        .as_deref()
        .map(TokenTable::load)
        .transpose()?;

    let wal_dir = config.data_dir.join("wal");
    std::fs::create_dir_all(&wal_dir).map_err(|source| StartError::DataDir {
        path: wal_dir.clone(),
        source,
    })?;
    let lock_path = wal_dir.join("LOCK");
    let lock = File::create(&lock_path).map_err(|source| StartError::DataDir {
        path: lock_path.clone(),
        source,
    })?;
    if lock.try_lock().is_err() {
        return Err(StartError::DataDirInUse {
            path: config.data_dir.clone(),
        });
    }

    let store = Arc::new(Store::open(
        &config.data_dir,
        StoreOptions {
            retention: config.limits.retention,
            rollup_retention: config.storage.rollup_retention,
        },
    )?);
    let (wal, replay) = {
        let first_segment = store.wal_start_segment();
        let mut state = store.lock();
        Wal::open_from(
            &wal_dir,
            config.wal.segment_bytes,
            first_segment,
            |record| state.replay(&record),
        )?
    };
    if replay.records > 0 || replay.torn_tail.is_some() {
        tracing::info!(
            "replayed {} write-ahead log records from {} segments",
            replay.records,
            replay.segments
        );
    }

    let audit_path = config.audit_path();
    let audit = Arc::new(
        AuditLog::open(&audit_path).map_err(|source| StartError::Audit {
            path: audit_path.clone(),
            source,
        })?,
    );
    let listener = TcpListener::bind(config.grpc.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.grpc.listen,
            source,
        })?;
    let grpc_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.grpc.listen,
        source,
    })?;

    let counters = Arc::new(IngestCounters::default());
    let nodes = Arc::new(NodeRegistry::new());
    let query_stats = Arc::new(QueryStats::default());
    let telemetry = Arc::new(Telemetry::new(nodes.clone(), query_stats.clone()));
    let live = Arc::new(LiveFeed::new(LIVE_FEED_CAPACITY));
    store.add_sink(live.clone());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let wal = Arc::new(wal);
    let alerting = crate::alerting::start_from_config(
        config,
        &store,
        &wal,
        &counters,
        &telemetry,
        shutdown_rx.clone(),
    )
    .map_err(StartError::Alerting)?;
    // Computed samples (bottleneck verdicts, anomaly scores) are stored like rule results, each
    // producer writing as an agent instance of its own: the rule manager's is named after
    // `now`, so `now + 1`, `now + 2` cannot clash with it.
    let limits = Limits::from_config(&config.limits);
    let sample_writer = |offset: i64| {
        Arc::new(crate::alerting::SampleWriter::new(
            store.clone(),
            wal.clone(),
            counters.clone(),
            limits,
            &config.alerting.node,
            crate::alerting::manager::now_ms() + offset,
        ))
    };
    let verdicts = Arc::new(crate::verdict::Verdicts::new());
    crate::verdict::start(
        Engine::new(store.clone()),
        sample_writer(1),
        verdicts.clone(),
        crate::verdict::VERDICT_INTERVAL,
        shutdown_rx.clone(),
    );
    let anomaly_stats = Arc::new(crate::anomaly::scorer::ScorerStats::default());
    let scorer = crate::anomaly::scorer::start(
        &config.anomaly,
        sample_writer(2),
        anomaly_stats.clone(),
        shutdown_rx.clone(),
    )
    .map_err(StartError::Anomaly)?;
    if let Some(scorer) = scorer {
        store.add_sink(scorer);
        telemetry.add_writer(Arc::new(move |out: &mut String| {
            anomaly_stats.write_metrics(out)
        }));
    }
    let (http_addr, http_server) = match config.http.listen {
        None => (None, None),
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::BindHttp { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| StartError::BindHttp { addr, source })?;
            let router = http::router(http::HttpState {
                engine: Engine::new(store.clone()),
                store: store.clone(),
                counters: counters.clone(),
                tokens: tokens.clone(),
                telemetry: telemetry.clone(),
                alerts: alerting.clone(),
                nodes: nodes.clone(),
                live: live.clone(),
                verdicts: verdicts.clone(),
            });
            let mut stop = shutdown_rx.clone();
            let server = tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|stop| *stop).await;
                    })
                    .await
            });
            tracing::info!("HTTP API listening on {bound}");
            (Some(bound), Some(server))
        }
    };
    let service = IngestService(Arc::new(IngestShared {
        store: store.clone(),
        wal: wal.clone(),
        counters: counters.clone(),
        limits,
        authenticator: Authenticator {
            tokens: tokens.clone(),
            client_certificates: config.tls.client_ca_file.is_some(),
        },
        audit: audit.clone(),
        hello_timeout: config.grpc.hello_timeout,
        max_message_bytes: config.grpc.max_message_bytes,
        shutdown: shutdown_rx.clone(),
        nodes: nodes.clone(),
    }));
    let alerts_service = alerting.clone().map(|manager| {
        vigil_proto::v1::alerts_server::AlertsServer::new(
            crate::alerting::grpc::AlertsService::new(manager, tokens.clone(), audit.clone()),
        )
    });
    let query = QueryServer::new(QueryService::new(QueryShared {
        engine: Engine::new(store.clone()),
        store: store.clone(),
        nodes,
        tokens,
        audit: audit.clone(),
        live,
        stats: query_stats,
        shutdown: shutdown_rx.clone(),
    }))
    .accept_compressed(CompressionEncoding::Gzip)
    .accept_compressed(CompressionEncoding::Zstd)
    .send_compressed(CompressionEncoding::Gzip)
    .send_compressed(CompressionEncoding::Zstd);
    let grpc = IngestServer::new(service)
        .max_decoding_message_size(config.grpc.max_message_bytes)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Zstd);

    // Remote write: registered before the first stream is accepted, so every live batch is
    // exported; started after everything that can still fail.
    let exporters =
        Arc::new(Exporters::start(&config.export.remote_write, &config.data_dir).await?);
    for exporter in exporters.all() {
        store.add_sink(exporter.clone());
    }
    let metrics_exporters = exporters.clone();
    telemetry.add_writer(Arc::new(move |out: &mut String| {
        metrics_exporters.write_metrics(out)
    }));

    let (connections_tx, connections_rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(
        listener,
        acceptor,
        connections_tx,
        audit,
        counters.clone(),
        shutdown_rx.clone(),
    ));
    let checkpointer = Some(tokio::spawn(crate::storage::checkpoint_loop(
        store.clone(),
        wal.clone(),
        config.storage.checkpoint_interval,
        shutdown_rx.clone(),
    )));
    let mut stop = shutdown_rx;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(grpc)
            .add_service(query)
            .add_optional_service(alerts_service)
            .serve_with_incoming_shutdown(ReceiverStream::new(connections_rx), async move {
                let _ = stop.wait_for(|stop| *stop).await;
            }),
    );
    tracing::info!(
        "gRPC ingest listening on {grpc_addr} ({})",
        if config.tls.plaintext {
            "plaintext"
        } else {
            "TLS"
        }
    );
    Ok(RunningAggregator {
        grpc_addr,
        http_addr,
        http_server,
        store,
        counters,
        telemetry,
        replay,
        audit_path,
        shutdown,
        server,
        wal,
        checkpointer,
        _lock: lock,
        exporters,
        alerting,
    })
}

/// TLS unless plaintext was chosen; plaintext or no authentication only on loopback unless
/// forced.
fn check_security(config: &AggregatorConfig) -> Result<Option<TlsAcceptor>, StartError> {
    let tls_config = &config.tls;
    let insecure = |what: &str| {
        if config.grpc.listen.ip().is_loopback() || tls_config.allow_insecure_non_loopback {
            Ok(())
        } else {
            Err(StartError::Insecure(format!(
                "{what} on non-loopback address {}: anyone who reaches it could write as any \
                 node; listen on 127.0.0.1, configure TLS and tokens, or set \
                 tls.allow_insecure_non_loopback = true",
                config.grpc.listen
            )))
        }
    };
    let acceptor = match (
        &tls_config.cert_file,
        &tls_config.key_file,
        tls_config.plaintext,
    ) {
        (Some(_), Some(_), true) => {
            return Err(StartError::Insecure(
                "tls.plaintext = true and a TLS certificate are both configured; choose one".into(),
            ));
        }
        (Some(cert), Some(key), false) => {
            let server = tls::server_config(cert, key, tls_config.client_ca_file.as_deref())?;
            Some(TlsAcceptor::from(Arc::new(server)))
        }
        (Some(_), None, _) | (None, Some(_), _) => {
            return Err(StartError::Insecure(
                "tls.cert_file and tls.key_file go together; set both".into(),
            ));
        }
        (None, None, false) => {
            return Err(StartError::Insecure(
                "no TLS certificate configured: set tls.cert_file and tls.key_file, or \
                 tls.plaintext = true to serve without TLS (loopback only unless \
                 tls.allow_insecure_non_loopback = true)"
                    .into(),
            ));
        }
        (None, None, true) => {
            if tls_config.client_ca_file.is_some() {
                return Err(StartError::Insecure(
                    "tls.client_ca_file needs TLS (tls.cert_file and tls.key_file)".into(),
                ));
            }
            insecure("plaintext gRPC")?;
            None
        }
    };
    if config.auth.tokens_file.is_none() && tls_config.client_ca_file.is_none() {
        insecure("no authentication (neither auth.tokens_file nor tls.client_ca_file)")?;
    }
    if let Some(http) = config.http.listen
        && !http.ip().is_loopback()
        && config.auth.tokens_file.is_none()
        && !tls_config.allow_insecure_non_loopback
    {
        return Err(StartError::Insecure(format!(
            "the HTTP query API on non-loopback address {http} without auth.tokens_file: anyone \
             who reaches it could read every node's telemetry; listen on 127.0.0.1, configure \
             tokens (readers then need a reader token), or set tls.allow_insecure_non_loopback = true"
        )));
    }
    Ok(acceptor)
}
