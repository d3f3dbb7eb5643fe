//! Answering peers: dispatches each [`PeerRequest`] to the layer that owns it, and turns its
//! errors into typed [`Refusal`]s. The one place where node-to-node requests come in.

use crate::freshness::Announcement;
use crate::node::Node;
use crate::ops::Forwarded;
use crate::protocol::{PeerRequest, PeerResponse, Refusal};

fn storage(e: impl std::fmt::Display) -> PeerResponse {
    PeerResponse::Refused(Refusal::Storage { detail: e.to_string() })
}

impl Node {
    /// Answers one RPC from another node.
    pub async fn handle_rpc(&self, request: PeerRequest) -> PeerResponse {
        match request {
            PeerRequest::Coordinate { key, op, context, view_epoch, min_copies, sent_at } => {
                let forwarded = Forwarded { sender_epoch: view_epoch, min_copies, sent_at };
                match self.coordinate(&key, op, context, forwarded).await {
                    Ok(c) => PeerResponse::Coordinated(c),
                    Err(e) => PeerResponse::Refused(e.to_refusal()),
                }
            }
            PeerRequest::Replicate { records, from, cap, pending, view_epoch } => {
                if let (Some(theirs), Some(mine)) = (view_epoch, self.view().map(|v| v.epoch()))
                    && mine > theirs
                {
                    return PeerResponse::Refused(Refusal::EpochMismatch { mine, theirs });
                }
                // Records of slots this node neither owns nor is about to own would sit here
                // forever, outside every replica set: refuse them (the sender is on another view).
                if let Some((key, _)) = records.iter().find(|(key, _)| !self.owns_key(key)) {
                    let view = self.view();
                    let partition = view.as_ref().map_or(0, |v| v.partition_of_key(key));
                    let epoch = view.map_or(0, |v| v.epoch());
                    return PeerResponse::Refused(Refusal::NotOwner { partition, epoch });
                }
                let theirs: Vec<u64> =
                    records.iter().filter(|(_, r)| r.version.writer == from).map(|(_, r)| r.version.ts).collect();
                match self.apply_replicated(records).await {
                    Ok(_) => {
                        self.freshness.received(&from, &theirs, &Announcement { cap, pending });
                        PeerResponse::Replicated
                    }
                    Err(e) => storage(e),
                }
            }
            PeerRequest::Fetch { key, view_epoch } => {
                let view = self.view();
                let mine = view.as_ref().map(|v| v.epoch());
                if mine != Some(view_epoch) {
                    return PeerResponse::Refused(Refusal::NotOnEpoch { epoch: view_epoch, mine });
                }
                if !self.is_caught_up() {
                    // An answer from a store that may lack acknowledged writes would count as
                    // the partition's.
                    let partition = view.map_or(0, |v| v.partition_of_key(&key));
                    return PeerResponse::Refused(Refusal::CatchingUp { partition });
                }
                match self.store.get(&key) {
                    Ok(r) => PeerResponse::Fetched(r),
                    Err(e) => storage(e),
                }
            }
            PeerRequest::DigestSummary { view_epoch, partition, summary } => {
                self.answer_digest_summary(view_epoch, partition, summary)
            }
            PeerRequest::SyncSlots { view_epoch, slots, records } => {
                self.answer_sync(view_epoch, slots, records).await.unwrap_or_else(storage)
            }
            PeerRequest::SlotDigests { slots } => {
                let digests = self.store.digests();
                PeerResponse::Digests(slots.into_iter().map(|s| (s, digests.get(s))).collect())
            }
            PeerRequest::Change(step) => self.answer_change(step).await,
            PeerRequest::Hello => PeerResponse::Hello(Box::new(self.hello())),
            PeerRequest::SlotCounts { slots } => PeerResponse::SlotCounts(self.slot_counts(&slots)),
            PeerRequest::AdoptView(layout) => {
                self.adopt_view(layout);
                PeerResponse::Ack
            }
            PeerRequest::Ping => PeerResponse::Pong,
        }
    }
}
