//! Writes a few valid inputs for each target into `corpus/<target>/`, so the fuzzer starts from
//! batches that pass admission (realistic times, declared series, a resend, a second agent
//! instance) rather than having to discover them:
//!
//!     cargo run --example seed_corpus      # from aggregator/fuzz/

#[path = "../fuzz_targets/common.rs"]
mod common;

use std::{fs, path::Path};

use common::NOW_MS;
use prost::Message;
use vigil_aggregator::storage::WalRecord;
use vigil_proto::v1::{
    AgentMessage, Batch, Event, Hello, Histogram, Label, MetricType, Sample, Series,
    agent_message::Body,
};

fn label(name: &str, value: &str) -> Label {
    Label {
        name: name.into(),
        value: value.into(),
    }
}

fn declarations() -> Vec<Series> {
    vec![
        Series {
            id: 1,
            name: "vigil_gpu_power_watts".into(),
            labels: vec![label("gpu", "0")],
            r#type: MetricType::Gauge as i32,
        },
        Series {
            id: 2,
            name: "vigil_gpu_xid_errors_total".into(),
            labels: vec![label("gpu", "0")],
            r#type: MetricType::Counter as i32,
        },
        Series {
            id: 3,
            name: "vigil_syscall_latency_seconds".into(),
            labels: vec![label("syscall", "read"), label("comm", "python")],
            r#type: MetricType::Histogram as i32,
        },
    ]
}

fn batch(sequence: u64, series: Vec<Series>, value: f64) -> Batch {
    Batch {
        sequence,
        series,
        base_time_ms: NOW_MS - 2_000,
        samples: vec![
            Sample {
                series_id: 1,
                time_delta_ms: 0,
                value,
            },
            Sample {
                series_id: 2,
                time_delta_ms: 1_000,
                value: value * 2.0,
            },
        ],
        histograms: vec![Histogram {
            series_id: 3,
            time_delta_ms: 1_000,
            count: 4,
            sum_seconds: 0.25,
            bucket_index_deltas: vec![5, 2],
            bucket_counts: vec![3, 1],
        }],
        events: vec![Event {
            time_delta_ms: 500,
            kind: "gpu_xid".into(),
            labels: vec![label("gpu", "0"), label("xid", "79")],
            message: "GPU has fallen off the bus".into(),
        }],
        delta: None,
    }
}

fn stream(messages: &[AgentMessage]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for message in messages {
        message
            .encode_length_delimited(&mut bytes)
            .expect("a Vec grows");
    }
    bytes
}

fn hello(node: &str, instance: &str) -> AgentMessage {
    AgentMessage {
        body: Some(Body::Hello(Hello {
            node: node.into(),
            agent_version: "0.1.0".into(),
            boot_id: "boot".into(),
            agent_instance: instance.into(),
            capabilities: Vec::new(),
        })),
    }
}

fn send(batch: Batch) -> AgentMessage {
    AgentMessage {
        body: Some(Body::Batch(batch)),
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        fs::create_dir_all(&dir).expect("corpus directory");
        fs::write(dir.join(name), bytes).expect("corpus file");
    };

    // batch: a Hello, declarations with their samples, a later batch by id only, a resend,
    // declarations repeated, a second agent instance of the node, another node.
    write(
        "batch",
        "seed-one-batch",
        &stream(&[send(batch(1, declarations(), 250.0))]),
    );
    write(
        "batch",
        "seed-stream",
        &stream(&[
            hello("gpu-node-17", "spool-a"),
            send(batch(1, declarations(), 250.0)),
            send(batch(2, Vec::new(), 260.0)),
            send(batch(2, Vec::new(), 260.0)),
            send(batch(3, declarations(), 270.0)),
            hello("gpu-node-17", "spool-b"),
            send(batch(1, declarations(), 280.0)),
            hello("gpu-node-18", "spool-a"),
            send(batch(1, declarations(), 290.0)),
        ]),
    );

    // batch: the same stream delta-coded (vigil_proto::delta), as an agent sends it to an
    // aggregator that offers the encoding, with a resend and a second stream.
    let mut encoder = vigil_proto::delta::DeltaEncoder::new();
    let mut coded = |batch: Batch| {
        let mut batch = batch;
        encoder.encode(&mut batch);
        send(batch)
    };
    let first_stream = [
        coded(batch(1, declarations(), 250.0)),
        coded(batch(2, Vec::new(), 260.5)),
        coded(batch(2, Vec::new(), 260.5)),
        coded(batch(3, Vec::new(), 261.125)),
    ];
    let mut encoder = vigil_proto::delta::DeltaEncoder::new();
    let mut messages = vec![hello("gpu-node-17", "spool-a")];
    messages.extend(first_stream);
    messages.push(hello("gpu-node-17", "spool-a"));
    for (sequence, value) in [(3, 261.125), (4, 1e300)] {
        let mut batch = batch(sequence, declarations(), value);
        encoder.encode(&mut batch);
        messages.push(send(batch));
    }
    write("batch", "seed-delta-stream", &stream(&messages));

    // wal_replay: mode 0 (header added, CRCs kept): a segment as the aggregator writes it.
    let mut segment = vec![0u8];
    for (sequence, node) in [(1, "gpu-node-17"), (2, "gpu-node-17"), (1, "gpu-node-18")] {
        let record = WalRecord {
            node: node.into(),
            agent_instance: "spool-a".into(),
            batch: Some(batch(sequence, declarations(), 250.0)),
        };
        let payload = record.encode_to_vec();
        segment.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        segment.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        segment.extend_from_slice(&payload);
    }
    write("wal_replay", "seed-segment", &segment);
    // The same with a torn last record.
    write("wal_replay", "seed-torn", &segment[..segment.len() - 7]);
    println!("wrote {}", root.display());
}
