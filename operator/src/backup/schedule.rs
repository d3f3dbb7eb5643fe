//! The `KVStoreBackupSchedule` controller: creates a `KVStoreBackup` (owned by the schedule, with
//! `verify`) at each time the cron expression names, and deletes the oldest beyond `keep` with
//! their files. The backups themselves are taken by the `KVStoreBackup` controller.
//!
//! What to do is a pure decision ([`plan`]) from the schedule, the time, and the backups it owns;
//! the rest is I/O.
//!
//! Invariants:
//! - At most one backup of a schedule runs at a time: a time that comes while one runs is taken
//!   once it has finished (only the latest time missed is taken, however many were).
//! - Retention deletes a backup's files before its resource (the manifest first), so a backup
//!   whose deletion failed midway is still listed, and deleted again, never left unnamed.
//! - Only backups the schedule created (its label) are ever deleted.

use super::BackupContext;
use super::access::{self, Access};
use crate::controller::apply::{self, MANAGER};
use crate::crd::{BackupPhase, KVStoreBackup, KVStoreBackupSchedule, KVStoreBackupScheduleStatus};
use chrono::{DateTime, Utc};
use croner::Cron;
use futures::StreamExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::{Controller, watcher};
use kube::{Api, Resource, ResourceExt};
use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Duration;

/// The label naming the schedule a backup was created by.
pub const SCHEDULE_LABEL: &str = "kvstore.dev/schedule";
/// The annotation holding the time a scheduled backup was due (RFC 3339).
pub const SCHEDULED_AT: &str = "kvstore.dev/scheduled-at";
/// Longest wait between two looks at a schedule (a due time is also looked at when it comes).
const MAX_WAIT: Duration = Duration::from_secs(60);

/// Parses a cron expression: five fields, or six with seconds first; no year field.
pub fn parse_schedule(expression: &str) -> Result<Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(expression)
        .map_err(|e| {
            format!("schedule {expression:?} is not a cron expression ({e}); e.g. \"0 3 * * *\" for 03:00 UTC daily")
        })
}

/// A backup the schedule owns, as [`plan`] sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Owned {
    pub name: String,
    pub phase: BackupPhase,
    pub scheduled: DateTime<Utc>,
}

/// What to do about a schedule now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Create the backup due at this time.
    pub create: Option<DateTime<Utc>>,
    /// Backups to delete with their files, oldest first.
    pub delete: Vec<String>,
    /// When the next backup is due.
    pub next: Option<DateTime<Utc>>,
}

/// Decides, at `now`, for a schedule whose newest backup was due at `since` (its creation if it
/// has none), keeping `keep` succeeded backups of those it `owned`.
pub fn plan(
    cron: &Cron,
    suspend: bool,
    keep: usize,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
    owned: &[Owned],
) -> Plan {
    let running = owned.iter().any(|b| !b.phase.is_final());
    let due = cron.find_previous_occurrence(&now, true).ok().filter(|t| *t > since);
    let create = due.filter(|_| !suspend && !running);
    let next = cron.find_next_occurrence(&now.max(since), false).ok();

    let mut succeeded: Vec<&Owned> = owned.iter().filter(|b| b.phase == BackupPhase::Succeeded).collect();
    succeeded.sort_by_key(|b| Reverse(b.scheduled));
    let newest = succeeded.first().map(|b| b.scheduled);
    let mut delete: Vec<&Owned> = succeeded.into_iter().skip(keep).collect();
    // A failed backup is kept until a newer one succeeds (it says what went wrong meanwhile).
    delete.extend(owned.iter().filter(|b| b.phase == BackupPhase::Failed && newest.is_some_and(|t| b.scheduled < t)));
    delete.sort_by_key(|b| b.scheduled);
    Plan { create, delete: delete.into_iter().map(|b| b.name.clone()).collect(), next }
}

/// The name of the backup due at `at`: `<schedule>-<20261203t030000z>`.
pub fn backup_name(schedule: &str, at: DateTime<Utc>) -> String {
    format!("{schedule}-{}", at.format("%Y%m%dt%H%M%Sz"))
}

/// Why a reconcile failed (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("KVStoreBackupSchedule {0} has no namespace")]
    NotNamespaced(String),
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn parse_time(t: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(t).ok().map(|t| t.with_timezone(&Utc))
}

/// Reconciles one schedule.
pub async fn reconcile(schedule: Arc<KVStoreBackupSchedule>, ctx: Arc<BackupContext>) -> Result<Action, Error> {
    let ns = schedule.namespace().ok_or_else(|| Error::NotNamespaced(schedule.name_any()))?;
    let name = schedule.name_any();
    let previous = schedule.status.clone().unwrap_or_default();
    let mut status =
        KVStoreBackupScheduleStatus { last_schedule_time: previous.last_schedule_time.clone(), ..Default::default() };
    let cron = match parse_schedule(&schedule.spec.schedule) {
        Ok(cron) => cron,
        Err(why) => {
            status.message = Some(why);
            write_status(&ctx, &ns, &name, &previous, &status).await?;
            return Ok(Action::await_change());
        }
    };
    let backups: Api<KVStoreBackup> = Api::namespaced(ctx.client.clone(), &ns);
    let listed = backups.list(&ListParams::default().labels(&format!("{SCHEDULE_LABEL}={name}"))).await?;
    let owned: Vec<Owned> = listed
        .items
        .iter()
        .filter_map(|b| {
            let scheduled = parse_time(b.annotations().get(SCHEDULED_AT)?)?;
            let phase = b.status.as_ref().map(|s| s.phase).unwrap_or_default();
            Some(Owned { name: b.name_any(), phase, scheduled })
        })
        .collect();
    let now = Utc::now();
    let created = schedule.creation_timestamp().and_then(|t| parse_time(&t.0.to_string())).unwrap_or(now);
    let since = previous.last_schedule_time.as_deref().and_then(parse_time).unwrap_or(created);
    let keep = usize::try_from(schedule.spec.keep.max(1)).unwrap_or(1);
    let plan = plan(&cron, schedule.spec.suspend, keep, since, now, &owned);

    for old in &plan.delete {
        let Some(backup) = listed.items.iter().find(|b| b.name_any() == *old) else { continue };
        match delete_files(&ctx, &ns, backup).await? {
            Ok(files) => {
                backups.delete(old, &DeleteParams::default()).await?;
                let note = format!("deleted backup {old} and its {files} files (keep {keep})");
                apply::publish_event(&ctx.recorder, schedule.as_ref(), EventType::Normal, "BackupDeleted", note).await;
            }
            Err(why) => {
                let note = format!("could not delete the files of backup {old}: {why}; retrying");
                apply::publish_event(&ctx.recorder, schedule.as_ref(), EventType::Warning, "BackupDeleteFailed", note)
                    .await;
            }
        }
    }
    let mut newest: Option<(DateTime<Utc>, String)> = owned.iter().map(|b| (b.scheduled, b.name.clone())).max();
    if let Some(at) = plan.create {
        let backup = create_backup(&ctx, &schedule, &ns, at).await?;
        let note = format!("created backup {backup} for {}", rfc3339(at));
        apply::publish_event(&ctx.recorder, schedule.as_ref(), EventType::Normal, "BackupScheduled", note).await;
        status.last_schedule_time = Some(rfc3339(at));
        newest = Some((at, backup));
    }
    status.last_backup = newest.map(|(_, n)| n);
    let kept = listed.items.iter().filter(|b| !plan.delete.contains(&b.name_any()));
    let succeeded = kept.clone().filter(|b| b.status.as_ref().is_some_and(|s| s.phase == BackupPhase::Succeeded));
    status.last_successful_backup = succeeded
        .clone()
        .filter_map(|b| Some((parse_time(b.annotations().get(SCHEDULED_AT)?)?, b.name_any())))
        .max()
        .map(|(_, n)| n);
    status.last_verified = succeeded.filter_map(|b| b.status.as_ref()?.last_verified.clone()).max();
    status.next_schedule_time = plan.next.map(rfc3339);
    if schedule.spec.suspend {
        status.message = Some("suspended (spec.suspend): no new backups; retention still applies".into());
    }
    write_status(&ctx, &ns, &name, &previous, &status).await?;
    let wait = plan.next.and_then(|t| (t - Utc::now()).to_std().ok()).unwrap_or(Duration::ZERO);
    Ok(Action::requeue(wait.clamp(Duration::from_secs(1), MAX_WAIT)))
}

/// Deletes a backup's files; `Err` (why) if its destination cannot be opened or emptied.
async fn delete_files(ctx: &BackupContext, ns: &str, backup: &KVStoreBackup) -> Result<Result<usize, String>, Error> {
    let spec = &backup.spec;
    Ok(match access::open_destination(&ctx.client, ns, &spec.destination, spec.credentials_secret.as_deref()).await? {
        Access::Ready(dest) => dest.delete_all().await.map_err(|e| e.to_string()),
        Access::Wait(why) | Access::Invalid(why) => Err(why),
    })
}

/// Creates (server-side applies) the backup due at `at`; returns its name.
async fn create_backup(
    ctx: &BackupContext,
    schedule: &KVStoreBackupSchedule,
    ns: &str,
    at: DateTime<Utc>,
) -> Result<String, Error> {
    let name = backup_name(&schedule.name_any(), at);
    let spec = &schedule.spec;
    let owner = schedule.controller_owner_ref(&()).map(|o| vec![o]).unwrap_or_default();
    let backup = serde_json::json!({
        "apiVersion": KVStoreBackup::api_version(&()),
        "kind": KVStoreBackup::kind(&()),
        "metadata": {
            "name": name,
            "labels": { SCHEDULE_LABEL: schedule.name_any() },
            "annotations": { SCHEDULED_AT: rfc3339(at) },
            "ownerReferences": owner,
        },
        "spec": {
            "cluster": spec.cluster,
            "destination": format!("{}/{name}", spec.destination.trim_end_matches('/')),
            "credentialsSecret": spec.credentials_secret,
            "verify": true,
        },
    });
    let api: Api<KVStoreBackup> = Api::namespaced(ctx.client.clone(), ns);
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&backup)).await?;
    Ok(name)
}

async fn write_status(
    ctx: &BackupContext,
    ns: &str,
    name: &str,
    previous: &KVStoreBackupScheduleStatus,
    status: &KVStoreBackupScheduleStatus,
) -> Result<(), Error> {
    if previous != status {
        apply::apply_status::<KVStoreBackupSchedule>(&ctx.client, ns, name, status).await?;
    }
    Ok(())
}

pub fn error_policy(schedule: Arc<KVStoreBackupSchedule>, error: &Error, _ctx: Arc<BackupContext>) -> Action {
    tracing::warn!(schedule = %schedule.name_any(), error = %error, "backup schedule reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the controller until `shutdown` completes: watches schedules and the backups they own.
pub async fn run(
    ctx: Arc<BackupContext>,
    namespace: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let schedules: Api<KVStoreBackupSchedule> = apply::api_in(&ctx.client, namespace);
    let backups: Api<KVStoreBackup> = apply::api_in(&ctx.client, namespace);
    Controller::new(schedules, watcher::Config::default())
        .owns(backups, watcher::Config::default().labels(SCHEDULE_LABEL))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "backup schedule reconcile error (retried)");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        parse_time(s).unwrap()
    }

    fn owned(name: &str, phase: BackupPhase, scheduled: &str) -> Owned {
        Owned { name: name.into(), phase, scheduled: at(scheduled) }
    }

    #[test]
    fn cron_expressions_with_and_without_seconds_and_a_clear_error() {
        assert!(parse_schedule("0 3 * * *").is_ok());
        assert!(parse_schedule("*/5 * * * * *").is_ok());
        let e = parse_schedule("every day").unwrap_err();
        assert!(e.contains("\"every day\"") && e.contains("0 3 * * *"), "{e}");
    }

    #[test]
    fn the_latest_missed_time_is_taken_once_and_never_beside_a_running_backup() {
        let daily = parse_schedule("0 3 * * *").unwrap();
        let since = at("2026-12-01T03:00:00Z");
        // Not due yet.
        let p = plan(&daily, false, 7, since, at("2026-12-02T02:59:00Z"), &[]);
        assert_eq!((p.create, p.next), (None, Some(at("2026-12-02T03:00:00Z"))));
        // Two days missed (the operator was down): one backup, for the latest.
        let p = plan(&daily, false, 7, since, at("2026-12-03T10:00:00Z"), &[]);
        assert_eq!(p.create, Some(at("2026-12-03T03:00:00Z")));
        assert_eq!(p.next, Some(at("2026-12-04T03:00:00Z")));
        // A backup still running: wait for it.
        let running = [owned("s-1", BackupPhase::Running, "2026-12-01T03:00:00Z")];
        assert_eq!(plan(&daily, false, 7, since, at("2026-12-02T03:00:01Z"), &running).create, None);
        // Suspended: nothing new.
        assert_eq!(plan(&daily, true, 7, since, at("2026-12-02T03:00:01Z"), &[]).create, None);
    }

    #[test]
    fn retention_keeps_the_newest_successes_and_failures_newer_than_them() {
        let daily = parse_schedule("0 3 * * *").unwrap();
        let backups = [
            owned("d1", BackupPhase::Succeeded, "2026-12-01T03:00:00Z"),
            owned("d2", BackupPhase::Failed, "2026-12-02T03:00:00Z"),
            owned("d3", BackupPhase::Succeeded, "2026-12-03T03:00:00Z"),
            owned("d4", BackupPhase::Succeeded, "2026-12-04T03:00:00Z"),
            owned("d5", BackupPhase::Failed, "2026-12-05T03:00:00Z"),
        ];
        let p = plan(&daily, false, 2, at("2026-12-05T03:00:00Z"), at("2026-12-05T04:00:00Z"), &backups);
        assert_eq!(p.delete, ["d1", "d2"], "oldest first; d5 failed after the newest success and stays");
        let p = plan(&daily, false, 7, at("2026-12-05T03:00:00Z"), at("2026-12-05T04:00:00Z"), &backups);
        assert_eq!(p.delete, ["d2"]);
        assert_eq!(backup_name("nightly", at("2026-12-03T03:00:00Z")), "nightly-20261203t030000z");
    }
}
