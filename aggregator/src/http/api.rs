//! The Prometheus HTTP query API (`/api/v1/...`).

use axum::Router;

use super::HttpState;

pub fn routes() -> Router<HttpState> {
    Router::new()
}
