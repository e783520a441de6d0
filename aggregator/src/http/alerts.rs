//! Alerting over HTTP, in Prometheus's shapes (Grafana reads them): `/api/v1/alerts` (pending
//! and firing alerts), `/api/v1/rules` (groups, rules, health, their alerts), and Vigil's
//! `/api/v1/alerts/history?start=&end=[&alertname=]` (every firing that overlaps the range).
//! Like the query API, they need a `reader` or `admin` token when a tokens file is configured.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::{
    Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Map, Value as Json, json};

use super::{
    HttpState,
    api::{Reader, parse_time},
};
use crate::alerting::{
    Alert, AlertState,
    group::{GroupState, RuleHealth},
    notify::rfc3339,
    rules::RuleKind,
    template::format_value,
};

/// The history endpoint's default range when `start` is not given.
const DEFAULT_HISTORY_RANGE_MS: i64 = 24 * 3600 * 1000;

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/rules", get(rules))
        .route("/api/v1/alerts/history", get(history))
}

fn respond(status: StatusCode, body: Json) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn success(data: Json) -> Response {
    respond(StatusCode::OK, json!({"status": "success", "data": data}))
}

fn bad_data(message: String) -> Response {
    respond(
        StatusCode::BAD_REQUEST,
        json!({"status": "error", "errorType": "bad_data", "error": message}),
    )
}

fn map(pairs: &[(String, String)]) -> Json {
    Json::Object(
        pairs
            .iter()
            .map(|(name, value)| (name.clone(), Json::String(value.clone())))
            .collect::<Map<String, Json>>(),
    )
}

fn alert_json(alert: &Alert) -> Json {
    let mut out = json!({
        "labels": map(&alert.labels),
        "annotations": map(&alert.annotations),
        "state": alert.state.as_str(),
        "activeAt": rfc3339(alert.active_at_ms),
        "value": format_value(alert.value),
    });
    if let Some(since) = alert.keep_firing_since_ms {
        out["keepFiringSince"] = json!(rfc3339(since));
    }
    out
}

fn active(alerts: impl Iterator<Item = Alert>) -> Vec<Alert> {
    alerts
        .filter(|alert| alert.state != AlertState::Inactive)
        .collect()
}

async fn alerts(_reader: Reader, State(state): State<HttpState>) -> Response {
    let alerts = state
        .alerts
        .as_ref()
        .map(|manager| manager.active_alerts())
        .unwrap_or_default();
    success(json!({"alerts": alerts.iter().map(alert_json).collect::<Vec<_>>()}))
}

fn health_fields(out: &mut Json, health: &RuleHealth) {
    out["health"] = json!(health.as_str());
    out["lastError"] = json!(health.last_error.clone().unwrap_or_default());
    out["evaluationTime"] = json!(health.evaluation_seconds);
    out["lastEvaluation"] = json!(
        health
            .last_evaluation_ms
            .map(rfc3339)
            .unwrap_or_else(|| "0001-01-01T00:00:00Z".into())
    );
}

fn group_json(group: &GroupState, want_alerting: bool, want_recording: bool) -> Json {
    let mut rules = Vec::new();
    for state in &group.rules {
        let rule = &state.rule;
        let labels: Vec<(String, String)> = rule
            .labels
            .iter()
            .map(|(name, template)| (name.clone(), template.source().to_owned()))
            .collect();
        let mut out = match &rule.kind {
            RuleKind::Alerting {
                hold,
                keep_firing_for,
                annotations,
            } => {
                if !want_alerting {
                    continue;
                }
                let alerts = active(state.alerts.values().cloned());
                let rule_state = if alerts.iter().any(|a| a.state == AlertState::Firing) {
                    "firing"
                } else if alerts.is_empty() {
                    "inactive"
                } else {
                    "pending"
                };
                let annotations: Vec<(String, String)> = annotations
                    .iter()
                    .map(|(name, template)| (name.clone(), template.source().to_owned()))
                    .collect();
                json!({
                    "type": "alerting",
                    "name": rule.name,
                    "query": rule.expr,
                    "duration": hold.as_secs_f64(),
                    "keepFiringFor": keep_firing_for.as_secs_f64(),
                    "labels": map(&labels),
                    "annotations": map(&annotations),
                    "alerts": alerts.iter().map(alert_json).collect::<Vec<_>>(),
                    "state": rule_state,
                })
            }
            RuleKind::Recording => {
                if !want_recording {
                    continue;
                }
                json!({
                    "type": "recording",
                    "name": rule.name,
                    "query": rule.expr,
                    "labels": map(&labels),
                })
            }
        };
        health_fields(&mut out, &state.health);
        rules.push(out);
    }
    json!({
        "name": group.group.name,
        "file": group.group.file.display().to_string(),
        "interval": group.group.interval.as_secs_f64(),
        "limit": group.group.limit,
        "rules": rules,
        "evaluationTime": group.evaluation_seconds,
        "lastEvaluation": group
            .last_evaluation_ms
            .map(rfc3339)
            .unwrap_or_else(|| "0001-01-01T00:00:00Z".into()),
    })
}

#[derive(serde::Deserialize)]
struct RulesParams {
    #[serde(rename = "type")]
    kind: Option<String>,
}

async fn rules(
    _reader: Reader,
    State(state): State<HttpState>,
    Query(params): Query<RulesParams>,
) -> Response {
    let (want_alerting, want_recording) = match params.kind.as_deref() {
        None | Some("") => (true, true),
        Some("alert") => (true, false),
        Some("record") => (false, true),
        Some(other) => {
            return bad_data(format!(
                "unsupported type {other:?}: use \"alert\" or \"record\""
            ));
        }
    };
    let groups = state
        .alerts
        .as_ref()
        .map(|manager| manager.groups())
        .unwrap_or_default();
    let mut data = json!({
        "groups": groups
            .iter()
            .map(|group| group_json(group, want_alerting, want_recording))
            .collect::<Vec<_>>(),
    });
    if let Some(manager) = &state.alerts {
        let status = manager.reload_status();
        // Vigil's addition: whether the latest reload was refused (the old rules then run).
        data["lastReload"] = json!({
            "success": status.ok,
            "time": rfc3339(status.at_ms),
            "error": status.error.unwrap_or_default(),
        });
    }
    success(data)
}

#[derive(serde::Deserialize)]
struct HistoryParams {
    start: Option<String>,
    end: Option<String>,
    alertname: Option<String>,
}

async fn history(
    _reader: Reader,
    State(state): State<HttpState>,
    Query(params): Query<HistoryParams>,
) -> Response {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let end = match params.end.as_deref().map(parse_time).transpose() {
        Ok(end) => end.unwrap_or(now),
        Err(why) => return bad_data(format!("invalid parameter \"end\": {why}")),
    };
    let start = match params.start.as_deref().map(parse_time).transpose() {
        Ok(start) => start.unwrap_or(end - DEFAULT_HISTORY_RANGE_MS),
        Err(why) => return bad_data(format!("invalid parameter \"start\": {why}")),
    };
    if end < start {
        return bad_data("invalid parameter \"end\": end is before start".into());
    }
    let records = state
        .alerts
        .as_ref()
        .map(|manager| manager.history().query(start, end))
        .unwrap_or_default();
    let records: Vec<Json> = records
        .into_iter()
        .filter(|record| match &params.alertname {
            None => true,
            Some(name) => record
                .labels
                .iter()
                .any(|(label, value)| label == "alertname" && value == name),
        })
        .map(|record| {
            json!({
                "id": record.id,
                "labels": map(&record.labels),
                "annotations": map(&record.annotations),
                "activeAt": rfc3339(record.active_at_ms),
                "startsAt": rfc3339(record.started_at_ms),
                "endsAt": record.ended_at_ms.map(rfc3339),
                "peakValue": format_value(record.peak_value),
                "interrupted": record.interrupted,
            })
        })
        .collect();
    success(json!({"alerts": records}))
}
