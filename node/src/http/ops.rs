//! Operations endpoints: Prometheus metrics, liveness, readiness.

use super::ApiError;
use crate::node::Node;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;

pub fn routes() -> Router<Arc<Node>> {
    Router::new().route("/metrics", get(metrics)).route("/healthz", get(healthz)).route("/readyz", get(readyz))
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let text = node.metrics().render(node.store().digests().stats(), node.store().commit_counts(), node.load());
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
}

/// Alive: the process serves HTTP.
async fn healthz() -> &'static str {
    "ok"
}

/// Ready: the node has a view, so it can serve keys.
async fn readyz(State(node): State<Arc<Node>>) -> Result<&'static str, ApiError> {
    match node.view() {
        Some(_) => Ok("ready"),
        None => {
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no view yet: this node waits to be added to a cluster"))
        }
    }
}
