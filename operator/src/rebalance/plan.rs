//! The rebalance planner (pure): from the [`Target`], the number of pods the backend runs, which
//! pods are ready and the view the nodes report, decide the one next [`Step`]. Re-planning from
//! observations at every step is what makes the operator crash-safe and lets a spec changed
//! mid-rebalance converge to the newest spec.
//!
//! Order of operations, so data always moves before pods go away:
//! - **scale out**: add pods, wait until the new pods are ready, then post the new membership to
//!   the primary node;
//! - **scale in**: post the smaller membership first (the nodes move the data off the leaving
//!   members), and only once the view no longer contains them remove pods — the highest ordinals
//!   go, which are exactly the members removed.

use kvs_api::Layout;

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
    /// The cluster matches the spec.
    Done,
}

/// Plans the next step towards `replicas` nodes at `replication_factor`, given that the backend is
/// set to run `sts_replicas` pods.
pub fn plan(replicas: u32, replication_factor: u32, sts_replicas: u32, pods: &[Pod], view: Option<&Layout>) -> Step {
    let identity = |ordinal: u32| pods.iter().find(|p| p.ordinal == ordinal);
    let desired: Vec<u32> = (0..replicas).collect();
    let view_members: Vec<&String> = view.map(|v| v.members().collect()).unwrap_or_default();
    let in_view = |ordinal: u32| identity(ordinal).is_some_and(|p| view_members.contains(&&p.identity));
    // Grow the StatefulSet first: new members need their pods before they can join.
    if sts_replicas < replicas {
        return Step::ScaleStatefulSet { replicas };
    }
    let not_ready: Vec<u32> = desired.iter().copied().filter(|&o| identity(o).is_none_or(|p| !p.ready)).collect();
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
        if !not_ready.is_empty() {
            return Step::WaitForPods { ordinals: not_ready };
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
    Step::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(n: u32, ready: u32) -> Vec<Pod> {
        (0..n)
            .map(|o| Pod {
                ordinal: o,
                identity: format!("kv-{o}:8080"),
                address: format!("10.0.0.{o}:8080"),
                ready: o < ready,
            })
            .collect()
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
}
