//! The client-operation path: how a client's read or write enters the cluster at any node and
//! reaches the owners of its key.
//!
//! - [`Node::read`] / [`Node::write`] are the entry points (the HTTP handlers call them); each is
//!   admitted first ([`crate::admission`]).
//! - `route`: a node that replicates the key *coordinates* the operation itself ([`write`],
//!   [`read`]); any other node forwards it to an owner ([`forward`]); the receiving owner never
//!   forwards again. An owner that has not caught up since it started (`catch_up`) first tries
//!   to catch up (up to the replica deadline); a client operation that still finds it behind
//!   goes to the other owners, a forwarded one is refused.
//! - A coordinated write is stamped by the coordinator's HLC, stored locally and sent to every
//!   other replica in parallel. It is acknowledged once it is durable locally and on every other
//!   replica that is alive: a live replica is waited for however busy it is (up to
//!   `Settings::replica_deadline`), a dead one (see `liveness`) is given up on at once and catches
//!   up through anti-entropy. The answer says how many replicas hold the write
//!   ([`Durability`](crate::protocol::Durability)); a client may ask for a minimum and gets a
//!   refusal instead of an acknowledgement with fewer.
//! - A coordinated read answers from the local store unless the client's causal context shows a
//!   write this replica may not have; then it asks the other replicas and returns the newest
//!   version (repairing itself on the way).

mod forward;
mod read;
mod write;

pub use forward::{FORWARD_FAILOVER_MARGIN, FORWARDED_WRITE_EXPIRY};
pub(crate) use write::ReplicaOutcome;

use crate::causal::VectorClock;
use crate::node::{KvError, Node};
use crate::placement::PartitionId;
use crate::protocol::{Coordinated, KvOp, PeerRequest, PeerResponse};
use crate::view::View;
use bytes::Bytes;

/// What a write must satisfy besides being stored.
#[derive(Clone, Copy, Debug, Default)]
struct WriteTerms {
    /// Refuse rather than acknowledge with fewer durable copies (0 or 1: no requirement).
    min_copies: u32,
    /// Wall time (µs) after which a forwarded write is refused rather than stamped (see
    /// [`FORWARDED_WRITE_EXPIRY`]); `None` for writes that entered the cluster here.
    not_after: Option<u64>,
}

/// How a forwarded operation came: the view epoch the sender routed it by, the client's minimum
/// of copies, and the sender's wall clock when it sent it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Forwarded {
    pub sender_epoch: u64,
    pub min_copies: u32,
    pub sent_at: u64,
}

impl Node {
    /// Reads `key` with the client's causal context (a client operation: admitted first).
    pub async fn read(&self, key: &str, context: VectorClock) -> Result<Coordinated, KvError> {
        let _slot = self.admit().await?;
        self.route(key, KvOp::Get, context, 0).await
    }

    /// Writes `value` (or a tombstone for `None`) under `key`, after the client's causal context
    /// (a client operation: admitted first). With `min_copies` above 1 the write is refused
    /// rather than acknowledged with fewer durable copies.
    pub async fn write(
        &self,
        key: &str,
        value: Option<Bytes>,
        context: VectorClock,
        min_copies: u32,
    ) -> Result<Coordinated, KvError> {
        let _slot = self.admit().await?;
        let op = match value {
            Some(v) => KvOp::Put(v),
            None => KvOp::Delete,
        };
        self.route(key, op, context, min_copies).await
    }

    async fn admit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, KvError> {
        self.admission.admit().await.map_err(|e| {
            self.metrics.overloaded.inc();
            KvError::Overloaded(e)
        })
    }

    /// Routes a client operation: coordinate it here if this node replicates the key, else forward.
    /// If an owner turns out to be on a newer view (or this node, coordinating, learns it is on an
    /// old one), learn the newer view and route once more under it.
    async fn route(
        &self,
        key: &str,
        op: KvOp,
        mut context: VectorClock,
        min_copies: u32,
    ) -> Result<Coordinated, KvError> {
        // Writes register with the fence before reading the view, so a view change can wait for
        // every write that did not see its pending view.
        let _fence = (!matches!(op, KvOp::Get)).then(|| self.fence.enter());
        let mut refreshed = false;
        loop {
            let view = self.require_view()?;
            let partition = view.partition_of_key(key);
            let result = if view.members(partition).iter().any(|m| m == self.id()) {
                self.coordinate_as_owner(&view, partition, key, op.clone(), context.clone(), min_copies).await
            } else {
                self.forward(&view, partition, key, op.clone(), context.clone(), min_copies).await
            };
            match result {
                Err(KvError::StaleView { peer }) if !refreshed => {
                    self.refresh_view_from(&peer).await;
                    refreshed = true;
                }
                Err(KvError::StaleWrite { peer, writer, stamped }) if !refreshed => {
                    self.refresh_view_from(&peer).await;
                    // The unacknowledged copy may reach the new owners later (records of slots a
                    // node no longer owns are handed over): the write must be ordered after it.
                    context.observe(&writer, stamped);
                    refreshed = true;
                }
                Err(KvError::StaleView { .. } | KvError::StaleWrite { .. }) => {
                    return Err(KvError::Unavailable { partition, failures: Vec::new() });
                }
                other => return other,
            }
        }
    }

    /// A client operation on this node's own partition: coordinated here once this node has
    /// caught up since it started (see `catch_up`; at once if it has, else after trying — a round
    /// now, then the verdict of the rounds that follow, for at most the replica deadline);
    /// failing that, by an owner that has caught up.
    async fn coordinate_as_owner(
        &self,
        view: &View,
        partition: PartitionId,
        key: &str,
        op: KvOp,
        context: VectorClock,
        min_copies: u32,
    ) -> Result<Coordinated, KvError> {
        if !self.catch_up_within(self.settings.replica_deadline).await {
            return match self.forward(view, partition, key, op, context, min_copies).await {
                Err(KvError::Unavailable { .. } | KvError::CausalUnavailable { .. } | KvError::CatchingUp { .. }) => {
                    Err(KvError::CatchingUp { partition })
                }
                other => other,
            };
        }
        let terms = WriteTerms { min_copies, not_after: None };
        self.coordinate_in(view, partition, key, op, context, terms).await
    }

    /// Coordinates an operation forwarded by another node; refuses if this node is not an owner
    /// under the view the sender routed it by, or has not caught up since it started.
    pub(crate) async fn coordinate(
        &self,
        key: &str,
        op: KvOp,
        context: VectorClock,
        forwarded: Forwarded,
    ) -> Result<Coordinated, KvError> {
        let Forwarded { sender_epoch, min_copies, sent_at } = forwarded;
        let _fence = (!matches!(op, KvOp::Get)).then(|| self.fence.enter());
        let view = self.require_view()?;
        if view.epoch() != sender_epoch {
            return Err(KvError::EpochMismatch { mine: view.epoch(), theirs: sender_epoch });
        }
        let partition = view.partition_of_key(key);
        if !view.members(partition).iter().any(|m| m == self.id()) {
            return Err(KvError::NotOwner { partition, epoch: view.epoch() });
        }
        // Not caught up is slowness, not refusal: try to catch up first, as for a client.
        if !self.catch_up_within(self.settings.replica_deadline).await {
            return Err(KvError::CatchingUp { partition });
        }
        let not_after = sent_at.saturating_add(FORWARDED_WRITE_EXPIRY.as_micros() as u64);
        let terms = WriteTerms { min_copies, not_after: Some(not_after) };
        let result = self.coordinate_in(&view, partition, key, op, context, terms).await;
        if let Err(KvError::StaleWrite { peer, .. }) = &result {
            // Catch up before answering, so the forwarder can learn the newer view from here.
            self.refresh_view_from(peer).await;
        }
        result
    }

    async fn coordinate_in(
        &self,
        view: &View,
        partition: PartitionId,
        key: &str,
        op: KvOp,
        context: VectorClock,
        terms: WriteTerms,
    ) -> Result<Coordinated, KvError> {
        match op {
            KvOp::Get => self.coordinate_read(view, partition, key, &context).await,
            KvOp::Put(value) => self.coordinate_write(view, partition, key, Some(value), context, terms).await,
            KvOp::Delete => self.coordinate_write(view, partition, key, None, context, terms).await,
        }
    }

    /// Asks `peer` for its view and adopts it if it is newer (the catch-up runs in the background).
    async fn refresh_view_from(&self, peer: &str) {
        if let Ok(PeerResponse::Hello(info)) =
            self.call_peer(peer, &PeerRequest::Hello, self.settings.replica_deadline).await
            && let Some(layout) = info.layout
        {
            self.adopt_view(layout);
        }
    }

    /// Asks every peer for its view in the background (a newer one is adopted).
    fn refresh_view_soon(&self) {
        let Some(view) = self.view() else { return };
        let peers: Vec<String> = view.all_members().into_iter().filter(|m| m != self.id()).collect();
        let me = self.self_handle();
        tokio::spawn(async move {
            if let Some(node) = me.upgrade() {
                for peer in peers {
                    node.refresh_view_from(&peer).await;
                }
            }
        });
    }
}
