//! Prometheus metrics, served as text on `/metrics`.
//!
//! Handles are cheap clones of atomics registered once at start-up; updating one never takes a lock.

use crate::ops::ReplicaOutcome;
use crate::store::{CommitCounts, StoreStats};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// One counter per [`ReplicaOutcome`], registered once.
struct PerOutcome {
    stored: Counter,
    dead: Counter,
    slow: Counter,
    refused: Counter,
}

impl PerOutcome {
    fn get(&self, outcome: ReplicaOutcome) -> &Counter {
        match outcome {
            ReplicaOutcome::Stored => &self.stored,
            ReplicaOutcome::Dead => &self.dead,
            ReplicaOutcome::Slow => &self.slow,
            ReplicaOutcome::Refused => &self.refused,
        }
    }
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// Every metric a node exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: HistogramFamily,
    pub forwarded: Counter,
    replication: PerOutcome,
    under_replicated: PerOutcome,
    pub overloaded: Counter,
    pub expired_forwards: Counter,
    /// Writes coordinated under a view a replica showed to be out of date (not acknowledged; sent
    /// to the owners under the newer view instead).
    pub stale_view_writes: Counter,
    pub peer_deaths: Counter,
    queued: Gauge,
    in_flight: Gauge,
    pub causal_fetches: Counter,
    pub anti_entropy_repairs: Counter,
    pub anti_entropy_pushed: Counter,
    pub gossip_rounds: Counter,
    pub anti_entropy_rounds: Counter,
    keys: Family<StateLabel, Gauge>,
    commits: Counter,
    committed_records: Counter,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kvs");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests served, by route, method and status", requests.clone());
        let request_seconds: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency, by route and method",
            request_seconds.clone(),
        );
        let forwarded = Counter::default();
        registry.register(
            "forwarded",
            "Client requests forwarded to another node (one per attempt)",
            forwarded.clone(),
        );
        let outcomes = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "replication",
            "Writes sent to peer replicas, by outcome: stored, dead (the replica is dead: skipped or given up on), \
             slow (alive but past the replica deadline), refused",
            outcomes.clone(),
        );
        // One statement per handle: `get_or_create` returns a guard on the family's lock, and two
        // guards alive in one expression deadlock.
        let outcome = |outcome| outcomes.get_or_create(&OutcomeLabel { outcome }).clone();
        let stored = outcome("stored");
        let dead = outcome("dead");
        let slow = outcome("slow");
        let refused = outcome("refused");
        let replication = PerOutcome { stored, dead, slow, refused };
        let reasons = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "under_replicated_writes",
            "Writes acknowledged with fewer durable copies than their partition has replicas, by the reason a copy is missing \
             (replica_dead, replica_slow, replica_refused; one count per write)",
            reasons.clone(),
        );
        let reason = |reason| reasons.get_or_create(&ReasonLabel { reason }).clone();
        let dead = reason("replica_dead");
        let slow = reason("replica_slow");
        let refused = reason("replica_refused");
        let under_replicated = PerOutcome { stored: Counter::default(), dead, slow, refused };
        let overloaded = Counter::default();
        registry.register(
            "requests_overloaded",
            "Client requests refused with 503 after waiting the whole queue timeout for a slot",
            overloaded.clone(),
        );
        let expired_forwards = Counter::default();
        registry.register(
            "forwarded_writes_expired",
            "Forwarded writes refused because they arrived too late (the forwarder may have sent them to another owner)",
            expired_forwards.clone(),
        );
        let stale_view_writes = Counter::default();
        registry.register(
            "stale_view_writes",
            "Writes this node coordinated under an out-of-date view, not acknowledged but sent to the current owners",
            stale_view_writes.clone(),
        );
        let queued = Gauge::default();
        registry.register("requests_queued", "Client requests waiting for a slot (admission queue)", queued.clone());
        let in_flight = Gauge::default();
        registry.register("requests_in_flight", "Client requests in progress (holding a slot)", in_flight.clone());
        let peer_deaths = Counter::default();
        registry.register("peer_deaths", "Times the failure detector declared a peer dead", peer_deaths.clone());
        let causal_fetches = Counter::default();
        registry.register(
            "causal_fetches",
            "Reads that asked other replicas because the causal context required it",
            causal_fetches.clone(),
        );
        let anti_entropy_repairs = Counter::default();
        registry.register(
            "anti_entropy_repairs",
            "Records this node stored through anti-entropy",
            anti_entropy_repairs.clone(),
        );
        let anti_entropy_pushed = Counter::default();
        registry.register(
            "anti_entropy_pushed",
            "Records peers stored from this node through anti-entropy",
            anti_entropy_pushed.clone(),
        );
        let gossip_rounds = Counter::default();
        registry.register("view_gossip_rounds", "Times this node asked a peer for its view", gossip_rounds.clone());
        let anti_entropy_rounds = Counter::default();
        registry.register(
            "anti_entropy_rounds",
            "Anti-entropy rounds this node finished (the first runs as it starts)",
            anti_entropy_rounds.clone(),
        );
        let keys = Family::<StateLabel, Gauge>::default();
        registry.register("keys", "Keys stored on this node (live values and tombstones)", keys.clone());
        let commits = Counter::default();
        registry.register("storage_commits", "Durable group commits (one log fsync each)", commits.clone());
        let committed_records = Counter::default();
        registry.register(
            "storage_committed_records",
            "Records made durable by group commits",
            committed_records.clone(),
        );
        Metrics {
            commits,
            committed_records,
            registry,
            requests,
            request_seconds,
            forwarded,
            replication,
            under_replicated,
            overloaded,
            expired_forwards,
            stale_view_writes,
            peer_deaths,
            queued,
            in_flight,
            causal_fetches,
            anti_entropy_repairs,
            anti_entropy_pushed,
            gossip_rounds,
            anti_entropy_rounds,
            keys,
        }
    }
}

impl Metrics {
    /// Counts one write sent to one replica.
    pub(crate) fn replicated(&self, outcome: ReplicaOutcome) {
        self.replication.get(outcome).inc();
    }

    /// Counts one write acknowledged without a copy on some replica, for `reason`.
    pub(crate) fn under_replicated(&self, reason: ReplicaOutcome) {
        self.under_replicated.get(reason).inc();
    }

    /// The Prometheus text exposition, with gauges refreshed from `stats` and the admission
    /// queue's `(queued, in_flight)`.
    pub fn render(&self, stats: StoreStats, commits: CommitCounts, load: (i64, usize)) -> String {
        self.queued.set(load.0);
        self.in_flight.set(load.1 as i64);
        // Counters mirror the store's own totals: add what is new since the last scrape.
        self.commits.inc_by(commits.commits.saturating_sub(self.commits.get()));
        self.committed_records.inc_by(commits.records.saturating_sub(self.committed_records.get()));
        self.keys.get_or_create(&StateLabel { state: "live" }).set(stats.live_keys as i64);
        self.keys.get_or_create(&StateLabel { state: "tombstone" }).set(stats.tombstones as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
