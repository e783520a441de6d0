//! The sender against an in-process fake aggregator: spooled batches are resent after a
//! reconnect oldest first, nothing lost and nothing doubled; an aggregator that is down at
//! start gets everything once it is up; UNKNOWN_SERIES makes the agent declare its series
//! again. (Cross-process tests against the real `vigil-aggregator` live in tests/.)

mod fake_aggregator;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use fake_aggregator::{Behaviour, free_address, start_aggregator, start_aggregator_with_tls};
use tokio::sync::watch;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use vigil_agent::{
    sample::{Labels, Sample, SampleValue},
    transport::{
        Compression,
        encode::BatchEncoder,
        sender::{Backoff, SenderFeedback, SenderSettings, run_sender},
        spool::Spool,
    },
};
use vigil_proto::v1::{Batch, Hello};

struct Agent {
    spool: Arc<Mutex<Spool>>,
    spooled: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    feedback: Arc<SenderFeedback>,
    sender: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

fn start_agent(address: SocketAddr, compression: Compression, prefill: u64) -> Agent {
    start_agent_with(
        vec![format!("http://{address}")],
        None,
        compression,
        prefill,
    )
}

fn start_agent_with(
    endpoints: Vec<String>,
    tls: Option<ClientTlsConfig>,
    compression: Compression,
    prefill: u64,
) -> Agent {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 64 << 20).unwrap();
    for sequence in 1..=prefill {
        spool.append(&numbered_batch(sequence)).unwrap();
    }
    let settings = SenderSettings {
        endpoints,
        tls,
        token: Some("test-token".into()),
        compression,
        hello: Hello {
            node: "gpu-node-7".into(),
            agent_version: "test".into(),
            boot_id: "boot".into(),
            agent_instance: spool.agent_instance().to_string(),
            capabilities: vec![],
        },
        backoff: Backoff {
            min: Duration::from_millis(50),
            max: Duration::from_millis(200),
        },
        shutdown_grace: Duration::from_secs(1),
    };
    let spool = Arc::new(Mutex::new(spool));
    let (spooled, spooled_rx) = watch::channel(0);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let feedback = Arc::new(SenderFeedback::default());
    let sender = tokio::spawn(run_sender(
        settings,
        spool.clone(),
        spooled_rx,
        shutdown_rx,
        feedback.clone(),
    ));
    Agent {
        spool,
        spooled,
        shutdown,
        feedback,
        sender,
        _dir: dir,
    }
}

fn numbered_batch(sequence: u64) -> Batch {
    Batch {
        sequence,
        base_time_ms: sequence as i64 * 1000,
        ..Default::default()
    }
}

impl Agent {
    fn append(&self, batch: Batch) {
        let sequence = batch.sequence;
        self.spool.lock().unwrap().append(&batch).unwrap();
        self.spooled.send(sequence).unwrap();
    }

    async fn wait_acked(&self, sequence: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.spool.lock().unwrap().acked() < sequence {
            assert!(
                tokio::time::Instant::now() < deadline,
                "batch {sequence} not acked within 20 s (acked: {})",
                self.spool.lock().unwrap().acked()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.sender)
            .await
            .expect("the sender stops after shutdown")
            .unwrap();
    }
}

#[tokio::test]
async fn spooled_batches_are_resent_after_a_reconnect_oldest_first_nothing_lost_or_doubled() {
    let address = free_address().await;
    let (record, _server) = start_aggregator(
        address,
        Behaviour::BreakFirstStream {
            ack_until: 4,
            break_at: 7,
        },
    )
    .await;
    let agent = start_agent(address, Compression::Zstd, 10);
    agent.wait_acked(4).await;
    for sequence in 11..=20 {
        agent.append(numbered_batch(sequence));
    }
    agent.wait_acked(20).await;

    {
        let record = record.lock().unwrap();
        assert!(record.received.len() >= 2, "reconnected");
        let first = &record.received[0];
        assert_eq!(first[..7], [1, 2, 3, 4, 5, 6, 7], "oldest first");
        let second = &record.received[1];
        assert_eq!(
            *second,
            (5..=20).collect::<Vec<_>>(),
            "after the reconnect: the unacked batches oldest first, then live ones, each once"
        );
        assert_eq!(
            record.stored.keys().copied().collect::<Vec<_>>(),
            (1..=20).collect::<Vec<_>>(),
            "nothing lost"
        );
        for sequence in 1..=4 {
            let times = record
                .received
                .iter()
                .flatten()
                .filter(|&&s| s == sequence)
                .count();
            assert_eq!(times, 1, "acked batch {sequence} is never resent");
        }
        assert_eq!(
            record.hellos.len(),
            record.received.len(),
            "a hello per stream"
        );
        let instance = agent.spool.lock().unwrap().agent_instance().to_string();
        assert!(record.hellos.iter().all(|h| h.agent_instance == instance));
        assert!(record.hellos.iter().all(|h| h.node == "gpu-node-7"));
        assert!(
            record
                .authorization
                .iter()
                .all(|a| a.as_deref() == Some("Bearer test-token"))
        );
    }
    assert_eq!(agent.spool.lock().unwrap().unacked_batches(), 0, "trimmed");
    agent.stop().await;
}

#[tokio::test]
async fn an_aggregator_down_at_start_gets_everything_once_it_is_up() {
    let address = free_address().await;
    let agent = start_agent(address, Compression::Gzip, 5);
    for sequence in 6..=8 {
        agent.append(numbered_batch(sequence));
    }
    // A few failed connects with backoff.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(agent.spool.lock().unwrap().acked(), 0);
    let (record, _server) = start_aggregator(address, Behaviour::AckAll).await;
    agent.append(numbered_batch(9));
    agent.append(numbered_batch(10));
    agent.wait_acked(10).await;

    {
        let record = record.lock().unwrap();
        let all: Vec<u64> = record.received.iter().flatten().copied().collect();
        assert_eq!(
            all,
            (1..=10).collect::<Vec<_>>(),
            "each batch once, in order"
        );
    }
    agent.stop().await;
}

#[tokio::test]
async fn unknown_series_makes_the_next_batch_declare_every_series_again() {
    let address = free_address().await;
    let (record, _server) = start_aggregator(address, Behaviour::ForgetFirstDeclarations).await;
    let agent = start_agent(address, Compression::None, 0);
    let mut encoder = BatchEncoder::new(1);
    let pass: Vec<Sample> = ["vigil_a", "vigil_b", "vigil_c"]
        .into_iter()
        .map(|name| Sample {
            name,
            labels: Labels::new(),
            value: SampleValue::Value(1.0),
        })
        .collect();
    for sequence in 1..=4 {
        if agent.feedback.take_redeclare() {
            encoder.redeclare_all();
        }
        agent.append(encoder.encode(sequence, sequence as i64 * 1000, &pass, &[]));
        agent.wait_acked(sequence).await;
    }

    {
        let record = record.lock().unwrap();
        assert_eq!(
            record.rejections,
            [(2, vec![1, 2, 3])],
            "only batch 2 refers to series the aggregator lost"
        );
        let declared = |sequence: u64| -> Vec<u64> {
            record.stored[&sequence]
                .series
                .iter()
                .map(|s| s.id)
                .collect()
        };
        assert_eq!(declared(1), [1, 2, 3]);
        assert!(declared(2).is_empty());
        assert_eq!(
            declared(3),
            [1, 2, 3],
            "declared again after UNKNOWN_SERIES"
        );
        assert!(declared(4).is_empty(), "and then not again");
    }
    assert_eq!(
        agent.feedback.rejected_samples().get("unknown_series"),
        Some(&3)
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_dead_first_endpoint_fails_over_to_the_next() {
    let dead = free_address().await;
    let address = free_address().await;
    let (record, _server) = start_aggregator(address, Behaviour::AckAll).await;
    let agent = start_agent_with(
        vec![format!("http://{dead}"), format!("http://{address}")],
        None,
        Compression::Zstd,
        3,
    );
    agent.wait_acked(3).await;
    {
        let record = record.lock().unwrap();
        let all: Vec<u64> = record.received.iter().flatten().copied().collect();
        assert_eq!(all, [1, 2, 3]);
    }
    agent.stop().await;
}

fn pki(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/tls-pki/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn server_tls() -> ServerTlsConfig {
    ServerTlsConfig::new()
        .identity(Identity::from_pem(
            pki("aggregator.crt"),
            pki("aggregator.key"),
        ))
        .client_ca_root(Certificate::from_pem(pki("ca.crt")))
        .client_auth_optional(true)
}

#[tokio::test]
async fn mutual_tls_with_a_trusted_ca_delivers_and_presents_the_client_certificate() {
    let address = free_address().await;
    let (record, _server) =
        start_aggregator_with_tls(address, Behaviour::AckAll, Some(server_tls())).await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki("ca.crt")))
        .identity(Identity::from_pem(pki("node.crt"), pki("node.key")));
    let agent = start_agent_with(
        vec![format!("https://{address}")],
        Some(tls),
        Compression::Zstd,
        3,
    );
    agent.wait_acked(3).await;
    {
        let record = record.lock().unwrap();
        assert_eq!(record.client_certificates, [true]);
        assert_eq!(
            record.authorization[0].as_deref(),
            Some("Bearer test-token")
        );
    }
    agent.stop().await;
}

#[tokio::test]
async fn an_aggregator_certificate_from_an_unknown_ca_is_refused() {
    let address = free_address().await;
    let (record, _server) =
        start_aggregator_with_tls(address, Behaviour::AckAll, Some(server_tls())).await;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pki("other-ca.crt")));
    let agent = start_agent_with(
        vec![format!("https://{address}")],
        Some(tls),
        Compression::Zstd,
        3,
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(agent.spool.lock().unwrap().acked(), 0);
    assert!(record.lock().unwrap().hellos.is_empty(), "no stream opened");
    assert_eq!(agent.spool.lock().unwrap().unacked_batches(), 3, "kept");
    agent.stop().await;
}
