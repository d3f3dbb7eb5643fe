//! Exactly what the operator asks of the Kubernetes API: every (API group, resource, verb) it
//! calls, and nothing else. The Helm chart's ClusterRole is checked against this list
//! (`operator/tests/chart.rs`), and the mocked reconcile scenarios check that every request the
//! controller makes is covered by it (`operator/tests/reconcile.rs`); the Helm workflow test runs
//! the operator behind a stand-in RBAC authorizer with the chart's rules, and fails if anything is
//! denied or if a granted permission goes unused (`tests/tests/k8s_helm.rs`). So the list cannot
//! drift from the code in either direction unnoticed.

/// One RBAC rule: verbs on resources of an API group (`""` is the core group).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// The operator's permissions. Watching a kind needs `list` and `watch`; server-side apply is a
/// `patch` (which creates the object if it is missing).
pub const RULES: &[Rule] = &[
    // The custom resource: watched; the finalizer is added and removed with a patch; read by the
    // backup controller to find a backup's cluster.
    Rule { group: "kvstore.dev", resource: "kvstoreclusters", verbs: &["get", "list", "watch", "patch"] },
    Rule { group: "kvstore.dev", resource: "kvstoreclusters/status", verbs: &["patch"] },
    // Backups: watched; their outcome is written to their status. Schedules create them
    // (server-side apply) and delete the ones retention drops.
    Rule { group: "kvstore.dev", resource: "kvstorebackups", verbs: &["list", "watch", "patch", "delete"] },
    Rule { group: "kvstore.dev", resource: "kvstorebackups/status", verbs: &["patch"] },
    Rule { group: "kvstore.dev", resource: "kvstorebackupschedules", verbs: &["list", "watch"] },
    Rule { group: "kvstore.dev", resource: "kvstorebackupschedules/status", verbs: &["patch"] },
    // Children: server-side applied, watched (owned), deleted on cleanup. The StatefulSet is also
    // read: its current size and the view its pod template carries.
    Rule { group: "apps", resource: "statefulsets", verbs: &["get", "list", "watch", "patch", "delete"] },
    Rule { group: "", resource: "services", verbs: &["list", "watch", "patch", "delete"] },
    Rule { group: "policy", resource: "poddisruptionbudgets", verbs: &["list", "watch", "patch", "delete"] },
    // The cluster token and (spec.tls) the cluster CA: created once (never overwritten), read to
    // call the nodes' admin API; the pods' certificates: server-side applied when issued or renewed.
    Rule { group: "", resource: "secrets", verbs: &["get", "create", "patch", "delete"] },
    // Node pods: watched for readiness and addresses; deleted one at a time to roll a changed
    // template, or with their volume claim to replace a member whose machine or volume is gone.
    Rule { group: "", resource: "pods", verbs: &["list", "watch", "delete"] },
    Rule { group: "", resource: "persistentvolumeclaims", verbs: &["delete"] },
    // Events about view changes and failures (kube's Recorder creates, then patches repeats).
    Rule { group: "events.k8s.io", resource: "events", verbs: &["create", "patch"] },
    // Leader election (kube-lease-manager: get, create, server-side apply).
    Rule { group: "coordination.k8s.io", resource: "leases", verbs: &["get", "create", "patch"] },
];

/// Whether a request (`verb` on `resource` of `group`) is allowed by [`RULES`].
pub fn allows(group: &str, resource: &str, verb: &str) -> bool {
    RULES.iter().any(|r| r.group == group && r.resource == resource && r.verbs.contains(&verb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_wildcards_and_no_duplicates() {
        for (i, r) in RULES.iter().enumerate() {
            assert!(!r.resource.contains('*') && !r.verbs.contains(&"*"), "{r:?}");
            assert!(RULES[..i].iter().all(|o| (o.group, o.resource) != (r.group, r.resource)), "{r:?} listed twice");
        }
        assert!(allows("apps", "statefulsets", "patch"));
        assert!(!allows("", "secrets", "list"));
    }
}
