//! Coordinating a write: stamp it, store it, send it to every other replica (and, during a view
//! change, to the key's new owners), and say how many replicas hold it.

use super::{FORWARDED_WRITE_EXPIRY, WriteTerms};
use crate::causal::{VectorClock, Version};
use crate::node::{KvError, Node};
use crate::peers::PeerError;
use crate::placement::PartitionId;
use crate::protocol::{Coordinated, Durability, PeerRequest, PeerResponse, Refusal};
use crate::store::{Applied, Record};
use crate::view::View;
use futures::future::join_all;
use std::sync::Arc;

/// What became of sending a write to one replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReplicaOutcome {
    /// The replica stored it durably.
    Stored,
    /// The replica is dead (it was skipped, or declared dead while the write was under way).
    Dead,
    /// The replica is alive but did not answer within the replica deadline.
    Slow,
    /// The replica answered but did not store it.
    Refused,
}

impl ReplicaOutcome {
    fn of(result: &Result<PeerResponse, PeerError>) -> Self {
        match result {
            Ok(PeerResponse::Replicated) => ReplicaOutcome::Stored,
            Ok(_) | Err(PeerError::Refused { .. } | PeerError::Rejected { .. } | PeerError::Protocol { .. }) => {
                ReplicaOutcome::Refused
            }
            Err(PeerError::Timeout { .. }) => ReplicaOutcome::Slow,
            Err(
                PeerError::Skipped { .. }
                | PeerError::Dead { .. }
                | PeerError::Unreachable { .. }
                | PeerError::ConnectTimeout { .. },
            ) => ReplicaOutcome::Dead,
        }
    }
}

impl Node {
    /// Stamps, stores and replicates a write.
    pub(super) async fn coordinate_write(
        &self,
        view: &View,
        partition: PartitionId,
        key: &str,
        value: Option<bytes::Bytes>,
        context: VectorClock,
        terms: WriteTerms,
    ) -> Result<Coordinated, KvError> {
        let WriteTerms { min_copies, not_after } = terms;
        let owners = view.members(partition);
        let replicas = owners.len() as u32;
        if min_copies > replicas {
            return Err(KvError::MinCopiesAboveReplicas { partition, replicas, min_copies });
        }
        if min_copies > 1 {
            // Refuse before writing anything when the copies cannot be had.
            let alive = owners.iter().filter(|o| *o == self.id() || !self.liveness.is_dead(o)).count() as u32;
            if alive < min_copies {
                return Err(KvError::TooFewReplicas { partition, alive, replicas, min_copies });
            }
        }
        let current = self.store.get(key)?;
        let was_live = current.as_ref().is_some_and(|r| !r.is_deleted());
        let depends_on = context.max_entry().max(current.as_ref().map_or(0, |r| r.version.ts));
        // During a view change the write also goes to the key's owners under the pending view
        // (dual-write), so nothing written while data moves is left behind.
        let pending = self.pending();
        let new_owners = pending.as_ref().map(|p| p.owners_of_key(key)).unwrap_or_default();
        let others: Vec<_> = owners
            .iter()
            .chain(new_owners.iter().filter(|n| !owners.contains(n)))
            .filter(|m| *m != self.id())
            .collect();
        // Nothing awaits between this check and the stamp below.
        let wall = self.clock.wall_micros();
        if let Some(limit) = not_after
            && wall > limit
        {
            let age_micros = wall - limit + FORWARDED_WRITE_EXPIRY.as_micros() as u64;
            self.metrics.expired_forwards.inc();
            tracing::warn!(key, age_micros, "refusing a forwarded write that arrived too late");
            return Err(KvError::Expired { age_micros });
        }
        let in_flight = self.freshness.begin_write(&self.hlc, wall, depends_on, &others);
        let ts = in_flight.ts;
        let _sends = self.freshness.send_guard(ts, &others);
        let mut clock = context;
        if let Some(c) = &current {
            clock.merge(&c.clock);
        }
        clock.observe(self.id(), ts);
        let record = Record { version: Version { ts, writer: self.id().to_owned() }, clock, value };
        let is_delete = record.is_deleted();
        let batch = vec![(key.to_owned(), record.clone())];

        let local_batch = batch.clone();
        let (local, (outcomes, newer_view)) = tokio::join!(
            async {
                let applied = self.store.apply(local_batch).await;
                drop(in_flight);
                applied
            },
            self.replicate(&others, ts, batch, view)
        );
        let outcome = local?.first().copied().unwrap_or(Applied::Stale);
        if let Some(peer) = newer_view {
            // A replica is on a newer view: this node missed a view change, and the key may have
            // new owners that never saw this write. Do not acknowledge it; the caller sends it to
            // the owners under the newer view, ordered after the copy stored here.
            tracing::warn!(key, peer = %peer, view_epoch = view.epoch(), "a replica is on a newer view; not acknowledging a write coordinated under an older one");
            self.metrics.stale_view_writes.inc();
            return Err(KvError::StaleWrite { peer, writer: self.id().to_owned(), stamped: ts });
        }
        let changed_liveness = match (is_delete, outcome) {
            (false, _) => !was_live,
            (true, Applied::Stale) => false,
            (true, _) => was_live,
        };
        // Copies among the partition's replicas (dual-writes to a pending view's new owners are
        // extra and not counted).
        let missing: Vec<ReplicaOutcome> = others
            .iter()
            .zip(&outcomes)
            .filter(|(p, _)| owners.contains(p))
            .map(|(_, o)| *o)
            .filter(|o| *o != ReplicaOutcome::Stored)
            .collect();
        let durability = Durability { copies: replicas - missing.len() as u32, replicas };
        if let Some(reason) = [ReplicaOutcome::Dead, ReplicaOutcome::Refused, ReplicaOutcome::Slow]
            .into_iter()
            .find(|r| missing.contains(r))
        {
            self.metrics.under_replicated(reason);
        }
        if durability.copies < min_copies {
            return Err(KvError::UnderReplicated { partition, durability, min_copies });
        }
        let view_epoch = view.epoch();
        Ok(Coordinated { partition, record: Some(record), changed_liveness, view_epoch, durability: Some(durability) })
    }

    /// Sends this node's new write (stamped `ts`, already registered as being sent to each of
    /// `peers`) to each peer in parallel, telling each how far it is now known to be complete;
    /// returns what became of it at each peer, in order, and a peer that refused it for being on a
    /// view newer than `view`'s, if one did.
    ///
    /// The first write after a replica was declared dead still tries it (briefly): the node that
    /// was cut off (paused, partitioned) may be this one, with an out-of-date view, and a replica
    /// on a newer view can then say so. Later writes give the dead replica up at once, unless every
    /// other member looks dead (the mark of being cut off): then every write probes. A probe costs
    /// at most `PROBE_DEADLINE` (a crashed replica refuses at once).
    async fn replicate(
        &self,
        peers: &[&String],
        ts: u64,
        records: Vec<(String, Record)>,
        view: &View,
    ) -> (Vec<ReplicaOutcome>, Option<String>) {
        let view_epoch = view.epoch();
        let others: Vec<String> = view.all_members().into_iter().filter(|m| m != self.id()).collect();
        let alone = others.iter().all(|m| self.liveness.is_dead(m));
        let records = Arc::new(records);
        let calls = peers.iter().map(|&peer| {
            let records = records.clone();
            async move {
                let announced = self.freshness.announcement_for(peer, &self.hlc);
                let request = PeerRequest::Replicate {
                    records: records.as_ref().clone(),
                    from: self.id().to_owned(),
                    cap: announced.cap,
                    pending: announced.pending,
                    view_epoch: Some(view_epoch),
                };
                let deadline = self.settings.replica_deadline;
                let result = if self.liveness.should_probe(peer, alone) {
                    self.probe_peer(peer, &request, deadline).await
                } else {
                    self.call_peer(peer, &request, deadline).await
                };
                let outcome = ReplicaOutcome::of(&result);
                if let Err(e) = &result {
                    tracing::debug!(peer = %peer, error = %e, "replication failed; anti-entropy will repair");
                }
                self.metrics.replicated(outcome);
                self.freshness.sent(peer, ts, outcome == ReplicaOutcome::Stored);
                let newer = match &result {
                    Err(PeerError::Refused { refusal: Refusal::NotOwner { epoch: mine, .. }, .. })
                    | Err(PeerError::Refused { refusal: Refusal::EpochMismatch { mine, .. }, .. }) => {
                        *mine > view_epoch
                    }
                    _ => false,
                };
                (outcome, newer.then(|| peer.clone()))
            }
        });
        let answers = join_all(calls).await;
        let newer_view = answers.iter().find_map(|(_, newer)| newer.clone());
        (answers.into_iter().map(|(outcome, _)| outcome).collect(), newer_view)
    }
}
