//! Storage: the durable map from key to its newest [`Record`], behind the [`Store`] trait.
//!
//! Invariants every implementation keeps:
//! - `apply` is newest-wins per key: a record replaces the stored one only if its [`Version`] is
//!   greater, so applying the same records in any order, any number of times, converges
//!   (replication, anti-entropy and rebalancing all lean on this).
//! - When `apply` returns `Ok`, the records are durable (fsynced) — acknowledgements wait for it.
//! - Deletes are records too (tombstones, `value: None`) so they replicate and win like writes.
//! - Per-slot digests ([`SlotDigests`]) always describe exactly the stored versions, so two replicas
//!   with equal digests for a slot hold the same versions of the same keys.

mod memory;
mod memtable;
mod redb_store;
mod wal;

/// Opens a write-ahead log file and returns how many intact records it holds (for fuzzing).
pub fn replay_wal_for_fuzzing(path: &std::path::Path) -> std::io::Result<usize> {
    wal::Wal::open(path).map(|(_, records)| records.len())
}

pub use memory::MemoryStore;
pub use redb_store::RedbStore;

use crate::causal::{VectorClock, Version};
use crate::placement::{SLOT_COUNT, Slot};
use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// One version of one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Total order among versions of the key; the greatest wins everywhere.
    pub version: Version,
    /// Causal context of the write (the client's payload merged with the key's previous clock).
    pub clock: VectorClock,
    /// The value, or `None` for a delete (tombstone).
    pub value: Option<Bytes>,
}

impl Record {
    /// True for a tombstone.
    pub fn is_deleted(&self) -> bool {
        self.value.is_none()
    }

    /// Encoded size in bytes, used to budget transfer batches.
    pub fn approx_size(&self) -> usize {
        self.value.as_ref().map_or(0, Bytes::len) + self.version.writer.len() + 16 + self.clock.iter().count() * 24
    }
}

/// What `apply` did with one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Stored; the key had no live value before (absent or a tombstone).
    Created,
    /// Stored; it replaced an older live value.
    Replaced,
    /// Not stored: the store already had this version or a newer one.
    Stale,
}

/// A storage failure. Always a server-side problem (5xx), never the client's.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine: {0}")]
    Engine(String),
    #[error("stored record for key {key:?} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("the storage writer has stopped")]
    Closed,
}

/// Key counts, for metrics and status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    pub live_keys: u64,
    pub tombstones: u64,
    /// Key and value bytes of the live keys (what the node holds for clients, before any storage
    /// overhead).
    #[serde(default)]
    pub live_bytes: u64,
}

/// The storage boundary. Reads are synchronous (they never wait for writers); writes are async
/// because they wait for a group commit.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The stored record for `key`, tombstones included.
    fn get(&self, key: &str) -> Result<Option<Record>, StoreError>;

    /// Applies each record newest-wins, durably. One outcome per input record, in order.
    async fn apply(&self, batch: Vec<(String, Record)>) -> Result<Vec<Applied>, StoreError>;

    /// Every record in `slot`, ordered by key.
    fn scan_slot(&self, slot: Slot) -> Result<Vec<(String, Record)>, StoreError>;

    /// Removes every record of the given slots (they moved to another partition). Returns how many.
    async fn prune(&self, slots: Vec<Slot>) -> Result<u64, StoreError>;

    /// Digests of the stored versions, per slot.
    fn digests(&self) -> &SlotDigests;

    /// The largest timestamp ever stored, so a restarted node's clock starts above it.
    fn max_timestamp(&self) -> u64;

    /// Durable commits so far and the records they carried (group-commit efficiency).
    fn commit_counts(&self) -> CommitCounts {
        CommitCounts::default()
    }
}

/// Group-commit counters: `records / commits` is the mean group size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitCounts {
    pub commits: u64,
    pub records: u64,
}

/// Order-independent digest of the versions stored in each slot, plus key counts.
///
/// The digest of a slot is the XOR of [`version_hash`] over its records, so a writer updates it in
/// O(1) per change (XOR the old version out, the new one in). Atomics because readers (anti-entropy,
/// metrics) look at it while the single writer changes it.
pub struct SlotDigests {
    slots: Vec<AtomicU64>,
    /// Records (live and tombstones) per slot.
    records: Vec<AtomicI64>,
    /// Key and value bytes of the live records, per slot.
    bytes: Vec<AtomicI64>,
    live_keys: AtomicI64,
    tombstones: AtomicI64,
    live_bytes: AtomicI64,
}

impl Default for SlotDigests {
    fn default() -> Self {
        SlotDigests {
            slots: (0..SLOT_COUNT).map(|_| AtomicU64::new(0)).collect(),
            records: (0..SLOT_COUNT).map(|_| AtomicI64::new(0)).collect(),
            bytes: (0..SLOT_COUNT).map(|_| AtomicI64::new(0)).collect(),
            live_keys: AtomicI64::new(0),
            tombstones: AtomicI64::new(0),
            live_bytes: AtomicI64::new(0),
        }
    }
}

impl SlotDigests {
    /// The digest of one slot (0 for an empty slot).
    pub fn get(&self, slot: Slot) -> u64 {
        self.slots[slot as usize].load(Ordering::Acquire)
    }

    /// Records (live and tombstones) stored in `slot`.
    pub fn records_in(&self, slot: Slot) -> u64 {
        self.records[slot as usize].load(Ordering::Acquire).max(0) as u64
    }

    /// Records that `key` in `slot` went from `old` to `new` (either may be absent).
    pub fn update(&self, slot: Slot, key: &str, old: Option<&Record>, new: Option<&Record>) {
        let mut delta = 0;
        for (record, sign) in [(old, -1), (new, 1)] {
            if let Some(record) = record {
                self.records[slot as usize].fetch_add(sign, Ordering::AcqRel);
                delta ^= version_hash(key, record);
                let counter = if record.is_deleted() { &self.tombstones } else { &self.live_keys };
                counter.fetch_add(sign, Ordering::AcqRel);
                if let Some(value) = &record.value {
                    let size = sign * (key.len() + value.len()) as i64;
                    self.bytes[slot as usize].fetch_add(size, Ordering::AcqRel);
                    self.live_bytes.fetch_add(size, Ordering::AcqRel);
                }
            }
        }
        self.slots[slot as usize].fetch_xor(delta, Ordering::AcqRel);
    }

    /// Forgets a whole slot (after pruning it).
    pub fn clear_slot(&self, slot: Slot, live: i64, tombstones: i64) {
        self.slots[slot as usize].store(0, Ordering::Release);
        self.records[slot as usize].store(0, Ordering::Release);
        let bytes = self.bytes[slot as usize].swap(0, Ordering::AcqRel);
        self.live_keys.fetch_sub(live, Ordering::AcqRel);
        self.tombstones.fetch_sub(tombstones, Ordering::AcqRel);
        self.live_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Current key counts.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            live_keys: self.live_keys.load(Ordering::Acquire).max(0) as u64,
            tombstones: self.tombstones.load(Ordering::Acquire).max(0) as u64,
            live_bytes: self.live_bytes.load(Ordering::Acquire).max(0) as u64,
        }
    }
}

/// A stable 64-bit hash of one stored version (key, timestamp, writer, tombstone flag). SHA-1 so
/// that every node, whatever its build, computes the same digests.
pub fn version_hash(key: &str, record: &Record) -> u64 {
    let mut h = Sha1::new();
    h.update((key.len() as u32).to_be_bytes());
    h.update(key.as_bytes());
    h.update(record.version.ts.to_be_bytes());
    h.update(record.version.writer.as_bytes());
    h.update([u8::from(record.is_deleted())]);
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("SHA-1 digests are 20 bytes"))
}

/// Decides what storing `new` over `current` does (shared by every implementation).
pub fn decide(current: Option<&Record>, new: &Record) -> Applied {
    match current {
        Some(cur) if cur.version >= new.version => Applied::Stale,
        Some(cur) if !cur.is_deleted() => Applied::Replaced,
        _ => Applied::Created,
    }
}

#[cfg(test)]
mod model_tests;
