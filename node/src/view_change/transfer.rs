//! Moving data in a view change: a source catches up from its co-sources and streams its slots to
//! the new owners in acknowledged batches; every node prunes what it no longer owns once an owner
//! is known to hold it.

use super::lock;
use crate::node::Node;
use crate::placement::{SLOT_COUNT, Slot};
use crate::protocol::{Assignment, PeerRequest, PeerResponse, TransferError};
use crate::store::Record;
use crate::view::View;
use futures::future::join_all;
use kvs_api::{RebalancePhase, RebalanceProgress};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

/// Records per transfer batch.
const BATCH_RECORDS: usize = 2000;
/// Bytes per transfer batch (whichever limit is reached first).
const BATCH_BYTES: usize = 4 << 20;
/// Slots per digest comparison.
const DIGEST_CHUNK: usize = 1024;
/// Slots per catch-up exchange.
const SYNC_CHUNK: usize = 64;
/// Budget for one transfer batch (or catch-up exchange) to reach a live receiver and be stored.
const TRANSFER_BATCH_DEADLINE: Duration = Duration::from_secs(30);
/// Budget for a peer's digests of one chunk of slots.
const DIGEST_DEADLINE: Duration = Duration::from_secs(10);
/// Attempts at one batch, backing off 100 ms, 200 ms, 400 ms.
const BATCH_ATTEMPTS: u32 = 3;

/// The pace of one source's transfer: at most `rate` keys per second over all its receivers (0: no
/// limit). Each batch is given its share of time after the one before it, so a source that fell
/// behind (a slow receiver) resumes at the rate instead of catching up in a burst.
#[derive(Debug)]
pub(crate) struct Pace {
    rate: u64,
    /// When the next batch may go.
    next: tokio::time::Instant,
}

impl Pace {
    pub(crate) fn new(rate: u64, now: tokio::time::Instant) -> Self {
        Pace { rate, next: now }
    }

    /// Admits `keys` more at `now`; returns how long to wait before sending them.
    pub(crate) fn admit(&mut self, keys: usize, now: tokio::time::Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let at = self.next.max(now);
        self.next = at + Duration::from_secs_f64(keys as f64 / self.rate as f64);
        at - now
    }
}

/// Waits until `pace` lets `keys` more go (the lock is held only to count).
async fn wait_for(pace: &Mutex<Pace>, keys: usize) {
    let wait = lock(pace).admit(keys, tokio::time::Instant::now());
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}

fn exchange(peer: &str, detail: impl std::fmt::Display) -> TransferError {
    TransferError::Exchange { peer: peer.to_owned(), detail: detail.to_string() }
}

impl Node {
    /// A source's work: catch up from the co-sources, then stream each slot to its receivers.
    pub(super) async fn send_slots(
        &self,
        view: &View,
        epoch: u64,
        assignments: Vec<Assignment>,
        rate: u64,
    ) -> Result<(u64, u64), TransferError> {
        let mut by_co: BTreeMap<&String, Vec<Slot>> = BTreeMap::new();
        for a in &assignments {
            for c in &a.co_sources {
                by_co.entry(c).or_default().push(a.slot);
            }
        }
        for (co, slots) in by_co {
            if let Err(e) = self.pull_differing(view, co, &slots).await {
                tracing::warn!(peer = %co, error = %e, "could not catch up from a co-source; sending what this node has");
            }
        }
        let mut per_receiver: BTreeMap<&String, Vec<Slot>> = BTreeMap::new();
        for a in &assignments {
            for r in &a.receivers {
                per_receiver.entry(r).or_default().push(a.slot);
            }
        }
        let digests = self.store.digests();
        let total: u64 = per_receiver.values().flatten().map(|&s| digests.records_in(s)).sum();
        *lock(&self.changes.transfer) =
            RebalanceProgress { epoch, phase: RebalancePhase::Transferring, total_keys: total, ..Default::default() };
        let pace = Mutex::new(Pace::new(rate, tokio::time::Instant::now()));
        let streams = per_receiver.into_iter().map(|(receiver, slots)| self.stream_to(receiver, slots, &pace));
        let (mut keys, mut bytes) = (0, 0);
        for result in join_all(streams).await {
            let (k, b) = result?;
            keys += k;
            bytes += b;
        }
        lock(&self.changes.transfer).phase = RebalancePhase::Sent;
        Ok((keys, bytes))
    }

    /// Streams slots to one receiver in acknowledged batches, each sent when `pace` allows.
    async fn stream_to(
        &self,
        receiver: &str,
        slots: Vec<Slot>,
        pace: &Mutex<Pace>,
    ) -> Result<(u64, u64), TransferError> {
        let (mut keys, mut bytes) = (0u64, 0u64);
        let mut batch: Vec<(String, Record)> = Vec::new();
        let mut batch_bytes = 0;
        for (i, &slot) in slots.iter().enumerate() {
            for (key, record) in self.store.scan_slot(slot)? {
                batch_bytes += record.approx_size() + key.len();
                batch.push((key, record));
                if batch.len() >= BATCH_RECORDS || batch_bytes >= BATCH_BYTES {
                    wait_for(pace, batch.len()).await;
                    let (k, b) = self.send_batch(receiver, std::mem::take(&mut batch)).await?;
                    (keys, bytes, batch_bytes) = (keys + k, bytes + b, 0);
                }
            }
            if i + 1 == slots.len() && !batch.is_empty() {
                wait_for(pace, batch.len()).await;
                let (k, b) = self.send_batch(receiver, std::mem::take(&mut batch)).await?;
                (keys, bytes) = (keys + k, bytes + b);
            }
        }
        Ok((keys, bytes))
    }

    async fn send_batch(&self, receiver: &str, records: Vec<(String, Record)>) -> Result<(u64, u64), TransferError> {
        let keys = records.len() as u64;
        let bytes: u64 = records.iter().map(|(_, r)| r.value.as_ref().map_or(0, |v| v.len() as u64)).sum();
        // Transfers carry others' writes: they vouch for nothing (floor 0).
        let request = PeerRequest::hand_over(records, self.id());
        let mut last_error = String::new();
        for attempt in 0..BATCH_ATTEMPTS {
            match self.call_peer(receiver, &request, TRANSFER_BATCH_DEADLINE).await {
                Ok(PeerResponse::Replicated) => {
                    let mut t = lock(&self.changes.transfer);
                    t.moved_keys += keys;
                    t.moved_bytes += bytes;
                    return Ok((keys, bytes));
                }
                Ok(other) => last_error = format!("unexpected answer {other:?}"),
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        Err(TransferError::Send { peer: receiver.to_owned(), detail: last_error })
    }

    /// Pulls records of `slots` that differ from `peer` (both on `view`), newest-wins.
    pub(crate) async fn pull_differing(&self, view: &View, peer: &str, slots: &[Slot]) -> Result<(), TransferError> {
        for chunk in slots.chunks(DIGEST_CHUNK) {
            let differing = self.differing_slots(peer, chunk).await?;
            for part in differing.chunks(SYNC_CHUNK) {
                let records = self.scan_slots(part)?;
                let request = PeerRequest::SyncSlots { view_epoch: view.epoch(), slots: part.to_vec(), records };
                match self.call_peer(peer, &request, TRANSFER_BATCH_DEADLINE).await.map_err(|e| exchange(peer, e))? {
                    PeerResponse::Synced { records, .. } => {
                        self.apply_replicated(records).await?;
                    }
                    other => return Err(exchange(peer, format!("{other:?}"))),
                }
            }
        }
        Ok(())
    }

    /// Slots of `chunk` whose digest at `peer` differs from ours.
    async fn differing_slots(&self, peer: &str, chunk: &[Slot]) -> Result<Vec<Slot>, TransferError> {
        let request = PeerRequest::SlotDigests { slots: chunk.to_vec() };
        let theirs = match self.call_peer(peer, &request, DIGEST_DEADLINE).await.map_err(|e| exchange(peer, e))? {
            PeerResponse::Digests(d) => d.into_iter().collect::<HashMap<Slot, u64>>(),
            other => return Err(exchange(peer, format!("{other:?}"))),
        };
        let digests = self.store.digests();
        Ok(chunk.iter().copied().filter(|s| theirs.get(s).copied().unwrap_or(0) != digests.get(*s)).collect())
    }

    /// Drops every slot this node does not own under `view`, after making sure a live owner holds
    /// at least what this node holds (slots no owner could confirm are kept for a later attempt).
    /// Nothing is dropped unless `view` is still this node's view with no change pending when the
    /// store is pruned (a change begins only after a prune under way has finished).
    pub(crate) async fn prune_unowned(&self, view: &View) -> Result<u64, TransferError> {
        let mine = view.partition_of_node(self.id());
        let digests = self.store.digests();
        let mut by_partition: BTreeMap<u32, Vec<Slot>> = BTreeMap::new();
        for slot in 0..SLOT_COUNT as Slot {
            let owner = view.table().owner(slot);
            if Some(owner) != mine && digests.get(slot) != 0 {
                by_partition.entry(owner).or_default().push(slot);
            }
        }
        let mut prunable = Vec::new();
        for (partition, slots) in by_partition {
            for chunk in slots.chunks(DIGEST_CHUNK) {
                let mut confirmed = false;
                for owner in view.members(partition).iter().filter(|o| *o != self.id()) {
                    match self.push_differing(owner, chunk).await {
                        Ok(()) => confirmed = true,
                        Err(e) => {
                            tracing::warn!(peer = %owner, error = %e, "owner unreachable while pruning; keeping those slots for now")
                        }
                    }
                }
                if confirmed {
                    prunable.extend_from_slice(chunk);
                }
            }
        }
        let _pruning = self.changes.pruning.lock().await;
        if self.view().is_none_or(|v| v.epoch() != view.epoch()) || self.pending().is_some() {
            tracing::info!(
                view_epoch = view.epoch(),
                "the view changed while pruning: keeping everything for the next prune"
            );
            return Ok(0);
        }
        let removed = self.store.prune(prunable).await?;
        if removed > 0 {
            tracing::info!(view_epoch = view.epoch(), removed, "pruned keys this node no longer owns");
        }
        Ok(removed)
    }

    /// Sends `peer` every record of the slots in `chunk` whose digests differ.
    async fn push_differing(&self, peer: &str, chunk: &[Slot]) -> Result<(), TransferError> {
        let differing = self.differing_slots(peer, chunk).await?;
        let mut batch = Vec::new();
        for slot in differing {
            batch.extend(self.store.scan_slot(slot)?);
            if batch.len() >= BATCH_RECORDS {
                self.send_batch(peer, std::mem::take(&mut batch)).await?;
            }
        }
        if !batch.is_empty() {
            self.send_batch(peer, batch).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Pace;
    use std::time::Duration;
    use tokio::time::Instant;

    #[test]
    fn a_pace_spreads_batches_over_time() {
        let start = Instant::now();
        let mut pace = Pace::new(1000, start);
        // The first batch goes at once; the next waits for the first's share of the rate.
        assert_eq!(pace.admit(500, start), Duration::ZERO);
        assert_eq!(pace.admit(500, start), Duration::from_millis(500));
        // A source that fell behind goes at once, and earns no burst: the next waits again.
        assert_eq!(pace.admit(500, start + Duration::from_secs(5)), Duration::ZERO);
        assert_eq!(pace.admit(1, start + Duration::from_secs(5)), Duration::from_millis(500));
    }

    #[test]
    fn rate_zero_never_waits() {
        let start = Instant::now();
        let mut pace = Pace::new(0, start);
        assert!((0..100).all(|_| pace.admit(1_000_000, start).is_zero()));
    }
}
