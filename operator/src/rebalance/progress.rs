//! Stalled, not stuck (pure): what holds a cluster back from its spec ([`Blocker`]) and whether it
//! has been held back too long ([`waiting_since`], [`is_stalled`]).
//!
//! Every step describes what the cluster waits on. The status keeps that description
//! ([`Blocker::marker`]) and when it was first seen; the same description past the progress
//! deadline means nothing has moved since, so the cluster is *stalled* and the blocker says by
//! what. Progress changes the description: another pod to wait for, another rebalance phase, more
//! keys moved. A paused cluster, or one with nothing to wait for, has no blocker and never stalls.

use super::plan::{Pod, Step, Target};
use kvs_api::{ClusterStatus, RebalancePhase};
use std::time::Duration;

/// What the cluster waits on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocker {
    /// These pods are not ready (or are being replaced or restarted).
    Pods(Vec<BlockedPod>),
    /// The nodes are moving data to the view of `epoch`.
    ViewChange { epoch: u64, phase: RebalancePhase, moved_keys: u64, total_keys: u64, error: Option<String> },
    /// The view change to `members` nodes at `replication_factor` is posted but not done.
    ChangeView { members: usize, replication_factor: u32 },
    /// The backend is to run `replicas` pods.
    Scale { replicas: u32 },
}

/// A pod the cluster waits on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockedPod {
    pub ordinal: u32,
    /// Its machine or volume is gone (it cannot come back as it was).
    pub unschedulable: bool,
    /// Why it is not ready, as the backend says, if known.
    pub trouble: Option<String>,
    /// Whether it exists, is going away or runs (each a wait of its own: see [`Blocker::marker`]).
    pub presence: Presence,
}

/// Where a blocked pod is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    /// No pod object: the StatefulSet has yet to create it (after a restart, once the old pod
    /// is gone).
    Missing,
    /// Being deleted: it drains and exits within its grace period.
    Stopping,
    /// It exists and is not ready.
    Present,
}

impl Blocker {
    /// What the cluster waits on, given the step planned and what was observed; `None` when it
    /// waits on nothing (in sync, or paused).
    pub fn of(step: &Step, target: &Target, pods: &[Pod], nodes: Option<&ClusterStatus>) -> Option<Blocker> {
        if let Some(n) = nodes.filter(|n| n.pending_epoch.is_some()) {
            let r = &n.rebalance;
            return Some(Blocker::ViewChange {
                epoch: n.pending_epoch.unwrap_or(r.epoch),
                phase: r.phase,
                moved_keys: r.moved_keys,
                total_keys: r.total_keys,
                error: r.error.clone(),
            });
        }
        let blocked = |ordinals: &mut dyn Iterator<Item = u32>| {
            Blocker::Pods(
                ordinals
                    .map(|ordinal| {
                        let pod = pods.iter().find(|p| p.ordinal == ordinal);
                        BlockedPod {
                            ordinal,
                            unschedulable: pod.is_some_and(|p| p.unschedulable_for.is_some()),
                            trouble: pod.and_then(|p| p.trouble.clone()),
                            presence: match pod {
                                None => Presence::Missing,
                                Some(p) if p.terminating => Presence::Stopping,
                                Some(_) => Presence::Present,
                            },
                        }
                    })
                    .collect(),
            )
        };
        match step {
            Step::ScaleStatefulSet { replicas } => Some(Blocker::Scale { replicas: *replicas }),
            Step::WaitForPods { ordinals } => Some(blocked(&mut ordinals.iter().copied())),
            Step::ReplaceMember { ordinal } | Step::RestartPod { ordinal } => {
                Some(blocked(&mut std::iter::once(*ordinal)))
            }
            Step::ChangeView { members, replication_factor, .. } => {
                Some(Blocker::ChangeView { members: members.len(), replication_factor: *replication_factor })
            }
            // Not a wait: the Degraded condition says what is refused and why.
            Step::Paused { .. } | Step::Refused { .. } => None,
            // In sync as far as the planner goes, but a member may be down: the cluster still
            // waits for it (Kubernetes restarts it, or a person must act).
            Step::Done => {
                let mut down =
                    (0..target.replicas).filter(|&o| pods.iter().find(|p| p.ordinal == o).is_none_or(|p| !p.ready));
                let first = down.next()?;
                Some(blocked(&mut std::iter::once(first).chain(down)))
            }
        }
    }

    /// A stable description: equal from one step to the next exactly when nothing has moved.
    /// `pod_name` names a pod by its ordinal.
    pub fn marker(&self, pod_name: &dyn Fn(u32) -> String) -> String {
        match self {
            Blocker::Pods(pods) => {
                // A pod going away, its absence and its replacement are three waits: the stop is
                // bounded by the grace period, the StatefulSet creates the replacement once the old
                // pod is gone, and the replacement's deadline counts from when it exists.
                let names: Vec<String> = pods
                    .iter()
                    .map(|p| match p.presence {
                        Presence::Missing => format!("{} (missing)", pod_name(p.ordinal)),
                        Presence::Stopping => format!("{} (stopping)", pod_name(p.ordinal)),
                        Presence::Present => pod_name(p.ordinal),
                    })
                    .collect();
                format!("pods {} to be ready", names.join(", "))
            }
            Blocker::ViewChange { epoch, phase, moved_keys, total_keys, .. } => {
                format!("view change to epoch {epoch}: {phase}, {moved_keys}/{total_keys} keys moved")
            }
            Blocker::ChangeView { members, replication_factor } => {
                format!("a view of {members} nodes at replicationFactor {replication_factor}")
            }
            Blocker::Scale { replicas } => format!("the StatefulSet to run {replicas} pods"),
        }
    }

    /// The object that blocks, as `kubectl` names it (`status.blockedBy`): a pod, the view change,
    /// the StatefulSet.
    pub fn blocked_by(&self, pod_name: &dyn Fn(u32) -> String) -> String {
        match self {
            Blocker::Pods(pods) => {
                pods.iter().map(|p| format!("pod/{}", pod_name(p.ordinal))).collect::<Vec<_>>().join(",")
            }
            Blocker::ViewChange { epoch, .. } => format!("viewchange/epoch-{epoch}"),
            Blocker::ChangeView { .. } => "viewchange".into(),
            Blocker::Scale { .. } => "statefulset".into(),
        }
    }

    /// The Stalled condition's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Blocker::Pods(pods) if pods.iter().any(|p| p.unschedulable) => "PodUnschedulable",
            Blocker::Pods(_) => "PodNotReady",
            Blocker::ViewChange { .. } | Blocker::ChangeView { .. } => "ViewChangeNotProgressing",
            Blocker::Scale { .. } => "ScaleNotDone",
        }
    }

    /// For people: what blocks, why if known, and what to do. `auto_replace`: whether the
    /// operator replaces unschedulable members by itself.
    pub fn explain(&self, pod_name: &dyn Fn(u32) -> String, auto_replace: bool) -> String {
        match self {
            Blocker::Pods(pods) => {
                let each: Vec<String> = pods
                    .iter()
                    .map(|p| {
                        let name = pod_name(p.ordinal);
                        match (p.unschedulable, p.presence, &p.trouble) {
                            (true, _, _) if auto_replace => format!(
                                "pod {name} is unschedulable (its machine or volume is gone); it is replaced once \
                                 its partition's other replicas are ready and in sync"
                            ),
                            (true, _, _) => format!(
                                "pod {name} is unschedulable (its machine or volume is gone) and autoReplace is \
                                 off: replace it by hand (docs/operations.md, \"Stalled: PodUnschedulable\")"
                            ),
                            (false, Presence::Stopping, _) => format!(
                                "pod {name} is stopping (it drains, then exits within its \
                                 terminationGracePeriodSeconds)"
                            ),
                            (false, Presence::Missing, _) => format!(
                                "pod {name} does not exist (the StatefulSet creates it; its events say why it does \
                                 not)"
                            ),
                            (false, Presence::Present, Some(trouble)) => format!("pod {name} is not ready: {trouble}"),
                            (false, Presence::Present, None) => format!("pod {name} is not ready"),
                        }
                    })
                    .collect();
                each.join("; ")
            }
            Blocker::ViewChange { epoch, phase, moved_keys, total_keys, error } => {
                let mut s =
                    format!("the view change to epoch {epoch} has not moved ({phase}, {moved_keys}/{total_keys} keys)");
                if let Some(e) = error {
                    s.push_str(&format!(": {e}"));
                }
                s
            }
            Blocker::ChangeView { members, replication_factor } => format!(
                "the view change to {members} nodes at replicationFactor {replication_factor} does not complete (see \
                 the ViewChangeFailed events)"
            ),
            Blocker::Scale { replicas } => format!("the StatefulSet does not reach {replicas} pods"),
        }
    }
}

/// When the wait on `marker` began: `previous_since` if the previous step waited on the same
/// thing, else `now`.
pub fn waiting_since<'a>(previous: Option<(&str, &'a str)>, marker: &str, now: &'a str) -> &'a str {
    match previous {
        Some((was, since)) if was == marker => since,
        _ => now,
    }
}

/// Whether a wait of `waited` has gone past `deadline`.
pub fn is_stalled(waited: Duration, deadline: Duration) -> bool {
    waited >= deadline
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(o: u32) -> String {
        format!("demo-{o}")
    }

    fn pods(n: u32, ready: u32) -> Vec<Pod> {
        (0..n).map(|o| Pod::new(o, format!("kv-{o}"), format!("a{o}"), o < ready)).collect()
    }

    const FOUR: Target = Target { replicas: 4, replication_factor: 2 };

    #[test]
    fn a_pod_that_never_becomes_ready_keeps_the_same_marker_and_names_its_trouble() {
        let mut ps = pods(4, 3);
        ps[3].trouble = Some("ImagePullBackOff: no image kvstore/kvs-node:broken".into());
        let step = Step::WaitForPods { ordinals: vec![3] };
        let b = Blocker::of(&step, &FOUR, &ps, None).unwrap();
        assert_eq!(b.marker(&name), "pods demo-3 to be ready");
        assert_eq!(b.blocked_by(&name), "pod/demo-3");
        assert_eq!(b.reason(), "PodNotReady");
        assert!(b.explain(&name, true).contains("ImagePullBackOff"));
        // A member down while the plan is done is waited on too.
        let b = Blocker::of(&Step::Done, &FOUR, &ps, None).unwrap();
        assert_eq!(b.marker(&name), "pods demo-3 to be ready");
        assert_eq!(Blocker::of(&Step::Done, &FOUR, &pods(4, 4), None), None);
        let paused = Step::Paused { next: Box::new(Step::ScaleStatefulSet { replicas: 6 }) };
        assert_eq!(Blocker::of(&paused, &FOUR, &ps, None), None);
    }

    #[test]
    fn a_stopping_pod_its_absence_and_its_replacement_are_three_waits() {
        let mut ps = pods(4, 3);
        ps[3].terminating = true;
        let step = Step::RestartPod { ordinal: 3 };
        let stopping = Blocker::of(&step, &FOUR, &ps, None).unwrap();
        assert!(stopping.explain(&name, true).contains("is stopping"), "{}", stopping.explain(&name, true));
        let gone: Vec<Pod> = ps[..3].to_vec();
        let missing = Blocker::of(&step, &FOUR, &gone, None).unwrap();
        assert!(missing.explain(&name, true).contains("does not exist"), "{}", missing.explain(&name, true));
        ps[3] = Pod::new(3, "kv-3".into(), "a3".into(), false);
        ps[3].trouble = Some("ImagePullBackOff".into());
        let replacement = Blocker::of(&step, &FOUR, &ps, None).unwrap();
        let markers = [stopping.marker(&name), missing.marker(&name), replacement.marker(&name)];
        assert!(markers[0] != markers[1] && markers[1] != markers[2], "each wait has its own deadline: {markers:?}");
        assert_eq!(replacement.blocked_by(&name), stopping.blocked_by(&name));
        assert!(replacement.explain(&name, true).contains("ImagePullBackOff"));
    }

    #[test]
    fn an_unschedulable_pod_says_whether_it_will_be_replaced() {
        let mut ps = pods(4, 3);
        ps[3].unschedulable_for = Some(Duration::from_secs(5));
        let b = Blocker::of(&Step::Done, &FOUR, &ps, None).unwrap();
        assert_eq!(b.reason(), "PodUnschedulable");
        assert!(b.explain(&name, true).contains("it is replaced once"));
        assert!(b.explain(&name, false).contains("autoReplace is off"));
    }

    #[test]
    fn moving_keys_is_progress_and_the_deadline_counts_from_the_last_change() {
        let mut nodes = ClusterStatus {
            node: "kv-0".into(),
            layout: None,
            pending_epoch: Some(5),
            partitions: vec![],
            rebalance: kvs_api::RebalanceProgress {
                epoch: 5,
                phase: RebalancePhase::Transferring,
                moved_keys: 10,
                total_keys: 100,
                ..Default::default()
            },
        };
        let marker = |n: &ClusterStatus| Blocker::of(&Step::Done, &FOUR, &pods(4, 4), Some(n)).unwrap().marker(&name);
        let first = marker(&nodes);
        nodes.rebalance.moved_keys = 20;
        let second = marker(&nodes);
        assert_ne!(first, second);
        assert_eq!(waiting_since(Some((&first, "T0")), &first, "T9"), "T0");
        assert_eq!(waiting_since(Some((&first, "T0")), &second, "T9"), "T9");
        assert_eq!(waiting_since(None, &first, "T9"), "T9");
        assert!(!is_stalled(Duration::from_secs(599), Duration::from_secs(600)));
        assert!(is_stalled(Duration::from_secs(600), Duration::from_secs(600)));
    }
}
