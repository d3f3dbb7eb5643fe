//! Placement: where a key lives. Pure functions only — no I/O, no clocks, no globals.
//!
//! A key hashes (SHA-1) into one of [`SLOT_COUNT`] slots. A cluster of `P` partitions owns the slots
//! through a [`SlotTable`]; every node computes the same table from `P` alone, so nothing about
//! slot ownership ever needs to be sent over the wire.
//!
//! Invariants:
//! - `slot_of` depends only on the key's bytes.
//! - `SlotTable::new(p)` depends only on `p`; each partition owns `SLOT_COUNT / p` or one more slot.
//! - The tables form a chain: `SlotTable::new(p + 1)` differs from `SlotTable::new(p)` only in the
//!   slots the new partition `p` takes, exactly `SLOT_COUNT / (p + 1)` of them — the minimum any
//!   scheme can move. Shrinking from `p + 1` to `p` moves exactly the slots of partition `p` back.
//! - Members are chunked into partitions by [`chunk_members`], independent of the input order.

use std::collections::BTreeSet;

pub use kvs_api::{SLOT_COUNT, slot_of};

/// A slot number in `0..SLOT_COUNT`.
pub type Slot = u16;

/// A partition number in `0..P`; HW4 calls this `partition_id`.
pub type PartitionId = u32;

/// Which partition owns each slot, for a given number of partitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotTable {
    owner: Vec<PartitionId>,
    partitions: u32,
    /// Per partition, the slots it owns, ascending (asked for on every anti-entropy round).
    by_partition: Vec<Vec<Slot>>,
}

impl SlotTable {
    /// The table for `partitions` partitions (at least 1; 0 is treated as 1).
    ///
    /// Built by growing from one partition: each new partition takes `SLOT_COUNT / n` slots, one at a
    /// time from whichever existing partition currently owns the most (ties: the lowest id), taking
    /// that partition's highest slot. Every step keeps all partitions within one slot of each other.
    pub fn new(partitions: u32) -> Self {
        let partitions = partitions.max(1);
        let mut owned: Vec<BTreeSet<Slot>> = vec![(0..SLOT_COUNT as u32).map(|s| s as Slot).collect()];
        for n in 2..=partitions as usize {
            let quota = SLOT_COUNT / n;
            let mut taken = BTreeSet::new();
            for _ in 0..quota {
                let donor = (0..owned.len())
                    .max_by_key(|&i| (owned[i].len(), std::cmp::Reverse(i)))
                    .expect("there is at least one partition");
                let slot = owned[donor].pop_last().expect("the largest partition owns slots");
                taken.insert(slot);
            }
            owned.push(taken);
        }
        let mut owner = vec![0; SLOT_COUNT];
        for (partition, slots) in owned.iter().enumerate() {
            for &slot in slots {
                owner[slot as usize] = partition as PartitionId;
            }
        }
        let by_partition = owned.into_iter().map(|slots| slots.into_iter().collect()).collect();
        SlotTable { owner, partitions, by_partition }
    }

    /// The table for `partitions` partitions, built once per process and shared (every view with
    /// that many partitions has the same table, and building one is not free).
    pub fn shared(partitions: u32) -> std::sync::Arc<SlotTable> {
        static TABLES: std::sync::Mutex<std::collections::BTreeMap<u32, std::sync::Arc<SlotTable>>> =
            std::sync::Mutex::new(std::collections::BTreeMap::new());
        let partitions = partitions.max(1);
        let mut tables = TABLES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        tables.entry(partitions).or_insert_with(|| std::sync::Arc::new(SlotTable::new(partitions))).clone()
    }

    /// Number of partitions this table spreads slots over.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The partition that owns `slot`.
    pub fn owner(&self, slot: Slot) -> PartitionId {
        self.owner[slot as usize]
    }

    /// The partition that owns `key`.
    pub fn owner_of_key(&self, key: &[u8]) -> PartitionId {
        self.owner(slot_of(key))
    }

    /// Every slot `partition` owns, ascending (empty for an unknown partition).
    pub fn slots_of(&self, partition: PartitionId) -> &[Slot] {
        self.by_partition.get(partition as usize).map_or(&[], Vec::as_slice)
    }

    /// Slots whose owner differs between `self` and `other`, ascending.
    pub fn moved_slots(&self, other: &SlotTable) -> Vec<Slot> {
        (0..SLOT_COUNT).filter(|&s| self.owner[s] != other.owner[s]).map(|s| s as Slot).collect()
    }
}

/// Number of partitions for `nodes` nodes at replication factor `k`: floor(N/K), at least 1.
pub fn partition_count(nodes: usize, k: usize) -> usize {
    (nodes / k.max(1)).max(1)
}

/// The initial layout: members sorted, cut into `partition_count` chunks of `k`; the leftover
/// `N mod K` nodes (the highest in sort order) become proxies. With fewer than `k` nodes the single
/// partition holds them all ("degraded"). Returns `(partitions, proxies)`.
pub fn chunk_members<S: AsRef<str> + Ord + Clone>(members: &[S], k: usize) -> (Vec<Vec<S>>, Vec<S>) {
    let mut sorted = members.to_vec();
    sorted.sort();
    sorted.dedup();
    let k = k.max(1);
    if sorted.len() < k {
        return if sorted.is_empty() { (Vec::new(), Vec::new()) } else { (vec![sorted], Vec::new()) };
    }
    let count = partition_count(sorted.len(), k);
    let proxies = sorted.split_off(count * k);
    let partitions = sorted.chunks(k).map(<[S]>::to_vec).collect();
    (partitions, proxies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn table(p: u32) -> &'static SlotTable {
        static TABLES: OnceLock<Vec<SlotTable>> = OnceLock::new();
        &TABLES.get_or_init(|| (0..=12).map(SlotTable::new).collect())[p as usize]
    }

    #[test]
    fn slot_is_stable_and_in_range() {
        // Pinned values: changing the hash would silently move every key of every existing cluster.
        assert_eq!(slot_of(b""), 0xda39 >> 2);
        assert_eq!(slot_of(b"foo"), 0x0bee >> 2);
        for key in ["a", "b", "key_1", "x".repeat(200).as_str()] {
            assert!((slot_of(key.as_bytes()) as usize) < SLOT_COUNT);
        }
    }

    #[test]
    fn tables_are_balanced_within_one_slot() {
        for p in 1..=12 {
            let t = table(p);
            let sizes: Vec<usize> = (0..p).map(|i| t.slots_of(i).len()).collect();
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= 1, "p={p} sizes={sizes:?}");
            assert_eq!(sizes.iter().sum::<usize>(), SLOT_COUNT);
        }
    }

    #[test]
    fn growing_by_one_partition_moves_the_minimum() {
        for p in 1..12 {
            let moved = table(p).moved_slots(table(p + 1));
            assert_eq!(moved.len(), SLOT_COUNT / (p as usize + 1), "p={p}");
            assert!(moved.iter().all(|&s| table(p + 1).owner(s) == p), "only the new partition gains");
        }
    }

    #[test]
    fn growing_by_several_moves_only_to_new_partitions() {
        for (from, to) in [(2, 5), (3, 4), (1, 8)] {
            let moved = table(from).moved_slots(table(to));
            assert!(moved.iter().all(|&s| table(to).owner(s) >= from));
            let minimum: usize = (from..to).map(|p| table(to).slots_of(p).len()).sum();
            assert_eq!(moved.len(), minimum);
        }
    }

    #[test]
    fn chunking_matches_the_hw4_examples() {
        let nodes = |n: usize| (0..n).map(|i| format!("10.0.0.{i}:8080")).collect::<Vec<_>>();
        for (n, k, parts, proxies) in
            [(4, 2, 2, 0), (7, 2, 3, 1), (6, 3, 2, 0), (7, 3, 2, 1), (1, 2, 1, 0), (3, 5, 1, 0)]
        {
            let (p, x) = chunk_members(&nodes(n), k);
            assert_eq!((p.len(), x.len()), (parts, proxies), "n={n} k={k}");
            assert_eq!(p.iter().map(Vec::len).sum::<usize>() + x.len(), n);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_key_has_exactly_one_owner(key in proptest::collection::vec(any::<u8>(), 0..64), p in 1u32..=12) {
            let owner = table(p).owner_of_key(&key);
            prop_assert!(owner < p);
            let owners = (0..p).filter(|&i| table(p).slots_of(i).contains(&slot_of(&key))).count();
            prop_assert_eq!(owners, 1);
        }

        #[test]
        fn chunking_ignores_input_order(mut ids in proptest::collection::btree_set("[a-z]{1,6}", 0..12), k in 1usize..4, seed in any::<u64>()) {
            let sorted: Vec<String> = std::mem::take(&mut ids).into_iter().collect();
            let mut shuffled = sorted.clone();
            // A cheap deterministic shuffle driven by the seed.
            let len = shuffled.len();
            for i in (1..len).rev() {
                let j = ((seed.rotate_left(i as u32) ^ i as u64) % (i as u64 + 1)) as usize;
                shuffled.swap(i, j);
            }
            prop_assert_eq!(chunk_members(&sorted, k), chunk_members(&shuffled, k));
        }

        #[test]
        fn ten_thousand_keys_spread_within_a_few_percent(p in 2u32..=8, salt in any::<u32>()) {
            let t = table(p);
            let mut counts = vec![0usize; p as usize];
            for i in 0..10_000 {
                counts[t.owner_of_key(format!("key{salt}_{i}").as_bytes()) as usize] += 1;
            }
            let mean = 10_000.0 / p as f64;
            let std = (counts.iter().map(|&c| (c as f64 - mean).powi(2)).sum::<f64>() / p as f64).sqrt();
            // Binomial noise alone is ~1.4% at p=2 and ~3.3% at p=8; 6% is a few percent with margin.
            prop_assert!(std / mean < 0.06, "counts={:?} std/mean={}", counts, std / mean);
        }
    }
}
