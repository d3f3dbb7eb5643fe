//! The nodes' admin API as the driver uses it ([`NodeAdmin`]: a trait, so reconcile scenarios can
//! run against scripted nodes), and a view change posted through it that runs in the background
//! ([`ViewChangeTask`]).
//!
//! A posted view change returns only once the data has moved, which takes as long as the data
//! takes; the driver keeps observing (and reporting progress) meanwhile, so the post runs in its
//! own task and the driver only asks whether it has finished.

use super::plan::Pod;
use kvs_api::{ClusterStatus, NodeUsage};
use std::sync::Arc;

/// The nodes' admin API, as the driver needs it.
#[async_trait::async_trait]
pub trait NodeAdmin: Send + Sync + 'static {
    /// The cluster status from the first ready pod that answers with a view.
    async fn status(&self, pods: &[Pod]) -> Option<ClusterStatus>;
    /// Posts a membership and K to the node at `primary` (an address); returns when the data has
    /// moved.
    async fn change_view(&self, primary: &str, members: Vec<String>, replication_factor: u32) -> anyhow::Result<()>;
    /// What each running pod holds (pods that do not answer are left out).
    async fn usage(&self, pods: &[Pod]) -> Vec<NodeUsage>;
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

    async fn usage(&self, pods: &[Pod]) -> Vec<NodeUsage> {
        let asks = pods.iter().filter(|p| p.started).map(|p| kvs_api::AdminClient::usage(self, &p.address));
        futures::future::join_all(asks).await.into_iter().filter_map(Result::ok).collect()
    }
}

/// A view change posted to a primary, running in the background.
#[derive(Debug)]
pub struct ViewChangeTask {
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// What was asked, for events and logs.
    pub description: String,
}

impl ViewChangeTask {
    /// Posts `members` at `replication_factor` to `primary`.
    pub fn start(admin: Arc<dyn NodeAdmin>, primary: String, members: Vec<String>, replication_factor: u32) -> Self {
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
