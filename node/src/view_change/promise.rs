//! Promises (pure): the first phase of a view change. A node promises the next epoch to one
//! proposer at a time, so of two concurrent changes only one can begin; a promise lapses after
//! [`PROMISE_TTL`] without progress (its proposer died), so a dead proposer blocks nobody for long.
//!
//! Time is passed in, so the rules are unit-tested without waiting.

use crate::protocol::Refusal;
use std::time::Duration;
use tokio::time::Instant;

/// A promise lapses if its proposer makes no progress for this long (the proposer died).
pub const PROMISE_TTL: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq)]
struct Promise {
    epoch: u64,
    proposer: String,
    /// When the proposer last made progress (prepared or began).
    at: Instant,
}

/// The promise a node holds for the next epoch, if any.
#[derive(Clone, Debug, Default)]
pub struct Promises {
    current: Option<Promise>,
}

impl Promises {
    fn live(&self, now: Instant) -> Option<&Promise> {
        self.current.as_ref().filter(|p| now.saturating_duration_since(p.at) < PROMISE_TTL)
    }

    /// Phase 1: promise `epoch` to `proposer`, unless a live promise of this epoch or a later one
    /// belongs to someone else.
    pub fn prepare(&mut self, epoch: u64, proposer: &str, now: Instant) -> Result<(), Refusal> {
        if let Some(p) = self.live(now)
            && p.epoch >= epoch
            && p.proposer != proposer
        {
            return Err(Refusal::PromisedTo { epoch: p.epoch, proposer: p.proposer.clone() });
        }
        self.current = Some(Promise { epoch, proposer: proposer.to_owned(), at: now });
        Ok(())
    }

    /// Releases the promise of `epoch` if `proposer` holds it (its change failed to start).
    pub fn abort(&mut self, epoch: u64, proposer: &str) {
        if self.current.as_ref().is_some_and(|p| p.epoch == epoch && p.proposer == proposer) {
            self.current = None;
        }
    }

    /// Phase 2 and later: `proposer` makes progress on `epoch`. Refreshes its promise, or takes
    /// one if there is none (or only a lapsed one); refused if someone else holds a live one.
    pub fn progress(&mut self, epoch: u64, proposer: &str, now: Instant) -> Result<(), Refusal> {
        match &mut self.current {
            Some(p) if p.epoch == epoch && p.proposer == proposer => {
                p.at = now;
                Ok(())
            }
            Some(p) if now.saturating_duration_since(p.at) < PROMISE_TTL => {
                Err(Refusal::PromisedTo { epoch: p.epoch, proposer: p.proposer.clone() })
            }
            _ => {
                self.current = Some(Promise { epoch, proposer: proposer.to_owned(), at: now });
                Ok(())
            }
        }
    }

    /// The change committed here: nothing is promised any more.
    pub fn clear(&mut self) {
        self.current = None;
    }

    /// The live promise's epoch and proposer, if any.
    pub fn holder(&self, now: Instant) -> Option<(u64, &str)> {
        self.live(now).map(|p| (p.epoch, p.proposer.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_proposer_per_epoch_until_its_promise_lapses() {
        let now = Instant::now();
        let mut p = Promises::default();
        p.prepare(5, "a", now).unwrap();
        p.prepare(5, "a", now).unwrap();
        assert_eq!(p.prepare(5, "b", now), Err(Refusal::PromisedTo { epoch: 5, proposer: "a".into() }));
        assert_eq!(p.prepare(4, "b", now), Err(Refusal::PromisedTo { epoch: 5, proposer: "a".into() }));
        p.prepare(6, "b", now).unwrap();
        assert_eq!(p.holder(now), Some((6, "b")), "a later epoch supersedes");
        assert_eq!(p.progress(6, "a", now), Err(Refusal::PromisedTo { epoch: 6, proposer: "b".into() }));
        let later = now + PROMISE_TTL;
        assert_eq!(p.holder(later), None, "lapsed");
        p.progress(6, "a", later).unwrap();
        assert_eq!(p.holder(later), Some((6, "a")), "a lapsed promise is taken over");
    }

    #[test]
    fn progress_keeps_a_promise_alive_and_abort_or_commit_release_it() {
        let now = Instant::now();
        let mut p = Promises::default();
        p.prepare(2, "a", now).unwrap();
        let mid = now + PROMISE_TTL / 2;
        p.progress(2, "a", mid).unwrap();
        assert_eq!(p.holder(now + PROMISE_TTL), Some((2, "a")), "refreshed at mid");
        p.abort(2, "b");
        assert!(p.holder(mid).is_some(), "only its proposer aborts it");
        p.abort(2, "a");
        assert_eq!(p.holder(mid), None);
        p.prepare(3, "c", mid).unwrap();
        p.clear();
        assert_eq!(p.holder(mid), None);
    }
}
