//! The primary receiver's side of a view change: decides ([`super::decide`]), then drives the
//! five phases over every node of the old and new views and records progress for the status.

use super::assign::assign;
use super::decide::{Decision, decide, validate};
use super::{ChangeError, lock};
use crate::node::Node;
use crate::peers::PeerError;
use crate::protocol::{ChangeStep, PeerRequest, PeerResponse};
use crate::view::{NodeId, View, plan_moves};
use futures::future::join_all;
use kvs_api::{Layout, RebalancePhase, RebalanceProgress, ViewChanged};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Budget for one source's whole transfer (its batches have deadlines of their own).
pub(super) const TRANSFER_TIMEOUT: Duration = Duration::from_secs(1800);
/// Attempts at moving the slots of sources that failed, with the survivors.
const TRANSFER_ATTEMPTS: usize = 3;
/// Interrupted changes one request finishes before giving up.
const MAX_RESUMES: usize = 3;

impl Node {
    /// Calls `node` with a view-change step, or answers it here without the network.
    async fn call_node(&self, node: &str, step: ChangeStep, timeout: Duration) -> Result<PeerResponse, PeerError> {
        if node == self.id() {
            return match Box::pin(self.answer_change(step)).await {
                PeerResponse::Refused(refusal) => Err(PeerError::Refused { peer: node.to_owned(), refusal }),
                other => Ok(other),
            };
        }
        self.call_peer(node, &PeerRequest::Change(step), timeout).await
    }

    fn set_status(&self, update: impl FnOnce(&mut RebalanceProgress)) {
        update(&mut lock(&self.changes.status));
    }

    /// Changes the cluster to exactly `members` with replication factor `k` (the native admin
    /// entry point; HW4's add/remove call it with one member more or less). Returns once every
    /// live node has the new view and the old owners have pruned.
    pub async fn change_view(&self, members: Vec<NodeId>, k: u32) -> Result<ViewChanged, ChangeError> {
        self.change_view_paced(members, k, self.settings.transfer_rate).await
    }

    /// [`Node::change_view`], each source moving at most `rate` keys per second (0: unpaced).
    pub async fn change_view_paced(&self, members: Vec<NodeId>, k: u32, rate: u64) -> Result<ViewChanged, ChangeError> {
        validate(&members, k)?;
        let _driving = self.changes.driving.lock().await;
        let (mut moved_before, mut resumed) = (0, false);
        // A resumed change commits here, so the next decision sees no pending one; bounded in
        // case a commit keeps failing to persist.
        for _ in 0..MAX_RESUMES {
            let current = self.view().ok_or(ChangeError::NoView)?;
            let pending = self.pending();
            let decision = {
                let promises = lock(&self.changes.promises);
                let holder = promises.holder(tokio::time::Instant::now());
                decide(current.layout(), pending.as_ref().map(|p| p.layout()), holder, self.id(), &members, k)?
            };
            match decision {
                Decision::NoOp => {
                    let layout = current.layout().clone();
                    return Ok(ViewChanged { layout, changed: resumed, moved_keys: moved_before });
                }
                Decision::Change(target) => {
                    let moved = self.run_change(&current, target.clone(), rate).await?;
                    return Ok(ViewChanged { layout: target, changed: true, moved_keys: moved_before + moved });
                }
                Decision::Resume(pending) => {
                    tracing::info!(view_epoch = pending.epoch, "resuming an interrupted view change");
                    moved_before += self.run_change(&current, pending, rate).await?;
                    resumed = true;
                }
            }
        }
        Err(ChangeError::Stuck { epoch: self.pending().map_or(0, |p| p.epoch()) })
    }

    /// Drives one change from `current` to `target` through all five phases.
    async fn run_change(&self, current: &View, target: Layout, rate: u64) -> Result<u64, ChangeError> {
        let epoch = target.epoch;
        let started = Instant::now();
        self.set_status(|s| *s = RebalanceProgress { epoch, phase: RebalancePhase::Preparing, ..Default::default() });
        let result = self.run_phases(current, target, rate).await;
        match &result {
            Ok(moved) => {
                self.set_status(|s| s.phase = RebalancePhase::Done);
                let took_ms = started.elapsed().as_millis() as u64;
                tracing::info!(view_epoch = epoch, moved_keys = moved, took_ms, "view change complete");
            }
            Err(e) => {
                self.set_status(|s| {
                    s.phase = RebalancePhase::Failed;
                    s.error = Some(e.to_string());
                });
                tracing::warn!(view_epoch = epoch, error = %e, "view change failed");
            }
        }
        result
    }

    async fn run_phases(&self, current: &View, target: Layout, rate: u64) -> Result<u64, ChangeError> {
        let epoch = target.epoch;
        let new_view = View::from_layout(target.clone());
        let participants: BTreeSet<NodeId> = current.all_members().into_iter().chain(new_view.all_members()).collect();
        let timeout = self.settings.view_change_timeout;
        let me = self.id().to_owned();
        let mut phase_started = Instant::now();
        let mut phase_done = |phase: RebalancePhase| {
            let took_ms = phase_started.elapsed().as_millis() as u64;
            tracing::info!(view_epoch = epoch, %phase, took_ms, "view change phase done");
            phase_started = Instant::now();
        };

        // 1. Prepare, in id order.
        let mut live = Vec::new();
        for node in &participants {
            let step = ChangeStep::Prepare { layout: target.clone(), proposer: me.clone() };
            match self.call_node(node, step, timeout).await {
                Ok(_) => live.push(node.clone()),
                Err(PeerError::Refused { refusal, .. }) => {
                    for promised in &live {
                        let abort = ChangeStep::Abort { epoch, proposer: me.clone() };
                        let _ = self.call_node(promised, abort, timeout).await;
                    }
                    return Err(ChangeError::Refused { node: node.clone(), refusal });
                }
                Err(e) => tracing::warn!(peer = %node, error = %e, "node did not answer prepare; treating it as down"),
            }
        }
        if !live.iter().any(|n| new_view.contains(n)) {
            return Err(ChangeError::NoLiveMember);
        }
        // A partition made only of nodes that join now, none of which answered: nobody could
        // receive its slots, so its keys would have no owner holding them. Refuse (the caller
        // retries once they are reachable) rather than commit a partition nobody serves.
        let unreachable = new_view
            .layout()
            .partitions
            .iter()
            .enumerate()
            .find(|(_, members)| members.iter().all(|m| !current.contains(m) && !live.contains(m)));
        if let Some((partition, members)) = unreachable {
            for promised in &live {
                let abort = ChangeStep::Abort { epoch, proposer: me.clone() };
                let _ = self.call_node(promised, abort, timeout).await;
            }
            return Err(ChangeError::NewPartitionUnreachable { partition: partition as u32, members: members.clone() });
        }
        phase_done(RebalancePhase::Preparing);

        // 2. Begin: pending view everywhere, dual-writes from here on.
        self.set_status(|s| s.phase = RebalancePhase::Beginning);
        let begin = ChangeStep::Begin { proposer: me.clone(), layout: target.clone() };
        let live = self.broadcast(&live, &begin, timeout).await;
        phase_done(RebalancePhase::Beginning);

        // 3. Transfer.
        self.set_status(|s| s.phase = RebalancePhase::Transferring);
        let moved = self.transfer_all(current, &new_view, &live, rate).await?;
        self.set_status(|s| s.moved_keys = moved);
        phase_done(RebalancePhase::Transferring);

        // 4. Commit.
        self.set_status(|s| s.phase = RebalancePhase::Committing);
        let live = self.broadcast(&live, &ChangeStep::Commit { epoch }, timeout).await;
        if !live.contains(&me) {
            // This node drives the change but is not part of it: still record the outcome.
            let views = self.views_for_update();
            if views.view().is_some_and(|v| v.epoch() < epoch) {
                let _ = views.set(Some(Arc::new(new_view.clone())), None);
            }
        }
        phase_done(RebalancePhase::Committing);

        // 5. Prune (each node checks an owner has its data before dropping it).
        self.set_status(|s| s.phase = RebalancePhase::Pruning);
        self.broadcast(&live, &ChangeStep::Prune { epoch }, TRANSFER_TIMEOUT).await;
        phase_done(RebalancePhase::Pruning);
        Ok(moved)
    }

    /// Sends a step to every node in parallel; returns the nodes that took it.
    async fn broadcast(&self, nodes: &[NodeId], step: &ChangeStep, timeout: Duration) -> Vec<NodeId> {
        let calls = nodes.iter().map(|n| async move { (n, self.call_node(n, step.clone(), timeout).await) });
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
    async fn transfer_all(
        &self,
        current: &View,
        new_view: &View,
        live: &[NodeId],
        rate: u64,
    ) -> Result<u64, ChangeError> {
        let epoch = new_view.epoch();
        let mut failed: BTreeSet<NodeId> = BTreeSet::new();
        let mut remaining = plan_moves(current, new_view);
        let mut moved = 0;
        for attempt in 0..TRANSFER_ATTEMPTS {
            let plan = assign(&remaining, live, &failed);
            if !plan.stranded.is_empty() {
                tracing::error!(
                    slots = plan.stranded.len(),
                    "no replica of some slots is reachable: their keys cannot move now"
                );
            }
            let calls = plan.by_source.into_iter().map(|(source, assignments)| async move {
                let slots: Vec<_> = assignments.iter().map(|a| a.slot).collect();
                let result =
                    self.call_node(&source, ChangeStep::Transfer { epoch, assignments, rate }, TRANSFER_TIMEOUT).await;
                (source, slots, result)
            });
            let mut failed_slots = BTreeSet::new();
            for (source, slots, result) in join_all(calls).await {
                match result {
                    Ok(PeerResponse::Transferred { keys, .. }) => moved += keys,
                    Ok(other) => tracing::warn!(peer = %source, answer = ?other, "unexpected transfer answer"),
                    Err(e) => {
                        tracing::warn!(peer = %source, error = %e, attempt, "source failed during transfer; reassigning its slots");
                        failed.insert(source);
                        failed_slots.extend(slots);
                    }
                }
            }
            if failed_slots.is_empty() {
                return Ok(moved);
            }
            remaining.retain(|m| failed_slots.contains(&m.slot));
        }
        Err(ChangeError::SourcesFailed)
    }
}
