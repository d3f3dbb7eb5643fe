//! The rebalance driver: one step towards a [`Target`] against a [`Backend`] that runs the node
//! "pods". Kubernetes and the local mode run the same [`Driver::step`]; they differ only in their
//! `Backend` and in what they make of the [`StepReport`] (the controller: Events, status, metrics
//! and a requeue; the local mode: printed progress lines).
//!
//! A step: observe (pods, their readiness, the view the nodes report), [`plan`], then do what the
//! plan says. Invariants:
//! - **Only the view change in flight is remembered.** Everything else is observed again at every
//!   step, so a driver restarted at any point (a fresh [`Driver`]) simply observes and continues.
//! - **One view change at a time.** While the one this driver posted runs, or while the nodes
//!   report one in progress (perhaps posted before a restart), a step waits instead of acting.
//! - **An observation made while our change ran is never acted on** (it may predate the post):
//!   whether the change still runs is decided before observing.
//! - **A finished change is reported once**, by the first step that completes after it finished;
//!   a step that cannot observe changes nothing and leaves it for the next.

use super::admin::{NodeAdmin, ViewChangeTask};
use super::capacity::{self, CapacityPlan, Refusal};
use super::plan::{Pod, Policy, Step, Target, plan};
use kvs_api::ClusterStatus;
use std::sync::Arc;

/// Where node pods run.
#[async_trait::async_trait]
pub trait Backend: Send {
    /// How many pods the backend is set to run (the StatefulSet's replicas).
    fn replicas(&self) -> u32;
    /// Sets the number of pods (highest ordinals are added or removed).
    async fn set_replicas(&mut self, replicas: u32, target: &Target) -> anyhow::Result<()>;
    /// The pods that exist, with identity and readiness.
    async fn pods(&mut self) -> anyhow::Result<Vec<Pod>>;
    /// Restarts the pod at `ordinal` on the current template, keeping its identity and volume.
    async fn restart_pod(&mut self, ordinal: u32) -> anyhow::Result<()>;
    /// Gives the pod at `ordinal` a fresh, empty volume under the same identity (in Kubernetes:
    /// deletes its volume claims and the pod; the StatefulSet creates both again).
    async fn replace_pod(&mut self, ordinal: u32) -> anyhow::Result<()>;
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
    /// For a view change that leaves fewer partitions: what each node would hold.
    pub capacity: Option<CapacityPlan>,
}

impl Observation {
    /// The cluster runs as its spec says: nothing left to do, every pod ready, and the nodes on a
    /// view with no change under way (what a restore waits for).
    pub fn settled(&self) -> bool {
        self.step == Step::Done
            && !self.changing
            && self.pods.iter().all(|p| p.ready)
            && self.status.as_ref().is_some_and(|s| s.layout.is_some())
    }
}

/// Observes the pods and the view and plans the next step towards `target` under `policy`.
pub async fn observe(
    backend: &mut dyn Backend,
    admin: &dyn NodeAdmin,
    target: &Target,
    policy: &Policy,
) -> anyhow::Result<Observation> {
    let pods = backend.pods().await?;
    let status = admin.status(&pods).await;
    let mut step = plan(target, policy, backend.replicas(), &pods, status.as_ref());
    let changing = status.as_ref().is_some_and(|s| s.pending_epoch.is_some());
    let mut capacity = None;
    let view = status.as_ref().and_then(|s| s.layout.as_ref());
    if let (Step::ChangeView { members, replication_factor, .. }, Some(view)) = (&step, view) {
        let (n, k) = (members.len() as u32, *replication_factor);
        if capacity::shrinks(view, n, k) {
            let usage = admin.usage(&pods).await;
            match capacity::preview(view, &usage, n, k, policy.volume_bytes) {
                Ok(plan) if plan.fits() => capacity = Some(plan),
                Ok(plan) => {
                    capacity = Some(plan.clone());
                    step = Step::Refused { refusal: Refusal::DoesNotFit(plan) };
                }
                Err(why) => step = Step::Refused { refusal: Refusal::Unmeasured(why) },
            }
        }
    }
    Ok(Observation { step, pods, status, changing, capacity })
}

/// What a step did about the plan.
#[derive(Debug)]
pub enum Action {
    /// Nothing to do now: the plan is to wait for pods, or the cluster is in sync.
    Nothing,
    /// A view change is moving data, so the step waited: `ours` when this driver posted it (it is
    /// still running), otherwise the nodes report one.
    AwaitViewChange { ours: bool },
    /// Set the pods from `from` to `to`.
    Scaled { from: u32, to: u32 },
    /// Setting the pods from `from` to `to` failed (the next step plans again).
    ScaleFailed { from: u32, to: u32, error: anyhow::Error },
    /// Posted a view change; it runs in the background and a later report carries its outcome.
    ViewChangeStarted { description: String },
    /// Restarted a pod so that it runs the current template.
    Restarted { ordinal: u32 },
    /// Gave a member whose pod could not come back a fresh volume under its identity.
    Replaced { ordinal: u32 },
    /// Restarting or replacing the pod at `ordinal` failed (the next step plans again).
    PodActionFailed { ordinal: u32, error: anyhow::Error },
}

/// A view change this driver posted that has finished.
#[derive(Debug)]
pub struct FinishedViewChange {
    /// What was asked (see [`ViewChangeTask::description`]).
    pub description: String,
    pub outcome: anyhow::Result<()>,
}

/// What one step observed and did, for the caller to report.
#[derive(Debug)]
pub struct StepReport {
    /// The view change this driver posted, if it finished since the previous step.
    pub finished: Option<FinishedViewChange>,
    pub observation: Observation,
    pub action: Action,
}

/// Why a step did nothing.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("observing the cluster: {0:#}")]
    Observe(anyhow::Error),
}

/// The driver of one cluster.
#[derive(Debug, Default)]
pub struct Driver {
    /// The view change this driver posted, until a step reports it finished.
    change: Option<ViewChangeTask>,
}

impl Driver {
    /// One step towards `target`: collect the view change that finished, observe, and (unless a
    /// view change is moving data) act on the plan.
    pub async fn step(
        &mut self,
        backend: &mut dyn Backend,
        admin: &Arc<dyn NodeAdmin>,
        target: &Target,
        policy: &Policy,
    ) -> Result<StepReport, StepError> {
        let ours_running = self.change.as_ref().is_some_and(|c| !c.is_finished());
        let observation = observe(backend, admin.as_ref(), target, policy).await.map_err(StepError::Observe)?;
        let finished = match self.change.take_if(|_| !ours_running) {
            // Finished, so awaiting it returns at once.
            Some(task) => {
                Some(FinishedViewChange { description: task.description.clone(), outcome: task.outcome().await })
            }
            None => None,
        };
        let action = if ours_running || observation.changing {
            Action::AwaitViewChange { ours: ours_running }
        } else {
            match &observation.step {
                Step::ScaleStatefulSet { replicas } => {
                    let (from, to) = (backend.replicas(), *replicas);
                    match backend.set_replicas(to, target).await {
                        Ok(()) => Action::Scaled { from, to },
                        Err(error) => Action::ScaleFailed { from, to, error },
                    }
                }
                Step::ChangeView { primary, members, replication_factor } => {
                    let task =
                        ViewChangeTask::start(admin.clone(), primary.clone(), members.clone(), *replication_factor);
                    let description = task.description.clone();
                    self.change = Some(task);
                    Action::ViewChangeStarted { description }
                }
                Step::RestartPod { ordinal } => match backend.restart_pod(*ordinal).await {
                    Ok(()) => Action::Restarted { ordinal: *ordinal },
                    Err(error) => Action::PodActionFailed { ordinal: *ordinal, error },
                },
                Step::ReplaceMember { ordinal } => match backend.replace_pod(*ordinal).await {
                    Ok(()) => Action::Replaced { ordinal: *ordinal },
                    Err(error) => Action::PodActionFailed { ordinal: *ordinal, error },
                },
                Step::WaitForPods { .. } | Step::Paused { .. } | Step::Refused { .. } | Step::Done => Action::Nothing,
            }
        };
        Ok(StepReport { finished, observation, action })
    }

    /// Stops waiting for the view change in flight, if any (the nodes finish it on their own).
    pub fn abandon(self) {
        if let Some(task) = self.change {
            task.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvs_api::Layout;
    use std::sync::Mutex;
    use tokio::sync::Notify;

    /// Pods that are ready as soon as they are added.
    #[derive(Default)]
    struct Pods {
        replicas: u32,
        unreachable: bool,
        refuse_scale: bool,
    }

    #[async_trait::async_trait]
    impl Backend for Pods {
        fn replicas(&self) -> u32 {
            self.replicas
        }

        async fn set_replicas(&mut self, replicas: u32, _target: &Target) -> anyhow::Result<()> {
            anyhow::ensure!(!self.refuse_scale, "the backend refused");
            self.replicas = replicas;
            Ok(())
        }

        async fn pods(&mut self) -> anyhow::Result<Vec<Pod>> {
            anyhow::ensure!(!self.unreachable, "the backend is unreachable");
            Ok((0..self.replicas).map(|o| Pod::new(o, id(o), id(o), true)).collect())
        }

        async fn restart_pod(&mut self, _ordinal: u32) -> anyhow::Result<()> {
            anyhow::bail!("not used here")
        }

        async fn replace_pod(&mut self, _ordinal: u32) -> anyhow::Result<()> {
            anyhow::bail!("not used here")
        }
    }

    /// Nodes whose view changes finish when the test releases them.
    #[derive(Default)]
    struct Nodes {
        status: Mutex<Option<ClusterStatus>>,
        posted: Mutex<Vec<Vec<String>>>,
        release: Notify,
    }

    #[async_trait::async_trait]
    impl NodeAdmin for Nodes {
        async fn status(&self, _pods: &[Pod]) -> Option<ClusterStatus> {
            self.status.lock().expect("not poisoned").clone()
        }

        async fn change_view(&self, _primary: &str, members: Vec<String>, _k: u32) -> anyhow::Result<()> {
            self.posted.lock().expect("not poisoned").push(members);
            self.release.notified().await;
            anyhow::bail!("409 Conflict")
        }

        async fn usage(&self, pods: &[Pod]) -> Vec<kvs_api::NodeUsage> {
            let usage = |p: &Pod| kvs_api::NodeUsage {
                node: p.identity.clone(),
                live_keys: 10,
                live_bytes: 1000,
                tombstones: 0,
            };
            pods.iter().map(usage).collect()
        }
    }

    fn id(o: u32) -> String {
        format!("n{o}")
    }

    fn view(members: u32, pending: bool) -> ClusterStatus {
        ClusterStatus {
            node: id(0),
            layout: Some(Layout {
                epoch: 1,
                replication_factor: 1,
                partitions: (0..members).map(|o| vec![id(o)]).collect(),
                proxies: vec![],
            }),
            pending_epoch: pending.then_some(2),
            partitions: vec![],
            rebalance: Default::default(),
        }
    }

    const TARGET: Target = Target { replicas: 3, replication_factor: 1 };

    #[tokio::test]
    async fn a_step_scales_then_posts_one_view_change_and_reports_it_once() {
        let nodes = Arc::new(Nodes::default());
        *nodes.status.lock().unwrap() = Some(view(2, false));
        let admin: Arc<dyn NodeAdmin> = nodes.clone();
        let (mut pods, mut driver) = (Pods { replicas: 2, ..Pods::default() }, Driver::default());
        let r = driver.step(&mut pods, &admin, &TARGET, &Policy::default()).await.unwrap();
        assert!(matches!(r.action, Action::Scaled { from: 2, to: 3 }), "{r:?}");
        let r = driver.step(&mut pods, &admin, &TARGET, &Policy::default()).await.unwrap();
        assert!(matches!(r.action, Action::ViewChangeStarted { .. }), "{r:?}");
        // While it runs, steps wait and post nothing more.
        let r = driver.step(&mut pods, &admin, &TARGET, &Policy::default()).await.unwrap();
        assert!(matches!(r.action, Action::AwaitViewChange { ours: true }) && r.finished.is_none(), "{r:?}");
        nodes.release.notify_one();
        while driver.change.as_ref().is_some_and(|c| !c.is_finished()) {
            tokio::task::yield_now().await;
        }
        // Finished (refused): reported once, and the view being still wrong, posted again.
        let r = driver.step(&mut pods, &admin, &TARGET, &Policy::default()).await.unwrap();
        let finished = r.finished.as_ref().expect("the finished change is reported");
        assert!(finished.outcome.as_ref().unwrap_err().to_string().contains("409"));
        assert!(matches!(r.action, Action::ViewChangeStarted { .. }), "{r:?}");
        // The second post runs in its own task: let it start.
        while nodes.posted.lock().unwrap().len() < 2 {
            tokio::task::yield_now().await;
        }
        let posted = nodes.posted.lock().unwrap().clone();
        assert_eq!(posted, [vec![id(0), id(1), id(2)], vec![id(0), id(1), id(2)]]);
    }

    #[tokio::test]
    async fn a_change_found_on_the_nodes_is_waited_for() {
        let nodes = Arc::new(Nodes::default());
        *nodes.status.lock().unwrap() = Some(view(2, true));
        let admin: Arc<dyn NodeAdmin> = nodes.clone();
        let mut pods = Pods { replicas: 3, ..Pods::default() };
        let r = Driver::default().step(&mut pods, &admin, &TARGET, &Policy::default()).await.unwrap();
        assert!(matches!(r.action, Action::AwaitViewChange { ours: false }), "{r:?}");
        assert!(matches!(r.observation.step, Step::ChangeView { .. }) && r.observation.changing);
        assert!(nodes.posted.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_failed_observation_keeps_the_finished_change_and_a_failed_scale_is_reported() {
        let nodes = Arc::new(Nodes::default());
        *nodes.status.lock().unwrap() = Some(view(3, false));
        let admin: Arc<dyn NodeAdmin> = nodes.clone();
        let (mut pods, mut driver) = (Pods { replicas: 3, ..Pods::default() }, Driver::default());
        let two = Target { replicas: 2, replication_factor: 1 };
        let r = driver.step(&mut pods, &admin, &two, &Policy::default()).await.unwrap();
        assert!(matches!(r.action, Action::ViewChangeStarted { .. }), "{r:?}");
        nodes.release.notify_one();
        while driver.change.as_ref().is_some_and(|c| !c.is_finished()) {
            tokio::task::yield_now().await;
        }
        pods.unreachable = true;
        let e = driver.step(&mut pods, &admin, &two, &Policy::default()).await.unwrap_err();
        assert!(e.to_string().contains("unreachable"), "{e}");
        // The next step that observes reports the change; the view being right, it shrinks the pods.
        (pods.unreachable, pods.refuse_scale) = (false, true);
        *nodes.status.lock().unwrap() = Some(view(2, false));
        let r = driver.step(&mut pods, &admin, &two, &Policy::default()).await.unwrap();
        assert!(r.finished.as_ref().is_some_and(|f| f.outcome.is_err()));
        assert!(matches!(r.action, Action::ScaleFailed { from: 3, to: 2, .. }), "{r:?}");
        pods.refuse_scale = false;
        let r = driver.step(&mut pods, &admin, &two, &Policy::default()).await.unwrap();
        assert!(r.finished.is_none() && matches!(r.action, Action::Scaled { from: 3, to: 2 }), "{r:?}");
        assert_eq!(nodes.posted.lock().unwrap().len(), 1);
    }
}
