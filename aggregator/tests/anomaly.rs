//! The anomaly scorer in a running aggregator: series chosen by `[anomaly] series` get a
//! `vigil_anomaly_score` that stays low while they behave and passes 1 when they jump, and the
//! scores are stored like any series (queryable with PromQL).

mod common;

use std::time::Duration;

use vigil_aggregator::{
    anomaly::scorer::AnomalyConfig,
    query::{Engine, SampleValue, Value},
};
use vigil_proto::v1::MetricType;

use common::{batch, declare, hello, now_ms, open_plaintext, plaintext_config, sample, start};

/// The latest `vigil_anomaly_score` of GPU 0's temperature written after `after_ms`, waiting
/// up to 10 s for one. (An instant vector's samples carry the evaluation time, so the write
/// time comes from `timestamp()`.)
async fn latest_score(engine: &Engine, after_ms: i64) -> f64 {
    let selector = r#"vigil_anomaly_score{metric="vigil_gpu_temperature_celsius", gpu="0"}"#;
    let float = |value: Value| match value {
        Value::Vector(samples) => samples.first().and_then(|sample| match sample.value {
            SampleValue::Float(value) => Some(value),
            SampleValue::Histogram(_) => None,
        }),
        _ => None,
    };
    for _ in 0..100 {
        let now = now_ms();
        let written_s = float(
            engine
                .instant(&format!("timestamp({selector})"), now)
                .unwrap(),
        );
        if written_s.is_some_and(|written_s| written_s * 1000.0 > after_ms as f64) {
            return float(engine.instant(selector, now).unwrap()).expect("a score");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no vigil_anomaly_score written after {after_ms}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chosen_series_are_scored_and_a_jump_passes_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = plaintext_config(dir.path());
    config.anomaly = AnomalyConfig {
        series: vec![r#"vigil_gpu_temperature_celsius{gpu="0"}"#.into()],
        interval: Duration::from_secs(1),
        ..AnomalyConfig::default()
    };
    let aggregator = start(&config).await;
    let engine = Engine::new(aggregator.store().clone());
    let mut stream = open_plaintext(&aggregator, hello("gpu-node-1", "agent-a")).await;

    // Two hours of a steady temperature with a little noise, at 10 s, ending now (the
    // detector needs an hour before it scores).
    let end = now_ms() - 1_000;
    let start_ms = end - 2 * 3600 * 1000;
    let series = vec![
        declare(
            1,
            "vigil_gpu_temperature_celsius",
            &[("gpu", "0")],
            MetricType::Gauge,
        ),
        declare(
            2,
            "vigil_gpu_temperature_celsius",
            &[("gpu", "1")],
            MetricType::Gauge,
        ),
    ];
    let samples: Vec<_> = (0..720)
        .flat_map(|i: i64| {
            let noise = ((i * 7919) % 11) as f64 / 10.0 - 0.5;
            [
                sample(1, i * 10_000, 61.0 + noise),
                sample(2, i * 10_000, 58.0 + noise),
            ]
        })
        .collect();
    let mut first = batch(1, series, samples);
    first.base_time_ms = start_ms;
    assert!(stream.store(first).await.is_empty());
    let calm = latest_score(&engine, now_ms()).await;
    assert!(calm < 1.0, "a steady series scores below 1, got {calm}");

    // GPU 0 jumps by 30 degrees.
    let mut jump = batch(2, vec![], vec![sample(1, 0, 91.0)]);
    jump.base_time_ms = now_ms();
    assert!(stream.store(jump).await.is_empty());
    let after_jump = latest_score(&engine, now_ms()).await;
    assert!(
        after_jump >= 1.0,
        "a 30-degree jump scores 1 or more, got {after_jump}"
    );

    // Only the chosen series is scored.
    let Value::Vector(scored) = engine
        .instant("count(vigil_anomaly_score)", now_ms())
        .unwrap()
    else {
        panic!("count is a vector");
    };
    assert_eq!(scored[0].value, SampleValue::Float(1.0));
    aggregator.shutdown().await;
}
