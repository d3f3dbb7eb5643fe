//! What a replica knows about its own completeness, so reads carrying a causal context can be
//! answered locally when that is safe, fetched when needed, and refused only when the data may
//! really be missing.
//!
//! - **In-flight writes**: a coordinator registers each write's timestamp (issued under the same
//!   lock) until the write is in its own store. Its *stable* timestamp is just below the oldest
//!   write still in flight: every write it coordinated at or below it is in its store.
//! - **Sending ledgers** (coordinator side, per peer): the writes being sent to that peer
//!   (registered together with the timestamp, so no write can slip between), and the oldest one
//!   that failed to reach it and was not yet repaired by anti-entropy.
//! - **Announcements**: every replicated write carries `cap` and `pending`: every write of the
//!   sender with a timestamp up to `cap` has reached the receiver, except those in `pending`
//!   (still being sent). Failures hold `cap` below them.
//! - **Coverage** (receiver side, per sender): the highest `cap` whose pending writes have all
//!   arrived, or the sender's stable time at the end of an anti-entropy round. The receiver holds
//!   every write that sender coordinated up to its coverage.
//! - **View install time**: context entries of nodes that are no longer replicas of a key's
//!   partition may stand for writes made to the key before a view change; they count until a
//!   margin after this node installed its current view.
//!
//! The decision itself is [`may_lack`], a pure function.

use crate::causal::{EPOCH_ENTRY, Hlc, VectorClock};
use crate::store::Record;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;

/// How long after installing a view entries of former replicas keep counting (µs). Generous next
/// to clock skew and the time a commit takes to reach every node.
pub const FORMER_REPLICA_MARGIN_MICROS: u64 = 10_000_000;
/// Most pending writes announced in one message; beyond it `cap` drops below them instead.
const MAX_ANNOUNCED: usize = 64;
/// Announcements a receiver keeps waiting on per sender.
const MAX_WAITING: usize = 64;

/// A coordinator's record of its replication to one peer.
struct PeerLedger {
    /// Timestamps of this node's writes being sent to the peer (ts -> count).
    sending: BTreeMap<u64, usize>,
    /// Nothing from here on is vouched for: the oldest of this node's writes that failed to reach
    /// the peer since it was last repaired (or a bound below it).
    failed_from: Option<u64>,
    /// The newest write that ever failed to reach the peer: a repair up to a point below it leaves
    /// failures above that point, which must stay unvouched.
    last_failed: Option<u64>,
}

impl Default for PeerLedger {
    /// Until a first anti-entropy round with the peer, nothing is vouched for: this node may have
    /// written things (before a restart, say) that never reached it.
    fn default() -> Self {
        PeerLedger { sending: BTreeMap::new(), failed_from: Some(0), last_failed: None }
    }
}

impl PeerLedger {
    fn failed(&mut self, ts: u64) {
        self.failed_from = Some(self.failed_from.map_or(ts, |f| f.min(ts)));
        self.last_failed = Some(self.last_failed.map_or(ts, |l| l.max(ts)));
    }

    /// The peer holds everything this node had at `stable`: failures up to it are repaired. A
    /// failure above it stays unvouched; which one is not kept, so everything above `stable` is
    /// (a later repair clears it).
    fn repaired(&mut self, stable: u64) {
        if self.failed_from.is_some_and(|f| f <= stable) {
            self.failed_from = self.last_failed.filter(|l| *l > stable).map(|_| stable.saturating_add(1));
        }
    }
}

/// What a receiver knows it holds of one sender's writes.
#[derive(Default)]
struct Coverage {
    covered: u64,
    /// Timestamps of the sender's writes received above `covered`.
    received: BTreeSet<u64>,
    /// Announcements still waiting for some of their pending writes: (cap, missing).
    waiting: VecDeque<(u64, BTreeSet<u64>)>,
}

/// What a replicated write tells its receiver (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Announcement {
    pub cap: u64,
    pub pending: Vec<u64>,
}

#[derive(Default)]
pub struct Freshness {
    /// Timestamps of writes this node coordinates that are not yet in its store (ts -> count).
    /// Lock order: `in_flight`, then `ledgers`. `std` mutexes, never held across `.await`.
    in_flight: Mutex<BTreeMap<u64, usize>>,
    /// Per peer, the state of this node's writes towards it.
    ledgers: Mutex<HashMap<String, PeerLedger>>,
    /// Per sender, how far this node is known to hold its writes.
    coverage: Mutex<HashMap<String, Coverage>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn count_down(map: &mut BTreeMap<u64, usize>, ts: u64) {
    if let Some(n) = map.get_mut(&ts) {
        *n -= 1;
        if *n == 0 {
            map.remove(&ts);
        }
    }
}

impl Freshness {
    /// Issues a write timestamp from `hlc`, registering it as in flight (until the returned guard
    /// is dropped, also when the request is cancelled) and as being sent to each of `peers`.
    pub fn begin_write<'a>(&'a self, hlc: &Hlc, wall: u64, depends_on: u64, peers: &[&String]) -> InFlightWrite<'a> {
        let mut in_flight = lock(&self.in_flight);
        let mut ledgers = lock(&self.ledgers);
        let ts = hlc.tick(wall, depends_on);
        *in_flight.entry(ts).or_insert(0) += 1;
        for peer in peers {
            *ledgers.entry((*peer).clone()).or_default().sending.entry(ts).or_insert(0) += 1;
        }
        InFlightWrite { freshness: self, ts }
    }

    fn end_write(&self, ts: u64) {
        count_down(&mut lock(&self.in_flight), ts);
    }

    /// Every write this node coordinated with a timestamp at or below this is in its store.
    pub fn stable(&self, hlc: &Hlc) -> u64 {
        let in_flight = lock(&self.in_flight);
        match in_flight.keys().next() {
            Some(oldest) => oldest.saturating_sub(1),
            None => hlc.peek(),
        }
    }

    /// The send of `ts` to `peer` ended; `ok` when the peer stored it.
    pub fn sent(&self, peer: &str, ts: u64, ok: bool) {
        let mut ledgers = lock(&self.ledgers);
        let ledger = ledgers.entry(peer.to_owned()).or_default();
        count_down(&mut ledger.sending, ts);
        if !ok {
            ledger.failed(ts);
        }
    }

    /// What to tell `peer` with the next replicated write.
    pub fn announcement_for(&self, peer: &str, hlc: &Hlc) -> Announcement {
        let _in_flight = lock(&self.in_flight); // no write registers while we look
        let ledgers = lock(&self.ledgers);
        let Some(ledger) = ledgers.get(peer) else { return Announcement::default() };
        let mut cap = hlc.peek();
        if let Some(failed) = ledger.failed_from {
            cap = cap.min(failed.saturating_sub(1));
        }
        let pending: Vec<u64> = ledger.sending.keys().copied().take_while(|&t| t <= cap).collect();
        if pending.len() > MAX_ANNOUNCED {
            let first = pending[0];
            return Announcement { cap: cap.min(first.saturating_sub(1)), pending: Vec::new() };
        }
        Announcement { cap, pending }
    }

    /// Anti-entropy made `peer` hold everything this node had at `stable`: failures up to it are
    /// repaired.
    pub fn repaired(&self, peer: &str, stable: u64) {
        lock(&self.ledgers).entry(peer.to_owned()).or_default().repaired(stable);
    }

    /// Receiver side: `from` sent writes stamped `received` (now stored) with `announcement`.
    pub fn received(&self, from: &str, received: &[u64], announcement: &Announcement) {
        let mut all = lock(&self.coverage);
        let c = all.entry(from.to_owned()).or_default();
        for &ts in received {
            if ts > c.covered {
                c.received.insert(ts);
            }
        }
        let missing: BTreeSet<u64> =
            announcement.pending.iter().copied().filter(|t| *t > c.covered && !c.received.contains(t)).collect();
        c.waiting.push_back((announcement.cap, missing));
        for (_, missing) in c.waiting.iter_mut() {
            missing.retain(|t| !c.received.contains(t));
        }
        let best = c.waiting.iter().filter(|(_, m)| m.is_empty()).map(|(cap, _)| *cap).max();
        if let Some(cap) = best {
            c.covered = c.covered.max(cap);
        }
        let covered = c.covered;
        c.waiting.retain(|(cap, m)| !m.is_empty() && *cap > covered);
        while c.waiting.len() > MAX_WAITING {
            c.waiting.pop_front();
        }
        c.received.retain(|t| *t > covered);
    }

    /// Records that this node holds everything `peer` coordinated up to `ts`.
    pub fn synced(&self, peer: &str, ts: u64) {
        let mut all = lock(&self.coverage);
        let c = all.entry(peer.to_owned()).or_default();
        c.covered = c.covered.max(ts);
    }

    /// How far this node holds `peer`'s writes.
    pub fn synced_from(&self, peer: &str) -> u64 {
        lock(&self.coverage).get(peer).map_or(0, |c| c.covered)
    }

    /// Forgets everything known about peers: after a view change a node owns other slots, and what
    /// held for the old ones says nothing about the new ones until anti-entropy runs again.
    pub fn forget_peers(&self) {
        lock(&self.coverage).clear();
        for ledger in lock(&self.ledgers).values_mut() {
            ledger.failed_from = Some(0);
        }
    }
}

/// Sends of one write registered with `begin_write`. Normally each ends with [`Freshness::sent`];
/// if the request is cancelled first, dropping this records the unfinished ones as failed (so a
/// send can never stay "under way" forever and hold coverage back).
pub struct SendGuard<'a> {
    freshness: &'a Freshness,
    ts: u64,
    peers: Vec<String>,
}

impl Freshness {
    pub fn send_guard(&self, ts: u64, peers: &[&String]) -> SendGuard<'_> {
        SendGuard { freshness: self, ts, peers: peers.iter().map(|p| (*p).clone()).collect() }
    }
}

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        let mut ledgers = lock(&self.freshness.ledgers);
        for peer in &self.peers {
            if let Some(ledger) = ledgers.get_mut(peer)
                && ledger.sending.contains_key(&self.ts)
            {
                count_down(&mut ledger.sending, self.ts);
                ledger.failed(self.ts);
            }
        }
    }
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

/// What a replica should do with a read that carries a causal context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Its local version already reflects everything the context depends on.
    Fresh,
    /// It may lack a write the context depends on: ask the other replicas.
    Fetch,
    /// The context names a node this replica's view does not know, writing after the view was
    /// installed: this replica's view is out of date (it missed a view change).
    Behind,
}

/// What this node knows, for [`judge`].
pub struct Knowledge<'a> {
    /// The key's replicas now.
    pub replicas: &'a [String],
    /// Whether a node is in this node's view at all.
    pub known: &'a dyn Fn(&str) -> bool,
    /// A timestamp up to which this node holds every write a replica coordinated (its own stable
    /// time for itself, coverage for peers).
    pub covered: &'a dyn Fn(&str) -> u64,
    /// When this node installed its view (HLC).
    pub installed_at: u64,
    /// Entries of non-replicas count up to this: writes made before a view change moved the key.
    pub former_until: u64,
    /// This node's view epoch: a context from a newer epoch means this node missed a change.
    pub epoch: u64,
}

/// Judges a read of a key whose local version is `local` against the client's `context`.
///
/// Every entry is an HLC timestamp and a write's timestamp is above every entry of its own clock
/// except its writer's, which equals it; so an entry not above the local version (or equal to it
/// under the same writer) is already reflected locally.
pub fn judge(local: Option<&Record>, context: &VectorClock, k: &Knowledge<'_>) -> Verdict {
    if context.get(EPOCH_ENTRY) > k.epoch {
        return Verdict::Behind;
    }
    let (ts, writer) = local.map_or((0, ""), |r| (r.version.ts, r.version.writer.as_str()));
    let mut verdict = Verdict::Fresh;
    for (node, seen) in context.iter().filter(|(n, _)| *n != EPOCH_ENTRY) {
        if seen < ts || (seen == ts && node == writer) {
            continue;
        }
        if k.replicas.iter().any(|r| r == node) {
            if seen > (k.covered)(node) {
                verdict = Verdict::Fetch;
            }
        } else if !(k.known)(node) && seen > k.installed_at {
            return Verdict::Behind;
        } else if seen <= k.former_until {
            verdict = Verdict::Fetch;
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causal::Version;

    fn rec(ts: u64, writer: &str) -> Record {
        Record { version: Version { ts, writer: writer.into() }, clock: VectorClock::new(), value: None }
    }

    #[test]
    fn local_versions_synced_peers_former_replicas_and_unknown_nodes() {
        let replicas = vec!["a".to_string(), "b".to_string()];
        let known = |n: &str| ["a", "b", "old"].contains(&n);
        static NOTHING: fn(&str) -> u64 = |_| 0;
        let nothing = &NOTHING;
        let k = |covered: &'static fn(&str) -> u64, installed_at, former_until| Knowledge {
            replicas: &replicas,
            known: &known,
            covered,
            installed_at,
            former_until,
            epoch: 3,
        };
        let base = k(nothing, 0, 0);
        let mut ctx = VectorClock::new();
        assert_eq!(judge(None, &ctx, &base), Verdict::Fresh, "empty context never needs a fetch");
        ctx.observe("a", 10);
        assert_eq!(judge(None, &ctx, &base), Verdict::Fetch);
        assert_eq!(judge(Some(&rec(10, "a")), &ctx, &base), Verdict::Fresh, "it is that write");
        assert_eq!(judge(Some(&rec(10, "b")), &ctx, &base), Verdict::Fetch, "same ts, other writer");
        assert_eq!(judge(Some(&rec(11, "b")), &ctx, &base), Verdict::Fresh);
        static UP_TO_10: fn(&str) -> u64 = |n| if n == "a" { 10 } else { 0 };
        assert_eq!(judge(Some(&rec(5, "b")), &ctx, &k(&UP_TO_10, 0, 0)), Verdict::Fresh, "covered from a up to 10");
        let mut ctx = VectorClock::new();
        ctx.observe("old", 99);
        assert_eq!(
            judge(Some(&rec(11, "b")), &ctx, &k(nothing, 40, 50)),
            Verdict::Fresh,
            "old's write came after the view change: another partition"
        );
        assert_eq!(
            judge(Some(&rec(11, "b")), &ctx, &k(nothing, 40, 100)),
            Verdict::Fetch,
            "old may have written this key before the change"
        );
        let mut ctx = VectorClock::new();
        ctx.observe("stranger", 99);
        assert_eq!(
            judge(Some(&rec(11, "b")), &ctx, &k(nothing, 40, 50)),
            Verdict::Behind,
            "a node we do not know wrote after our view: we missed a change"
        );
        assert_eq!(
            judge(Some(&rec(11, "b")), &ctx, &k(nothing, 120, 200)),
            Verdict::Fetch,
            "it wrote before our view: a removed node"
        );
        let mut ctx = VectorClock::new();
        ctx.observe(EPOCH_ENTRY, 3);
        assert_eq!(judge(None, &ctx, &k(nothing, 0, 0)), Verdict::Fresh, "same epoch: the entry is not a node");
        ctx.observe(EPOCH_ENTRY, 4);
        assert_eq!(
            judge(Some(&rec(11, "b")), &ctx, &k(nothing, 0, 0)),
            Verdict::Behind,
            "served under a newer view elsewhere: we missed a change"
        );
    }

    #[test]
    fn stable_stays_below_writes_in_flight() {
        let hlc = Hlc::starting_after(100);
        let f = Freshness::default();
        let a = f.begin_write(&hlc, 0, 0, &[]);
        let b = f.begin_write(&hlc, 0, 0, &[]);
        let (ta, tb) = (a.ts, b.ts);
        assert_eq!(f.stable(&hlc), ta - 1);
        drop(a);
        assert_eq!(f.stable(&hlc), tb - 1);
        drop(b);
        assert_eq!(f.stable(&hlc), tb);
    }

    #[test]
    fn announcements_cover_what_arrived_and_stop_at_failures() {
        let hlc = Hlc::starting_after(100);
        let (x, y) = (Freshness::default(), Freshness::default());
        let peer = "y".to_string();
        assert_eq!(x.announcement_for("y", &hlc), Announcement::default(), "nothing vouched for before a first repair");
        x.repaired("y", 0);
        // Two concurrent writes; the second's message arrives first.
        let w1 = x.begin_write(&hlc, 0, 0, &[&peer]);
        let w2 = x.begin_write(&hlc, 0, 0, &[&peer]);
        let a2 = x.announcement_for("y", &hlc);
        assert_eq!(a2.pending, vec![w1.ts, w2.ts]);
        y.received("x", &[w2.ts], &a2);
        assert_eq!(y.synced_from("x"), 0, "w1 is still missing");
        let a1 = x.announcement_for("y", &hlc);
        y.received("x", &[w1.ts], &a1);
        assert_eq!(y.synced_from("x"), a2.cap.max(a1.cap), "both arrived: covered up to the caps");
        x.sent("y", w1.ts, true);
        x.sent("y", w2.ts, true);
        // A failed send holds the cap below it until anti-entropy repairs it.
        let w3 = x.begin_write(&hlc, 0, 0, &[&peer]);
        x.sent("y", w3.ts, false);
        let a = x.announcement_for("y", &hlc);
        assert!(a.cap < w3.ts);
        x.repaired("y", w3.ts);
        assert!(x.announcement_for("y", &hlc).cap >= w3.ts);
    }

    /// Regression (found by the simulator, seed 3767): a peer cut off for a while missed two of
    /// this node's writes; an anti-entropy round that repaired up to a point between them cleared
    /// both failures, so the next announcement vouched for the second write, which the peer never
    /// got, and the peer answered a causal read from its older copy. A repair now clears only the
    /// failures at or below the point it repaired.
    #[test]
    fn a_repair_below_a_later_failure_keeps_the_later_one_unvouched() {
        let hlc = Hlc::starting_after(100);
        let x = Freshness::default();
        let peer = "y".to_string();
        x.repaired("y", 0);
        let early = x.begin_write(&hlc, 0, 0, &[&peer]);
        x.sent("y", early.ts, false);
        let late = x.begin_write(&hlc, 0, 0, &[&peer]);
        x.sent("y", late.ts, false);
        // A round that started while `late` was in flight repairs up to just below it.
        x.repaired("y", late.ts - 1);
        let next = x.begin_write(&hlc, 0, 0, &[&peer]);
        assert!(x.announcement_for("y", &hlc).cap < late.ts, "the late failure is not vouched for");
        x.sent("y", next.ts, true);
        // A later round covering it clears it.
        x.repaired("y", next.ts);
        assert!(x.announcement_for("y", &hlc).cap >= next.ts);
    }
}
