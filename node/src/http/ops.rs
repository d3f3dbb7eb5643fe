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

/// Ready: the node has a view and has caught up with its partition since it started (see
/// `catch_up`: it holds its partition's data), so it answers from its own store; and it is not
/// draining before a shutdown (so load balancers stop sending it new clients first).
async fn readyz(State(node): State<Arc<Node>>) -> Result<&'static str, ApiError> {
    if node.is_draining() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down: this node still answers requests while clients move to other nodes",
        ));
    }
    if node.view().is_none() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no view yet: this node waits to be added to a cluster",
        ));
    }
    if !node.is_caught_up() {
        let why = if node.catch_up.started_empty() {
            "catching up: this node started with an empty data directory and has not yet synced with a live replica of its partition"
        } else {
            "catching up: this node has not yet compared its data with a live replica of its partition since it started"
        };
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why));
    }
    Ok("ready")
}
