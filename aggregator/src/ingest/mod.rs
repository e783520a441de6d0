//! `Ingest.Stream`: authenticates a stream, reads its Hello, then admits each batch
//! ([`admission`]) and answers with Rejections and, once the batch is durable, an Ack.
//!
//! Each stream has two halves: the reader admits batches as they arrive (so an agent may send
//! several before the first ack), and the acker answers them in order as the write-ahead log's
//! group commits make them durable.

pub mod admission;
pub mod counters;

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use vigil_proto::delta::DeltaDecoder;
use vigil_proto::v1::{
    Ack, AgentMessage, AggregatorMessage, Hello, agent_message, aggregator_message,
    ingest_server::Ingest,
};

use self::{
    admission::{Admission, Limits, Writer},
    counters::IngestCounters,
};
use crate::{
    nodes::{NodePresence, NodeRegistry},
    security::{AuditEntry, AuditLog, Authenticator, ConnectionInfo},
    storage::{Store, Wal},
};

/// Longest node name and agent instance id accepted in a Hello.
const MAX_NODE_NAME: usize = 253;
const MAX_AGENT_INSTANCE: usize = 128;

/// The `Ingest` gRPC service (wrap it in `IngestServer`).
#[derive(Clone)]
pub struct IngestService(pub(crate) Arc<IngestShared>);

impl std::ops::Deref for IngestService {
    type Target = IngestShared;

    fn deref(&self) -> &IngestShared {
        &self.0
    }
}

/// Everything the streams share.
pub struct IngestShared {
    pub(crate) store: Arc<Store>,
    pub(crate) wal: Arc<Wal>,
    pub(crate) counters: Arc<IngestCounters>,
    pub(crate) limits: Limits,
    pub(crate) authenticator: Authenticator,
    pub(crate) audit: Arc<AuditLog>,
    pub(crate) hello_timeout: Duration,
    pub(crate) max_message_bytes: usize,
    /// Turns true when the aggregator shuts down: streams end with `unavailable`.
    pub(crate) shutdown: watch::Receiver<bool>,
    /// The fleet inventory: Hellos, batches and stream ends update it.
    pub(crate) nodes: Arc<NodeRegistry>,
}

/// A stream's Hello, checked and authorised.
struct OpenStream {
    node: String,
    agent_instance: String,
    peer: Option<std::net::SocketAddr>,
    who: String,
    /// The node counts as connected until the reader half ends and drops this.
    _presence: NodePresence,
}

/// What the reader hands the acker, in batch order.
enum Reply {
    Admitted(Admission),
    End(Status),
}

type Replies = mpsc::Sender<Result<AggregatorMessage, Status>>;

#[tonic::async_trait]
impl Ingest for IngestService {
    type StreamStream = ReceiverStream<Result<AggregatorMessage, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let connection = request.extensions().get::<ConnectionInfo>().cloned();
        let peer = connection.as_ref().map(|info| info.peer);
        let deny = |who: Option<String>, hello: Option<&Hello>, status: Status| {
            let counter = match status.code() {
                Code::Unauthenticated => &self.counters.streams_unauthenticated,
                Code::PermissionDenied => &self.counters.streams_permission_denied,
                _ => &self.counters.streams_invalid,
            };
            IngestCounters::add(counter, 1);
            self.audit.record(AuditEntry {
                event: "stream",
                outcome: "denied",
                peer,
                who,
                node: hello.map(|hello| hello.node.clone()),
                agent_instance: hello.map(|hello| hello.agent_instance.clone()),
                code: Some(code_name(status.code())),
                detail: Some(status.message().to_string()),
                ..AuditEntry::default()
            });
            status
        };
        let caller = self
            .authenticator
            .authenticate(request.metadata(), connection.as_ref())
            .map_err(|denial| deny(denial.who, None, denial.status))?;
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(self.hello_timeout, inbound.message()).await {
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no Hello within {:?} of opening the stream",
                self.hello_timeout
            ))),
            Ok(Ok(Some(AgentMessage {
                body: Some(agent_message::Body::Hello(hello)),
            }))) => Ok(hello),
            Ok(Ok(Some(_))) => Err(Status::invalid_argument(
                "the stream must open with a Hello (node, agent_version, boot_id, \
                 agent_instance) before any Batch",
            )),
            Ok(Ok(None)) => Err(Status::invalid_argument(
                "the stream ended before its Hello",
            )),
            Ok(Err(status)) => Err(self.inbound_error(status)),
        }
        .map_err(|status| deny(Some(caller.who.clone()), None, status))?;
        check_hello(&hello).map_err(|why| {
            deny(
                Some(caller.who.clone()),
                Some(&hello),
                Status::invalid_argument(why),
            )
        })?;
        caller.may_write_as(&hello.node).map_err(|why| {
            deny(
                Some(caller.who.clone()),
                Some(&hello),
                Status::permission_denied(why),
            )
        })?;
        IngestCounters::add(&self.counters.streams_accepted, 1);
        self.audit.record(AuditEntry {
            event: "stream",
            outcome: "accepted",
            peer,
            who: Some(caller.who.clone()),
            node: Some(hello.node.clone()),
            agent_instance: Some(hello.agent_instance.clone()),
            detail: Some(format!("agent {}", hello.agent_version)),
            ..AuditEntry::default()
        });
        tracing::info!(
            "stream from {} ({}) as node {} instance {}",
            peer.map(|p| p.to_string()).unwrap_or_default(),
            caller.who,
            hello.node,
            hello.agent_instance
        );

        let presence = self.nodes.connected(&hello);
        let open = OpenStream {
            _presence: presence,
            node: hello.node,
            agent_instance: hello.agent_instance,
            peer,
            who: caller.who,
        };
        let (replies_tx, replies_rx) = mpsc::channel(64);
        let (admitted_tx, admitted_rx) = mpsc::channel(256);
        tokio::spawn(self.0.clone().read_batches(open, inbound, admitted_tx));
        tokio::spawn(self.0.clone().send_replies(admitted_rx, replies_tx));
        let mut response = Response::new(ReceiverStream::new(replies_rx));
        // The offer of the stream-delta encoding: an agent uses it only when offered, so an
        // older aggregator (no header) never gets blocks it would ignore.
        vigil_proto::delta::offer(response.metadata_mut());
        Ok(response)
    }
}

impl IngestShared {
    /// The reader half: admits batches until the stream ends, fails or the server stops.
    async fn read_batches(
        self: Arc<Self>,
        open: OpenStream,
        mut inbound: Streaming<AgentMessage>,
        admitted: mpsc::Sender<Reply>,
    ) {
        let mut shutdown = self.shutdown.clone();
        let writer = Writer {
            node: &open.node,
            agent_instance: &open.agent_instance,
        };
        // Every batch of the stream goes through it, duplicates included, so its state follows
        // the agent's encoder. Room for the node's series limit, with slack for churn between
        // the encoding's sweeps.
        let mut delta = DeltaDecoder::new(self.limits.max_series_per_node.saturating_mul(2));
        loop {
            let message = tokio::select! {
                _ = stopped(&mut shutdown) => {
                    let _ = admitted
                        .send(Reply::End(Status::unavailable(
                            "the aggregator is shutting down; reconnect and resend what was not acked",
                        )))
                        .await;
                    return;
                }
                message = inbound.message() => message,
            };
            let reply = match message {
                Ok(None) => return,
                Ok(Some(AgentMessage {
                    body: Some(agent_message::Body::Batch(mut batch)),
                })) => match self.decode_delta(&mut delta, &mut batch) {
                    Err(status) => Reply::End(status),
                    Ok(()) => match admission::admit(
                        &self.store,
                        &self.wal,
                        &self.counters,
                        &self.limits,
                        &writer,
                        batch,
                        now_ms(),
                    ) {
                        Ok(admission) => {
                            self.nodes.seen(&open.node);
                            Reply::Admitted(admission)
                        }
                        Err(error) => Reply::End(Status::unavailable(error.to_string())),
                    },
                },
                Ok(Some(AgentMessage {
                    body: Some(agent_message::Body::Hello(_)),
                })) => {
                    IngestCounters::add(&self.counters.streams_invalid, 1);
                    Reply::End(Status::invalid_argument(
                        "a second Hello on one stream; open a new stream to change identity",
                    ))
                }
                Ok(Some(AgentMessage { body: None })) => {
                    // A message kind from a newer agent: ignored, as the protocol promises.
                    IngestCounters::add(&self.counters.messages_unknown, 1);
                    continue;
                }
                Err(status) => Reply::End(self.inbound_error(status)),
            };
            if let Reply::End(status) = &reply
                && matches!(
                    status.code(),
                    Code::ResourceExhausted | Code::InvalidArgument
                )
            {
                // The agent broke a rule mid-stream: a denied request, for the audit log.
                self.audit.record(AuditEntry {
                    event: "stream",
                    outcome: "denied",
                    peer: open.peer,
                    who: Some(open.who.clone()),
                    node: Some(open.node.clone()),
                    agent_instance: Some(open.agent_instance.clone()),
                    code: Some(code_name(status.code())),
                    detail: Some(status.message().to_string()),
                    ..AuditEntry::default()
                });
            }
            let ends = matches!(reply, Reply::End(_));
            if admitted.send(reply).await.is_err() || ends {
                return;
            }
        }
    }

    /// The acker half: rejections at once, acks once durable, in batch order.
    async fn send_replies(self: Arc<Self>, mut admitted: mpsc::Receiver<Reply>, replies: Replies) {
        while let Some(reply) = admitted.recv().await {
            let (sequence, lsn, rejections) = match reply {
                Reply::End(status) => {
                    let _ = replies.send(Err(status)).await;
                    return;
                }
                Reply::Admitted(Admission::Refused { rejections }) => {
                    if !send_rejections(&replies, rejections).await {
                        return;
                    }
                    continue;
                }
                Reply::Admitted(Admission::Duplicate { sequence, lsn }) => {
                    (sequence, lsn, Vec::new())
                }
                Reply::Admitted(Admission::Stored {
                    sequence,
                    lsn,
                    rejections,
                }) => (sequence, lsn, rejections),
            };
            if !send_rejections(&replies, rejections).await {
                return;
            }
            if let Err(error) = self.wal.wait_durable(lsn).await {
                let _ = replies
                    .send(Err(Status::unavailable(error.to_string())))
                    .await;
                return;
            }
            let ack = AggregatorMessage {
                body: Some(aggregator_message::Body::Ack(Ack { sequence })),
            };
            if replies.send(Ok(ack)).await.is_err() {
                return;
            }
        }
    }

    /// The status to end a stream with when reading from it failed.
    /// Decodes the batch's delta block (if any) into its samples and histograms. A block that
    /// does not decode leaves the stream's encoding state unknown: the stream ends with
    /// `invalid_argument` and the agent resends from its spool on a new stream, which starts the
    /// encoding afresh.
    fn decode_delta(
        &self,
        decoder: &mut DeltaDecoder,
        batch: &mut vigil_proto::v1::Batch,
    ) -> Result<(), Status> {
        let coded = batch.delta.is_some();
        match decoder.decode(batch) {
            Ok(()) => {
                if coded {
                    IngestCounters::add(&self.counters.batches_delta_coded, 1);
                }
                Ok(())
            }
            Err(error) => {
                IngestCounters::add(&self.counters.messages_undecodable, 1);
                Err(Status::invalid_argument(format!(
                    "batch {}: {error}; the stream's encoding state is lost: reconnect and \
                     resend what was not acked",
                    batch.sequence
                )))
            }
        }
    }

    fn inbound_error(&self, status: Status) -> Status {
        let oversize = status.code() == Code::ResourceExhausted
            || (status.code() == Code::OutOfRange && status.message().contains("too large"));
        if oversize {
            IngestCounters::add(&self.counters.messages_oversize, 1);
            return Status::resource_exhausted(format!(
                "message larger than the aggregator's limit of {} bytes (grpc.max_message_bytes): \
                 send smaller batches ({})",
                self.max_message_bytes,
                status.message()
            ));
        }
        status
    }
}

async fn send_rejections(replies: &Replies, rejections: Vec<vigil_proto::v1::Rejection>) -> bool {
    for rejection in rejections {
        let message = AggregatorMessage {
            body: Some(aggregator_message::Body::Rejection(rejection)),
        };
        if replies.send(Ok(message)).await.is_err() {
            return false;
        }
    }
    true
}

fn check_hello(hello: &Hello) -> Result<(), String> {
    let printable = |s: &str| !s.chars().any(char::is_control);
    if hello.node.is_empty() || hello.node.len() > MAX_NODE_NAME || !printable(&hello.node) {
        return Err(format!(
            "Hello.node must be 1..={MAX_NODE_NAME} printable characters (the node's name)"
        ));
    }
    if hello.agent_instance.is_empty()
        || hello.agent_instance.len() > MAX_AGENT_INSTANCE
        || !printable(&hello.agent_instance)
    {
        return Err(format!(
            "Hello.agent_instance must be 1..={MAX_AGENT_INSTANCE} printable characters (the \
             agent's spool id)"
        ));
    }
    Ok(())
}

/// Returns once the shutdown flag turns true.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission_denied",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::ResourceExhausted => "resource_exhausted",
        _ => "other",
    }
}
