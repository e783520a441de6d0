//! The Prometheus HTTP query API over a real aggregator: data ingested over gRPC, queried over
//! HTTP with GET and POST, Prometheus's JSON and error shapes, and bearer-token auth.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use vigil_proto::v1::{Batch, Histogram, MetricType};

const READER_TOKEN: &str = "reader-token-0123456789";
const AGENT_TOKEN: &str = "agent-token-0123456789ab";

/// Ingests, on `node`, a gauge and a counter every second for a minute ending at `end_ms`,
/// and a latency histogram every 10 s.
async fn ingest(
    aggregator: &vigil_aggregator::RunningAggregator,
    node: &str,
    end_ms: i64,
    token: Option<&str>,
) {
    let channel = plaintext_channel(aggregator).await;
    let mut stream = open(channel, hello(node, "spool"), token)
        .await
        .expect("stream accepted");
    let base = end_ms - 60_000;
    let series = vec![
        declare(
            1,
            "vigil_gpu_temperature_celsius",
            &[("gpu", "0")],
            MetricType::Gauge,
        ),
        declare(
            2,
            "vigil_syscalls_total",
            &[("syscall", "read")],
            MetricType::Counter,
        ),
        declare(
            3,
            "vigil_syscall_latency_seconds",
            &[("syscall", "read")],
            MetricType::Histogram,
        ),
    ];
    let samples = (0..=60)
        .flat_map(|i| {
            [
                sample(1, i * 1000, 60.0 + i as f64 / 10.0),
                sample(2, i * 1000, (i * 100) as f64),
            ]
        })
        .collect();
    // Bucket 200 and 210 (about 0.5 ms and 0.8 ms), counts growing.
    let histograms = (0..=6)
        .map(|i| Histogram {
            series_id: 3,
            time_delta_ms: i * 10_000,
            count: (i * 30) as u64,
            sum_seconds: i as f64 * 0.02,
            bucket_index_deltas: vec![200, 10],
            bucket_counts: vec![(i * 20) as u64, (i * 10) as u64],
        })
        .collect();
    let rejections = stream
        .store(Batch {
            sequence: 1,
            series,
            base_time_ms: base,
            samples,
            histograms,
            ..Batch::default()
        })
        .await;
    assert_eq!(rejections, vec![], "everything stored");
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn get_json(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = client().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("HTTP answer");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
    )
}

async fn post_json(url: &str, form: &[(&str, &str)]) -> (u16, Value) {
    let response = client()
        .post(url)
        .form(form)
        .send()
        .await
        .expect("HTTP answer");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
    )
}

fn seconds(ms: i64) -> String {
    format!("{}.{:03}", ms / 1000, ms % 1000)
}

#[tokio::test]
async fn queries_answer_in_prometheus_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = plaintext_config(dir.path());
    config.http.listen = Some("127.0.0.1:0".parse().unwrap());
    let aggregator = start(&config).await;
    let end = now_ms() / 1000 * 1000;
    ingest(&aggregator, "gpu-node-1", end, None).await;
    ingest(&aggregator, "gpu-node-2", end, None).await;
    let base = format!("http://{}", aggregator.http_addr().unwrap());
    let url = |path: &str| format!("{base}{path}");

    // Instant query, GET: one sample per node, the name kept, time as float seconds.
    let (status, body) = get_json(
        &format!(
            "{}?query=vigil_gpu_temperature_celsius&time={}",
            url("/api/v1/query"),
            seconds(end)
        ),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "success");
    assert_eq!(body["data"]["resultType"], "vector");
    let result = body["data"]["result"].as_array().unwrap();
    assert_eq!(result.len(), 2, "{body}");
    assert_eq!(
        result[0]["metric"]["__name__"],
        "vigil_gpu_temperature_celsius"
    );
    assert_eq!(result[0]["metric"]["gpu"], "0");
    assert_eq!(result[0]["value"][0].as_f64().unwrap(), (end / 1000) as f64);
    assert_eq!(result[0]["value"][1], "66");

    // The same through POST, with an RFC 3339 time.
    let rfc3339 = time::OffsetDateTime::from_unix_timestamp(end / 1000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (status, body) = post_json(
        &url("/api/v1/query"),
        &[
            ("query", "sum(rate(vigil_syscalls_total[1m]))"),
            ("time", &rfc3339),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let value: f64 = body["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((value - 200.0).abs() < 1e-9, "{body}");

    // Native histograms summed across nodes, and the classic view of the same data. Two
    // thirds of the calls are in the lower bucket (index 200), so the median is 3/4 into it;
    // the classic view's first bucket starts at 0, as Prometheus's interpolation does.
    let lower = vigil_agent_common::histogram::bucket_lower_bound_ns(200) as f64 / 1e9;
    let upper = vigil_agent_common::histogram::bucket_upper_bound_ns(200) as f64 / 1e9;
    for (expr, expected) in [
        (
            "histogram_quantile(0.5, sum by (le) (rate(vigil_syscall_latency_seconds[1m])))",
            lower + (upper - lower) * 0.75,
        ),
        (
            "histogram_quantile(0.5, sum by (le) (rate(vigil_syscall_latency_seconds_bucket[1m])))",
            upper * 0.75,
        ),
    ] {
        let (status, body) = post_json(
            &url("/api/v1/query"),
            &[("query", expr), ("time", &seconds(end))],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let p50: f64 = body["data"]["result"][0]["value"][1]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (p50 - expected).abs() < 1e-12,
            "{expr}: {p50}, expected {expected}"
        );
    }

    // A histogram sample itself comes back in the "histogram" shape.
    let (_, body) = post_json(
        &url("/api/v1/query"),
        &[
            (
                "query",
                "vigil_syscall_latency_seconds{node=\"gpu-node-1\"}",
            ),
            ("time", &seconds(end)),
        ],
    )
    .await;
    let histogram = &body["data"]["result"][0]["histogram"][1];
    assert_eq!(histogram["count"], "180", "{body}");
    assert_eq!(histogram["buckets"].as_array().unwrap().len(), 2, "{body}");

    // Range query: 7 steps of 10 s, one series per node.
    let (status, body) = get_json(
        &format!(
            "{}?query=vigil_gpu_temperature_celsius%20*%202&start={}&end={}&step=10s",
            url("/api/v1/query_range"),
            end / 1000 - 60,
            end / 1000
        ),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["resultType"], "matrix");
    let series = body["data"]["result"].as_array().unwrap();
    assert_eq!(series.len(), 2);
    assert!(
        series[0]["metric"].get("__name__").is_none(),
        "arithmetic drops the name"
    );
    let values = series[0]["values"].as_array().unwrap();
    assert_eq!(values.len(), 7);
    assert_eq!(values[0][1], "120");
    assert_eq!(values[6][1], "132");

    // Series, labels and label values.
    let (status, body) = get_json(
        &format!("{}?match[]=vigil_syscalls_total&match[]=vigil_gpu_temperature_celsius{{node=\"gpu-node-1\"}}", url("/api/v1/series")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 3, "{body}");
    let (_, body) = get_json(&url("/api/v1/labels"), None).await;
    let names: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for name in ["__name__", "gpu", "le", "node", "syscall"] {
        assert!(names.contains(&name), "{names:?}");
    }
    let (_, body) = get_json(&url("/api/v1/label/node/values"), None).await;
    assert_eq!(
        body["data"],
        serde_json::json!(["gpu-node-1", "gpu-node-2"])
    );
    let (_, body) = get_json(&url("/api/v1/label/__name__/values"), None).await;
    assert!(
        body["data"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("vigil_syscall_latency_seconds_bucket"))
    );

    // Errors in Prometheus's shape and status codes.
    let (status, body) = get_json(&format!("{}?query=sum(", url("/api/v1/query")), None).await;
    assert_eq!(
        (status, body["status"].as_str(), body["errorType"].as_str()),
        (400, Some("error"), Some("bad_data"))
    );
    let (status, body) = get_json(
        &format!(
            "{}?query=holt_winters(vigil_syscalls_total[1m],0.5,0.5)",
            url("/api/v1/query")
        ),
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("holt_winters"),
        "{body}"
    );
    let (status, body) = get_json(
        &format!(
            "{}?query=vigil_syscalls_total%20%2B%20ignoring(node)%20vigil_syscalls_total&time={}",
            url("/api/v1/query"),
            seconds(end)
        ),
        None,
    )
    .await;
    assert_eq!(
        (status, body["errorType"].as_str()),
        (422, Some("execution")),
        "{body}"
    );
    let (status, body) = get_json(
        &format!(
            "{}?query=up&start=10&end=5&step=1",
            url("/api/v1/query_range")
        ),
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = get_json(
        &format!(
            "{}?query=up&start=0&end=100000&step=1",
            url("/api/v1/query_range")
        ),
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("11000"), "{body}");
    let (status, body) = get_json(
        &format!("{}?query=up&timeout=soon", url("/api/v1/query")),
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = get_json(
        &format!("{}?query=up&time=yesterday", url("/api/v1/query")),
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("\"time\""),
        "{body}"
    );
    let (status, body) = get_json(&url("/api/v1/series"), None).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("match[]"),
        "{body}"
    );

    // What Grafana and promtool ask on connect.
    let (status, body) = get_json(&url("/api/v1/status/buildinfo"), None).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("success")));
    let (status, _) = get_json(&url("/api/v1/metadata"), None).await;
    assert_eq!(status, 200);
    for path in ["/-/healthy", "/-/ready"] {
        let response = client().get(url(path)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
    }
    aggregator.shutdown().await;
}

#[tokio::test]
async fn with_tokens_the_api_needs_a_reader_token() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[tokens]]\nname = \"agent\"\ntoken = \"{AGENT_TOKEN}\"\nrole = \"agent\"\nnode = \"*\"\n\n\
             [[tokens]]\nname = \"grafana\"\ntoken = \"{READER_TOKEN}\"\nrole = \"reader\"\n"
        ),
    )
    .unwrap();
    let mut config = plaintext_config(dir.path());
    config.http.listen = Some("127.0.0.1:0".parse().unwrap());
    config.auth.tokens_file = Some(tokens);
    let aggregator = start(&config).await;
    let end = now_ms() / 1000 * 1000;
    ingest(&aggregator, "gpu-node-1", end, Some(AGENT_TOKEN)).await;
    let url = format!(
        "http://{}/api/v1/query?query=vigil_syscalls_total&time={}",
        aggregator.http_addr().unwrap(),
        seconds(end)
    );

    let (status, body) = get_json(&url, Some(READER_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["result"].as_array().unwrap().len(), 1);
    for token in [None, Some("wrong-token-0123456789"), Some(AGENT_TOKEN)] {
        let (status, body) = get_json(&url, token).await;
        assert_eq!(status, 401, "{token:?}: {body}");
        assert_eq!(body["status"], "error");
        assert_eq!(body["errorType"], "unauthorized");
        let error = body["error"].as_str().unwrap();
        assert!(
            !error.contains(AGENT_TOKEN) && !error.contains("wrong-token"),
            "{error}"
        );
    }
    let labels = format!("http://{}/api/v1/labels", aggregator.http_addr().unwrap());
    assert_eq!(get_json(&labels, None).await.0, 401);
    assert_eq!(get_json(&labels, Some(READER_TOKEN)).await.0, 200);
    aggregator.shutdown().await;
}
