//! What a view change would do, without doing it (`POST /v1/admin/view/plan`, `kvsctl plan`): the
//! layout it would commit and, per node, the records it holds now and after, receives and drops.
//!
//! [`preview`] is pure: two views and one record count per slot. [`Node::plan_view`] gathers the
//! counts — each partition's slots from one replica that answers, this node first for its own —
//! and decides the target by the same rule a change uses ([`plan_layout`]), so the preview names
//! exactly the layout `PUT /v1/admin/view` would commit from the same view.

use super::ChangeError;
use super::decide::{same_membership, validate};
use crate::node::Node;
use crate::placement::{PartitionId, Slot};
use crate::protocol::{PeerRequest, PeerResponse};
use crate::view::{NodeId, View, plan_layout};
use futures::future::join_all;
use kvs_api::{NodePlan, SLOT_COUNT, ViewPlan};
use std::collections::BTreeMap;

/// The plan from `current` to `target`, given the records of every slot (`records[slot]`).
/// `unmeasured`: partitions whose counts are missing (counted as zero).
pub fn preview(current: &View, target: &View, records: &[u64], unmeasured: Vec<u32>) -> ViewPlan {
    let mut nodes: BTreeMap<NodeId, NodePlan> = BTreeMap::new();
    for node in current.all_members().into_iter().chain(target.all_members()) {
        nodes.entry(node.clone()).or_insert_with(|| NodePlan { node, ..NodePlan::default() });
    }
    let (mut moved_slots, mut moved_records) = (0, 0);
    for slot in 0..SLOT_COUNT as Slot {
        let count = records.get(slot as usize).copied().unwrap_or(0);
        let (before, after) = (current.owners_of_slot(slot), target.owners_of_slot(slot));
        let mut moved = false;
        for owner in before {
            let plan = nodes.get_mut(owner).expect("every owner is listed");
            plan.records_now += count;
            if !after.contains(owner) {
                plan.records_out += count;
            }
        }
        for owner in after {
            let plan = nodes.get_mut(owner).expect("every owner is listed");
            plan.records_after += count;
            if !before.contains(owner) {
                plan.records_in += count;
                moved_records += count;
                moved = true;
            }
        }
        moved_slots += u32::from(moved);
    }
    ViewPlan {
        current: current.layout().clone(),
        target: target.layout().clone(),
        nodes: nodes.into_values().collect(),
        moved_slots,
        moved_records,
        unmeasured_partitions: unmeasured,
    }
}

impl Node {
    /// What changing the cluster to `members` at `k` would do, from this node's committed view.
    pub async fn plan_view(&self, members: Vec<NodeId>, k: u32) -> Result<ViewPlan, ChangeError> {
        validate(&members, k)?;
        let current = self.view().ok_or(ChangeError::NoView)?;
        let target = match same_membership(current.layout(), &members, k) {
            true => current.clone(),
            false => std::sync::Arc::new(View::from_layout(plan_layout(current.layout(), &members, k))),
        };
        let partitions = 0..current.number_of_partitions();
        let counted = join_all(partitions.map(|p| self.count_partition(&current, p))).await;
        let mut records = vec![0; SLOT_COUNT];
        let mut unmeasured = Vec::new();
        for (partition, counts) in counted.into_iter().enumerate() {
            match counts {
                Some(counts) => {
                    for (&slot, count) in current.table().slots_of(partition as PartitionId).iter().zip(counts) {
                        records[slot as usize] = count;
                    }
                }
                None => unmeasured.push(partition as u32),
            }
        }
        Ok(preview(&current, &target, &records, unmeasured))
    }

    /// Records per slot of `partition` (in its slot order), from this node if it is a replica,
    /// else from the first replica that answers.
    async fn count_partition(&self, view: &View, partition: PartitionId) -> Option<Vec<u64>> {
        let slots = view.table().slots_of(partition).to_vec();
        let members = view.members(partition);
        if members.iter().any(|m| m == self.id()) {
            return Some(self.slot_counts(&slots));
        }
        let request = PeerRequest::SlotCounts { slots };
        for member in members {
            match self.call_peer(member, &request, self.settings.replica_deadline).await {
                Ok(PeerResponse::SlotCounts(counts)) => return Some(counts),
                Ok(other) => tracing::warn!(peer = %member, answer = ?other, "unexpected answer to SlotCounts"),
                Err(e) => tracing::debug!(peer = %member, error = %e, "no slot counts from this replica"),
            }
        }
        None
    }

    /// Records this node holds in each of `slots`.
    pub(crate) fn slot_counts(&self, slots: &[Slot]) -> Vec<u64> {
        let digests = self.store.digests();
        slots.iter().map(|&s| digests.records_in(s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(members: usize, k: u32) -> View {
        let ids: Vec<NodeId> = (0..members).map(|i| format!("10.0.0.{}:8080", i + 1)).collect();
        View::initial(&ids, k)
    }

    #[test]
    fn adding_a_partition_moves_its_share_and_conserves_records() {
        let current = view(4, 2);
        let members: Vec<NodeId> = (0..6).map(|i| format!("10.0.0.{}:8080", i + 1)).collect();
        let target = View::from_layout(plan_layout(current.layout(), &members, 2));
        let records = vec![2; SLOT_COUNT];
        let plan = preview(&current, &target, &records, vec![]);
        assert_eq!(plan.nodes.len(), 6);
        // K=2 before and after: each slot is held twice, so the totals are twice the records.
        let total = 2 * 2 * SLOT_COUNT as u64;
        assert_eq!(plan.nodes.iter().map(|n| n.records_now).sum::<u64>(), total);
        assert_eq!(plan.nodes.iter().map(|n| n.records_after).sum::<u64>(), total);
        for n in &plan.nodes {
            assert_eq!(n.records_after, n.records_now + n.records_in - n.records_out, "{n:?}");
        }
        // The two new nodes receive the new partition's slots (about a third) and drop nothing.
        let new: Vec<&NodePlan> = plan.nodes.iter().filter(|n| n.records_now == 0).collect();
        assert_eq!(new.len(), 2);
        let share = plan.moved_slots as u64 * 2;
        assert!(new.iter().all(|n| n.records_in == share && n.records_out == 0));
        assert_eq!(plan.moved_records, 2 * share);
        assert!((5_000..6_000).contains(&plan.moved_slots), "{}", plan.moved_slots);
    }

    #[test]
    fn the_same_view_moves_nothing() {
        let current = view(4, 2);
        let plan = preview(&current, &current, &vec![1; SLOT_COUNT], vec![1]);
        assert_eq!((plan.moved_slots, plan.moved_records), (0, 0));
        assert!(plan.nodes.iter().all(|n| n.records_in == 0 && n.records_out == 0 && n.records_now == n.records_after));
        assert_eq!(plan.unmeasured_partitions, vec![1]);
    }
}
