//! `/metrics` on a running aggregator: valid under `promtool check metrics` (Prometheus 2.42 at
//! /usr/bin/promtool), and its counters follow ingest, queries and subscriptions.

mod common;

use std::{
    collections::HashMap,
    io::Write,
    process::{Command, Stdio},
    sync::Arc,
};

use vigil_aggregator::RunningAggregator;
use vigil_proto::v1::{MetricType, QueryRequest, SubscribeRequest, query_client::QueryClient};

use common::*;

const PROMTOOL: &str = "/usr/bin/promtool";

async fn scrape(aggregator: &RunningAggregator) -> String {
    let url = format!("http://{}/metrics", aggregator.http_addr().unwrap());
    let response = reqwest::get(&url).await.expect("GET /metrics");
    assert!(response.status().is_success(), "{response:?}");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    response.text().await.unwrap()
}

/// `promtool check metrics` on the text: its exit code must be 0 (no errors, no lint problems).
fn promtool_check(text: &str) {
    let mut child = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {PROMTOOL} (install prometheus): {error}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- exposition ---\n{text}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Samples by their series text (`name{labels}` as written).
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                other => other
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value: {line}")),
            };
            (series.to_owned(), value)
        })
        .collect()
}

fn get(samples: &HashMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("{series} missing from /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_follow_ingest_and_queries() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = plaintext_config(dir.path());
    config.http.listen = Some("127.0.0.1:0".parse().unwrap());
    let aggregator = start(&config).await;
    // The hook for other parts' families (the remote-write exporter's, for one).
    aggregator
        .telemetry()
        .add_writer(Arc::new(|out: &mut String| {
            out.push_str(
                "# HELP vigil_test_extra_total An extra family.\n\
                 # TYPE vigil_test_extra_total counter\n\
                 vigil_test_extra_total{target=\"a\"} 7\n",
            );
        }));

    let before = scrape(&aggregator).await;
    promtool_check(&before);
    let before = samples(&before);
    assert_eq!(
        get(
            &before,
            "vigil_aggregator_ingest_batches_total{outcome=\"stored\"}"
        ),
        0.0
    );
    assert_eq!(get(&before, "vigil_aggregator_agent_streams"), 0.0);
    assert_eq!(get(&before, "vigil_aggregator_series"), 0.0);
    assert_eq!(get(&before, "vigil_test_extra_total{target=\"a\"}"), 7.0);
    assert!(get(&before, "process_resident_memory_bytes") > 1e6);
    assert!(get(&before, "process_open_fds") > 0.0);
    assert!(get(&before, "process_max_fds") > 0.0);
    assert!(get(&before, "process_cpu_seconds_total") >= 0.0);
    assert_eq!(
        get(
            &before,
            &format!(
                "vigil_aggregator_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );

    let mut agent = open_plaintext(&aggregator, hello("n1", "i1")).await;
    let rejections = agent
        .store(batch(
            1,
            vec![
                declare(1, "vigil_test_gauge", &[("k", "a")], MetricType::Gauge),
                declare(2, "vigil_test_gauge", &[("k", "b")], MetricType::Gauge),
            ],
            vec![sample(1, 0, 1.0), sample(2, 0, 2.0), sample(1, 1, f64::NAN)],
        ))
        .await;
    assert!(rejections.is_empty(), "{rejections:?}");
    let rejections = agent.store(batch(2, vec![], vec![sample(9, 0, 1.0)])).await;
    assert_eq!(rejections.len(), 1, "sample of an undeclared series");

    let channel = plaintext_channel(&aggregator).await;
    let mut client = QueryClient::new(channel);
    let _subscription = client
        .subscribe(SubscribeRequest {
            selectors: vec!["vigil_test_gauge".into()],
            ..SubscribeRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let answered = client
        .query(QueryRequest {
            expr: "vigil_test_gauge".into(),
            ..QueryRequest::default()
        })
        .await
        .expect("an instant query of stored series")
        .into_inner();
    assert_eq!(answered.series.len(), 2, "{answered:?}");
    let status = client
        .query(QueryRequest {
            expr: "sum(".into(),
            ..QueryRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    let after = scrape(&aggregator).await;
    promtool_check(&after);
    let after = samples(&after);
    assert_eq!(
        get(
            &after,
            "vigil_aggregator_ingest_batches_total{outcome=\"stored\"}"
        ),
        2.0
    );
    assert_eq!(
        get(
            &after,
            "vigil_aggregator_ingest_stored_total{kind=\"sample\"}"
        ),
        3.0
    );
    assert_eq!(
        get(
            &after,
            "vigil_aggregator_ingest_rejected_total{reason=\"unknown_series\"}"
        ),
        1.0
    );
    assert_eq!(
        get(
            &after,
            "vigil_aggregator_ingest_streams_total{outcome=\"accepted\"}"
        ),
        1.0
    );
    assert!(get(&after, "vigil_aggregator_connections_accepted_total") >= 2.0);
    assert_eq!(get(&after, "vigil_aggregator_agent_streams"), 1.0);
    assert_eq!(get(&after, "vigil_aggregator_nodes_connected"), 1.0);
    assert_eq!(get(&after, "vigil_aggregator_nodes_known"), 1.0);
    // Ours, plus whatever the aggregator derives and stores itself.
    assert!(get(&after, "vigil_aggregator_series") >= 2.0);
    assert_eq!(
        get(&after, "vigil_aggregator_series"),
        aggregator.store().series().len() as f64
    );
    assert!(get(&after, "vigil_aggregator_wal_segments") >= 1.0);
    assert_eq!(get(&after, "vigil_aggregator_subscribers"), 1.0);
    let requests = |method: &str, outcome: &str| {
        get(
            &after,
            &format!(
                "vigil_aggregator_grpc_query_requests_total{{method=\"{method}\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(requests("subscribe", "ok"), 1.0);
    assert_eq!(requests("query_instant", "ok"), 1.0);
    assert_eq!(requests("query_instant", "error"), 1.0);
    assert_eq!(requests("query_range", "ok"), 0.0);
    // Both reached the engine (a parse error is the engine's answer) and were timed.
    assert_eq!(
        get(
            &after,
            "vigil_aggregator_grpc_query_duration_seconds_count{type=\"instant\"}"
        ),
        2.0
    );
    assert_eq!(
        get(
            &after,
            "vigil_aggregator_grpc_query_duration_seconds_bucket{type=\"instant\",le=\"+Inf\"}"
        ),
        2.0
    );
    assert_eq!(
        get(
            &after,
            "vigil_aggregator_grpc_query_duration_seconds_count{type=\"range\"}"
        ),
        0.0
    );

    drop(agent);
    aggregator.shutdown().await;
}
