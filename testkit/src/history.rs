//! Operation histories and the checker that judges them. Pure: no I/O, no clocks.
//!
//! Every client runs one operation at a time and records when it was invoked and when it
//! completed (on one shared clock), what it did and how it ended. Every value written is unique
//! (`c<client>-<seq>`), so a value read names the one write that produced it.
//!
//! A write that got a 2xx is *acknowledged*; any other ending (error status, timeout, connection
//! failure) leaves its outcome *unknown*: it may or may not have been applied.
//!
//! The store orders versions by hybrid-logical timestamps drawn from the nodes' wall clocks, so
//! for two writes that do not overlap in real time its newest-wins order is their real-time order
//! *when the clocks agree*. Nodes' clocks differ by up to a bound (`uncertainty`, µs: 0 when every
//! node runs on one machine's clock, twice the largest skew in the simulator); a write *precedes*
//! another only if it ended more than `uncertainty` before the other began. Writes closer than
//! that are concurrent for the checker, as they are for the store, which orders them by
//! timestamp either way. The checks:
//! - **No lost writes**: after healing, the value every node returns for a key was written by a
//!   write (acknowledged or unknown) that no acknowledged write *began after the end of* (by more
//!   than `uncertainty`): never an older value, never a value nobody wrote, never a resurrected
//!   delete.
//! - **Causal**: a client that has seen a write (its own, or one it read) never afterwards reads,
//!   with its causal context, a write that ended (by more than `uncertainty`) before that one
//!   began.

use std::collections::{BTreeMap, HashMap};

/// What an operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Put(String),
    Delete,
    Get,
}

/// How it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged; for a get, the value read (`None`: absent).
    Ok(Option<String>),
    /// Failed or timed out: for a write, it may or may not have taken effect.
    Unknown,
}

/// One operation. Times are microseconds since the run started.
#[derive(Clone, Debug)]
pub struct Op {
    pub client: usize,
    pub key: String,
    pub kind: Kind,
    pub invoke: u64,
    pub complete: u64,
    pub outcome: Outcome,
}

impl Op {
    fn is_write(&self) -> bool {
        !matches!(self.kind, Kind::Get)
    }

    fn acked(&self) -> bool {
        matches!(self.outcome, Outcome::Ok(_))
    }

    /// The state this write leaves the key in (`None`: deleted).
    fn written(&self) -> Option<Option<&str>> {
        match &self.kind {
            Kind::Put(v) => Some(Some(v)),
            Kind::Delete => Some(None),
            Kind::Get => None,
        }
    }
}

/// A broken guarantee, in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: &'static str,
    pub detail: String,
}

/// The writes of one key, for lookups.
struct KeyWrites<'a> {
    writes: Vec<&'a Op>,
    /// Invoke time of the latest-starting acknowledged write.
    last_acked_invoke: Option<u64>,
}

impl<'a> KeyWrites<'a> {
    fn new(writes: Vec<&'a Op>) -> Self {
        let last_acked_invoke = writes.iter().filter(|w| w.acked()).map(|w| w.invoke).max();
        KeyWrites { writes, last_acked_invoke }
    }

    /// Writes that could have produced `state` (a value, or `None` for absent).
    fn producers(&self, state: Option<&str>) -> impl Iterator<Item = &&'a Op> {
        self.writes.iter().filter(move |w| w.written() == Some(state))
    }

    /// Whether `state` may be a key's final state: produced by a write that no acknowledged write
    /// began after the end of (an unknown write "ends" at the end of the run).
    fn may_be_final(&self, state: Option<&str>, end_of_run: u64, uncertainty: u64) -> bool {
        let survives =
            |complete: u64| self.last_acked_invoke.is_none_or(|last| last <= complete.saturating_add(uncertainty));
        if state.is_none() && self.writes.iter().all(|w| !w.acked()) {
            return true; // never (knowingly) written
        }
        self.producers(state).any(|w| survives(if w.acked() { w.complete } else { end_of_run }))
    }
}

fn writes_by_key(history: &[Op]) -> HashMap<&str, KeyWrites<'_>> {
    let mut by_key: HashMap<&str, Vec<&Op>> = HashMap::new();
    for op in history.iter().filter(|o| o.is_write()) {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    by_key.into_iter().map(|(k, w)| (k, KeyWrites::new(w))).collect()
}

/// Checks the state every node reports after healing: `finals[key]` holds one entry per node.
/// `uncertainty`: how far apart the nodes' clocks may be (µs; see the module docs).
pub fn check_final(
    history: &[Op],
    finals: &BTreeMap<String, Vec<(String, Option<String>)>>,
    uncertainty: u64,
) -> Vec<Violation> {
    let end_of_run = history.iter().map(|o| o.complete).max().unwrap_or(0);
    let by_key = writes_by_key(history);
    let mut violations = Vec::new();
    for (key, per_node) in finals {
        let empty = KeyWrites::new(Vec::new());
        let writes = by_key.get(key.as_str()).unwrap_or(&empty);
        for (node, state) in per_node {
            if !writes.may_be_final(state.as_deref(), end_of_run, uncertainty) {
                let last = writes.writes.iter().filter(|w| w.acked()).max_by_key(|w| w.invoke);
                violations.push(Violation {
                    kind: "lost-write",
                    detail: format!(
                        "{key} on {node} is {state:?}; the last acknowledged write was {:?}",
                        last.map(|w| &w.kind)
                    ),
                });
            }
        }
    }
    violations
}

/// Checks every client's reads against what that client had already seen. `uncertainty`: how far
/// apart the nodes' clocks may be (µs; see the module docs).
pub fn check_causal(history: &[Op], uncertainty: u64) -> Vec<Violation> {
    let by_key = writes_by_key(history);
    let mut violations = Vec::new();
    // (client, key) -> the newest write the client knows of: (invoke, description)
    let mut seen: HashMap<(usize, &str), (u64, String)> = HashMap::new();
    let mut ops: Vec<&Op> = history.iter().collect();
    ops.sort_by_key(|o| (o.client, o.invoke));
    for op in ops {
        let slot = (op.client, op.key.as_str());
        match (&op.kind, &op.outcome) {
            (Kind::Put(_) | Kind::Delete, Outcome::Ok(_)) => {
                seen.insert(slot, (op.invoke, format!("its own {:?}", op.kind)));
            }
            (Kind::Get, Outcome::Ok(state)) => {
                let Some(writes) = by_key.get(op.key.as_str()) else {
                    if state.is_some() {
                        violations.push(Violation {
                            kind: "phantom",
                            detail: format!("{} read {state:?}, which nobody wrote", op.key),
                        });
                    }
                    continue;
                };
                // A read can only observe writes invoked before it completed.
                let producers: Vec<&&Op> =
                    writes.producers(state.as_deref()).filter(|w| w.invoke < op.complete).collect();
                if state.is_some() && producers.is_empty() {
                    violations.push(Violation {
                        kind: "phantom",
                        detail: format!("{} read {state:?}, which nobody wrote", op.key),
                    });
                    continue;
                }
                // Judged by the newest possible producer (absent may also be "never written"), but
                // remembered by the oldest: a read of an ambiguous state (absent, after several
                // deletes) proves only that the client saw one of them.
                let newest_end = producers.iter().map(|w| if w.acked() { w.complete } else { u64::MAX }).max();
                let oldest_invoke = producers.iter().map(|w| w.invoke).min().unwrap_or(0);
                if let Some((floor, what)) = seen.get(&slot) {
                    let end = newest_end.unwrap_or(0);
                    if end.saturating_add(uncertainty) < *floor {
                        violations.push(Violation {
                            kind: "causal",
                            detail: format!(
                                "client {} read {} = {state:?} (written before {what} began)",
                                op.client, op.key
                            ),
                        });
                    }
                }
                if producers.iter().any(|w| w.acked()) || state.is_some() {
                    let entry = seen.entry(slot).or_insert((0, String::new()));
                    if oldest_invoke > entry.0 && newest_end.is_some_and(|e| e != u64::MAX) {
                        *entry = (oldest_invoke, format!("the write of {state:?} it read"));
                    }
                }
            }
            _ => {}
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, key: &str, kind: Kind, invoke: u64, complete: u64, outcome: Outcome) -> Op {
        Op { client, key: key.into(), kind, invoke, complete, outcome }
    }

    fn put(c: usize, v: &str, t0: u64, t1: u64, ok: bool) -> Op {
        op(c, "k", Kind::Put(v.into()), t0, t1, if ok { Outcome::Ok(None) } else { Outcome::Unknown })
    }

    fn get(c: usize, v: Option<&str>, t0: u64, t1: u64) -> Op {
        op(c, "k", Kind::Get, t0, t1, Outcome::Ok(v.map(str::to_owned)))
    }

    fn finals(v: Option<&str>) -> BTreeMap<String, Vec<(String, Option<String>)>> {
        BTreeMap::from([("k".to_owned(), vec![("n1".to_owned(), v.map(str::to_owned))])])
    }

    #[test]
    fn the_last_acknowledged_write_or_a_concurrent_one_may_win() {
        let h = vec![put(0, "a", 0, 10, true), put(1, "b", 20, 30, true), put(2, "c", 25, 40, true)];
        assert!(check_final(&h, &finals(Some("b")), 0).is_empty(), "b and c overlap: either may win");
        assert!(check_final(&h, &finals(Some("c")), 0).is_empty());
        let lost = check_final(&h, &finals(Some("a")), 0);
        assert_eq!(lost.len(), 1, "a ended before b began: a winning means b was lost");
        assert_eq!(check_final(&h, &finals(None), 0).len(), 1, "nothing deleted it");
        assert_eq!(check_final(&h, &finals(Some("zzz")), 0).len(), 1, "nobody wrote zzz");
    }

    #[test]
    fn unknown_writes_may_or_may_not_have_happened() {
        let h = vec![put(0, "a", 0, 10, true), put(1, "x", 20, 30, false)];
        assert!(check_final(&h, &finals(Some("a")), 0).is_empty());
        assert!(check_final(&h, &finals(Some("x")), 0).is_empty());
        let h = vec![put(1, "x", 0, 5, false), put(0, "a", 10, 20, true)];
        assert!(check_final(&h, &finals(Some("x")), 0).is_empty(), "an unknown write may land late");
    }

    #[test]
    fn a_resurrected_delete_is_caught() {
        let h = vec![put(0, "a", 0, 10, true), op(0, "k", Kind::Delete, 20, 30, Outcome::Ok(None))];
        assert!(check_final(&h, &finals(None), 0).is_empty());
        assert_eq!(check_final(&h, &finals(Some("a")), 0).len(), 1);
    }

    #[test]
    fn causal_reads_never_go_back() {
        // Client 0 writes b after a; reading a afterwards is a violation, reading b or c is fine.
        let base = vec![put(0, "a", 0, 10, true), put(0, "b", 20, 30, true), put(1, "c", 25, 50, true)];
        for (read, bad) in [(Some("b"), false), (Some("c"), false), (Some("a"), true), (None, true)] {
            let mut h = base.clone();
            h.push(get(0, read, 60, 70));
            assert_eq!(!check_causal(&h, 0).is_empty(), bad, "reading {read:?}");
        }
        // What a client read also counts: after reading c, reading b (which ended before c began? no,
        // b ended at 30 after c began at 25: concurrent) is fine, reading a is not.
        let mut h = base.clone();
        h.push(get(2, Some("c"), 60, 70));
        h.push(get(2, Some("a"), 80, 90));
        assert_eq!(check_causal(&h, 0).len(), 1);
    }

    #[test]
    fn reading_absent_is_judged_by_deletes_that_could_have_been_seen() {
        // Client 0 deletes, then writes a; another client's later delete must not make an
        // earlier read of "absent" look newer than it was.
        let h = vec![
            op(0, "k", Kind::Delete, 0, 10, Outcome::Ok(None)),
            put(1, "a", 20, 30, true),
            get(2, None, 15, 18),
            get(2, Some("a"), 40, 50),
            op(1, "k", Kind::Delete, 100, 110, Outcome::Ok(None)),
        ];
        assert!(check_causal(&h, 0).is_empty(), "{:?}", check_causal(&h, 0));
    }

    #[test]
    fn a_delete_concurrent_with_a_read_of_absent_is_not_what_it_read() {
        // Found by the simulator (seed 115): client 3 reads "absent" (its own delete) while client
        // 0's delete is under way; c2-122 ended before client 0's delete began, so reading it next
        // is no step back: client 3 may have seen only its own, older delete.
        let h = vec![
            op(3, "k", Kind::Delete, 2020, 2026, Outcome::Ok(None)),
            put(2, "c2-122", 2036, 2041, true),
            get(3, None, 2026, 2047),
            op(0, "k", Kind::Delete, 2045, 2072, Outcome::Ok(None)),
            get(3, Some("c2-122"), 2066, 2070),
        ];
        assert!(check_causal(&h, 0).is_empty(), "{:?}", check_causal(&h, 0));
        // Whereas a value older than its own delete is a step back.
        let mut back = h.clone();
        back.insert(0, put(1, "old", 0, 10, true));
        back.push(get(3, Some("old"), 2080, 2090));
        assert_eq!(check_causal(&back, 0).len(), 1);
    }

    #[test]
    fn phantom_values_are_caught() {
        let h = vec![put(0, "a", 0, 10, true), get(1, Some("q"), 20, 30)];
        assert_eq!(check_causal(&h, 0)[0].kind, "phantom");
    }

    #[test]
    fn writes_closer_than_the_clocks_disagree_are_concurrent() {
        // b ends 10 ms before c begins: with clocks 20 ms apart the store may order either way.
        let h = vec![
            op(0, "k", Kind::Put("b".into()), 0, 100_000, Outcome::Ok(None)),
            op(1, "k", Kind::Put("c".into()), 110_000, 120_000, Outcome::Ok(None)),
            op(1, "k", Kind::Get, 130_000, 131_000, Outcome::Ok(Some("b".into()))),
        ];
        assert_eq!(check_causal(&h, 0).len(), 1, "on one clock, c's own client must not read b");
        assert!(check_causal(&h, 20_000).is_empty());
        let finals = BTreeMap::from([("k".to_owned(), vec![("n".to_owned(), Some("b".to_owned()))])]);
        assert_eq!(check_final(&h, &finals, 0).len(), 1);
        assert!(check_final(&h, &finals, 20_000).is_empty());
        // 30 ms apart is beyond it: still a violation.
        assert_eq!(check_causal(&h, 5_000).len(), 1);
    }
}
