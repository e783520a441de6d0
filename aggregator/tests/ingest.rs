//! Ingest over a real gRPC stream: acks after the write-ahead log, resends stored once, replay
//! after a restart, and bad input rejected piece by piece.

mod common;

use std::{io::Write, path::Path, time::Duration};

use common::*;
use tonic::{Code, codec::CompressionEncoding};
use vigil_agent_common::histogram::BUCKET_COUNT;
use vigil_aggregator::{PointValue, storage::Wal};
use vigil_proto::v1::{
    Batch, Event, Histogram, MetricType, agent_message, ingest_client::IngestClient,
    rejection::Reason,
};

const NODE: &str = "gpu-node-1";

fn power_series() -> Vec<vigil_proto::v1::Series> {
    vec![
        declare(
            1,
            "vigil_gpu_power_watts",
            &[("gpu", "0")],
            MetricType::Gauge,
        ),
        declare(
            2,
            "vigil_syscalls_total",
            &[("syscall", "read")],
            MetricType::Counter,
        ),
    ]
}

/// Sequences of the batches in a copy of the log, read as a restarted aggregator would.
fn sequences_in_log(data_dir: &Path) -> Vec<u64> {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(data_dir.join("wal")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "wal") {
            std::fs::copy(&path, copy.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let mut sequences = Vec::new();
    let _ = Wal::open(copy.path(), 1 << 20, |record| {
        sequences.push(record.batch.unwrap().sequence)
    })
    .unwrap();
    sequences
}

#[tokio::test]
async fn a_batch_is_acked_once_in_the_log_and_a_resend_is_not_stored_twice() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = start(&plaintext_config(dir.path())).await;
    let channel = plaintext_channel(&aggregator).await;
    let mut stream = open(channel.clone(), hello(NODE, "spool-a"), None)
        .await
        .unwrap();

    let first = batch(
        1,
        power_series(),
        vec![sample(1, 0, 250.5), sample(2, 0, 10.0)],
    );
    assert_eq!(stream.store(first.clone()).await, vec![]);
    assert_eq!(
        sequences_in_log(dir.path()),
        vec![1],
        "acked only once in the log"
    );

    // The same batch again, on this stream and on a new one (an agent reconnecting).
    assert_eq!(stream.store(first.clone()).await, vec![]);
    let mut again = open(channel, hello(NODE, "spool-a"), None).await.unwrap();
    assert_eq!(again.store(first).await, vec![]);

    let store = aggregator.store();
    let power = store
        .find_series(NODE, "vigil_gpu_power_watts", &[("gpu", "0")])
        .unwrap();
    let points = store.samples_of(power);
    assert_eq!(points.len(), 1, "stored once: {points:?}");
    assert_eq!(points[0].value, PointValue::Value(250.5));
    assert_eq!(store.high_water(NODE, "spool-a"), Some(1));
    let counters = aggregator.counters();
    assert_eq!(
        (counters.batches_stored, counters.batches_duplicate),
        (1, 2)
    );
    assert_eq!(sequences_in_log(dir.path()), vec![1]);
    aggregator.shutdown().await;
}

#[tokio::test]
async fn the_same_sequence_from_another_agent_instance_or_node_is_its_own_batch() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = start(&plaintext_config(dir.path())).await;
    let channel = plaintext_channel(&aggregator).await;
    for (node, instance) in [
        (NODE, "spool-a"),
        (NODE, "spool-b"),
        ("gpu-node-2", "spool-a"),
    ] {
        let mut stream = open(channel.clone(), hello(node, instance), None)
            .await
            .unwrap();
        assert_eq!(
            stream
                .store(batch(1, power_series(), vec![sample(1, 0, 1.0)]))
                .await,
            vec![]
        );
    }
    let store = aggregator.store();
    let on_node_1 = store
        .find_series(NODE, "vigil_gpu_power_watts", &[("gpu", "0")])
        .unwrap();
    assert_eq!(
        store.samples_of(on_node_1).len(),
        2,
        "two instances of one node share a series"
    );
    assert_eq!(store.series_count("gpu-node-2"), 2);
    aggregator.shutdown().await;
}

#[tokio::test]
async fn a_restart_replays_the_log_and_keeps_series_ids_and_dedupe() {
    let dir = tempfile::tempdir().unwrap();
    let config = plaintext_config(dir.path());
    let aggregator = start(&config).await;
    let mut stream = open_plaintext(&aggregator, hello(NODE, "spool-a")).await;
    stream
        .store(batch(1, power_series(), vec![sample(1, 0, 100.0)]))
        .await;
    stream
        .store(batch(2, vec![], vec![sample(1, 0, 200.0)]))
        .await;
    aggregator.shutdown().await;

    let aggregator = start(&config).await;
    // The shutdown's checkpoint holds both batches: nothing is left to replay.
    assert_eq!(aggregator.replay_report().records, 0);
    let store = aggregator.store();
    let power = store
        .find_series(NODE, "vigil_gpu_power_watts", &[("gpu", "0")])
        .unwrap();
    assert_eq!(store.samples_of(power).len(), 2);
    assert_eq!(store.high_water(NODE, "spool-a"), Some(2));

    let mut stream = open_plaintext(&aggregator, hello(NODE, "spool-a")).await;
    // A resend of batch 2 after the restart: acked, not stored again.
    assert_eq!(
        stream
            .store(batch(2, vec![], vec![sample(1, 0, 200.0)]))
            .await,
        vec![]
    );
    // Batch 3 uses series ids declared before the restart, without declaring them again.
    assert_eq!(
        stream
            .store(batch(
                3,
                vec![],
                vec![sample(1, 0, 300.0), sample(2, 0, 7.0)]
            ))
            .await,
        vec![]
    );
    let values: Vec<_> = store
        .samples_of(power)
        .into_iter()
        .map(|p| p.value)
        .collect();
    assert_eq!(
        values,
        [100.0, 200.0, 300.0].map(PointValue::Value).to_vec()
    );
    assert_eq!(aggregator.counters().batches_duplicate, 1);
    aggregator.shutdown().await;
}

#[tokio::test]
async fn a_torn_record_at_the_end_of_the_log_is_cut_at_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = plaintext_config(dir.path());
    let aggregator = start(&config).await;
    let mut stream = open_plaintext(&aggregator, hello(NODE, "spool-a")).await;
    stream
        .store(batch(1, power_series(), vec![sample(1, 0, 1.0)]))
        .await;
    aggregator.shutdown().await;

    // A crash in the middle of a write: a record header promising more than made it to disk.
    let mut segments: Vec<_> = std::fs::read_dir(dir.path().join("wal"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "wal"))
        .collect();
    segments.sort();
    let last = segments.last().unwrap();
    let whole = std::fs::metadata(last).unwrap().len();
    let mut file = std::fs::OpenOptions::new().append(true).open(last).unwrap();
    file.write_all(&500u32.to_le_bytes()).unwrap();
    file.write_all(&[0xab; 37]).unwrap();
    drop(file);

    let aggregator = start(&config).await;
    let torn = aggregator
        .replay_report()
        .torn_tail
        .clone()
        .expect("the torn record is reported");
    assert_eq!((torn.offset, torn.bytes_cut), (whole, 41));
    // The shutdown's checkpoint holds batch 1; the last segment had only the torn record.
    assert_eq!(aggregator.replay_report().records, 0);
    assert_eq!(aggregator.store().high_water(NODE, "spool-a"), Some(1));
    let mut stream = open_plaintext(&aggregator, hello(NODE, "spool-a")).await;
    assert_eq!(
        stream
            .store(batch(2, vec![], vec![sample(1, 0, 2.0)]))
            .await,
        vec![]
    );
    aggregator.shutdown().await;

    let aggregator = start(&config).await;
    assert_eq!(aggregator.replay_report().torn_tail, None);
    assert_eq!(aggregator.replay_report().records, 0);
    assert_eq!(
        aggregator
            .store()
            .samples_of(aggregator.store().series()[0].id)
            .len(),
        2
    );
    aggregator.shutdown().await;
}

#[tokio::test]
async fn bad_samples_are_rejected_with_their_reason_and_the_rest_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = start(&plaintext_config(dir.path())).await;
    let mut stream = open_plaintext(&aggregator, hello(NODE, "spool-a")).await;
    let latency = |id, deltas: &[u32], counts: &[u64], count, sum_seconds| Histogram {
        series_id: id,
        time_delta_ms: 0,
        count,
        sum_seconds,
        bucket_index_deltas: deltas.to_vec(),
        bucket_counts: counts.to_vec(),
    };
    let mut series = power_series();
    series.push(declare(
        3,
        "vigil_syscall_latency_seconds",
        &[("syscall", "read")],
        MetricType::Histogram,
    ));
    series.push(declare(4, "not a name", &[], MetricType::Gauge));
    let day = 86_400_000;
    let mut bad = batch(
        1,
        series,
        vec![
            sample(1, 0, 250.0),         // stored
            sample(1, 1, f64::NAN),      // a NaN gauge: stored, as Prometheus allows
            sample(2, 0, f64::NAN),      // INVALID_VALUE: counters are finite
            sample(2, 1, f64::INFINITY), // INVALID_VALUE
            sample(1, 10 * 60_000, 1.0), // FUTURE_TIMESTAMP: 10 min ahead
            sample(1, -16 * day, 1.0),   // TOO_OLD: beyond the 15-day retention
            sample(99, 0, 1.0),          // UNKNOWN_SERIES
            sample(4, 0, 1.0),           // MALFORMED: its declaration was
            sample(3, 0, 1.0),           // MALFORMED: a plain sample for a histogram
        ],
    );
    bad.histograms = vec![
        latency(3, &[5, 2], &[3, 1], 4, 0.002),           // stored
        latency(3, &[5, 2], &[3], 3, 0.002),              // MALFORMED: lengths differ
        latency(3, &[BUCKET_COUNT as u32], &[1], 1, 0.1), // MALFORMED: no such bucket
        latency(3, &[5], &[1], 1, f64::NAN),              // INVALID_VALUE
    ];
    bad.events = vec![Event {
        time_delta_ms: 0,
        kind: "gpu_xid".into(),
        labels: vec![],
        message: "Xid 79".into(),
    }];
    let rejections = stream.store(bad).await;

    let by_reason = |reason: Reason| {
        rejections
            .iter()
            .find(|r| r.reason == reason as i32)
            .unwrap_or_else(|| panic!("no {reason:?} rejection in {rejections:#?}"))
    };
    for rejection in &rejections {
        assert_eq!(rejection.sequence, 1);
        assert!(
            rejection.message.contains("the rest is stored"),
            "{}",
            rejection.message
        );
    }
    let invalid = by_reason(Reason::InvalidValue);
    assert_eq!(
        (invalid.rejected_samples, &invalid.series_ids[..]),
        (3, &[2, 3][..])
    );
    assert!(
        invalid.message.contains("counters must be finite"),
        "{}",
        invalid.message
    );
    assert_eq!(by_reason(Reason::FutureTimestamp).rejected_samples, 1);
    assert_eq!(by_reason(Reason::TooOld).rejected_samples, 1);
    let unknown = by_reason(Reason::UnknownSeries);
    assert_eq!(
        (unknown.rejected_samples, &unknown.series_ids[..]),
        (1, &[99][..])
    );
    assert!(
        unknown.message.contains("declare the series again"),
        "{}",
        unknown.message
    );
    let malformed = by_reason(Reason::Malformed);
    assert_eq!(
        (malformed.rejected_samples, &malformed.series_ids[..]),
        (4, &[3, 4][..])
    );
    assert_eq!(rejections.len(), 5);

    let store = aggregator.store();
    let power = store
        .find_series(NODE, "vigil_gpu_power_watts", &[("gpu", "0")])
        .unwrap();
    let power_points = store.samples_of(power);
    assert_eq!(power_points.len(), 2);
    assert_eq!(power_points[0].value, PointValue::Value(250.0));
    assert!(matches!(power_points[1].value, PointValue::Value(v) if v.is_nan()));
    let latency_series = store
        .find_series(
            NODE,
            "vigil_syscall_latency_seconds",
            &[("syscall", "read")],
        )
        .unwrap();
    let histograms = store.samples_of(latency_series);
    assert_eq!(histograms.len(), 1);
    let PointValue::Histogram(histogram) = &histograms[0].value else {
        panic!("{histograms:?}")
    };
    assert_eq!(histogram.buckets, vec![(5, 3), (7, 1)]);
    assert_eq!(store.events().len(), 1);
    assert_eq!(
        store.series_count(NODE),
        3,
        "the malformed declaration is not stored"
    );

    let counters = aggregator.counters();
    assert_eq!(counters.rejected_invalid_value, 3);
    assert_eq!(counters.rejected_unknown_series, 1);
    assert_eq!(counters.rejected_malformed, 4);
    assert_eq!(
        (counters.samples_stored, counters.histograms_stored),
        (2, 1)
    );
    aggregator.shutdown().await;
}

#[tokio::test]
async fn series_past_the_node_limit_are_refused_and_stay_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = plaintext_config(dir.path());
    config.limits.max_series_per_node = 2;
    let aggregator = start(&config).await;
    let mut stream = open_plaintext(&aggregator, hello(NODE, "spool-a")).await;
    let mut series = power_series();
    series.push(declare(
        3,
        "vigil_gpu_temperature_celsius",
        &[("gpu", "0")],
        MetricType::Gauge,
    ));
    let rejections = stream
        .store(batch(
            1,
            series,
            vec![sample(1, 0, 1.0), sample(3, 0, 50.0)],
        ))
        .await;
    assert_eq!(rejections.len(), 1, "{rejections:#?}");
    assert_eq!(rejections[0].reason, Reason::SeriesLimit as i32);
    assert_eq!(rejections[0].series_ids, vec![3]);
    assert!(rejections[0].message.contains("limits.max_series_per_node"));

    // Later samples of the refused id keep saying why, rather than "unknown series".
    let rejections = stream
        .store(batch(2, vec![], vec![sample(3, 0, 51.0)]))
        .await;
    assert_eq!(rejections[0].reason, Reason::SeriesLimit as i32);
    assert_eq!(aggregator.store().series_count(NODE), 2);
    aggregator.shutdown().await;
}

#[tokio::test]
async fn a_stream_that_does_not_open_with_a_hello_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = start(&plaintext_config(dir.path())).await;
    let channel = plaintext_channel(&aggregator).await;
    let status = match open_with(
        channel.clone(),
        agent_message::Body::Batch(Batch::default()),
        None,
    )
    .await
    {
        Err(status) => status,
        Ok(mut stream) => stream.end_status().await,
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("must open with a Hello"),
        "{status:?}"
    );

    let status = match open(channel, hello("", "spool-a"), None).await {
        Err(status) => status,
        Ok(mut stream) => stream.end_status().await,
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("Hello.node"), "{status:?}");
    assert_eq!(aggregator.counters().streams_invalid, 2);
    aggregator.shutdown().await;
}

#[tokio::test]
async fn an_oversize_message_ends_the_stream_with_resource_exhausted_and_nothing_else_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = plaintext_config(dir.path());
    config.grpc.max_message_bytes = 4096;
    let aggregator = start(&config).await;
    let channel = plaintext_channel(&aggregator).await;
    let mut stream = open(channel.clone(), hello(NODE, "spool-a"), None)
        .await
        .unwrap();
    stream
        .store(batch(1, power_series(), vec![sample(1, 0, 1.0)]))
        .await;

    let huge: Vec<_> = (0..2000).map(|i| sample(1, i, 1.0)).collect();
    stream.send(batch(2, vec![], huge)).await;
    let status = stream.end_status().await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("grpc.max_message_bytes"),
        "{status:?}"
    );
    assert_eq!(aggregator.counters().messages_oversize, 1);
    let audit = audit_lines(aggregator.audit_path());
    assert!(
        audit
            .iter()
            .any(|line| line["code"] == "resource_exhausted" && line["node"] == NODE),
        "{audit:#?}"
    );

    // The agent splits the batch and goes on, on a new stream.
    let mut stream = open(channel, hello(NODE, "spool-a"), None).await.unwrap();
    assert_eq!(
        stream
            .store(batch(2, vec![], vec![sample(1, 0, 2.0)]))
            .await,
        vec![]
    );
    let power = aggregator
        .store()
        .find_series(NODE, "vigil_gpu_power_watts", &[("gpu", "0")])
        .unwrap();
    assert_eq!(aggregator.store().samples_of(power).len(), 2);
    aggregator.shutdown().await;
}

#[tokio::test]
async fn gzip_and_zstd_compressed_streams_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = start(&plaintext_config(dir.path())).await;
    let channel = plaintext_channel(&aggregator).await;
    for (sequence, encoding) in [
        (1, CompressionEncoding::Gzip),
        (2, CompressionEncoding::Zstd),
    ] {
        let (outbound, rx) = tokio::sync::mpsc::channel(4);
        let messages = [
            agent_message::Body::Hello(hello(NODE, "spool-a")),
            agent_message::Body::Batch(batch(sequence, power_series(), vec![sample(1, 0, 1.0)])),
        ];
        for body in messages {
            outbound
                .send(vigil_proto::v1::AgentMessage { body: Some(body) })
                .await
                .unwrap();
        }
        let mut client = IngestClient::new(channel.clone())
            .send_compressed(encoding)
            .accept_compressed(encoding);
        let mut replies = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let reply = tokio::time::timeout(Duration::from_secs(10), replies.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            matches!(reply.body, Some(vigil_proto::v1::aggregator_message::Body::Ack(ack)) if ack.sequence == sequence),
            "{encoding:?}"
        );
    }
    assert_eq!(aggregator.counters().batches_stored, 2);
    aggregator.shutdown().await;
}

#[tokio::test]
async fn a_stream_without_a_hello_in_time_ends_with_deadline_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = plaintext_config(dir.path());
    config.grpc.hello_timeout = Duration::from_millis(200);
    let aggregator = start(&config).await;
    let (_outbound, rx) = tokio::sync::mpsc::channel::<vigil_proto::v1::AgentMessage>(1);
    let status = IngestClient::new(plaintext_channel(&aggregator).await)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("no Hello"), "{status:?}");
    aggregator.shutdown().await;
}

#[tokio::test]
async fn delta_coded_batches_are_offered_decoded_and_stored_and_a_broken_block_ends_the_stream() {
    use vigil_proto::delta::{DELTA_V1, DeltaEncoder, ENCODINGS_HEADER};
    let dir = tempfile::tempdir().unwrap();
    let aggregator = start(&plaintext_config(dir.path())).await;
    let channel = plaintext_channel(&aggregator).await;

    // The offer is in the stream's response headers.
    let (outbound, rx) = tokio::sync::mpsc::channel(4);
    outbound
        .send(vigil_proto::v1::AgentMessage {
            body: Some(agent_message::Body::Hello(hello(NODE, "spool-d"))),
        })
        .await
        .unwrap();
    let response = IngestClient::new(channel.clone())
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    assert_eq!(response.metadata().get(ENCODINGS_HEADER).unwrap(), DELTA_V1);
    drop((outbound, response));

    let mut stream = open(channel.clone(), hello(NODE, "spool-d"), None)
        .await
        .unwrap();
    let mut encoder = DeltaEncoder::new();
    let values = [
        250.5,
        250.5,
        251.125,
        f64::from_bits(0x4070_0123_4567_89ab),
        0.0,
    ];
    for (k, &value) in values.iter().enumerate() {
        let sequence = k as u64 + 1;
        let mut wire = batch(
            sequence,
            if k == 0 { power_series() } else { vec![] },
            vec![sample(1, 0, value), sample(2, 0, 10.0 * sequence as f64)],
        );
        wire.base_time_ms = now_ms() - 10_000 + k as i64 * 1000;
        // A resend of batch 2 on the same stream: acked as a duplicate, and still decoded (the
        // encoder moved on, so must the aggregator).
        if sequence == 3 {
            let mut resent = batch(2, vec![], vec![sample(1, 0, 250.0)]);
            resent.base_time_ms = now_ms() - 9_000;
            encoder.encode(&mut resent);
            assert_eq!(stream.store(resent).await, vec![]);
        }
        encoder.encode(&mut wire);
        assert!(wire.samples.is_empty() && wire.delta.is_some());
        assert_eq!(stream.store(wire).await, vec![], "batch {sequence}");
    }
    let store = aggregator.store();
    let power = store
        .find_series(NODE, "vigil_gpu_power_watts", &[("gpu", "0")])
        .unwrap();
    let stored: Vec<u64> = store
        .samples_of(power)
        .iter()
        .map(|p| match p.value {
            PointValue::Value(v) => v.to_bits(),
            ref other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        stored,
        values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "bit for bit"
    );
    assert_eq!(aggregator.counters().batches_delta_coded, 6);

    // A block that does not decode: the stream ends with a message naming the batch; what was
    // acked stays, and a new stream (fresh encoding state) goes on.
    let mut broken = batch(6, vec![], vec![sample(1, 0, 1.0)]);
    encoder.encode(&mut broken);
    broken.delta.as_mut().unwrap().sample_kinds[0] = 99;
    stream.send(broken).await;
    let status = stream.end_status().await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("batch 6: undecodable delta block"),
        "{status:?}"
    );
    assert_eq!(aggregator.counters().messages_undecodable, 1);
    let mut again = open(channel, hello(NODE, "spool-d"), None).await.unwrap();
    let mut encoder = DeltaEncoder::new();
    let mut resent = batch(6, vec![], vec![sample(1, 0, 1.0)]);
    encoder.encode(&mut resent);
    assert_eq!(again.store(resent).await, vec![]);
    assert_eq!(store.samples_of(power).len(), values.len() + 1);
    aggregator.shutdown().await;
}
