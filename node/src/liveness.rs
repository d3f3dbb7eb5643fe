//! Failure detection, kept apart from request latency: which peers are alive.
//!
//! Slowness is not death. A peer is declared dead only on evidence:
//! - **refused**: its host answered that nothing listens there (connection refused, or reset and
//!   closed without an answer): the process is gone. Checking again costs one round trip, so
//!   calls keep trying such a peer and notice at once when it is back;
//! - **unreachable**: connecting timed out (nothing answers at that address at all);
//! - **silent**: nothing was heard from it — no heartbeat answer and no answer to any other call —
//!   for so long that a phi-accrual detector (Hayashibara et al., as in Akka and Cassandra) over
//!   its heartbeat history reaches [`DetectorConfig::phi_threshold`].
//!
//! A call that is merely slow is never evidence: a peer that keeps answering anything stays alive,
//! however long one answer takes. The first answer after a death declaration revives the peer.
//!
//! If this node itself stalls (paused, starved of CPU), what its peers sent meanwhile waits in
//! its socket: the heartbeat loop reads all of it before the detector judges anyone (see
//! `heartbeat`), so a stall of this node is not taken for silence of its peers.
//!
//! [`Detector`] is the pure state machine (time is passed in); [`Liveness`] shares it between
//! tasks and lets a call in flight give up on its peer the moment the peer is declared dead.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
// tokio's clock: real time in production, virtual (and deterministic) under a paused runtime.
use tokio::sync::watch;
use tokio::time::Instant;

/// Why a peer is considered dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Death {
    /// Its host refused or reset the connection: nothing listens there (cheap to check again).
    Refused,
    /// Connecting to it timed out.
    Unreachable,
    /// Nothing heard from it for too long (missed heartbeats).
    Silent,
}

/// What this node believes about a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    Alive,
    Dead(Death),
}

impl PeerState {
    pub fn is_dead(self) -> bool {
        matches!(self, PeerState::Dead(_))
    }
}

/// Tunables of the failure detector.
#[derive(Clone, Copy, Debug)]
pub struct DetectorConfig {
    /// How often every peer is sent a heartbeat (a new one only once the last was answered).
    pub heartbeat_interval: Duration,
    /// Suspicion level at which a silent peer is declared dead. 8 means the detector would be
    /// wrong about one time in 10^8 if heartbeat intervals were distributed as observed.
    pub phi_threshold: f64,
    /// Floor of the heartbeat intervals' standard deviation (regular beats would otherwise make
    /// a tiny delay look like death).
    pub min_std_dev: Duration,
    /// Silence tolerated on top of the usual heartbeat interval before suspicion starts to grow.
    pub acceptable_pause: Duration,
}

impl Default for DetectorConfig {
    /// With steady heartbeats, a peer that goes silent is declared dead after about 0.6 s.
    fn default() -> Self {
        DetectorConfig {
            heartbeat_interval: Duration::from_millis(100),
            phi_threshold: 8.0,
            min_std_dev: Duration::from_millis(50),
            acceptable_pause: Duration::from_millis(250),
        }
    }
}

/// Heartbeat intervals kept per peer.
const WINDOW: usize = 100;

/// What the detector knows about one peer.
#[derive(Clone, Debug)]
struct Track {
    /// Recent intervals between heartbeat answers, in milliseconds.
    intervals: VecDeque<f64>,
    last_heartbeat: Option<Instant>,
    /// Last time anything was heard from the peer (heartbeat or any other answer).
    last_heard: Instant,
    state: PeerState,
}

impl Track {
    fn new(now: Instant) -> Self {
        // Until a first answer, silence counts from when the peer was first looked at.
        Track { intervals: VecDeque::new(), last_heartbeat: None, last_heard: now, state: PeerState::Alive }
    }
}

/// A state change of one peer, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub peer: String,
    pub state: PeerState,
}

/// The failure detector: a pure state machine over heartbeat answers, other answers, connection
/// failures and time.
#[derive(Clone, Debug)]
pub struct Detector {
    config: DetectorConfig,
    /// Ordered, so a tick reports (and wakes) in the same order on every run.
    peers: BTreeMap<String, Track>,
}

impl Detector {
    pub fn new(config: DetectorConfig) -> Self {
        Detector { config, peers: BTreeMap::new() }
    }

    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    fn track(&mut self, peer: &str, now: Instant) -> &mut Track {
        self.peers.entry(peer.to_owned()).or_insert_with(|| Track::new(now))
    }

    /// The current belief about `peer` (alive until there is evidence otherwise).
    pub fn state(&self, peer: &str) -> PeerState {
        self.peers.get(peer).map_or(PeerState::Alive, |t| t.state)
    }

    /// `peer` answered a heartbeat at `now`.
    pub fn heartbeat(&mut self, peer: &str, now: Instant) -> Option<Transition> {
        let window = WINDOW;
        let t = self.track(peer, now);
        // An interval spanning a death is an outage, not the peer's rhythm: it would teach the
        // detector to wait that long next time.
        if let (Some(last), PeerState::Alive) = (t.last_heartbeat, t.state) {
            t.intervals.push_back(now.saturating_duration_since(last).as_secs_f64() * 1000.0);
            if t.intervals.len() > window {
                t.intervals.pop_front();
            }
        }
        t.last_heartbeat = Some(now);
        self.heard(peer, now)
    }

    /// `peer` answered something (any call) at `now`: it is alive.
    pub fn heard(&mut self, peer: &str, now: Instant) -> Option<Transition> {
        let t = self.track(peer, now);
        t.last_heard = t.last_heard.max(now);
        Self::set(peer, t, PeerState::Alive)
    }

    /// A connection to `peer` failed at `now` (`how`: refused or unreachable).
    pub fn connection_failed(&mut self, peer: &str, how: Death, now: Instant) -> Option<Transition> {
        let t = self.track(peer, now);
        Self::set(peer, t, PeerState::Dead(how))
    }

    /// Starts watching `peer` (no-op if already watched).
    pub fn watch(&mut self, peer: &str, now: Instant) {
        self.track(peer, now);
    }

    /// Whether `peer`'s heartbeats have not been answered for a while (five intervals) or ever:
    /// then another way of hearing from it is needed (datagrams may not get through).
    pub fn heartbeats_missing(&self, peer: &str, now: Instant) -> bool {
        self.peers
            .get(peer)
            .and_then(|t| t.last_heartbeat)
            .is_none_or(|last| now.saturating_duration_since(last) > self.config.heartbeat_interval * 5)
    }

    /// Forgets every peer not in `keep` (left the view).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.peers.retain(|p, _| keep(p));
    }

    /// Re-judges every silent peer at `now`; returns the peers whose state changed.
    pub fn tick(&mut self, now: Instant) -> Vec<Transition> {
        let mut changes = Vec::new();
        for (peer, t) in &mut self.peers {
            let silence = now.saturating_duration_since(t.last_heard);
            if t.state == PeerState::Alive && phi(&self.config, &t.intervals, silence) >= self.config.phi_threshold {
                changes.extend(Self::set(peer, t, PeerState::Dead(Death::Silent)));
            }
        }
        changes
    }

    fn set(peer: &str, t: &mut Track, state: PeerState) -> Option<Transition> {
        if t.state == state {
            return None;
        }
        t.state = state;
        Some(Transition { peer: peer.to_owned(), state })
    }
}

/// Suspicion that a peer whose heartbeat intervals were `intervals` (ms) and that has been silent
/// for `silence` is dead: `-log10(P(an interval at least this long))`, with intervals taken as
/// normally distributed (the logistic approximation of the normal tail used by Akka).
pub fn phi(config: &DetectorConfig, intervals: &VecDeque<f64>, silence: Duration) -> f64 {
    let interval_ms = config.heartbeat_interval.as_secs_f64() * 1000.0;
    let (mean, std_dev) = if intervals.is_empty() {
        // No history yet: assume beats as configured, with a quarter of that as spread.
        (interval_ms, interval_ms / 4.0)
    } else {
        let n = intervals.len() as f64;
        let mean = intervals.iter().sum::<f64>() / n;
        let var = intervals.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    };
    let mean = mean + config.acceptable_pause.as_secs_f64() * 1000.0;
    let std_dev = std_dev.max(config.min_std_dev.as_secs_f64() * 1000.0);
    let y = (silence.as_secs_f64() * 1000.0 - mean) / std_dev;
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    let p_later = if y > 0.0 { e / (1.0 + e) } else { 1.0 - 1.0 / (1.0 + e) };
    // Far in the tail `p_later` underflows to 0: certainty, capped to stay finite.
    -p_later.max(1e-300).log10()
}

/// The detector shared by the node's tasks, with a watch per peer so calls in flight can give up
/// on a peer as soon as it is declared dead.
pub struct Liveness {
    /// `std` mutex: O(peers) work under it at most, never held across `.await`.
    inner: Mutex<Shared>,
    /// Counts death declarations (a metric).
    deaths: prometheus_client::metrics::counter::Counter,
}

struct Shared {
    detector: Detector,
    watchers: HashMap<String, watch::Sender<PeerState>>,
    /// Dead peers a write has probed since they were declared dead.
    probed: std::collections::HashSet<String>,
}

impl Liveness {
    pub fn new(config: DetectorConfig, deaths: prometheus_client::metrics::counter::Counter) -> Self {
        let shared = Shared { detector: Detector::new(config), watchers: HashMap::new(), probed: Default::default() };
        Liveness { inner: Mutex::new(shared), deaths }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn config(&self) -> DetectorConfig {
        *self.lock().detector.config()
    }

    pub fn state(&self, peer: &str) -> PeerState {
        self.lock().detector.state(peer)
    }

    pub fn is_dead(&self, peer: &str) -> bool {
        self.state(peer).is_dead()
    }

    /// Whether a write should probe `peer`, dead, in case this node rather than the peer was the
    /// one cut off (see `ops::write`): the first time since the peer was declared dead, and every
    /// time while every other member looks dead too (`alone`: the mark of being cut off). Never
    /// for a live peer (it is called normally).
    pub fn should_probe(&self, peer: &str, alone: bool) -> bool {
        let mut shared = self.lock();
        shared.detector.state(peer).is_dead() && (shared.probed.insert(peer.to_owned()) || alone)
    }

    /// `peers` with the live ones first (keeping their relative order), dead ones last.
    pub fn order<'a>(&self, peers: impl IntoIterator<Item = &'a String>) -> Vec<&'a String> {
        let shared = self.lock();
        let (mut alive, dead): (Vec<_>, Vec<_>) = peers.into_iter().partition(|p| !shared.detector.state(p).is_dead());
        alive.extend(dead);
        alive
    }

    fn apply(&self, change: impl FnOnce(&mut Detector) -> Vec<Transition>) -> Vec<Transition> {
        self.apply_because(change, "")
    }

    /// [`Self::apply`], logging `why` with any death it declares.
    fn apply_because(&self, change: impl FnOnce(&mut Detector) -> Vec<Transition>, why: &str) -> Vec<Transition> {
        let mut shared = self.lock();
        let transitions = change(&mut shared.detector);
        for t in &transitions {
            shared.probed.remove(&t.peer);
            if let Some(w) = shared.watchers.get(&t.peer) {
                w.send_replace(t.state);
            }
            match t.state {
                PeerState::Alive => tracing::info!(peer = %t.peer, "peer is alive again"),
                PeerState::Dead(evidence) => {
                    let (why, detail) = (evidence, why);
                    self.deaths.inc();
                    tracing::warn!(peer = %t.peer, evidence = ?why, detail = detail, "peer declared dead");
                }
            }
        }
        transitions
    }

    /// See [`Detector::heartbeats_missing`].
    pub fn heartbeats_missing(&self, peer: &str) -> bool {
        self.lock().detector.heartbeats_missing(peer, Instant::now())
    }

    pub fn heartbeat(&self, peer: &str) {
        self.apply(|d| d.heartbeat(peer, Instant::now()).into_iter().collect());
    }

    pub fn heard(&self, peer: &str) {
        // The common case (an answer from a live peer) changes nothing but the time.
        self.apply(|d| d.heard(peer, Instant::now()).into_iter().collect());
    }

    /// A connection to `peer` failed (`detail`: the error, for the log).
    pub fn connection_failed(&self, peer: &str, how: Death, detail: &str) {
        self.apply_because(|d| d.connection_failed(peer, how, Instant::now()).into_iter().collect(), detail);
    }

    /// Watches exactly `peers` from now on and re-judges them.
    pub fn tick(&self, peers: &[String]) -> Vec<Transition> {
        let now = Instant::now();
        let transitions = self.apply(|d| {
            d.retain(|p| peers.iter().any(|q| q == p));
            for p in peers {
                d.watch(p, now);
            }
            d.tick(now)
        });
        self.lock().watchers.retain(|p, w| peers.iter().any(|q| q == p) || w.receiver_count() > 0);
        transitions
    }

    /// Completes when `peer` is declared silent or unreachable (at once if it already is), with
    /// the evidence. A refused connection does not end calls under way on other connections: if
    /// the process is gone, the kernel resets those too, and a spurious reset must not abandon
    /// work a live peer is doing.
    pub async fn until_dead(&self, peer: &str) -> Death {
        let mut rx = {
            let mut shared = self.lock();
            let state = shared.detector.state(peer);
            shared.watchers.entry(peer.to_owned()).or_insert_with(|| watch::channel(state).0).subscribe()
        };
        loop {
            if let PeerState::Dead(why @ (Death::Silent | Death::Unreachable)) = *rx.borrow_and_update() {
                return why;
            }
            if rx.changed().await.is_err() {
                // The watch went away (the peer left the view): nobody will declare it dead.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Feeds steady heartbeats every `every` until `until`, ticking at each one.
    fn steady(d: &mut Detector, peer: &str, start: Instant, every: Duration, until: Duration) -> Instant {
        let mut t = start;
        while t < start + until {
            d.heartbeat(peer, t);
            assert!(d.tick(t).is_empty(), "no death while beats arrive");
            t += every;
        }
        t - every
    }

    #[test]
    fn a_silent_peer_is_declared_dead_and_revived_by_its_next_answer() {
        let config = DetectorConfig::default();
        let mut d = Detector::new(config);
        let start = Instant::now();
        let last = steady(&mut d, "b", start, config.heartbeat_interval, Duration::from_secs(5));
        let mut t = last;
        let died_at = loop {
            t += config.heartbeat_interval;
            if let Some(change) = d.tick(t).pop() {
                assert_eq!(change, Transition { peer: "b".into(), state: PeerState::Dead(Death::Silent) });
                break t;
            }
            assert!(t < last + Duration::from_secs(5), "a silent peer must be declared dead");
        };
        let silence = died_at - last;
        assert!(
            silence >= config.heartbeat_interval + config.acceptable_pause,
            "not before the acceptable pause: {silence:?}"
        );
        assert!(silence < Duration::from_secs(1), "steady beats then silence: dead within a second ({silence:?})");
        assert_eq!(d.heard("b", t), Some(Transition { peer: "b".into(), state: PeerState::Alive }));
    }

    #[test]
    fn slow_answers_keep_a_peer_alive_however_slow() {
        let config = DetectorConfig::default();
        let mut d = Detector::new(config);
        let start = Instant::now();
        // Heartbeats stuck behind load answer only every 3 s, but other calls keep answering.
        let mut t = start;
        for i in 0..600 {
            t = start + ms(50 * i);
            d.heard("b", t);
            if i % 60 == 0 {
                d.heartbeat("b", t);
            }
            assert!(d.tick(t).is_empty(), "answers keep arriving: alive at {i}");
        }
        assert_eq!(d.state("b"), PeerState::Alive);
        // Heartbeats that slow down gradually teach the detector to wait longer.
        let mut d = Detector::new(config);
        for i in 0..50u64 {
            t = start + ms(600 * i);
            d.heartbeat("c", t);
            d.tick(t);
        }
        assert!(d.tick(t + ms(900)).is_empty(), "one and a half usual intervals is not death");
    }

    #[test]
    fn connection_failures_are_immediate_evidence() {
        let mut d = Detector::new(DetectorConfig::default());
        let now = Instant::now();
        d.heartbeat("b", now);
        assert_eq!(
            d.connection_failed("b", Death::Refused, now),
            Some(Transition { peer: "b".into(), state: PeerState::Dead(Death::Refused) })
        );
        assert_eq!(d.connection_failed("b", Death::Refused, now), None, "only changes are reported");
        assert!(d.state("b").is_dead());
        assert_eq!(d.state("never-heard-of"), PeerState::Alive, "no evidence, no death");
    }

    #[test]
    fn what_was_heard_during_a_stall_of_this_node_counts_before_it_judges() {
        let config = DetectorConfig::default();
        let mut d = Detector::new(config);
        let start = Instant::now();
        let last = steady(&mut d, "b", start, config.heartbeat_interval, Duration::from_secs(2));
        // This node was stopped for 3 s; b's pings waited in its socket and are read first.
        let resumed = last + Duration::from_secs(3);
        d.heard("b", resumed);
        assert!(d.tick(resumed).is_empty(), "b was heard: alive");
        // A peer that sent nothing meanwhile is judged on its silence.
        d.heartbeat("c", last);
        assert_eq!(d.tick(resumed), vec![Transition { peer: "c".into(), state: PeerState::Dead(Death::Silent) }]);
    }

    #[test]
    fn an_outage_does_not_teach_the_detector_to_wait_longer() {
        let config = DetectorConfig::default();
        let mut d = Detector::new(config);
        let start = Instant::now();
        let last = steady(&mut d, "b", start, config.heartbeat_interval, Duration::from_secs(2));
        d.connection_failed("b", Death::Unreachable, last + ms(50));
        let back = last + Duration::from_secs(10);
        d.heartbeat("b", back);
        let intervals = &d.peers["b"].intervals;
        assert!(intervals.iter().all(|&i| i < 200.0), "the 10 s outage is not a heartbeat interval: {intervals:?}");
    }

    #[test]
    fn phi_grows_with_silence() {
        let config = DetectorConfig::default();
        let intervals: VecDeque<f64> = std::iter::repeat_n(100.0, 20).collect();
        let at = |silence| phi(&config, &intervals, ms(silence));
        assert!(at(0) < 0.5);
        assert!(at(300) < at(500) && at(500) < at(700) && at(700) < at(2000));
        assert!(at(100_000).is_finite());
    }

    #[tokio::test]
    async fn waiters_learn_of_a_death_at_once() {
        let l = std::sync::Arc::new(Liveness::new(DetectorConfig::default(), Default::default()));
        l.heartbeat("b");
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.until_dead("b").await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        l.connection_failed("b", Death::Refused, "test");
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a refused connection does not abandon calls under way");
        l.connection_failed("b", Death::Unreachable, "test");
        assert_eq!(waiter.await.unwrap(), Death::Unreachable);
        assert_eq!(l.until_dead("b").await, Death::Unreachable, "already dead: at once");
    }
}
