//! The rebalance driver: one reconcile step against a backend that runs the node "pods" — the
//! same logic for Kubernetes and for the local mode, each a thin [`Backend`].
//!
//! A step: observe (pods, their readiness, the view the nodes report), [`plan`], then do what the
//! plan says. Nothing is remembered between steps, so a driver restarted at any point simply
//! observes again and continues.

use crate::controller::plan::{Pod, Step, plan};
use crate::controller::validate::Validated;
use kvs_api::ClusterStatus;

/// Where node pods run.
#[async_trait::async_trait]
pub trait Backend: Send {
    /// How many pods the backend is set to run (the StatefulSet's replicas).
    fn replicas(&self) -> u32;
    /// Sets the number of pods (highest ordinals are added or removed).
    async fn set_replicas(&mut self, replicas: u32, spec: &Validated) -> anyhow::Result<()>;
    /// The pods that exist, with identity and readiness.
    async fn pods(&mut self) -> anyhow::Result<Vec<Pod>>;
}

/// What one step saw.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub step: Step,
    pub pods: Vec<Pod>,
    pub status: Option<ClusterStatus>,
    /// The nodes report a view change in progress (perhaps one posted before a restart): wait for
    /// it instead of acting on `step`.
    pub changing: bool,
}

/// A view change posted to a primary, running in the background: it returns only when the data
/// has moved, and the driver keeps observing (and reporting progress) meanwhile.
pub struct ViewChangeTask {
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// What was asked, for events and logs.
    pub description: String,
}

impl ViewChangeTask {
    /// Posts `members` at `replication_factor` to `primary`.
    pub fn start(
        admin: std::sync::Arc<dyn NodeAdmin>,
        primary: String,
        members: Vec<String>,
        replication_factor: u32,
    ) -> Self {
        let description = format!("{} nodes at replicationFactor {replication_factor} (via {primary})", members.len());
        let handle = tokio::spawn(async move { admin.change_view(&primary, members, replication_factor).await });
        ViewChangeTask { handle, description }
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Stops waiting for it (the nodes finish a change they started on their own).
    pub fn abandon(self) {
        self.handle.abort();
    }

    /// Its outcome (waits if it is still running).
    pub async fn outcome(self) -> anyhow::Result<()> {
        match self.handle.await {
            Ok(result) => result,
            Err(e) => Err(anyhow::anyhow!("the view change task ended abnormally: {e}")),
        }
    }
}

/// The nodes' admin API, as the driver needs it (a trait so reconcile scenarios can run against a
/// scripted cluster).
#[async_trait::async_trait]
pub trait NodeAdmin: Send + Sync + 'static {
    /// The cluster status from the first ready pod that answers with a view.
    async fn status(&self, pods: &[Pod]) -> Option<ClusterStatus>;
    /// Posts a membership and K to the node at `primary` (an address); returns when the data has
    /// moved.
    async fn change_view(&self, primary: &str, members: Vec<String>, replication_factor: u32) -> anyhow::Result<()>;
}

/// [`NodeAdmin`] over the nodes' admin API.
#[async_trait::async_trait]
impl NodeAdmin for kvs_api::AdminClient {
    async fn status(&self, pods: &[Pod]) -> Option<ClusterStatus> {
        for p in pods.iter().filter(|p| p.ready) {
            if let Ok(status) = kvs_api::AdminClient::status(self, &p.address).await
                && status.layout.is_some()
            {
                return Some(status);
            }
        }
        None
    }

    async fn change_view(&self, primary: &str, members: Vec<String>, replication_factor: u32) -> anyhow::Result<()> {
        kvs_api::AdminClient::change_view(self, primary, members, replication_factor).await?;
        Ok(())
    }
}

/// Observes the pods and the view and plans the next step towards `spec`.
pub async fn observe(
    backend: &mut dyn Backend,
    admin: &dyn NodeAdmin,
    spec: &Validated,
) -> anyhow::Result<Observation> {
    let pods = backend.pods().await?;
    let status = admin.status(&pods).await;
    let view = status.as_ref().and_then(|s| s.layout.as_ref());
    let step = plan(spec.replicas, spec.replication_factor, backend.replicas(), &pods, view);
    let changing = status.as_ref().is_some_and(|s| s.pending_epoch.is_some());
    Ok(Observation { step, pods, status, changing })
}
