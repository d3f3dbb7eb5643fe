//! Why a client operation failed ([`KvError`]), and how the client path's errors travel between
//! nodes as typed [`Refusal`]s. The HTTP status of each is decided in one place,
//! `http::error`.

use crate::admission::Overloaded;
use crate::peers::PeerError;
use crate::placement::PartitionId;
use crate::protocol::{Durability, Refusal};
use crate::store::StoreError;

/// Why a key-value operation failed. The HTTP layer turns each into a status and message.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("this node has no view yet: start it with VIEW, or add it to a cluster with update_view")]
    NoView,
    /// Every owner failed; `failures` says how each did (in the order tried), so that the client
    /// (and the log) can tell a cluster that lost a partition from a node that lost its peers.
    #[error("key value store is not available: no replica of partition {partition} answered{}", tried(failures))]
    Unavailable { partition: PartitionId, failures: Vec<PeerError> },
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
    /// This node coordinated a write under a view that is no longer current (a replica on a newer
    /// view refused it): the write is not acknowledged, and must go to the key's owners under the
    /// newer view, ordered after the copy `writer` stored here at `stamped`.
    #[error("{peer} is on a newer view than the one this write was coordinated under")]
    StaleWrite { peer: String, writer: String, stamped: u64 },
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
    #[error(
        "the replicas of partition {partition} that answered are catching up after a restart and may lack acknowledged writes; retry shortly"
    )]
    CatchingUp { partition: PartitionId },
    #[error("the owner's storage failed: {0}")]
    RemoteStorage(String),
    #[error(transparent)]
    Storage(#[from] StoreError),
}

/// ` (a: why; b: why)` for the owners tried, or nothing.
fn tried(failures: &[PeerError]) -> String {
    if failures.is_empty() {
        return String::new();
    }
    let each: Vec<String> = failures.iter().map(ToString::to_string).collect();
    format!(" ({})", each.join("; "))
}

impl KvError {
    /// The refusal an owner sends back for a forwarded operation.
    pub(crate) fn to_refusal(&self) -> Refusal {
        match *self {
            KvError::EpochMismatch { mine, theirs } => Refusal::EpochMismatch { mine, theirs },
            KvError::NotOwner { partition, epoch } => Refusal::NotOwner { partition, epoch },
            KvError::NoView => Refusal::NoView,
            KvError::CausalUnavailable { partition } | KvError::Unavailable { partition, .. } => {
                Refusal::CausalUnavailable { partition }
            }
            KvError::TooFewReplicas { partition, alive, replicas, min_copies } => {
                Refusal::TooFewReplicas { partition, alive, replicas, min_copies }
            }
            KvError::UnderReplicated { partition, durability, min_copies } => {
                Refusal::UnderReplicated { partition, durability, min_copies }
            }
            KvError::MinCopiesAboveReplicas { partition, replicas, min_copies } => {
                Refusal::MinCopiesAboveReplicas { partition, replicas, min_copies }
            }
            KvError::Expired { age_micros } => Refusal::Expired { age_micros },
            KvError::CatchingUp { partition } => Refusal::CatchingUp { partition },
            KvError::StaleWrite { ref writer, stamped, .. } => Refusal::StaleWrite { writer: writer.clone(), stamped },
            KvError::StaleView { .. } | KvError::Overloaded(_) | KvError::RemoteStorage(_) | KvError::Storage(_) => {
                Refusal::Storage { detail: self.to_string() }
            }
        }
    }

    /// The error a forwarder reports for an owner's refusal.
    pub(crate) fn from_refusal(refusal: Refusal) -> Self {
        match refusal {
            Refusal::EpochMismatch { mine, theirs } => KvError::EpochMismatch { mine, theirs },
            Refusal::NotOwner { partition, epoch } => KvError::NotOwner { partition, epoch },
            Refusal::NoView => KvError::NoView,
            Refusal::CausalUnavailable { partition } => KvError::CausalUnavailable { partition },
            Refusal::MinCopiesAboveReplicas { partition, replicas, min_copies } => {
                KvError::MinCopiesAboveReplicas { partition, replicas, min_copies }
            }
            Refusal::TooFewReplicas { partition, alive, replicas, min_copies } => {
                KvError::TooFewReplicas { partition, alive, replicas, min_copies }
            }
            Refusal::UnderReplicated { partition, durability, min_copies } => {
                KvError::UnderReplicated { partition, durability, min_copies }
            }
            Refusal::Expired { age_micros } => KvError::Expired { age_micros },
            Refusal::CatchingUp { partition } => KvError::CatchingUp { partition },
            other => KvError::RemoteStorage(other.to_string()),
        }
    }
}
