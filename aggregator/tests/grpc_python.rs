//! A third-party gRPC client (Python's grpcio, Debian's python3-grpcio and python3-grpc-tools at
//! /usr/bin/python3) reads through `vigil.v1.Query`: ListNodes, Query (instant and range),
//! Subscribe; and is refused with a wrong token. The stubs are generated from proto/ at test
//! time; the client is aggregator/tests/python/query_client.py.

mod common;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tokio::sync::mpsc;
use vigil_agent_common::histogram::bucket_upper_bound_ns;
use vigil_proto::v1::{Batch, Histogram, MetricType};

use common::*;

const PYTHON: &str = "/usr/bin/python3";
const AGENT_TOKEN: &str = "agent-token-0123456789";
const READER_TOKEN: &str = "reader-token-0123456789";
const NODE: &str = "gpu-node-1";

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn write_tokens(dir: &Path) -> PathBuf {
    let path = dir.join("tokens.toml");
    std::fs::write(
        &path,
        format!(
            "[[tokens]]\nname = \"agents\"\ntoken = \"{AGENT_TOKEN}\"\nrole = \"agent\"\nnode = \"*\"\n\
             [[tokens]]\nname = \"grafana\"\ntoken = \"{READER_TOKEN}\"\nrole = \"reader\"\n"
        ),
    )
    .unwrap();
    path
}

/// Generates the Python stubs of ingest.proto and query.proto into `out`.
fn generate_stubs(out: &Path) {
    let proto = repo_file("../proto");
    let status = Command::new(PYTHON)
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto.display()))
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .arg(proto.join("vigil/v1/ingest.proto"))
        .arg(proto.join("vigil/v1/query.proto"))
        .status()
        .unwrap_or_else(|error| {
            panic!("cannot run {PYTHON} (install python3-grpcio and python3-grpc-tools): {error}")
        });
    assert!(
        status.success(),
        "{PYTHON} -m grpc_tools.protoc failed ({status}): install python3-grpc-tools"
    );
}

fn gpu_series() -> Vec<vigil_proto::v1::Series> {
    vec![
        declare(
            1,
            "vigil_gpu_power_watts",
            &[("gpu", "0"), ("uuid", "GPU-1111"), ("model", "NVIDIA H200")],
            MetricType::Gauge,
        ),
        declare(
            2,
            "vigil_gpu_power_watts",
            &[("gpu", "1"), ("uuid", "GPU-2222"), ("model", "NVIDIA H200")],
            MetricType::Gauge,
        ),
        declare(
            3,
            "vigil_process_cpu_seconds_total",
            &[
                ("pid", "4242"),
                ("comm", "tritonserver"),
                ("server", "triton"),
            ],
            MetricType::Counter,
        ),
        declare(
            4,
            "vigil_syscall_latency_seconds",
            &[("syscall", "read"), ("server", "triton")],
            MetricType::Histogram,
        ),
    ]
}

fn labels_of(series: &Value) -> &serde_json::Map<String, Value> {
    series["labels"].as_object().expect("labels object")
}

fn floats(series: &Value) -> Vec<(i64, f64)> {
    series["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["time_ms"].as_i64().unwrap(), p["float"].as_f64().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpcio_client_lists_queries_and_subscribes() {
    let dir = tempfile::tempdir().unwrap();
    let stubs = dir.path().join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    generate_stubs(&stubs);

    let mut config = plaintext_config(&dir.path().join("data"));
    config.auth.tokens_file = Some(write_tokens(dir.path()));
    let aggregator = start(&config).await;
    let mut agent = open(
        plaintext_channel(&aggregator).await,
        hello(NODE, "agent-instance-1"),
        Some(AGENT_TOKEN),
    )
    .await
    .expect("agent stream accepted");

    // Four points 15 s apart for each series, the last one 15 s ago.
    let base = now_ms() - 60_000;
    let mut samples = Vec::new();
    for step in 0..4 {
        let delta = step * 15_000;
        samples.push(sample(1, delta, 100.0 + 10.0 * step as f64));
        samples.push(sample(2, delta, 200.0 + 10.0 * step as f64));
        samples.push(sample(3, delta, 1.0 + step as f64));
    }
    // Buckets 5 (3 values) and 7 (1 value), growing by one value per step in bucket 7.
    let histograms = (0..4)
        .map(|step| Histogram {
            series_id: 4,
            time_delta_ms: step * 15_000,
            count: 4 + step as u64,
            sum_seconds: 0.5 + step as f64,
            bucket_index_deltas: vec![5, 2],
            bucket_counts: vec![3, 1 + step as u64],
        })
        .collect();
    let rejections = agent
        .store(Batch {
            base_time_ms: base,
            histograms,
            ..batch(1, gpu_series(), samples)
        })
        .await;
    assert!(rejections.is_empty(), "{rejections:?}");

    let last = base + 45_000;
    let mut child = Command::new(PYTHON)
        .arg(repo_file("tests/python/query_client.py"))
        .arg("--target")
        .arg(aggregator.grpc_addr().to_string())
        .arg("--stubs")
        .arg(&stubs)
        .args(["--token", READER_TOKEN, "--bad-token", AGENT_TOKEN])
        .args(["--instant", "vigil_gpu_power_watts"])
        .args(["--time-ms", &last.to_string()])
        .args(["--histogram", "vigil_syscall_latency_seconds"])
        .args(["--range", "vigil_gpu_power_watts{gpu=\"0\"}"])
        .args(["--start-ms", &base.to_string()])
        .args(["--end-ms", &last.to_string()])
        .args(["--step-ms", "15000"])
        .args(["--selector", "{__name__=~\"vigil_gpu_.*\", gpu=\"0\"}"])
        .args(["--expect-points", "2", "--timeout", "30"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {PYTHON}: {error}"));
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, mut lines) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut next_line = async || {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.recv())
            .await
            .expect("the Python client answers within 60 s")
            .expect("the Python client printed a line before exiting (see its stderr above)");
        serde_json::from_str::<Value>(&line)
            .unwrap_or_else(|error| panic!("not JSON from the client ({error}): {line}"))
    };
    assert_eq!(next_line().await["step"], "subscribed");

    // Stored after the subscription: the client must receive gpu 0's two points only.
    let now = now_ms();
    let rejections = agent
        .store(Batch {
            base_time_ms: now,
            ..batch(
                2,
                Vec::new(),
                vec![
                    sample(1, 0, 140.0),
                    sample(2, 0, 240.0),
                    sample(3, 0, 5.0),
                    sample(1, 1, 150.0),
                ],
            )
        })
        .await;
    assert!(rejections.is_empty(), "{rejections:?}");
    let result = next_line().await;
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "the Python client failed: {status}");
    println!(
        "Python client result: {}",
        serde_json::to_string_pretty(&result).unwrap()
    );

    // Refused: an agent token (permission_denied) and no token (unauthenticated).
    assert_eq!(result["bad_token"]["error"]["code"], "PERMISSION_DENIED");
    assert_eq!(result["no_token"]["error"]["code"], "UNAUTHENTICATED");

    // ListNodes: the node, its agent, GPUs and model server.
    let nodes = result["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("ListNodes failed: {}", result["nodes"]));
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let node = &nodes[0];
    assert_eq!(node["node"], NODE);
    assert_eq!(node["agent_version"], "test");
    assert_eq!(node["agent_instance"], "agent-instance-1");
    assert_eq!(node["boot_id"], "boot-1");
    assert_eq!(node["connected"], true);
    // Ours, and whatever the aggregator derives and stores for the node (bottleneck verdicts).
    assert!(node["series"].as_u64().unwrap() >= 4, "{node}");
    assert_eq!(
        node["series"].as_u64().unwrap(),
        aggregator.store().series_count(NODE) as u64
    );
    assert!(node["last_seen_ms"].as_i64().unwrap() >= node["first_seen_ms"].as_i64().unwrap());
    assert!(node["first_seen_ms"].as_i64().unwrap() > 0);
    assert_eq!(
        node["gpus"],
        serde_json::json!([
            {"index": "0", "uuid": "GPU-1111", "model": "NVIDIA H200"},
            {"index": "1", "uuid": "GPU-2222", "model": "NVIDIA H200"},
        ])
    );
    assert_eq!(
        node["model_servers"],
        serde_json::json!([{"server": "triton", "comm": "tritonserver", "pid": "4242"}])
    );

    // Instant query at the last point: both GPUs' latest values.
    let instant = &result["instant"];
    assert_eq!(instant["result_type"], "VECTOR", "{instant}");
    let mut got: Vec<(String, Vec<(i64, f64)>)> = instant["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (labels_of(s)["gpu"].as_str().unwrap().to_owned(), floats(s)))
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![
            ("0".to_owned(), vec![(last, 130.0)]),
            ("1".to_owned(), vec![(last, 230.0)])
        ]
    );
    let first = &instant["series"][0];
    assert_eq!(labels_of(first)["__name__"], "vigil_gpu_power_watts");
    assert_eq!(labels_of(first)["node"], NODE);

    // A histogram series: its latest running totals, with each bucket's bounds.
    let histogram = &result["histogram"];
    assert_eq!(histogram["result_type"], "VECTOR", "{histogram}");
    let upper = |index: usize| bucket_upper_bound_ns(index) as f64 / 1e9;
    assert_eq!(
        histogram["series"][0]["points"],
        serde_json::json!([{"time_ms": last, "histogram": {
            "count": 7.0, "sum_seconds": 3.5,
            "buckets": [[5, upper(5), 3.0], [7, upper(7), 4.0]]}}]),
        "{histogram}"
    );
    assert_eq!(
        labels_of(&histogram["series"][0])["__name__"],
        "vigil_syscall_latency_seconds"
    );

    // Range query over the four points, one step each.
    let range = &result["range"];
    assert_eq!(range["result_type"], "MATRIX", "{range}");
    let series = range["series"].as_array().unwrap();
    assert_eq!(series.len(), 1, "{range}");
    assert_eq!(
        floats(&series[0]),
        (0..4)
            .map(|step| (base + step * 15_000, 100.0 + 10.0 * step as f64))
            .collect::<Vec<_>>()
    );

    // A query that does not parse: invalid_argument, saying bad_data.
    assert_eq!(result["bad_query"]["error"]["code"], "INVALID_ARGUMENT");
    assert!(
        result["bad_query"]["error"]["details"]
            .as_str()
            .unwrap()
            .starts_with("bad_data: "),
        "{}",
        result["bad_query"]
    );

    // Subscribe: only what was stored after subscribing, only gpu 0.
    let updates = result["subscribe"].as_array().unwrap();
    let mut points = Vec::new();
    for update in updates {
        let data = update
            .get("data")
            .unwrap_or_else(|| panic!("unexpected update {update}"));
        assert_eq!(data["node"], NODE);
        for series in data["series"].as_array().unwrap() {
            assert_eq!(labels_of(series)["gpu"], "0", "{series}");
            assert_eq!(labels_of(series)["__name__"], "vigil_gpu_power_watts");
            points.extend(floats(series));
        }
    }
    assert_eq!(points, vec![(now, 140.0), (now + 1, 150.0)]);

    // The audit log names the reader and the refused agent token, never a token.
    let audit = std::fs::read_to_string(aggregator.audit_path()).unwrap();
    assert!(!audit.contains(READER_TOKEN) && !audit.contains(AGENT_TOKEN));
    let lines = audit_lines(aggregator.audit_path());
    assert!(lines.iter().any(|l| l["event"] == "list_nodes"
        && l["outcome"] == "denied"
        && l["code"] == "permission_denied"
        && l["who"] == "token:agents (agent)"));
    assert!(lines.iter().any(|l| l["event"] == "subscribe"
        && l["outcome"] == "accepted"
        && l["who"] == "token:grafana (reader)"));
    aggregator.shutdown().await;
}
