//! The node: its state (views, store, clocks, peer liveness, admission) and the few operations
//! every layer above shares (calling a peer, applying replicated records). What the node *does*
//! lives in `impl Node` blocks elsewhere, one concern each: `ops` (client operations),
//! `view_change`, `anti_entropy`, `status`, `rpc` (answering peers).
//!
//! Invariants:
//! - The view is swapped whole (`Arc<View>` behind a `std` lock held only to clone the `Arc`), so a
//!   request works against one consistent view from start to finish; view transitions go through
//!   [`Node::views_for_update`] one at a time, and the view never moves to a lower epoch.
//! - Every timestamp this node issues is above every timestamp it has stored or received.

mod error;

pub use error::KvError;

use crate::admission::Admission;
use crate::catch_up::CatchUp;
use crate::causal::{Clock, Hlc, SystemClock};
use crate::fence::WriteFence;
use crate::freshness::Freshness;
use crate::liveness::{Death, DetectorConfig, Liveness, PeerState};
use crate::metrics::Metrics;
use crate::peers::{PeerError, Peers};
use crate::protocol::{PeerRequest, PeerResponse};
use crate::store::{Store, StoreError};
use crate::view::{NodeId, View};
use crate::view_change::ChangeState;
use crate::view_store::{ViewState, ViewStore};
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
    /// Keys per second each sending node moves in a view change this node drives, unless the
    /// change asks for another rate (0: as fast as it can). Moving data competes with clients for
    /// the same cores and disks: the pace leaves them room.
    pub transfer_rate: u64,
    /// TLS for the port and for calls to peers (`--tls-*`); `None` is plain TCP.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// Client tokens and their roles (`--auth-file`); `None` leaves client routes open.
    pub auth: Option<Arc<crate::auth::Gate>>,
}

/// Longest [`Node::probe_peer`] waits for a peer the detector holds dead: enough for
/// a live peer on this machine's network, short of the one second a request may take because a
/// node is dead.
pub const PROBE_DEADLINE: Duration = Duration::from_millis(500);

/// Default of [`Settings::transfer_rate`].
pub const DEFAULT_TRANSFER_RATE: u64 = 100_000;

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
            transfer_rate: DEFAULT_TRANSFER_RATE,
            tls: None,
            auth: None,
        }
    }
}

/// Everything a node is made of besides its own state.
pub struct Parts {
    pub settings: Settings,
    /// The view to start with when `view_store` holds none (a first start).
    pub initial: Option<View>,
    pub store: Arc<dyn Store>,
    pub peers: Arc<dyn Peers>,
    pub clock: Arc<dyn Clock>,
    pub view_store: ViewStore,
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
    pub(crate) changes: ChangeState,
    /// What this node knows about holding every write it depends on (see `freshness`).
    pub(crate) freshness: Freshness,
    /// HLC time when the current view was installed (see `freshness`).
    view_installed_at: std::sync::atomic::AtomicU64,
    /// Round-robin position of view gossip over the other members (see `anti_entropy`).
    pub(crate) gossip_cursor: std::sync::atomic::AtomicUsize,
    /// This node itself, for background tasks it spawns.
    me: std::sync::Weak<Node>,
    pub(crate) store: Arc<dyn Store>,
    /// Backups holding a cut here (the store above remembers versions for them; see `backup`).
    pub(crate) holds: Arc<crate::backup::Holds>,
    pub(crate) peers: Arc<dyn Peers>,
    /// Which peers are alive (evidence of death only, never slowness).
    pub(crate) liveness: Liveness,
    /// Bounds the client operations in progress on this node.
    pub(crate) admission: Admission,
    /// Whether this node holds its partition's data since it started (see `catch_up`).
    pub(crate) catch_up: CatchUp,
    /// Peer names from the hosts file, if one is configured.
    hosts: Option<crate::hosts::HostsFileResolver>,
    pub(crate) hlc: Hlc,
    /// Wall-clock time for timestamps and forwarded-write expiry (simulated in tests).
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) metrics: Metrics,
    /// Set when the node starts shutting down: it is no longer ready and closes each client
    /// connection after its next answer, while still serving (see `kvs_node::ServeOptions::shutdown_delay`).
    draining: std::sync::atomic::AtomicBool,
}

impl Node {
    /// A node over `store` and `peers`. Starts with the view persisted in `settings.state_dir` if
    /// there is one (a restart), else with `initial` (from `VIEW`, a first start).
    pub fn new(settings: Settings, initial: Option<View>, store: Arc<dyn Store>, peers: Arc<dyn Peers>) -> Arc<Self> {
        let view_store = ViewStore::new(settings.state_dir.as_deref());
        Self::from_parts(Parts { settings, initial, store, peers, clock: Arc::new(SystemClock), view_store })
    }

    /// A node from all its parts (a simulated cluster gives it a simulated clock and disk).
    pub fn from_parts(parts: Parts) -> Arc<Self> {
        let Parts { settings, initial, store, peers, clock, view_store } = parts;
        let holds = Arc::new(crate::backup::Holds::default());
        let store: Arc<dyn Store> = Arc::new(crate::backup::HoldingStore::new(store, holds.clone()));
        let hlc = Hlc::starting_after(store.max_timestamp());
        let metrics = Metrics::default();
        let liveness = Liveness::new(settings.detector, metrics.peer_deaths.clone());
        let admission = Admission::new(settings.admission);
        let stored = store.digests().stats();
        let catch_up = CatchUp::new(stored.live_keys + stored.tombstones == 0);
        let hosts = settings.hosts_file.clone().map(crate::hosts::HostsFileResolver::new);
        let saved = view_store.load().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the saved view; starting from VIEW");
            ViewState::default()
        });
        let first_start = saved.view.is_none();
        let view = saved.view.map(View::from_layout).or(initial);
        // The view a node first starts with (VIEW) is its membership from then on, as any later
        // one is: a restart without VIEW (local mode's) comes back with it.
        if let (true, Some(v)) = (first_start, &view) {
            let state = ViewState { view: Some(v.layout().clone()), pending: saved.pending.clone() };
            if let Err(e) = view_store.save(&state) {
                tracing::error!(error = %e, "cannot save the initial view; a restart without VIEW will have none");
            }
        }
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
            changes: ChangeState::default(),
            freshness: Freshness::default(),
            view_installed_at: std::sync::atomic::AtomicU64::new(hlc.peek()),
            gossip_cursor: std::sync::atomic::AtomicUsize::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
            store,
            holds,
            peers,
            liveness,
            admission,
            catch_up,
            hosts,
            hlc,
            clock,
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

    /// Whether this node replicates `key` under its view or the pending one.
    pub(crate) fn owns_key(&self, key: &str) -> bool {
        let owns = |v: &View| v.owners_of_key(key).iter().any(|o| o == self.id());
        self.view().is_some_and(|v| owns(&v)) || self.pending().is_some_and(|p| owns(&p))
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

    /// Whether this node holds its partition's data (see `catch_up`): until then it answers no
    /// client operation from its own store, and is not ready.
    pub fn is_caught_up(&self) -> bool {
        self.catch_up.is_caught_up()
    }

    /// Starts the drain before a shutdown: not ready from now on, and every client connection is
    /// closed after its next answer (so pooling clients move to other nodes on their own).
    pub fn start_draining(&self) {
        self.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the node is draining before a shutdown (see [`Node::start_draining`]).
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Client operations waiting for a slot and in progress on this node.
    pub fn load(&self) -> (i64, usize) {
        (self.admission.queued(), self.admission.in_flight())
    }

    /// Calls `peer` even if the failure detector holds it dead, for at most [`PROBE_DEADLINE`] in
    /// that case: a probe, for a node that may itself have been the one cut off, when acting on
    /// what may be an out-of-date view would be worse than a short wait. An answer is proof of
    /// life; no answer in time leaves the peer dead (and says so: [`PeerError::Dead`]).
    pub(crate) async fn probe_peer(
        &self,
        peer: &str,
        request: &PeerRequest,
        deadline: Duration,
    ) -> Result<PeerResponse, PeerError> {
        let PeerState::Dead(evidence) = self.liveness.state(peer) else {
            return self.call_peer(peer, request, deadline).await;
        };
        match self.peers.call(peer, request, deadline.min(PROBE_DEADLINE)).await {
            result @ (Ok(_) | Err(PeerError::Refused { .. })) => {
                self.liveness.heard(peer);
                result
            }
            Err(PeerError::Timeout { .. }) => Err(PeerError::Dead { peer: peer.to_owned(), evidence }),
            other => other,
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
                | PeerError::Rejected { .. }
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
