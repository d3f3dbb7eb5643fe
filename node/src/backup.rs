//! Consistent backups: what each key was at one cut timestamp, read while clients keep writing;
//! and restoring records onto their owners.
//!
//! A backup runner (`kvs-backup`) asks every member to *hold* (this module's [`Holds`]), takes the
//! greatest clock they answer as the cut, then reads each partition from one replica, a page of
//! whole slots at a time ([`Node::read_backup_page`]).
//!
//! While any hold is active, every `apply` goes through [`HoldingStore`], which first remembers
//! the key's stored version and every incoming one — whether it wins or is refused as stale. So a
//! holding node knows every version of a key it has stored or been sent since the hold began, and
//! the key's state at the cut is the greatest of those versions at or below the cut
//! ([`version_at`]), or nothing when all of them are newer (the key was created after the cut).
//!
//! Why the cut covers every write acknowledged before the backup began: such a write is stored on
//! every live replica, and a node's answer to a hold is at least every timestamp it has issued,
//! observed or stored, so the write's timestamp is at most the cut. A replica that missed it (it
//! was cut off) gets it back when the read asks it to catch up from its partition's other replicas
//! first. Why nothing after the cut appears: versions above the cut are never returned.
//!
//! Invariants: holding changes no stored data and no answer; the remembered versions are bounded
//! ([`MAX_HELD_VERSIONS`]: past it, reads of the backup are refused rather than answered from an
//! incomplete memory); they are dropped when the last hold ends or expires.

use crate::causal::{VectorClock, Version};
use crate::node::Node;
use crate::placement::Slot;
use crate::protocol::{PeerRequest, PeerResponse};
use crate::store::{Applied, Record, SlotDigests, Store, StoreError};
use async_trait::async_trait;
use kvs_api::backup::{BackupPage, BackupRecord, ReadRequest};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most versions held at once (beyond the store's): enough for minutes of heavy writes during a
/// backup; past it a backup fails and says why instead of using an incomplete memory.
pub const MAX_HELD_VERSIONS: usize = 4_000_000;
/// Longest hold a runner may ask for before renewing it.
const MAX_TTL: Duration = Duration::from_secs(3600);

/// Why a backup read is refused.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup {0:?} holds nothing here (never started, released, or expired): start the backup again")]
    NotHeld(String),
    #[error("more than {MAX_HELD_VERSIONS} versions were written during the backup; retry it when writes are fewer")]
    Overflowed,
    #[error(
        "the view changed during the backup (this node is on epoch {mine:?}, the backup reads {theirs}); start it again"
    )]
    ViewChanged { mine: Option<u64>, theirs: u64 },
    #[error("this node is not a replica of partition {0} in the backup's view")]
    NotAReplica(u32),
    #[error("this node has not caught up with partition {0} and no other replica answered; read another replica")]
    Behind(u32),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Default)]
struct HoldState {
    /// Backup id → when its hold ends unless renewed.
    holds: BTreeMap<String, Instant>,
    /// Versions seen while holding, by (slot, key): slot first so a page reads a range.
    seen: BTreeMap<(Slot, String), Vec<Record>>,
    versions: usize,
    overflowed: bool,
}

/// The holds of this node and the versions they keep.
#[derive(Default)]
pub struct Holds {
    /// Fast path for `apply`: whether any hold is active.
    active: AtomicBool,
    /// `std` mutex: never held across `.await`.
    state: Mutex<HoldState>,
}

impl Holds {
    fn lock(&self) -> std::sync::MutexGuard<'_, HoldState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts or renews `backup`'s hold for `ttl`.
    pub fn hold(&self, backup: &str, ttl: Duration) {
        let mut s = self.lock();
        s.holds.insert(backup.to_owned(), Instant::now() + ttl.min(MAX_TTL));
        self.active.store(true, Ordering::Release);
    }

    /// Ends `backup`'s hold (and forgets every version when it was the last).
    pub fn release(&self, backup: &str) {
        let mut s = self.lock();
        s.holds.remove(backup);
        self.forget_if_idle(&mut s);
    }

    fn forget_if_idle(&self, s: &mut HoldState) {
        let now = Instant::now();
        s.holds.retain(|_, until| *until > now);
        if s.holds.is_empty() {
            *s = HoldState::default();
            self.active.store(false, Ordering::Release);
        }
    }

    /// Whether `backup` holds here now, and what was kept is complete.
    fn check(&self, backup: &str) -> Result<(), BackupError> {
        let mut s = self.lock();
        self.forget_if_idle(&mut s);
        match (s.holds.contains_key(backup), s.overflowed) {
            (false, _) => Err(BackupError::NotHeld(backup.to_owned())),
            (true, true) => Err(BackupError::Overflowed),
            (true, false) => Ok(()),
        }
    }

    fn remember(&self, slot: Slot, key: &str, records: impl IntoIterator<Item = Record>) {
        let mut s = self.lock();
        if s.holds.is_empty() || s.overflowed {
            return;
        }
        let mut added = 0;
        let seen = s.seen.entry((slot, key.to_owned())).or_default();
        for r in records {
            if !seen.iter().any(|have| have.version == r.version) {
                seen.push(r);
                added += 1;
            }
        }
        s.versions += added;
        if s.versions > MAX_HELD_VERSIONS {
            s.overflowed = true;
            s.seen.clear();
        }
    }

    /// The versions kept for the keys of `slot`.
    fn seen_in(&self, slot: Slot) -> HashMap<String, Vec<Record>> {
        let s = self.lock();
        let from = (slot, String::new());
        s.seen.range(from..).take_while(|((sl, _), _)| *sl == slot).map(|((_, k), v)| (k.clone(), v.clone())).collect()
    }
}

/// The key's state at `cut`: the greatest version at or below it among what the store holds now
/// and what a hold kept (`None`: every version is newer, the key did not exist at the cut).
pub fn version_at<'a>(current: Option<&'a Record>, seen: &'a [Record], cut: u64) -> Option<&'a Record> {
    current.into_iter().chain(seen).filter(|r| r.version.ts <= cut).max_by(|a, b| a.version.cmp(&b.version))
}

/// A store that, while a hold is active, remembers every version it replaces or refuses.
pub struct HoldingStore {
    inner: Arc<dyn Store>,
    holds: Arc<Holds>,
}

impl HoldingStore {
    pub fn new(inner: Arc<dyn Store>, holds: Arc<Holds>) -> Self {
        HoldingStore { inner, holds }
    }
}

#[async_trait]
impl Store for HoldingStore {
    fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.inner.get(key)
    }

    async fn apply(&self, batch: Vec<(String, Record)>) -> Result<Vec<Applied>, StoreError> {
        if self.holds.active.load(Ordering::Acquire) {
            // Before the apply: a version it replaces is remembered before it is gone.
            for (key, record) in &batch {
                let stored = self.inner.get(key)?;
                let slot = kvs_api::slot_of(key.as_bytes());
                self.holds.remember(slot, key, stored.into_iter().chain([record.clone()]));
            }
        }
        self.inner.apply(batch).await
    }

    fn scan_slot(&self, slot: Slot) -> Result<Vec<(String, Record)>, StoreError> {
        self.inner.scan_slot(slot)
    }

    async fn prune(&self, slots: Vec<Slot>) -> Result<u64, StoreError> {
        self.inner.prune(slots).await
    }

    fn digests(&self) -> &SlotDigests {
        self.inner.digests()
    }

    fn max_timestamp(&self) -> u64 {
        self.inner.max_timestamp()
    }

    fn commit_counts(&self) -> crate::store::CommitCounts {
        self.inner.commit_counts()
    }
}

pub fn to_backup(key: String, r: &Record) -> BackupRecord {
    BackupRecord {
        key,
        value: r.value.clone(),
        timestamp: r.version.ts,
        writer: r.version.writer.clone(),
        clock: r.clock.iter().map(|(n, c)| (n.to_owned(), c)).collect(),
    }
}

pub fn from_backup(b: BackupRecord) -> (String, Record) {
    let mut clock = VectorClock::new();
    for (node, counter) in &b.clock {
        clock.observe(node, *counter);
    }
    (b.key, Record { version: Version { ts: b.timestamp, writer: b.writer }, clock, value: b.value })
}

impl Node {
    /// Starts or renews a hold; answers the clock a cut must be at least.
    pub fn backup_hold(&self, backup: &str, ttl: Duration) -> u64 {
        self.holds.hold(backup, ttl);
        // After the hold is active: every version stored from now on is remembered, and every
        // one stored before is at or below this. The wall clock makes the cut the moment the
        // backup began (as people read it), not the last write's.
        self.hlc.peek().max(self.store.max_timestamp()).max(self.clock.wall_micros())
    }

    pub fn backup_release(&self, backup: &str) {
        self.holds.release(backup);
    }

    /// One page of `request.partition` as of the cut: the records of whole slots, in slot order.
    pub async fn read_backup_page(&self, request: &ReadRequest) -> Result<BackupPage, BackupError> {
        self.holds.check(&request.backup)?;
        let view = self
            .view()
            .filter(|v| v.epoch() == request.view_epoch)
            .ok_or(BackupError::ViewChanged { mine: self.view().map(|v| v.epoch()), theirs: request.view_epoch })?;
        let partition = request.partition;
        let replicas = view.members(partition);
        if !replicas.iter().any(|m| m == self.id()) {
            return Err(BackupError::NotAReplica(partition));
        }
        let slots = view.table().slots_of(partition);
        let start = match request.after_slot {
            Some(after) => slots.partition_point(|&s| s <= after),
            None => 0,
        };
        let mut synced = false;
        if request.catch_up {
            for peer in replicas.iter().filter(|m| *m != self.id() && !self.liveness.is_dead(m)) {
                match self.pull_differing(&view, peer, &slots[start..]).await {
                    Ok(()) => synced = true,
                    Err(e) => tracing::warn!(%peer, error = %e, "backup: could not catch up from a replica"),
                }
            }
        }
        if !synced && !self.is_caught_up() && replicas.len() > 1 {
            return Err(BackupError::Behind(partition));
        }
        let mut page = BackupPage::default();
        for &slot in &slots[start..] {
            let mut seen = self.holds.seen_in(slot);
            for (key, record) in self.store.scan_slot(slot)? {
                let kept = seen.remove(&key).unwrap_or_default();
                if let Some(at_cut) = version_at(Some(&record), &kept, request.cut) {
                    page.records.push(to_backup(key, at_cut));
                }
            }
            // Keys a hold remembers that the store no longer has (none today: tombstones stay).
            for (key, kept) in seen {
                if let Some(at_cut) = version_at(None, &kept, request.cut) {
                    page.records.push(to_backup(key, at_cut));
                }
            }
            page.last_slot = Some(slot);
            if page.records.len() >= request.max_records as usize {
                break;
            }
        }
        page.done = page.last_slot.is_none_or(|last| slots.last() == Some(&last));
        // A hold that expired or overflowed while this page was read may have missed versions.
        self.holds.check(&request.backup)?;
        Ok(page)
    }

    /// Stores restored records on every owner of their keys under the current view; all of them
    /// must take them (a restore is complete or it failed). Restored records carry no causal
    /// clock (see below): sessions of the backed-up cluster do not carry over.
    pub async fn restore_records(&self, records: Vec<BackupRecord>) -> Result<u64, String> {
        let view = self.view().ok_or("this node has no view yet; restore through a member")?;
        if self.pending().is_some() {
            return Err("a view change is under way; restore once it has finished".into());
        }
        let mut by_partition: BTreeMap<u32, Vec<(String, Record)>> = BTreeMap::new();
        for b in records {
            let (key, mut record) = from_backup(b);
            // The clock names the backed-up cluster's nodes: a context carrying them would have
            // this cluster's replicas wait for writes they can never be sent. A consistent cut is
            // causally closed, so once the restore is complete nothing a restored version depends
            // on is missing: it keeps its version (newest-wins still orders it) and no clock.
            record.clock = VectorClock::new();
            by_partition.entry(view.partition_of_key(&key)).or_default().push((key, record));
        }
        let mut stored = 0;
        for (partition, records) in by_partition {
            let count = records.len() as u64;
            let calls = view.members(partition).iter().map(|owner| {
                let records = records.clone();
                async move {
                    if owner == self.id() {
                        return self.apply_replicated(records).await.map(|_| ()).map_err(|e| e.to_string());
                    }
                    let request = PeerRequest::hand_over(records, self.id());
                    match self.call_peer(owner, &request, self.settings.replica_deadline).await {
                        Ok(PeerResponse::Replicated) => Ok(()),
                        Ok(other) => Err(format!("{owner} answered {other:?}")),
                        Err(e) => Err(e.to_string()),
                    }
                }
            });
            for result in futures::future::join_all(calls).await {
                result.map_err(|e| format!("partition {partition}: {e}; retry the restore"))?;
            }
            stored += count;
        }
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ts: u64, value: Option<&str>) -> Record {
        Record {
            version: Version { ts, writer: "n:1".into() },
            clock: VectorClock::new(),
            value: value.map(|v| bytes::Bytes::copy_from_slice(v.as_bytes())),
        }
    }

    #[test]
    fn the_state_at_the_cut_is_the_newest_version_at_or_below_it() {
        let (old, mid, new) = (record(10, Some("a")), record(20, Some("b")), record(30, None));
        // Overwritten (and then deleted) after the cut: the version before it.
        assert_eq!(version_at(Some(&new), &[old.clone(), mid.clone()], 25), Some(&mid));
        // A version that arrived late and lost to a newer one still counts at its time.
        assert_eq!(version_at(Some(&new), &[mid.clone(), old.clone()], 15), Some(&old));
        // Created after the cut: absent.
        assert_eq!(version_at(Some(&new), &[], 25), None);
        // Deleted before the cut: the tombstone (a restore over data deletes it too).
        assert_eq!(version_at(Some(&new), &[], 30), Some(&new));
    }

    #[tokio::test]
    async fn a_hold_remembers_replaced_and_refused_versions_and_forgets_them_when_released() {
        let holds = Arc::new(Holds::default());
        let store = HoldingStore::new(Arc::new(crate::store::MemoryStore::new()), holds.clone());
        store.apply(vec![("k".into(), record(10, Some("a")))]).await.unwrap();
        holds.hold("b1", Duration::from_secs(60));
        store.apply(vec![("k".into(), record(30, Some("c")))]).await.unwrap();
        store.apply(vec![("k".into(), record(20, Some("b")))]).await.unwrap(); // stale, refused
        let slot = kvs_api::slot_of(b"k");
        let seen = holds.seen_in(slot).remove("k").unwrap();
        let current = store.get("k").unwrap();
        assert_eq!(version_at(current.as_ref(), &seen, 25).and_then(|r| r.value.clone()).unwrap(), "b");
        assert_eq!(version_at(current.as_ref(), &seen, 15).and_then(|r| r.value.clone()).unwrap(), "a");
        assert!(holds.check("b1").is_ok());
        assert!(matches!(holds.check("other"), Err(BackupError::NotHeld(_))));
        holds.release("b1");
        assert!(holds.seen_in(slot).is_empty() && !holds.active.load(Ordering::Acquire));
    }
}
