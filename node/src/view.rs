//! The view: this node's belief about cluster membership — which nodes form which partition under
//! which epoch — plus the slot table derived from it.
//!
//! Invariants: a `View` is immutable once built (nodes swap whole views, never edit one); its slot
//! table is `SlotTable::new(number of partitions)`, so two nodes holding views with the same layout
//! place every key identically.

use crate::placement::{PartitionId, SLOT_COUNT, Slot, SlotTable, chunk_members, partition_count, slot_of};
use kvs_api::Layout;
use std::sync::Arc;

/// A node's identity: the `ip:port` other nodes and clients reach it at (HW4's `IPPORT`).
pub type NodeId = String;

/// An immutable cluster view.
#[derive(Clone, Debug)]
pub struct View {
    layout: Layout,
    table: Arc<SlotTable>,
}

impl View {
    /// Wraps a layout (as received from another node or read from disk).
    pub fn from_layout(layout: Layout) -> Self {
        let table = SlotTable::shared(layout.partitions.len().max(1) as u32);
        View { layout, table }
    }

    /// The first view of a cluster started with `VIEW` and `K` (epoch 1): members sorted and chunked.
    pub fn initial(members: &[NodeId], k: u32) -> Self {
        let (partitions, proxies) = chunk_members(members, k as usize);
        View::from_layout(Layout { epoch: 1, replication_factor: k, partitions, proxies })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn epoch(&self) -> u64 {
        self.layout.epoch
    }

    pub fn table(&self) -> &SlotTable {
        &self.table
    }

    pub fn number_of_partitions(&self) -> u32 {
        self.layout.partitions.len() as u32
    }

    /// The partition owning `key`.
    pub fn partition_of_key(&self, key: &str) -> PartitionId {
        self.table.owner(slot_of(key.as_bytes()))
    }

    /// Replicas of `partition` (empty for an unknown id).
    pub fn members(&self, partition: PartitionId) -> &[NodeId] {
        self.layout.partitions.get(partition as usize).map_or(&[], Vec::as_slice)
    }

    /// The partition `node` is a replica of; `None` for proxies and non-members.
    pub fn partition_of_node(&self, node: &str) -> Option<PartitionId> {
        self.layout.partitions.iter().position(|p| p.iter().any(|n| n == node)).map(|p| p as PartitionId)
    }

    /// True when `node` is a replica or a proxy in this view.
    pub fn contains(&self, node: &str) -> bool {
        self.layout.members().any(|n| n == node)
    }

    /// Every member, replicas then proxies.
    pub fn all_members(&self) -> Vec<NodeId> {
        self.layout.members().cloned().collect()
    }

    /// Replicas owning `slot`.
    pub fn owners_of_slot(&self, slot: Slot) -> &[NodeId] {
        self.members(self.table.owner(slot))
    }

    /// Replicas owning `key`.
    /// The view as clients route by it: each partition's replicas and slot ranges.
    pub fn cluster_map(&self) -> kvs_api::ClusterMap {
        let partitions = (0..self.number_of_partitions())
            .map(|p| kvs_api::PartitionSlots {
                id: p,
                members: self.members(p).to_vec(),
                slots: kvs_api::slot_ranges(self.table().slots_of(p).iter().copied()),
            })
            .collect();
        kvs_api::ClusterMap { epoch: self.epoch(), replication_factor: self.layout().replication_factor, partitions }
    }

    pub fn owners_of_key(&self, key: &str) -> &[NodeId] {
        self.members(self.partition_of_key(key))
    }
}

/// The layout after changing the membership to `members` at replication factor `k`, with the next
/// epoch. Pure and deterministic (every input order gives the same answer).
///
/// With `k` unchanged it moves as few nodes as possible: every surviving member keeps its partition;
/// new members and survivors of dissolved partitions (only the highest ids are ever dissolved, which
/// is what keeps the slot table's minimal-movement chain intact) fill partitions that lost members,
/// then form new partitions in chunks of `k`, and whatever is left proxies. A change of `k`
/// re-chunks from scratch.
pub fn plan_layout(old: &Layout, members: &[NodeId], k: u32) -> Layout {
    let mut wanted: Vec<NodeId> = members.to_vec();
    wanted.sort();
    wanted.dedup();
    let epoch = old.epoch + 1;
    let ku = k.max(1) as usize;
    if k != old.replication_factor || old.partitions.is_empty() {
        let (partitions, proxies) = chunk_members(&wanted, ku);
        return Layout { epoch, replication_factor: k, partitions, proxies };
    }
    let target = if wanted.is_empty() { 0 } else { partition_count(wanted.len(), ku) };
    let survives = |n: &NodeId| wanted.binary_search(n).is_ok();
    let mut partitions: Vec<Vec<NodeId>> =
        old.partitions.iter().map(|p| p.iter().filter(|n| survives(n)).cloned().collect()).collect();
    let placed: std::collections::BTreeSet<NodeId> = partitions.iter().flatten().cloned().collect();
    // Pool: surviving proxies and new members (sorted), then survivors of dissolved partitions.
    let mut pool: Vec<NodeId> = wanted.iter().filter(|n| !placed.contains(*n)).cloned().collect();
    while partitions.len() > target {
        let dissolved = partitions.pop().expect("more partitions than the target");
        pool.extend(dissolved);
        pool.sort();
    }
    // Degraded (fewer nodes than k): one partition holding everyone.
    if wanted.len() < ku {
        let mut all: Vec<NodeId> = partitions.into_iter().flatten().chain(pool).collect();
        all.sort();
        return Layout {
            epoch,
            replication_factor: k,
            partitions: if all.is_empty() { vec![] } else { vec![all] },
            proxies: vec![],
        };
    }
    let mut pool = pool.into_iter();
    for p in partitions.iter_mut() {
        while p.len() < ku {
            match pool.next() {
                Some(n) => p.push(n),
                None => break,
            }
        }
    }
    let mut rest: Vec<NodeId> = pool.collect();
    while partitions.len() < target && rest.len() >= ku {
        let chunk: Vec<NodeId> = rest.drain(..ku).collect();
        partitions.push(chunk);
    }
    Layout { epoch, replication_factor: k, partitions, proxies: rest }
}

/// One slot's data movement in a view change: every `receiver` must get the slot's records from one
/// of the `sources` (the slot's replicas in the old view) before the old owners prune it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotMove {
    pub slot: Slot,
    pub sources: Vec<NodeId>,
    pub receivers: Vec<NodeId>,
}

/// Which slots must move, and where, when the view changes from `old` to `new`: a slot moves to
/// every new owner that was not already an owner. Slots whose owners did not change do not appear.
pub fn plan_moves(old: &View, new: &View) -> Vec<SlotMove> {
    let mut moves = Vec::new();
    for slot in 0..SLOT_COUNT as Slot {
        let sources = old.owners_of_slot(slot);
        let receivers: Vec<NodeId> =
            new.owners_of_slot(slot).iter().filter(|n| !sources.contains(n)).cloned().collect();
        if !receivers.is_empty() {
            moves.push(SlotMove { slot, sources: sources.to_vec(), receivers });
        }
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<NodeId> {
        (0..n).map(|i| format!("10.0.0.{:02}:8080", i + 1)).collect()
    }

    fn check_shape(l: &Layout, members: &[NodeId], k: u32) -> Result<(), TestCaseError> {
        let n = members.len();
        let k = k as usize;
        let mut seen: Vec<&String> = l.members().collect();
        seen.sort();
        let mut want: Vec<&String> = members.iter().collect();
        want.sort();
        want.dedup();
        prop_assert_eq!(seen, want, "every member exactly once");
        if n == 0 {
            return Ok(());
        }
        prop_assert_eq!(l.partitions.len(), partition_count(n, k), "floor(N/K) partitions, at least 1");
        if n < k {
            prop_assert_eq!(l.partitions[0].len(), n);
        } else {
            prop_assert!(l.partitions.iter().all(|p| p.len() == k), "{:?}", l);
            prop_assert_eq!(l.proxies.len(), n % k);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn planned_layouts_have_the_hw4_shape(start in 1usize..10, k in 1u32..4, adds in 0usize..4, removes in proptest::collection::vec(0usize..12, 0..4)) {
            let all = names(start + adds);
            let old = View::initial(&all[..start], k).layout().clone();
            let mut members: Vec<NodeId> = all.clone();
            for r in removes {
                if !members.is_empty() {
                    let i = r % members.len();
                    members.remove(i);
                }
            }
            let new = plan_layout(&old, &members, k);
            prop_assert_eq!(new.epoch, old.epoch + 1);
            check_shape(&new, &members, k)?;
            let mut reversed = members.clone();
            reversed.reverse();
            prop_assert_eq!(plan_layout(&old, &reversed, k), new, "order of the request does not matter");
        }

        #[test]
        fn changing_k_keeps_the_shape(n in 1usize..10, k1 in 1u32..4, k2 in 1u32..4) {
            let members = names(n);
            let old = View::initial(&members, k1).layout().clone();
            check_shape(&plan_layout(&old, &members, k2), &members, k2)?;
        }
    }

    #[test]
    fn adding_one_partition_moves_about_one_in_p_plus_one() {
        // 4 nodes K=2 (P=2) + 2 nodes -> P=3: only the new partition's slots move.
        let all = names(6);
        let old = View::initial(&all[..4], 2);
        let new = View::from_layout(plan_layout(old.layout(), &all, 2));
        assert_eq!(
            &new.layout().partitions[..2],
            &old.layout().partitions[..],
            "existing partitions keep their members"
        );
        let moves = plan_moves(&old, &new);
        assert_eq!(moves.len(), SLOT_COUNT / 3, "exactly the new partition's share");
        assert!(moves.iter().all(|m| m.receivers == new.members(2)));
        // And back: removing them moves the same slots home.
        let back = View::from_layout(plan_layout(new.layout(), &all[..4], 2));
        assert_eq!(back.layout().partitions, old.layout().partitions);
        assert_eq!(plan_moves(&new, &back).len(), SLOT_COUNT / 3);
    }

    #[test]
    fn a_lost_replica_is_replaced_from_the_proxies() {
        let all = names(5); // 2 partitions + 1 proxy
        let old = View::initial(&all, 2);
        let proxy = old.layout().proxies[0].clone();
        let gone = old.members(0)[0].clone();
        let members: Vec<NodeId> = all.iter().filter(|n| **n != gone).cloned().collect();
        let new = plan_layout(old.layout(), &members, 2);
        assert_eq!(new.partitions[0], vec![old.members(0)[1].clone(), proxy]);
        assert_eq!(new.partitions[1], old.members(1));
        assert!(new.proxies.is_empty());
    }

    #[test]
    fn initial_view_is_order_independent_and_complete() {
        let a = View::initial(&["c:1".into(), "a:1".into(), "b:1".into(), "d:1".into(), "e:1".into()], 2);
        let b = View::initial(&["e:1".into(), "d:1".into(), "a:1".into(), "c:1".into(), "b:1".into()], 2);
        assert_eq!(a.layout(), b.layout());
        assert_eq!(a.number_of_partitions(), 2);
        assert_eq!(a.members(0), ["a:1", "b:1"]);
        assert_eq!(a.partition_of_node("e:1"), None);
        assert!(a.contains("e:1"));
        assert_eq!(a.members(7), [] as [String; 0]);
    }
}
