//! The `KVStoreBackup` controller: takes each backup once, with the same runner as
//! `kvsctl backup` (`kvs-backup`), in the operator process (and, with `spec.verify`, reads it
//! back as `kvsctl backup verify` does), and records the outcome. Beside it: [`schedule`]
//! (backups on a cron schedule, with retention), [`restore`] (`KVStoreCluster.spec.restoreFrom`)
//! and [`access`] (what they share: runs in flight, finding pods, tokens and credentials).
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

use crate::controller::apply;
use crate::crd::{BackupPhase, KVStoreBackup, KVStoreBackupStatus, KVStoreCluster};
use access::{Access, Outcome, RunView, Runs};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

pub mod access;
pub mod restore;
pub mod schedule;

/// Runs of one backup in all, across operator restarts.
pub const MAX_ATTEMPTS: i32 = 3;
/// How often a running backup's progress is written to its status.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How often a pending backup looks again for its cluster.
const PENDING_EVERY: Duration = Duration::from_secs(5);

/// The next thing to do for a backup.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// It is over.
    Nothing,
    /// Report the run's progress.
    Progress(String),
    /// Record the run's outcome.
    Finish(Outcome),
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
        Some(RunView::Running { progress }) => Next::Progress(progress),
        None if status.attempts >= MAX_ATTEMPTS => Next::GiveUp,
        None => Next::Start { attempt: status.attempts + 1 },
    }
}

/// State shared by the backup reconciles.
pub struct BackupContext {
    pub client: Client,
    pub recorder: Recorder,
    /// Runs in flight or finished but not yet recorded, by `namespace/name/uid`.
    runs: Runs,
}

impl BackupContext {
    pub fn new(client: Client, recorder: Recorder) -> Self {
        BackupContext { client, recorder, runs: Runs::default() }
    }
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
    Ok(apply::apply_status::<KVStoreBackup>(&ctx.client, &ns, &backup.name_any(), status).await?)
}

async fn publish(ctx: &BackupContext, backup: &KVStoreBackup, type_: EventType, reason: &str, note: String) {
    apply::publish_event(&ctx.recorder, backup, type_, reason, note).await;
}

/// Reconciles one backup.
pub async fn reconcile(backup: Arc<KVStoreBackup>, ctx: Arc<BackupContext>) -> Result<Action, Error> {
    let mut status = backup.status.clone().unwrap_or_default();
    match decide(&status, ctx.runs.view(&key(&backup))) {
        Next::Nothing => Ok(Action::await_change()),
        Next::Progress(progress) => {
            let progress = Some(progress);
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
                    status.progress = Some(format!("{}/{}", m.records, m.records));
                    (status.keys, status.deletions) = (Some(m.live_keys as i64), Some(m.tombstones as i64));
                    (status.bytes, status.cut) = (Some(m.bytes as i64), Some(m.cut as i64));
                    status.view_epoch = Some(m.view_epoch as i64);
                    status.manifest = Some(format!(
                        "{}/{}",
                        backup.spec.destination.trim_end_matches('/'),
                        kvs_backup::format::MANIFEST
                    ));
                    status.message = None;
                    if backup.spec.verify {
                        status.last_verified = status.completion_time.clone();
                    }
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
            ctx.runs.remove(&key(&backup));
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
            Access::Wait(why) => {
                if status.message.as_deref() != Some(why.as_str()) {
                    (status.phase, status.message) = (BackupPhase::Pending, Some(why));
                    write_status(&ctx, &backup, &status).await?;
                }
                Ok(Action::requeue(PENDING_EVERY))
            }
            Access::Invalid(why) => {
                (status.phase, status.message) = (BackupPhase::Failed, Some(why.clone()));
                write_status(&ctx, &backup, &status).await?;
                publish(&ctx, &backup, EventType::Warning, "BackupFailed", why).await;
                Ok(Action::await_change())
            }
            Access::Ready((cluster, dest)) => {
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

/// Finds what a run needs: the cluster's running pods and token, the destination.
async fn prepare(
    ctx: &BackupContext,
    backup: &KVStoreBackup,
) -> Result<Access<(kvs_backup::Cluster, kvs_backup::Destination)>, Error> {
    let ns = backup.namespace().ok_or_else(|| Error::NotNamespaced(backup.name_any()))?;
    let name = &backup.spec.cluster;
    let clusters: Api<KVStoreCluster> = Api::namespaced(ctx.client.clone(), &ns);
    if clusters.get_opt(name).await?.is_none() {
        return Ok(Access::Wait(format!("waiting for KVStoreCluster {name:?} in namespace {ns:?} to exist")));
    }
    let spec = &backup.spec;
    let credentials = spec.credentials_secret.as_deref();
    Ok(access::cluster_and_destination(&ctx.client, &ns, name, &spec.destination, credentials).await?)
}

/// Runs the backup in the background; its outcome waits in the context for the next reconcile.
fn start(ctx: &BackupContext, backup: &KVStoreBackup, cluster: kvs_backup::Cluster, dest: kvs_backup::Destination) {
    let options = kvs_backup::BackupOptions { cluster_name: Some(backup.spec.cluster.clone()), ..Default::default() };
    let verify = backup.spec.verify;
    ctx.runs.start(key(backup), move |progress| async move {
        let manifest =
            kvs_backup::backup(&cluster, &dest, &options, progress.as_ref()).await.map_err(|e| e.to_string())?;
        if verify {
            kvs_backup::verify(&dest, progress.as_ref())
                .await
                .map_err(|e| format!("the backup was written but does not verify: {e}"))?;
        }
        Ok(manifest)
    });
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
    let api: Api<KVStoreBackup> = apply::api_in(&ctx.client, namespace);
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
        let running = RunView::Running { progress: "5/10".into() };
        assert_eq!(decide(&status(BackupPhase::Running, 1), Some(running)), Next::Progress("5/10".into()));
        let failed = RunView::Finished(Err("no".into()));
        assert_eq!(decide(&status(BackupPhase::Running, 1), Some(failed)), Next::Finish(Err("no".into())));
        // The operator restarted: this process has no run for it.
        assert_eq!(decide(&status(BackupPhase::Running, 1), None), Next::Start { attempt: 2 });
        assert_eq!(decide(&status(BackupPhase::Running, MAX_ATTEMPTS), None), Next::GiveUp);
        for done in [BackupPhase::Succeeded, BackupPhase::Failed] {
            assert_eq!(decide(&status(done, 1), None), Next::Nothing);
            assert_eq!(decide(&status(done, 1), Some(RunView::Running { progress: String::new() })), Next::Nothing);
        }
    }
}
