//! kvstore node: a sharded, replicated, durable key-value server that speaks the course-era HW4 API
//! and a native `/v1` API.
//!
//! Layers, each in its own module:
//! - pure logic: [`placement`] (key → slot → partition), [`causal`] (vector clocks, HLC),
//!   [`view`] (membership);
//! - boundaries: [`store`] (storage engine behind a trait), [`peers`] (network behind a trait);
//! - behaviour: [`node`] (state and entry points), `replication` (routing, forwarding, replicating,
//!   causal reads), [`anti_entropy`] (replica repair);
//! - surface: [`http`] (thin handlers), [`metrics`], [`config`].

pub mod anti_entropy;
pub mod causal;
pub mod config;
mod fence;
pub mod freshness;
pub mod http;
pub mod metrics;
pub mod node;
pub mod peers;
pub mod placement;
pub mod rebalance;
mod replication;
pub mod store;
pub mod view;
pub mod view_store;

use node::Node;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Serves `node` on `listener` and runs its background work until `shutdown` completes; then stops
/// accepting, finishes in-flight requests and returns.
pub async fn run(listener: TcpListener, node: Arc<Node>, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|&s| s).await;
    };
    let background = tokio::spawn(anti_entropy::run(node.clone(), stopped(stop_rx.clone())));
    let app = http::router(node);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    let result = server.await;
    let _ = background.await;
    result
}
