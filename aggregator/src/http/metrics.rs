//! `/metrics`: the aggregator's own telemetry in the Prometheus text format.

use axum::Router;

use super::HttpState;

pub fn routes() -> Router<HttpState> {
    Router::new()
}
