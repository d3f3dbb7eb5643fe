//! View changes: adding and removing nodes and changing K while the cluster serves traffic.
//!
//! The node that receives a change (the *primary receiver*) drives it through five phases; every
//! other node only answers messages:
//! 1. **Prepare** — the primary asks every node of the old and new views, one at a time in id order,
//!    to promise it the next epoch. A node promises one proposer per epoch (promises lapse after
//!    [`PROMISE_TTL`] without progress), so of two concurrent changes the one that reaches the
//!    lowest live node first wins and the other gets a 409: never two views with one epoch.
//!    Asking in a fixed order is what makes one of them win instead of both losing.
//! 2. **Begin** — every node records the new layout as *pending*: from then on a write is stored
//!    on its key's old owners and also sent to its new owners (dual-write). Before acknowledging,
//!    a node waits for writes that started without seeing the pending view ([`WriteFence`]).
//! 3. **Transfer** — for every slot whose owners change, one live old owner (the source) first
//!    catches up from the other old owners (they may hold writes it missed), then streams the
//!    slot to each new owner in batches, each acknowledged (durable) before the next is sent.
//! 4. **Commit** — every node makes the pending view its view.
//! 5. **Prune** — every node drops the slots it no longer owns, after checking slot digests with
//!    an owner and pushing anything the owner lacks (the final catch-up pass).
//!
//! Nodes that do not answer are treated as dead and skipped (bounded timeouts); a node that was
//! dead or paused learns the new view later from any peer (see `anti_entropy`) and runs the same
//! catch-up-then-prune. Every phase is idempotent, so a retried or resumed change redoes safely.
//!
//! [`WriteFence`]: crate::fence::WriteFence

use crate::node::Node;
use crate::peers::{Assignment, HelloInfo, PeerError, PeerRequest, PeerResponse};
use crate::placement::{SLOT_COUNT, Slot};
use crate::store::Record;
use crate::view::{NodeId, View, plan_layout, plan_moves};
use futures::future::join_all;
use kvs_api::{ClusterStatus, Layout, PartitionStatus, RebalanceProgress, ViewChanged};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A promise lapses if its proposer makes no progress for this long (the proposer died).
pub const PROMISE_TTL: Duration = Duration::from_secs(30);
/// Records per transfer batch.
const BATCH_RECORDS: usize = 2000;
/// Bytes per transfer batch (whichever limit is reached first).
const BATCH_BYTES: usize = 4 << 20;
/// Budget for one source's whole transfer.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(1800);
/// Slots per digest comparison.
const DIGEST_CHUNK: usize = 1024;
/// Budget for one transfer batch (or catch-up exchange) to reach a live receiver and be stored.
const TRANSFER_BATCH_DEADLINE: Duration = Duration::from_secs(30);
/// Budget for a peer's digests of one chunk of slots.
const DIGEST_DEADLINE: Duration = Duration::from_secs(10);
/// Budget for one member's answer to a status probe (a dead member fails at once).
const STATUS_DEADLINE: Duration = Duration::from_secs(2);

/// Why a view change did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("this node has no view yet, so it cannot change one; send the change to a member")]
    NoView,
    #[error("view change failed: {0}")]
    Failed(String),
}

#[derive(Clone, Debug)]
struct Promise {
    epoch: u64,
    proposer: String,
    at: Instant,
}

/// View-change bookkeeping kept by every node.
#[derive(Default)]
pub struct RebalanceState {
    /// The promise this node made for the next epoch. `std` mutex: never held across `.await`.
    promise: Mutex<Option<Promise>>,
    /// Serializes the changes this node drives (a second request waits for the first).
    driving: tokio::sync::Mutex<()>,
    /// The latest change this node drove.
    status: Mutex<RebalanceProgress>,
    /// This node's part as a source of the current or last change.
    transfer: Mutex<RebalanceProgress>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn refused(status: u16, msg: impl Into<String>) -> PeerResponse {
    PeerResponse::Refused { status, msg: msg.into() }
}

/// True when `layout` already has exactly `members` and `k`.
fn same_membership(layout: &Layout, members: &[NodeId], k: u32) -> bool {
    let mut have: Vec<&String> = layout.members().collect();
    have.sort();
    let mut want: Vec<&String> = members.iter().collect();
    want.sort();
    want.dedup();
    layout.replication_factor == k && have == want
}

fn check_member(m: &str) -> Result<(), ChangeError> {
    match m.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(ChangeError::Invalid(format!("member {m:?} is not host:port (e.g. 10.0.0.3:8080)"))),
    }
}

impl Node {
    /// Calls a peer, or this node itself without the network.
    async fn call_node(&self, node: &str, request: PeerRequest, timeout: Duration) -> Result<PeerResponse, PeerError> {
        if node == self.id() {
            return match Box::pin(self.handle_rpc(request)).await {
                PeerResponse::Refused { status, msg } => Err(PeerError::Refused { peer: node.to_owned(), status, msg }),
                other => Ok(other),
            };
        }
        self.call_peer(node, &request, timeout).await
    }

    fn set_status(&self, update: impl FnOnce(&mut RebalanceProgress)) {
        update(&mut lock(&self.rebalance.status));
    }

    /// Changes the cluster to exactly `members` with replication factor `k` (the native admin
    /// entry point; HW4's add/remove call it with one member more or less). Returns once every
    /// live node has the new view and the old owners have pruned.
    pub async fn change_view(&self, members: Vec<NodeId>, k: u32) -> Result<ViewChanged, ChangeError> {
        if k == 0 {
            return Err(ChangeError::Invalid("replication_factor must be at least 1".into()));
        }
        if members.is_empty() {
            return Err(ChangeError::Invalid("members must name at least one node".into()));
        }
        for m in &members {
            check_member(m)?;
        }
        let _driving = self.rebalance.driving.lock().await;
        let current = self.view().ok_or(ChangeError::NoView)?;
        if let Some(pending) = self.pending() {
            let promise = lock(&self.rebalance.promise).clone();
            let abandoned = promise.as_ref().is_none_or(|p| p.proposer == self.id() || p.at.elapsed() > PROMISE_TTL);
            if !abandoned && !same_membership(pending.layout(), &members, k) {
                let by = promise.map(|p| p.proposer).unwrap_or_default();
                return Err(ChangeError::Conflict(format!(
                    "a view change to epoch {} (driven by {by}) is in progress; retry when it finishes",
                    pending.epoch()
                )));
            }
            // Finish the interrupted change first (every phase is idempotent), then do this one.
            tracing::info!(view_epoch = pending.epoch(), "resuming an interrupted view change");
            let moved = self.run_change(&current, pending.layout().clone()).await?;
            let now = self.view().ok_or(ChangeError::NoView)?;
            if same_membership(now.layout(), &members, k) {
                return Ok(ViewChanged { layout: now.layout().clone(), changed: true, moved_keys: moved });
            }
            return Box::pin(self.change_view_locked(now, members, k)).await;
        }
        self.change_view_locked(current, members, k).await
    }

    async fn change_view_locked(
        &self,
        current: Arc<View>,
        members: Vec<NodeId>,
        k: u32,
    ) -> Result<ViewChanged, ChangeError> {
        if same_membership(current.layout(), &members, k) {
            return Ok(ViewChanged { layout: current.layout().clone(), changed: false, moved_keys: 0 });
        }
        let target = plan_layout(current.layout(), &members, k);
        let moved = self.run_change(&current, target.clone()).await?;
        Ok(ViewChanged { layout: target, changed: true, moved_keys: moved })
    }

    /// Drives one change from `current` to `target` through all five phases.
    async fn run_change(&self, current: &View, target: Layout) -> Result<u64, ChangeError> {
        let epoch = target.epoch;
        let started = Instant::now();
        self.set_status(|s| *s = RebalanceProgress { epoch, phase: "preparing".into(), ..Default::default() });
        let result = self.run_phases(current, target).await;
        match &result {
            Ok(moved) => {
                self.set_status(|s| s.phase = "done".into());
                tracing::info!(
                    view_epoch = epoch,
                    moved_keys = moved,
                    took_ms = started.elapsed().as_millis() as u64,
                    "view change complete"
                );
            }
            Err(e) => {
                self.set_status(|s| {
                    s.phase = "failed".into();
                    s.error = Some(e.to_string());
                });
                tracing::warn!(view_epoch = epoch, error = %e, "view change failed");
            }
        }
        result
    }

    async fn run_phases(&self, current: &View, target: Layout) -> Result<u64, ChangeError> {
        let epoch = target.epoch;
        let new_view = View::from_layout(target.clone());
        let participants: BTreeSet<NodeId> = current.all_members().into_iter().chain(new_view.all_members()).collect();
        let timeout = self.settings.view_change_timeout;

        // 1. Prepare, in id order.
        let mut live = Vec::new();
        for node in &participants {
            let request = PeerRequest::Prepare { layout: target.clone(), proposer: self.id().to_owned() };
            match self.call_node(node, request, timeout).await {
                Ok(_) => live.push(node.clone()),
                Err(PeerError::Refused { status: 409, msg, .. }) => {
                    for promised in &live {
                        let _ = self
                            .call_node(promised, PeerRequest::Abort { epoch, proposer: self.id().to_owned() }, timeout)
                            .await;
                    }
                    return Err(ChangeError::Conflict(format!("{node} refused: {msg}; retry the change")));
                }
                Err(e) => tracing::warn!(peer = %node, error = %e, "node did not answer prepare; treating it as down"),
            }
        }
        if !live.iter().any(|n| new_view.contains(n)) {
            return Err(ChangeError::Failed("no member of the new view is reachable".into()));
        }

        let mut phase_started = Instant::now();
        let mut phase_done = |phase: &str| {
            tracing::info!(
                view_epoch = epoch,
                phase,
                took_ms = phase_started.elapsed().as_millis() as u64,
                "view change phase done"
            );
            phase_started = Instant::now();
        };
        phase_done("prepare");

        // 2. Begin: pending view everywhere, dual-writes from here on.
        self.set_status(|s| s.phase = "beginning".into());
        let live = self
            .broadcast(
                &live,
                |_| PeerRequest::Begin { proposer: self.id().to_owned(), layout: target.clone() },
                timeout,
            )
            .await;

        phase_done("begin");

        // 3. Transfer.
        self.set_status(|s| s.phase = "transferring".into());
        let moved = self.transfer_all(current, &new_view, &live).await?;
        self.set_status(|s| s.moved_keys = moved);
        phase_done("transfer");

        // 4. Commit.
        self.set_status(|s| s.phase = "committing".into());
        let live = self.broadcast(&live, |_| PeerRequest::Commit { epoch }, timeout).await;
        {
            let views = self.views_for_update();
            if !live.iter().any(|n| n == self.id()) && views.view().is_some_and(|v| v.epoch() < epoch) {
                // This node drives the change but is not part of it: still record the outcome.
                let _ = views.set(Some(Arc::new(new_view.clone())), None);
            }
        }

        phase_done("commit");

        // 5. Prune (each node checks an owner has its data before dropping it).
        self.set_status(|s| s.phase = "pruning".into());
        self.broadcast(&live, |_| PeerRequest::Prune { epoch }, TRANSFER_TIMEOUT).await;
        phase_done("prune");
        Ok(moved)
    }

    /// Sends a request to every node in parallel; returns the nodes that accepted it.
    async fn broadcast(
        &self,
        nodes: &[NodeId],
        request: impl Fn(&str) -> PeerRequest,
        timeout: Duration,
    ) -> Vec<NodeId> {
        let calls = nodes.iter().map(|n| {
            let req = request(n);
            async move { (n, self.call_node(n, req, timeout).await) }
        });
        let mut accepted = Vec::new();
        for (node, result) in join_all(calls).await {
            match result {
                Ok(_) => accepted.push(node.clone()),
                Err(e) => {
                    tracing::warn!(peer = %node, error = %e, "node did not take a view-change step; it will catch up from its peers")
                }
            }
        }
        accepted
    }

    /// Phase 3 from the primary's side: assigns each moving slot to one live source and runs the
    /// sources in parallel, reassigning the slots of a source that fails.
    async fn transfer_all(&self, current: &View, new_view: &View, live: &[NodeId]) -> Result<u64, ChangeError> {
        let epoch = new_view.epoch();
        let is_live = |n: &String| live.contains(n);
        let mut dead: BTreeSet<NodeId> = BTreeSet::new();
        let mut remaining = plan_moves(current, new_view);
        let mut moved = 0;
        for attempt in 0..3 {
            let mut by_source: BTreeMap<NodeId, Vec<Assignment>> = BTreeMap::new();
            for m in &remaining {
                let sources: Vec<&String> = m.sources.iter().filter(|n| is_live(n) && !dead.contains(*n)).collect();
                let receivers: Vec<String> = m.receivers.iter().filter(|n| is_live(n)).cloned().collect();
                if receivers.is_empty() {
                    continue;
                }
                let Some(&source) = sources.get(m.slot as usize % sources.len().max(1)) else {
                    tracing::error!(
                        slot = m.slot,
                        "no replica of this slot is reachable: its keys cannot be moved now"
                    );
                    continue;
                };
                let co_sources = sources.iter().filter(|s| **s != source).map(|s| (*s).clone()).collect();
                by_source.entry(source.clone()).or_default().push(Assignment { slot: m.slot, receivers, co_sources });
            }
            let calls = by_source.into_iter().map(|(source, assignments)| async move {
                let slots: Vec<Slot> = assignments.iter().map(|a| a.slot).collect();
                let result =
                    self.call_node(&source, PeerRequest::Transfer { epoch, assignments }, TRANSFER_TIMEOUT).await;
                (source, slots, result)
            });
            let mut failed_slots = BTreeSet::new();
            for (source, slots, result) in join_all(calls).await {
                match result {
                    Ok(PeerResponse::Transferred { keys, .. }) => moved += keys,
                    Ok(other) => tracing::warn!(peer = %source, answer = ?other, "unexpected transfer answer"),
                    Err(e) => {
                        tracing::warn!(peer = %source, error = %e, attempt, "source failed during transfer; reassigning its slots");
                        dead.insert(source);
                        failed_slots.extend(slots);
                    }
                }
            }
            if failed_slots.is_empty() {
                return Ok(moved);
            }
            remaining.retain(|m| failed_slots.contains(&m.slot));
        }
        Err(ChangeError::Failed("sources kept failing during the transfer; the change can be retried".into()))
    }

    // ----- answering side -------------------------------------------------------------------

    pub(crate) fn answer_prepare(&self, layout: &Layout, proposer: &str) -> PeerResponse {
        let epoch = layout.epoch;
        let current = self.view().map_or(0, |v| v.epoch());
        if epoch <= current {
            // A resumed change that already committed here is fine to repeat.
            if self.view().is_some_and(|v| v.layout() == layout) {
                return PeerResponse::Ack;
            }
            return refused(409, format!("epoch {epoch} is not newer than this node's view (epoch {current})"));
        }
        let mut promise = lock(&self.rebalance.promise);
        match &*promise {
            Some(p) if p.epoch >= epoch && p.proposer != proposer && p.at.elapsed() < PROMISE_TTL => refused(
                409,
                format!("another view change (epoch {}, driven by {}) is in progress", p.epoch, p.proposer),
            ),
            _ => {
                *promise = Some(Promise { epoch, proposer: proposer.to_owned(), at: Instant::now() });
                PeerResponse::Ack
            }
        }
    }

    pub(crate) fn answer_abort(&self, epoch: u64, proposer: &str) -> PeerResponse {
        let mut promise = lock(&self.rebalance.promise);
        if promise.as_ref().is_some_and(|p| p.epoch == epoch && p.proposer == proposer) {
            *promise = None;
        }
        PeerResponse::Ack
    }

    /// Refreshes the promise for `epoch` if `proposer` holds it; false if someone else does.
    fn holds_promise(&self, epoch: u64, proposer: &str) -> bool {
        let mut promise = lock(&self.rebalance.promise);
        match &mut *promise {
            Some(p) if p.epoch == epoch && p.proposer == proposer => {
                p.at = Instant::now();
                true
            }
            Some(p) if p.at.elapsed() < PROMISE_TTL => false,
            _ => {
                *promise = Some(Promise { epoch, proposer: proposer.to_owned(), at: Instant::now() });
                true
            }
        }
    }

    pub(crate) async fn answer_begin(&self, proposer: &str, layout: Layout) -> PeerResponse {
        let epoch = layout.epoch;
        {
            let views = self.views_for_update();
            if views.view().is_some_and(|v| v.epoch() >= epoch) {
                return if views.view().is_some_and(|v| v.layout() == &layout) {
                    PeerResponse::Ack
                } else {
                    refused(409, "already past that epoch")
                };
            }
            if !self.holds_promise(epoch, proposer) {
                return refused(409, format!("epoch {epoch} was promised to another proposer"));
            }
            if views.pending().is_none_or(|p| p.layout() != &layout) {
                let pending = Some(Arc::new(View::from_layout(layout)));
                if let Err(e) = views.set(views.view(), pending) {
                    return refused(500, format!("cannot persist the pending view: {e}"));
                }
            }
        }
        // Writes that started before the pending view was visible finish before we answer, so the
        // transfer that follows sees them (or they were dual-written).
        self.fence.advance().await;
        *lock(&self.rebalance.transfer) = RebalanceProgress { epoch, phase: "pending".into(), ..Default::default() };
        PeerResponse::Ack
    }

    pub(crate) async fn answer_transfer(&self, epoch: u64, assignments: Vec<Assignment>) -> PeerResponse {
        if self.view().is_some_and(|v| v.epoch() == epoch) {
            // Already committed (a resumed change): this node's prune made sure the new owners
            // have everything it had.
            return PeerResponse::Transferred { keys: 0, bytes: 0 };
        }
        if self.pending().is_none_or(|p| p.epoch() != epoch) {
            return refused(409, format!("no pending view change to epoch {epoch} here"));
        }
        let Some(view) = self.view() else { return refused(409, "this node has no view to send data from") };
        match self.send_slots(&view, epoch, assignments).await {
            Ok((keys, bytes)) => PeerResponse::Transferred { keys, bytes },
            Err(e) => refused(503, e),
        }
    }

    /// A source's work: catch up from the co-sources, then stream each slot to its receivers.
    async fn send_slots(&self, view: &View, epoch: u64, assignments: Vec<Assignment>) -> Result<(u64, u64), String> {
        // Catch up from every other old owner that is reachable.
        let mut by_co: BTreeMap<&String, Vec<Slot>> = BTreeMap::new();
        for a in &assignments {
            for c in &a.co_sources {
                by_co.entry(c).or_default().push(a.slot);
            }
        }
        for (co, slots) in by_co {
            if let Err(e) = self.pull_differing(view, co, &slots).await {
                tracing::warn!(peer = %co, error = %e, "could not catch up from a co-source; sending what this node has");
            }
        }
        let mut per_receiver: BTreeMap<&String, Vec<Slot>> = BTreeMap::new();
        for a in &assignments {
            for r in &a.receivers {
                per_receiver.entry(r).or_default().push(a.slot);
            }
        }
        let digests = self.store.digests();
        let total: u64 = per_receiver.values().flatten().map(|&s| digests.records_in(s)).sum();
        *lock(&self.rebalance.transfer) =
            RebalanceProgress { epoch, phase: "transferring".into(), total_keys: total, ..Default::default() };
        let streams = per_receiver.into_iter().map(|(receiver, slots)| self.stream_to(receiver, slots));
        let mut keys = 0;
        let mut bytes = 0;
        for result in join_all(streams).await {
            let (k, b) = result?;
            keys += k;
            bytes += b;
        }
        lock(&self.rebalance.transfer).phase = "sent".into();
        Ok((keys, bytes))
    }

    /// Streams slots to one receiver in acknowledged batches.
    async fn stream_to(&self, receiver: &str, slots: Vec<Slot>) -> Result<(u64, u64), String> {
        let (mut keys, mut bytes) = (0u64, 0u64);
        let mut batch: Vec<(String, Record)> = Vec::new();
        let mut batch_bytes = 0;
        for (i, &slot) in slots.iter().enumerate() {
            let records = self.store.scan_slot(slot).map_err(|e| e.to_string())?;
            for (key, record) in records {
                batch_bytes += record.approx_size() + key.len();
                batch.push((key, record));
                if batch.len() >= BATCH_RECORDS || batch_bytes >= BATCH_BYTES {
                    let (k, b) = self.send_batch(receiver, std::mem::take(&mut batch)).await?;
                    keys += k;
                    bytes += b;
                    batch_bytes = 0;
                }
            }
            if i + 1 == slots.len() && !batch.is_empty() {
                let (k, b) = self.send_batch(receiver, std::mem::take(&mut batch)).await?;
                keys += k;
                bytes += b;
            }
        }
        Ok((keys, bytes))
    }

    async fn send_batch(&self, receiver: &str, records: Vec<(String, Record)>) -> Result<(u64, u64), String> {
        let keys = records.len() as u64;
        let bytes: u64 = records.iter().map(|(_, r)| r.value.as_ref().map_or(0, |v| v.len() as u64)).sum();
        // Transfers carry others' writes: they vouch for nothing (floor 0).
        let request = PeerRequest::Replicate { records, from: self.id().to_owned(), cap: 0, pending: Vec::new() };
        let mut last_error = String::new();
        for attempt in 0..3 {
            match self.call_peer(receiver, &request, TRANSFER_BATCH_DEADLINE).await {
                Ok(_) => {
                    let mut t = lock(&self.rebalance.transfer);
                    t.moved_keys += keys;
                    t.moved_bytes += bytes;
                    return Ok((keys, bytes));
                }
                Err(e) => {
                    last_error = e.to_string();
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
            }
        }
        Err(format!("sending to {receiver} failed: {last_error}"))
    }

    /// Pulls records of `slots` that differ from `peer` (both on `view`), newest-wins.
    async fn pull_differing(&self, view: &View, peer: &str, slots: &[Slot]) -> Result<(), String> {
        for chunk in slots.chunks(DIGEST_CHUNK) {
            let differing = self.differing_slots(peer, chunk).await?;
            for part in differing.chunks(64) {
                let records = self.scan_slots(part).map_err(|e| e.to_string())?;
                let request = PeerRequest::SyncSlots { view_epoch: view.epoch(), slots: part.to_vec(), records };
                match self.call_peer(peer, &request, TRANSFER_BATCH_DEADLINE).await.map_err(|e| e.to_string())? {
                    PeerResponse::Synced { records, .. } => {
                        self.apply_replicated(records).await.map_err(|e| e.to_string())?;
                    }
                    other => return Err(format!("unexpected answer {other:?}")),
                }
            }
        }
        Ok(())
    }

    /// Slots of `chunk` whose digest at `peer` differs from ours.
    async fn differing_slots(&self, peer: &str, chunk: &[Slot]) -> Result<Vec<Slot>, String> {
        let request = PeerRequest::SlotDigests { slots: chunk.to_vec() };
        let theirs = match self.call_peer(peer, &request, DIGEST_DEADLINE).await.map_err(|e| e.to_string())? {
            PeerResponse::Digests(Some(d)) => d.into_iter().collect::<HashMap<Slot, u64>>(),
            other => return Err(format!("unexpected answer {other:?}")),
        };
        let digests = self.store.digests();
        Ok(chunk.iter().copied().filter(|s| theirs.get(s).copied().unwrap_or(0) != digests.get(*s)).collect())
    }

    pub(crate) async fn answer_commit(&self, epoch: u64) -> PeerResponse {
        let views = self.views_for_update();
        if views.view().is_some_and(|v| v.epoch() == epoch) && views.pending().is_none() {
            return PeerResponse::Ack;
        }
        let Some(pending) = views.pending().filter(|p| p.epoch() == epoch) else {
            return refused(409, format!("no pending view change to epoch {epoch} here"));
        };
        if let Err(e) = views.set(Some(pending), None) {
            return refused(500, format!("cannot persist the new view: {e}"));
        }
        drop(views);
        lock(&self.rebalance.promise).take();
        PeerResponse::Ack
    }

    pub(crate) async fn answer_prune(&self, epoch: u64) -> PeerResponse {
        let Some(view) = self.view().filter(|v| v.epoch() == epoch) else {
            return refused(409, format!("this node is not on view epoch {epoch}"));
        };
        match self.prune_unowned(&view).await {
            Ok(keys) => PeerResponse::Pruned { keys },
            Err(e) => refused(500, e),
        }
    }

    /// Drops every slot this node does not own under `view`, after making sure a live owner holds
    /// at least what this node holds (slots no owner could confirm are kept for a later attempt).
    pub(crate) async fn prune_unowned(&self, view: &View) -> Result<u64, String> {
        let mine = view.partition_of_node(self.id());
        let digests = self.store.digests();
        let mut by_partition: BTreeMap<u32, Vec<Slot>> = BTreeMap::new();
        for slot in 0..SLOT_COUNT as Slot {
            let owner = view.table().owner(slot);
            if Some(owner) != mine && digests.get(slot) != 0 {
                by_partition.entry(owner).or_default().push(slot);
            }
        }
        let mut prunable = Vec::new();
        for (partition, slots) in by_partition {
            for chunk in slots.chunks(DIGEST_CHUNK) {
                let mut confirmed = false;
                for owner in view.members(partition).iter().filter(|o| *o != self.id()) {
                    match self.push_differing(owner, chunk).await {
                        Ok(()) => confirmed = true,
                        Err(e) => {
                            tracing::warn!(peer = %owner, error = %e, "owner unreachable while pruning; keeping those slots for now")
                        }
                    }
                }
                if confirmed {
                    prunable.extend_from_slice(chunk);
                }
            }
        }
        let removed = self.store.prune(prunable).await.map_err(|e| e.to_string())?;
        if removed > 0 {
            tracing::info!(view_epoch = view.epoch(), removed, "pruned keys this node no longer owns");
        }
        Ok(removed)
    }

    /// Sends `peer` every record of the slots in `chunk` whose digests differ.
    async fn push_differing(&self, peer: &str, chunk: &[Slot]) -> Result<(), String> {
        let differing = self.differing_slots(peer, chunk).await?;
        let mut batch = Vec::new();
        for slot in differing {
            batch.extend(self.store.scan_slot(slot).map_err(|e| e.to_string())?);
            if batch.len() >= BATCH_RECORDS {
                self.send_batch(peer, std::mem::take(&mut batch)).await?;
            }
        }
        if !batch.is_empty() {
            self.send_batch(peer, batch).await?;
        }
        Ok(())
    }

    /// Adopts a newer committed view learned from a peer (this node missed the change: it was
    /// down or paused), then catches up and prunes like everyone else did.
    pub(crate) async fn adopt_view(&self, layout: Layout) {
        let view = {
            let views = self.views_for_update();
            let newer = views.view().is_none_or(|v| v.epoch() < layout.epoch)
                && views.pending().is_none_or(|p| p.epoch() <= layout.epoch);
            if !newer {
                return;
            }
            let view = View::from_layout(layout);
            tracing::info!(view_epoch = view.epoch(), "adopting a newer view from a peer");
            if let Err(e) = views.set(Some(Arc::new(view.clone())), None) {
                tracing::error!(error = %e, "cannot persist the adopted view");
                return;
            }
            view
        };
        if let Err(e) = self.prune_unowned(&view).await {
            tracing::warn!(error = %e, "pruning after adopting a view failed; will retry with the next change");
        }
    }

    /// What `Hello` answers.
    pub(crate) fn hello(&self) -> HelloInfo {
        HelloInfo {
            layout: self.view().map(|v| v.layout().clone()),
            pending: self.pending().map(|v| v.layout().clone()),
            live_keys: self.store.digests().stats().live_keys,
            partition_digest: self.partition_digest(),
            transfer: lock(&self.rebalance.transfer).clone(),
        }
    }

    /// The cluster as this node sees it, with live key counts and rebalance progress gathered
    /// from every member.
    pub async fn cluster_status(&self) -> ClusterStatus {
        let view = self.view();
        let members: Vec<NodeId> = view.as_ref().map(|v| v.all_members()).unwrap_or_default();
        let pending_members: Vec<NodeId> = self.pending().map(|p| p.all_members()).unwrap_or_default();
        let everyone: BTreeSet<NodeId> = members.into_iter().chain(pending_members).collect();
        let calls = everyone.iter().map(|n| async move {
            let info = match self.call_node(n, PeerRequest::Hello, STATUS_DEADLINE).await {
                Ok(PeerResponse::Hello(info)) => Some(*info),
                _ => None,
            };
            (n.clone(), info)
        });
        let infos: HashMap<NodeId, Option<HelloInfo>> = join_all(calls).await.into_iter().collect();
        let mut rebalance = lock(&self.rebalance.status).clone();
        if rebalance.phase.is_empty() {
            rebalance.phase = "idle".into();
        }
        let sources: Vec<&RebalanceProgress> = infos
            .values()
            .flatten()
            .map(|i| &i.transfer)
            .filter(|t| t.epoch == rebalance.epoch && t.epoch > 0)
            .collect();
        if !sources.is_empty() {
            rebalance.moved_keys = rebalance.moved_keys.max(sources.iter().map(|t| t.moved_keys).sum());
            rebalance.moved_bytes = sources.iter().map(|t| t.moved_bytes).sum();
            rebalance.total_keys = sources.iter().map(|t| t.total_keys).sum();
        }
        let partitions = view
            .as_ref()
            .map(|v| {
                v.layout()
                    .partitions
                    .iter()
                    .enumerate()
                    .map(|(i, members)| PartitionStatus {
                        partition_id: i as u32,
                        members: members.clone(),
                        live_keys: members
                            .iter()
                            .map(|m| infos.get(m).and_then(|i| i.as_ref()).map(|i| i.live_keys))
                            .collect(),
                        digests: members
                            .iter()
                            .map(|m| {
                                infos
                                    .get(m)
                                    .and_then(|i| i.as_ref())
                                    .and_then(|i| i.partition_digest)
                                    .map(|d| format!("{d:016x}"))
                            })
                            .collect(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        ClusterStatus {
            node: self.id().to_owned(),
            layout: view.map(|v| v.layout().clone()),
            pending_epoch: self.pending().map(|p| p.epoch()),
            partitions,
            rebalance,
        }
    }
}
