//! `/metrics`: the aggregator's own telemetry in the Prometheus text format (version 0.0.4),
//! for Prometheus to scrape. It needs no token, like node_exporter's: it holds counts and
//! rates, never telemetry of the fleet (no node names, no series labels).
//!
//! Written by hand rather than with `prometheus-client`: that crate encodes OpenMetrics (`# EOF`,
//! counters typed under their name without `_total`), which `promtool check metrics` and the
//! 0.0.4 text parser do not accept as is; the format here is small and fixed. Other parts add
//! their own families with [`Telemetry::add_writer`] (e.g. the remote-write exporter's
//! `write_metrics(&mut String)`).

use std::{
    fmt::Write as _,
    sync::{Arc, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};

use super::HttpState;
use crate::{
    ingest::counters::CountersSnapshot,
    nodes::NodeRegistry,
    query_service::{Method, Outcome, QueryStats},
    storage::Store,
};

/// Appends complete metric families (`# HELP`, `# TYPE`, samples) in the text format.
pub type MetricsWriter = Arc<dyn Fn(&mut String) + Send + Sync>;

/// What `/metrics` reads besides the store and the ingest counters.
pub struct Telemetry {
    started: SystemTime,
    nodes: Arc<NodeRegistry>,
    query: Arc<QueryStats>,
    writers: RwLock<Vec<MetricsWriter>>,
}

impl Telemetry {
    pub fn new(nodes: Arc<NodeRegistry>, query: Arc<QueryStats>) -> Telemetry {
        Telemetry {
            started: SystemTime::now(),
            nodes,
            query,
            writers: RwLock::new(Vec::new()),
        }
    }

    /// Adds a writer whose families are appended to every scrape. Family names must not
    /// collide with the aggregator's (`vigil_aggregator_*`, `process_*`).
    pub fn add_writer(&self, writer: MetricsWriter) {
        self.writers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(writer);
    }

    pub fn nodes(&self) -> &Arc<NodeRegistry> {
        &self.nodes
    }

    pub fn query(&self) -> &Arc<QueryStats> {
        &self.query
    }
}

impl Default for Telemetry {
    fn default() -> Telemetry {
        Telemetry::new(Arc::default(), Arc::default())
    }
}

pub fn routes() -> Router<HttpState> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    // Reading the store's series and /proc is blocking work: off the async workers.
    let text = tokio::task::spawn_blocking(move || render(&state))
        .await
        .unwrap_or_else(|error| format!("# rendering failed: {error}\n"));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

/// The whole exposition.
pub fn render(state: &HttpState) -> String {
    let mut out = Exposition::default();
    let telemetry = &state.telemetry;
    out.family(
        "vigil_aggregator_build_info",
        "gauge",
        "Always 1; the aggregator's version in the label.",
    );
    out.sample(
        "vigil_aggregator_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    ingest_metrics(&mut out, &state.counters.snapshot());

    let (nodes_connected, streams) = telemetry.nodes.connected_counts();
    out.gauge(
        "vigil_aggregator_agent_streams",
        "Agent ingest streams open now.",
        streams as f64,
    );
    out.gauge(
        "vigil_aggregator_nodes_connected",
        "Nodes with an open agent stream.",
        nodes_connected as f64,
    );
    out.gauge(
        "vigil_aggregator_nodes_known",
        "Nodes heard from since the aggregator started.",
        telemetry.nodes.snapshot().len() as f64,
    );
    storage_metrics(&mut out, &state.store);
    query_metrics(&mut out, &telemetry.query);
    process_metrics(&mut out, telemetry.started);

    let mut text = out.text;
    for writer in telemetry
        .writers
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .iter()
    {
        writer(&mut text);
    }
    text
}

fn ingest_metrics(out: &mut Exposition, c: &CountersSnapshot) {
    out.counter(
        "vigil_aggregator_connections_accepted_total",
        "TCP connections accepted on the gRPC port (before TLS).",
        c.connections_accepted,
    );
    out.counter(
        "vigil_aggregator_tls_handshake_failures_total",
        "TLS handshakes that failed.",
        c.tls_handshake_failures,
    );
    out.labelled_counters(
        "vigil_aggregator_ingest_streams_total",
        "Ingest streams by outcome: accepted, or refused as unauthenticated, permission_denied or invalid (no valid Hello).",
        "outcome",
        &[
            ("accepted", c.streams_accepted),
            ("unauthenticated", c.streams_unauthenticated),
            ("permission_denied", c.streams_permission_denied),
            ("invalid", c.streams_invalid),
        ],
    );
    out.labelled_counters(
        "vigil_aggregator_ingest_messages_refused_total",
        "Agent messages not processed: over grpc.max_message_bytes (oversize), of an unknown kind (unknown, ignored), or with a delta block that does not decode (undecodable: the stream is ended and the agent resends).",
        "reason",
        &[
            ("oversize", c.messages_oversize),
            ("unknown", c.messages_unknown),
            ("undecodable", c.messages_undecodable),
        ],
    );
    out.counter(
        "vigil_aggregator_ingest_delta_batches_total",
        "Batches that arrived in the stream-delta encoding (docs/protocol.md).",
        c.batches_delta_coded,
    );
    out.labelled_counters(
        "vigil_aggregator_ingest_batches_total",
        "Batches by outcome: stored, duplicate (a resend, acked and not stored again) or malformed (refused whole).",
        "outcome",
        &[
            ("stored", c.batches_stored),
            ("duplicate", c.batches_duplicate),
            ("malformed", c.batches_malformed),
        ],
    );
    out.labelled_counters(
        "vigil_aggregator_ingest_stored_total",
        "Items stored, by kind.",
        "kind",
        &[
            ("sample", c.samples_stored),
            ("histogram", c.histograms_stored),
            ("event", c.events_stored),
            ("series_declaration", c.series_declared),
        ],
    );
    out.labelled_counters(
        "vigil_aggregator_ingest_rejected_total",
        "Samples, histograms, events and declarations rejected, by Rejection reason.",
        "reason",
        &[
            ("invalid_value", c.rejected_invalid_value),
            ("future_timestamp", c.rejected_future_timestamp),
            ("too_old", c.rejected_too_old),
            ("series_limit", c.rejected_series_limit),
            ("unknown_series", c.rejected_unknown_series),
            ("malformed", c.rejected_malformed),
        ],
    );
}

fn storage_metrics(out: &mut Exposition, store: &Store) {
    let stats = store.stats();
    out.gauge(
        "vigil_aggregator_series",
        "Series in the store.",
        stats.series as f64,
    );
    out.gauge(
        "vigil_aggregator_storage_head_chunks",
        "Open (head) chunks in memory.",
        stats.head_chunks as f64,
    );
    out.gauge(
        "vigil_aggregator_storage_head_bytes",
        "Encoded bytes of the open (head) chunks in memory.",
        stats.head_bytes as f64,
    );
    out.gauge(
        "vigil_aggregator_storage_pending_chunks",
        "Closed chunks in memory waiting for the next checkpoint.",
        stats.pending_chunks as f64,
    );
    out.gauge(
        "vigil_aggregator_storage_disk_bytes",
        "Size of the storage database file.",
        stats.disk_bytes as f64,
    );
    out.gauge(
        "vigil_aggregator_storage_stored_bytes",
        "Bytes the storage database's tables hold.",
        stats.stored_bytes as f64,
    );
    out.counter(
        "vigil_aggregator_storage_chunks_written_total",
        "Chunks written to disk.",
        stats.chunks_written,
    );
    out.counter(
        "vigil_aggregator_storage_chunk_written_bytes_total",
        "Encoded bytes of the chunks written to disk.",
        stats.chunk_bytes_written,
    );
    out.counter(
        "vigil_aggregator_storage_checkpoints_total",
        "Checkpoints finished.",
        stats.checkpoints,
    );
    out.counter(
        "vigil_aggregator_storage_checkpoint_failures_total",
        "Checkpoints that failed.",
        stats.checkpoint_failures,
    );
    if let Some(unix_ms) = stats.last_checkpoint_unix_ms {
        out.gauge(
            "vigil_aggregator_storage_last_checkpoint_timestamp_seconds",
            "When the last checkpoint finished, seconds since the Unix epoch.",
            unix_ms as f64 / 1e3,
        );
        out.gauge(
            "vigil_aggregator_storage_last_checkpoint_duration_seconds",
            "How long the last checkpoint took.",
            stats.last_checkpoint_seconds,
        );
    }
    out.gauge(
        "vigil_aggregator_wal_segments",
        "Write-ahead log segment files on disk.",
        stats.wal_segments as f64,
    );
}

fn query_metrics(out: &mut Exposition, stats: &QueryStats) {
    let name = "vigil_aggregator_grpc_query_requests_total";
    out.family(
        name,
        "counter",
        "Calls of the gRPC Query service by method and outcome (ok, error, denied).",
    );
    for method in Method::ALL {
        for outcome in Outcome::ALL {
            out.sample(
                name,
                &[("method", method.name()), ("outcome", outcome.name())],
                stats.requests(method, outcome) as f64,
            );
        }
    }
    let name = "vigil_aggregator_grpc_query_duration_seconds";
    out.family(
        name,
        "histogram",
        "Evaluation time of gRPC PromQL queries, by type (instant, range).",
    );
    for (kind, range) in [("instant", false), ("range", true)] {
        let snapshot = stats.durations(range);
        for (le, count) in &snapshot.cumulative {
            out.sample(
                &format!("{name}_bucket"),
                &[("type", kind), ("le", &format_value(*le))],
                *count as f64,
            );
        }
        out.sample(
            &format!("{name}_bucket"),
            &[("type", kind), ("le", "+Inf")],
            snapshot.count as f64,
        );
        out.sample(
            &format!("{name}_sum"),
            &[("type", kind)],
            snapshot.sum_seconds,
        );
        out.sample(
            &format!("{name}_count"),
            &[("type", kind)],
            snapshot.count as f64,
        );
    }
    out.gauge(
        "vigil_aggregator_subscribers",
        "gRPC Subscribe streams open now.",
        stats.subscribers() as f64,
    );
    out.counter(
        "vigil_aggregator_subscribe_updates_total",
        "Data updates sent to subscribers.",
        stats.updates_sent(),
    );
    out.counter(
        "vigil_aggregator_subscribe_lagged_total",
        "Lagged updates sent: gaps of subscribers that read too slowly.",
        stats.lagged_updates(),
    );
    out.counter(
        "vigil_aggregator_subscribe_dropped_batches_total",
        "Stored batches that slow subscribers missed, summed over subscribers.",
        stats.dropped_batches(),
    );
}

/// The standard `process_*` metrics, from /proc/self (Linux); missing files are skipped.
fn process_metrics(out: &mut Exposition, started: SystemTime) {
    let start = started
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    out.gauge(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch in seconds.",
        start,
    );
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the parenthesised command (which may hold spaces): utime and stime are
        // the 12th and 13th, in clock ticks of USER_HZ, which Linux fixes at 100 for user space.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        if let (Some(utime), Some(stime)) = (ticks(11), ticks(12)) {
            out.family(
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
            );
            out.sample(
                "process_cpu_seconds_total",
                &[],
                (utime + stime) as f64 / 100.0,
            );
        }
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let kib = |key: &str| {
            status.lines().find_map(|line| {
                let value = line.strip_prefix(key)?.trim().strip_suffix("kB")?;
                value.trim().parse::<u64>().ok()
            })
        };
        if let Some(rss) = kib("VmRSS:") {
            out.gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                (rss * 1024) as f64,
            );
        }
        if let Some(virtual_size) = kib("VmSize:") {
            out.gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                (virtual_size * 1024) as f64,
            );
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        out.gauge(
            "process_open_fds",
            "Number of open file descriptors.",
            entries.count() as f64,
        );
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits")
        && let Some(max) = limits.lines().find_map(|line| {
            let soft = line
                .strip_prefix("Max open files")?
                .split_whitespace()
                .next()?;
            soft.parse::<u64>().ok()
        })
    {
        out.gauge(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            max as f64,
        );
    }
}

/// A writer of the Prometheus text format (HELP/TYPE lines, escaping, value spelling), for
/// `/metrics` and the extra writers that add families to it.
#[derive(Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// The text written so far.
    pub fn finish(self) -> String {
        self.text
    }

    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let value = value
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.text, "{label}=\"{value}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", format_value(value));
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        self.sample(name, &[], value as f64);
    }

    pub fn labelled_counters(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        values: &[(&str, u64)],
    ) {
        self.family(name, "counter", help);
        for (value, count) in values {
            self.sample(name, &[(label, value)], *count as f64);
        }
    }
}

/// A sample value as the text format writes it (`+Inf`, `-Inf`, `NaN`, else the shortest
/// decimal that round-trips).
fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_escape_label_values_and_format_values() {
        let mut out = Exposition::default();
        out.family("m", "gauge", "a\\b\nc");
        out.sample("m", &[("l", "q\"\\\n"), ("k", "v")], f64::INFINITY);
        out.sample("m", &[], 0.25);
        out.sample("m", &[], f64::NAN);
        assert_eq!(
            out.text,
            "# HELP m a\\\\b\\nc\n# TYPE m gauge\nm{l=\"q\\\"\\\\\\n\",k=\"v\"} +Inf\nm 0.25\nm NaN\n"
        );
    }
}
