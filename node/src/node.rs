//! The node: its state (view, store, clocks, peer health) and the entry points the HTTP layer
//! calls. Request routing and replication live in `replication`, anti-entropy in `anti_entropy`;
//! both are `impl Node` blocks over the state defined here.
//!
//! Invariants:
//! - The view is swapped whole (`Arc<View>` behind a `std` lock held only to clone the `Arc`), so a
//!   request works against one consistent view from start to finish.
//! - Every timestamp this node issues is above every timestamp it has stored or received.

use crate::causal::{Hlc, VectorClock};
use crate::fence::WriteFence;
use crate::freshness::Freshness;
use crate::metrics::Metrics;
use crate::peers::{PeerHealth, PeerRequest, PeerResponse, Peers};
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
    /// Budget for a forwarded client request at one owner before failing over to the next.
    pub forward_timeout: Duration,
    /// Budget for replicating a write to one replica (or fetching a record from one).
    pub replicate_timeout: Duration,
    /// How long a peer that failed is skipped before being tried again.
    pub peer_hold_down: Duration,
    /// Pause between anti-entropy rounds.
    pub anti_entropy_interval: Duration,
    /// Largest value accepted, in bytes.
    pub max_value_bytes: usize,
    /// Shared secret required on internal routes (and view changes) when set.
    pub cluster_token: Option<String>,
    /// Where the view is persisted (the data directory); `None` keeps it in memory only.
    pub state_dir: Option<PathBuf>,
    /// Budget for one view-change control message (prepare, begin, commit) to one node.
    pub view_change_timeout: Duration,
}

impl Settings {
    /// Defaults for a node called `me`.
    pub fn new(me: impl Into<NodeId>) -> Self {
        Settings {
            me: me.into(),
            forward_timeout: Duration::from_millis(500),
            replicate_timeout: Duration::from_millis(250),
            peer_hold_down: Duration::from_millis(1000),
            anti_entropy_interval: Duration::from_millis(200),
            max_value_bytes: 1 << 20,
            cluster_token: None,
            state_dir: None,
            view_change_timeout: Duration::from_secs(2),
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
    Storage(#[from] StoreError),
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
    pub(crate) health: PeerHealth,
    pub(crate) hlc: Hlc,
    pub(crate) metrics: Metrics,
}

impl Node {
    /// A node over `store` and `peers`. Starts with the view persisted in `settings.state_dir` if
    /// there is one (a restart), else with `initial` (from `VIEW`, a first start).
    pub fn new(settings: Settings, initial: Option<View>, store: Arc<dyn Store>, peers: Arc<dyn Peers>) -> Arc<Self> {
        let hlc = Hlc::starting_after(store.max_timestamp());
        let health = PeerHealth::new(settings.peer_hold_down);
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
            fence: WriteFence::default(),
            rebalance: RebalanceState::default(),
            freshness: Freshness::default(),
            view_installed_at: std::sync::atomic::AtomicU64::new(hlc.peek()),
            store,
            peers,
            health,
            hlc,
            metrics: Metrics::default(),
        })
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

    /// Replaces the view and the pending view together, durably first.
    pub(crate) fn set_views(&self, view: Option<Arc<View>>, pending: Option<Arc<View>>) -> std::io::Result<()> {
        let state = ViewState { view: view.as_ref().map(|v| v.layout().clone()), pending: pending.as_ref().map(|v| v.layout().clone()) };
        self.view_store.save(&state)?;
        if let Some(v) = &view {
            tracing::info!(
                view_epoch = v.epoch(),
                partitions = v.number_of_partitions(),
                pending = pending.as_ref().map(|p| p.epoch()),
                "view updated"
            );
        }
        let changed = self.view().map(|v| v.epoch()) != view.as_ref().map(|v| v.epoch());
        *self.view.write().unwrap_or_else(std::sync::PoisonError::into_inner) = view;
        if changed {
            self.view_installed_at.store(self.hlc.peek(), std::sync::atomic::Ordering::Release);
            self.freshness.forget_peers();
        }
        *self.pending.write().unwrap_or_else(std::sync::PoisonError::into_inner) = pending;
        Ok(())
    }

    /// Reads `key` with the client's causal context.
    pub async fn read(&self, key: &str, context: VectorClock) -> Result<crate::peers::Coordinated, KvError> {
        self.route(key, crate::peers::KvOp::Get, context).await
    }

    /// Writes `value` (or a tombstone for `None`) under `key`, after the client's causal context.
    pub async fn write(&self, key: &str, value: Option<Bytes>, context: VectorClock) -> Result<crate::peers::Coordinated, KvError> {
        let op = match value {
            Some(v) => crate::peers::KvOp::Put(v),
            None => crate::peers::KvOp::Delete,
        };
        self.route(key, op, context).await
    }

    /// Answers one RPC from another node.
    pub async fn handle_rpc(&self, request: PeerRequest) -> PeerResponse {
        let refused = |status: u16, e: &dyn std::fmt::Display| PeerResponse::Refused { status, msg: e.to_string() };
        match request {
            PeerRequest::Coordinate { key, op, context, view_epoch } => match self.coordinate(&key, op, context, view_epoch).await {
                Ok(c) => PeerResponse::Coordinated(c),
                Err(e @ KvError::NotOwner { .. }) => refused(421, &e),
                Err(e @ KvError::EpochMismatch { .. }) => refused(409, &e),
                Err(e @ (KvError::NoView | KvError::CausalUnavailable { .. })) => refused(503, &e),
                Err(e) => refused(500, &e),
            },
            PeerRequest::Replicate { records, from, cap, pending } => {
                let theirs: Vec<u64> = records.iter().filter(|(_, r)| r.version.writer == from).map(|(_, r)| r.version.ts).collect();
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
            PeerRequest::DigestSummary { view_epoch, partition, summary } => self.answer_digest_summary(view_epoch, partition, summary),
            PeerRequest::SyncSlots { view_epoch, slots, records } => match self.answer_sync(view_epoch, slots, records).await {
                Ok(r) => r,
                Err(e) => refused(500, &e),
            },
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

    /// Stores records sent by another node (newest-wins) and moves the clock past them. Returns
    /// how many were newer than what this node had.
    pub(crate) async fn apply_replicated(&self, records: Vec<(String, crate::store::Record)>) -> Result<u64, StoreError> {
        if let Some(max) = records.iter().map(|(_, r)| r.version.ts).max() {
            self.hlc.observe(max);
        }
        let outcomes = self.store.apply(records).await?;
        Ok(outcomes.iter().filter(|o| **o != crate::store::Applied::Stale).count() as u64)
    }

    /// Every record in `slots`.
    pub(crate) fn scan_slots(&self, slots: &[crate::placement::Slot]) -> Result<Vec<(String, crate::store::Record)>, StoreError> {
        let mut out = Vec::new();
        for &slot in slots {
            out.extend(self.store.scan_slot(slot)?);
        }
        Ok(out)
    }
}
