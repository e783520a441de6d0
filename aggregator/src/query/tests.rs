//! The engine against an in-memory source, with expected values worked out by hand.

use std::sync::Arc;

use vigil_agent_common::histogram::{bucket_index, bucket_lower_bound_ns, bucket_upper_bound_ns};

use super::{Engine, MemorySource, QueryError, SampleValue, Samples, Value};
use crate::storage::HistogramPoint;

const T0: i64 = 1_700_000_000_000;

fn floats(start: i64, step: i64, values: &[f64]) -> Samples {
    Samples::Floats(
        values
            .iter()
            .enumerate()
            .map(|(i, v)| (start + i as i64 * step, *v))
            .collect(),
    )
}

/// Two nodes: a gauge, a counter (node b resets), and classic histogram buckets.
fn engine() -> Engine {
    let mut source = MemorySource::new();
    source.add(
        &[("__name__", "temp_celsius"), ("node", "a"), ("gpu", "0")],
        floats(T0, 10_000, &[50.0, 52.0, 54.0, 56.0, 58.0, 60.0, 62.0]),
    );
    source.add(
        &[("__name__", "temp_celsius"), ("node", "b"), ("gpu", "0")],
        floats(T0, 10_000, &[70.0, 70.0, 71.0, 71.0, 72.0, 72.0, 73.0]),
    );
    source.add(
        &[("__name__", "requests_total"), ("node", "a")],
        floats(T0, 10_000, &[0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0]),
    );
    source.add(
        &[("__name__", "requests_total"), ("node", "b")],
        floats(T0, 10_000, &[100.0, 110.0, 5.0, 15.0, 25.0, 35.0, 45.0]),
    );
    for (le, counts) in [
        ("0.1", [0.0, 10.0, 20.0]),
        ("0.2", [0.0, 30.0, 60.0]),
        ("+Inf", [0.0, 40.0, 80.0]),
    ] {
        source.add(
            &[("__name__", "lat_bucket"), ("node", "a"), ("le", le)],
            floats(T0, 30_000, &counts),
        );
    }
    Engine::new(Arc::new(source))
}

fn vector(value: Value) -> Vec<(Vec<(String, String)>, f64)> {
    let Value::Vector(samples) = value else {
        panic!("not a vector: {value:?}");
    };
    let mut out: Vec<_> = samples
        .into_iter()
        .map(|s| match s.value {
            SampleValue::Float(v) => (s.labels, v),
            SampleValue::Histogram(h) => panic!("histogram {h:?}"),
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<_> = pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    out.sort();
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn selectors_use_matchers_lookback_and_offset() {
    let engine = engine();
    let at = T0 + 60_000;
    let got = vector(
        engine
            .instant("temp_celsius{node=~\"a|b\", gpu!=\"1\"}", at)
            .unwrap(),
    );
    assert_eq!(
        got,
        vec![
            (
                labels(&[("__name__", "temp_celsius"), ("gpu", "0"), ("node", "a")]),
                62.0
            ),
            (
                labels(&[("__name__", "temp_celsius"), ("gpu", "0"), ("node", "b")]),
                73.0
            ),
        ]
    );
    // offset reads 20 s earlier; between samples the latest one counts.
    let got = vector(
        engine
            .instant("temp_celsius{node=\"a\"} offset 25s", at)
            .unwrap(),
    );
    assert_eq!(got[0].1, 56.0);
    // Five minutes after the last sample it is still seen, one millisecond later it is not.
    assert_eq!(
        vector(
            engine
                .instant("temp_celsius{node!~\"b\"}", at + 300_000)
                .unwrap()
        )
        .len(),
        1
    );
    assert_eq!(
        vector(engine.instant("temp_celsius", at + 300_001).unwrap()).len(),
        0
    );
    assert!(matches!(
        engine.instant("{node=~\".*\"}", at),
        Err(QueryError::BadData(_))
    ));
}

#[test]
fn a_staleness_marker_ends_a_series_and_range_functions_skip_it() {
    let stale = f64::from_bits(super::value::STALE_NAN_BITS);
    let mut source = MemorySource::new();
    // Written at 0 s and 10 s, marked stale at 20 s, back at 40 s.
    source.add(
        &[("__name__", "ALERTS"), ("alertname", "Hot")],
        Samples::Floats(vec![
            (T0, 1.0),
            (T0 + 10_000, 1.0),
            (T0 + 20_000, stale),
            (T0 + 40_000, 1.0),
        ]),
    );
    // Another NaN is a value like any other.
    source.add(
        &[("__name__", "ratio")],
        Samples::Floats(vec![(T0, f64::NAN)]),
    );
    let engine = Engine::new(Arc::new(source));
    assert_eq!(
        vector(engine.instant("ALERTS", T0 + 15_000).unwrap()).len(),
        1
    );
    assert!(
        vector(engine.instant("ALERTS", T0 + 20_000).unwrap()).is_empty(),
        "gone at the marker, not five minutes later"
    );
    assert!(vector(engine.instant("ALERTS", T0 + 39_000).unwrap()).is_empty());
    assert_eq!(
        vector(engine.instant("ALERTS", T0 + 40_000).unwrap()).len(),
        1
    );
    assert_eq!(
        vector(engine.instant("ratio", T0 + 1_000).unwrap()).len(),
        1
    );
    // Range functions see the samples only: 3 of them, never a NaN.
    let got = vector(
        engine
            .instant("count_over_time(ALERTS[1m])", T0 + 45_000)
            .unwrap(),
    );
    assert_eq!(got[0].1, 3.0);
    let got = vector(
        engine
            .instant("max_over_time(ALERTS[1m])", T0 + 45_000)
            .unwrap(),
    );
    assert_eq!(got[0].1, 1.0);
}

#[test]
fn rate_increase_and_resets() {
    let engine = engine();
    let at = T0 + 60_000;
    let got = vector(engine.instant("increase(requests_total[1m])", at).unwrap());
    // node a: 60 over the whole window; node b: 45 - 100 + 110 (the reset) = 55.
    assert_eq!(got[0].0, labels(&[("node", "a")]));
    assert!(close(got[0].1, 60.0), "{got:?}");
    assert!(close(got[1].1, 55.0), "{got:?}");
    let got = vector(engine.instant("rate(requests_total[1m])", at).unwrap());
    assert!(close(got[0].1, 1.0), "{got:?}");
    let got = vector(engine.instant("resets(requests_total[1m])", at).unwrap());
    assert_eq!((got[0].1, got[1].1), (0.0, 1.0));
    let got = vector(
        engine
            .instant("irate(requests_total{node=\"a\"}[1m])", at)
            .unwrap(),
    );
    assert!(close(got[0].1, 1.0));
    let got = vector(
        engine
            .instant("delta(temp_celsius{node=\"a\"}[1m])", at)
            .unwrap(),
    );
    assert!(close(got[0].1, 12.0), "{got:?}");
    let got = vector(
        engine
            .instant("deriv(temp_celsius{node=\"a\"}[1m])", at)
            .unwrap(),
    );
    assert!(close(got[0].1, 0.2), "{got:?}");
    let got = vector(
        engine
            .instant("predict_linear(temp_celsius{node=\"a\"}[1m], 100)", at)
            .unwrap(),
    );
    assert!(close(got[0].1, 82.0), "{got:?}");
}

#[test]
fn over_time_functions() {
    let engine = engine();
    let at = T0 + 60_000;
    let q = |expr: &str| vector(engine.instant(expr, at).unwrap())[0].1;
    assert!(close(
        q("avg_over_time(temp_celsius{node=\"a\"}[1m])"),
        56.0
    ));
    assert_eq!(q("min_over_time(temp_celsius{node=\"a\"}[1m])"), 50.0);
    assert_eq!(q("max_over_time(temp_celsius{node=\"a\"}[1m])"), 62.0);
    assert_eq!(q("sum_over_time(temp_celsius{node=\"a\"}[1m])"), 392.0);
    assert_eq!(q("count_over_time(temp_celsius{node=\"a\"}[1m])"), 7.0);
    assert_eq!(q("last_over_time(temp_celsius{node=\"a\"}[1m])"), 62.0);
    assert_eq!(
        q("quantile_over_time(0.5, temp_celsius{node=\"a\"}[1m])"),
        56.0
    );
    assert!(close(
        q("stdvar_over_time(temp_celsius{node=\"a\"}[1m])"),
        16.0
    ));
    assert!(close(
        q("stddev_over_time(temp_celsius{node=\"a\"}[1m])"),
        4.0
    ));
    assert_eq!(q("changes(temp_celsius{node=\"b\"}[1m])"), 3.0);
    assert_eq!(q("present_over_time(temp_celsius{node=\"b\"}[1m])"), 1.0);
    // last_over_time keeps the metric name, the others drop it.
    let got = vector(
        engine
            .instant("last_over_time(temp_celsius{node=\"a\"}[1m])", at)
            .unwrap(),
    );
    assert_eq!(got[0].0[0].1, "temp_celsius");
}

#[test]
fn aggregations() {
    let engine = engine();
    let at = T0 + 60_000;
    let q = |expr: &str| vector(engine.instant(expr, at).unwrap());
    assert_eq!(q("sum(temp_celsius)"), vec![(vec![], 135.0)]);
    assert_eq!(
        q("avg by (gpu) (temp_celsius)"),
        vec![(labels(&[("gpu", "0")]), 67.5)]
    );
    assert_eq!(
        q("max without (gpu) (temp_celsius)"),
        vec![
            (labels(&[("node", "a")]), 62.0),
            (labels(&[("node", "b")]), 73.0)
        ]
    );
    assert_eq!(q("min(temp_celsius)")[0].1, 62.0);
    assert_eq!(q("count(temp_celsius)")[0].1, 2.0);
    assert_eq!(q("group(temp_celsius)")[0].1, 1.0);
    assert!(close(q("stddev(temp_celsius)")[0].1, 5.5));
    assert!(close(q("stdvar(temp_celsius)")[0].1, 30.25));
    assert!(close(q("quantile(0.5, temp_celsius)")[0].1, 67.5));
    let top = q("topk(1, temp_celsius)");
    assert_eq!(top.len(), 1);
    assert_eq!(top[0].1, 73.0);
    assert_eq!(
        top[0].0[0],
        ("__name__".to_string(), "temp_celsius".to_string())
    );
    assert_eq!(q("bottomk(1, temp_celsius)")[0].1, 62.0);
    assert_eq!(
        q("count_values(\"t\", temp_celsius)"),
        vec![(labels(&[("t", "62")]), 1.0), (labels(&[("t", "73")]), 1.0)]
    );
}

#[test]
fn binary_operators_and_matching() {
    let engine = engine();
    let at = T0 + 60_000;
    let q = |expr: &str| vector(engine.instant(expr, at).unwrap());
    assert_eq!(
        q("temp_celsius - 60"),
        vec![
            (labels(&[("gpu", "0"), ("node", "a")]), 2.0),
            (labels(&[("gpu", "0"), ("node", "b")]), 13.0)
        ]
    );
    // A comparison filters and keeps the name; with bool it answers 0/1 without the name.
    let got = q("temp_celsius > 70");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0[0].1, "temp_celsius");
    assert_eq!(
        q("temp_celsius > bool 70")
            .iter()
            .map(|s| s.1)
            .collect::<Vec<_>>(),
        [0.0, 1.0]
    );
    assert_eq!(q("70 < temp_celsius")[0].1, 73.0);
    // Vector matching: on(node) between different label sets, and group_left.
    let got = q("temp_celsius / on(node) requests_total");
    assert_eq!(
        got,
        vec![
            (labels(&[("node", "a")]), 62.0 / 60.0),
            (labels(&[("node", "b")]), 73.0 / 45.0)
        ]
    );
    let got = q("temp_celsius * on(node) group_left requests_total");
    assert_eq!(got[0].0, labels(&[("gpu", "0"), ("node", "a")]));
    let got = q("requests_total + ignoring(gpu) temp_celsius");
    assert_eq!(got.len(), 2);
    assert!(matches!(
        engine.instant("temp_celsius + ignoring(node) temp_celsius", at),
        Err(QueryError::Execution(_))
    ));
    // Set operators.
    assert_eq!(
        q("temp_celsius and on(node) requests_total{node=\"a\"}").len(),
        1
    );
    assert_eq!(
        q("temp_celsius unless on(node) requests_total{node=\"a\"}")[0].1,
        73.0
    );
    assert_eq!(q("temp_celsius{node=\"a\"} or requests_total").len(), 3);
    let Value::Scalar { value, .. } = engine.instant("2 ^ 3 + 1 > bool 8", at).unwrap() else {
        panic!()
    };
    assert_eq!(value, 1.0);
}

#[test]
fn functions_on_instant_vectors() {
    let engine = engine();
    let at = T0 + 60_000;
    let q = |expr: &str| vector(engine.instant(expr, at).unwrap());
    assert_eq!(q("abs(temp_celsius - 70)")[0].1, 8.0);
    assert_eq!(
        q("clamp(temp_celsius, 65, 70)")
            .iter()
            .map(|s| s.1)
            .collect::<Vec<_>>(),
        [65.0, 70.0]
    );
    assert_eq!(q("clamp_max(temp_celsius, 70)")[1].1, 70.0);
    assert_eq!(q("clamp_min(temp_celsius, 70)")[0].1, 70.0);
    assert_eq!(q("round(temp_celsius / 7, 0.5)")[0].1, 9.0);
    assert_eq!(q("sqrt(temp_celsius{node=\"a\"} - 53)")[0].1, 3.0);
    assert_eq!(
        q("timestamp(temp_celsius{node=\"a\"} offset 15s)")[0].1,
        (T0 + 40_000) as f64 / 1000.0
    );
    assert_eq!(q("vector(time())")[0].1, at as f64 / 1000.0);
    let got = q("label_replace(temp_celsius, \"host\", \"h-$1\", \"node\", \"(.*)\")");
    assert_eq!(got[0].0.iter().find(|(n, _)| n == "host").unwrap().1, "h-a");
    let got = q("label_join(temp_celsius, \"id\", \"/\", \"node\", \"gpu\")");
    assert_eq!(got[1].0.iter().find(|(n, _)| n == "id").unwrap().1, "b/0");
    assert_eq!(
        q("absent(nothing{node=\"x\"})"),
        vec![(labels(&[("node", "x")]), 1.0)]
    );
    assert!(q("absent(temp_celsius)").is_empty());
    assert_eq!(q("absent_over_time(nothing[1m])")[0].1, 1.0);
    let Value::Vector(sorted) = engine.instant("sort_desc(temp_celsius)", at).unwrap() else {
        panic!()
    };
    assert_eq!(sorted[0].value, SampleValue::Float(73.0));
    let Value::Scalar { value, .. } = engine
        .instant("scalar(temp_celsius{node=\"b\"})", at)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(value, 73.0);
    assert!(matches!(
        engine.instant("holt_winters(temp_celsius[1m], 0.5, 0.5)", at),
        Err(QueryError::BadData(message)) if message.contains("holt_winters")
    ));
    // Subqueries: the inner expression at every 10 s step of [at - 30 s, at], both ends in.
    let q = |expr: &str| vector(engine.instant(expr, at).unwrap());
    assert_eq!(
        q("count_over_time(temp_celsius{node=\"a\"}[30s:10s])")[0].1,
        4.0
    );
    assert_eq!(
        q("min_over_time(temp_celsius{node=\"a\"}[30s:10s])")[0].1,
        56.0
    );
    assert_eq!(
        q("max_over_time((temp_celsius{node=\"a\"} * 2)[30s:10s] offset 10s)")[0].1,
        120.0
    );
    assert!(close(
        q("max_over_time(rate(requests_total{node=\"a\"}[20s])[30s:10s])")[0].1,
        1.0
    ));
    let Value::Matrix(series) = engine
        .instant("temp_celsius{node=\"b\"}[20s:10s]", at)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(series[0].points.len(), 3);
    assert!(matches!(
        engine
            .instant("temp_celsius[5m:1m]", at)
            .map(|v| v.result_type()),
        Ok("matrix")
    ));
}

#[test]
fn classic_histogram_quantile() {
    let engine = engine();
    let at = T0 + 60_000;
    let got = vector(
        engine
            .instant(
                "histogram_quantile(0.5, sum by (le) (increase(lat_bucket[1m])))",
                at,
            )
            .unwrap(),
    );
    // 80 observations: rank 40 falls in (0.1, 0.2] after 20, 20 of its 40: 0.15.
    assert_eq!(got.len(), 1);
    assert!(close(got[0].1, 0.15), "{got:?}");
}

fn histogram(values_ns: &[(u64, u64)]) -> HistogramPoint {
    let mut buckets: Vec<(u32, u64)> = Vec::new();
    let mut count = 0;
    let mut sum = 0.0;
    for (value, n) in values_ns {
        let index = bucket_index(*value) as u32;
        match buckets.iter_mut().find(|(i, _)| *i == index) {
            Some(bucket) => bucket.1 += n,
            None => buckets.push((index, *n)),
        }
        count += n;
        sum += *value as f64 / 1e9 * *n as f64;
    }
    buckets.sort();
    HistogramPoint {
        count,
        sum_seconds: sum,
        buckets,
    }
}

#[test]
fn native_histograms_sum_across_nodes_and_give_quantiles() {
    let mut source = MemorySource::new();
    // Two nodes; each second node a sees 90 fast (1 ms) calls, node b 10 slow (10 ms) ones.
    for (node, value) in [("a", (1_000_000u64, 90u64)), ("b", (10_000_000, 10))] {
        let points = (0..=60)
            .map(|i| (T0 + i * 1000, histogram(&[(value.0, value.1 * i as u64)])))
            .collect();
        source.add(
            &[("__name__", "lat_seconds"), ("node", node)],
            Samples::Histograms(points),
        );
    }
    let engine = Engine::new(Arc::new(source));
    let at = T0 + 60_000;
    let expr = "histogram_quantile(0.99, sum by (le) (rate(lat_seconds[1m])))";
    let got = vector(engine.instant(expr, at).unwrap());
    assert_eq!(got.len(), 1);
    let slow = bucket_index(10_000_000);
    let (lower, upper) = (
        bucket_lower_bound_ns(slow) as f64 / 1e9,
        bucket_upper_bound_ns(slow) as f64 / 1e9,
    );
    // rank 99 of 100 per second: 9 of the 10 slow ones, 90% into their bucket.
    assert!(
        close(got[0].1, lower + (upper - lower) * 0.9),
        "{got:?} {lower} {upper}"
    );
    let got = vector(
        engine
            .instant(
                "histogram_quantile(0.5, rate(lat_seconds{node=\"a\"}[1m]))",
                at,
            )
            .unwrap(),
    );
    assert!(got[0].1 > 0.00093 && got[0].1 <= 0.001, "{got:?}");
    let got = vector(
        engine
            .instant("histogram_count(sum(rate(lat_seconds[1m])))", at)
            .unwrap(),
    );
    assert!(close(got[0].1, 100.0), "{got:?}");
    // A range query over the same data: one series, one point per step.
    let Value::Matrix(series) = engine.range(expr, at - 30_000, at, 10_000).unwrap() else {
        panic!()
    };
    assert_eq!(series.len(), 1);
    assert_eq!(series[0].points.len(), 4);
}

#[test]
fn range_queries_step_and_refuse_too_many_points() {
    let engine = engine();
    let Value::Matrix(series) = engine
        .range("temp_celsius{node=\"a\"} * 2", T0, T0 + 60_000, 20_000)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(
        series[0].points,
        vec![
            (T0, SampleValue::Float(100.0)),
            (T0 + 20_000, SampleValue::Float(108.0)),
            (T0 + 40_000, SampleValue::Float(116.0)),
            (T0 + 60_000, SampleValue::Float(124.0)),
        ]
    );
    let Value::Matrix(series) = engine.range("time()", T0, T0 + 2_000, 1_000).unwrap() else {
        panic!()
    };
    assert_eq!(series[0].labels, Vec::<(String, String)>::new());
    assert_eq!(series[0].points.len(), 3);
    assert!(matches!(
        engine.range("temp_celsius", T0, T0 + 12_000_000, 1_000),
        Err(QueryError::BadData(message)) if message.contains("11000") || message.contains("11,000")
    ));
    assert!(matches!(
        engine.range("temp_celsius[1m]", T0, T0 + 1_000, 1_000),
        Err(QueryError::BadData(_))
    ));
    assert!(matches!(
        engine.range("temp_celsius", T0, T0, 0),
        Err(QueryError::BadData(_))
    ));
    assert!(matches!(
        engine.instant("sum(", T0),
        Err(QueryError::BadData(_))
    ));
}

#[test]
fn native_histogram_increase_counts_a_restart() {
    let mut source = MemorySource::new();
    let counts = [10u64, 20, 5, 15];
    let points = counts
        .iter()
        .enumerate()
        .map(|(i, n)| (T0 + i as i64 * 10_000, histogram(&[(1_000_000, *n)])))
        .collect();
    source.add(
        &[("__name__", "lat_seconds"), ("node", "a")],
        Samples::Histograms(points),
    );
    let engine = Engine::new(Arc::new(source));
    // The window is exactly the samples' span: (15 - 10) + 20 lost at the restart = 25.
    let got = vector(
        engine
            .instant("histogram_count(increase(lat_seconds[30s]))", T0 + 30_000)
            .unwrap(),
    );
    assert!(close(got[0].1, 25.0), "{got:?}");
    // Without counter semantics, delta is just last - first.
    let got = vector(
        engine
            .instant("histogram_count(delta(lat_seconds[30s]))", T0 + 30_000)
            .unwrap(),
    );
    assert!(close(got[0].1, 5.0), "{got:?}");
}
