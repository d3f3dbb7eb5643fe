//! [`Store`] in memory, for tests and for the in-process cluster: same semantics as the durable
//! store (newest-wins, digests, tombstones), no durability.

use super::{Applied, Record, SlotDigests, Store, StoreError, decide};
use crate::placement::{Slot, slot_of};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// An in-memory store. The map sits behind one `std` mutex: tests only, never held across `.await`.
#[derive(Default)]
pub struct MemoryStore {
    records: Mutex<BTreeMap<(Slot, String), Record>>,
    digests: SlotDigests,
    max_ts: AtomicU64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Slot, String), Record>> {
        self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        Ok(self.map().get(&(slot_of(key.as_bytes()), key.to_owned())).cloned())
    }

    async fn apply(&self, batch: Vec<(String, Record)>) -> Result<Vec<Applied>, StoreError> {
        let mut map = self.map();
        Ok(batch
            .into_iter()
            .map(|(key, record)| {
                let slot = slot_of(key.as_bytes());
                let current = map.get(&(slot, key.clone()));
                let outcome = decide(current, &record);
                if outcome != Applied::Stale {
                    self.digests.update(slot, &key, current, Some(&record));
                    self.max_ts.fetch_max(record.version.ts, Ordering::AcqRel);
                    map.insert((slot, key), record);
                }
                outcome
            })
            .collect())
    }

    fn scan_slot(&self, slot: Slot) -> Result<Vec<(String, Record)>, StoreError> {
        Ok(self
            .map()
            .range((slot, String::new())..)
            .take_while(|((s, _), _)| *s == slot)
            .map(|((_, k), r)| (k.clone(), r.clone()))
            .collect())
    }

    async fn prune(&self, slots: Vec<Slot>) -> Result<u64, StoreError> {
        let mut map = self.map();
        let mut removed = 0;
        for slot in slots {
            let keys: Vec<_> = map
                .range((slot, String::new())..)
                .take_while(|((s, _), _)| *s == slot)
                .map(|(k, r)| (k.clone(), r.is_deleted()))
                .collect();
            let dead = keys.iter().filter(|(_, d)| *d).count() as i64;
            for (k, _) in &keys {
                map.remove(k);
            }
            removed += keys.len() as u64;
            self.digests.clear_slot(slot, keys.len() as i64 - dead, dead);
        }
        Ok(removed)
    }

    fn digests(&self) -> &SlotDigests {
        &self.digests
    }

    fn max_timestamp(&self) -> u64 {
        self.max_ts.load(Ordering::Acquire)
    }
}
