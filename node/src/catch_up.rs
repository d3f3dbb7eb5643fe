//! Catching up after a start: whether this node holds its partition's data, so that it may answer
//! from its own store.
//!
//! A node that starts — after a crash, a restart, or with an emptied data directory under an
//! identity the view still names — may lack writes its partition acknowledged while it was gone,
//! or everything. Until it has caught up it answers nothing from its store, and `/readyz` says it
//! is not ready. An operation on its partition — from a client, or forwarded by another node —
//! first makes it try to catch up: a round at once (one at a time; operations that come meanwhile
//! wait for the verdict), then the periodic rounds, for at most the replica deadline (not being
//! caught up is slowness, not death). A client operation that still finds it behind goes to an
//! owner that has caught up; a forwarded one is refused (`Refusal::CatchingUp`), as are causal
//! fetches. A digest summary from a replica equal to its own also counts as in sync, so a node of
//! a new cluster, whose replicas hold nothing either, has caught up as soon as it has exchanged
//! one summary with one of them.
//!
//! The rule ([`judge_round`]), applied after every anti-entropy round:
//! - a node with a view but no partition (a proxy) holds nothing and has caught up;
//! - a partition of one replica has caught up (there is nobody to learn from);
//! - a round that compared digests with a live replica of the partition and exchanged every slot
//!   that differed means this node holds everything that replica held when the round began:
//!   caught up;
//! - when every other replica is dead, a node that started with data has caught up (it is the
//!   only live replica, and holds what it held); one whose store was *empty* at start has not:
//!   it waits for a replica to come back rather than answer "no such key" for every key.
//!
//! Invariant: once caught up, a node stays caught up for the life of its process (its store only
//! ever gains: replication, anti-entropy and view-change transfers keep it current).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// What an anti-entropy round showed about this node's partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundView {
    /// This node has a view and owns no partition.
    Proxy,
    /// A live replica's digest summary of the partition equals this node's.
    DigestsAgree,
    /// This node replicates a partition.
    Replica {
        /// Replicas of the partition, this node included.
        replicas: usize,
        /// A round with a live replica completed (every differing slot exchanged).
        synced_with_a_replica: bool,
        /// Every other replica is dead (evidence, not slowness).
        others_all_dead: bool,
    },
}

/// Whether this node has caught up after a round, by the module's rule. `started_empty`: the
/// store held no record when the process started.
pub fn judge_round(round: RoundView, started_empty: bool) -> bool {
    match round {
        RoundView::Proxy | RoundView::DigestsAgree => true,
        RoundView::Replica { replicas, synced_with_a_replica, others_all_dead } => {
            replicas <= 1 || synced_with_a_replica || (others_all_dead && !started_empty)
        }
    }
}

/// The node's catch-up state.
pub struct CatchUp {
    caught_up: AtomicBool,
    started_empty: bool,
    changed: Notify,
    /// Held by whoever runs a catch-up round on demand, so concurrent requests start only one.
    on_demand: tokio::sync::Mutex<()>,
}

impl CatchUp {
    /// A node that has not caught up yet; `started_empty` as in [`judge_round`].
    pub fn new(started_empty: bool) -> Self {
        CatchUp {
            caught_up: AtomicBool::new(false),
            started_empty,
            changed: Notify::new(),
            on_demand: tokio::sync::Mutex::new(()),
        }
    }

    /// The right to run a catch-up round now, unless another caller is running one.
    pub fn on_demand(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        self.on_demand.try_lock().ok()
    }

    pub fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    /// Whether the store was empty when the process started.
    pub fn started_empty(&self) -> bool {
        self.started_empty
    }

    /// Records what a round showed; returns true if this round is the one that caught up.
    pub fn after_round(&self, round: RoundView) -> bool {
        if self.is_caught_up() || !judge_round(round, self.started_empty) {
            return false;
        }
        self.caught_up.store(true, Ordering::Release);
        self.changed.notify_waiters();
        true
    }

    /// Waits until this node has caught up, at most `limit`. True if it has.
    pub async fn wait(&self, limit: Duration) -> bool {
        let caught_up = async {
            loop {
                let notified = self.changed.notified();
                if self.is_caught_up() {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, caught_up).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(replicas: usize, synced: bool, others_dead: bool) -> RoundView {
        RoundView::Replica { replicas, synced_with_a_replica: synced, others_all_dead: others_dead }
    }

    #[test]
    fn the_rule() {
        assert!(judge_round(RoundView::Proxy, true));
        assert!(judge_round(RoundView::DigestsAgree, true));
        assert!(judge_round(replica(1, false, false), true), "nobody to learn from");
        assert!(judge_round(replica(2, true, false), true), "a completed sync with a live replica");
        assert!(!judge_round(replica(2, false, false), false), "no round completed: a replica is alive but unheard");
        assert!(judge_round(replica(3, false, true), false), "the only live replica, with its data");
        assert!(!judge_round(replica(2, false, true), true), "the only live replica, but it lost its data");
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_wake_when_a_round_catches_up_and_it_stays_so() {
        let state = std::sync::Arc::new(CatchUp::new(true));
        assert!(!state.wait(Duration::from_millis(10)).await);
        let waiter = tokio::spawn({
            let state = state.clone();
            async move { state.wait(Duration::from_secs(60)).await }
        });
        tokio::task::yield_now().await;
        assert!(!state.after_round(replica(2, false, true)), "an empty node does not catch up alone");
        assert!(state.after_round(replica(2, true, false)));
        assert!(waiter.await.unwrap());
        assert!(!state.after_round(replica(2, false, false)), "already caught up");
        assert!(state.is_caught_up());
    }
}
