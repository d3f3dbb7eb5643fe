//! What backups and restores share: the runs in flight in this process ([`Runs`]), and the I/O
//! that finds what a run needs — the cluster's pods and token ([`cluster_access`]) and the
//! destination with its credentials ([`open_destination`]).
//!
//! Invariant: at most one run per key; a run's outcome stays in [`Runs`] until the reconcile
//! that records it removes it, so an outcome is never lost between two reconciles.

use crate::controller::build::{PORT, TOKEN_KEY, identity, ordinal_of, selector_string, token_secret_name};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a run in flight reports: its stage, and records done of those expected in it.
#[derive(Default)]
pub struct RunProgress {
    stage: Mutex<String>,
    expected: AtomicU64,
    done: AtomicU64,
}

impl RunProgress {
    /// `stage done/expected` (`done/expected` before the first stage is named).
    pub fn text(&self) -> String {
        let (done, expected) = (self.done.load(Ordering::Relaxed), self.expected.load(Ordering::Relaxed));
        let stage = lock(&self.stage).clone();
        if stage.is_empty() { format!("{done}/{expected}") } else { format!("{stage} {done}/{expected}") }
    }
}

impl kvs_backup::Progress for RunProgress {
    fn stage(&self, name: &str, total: u64) {
        *lock(&self.stage) = name.to_owned();
        self.expected.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }
    fn advance(&self, records: u64) {
        self.done.fetch_add(records, Ordering::Relaxed);
    }
}

/// How a run ended: the backup's manifest, or why not.
pub type Outcome = Result<kvs_backup::Manifest, String>;

/// A run of this process, as the pure decisions see it.
#[derive(Clone, Debug, PartialEq)]
pub enum RunView {
    Running { progress: String },
    Finished(Outcome),
}

struct Run {
    progress: Arc<RunProgress>,
    outcome: Arc<Mutex<Option<Outcome>>>,
}

/// The runs of this process (backups or restores), by key. `std` lock, never held across `.await`.
#[derive(Default)]
pub struct Runs {
    runs: Mutex<HashMap<String, Run>>,
}

impl Runs {
    /// The run under `key`, if this process has one.
    pub fn view(&self, key: &str) -> Option<RunView> {
        lock(&self.runs).get(key).map(|r| match lock(&r.outcome).clone() {
            Some(outcome) => RunView::Finished(outcome),
            None => RunView::Running { progress: r.progress.text() },
        })
    }

    /// Starts `work` in the background under `key`; it reports through the progress it is given.
    pub fn start<F, Fut>(&self, key: String, work: F)
    where
        F: FnOnce(Arc<RunProgress>) -> Fut,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let run = Run { progress: Arc::default(), outcome: Arc::default() };
        let (future, outcome) = (work(run.progress.clone()), run.outcome.clone());
        tokio::spawn(async move {
            let result = future.await;
            *lock(&outcome) = Some(result);
        });
        lock(&self.runs).insert(key, run);
    }

    /// Forgets the run under `key` (its outcome is recorded).
    pub fn remove(&self, key: &str) {
        lock(&self.runs).remove(key);
    }
}

/// Whether what a run needs is there.
pub enum Access<T> {
    /// Not yet (and why): the cluster, its pods or a Secret are not there.
    Wait(String),
    /// Never as the spec stands (and why): the URL or its credentials are wrong.
    Invalid(String),
    Ready(T),
}

/// The cluster `name` in `ns` as a runner reaches it: its running pods, called at their IPs (the
/// operator may run where the pods' DNS names do not resolve), with the cluster token, over TLS
/// when the cluster has `spec.tls` (never plain then: the token would cross the network in the
/// clear).
pub async fn cluster_access(client: &Client, ns: &str, name: &str) -> Result<Access<kvs_backup::Cluster>, kube::Error> {
    let clusters: Api<crate::crd::KVStoreCluster> = Api::namespaced(client.clone(), ns);
    let Some(cluster) = clusters.get_opt(name).await? else {
        return Ok(Access::Wait(format!("waiting for KVStoreCluster {name:?}")));
    };
    let tls_enabled = cluster.spec.tls.as_ref().is_some_and(|t| t.enabled);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let token = secrets
        .get_opt(&token_secret_name(name))
        .await?
        .and_then(|s| s.data?.get(TOKEN_KEY).and_then(|b| String::from_utf8(b.0.clone()).ok()));
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let listed = pods.list(&ListParams::default().labels(&selector_string(name))).await?;
    let mut addresses = HashMap::new();
    for pod in &listed.items {
        let status = pod.status.as_ref();
        let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
        if let (true, Some(ordinal), Some(ip)) =
            (running, ordinal_of(name, &pod.name_any()), status.and_then(|s| s.pod_ip.as_ref()))
        {
            addresses.insert(identity(name, ns, ordinal), format!("{ip}:{PORT}"));
        }
    }
    if addresses.is_empty() {
        return Ok(Access::Wait(format!("waiting for a running pod of KVStoreCluster {name:?}")));
    }
    let endpoints = addresses.values().cloned().collect();
    let tls = match crate::controller::tls::client_settings(client, ns, name, tls_enabled).await {
        Ok(tls) => tls,
        Err(e) => return Ok(Access::Wait(format!("reaching KVStoreCluster {name:?} over TLS: {e}"))),
    };
    let admin = kvs_api::AdminClient::new(token).with_tls(tls);
    Ok(Access::Ready(kvs_backup::Cluster { endpoints, admin, addresses }))
}

/// The object store at `url`, configured from the keys of Secret `credentials` in `ns` if named
/// (else from the operator's environment).
pub async fn open_destination(
    client: &Client,
    ns: &str,
    url: &str,
    credentials: Option<&str>,
) -> Result<Access<kvs_backup::Destination>, kube::Error> {
    let mut options = Vec::new();
    if let Some(secret) = credentials {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        let Some(found) = secrets.get_opt(secret).await? else {
            return Ok(Access::Wait(format!("waiting for the credentials Secret {secret:?}")));
        };
        for (k, v) in found.data.unwrap_or_default() {
            match String::from_utf8(v.0) {
                Ok(v) => options.push((k, v)),
                Err(_) => return Ok(Access::Invalid(format!("key {k:?} of Secret {secret:?} is not text"))),
            }
        }
    }
    Ok(match kvs_backup::Destination::open_with(url, &options) {
        Ok(dest) => Access::Ready(dest),
        Err(e) => Access::Invalid(e.to_string()),
    })
}

/// Both: the cluster `name` to read from or write to, and the object store at `url`.
pub async fn cluster_and_destination(
    client: &Client,
    ns: &str,
    name: &str,
    url: &str,
    credentials: Option<&str>,
) -> Result<Access<(kvs_backup::Cluster, kvs_backup::Destination)>, kube::Error> {
    let cluster = match cluster_access(client, ns, name).await? {
        Access::Ready(c) => c,
        Access::Wait(why) => return Ok(Access::Wait(why)),
        Access::Invalid(why) => return Ok(Access::Invalid(why)),
    };
    Ok(match open_destination(client, ns, url, credentials).await? {
        Access::Ready(dest) => Access::Ready((cluster, dest)),
        Access::Wait(why) => Access::Wait(why),
        Access::Invalid(why) => Access::Invalid(why),
    })
}
