//! View changes: adding and removing nodes and changing K while the cluster serves traffic.
//!
//! The node that receives a change (the *primary receiver*) drives it through five phases
//! ([`coordinator`]); every other node only answers [`ChangeStep`](crate::protocol::ChangeStep)s
//! ([`participant`]):
//! 1. **Prepare** — the primary asks every node of the old and new views, one at a time in id order,
//!    to promise it the next epoch ([`promise`]). A node promises one proposer per epoch, so of two
//!    concurrent changes the one that reaches the lowest live node first wins and the other is
//!    refused: never two views with one epoch.
//! 2. **Begin** — every node records the new layout as *pending*: from then on a write is stored
//!    on its key's old owners and also sent to its new owners (dual-write). Before acknowledging,
//!    a node waits for writes that started without seeing the pending view ([`WriteFence`]).
//! 3. **Transfer** — for every slot whose owners change, one live old owner (the source,
//!    [`assign`]) first catches up from the other old owners (they may hold writes it missed),
//!    then streams the slot to each new owner in batches, each acknowledged (durable) before the
//!    next is sent ([`transfer`]).
//! 4. **Commit** — every node makes the pending view its view.
//! 5. **Prune** — every node drops the slots it no longer owns, after checking slot digests with
//!    an owner and pushing anything the owner lacks (the final catch-up pass).
//!
//! Nodes that are dead are skipped; a node that was dead or paused learns the new view later from
//! any peer (see `anti_entropy`) and runs the same catch-up-then-prune, in the background. A
//! joining node that missed the begin or the commit has no view to ask from: the members' view
//! gossip finds it behind and hands it the view ([`PeerRequest::AdoptView`]), and it catches up
//! before it serves (see `catch_up`). Every
//! phase is idempotent, so a retried or resumed change redoes safely. The decisions — promises,
//! which source sends what, what to do with a request — are pure ([`promise`], [`assign`],
//! [`decide`]); the rest is I/O around them.
//!
//! [`WriteFence`]: crate::fence::WriteFence
//! [`PeerRequest::AdoptView`]: crate::protocol::PeerRequest::AdoptView

pub mod assign;
mod coordinator;
pub mod decide;
mod participant;
pub mod preview;
pub mod promise;
mod transfer;

use crate::protocol::Refusal;
use crate::view::NodeId;
use kvs_api::RebalanceProgress;
use std::sync::Mutex;

/// Why a view change did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("replication_factor must be at least 1")]
    ZeroReplicationFactor,
    #[error("members must name at least one node")]
    NoMembers,
    #[error("member {0:?} is not host:port (e.g. 10.0.0.3:8080)")]
    BadMember(String),
    #[error("a view change to epoch {epoch} (driven by {proposer}) is in progress; retry when it finishes")]
    InProgress { epoch: u64, proposer: String },
    #[error("{node} refused: {refusal}; retry the change")]
    Refused { node: String, refusal: Refusal },
    #[error("this node has no view yet, so it cannot change one; send the change to a member")]
    NoView,
    #[error("view change failed: no member of the new view is reachable")]
    NoLiveMember,
    #[error(
        "view change refused: none of the joining nodes {members:?} of new partition {partition} answered; start them (or wait until they are reachable) and retry"
    )]
    NewPartitionUnreachable { partition: u32, members: Vec<NodeId> },
    #[error("view change failed: sources kept failing during the transfer; the change can be retried")]
    SourcesFailed,
    #[error("the pending view change to epoch {epoch} did not complete on this node after resuming it; retry")]
    Stuck { epoch: u64 },
}

/// View-change bookkeeping every node keeps.
#[derive(Default)]
pub struct ChangeState {
    /// The promise this node made for the next epoch. `std` mutex: never held across `.await`.
    pub(crate) promises: Mutex<promise::Promises>,
    /// Serializes the changes this node drives (a second request waits for the first).
    driving: tokio::sync::Mutex<()>,
    /// Held while a prune drops slots, and by a change beginning here, so a prune decided under
    /// one view never drops what a newer pending view makes this node own.
    pruning: tokio::sync::Mutex<()>,
    /// The latest change this node drove. `std` mutex, never held across `.await`.
    status: Mutex<RebalanceProgress>,
    /// This node's part as a source of the current or last change. Same discipline.
    transfer: Mutex<RebalanceProgress>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ChangeState {
    /// The latest change this node drove.
    pub fn driven(&self) -> RebalanceProgress {
        lock(&self.status).clone()
    }

    /// This node's part as a source.
    pub fn as_source(&self) -> RebalanceProgress {
        lock(&self.transfer).clone()
    }
}
