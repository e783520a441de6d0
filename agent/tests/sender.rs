//! The sender against an in-process fake aggregator: spooled batches are resent after a
//! reconnect oldest first, nothing lost and nothing doubled; an aggregator that is down at
//! start gets everything once it is up; UNKNOWN_SERIES makes the agent declare its series
//! again; every stream declares the series it uses, so a failover to another aggregator, a
//! reconnect and an agent restart store every resent sample. (Cross-process tests against the real `vigil-aggregator` live in tests/.)

mod fake_aggregator;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use fake_aggregator::{
    Behaviour, DeltaOffer, Record, free_address, start_aggregator, start_aggregator_with_delta,
    start_aggregator_with_tls, start_strict_aggregator,
};
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
    start_agent_in(
        tempfile::tempdir().unwrap(),
        endpoints,
        tls,
        compression,
        (1..=prefill).map(numbered_batch).collect(),
    )
}

/// An agent on the spool in `dir` (new or left by an earlier agent), with `prefill` spooled
/// before the sender starts.
fn start_agent_in(
    dir: tempfile::TempDir,
    endpoints: Vec<String>,
    tls: Option<ClientTlsConfig>,
    compression: Compression,
    prefill: Vec<Batch>,
) -> Agent {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut spool = Spool::open(dir.path(), 64 << 20).unwrap();
    for batch in &prefill {
        spool.append(batch).unwrap();
    }
    let settings = SenderSettings {
        endpoints,
        tls,
        token: Some("test-token".into()),
        compression,
        delta_encoding: true,
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
        self.stop_keeping_spool().await;
    }

    /// Stops the sender and closes the spool; returns its directory.
    async fn stop_keeping_spool(self) -> tempfile::TempDir {
        self.shutdown.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.sender)
            .await
            .expect("the sender stops after shutdown")
            .unwrap();
        assert_eq!(Arc::strong_count(&self.spool), 1, "the sender let go");
        drop(self.spool);
        self._dir
    }
}

/// Batches 1..=10 of an encoder: series 1-3 (`vigil_a`, `vigil_b`, `vigil_c`) from batch 1,
/// series 4 (`vigil_d`) from batch 6.
fn series_batches() -> Vec<Batch> {
    let mut encoder = BatchEncoder::new(1);
    (1..=10u64)
        .map(|sequence| {
            let names: &[&'static str] = if sequence < 6 {
                &["vigil_a", "vigil_b", "vigil_c"]
            } else {
                &["vigil_a", "vigil_b", "vigil_c", "vigil_d"]
            };
            let pass: Vec<Sample> = names
                .iter()
                .enumerate()
                .map(|(i, &name)| Sample {
                    name,
                    labels: Labels::from([("gpu".to_string(), i.to_string())]),
                    value: SampleValue::Value(sequence as f64 * 10.0 + i as f64),
                })
                .collect();
            encoder.encode(sequence, sequence as i64 * 1000, &pass, &[])
        })
        .collect()
}

/// Every sample of `batches` is stored exactly once across `aggregators` (a sequence stored by
/// one only), with none rejected and no conflicting declaration.
fn assert_every_sample_stored_once(batches: &[Batch], aggregators: &[&Record]) {
    for record in aggregators {
        assert!(record.rejections.is_empty(), "{:?}", record.rejections);
        assert!(record.conflicts.is_empty(), "{:?}", record.conflicts);
    }
    for batch in batches {
        let stored: Vec<&Batch> = aggregators
            .iter()
            .filter_map(|r| r.stored.get(&batch.sequence))
            .collect();
        assert_eq!(stored.len(), 1, "batch {} stored once", batch.sequence);
        assert_eq!(
            stored[0].samples, batch.samples,
            "every sample of batch {} stored",
            batch.sequence
        );
    }
}

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "{what} within 20 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
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

#[tokio::test]
async fn failover_to_an_aggregator_that_never_saw_the_declarations_stores_every_resent_sample() {
    let first = free_address().await;
    let second = free_address().await;
    // The first aggregator stores and acks batches 1-4 (which declared series 1-3), then goes
    // away; the second one never saw those declarations.
    let (record_first, _first) =
        start_strict_aggregator(first, Behaviour::FailAfter { ack_until: 4 }).await;
    let (record_second, _second) = start_strict_aggregator(second, Behaviour::AckAll).await;
    let batches = series_batches();
    let agent = start_agent_in(
        tempfile::tempdir().unwrap(),
        vec![format!("http://{first}"), format!("http://{second}")],
        None,
        Compression::Zstd,
        batches.clone(),
    );
    agent.wait_acked(10).await;

    {
        let first = record_first.lock().unwrap();
        let second = record_second.lock().unwrap();
        assert_eq!(
            first.stored.keys().copied().collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert!(first.refused >= 1, "the first aggregator went away");
        assert_eq!(
            second.stored.keys().copied().collect::<Vec<_>>(),
            (5..=10).collect::<Vec<_>>()
        );
        assert_every_sample_stored_once(&batches, &[&first, &second]);
        let declared: Vec<(u64, Vec<u64>)> = second.declarations.concat();
        assert_eq!(
            declared,
            [
                (5, vec![1, 2, 3]),
                (6, vec![4]),
                (7, vec![]),
                (8, vec![]),
                (9, vec![]),
                (10, vec![]),
            ],
            "each series declared on the stream before its first use, once (batch 6 declares \
             series 4 itself)"
        );
    }
    assert!(agent.feedback.rejected_samples().is_empty());
    agent.stop().await;
}

#[tokio::test]
async fn a_reconnect_to_the_same_aggregator_declares_again_harmlessly() {
    let address = free_address().await;
    let (record, _server) = start_strict_aggregator(
        address,
        Behaviour::BreakFirstStream {
            ack_until: 4,
            break_at: 7,
        },
    )
    .await;
    let batches = series_batches();
    let agent = start_agent_in(
        tempfile::tempdir().unwrap(),
        vec![format!("http://{address}")],
        None,
        Compression::Gzip,
        batches.clone(),
    );
    agent.wait_acked(10).await;

    {
        let record = record.lock().unwrap();
        assert!(record.received.len() >= 2, "reconnected");
        assert_every_sample_stored_once(&batches, &[&record]);
        assert_eq!(
            record.declarations[0][..6],
            [
                (1, vec![1, 2, 3]),
                (2, vec![]),
                (3, vec![]),
                (4, vec![]),
                (5, vec![]),
                (6, vec![4]),
            ]
        );
        assert_eq!(
            record.declarations[1][..2],
            [(5, vec![1, 2, 3]), (6, vec![4])],
            "the new stream declares again what it uses (identical: a no-op)"
        );
        assert!(
            record.declarations[1][2..]
                .iter()
                .all(|(_, ids)| ids.is_empty())
        );
    }
    agent.stop().await;
}

#[tokio::test]
async fn after_an_agent_restart_resent_batches_carry_their_declarations() {
    let first = free_address().await;
    let (record_first, _first) =
        start_strict_aggregator(first, Behaviour::FailAfter { ack_until: 4 }).await;
    let batches = series_batches();
    let agent = start_agent_in(
        tempfile::tempdir().unwrap(),
        vec![format!("http://{first}")],
        None,
        Compression::Zstd,
        batches.clone(),
    );
    agent.wait_acked(4).await;
    wait_until("the first aggregator refuses a reconnect", || {
        record_first.lock().unwrap().refused >= 1
    })
    .await;
    let dir = agent.stop_keeping_spool().await;
    // The batches that declared series 1-3 are acked and trimmed.
    {
        let spool = Spool::open(dir.path(), 64 << 20).unwrap();
        assert_eq!(spool.acked(), 4);
        assert_eq!(spool.read_from(0).unwrap().unwrap().sequence, 5);
        assert_eq!(spool.next_series_id(), 5);
        assert_eq!(spool.series(1).unwrap().name, "vigil_a");
    }

    // A new agent process on the same spool, streaming to an aggregator that never saw them.
    let second = free_address().await;
    let (record_second, _second) = start_strict_aggregator(second, Behaviour::AckAll).await;
    let agent = start_agent_in(
        dir,
        vec![format!("http://{second}")],
        None,
        Compression::None,
        Vec::new(),
    );
    agent.wait_acked(10).await;
    {
        let first = record_first.lock().unwrap();
        let second = record_second.lock().unwrap();
        assert_every_sample_stored_once(&batches, &[&first, &second]);
        assert_eq!(second.declarations[0][0], (5, vec![1, 2, 3]));
        assert_eq!(second.declarations[0][1], (6, vec![4]));
    }
    agent.stop().await;
}

#[tokio::test]
async fn unknown_series_makes_the_stream_declare_those_series_again_from_the_dictionary() {
    // Safety net: the aggregator loses the declarations after batch 1; batch 2's samples are
    // rejected (UNKNOWN_SERIES). Even when the encoder does not declare them again, the sender
    // does, from the spool's dictionary, in the next batch it sends on the stream.
    let address = free_address().await;
    let (record, _server) = start_aggregator(address, Behaviour::ForgetFirstDeclarations).await;
    let agent = start_agent(address, Compression::None, 0);
    let batches = series_batches();
    for batch in &batches[..4] {
        agent.append(batch.clone());
        agent.wait_acked(batch.sequence).await;
    }
    {
        let record = record.lock().unwrap();
        assert_eq!(record.rejections, [(2, vec![1, 2, 3])]);
        let declared = |sequence: u64| -> Vec<u64> {
            record.stored[&sequence]
                .series
                .iter()
                .map(|s| s.id)
                .collect()
        };
        assert_eq!(declared(1), [1, 2, 3]);
        assert!(declared(2).is_empty());
        assert_eq!(declared(3), [1, 2, 3], "declared again by the sender");
        assert!(declared(4).is_empty(), "and then not again");
    }
    agent.stop().await;
}

/// Batches with readings that move like real ones (counters, gauges, decimals, a histogram).
fn moving_batches(count: u64) -> Vec<Batch> {
    let mut encoder = BatchEncoder::new(1);
    (1..=count)
        .map(|sequence| {
            let s = sequence as f64;
            let mut pass: Vec<Sample> = [
                ("vigil_bytes_total", 4.0e12 + s * 1.5e9),
                ("vigil_watts", (560_000.0 + (s * 7.0) % 13.0) / 1000.0),
                ("vigil_constant", 700.0),
                ("vigil_ratio", (s * 0.37).sin()),
            ]
            .into_iter()
            .map(|(name, value)| Sample {
                name,
                labels: Labels::from([("gpu".to_string(), "0".to_string())]),
                value: SampleValue::Value(value),
            })
            .collect();
            let mut histogram = vigil_agent::sample::LatencyHistogram::default();
            for k in 0..sequence * 10 {
                histogram.record(1_000 + (k * 7919) % 50_000);
            }
            pass.push(Sample {
                name: "vigil_latency_seconds",
                labels: Labels::new(),
                value: SampleValue::Histogram(histogram.snapshot()),
            });
            encoder.encode(sequence, sequence as i64 * 1000, &pass, &[])
        })
        .collect()
}

/// What each stored batch holds equals what was spooled (delta-coded or not on the wire).
fn assert_stored_as_spooled(batches: &[Batch], record: &Record) {
    for batch in batches {
        let stored = record.stored.get(&batch.sequence).expect("stored");
        assert_eq!(stored.samples, batch.samples, "batch {}", batch.sequence);
        assert_eq!(
            stored.histograms, batch.histograms,
            "batch {}",
            batch.sequence
        );
    }
}

/// Spools `count` moving batches into an agent streaming to `address`, waits until all are
/// acked, stops the agent and checks that what was stored is what was spooled.
async fn deliver_moving_batches(address: SocketAddr, record: &Mutex<Record>, count: u64) {
    let batches = moving_batches(count);
    let agent = start_agent(address, Compression::Zstd, 0);
    for batch in &batches {
        agent.append(batch.clone());
    }
    agent.wait_acked(count).await;
    agent.stop().await;
    assert_stored_as_spooled(&batches, &record.lock().unwrap());
}

#[tokio::test]
async fn offered_delta_encoding_carries_every_value_across_a_reconnect() {
    let address = free_address().await;
    let (record, _server) = start_aggregator(
        address,
        Behaviour::BreakFirstStream {
            ack_until: 6,
            break_at: 12,
        },
    )
    .await;
    deliver_moving_batches(address, &record, 30).await;
    let record = record.lock().unwrap();
    assert!(record.received.len() >= 2, "reconnected");
    assert!(
        record.delta_coded.iter().all(|&n| n > 0),
        "every stream delta-coded: {:?}",
        record.delta_coded
    );
}

#[tokio::test]
async fn an_aggregator_that_does_not_offer_delta_gets_plain_batches() {
    let address = free_address().await;
    let (record, _server) =
        start_aggregator_with_delta(address, Behaviour::AckAll, DeltaOffer::NotOffered).await;
    deliver_moving_batches(address, &record, 10).await;
    assert_eq!(record.lock().unwrap().delta_coded, [0]);
}

#[tokio::test]
async fn an_aggregator_that_cannot_decode_a_block_gets_plain_batches_from_then_on() {
    let address = free_address().await;
    let (record, _server) =
        start_aggregator_with_delta(address, Behaviour::AckAll, DeltaOffer::RefusedOnce).await;
    deliver_moving_batches(address, &record, 10).await;
    let record = record.lock().unwrap();
    assert!(record.received.len() >= 2, "the refused stream ended");
    assert_eq!(
        record.delta_coded[1..],
        vec![0; record.delta_coded.len() - 1],
        "plain after the refusal"
    );
}
