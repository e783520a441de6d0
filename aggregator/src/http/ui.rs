//! The dashboard: a small single-page app (`aggregator/ui/src/`, with uPlot vendored into
//! `aggregator/ui/vendor/`) embedded here, so the binary needs nothing at run time and fetches nothing from the
//! internet) served at `/` (fleet), `/node/<node>`, `/server/<node>/<server>` and `/alerts`,
//! plus the JSON it reads besides the Prometheus API:
//!
//! - `GET /api/vigil/v1/fleet`: every node with its agent's state, GPUs, tracked model servers,
//!   collector status (why a view is empty) and the servers' current bottleneck verdicts;
//! - `GET /api/vigil/v1/events?node=&server=&start=&end=&limit=`: stored events, newest first;
//! - `GET /api/vigil/v1/verdicts`: the current verdicts with their evidence.
//!
//! The pages themselves hold no data and need no token; every data call does (a `reader` or
//! `admin` bearer token when the aggregator has a tokens file), which the page takes from its
//! URL's fragment (`#token=...`, never sent to the server) or asks for.

use std::collections::BTreeMap;

use axum::{
    Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::{HttpState, api::Reader};
use crate::{nodes, storage::StoredEvent, verdict::Verdict};

/// The dashboard, embedded: its sources (`aggregator/ui/src/`) and uPlot, vendored into
/// `aggregator/ui/vendor/` by `npm run build` there.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/src/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/src/app.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/vendor/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/vendor/uPlot.min.css"),
    ),
];
const INDEX: &[u8] = include_bytes!("../../ui/src/index.html");

/// Most events one call returns.
const MAX_EVENTS: usize = 5000;

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/", get(page))
        .route("/node/{node}", get(page))
        .route("/server/{node}/{server}", get(page))
        .route("/alerts", get(page))
        .route("/ui/{file}", get(asset))
        .route("/api/vigil/v1/fleet", get(fleet))
        .route("/api/vigil/v1/events", get(events))
        .route("/api/vigil/v1/verdicts", get(verdicts))
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX,
    )
        .into_response()
}

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                // Assets change with the binary; a reload after an upgrade revalidates.
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such dashboard asset").into_response(),
    }
}

fn success(data: Json) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        json!({"status": "success", "data": data}).to_string(),
    )
        .into_response()
}

fn bad_data(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"status": "error", "errorType": "bad_data", "error": message}).to_string(),
    )
        .into_response()
}

fn pairs(labels: &[(String, String)]) -> Json {
    Json::Object(
        labels
            .iter()
            .map(|(k, v)| (k.clone(), Json::String(v.clone())))
            .collect(),
    )
}

pub fn verdict_json(verdict: &Verdict) -> Json {
    json!({
        "node": verdict.node,
        "server": verdict.server,
        "kind": verdict.kind.as_str(),
        "time_ms": verdict.time_ms,
        "summary": verdict.summary,
        "evidence": verdict.evidence,
        "syscalls": verdict.syscalls.iter().map(|(name, seconds)| json!({"syscall": name, "seconds_per_second": seconds})).collect::<Vec<_>>(),
    })
}

/// The event kind agents send when a collector's status changes (labels `collector`,
/// `status`; the message is the reason).
const COLLECTOR_STATUS_EVENT: &str = "collector_status";

async fn fleet(_reader: Reader, State(state): State<HttpState>) -> Response {
    let store = state.store.clone();
    let registry = state.nodes.clone();
    let verdicts = state.verdicts.latest();
    let built = tokio::task::spawn_blocking(move || {
        let inventory = nodes::inventory(&registry, &store);
        // Each node's latest status per collector.
        let mut collectors: BTreeMap<String, BTreeMap<String, Json>> = BTreeMap::new();
        let mut status_events: Vec<StoredEvent> = store
            .events()
            .into_iter()
            .filter(|event| event.kind == COLLECTOR_STATUS_EVENT)
            .collect();
        status_events.sort_by_key(|event| event.time_ms);
        for event in status_events {
            let label = |name: &str| {
                event
                    .labels
                    .iter()
                    .find(|(label, _)| label == name)
                    .map(|(_, value)| value.clone())
                    .unwrap_or_default()
            };
            collectors.entry(event.node.clone()).or_default().insert(
                label("collector"),
                json!({"status": label("status"), "reason": event.message, "time_ms": event.time_ms}),
            );
        }
        let nodes: Vec<Json> = inventory
            .iter()
            .map(|node| {
                let agent = node.state.as_ref().map(|s| {
                    json!({
                        "version": s.agent_version,
                        "instance": s.agent_instance,
                        "capabilities": s.capabilities,
                        "first_seen_ms": s.first_seen_ms,
                        "last_seen_ms": s.last_seen_ms,
                        "connected": s.streams > 0,
                    })
                });
                let node_verdicts: Vec<Json> = verdicts
                    .iter()
                    .filter(|v| v.node == node.node)
                    .map(verdict_json)
                    .collect();
                json!({
                    "node": node.node,
                    "agent": agent,
                    "series": node.series,
                    "gpus": node.gpus.iter().map(|g| json!({"gpu": g.index, "uuid": g.uuid, "model": g.model})).collect::<Vec<_>>(),
                    "model_servers": node.model_servers.iter().map(|s| json!({"server": s.server, "comm": s.comm, "pid": s.pid})).collect::<Vec<_>>(),
                    "collectors": collectors.remove(&node.node).unwrap_or_default(),
                    "verdicts": node_verdicts,
                })
            })
            .collect();
        json!({"now_ms": crate::alerting::manager::now_ms(), "nodes": nodes})
    })
    .await;
    match built {
        Ok(data) => success(data),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    node: Option<String>,
    server: Option<String>,
    pid: Option<String>,
    kind: Option<String>,
    /// Unix seconds (floats allowed), as the Prometheus API takes them.
    start: Option<f64>,
    end: Option<f64>,
    limit: Option<usize>,
}

fn event_matches(event: &StoredEvent, query: &EventsQuery) -> bool {
    let label = |name: &str| {
        event
            .labels
            .iter()
            .find(|(label, _)| label == name)
            .map(|(_, value)| value.as_str())
    };
    let start_ms = query.start.map(|s| (s * 1000.0) as i64).unwrap_or(i64::MIN);
    let end_ms = query.end.map(|s| (s * 1000.0) as i64).unwrap_or(i64::MAX);
    query.node.as_deref().is_none_or(|n| n == event.node)
        && query.kind.as_deref().is_none_or(|k| k == event.kind)
        && query
            .server
            .as_deref()
            .is_none_or(|s| label("server") == Some(s))
        && query.pid.as_deref().is_none_or(|p| label("pid") == Some(p))
        && event.time_ms >= start_ms
        && event.time_ms <= end_ms
}

async fn events(
    _reader: Reader,
    State(state): State<HttpState>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(query) => query,
        Err(error) => return bad_data(format!("bad events query: {error}")),
    };
    if let (Some(start), Some(end)) = (query.start, query.end)
        && end < start
    {
        return bad_data("end is before start".to_owned());
    }
    let limit = query.limit.unwrap_or(500).min(MAX_EVENTS);
    let mut events: Vec<StoredEvent> = state
        .store
        .events()
        .into_iter()
        .filter(|event| event_matches(event, &query))
        .collect();
    events.sort_by_key(|event| std::cmp::Reverse(event.time_ms));
    events.truncate(limit);
    success(Json::Array(
        events
            .iter()
            .map(|event| {
                json!({
                    "node": event.node,
                    "time_ms": event.time_ms,
                    "kind": event.kind,
                    "labels": pairs(&event.labels),
                    "message": event.message,
                })
            })
            .collect(),
    ))
}

async fn verdicts(_reader: Reader, State(state): State<HttpState>) -> Response {
    success(Json::Array(
        state.verdicts.latest().iter().map(verdict_json).collect(),
    ))
}
