//! Every node's side of a view change: answers the primary's steps, and adopts a newer view it
//! learns from a peer (it missed a change: it was down or paused).

use super::lock;
use crate::node::Node;
use crate::protocol::{Assignment, ChangeStep, PeerResponse, Refusal};
use crate::view::View;
use kvs_api::{Layout, RebalancePhase, RebalanceProgress};
use std::sync::Arc;
use tokio::time::Instant;

impl Node {
    /// Answers one step of a view change driven by a primary (possibly this node itself).
    pub(crate) async fn answer_change(&self, step: ChangeStep) -> PeerResponse {
        let result = match step {
            ChangeStep::Prepare { layout, proposer } => self.answer_prepare(&layout, &proposer),
            ChangeStep::Abort { epoch, proposer } => {
                lock(&self.changes.promises).abort(epoch, &proposer);
                Ok(PeerResponse::Ack)
            }
            ChangeStep::Begin { proposer, layout } => self.answer_begin(&proposer, layout).await,
            ChangeStep::Transfer { epoch, assignments, rate } => self.answer_transfer(epoch, assignments, rate).await,
            ChangeStep::Commit { epoch } => self.answer_commit(epoch),
            ChangeStep::Prune { epoch } => self.answer_prune(epoch).await,
        };
        result.unwrap_or_else(PeerResponse::Refused)
    }

    fn answer_prepare(&self, layout: &Layout, proposer: &str) -> Result<PeerResponse, Refusal> {
        let epoch = layout.epoch;
        let view = self.view();
        let current = view.as_ref().map_or(0, |v| v.epoch());
        if epoch <= current {
            // A resumed change that already committed here is fine to repeat.
            return match view.filter(|v| v.layout() == layout) {
                Some(_) => Ok(PeerResponse::Ack),
                None => Err(Refusal::EpochNotNewer { epoch, current }),
            };
        }
        lock(&self.changes.promises).prepare(epoch, proposer, Instant::now())?;
        Ok(PeerResponse::Ack)
    }

    async fn answer_begin(&self, proposer: &str, layout: Layout) -> Result<PeerResponse, Refusal> {
        let epoch = layout.epoch;
        // A prune under way finishes first: it must not drop what the pending view gives us.
        let _pruning = self.changes.pruning.lock().await;
        {
            let views = self.views_for_update();
            if let Some(view) = views.view().filter(|v| v.epoch() >= epoch) {
                return match view.layout() == &layout {
                    true => Ok(PeerResponse::Ack),
                    false => Err(Refusal::EpochNotNewer { epoch, current: view.epoch() }),
                };
            }
            lock(&self.changes.promises).progress(epoch, proposer, Instant::now())?;
            if views.pending().is_none_or(|p| p.layout() != &layout) {
                let pending = Some(Arc::new(View::from_layout(layout)));
                views.set(views.view(), pending).map_err(|e| Refusal::Storage { detail: e.to_string() })?;
            }
        }
        // Writes that started before the pending view was visible finish before we answer, so the
        // transfer that follows sees them (or they were dual-written).
        self.fence.advance().await;
        *lock(&self.changes.transfer) =
            RebalanceProgress { epoch, phase: RebalancePhase::Pending, ..Default::default() };
        Ok(PeerResponse::Ack)
    }

    async fn answer_transfer(
        &self,
        epoch: u64,
        assignments: Vec<Assignment>,
        rate: u64,
    ) -> Result<PeerResponse, Refusal> {
        if self.view().is_some_and(|v| v.epoch() == epoch) {
            // Already committed (a resumed change): this node's prune made sure the new owners
            // have everything it had.
            return Ok(PeerResponse::Transferred { keys: 0, bytes: 0 });
        }
        if self.pending().is_none_or(|p| p.epoch() != epoch) {
            return Err(Refusal::NoPendingChange { epoch });
        }
        let view = self.view().ok_or(Refusal::NoView)?;
        let (keys, bytes) = self.send_slots(&view, epoch, assignments, rate).await?;
        Ok(PeerResponse::Transferred { keys, bytes })
    }

    fn answer_commit(&self, epoch: u64) -> Result<PeerResponse, Refusal> {
        let views = self.views_for_update();
        if views.view().is_some_and(|v| v.epoch() == epoch) && views.pending().is_none() {
            return Ok(PeerResponse::Ack);
        }
        let pending = views.pending().filter(|p| p.epoch() == epoch).ok_or(Refusal::NoPendingChange { epoch })?;
        views.set(Some(pending), None).map_err(|e| Refusal::Storage { detail: e.to_string() })?;
        drop(views);
        lock(&self.changes.promises).clear();
        Ok(PeerResponse::Ack)
    }

    async fn answer_prune(&self, epoch: u64) -> Result<PeerResponse, Refusal> {
        let view = self.view().filter(|v| v.epoch() == epoch);
        let Some(view) = view else {
            return Err(Refusal::NotOnEpoch { epoch, mine: self.view().map(|v| v.epoch()) });
        };
        let keys = self.prune_unowned(&view).await?;
        Ok(PeerResponse::Pruned { keys })
    }

    /// Adopts a newer committed view learned from a peer (this node missed the change: it was
    /// down or paused). The catch-up that follows — checking with the new owners and pruning what
    /// this node no longer owns — runs in the background, never on the request that noticed.
    pub(crate) fn adopt_view(&self, layout: Layout) {
        let view = {
            let views = self.views_for_update();
            let newer = views.view().is_none_or(|v| v.epoch() < layout.epoch)
                && views.pending().is_none_or(|p| p.epoch() <= layout.epoch);
            if !newer {
                return;
            }
            let view = Arc::new(View::from_layout(layout));
            tracing::info!(view_epoch = view.epoch(), "adopting a newer view from a peer");
            if let Err(e) = views.set(Some(view.clone()), None) {
                tracing::error!(error = %e, "cannot persist the adopted view");
                return;
            }
            view
        };
        let me = self.self_handle();
        tokio::spawn(async move {
            let Some(node) = me.upgrade() else { return };
            if let Err(e) = node.prune_unowned(&view).await {
                tracing::warn!(error = %e, "pruning after adopting a view failed; will retry with the next change");
            }
        });
    }
}
