//! Request routing and replication: how a client operation reaches the owners of its key and how a
//! write reaches every replica.
//!
//! - Any node accepts any request. A node that is not a replica of the key's partition forwards it
//!   to one that is (healthy replicas first, failing over on error); the receiving replica
//!   *coordinates* it and never forwards again.
//! - A coordinated write is stamped by the coordinator's HLC, stored locally and sent to every other
//!   replica in parallel. It is acknowledged once it is durable locally and every other replica has
//!   answered or failed (a replica that was down catches up through anti-entropy). Peers that failed
//!   recently are skipped, so a dead replica costs nothing after the first timeout.
//! - A coordinated read answers from the local store unless the client's causal context shows a
//!   write this replica may not have; then it asks the other replicas and returns the newest
//!   version (repairing itself on the way).

use crate::causal::{VectorClock, Version, wall_micros};
use crate::freshness::{FORMER_REPLICA_MARGIN_MICROS, Knowledge, Verdict, judge};
use crate::node::{KvError, Node};
use crate::peers::{Coordinated, KvOp, PeerError, PeerRequest, PeerResponse};
use crate::placement::PartitionId;
use crate::store::{Applied, Record};
use crate::view::View;
use futures::future::join_all;
use std::sync::Arc;

impl Node {
    /// Routes a client operation: coordinate it here if this node replicates the key, else forward.
    /// If an owner turns out to be on a newer view, learn it and route once more under it.
    pub(crate) async fn route(&self, key: &str, op: KvOp, context: VectorClock) -> Result<Coordinated, KvError> {
        // Writes register with the fence before reading the view, so a view change can wait for
        // every write that did not see its pending view.
        let _fence = (!matches!(op, KvOp::Get)).then(|| self.fence.enter());
        let mut refreshed = false;
        loop {
            let view = self.require_view()?;
            let partition = view.partition_of_key(key);
            if view.members(partition).iter().any(|m| m == self.id()) {
                return self.coordinate_in(&view, partition, key, op, context).await;
            }
            match self.forward(&view, partition, key, op.clone(), context.clone()).await {
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
        if let Ok(PeerResponse::Hello(info)) = self.peers.call(peer, &PeerRequest::Hello, self.settings.replicate_timeout).await
            && let Some(layout) = info.layout
        {
            self.adopt_view(layout).await;
        }
    }

    /// Coordinates an operation forwarded by another node; refuses if this node is not an owner.
    pub(crate) async fn coordinate(&self, key: &str, op: KvOp, context: VectorClock, sender_epoch: u64) -> Result<Coordinated, KvError> {
        let _fence = (!matches!(op, KvOp::Get)).then(|| self.fence.enter());
        let view = self.require_view()?;
        if view.epoch() != sender_epoch {
            return Err(KvError::EpochMismatch { mine: view.epoch(), theirs: sender_epoch });
        }
        let partition = view.partition_of_key(key);
        if !view.members(partition).iter().any(|m| m == self.id()) {
            return Err(KvError::NotOwner { partition, epoch: view.epoch() });
        }
        self.coordinate_in(&view, partition, key, op, context).await
    }

    async fn forward(
        &self,
        view: &View,
        partition: PartitionId,
        key: &str,
        op: KvOp,
        context: VectorClock,
    ) -> Result<Coordinated, KvError> {
        let owners = view.members(partition);
        // Rotate the starting replica by key so that load spreads while a key sticks to one
        // coordinator (fewer concurrent-write conflicts).
        let start = if owners.is_empty() { 0 } else { crate::placement::slot_of(key.as_bytes()) as usize % owners.len() };
        let rotated: Vec<_> = owners[start..].iter().chain(&owners[..start]).collect();
        let request = PeerRequest::Coordinate { key: key.to_owned(), op, context, view_epoch: view.epoch() };
        let mut newer_view_at = None;
        for owner in self.health.order(rotated) {
            self.metrics.forwarded.inc();
            match self.peers.call(owner, &request, self.settings.forward_timeout).await {
                Ok(PeerResponse::Coordinated(c)) => {
                    self.health.mark_up(owner);
                    return Ok(c);
                }
                Ok(other) => tracing::warn!(peer = %owner, response = ?other, "unexpected answer to a forwarded request"),
                Err(PeerError::Refused { status: 409, msg, .. }) => {
                    // Views differ. If the owner's is newer, this node must catch up.
                    if parse_epoch(&msg).is_some_and(|theirs| theirs > view.epoch()) {
                        newer_view_at = Some(owner.clone());
                    }
                }
                Err(PeerError::Refused { status, msg, .. }) => {
                    tracing::debug!(peer = %owner, status, %msg, "owner refused a forwarded request; trying the next replica");
                }
                Err(e) => {
                    tracing::debug!(peer = %owner, error = %e, "forwarding failed; trying the next replica");
                    self.health.mark_down(owner);
                }
            }
        }
        match newer_view_at {
            Some(peer) => Err(KvError::StaleView { peer }),
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
    ) -> Result<Coordinated, KvError> {
        match op {
            KvOp::Get => self.coordinate_read(view, partition, key, &context).await,
            KvOp::Put(value) => self.coordinate_write(view, partition, key, Some(value), context).await,
            KvOp::Delete => self.coordinate_write(view, partition, key, None, context).await,
        }
    }

    async fn coordinate_write(
        &self,
        view: &View,
        partition: PartitionId,
        key: &str,
        value: Option<bytes::Bytes>,
        context: VectorClock,
    ) -> Result<Coordinated, KvError> {
        let current = self.store.get(key)?;
        let was_live = current.as_ref().is_some_and(|r| !r.is_deleted());
        let depends_on = context.max_entry().max(current.as_ref().map_or(0, |r| r.version.ts));
        // During a view change the write also goes to the key's owners under the pending view
        // (dual-write), so nothing written while data moves is left behind.
        let pending = self.pending();
        let new_owners = pending.as_ref().map(|p| p.owners_of_key(key)).unwrap_or_default();
        let owners = view.members(partition);
        let others: Vec<_> = owners.iter().chain(new_owners.iter().filter(|n| !owners.contains(n))).filter(|m| *m != self.id()).collect();
        let in_flight = self.freshness.begin_write(&self.hlc, wall_micros(), depends_on, &others);
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
        let (local, _) = tokio::join!(
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
        Ok(Coordinated { partition, record: Some(record), changed_liveness, view_epoch: view.epoch() })
    }

    /// Sends records to each peer in parallel; returns how many acknowledged them.
    /// Sends this node's new write (stamped `ts`, already registered as being sent to each of
    /// `peers`) to each peer in parallel, telling each how far it is now known to be complete;
    /// returns how many stored it.
    pub(crate) async fn replicate(&self, peers: &[&String], ts: u64, records: Vec<(String, Record)>) -> usize {
        let records = Arc::new(records);
        let calls = peers.iter().map(|&peer| {
            let records = records.clone();
            async move {
                if self.health.is_down(peer) {
                    self.metrics.replication.skipped.inc();
                    self.freshness.sent(peer, ts, false);
                    return false;
                }
                let announced = self.freshness.announcement_for(peer, &self.hlc);
                let request = PeerRequest::Replicate {
                    records: records.as_ref().clone(),
                    from: self.id().to_owned(),
                    cap: announced.cap,
                    pending: announced.pending,
                };
                let ok = match self.peers.call(peer, &request, self.settings.replicate_timeout).await {
                    Ok(_) => {
                        self.metrics.replication.ok.inc();
                        true
                    }
                    Err(e) => {
                        tracing::debug!(peer = %peer, error = %e, "replication failed; anti-entropy will repair");
                        self.metrics.replication.failed.inc();
                        self.health.mark_down(peer);
                        false
                    }
                };
                self.freshness.sent(peer, ts, ok);
                ok
            }
        });
        join_all(calls).await.into_iter().filter(|&ok| ok).count()
    }

    async fn coordinate_read(&self, view: &View, partition: PartitionId, key: &str, context: &VectorClock) -> Result<Coordinated, KvError> {
        let local = self.store.get(key)?;
        let members = view.members(partition);
        match self.judge(view, local.as_ref(), context, members) {
            Verdict::Fresh => return Ok(Coordinated { partition, record: local, changed_liveness: false, view_epoch: view.epoch() }),
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
        // Ask every other replica, even ones recently marked down: this read cannot be answered
        // correctly without them.
        let fetches = members.iter().filter(|m| *m != self.id()).map(|peer| {
            let request = &request;
            async move {
                match self.peers.call(peer, request, self.settings.replicate_timeout).await {
                    Ok(PeerResponse::Fetched(r)) => Ok(r),
                    Ok(_) => Err(()),
                    Err(e) => {
                        tracing::debug!(peer = %peer, error = %e, "causal fetch failed");
                        self.health.mark_down(peer);
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
        Ok(Coordinated { partition, record: newest, changed_liveness: false, view_epoch: view.epoch() })
    }

    /// [`crate::freshness::judge`] with what this node knows.
    fn judge(&self, view: &View, local: Option<&Record>, context: &VectorClock, replicas: &[String]) -> Verdict {
        let covered = |node: &str| if node == self.id() { self.freshness.stable(&self.hlc) } else { self.freshness.synced_from(node) };
        let pending = self.pending();
        let known = |node: &str| view.contains(node) || pending.as_ref().is_some_and(|p| p.contains(node));
        let installed_at = self.view_installed_at();
        let former_until = if pending.is_some() { u64::MAX } else { installed_at.saturating_add(FORMER_REPLICA_MARGIN_MICROS) };
        judge(local, context, &Knowledge { replicas, known: &known, covered: &covered, installed_at, former_until, epoch: view.epoch() })
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

/// The epoch in an epoch-mismatch refusal ("... view epoch N ...").
fn parse_epoch(msg: &str) -> Option<u64> {
    msg.split("view epoch ").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}
