//! `vigil.v1.Query`: PromQL over gRPC ([`Query`] / `Query`), live subscriptions (`Subscribe`)
//! and the fleet inventory (`ListNodes`), served on the ingest port.
//!
//! Subscriptions hang off one `tokio::sync::broadcast` channel fed by [`LiveFeed`], an
//! [`IngestSink`]: the store hands it every batch it stores and `send` only clones an `Arc` into
//! a ring buffer, so ingest never waits for subscribers. Each subscriber has its own task that
//! filters batches with its selectors and forwards what matches; when it falls more than the
//! ring's capacity behind (its client reads too slowly), the channel drops the oldest batches for
//! it alone and the task tells the client so with a `Lagged` update.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use vigil_agent_common::histogram::{bucket_lower_bound_ns, bucket_upper_bound_ns};
use vigil_proto::v1::{
    GpuInfo, HistogramBucket, HistogramValue, Label, Lagged, ListNodesRequest, ListNodesResponse,
    ModelServerInfo, NodeEvent, NodeInfo, QueryPoint, QueryRequest, QueryResponse, QuerySeries,
    ResultType, StringResult, SubscribeData, SubscribeRequest, SubscribeUpdate, query_point,
    query_server::Query, subscribe_update,
};

use crate::{
    ingest::stopped,
    nodes::{self, NodeRegistry},
    query::{Engine, Matcher, QueryError, SampleValue, Value, value::FloatHistogram},
    security::{AuditEntry, AuditLog, ConnectionInfo, Role, TokenTable},
    storage::{IngestSink, IngestedBatch, PointValue, SeriesRef, Store, StoredEvent, StoredSeries},
};

/// Stored batches a subscriber may fall behind before it loses some (the broadcast ring).
pub const LIVE_FEED_CAPACITY: usize = 1024;
/// Updates a subscriber's task may queue for its gRPC stream before it stops reading the ring.
const SUBSCRIBER_BUFFER: usize = 16;
/// The longest expression quoted in the audit log.
const AUDIT_EXPR_CHARS: usize = 200;

/// The feed every subscriber reads: an [`IngestSink`] that puts each stored batch into a
/// broadcast ring.
pub struct LiveFeed {
    sender: broadcast::Sender<Arc<IngestedBatch>>,
}

impl LiveFeed {
    pub fn new(capacity: usize) -> LiveFeed {
        LiveFeed {
            sender: broadcast::channel(capacity).0,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<IngestedBatch>> {
        self.sender.subscribe()
    }
}

impl IngestSink for LiveFeed {
    fn on_ingested(&self, batch: &Arc<IngestedBatch>) {
        // Fails only when nobody subscribes: then there is nobody to tell.
        let _ = self.sender.send(batch.clone());
    }
}

/// The service's methods, for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    QueryInstant,
    QueryRange,
    Subscribe,
    ListNodes,
}

impl Method {
    pub const ALL: [Method; 4] = [
        Method::QueryInstant,
        Method::QueryRange,
        Method::Subscribe,
        Method::ListNodes,
    ];

    /// The name in metrics and the audit log.
    pub fn name(self) -> &'static str {
        match self {
            Method::QueryInstant => "query_instant",
            Method::QueryRange => "query_range",
            Method::Subscribe => "subscribe",
            Method::ListNodes => "list_nodes",
        }
    }
}

/// How a call ended, for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Bad input or a failed evaluation.
    Error,
    /// Refused by authentication or authorisation.
    Denied,
}

impl Outcome {
    pub const ALL: [Outcome; 3] = [Outcome::Ok, Outcome::Error, Outcome::Denied];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Denied => "denied",
        }
    }
}

/// Upper bounds (seconds) of the query duration histogram's buckets.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A fixed-bucket duration histogram updated with atomics.
#[derive(Debug, Default)]
pub struct DurationHistogram {
    /// Per bucket of [`DURATION_BUCKETS`] (not cumulative); values above the last go to count
    /// only.
    buckets: [AtomicU64; DURATION_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// A [`DurationHistogram`] at one moment, with cumulative bucket counts.
#[derive(Debug, Clone, PartialEq)]
pub struct DurationSnapshot {
    pub cumulative: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl DurationHistogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(bucket) = DURATION_BUCKETS.iter().position(|le| seconds <= *le) {
            self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub fn snapshot(&self) -> DurationSnapshot {
        // Count first: a concurrent observe may then show in a bucket but not yet in count,
        // so clamp the buckets to keep the histogram consistent (`+Inf` == count).
        let count = self.count.load(Ordering::Relaxed);
        let mut total = 0;
        let cumulative = DURATION_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(le, bucket)| {
                total += bucket.load(Ordering::Relaxed);
                (*le, total.min(count))
            })
            .collect();
        DurationSnapshot {
            cumulative,
            count,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// The Query service's own telemetry, for `/metrics`.
#[derive(Debug, Default)]
pub struct QueryStats {
    /// By [`Method`], then [`Outcome`].
    requests: [[AtomicU64; 3]; 4],
    /// Query evaluation time: instant, range.
    durations: [DurationHistogram; 2],
    subscribers: AtomicU64,
    updates_sent: AtomicU64,
    lagged_updates: AtomicU64,
    dropped_batches: AtomicU64,
}

impl QueryStats {
    fn count(&self, method: Method, outcome: Outcome) {
        self.requests[method as usize][outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Calls of `method` that ended with `outcome`.
    pub fn requests(&self, method: Method, outcome: Outcome) -> u64 {
        self.requests[method as usize][outcome as usize].load(Ordering::Relaxed)
    }

    /// Evaluation time of instant (`range == false`) or range queries.
    pub fn durations(&self, range: bool) -> DurationSnapshot {
        self.durations[usize::from(range)].snapshot()
    }

    /// Subscriptions open now.
    pub fn subscribers(&self) -> u64 {
        self.subscribers.load(Ordering::Relaxed)
    }

    /// Data updates sent to subscribers.
    pub fn updates_sent(&self) -> u64 {
        self.updates_sent.load(Ordering::Relaxed)
    }

    /// Lagged updates sent (each one gap of a slow subscriber).
    pub fn lagged_updates(&self) -> u64 {
        self.lagged_updates.load(Ordering::Relaxed)
    }

    /// Stored batches slow subscribers missed, summed over subscribers.
    pub fn dropped_batches(&self) -> u64 {
        self.dropped_batches.load(Ordering::Relaxed)
    }
}

/// The `Query` gRPC service (wrap it in `QueryServer`).
#[derive(Clone)]
pub struct QueryService(Arc<QueryShared>);

/// What the service's calls share.
pub struct QueryShared {
    pub engine: Engine,
    pub store: Arc<Store>,
    pub nodes: Arc<NodeRegistry>,
    /// With a tokens file, every call needs a `reader` or `admin` token.
    pub tokens: Option<TokenTable>,
    pub audit: Arc<AuditLog>,
    pub live: Arc<LiveFeed>,
    pub stats: Arc<QueryStats>,
    /// Turns true when the aggregator shuts down: subscriptions end with `unavailable`.
    pub shutdown: watch::Receiver<bool>,
}

impl QueryService {
    pub fn new(shared: QueryShared) -> QueryService {
        QueryService(Arc::new(shared))
    }

    /// Decides whether the caller may read, and audits the call either way.
    fn authorize<T>(
        &self,
        request: &Request<T>,
        method: Method,
        detail: Option<String>,
    ) -> Result<(), Status> {
        let connection = request.extensions().get::<ConnectionInfo>();
        let cert_who = connection
            .and_then(|info| info.certificate_names.as_ref())
            .map(|names| format!("cert:{}", names.join(",")));
        let decision = match &self.0.tokens {
            None => Ok(cert_who.unwrap_or_else(|| "anonymous".into())),
            Some(tokens) => reader_token(tokens, request.metadata(), cert_who),
        };
        let (outcome, who, code, detail) = match &decision {
            Ok(who) => ("accepted", Some(who.clone()), None, detail),
            Err((who, status)) => (
                "denied",
                who.clone(),
                Some(code_name(status.code())),
                Some(status.message().to_owned()),
            ),
        };
        self.0.audit.record(AuditEntry {
            event: method.name(),
            outcome,
            peer: connection.map(|info| info.peer),
            who,
            code,
            detail,
            ..AuditEntry::default()
        });
        decision.map(drop).map_err(|(_, status)| {
            self.0.stats.count(method, Outcome::Denied);
            status
        })
    }
}

/// Checks a bearer token for read access: `(who, status)` when refused.
fn reader_token(
    tokens: &TokenTable,
    metadata: &tonic::metadata::MetadataMap,
    cert_who: Option<String>,
) -> Result<String, (Option<String>, Status)> {
    let presented = metadata
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            // The scheme is case-insensitive (RFC 9110).
            let (scheme, token) = value.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        });
    let Some(presented) = presented else {
        return Err((
            cert_who,
            Status::unauthenticated(
                "missing bearer token: send `authorization: Bearer <token>` with a reader or \
                 admin token from the aggregator's tokens file",
            ),
        ));
    };
    let Some(entry) = tokens.find(presented) else {
        return Err((
            cert_who,
            Status::unauthenticated(
                "unknown bearer token: it is not in the aggregator's tokens file",
            ),
        ));
    };
    let token_who = format!("token:{} ({:?})", entry.name, entry.role).to_lowercase();
    let who = match cert_who {
        Some(cert) => format!("{token_who} {cert}"),
        None => token_who,
    };
    match entry.role {
        Role::Reader | Role::Admin => Ok(who),
        Role::Agent => Err((
            Some(who),
            Status::permission_denied(format!(
                "token {:?} has role agent; reading needs a reader or admin token",
                entry.name
            )),
        )),
    }
}

#[tonic::async_trait]
impl Query for QueryService {
    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<QueryResponse>, Status> {
        let method = if request.get_ref().range.is_some() {
            Method::QueryRange
        } else {
            Method::QueryInstant
        };
        let expr: String = request
            .get_ref()
            .expr
            .chars()
            .take(AUDIT_EXPR_CHARS)
            .collect();
        self.authorize(&request, method, Some(expr))?;
        let stats = self.0.stats.clone();
        let fail = |status: Status| {
            stats.count(method, Outcome::Error);
            status
        };
        let QueryRequest {
            expr,
            time_ms,
            range,
        } = request.into_inner();
        if expr.trim().is_empty() {
            return Err(fail(Status::invalid_argument(
                "bad_data: QueryRequest.expr is empty; send a PromQL expression",
            )));
        }
        if let Some(range) = &range {
            if range.step_ms <= 0 {
                return Err(fail(Status::invalid_argument(
                    "bad_data: QueryRange.step_ms must be > 0 (milliseconds between points)",
                )));
            }
            if range.end_ms < range.start_ms {
                return Err(fail(Status::invalid_argument(
                    "bad_data: QueryRange.end_ms is before start_ms",
                )));
            }
        }
        let engine = self.0.engine.clone();
        let started = Instant::now();
        // Evaluation is CPU work that may take a while: keep it off the async workers, which
        // also serve ingest.
        let result = tokio::task::spawn_blocking(move || match range {
            Some(range) => engine.range(&expr, range.start_ms, range.end_ms, range.step_ms),
            None => engine.instant(&expr, if time_ms == 0 { now_ms() } else { time_ms }),
        })
        .await
        .map_err(|error| {
            fail(Status::internal(format!(
                "query evaluation failed: {error}"
            )))
        })?;
        stats.durations[usize::from(method == Method::QueryRange)].observe(started.elapsed());
        match result {
            Ok(value) => {
                stats.count(method, Outcome::Ok);
                Ok(Response::new(query_response(value)))
            }
            Err(error) => Err(fail(query_status(&error))),
        }
    }

    type SubscribeStream = ReceiverStream<Result<SubscribeUpdate, Status>>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let detail = {
            let request = request.get_ref();
            let mut detail = request.selectors.join(" ");
            if request.include_events {
                detail.push_str(" events ");
                detail.push_str(&request.event_selectors.join(" "));
            }
            detail.chars().take(AUDIT_EXPR_CHARS).collect::<String>()
        };
        self.authorize(&request, Method::Subscribe, Some(detail))?;
        let filter = Filter::new(request.get_ref())
            .inspect_err(|_| self.0.stats.count(Method::Subscribe, Outcome::Error))?;
        self.0.stats.count(Method::Subscribe, Outcome::Ok);
        // Subscribe before answering, so everything stored after the call returns is seen.
        let feed = self.0.live.subscribe();
        let (updates, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        tokio::spawn(forward(self.0.clone(), filter, feed, updates));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        self.authorize(&request, Method::ListNodes, None)?;
        let shared = self.0.clone();
        // Reads every stored series' labels: off the async workers.
        let inventory =
            tokio::task::spawn_blocking(move || nodes::inventory(&shared.nodes, &shared.store))
                .await
                .map_err(|error| {
                    self.0.stats.count(Method::ListNodes, Outcome::Error);
                    Status::internal(format!("listing nodes failed: {error}"))
                })?;
        self.0.stats.count(Method::ListNodes, Outcome::Ok);
        let nodes = inventory
            .into_iter()
            .map(|node| {
                let state = node.state.unwrap_or_default();
                NodeInfo {
                    node: node.node,
                    agent_version: state.agent_version,
                    agent_instance: state.agent_instance,
                    boot_id: state.boot_id,
                    capabilities: state.capabilities,
                    first_seen_ms: state.first_seen_ms,
                    last_seen_ms: state.last_seen_ms,
                    connected: state.streams > 0,
                    streams: state.streams,
                    series: node.series,
                    gpus: node
                        .gpus
                        .into_iter()
                        .map(|gpu| GpuInfo {
                            index: gpu.index,
                            uuid: gpu.uuid,
                            model: gpu.model,
                        })
                        .collect(),
                    model_servers: node
                        .model_servers
                        .into_iter()
                        .map(|server| ModelServerInfo {
                            server: server.server,
                            comm: server.comm,
                            pid: server.pid,
                        })
                        .collect(),
                }
            })
            .collect();
        Ok(Response::new(ListNodesResponse { nodes }))
    }
}

/// Counts an open subscription for as long as it lives.
struct SubscriberGauge(Arc<QueryStats>);

impl SubscriberGauge {
    fn new(stats: Arc<QueryStats>) -> SubscriberGauge {
        stats.subscribers.fetch_add(1, Ordering::Relaxed);
        SubscriberGauge(stats)
    }
}

impl Drop for SubscriberGauge {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A subscriber's task: reads the feed, filters, forwards; ends when the client goes away or
/// the aggregator stops.
async fn forward(
    shared: Arc<QueryShared>,
    mut filter: Filter,
    mut feed: broadcast::Receiver<Arc<IngestedBatch>>,
    updates: mpsc::Sender<Result<SubscribeUpdate, Status>>,
) {
    let _gauge = SubscriberGauge::new(shared.stats.clone());
    let mut shutdown = shared.shutdown.clone();
    loop {
        let update = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            _ = updates.closed() => return,
            received = feed.recv() => match received {
                Ok(batch) => match filter.apply(&batch) {
                    Some(data) => subscribe_update::Body::Data(data),
                    None => continue,
                },
                Err(broadcast::error::RecvError::Lagged(dropped)) => {
                    shared.stats.lagged_updates.fetch_add(1, Ordering::Relaxed);
                    shared.stats.dropped_batches.fetch_add(dropped, Ordering::Relaxed);
                    subscribe_update::Body::Lagged(Lagged {
                        dropped_batches: dropped,
                    })
                }
                // The feed outlives every subscriber; closed means the aggregator is going.
                Err(broadcast::error::RecvError::Closed) => break,
            },
        };
        let is_data = matches!(update, subscribe_update::Body::Data(_));
        let update = SubscribeUpdate { body: Some(update) };
        // Waits while the client does not read; meanwhile the ring goes on without us.
        tokio::select! {
            _ = stopped(&mut shutdown) => break,
            sent = updates.send(Ok(update)) => match sent {
                Ok(()) if is_data => {
                    shared.stats.updates_sent.fetch_add(1, Ordering::Relaxed);
                }
                Ok(()) => {}
                Err(_) => return,
            },
        }
    }
    let _ = updates.try_send(Err(Status::unavailable(
        "the aggregator is shutting down; subscribe again to another or after the restart",
    )));
}

/// A selector: every matcher must pass.
type Selector = Vec<Matcher>;

/// What one subscription wants.
struct Filter {
    series: Vec<Selector>,
    /// `None`: no events; `Some(empty)`: every event.
    events: Option<Vec<Selector>>,
    /// Whether each series seen so far matched (series never change their labels).
    decided: HashMap<SeriesRef, bool>,
}

impl Filter {
    fn new(request: &SubscribeRequest) -> Result<Filter, Status> {
        let series = parse_selectors(&request.selectors, "selectors")?;
        let events = if request.include_events {
            Some(parse_selectors(
                &request.event_selectors,
                "event_selectors",
            )?)
        } else if !request.event_selectors.is_empty() {
            return Err(Status::invalid_argument(
                "event_selectors given without include_events = true",
            ));
        } else {
            None
        };
        if series.is_empty() && events.is_none() {
            return Err(Status::invalid_argument(
                "nothing to subscribe to: give selectors (e.g. `{__name__=~\"vigil_gpu_.*\"}`) \
                 and/or include_events = true",
            ));
        }
        Ok(Filter {
            series,
            events,
            decided: HashMap::new(),
        })
    }

    /// What of `batch` this subscriber wants; `None` when nothing.
    fn apply(&mut self, batch: &IngestedBatch) -> Option<SubscribeData> {
        let mut series: Vec<QuerySeries> = Vec::new();
        let mut index: HashMap<SeriesRef, usize> = HashMap::new();
        if !self.series.is_empty() {
            for (stored, point) in &batch.points {
                let selectors = &self.series;
                let wanted = *self.decided.entry(stored.id).or_insert_with(|| {
                    let labels = series_labels(stored);
                    selectors.iter().any(|selector| passes(selector, &labels))
                });
                if !wanted {
                    continue;
                }
                let slot = *index.entry(stored.id).or_insert_with(|| {
                    series.push(QuerySeries {
                        labels: to_labels(series_labels(stored)),
                        points: Vec::new(),
                    });
                    series.len() - 1
                });
                series[slot].points.push(QueryPoint {
                    time_ms: point.time_ms,
                    value: Some(match &point.value {
                        PointValue::Value(value) => query_point::Value::Float(*value),
                        PointValue::Histogram(histogram) => {
                            query_point::Value::Histogram(histogram_value(&histogram.into()))
                        }
                    }),
                });
            }
        }
        let events: Vec<NodeEvent> = match &self.events {
            None => Vec::new(),
            Some(selectors) => batch
                .events
                .iter()
                .filter(|event| {
                    selectors.is_empty() || {
                        let labels = event_labels(event);
                        selectors.iter().any(|selector| passes(selector, &labels))
                    }
                })
                .map(|event| NodeEvent {
                    node: event.node.clone(),
                    time_ms: event.time_ms,
                    kind: event.kind.clone(),
                    labels: to_labels(event.labels.clone()),
                    message: event.message.clone(),
                })
                .collect(),
        };
        if series.is_empty() && events.is_empty() {
            return None;
        }
        Some(SubscribeData {
            node: batch.node.clone(),
            series,
            events,
        })
    }
}

fn passes(selector: &Selector, labels: &[(String, String)]) -> bool {
    selector
        .iter()
        .all(|matcher| matcher.matches_labels(labels))
}

/// A series as queries see it: `__name__`, `node` and its labels, sorted.
fn series_labels(series: &StoredSeries) -> Vec<(String, String)> {
    let mut labels = Vec::with_capacity(series.labels.len() + 2);
    labels.push(("__name__".to_owned(), series.name.clone()));
    labels.push(("node".to_owned(), series.node.clone()));
    labels.extend(series.labels.iter().cloned());
    labels.sort();
    labels
}

/// What event selectors match: the event's labels plus `node`, `kind` and `__name__` (the
/// kind too, so `gpu_xid{node="n1"}` works).
fn event_labels(event: &StoredEvent) -> Vec<(String, String)> {
    let mut labels = event.labels.clone();
    labels.push(("node".to_owned(), event.node.clone()));
    labels.push(("kind".to_owned(), event.kind.clone()));
    labels.push(("__name__".to_owned(), event.kind.clone()));
    labels
}

/// Parses PromQL series selectors into matcher sets (a selector with `or` gives several).
fn parse_selectors(selectors: &[String], field: &str) -> Result<Vec<Selector>, Status> {
    use promql_parser::{label::MatchOp as Op, parser};
    let mut parsed = Vec::new();
    for (i, text) in selectors.iter().enumerate() {
        let bad = |why: String| {
            Status::invalid_argument(format!(
                "SubscribeRequest.{field}[{i}] {text:?}: {why} (expected a series selector such \
                 as `{{__name__=~\"vigil_gpu_.*\", node=\"n1\"}}`)"
            ))
        };
        let selector = match parser::parse(text) {
            Ok(parser::Expr::VectorSelector(selector)) => selector,
            Ok(_) => return Err(bad("not a plain series selector".into())),
            Err(why) => return Err(bad(why.trim().to_owned())),
        };
        if selector.offset.is_some() || selector.at.is_some() {
            return Err(bad("offset and @ do not apply to live data".into()));
        }
        let mut groups = selector.matchers.or_matchers;
        if !selector.matchers.matchers.is_empty() || groups.is_empty() {
            groups.push(selector.matchers.matchers);
        }
        for group in groups {
            let mut matchers: Selector = Vec::with_capacity(group.len() + 1);
            if let Some(name) = &selector.name {
                matchers.push(Matcher::equal("__name__", name));
            }
            for matcher in group {
                matchers.push(match matcher.op {
                    Op::Equal => Matcher::equal(&matcher.name, &matcher.value),
                    Op::NotEqual => Matcher {
                        op: crate::query::MatchOp::NotEqual,
                        ..Matcher::equal(&matcher.name, &matcher.value)
                    },
                    Op::Re(_) | Op::NotRe(_) => Matcher::regex(
                        &matcher.name,
                        &matcher.value,
                        matches!(matcher.op, Op::NotRe(_)),
                    )
                    .map_err(|error| bad(format!("bad regex: {error}")))?,
                });
            }
            parsed.push(matchers);
        }
    }
    Ok(parsed)
}

fn to_labels(labels: Vec<(String, String)>) -> Vec<Label> {
    labels
        .into_iter()
        .map(|(name, value)| Label { name, value })
        .collect()
}

fn histogram_value(histogram: &FloatHistogram) -> HistogramValue {
    let seconds = |ns: u64| {
        if ns == u64::MAX {
            f64::INFINITY // the overflow bucket
        } else {
            ns as f64 / 1e9
        }
    };
    HistogramValue {
        count: histogram.count,
        sum_seconds: histogram.sum_seconds,
        buckets: histogram
            .buckets
            .iter()
            .map(|(index, count)| HistogramBucket {
                index: *index,
                lower_seconds: seconds(bucket_lower_bound_ns(*index as usize)),
                upper_seconds: seconds(bucket_upper_bound_ns(*index as usize)),
                count: *count,
            })
            .collect(),
    }
}

fn query_point(time_ms: i64, value: SampleValue) -> QueryPoint {
    QueryPoint {
        time_ms,
        value: Some(match value {
            SampleValue::Float(value) => query_point::Value::Float(value),
            SampleValue::Histogram(histogram) => {
                query_point::Value::Histogram(histogram_value(&histogram))
            }
        }),
    }
}

fn query_response(value: Value) -> QueryResponse {
    match value {
        Value::Scalar { time_ms, value } => QueryResponse {
            result_type: ResultType::Scalar as i32,
            scalar: Some(query_point(time_ms, SampleValue::Float(value))),
            ..QueryResponse::default()
        },
        Value::String { time_ms, value } => QueryResponse {
            result_type: ResultType::String as i32,
            string_result: Some(StringResult { time_ms, value }),
            ..QueryResponse::default()
        },
        Value::Vector(samples) => QueryResponse {
            result_type: ResultType::Vector as i32,
            series: samples
                .into_iter()
                .map(|sample| QuerySeries {
                    labels: to_labels(sample.labels),
                    points: vec![query_point(sample.time_ms, sample.value)],
                })
                .collect(),
            ..QueryResponse::default()
        },
        Value::Matrix(series) => QueryResponse {
            result_type: ResultType::Matrix as i32,
            series: series
                .into_iter()
                .map(|series| QuerySeries {
                    labels: to_labels(series.labels),
                    points: series
                        .points
                        .into_iter()
                        .map(|(time_ms, value)| query_point(time_ms, value))
                        .collect(),
                })
                .collect(),
            ..QueryResponse::default()
        },
    }
}

/// A query error as a gRPC status; the message starts with the Prometheus API's `errorType`.
fn query_status(error: &QueryError) -> Status {
    let code = match error {
        QueryError::BadData(_) => Code::InvalidArgument,
        QueryError::Execution(_) => Code::FailedPrecondition,
        QueryError::Timeout(_) => Code::DeadlineExceeded,
    };
    Status::new(code, format!("{}: {error}", error.error_type()))
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission_denied",
        _ => "other",
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MetricKind, Point};

    fn selectors(texts: &[&str]) -> Result<Vec<Selector>, Status> {
        parse_selectors(
            &texts.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "selectors",
        )
    }

    fn series(id: u64, node: &str, name: &str, labels: &[(&str, &str)]) -> Arc<StoredSeries> {
        Arc::new(StoredSeries {
            id: SeriesRef(id),
            node: node.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            kind: MetricKind::Gauge,
        })
    }

    #[test]
    fn selectors_parse_into_matcher_sets() {
        let parsed = selectors(&[
            r#"{__name__=~"vigil_gpu_.*", node="n1"}"#,
            r#"up{job!="x"}"#,
            r#"{a="1" or b="2"}"#,
        ])
        .unwrap();
        assert_eq!(parsed.len(), 4);
        let gpu = [
            ("__name__".to_string(), "vigil_gpu_power_watts".to_string()),
            ("node".to_string(), "n1".to_string()),
        ];
        assert!(passes(&parsed[0], &gpu));
        assert!(!passes(
            &parsed[0],
            &[("__name__".into(), "vigil_gpu_power_watts".into())]
        ));
        assert!(passes(&parsed[1], &[("__name__".into(), "up".into())]));
        assert!(!passes(
            &parsed[1],
            &[("__name__".into(), "up".into()), ("job".into(), "x".into())]
        ));
        assert!(passes(&parsed[2], &[("a".into(), "1".into())]));
        assert!(passes(&parsed[3], &[("b".into(), "2".into())]));
    }

    #[test]
    fn bad_selectors_are_refused_with_the_reason() {
        for bad in ["rate(x[5m])", "{", "x offset 5m", r#"{a=~".*"}"#, "1 + 1"] {
            let status = selectors(&[bad]).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{bad}");
            assert!(status.message().contains("selectors[0]"), "{status:?}");
        }
    }

    #[test]
    fn a_filter_keeps_only_matching_series_and_events() {
        let mut filter = Filter::new(&SubscribeRequest {
            selectors: vec![r#"{__name__=~"vigil_gpu_.*", node="n1"}"#.into()],
            include_events: true,
            event_selectors: vec![r#"{kind="gpu_xid"}"#.into()],
        })
        .unwrap();
        let power = series(0, "n1", "vigil_gpu_power_watts", &[("gpu", "0")]);
        let other_node = series(1, "n2", "vigil_gpu_power_watts", &[("gpu", "0")]);
        let cpu = series(2, "n1", "vigil_process_cpu_seconds_total", &[]);
        let point = |time_ms, value| Point {
            time_ms,
            value: PointValue::Value(value),
        };
        let event = |kind: &str| StoredEvent {
            node: "n1".into(),
            time_ms: 5,
            kind: kind.into(),
            labels: vec![("gpu".into(), "0".into())],
            message: "m".into(),
        };
        let batch = IngestedBatch {
            node: "n1".into(),
            agent_instance: "i".into(),
            points: vec![
                (power.clone(), point(1, 100.0)),
                (other_node, point(1, 1.0)),
                (cpu, point(1, 2.0)),
                (power, point(2, 101.0)),
            ],
            events: vec![event("gpu_xid"), event("process_exited")],
        };
        let data = filter.apply(&batch).unwrap();
        assert_eq!(data.series.len(), 1);
        let values: Vec<_> = data.series[0]
            .points
            .iter()
            .map(|p| (p.time_ms, p.value.clone()))
            .collect();
        assert_eq!(
            values,
            vec![
                (1, Some(query_point::Value::Float(100.0))),
                (2, Some(query_point::Value::Float(101.0)))
            ]
        );
        assert!(
            data.series[0]
                .labels
                .iter()
                .any(|l| l.name == "node" && l.value == "n1")
        );
        assert_eq!(data.events.len(), 1);
        assert_eq!(data.events[0].kind, "gpu_xid");

        let nothing = IngestedBatch {
            events: vec![event("process_exited")],
            points: vec![],
            ..batch
        };
        assert!(filter.apply(&nothing).is_none());
    }

    #[test]
    fn histograms_carry_bucket_bounds_and_the_overflow_is_infinite() {
        let overflow = vigil_agent_common::histogram::BUCKET_COUNT as u32 - 1;
        let value = histogram_value(&FloatHistogram {
            count: 3.0,
            sum_seconds: 1.5,
            buckets: vec![(0, 1.0), (5, 1.0), (overflow, 1.0)],
        });
        let bounds: Vec<_> = value
            .buckets
            .iter()
            .map(|b| (b.index, b.lower_seconds, b.upper_seconds, b.count))
            .collect();
        assert_eq!(
            bounds[0],
            (0, 0.0, bucket_upper_bound_ns(0) as f64 / 1e9, 1.0)
        );
        assert_eq!(bounds[1].1, bucket_upper_bound_ns(4) as f64 / 1e9);
        assert_eq!(bounds[1].2, bucket_upper_bound_ns(5) as f64 / 1e9);
        assert_eq!(bounds[2].2, f64::INFINITY);
        assert!(bounds[2].1.is_finite());
    }

    #[test]
    fn an_empty_subscription_is_refused() {
        let status = Filter::new(&SubscribeRequest::default()).err().unwrap();
        assert_eq!(status.code(), Code::InvalidArgument);
    }

    #[test]
    fn durations_are_cumulative_and_consistent() {
        let histogram = DurationHistogram::default();
        histogram.observe(Duration::from_micros(300));
        histogram.observe(Duration::from_millis(30));
        histogram.observe(Duration::from_secs(20));
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count, 3);
        assert_eq!(snapshot.cumulative[0], (0.0005, 1));
        assert_eq!(snapshot.cumulative.last().unwrap().1, 2);
        assert!((snapshot.sum_seconds - 20.0303).abs() < 1e-9);
    }
}
