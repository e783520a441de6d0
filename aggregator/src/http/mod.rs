//! The aggregator's HTTP side: the Prometheus query API ([`api`]) and its own telemetry at
//! `/metrics` ([`metrics`]). Later: the dashboard at `/`.

pub mod alerts;
pub mod api;
pub mod live;
pub mod metrics;
pub mod ui;

use std::sync::Arc;

use axum::Router;

use crate::{
    ingest::counters::IngestCounters, query::Engine, security::TokenTable, storage::Store,
};

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub engine: Engine,
    pub store: Arc<Store>,
    pub counters: Arc<IngestCounters>,
    /// With a tokens file, the query API needs a `reader` or `admin` bearer token.
    pub tokens: Option<TokenTable>,
    /// What `/metrics` reads besides the store and counters, and its hook for extra writers.
    pub telemetry: Arc<metrics::Telemetry>,
    /// The rule manager, when `[alerting]` has rule files (`/api/v1/alerts`, `/api/v1/rules`).
    pub alerts: Option<crate::alerting::RuleManager>,
    /// The fleet inventory (the dashboard's fleet view).
    pub nodes: Arc<crate::nodes::NodeRegistry>,
    /// Every stored batch as it is stored (the dashboard's live updates).
    pub live: Arc<crate::query_service::LiveFeed>,
    /// The servers' current bottleneck verdicts.
    pub verdicts: Arc<crate::verdict::Verdicts>,
}

/// Every HTTP route.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .merge(api::routes())
        .merge(alerts::routes())
        .merge(metrics::routes())
        .merge(live::routes())
        .merge(ui::routes())
        .with_state(state)
}
