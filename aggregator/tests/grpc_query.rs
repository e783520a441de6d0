//! `vigil.v1.Query` from a Rust (tonic) client: who may call it, and what a slow subscriber
//! gets (a Lagged marker; ingest and other subscribers go on at full speed).

mod common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tonic::{Code, Request, Streaming, transport::Channel};
use vigil_proto::v1::{
    Batch, ListNodesRequest, MetricType, QueryRange, QueryRequest, SubscribeRequest,
    SubscribeUpdate, query_client::QueryClient, subscribe_update,
};

use common::*;

const AGENT_TOKEN: &str = "agent-token-0123456789";
const READER_TOKEN: &str = "reader-token-0123456789";
const ADMIN_TOKEN: &str = "admin-token-0123456789";

fn write_tokens(dir: &Path) -> PathBuf {
    let path = dir.join("tokens.toml");
    std::fs::write(
        &path,
        format!(
            "[[tokens]]\nname = \"agents\"\ntoken = \"{AGENT_TOKEN}\"\nrole = \"agent\"\nnode = \"*\"\n\
             [[tokens]]\nname = \"grafana\"\ntoken = \"{READER_TOKEN}\"\nrole = \"reader\"\n\
             [[tokens]]\nname = \"ops\"\ntoken = \"{ADMIN_TOKEN}\"\nrole = \"admin\"\n"
        ),
    )
    .unwrap();
    path
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

fn reader<T>(message: T) -> Request<T> {
    with_token(message, Some(READER_TOKEN))
}

fn subscribe_request(selector: &str) -> SubscribeRequest {
    SubscribeRequest {
        selectors: vec![selector.into()],
        ..SubscribeRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_needs_a_reader_or_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = plaintext_config(&dir.path().join("data"));
    config.auth.tokens_file = Some(write_tokens(dir.path()));
    let aggregator = start(&config).await;
    let channel = plaintext_channel(&aggregator).await;
    let mut client = QueryClient::new(channel.clone());

    for (token, code) in [
        (None, Code::Unauthenticated),
        (Some("not-a-token-at-all-xx"), Code::Unauthenticated),
        (Some(AGENT_TOKEN), Code::PermissionDenied),
    ] {
        let status = client
            .list_nodes(with_token(ListNodesRequest {}, token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "ListNodes with {token:?}: {status:?}");
        let status = client
            .query(with_token(
                QueryRequest {
                    expr: "up".into(),
                    ..QueryRequest::default()
                },
                token,
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "Query with {token:?}: {status:?}");
        let status = client
            .subscribe(with_token(subscribe_request("up"), token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "Subscribe with {token:?}: {status:?}");
    }
    let status = client
        .list_nodes(with_token(ListNodesRequest {}, Some(AGENT_TOKEN)))
        .await
        .unwrap_err();
    assert!(
        status.message().contains("reader or admin"),
        "says what is needed: {status:?}"
    );

    // The agent token still streams telemetry on the same port, and readers see the node.
    let mut agent = open(channel, hello("n1", "i1"), Some(AGENT_TOKEN))
        .await
        .expect("agent stream accepted");
    agent
        .store(batch(
            1,
            vec![declare(1, "vigil_test_gauge", &[], MetricType::Gauge)],
            vec![sample(1, 0, 1.0)],
        ))
        .await;
    for token in [READER_TOKEN, ADMIN_TOKEN] {
        let nodes = client
            .list_nodes(with_token(ListNodesRequest {}, Some(token)))
            .await
            .unwrap_or_else(|status| panic!("ListNodes with {token}: {status:?}"))
            .into_inner()
            .nodes;
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].node, "n1");
        assert!(nodes[0].connected);
        assert_eq!(nodes[0].streams, 1);
        client
            .subscribe(with_token(
                subscribe_request("vigil_test_gauge"),
                Some(token),
            ))
            .await
            .unwrap_or_else(|status| panic!("Subscribe with {token}: {status:?}"));
    }

    // Bad input is refused with a reason, after authentication.
    let status = client
        .subscribe(reader(subscribe_request("rate(x[5m])")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("selectors[0]"), "{status:?}");
    let status = client
        .subscribe(reader(SubscribeRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = client
        .query(reader(QueryRequest {
            expr: "vigil_test_gauge".into(),
            range: Some(QueryRange {
                start_ms: 0,
                end_ms: 1000,
                step_ms: 0,
            }),
            ..QueryRequest::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("step_ms"), "{status:?}");

    // Stream end: the node is no longer connected, but still listed.
    drop(agent);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let nodes = client
            .list_nodes(reader(ListNodesRequest {}))
            .await
            .unwrap()
            .into_inner()
            .nodes;
        if !nodes[0].connected {
            assert_eq!(nodes[0].streams, 0);
            assert_eq!(nodes[0].agent_version, "test");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node still counts as connected 10 s after its stream ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let audit = audit_lines(aggregator.audit_path());
    let denied = |event: &str, code: &str| {
        audit
            .iter()
            .any(|l| l["event"] == event && l["outcome"] == "denied" && l["code"] == code)
    };
    for event in ["query_instant", "subscribe", "list_nodes"] {
        assert!(denied(event, "unauthenticated"), "{event} in {audit:?}");
        assert!(denied(event, "permission_denied"), "{event} in {audit:?}");
    }
    assert!(audit.iter().any(|l| l["event"] == "list_nodes"
        && l["outcome"] == "accepted"
        && l["who"] == "token:ops (admin)"));
    aggregator.shutdown().await;
}

/// Series per batch in the lag test: updates of a few KiB, so HTTP/2 and tonic buffers hold
/// few of them and the broadcast ring is what a stalled subscriber overflows.
const SERIES: u64 = 40;
/// Batches stored per round (one ack wait each).
const CHUNK: u64 = 100;

/// Stores `rounds` rounds of CHUNK batches (every series one sample each, valued by the
/// batch's sequence), and returns how long each round took to be acked.
async fn ingest_rounds(agent: &mut AgentStream, next_sequence: &mut u64, rounds: u64) -> Vec<f64> {
    let mut took = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        let first = *next_sequence;
        for _ in 0..CHUNK {
            let sequence = *next_sequence;
            *next_sequence += 1;
            let series = if sequence == 1 {
                (0..SERIES)
                    .map(|id| {
                        let name = format!("{id}");
                        declare(
                            id,
                            "vigil_test_gauge",
                            &[("series", &name), ("padding", &"x".repeat(40))],
                            MetricType::Gauge,
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let samples = (0..SERIES)
                .map(|id| sample(id, 0, sequence as f64))
                .collect();
            agent
                .send(Batch {
                    base_time_ms: now_ms(),
                    ..batch(sequence, series, samples)
                })
                .await;
        }
        for sequence in first..*next_sequence {
            assert!(agent.until_ack(sequence).await.is_empty());
        }
        took.push(started.elapsed().as_secs_f64());
    }
    took
}

/// What a subscriber received: the sequence of every batch delivered, and the dropped count.
#[derive(Default, Debug)]
struct Received {
    batches: Vec<u64>,
    dropped: u64,
    lagged_markers: u64,
}

impl Received {
    fn add(&mut self, update: SubscribeUpdate) {
        match update.body.expect("an update has a body") {
            subscribe_update::Body::Data(data) => {
                // Every batch carries one sample per series, all valued by its sequence.
                let values: Vec<f64> = data
                    .series
                    .iter()
                    .flat_map(|series| series.points.iter())
                    .map(|point| match point.value {
                        Some(vigil_proto::v1::query_point::Value::Float(value)) => value,
                        ref other => panic!("not a float: {other:?}"),
                    })
                    .collect();
                assert_eq!(values.len() as u64, SERIES, "one update per stored batch");
                assert!(values.iter().all(|v| *v == values[0]));
                self.batches.push(values[0] as u64);
            }
            subscribe_update::Body::Lagged(lagged) => {
                assert!(lagged.dropped_batches > 0);
                self.dropped += lagged.dropped_batches;
                self.lagged_markers += 1;
            }
        }
    }

    fn accounted(&self) -> u64 {
        self.batches.len() as u64 + self.dropped
    }
}

async fn subscribe(channel: Channel) -> Streaming<SubscribeUpdate> {
    QueryClient::new(channel)
        .subscribe(subscribe_request("vigil_test_gauge"))
        .await
        .expect("subscribed")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_gets_lagged_and_slows_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = start(&plaintext_config(dir.path())).await;
    let mut agent = open_plaintext(&aggregator, hello("n1", "i1")).await;
    let mut sequence = 1;

    // Ingest speed with nobody subscribed.
    let baseline = ingest_rounds(&mut agent, &mut sequence, 10).await;
    let first_watched = sequence;

    // A subscriber that does not read, while three times the ring's worth is stored.
    let mut stalled = subscribe(plaintext_channel(&aggregator).await).await;
    const STALLED_ROUNDS: u64 = 30;
    let stalled_rounds = ingest_rounds(&mut agent, &mut sequence, STALLED_ROUNDS).await;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "ack time per {CHUNK} batches: {:.1} ms without subscribers, {:.1} ms with a stalled one",
        mean(&baseline) * 1e3,
        mean(&stalled_rounds) * 1e3
    );
    // broadcast::send never waits, so a stalled subscriber costs ingest nothing; the bound
    // only absorbs this shared machine's noise.
    assert!(
        mean(&stalled_rounds) < 2.0 * mean(&baseline) + 0.05,
        "ingest slowed down by a stalled subscriber: {stalled_rounds:?} vs {baseline:?}"
    );

    // Now a reading subscriber, on its own connection (HTTP/2 flow control is per connection
    // too: the stalled stream's unread data would hold up another stream on its connection),
    // while the stalled one still does not read.
    let first_read = sequence;
    let mut reading = subscribe(plaintext_channel(&aggregator).await).await;
    assert_eq!(aggregator.telemetry().query().subscribers(), 2);
    const READ_ROUNDS: u64 = 10;
    let read_total = READ_ROUNDS * CHUNK;
    let reader = tokio::spawn(async move {
        let mut received = Received::default();
        while received.accounted() < read_total {
            match tokio::time::timeout(Duration::from_secs(60), reading.message()).await {
                Ok(Ok(Some(update))) => received.add(update),
                other => panic!("reading subscriber after {received:?}: {other:?}"),
            }
        }
        received
    });
    ingest_rounds(&mut agent, &mut sequence, READ_ROUNDS).await;
    let total = (STALLED_ROUNDS + READ_ROUNDS) * CHUNK;

    // The stalled subscriber now reads: what it gets plus what it was told it missed is
    // exactly what was stored, in order.
    let mut slow = Received::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while slow.accounted() < total {
        let update = tokio::time::timeout_at(deadline.into(), stalled.message())
            .await
            .unwrap_or_else(|_| panic!("stalled subscriber: only {slow:?} of {total} after 30 s"))
            .expect("stream open")
            .expect("stream not ended");
        slow.add(update);
    }
    assert_eq!(slow.accounted(), total, "{slow:?}");
    assert!(
        slow.lagged_markers >= 1 && slow.dropped > 0,
        "a stalled subscriber must be told it lagged: {slow:?}"
    );
    assert!(slow.batches.windows(2).all(|w| w[0] < w[1]), "in order");
    assert!(slow.batches.iter().all(|s| *s >= first_watched));
    println!(
        "stalled subscriber: {} batches delivered, {} dropped in {} gaps",
        slow.batches.len(),
        slow.dropped,
        slow.lagged_markers
    );

    // The reading subscriber got every batch, in order, without a gap.
    let received = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the reading subscriber got everything within 60 s")
        .unwrap();
    assert_eq!(received.lagged_markers, 0, "{received:?}");
    assert_eq!(
        received.batches,
        (first_read..first_read + read_total).collect::<Vec<_>>()
    );

    let stats = aggregator.telemetry().query();
    // The reader's stream is gone: its task ends soon after.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.subscribers() != 1 {
        assert!(
            Instant::now() < deadline,
            "{} subscribers",
            stats.subscribers()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.dropped_batches(), slow.dropped);
    assert_eq!(stats.lagged_updates(), slow.lagged_markers);
    assert_eq!(stats.updates_sent(), read_total + slow.batches.len() as u64);

    // Shutdown ends a subscription with `unavailable`.
    let stop = tokio::spawn(aggregator.shutdown());
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stalled.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the subscription ends at shutdown");
    match end {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(end) => panic!("ended without a status: {end:?}"),
    }
    stop.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_gets_chosen_events_and_series_as_they_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = start(&plaintext_config(dir.path())).await;
    let mut agent = open_plaintext(&aggregator, hello("n1", "i1")).await;
    let mut subscription = QueryClient::new(plaintext_channel(&aggregator).await)
        .subscribe(SubscribeRequest {
            selectors: vec!["vigil_gpu_power_watts{gpu=\"1\"}".into()],
            include_events: true,
            event_selectors: vec!["gpu_xid{node=\"n1\"}".into()],
        })
        .await
        .expect("subscribed")
        .into_inner();

    let event = |kind: &str, delta: i64| vigil_proto::v1::Event {
        time_delta_ms: delta,
        kind: kind.into(),
        labels: vec![vigil_proto::v1::Label {
            name: "gpu".into(),
            value: "1".into(),
        }],
        message: format!("{kind} happened"),
    };
    let base = now_ms();
    let rejections = agent
        .store(Batch {
            base_time_ms: base,
            events: vec![event("process_exited", 0), event("gpu_xid", 5)],
            ..batch(
                1,
                vec![
                    declare(
                        1,
                        "vigil_gpu_power_watts",
                        &[("gpu", "0")],
                        MetricType::Gauge,
                    ),
                    declare(
                        2,
                        "vigil_gpu_power_watts",
                        &[("gpu", "1")],
                        MetricType::Gauge,
                    ),
                ],
                vec![sample(1, 0, 10.0), sample(2, 0, 20.0)],
            )
        })
        .await;
    assert!(rejections.is_empty(), "{rejections:?}");
    // Nothing of this batch matches: no update for it.
    agent
        .store(Batch {
            base_time_ms: base,
            events: vec![event("process_started", 0)],
            ..batch(2, vec![], vec![sample(1, 10, 11.0)])
        })
        .await;
    agent
        .store(Batch {
            base_time_ms: base,
            ..batch(3, vec![], vec![sample(2, 10, 21.0)])
        })
        .await;

    let mut next = async || {
        let update = tokio::time::timeout(Duration::from_secs(10), subscription.message())
            .await
            .expect("an update within 10 s")
            .expect("stream open")
            .expect("stream not ended");
        match update.body {
            Some(subscribe_update::Body::Data(data)) => data,
            other => panic!("expected data, got {other:?}"),
        }
    };
    let first = next().await;
    assert_eq!(first.node, "n1");
    assert_eq!(first.series.len(), 1);
    let labels: Vec<(String, String)> = first.series[0]
        .labels
        .iter()
        .map(|l| (l.name.clone(), l.value.clone()))
        .collect();
    assert_eq!(
        labels,
        [
            ("__name__", "vigil_gpu_power_watts"),
            ("gpu", "1"),
            ("node", "n1")
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
    );
    assert_eq!(first.series[0].points.len(), 1);
    assert_eq!(first.series[0].points[0].time_ms, base);
    assert_eq!(first.events.len(), 1, "{:?}", first.events);
    assert_eq!(first.events[0].kind, "gpu_xid");
    assert_eq!(first.events[0].node, "n1");
    assert_eq!(first.events[0].time_ms, base + 5);
    assert_eq!(first.events[0].message, "gpu_xid happened");

    let second = next().await;
    assert!(second.events.is_empty());
    assert_eq!(second.series[0].points[0].time_ms, base + 10);
    assert_eq!(
        second.series[0].points[0].value,
        Some(vigil_proto::v1::query_point::Value::Float(21.0))
    );
    aggregator.shutdown().await;
}
