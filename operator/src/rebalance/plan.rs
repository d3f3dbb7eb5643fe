//! The rebalance planner (pure): from the [`Target`], the [`Policy`], the number of pods the backend
//! runs, which pods are ready and current, and what the nodes report, decide the one next [`Step`].
//! Re-planning from observations at every step is what makes the operator crash-safe and lets a
//! spec changed mid-rebalance converge to the newest spec.
//!
//! Order of operations, so data always moves before pods go away:
//! - **scale out**: add pods, wait until the new pods are ready, then post the new membership to
//!   the primary node;
//! - **scale in**: post the smaller membership first (the nodes move the data off the leaving
//!   members), and only once the view no longer contains them remove pods — the highest ordinals
//!   go, which are exactly the members removed;
//! - **member replacement**: a pod unschedulable for `replace_after` (its machine or volume is
//!   gone) gets a fresh volume under the same identity — only when every other desired pod is ready
//!   (so one member at a time) and its partition's other replicas are ready and agree on their
//!   digests (so the data it held is elsewhere); the fresh node re-syncs from them before it
//!   reports ready. The view does not change: the identity stays a member.
//! - **rolling restart**: once the view is right and every desired pod is ready, a pod that does
//!   not run the current template is restarted, highest ordinal first, one at a time; the next
//!   waits until the restarted one is ready again (ready means caught up with its partition), so a
//!   pod whose new version never becomes ready halts the roll. A pod on an old template that is
//!   not ready is restarted at once (it serves nobody): that is how a newer template replaces a
//!   broken one.
//!
//! `paused` turns every action into [`Step::Paused`] naming the action it holds back.

use super::capacity::Refusal;
use kvs_api::ClusterStatus;
use std::time::Duration;

/// What a cluster should become: `replicas` nodes cut into partitions of `replication_factor`.
/// Validation guarantees both are at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub replicas: u32,
    pub replication_factor: u32,
}

impl Target {
    /// `replicas < replicationFactor`: the nodes run as one partition holding every node, each key
    /// on fewer than `replicationFactor` nodes (as the node itself does) — why, and what fixes it.
    pub fn degraded(&self) -> Option<String> {
        let Target { replicas, replication_factor } = *self;
        (replicas < replication_factor).then(|| {
            format!(
                "{replicas} replicas cannot hold {replication_factor} copies of each key: running as one partition of \
                 {replicas} (scale up to at least {replication_factor})"
            )
        })
    }
}

/// How the planner may act, besides the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Take no action; report what would be done.
    pub paused: bool,
    /// Replace a member whose pod stays unschedulable (`spec.autoReplace`).
    pub auto_replace: bool,
    /// How long a pod must stay unschedulable before it is replaced.
    pub replace_after: Duration,
    /// Each pod's volume (`spec.storage.size`), to check a change that leaves fewer partitions.
    pub volume_bytes: Option<u64>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { paused: false, auto_replace: true, replace_after: Duration::from_secs(600), volume_bytes: None }
    }
}

/// One pod as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub ordinal: u32,
    /// The node identity it serves under (`host:port`): its name in views.
    pub identity: String,
    /// Where the operator reaches it (`host:port`); the pod IP in Kubernetes, where a new pod's
    /// DNS name may not resolve yet.
    pub address: String,
    pub ready: bool,
    /// Its node process runs and serves HTTP. A pod that is not yet a member has no view, so it is
    /// never *ready* (caught up); being started is enough to add it to the view.
    pub started: bool,
    /// It runs the pod template the spec asks for now (false: a changed image or template reaches
    /// it only when it restarts).
    pub current: bool,
    /// How long it has been unschedulable (its machine or its volume is gone), if it is.
    pub unschedulable_for: Option<Duration>,
    /// Why it is not ready, in the words of the backend (e.g. `ImagePullBackOff`), if known.
    pub trouble: Option<String>,
    /// It is being stopped (deleted, draining within its grace period): the wait for it is the
    /// wait for it to go, not yet for its replacement.
    pub terminating: bool,
}

impl Pod {
    /// A running pod on the current template, ready or not.
    pub fn new(ordinal: u32, identity: String, address: String, ready: bool) -> Pod {
        Pod {
            ordinal,
            identity,
            address,
            ready,
            started: ready,
            current: true,
            unschedulable_for: None,
            trouble: None,
            terminating: false,
        }
    }
}

/// The next thing to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Set the number of pods the backend runs (the StatefulSet's replicas in Kubernetes).
    ScaleStatefulSet { replicas: u32 },
    /// Wait for these ordinals to become ready.
    WaitForPods { ordinals: Vec<u32> },
    /// Post this membership and K to the primary (`PUT /v1/admin/view`); `primary` is the
    /// address to post to.
    ChangeView { primary: String, members: Vec<String>, replication_factor: u32 },
    /// Give the member at `ordinal` a fresh volume under the same identity (delete its volume
    /// claim and its pod; the backend creates both again).
    ReplaceMember { ordinal: u32 },
    /// Restart the pod at `ordinal` so that it runs the current template.
    RestartPod { ordinal: u32 },
    /// `spec.paused`: this step is held back.
    Paused { next: Box<Step> },
    /// A view change that leaves fewer partitions is held back: what each node would hold does not
    /// fit its volume, or could not be measured (see [`super::capacity`]).
    Refused { refusal: Refusal },
    /// The cluster matches the spec.
    Done,
}

impl Step {
    /// Whether taking this step changes the cluster (waiting and being done do not).
    pub fn acts(&self) -> bool {
        !matches!(self, Step::WaitForPods { .. } | Step::Paused { .. } | Step::Refused { .. } | Step::Done)
    }
}

/// Plans the next step towards `target` under `policy`, given that the backend is set to run
/// `sts_replicas` pods and what the nodes report (`nodes`: their view and per-partition digests).
pub fn plan(target: &Target, policy: &Policy, sts_replicas: u32, pods: &[Pod], nodes: Option<&ClusterStatus>) -> Step {
    let step = next_step(target, policy, sts_replicas, pods, nodes);
    if policy.paused && step.acts() { Step::Paused { next: Box::new(step) } } else { step }
}

fn next_step(target: &Target, policy: &Policy, sts_replicas: u32, pods: &[Pod], nodes: Option<&ClusterStatus>) -> Step {
    let Target { replicas, replication_factor } = *target;
    let view = nodes.and_then(|n| n.layout.as_ref());
    let identity = |ordinal: u32| pods.iter().find(|p| p.ordinal == ordinal);
    let desired: Vec<u32> = (0..replicas).collect();
    let view_members: Vec<&String> = view.map(|v| v.members().collect()).unwrap_or_default();
    let in_view = |ordinal: u32| identity(ordinal).is_some_and(|p| view_members.contains(&&p.identity));
    // Grow the StatefulSet first: new members need their pods before they can join.
    if sts_replicas < replicas {
        return Step::ScaleStatefulSet { replicas };
    }
    if let Some(ordinal) = replaceable(policy, &desired, pods, nodes) {
        return Step::ReplaceMember { ordinal };
    }
    let not_ready: Vec<u32> = desired.iter().copied().filter(|&o| identity(o).is_none_or(|p| !p.ready)).collect();
    // Before a view change: members must be ready, pods that are to join only started.
    let not_usable: Vec<u32> = desired
        .iter()
        .copied()
        .filter(|&o| identity(o).is_none_or(|p| !(p.ready || (p.started && !in_view(o)))))
        .collect();
    let wanted_identities: Vec<String> =
        desired.iter().filter_map(|&o| identity(o).map(|p| p.identity.clone())).collect();
    let view_matches = view.is_some_and(|v| {
        let mut have: Vec<&String> = v.members().collect();
        have.sort();
        let mut want: Vec<&String> = wanted_identities.iter().collect();
        want.sort();
        have == want && v.replication_factor == replication_factor
    });
    if !view_matches {
        if !not_usable.is_empty() {
            return Step::WaitForPods { ordinals: not_usable };
        }
        // The primary: pod 0, or the lowest-ordinal ready pod that is in the current view.
        let primary = desired
            .iter()
            .chain(&(replicas..sts_replicas).collect::<Vec<_>>())
            .copied()
            .filter(|&o| in_view(o) && identity(o).is_some_and(|p| p.ready))
            .find_map(identity)
            .or_else(|| identity(0));
        let Some(primary) = primary else { return Step::WaitForPods { ordinals: vec![0] } };
        return Step::ChangeView { primary: primary.address.clone(), members: wanted_identities, replication_factor };
    }
    // The view is right; drop pods that no longer hold data.
    if sts_replicas > replicas {
        return Step::ScaleStatefulSet { replicas };
    }
    // Roll pods that run an old template, one at a time, highest ordinal first. A pod on an old
    // template that is not ready serves nobody: restarting it costs nothing and is the only way
    // out when that template is the broken one.
    let outdated = |o: &u32| identity(*o).is_some_and(|p| !p.current);
    if let Some(&ordinal) = desired.iter().rev().filter(|o| outdated(o)).find(|o| not_ready.contains(o)) {
        return Step::RestartPod { ordinal };
    }
    match desired.iter().rev().copied().find(outdated) {
        Some(_) if !not_ready.is_empty() => Step::WaitForPods { ordinals: not_ready },
        Some(ordinal) => Step::RestartPod { ordinal },
        None => Step::Done,
    }
}

/// The member to replace, if any: the lowest desired ordinal unschedulable for `replace_after`,
/// while every other desired pod is ready and its partition's data is safe elsewhere.
fn replaceable(policy: &Policy, desired: &[u32], pods: &[Pod], nodes: Option<&ClusterStatus>) -> Option<u32> {
    if !policy.auto_replace {
        return None;
    }
    let lost = |p: &Pod| p.unschedulable_for.is_some_and(|d| d >= policy.replace_after);
    let desired_pods: Vec<&Pod> = pods.iter().filter(|p| desired.contains(&p.ordinal)).collect();
    let candidate = desired_pods.iter().find(|p| lost(p))?;
    let others_ready = desired_pods.iter().filter(|p| p.ordinal != candidate.ordinal).all(|p| p.ready);
    let all_present = desired_pods.len() == desired.len();
    (others_ready && all_present && held_elsewhere(&candidate.identity, pods, nodes)).then_some(candidate.ordinal)
}

/// Whether every key `identity` stores is also on a ready replica: it serves no partition (a proxy,
/// or not a member), or its partition's other members are all ready, answered, and report equal
/// digests (the node's readiness already means caught up with the partition).
pub fn held_elsewhere(identity: &str, pods: &[Pod], nodes: Option<&ClusterStatus>) -> bool {
    let Some(nodes) = nodes else { return false };
    let Some(layout) = nodes.layout.as_ref() else { return true };
    let Some(members) = layout.partitions.iter().find(|m| m.iter().any(|x| x == identity)) else { return true };
    let Some(partition) = nodes.partitions.iter().find(|p| &p.members == members) else { return false };
    let ready = |m: &str| pods.iter().any(|p| p.identity == m && p.ready);
    let others: Vec<(&String, &Option<String>)> =
        partition.members.iter().zip(&partition.digests).filter(|(m, _)| m.as_str() != identity).collect();
    let first = others.first().and_then(|(_, d)| d.as_ref());
    first.is_some() && others.iter().all(|(m, d)| ready(m) && d.as_ref() == first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvs_api::Layout;

    fn pods(n: u32, ready: u32) -> Vec<Pod> {
        (0..n).map(|o| Pod::new(o, format!("kv-{o}:8080"), format!("10.0.0.{o}:8080"), o < ready)).collect()
    }

    fn nodes(layout: &Layout) -> ClusterStatus {
        let partitions = layout
            .partitions
            .iter()
            .enumerate()
            .map(|(i, members)| kvs_api::PartitionStatus {
                partition_id: i as u32,
                members: members.clone(),
                live_keys: vec![Some(10); members.len()],
                digests: vec![Some(format!("d{i}")); members.len()],
            })
            .collect();
        ClusterStatus {
            node: "kv-0:8080".into(),
            layout: Some(layout.clone()),
            pending_epoch: None,
            partitions,
            rebalance: Default::default(),
        }
    }

    /// The plan under the default policy, the nodes reporting `view` (in sync).
    fn plan(replicas: u32, k: u32, sts: u32, pods: &[Pod], view: Option<&Layout>) -> Step {
        plan_with(&Policy::default(), replicas, k, sts, pods, view)
    }

    fn plan_with(policy: &Policy, replicas: u32, k: u32, sts: u32, pods: &[Pod], view: Option<&Layout>) -> Step {
        let status = view.map(nodes);
        super::plan(&Target { replicas, replication_factor: k }, policy, sts, pods, status.as_ref())
    }

    fn layout(members: u32, k: u32) -> Layout {
        let all: Vec<String> = (0..members).map(|o| format!("kv-{o}:8080")).collect();
        let p = (members / k).max(1) as usize;
        let (parts, proxies) = if members < k {
            (vec![all.clone()], vec![])
        } else {
            (all[..p * k as usize].chunks(k as usize).map(|c| c.to_vec()).collect(), all[p * k as usize..].to_vec())
        };
        Layout { epoch: 1, replication_factor: k, partitions: parts, proxies }
    }

    #[test]
    fn scale_out_grows_pods_then_waits_then_changes_the_view() {
        let view = layout(4, 2);
        assert_eq!(plan(6, 2, 4, &pods(4, 4), Some(&view)), Step::ScaleStatefulSet { replicas: 6 });
        assert_eq!(plan(6, 2, 6, &pods(6, 5), Some(&view)), Step::WaitForPods { ordinals: vec![5] });
        let Step::ChangeView { primary, members, replication_factor } = plan(6, 2, 6, &pods(6, 6), Some(&view)) else {
            panic!()
        };
        assert_eq!((primary.as_str(), members.len(), replication_factor), ("10.0.0.0:8080", 6, 2));
        assert_eq!(plan(6, 2, 6, &pods(6, 6), Some(&layout(6, 2))), Step::Done);
        // A joining pod has no view, so it is never ready (caught up): started is enough.
        let mut joining = pods(6, 6);
        joining[5].ready = false;
        assert!(matches!(plan(6, 2, 6, &joining, Some(&view)), Step::ChangeView { .. }));
        joining[5].started = false;
        assert_eq!(plan(6, 2, 6, &joining, Some(&view)), Step::WaitForPods { ordinals: vec![5] });
    }

    #[test]
    fn scale_in_moves_data_before_pods_go() {
        let view = layout(6, 2);
        let Step::ChangeView { members, .. } = plan(2, 2, 6, &pods(6, 6), Some(&view)) else { panic!("view first") };
        assert_eq!(members, ["kv-0:8080", "kv-1:8080"]);
        assert_eq!(plan(2, 2, 6, &pods(6, 6), Some(&layout(2, 2))), Step::ScaleStatefulSet { replicas: 2 });
        assert_eq!(plan(2, 2, 2, &pods(2, 2), Some(&layout(2, 2))), Step::Done);
    }

    #[test]
    fn a_replication_factor_change_goes_through_the_view() {
        let Step::ChangeView { replication_factor, members, .. } = plan(4, 1, 4, &pods(4, 4), Some(&layout(4, 2)))
        else {
            panic!()
        };
        assert_eq!((replication_factor, members.len()), (1, 4));
    }

    #[test]
    fn a_reversed_scale_converges_to_the_newest_spec() {
        // Scaling 4 -> 6 was under way (pods 4, 5 exist, view still 4) when the spec went back to 4.
        assert_eq!(plan(4, 2, 6, &pods(6, 6), Some(&layout(4, 2))), Step::ScaleStatefulSet { replicas: 4 });
        // Or the view already had 6: move the data back first.
        assert!(matches!(plan(4, 2, 6, &pods(6, 6), Some(&layout(6, 2))), Step::ChangeView { .. }));
    }

    #[test]
    fn the_primary_is_a_ready_member_of_the_current_view() {
        let mut ps = pods(4, 4);
        ps[0].ready = false;
        // Pod 0 is down but must stay; we wait for it rather than dropping it from the view.
        assert_eq!(plan(4, 1, 4, &ps, Some(&layout(4, 2))), Step::WaitForPods { ordinals: vec![0] });
        // When scaling in while pod 0 is fine, pod 0 drives.
        let Step::ChangeView { primary, .. } = plan(2, 2, 4, &pods(4, 4), Some(&layout(4, 2))) else { panic!() };
        assert_eq!(primary, "10.0.0.0:8080");
        // Pod 0 is not a member (it lost its volume and came back empty): a member drives.
        let view = Layout {
            epoch: 3,
            replication_factor: 1,
            partitions: (1..4).map(|o| vec![format!("kv-{o}:8080")]).collect(),
            proxies: vec![],
        };
        let Step::ChangeView { primary, members, .. } = plan(4, 1, 4, &pods(4, 4), Some(&view)) else { panic!() };
        assert_eq!((primary.as_str(), members.len()), ("10.0.0.1:8080", 4));
    }

    #[test]
    fn an_unschedulable_member_is_replaced_once_its_data_is_elsewhere() {
        let view = layout(4, 2);
        let policy = Policy { replace_after: Duration::from_secs(60), ..Policy::default() };
        let mut ps = pods(4, 4);
        ps[3].ready = false;
        ps[3].unschedulable_for = Some(Duration::from_secs(59));
        // Not yet past the deadline: nothing to do but wait (the status reports the member).
        assert_eq!(plan_with(&policy, 4, 2, 4, &ps, Some(&view)), Step::Done);
        ps[3].unschedulable_for = Some(Duration::from_secs(60));
        assert_eq!(plan_with(&policy, 4, 2, 4, &ps, Some(&view)), Step::ReplaceMember { ordinal: 3 });
        // Turned off: never.
        let off = Policy { auto_replace: false, ..policy };
        assert_eq!(plan_with(&off, 4, 2, 4, &ps, Some(&view)), Step::Done);
        // Its partner is not ready: the data may be nowhere else.
        let mut partner_down = ps.clone();
        partner_down[2].ready = false;
        assert!(!matches!(plan_with(&policy, 4, 2, 4, &partner_down, Some(&view)), Step::ReplaceMember { .. }));
        // Replicas that disagree (K=3, the two others differ): not in sync, not replaced.
        let view3 = layout(3, 3);
        let mut ps3 = pods(3, 3);
        ps3[0].ready = false;
        ps3[0].unschedulable_for = Some(Duration::from_secs(600));
        let mut status = nodes(&view3);
        status.partitions[0].digests = vec![None, Some("a".into()), Some("b".into())];
        let t3 = Target { replicas: 3, replication_factor: 3 };
        assert!(!matches!(super::plan(&t3, &policy, 3, &ps3, Some(&status)), Step::ReplaceMember { .. }));
        status.partitions[0].digests = vec![None, Some("a".into()), Some("a".into())];
        assert_eq!(super::plan(&t3, &policy, 3, &ps3, Some(&status)), Step::ReplaceMember { ordinal: 0 });
        // K=1: nobody else holds its keys.
        assert!(!matches!(plan_with(&policy, 4, 1, 4, &ps, Some(&layout(4, 1))), Step::ReplaceMember { .. }));
        // One at a time: another member not ready (a replacement catching up) blocks the next.
        let mut two = ps.clone();
        two[1].ready = false;
        two[1].unschedulable_for = Some(Duration::from_secs(600));
        assert!(!matches!(plan_with(&policy, 4, 2, 4, &two, Some(&view)), Step::ReplaceMember { .. }));
    }

    #[test]
    fn a_template_change_rolls_one_ready_pod_at_a_time_highest_first() {
        let view = layout(4, 2);
        let mut ps = pods(4, 4);
        for p in &mut ps {
            p.current = false;
        }
        assert_eq!(plan(4, 2, 4, &ps, Some(&view)), Step::RestartPod { ordinal: 3 });
        // Pod 3 restarted on the new template and is catching up: wait for it.
        ps[3] = Pod { current: true, ready: false, ..ps[3].clone() };
        assert_eq!(plan(4, 2, 4, &ps, Some(&view)), Step::WaitForPods { ordinals: vec![3] });
        ps[3].ready = true;
        assert_eq!(plan(4, 2, 4, &ps, Some(&view)), Step::RestartPod { ordinal: 2 });
        // A new version that never becomes ready halts the roll: the others stay as they are.
        ps[2] = Pod { current: true, ready: false, trouble: Some("CrashLoopBackOff".into()), ..ps[2].clone() };
        assert_eq!(plan(4, 2, 4, &ps, Some(&view)), Step::WaitForPods { ordinals: vec![2] });
        // A view change comes first; a pod of an old template serves it fine.
        assert!(matches!(plan(6, 2, 6, &pods(6, 6), Some(&view)), Step::ChangeView { .. }));
        // A newer template fixes it: the broken pod (outdated again, not ready) is restarted
        // first, although it is not ready.
        ps[2].current = false;
        assert_eq!(plan(4, 2, 4, &ps, Some(&view)), Step::RestartPod { ordinal: 2 });
        // Every pod current: done.
        assert_eq!(plan(4, 2, 4, &pods(4, 4), Some(&view)), Step::Done);
    }

    #[test]
    fn paused_holds_back_every_action_but_not_waiting() {
        let paused = Policy { paused: true, ..Policy::default() };
        let step = plan_with(&paused, 6, 2, 4, &pods(4, 4), Some(&layout(4, 2)));
        assert_eq!(step, Step::Paused { next: Box::new(Step::ScaleStatefulSet { replicas: 6 }) });
        assert_eq!(plan_with(&paused, 4, 2, 4, &pods(4, 4), Some(&layout(4, 2))), Step::Done);
        assert_eq!(
            plan_with(&paused, 4, 2, 4, &pods(4, 3), Some(&layout(2, 2))),
            Step::WaitForPods { ordinals: vec![3] }
        );
    }
}
