//! The network boundary between nodes: one request/response RPC ([`PeerRequest`] →
//! [`PeerResponse`]) behind the [`Peers`] trait, an HTTP implementation over pooled connections, and
//! [`PeerHealth`], which remembers recently failed peers so requests skip them instead of waiting.
//!
//! Wire format: postcard (compact binary, serde) in the body of `POST /internal/v1/rpc`. Every call
//! carries its own deadline; nothing here retries — failover is the caller's decision.

use crate::causal::VectorClock;
use crate::placement::{PartitionId, Slot};
use crate::store::Record;
use async_trait::async_trait;
use bytes::Bytes;
use kvs_api::{HEADER_CLUSTER_TOKEN, Layout};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Path of the single internal RPC route.
pub const RPC_PATH: &str = "/internal/v1/rpc";

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
    Coordinate { key: String, op: KvOp, context: VectorClock, view_epoch: u64 },
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
}

/// Why a call to a peer failed. Every variant means "try another replica".
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{peer} is unreachable: {detail}")]
    Unreachable { peer: String, detail: String },
    #[error("{peer} did not answer within {timeout:?}")]
    Timeout { peer: String, timeout: Duration },
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
    /// Parsed RPC URL per peer (parsing one costs more than the rest of building a request).
    /// `std` lock, never held across `.await`.
    urls: std::sync::RwLock<HashMap<String, reqwest::Url>>,
}

impl HttpPeers {
    /// `connect_timeout` bounds TCP connection setup (a dead host must not cost more than this).
    /// `hosts_file` maps peer names to addresses ahead of DNS (see [`crate::hosts`]).
    pub fn new(connect_timeout: Duration, token: Option<String>, hosts_file: Option<std::path::PathBuf>) -> Self {
        let mut builder = reqwest::Client::builder();
        if let Some(path) = hosts_file {
            builder = builder.dns_resolver(std::sync::Arc::new(crate::hosts::HostsFileResolver::new(path)));
        }
        let http = builder
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .build()
            .expect("a plain HTTP client always builds");
        HttpPeers { http, token, urls: Default::default() }
    }

    fn url(&self, peer: &str) -> Result<reqwest::Url, PeerError> {
        if let Some(u) = self.urls.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(peer) {
            return Ok(u.clone());
        }
        let url = reqwest::Url::parse(&format!("http://{peer}{RPC_PATH}"))
            .map_err(|e| PeerError::Unreachable { peer: peer.to_owned(), detail: format!("not a valid address: {e}") })?;
        self.urls.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(peer.to_owned(), url.clone());
        Ok(url)
    }
}

#[async_trait]
impl Peers for HttpPeers {
    async fn call(&self, peer: &str, request: &PeerRequest, timeout: Duration) -> Result<PeerResponse, PeerError> {
        let body = postcard::to_stdvec(request).expect("serializing plain data into a Vec cannot fail");
        let mut req = self.http.post(self.url(peer)?).timeout(timeout).body(body);
        if let Some(token) = &self.token {
            req = req.header(HEADER_CLUSTER_TOKEN, token);
        }
        let classify = |e: reqwest::Error| {
            if e.is_timeout() {
                PeerError::Timeout { peer: peer.to_owned(), timeout }
            } else {
                PeerError::Unreachable { peer: peer.to_owned(), detail: e.to_string() }
            }
        };
        let resp = req.send().await.map_err(classify)?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(classify)?;
        if status != 200 {
            let msg = String::from_utf8_lossy(&bytes).into_owned();
            return Err(PeerError::Refused { peer: peer.to_owned(), status, msg });
        }
        let response = postcard::from_bytes(&bytes).map_err(|e| PeerError::Protocol { peer: peer.to_owned(), detail: e.to_string() })?;
        match response {
            PeerResponse::Refused { status, msg } => Err(PeerError::Refused { peer: peer.to_owned(), status, msg }),
            other => Ok(other),
        }
    }
}

/// Recently failed peers. A failed peer is skipped for `hold_down` (failover goes straight to the next
/// replica), then tried again; anti-entropy keeps probing it and clears the mark on success.
pub struct PeerHealth {
    hold_down: Duration,
    /// Peer → when it may be tried again. `std` mutex: O(1) work under it, never held across `.await`.
    down_until: Mutex<HashMap<String, Instant>>,
}

impl PeerHealth {
    pub fn new(hold_down: Duration) -> Self {
        PeerHealth { hold_down, down_until: Mutex::new(HashMap::new()) }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.down_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// True while `peer` is marked down.
    pub fn is_down(&self, peer: &str) -> bool {
        self.map().get(peer).is_some_and(|&until| Instant::now() < until)
    }

    pub fn mark_down(&self, peer: &str) {
        self.map().insert(peer.to_owned(), Instant::now() + self.hold_down);
    }

    pub fn mark_up(&self, peer: &str) {
        self.map().remove(peer);
    }

    /// `peers` reordered: healthy ones first (keeping their relative order), marked-down ones last.
    pub fn order<'a>(&self, peers: impl IntoIterator<Item = &'a String>) -> Vec<&'a String> {
        let (mut up, down): (Vec<_>, Vec<_>) = peers.into_iter().partition(|p| !self.is_down(p));
        up.extend(down);
        up
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_orders_down_peers_last_and_forgets_them() {
        let h = PeerHealth::new(Duration::from_millis(50));
        let peers: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
        h.mark_down("a");
        assert_eq!(h.order(&peers), [&peers[1], &peers[2], &peers[0]]);
        std::thread::sleep(Duration::from_millis(60));
        assert!(!h.is_down("a"));
        h.mark_down("b");
        h.mark_up("b");
        assert!(!h.is_down("b"));
    }

    #[test]
    fn requests_round_trip_through_postcard() {
        let req = PeerRequest::Coordinate {
            key: "k".into(),
            op: KvOp::Put(Bytes::from_static(b"v")),
            context: VectorClock::new(),
            view_epoch: 3,
        };
        let bytes = postcard::to_stdvec(&req).unwrap();
        assert_eq!(postcard::from_bytes::<PeerRequest>(&bytes).unwrap(), req);
    }
}
