//! Live updates for the dashboard: `GET /api/vigil/v1/live?match[]=SELECTOR...[&events=1]`
//! answers a server-sent event stream with each stored batch's points of the matching series
//! (and, with `events=1`, its events) as they are stored.
//!
//! Fed by the same [`LiveFeed`] as the gRPC `Subscribe` stream (an `IngestSink` that puts every
//! stored batch into a broadcast ring), so ingest never waits for a browser: a client that
//! reads too slowly loses updates (it is told with a `lagged` event and refetches) and never
//! slows anyone else.

use std::{collections::HashMap, convert::Infallible, time::Duration};

use axum::{
    Router,
    extract::{RawQuery, State},
    http::StatusCode,
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use serde_json::{Value as Json, json};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::{HttpState, api::Reader};
use crate::{
    query::{Matcher, parse_selector},
    storage::{IngestedBatch, PointValue, SeriesRef, StoredSeries},
};

/// Updates queued per client before it counts as lagging.
const CLIENT_BUFFER: usize = 64;
/// Most selectors one client may give.
const MAX_SELECTORS: usize = 32;

pub fn routes() -> Router<HttpState> {
    Router::new().route("/api/vigil/v1/live", get(live))
}

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        json!({"status": "error", "errorType": "bad_data", "error": message}).to_string(),
    )
        .into_response()
}

/// What one client asked for.
struct Filter {
    selectors: Vec<Vec<Matcher>>,
    events: bool,
    /// Per series, whether it matched (a series' labels never change).
    decided: HashMap<SeriesRef, bool>,
}

impl Filter {
    fn parse(query: Option<&str>) -> Result<Filter, String> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
            .map_err(|error| format!("bad query string: {error}"))?;
        let mut selectors = Vec::new();
        let mut events = false;
        for (name, value) in pairs {
            match name.as_str() {
                "match[]" => selectors.push(parse_selector(&value).map_err(|e| e.to_string())?),
                "events" => events = matches!(value.as_str(), "1" | "true"),
                // The dashboard adds its token-free cache busters; ignore what we do not know.
                _ => {}
            }
        }
        if selectors.is_empty() && !events {
            return Err(
                "nothing to stream: give match[]=<series selector> and/or events=1".to_owned(),
            );
        }
        if selectors.len() > MAX_SELECTORS {
            return Err(format!("at most {MAX_SELECTORS} match[] selectors"));
        }
        Ok(Filter {
            selectors,
            events,
            decided: HashMap::new(),
        })
    }

    fn wants(&mut self, series: &StoredSeries) -> bool {
        let selectors = &self.selectors;
        *self.decided.entry(series.id).or_insert_with(|| {
            let labels = series_labels(series);
            selectors
                .iter()
                .any(|selector| selector.iter().all(|m| m.matches_labels(&labels)))
        })
    }

    /// The JSON update for `batch`, when anything in it is wanted.
    fn apply(&mut self, batch: &IngestedBatch) -> Option<Json> {
        let mut order: Vec<SeriesRef> = Vec::new();
        let mut series: HashMap<SeriesRef, (Json, Vec<Json>)> = HashMap::new();
        for (stored, point) in &batch.points {
            if !self.wants(stored) {
                continue;
            }
            // A staleness marker ends a series; it is not a value to draw.
            if let PointValue::Value(value) = &point.value
                && crate::query::value::is_stale_marker(*value)
            {
                continue;
            }
            let value = match &point.value {
                PointValue::Value(value) if value.is_finite() => json!(value),
                PointValue::Value(value) => json!(value.to_string()),
                // Histograms go as count and sum: the heatmap is refetched, not streamed.
                PointValue::Histogram(h) => json!({"count": h.count, "sum": h.sum_seconds}),
            };
            let entry = series.entry(stored.id).or_insert_with(|| {
                order.push(stored.id);
                let labels: serde_json::Map<String, Json> = series_labels(stored)
                    .into_iter()
                    .map(|(k, v)| (k, Json::String(v)))
                    .collect();
                (Json::Object(labels), Vec::new())
            });
            entry.1.push(json!([point.time_ms, value]));
        }
        let events: Vec<Json> = if self.events {
            batch
                .events
                .iter()
                .map(|event| {
                    json!({
                        "node": event.node,
                        "time_ms": event.time_ms,
                        "kind": event.kind,
                        "labels": event
                            .labels
                            .iter()
                            .map(|(k, v)| (k.clone(), Json::String(v.clone())))
                            .collect::<serde_json::Map<_, _>>(),
                        "message": event.message,
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        if order.is_empty() && events.is_empty() {
            return None;
        }
        let series: Vec<Json> = order
            .into_iter()
            .filter_map(|id| series.remove(&id))
            .map(|(labels, points)| json!({"labels": labels, "points": points}))
            .collect();
        Some(json!({"node": batch.node, "series": series, "events": events}))
    }
}

/// A series as queries see it: `__name__`, `node` and its labels.
fn series_labels(series: &StoredSeries) -> Vec<(String, String)> {
    let mut labels = Vec::with_capacity(series.labels.len() + 2);
    labels.push(("__name__".to_owned(), series.name.clone()));
    labels.push(("node".to_owned(), series.node.clone()));
    labels.extend(series.labels.iter().cloned());
    labels.sort();
    labels
}

fn lagged_event(missed: u64) -> Result<Event, Infallible> {
    Ok(Event::default()
        .event("lagged")
        .data(json!({"missed_updates": missed}).to_string()))
}

/// Hands `item` to a client's queue without waiting: when the queue is full the item is
/// dropped and counted, and before the next item that fits the client gets a `lagged` notice
/// with the count (so it refetches what it missed). False once the client is gone.
fn deliver<T>(tx: &mpsc::Sender<T>, item: T, lagged: impl Fn(u64) -> T, dropped: &mut u64) -> bool {
    use mpsc::error::TrySendError;
    if *dropped > 0 {
        match tx.try_send(lagged(*dropped)) {
            Ok(()) => *dropped = 0,
            Err(TrySendError::Full(_)) => {
                *dropped += 1;
                return true;
            }
            Err(TrySendError::Closed(_)) => return false,
        }
    }
    match tx.try_send(item) {
        Ok(()) => true,
        Err(TrySendError::Full(_)) => {
            if *dropped == 0 {
                tracing::debug!("a live dashboard client is not keeping up; dropping updates");
            }
            *dropped += 1;
            true
        }
        Err(TrySendError::Closed(_)) => false,
    }
}

async fn live(
    _reader: Reader,
    State(state): State<HttpState>,
    RawQuery(query): RawQuery,
) -> Response {
    let mut filter = match Filter::parse(query.as_deref()) {
        Ok(filter) => filter,
        Err(message) => return bad_request(message),
    };
    let mut feed = state.live.subscribe();
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(CLIENT_BUFFER);
    tokio::spawn(async move {
        // Updates dropped since the client last had room; it is told before the next update.
        let mut dropped = 0u64;
        let _ = tx.try_send(Ok(Event::default().event("hello").data("{}")));
        loop {
            let batch = tokio::select! {
                batch = feed.recv() => batch,
                _ = tx.closed() => return,
            };
            let event = match batch {
                Ok(batch) => match filter.apply(&batch) {
                    Some(update) => Event::default().event("update").data(update.to_string()),
                    None => continue,
                },
                // The feed's ring overran this client's reader: as good as dropped here.
                Err(RecvError::Lagged(missed)) => {
                    dropped += missed;
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            if !deliver(&tx, Ok(event), lagged_event, &mut dropped) {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::storage::{MetricKind, Point, StoredEvent};

    fn series(id: u64, name: &str, labels: &[(&str, &str)]) -> Arc<StoredSeries> {
        Arc::new(StoredSeries {
            id: SeriesRef(id),
            node: "n1".into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            kind: MetricKind::Gauge,
        })
    }

    fn batch() -> IngestedBatch {
        let point = |t, v| Point {
            time_ms: t,
            value: PointValue::Value(v),
        };
        let gpu = series(1, "vigil_gpu_utilization_ratio", &[("gpu", "0")]);
        let cpu = series(2, "vigil_host_cpus", &[]);
        IngestedBatch {
            node: "n1".into(),
            agent_instance: "i".into(),
            points: vec![
                (gpu.clone(), point(1000, 0.5)),
                (cpu, point(1000, 8.0)),
                (gpu, point(2000, 0.75)),
            ],
            events: vec![StoredEvent {
                node: "n1".into(),
                time_ms: 1500,
                kind: "gpu_xid".into(),
                labels: vec![("gpu".into(), "0".into())],
                message: "XID 79".into(),
            }],
        }
    }

    #[test]
    fn streams_only_matching_series_grouped_in_order() {
        let mut filter = Filter::parse(Some(
            "match[]=vigil_gpu_utilization_ratio%7Bgpu%3D%220%22%7D",
        ))
        .unwrap();
        let update = filter.apply(&batch()).unwrap();
        let series = update["series"].as_array().unwrap();
        assert_eq!(series.len(), 1);
        assert_eq!(series[0]["labels"]["gpu"], "0");
        assert_eq!(series[0]["labels"]["node"], "n1");
        assert_eq!(series[0]["points"], json!([[1000, 0.5], [2000, 0.75]]));
        assert_eq!(update["events"], json!([]));
    }

    #[test]
    fn events_only_when_asked_and_nothing_for_unmatched_batches() {
        let mut filter = Filter::parse(Some("events=1")).unwrap();
        let update = filter.apply(&batch()).unwrap();
        assert_eq!(update["events"][0]["kind"], "gpu_xid");
        assert_eq!(update["events"][0]["labels"]["gpu"], "0");
        let mut filter = Filter::parse(Some("match[]=nothing_here")).unwrap();
        assert!(filter.apply(&batch()).is_none());
    }

    #[test]
    fn a_slow_client_loses_updates_and_is_told_how_many_before_the_next() {
        let (tx, mut rx) = mpsc::channel::<String>(2);
        let lagged = |n: u64| format!("lagged {n}");
        let mut dropped = 0;
        for update in ["u1", "u2", "u3", "u4"] {
            assert!(deliver(&tx, update.to_owned(), lagged, &mut dropped));
        }
        assert_eq!(dropped, 2);
        // The client reads what fitted, then has room again.
        assert_eq!(rx.try_recv().unwrap(), "u1");
        assert_eq!(rx.try_recv().unwrap(), "u2");
        assert!(deliver(&tx, "u5".to_owned(), lagged, &mut dropped));
        assert_eq!(rx.try_recv().unwrap(), "lagged 2");
        assert_eq!(rx.try_recv().unwrap(), "u5");
        assert_eq!(dropped, 0);
        drop(rx);
        assert!(!deliver(&tx, "u6".to_owned(), lagged, &mut dropped));
    }

    #[test]
    fn bad_requests_say_why() {
        assert!(
            Filter::parse(None)
                .err()
                .unwrap()
                .contains("nothing to stream")
        );
        assert!(Filter::parse(Some("match[]=rate(x[1m])")).is_err());
    }
}
