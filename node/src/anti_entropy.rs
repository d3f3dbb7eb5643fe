//! Anti-entropy: replicas of a partition periodically compare what they store and repair each other,
//! so a replica that missed writes (down, paused, cut off) converges without client help.
//!
//! One round, per peer replica, a two-level Merkle comparison:
//! 1. send a summary (one hash over the partition's per-slot digests); equal summaries end it;
//! 2. otherwise the peer answers with one hash per bucket of [`BUCKET_SLOTS`] consecutive slots;
//! 3. for the buckets that differ, ask for the peer's per-slot digests, and for every slot that
//!    differs both sides send their records of that slot; each applies the other's newest-wins.
//!
//! A round in which a few keys changed therefore moves a few dozen hashes and those keys' slots,
//! not one digest per slot of the partition.
//!
//! Invariant: a round only ever applies records through `Store::apply`, so it can never replace a
//! newer version with an older one or resurrect a deleted key (tombstones are records too).

use crate::catch_up::RoundView;
use crate::node::Node;
use crate::placement::{PartitionId, Slot};
use crate::protocol::{PeerRequest, PeerResponse, Refusal};
use crate::store::{Record, StoreError};
use crate::view::View;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

/// Most slots exchanged in one `SyncSlots` request (bounds message size; the rest waits a round).
const MAX_SLOTS_PER_SYNC: usize = 64;
/// Consecutive slots (of a partition's, in slot order) summarised by one bucket hash.
pub const BUCKET_SLOTS: usize = 128;
/// Every this many rounds (5 s at the default interval), records of slots this node does not own
/// are handed to their owners and dropped: writes that reached it while it was behind a view
/// change (coordinated on its old view, or delivered late) would otherwise stay here for good.
const CLEANUP_EVERY: u64 = 25;

impl Node {
    /// This node's per-slot digests over `partition`'s slots, in slot order.
    fn slot_digests(&self, view: &View, partition: PartitionId) -> Vec<(Slot, u64)> {
        let digests = self.store.digests();
        view.table().slots_of(partition).iter().map(|&s| (s, digests.get(s))).collect()
    }

    /// One hash over this node's digests of its own partition (`None` for proxies).
    pub(crate) fn partition_digest(&self) -> Option<u64> {
        let view = self.view()?;
        let partition = view.partition_of_node(self.id())?;
        Some(summarize(&self.slot_digests(&view, partition)))
    }

    /// One round with every other replica of this node's partition. Returns records repaired here.
    pub async fn anti_entropy_round(&self) -> u64 {
        let Some(view) = self.view() else { return 0 };
        let Some(partition) = view.partition_of_node(self.id()) else {
            self.caught_up_after(RoundView::Proxy);
            return 0;
        };
        // Stable before digests: after a successful round the peer holds all our writes up to it.
        let my_stable = self.freshness.stable(&self.hlc);
        let mine = self.slot_digests(&view, partition);
        let summary = summarize(&mine);
        let mut repaired = 0;
        let mut synced_with_a_replica = false;
        let others: Vec<&String> = view.members(partition).iter().filter(|m| *m != self.id()).collect();
        for &peer in &others {
            match self.sync_with(&view, peer, partition, summary, &mine).await {
                Ok(n) => {
                    self.freshness.repaired(peer, my_stable);
                    repaired += n;
                    synced_with_a_replica = true;
                }
                Err(e) => tracing::debug!(peer = %peer, error = %e, "anti-entropy round failed"),
            }
        }
        self.metrics.anti_entropy_repairs.inc_by(repaired);
        let others_all_dead = others.iter().all(|p| self.liveness.is_dead(p));
        self.caught_up_after(RoundView::Replica { replicas: others.len() + 1, synced_with_a_replica, others_all_dead });
        repaired
    }

    /// Runs an anti-entropy round now unless this node has caught up or another caller is
    /// running one (that caller finds the outcome; the others go on without waiting for it).
    pub(crate) async fn catch_up_now(&self) {
        if let Some(_one) = self.catch_up.on_demand()
            && !self.is_caught_up()
        {
            self.anti_entropy_round().await;
        }
    }

    /// Whether this node has caught up, trying for at most `limit`: it runs a round now (or lets
    /// the one under way finish) and waits for the verdict of the rounds that follow.
    pub(crate) async fn catch_up_within(&self, limit: std::time::Duration) -> bool {
        if self.is_caught_up() {
            return true;
        }
        self.catch_up_now().await;
        self.catch_up.wait(limit).await
    }

    fn caught_up_after(&self, round: RoundView) {
        if self.catch_up.after_round(round) {
            tracing::info!(
                ?round,
                started_empty = self.catch_up.started_empty(),
                "caught up: answering from this node's store"
            );
        }
    }

    async fn sync_with(
        &self,
        view: &View,
        peer: &str,
        partition: PartitionId,
        summary: u64,
        mine: &[(Slot, u64)],
    ) -> Result<u64, SyncError> {
        let deadline = self.settings.replica_deadline;
        let request = PeerRequest::DigestSummary { view_epoch: view.epoch(), partition, summary };
        let (stable, theirs) = match self.call_peer(peer, &request, deadline).await? {
            PeerResponse::Summary { stable, buckets: None } => {
                // Same data: we hold everything the peer coordinated up to its stable time.
                self.freshness.synced(peer, stable);
                return Ok(0);
            }
            PeerResponse::Summary { stable, buckets: Some(theirs) } => (stable, theirs),
            other => return Err(SyncError::Unexpected(format!("{other:?}"))),
        };
        // Level 2: the buckets that differ, then their slots' digests from the peer.
        let candidates: Vec<Slot> = mine
            .chunks(BUCKET_SLOTS)
            .enumerate()
            .filter(|(i, bucket)| theirs.get(*i).copied() != Some(summarize(bucket)))
            .flat_map(|(_, bucket)| bucket.iter().map(|(s, _)| *s))
            .collect();
        let theirs = match self.call_peer(peer, &PeerRequest::SlotDigests { slots: candidates }, deadline).await? {
            PeerResponse::Digests(d) => d.into_iter().collect::<HashMap<Slot, u64>>(),
            other => return Err(SyncError::Unexpected(format!("{other:?}"))),
        };
        let differing: Vec<Slot> =
            mine.iter().filter(|(s, d)| theirs.get(s).is_some_and(|t| t != d)).map(|(s, _)| *s).collect();
        let mut repaired = 0;
        for slots in differing.chunks(MAX_SLOTS_PER_SYNC) {
            let records = self.scan_slots(slots)?;
            let request = PeerRequest::SyncSlots { view_epoch: view.epoch(), slots: slots.to_vec(), records };
            match self.call_peer(peer, &request, deadline).await? {
                PeerResponse::Synced { records, repaired: there } => {
                    repaired += self.apply_replicated(records).await?;
                    self.metrics.anti_entropy_pushed.inc_by(there);
                }
                other => return Err(SyncError::Unexpected(format!("{other:?}"))),
            }
        }
        // Every differing slot now holds the peer's records as of after its stable time.
        self.freshness.synced(peer, stable);
        Ok(repaired)
    }

    /// Step 1, answering side.
    pub(crate) fn answer_digest_summary(&self, view_epoch: u64, partition: PartitionId, summary: u64) -> PeerResponse {
        let Some(view) = self.view().filter(|v| v.epoch() == view_epoch) else {
            return PeerResponse::Refused(Refusal::NotOnEpoch {
                epoch: view_epoch,
                mine: self.view().map(|v| v.epoch()),
            });
        };
        // Stable first: every write at or below it is already in the digests taken next.
        let stable = self.freshness.stable(&self.hlc);
        let mine = self.slot_digests(&view, partition);
        let buckets =
            if summarize(&mine) == summary { None } else { Some(mine.chunks(BUCKET_SLOTS).map(summarize).collect()) };
        if buckets.is_none() && view.partition_of_node(self.id()) == Some(partition) {
            // A live replica holds exactly what this node holds.
            self.caught_up_after(RoundView::DigestsAgree);
        }
        PeerResponse::Summary { stable, buckets }
    }

    /// Step 2, answering side: apply the initiator's records, send back ours that it lacks.
    pub(crate) async fn answer_sync(
        &self,
        view_epoch: u64,
        slots: Vec<Slot>,
        records: Vec<(String, Record)>,
    ) -> Result<PeerResponse, StoreError> {
        if self.view().is_none_or(|v| v.epoch() != view_epoch) {
            let mine = self.view().map(|v| v.epoch());
            return Ok(PeerResponse::Refused(Refusal::NotOnEpoch { epoch: view_epoch, mine }));
        }
        let theirs: HashMap<String, crate::causal::Version> =
            records.iter().map(|(k, r)| (k.clone(), r.version.clone())).collect();
        let repaired = self.apply_replicated(records).await?;
        self.metrics.anti_entropy_repairs.inc_by(repaired);
        let mine = self.scan_slots(&slots)?;
        let newer: Vec<_> = mine.into_iter().filter(|(k, r)| theirs.get(k).is_none_or(|v| r.version > *v)).collect();
        Ok(PeerResponse::Synced { records: newer, repaired })
    }
}

/// Runs anti-entropy rounds every `anti_entropy_interval` until `shutdown` completes.
pub async fn run(node: Arc<Node>, shutdown: impl Future<Output = ()>) {
    let mut ticker = tokio::time::interval(node.settings.anti_entropy_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut rounds: u64 = 0;
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => return,
            _ = ticker.tick() => {}
        }
        rounds += 1;
        // A round may wait on a slow peer: shutting down does not wait for it (a round applies
        // whole batches only, so stopping between them is safe).
        let round = async {
            node.gossip_view().await;
            if rounds.is_multiple_of(CLEANUP_EVERY) {
                node.clean_up_unowned().await;
            }
            node.anti_entropy_round().await
        };
        tokio::select! {
            biased;
            _ = &mut shutdown => return,
            repaired = round => {
                node.metrics.anti_entropy_rounds.inc();
                if repaired > 0 {
                    tracing::info!(repaired, "anti-entropy repaired records");
                }
            }
        }
    }
}

impl Node {
    /// Hands records of slots this node does not own to their owners and drops them (when no
    /// change is under way; a change prunes on its own).
    async fn clean_up_unowned(&self) {
        let Some(view) = self.view().filter(|_| self.pending().is_none()) else { return };
        match self.prune_unowned(&view).await {
            Ok(0) => {}
            Ok(keys) => {
                tracing::info!(keys, view_epoch = view.epoch(), "handed over and dropped records of unowned slots")
            }
            Err(e) => tracing::warn!(error = %e, "cleaning up unowned slots failed; will retry"),
        }
    }

    /// Asks one other member (round-robin) for its view and adopts it if it is newer: how a node
    /// that was down or paused during a view change catches up. A member that answers with an
    /// older view, or none, is handed this one: a node that joined in a change and missed its
    /// commit has no view and so no peer to ask (its pending view, if it got that far, names
    /// them, and it asks those meanwhile).
    async fn gossip_view(&self) {
        let Some(view) = self.view().or_else(|| self.pending()) else { return };
        let committed = self.view().is_some_and(|v| v.epoch() == view.epoch());
        let others: Vec<String> =
            view.all_members().into_iter().filter(|m| m != self.id() && !self.liveness.is_dead(m)).collect();
        if others.is_empty() {
            return;
        }
        // The peer to ask rotates round-robin over the others.
        let tick = self.gossip_cursor.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.gossip_rounds.inc();
        let peer = &others[tick % others.len()];
        let Ok(PeerResponse::Hello(info)) =
            self.call_peer(peer, &PeerRequest::Hello, self.settings.replica_deadline).await
        else {
            return;
        };
        match info.layout {
            Some(layout) if layout.epoch > view.epoch() || (!committed && layout.epoch == view.epoch()) => {
                self.adopt_view(layout)
            }
            theirs if committed && theirs.as_ref().is_none_or(|l| l.epoch < view.epoch()) => {
                let handed = PeerRequest::AdoptView(view.layout().clone());
                if let Err(e) = self.call_peer(peer, &handed, self.settings.replica_deadline).await {
                    tracing::debug!(%peer, error = %e, "could not hand a member that is behind the view");
                }
            }
            _ => {}
        }
    }
}

/// One hash over a partition's per-slot digests. The digests are themselves SHA-1-derived, so a
/// multiply-rotate mix of them (a few instructions per slot; it runs every round) keeps the
/// summary as good as the digests without hashing them again; equal summaries only spare a round
/// trip, and differing slots are always found by comparing the digests themselves.
fn summarize(digests: &[(Slot, u64)]) -> u64 {
    const K1: u64 = 0x9e37_79b9_7f4a_7c15;
    const K2: u64 = 0xc2b2_ae3d_27d4_eb4f;
    digests.iter().fold(digests.len() as u64, |acc, &(slot, digest)| {
        let x = (u64::from(slot).wrapping_mul(K1) ^ digest).wrapping_mul(K2);
        (acc ^ x.rotate_left(31)).wrapping_mul(K1).rotate_left(27)
    })
}

#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error(transparent)]
    Peer(#[from] crate::peers::PeerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("unexpected answer: {0}")]
    Unexpected(String),
}
