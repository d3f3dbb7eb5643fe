//! The rebalance driver: one reconcile step against a backend that runs the node "pods" — the
//! same logic for Kubernetes and for the local mode, each a thin [`Backend`].
//!
//! A step: observe (pods, their readiness, the view the nodes report), [`plan`], then do what the
//! plan says. Nothing is remembered between steps, so a driver restarted at any point simply
//! observes again and continues.

use crate::controller::plan::{Pod, Step, plan};
use crate::controller::validate::Validated;
use kvs_api::{ClusterStatus, ViewRequest};
use std::time::Duration;

/// Where node pods run.
#[allow(async_fn_in_trait)]
pub trait Backend {
    /// How many pods the backend is set to run (the StatefulSet's replicas).
    fn replicas(&self) -> u32;
    /// Sets the number of pods (highest ordinals are added or removed).
    async fn set_replicas(&mut self, replicas: u32, spec: &Validated) -> anyhow::Result<()>;
    /// The pods that exist, with identity and readiness.
    async fn pods(&mut self) -> Vec<Pod>;
}

/// What one step saw and did.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub step: Step,
    pub status: Option<ClusterStatus>,
}

/// Talks to nodes' admin API.
pub struct Admin {
    http: reqwest::Client,
}

impl Default for Admin {
    fn default() -> Self {
        // View changes wait for data to move: allow them time.
        Admin { http: reqwest::Client::builder().timeout(Duration::from_secs(600)).build().expect("a plain HTTP client builds") }
    }
}

impl Admin {
    /// `GET /v1/admin/status` from the first pod that answers.
    pub async fn status(&self, pods: &[Pod]) -> Option<ClusterStatus> {
        for p in pods.iter().filter(|p| p.ready) {
            let url = format!("http://{}/v1/admin/status", p.identity);
            if let Ok(resp) = self.http.get(url).timeout(Duration::from_secs(5)).send().await
                && let Ok(status) = resp.json::<ClusterStatus>().await
                && status.layout.is_some()
            {
                return Some(status);
            }
        }
        None
    }

    /// `PUT /v1/admin/view` on `primary`.
    pub async fn change_view(&self, primary: &str, members: Vec<String>, replication_factor: u32) -> anyhow::Result<()> {
        let resp =
            self.http.put(format!("http://{primary}/v1/admin/view")).json(&ViewRequest { members, replication_factor }).send().await?;
        if !resp.status().is_success() {
            let status = resp.status();
            anyhow::bail!("{primary} answered {status}: {}", resp.text().await.unwrap_or_default());
        }
        Ok(())
    }
}

/// Observes the pods and the view and plans the next step towards `spec`.
pub async fn observe<B: Backend>(backend: &mut B, admin: &Admin, spec: &Validated) -> Observation {
    let pods = backend.pods().await;
    let status = admin.status(&pods).await;
    let view = status.as_ref().and_then(|s| s.layout.as_ref());
    Observation { step: plan(spec.replicas, spec.replication_factor, backend.replicas(), &pods, view), status }
}
