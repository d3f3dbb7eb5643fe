//! The operator's Prometheus metrics (served on `/metrics`): reconciliations by result, their
//! duration, view changes by result, each cluster's rebalance progress and phase, and whether this
//! replica is the leader.
//!
//! Handles are clones of atomics, registered once; updating one never takes a lock.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub namespace: String,
    pub cluster: String,
}

/// Everything the operator exports.
pub struct Metrics {
    registry: Registry,
    /// Reconciliations by result (`ok`, `error`).
    pub reconciles: Family<ResultLabel, Counter>,
    pub reconcile_seconds: Histogram,
    /// View changes posted to nodes, by result (`ok`, `error`).
    pub view_changes: Family<ResultLabel, Counter>,
    /// Keys moved / to move in each cluster's running rebalance (0 when none runs).
    pub rebalance_moved_keys: Family<ClusterLabels, Gauge>,
    pub rebalance_total_keys: Family<ClusterLabels, Gauge>,
    /// 1 while a cluster is rebalancing.
    pub rebalancing: Family<ClusterLabels, Gauge>,
    /// Ready node pods per cluster.
    pub ready_replicas: Family<ClusterLabels, Gauge>,
    /// 1 while this replica holds the leader Lease (or runs without leader election); `/readyz`
    /// reports its role from it.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kvs_operator");
        let reconciles = Family::<ResultLabel, Counter>::default();
        registry.register("reconciliations", "Reconciliations, by result", reconciles.clone());
        let reconcile_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register("reconcile_duration_seconds", "Time one reconciliation took", reconcile_seconds.clone());
        let view_changes = Family::<ResultLabel, Counter>::default();
        registry.register(
            "view_changes",
            "View changes posted to a cluster's primary node, by result",
            view_changes.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<ClusterLabels, Gauge>::default();
            registry.register(name, help, family.clone());
            family
        };
        let rebalance_moved_keys =
            gauge(&mut registry, "rebalance_moved_keys", "Keys moved so far by the running view change");
        let rebalance_total_keys =
            gauge(&mut registry, "rebalance_total_keys", "Keys the running view change has to move");
        let rebalancing =
            gauge(&mut registry, "rebalancing", "1 while a cluster's pods or data are moving towards its spec");
        let ready_replicas = gauge(&mut registry, "ready_replicas", "Ready node pods");
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica holds the leader Lease", leader.clone());
        Metrics {
            registry,
            reconciles,
            reconcile_seconds,
            view_changes,
            rebalance_moved_keys,
            rebalance_total_keys,
            rebalancing,
            ready_replicas,
            leader,
        }
    }
}

impl Metrics {
    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing into a String cannot fail");
        out
    }

    pub fn count_reconcile(&self, ok: bool) {
        self.reconciles.get_or_create(&ResultLabel { result: if ok { "ok" } else { "error" } }).inc();
    }

    pub fn count_view_change(&self, ok: bool) {
        self.view_changes.get_or_create(&ResultLabel { result: if ok { "ok" } else { "error" } }).inc();
    }

    /// Records a cluster's status.
    pub fn observe_cluster(&self, namespace: &str, cluster: &str, status: &crate::crd::KVStoreClusterStatus) {
        let labels = ClusterLabels { namespace: namespace.into(), cluster: cluster.into() };
        let (moved, total) = status.rebalance.as_ref().map_or((0, 0), |r| (r.moved_keys, r.total_keys));
        self.rebalance_moved_keys.get_or_create(&labels).set(moved);
        self.rebalance_total_keys.get_or_create(&labels).set(total);
        self.rebalancing.get_or_create(&labels).set(i64::from(status.phase == kvs_api::ClusterPhase::Rebalancing));
        self.ready_replicas.get_or_create(&labels).set(i64::from(status.ready_replicas));
    }

    /// Drops a deleted cluster's series.
    pub fn forget_cluster(&self, namespace: &str, cluster: &str) {
        let labels = ClusterLabels { namespace: namespace.into(), cluster: cluster.into() };
        for family in [&self.rebalance_moved_keys, &self.rebalance_total_keys, &self.rebalancing, &self.ready_replicas]
        {
            family.remove(&labels);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{KVStoreClusterStatus, RebalanceStatus};

    #[test]
    fn renders_reconciles_and_rebalance_progress() {
        let m = Metrics::default();
        m.count_reconcile(true);
        m.count_reconcile(false);
        m.count_view_change(true);
        let status = KVStoreClusterStatus {
            phase: kvs_api::ClusterPhase::Rebalancing,
            ready_replicas: 4,
            rebalance: Some(RebalanceStatus { moved_keys: 10, total_keys: 40, ..Default::default() }),
            ..Default::default()
        };
        m.observe_cluster("prod", "demo", &status);
        let text = m.render();
        assert!(text.contains(r#"kvs_operator_reconciliations_total{result="error"} 1"#), "{text}");
        assert!(text.contains(r#"kvs_operator_view_changes_total{result="ok"} 1"#), "{text}");
        assert!(text.contains(r#"kvs_operator_rebalance_moved_keys{namespace="prod",cluster="demo"} 10"#), "{text}");
        assert!(text.contains(r#"kvs_operator_rebalancing{namespace="prod",cluster="demo"} 1"#), "{text}");
        m.forget_cluster("prod", "demo");
        assert!(!m.render().contains(r#"cluster="demo""#));
    }
}
