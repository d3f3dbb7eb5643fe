//! What a replica knows about its own completeness, so reads carrying a causal context can be
//! answered locally when that is safe, fetched when needed, and refused only when the data may
//! really be missing.
//!
//! - **In-flight writes**: a coordinator registers each write's timestamp (issued under the same
//!   lock) until the write is in its own store. Its *stable* timestamp is just below the oldest
//!   write still in flight: every write it coordinated at or below it is in its store.
//! - **Synced-from**: when a replica finishes an anti-entropy round with a peer, it holds everything
//!   the peer held when the peer reported its stable timestamp — so every write that peer
//!   coordinated up to that timestamp. `synced_from[peer]` remembers the highest such timestamp.
//! - **View install time**: entries of nodes that are no longer replicas of a key's partition may
//!   stand for writes made to the key before a view change; they count until a margin after this
//!   node installed its current view.
//!
//! The decision itself is [`may_lack`], a pure function.

use crate::causal::{Hlc, VectorClock};
use crate::store::Record;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// How long after installing a view entries of former replicas keep counting (µs). Generous next
/// to clock skew and the time a commit takes to reach every node.
pub const FORMER_REPLICA_MARGIN_MICROS: u64 = 10_000_000;

/// A coordinator's record of its replication to one peer.
struct PeerLedger {
    /// Timestamps of this node's writes being sent to the peer (ts -> count).
    sending: BTreeMap<u64, usize>,
    /// The oldest of this node's writes that failed to reach the peer since it was last repaired.
    failed_from: Option<u64>,
}

impl Default for PeerLedger {
    /// Until a first anti-entropy round with the peer, nothing is vouched for: this node may have
    /// written things (before a restart, say) that never reached it.
    fn default() -> Self {
        PeerLedger { sending: BTreeMap::new(), failed_from: Some(0) }
    }
}

#[derive(Default)]
pub struct Freshness {
    /// Per peer, what of this node's writes it is known to hold. `std` mutex, never across `.await`.
    ledgers: Mutex<HashMap<String, PeerLedger>>,
    /// Timestamps of writes this node coordinates that are not yet in its store (ts -> count).
    /// `std` mutex: O(log n) under it, never held across `.await`; it is taken twice per write.
    in_flight: Mutex<BTreeMap<u64, usize>>,
    /// Peer -> every write it coordinated with a timestamp up to this is in this node's store.
    synced_from: Mutex<HashMap<String, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Freshness {
    /// Issues a write timestamp from `hlc` and registers it as in flight until the returned guard
    /// is dropped (also when the request is cancelled, so nothing stays in flight forever).
    pub fn begin_write<'a>(&'a self, hlc: &Hlc, wall: u64, depends_on: u64) -> InFlightWrite<'a> {
        let mut in_flight = lock(&self.in_flight);
        let ts = hlc.tick(wall, depends_on);
        *in_flight.entry(ts).or_insert(0) += 1;
        InFlightWrite { freshness: self, ts }
    }

    fn end_write(&self, ts: u64) {
        let mut in_flight = lock(&self.in_flight);
        if let Some(n) = in_flight.get_mut(&ts) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&ts);
            }
        }
    }

    /// Every write this node coordinated with a timestamp at or below this is in its store.
    pub fn stable(&self, hlc: &Hlc) -> u64 {
        let in_flight = lock(&self.in_flight);
        match in_flight.keys().next() {
            Some(oldest) => oldest.saturating_sub(1),
            None => hlc.peek(),
        }
    }

    /// A write of this node (stamped `ts`) is being sent to `peer`.
    pub fn sending(&self, peer: &str, ts: u64) {
        *lock(&self.ledgers).entry(peer.to_owned()).or_default().sending.entry(ts).or_insert(0) += 1;
    }

    /// The send of `ts` to `peer` ended; `ok` when the peer stored it.
    pub fn sent(&self, peer: &str, ts: u64, ok: bool) {
        let mut ledgers = lock(&self.ledgers);
        let ledger = ledgers.entry(peer.to_owned()).or_default();
        if let Some(n) = ledger.sending.get_mut(&ts) {
            *n -= 1;
            if *n == 0 {
                ledger.sending.remove(&ts);
            }
        }
        if !ok {
            ledger.failed_from = Some(ledger.failed_from.map_or(ts, |f| f.min(ts)));
        }
    }

    /// Anti-entropy made `peer` hold everything this node had at `stable`: failures up to it are
    /// repaired.
    pub fn repaired(&self, peer: &str, stable: u64) {
        let mut ledgers = lock(&self.ledgers);
        let ledger = ledgers.entry(peer.to_owned()).or_default();
        if ledger.failed_from.is_some_and(|f| f <= stable) {
            ledger.failed_from = None;
        }
    }

    /// A timestamp up to which `peer` holds every write this node coordinated: below this node's
    /// stable time, below every send still under way and below every unrepaired failure.
    pub fn floor_for(&self, peer: &str, hlc: &Hlc) -> u64 {
        let stable = self.stable(hlc);
        let ledgers = lock(&self.ledgers);
        let Some(ledger) = ledgers.get(peer) else { return 0 };
        let sending = ledger.sending.keys().next().map_or(u64::MAX, |t| t.saturating_sub(1));
        let failed = ledger.failed_from.map_or(u64::MAX, |t| t.saturating_sub(1));
        stable.min(sending).min(failed)
    }

    /// Records that this node now holds everything `peer` coordinated up to `ts`.
    pub fn synced(&self, peer: &str, ts: u64) {
        let mut s = lock(&self.synced_from);
        let e = s.entry(peer.to_owned()).or_insert(0);
        *e = (*e).max(ts);
    }

    pub fn synced_from(&self, peer: &str) -> u64 {
        lock(&self.synced_from).get(peer).copied().unwrap_or(0)
    }
}

/// Whether a replica holding `local` for a key may lack a write the client's `context` depends on.
///
/// - `replicas`: the key's partition now; `covered(m)`: a timestamp up to which this node is known
///   to hold every write `m` coordinated (its own stable timestamp for itself, `synced_from` for
///   peers).
/// - Entries of other nodes count while they are at or below `former_until` (they may be writes
///   from before a view change moved the key here); later ones are writes to other partitions.
///
/// Every entry is an HLC timestamp and a write's timestamp is above every entry of its own clock
/// except its writer's, which equals it; so an entry not above the local version (or equal to it
/// under the same writer) is already reflected locally.
pub fn may_lack(
    local: Option<&Record>,
    context: &VectorClock,
    replicas: &[String],
    covered: impl Fn(&str) -> u64,
    former_until: u64,
) -> bool {
    let (ts, writer) = local.map_or((0, ""), |r| (r.version.ts, r.version.writer.as_str()));
    context.iter().any(|(node, seen)| {
        let reflected = seen < ts || (seen == ts && (node == writer || seen == 0));
        if reflected {
            return false;
        }
        if replicas.iter().any(|r| r == node) { seen > covered(node) } else { seen <= former_until }
    })
}

/// A write registered as in flight; dropping it says the write is in the store (or failed).
pub struct InFlightWrite<'a> {
    freshness: &'a Freshness,
    pub ts: u64,
}

impl Drop for InFlightWrite<'_> {
    fn drop(&mut self) {
        self.freshness.end_write(self.ts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causal::Version;

    fn rec(ts: u64, writer: &str) -> Record {
        Record { version: Version { ts, writer: writer.into() }, clock: VectorClock::new(), value: None }
    }

    #[test]
    fn local_versions_synced_peers_and_former_replicas() {
        let replicas = vec!["a".to_string(), "b".to_string()];
        let nothing = |_: &str| 0;
        let mut ctx = VectorClock::new();
        assert!(!may_lack(None, &ctx, &replicas, nothing, 0), "empty context never needs a fetch");
        ctx.observe("a", 10);
        assert!(may_lack(None, &ctx, &replicas, nothing, 0));
        assert!(!may_lack(Some(&rec(10, "a")), &ctx, &replicas, nothing, 0), "it is that write");
        assert!(may_lack(Some(&rec(10, "b")), &ctx, &replicas, nothing, 0), "same ts, other writer");
        assert!(!may_lack(Some(&rec(11, "b")), &ctx, &replicas, nothing, 0));
        assert!(!may_lack(Some(&rec(5, "b")), &ctx, &replicas, |n| if n == "a" { 10 } else { 0 }, 0), "synced from a up to 10");
        let mut ctx = VectorClock::new();
        ctx.observe("z", 99);
        assert!(!may_lack(Some(&rec(11, "b")), &ctx, &replicas, nothing, 50), "z's write came after the view change: another partition");
        assert!(may_lack(Some(&rec(11, "b")), &ctx, &replicas, nothing, 100), "z may have written this key before the view change");
    }

    #[test]
    fn floors_stay_below_sends_under_way_and_failures() {
        let hlc = Hlc::starting_after(100);
        let f = Freshness::default();
        let w = f.begin_write(&hlc, 0, 0);
        let ts = w.ts;
        drop(w);
        assert_eq!(f.floor_for("p", &hlc), 0, "nothing is vouched for before a first repair");
        f.repaired("p", 0);
        assert_eq!(f.floor_for("p", &hlc), ts);
        f.sending("p", ts);
        assert_eq!(f.floor_for("p", &hlc), ts - 1);
        f.sent("p", ts, false);
        assert_eq!(f.floor_for("p", &hlc), ts - 1, "a failed send holds the floor down");
        f.repaired("p", ts - 1);
        assert_eq!(f.floor_for("p", &hlc), ts - 1, "repairs older than the failure do not clear it");
        f.repaired("p", ts);
        assert_eq!(f.floor_for("p", &hlc), ts);
    }

    #[test]
    fn stable_stays_below_writes_in_flight() {
        let hlc = Hlc::starting_after(100);
        let f = Freshness::default();
        let a = f.begin_write(&hlc, 0, 0);
        let b = f.begin_write(&hlc, 0, 0);
        let (ta, tb) = (a.ts, b.ts);
        assert_eq!(f.stable(&hlc), ta - 1);
        drop(a);
        assert_eq!(f.stable(&hlc), tb - 1);
        drop(b);
        assert_eq!(f.stable(&hlc), tb);
    }
}
