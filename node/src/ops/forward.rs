//! Forwarding: a node that does not own a key sends the operation to an owner, one at a time,
//! live owners first, until one coordinates it.
//!
//! Failover never lets an old write overwrite newer ones: a forwarded write carries its send time,
//! an owner refuses it if it arrives more than [`FORWARDED_WRITE_EXPIRY`] later, and a forwarder
//! that may have delivered a write to a silent owner waits that long (plus a clock margin) before
//! sending it to the next owner. Otherwise an owner cut off by a partition could perform the
//! held-up write when the network heals, stamping it then, and overwrite every write acknowledged
//! in between (found by the fault-injection suite once K changes were real).

use crate::causal::VectorClock;
use crate::node::{KvError, Node};
use crate::peers::PeerError;
use crate::placement::PartitionId;
use crate::protocol::{Coordinated, KvOp, PeerRequest, PeerResponse, Refusal};
use crate::view::View;
use std::time::Duration;

/// A forwarded write that reaches its owner later than this after it was sent is refused instead
/// of performed. Long enough that a live owner, however busy, starts on a forwarded write well
/// within it; only writes that were in flight to an owner when it went silent wait this long
/// before going to the next owner.
pub const FORWARDED_WRITE_EXPIRY: Duration = Duration::from_secs(3);
/// How much longer than [`FORWARDED_WRITE_EXPIRY`] a forwarder waits before sending a write it may
/// have delivered to a silent owner to the next one: more than twice the clock difference nodes
/// may have (their clocks must agree within 50 ms), so the copy the next owner stamps is newer
/// than any the first could still have stamped.
pub const FORWARD_FAILOVER_MARGIN: Duration = Duration::from_millis(100);

impl Node {
    /// Sends the operation to the key's owners, one at a time, until one coordinates it. An owner
    /// that is alive is waited for (up to the forward deadline); a dead one is skipped.
    pub(super) async fn forward(
        &self,
        view: &View,
        partition: PartitionId,
        key: &str,
        op: KvOp,
        context: VectorClock,
        min_copies: u32,
    ) -> Result<Coordinated, KvError> {
        let owners = view.members(partition);
        // Rotate the starting replica by key so that load spreads while a key sticks to one
        // coordinator (fewer concurrent-write conflicts).
        let start =
            if owners.is_empty() { 0 } else { crate::placement::slot_of(key.as_bytes()) as usize % owners.len() };
        // Never this node itself (an owner forwards only while it catches up).
        let rotated: Vec<_> = owners[start..].iter().chain(&owners[..start]).filter(|o| *o != self.id()).collect();
        let is_write = !matches!(op, KvOp::Get);
        let mut newer_view_at = None;
        // An owner that answered "I may lack what your context needs" says more than "nobody
        // answered": report that if no owner does better.
        let mut causal_refusal = false;
        let mut catching_up = false;
        let mut failures = Vec::new();
        for owner in self.liveness.order(rotated) {
            self.metrics.forwarded.inc();
            let sent_at = self.clock.wall_micros();
            let request = PeerRequest::Coordinate {
                key: key.to_owned(),
                op: op.clone(),
                context: context.clone(),
                view_epoch: view.epoch(),
                min_copies,
                sent_at,
            };
            match self.call_peer(owner, &request, self.settings.forward_deadline).await {
                Ok(PeerResponse::Coordinated(c)) => return Ok(c),
                Ok(other) => {
                    tracing::warn!(peer = %owner, response = ?other, "unexpected answer to a forwarded request");
                    let detail = format!("answered a forwarded request with {other:?}");
                    failures.push(PeerError::Protocol { peer: owner.clone(), detail });
                }
                Err(PeerError::Refused { refusal, .. }) => match refusal {
                    // Views differ. If the owner's is newer, this node must catch up.
                    refusal @ Refusal::EpochMismatch { mine: theirs, .. } => {
                        if theirs > view.epoch() {
                            newer_view_at = Some(owner.clone());
                        }
                        failures.push(PeerError::Refused { peer: owner.clone(), refusal });
                    }
                    // The owner had missed a view change and has caught up: every owner under this
                    // node's view is out of date, so learn the newer view from it and route again,
                    // after the copy it stored.
                    Refusal::StaleWrite { writer, stamped } => {
                        return Err(KvError::StaleWrite { peer: owner.clone(), writer, stamped });
                    }
                    // The client's own requirement decided it: another owner would answer the same.
                    r @ (Refusal::TooFewReplicas { .. }
                    | Refusal::UnderReplicated { .. }
                    | Refusal::MinCopiesAboveReplicas { .. }) => return Err(KvError::from_refusal(r)),
                    refusal => {
                        causal_refusal |= matches!(refusal, Refusal::CausalUnavailable { .. });
                        catching_up |= matches!(refusal, Refusal::CatchingUp { .. });
                        tracing::debug!(peer = %owner, %refusal, "owner refused a forwarded request; trying the next replica");
                        failures.push(PeerError::Refused { peer: owner.clone(), refusal });
                    }
                },
                Err(e) => {
                    tracing::debug!(peer = %owner, error = %e, "forwarding failed; trying the next replica");
                    if is_write && may_have_been_delivered(&e) {
                        // The owner may still perform it: wait until it would refuse it.
                        let safe_from = sent_at + (FORWARDED_WRITE_EXPIRY + FORWARD_FAILOVER_MARGIN).as_micros() as u64;
                        let wait = Duration::from_micros(safe_from.saturating_sub(self.clock.wall_micros()));
                        tokio::time::sleep(wait).await;
                    }
                    failures.push(e);
                }
            }
        }
        match newer_view_at {
            Some(peer) => Err(KvError::StaleView { peer }),
            None if causal_refusal => Err(KvError::CausalUnavailable { partition }),
            None if catching_up => Err(KvError::CatchingUp { partition }),
            None => {
                let error = KvError::Unavailable { partition, failures };
                tracing::warn!(key, %error, "forwarding failed on every owner");
                Err(error)
            }
        }
    }
}

/// Whether a forwarded request that failed this way may still reach its owner and be performed
/// later (it was sent, and nothing says it was lost). A refused or reset connection means the
/// owner's process is gone, taking the request with it; a silent or cut-off owner may get it
/// once the network heals.
fn may_have_been_delivered(e: &PeerError) -> bool {
    match e {
        PeerError::Timeout { .. } | PeerError::Dead { .. } => true,
        PeerError::Skipped { .. }
        | PeerError::Unreachable { .. }
        | PeerError::ConnectTimeout { .. }
        | PeerError::Refused { .. }
        | PeerError::Rejected { .. }
        | PeerError::Protocol { .. } => false,
    }
}
