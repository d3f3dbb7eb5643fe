//! Coordinating a read: answer from the local store when that provably reflects the client's
//! causal context ([`crate::freshness::judge`]), else fetch from the other replicas and return the
//! newest version — or refuse rather than answer older than the context.

use crate::causal::VectorClock;
use crate::freshness::{FORMER_REPLICA_MARGIN_MICROS, Knowledge, Verdict, judge};
use crate::node::{KvError, Node};
use crate::placement::PartitionId;
use crate::protocol::{Coordinated, PeerRequest, PeerResponse, Refusal};
use crate::store::Record;
use crate::view::View;
use futures::future::join_all;

impl Node {
    pub(super) async fn coordinate_read(
        &self,
        view: &View,
        partition: PartitionId,
        key: &str,
        context: &VectorClock,
    ) -> Result<Coordinated, KvError> {
        let local = self.store.get(key)?;
        let members = view.members(partition);
        let answer = |record| Coordinated {
            partition,
            record,
            changed_liveness: false,
            view_epoch: view.epoch(),
            durability: None,
        };
        match self.judge(view, local.as_ref(), context, members) {
            Verdict::Fresh => return Ok(answer(local)),
            Verdict::Behind => {
                // This node missed a view change: refuse (the forwarder tries another node) and
                // catch up in the background.
                self.refresh_view_soon();
                return Err(KvError::CausalUnavailable { partition });
            }
            Verdict::Fetch => {}
        }
        self.metrics.causal_fetches.inc();
        let request = PeerRequest::Fetch { key: key.to_owned(), view_epoch: view.epoch() };
        // Ask every other live replica (a dead one answers at once with an error).
        let fetches = members.iter().filter(|m| *m != self.id()).map(|peer| {
            let request = &request;
            async move {
                match self.call_peer(peer, request, self.settings.replica_deadline).await {
                    Ok(PeerResponse::Fetched(r)) => Ok(r),
                    Ok(PeerResponse::Refused(Refusal::NotOnEpoch { mine: Some(theirs), .. })) => {
                        // Not an answer for this view's partition. A peer on a newer view means
                        // this node missed a change: catch up.
                        if theirs > view.epoch() {
                            self.refresh_view_soon();
                        }
                        Err(())
                    }
                    Ok(_) => Err(()),
                    Err(e) => {
                        tracing::debug!(peer = %peer, error = %e, "causal fetch failed");
                        Err(())
                    }
                }
            }
        });
        let answers = join_all(fetches).await;
        let all_answered = answers.iter().all(Result::is_ok);
        let newest_remote = answers.into_iter().flatten().flatten().max_by(|a, b| a.version.cmp(&b.version));
        let newest = match (local, newest_remote) {
            (Some(l), Some(r)) if r.version > l.version => {
                self.repair_in_background(key, r.clone());
                Some(r)
            }
            (None, Some(r)) => {
                self.repair_in_background(key, r.clone());
                Some(r)
            }
            (l, _) => l,
        };
        // With every replica heard, the newest version is the answer. With some unreachable and the
        // context still pointing past what we have, answering would break causality: refuse, so
        // the forwarder tries another replica (or the client retries).
        if !all_answered && self.judge(view, newest.as_ref(), context, members) != Verdict::Fresh {
            return Err(KvError::CausalUnavailable { partition });
        }
        Ok(answer(newest))
    }

    /// [`crate::freshness::judge`] with what this node knows.
    fn judge(&self, view: &View, local: Option<&Record>, context: &VectorClock, replicas: &[String]) -> Verdict {
        let covered = |node: &str| {
            if node == self.id() { self.freshness.stable(&self.hlc) } else { self.freshness.synced_from(node) }
        };
        let pending = self.pending();
        let known = |node: &str| view.contains(node) || pending.as_ref().is_some_and(|p| p.contains(node));
        let installed_at = self.view_installed_at();
        let former_until =
            if pending.is_some() { u64::MAX } else { installed_at.saturating_add(FORMER_REPLICA_MARGIN_MICROS) };
        let knowledge =
            Knowledge { replicas, known: &known, covered: &covered, installed_at, former_until, epoch: view.epoch() };
        judge(local, context, &knowledge)
    }

    fn repair_in_background(&self, key: &str, record: Record) {
        self.hlc.observe(record.version.ts);
        let store = self.store.clone();
        let key = key.to_owned();
        tokio::spawn(async move {
            if let Err(e) = store.apply(vec![(key, record)]).await {
                tracing::warn!(error = %e, "read repair failed; anti-entropy will retry");
            }
        });
    }
}
