//! The network boundary between nodes: one request/response RPC ([`PeerRequest`] →
//! [`PeerResponse`]) behind the [`Peers`] trait, and an HTTP implementation over pooled
//! connections.
//!
//! Wire format: postcard (compact binary, serde) in the body of `POST /internal/v1/rpc`. Every call
//! carries its own deadline; nothing here retries — failover is the caller's decision, and whether
//! a peer is alive is [`crate::liveness`]'s. [`PeerError`] keeps apart what tells them apart: a
//! connection that failed ([`PeerError::Unreachable`], [`PeerError::ConnectTimeout`]: evidence of
//! death) and an answer that did not come in time ([`PeerError::Timeout`], which is not).
//!
//! Backpressure: at most [`MAX_IN_FLIGHT_PER_PEER`] data calls are in flight to one peer; more
//! wait for a slot (inside the caller's deadline). Heartbeats do not queue behind data.

use crate::causal::VectorClock;
use crate::placement::{PartitionId, Slot};
use crate::store::Record;
use async_trait::async_trait;
use bytes::Bytes;
use kvs_api::{HEADER_CLUSTER_TOKEN, Layout};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Path of the single internal RPC route.
pub const RPC_PATH: &str = "/internal/v1/rpc";

/// Data calls (everything but heartbeats) in flight to one peer at once; more wait their turn.
/// Bounds the connections and the work one node can push onto another.
pub const MAX_IN_FLIGHT_PER_PEER: usize = 256;

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
    /// after is refused (see `replication::FORWARDED_WRITE_EXPIRY`).
    Coordinate { key: String, op: KvOp, context: VectorClock, view_epoch: u64, min_copies: u32, sent_at: u64 },
    /// Store these records newest-wins and answer once they are durable. Once stored, the receiver
    /// holds every write `from` coordinated up to `cap`, except those in `pending` not yet arrived
    /// (see `freshness`).
    Replicate { records: Vec<(String, Record)>, from: String, cap: u64, pending: Vec<u64> },
    /// Send me your record of `key` (for causal reads).
    Fetch { key: String },
    /// Anti-entropy, step 1: here is the hash of my digests over `partition`'s slots under `view_epoch`.
    DigestSummary { view_epoch: u64, partition: PartitionId, summary: u64 },
    /// Anti-entropy, step 2: here are my records for these slots; apply them and send me yours.
    SyncSlots { view_epoch: u64, slots: Vec<Slot>, records: Vec<(String, Record)> },
    /// Liveness, layout and progress probe.
    Hello,
    /// View change, phase 1: promise `proposer` that no other change of `epoch` will be accepted.
    Prepare { layout: Layout, proposer: String },
    /// Releases a promise made to `proposer` (its change failed before it began).
    Abort { epoch: u64, proposer: String },
    /// Phase 2: `layout` is the pending view; dual-write to its owners from now on.
    Begin { proposer: String, layout: Layout },
    /// Phase 3: send these slots to their new owners (this node is their source).
    Transfer { epoch: u64, assignments: Vec<Assignment> },
    /// Phase 4: the pending view of `epoch` is the view.
    Commit { epoch: u64 },
    /// Phase 5: drop every slot this node no longer owns (after making sure an owner has it).
    Prune { epoch: u64 },
    /// Digests of the given slots, whatever the view.
    SlotDigests { slots: Vec<Slot> },
    /// Heartbeat of the failure detector (answered with `Pong`, doing nothing else).
    Ping,
}

impl PeerRequest {
    /// Heartbeats must not wait behind data calls: a queue is slowness, not death.
    pub fn is_heartbeat(&self) -> bool {
        matches!(self, PeerRequest::Ping)
    }
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
    pub transfer: kvs_api::RebalanceProgress,
}

/// Answers, one variant per request kind (plus a refusal).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerResponse {
    Coordinated(Coordinated),
    Replicated,
    Fetched(Option<Record>),
    /// Per-slot digests (of the requested slots).
    Digests(Option<Vec<(Slot, u64)>>),
    /// Answer to `DigestSummary`: the responder's stable timestamp (taken before its digests) and,
    /// when the summaries differ, its per-slot digests in slot order.
    Summary {
        stable: u64,
        digests: Option<Vec<(Slot, u64)>>,
    },
    Synced {
        records: Vec<(String, Record)>,
        repaired: u64,
    },
    Hello(Box<HelloInfo>),
    /// Done (phases that return nothing else).
    Ack,
    Transferred {
        keys: u64,
        bytes: u64,
    },
    Pruned {
        keys: u64,
    },
    Pong,
    /// The owner did not perform a forwarded operation, and why.
    NotCoordinated(CoordinateRefusal),
    /// The receiver could not do it; `status` is an HTTP status meaning the same.
    Refused {
        status: u16,
        msg: String,
    },
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

/// Why an owner refused to coordinate a forwarded operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordinateRefusal {
    /// The owner's view epoch differs from the forwarder's.
    EpochMismatch { mine: u64, theirs: u64 },
    /// The owner does not own the key's partition under the forwarder's view.
    NotOwner { partition: PartitionId, epoch: u64 },
    /// The owner has no view yet.
    NoView,
    /// The owner may lack a write the client's context depends on and cannot reach who has it.
    CausalUnavailable { partition: PartitionId },
    /// The write needs more live replicas than there are; nothing was written.
    TooFewReplicas { partition: PartitionId, alive: u32, replicas: u32, min_copies: u32 },
    /// The write asks for more copies than the partition has replicas; nothing was written.
    MinCopiesAboveReplicas { partition: PartitionId, replicas: u32, min_copies: u32 },
    /// The write was stored on fewer replicas than asked (it may still become visible).
    UnderReplicated { partition: PartitionId, durability: Durability, min_copies: u32 },
    /// A forwarded write arrived later than the expiry after it was sent: the forwarder may have
    /// given up and sent it to another owner, so it was not performed.
    Expired { age_micros: u64 },
    /// The owner's storage failed.
    Storage { detail: String },
}

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The connection failed: refused, reset or closed without an answer.
    #[error("{peer} is unreachable: {detail}")]
    Unreachable { peer: String, detail: String },
    /// Connecting timed out: nothing answers at the peer's address.
    #[error("connecting to {peer} timed out")]
    ConnectTimeout { peer: String },
    /// No answer within the deadline; the peer may well be alive and busy.
    #[error("{peer} did not answer within {timeout:?}")]
    Timeout { peer: String, timeout: Duration },
    /// Not sent: the failure detector holds the peer dead.
    #[error("{peer} is considered dead ({evidence:?}); not sent")]
    Skipped { peer: String, evidence: crate::liveness::Death },
    /// The failure detector declared the peer dead while the call was under way.
    #[error("{peer} was declared dead ({evidence:?}) while the call was under way")]
    Dead { peer: String, evidence: crate::liveness::Death },
    #[error("{peer} refused: {status} {msg}")]
    Refused { peer: String, status: u16, msg: String },
    #[error("{peer} sent an undecodable answer: {detail}")]
    Protocol { peer: String, detail: String },
}

/// How a node reaches its peers.
#[async_trait]
pub trait Peers: Send + Sync + 'static {
    /// Sends `request` to `peer` and waits at most `timeout` for its answer.
    async fn call(&self, peer: &str, request: &PeerRequest, timeout: Duration) -> Result<PeerResponse, PeerError>;
}

/// [`Peers`] over HTTP/1.1 with a shared connection pool.
pub struct HttpPeers {
    http: reqwest::Client,
    token: Option<String>,
    /// Per peer: its parsed RPC URL (parsing one costs more than the rest of building a request)
    /// and the slots of its data lane. `std` lock, never held across `.await`.
    targets: std::sync::RwLock<HashMap<String, Target>>,
}

#[derive(Clone)]
struct Target {
    url: reqwest::Url,
    lane: Arc<Semaphore>,
}

impl HttpPeers {
    /// `connect_timeout` bounds TCP connection setup (a dead host must not cost more than this).
    /// `hosts_file` maps peer names to addresses ahead of DNS (see [`crate::hosts`]).
    /// `peer_idle_close`: how long peers keep an idle connection open (their header timeout);
    /// pooled connections are dropped well before, so a request never races a peer closing one.
    pub fn new(
        connect_timeout: Duration,
        token: Option<String>,
        hosts_file: Option<std::path::PathBuf>,
        peer_idle_close: Duration,
    ) -> Self {
        let mut builder = reqwest::Client::builder();
        if let Some(path) = hosts_file {
            builder = builder.dns_resolver(std::sync::Arc::new(crate::hosts::HostsFileResolver::new(path)));
        }
        let http = builder
            .connect_timeout(connect_timeout)
            .pool_idle_timeout((peer_idle_close / 2).min(Duration::from_secs(30)))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .build()
            .expect("a plain HTTP client always builds");
        HttpPeers { http, token, targets: Default::default() }
    }

    fn target(&self, peer: &str) -> Result<Target, PeerError> {
        if let Some(t) = self.targets.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(peer) {
            return Ok(t.clone());
        }
        let url = reqwest::Url::parse(&format!("http://{peer}{RPC_PATH}")).map_err(|e| PeerError::Unreachable {
            peer: peer.to_owned(),
            detail: format!("not a valid address: {e}"),
        })?;
        let mut targets = self.targets.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let target = targets
            .entry(peer.to_owned())
            .or_insert_with(|| Target { url, lane: Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_PEER)) });
        Ok(target.clone())
    }
}

#[async_trait]
impl Peers for HttpPeers {
    async fn call(&self, peer: &str, request: &PeerRequest, timeout: Duration) -> Result<PeerResponse, PeerError> {
        let started = tokio::time::Instant::now();
        let target = self.target(peer)?;
        let _slot = if request.is_heartbeat() {
            None
        } else {
            let wait = tokio::time::timeout(timeout, target.lane.acquire_owned()).await;
            Some(
                wait.map_err(|_| PeerError::Timeout { peer: peer.to_owned(), timeout })?
                    .expect("the lane is never closed"),
            )
        };
        let remaining = timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(1));
        let body = postcard::to_stdvec(request).expect("serializing plain data into a Vec cannot fail");
        let mut req = self.http.post(target.url).timeout(remaining).body(body);
        if let Some(token) = &self.token {
            req = req.header(HEADER_CLUSTER_TOKEN, token);
        }
        // A connect timeout is a connection failure (nothing answers at that address), not a slow
        // peer: check it first.
        let classify = |e: reqwest::Error| match (e.is_connect(), e.is_timeout()) {
            (true, true) => PeerError::ConnectTimeout { peer: peer.to_owned() },
            (false, true) => PeerError::Timeout { peer: peer.to_owned(), timeout },
            _ => PeerError::Unreachable { peer: peer.to_owned(), detail: error_chain(&e) },
        };
        let resp = req.send().await.map_err(classify)?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(classify)?;
        if status != 200 {
            let msg = String::from_utf8_lossy(&bytes).into_owned();
            return Err(PeerError::Refused { peer: peer.to_owned(), status, msg });
        }
        let response = postcard::from_bytes(&bytes)
            .map_err(|e| PeerError::Protocol { peer: peer.to_owned(), detail: e.to_string() })?;
        match response {
            PeerResponse::Refused { status, msg } => Err(PeerError::Refused { peer: peer.to_owned(), status, msg }),
            other => Ok(other),
        }
    }
}

/// An error with its causes ("error sending request" alone does not say refused or reset).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_postcard() {
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
    }
}
