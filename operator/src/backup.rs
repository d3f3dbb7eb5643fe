//! The `KVStoreBackup` controller: takes each backup once, with the same runner as
//! `kvsctl backup` (`kvs-backup`), in the operator process, and records the outcome.
//!
//! What to do next is a pure decision ([`decide`]) from the resource's status and the run this
//! process has in flight for it, if any; the rest is I/O: finding the cluster's pods and token,
//! the destination's credentials, running the backup in the background, writing the status.
//!
//! Invariants:
//! - A backup in a final phase (`Succeeded`, `Failed`) is never taken again.
//! - At most one run per backup in this process; a run lost to an operator restart (the status
//!   says `Running`, this process has none) is started again, at most [`MAX_ATTEMPTS`] times in
//!   all. A new run may write over the files of the lost one: only the manifest makes a backup,
//!   and it is written last.

use crate::controller::apply::MANAGER;
use crate::controller::build::{PORT, TOKEN_KEY, identity, ordinal_of, selector_string, token_secret_name};
use crate::crd::{BackupPhase, KVStoreBackup, KVStoreBackupStatus, KVStoreCluster};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Runs of one backup in all, across operator restarts.
pub const MAX_ATTEMPTS: i32 = 3;
/// How often a running backup's progress is written to its status.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How often a pending backup looks again for its cluster.
const PENDING_EVERY: Duration = Duration::from_secs(5);

/// What a run in flight reports.
#[derive(Default)]
pub struct RunProgress {
    expected: AtomicU64,
    read: AtomicU64,
}

impl kvs_backup::Progress for RunProgress {
    fn stage(&self, _: &str, total: u64) {
        self.expected.store(total, Ordering::Relaxed);
    }
    fn advance(&self, records: u64) {
        self.read.fetch_add(records, Ordering::Relaxed);
    }
}

/// The run this process has for a backup, as [`decide`] sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum RunView {
    Running { read: u64, expected: u64 },
    Finished(Result<kvs_backup::Manifest, String>),
}

/// The next thing to do for a backup.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// It is over.
    Nothing,
    /// Report the run's progress.
    Progress { read: u64, expected: u64 },
    /// Record the run's outcome.
    Finish(Result<kvs_backup::Manifest, String>),
    /// Start a run (this is attempt `attempt`).
    Start { attempt: i32 },
    /// Runs were lost to restarts too often: fail it.
    GiveUp,
}

/// Decides from the backup's status and this process's run for it.
pub fn decide(status: &KVStoreBackupStatus, run: Option<RunView>) -> Next {
    if status.phase.is_final() {
        return Next::Nothing;
    }
    match run {
        Some(RunView::Finished(outcome)) => Next::Finish(outcome),
        Some(RunView::Running { read, expected }) => Next::Progress { read, expected },
        None if status.attempts >= MAX_ATTEMPTS => Next::GiveUp,
        None => Next::Start { attempt: status.attempts + 1 },
    }
}

struct Run {
    progress: Arc<RunProgress>,
    outcome: Arc<Mutex<Option<Result<kvs_backup::Manifest, String>>>>,
}

/// State shared by the backup reconciles.
pub struct BackupContext {
    pub client: Client,
    pub recorder: Recorder,
    /// Runs in flight or finished but not yet recorded, by `namespace/name/uid`. `std` lock,
    /// never held across `.await`.
    runs: Mutex<HashMap<String, Run>>,
}

impl BackupContext {
    pub fn new(client: Client, recorder: Recorder) -> Self {
        BackupContext { client, recorder, runs: Mutex::default() }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn key(b: &KVStoreBackup) -> String {
    format!("{}/{}/{}", b.namespace().unwrap_or_default(), b.name_any(), b.uid().unwrap_or_default())
}

/// Why a reconcile failed (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("KVStoreBackup {0} has no namespace")]
    NotNamespaced(String),
}

async fn write_status(ctx: &BackupContext, backup: &KVStoreBackup, status: &KVStoreBackupStatus) -> Result<(), Error> {
    let ns = backup.namespace().ok_or_else(|| Error::NotNamespaced(backup.name_any()))?;
    let api: Api<KVStoreBackup> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": KVStoreBackup::api_version(&()),
        "kind": KVStoreBackup::kind(&()),
        "metadata": { "name": backup.name_any() },
        "status": status,
    });
    api.patch_status(&backup.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

async fn publish(ctx: &BackupContext, backup: &KVStoreBackup, type_: EventType, reason: &str, note: String) {
    let event = Event { type_, reason: reason.into(), note: Some(note), action: reason.into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&event, &backup.object_ref(&())).await {
        tracing::warn!(backup = %backup.name_any(), error = %e, "could not publish an event");
    }
}

fn progress_text(read: u64, expected: u64) -> String {
    format!("{read}/{expected}")
}

/// Reconciles one backup.
pub async fn reconcile(backup: Arc<KVStoreBackup>, ctx: Arc<BackupContext>) -> Result<Action, Error> {
    let mut status = backup.status.clone().unwrap_or_default();
    let run = lock(&ctx.runs).get(&key(&backup)).map(|r| match lock(&r.outcome).clone() {
        Some(outcome) => RunView::Finished(outcome),
        None => RunView::Running {
            read: r.progress.read.load(Ordering::Relaxed),
            expected: r.progress.expected.load(Ordering::Relaxed),
        },
    });
    match decide(&status, run) {
        Next::Nothing => Ok(Action::await_change()),
        Next::Progress { read, expected } => {
            let progress = Some(progress_text(read, expected));
            if status.progress != progress || status.phase != BackupPhase::Running {
                (status.phase, status.progress) = (BackupPhase::Running, progress);
                write_status(&ctx, &backup, &status).await?;
            }
            Ok(Action::requeue(PROGRESS_EVERY))
        }
        Next::Finish(outcome) => {
            status.completion_time = Some(Timestamp::now().to_string());
            match outcome {
                Ok(m) => {
                    status.phase = BackupPhase::Succeeded;
                    status.progress = Some(progress_text(m.records, m.records));
                    (status.keys, status.deletions) = (Some(m.live_keys as i64), Some(m.tombstones as i64));
                    (status.bytes, status.cut) = (Some(m.bytes as i64), Some(m.cut as i64));
                    status.view_epoch = Some(m.view_epoch as i64);
                    status.manifest = Some(format!(
                        "{}/{}",
                        backup.spec.destination.trim_end_matches('/'),
                        kvs_backup::format::MANIFEST
                    ));
                    status.message = None;
                    write_status(&ctx, &backup, &status).await?;
                    let note =
                        format!("{} keys, {} deletions, {} bytes at cut {}", m.live_keys, m.tombstones, m.bytes, m.cut);
                    publish(&ctx, &backup, EventType::Normal, "BackupSucceeded", note).await;
                }
                Err(why) => {
                    (status.phase, status.message) = (BackupPhase::Failed, Some(why.clone()));
                    write_status(&ctx, &backup, &status).await?;
                    publish(&ctx, &backup, EventType::Warning, "BackupFailed", why).await;
                }
            }
            lock(&ctx.runs).remove(&key(&backup));
            Ok(Action::await_change())
        }
        Next::GiveUp => {
            let why =
                format!("the operator restarted during each of {MAX_ATTEMPTS} attempts; create a new KVStoreBackup");
            (status.phase, status.message) = (BackupPhase::Failed, Some(why.clone()));
            status.completion_time = Some(Timestamp::now().to_string());
            write_status(&ctx, &backup, &status).await?;
            publish(&ctx, &backup, EventType::Warning, "BackupFailed", why).await;
            Ok(Action::await_change())
        }
        Next::Start { attempt } => match prepare(&ctx, &backup).await? {
            Prepared::Wait(why) => {
                if status.message.as_deref() != Some(why.as_str()) {
                    (status.phase, status.message) = (BackupPhase::Pending, Some(why));
                    write_status(&ctx, &backup, &status).await?;
                }
                Ok(Action::requeue(PENDING_EVERY))
            }
            Prepared::Invalid(why) => {
                (status.phase, status.message) = (BackupPhase::Failed, Some(why.clone()));
                write_status(&ctx, &backup, &status).await?;
                publish(&ctx, &backup, EventType::Warning, "BackupFailed", why).await;
                Ok(Action::await_change())
            }
            Prepared::Ready { cluster, dest } => {
                start(&ctx, &backup, cluster, dest);
                status.phase = BackupPhase::Running;
                status.attempts = attempt;
                status.start_time.get_or_insert_with(|| Timestamp::now().to_string());
                status.message = None;
                write_status(&ctx, &backup, &status).await?;
                let note =
                    format!("backing up {} to {} (attempt {attempt})", backup.spec.cluster, backup.spec.destination);
                publish(&ctx, &backup, EventType::Normal, "BackupStarted", note).await;
                Ok(Action::requeue(PROGRESS_EVERY))
            }
        },
    }
}

enum Prepared {
    /// Not yet (and why): the cluster or its pods are not there.
    Wait(String),
    /// Never: the destination or its credentials are wrong.
    Invalid(String),
    Ready {
        cluster: kvs_backup::Cluster,
        dest: kvs_backup::Destination,
    },
}

/// Finds what a run needs: the cluster's running pods and token, the destination.
async fn prepare(ctx: &BackupContext, backup: &KVStoreBackup) -> Result<Prepared, Error> {
    let ns = backup.namespace().ok_or_else(|| Error::NotNamespaced(backup.name_any()))?;
    let name = &backup.spec.cluster;
    let clusters: Api<KVStoreCluster> = Api::namespaced(ctx.client.clone(), &ns);
    if clusters.get_opt(name).await?.is_none() {
        return Ok(Prepared::Wait(format!("waiting for KVStoreCluster {name:?} in namespace {ns:?} to exist")));
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let token = secrets
        .get_opt(&token_secret_name(name))
        .await?
        .and_then(|s| s.data?.get(TOKEN_KEY).and_then(|b| String::from_utf8(b.0.clone()).ok()));
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let listed = pods.list(&ListParams::default().labels(&selector_string(name))).await?;
    // Members are called at their pods' IPs, as the cluster controller calls them: the operator
    // may run where the pods' DNS names do not resolve.
    let mut addresses = HashMap::new();
    for pod in &listed.items {
        let status = pod.status.as_ref();
        let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
        let (Some(ordinal), Some(ip)) = (ordinal_of(name, &pod.name_any()), status.and_then(|s| s.pod_ip.as_ref()))
        else {
            continue;
        };
        if running {
            addresses.insert(identity(name, &ns, ordinal), format!("{ip}:{PORT}"));
        }
    }
    if addresses.is_empty() {
        return Ok(Prepared::Wait(format!("waiting for a running pod of KVStoreCluster {name:?}")));
    }
    let mut options = Vec::new();
    if let Some(secret) = &backup.spec.credentials_secret {
        let Some(found) = secrets.get_opt(secret).await? else {
            return Ok(Prepared::Wait(format!("waiting for the credentials Secret {secret:?}")));
        };
        for (k, v) in found.data.unwrap_or_default() {
            match String::from_utf8(v.0) {
                Ok(v) => options.push((k, v)),
                Err(_) => return Ok(Prepared::Invalid(format!("key {k:?} of Secret {secret:?} is not text"))),
            }
        }
    }
    let dest = match kvs_backup::Destination::open_with(&backup.spec.destination, &options) {
        Ok(dest) => dest,
        Err(e) => return Ok(Prepared::Invalid(e.to_string())),
    };
    let endpoints = addresses.values().cloned().collect();
    let cluster = kvs_backup::Cluster { endpoints, admin: kvs_api::AdminClient::new(token), addresses };
    Ok(Prepared::Ready { cluster, dest })
}

/// Runs the backup in the background; its outcome waits in the context for the next reconcile.
fn start(ctx: &BackupContext, backup: &KVStoreBackup, cluster: kvs_backup::Cluster, dest: kvs_backup::Destination) {
    let run = Run { progress: Arc::default(), outcome: Arc::default() };
    let (progress, outcome) = (run.progress.clone(), run.outcome.clone());
    let options = kvs_backup::BackupOptions { cluster_name: Some(backup.spec.cluster.clone()), ..Default::default() };
    tokio::spawn(async move {
        let result = kvs_backup::backup(&cluster, &dest, &options, progress.as_ref()).await;
        *lock(&outcome) = Some(result.map_err(|e| e.to_string()));
    });
    lock(&ctx.runs).insert(key(backup), run);
}

pub fn error_policy(backup: Arc<KVStoreBackup>, error: &Error, _ctx: Arc<BackupContext>) -> Action {
    tracing::warn!(backup = %backup.name_any(), error = %error, "backup reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the controller until `shutdown` completes.
pub async fn run(
    ctx: Arc<BackupContext>,
    namespace: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<KVStoreBackup> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "backup reconcile error (retried)");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: BackupPhase, attempts: i32) -> KVStoreBackupStatus {
        KVStoreBackupStatus { phase, attempts, ..Default::default() }
    }

    #[test]
    fn a_backup_is_taken_once_and_a_lost_run_is_started_again_a_bounded_number_of_times() {
        assert_eq!(decide(&status(BackupPhase::Pending, 0), None), Next::Start { attempt: 1 });
        let running = RunView::Running { read: 5, expected: 10 };
        assert_eq!(decide(&status(BackupPhase::Running, 1), Some(running)), Next::Progress { read: 5, expected: 10 });
        let failed = RunView::Finished(Err("no".into()));
        assert_eq!(decide(&status(BackupPhase::Running, 1), Some(failed)), Next::Finish(Err("no".into())));
        // The operator restarted: this process has no run for it.
        assert_eq!(decide(&status(BackupPhase::Running, 1), None), Next::Start { attempt: 2 });
        assert_eq!(decide(&status(BackupPhase::Running, MAX_ATTEMPTS), None), Next::GiveUp);
        for done in [BackupPhase::Succeeded, BackupPhase::Failed] {
            assert_eq!(decide(&status(done, 1), None), Next::Nothing);
            assert_eq!(decide(&status(done, 1), Some(RunView::Running { read: 0, expected: 0 })), Next::Nothing);
        }
    }
}
