//! The node: its state (view, store, clocks, peer health) and the entry points the HTTP layer
//! calls. Request routing and replication live in `replication`, anti-entropy in `anti_entropy`;
//! both are `impl Node` blocks over the state defined here.
//!
//! Invariants:
//! - The view is swapped whole (`Arc<View>` behind a `std` lock held only to clone the `Arc`), so a
//!   request works against one consistent view from start to finish.
//! - Every timestamp this node issues is above every timestamp it has stored or received.

use crate::admission::{Admission, Overloaded};
use crate::causal::{Hlc, VectorClock};
use crate::fence::WriteFence;
use crate::freshness::Freshness;
use crate::liveness::{Death, DetectorConfig, Liveness, PeerState};
use crate::metrics::Metrics;
use crate::peers::{CoordinateRefusal, Durability, PeerError, PeerRequest, PeerResponse, Peers};
use crate::placement::PartitionId;
use crate::rebalance::RebalanceState;
use crate::store::{Store, StoreError};
use crate::view::{NodeId, View};
use crate::view_store::{ViewState, ViewStore};
use bytes::Bytes;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Tunables, all with production defaults (see `config` for the flags that set them).
#[derive(Clone, Debug)]
pub struct Settings {
    /// This node's identity (`IPPORT`).
    pub me: NodeId,
    /// Longest a forwarded client request waits for a live owner before trying the next owner.
    /// An owner declared dead is given up on at once (see `liveness`); this bounds a live one.
    pub forward_deadline: Duration,
    /// Longest a write waits for a live replica to store it (and a causal read for a live
    /// replica's record). A replica declared dead is given up on at once.
    pub replica_deadline: Duration,
    /// The failure detector's tunables.
    pub detector: DetectorConfig,
    /// Client operations in progress at once, and how long more may queue.
    pub admission: crate::admission::Limits,
    /// Pause between anti-entropy rounds.
    pub anti_entropy_interval: Duration,
    /// Largest value accepted, in bytes.
    pub max_value_bytes: usize,
    /// Shared secret required on internal routes (and view changes) when set.
    pub cluster_token: Option<String>,
    /// Where the view is persisted (the data directory); `None` keeps it in memory only.
    pub state_dir: Option<PathBuf>,
    /// Hosts file resolving peer names ahead of DNS (see `hosts`), for heartbeats.
    pub hosts_file: Option<PathBuf>,
    /// Budget for one view-change control message (prepare, begin, commit) to one live node (a
    /// dead one is given up on at once). Begin waits for the writes in progress to finish.
    pub view_change_timeout: Duration,
}

impl Settings {
    /// Defaults for a node called `me`.
    pub fn new(me: impl Into<NodeId>) -> Self {
        Settings {
            me: me.into(),
            forward_deadline: Duration::from_secs(10),
            replica_deadline: Duration::from_secs(5),
            detector: DetectorConfig::default(),
            admission: crate::admission::Limits::default(),
            anti_entropy_interval: Duration::from_millis(200),
            max_value_bytes: 1 << 20,
            cluster_token: None,
            state_dir: None,
            hosts_file: None,
            view_change_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a key-value operation failed. The HTTP layer turns each into a status and message.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("this node has no view yet: start it with VIEW, or add it to a cluster with update_view")]
    NoView,
    #[error("key value store is not available: no replica of partition {partition} answered")]
    Unavailable { partition: PartitionId },
    #[error("this node does not own partition {partition} in view {epoch}")]
    NotOwner { partition: PartitionId, epoch: u64 },
    #[error("this node is on view epoch {mine}, the sender on {theirs}")]
    EpochMismatch { mine: u64, theirs: u64 },
    #[error(
        "this replica of partition {partition} has not received a write your causal context depends on, and the replicas that have it are unreachable from here; retry (another node may reach them)"
    )]
    CausalUnavailable { partition: PartitionId },
    #[error("{peer} is on a newer view")]
    StaleView { peer: String },
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    #[error(
        "only {alive} of the {replicas} replicas of partition {partition} are alive and kvs-min-replicas asks for {min_copies}; \
         nothing was written: retry when a replica is back, or ask for fewer copies"
    )]
    TooFewReplicas { partition: PartitionId, alive: u32, replicas: u32, min_copies: u32 },
    #[error(
        "the write is durable on {} of the {} replicas of partition {partition}, fewer than kvs-min-replicas={min_copies}; \
         it is not acknowledged but may still become visible (a replica that missed it catches up by anti-entropy)",
        durability.copies, durability.replicas
    )]
    UnderReplicated { partition: PartitionId, durability: Durability, min_copies: u32 },
    #[error(
        "kvs-min-replicas is {min_copies} but partition {partition} has {replicas} replicas; ask for at most {replicas}"
    )]
    MinCopiesAboveReplicas { partition: PartitionId, replicas: u32, min_copies: u32 },
    #[error("the forwarded write reached its owner {age_micros} µs after it was sent, too late to be performed safely")]
    Expired { age_micros: u64 },
    #[error("the owner's storage failed: {0}")]
    RemoteStorage(String),
    #[error(transparent)]
    Storage(#[from] StoreError),
}

impl KvError {
    /// The refusal an owner sends back for a forwarded operation.
    pub(crate) fn to_refusal(&self) -> CoordinateRefusal {
        match *self {
            KvError::EpochMismatch { mine, theirs } => CoordinateRefusal::EpochMismatch { mine, theirs },
            KvError::NotOwner { partition, epoch } => CoordinateRefusal::NotOwner { partition, epoch },
            KvError::NoView => CoordinateRefusal::NoView,
            KvError::CausalUnavailable { partition } | KvError::Unavailable { partition } => {
                CoordinateRefusal::CausalUnavailable { partition }
            }
            KvError::TooFewReplicas { partition, alive, replicas, min_copies } => {
                CoordinateRefusal::TooFewReplicas { partition, alive, replicas, min_copies }
            }
            KvError::UnderReplicated { partition, durability, min_copies } => {
                CoordinateRefusal::UnderReplicated { partition, durability, min_copies }
            }
            KvError::MinCopiesAboveReplicas { partition, replicas, min_copies } => {
                CoordinateRefusal::MinCopiesAboveReplicas { partition, replicas, min_copies }
            }
            KvError::Expired { age_micros } => CoordinateRefusal::Expired { age_micros },
            KvError::StaleView { .. } | KvError::Overloaded(_) | KvError::RemoteStorage(_) | KvError::Storage(_) => {
                CoordinateRefusal::Storage { detail: self.to_string() }
            }
        }
    }

    /// The error a forwarder reports for an owner's refusal.
    pub(crate) fn from_refusal(refusal: CoordinateRefusal) -> Self {
        match refusal {
            CoordinateRefusal::EpochMismatch { mine, theirs } => KvError::EpochMismatch { mine, theirs },
            CoordinateRefusal::NotOwner { partition, epoch } => KvError::NotOwner { partition, epoch },
            CoordinateRefusal::NoView => KvError::NoView,
            CoordinateRefusal::CausalUnavailable { partition } => KvError::CausalUnavailable { partition },
            CoordinateRefusal::MinCopiesAboveReplicas { partition, replicas, min_copies } => {
                KvError::MinCopiesAboveReplicas { partition, replicas, min_copies }
            }
            CoordinateRefusal::TooFewReplicas { partition, alive, replicas, min_copies } => {
                KvError::TooFewReplicas { partition, alive, replicas, min_copies }
            }
            CoordinateRefusal::UnderReplicated { partition, durability, min_copies } => {
                KvError::UnderReplicated { partition, durability, min_copies }
            }
            CoordinateRefusal::Expired { age_micros } => KvError::Expired { age_micros },
            CoordinateRefusal::Storage { detail } => KvError::RemoteStorage(detail),
        }
    }
}

/// The right to change a node's views, held by one transition at a time.
pub(crate) struct ViewUpdate<'a> {
    node: &'a Node,
    _exclusive: std::sync::MutexGuard<'a, ()>,
}

impl ViewUpdate<'_> {
    pub(crate) fn view(&self) -> Option<Arc<View>> {
        self.node.view()
    }

    pub(crate) fn pending(&self) -> Option<Arc<View>> {
        self.node.pending()
    }

    /// Replaces both views, durably first; never moves the view to a lower epoch.
    pub(crate) fn set(&self, view: Option<Arc<View>>, pending: Option<Arc<View>>) -> std::io::Result<()> {
        self.node.set_views(view, pending)
    }
}

/// One node of the cluster.
pub struct Node {
    pub(crate) settings: Settings,
    /// The current view; `None` until this node is given one. `std` lock: held only to clone or
    /// replace the `Arc`, never across `.await`.
    view: RwLock<Option<Arc<View>>>,
    /// The view a change in progress moves to (writes go to its owners too). Same lock discipline.
    pending: RwLock<Option<Arc<View>>>,
    /// Persists `view` and `pending`.
    view_store: ViewStore,
    /// Serializes view transitions (see [`Node::views_for_update`]). `std` mutex: held only
    /// while deciding and persisting a transition, never across `.await`.
    view_transition: std::sync::Mutex<()>,
    /// Lets a view change wait for writes that started under the previous view.
    pub(crate) fence: WriteFence,
    /// View-change bookkeeping: promises, progress, the primary's lock.
    pub(crate) rebalance: RebalanceState,
    /// What this node knows about holding every write it depends on (see `freshness`).
    pub(crate) freshness: Freshness,
    /// HLC time when the current view was installed (see `freshness`).
    view_installed_at: std::sync::atomic::AtomicU64,
    /// This node itself, for background tasks it spawns.
    me: std::sync::Weak<Node>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) peers: Arc<dyn Peers>,
    /// Which peers are alive (evidence of death only, never slowness).
    pub(crate) liveness: Liveness,
    /// Bounds the client operations in progress on this node.
    pub(crate) admission: Admission,
    /// Peer names from the hosts file, if one is configured.
    hosts: Option<crate::hosts::HostsFileResolver>,
    pub(crate) hlc: Hlc,
    pub(crate) metrics: Metrics,
}

impl Node {
    /// A node over `store` and `peers`. Starts with the view persisted in `settings.state_dir` if
    /// there is one (a restart), else with `initial` (from `VIEW`, a first start).
    pub fn new(settings: Settings, initial: Option<View>, store: Arc<dyn Store>, peers: Arc<dyn Peers>) -> Arc<Self> {
        let hlc = Hlc::starting_after(store.max_timestamp());
        let metrics = Metrics::default();
        let liveness = Liveness::new(settings.detector, metrics.peer_deaths.clone());
        let admission = Admission::new(settings.admission);
        let hosts = settings.hosts_file.clone().map(crate::hosts::HostsFileResolver::new);
        let view_store = ViewStore::new(settings.state_dir.as_deref());
        let saved = view_store.load().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the saved view; starting from VIEW");
            ViewState::default()
        });
        let view = saved.view.map(View::from_layout).or(initial);
        let pending = saved.pending.map(View::from_layout);
        if let Some(v) = &view {
            tracing::info!(
                view_epoch = v.epoch(),
                partitions = v.number_of_partitions(),
                pending = pending.as_ref().map(View::epoch),
                "starting with view"
            );
        }
        Arc::new_cyclic(|me| Node {
            me: me.clone(),
            settings,
            view: RwLock::new(view.map(Arc::new)),
            pending: RwLock::new(pending.map(Arc::new)),
            view_store,
            view_transition: std::sync::Mutex::new(()),
            fence: WriteFence::default(),
            rebalance: RebalanceState::default(),
            freshness: Freshness::default(),
            view_installed_at: std::sync::atomic::AtomicU64::new(hlc.peek()),
            store,
            peers,
            liveness,
            admission,
            hosts,
            hlc,
            metrics,
        })
    }

    /// Every other member of the view and of the pending view: the peers the failure detector
    /// watches.
    pub(crate) fn peers_to_watch(&self) -> Vec<NodeId> {
        let mut peers: Vec<NodeId> = self.view().map(|v| v.all_members()).unwrap_or_default();
        peers.extend(self.pending().map(|v| v.all_members()).unwrap_or_default());
        peers.sort();
        peers.dedup();
        peers.retain(|p| p != self.id());
        peers
    }

    /// The address the hosts file gives `peer` (`host:port`), if there is one.
    pub(crate) fn resolve_peer(&self, peer: &str) -> Option<std::net::SocketAddr> {
        let (host, port) = peer.rsplit_once(':')?;
        let ip = self.hosts.as_ref()?.lookup(host)?;
        Some(std::net::SocketAddr::new(ip, port.parse().ok()?))
    }

    /// This node's identity.
    pub fn id(&self) -> &str {
        &self.settings.me
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The current view, if any.
    pub fn view(&self) -> Option<Arc<View>> {
        self.view.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The current view, or `NoView`.
    pub fn require_view(&self) -> Result<Arc<View>, KvError> {
        self.view().ok_or(KvError::NoView)
    }

    /// A handle to this node for tasks that outlive the current request.
    pub(crate) fn self_handle(&self) -> std::sync::Weak<Node> {
        self.me.clone()
    }

    /// HLC time when the current view was installed (startup for a restarted node).
    pub(crate) fn view_installed_at(&self) -> u64 {
        self.view_installed_at.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The view a change in progress moves to, if any.
    pub fn pending(&self) -> Option<Arc<View>> {
        self.pending.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Takes the right to change the view and the pending view. Every transition (begin, commit,
    /// adopting a newer view) decides from what it reads through the guard and writes through it,
    /// so two transitions can never interleave (one reading an old view, another installing a
    /// newer one, the first writing the old one back).
    pub(crate) fn views_for_update(&self) -> ViewUpdate<'_> {
        ViewUpdate {
            node: self,
            _exclusive: self.view_transition.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
        }
    }

    /// Replaces the view and the pending view together, durably first.
    fn set_views(&self, view: Option<Arc<View>>, pending: Option<Arc<View>>) -> std::io::Result<()> {
        let old_epoch = self.view().map_or(0, |v| v.epoch());
        let new_epoch = view.as_ref().map_or(0, |v| v.epoch());
        if new_epoch < old_epoch {
            return Err(std::io::Error::other(format!(
                "refusing to go back from view epoch {old_epoch} to {new_epoch}"
            )));
        }
        let state = ViewState {
            view: view.as_ref().map(|v| v.layout().clone()),
            pending: pending.as_ref().map(|v| v.layout().clone()),
        };
        self.view_store.save(&state)?;
        if let Some(v) = &view {
            tracing::info!(
                view_epoch = v.epoch(),
                partitions = v.number_of_partitions(),
                pending = pending.as_ref().map(|p| p.epoch()),
                "view updated"
            );
        }
        let changed = old_epoch != new_epoch;
        *self.view.write().unwrap_or_else(std::sync::PoisonError::into_inner) = view;
        if changed {
            self.view_installed_at.store(self.hlc.peek(), std::sync::atomic::Ordering::Release);
            self.freshness.forget_peers();
        }
        *self.pending.write().unwrap_or_else(std::sync::PoisonError::into_inner) = pending;
        Ok(())
    }

    /// Reads `key` with the client's causal context (a client operation: admitted first).
    pub async fn read(&self, key: &str, context: VectorClock) -> Result<crate::peers::Coordinated, KvError> {
        let _slot = self.admit().await?;
        self.route(key, crate::peers::KvOp::Get, context, 0).await
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
    ) -> Result<crate::peers::Coordinated, KvError> {
        let _slot = self.admit().await?;
        let op = match value {
            Some(v) => crate::peers::KvOp::Put(v),
            None => crate::peers::KvOp::Delete,
        };
        self.route(key, op, context, min_copies).await
    }

    async fn admit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, KvError> {
        self.admission.admit().await.map_err(|e| {
            self.metrics.overloaded.inc();
            KvError::Overloaded(e)
        })
    }

    /// Client operations waiting for a slot and in progress on this node.
    pub fn load(&self) -> (i64, usize) {
        (self.admission.queued(), self.admission.in_flight())
    }

    /// Answers one RPC from another node.
    pub async fn handle_rpc(&self, request: PeerRequest) -> PeerResponse {
        let refused = |status: u16, e: &dyn std::fmt::Display| PeerResponse::Refused { status, msg: e.to_string() };
        match request {
            PeerRequest::Coordinate { key, op, context, view_epoch, min_copies, sent_at } => {
                match self.coordinate(&key, op, context, view_epoch, min_copies, sent_at).await {
                    Ok(c) => PeerResponse::Coordinated(c),
                    Err(e) => PeerResponse::NotCoordinated(e.to_refusal()),
                }
            }
            PeerRequest::Ping => PeerResponse::Pong,
            PeerRequest::Replicate { records, from, cap, pending } => {
                let theirs: Vec<u64> =
                    records.iter().filter(|(_, r)| r.version.writer == from).map(|(_, r)| r.version.ts).collect();
                match self.apply_replicated(records).await {
                    Ok(_) => {
                        self.freshness.received(&from, &theirs, &crate::freshness::Announcement { cap, pending });
                        PeerResponse::Replicated
                    }
                    Err(e) => refused(500, &e),
                }
            }
            PeerRequest::Fetch { key } => match self.store.get(&key) {
                Ok(r) => PeerResponse::Fetched(r),
                Err(e) => refused(500, &e),
            },
            PeerRequest::DigestSummary { view_epoch, partition, summary } => {
                self.answer_digest_summary(view_epoch, partition, summary)
            }
            PeerRequest::SyncSlots { view_epoch, slots, records } => {
                match self.answer_sync(view_epoch, slots, records).await {
                    Ok(r) => r,
                    Err(e) => refused(500, &e),
                }
            }
            PeerRequest::Hello => PeerResponse::Hello(Box::new(self.hello())),
            PeerRequest::Prepare { layout, proposer } => self.answer_prepare(&layout, &proposer),
            PeerRequest::Abort { epoch, proposer } => self.answer_abort(epoch, &proposer),
            PeerRequest::Begin { proposer, layout } => self.answer_begin(&proposer, layout).await,
            PeerRequest::Transfer { epoch, assignments } => self.answer_transfer(epoch, assignments).await,
            PeerRequest::Commit { epoch } => self.answer_commit(epoch).await,
            PeerRequest::Prune { epoch } => self.answer_prune(epoch).await,
            PeerRequest::SlotDigests { slots } => {
                let digests = self.store.digests();
                PeerResponse::Digests(Some(slots.into_iter().map(|s| (s, digests.get(s))).collect()))
            }
        }
    }

    /// Calls `peer` unless it is dead, giving up as soon as the failure detector declares it dead,
    /// else after `deadline`. Feeds what the call showed back to the detector: any answer is proof
    /// of life, a failed connection is evidence of death, a slow answer is neither. A peer whose
    /// host refused connections is tried again (that costs one round trip and notices at once
    /// that it is back); one that is silent or whose address does not answer is not.
    pub(crate) async fn call_peer(
        &self,
        peer: &str,
        request: &PeerRequest,
        deadline: Duration,
    ) -> Result<PeerResponse, PeerError> {
        let result = match self.liveness.state(peer) {
            PeerState::Dead(evidence @ (Death::Silent | Death::Unreachable)) => {
                return Err(PeerError::Skipped { peer: peer.to_owned(), evidence });
            }
            PeerState::Dead(Death::Refused) => self.peers.call(peer, request, deadline).await,
            PeerState::Alive => tokio::select! {
                biased;
                result = self.peers.call(peer, request, deadline) => result,
                evidence = self.liveness.until_dead(peer) => Err(PeerError::Dead { peer: peer.to_owned(), evidence }),
            },
        };
        match &result {
            Ok(_) | Err(PeerError::Refused { .. }) => self.liveness.heard(peer),
            Err(e @ PeerError::Unreachable { .. }) => {
                self.liveness.connection_failed(peer, Death::Refused, &e.to_string())
            }
            Err(e @ PeerError::ConnectTimeout { .. }) => {
                self.liveness.connection_failed(peer, Death::Unreachable, &e.to_string())
            }
            Err(
                PeerError::Timeout { .. }
                | PeerError::Skipped { .. }
                | PeerError::Dead { .. }
                | PeerError::Protocol { .. },
            ) => {}
        }
        result
    }

    /// Stores records sent by another node (newest-wins) and moves the clock past them. Returns
    /// how many were newer than what this node had.
    pub(crate) async fn apply_replicated(
        &self,
        records: Vec<(String, crate::store::Record)>,
    ) -> Result<u64, StoreError> {
        if let Some(max) = records.iter().map(|(_, r)| r.version.ts).max() {
            self.hlc.observe(max);
        }
        let outcomes = self.store.apply(records).await?;
        Ok(outcomes.iter().filter(|o| **o != crate::store::Applied::Stale).count() as u64)
    }

    /// Every record in `slots`.
    pub(crate) fn scan_slots(
        &self,
        slots: &[crate::placement::Slot],
    ) -> Result<Vec<(String, crate::store::Record)>, StoreError> {
        let mut out = Vec::new();
        for &slot in slots {
            out.extend(self.store.scan_slot(slot)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoPeers;

    #[async_trait::async_trait]
    impl Peers for NoPeers {
        async fn call(&self, peer: &str, _: &PeerRequest, _: Duration) -> Result<PeerResponse, PeerError> {
            Err(PeerError::Unreachable { peer: peer.to_owned(), detail: "no network in this test".into() })
        }
    }

    /// Regression (chaos runs with real K changes): two transitions interleaved and one wrote back
    /// the older view it had read.
    #[test]
    fn views_never_go_back() {
        let members = vec!["a:1".to_owned()];
        let node = Node::new(
            Settings::new("a:1"),
            Some(View::initial(&members, 1)),
            Arc::new(crate::store::MemoryStore::new()),
            Arc::new(NoPeers),
        );
        let newer = View::from_layout(kvs_api::Layout { epoch: 3, ..node.view().unwrap().layout().clone() });
        let older = View::from_layout(kvs_api::Layout { epoch: 2, ..newer.layout().clone() });
        let views = node.views_for_update();
        views.set(Some(Arc::new(newer)), None).unwrap();
        assert!(views.set(Some(Arc::new(older)), None).is_err(), "a lower epoch is refused");
        assert_eq!(views.view().unwrap().epoch(), 3);
    }
}
