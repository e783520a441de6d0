//! `/metrics` on the agent (`[metrics] listen`): the latest collection pass's samples and the
//! agent's own state in the Prometheus text format (0.0.4), for sites that scrape nodes
//! directly instead of (or besides) streaming to the aggregator.
//!
//! Series look as they do through the aggregator's query API: a `node` label on every series,
//! counters (`*_total`) typed as counters, histograms as classic cumulative
//! `name_bucket{le="<seconds>"}` series ending in `+Inf`, then `name_sum` and `name_count`.
//! `le` is written by the same rule as the aggregator's (`storage::query_view::le_label`): the
//! bucket's upper bound in seconds, in the shortest form that reads back to the same float.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Deserialize;

use crate::{
    collectors::CollectorStatus,
    sample::{Sample, SampleValue},
};

/// `[metrics]` in the agent's config.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` on this address during `vigil-agent run`, e.g. `"127.0.0.1:9465"`
    /// (default: not served). Anyone who reaches it reads the node's telemetry: bind to
    /// loopback or a network only scrapers reach.
    pub listen: Option<SocketAddr>,
}

/// The agent's own state besides the pass's samples.
#[derive(Debug, Clone, Default)]
pub struct AgentState {
    /// Highest batch sequence the aggregator acked.
    pub acked_sequence: u64,
    /// When the acked sequence last moved, ms since the epoch (0: not since start).
    pub last_ack_ms: u64,
    /// When the latest pass ran, ms since the epoch.
    pub last_pass_ms: u64,
}

#[derive(Default)]
struct Latest {
    samples: Vec<Sample>,
    collectors: BTreeMap<&'static str, CollectorStatus>,
    state: AgentState,
}

/// What `/metrics` serves, replaced after every collection pass.
pub struct Exposition {
    node: String,
    latest: Mutex<Latest>,
}

impl Exposition {
    pub fn new(node: String) -> Exposition {
        Exposition {
            node,
            latest: Mutex::new(Latest::default()),
        }
    }

    /// Records a pass: its samples, the collectors' statuses and the spool's acked sequence.
    pub fn record_pass(
        &self,
        samples: &[Sample],
        collectors: &BTreeMap<&'static str, CollectorStatus>,
        acked_sequence: u64,
    ) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        if acked_sequence > latest.state.acked_sequence {
            latest.state.last_ack_ms = now_ms;
        }
        latest.state.acked_sequence = acked_sequence;
        latest.state.last_pass_ms = now_ms;
        latest.samples = samples.to_vec();
        latest.collectors = collectors.clone();
    }

    /// The whole exposition now.
    pub fn render(&self) -> String {
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        render(
            &self.node,
            &latest.samples,
            &latest.collectors,
            &latest.state,
        )
    }
}

/// `le` as the aggregator writes it: seconds, shortest round-tripping form, exponent form
/// only where Rust's plain form would use one.
pub fn le_text(seconds: f64) -> String {
    let mut text = format!("{seconds}");
    if text.contains('e') {
        text = format!("{seconds:e}");
    }
    text
}

/// A sample value as the text format spells it.
fn value_text(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value == f64::INFINITY {
        "+Inf".into()
    } else if value == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{value}")
    }
}

/// A label value escaped for the text format (backslash, double quote, newline).
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `{node="...",a="b",...}` with extra labels (such as `le`) last.
fn label_set<'a>(
    node: &str,
    labels: impl IntoIterator<Item = (&'a str, &'a str)>,
    extra: Option<(&str, &str)>,
) -> String {
    let mut out = format!("{{node=\"{}\"", escape(node));
    for (name, value) in labels {
        // A collector's own `node` label would duplicate ours.
        if name == "node" {
            continue;
        }
        let _ = write!(out, ",{name}=\"{}\"", escape(value));
    }
    if let Some((name, value)) = extra {
        let _ = write!(out, ",{name}=\"{}\"", escape(value));
    }
    out.push('}');
    out
}

/// HELP text: what the agent's own families mean; collectors' families are documented in the
/// README and docs/ by name.
fn help_for(name: &str) -> &'static str {
    match name {
        "vigil_agent_collector_up" => {
            "Whether a collector is running (1: ok or degraded, 0: unavailable)."
        }
        "vigil_agent_spool_bytes" => "Bytes of batches in the on-disk spool.",
        "vigil_agent_spool_unacked_batches" => {
            "Batches in the spool not yet acknowledged by the aggregator."
        }
        "vigil_agent_spool_dropped_batches_total" => {
            "Batches dropped from the full spool before the aggregator acknowledged them."
        }
        "vigil_agent_rejected_samples_total" => "Samples the aggregator rejected, by reason.",
        _ => "Collected by vigil-agent (see the README for its meaning).",
    }
}

fn family_header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The exposition of a pass's samples and the agent's state.
pub fn render(
    node: &str,
    samples: &[Sample],
    collectors: &BTreeMap<&'static str, CollectorStatus>,
    state: &AgentState,
) -> String {
    let mut out = String::new();
    // One family per name, each written once, names sorted for a stable output.
    let mut families: BTreeMap<&str, Vec<&Sample>> = BTreeMap::new();
    for sample in samples {
        families.entry(sample.name).or_default().push(sample);
    }
    for (name, members) in &families {
        let histogram = members
            .iter()
            .any(|s| matches!(s.value, SampleValue::Histogram(_)));
        let kind = if histogram {
            "histogram"
        } else if name.ends_with("_total") {
            // The same rule the agent uses to declare series to the aggregator.
            "counter"
        } else {
            "gauge"
        };
        family_header(&mut out, name, kind, help_for(name));
        for sample in members {
            let labels = || sample.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            match &sample.value {
                SampleValue::Value(value) if !histogram => {
                    let _ = writeln!(
                        out,
                        "{name}{} {}",
                        label_set(node, labels(), None),
                        value_text(*value)
                    );
                }
                // A plain value under a histogram name cannot be written in its family.
                SampleValue::Value(_) => {}
                SampleValue::Histogram(h) => {
                    for (le, cumulative) in &h.buckets {
                        let le = le_text(*le);
                        let _ = writeln!(
                            out,
                            "{name}_bucket{} {cumulative}",
                            label_set(node, labels(), Some(("le", &le)))
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{name}_bucket{} {}",
                        label_set(node, labels(), Some(("le", "+Inf"))),
                        h.count
                    );
                    let _ = writeln!(
                        out,
                        "{name}_sum{} {}",
                        label_set(node, labels(), None),
                        value_text(h.sum)
                    );
                    let _ = writeln!(
                        out,
                        "{name}_count{} {}",
                        label_set(node, labels(), None),
                        h.count
                    );
                }
            }
        }
    }

    // `run` sends collector_up with each batch (so it is among the samples); written here
    // only when it is not.
    if !families.contains_key("vigil_agent_collector_up") {
        family_header(
            &mut out,
            "vigil_agent_collector_up",
            "gauge",
            help_for("vigil_agent_collector_up"),
        );
        for (collector, status) in collectors {
            let up = u8::from(!matches!(status, CollectorStatus::Unavailable(_)));
            let _ = writeln!(
                out,
                "vigil_agent_collector_up{} {up}",
                label_set(node, [("collector", *collector)], None)
            );
        }
    }
    family_header(
        &mut out,
        "vigil_agent_collector_degraded",
        "gauge",
        "Whether a collector runs with some data missing (see the agent's log for why).",
    );
    for (collector, status) in collectors {
        let degraded = u8::from(matches!(status, CollectorStatus::Degraded(_)));
        let _ = writeln!(
            out,
            "vigil_agent_collector_degraded{} {degraded}",
            label_set(node, [("collector", *collector)], None)
        );
    }
    let node_only = label_set(node, [], None);
    for (name, help, value) in [
        (
            "vigil_agent_acked_sequence",
            "Highest batch sequence the aggregator acknowledged.",
            state.acked_sequence as f64,
        ),
        (
            "vigil_agent_last_ack_timestamp_seconds",
            "When the aggregator last acknowledged a new batch (0: not since the agent started).",
            state.last_ack_ms as f64 / 1000.0,
        ),
        (
            "vigil_agent_last_pass_timestamp_seconds",
            "When the latest collection pass ran.",
            state.last_pass_ms as f64 / 1000.0,
        ),
    ] {
        // Written only when no collector sample already uses the name.
        if families.contains_key(name) {
            continue;
        }
        family_header(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name}{node_only} {}", value_text(value));
    }
    out
}

/// Serves `GET /metrics` on `listener` until `stop` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    exposition: Arc<Exposition>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::{http::header, routing::get};
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let exposition = exposition.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    exposition.render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::{Labels, LatencyHistogram};

    #[test]
    fn histograms_counters_and_escaping() {
        let mut histogram = LatencyHistogram::default();
        histogram.record(1_000); // 1 us
        histogram.record(1_000);
        histogram.record(2_000_000); // 2 ms
        histogram.record(200_000_000_000); // 200 s: overflow, only in +Inf
        let labels = Labels::from([
            ("comm".to_string(), "py\"thon\\\n".to_string()),
            ("syscall".to_string(), "read".to_string()),
        ]);
        let samples = vec![
            Sample {
                name: "vigil_syscall_latency_seconds",
                labels: labels.clone(),
                value: SampleValue::Histogram(histogram.snapshot()),
            },
            Sample {
                name: "vigil_process_cpu_seconds_total",
                labels: Labels::from([("pid".to_string(), "42".to_string())]),
                value: SampleValue::Value(1.5),
            },
        ];
        let collectors = BTreeMap::from([
            ("gpu", CollectorStatus::Unavailable("no NVML".into())),
            ("host", CollectorStatus::Ok),
        ]);
        let text = render("n1", &samples, &collectors, &AgentState::default());
        let comm = r#"comm="py\"thon\\\n""#;
        let expected_buckets = histogram
            .snapshot()
            .buckets
            .iter()
            .map(|(le, _)| le_text(*le))
            .collect::<Vec<_>>();
        assert_eq!(expected_buckets.len(), 2);
        assert!(text.contains("# TYPE vigil_syscall_latency_seconds histogram\n"));
        assert!(text.contains(&format!(
            "vigil_syscall_latency_seconds_bucket{{node=\"n1\",{comm},syscall=\"read\",le=\"{}\"}} 2\n",
            expected_buckets[0]
        )));
        assert!(text.contains(&format!(
            "vigil_syscall_latency_seconds_bucket{{node=\"n1\",{comm},syscall=\"read\",le=\"{}\"}} 3\n",
            expected_buckets[1]
        )));
        assert!(text.contains(&format!(
            "vigil_syscall_latency_seconds_bucket{{node=\"n1\",{comm},syscall=\"read\",le=\"+Inf\"}} 4\n"
        )));
        assert!(text.contains(&format!(
            "vigil_syscall_latency_seconds_count{{node=\"n1\",{comm},syscall=\"read\"}} 4\n"
        )));
        assert!(text.contains("# TYPE vigil_process_cpu_seconds_total counter\n"));
        assert!(text.contains("vigil_process_cpu_seconds_total{node=\"n1\",pid=\"42\"} 1.5\n"));
        assert!(text.contains("vigil_agent_collector_up{node=\"n1\",collector=\"gpu\"} 0\n"));
        assert!(text.contains("vigil_agent_collector_up{node=\"n1\",collector=\"host\"} 1\n"));

        // When the pass's samples carry collector_up already, it is written once.
        let mut with_up = samples.clone();
        with_up.push(Sample {
            name: "vigil_agent_collector_up",
            labels: Labels::from([("collector".to_string(), "host".to_string())]),
            value: SampleValue::Value(1.0),
        });
        let text = render("n1", &with_up, &collectors, &AgentState::default());
        assert_eq!(
            text.matches("# TYPE vigil_agent_collector_up gauge")
                .count(),
            1
        );
        assert_eq!(
            text.matches("vigil_agent_collector_up{").count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn le_matches_the_aggregators_rule() {
        // The aggregator's `le_label` prints bucket_upper_bound_ns(index) / 1e9 this way.
        assert_eq!(le_text(64.0 / 1e9), "0.000000064");
        assert_eq!(le_text(0.5), "0.5");
        assert_eq!(le_text(137.438953472), "137.438953472");
        // Rust's plain form never uses an exponent, so neither rule ever does.
        assert_eq!(le_text(1e22), "10000000000000000000000");
        assert_eq!(value_text(f64::INFINITY), "+Inf");
        assert_eq!(value_text(f64::NAN), "NaN");
    }
}
