//! The `KVStoreCluster` controller: a reconcile pipeline `validate → build → apply → rebalance →
//! status`. The pure steps ([`validate`], [`build`], [`status`], and the planner in
//! [`crate::rebalance`]) are unit-tested without a cluster; [`apply`] is the Kubernetes I/O; the
//! rebalance step is the shared [`Driver`] with the StatefulSet as its backend; this module wires
//! them into a kube-rs `Controller` and turns each step's report into Events, status and metrics.
//!
//! Invariants:
//! - **The truth is read, not remembered.** Every reconcile observes the StatefulSet, the pods and
//!   the view the nodes report, then takes the one next step the planner gives. An operator
//!   restarted at any point (even mid-rebalance) observes again and finishes or safely redoes the
//!   step; a view change found running on the nodes is waited for, never posted twice.
//! - **Data moves before pods go.** Scale-in posts the smaller view first; the StatefulSet shrinks
//!   only once the view no longer contains the leaving pods (see [`crate::rebalance::plan()`]).
//! - **One view change per cluster at a time**, tracked by the cluster's [`Driver`] in
//!   [`Context`]; it runs in the background while reconciles keep publishing its progress to the
//!   status.

pub mod apply;
pub mod build;
pub mod certs;
pub mod status;
pub mod tls;
pub mod validate;

use crate::crd::{KVStoreCluster, KVStoreClusterStatus, RestorePhase, RestoreStatus};
use crate::metrics::Metrics;
use crate::rebalance::{self, Driver, NodeAdmin, Step, StepError, Target};
use apply::KubeBackend;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod as KubePod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use status::{Activity, Observed};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Finalizer on every `KVStoreCluster`: its children are deleted before it goes.
pub const FINALIZER: &str = "kvstore.dev/cleanup";

/// How often a cluster is looked at while something moves, and when it is in sync.
const BUSY_REQUEUE: Duration = Duration::from_secs(2);
const IDLE_REQUEUE: Duration = Duration::from_secs(60);

/// Why a reconcile failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Step(#[from] StepError),
    #[error("setting the StatefulSet to {replicas} pods: {error:#}")]
    Scale { replicas: u32, error: anyhow::Error },
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("KVStoreCluster {0} has no namespace")]
    NotNamespaced(String),
    #[error("spec.tls: {0}")]
    Tls(#[from] tls::TlsError),
}

/// Builds the node admin client for a cluster, given its token and how to reach its nodes (plain
/// HTTP, or TLS with the cluster's CA).
pub type AdminFactory = Arc<dyn Fn(Option<String>, kvs_api::ClientTls) -> Arc<dyn NodeAdmin> + Send + Sync>;

/// State shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub admin_for: AdminFactory,
    /// Each cluster's rebalance driver (the view change it has in flight), by `namespace/name`.
    /// `std` lock: never held across `.await` (a reconcile takes its driver out for the step).
    drivers: Mutex<HashMap<String, Driver>>,
    /// Consecutive failed reconciles, by `namespace/name` (for backoff).
    failures: Mutex<HashMap<String, u32>>,
    /// The restores (`spec.restoreFrom`) this process runs.
    restores: crate::backup::access::Runs,
}

impl Context {
    pub fn new(client: Client, reporter: Reporter, metrics: Arc<Metrics>, admin_for: AdminFactory) -> Self {
        let recorder = Recorder::new(client.clone(), reporter);
        Context {
            client,
            recorder,
            metrics,
            admin_for,
            drivers: Mutex::default(),
            failures: Mutex::default(),
            restores: Default::default(),
        }
    }
}

fn key(c: &KVStoreCluster) -> String {
    format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reconciles one cluster (wrapped in the finalizer: apply, or clean up when deleted).
pub async fn reconcile(cluster: Arc<KVStoreCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = cluster.namespace().ok_or_else(|| Error::NotNamespaced(cluster.name_any()))?;
    let api: Api<KVStoreCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, cluster.clone(), |event| async {
        match event {
            Finalizer::Apply(c) => reconcile_apply(&c, &ctx).await,
            Finalizer::Cleanup(c) => cleanup(&c, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
    ctx.metrics.count_reconcile(result.is_ok());
    if result.is_ok() {
        lock(&ctx.failures).remove(&key(&cluster));
    }
    result
}

/// Retries a failed reconcile with exponential backoff (1 s, 2 s, ... up to 5 min).
pub fn error_policy(cluster: Arc<KVStoreCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = {
        let mut all = lock(&ctx.failures);
        let n = all.entry(key(&cluster)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(failures);
    tracing::warn!(cluster = %key(&cluster), error = %error, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The delay after `failures` consecutive failures.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

async fn publish(ctx: &Context, cluster: &KVStoreCluster, type_: EventType, reason: &str, note: String) {
    apply::publish_event(&ctx.recorder, cluster, type_, reason, note).await;
}

async fn reconcile_apply(cluster: &KVStoreCluster, ctx: &Context) -> Result<Action, Error> {
    let generation = cluster.metadata.generation.unwrap_or_default();
    let valid = match validate::validate_cluster(cluster) {
        Ok(valid) => valid,
        Err(invalid) => {
            let already_said = cluster
                .status
                .as_ref()
                .is_some_and(|s| s.phase == kvs_api::ClusterPhase::Failed && s.observed_generation == generation);
            if !already_said {
                publish(ctx, cluster, EventType::Warning, "InvalidSpec", invalid.to_string()).await;
            }
            let activity = Activity::Invalid(invalid.to_string());
            let restore = cluster.status.as_ref().and_then(|s| s.restore.clone());
            write_status(cluster, ctx, &activity, None, None, restore.as_ref()).await?;
            // Nothing to do until the spec changes.
            return Ok(Action::await_change());
        }
    };
    let token = apply::ensure_token(&ctx.client, &valid).await?;
    let node_tls = match valid.spec.tls {
        true => {
            let certificates = match tls::ensure(&ctx.client, &valid).await {
                Ok(certificates) => certificates,
                Err(e) => {
                    // Said where `kubectl describe` shows it (a broken CA Secret names the fix).
                    publish(ctx, cluster, EventType::Warning, "CertificatesFailed", e.to_string()).await;
                    return Err(e.into());
                }
            };
            if !certificates.issued.is_empty() {
                let issued: Vec<String> =
                    certificates.issued.iter().map(|(pod, why)| format!("{pod} ({})", why.describe())).collect();
                let note = format!("issued TLS certificates: {}", issued.join(", "));
                publish(ctx, cluster, EventType::Normal, "CertificatesIssued", note).await;
            }
            certificates.client
        }
        false => kvs_api::ClientTls::plain(),
    };
    let admin = (ctx.admin_for)(Some(token), node_tls.clone());
    let mut backend = KubeBackend::apply_children(&ctx.client, &valid, &node_tls).await?;

    // The cluster's driver is taken out for the step (the lock is not held across `.await`) and
    // put back whatever the outcome: it holds the view change in flight. The controller never
    // reconciles one object twice at once, so nobody else wants it meanwhile.
    let mut driver = lock(&ctx.drivers).remove(&key(cluster)).unwrap_or_default();
    let stepped = driver.step(&mut backend, &admin, &valid.spec.target, &valid.spec.policy).await;
    lock(&ctx.drivers).insert(key(cluster), driver);
    let report = stepped.map_err(Error::Step)?;

    if let Some(finished) = report.finished {
        ctx.metrics.count_view_change(finished.outcome.is_ok());
        let description = finished.description;
        match finished.outcome {
            Ok(()) => {
                let note = format!("data moved to a view of {description}");
                publish(ctx, cluster, EventType::Normal, "ViewChanged", note).await
            }
            Err(e) => {
                let note = format!("view change to {description} failed: {e:#}");
                publish(ctx, cluster, EventType::Warning, "ViewChangeFailed", note).await
            }
        }
    }
    let observation = report.observation;
    let activity = match &report.action {
        rebalance::Action::AwaitViewChange { .. } => Activity::MovingData,
        _ => Activity::Step(observation.step.clone()),
    };
    match report.action {
        rebalance::Action::Scaled { from, to } => {
            let verb = if to > from { "adding pods" } else { "removing pods whose data has moved" };
            let note = format!("StatefulSet {from} → {to} pods ({verb})");
            publish(ctx, cluster, EventType::Normal, "Scaling", note).await;
        }
        rebalance::Action::ScaleFailed { to, error, .. } => return Err(Error::Scale { replicas: to, error }),
        rebalance::Action::ViewChangeStarted { description } => {
            let note = format!("moving data to a view of {description}");
            publish(ctx, cluster, EventType::Normal, "ViewChange", note).await;
            tracing::info!(cluster = %key(cluster), view = %description, "posting a view change");
        }
        rebalance::Action::Restarted { ordinal } => {
            let note = format!("restarted pod {}-{ordinal} on the current template (one at a time)", valid.name);
            publish(ctx, cluster, EventType::Normal, "RollingPod", note).await;
        }
        rebalance::Action::Replaced { ordinal } => {
            let note = format!(
                "member {}-{ordinal} could not come back: deleted its volume claim and pod; it re-syncs from its \
                 partition on a fresh volume",
                valid.name
            );
            publish(ctx, cluster, EventType::Warning, "MemberReplaced", note).await;
        }
        rebalance::Action::PodActionFailed { ordinal, error } => {
            let note = format!("pod {}-{ordinal}: {error:#}", valid.name);
            publish(ctx, cluster, EventType::Warning, "PodActionFailed", note).await;
        }
        rebalance::Action::AwaitViewChange { .. } | rebalance::Action::Nothing => {}
    }
    // A restore asked for (spec.restoreFrom) runs once the cluster runs as its spec says.
    let restore = match &cluster.spec.restore_from {
        Some(source) => {
            let settled = activity == Activity::Step(Step::Done) && observation.settled();
            let runs = &ctx.restores;
            Some(crate::backup::restore::step(&ctx.client, &ctx.recorder, runs, cluster, source, settled).await?)
        }
        None => None,
    };
    let restoring = restore.as_ref().is_some_and(|r| matches!(r.phase, RestorePhase::Pending | RestorePhase::Running));
    let deadline = Some((valid.spec.progress_deadline, valid.spec.policy.auto_replace));
    let spec = Some((&valid.spec.target, deadline));
    let new_status = write_status(cluster, ctx, &activity, spec, Some(&observation), restore.as_ref()).await?;
    announce_stall(ctx, cluster, &new_status).await;
    // Something to wait on (even with nothing to do) is looked at often, so a stall is seen soon
    // after its deadline.
    Ok(match activity {
        Activity::Step(Step::Done | Step::Paused { .. }) if new_status.waiting_for.is_none() && !restoring => {
            Action::requeue(IDLE_REQUEUE)
        }
        _ => Action::requeue(BUSY_REQUEUE),
    })
}

/// A Warning Event when the cluster has just become Stalled (not at every reconcile while it is).
async fn announce_stall(ctx: &Context, cluster: &KVStoreCluster, new: &KVStoreClusterStatus) {
    let stalled = |s: &KVStoreClusterStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == kvs_api::ConditionType::Stalled && c.status == kvs_api::ConditionStatus::True)
            .cloned()
    };
    if let Some(now) = stalled(new)
        && cluster.status.as_ref().and_then(stalled).is_none()
    {
        publish(ctx, cluster, EventType::Warning, "Stalled", now.message).await;
    }
}

/// Computes and (if it changed) writes the status; returns it.
async fn write_status(
    cluster: &KVStoreCluster,
    ctx: &Context,
    activity: &Activity,
    spec: Option<(&Target, Option<(Duration, bool)>)>,
    observation: Option<&rebalance::Observation>,
    restore: Option<&RestoreStatus>,
) -> Result<KVStoreClusterStatus, Error> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let new: KVStoreClusterStatus = status::status(&Observed {
        generation: cluster.metadata.generation.unwrap_or_default(),
        target: spec.map(|s| s.0),
        activity,
        pods: observation.map_or(&[], |o| o.pods.as_slice()),
        nodes: observation.and_then(|o| o.status.as_ref()),
        capacity: observation.and_then(|o| o.capacity.as_ref()),
        selector: build::selector_string(&cluster.name_any()),
        name: &cluster.name_any(),
        deadline: spec.and_then(|s| s.1),
        now: &now,
        previous: cluster.status.as_ref(),
        restore,
    });
    ctx.metrics.observe_cluster(&cluster.namespace().unwrap_or_default(), &cluster.name_any(), &new);
    if cluster.status.as_ref() == Some(&new) {
        return Ok(new);
    }
    let namespace = cluster.namespace().unwrap_or_default();
    apply::apply_status::<KVStoreCluster>(&ctx.client, &namespace, &cluster.name_any(), &new).await?;
    Ok(new)
}

async fn cleanup(cluster: &KVStoreCluster, ctx: &Context) -> Result<Action, Error> {
    if let Some(driver) = lock(&ctx.drivers).remove(&key(cluster)) {
        driver.abandon();
    }
    let namespace = cluster.namespace().unwrap_or_else(|| "default".into());
    apply::delete_children(&ctx.client, &namespace, &cluster.name_any()).await?;
    ctx.metrics.forget_cluster(&cluster.namespace().unwrap_or_default(), &cluster.name_any());
    publish(
        ctx,
        cluster,
        EventType::Normal,
        "Deleted",
        "deleted the StatefulSet, Services, budget and token (volumes are kept)".into(),
    )
    .await;
    Ok(Action::await_change())
}

/// Runs the controller until `shutdown` completes: watches `KVStoreCluster`s (all namespaces, or
/// `namespace`), the StatefulSets, Services and PodDisruptionBudgets they own, and their node pods.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    use apply::api_in as api;
    let client = &ctx.client;
    // Only what the operator made: children of other controllers are none of its business.
    let ours = || watcher::Config::default().labels("app.kubernetes.io/managed-by=kvs-operator");
    let node_pods =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=kvs-operator,app.kubernetes.io/name=kvstore");
    Controller::new(api::<KVStoreCluster>(client, namespace), watcher::Config::default())
        // A changed or deleted child is put back at once, not at the next periodic reconcile.
        .owns::<StatefulSet>(api(client, namespace), ours())
        .owns::<Service>(api(client, namespace), ours())
        .owns::<PodDisruptionBudget>(api(client, namespace), ours())
        .watches(api::<KubePod>(client, namespace), node_pods, |pod: KubePod| {
            let cluster = pod.labels().get("app.kubernetes.io/instance").cloned();
            let namespace = pod.namespace();
            cluster.into_iter().map(move |name| {
                let r = ObjectRef::<KVStoreCluster>::new(&name);
                match &namespace {
                    Some(ns) => r.within(ns),
                    None => r,
                }
            })
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(cluster = %object, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error (retried)"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let delays: Vec<u64> = [1, 2, 3, 9, 10, 50].iter().map(|&n| backoff(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 256, 300, 300]);
    }
}
