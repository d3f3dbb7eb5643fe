//! What a node reports about itself to its peers ([`HelloInfo`]) and about the cluster to
//! operators (`GET /v1/admin/status`): the view, per-partition key counts and digests, and the
//! progress of the latest view change, gathered from every member.

use crate::node::Node;
use crate::protocol::{HelloInfo, PeerRequest, PeerResponse};
use crate::view::NodeId;
use futures::future::join_all;
use kvs_api::{ClusterStatus, PartitionStatus, RebalancePhase, RebalanceProgress};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

/// Budget for one member's answer to a status probe (a dead member fails at once).
const STATUS_DEADLINE: Duration = Duration::from_secs(2);

impl Node {
    /// What `Hello` answers.
    pub(crate) fn hello(&self) -> HelloInfo {
        HelloInfo {
            layout: self.view().map(|v| v.layout().clone()),
            pending: self.pending().map(|v| v.layout().clone()),
            live_keys: self.store.digests().stats().live_keys,
            partition_digest: self.partition_digest(),
            transfer: self.changes.as_source(),
        }
    }

    async fn hello_from(&self, node: &str) -> Option<HelloInfo> {
        if node == self.id() {
            return Some(self.hello());
        }
        match self.call_peer(node, &PeerRequest::Hello, STATUS_DEADLINE).await {
            Ok(PeerResponse::Hello(info)) => Some(*info),
            _ => None,
        }
    }

    /// The cluster as this node sees it, with live key counts and rebalance progress gathered
    /// from every member.
    pub async fn cluster_status(&self) -> ClusterStatus {
        let view = self.view();
        let members: Vec<NodeId> = view.as_ref().map(|v| v.all_members()).unwrap_or_default();
        let pending_members: Vec<NodeId> = self.pending().map(|p| p.all_members()).unwrap_or_default();
        let everyone: BTreeSet<NodeId> = members.into_iter().chain(pending_members).collect();
        let calls = everyone.iter().map(|n| async move { (n.clone(), self.hello_from(n).await) });
        let infos: HashMap<NodeId, Option<HelloInfo>> = join_all(calls).await.into_iter().collect();
        let info = |m: &String| infos.get(m).and_then(Option::as_ref);
        let mut rebalance = self.changes.driven();
        if let Some(pending) = self.pending().filter(|p| p.epoch() != rebalance.epoch) {
            // A change another node drives: its progress is what its sources report (below).
            rebalance =
                RebalanceProgress { epoch: pending.epoch(), phase: RebalancePhase::Pending, ..Default::default() };
        }
        let sources: Vec<&RebalanceProgress> = infos
            .values()
            .flatten()
            .map(|i| &i.transfer)
            .filter(|t| t.epoch == rebalance.epoch && t.epoch > 0)
            .collect();
        if !sources.is_empty() {
            rebalance.moved_keys = rebalance.moved_keys.max(sources.iter().map(|t| t.moved_keys).sum());
            rebalance.moved_bytes = sources.iter().map(|t| t.moved_bytes).sum();
            rebalance.total_keys = sources.iter().map(|t| t.total_keys).sum();
        }
        let partitions = view
            .as_ref()
            .map(|v| {
                v.layout()
                    .partitions
                    .iter()
                    .enumerate()
                    .map(|(i, members)| PartitionStatus {
                        partition_id: i as u32,
                        members: members.clone(),
                        live_keys: members.iter().map(|m| info(m).map(|i| i.live_keys)).collect(),
                        digests: members
                            .iter()
                            .map(|m| info(m).and_then(|i| i.partition_digest).map(|d| format!("{d:016x}")))
                            .collect(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        ClusterStatus {
            node: self.id().to_owned(),
            layout: view.map(|v| v.layout().clone()),
            pending_epoch: self.pending().map(|p| p.epoch()),
            partitions,
            rebalance,
        }
    }
}
