//! The node-to-node protocol: every message one node sends another, every answer, and every
//! refusal, as typed values (postcard on the wire, see [`crate::peers`]). Nothing a receiver or a
//! sender decides is carried in a string: strings here are details for people (logs, errors).
//!
//! Three families of requests:
//! - the client path: [`PeerRequest::Coordinate`] (a forwarded operation), [`PeerRequest::Replicate`]
//!   and [`PeerRequest::Fetch`] (causal reads);
//! - repair: [`PeerRequest::DigestSummary`], [`PeerRequest::SyncSlots`], [`PeerRequest::SlotDigests`];
//! - view changes: [`PeerRequest::Change`] with a [`ChangeStep`] of the five-phase protocol.
//!
//! Plus [`PeerRequest::Hello`] (layout and progress), [`PeerRequest::AdoptView`] (a committed view
//! handed to a member that is behind) and [`PeerRequest::Ping`] (the failure detector's HTTP
//! fallback).

use crate::causal::VectorClock;
use crate::placement::{PartitionId, Slot};
use crate::store::Record;
use bytes::Bytes;
use kvs_api::{Layout, RebalanceProgress};
use serde::{Deserialize, Serialize};

/// A client operation, forwarded from a node that does not own the key to one that does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOp {
    Get,
    Put(Bytes),
    Delete,
}

/// Every message one node sends another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// "You own this key: coordinate this operation." Never forwarded again by the receiver.
    /// `min_copies`: refuse a write that cannot be (or was not) made durable on this many replicas.
    /// `sent_at`: the sender's wall clock (µs) when it sent this; a write that arrives too long
    /// after is refused (see `ops::FORWARDED_WRITE_EXPIRY`).
    Coordinate { key: String, op: KvOp, context: VectorClock, view_epoch: u64, min_copies: u32, sent_at: u64 },
    /// Store these records newest-wins and answer once they are durable. Once stored, the receiver
    /// holds every write `from` coordinated up to `cap`, except those in `pending` not yet arrived
    /// (see `freshness`). `view_epoch`: for a client's write, the view it was coordinated under; a
    /// receiver on a newer view refuses it, so a coordinator that missed a view change learns it
    /// before it acknowledges anything (transfers and repairs carry `None`).
    Replicate { records: Vec<(String, Record)>, from: String, cap: u64, pending: Vec<u64>, view_epoch: Option<u64> },
    /// Send me your record of `key` (for causal reads), as a replica of its partition under
    /// `view_epoch`. A receiver on another view refuses: after a view change it may have pruned
    /// the key, and its "absent" must not count as the partition's answer.
    Fetch { key: String, view_epoch: u64 },
    /// Anti-entropy, step 1: here is the hash of my digests over `partition`'s slots under `view_epoch`.
    DigestSummary { view_epoch: u64, partition: PartitionId, summary: u64 },
    /// Anti-entropy, step 2: here are my records for these slots; apply them and send me yours.
    SyncSlots { view_epoch: u64, slots: Vec<Slot>, records: Vec<(String, Record)> },
    /// Digests of the given slots, whatever the view.
    SlotDigests { slots: Vec<Slot> },
    /// A step of a view change driven by `proposer` (see `view_change`).
    Change(ChangeStep),
    /// Liveness, layout and progress probe.
    Hello,
    /// Heartbeat of the failure detector's HTTP fallback (answered with `Pong`, doing nothing else).
    Ping,
    // New variants go last: postcard numbers variants by position, and a rolling upgrade runs
    // old and new nodes side by side.
    /// "This is a committed view that names you, and your `Hello` showed an older one or none:
    /// adopt it." How a node that joined in a change but missed its commit learns the view — it
    /// has none of its own, so it knows no peer to ask (see `anti_entropy::gossip_view`).
    AdoptView(Layout),
    /// Records this node holds in each of these slots (a view-change preview counts them).
    SlotCounts { slots: Vec<Slot> },
}

impl PeerRequest {
    /// Records `from` hands over without vouching for anything (a transfer, a restore): not
    /// coordinated there, so they carry no announcement (`cap` 0) and no view epoch.
    pub fn hand_over(records: Vec<(String, Record)>, from: &str) -> PeerRequest {
        PeerRequest::Replicate { records, from: from.to_owned(), cap: 0, pending: Vec::new(), view_epoch: None }
    }

    /// Heartbeats must not wait behind data calls: a queue is slowness, not death.
    pub fn is_heartbeat(&self) -> bool {
        matches!(self, PeerRequest::Ping)
    }
}

/// The steps of a view change, in the order the proposer sends them (see `view_change`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeStep {
    /// Phase 1: promise `proposer` that no other change of `layout.epoch` will be accepted.
    Prepare { layout: Layout, proposer: String },
    /// Releases a promise made to `proposer` (its change failed before it began).
    Abort { epoch: u64, proposer: String },
    /// Phase 2: `layout` is the pending view; dual-write to its owners from now on.
    Begin { proposer: String, layout: Layout },
    /// Phase 3: send these slots to their new owners (this node is their source), at most `rate`
    /// keys per second (0: unpaced).
    Transfer { epoch: u64, assignments: Vec<Assignment>, rate: u64 },
    /// Phase 4: the pending view of `epoch` is the view.
    Commit { epoch: u64 },
    /// Phase 5: drop every slot this node no longer owns (after making sure an owner has it).
    Prune { epoch: u64 },
}

/// One slot a source must send in a view change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub slot: Slot,
    /// New owners that lack the slot.
    pub receivers: Vec<String>,
    /// Other old owners, to catch up from before sending (they may hold writes this one missed).
    pub co_sources: Vec<String>,
}

/// A node's answer to `Hello`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloInfo {
    pub layout: Option<Layout>,
    pub pending: Option<Layout>,
    pub live_keys: u64,
    /// One hash over this node's digests of its partition's slots (equal on two replicas means
    /// they hold the same versions).
    pub partition_digest: Option<u64>,
    /// Keys this node has sent / must send as a source of the current or last change.
    pub transfer: RebalanceProgress,
}

/// Answers, one variant per request kind, or a refusal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerResponse {
    Coordinated(Coordinated),
    Replicated,
    Fetched(Option<Record>),
    /// Per-slot digests (of the requested slots).
    Digests(Vec<(Slot, u64)>),
    /// Answer to `DigestSummary`: the responder's stable timestamp (taken before its digests) and,
    /// when the summaries differ, one hash per bucket of consecutive slots of the partition (see
    /// `anti_entropy`).
    Summary {
        stable: u64,
        buckets: Option<Vec<u64>>,
    },
    Synced {
        records: Vec<(String, Record)>,
        repaired: u64,
    },
    Hello(Box<HelloInfo>),
    /// Done (view-change steps that return nothing else).
    Ack,
    Transferred {
        keys: u64,
        bytes: u64,
    },
    Pruned {
        keys: u64,
    },
    Pong,
    /// The receiver did not do it, and why.
    Refused(Refusal),
    /// Answer to `SlotCounts`: records per requested slot, in request order. (New variants go
    /// last, as in `PeerRequest`.)
    SlotCounts(Vec<u64>),
}

/// Result of a coordinated operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coordinated {
    pub partition: PartitionId,
    /// Get: the newest record (may be a tombstone or absent). Put/Delete: the written record.
    pub record: Option<Record>,
    /// Put: the key had no live value before. Delete: it had one.
    pub changed_liveness: bool,
    /// Epoch of the view the coordinator served under (goes into the client's causal context, so
    /// a node on an older view can tell it is behind).
    pub view_epoch: u64,
    /// Writes: how many replicas hold it durably. Reads: `None`.
    pub durability: Option<Durability>,
}

/// How many replicas hold a write when it is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Durability {
    /// Replicas of the key's partition that stored the write durably (the coordinator included).
    pub copies: u32,
    /// Replicas the partition has.
    pub replicas: u32,
}

/// Why a node did not do what a peer asked. The sender decides what to do next from the variant
/// alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The receiver's view epoch differs from the sender's.
    #[error("the receiver is on view epoch {mine}, the sender on {theirs}")]
    EpochMismatch { mine: u64, theirs: u64 },
    /// The receiver does not own the key's partition under the sender's view.
    #[error("the receiver does not own partition {partition} in view {epoch}")]
    NotOwner { partition: PartitionId, epoch: u64 },
    /// The receiver has no view yet.
    #[error("the receiver has no view yet")]
    NoView,
    /// The receiver may lack a write the client's context depends on and cannot reach who has it.
    #[error("the receiver may lack a write of partition {partition} the client's context depends on")]
    CausalUnavailable { partition: PartitionId },
    /// The write needs more live replicas than there are; nothing was written.
    #[error(
        "only {alive} of the {replicas} replicas of partition {partition} are alive; {min_copies} copies were asked"
    )]
    TooFewReplicas { partition: PartitionId, alive: u32, replicas: u32, min_copies: u32 },
    /// The write asks for more copies than the partition has replicas; nothing was written.
    #[error("{min_copies} copies were asked but partition {partition} has {replicas} replicas")]
    MinCopiesAboveReplicas { partition: PartitionId, replicas: u32, min_copies: u32 },
    /// The write was stored on fewer replicas than asked (it may still become visible).
    #[error("the write is durable on {} of {} replicas, fewer than the {min_copies} asked", durability.copies, durability.replicas)]
    UnderReplicated { partition: PartitionId, durability: Durability, min_copies: u32 },
    /// A forwarded write arrived later than the expiry after it was sent: the forwarder may have
    /// given up and sent it to another owner, so it was not performed.
    #[error("the forwarded write arrived {age_micros} µs after it was sent")]
    Expired { age_micros: u64 },
    /// The receiver coordinated a forwarded write under a view it has just learned is not current
    /// (it has caught up since): nothing was acknowledged; send the write to the owners under the
    /// newer view, ordered after the copy `writer` stored at `stamped`.
    #[error(
        "the receiver's view was out of date; it stored the write as {writer} at {stamped} without acknowledging it"
    )]
    StaleWrite { writer: String, stamped: u64 },
    /// The receiver is not on view epoch `epoch` (`mine`: the one it is on).
    #[error("the receiver is not on view epoch {epoch} (it is on {mine:?})")]
    NotOnEpoch { epoch: u64, mine: Option<u64> },
    /// A view change to `epoch` cannot start: the receiver's view is already at `current`.
    #[error("epoch {epoch} is not newer than the receiver's view (epoch {current})")]
    EpochNotNewer { epoch: u64, current: u64 },
    /// The receiver promised `epoch` to another proposer, whose change is in progress.
    #[error("epoch {epoch} is promised to {proposer}, whose view change is in progress")]
    PromisedTo { epoch: u64, proposer: String },
    /// The receiver has no pending view change to `epoch`.
    #[error("no pending view change to epoch {epoch} here")]
    NoPendingChange { epoch: u64 },
    /// The receiver, a source of a view change, could not send its slots.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The receiver's storage failed (detail for people).
    #[error("storage failed: {detail}")]
    Storage { detail: String },
    /// The receiver has not caught up with its partition since it started (see `catch_up`): it
    /// may lack acknowledged writes, so it answers nothing from its store yet.
    #[error("the receiver has not caught up with partition {partition} since it started")]
    CatchingUp { partition: PartitionId },
}

/// Why a source could not move its slots in a view change (or a node could not prune).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum TransferError {
    /// Reading or writing this node's own store failed.
    #[error("the store failed: {detail}")]
    Storage { detail: String },
    /// A receiver did not store a batch (after retries).
    #[error("sending to {peer} failed: {detail}")]
    Send { peer: String, detail: String },
    /// A peer did not answer a digest or sync request with digests or records.
    #[error("{peer} gave no digests or records: {detail}")]
    Exchange { peer: String, detail: String },
}

impl From<crate::store::StoreError> for TransferError {
    fn from(e: crate::store::StoreError) -> Self {
        TransferError::Storage { detail: e.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_postcard() {
        let req = PeerRequest::Coordinate {
            key: "k".into(),
            op: KvOp::Put(Bytes::from_static(b"v")),
            context: VectorClock::new(),
            view_epoch: 3,
            min_copies: 0,
            sent_at: 1,
        };
        let bytes = postcard::to_stdvec(&req).unwrap();
        assert_eq!(postcard::from_bytes::<PeerRequest>(&bytes).unwrap(), req);
        let refusal = PeerResponse::Refused(Refusal::PromisedTo { epoch: 4, proposer: "a:1".into() });
        let bytes = postcard::to_stdvec(&refusal).unwrap();
        assert_eq!(postcard::from_bytes::<PeerResponse>(&bytes).unwrap(), refusal);
    }
}
