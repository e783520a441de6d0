//! A fake aggregator for the transport tests: an in-process `Ingest` server that records what
//! it receives, stores each batch once and acks, with a few scripted misbehaviours.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
};

use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream, wrappers::TcpListenerStream};
use tonic::{
    Request, Response, Status, Streaming, codec::CompressionEncoding, transport::ServerTlsConfig,
};
use vigil_proto::delta::DeltaDecoder;
use vigil_proto::v1::{
    Ack, AgentMessage, AggregatorMessage, Batch, Hello, Rejection, Series, agent_message,
    aggregator_message,
    ingest_server::{Ingest, IngestServer},
    rejection::Reason,
};

/// What the fake aggregator does with what it receives.
#[derive(Clone, Copy)]
pub enum Behaviour {
    /// Store and ack every batch.
    AckAll,
    /// On the first connection, ack batches up to `ack_until`, then break the stream when
    /// batch `break_at` arrives (without storing it); ack everything on later connections.
    BreakFirstStream { ack_until: u64, break_at: u64 },
    /// Lose the series declarations after storing batch 1 (as an aggregator that lost its
    /// series dictionary) and reject samples of undeclared series with UNKNOWN_SERIES.
    ForgetFirstDeclarations,
    /// On the first connection, ack batches up to `ack_until`, then break the stream when a
    /// later batch arrives (without storing it); refuse every later connection (`unavailable`),
    /// as an aggregator that went away.
    FailAfter { ack_until: u64 },
}

/// Whether the fake aggregator offers the stream-delta encoding.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum DeltaOffer {
    /// Offer it and decode blocks, as the real aggregator does.
    Offered,
    /// No offer, as an aggregator from before the encoding.
    NotOffered,
    /// Offer it, but end the first stream that carries a block as if it did not decode.
    RefusedOnce,
}

#[derive(Default)]
pub struct Record {
    /// Per connection, how many batches arrived delta-coded.
    pub delta_coded: Vec<usize>,
    pub hellos: Vec<Hello>,
    pub authorization: Vec<Option<String>>,
    /// Per connection, whether the client presented a certificate (mutual TLS).
    pub client_certificates: Vec<bool>,
    /// Per connection, the sequences received in order.
    pub received: Vec<Vec<u64>>,
    /// Stored batches by sequence, each stored once.
    pub stored: BTreeMap<u64, Batch>,
    pub declared: HashSet<u64>,
    pub rejections: Vec<(u64, Vec<u64>)>,
    /// Per connection, the series ids each received batch declared: (sequence, ids).
    pub declarations: Vec<Vec<(u64, Vec<u64>)>>,
    /// Strict mode: the series dictionary of this aggregator (for the one agent instance).
    pub dictionary: HashMap<u64, Series>,
    /// Strict mode: ids declared again with another content (an agent must never do that).
    pub conflicts: Vec<u64>,
    /// Connections refused (`FailAfter`).
    pub refused: usize,
}

#[derive(Clone)]
struct FakeAggregator {
    behaviour: Behaviour,
    /// Like the real aggregator: samples and histograms of series never declared to this
    /// aggregator are rejected with UNKNOWN_SERIES and not stored; a repeated identical
    /// declaration is a no-op, a conflicting one is refused (and recorded).
    strict: bool,
    delta: DeltaOffer,
    record: Arc<Mutex<Record>>,
}

#[tonic::async_trait]
impl Ingest for FakeAggregator {
    type StreamStream = Pin<Box<dyn Stream<Item = Result<AggregatorMessage, Status>> + Send>>;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let connection = {
            let mut record = self.record.lock().unwrap();
            if matches!(self.behaviour, Behaviour::FailAfter { .. }) && !record.received.is_empty()
            {
                record.refused += 1;
                return Err(Status::unavailable("fake aggregator gone"));
            }
            record.authorization.push(
                request
                    .metadata()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_string()),
            );
            record
                .client_certificates
                .push(request.peer_certs().is_some_and(|c| !c.is_empty()));
            record.received.push(Vec::new());
            record.delta_coded.push(0);
            record.declarations.push(Vec::new());
            record.received.len() - 1
        };
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        let record = self.record.clone();
        let behaviour = self.behaviour;
        let strict = self.strict;
        let offer = self.delta;
        tokio::spawn(async move {
            let mut decoder = DeltaDecoder::new(1 << 20);
            while let Ok(Some(message)) = inbound.message().await {
                let batch = match message.body {
                    Some(agent_message::Body::Hello(hello)) => {
                        record.lock().unwrap().hellos.push(hello);
                        continue;
                    }
                    Some(agent_message::Body::Batch(batch)) => batch,
                    None => continue,
                };
                let mut batch = batch;
                let sequence = batch.sequence;
                if batch.delta.is_some() {
                    let mut record = record.lock().unwrap();
                    if offer == DeltaOffer::NotOffered {
                        panic!("batch {sequence}: a delta block the aggregator never offered");
                    }
                    if offer == DeltaOffer::RefusedOnce
                        && !record.delta_coded.iter().any(|&n| n > 0)
                    {
                        record.received[connection].push(sequence);
                        let _ = tx.try_send(Err(Status::invalid_argument(format!(
                            "batch {sequence}: undecodable delta block: refused by the test"
                        ))));
                        return;
                    }
                    record.delta_coded[connection] += 1;
                }
                if let Err(error) = decoder.decode(&mut batch) {
                    let _ = tx
                        .send(Err(Status::invalid_argument(error.to_string())))
                        .await;
                    return;
                }
                let mut answers = Vec::new();
                let mut break_stream = false;
                {
                    let mut record = record.lock().unwrap();
                    record.received[connection].push(sequence);
                    let ids = batch.series.iter().map(|s| s.id).collect();
                    record.declarations[connection].push((sequence, ids));
                    match behaviour {
                        Behaviour::BreakFirstStream { break_at, .. }
                            if connection == 0 && sequence == break_at =>
                        {
                            break_stream = true;
                        }
                        Behaviour::FailAfter { ack_until } if sequence > ack_until => {
                            break_stream = true;
                        }
                        _ => {}
                    }
                    if strict && !break_stream {
                        let record = &mut *record;
                        let mut accepted = Vec::new();
                        for series in std::mem::take(&mut batch.series) {
                            match record.dictionary.get(&series.id) {
                                Some(known) if *known != series => record.conflicts.push(series.id),
                                _ => {
                                    record.dictionary.insert(series.id, series.clone());
                                    accepted.push(series);
                                }
                            }
                        }
                        batch.series = accepted;
                        let known = |id: &u64| record.dictionary.contains_key(id);
                        let mut unknown: Vec<u64> = batch
                            .samples
                            .iter()
                            .map(|s| s.series_id)
                            .chain(batch.histograms.iter().map(|h| h.series_id))
                            .filter(|id| !known(id))
                            .collect();
                        let rejected = unknown.len();
                        batch.samples.retain(|s| known(&s.series_id));
                        batch.histograms.retain(|h| known(&h.series_id));
                        unknown.sort_unstable();
                        unknown.dedup();
                        if rejected > 0 {
                            record.rejections.push((sequence, unknown.clone()));
                            answers.push(aggregator_message::Body::Rejection(Rejection {
                                sequence,
                                reason: Reason::UnknownSeries as i32,
                                message: "series never declared".into(),
                                rejected_samples: rejected as u32,
                                series_ids: unknown,
                            }));
                        }
                    }
                    if !break_stream {
                        let ids: Vec<u64> = batch.series.iter().map(|s| s.id).collect();
                        record.declared.extend(ids);
                    }
                    if matches!(behaviour, Behaviour::ForgetFirstDeclarations) {
                        let unknown: Vec<u64> = batch
                            .samples
                            .iter()
                            .map(|s| s.series_id)
                            .filter(|id| !record.declared.contains(id))
                            .collect();
                        if !unknown.is_empty() {
                            record.rejections.push((sequence, unknown.clone()));
                            answers.push(aggregator_message::Body::Rejection(Rejection {
                                sequence,
                                reason: Reason::UnknownSeries as i32,
                                message: "declare your series again".into(),
                                rejected_samples: unknown.len() as u32,
                                series_ids: unknown,
                            }));
                        }
                        if sequence == 1 {
                            record.declared.clear();
                        }
                    }
                    // Resends of stored batches are recognised and not stored twice.
                    if !break_stream {
                        record.stored.entry(sequence).or_insert(batch);
                    }
                    let ack = match behaviour {
                        Behaviour::BreakFirstStream { ack_until, .. } if connection == 0 => {
                            (sequence <= ack_until).then_some(sequence)
                        }
                        Behaviour::FailAfter { .. } if break_stream => None,
                        _ => Some(sequence),
                    };
                    if let Some(sequence) = ack {
                        answers.push(aggregator_message::Body::Ack(Ack { sequence }));
                    }
                }
                if break_stream {
                    let _ = tx.send(Err(Status::unavailable("fake restart"))).await;
                    return;
                }
                for body in answers {
                    if tx
                        .send(Ok(AggregatorMessage { body: Some(body) }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        let mut response = Response::new(Box::pin(ReceiverStream::new(rx)) as Self::StreamStream);
        if offer != DeltaOffer::NotOffered {
            vigil_proto::delta::offer(response.metadata_mut());
        }
        Ok(response)
    }
}

pub async fn start_aggregator(
    address: SocketAddr,
    behaviour: Behaviour,
) -> (Arc<Mutex<Record>>, tokio::task::JoinHandle<()>) {
    start_aggregator_with_tls(address, behaviour, None).await
}

/// A fake aggregator that, like the real one, rejects samples of series never declared to it.
pub async fn start_strict_aggregator(
    address: SocketAddr,
    behaviour: Behaviour,
) -> (Arc<Mutex<Record>>, tokio::task::JoinHandle<()>) {
    start(address, behaviour, None, true, DeltaOffer::Offered).await
}

/// A fake aggregator with the given stance on the stream-delta encoding.
pub async fn start_aggregator_with_delta(
    address: SocketAddr,
    behaviour: Behaviour,
    delta: DeltaOffer,
) -> (Arc<Mutex<Record>>, tokio::task::JoinHandle<()>) {
    start(address, behaviour, None, false, delta).await
}

pub async fn start_aggregator_with_tls(
    address: SocketAddr,
    behaviour: Behaviour,
    tls: Option<ServerTlsConfig>,
) -> (Arc<Mutex<Record>>, tokio::task::JoinHandle<()>) {
    start(address, behaviour, tls, false, DeltaOffer::Offered).await
}

async fn start(
    address: SocketAddr,
    behaviour: Behaviour,
    tls: Option<ServerTlsConfig>,
    strict: bool,
    delta: DeltaOffer,
) -> (Arc<Mutex<Record>>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(address).await.unwrap();
    let record = Arc::new(Mutex::new(Record::default()));
    let service = IngestServer::new(FakeAggregator {
        behaviour,
        strict,
        delta,
        record: record.clone(),
    })
    .accept_compressed(CompressionEncoding::Zstd)
    .accept_compressed(CompressionEncoding::Gzip);
    let server = tokio::spawn(async move {
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).unwrap();
        }
        builder
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (record, server)
}

pub async fn free_address() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}
