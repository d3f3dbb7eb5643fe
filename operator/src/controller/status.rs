//! The `KVStoreCluster` status (pure): phase, conditions and rebalance progress computed from what
//! one reconcile observed. Conditions keep their `lastTransitionTime` while their status stays the
//! same, so `kubectl describe` shows when a cluster really became (un)available.

use crate::crd::{CapacityPlanStatus, Condition, KVStoreClusterStatus, RebalanceStatus, RestorePhase, RestoreStatus};
use crate::rebalance::progress::{is_stalled, waiting_since};
use crate::rebalance::{Blocker, CapacityPlan, Pod, Step, Target};
use k8s_openapi::jiff::Timestamp;
use kvs_api::{ClusterPhase, ClusterStatus, ConditionStatus, ConditionType};
use std::time::Duration;

/// What the controller is doing about the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Activity {
    /// The spec cannot be acted on; the message says what to fix.
    Invalid(String),
    /// The planner's next step (already started, if it is an action).
    Step(Step),
    /// A view change is moving data (started by this operator or found running on the nodes).
    MovingData,
}

/// Everything one reconcile observed.
pub struct Observed<'a> {
    pub generation: i64,
    /// What the spec asks for (`None` when it is invalid).
    pub target: Option<&'a Target>,
    pub activity: &'a Activity,
    pub pods: &'a [Pod],
    pub nodes: Option<&'a ClusterStatus>,
    /// For a change that leaves fewer partitions: what each node would hold.
    pub capacity: Option<&'a CapacityPlan>,
    pub selector: String,
    /// The cluster's name (pods are `<name>-<ordinal>`).
    pub name: &'a str,
    /// How long the cluster may wait on the same thing before it is stalled, and whether the
    /// operator replaces unschedulable members (`None` when the spec is invalid).
    pub deadline: Option<(Duration, bool)>,
    /// Now, RFC 3339.
    pub now: &'a str,
    pub previous: Option<&'a KVStoreClusterStatus>,
    /// The restore `spec.restoreFrom` asks for, where it stands (`None`: none asked for).
    pub restore: Option<&'a RestoreStatus>,
}

/// How long ago `since` (RFC 3339) was, seen from `now`; zero when either does not parse.
fn elapsed(since: &str, now: &str) -> Duration {
    match (since.parse::<Timestamp>(), now.parse::<Timestamp>()) {
        (Ok(a), Ok(b)) => Duration::from_millis(u64::try_from(b.as_millisecond() - a.as_millisecond()).unwrap_or(0)),
        _ => Duration::ZERO,
    }
}

/// The status to write.
pub fn status(o: &Observed) -> KVStoreClusterStatus {
    let layout = o.nodes.and_then(|n| n.layout.as_ref());
    let ready = |identity: &str| o.pods.iter().any(|p| p.identity == identity && p.ready);
    let ready_replicas = o.pods.iter().filter(|p| p.ready).count() as i32;
    let moving = matches!(o.activity, Activity::MovingData) || o.nodes.is_some_and(|n| n.pending_epoch.is_some());

    let available = match layout {
        None => cond(ConditionType::Available, false, "NoView", "no node reports a view yet".into()),
        Some(l) => match l.partitions.iter().position(|members| !members.iter().any(|m| ready(m))) {
            Some(p) => cond(
                ConditionType::Available,
                false,
                "PartitionUnavailable",
                format!("no replica of partition {p} is ready"),
            ),
            None => match o.restore.map(|r| (r.phase, r)) {
                // A cluster made from a backup is available once the backup is in place.
                Some((RestorePhase::Pending | RestorePhase::Running, r)) => cond(
                    ConditionType::Available,
                    false,
                    "Restoring",
                    format!(
                        "restoring {}: {}",
                        r.url,
                        r.progress.as_deref().or(r.message.as_deref()).unwrap_or("starting")
                    ),
                ),
                Some((RestorePhase::Failed, r)) => cond(
                    ConditionType::Available,
                    false,
                    "RestoreFailed",
                    format!(
                        "restoring {} failed: {}; fix spec.restoreFrom (a new url starts over) or remove it",
                        r.url,
                        r.message.as_deref().unwrap_or("no reason given")
                    ),
                ),
                Some((RestorePhase::Succeeded, _)) | None => cond(
                    ConditionType::Available,
                    true,
                    "AllPartitionsServing",
                    format!("{} partitions, each with a ready replica", l.partitions.len()),
                ),
            },
        },
    };
    let progressing = match o.activity {
        Activity::Invalid(msg) => cond(ConditionType::Progressing, false, "InvalidSpec", msg.clone()),
        _ if moving => cond(
            ConditionType::Progressing,
            true,
            "MovingData",
            "a view change is moving keys to their new owners".into(),
        ),
        Activity::Step(Step::ScaleStatefulSet { replicas }) => {
            cond(ConditionType::Progressing, true, "ScalingPods", format!("setting the StatefulSet to {replicas} pods"))
        }
        Activity::Step(Step::WaitForPods { ordinals }) => cond(
            ConditionType::Progressing,
            true,
            "WaitingForPods",
            format!("waiting for pods {ordinals:?} to be ready"),
        ),
        Activity::Step(Step::ChangeView { members, replication_factor, .. }) => cond(
            ConditionType::Progressing,
            true,
            "MovingData",
            format!("changing the view to {} nodes at replicationFactor {replication_factor}", members.len()),
        ),
        Activity::Step(Step::ReplaceMember { ordinal }) => cond(
            ConditionType::Progressing,
            true,
            "ReplacingMember",
            format!("giving member {}-{ordinal} a fresh volume (its pod could not come back)", o.name),
        ),
        Activity::Step(Step::RestartPod { ordinal }) => cond(
            ConditionType::Progressing,
            true,
            "RollingPods",
            format!("restarting pod {}-{ordinal} on the current template", o.name),
        ),
        Activity::Step(Step::Refused { refusal }) => {
            cond(ConditionType::Progressing, false, refusal.reason(), refusal.explain())
        }
        Activity::Step(Step::Paused { next }) => cond(
            ConditionType::Progressing,
            false,
            "Paused",
            format!("spec.paused is true; the next step would be: {}", describe(next, o.name)),
        ),
        Activity::Step(Step::Done) | Activity::MovingData => {
            cond(ConditionType::Progressing, false, "InSync", "the cluster matches the spec".into())
        }
    };
    let not_ready: Vec<&str> =
        layout.map(|l| l.members().filter(|m| !ready(m)).map(String::as_str).collect()).unwrap_or_default();
    let degraded = match (o.activity, o.target.and_then(Target::degraded)) {
        (Activity::Invalid(msg), _) => cond(ConditionType::Degraded, true, "InvalidSpec", msg.clone()),
        (Activity::Step(Step::Refused { refusal }), _) => {
            cond(ConditionType::Degraded, true, refusal.reason(), refusal.explain())
        }
        (_, Some(msg)) => cond(ConditionType::Degraded, true, "TooFewReplicas", msg),
        _ if !not_ready.is_empty() => cond(
            ConditionType::Degraded,
            true,
            "MembersNotReady",
            format!("members not ready: {}", not_ready.join(", ")),
        ),
        _ => cond(ConditionType::Degraded, false, "AllMembersReady", "every member of the view is ready".into()),
    };

    // What the cluster waits on, since when, and whether that is past the deadline.
    let pod_name = |ordinal: u32| format!("{}-{ordinal}", o.name);
    let blocker = match (o.activity, o.target) {
        (Activity::Step(step), Some(target)) => Blocker::of(step, target, o.pods, o.nodes),
        (Activity::MovingData, Some(target)) => Blocker::of(&Step::Done, target, o.pods, o.nodes),
        _ => None,
    };
    let waiting = blocker.as_ref().map(|b| {
        let marker = b.marker(&pod_name);
        let previous = o.previous.and_then(|p| Some((p.waiting_for.as_deref()?, p.waiting_since.as_deref()?)));
        let since = waiting_since(previous, &marker, o.now).to_owned();
        (marker, since)
    });
    let stall = match (&blocker, &waiting, o.deadline) {
        (Some(b), Some((_, since)), Some((deadline, auto_replace))) if is_stalled(elapsed(since, o.now), deadline) => {
            Some((b, auto_replace))
        }
        _ => None,
    };
    let stalled = match stall {
        Some((b, auto_replace)) => cond(
            ConditionType::Stalled,
            true,
            b.reason(),
            format!(
                "waiting since {}: {}",
                waiting.as_ref().map_or("", |w| w.1.as_str()),
                b.explain(&pod_name, auto_replace)
            ),
        ),
        None => cond(ConditionType::Stalled, false, "NotStalled", "no wait has outlasted the progress deadline".into()),
    };
    let paused = matches!(o.activity, Activity::Step(Step::Paused { .. }));

    let phase = if matches!(o.activity, Activity::Invalid(_) | Activity::Step(Step::Refused { .. })) {
        ClusterPhase::Failed
    } else if paused {
        ClusterPhase::Paused
    } else if layout.is_none() {
        ClusterPhase::Pending
    } else if progressing.status == ConditionStatus::True {
        ClusterPhase::Rebalancing
    } else if degraded.status == ConditionStatus::True {
        ClusterPhase::Degraded
    } else {
        ClusterPhase::Running
    };

    let rebalance = moving.then(|| o.nodes.map(|n| rebalance_status(&n.rebalance))).flatten();
    let conditions = [available, progressing, degraded, stalled]
        .into_iter()
        .map(|mut c| {
            c.observed_generation = o.generation;
            c.last_transition_time = o
                .previous
                .and_then(|p| p.conditions.iter().find(|old| old.type_ == c.type_ && old.status == c.status))
                .map_or_else(|| o.now.to_owned(), |old| old.last_transition_time.clone());
            c
        })
        .collect();
    KVStoreClusterStatus {
        observed_generation: o.generation,
        phase,
        conditions,
        ready_replicas,
        partitions: layout.map_or(0, |l| l.partitions.len() as i32),
        proxies: layout.map_or(0, |l| l.proxies.len() as i32),
        view_epoch: layout.map_or(0, |l| l.epoch as i64),
        members: layout.map(|l| l.members().cloned().collect()).unwrap_or_default(),
        rebalance,
        selector: o.selector.clone(),
        updated_replicas: o.pods.iter().filter(|p| p.current).count() as i32,
        blocked_by: stall.map(|(b, _)| b.blocked_by(&pod_name)),
        waiting_for: waiting.as_ref().map(|w| w.0.clone()),
        waiting_since: waiting.map(|w| w.1),
        capacity_plan: o.capacity.map(capacity_status),
        restore: o.restore.cloned(),
    }
}

fn capacity_status(p: &CapacityPlan) -> CapacityPlanStatus {
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    CapacityPlanStatus {
        members: p.members.into(),
        replication_factor: p.replication_factor.into(),
        partitions: p.partitions.into(),
        storing_nodes: p.storing_nodes.into(),
        total_keys: int(p.total_keys),
        total_bytes: int(p.total_bytes),
        per_node_keys: int(p.per_node_keys),
        per_node_bytes: int(p.per_node_bytes),
        needed_bytes: int(p.needed_bytes),
        volume_bytes: p.volume_bytes.map(int),
        fits: p.fits(),
        summary: p.summary(),
    }
}

/// A planned step in words, for the Paused condition.
fn describe(step: &Step, name: &str) -> String {
    match step {
        Step::ScaleStatefulSet { replicas } => format!("set the StatefulSet to {replicas} pods"),
        Step::WaitForPods { ordinals } => format!("wait for pods {ordinals:?}"),
        Step::ChangeView { members, replication_factor, .. } => {
            format!("change the view to {} nodes at replicationFactor {replication_factor}", members.len())
        }
        Step::ReplaceMember { ordinal } => format!("replace member {name}-{ordinal} (fresh volume)"),
        Step::RestartPod { ordinal } => format!("restart pod {name}-{ordinal} on the current template"),
        Step::Paused { next } => describe(next, name),
        Step::Refused { refusal } => refusal.explain(),
        Step::Done => "nothing".into(),
    }
}

fn cond(type_: ConditionType, status: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_,
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: String::new(),
        observed_generation: 0,
    }
}

/// The nodes' progress report as status.
pub fn rebalance_status(r: &kvs_api::RebalanceProgress) -> RebalanceStatus {
    let progress = match (r.moved_keys.min(r.total_keys) * 100).checked_div(r.total_keys) {
        Some(pct) => format!("{} {pct}% ({}/{} keys)", r.phase, r.moved_keys, r.total_keys),
        None => r.phase.to_string(),
    };
    RebalanceStatus {
        epoch: r.epoch as i64,
        phase: r.phase,
        moved_keys: r.moved_keys as i64,
        total_keys: r.total_keys as i64,
        progress,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvs_api::{Layout, RebalanceProgress};

    fn pods(n: u32, ready: u32) -> Vec<Pod> {
        (0..n).map(|o| Pod::new(o, format!("kv-{o}"), format!("a{o}"), o < ready)).collect()
    }

    fn nodes(members: u32, k: u32, pending: bool) -> ClusterStatus {
        let all: Vec<String> = (0..members).map(|o| format!("kv-{o}")).collect();
        let partitions: Vec<Vec<String>> =
            all.chunks(k as usize).filter(|c| c.len() == k as usize).map(|c| c.to_vec()).collect();
        let proxies = all[partitions.len() * k as usize..].to_vec();
        ClusterStatus {
            node: "kv-0".into(),
            layout: Some(Layout { epoch: 7, replication_factor: k, partitions, proxies }),
            pending_epoch: pending.then_some(8),
            partitions: vec![],
            rebalance: RebalanceProgress {
                epoch: 8,
                phase: kvs_api::RebalancePhase::Transferring,
                moved_keys: 250,
                total_keys: 1000,
                ..Default::default()
            },
        }
    }

    fn observe<'a>(
        activity: &'a Activity,
        pods: &'a [Pod],
        nodes: Option<&'a ClusterStatus>,
        target: &'a Target,
    ) -> Observed<'a> {
        Observed {
            generation: 3,
            target: Some(target),
            activity,
            pods,
            nodes,
            capacity: None,
            selector: "s".into(),
            name: "demo",
            deadline: Some((Duration::from_secs(600), true)),
            now: "T1",
            previous: None,
            restore: None,
        }
    }

    fn condition(s: &KVStoreClusterStatus, t: ConditionType) -> &Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    const SPEC: Target = Target { replicas: 5, replication_factor: 2 };

    #[test]
    fn a_cluster_in_sync_is_running_and_available() {
        let (ps, ns) = (pods(5, 5), nodes(5, 2, false));
        let s = status(&observe(&Activity::Step(Step::Done), &ps, Some(&ns), &SPEC));
        assert_eq!(
            (s.phase, s.partitions, s.proxies, s.view_epoch, s.ready_replicas),
            (ClusterPhase::Running, 2, 1, 7, 5)
        );
        assert_eq!(condition(&s, ConditionType::Available).status, ConditionStatus::True);
        assert_eq!(condition(&s, ConditionType::Progressing).reason, "InSync");
        assert_eq!(condition(&s, ConditionType::Degraded).status, ConditionStatus::False);
        assert_eq!((s.observed_generation, s.members.len(), s.rebalance.is_none()), (3, 5, true));
    }

    #[test]
    fn a_cluster_from_a_backup_is_available_only_once_the_backup_is_in_place() {
        let (ps, ns) = (pods(5, 5), nodes(5, 2, false));
        let activity = Activity::Step(Step::Done);
        let available = |phase: RestorePhase| {
            let r = RestoreStatus {
                url: "s3://b/1".into(),
                phase,
                progress: Some("restoring 5/10".into()),
                ..Default::default()
            };
            let s = status(&Observed { restore: Some(&r), ..observe(&activity, &ps, Some(&ns), &SPEC) });
            assert_eq!(s.restore.as_ref(), Some(&r), "the restore is reported");
            condition(&s, ConditionType::Available).clone()
        };
        for (phase, reason) in [
            (RestorePhase::Pending, "Restoring"),
            (RestorePhase::Running, "Restoring"),
            (RestorePhase::Failed, "RestoreFailed"),
        ] {
            let c = available(phase);
            assert_eq!((c.status, c.reason.as_str()), (ConditionStatus::False, reason), "{phase:?}");
            assert!(c.message.contains("s3://b/1"), "{}", c.message);
        }
        assert_eq!(available(RestorePhase::Succeeded).status, ConditionStatus::True);
    }

    #[test]
    fn a_view_change_reports_progress() {
        let (ps, ns) = (pods(5, 5), nodes(5, 2, true));
        // Found running on the nodes (e.g. after an operator restart), even though the plan is Done.
        let s = status(&observe(&Activity::Step(Step::Done), &ps, Some(&ns), &SPEC));
        assert_eq!(s.phase, ClusterPhase::Rebalancing);
        assert_eq!(condition(&s, ConditionType::Progressing).reason, "MovingData");
        assert_eq!(s.rebalance.unwrap().progress, "transferring 25% (250/1000 keys)");
    }

    #[test]
    fn missing_replicas_degrade_and_a_dead_partition_is_unavailable() {
        let ns = nodes(4, 2, false);
        // kv-3 down: partition 1 still has kv-2.
        let s = status(&observe(&Activity::Step(Step::Done), &pods(4, 3), Some(&ns), &SPEC));
        assert_eq!(
            (s.phase, condition(&s, ConditionType::Available).status),
            (ClusterPhase::Degraded, ConditionStatus::True)
        );
        assert!(condition(&s, ConditionType::Degraded).message.contains("kv-3"));
        // kv-2 and kv-3 down: partition 1 has nobody.
        let s = status(&observe(&Activity::Step(Step::Done), &pods(4, 2), Some(&ns), &SPEC));
        assert_eq!(condition(&s, ConditionType::Available).reason, "PartitionUnavailable");
    }

    #[test]
    fn invalid_and_too_small_specs_say_what_to_fix() {
        let ps = pods(1, 1);
        let invalid = Activity::Invalid("spec.storage.size \"lots\" is not a Kubernetes quantity".into());
        let s = status(&observe(&invalid, &ps, None, &SPEC));
        assert_eq!(
            (s.phase, condition(&s, ConditionType::Degraded).reason.as_str()),
            (ClusterPhase::Failed, "InvalidSpec")
        );
        let small = Target { replicas: 1, replication_factor: 3 };
        let ns = nodes(1, 1, false);
        let s = status(&observe(&Activity::Step(Step::Done), &ps, Some(&ns), &small));
        assert_eq!(
            (s.phase, condition(&s, ConditionType::Degraded).reason.as_str()),
            (ClusterPhase::Degraded, "TooFewReplicas")
        );
        assert!(condition(&s, ConditionType::Degraded).message.contains("scale up to at least 3"));
        let s = status(&observe(&Activity::Step(Step::Done), &pods(0, 0), None, &SPEC));
        assert_eq!(s.phase, ClusterPhase::Pending);
    }

    #[test]
    fn transition_times_move_only_when_the_status_changes() {
        let (ps, ns) = (pods(5, 5), nodes(5, 2, false));
        let first = status(&observe(&Activity::Step(Step::Done), &ps, Some(&ns), &SPEC));
        let mut o = observe(&Activity::Step(Step::Done), &ps, Some(&ns), &SPEC);
        o.now = "T2";
        o.previous = Some(&first);
        let same = status(&o);
        assert!(same.conditions.iter().all(|c| c.last_transition_time == "T1"));
        let scaling = Activity::Step(Step::ScaleStatefulSet { replicas: 6 });
        let mut o = observe(&scaling, &ps, Some(&ns), &SPEC);
        o.now = "T2";
        o.previous = Some(&first);
        let changed = status(&o);
        assert_eq!(condition(&changed, ConditionType::Progressing).last_transition_time, "T2");
        assert_eq!(condition(&changed, ConditionType::Available).last_transition_time, "T1");
    }

    #[test]
    fn the_same_wait_past_the_deadline_is_stalled_and_names_the_pod() {
        let (ps, ns) = (pods(4, 3), nodes(4, 2, false));
        let four = Target { replicas: 4, replication_factor: 2 };
        let waiting = Activity::Step(Step::Done);
        let mut o = observe(&waiting, &ps, Some(&ns), &four);
        o.now = "2026-12-03T10:00:00Z";
        let first = status(&o);
        assert_eq!(first.waiting_for.as_deref(), Some("pods demo-3 to be ready"));
        assert_eq!(condition(&first, ConditionType::Stalled).status, ConditionStatus::False);
        o.previous = Some(&first);
        o.now = "2026-12-03T10:09:59Z";
        let before = status(&o);
        assert_eq!(condition(&before, ConditionType::Stalled).status, ConditionStatus::False);
        assert_eq!(before.waiting_since.as_deref(), Some("2026-12-03T10:00:00Z"));
        o.now = "2026-12-03T10:10:00Z";
        let stalled = status(&o);
        let c = condition(&stalled, ConditionType::Stalled);
        assert_eq!((c.status, c.reason.as_str()), (ConditionStatus::True, "PodNotReady"));
        assert_eq!(stalled.blocked_by.as_deref(), Some("pod/demo-3"));
        // The pod comes back: nothing to wait for, not stalled.
        let all = pods(4, 4);
        let mut o = observe(&waiting, &all, Some(&ns), &four);
        (o.previous, o.now) = (Some(&stalled), "2026-12-03T10:10:02Z");
        let healed = status(&o);
        assert_eq!((healed.blocked_by.clone(), healed.waiting_for.clone()), (None, None));
        assert_eq!(condition(&healed, ConditionType::Stalled).status, ConditionStatus::False);
    }

    #[test]
    fn a_paused_cluster_says_what_it_holds_back() {
        let (ps, ns) = (pods(4, 4), nodes(4, 2, false));
        let paused = Activity::Step(Step::Paused { next: Box::new(Step::ScaleStatefulSet { replicas: 6 }) });
        let s = status(&observe(&paused, &ps, Some(&ns), &SPEC));
        assert_eq!(s.phase, ClusterPhase::Paused);
        let c = condition(&s, ConditionType::Progressing);
        assert_eq!((c.reason.as_str(), c.status), ("Paused", ConditionStatus::False));
        assert!(c.message.contains("set the StatefulSet to 6 pods"), "{}", c.message);
        assert_eq!(s.waiting_for, None);
    }
}
