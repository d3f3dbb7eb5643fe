//! Anti-entropy: replicas of a partition periodically compare what they store and repair each other,
//! so a replica that missed writes (down, paused, cut off) converges without client help.
//!
//! One round, per peer replica, at most two round trips:
//! 1. send a summary (one hash over the partition's per-slot digests); equal summaries end it;
//! 2. otherwise the peer answers with its per-slot digests, and for every slot that differs both
//!    sides send their records of that slot; each applies the other's newest-wins.
//!
//! Invariant: a round only ever applies records through `Store::apply`, so it can never replace a
//! newer version with an older one or resurrect a deleted key (tombstones are records too).

use crate::node::Node;
use crate::peers::{PeerRequest, PeerResponse};
use crate::placement::{PartitionId, Slot};
use crate::store::{Record, StoreError};
use crate::view::View;
use sha1::{Digest, Sha1};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

/// Most slots exchanged in one `SyncSlots` request (bounds message size; the rest waits a round).
const MAX_SLOTS_PER_SYNC: usize = 64;

impl Node {
    /// This node's per-slot digests over `partition`'s slots, in slot order.
    fn slot_digests(&self, view: &View, partition: PartitionId) -> Vec<(Slot, u64)> {
        let digests = self.store.digests();
        view.table().slots_of(partition).into_iter().map(|s| (s, digests.get(s))).collect()
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
        let Some(partition) = view.partition_of_node(self.id()) else { return 0 };
        // Stable before digests: after a successful round the peer holds all our writes up to it.
        let my_stable = self.freshness.stable(&self.hlc);
        let mine = self.slot_digests(&view, partition);
        let summary = summarize(&mine);
        let mut repaired = 0;
        for peer in view.members(partition).iter().filter(|m| *m != self.id()) {
            match self.sync_with(&view, peer, partition, summary, &mine).await {
                Ok(n) => {
                    self.freshness.repaired(peer, my_stable);
                    repaired += n;
                }
                Err(e) => tracing::debug!(peer = %peer, error = %e, "anti-entropy round failed"),
            }
        }
        self.metrics.anti_entropy_repairs.inc_by(repaired);
        repaired
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
            PeerResponse::Summary { stable, digests: None } => {
                // Same data: we hold everything the peer coordinated up to its stable time.
                self.freshness.synced(peer, stable);
                return Ok(0);
            }
            PeerResponse::Summary { stable, digests: Some(theirs) } => (stable, theirs),
            other => return Err(SyncError::Unexpected(format!("{other:?}"))),
        };
        let theirs: HashMap<Slot, u64> = theirs.into_iter().collect();
        let differing: Vec<Slot> =
            mine.iter().filter(|(s, d)| theirs.get(s).copied().unwrap_or(0) != *d).map(|(s, _)| *s).collect();
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
            return PeerResponse::Refused { status: 409, msg: format!("not on view epoch {view_epoch}") };
        };
        // Stable first: every write at or below it is already in the digests taken next.
        let stable = self.freshness.stable(&self.hlc);
        let mine = self.slot_digests(&view, partition);
        let digests = if summarize(&mine) == summary { None } else { Some(mine) };
        PeerResponse::Summary { stable, digests }
    }

    /// Step 2, answering side: apply the initiator's records, send back ours that it lacks.
    pub(crate) async fn answer_sync(
        &self,
        view_epoch: u64,
        slots: Vec<Slot>,
        records: Vec<(String, Record)>,
    ) -> Result<PeerResponse, StoreError> {
        if self.view().is_none_or(|v| v.epoch() != view_epoch) {
            return Ok(PeerResponse::Refused { status: 409, msg: format!("not on view epoch {view_epoch}") });
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
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = ticker.tick() => {}
        }
        // A round may wait on a slow peer: shutting down does not wait for it (a round applies
        // whole batches only, so stopping between them is safe).
        let round = async {
            node.gossip_view().await;
            node.anti_entropy_round().await
        };
        tokio::select! {
            _ = &mut shutdown => return,
            repaired = round => {
                if repaired > 0 {
                    tracing::info!(repaired, "anti-entropy repaired records");
                }
            }
        }
    }
}

impl Node {
    /// Asks one other member (round-robin) for its view and adopts it if it is newer: how a node
    /// that was down or paused during a view change catches up.
    async fn gossip_view(&self) {
        let Some(view) = self.view() else { return };
        let others: Vec<String> =
            view.all_members().into_iter().filter(|m| m != self.id() && !self.liveness.is_dead(m)).collect();
        if others.is_empty() {
            return;
        }
        let tick = self.metrics.gossip_rounds.get() as usize;
        self.metrics.gossip_rounds.inc();
        let peer = &others[tick % others.len()];
        if let Ok(PeerResponse::Hello(info)) =
            self.call_peer(peer, &PeerRequest::Hello, self.settings.replica_deadline).await
            && let Some(layout) = info.layout
            && layout.epoch > view.epoch()
        {
            self.adopt_view(layout).await;
        }
    }
}

/// One hash over a partition's per-slot digests.
fn summarize(digests: &[(Slot, u64)]) -> u64 {
    let mut h = Sha1::new();
    for (slot, digest) in digests {
        h.update(slot.to_be_bytes());
        h.update(digest.to_be_bytes());
    }
    u64::from_be_bytes(h.finalize()[..8].try_into().expect("SHA-1 digests are 20 bytes"))
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
