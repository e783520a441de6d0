//! `silent-nodes`: simulated agents that go silent one after another, for the agent-silent
//! part of `cargo xtask bench alert-latency`. Prints one JSON report on stdout.
//!
//! ```text
//! silent-nodes --endpoint 127.0.0.1:PORT [--nodes N] [--run-s R] [--stagger-ms S]
//!              [--prefix NAME]
//! ```
//!
//! Node `i` (named `PREFIX-NNN`) opens its own `Ingest.Stream` over plaintext gRPC and sends one
//! batch a second carrying what a real agent's batches always carry, `vigil_agent_spool_bytes`
//! and `vigil_agent_spool_unacked_batches`, stamped with the time it is sent, each waiting for
//! its ack. It stops after `R` s plus `i * S` ms (closing the stream, as a node that dies
//! would stop sending). The report gives, per node, the stamp of its last acknowledged batch:
//! the catalog's AgentSilent should fire `agent_silent_seconds` after it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use vigil_proto::v1::{
    AgentMessage, Batch, Hello, MetricType, Sample, Series, agent_message, aggregator_message,
    ingest_client::IngestClient,
};

struct Args {
    endpoint: String,
    nodes: usize,
    run_s: f64,
    stagger_ms: u64,
    prefix: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        endpoint: String::new(),
        nodes: 30,
        run_s: 5.0,
        stagger_ms: 1000,
        prefix: "silent".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |text: String| -> Result<f64, String> {
            text.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("{flag}: {text:?} is not a non-negative number"))
        };
        match flag.as_str() {
            "--endpoint" => args.endpoint = value()?,
            "--nodes" => args.nodes = number(value()?)? as usize,
            "--run-s" => args.run_s = number(value()?)?,
            "--stagger-ms" => args.stagger_ms = number(value()?)? as u64,
            "--prefix" => args.prefix = value()?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.endpoint.is_empty() {
        return Err("--endpoint HOST:PORT is required".into());
    }
    if args.nodes == 0 {
        return Err("--nodes must be at least 1".into());
    }
    Ok(args)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

fn gauge(id: u64, name: &str) -> Series {
    Series {
        id,
        name: name.into(),
        labels: Vec::new(),
        r#type: MetricType::Gauge as i32,
    }
}

/// One node: sends until `stop_after`, then closes its stream; the stamp of its last acked
/// batch.
async fn run_node(endpoint: String, node: String, stop_after: Duration) -> Result<i64, String> {
    let channel = Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{node}: connect: {e}"))?;
    let (outbound, rx) = mpsc::channel(4);
    let hello = Hello {
        node: node.clone(),
        agent_version: "silent-nodes".into(),
        boot_id: "silent-nodes".into(),
        agent_instance: format!("{node}-{}", now_ms()),
        capabilities: Vec::new(),
    };
    outbound
        .send(AgentMessage {
            body: Some(agent_message::Body::Hello(hello)),
        })
        .await
        .map_err(|_| format!("{node}: stream closed"))?;
    let mut inbound = IngestClient::new(channel)
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|status| format!("{node}: stream refused: {status}"))?
        .into_inner();
    let started = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut last_acked = None;
    let mut sequence = 0u64;
    while started.elapsed() < stop_after {
        ticker.tick().await;
        sequence += 1;
        let base = now_ms();
        let batch = Batch {
            sequence,
            series: if sequence == 1 {
                vec![
                    gauge(1, "vigil_agent_spool_bytes"),
                    gauge(2, "vigil_agent_spool_unacked_batches"),
                ]
            } else {
                Vec::new()
            },
            base_time_ms: base,
            samples: vec![
                Sample {
                    series_id: 1,
                    time_delta_ms: 0,
                    value: 4096.0,
                },
                Sample {
                    series_id: 2,
                    time_delta_ms: 0,
                    value: 0.0,
                },
            ],
            ..Batch::default()
        };
        outbound
            .send(AgentMessage {
                body: Some(agent_message::Body::Batch(batch)),
            })
            .await
            .map_err(|_| format!("{node}: stream closed"))?;
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), inbound.message())
                .await
                .map_err(|_| format!("{node}: no ack for batch {sequence} within 10 s"))?
                .map_err(|status| format!("{node}: stream failed: {status}"))?
                .ok_or_else(|| format!("{node}: stream ended"))?;
            match message.body {
                Some(aggregator_message::Body::Ack(ack)) if ack.sequence == sequence => {
                    last_acked = Some(base);
                    break;
                }
                Some(aggregator_message::Body::Rejection(rejection)) => {
                    return Err(format!("{node}: batch rejected: {}", rejection.message));
                }
                _ => {}
            }
        }
    }
    last_acked.ok_or_else(|| format!("{node}: nothing was acknowledged"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("silent-nodes: {error}");
            std::process::exit(2);
        }
    };
    let mut tasks = Vec::new();
    for i in 0..args.nodes {
        let node = format!("{}-{i:03}", args.prefix);
        let stop_after =
            Duration::from_secs_f64(args.run_s) + Duration::from_millis(args.stagger_ms * i as u64);
        tasks.push((
            node.clone(),
            tokio::spawn(run_node(args.endpoint.clone(), node, stop_after)),
        ));
    }
    let mut nodes = Vec::new();
    let mut failed = false;
    for (node, task) in tasks {
        match task.await {
            Ok(Ok(last_acked_ms)) => {
                nodes.push(json!({"node": node, "last_acked_ms": last_acked_ms}));
            }
            Ok(Err(error)) => {
                eprintln!("silent-nodes: {error}");
                failed = true;
            }
            Err(error) => {
                eprintln!("silent-nodes: {node}: {error}");
                failed = true;
            }
        }
    }
    println!("{}", json!({ "nodes": nodes }));
    if failed {
        std::process::exit(1);
    }
}
