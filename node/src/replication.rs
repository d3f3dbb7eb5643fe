//! Request routing and replication: how a client operation reaches the owners of its key and how a
//! write reaches every replica.
//!
//! - Any node accepts any request. A node that is not a replica of the key's partition forwards it
//!   to one that is (healthy replicas first, failing over on error); the receiving replica
//!   *coordinates* it and never forwards again.
//! - A coordinated write is stamped by the coordinator's HLC, stored locally and sent to every other
//!   replica in parallel. It is acknowledged once it is durable locally and on every other replica
//!   that is alive: a live replica is waited for however busy it is (up to
//!   `Settings::replica_deadline`, seconds), a dead one (see `liveness`) is given up on at once and
//!   catches up through anti-entropy. The answer says how many replicas hold the write
//!   ([`Durability`]); a client may ask for a minimum (`min_copies`) and gets a refusal instead of
//!   an acknowledgement with fewer.
//! - A coordinated read answers from the local store unless the client's causal context shows a
//!   write this replica may not have; then it asks the other replicas and returns the newest
//!   version (repairing itself on the way).

use crate::causal::{VectorClock, Version, wall_micros};
use crate::freshness::{FORMER_REPLICA_MARGIN_MICROS, Knowledge, Verdict, judge};
use crate::node::{KvError, Node};
use crate::peers::{CoordinateRefusal, Coordinated, Durability, KvOp, PeerError, PeerRequest, PeerResponse};
use crate::placement::PartitionId;
use crate::store::{Applied, Record};
use crate::view::View;
use futures::future::join_all;
use std::sync::Arc;
use std::time::Duration;

/// A forwarded write that reaches its owner later than this after it was sent is refused instead
/// of performed. Why: a forwarder that gave up on a silent owner sends the write to the next
/// owner; if the first one performed it later (its request held up in a partition, say), it
/// would stamp it then and overwrite every write acknowledged in between. Long enough that a
/// live owner, however busy, starts on a forwarded write well within it; only writes that were
/// in flight to an owner when it went silent wait this long before going to the next owner.
pub const FORWARDED_WRITE_EXPIRY: Duration = Duration::from_secs(3);
/// How much longer than [`FORWARDED_WRITE_EXPIRY`] a forwarder waits before sending a write it may
/// have delivered to a silent owner to the next one: more than twice the clock difference nodes
/// may have (their clocks must agree within 50 ms), so the copy the next owner stamps is newer
/// than any the first could still have stamped.
pub const FORWARD_FAILOVER_MARGIN: Duration = Duration::from_millis(100);

/// What a write must satisfy besides being stored.
#[derive(Clone, Copy, Debug, Default)]
struct WriteTerms {
    /// Refuse rather than acknowledge with fewer durable copies (0 or 1: no requirement).
    min_copies: u32,
    /// Wall time (µs) after which a forwarded write is refused rather than stamped (see
    /// [`FORWARDED_WRITE_EXPIRY`]); `None` for writes that entered the cluster here.
    not_after: Option<u64>,
}

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
            Ok(_) | Err(PeerError::Refused { .. } | PeerError::Protocol { .. }) => ReplicaOutcome::Refused,
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
    /// Routes a client operation: coordinate it here if this node replicates the key, else forward.
    /// If an owner turns out to be on a newer view, learn it and route once more under it.
    pub(crate) async fn route(
        &self,
        key: &str,
        op: KvOp,
        context: VectorClock,
        min_copies: u32,
    ) -> Result<Coordinated, KvError> {
        // Writes register with the fence before reading the view, so a view change can wait for
        // every write that did not see its pending view.
        let _fence = (!matches!(op, KvOp::Get)).then(|| self.fence.enter());
        let mut refreshed = false;
        loop {
            let view = self.require_view()?;
            let partition = view.partition_of_key(key);
            if view.members(partition).iter().any(|m| m == self.id()) {
                return self
                    .coordinate_in(&view, partition, key, op, context, WriteTerms { min_copies, not_after: None })
                    .await;
            }
            match self.forward(&view, partition, key, op.clone(), context.clone(), min_copies).await {
                Err(KvError::StaleView { peer }) if !refreshed => {
                    self.refresh_view_from(&peer).await;
                    refreshed = true;
                }
                Err(KvError::StaleView { .. }) => return Err(KvError::Unavailable { partition }),
                other => return other,
            }
        }
    }

    /// Asks `peer` for its view and adopts it if it is newer.
    pub(crate) async fn refresh_view_from(&self, peer: &str) {
        if let Ok(PeerResponse::Hello(info)) =
            self.call_peer(peer, &PeerRequest::Hello, self.settings.replica_deadline).await
            && let Some(layout) = info.layout
        {
            self.adopt_view(layout).await;
        }
    }

    /// Coordinates an operation forwarded by another node; refuses if this node is not an owner.
    pub(crate) async fn coordinate(
        &self,
        key: &str,
        op: KvOp,
        context: VectorClock,
        sender_epoch: u64,
        min_copies: u32,
        sent_at: u64,
    ) -> Result<Coordinated, KvError> {
        let _fence = (!matches!(op, KvOp::Get)).then(|| self.fence.enter());
        let view = self.require_view()?;
        if view.epoch() != sender_epoch {
            return Err(KvError::EpochMismatch { mine: view.epoch(), theirs: sender_epoch });
        }
        let partition = view.partition_of_key(key);
        if !view.members(partition).iter().any(|m| m == self.id()) {
            return Err(KvError::NotOwner { partition, epoch: view.epoch() });
        }
        let not_after = sent_at.saturating_add(FORWARDED_WRITE_EXPIRY.as_micros() as u64);
        self.coordinate_in(&view, partition, key, op, context, WriteTerms { min_copies, not_after: Some(not_after) })
            .await
    }

    /// Sends the operation to the key's owners, one at a time, until one coordinates it. An owner
    /// that is alive is waited for (up to the forward deadline); a dead one is skipped.
    async fn forward(
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
        let rotated: Vec<_> = owners[start..].iter().chain(&owners[..start]).collect();
        let is_write = !matches!(op, KvOp::Get);
        let mut newer_view_at = None;
        // An owner that answered "I may lack what your context needs" says more than "nobody
        // answered": report that if no owner does better.
        let mut causal_refusal = false;
        for owner in self.liveness.order(rotated) {
            self.metrics.forwarded.inc();
            let sent_at = wall_micros();
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
                Ok(PeerResponse::NotCoordinated(refusal)) => match refusal {
                    CoordinateRefusal::EpochMismatch { mine: theirs, .. } => {
                        // Views differ. If the owner's is newer, this node must catch up.
                        if theirs > view.epoch() {
                            newer_view_at = Some(owner.clone());
                        }
                    }
                    // The client's own requirement decided it: another owner would answer the same.
                    r @ (CoordinateRefusal::TooFewReplicas { .. }
                    | CoordinateRefusal::UnderReplicated { .. }
                    | CoordinateRefusal::MinCopiesAboveReplicas { .. }) => return Err(KvError::from_refusal(r)),
                    r => {
                        causal_refusal |= matches!(r, CoordinateRefusal::CausalUnavailable { .. });
                        tracing::debug!(peer = %owner, refusal = ?r, "owner refused a forwarded request; trying the next replica");
                    }
                },
                Ok(other) => {
                    tracing::warn!(peer = %owner, response = ?other, "unexpected answer to a forwarded request")
                }
                Err(e) => {
                    tracing::debug!(peer = %owner, error = %e, "forwarding failed; trying the next replica");
                    if is_write && may_have_been_delivered(&e) {
                        // The owner may still perform it: wait until it would refuse it.
                        let safe_from = sent_at + (FORWARDED_WRITE_EXPIRY + FORWARD_FAILOVER_MARGIN).as_micros() as u64;
                        tokio::time::sleep(Duration::from_micros(safe_from.saturating_sub(wall_micros()))).await;
                    }
                }
            }
        }
        match newer_view_at {
            Some(peer) => Err(KvError::StaleView { peer }),
            None if causal_refusal => Err(KvError::CausalUnavailable { partition }),
            None => Err(KvError::Unavailable { partition }),
        }
    }

    async fn coordinate_in(
        &self,
        view: &View,
        partition: PartitionId,
        key: &str,
        op: KvOp,
        context: VectorClock,
        terms: WriteTerms,
    ) -> Result<Coordinated, KvError> {
        match op {
            KvOp::Get => self.coordinate_read(view, partition, key, &context).await,
            KvOp::Put(value) => self.coordinate_write(view, partition, key, Some(value), context, terms).await,
            KvOp::Delete => self.coordinate_write(view, partition, key, None, context, terms).await,
        }
    }

    /// Stamps, stores and replicates a write.
    async fn coordinate_write(
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
        let wall = wall_micros();
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
        let (local, outcomes) = tokio::join!(
            async {
                let applied = self.store.apply(local_batch).await;
                drop(in_flight);
                applied
            },
            self.replicate(&others, ts, batch)
        );
        let outcome = local?.first().copied().unwrap_or(Applied::Stale);
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
        Ok(Coordinated {
            partition,
            record: Some(record),
            changed_liveness,
            view_epoch: view.epoch(),
            durability: Some(durability),
        })
    }

    /// Sends this node's new write (stamped `ts`, already registered as being sent to each of
    /// `peers`) to each peer in parallel, telling each how far it is now known to be complete;
    /// returns what became of it at each peer, in order.
    pub(crate) async fn replicate(
        &self,
        peers: &[&String],
        ts: u64,
        records: Vec<(String, Record)>,
    ) -> Vec<ReplicaOutcome> {
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
                };
                let result = self.call_peer(peer, &request, self.settings.replica_deadline).await;
                let outcome = ReplicaOutcome::of(&result);
                if let Err(e) = &result {
                    tracing::debug!(peer = %peer, error = %e, "replication failed; anti-entropy will repair");
                }
                self.metrics.replicated(outcome);
                self.freshness.sent(peer, ts, outcome == ReplicaOutcome::Stored);
                outcome
            }
        });
        join_all(calls).await
    }

    async fn coordinate_read(
        &self,
        view: &View,
        partition: PartitionId,
        key: &str,
        context: &VectorClock,
    ) -> Result<Coordinated, KvError> {
        let local = self.store.get(key)?;
        let members = view.members(partition);
        match self.judge(view, local.as_ref(), context, members) {
            Verdict::Fresh => {
                return Ok(Coordinated {
                    partition,
                    record: local,
                    changed_liveness: false,
                    view_epoch: view.epoch(),
                    durability: None,
                });
            }
            Verdict::Behind => {
                // This node missed a view change: refuse (the forwarder tries another node) and
                // catch up in the background.
                self.refresh_view_soon();
                return Err(KvError::CausalUnavailable { partition });
            }
            Verdict::Fetch => {}
        }
        self.metrics.causal_fetches.inc();
        let request = PeerRequest::Fetch { key: key.to_owned() };
        // Ask every other live replica (a dead one answers at once with an error).
        let fetches = members.iter().filter(|m| *m != self.id()).map(|peer| {
            let request = &request;
            async move {
                match self.call_peer(peer, request, self.settings.replica_deadline).await {
                    Ok(PeerResponse::Fetched(r)) => Ok(r),
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
        Ok(Coordinated {
            partition,
            record: newest,
            changed_liveness: false,
            view_epoch: view.epoch(),
            durability: None,
        })
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
        judge(
            local,
            context,
            &Knowledge { replicas, known: &known, covered: &covered, installed_at, former_until, epoch: view.epoch() },
        )
    }

    /// Asks every peer for its view in the background (a newer one is adopted).
    fn refresh_view_soon(&self) {
        let Some(view) = self.view() else { return };
        let peers: Vec<String> = view.all_members().into_iter().filter(|m| m != self.id()).collect();
        let me = self.self_handle();
        tokio::spawn(async move {
            if let Some(node) = me.upgrade() {
                for peer in peers {
                    node.refresh_view_from(&peer).await;
                }
            }
        });
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

/// Whether a forwarded request that failed this way may still reach its owner and be performed
/// later (it was sent, and nothing says it was lost). A refused or reset connection means the
/// owner's process is gone, taking the request with it; a silent or cut-off owner may get it
/// once the network heals.
fn may_have_been_delivered(e: &PeerError) -> bool {
    match e {
        PeerError::Timeout { .. } => true,
        PeerError::Dead { .. } => true,
        PeerError::Skipped { .. }
        | PeerError::Unreachable { .. }
        | PeerError::ConnectTimeout { .. }
        | PeerError::Refused { .. }
        | PeerError::Protocol { .. } => false,
    }
}
