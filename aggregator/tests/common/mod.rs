//! Helpers for the aggregator's integration tests: an aggregator in-process on 127.0.0.1 with a
//! free port, a real tonic client, batches, and test certificates made at test time.
#![allow(dead_code)] // each test file uses its own part

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Status, Streaming,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use vigil_aggregator::{AggregatorConfig, RunningAggregator};
use vigil_proto::v1::{
    Ack, AgentMessage, AggregatorMessage, Batch, Hello, Label, MetricType, Rejection, Sample,
    Series, agent_message, aggregator_message, ingest_client::IngestClient,
};

/// A plaintext loopback config on a free port, without authentication.
pub fn plaintext_config(data_dir: &Path) -> AggregatorConfig {
    let mut config = AggregatorConfig {
        data_dir: data_dir.to_owned(),
        ..AggregatorConfig::default()
    };
    config.grpc.listen = "127.0.0.1:0".parse().unwrap();
    config.tls.plaintext = true;
    config
}

pub async fn start(config: &AggregatorConfig) -> RunningAggregator {
    vigil_aggregator::start(config)
        .await
        .unwrap_or_else(|error| panic!("aggregator did not start: {error}"))
}

pub async fn plaintext_channel(aggregator: &RunningAggregator) -> Channel {
    Endpoint::from_shared(format!("http://{}", aggregator.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .expect("connect to the aggregator")
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub fn hello(node: &str, agent_instance: &str) -> Hello {
    Hello {
        node: node.into(),
        agent_version: "test".into(),
        boot_id: "boot-1".into(),
        agent_instance: agent_instance.into(),
        capabilities: Vec::new(),
    }
}

pub fn declare(id: u64, name: &str, labels: &[(&str, &str)], metric_type: MetricType) -> Series {
    Series {
        id,
        name: name.into(),
        labels: labels
            .iter()
            .map(|(name, value)| Label {
                name: name.to_string(),
                value: value.to_string(),
            })
            .collect(),
        r#type: metric_type as i32,
    }
}

pub fn sample(series_id: u64, time_delta_ms: i64, value: f64) -> Sample {
    Sample {
        series_id,
        time_delta_ms,
        value,
    }
}

/// A batch at `now`, with the given declarations and samples.
pub fn batch(sequence: u64, series: Vec<Series>, samples: Vec<Sample>) -> Batch {
    Batch {
        sequence,
        series,
        base_time_ms: now_ms(),
        samples,
        ..Batch::default()
    }
}

/// One open `Ingest.Stream`, seen from the agent's side.
pub struct AgentStream {
    outbound: mpsc::Sender<AgentMessage>,
    inbound: Streaming<AggregatorMessage>,
}

/// Opens a stream whose first message is `first` (normally a Hello), with an optional bearer
/// token; the error is the status the aggregator answered with.
pub async fn open_with(
    channel: Channel,
    first: agent_message::Body,
    token: Option<&str>,
) -> Result<AgentStream, Status> {
    let (outbound, rx) = mpsc::channel(64);
    outbound
        .send(AgentMessage { body: Some(first) })
        .await
        .unwrap();
    let mut request = Request::new(ReceiverStream::new(rx));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let response = IngestClient::new(channel).stream(request).await?;
    Ok(AgentStream {
        outbound,
        inbound: response.into_inner(),
    })
}

pub async fn open(
    channel: Channel,
    hello: Hello,
    token: Option<&str>,
) -> Result<AgentStream, Status> {
    open_with(channel, agent_message::Body::Hello(hello), token).await
}

/// A stream over plaintext, opened with `hello` and no token.
pub async fn open_plaintext(aggregator: &RunningAggregator, hello: Hello) -> AgentStream {
    open(plaintext_channel(aggregator).await, hello, None)
        .await
        .expect("stream accepted")
}

impl AgentStream {
    pub async fn send(&self, batch: Batch) {
        self.outbound
            .send(AgentMessage {
                body: Some(agent_message::Body::Batch(batch)),
            })
            .await
            .expect("stream open");
    }

    /// The next message from the aggregator (an error status ends the stream).
    pub async fn next(&mut self) -> Result<Option<AggregatorMessage>, Status> {
        tokio::time::timeout(Duration::from_secs(10), self.inbound.message())
            .await
            .expect("the aggregator answers within 10 s")
    }

    /// Reads until the Ack of `sequence`, returning the Rejections before it.
    pub async fn until_ack(&mut self, sequence: u64) -> Vec<Rejection> {
        let mut rejections = Vec::new();
        loop {
            let message = self
                .next()
                .await
                .unwrap_or_else(|status| panic!("stream failed before ack {sequence}: {status:?}"))
                .unwrap_or_else(|| panic!("stream ended before ack {sequence}"));
            match message.body {
                Some(aggregator_message::Body::Ack(Ack { sequence: acked })) => {
                    assert_eq!(acked, sequence, "acks come in batch order");
                    return rejections;
                }
                Some(aggregator_message::Body::Rejection(rejection)) => rejections.push(rejection),
                None => panic!("an empty AggregatorMessage"),
            }
        }
    }

    /// Sends a batch and waits for its ack, returning the rejections.
    pub async fn store(&mut self, batch: Batch) -> Vec<Rejection> {
        let sequence = batch.sequence;
        self.send(batch).await;
        self.until_ack(sequence).await
    }

    /// The status that ends the stream.
    pub async fn end_status(&mut self) -> Status {
        loop {
            match self.next().await {
                Err(status) => return status,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without an error status"),
            }
        }
    }
}

/// Lines of the audit log as JSON values.
pub fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("audit lines are JSON"))
        .collect()
}

/// A test PKI: a CA, a server certificate for localhost/127.0.0.1, client certificates per
/// node, and a second CA nobody trusts.
pub struct TestPki {
    pub dir: PathBuf,
    pub ca_pem: String,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    rogue_ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

fn new_ca(name: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap()
}

impl TestPki {
    pub fn new(dir: &Path) -> TestPki {
        let ca = new_ca("Vigil test CA");
        let ca_pem = ca.pem();
        std::fs::write(dir.join("ca.pem"), &ca_pem).unwrap();
        let pki = TestPki {
            dir: dir.to_owned(),
            ca_pem,
            ca,
            rogue_ca: new_ca("Rogue CA"),
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &pki.ca).unwrap();
        std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        pki
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A client identity for `node` (CN and DNS SAN), signed by the trusted CA or the rogue one.
    pub fn client_identity(&self, node: &str, trusted: bool) -> Identity {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![node.to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, node);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let issuer = if trusted { &self.ca } else { &self.rogue_ca };
        let cert = params.signed_by(&key, issuer).unwrap();
        Identity::from_pem(cert.pem(), key.serialize_pem())
    }

    /// A TLS channel to the aggregator, trusting the test CA, optionally with a client identity.
    pub async fn channel(
        &self,
        aggregator: &RunningAggregator,
        identity: Option<Identity>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost");
        if let Some(identity) = identity {
            tls = tls.identity(identity);
        }
        Endpoint::from_shared(format!("https://{}", aggregator.grpc_addr()))
            .unwrap()
            .tls_config(tls)?
            .connect()
            .await
    }
}
