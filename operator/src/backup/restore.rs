//! `KVStoreCluster.spec.restoreFrom`: a new cluster from a backup. The cluster controller calls
//! [`step`] every reconcile while the spec asks for a restore; it loads the backup with the same
//! runner as `kvsctl restore` (`kvs_backup::restore`, which verifies every checksum and count
//! first) once the cluster runs, and returns the `status.restore` to write. The cluster's
//! `Available` condition stays false until that says `Succeeded` (`controller::status`).
//!
//! What to do next is a pure decision ([`decide`]); [`step`] does the I/O.
//!
//! Invariants:
//! - A restore that finished (`Succeeded` or `Failed`) for a URL is not run again for it; a new
//!   URL starts over.
//! - A cluster that holds keys is restored into only with `overwrite`, or to finish a run of this
//!   same restore that an operator restart cut short (its keys are the backup's own); at most
//!   [`MAX_ATTEMPTS`] runs in all.
//! - A run starts only while the cluster runs as its spec says (every pod ready, no view change
//!   under way): keys restored during a view change would be sent to owners that are leaving.

use super::access::{self, Access, Outcome, RunView, Runs};
use crate::controller::apply;
use crate::crd::{KVStoreCluster, RestorePhase, RestoreSource, RestoreStatus};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{EventType, Recorder};
use kube::{Client, ResourceExt};

/// Runs of one restore in all, across operator restarts.
pub const MAX_ATTEMPTS: i32 = 3;

/// The next thing to do for a cluster's restore.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// It is over (the status stands).
    Nothing,
    /// Wait for the cluster to run as its spec says.
    WaitForCluster,
    /// Report the run's progress.
    Progress(String),
    /// Record the run's outcome.
    Finish(Outcome),
    /// Start a run (attempt `attempt`), overwriting what the cluster holds if `overwrite`.
    Start { attempt: i32, overwrite: bool },
    /// Runs were lost to restarts too often: fail it.
    GiveUp,
}

/// Decides from the spec, the status so far, this process's run, and whether the cluster runs as
/// its spec says (`settled`).
pub fn decide(source: &RestoreSource, status: Option<&RestoreStatus>, run: Option<RunView>, settled: bool) -> Next {
    let status = status.filter(|s| s.url == source.url);
    if status.is_some_and(|s| matches!(s.phase, RestorePhase::Succeeded | RestorePhase::Failed)) {
        return Next::Nothing;
    }
    let attempts = status.map_or(0, |s| s.attempts);
    match run {
        Some(RunView::Finished(outcome)) => Next::Finish(outcome),
        Some(RunView::Running { progress }) => Next::Progress(progress),
        None if attempts >= MAX_ATTEMPTS => Next::GiveUp,
        None if !settled => Next::WaitForCluster,
        // A run lost to a restart left part of the backup behind: finish it over those keys.
        None => Next::Start { attempt: attempts + 1, overwrite: source.overwrite || attempts > 0 },
    }
}

fn key(cluster: &KVStoreCluster, url: &str) -> String {
    format!(
        "{}/{}/{}/{url}",
        cluster.namespace().unwrap_or_default(),
        cluster.name_any(),
        cluster.uid().unwrap_or_default()
    )
}

/// Takes the restore one step (starting, following or recording its run) and returns the status
/// to write. `settled`: the cluster runs as its spec says.
pub async fn step(
    client: &Client,
    recorder: &Recorder,
    runs: &Runs,
    cluster: &KVStoreCluster,
    source: &RestoreSource,
    settled: bool,
) -> Result<RestoreStatus, kube::Error> {
    let previous = cluster.status.as_ref().and_then(|s| s.restore.as_ref()).filter(|s| s.url == source.url);
    let mut status =
        previous.cloned().unwrap_or_else(|| RestoreStatus { url: source.url.clone(), ..Default::default() });
    let key = key(cluster, &source.url);
    let ns = cluster.namespace().unwrap_or_default();
    let fail = |status: &mut RestoreStatus, why: String| {
        (status.phase, status.message) = (RestorePhase::Failed, Some(why));
        status.completion_time = Some(Timestamp::now().to_string());
    };
    match decide(source, previous, runs.view(&key), settled) {
        Next::Nothing => {}
        Next::WaitForCluster => {
            status.phase = RestorePhase::Pending;
            status.message = Some("waiting for every pod to be ready and the view to settle".into());
        }
        Next::Progress(progress) => (status.phase, status.progress) = (RestorePhase::Running, Some(progress)),
        Next::Finish(outcome) => {
            runs.remove(&key);
            match outcome {
                Ok(m) => {
                    status.phase = RestorePhase::Succeeded;
                    status.progress = Some(format!("restoring {}/{}", m.records, m.records));
                    (status.keys, status.deletions) = (Some(m.live_keys as i64), Some(m.tombstones as i64));
                    status.completion_time = Some(Timestamp::now().to_string());
                    status.message = None;
                    let note =
                        format!("restored {} keys and {} deletions from {}", m.live_keys, m.tombstones, source.url);
                    apply::publish_event(recorder, cluster, EventType::Normal, "Restored", note).await;
                }
                Err(why) => {
                    fail(&mut status, why.clone());
                    let note = format!("restoring from {} failed: {why}", source.url);
                    apply::publish_event(recorder, cluster, EventType::Warning, "RestoreFailed", note).await;
                }
            }
        }
        Next::GiveUp => {
            fail(&mut status, format!("the operator restarted during each of {MAX_ATTEMPTS} attempts"));
        }
        Next::Start { attempt, overwrite } => {
            let name = cluster.name_any();
            let credentials = source.credentials_secret.as_deref();
            match access::cluster_and_destination(client, &ns, &name, &source.url, credentials).await? {
                Access::Wait(why) => (status.phase, status.message) = (RestorePhase::Pending, Some(why)),
                Access::Invalid(why) => {
                    fail(&mut status, why.clone());
                    apply::publish_event(recorder, cluster, EventType::Warning, "RestoreFailed", why).await;
                }
                Access::Ready((target, dest)) => {
                    runs.start(key, move |progress| async move {
                        kvs_backup::restore(&target, &dest, overwrite, progress.as_ref())
                            .await
                            .map_err(|e| e.to_string())
                    });
                    (status.phase, status.attempts, status.message) = (RestorePhase::Running, attempt, None);
                    let note = format!("restoring from {} (attempt {attempt})", source.url);
                    apply::publish_event(recorder, cluster, EventType::Normal, "Restoring", note).await;
                }
            }
        }
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(overwrite: bool) -> RestoreSource {
        RestoreSource { url: "s3://b/1".into(), credentials_secret: None, overwrite }
    }

    fn status(phase: RestorePhase, attempts: i32) -> RestoreStatus {
        RestoreStatus { url: "s3://b/1".into(), phase, attempts, ..Default::default() }
    }

    #[test]
    fn a_restore_waits_for_a_settled_cluster_runs_once_and_finishes_a_lost_run_over_its_own_keys() {
        assert_eq!(decide(&source(false), None, None, false), Next::WaitForCluster);
        assert_eq!(decide(&source(false), None, None, true), Next::Start { attempt: 1, overwrite: false });
        assert_eq!(decide(&source(true), None, None, true), Next::Start { attempt: 1, overwrite: true });
        let running = status(RestorePhase::Running, 1);
        let progress = RunView::Running { progress: "restoring 5/10".into() };
        assert_eq!(
            decide(&source(false), Some(&running), Some(progress), true),
            Next::Progress("restoring 5/10".into())
        );
        assert_eq!(
            decide(&source(false), Some(&running), Some(RunView::Finished(Err("no".into()))), true),
            Next::Finish(Err("no".into()))
        );
        // The operator restarted mid-run: the keys the cluster holds are the backup's own.
        assert_eq!(decide(&source(false), Some(&running), None, true), Next::Start { attempt: 2, overwrite: true });
        assert_eq!(
            decide(&source(false), Some(&status(RestorePhase::Running, MAX_ATTEMPTS)), None, true),
            Next::GiveUp
        );
        for done in [RestorePhase::Succeeded, RestorePhase::Failed] {
            assert_eq!(decide(&source(false), Some(&status(done, 1)), None, true), Next::Nothing);
        }
        // Another URL starts over.
        let other = RestoreSource { url: "s3://b/2".into(), ..source(false) };
        let done = status(RestorePhase::Succeeded, 1);
        assert_eq!(decide(&other, Some(&done), None, true), Next::Start { attempt: 1, overwrite: false });
    }
}
