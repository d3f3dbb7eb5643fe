//! `kvs-operator run`: the controller process. It serves `/metrics`, `/healthz` and `/readyz` from
//! the start, waits to hold the leader Lease (so of several replicas only one ever acts), runs the
//! controller while it holds it, and exits non-zero if it loses it (a fresh process then competes
//! again: nothing half-done is carried over, as every reconcile starts from observation).
//!
//! `/healthz` answers while the process runs; `/readyz` once the API server has answered (a
//! standby that is waiting for the Lease is ready: it can take over at any moment).

use crate::controller::{self, AdminFactory, Context};
use crate::metrics::Metrics;
use crate::rebalance::NodeAdmin;
use crate::shutdown::shutdown_signal;
use crate::telemetry::LogFormat;
use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use kube::Client;
use kube::runtime::events::Reporter;
use kube_lease_manager::LeaseManagerBuilder;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// `kvs-operator run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Watch only this namespace (default: every namespace).
    #[arg(long, env = "KVS_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address serving `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "KVS_OPERATOR_HTTP_ADDRESS", default_value = "0.0.0.0:8081")]
    pub http_address: SocketAddr,
    /// Elect a leader through a Lease so several replicas can run and only one acts.
    #[arg(long, env = "KVS_OPERATOR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the leader-election Lease.
    #[arg(long, env = "KVS_OPERATOR_LEASE_NAME", default_value = "kvs-operator")]
    pub lease_name: String,
    /// Namespace of the Lease (the operator's own, from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's name in the Lease and in Events (the pod name; default: host name and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds a leader holds the Lease without renewing it.
    #[arg(long, env = "KVS_OPERATOR_LEASE_SECONDS", default_value_t = 15)]
    pub lease_seconds: u64,
    /// Log format (level from `RUST_LOG`, default `info,kube=warn`).
    #[arg(long, env = "KVS_OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// What `/readyz` reports (whether this replica leads is the `leader` gauge of [`Metrics`]).
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
}

struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// The operator's HTTP endpoints.
pub fn app(health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Arc::new(AppState { health, metrics }))
}

async fn readyz(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    if !s.health.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not connected to the Kubernetes API yet".to_owned());
    }
    let role = if s.metrics.leader.get() > 0 { "leader" } else { "standby" };
    (StatusCode::OK, format!("ready ({role})"))
}

async fn metrics_text(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.render())
}

/// Runs the controller process until SIGTERM/Ctrl-C (Ok) or a lost Lease (Err). Logging is the
/// caller's to set up ([`crate::telemetry::init_logging`]).
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let health = Arc::new(Health::default());
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(args.http_address)
        .await
        .with_context(|| format!("binding {}", args.http_address))?;
    let http = app(health.clone(), metrics.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, http).await {
            tracing::error!(error = %e, "the HTTP endpoints stopped");
        }
    });

    let client =
        Client::try_default().await.context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
    let version = client.apiserver_version().await.context("the Kubernetes API server did not answer")?;
    health.ready.store(true, Ordering::Relaxed);
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    tracing::info!(api = %version.git_version, %identity, namespace = args.namespace.as_deref().unwrap_or("(all)"), "kvs-operator starting");

    // `stop` becomes true on a signal or when leadership is lost; the controller stops on it.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let mut lease = None;
    if args.leader_election {
        let manager = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
            .with_namespace(&args.lease_namespace)
            .with_identity(&identity)
            .with_duration(args.lease_seconds)
            .with_grace(args.lease_seconds.div_ceil(3).max(1))
            .build()
            .await
            .context("setting up leader election")?;
        let (mut leading, task) = manager.watch().await;
        tracing::info!(lease = %args.lease_name, "waiting to become the leader");
        let mut stopping = stop_rx.clone();
        let became_leader = tokio::select! {
            r = leading.wait_for(|l| *l) => { r.context("leader election stopped")?; true }
            _ = stopping.wait_for(|s| *s) => false,
        };
        if !became_leader {
            drop(leading);
            let _ = task.await;
            return Ok(());
        }
        tracing::info!(lease = %args.lease_name, "became the leader");
        metrics.leader.set(1);
        lease = Some((leading, task));
    } else {
        metrics.leader.set(1);
    }

    let admin_for: AdminFactory =
        Arc::new(|token, tls| Arc::new(kvs_api::AdminClient::new(token).with_tls(tls)) as Arc<dyn NodeAdmin>);
    let reporter = Reporter { controller: "kvs-operator".into(), instance: Some(identity) };
    let ctx = Arc::new(Context::new(client, reporter, metrics.clone(), admin_for));
    // The controller stops on a signal, or when the Lease is lost. The leadership receiver lives
    // inside that future only: once the controller has stopped (and dropped it), the lease task
    // sees its channel closed and releases the Lease, so a successor need not wait for it to expire.
    let (mut leading, task) = lease.map_or((None, None), |(l, t)| (Some(l), Some(t)));
    let lost = Arc::new(AtomicBool::new(false));
    let stop = {
        let (mut stopping, lost, metrics) = (stop_rx.clone(), lost.clone(), metrics.clone());
        async move {
            let lease_lost = async {
                match leading.as_mut() {
                    Some(l) => {
                        let _ = l.wait_for(|leader| !*leader).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = stopping.wait_for(|s| *s) => {}
                _ = lease_lost => {
                    metrics.leader.set(0);
                    lost.store(true, Ordering::Relaxed);
                    tracing::error!("lost the leader Lease: stopping");
                }
            }
        }
    };
    // The controllers stop on the same signal.
    let stop = futures::FutureExt::shared(Box::pin(stop));
    let backups = Arc::new(crate::backup::BackupContext::new(ctx.client.clone(), ctx.recorder.clone()));
    tokio::join!(
        controller::run(ctx, args.namespace.as_deref(), stop.clone()),
        crate::backup::run(backups.clone(), args.namespace.as_deref(), stop.clone()),
        crate::backup::schedule::run(backups, args.namespace.as_deref(), stop),
    );
    if let Some(task) = task {
        let _ = task.await;
    }
    if lost.load(Ordering::Relaxed) {
        anyhow::bail!("lost the leader Lease; exiting so that a fresh process competes again");
    }
    tracing::info!("stopped");
    Ok(())
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "kvs-operator".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get_text(app: Router, path: &str) -> (StatusCode, String) {
        let resp = app.oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn health_readiness_and_metrics() {
        let health = Arc::new(Health::default());
        let metrics = Arc::new(Metrics::default());
        let app = app(health.clone(), metrics.clone());
        assert_eq!(get_text(app.clone(), "/healthz").await.0, StatusCode::OK);
        assert_eq!(get_text(app.clone(), "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        health.ready.store(true, Ordering::Relaxed);
        assert_eq!(get_text(app.clone(), "/readyz").await, (StatusCode::OK, "ready (standby)".into()));
        let (_, text) = get_text(app.clone(), "/metrics").await;
        assert!(text.contains("\nkvs_operator_leader 0\n"), "{text}");
        metrics.leader.set(1);
        assert_eq!(get_text(app.clone(), "/readyz").await, (StatusCode::OK, "ready (leader)".into()));
        metrics.count_reconcile(true);
        let (status, text) = get_text(app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("# TYPE kvs_operator_leader gauge\nkvs_operator_leader 1\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains(r#"kvs_operator_reconciliations_total{result="ok"} 1"#), "{text}");
    }
}
