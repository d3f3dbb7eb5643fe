//! Where a key lives, as clients see it: the key → slot function every node uses, and the
//! [`ClusterMap`] a node hands out (`GET /v1/cluster-map`) so a client can send each request
//! straight to an owner of its key, as Redis Cluster clients do with `CLUSTER SLOTS`.
//!
//! Invariants:
//! - [`slot_of`] is the one definition of a key's slot: nodes call it too, so a client and the
//!   cluster can never disagree about it.
//! - A map describes one view epoch; a node answers every native request with its epoch
//!   ([`crate::HEADER_VIEW_EPOCH`]), and a client that sees a newer one fetches the map again.
//!   A stale map costs a hop (the node forwards to the owners), never a wrong answer.

use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

/// Number of hash slots. Redis Cluster's size: fine enough to balance a thousand partitions within a
/// few percent, small enough that per-slot digests (8 bytes each) stay cheap to exchange.
pub const SLOT_COUNT: usize = 16_384;

/// Path of the cluster map (`GET`, no token needed: it says nothing a client could not learn from
/// the HW4 partition routes).
pub const CLUSTER_MAP_PATH: &str = "/v1/cluster-map";

const SLOT_BITS: u32 = SLOT_COUNT.trailing_zeros();
const _: () = assert!(SLOT_COUNT.is_power_of_two() && SLOT_COUNT <= 1 << 16);

/// The slot a key belongs to: the first 14 bits of the key's SHA-1 digest.
pub fn slot_of(key: &[u8]) -> u16 {
    let digest = Sha1::digest(key);
    let top = u16::from_be_bytes([digest[0], digest[1]]);
    top >> (16 - SLOT_BITS)
}

/// The partitions of one view and the slots each owns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    pub epoch: u64,
    pub replication_factor: u32,
    pub partitions: Vec<PartitionSlots>,
}

/// One partition: its replicas and its slots as inclusive ranges, ascending.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionSlots {
    pub id: u32,
    pub members: Vec<String>,
    pub slots: Vec<[u16; 2]>,
}

/// Inclusive ranges of consecutive slots, from slots in ascending order.
pub fn slot_ranges(slots: impl IntoIterator<Item = u16>) -> Vec<[u16; 2]> {
    let mut ranges: Vec<[u16; 2]> = Vec::new();
    for slot in slots {
        match ranges.last_mut() {
            Some(last) if last[1].checked_add(1) == Some(slot) => last[1] = slot,
            _ => ranges.push([slot, slot]),
        }
    }
    ranges
}

/// A [`ClusterMap`] ready to route: the owning partition of every slot.
#[derive(Clone, Debug)]
pub struct Router {
    map: ClusterMap,
    /// Index into `map.partitions` per slot (`u32::MAX`: the map left the slot out).
    owner: Vec<u32>,
}

impl Router {
    pub fn new(map: ClusterMap) -> Router {
        let mut owner = vec![u32::MAX; SLOT_COUNT];
        for (index, partition) in map.partitions.iter().enumerate() {
            for &[first, last] in &partition.slots {
                for slot in first..=last.min(SLOT_COUNT as u16 - 1) {
                    owner[slot as usize] = index as u32;
                }
            }
        }
        Router { map, owner }
    }

    pub fn epoch(&self) -> u64 {
        self.map.epoch
    }

    pub fn map(&self) -> &ClusterMap {
        &self.map
    }

    /// The node to send an operation on `key` to: one of its partition's replicas, chosen by slot
    /// the way nodes choose when they forward (so a key sticks to one coordinator). `None` when the
    /// map has no owner for the key's slot.
    pub fn node_for(&self, key: &[u8]) -> Option<&str> {
        let slot = slot_of(key);
        let partition = self.map.partitions.get(*self.owner.get(slot as usize)? as usize)?;
        let members = &partition.members;
        (!members.is_empty()).then(|| members[slot as usize % members.len()].as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_compress_consecutive_slots() {
        assert_eq!(slot_ranges([0, 1, 2, 5, 7, 8]), vec![[0, 2], [5, 5], [7, 8]]);
        assert!(slot_ranges([]).is_empty());
        assert_eq!(slot_ranges([u16::MAX]), vec![[u16::MAX, u16::MAX]]);
    }

    #[test]
    fn routes_every_key_to_a_replica_of_its_slots_partition() {
        let map = ClusterMap {
            epoch: 3,
            replication_factor: 2,
            partitions: vec![
                PartitionSlots { id: 0, members: vec!["a".into(), "b".into()], slots: vec![[0, 8191]] },
                PartitionSlots { id: 1, members: vec!["c".into(), "d".into()], slots: vec![[8192, 16383]] },
            ],
        };
        let router = Router::new(map);
        for i in 0..1000 {
            let key = format!("key_{i}");
            let slot = slot_of(key.as_bytes());
            let node = router.node_for(key.as_bytes()).unwrap();
            let expected = if slot < 8192 { ["a", "b"] } else { ["c", "d"] };
            assert_eq!(node, expected[slot as usize % 2], "{key}");
        }
    }

    #[test]
    fn slots_are_fourteen_bits_of_sha1() {
        // SHA-1("") = da39a3ee...: the top 14 bits of 0xda39.
        assert_eq!(slot_of(b""), 0xda39 >> 2);
        assert!((0..10_000).all(|i| (slot_of(format!("k{i}").as_bytes()) as usize) < SLOT_COUNT));
    }
}
