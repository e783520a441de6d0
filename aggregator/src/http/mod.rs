//! The aggregator's HTTP side: the Prometheus query API ([`api`]) and its own telemetry at
//! `/metrics` ([`metrics`]). Later: the dashboard at `/`.

pub mod api;
pub mod metrics;

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
}

/// Every HTTP route.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .merge(api::routes())
        .merge(metrics::routes())
        .with_state(state)
}
