//! The view: this node's belief about cluster membership — which nodes form which partition under
//! which epoch — plus the slot table derived from it.
//!
//! Invariants: a `View` is immutable once built (nodes swap whole views, never edit one); its slot
//! table is `SlotTable::new(number of partitions)`, so two nodes holding views with the same layout
//! place every key identically.

use crate::placement::{PartitionId, SlotTable, chunk_members, slot_of};
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
        let table = Arc::new(SlotTable::new(layout.partitions.len().max(1) as u32));
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
