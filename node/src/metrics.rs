//! Prometheus metrics, served as text on `/metrics`.
//!
//! Handles are cheap clones of atomics registered once at start-up; updating one never takes a lock.

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

/// Replication attempts, by outcome.
pub struct ReplicationCounters {
    pub ok: Counter,
    pub failed: Counter,
    /// Not attempted: the peer had failed moments ago (anti-entropy will repair it).
    pub skipped: Counter,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// Every metric a node exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: HistogramFamily,
    pub forwarded: Counter,
    pub replication: ReplicationCounters,
    pub causal_fetches: Counter,
    pub anti_entropy_repairs: Counter,
    pub anti_entropy_pushed: Counter,
    pub gossip_rounds: Counter,
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
        registry.register("http_request_duration_seconds", "HTTP request latency, by route and method", request_seconds.clone());
        let forwarded = Counter::default();
        registry.register("forwarded", "Client requests forwarded to another node (one per attempt)", forwarded.clone());
        let outcomes = Family::<OutcomeLabel, Counter>::default();
        registry.register("replication", "Replication of writes to peer replicas, by outcome", outcomes.clone());
        // One statement per handle: `get_or_create` returns a guard on the family's lock, and two
        // guards alive in one expression deadlock.
        let outcome = |outcome| outcomes.get_or_create(&OutcomeLabel { outcome }).clone();
        let ok = outcome("ok");
        let failed = outcome("failed");
        let skipped = outcome("skipped");
        let replication = ReplicationCounters { ok, failed, skipped };
        let causal_fetches = Counter::default();
        registry.register(
            "causal_fetches",
            "Reads that asked other replicas because the causal context required it",
            causal_fetches.clone(),
        );
        let anti_entropy_repairs = Counter::default();
        registry.register("anti_entropy_repairs", "Records this node stored through anti-entropy", anti_entropy_repairs.clone());
        let anti_entropy_pushed = Counter::default();
        registry.register("anti_entropy_pushed", "Records peers stored from this node through anti-entropy", anti_entropy_pushed.clone());
        let gossip_rounds = Counter::default();
        registry.register("view_gossip_rounds", "Times this node asked a peer for its view", gossip_rounds.clone());
        let keys = Family::<StateLabel, Gauge>::default();
        registry.register("keys", "Keys stored on this node (live values and tombstones)", keys.clone());
        let commits = Counter::default();
        registry.register("storage_commits", "Durable group commits (one log fsync each)", commits.clone());
        let committed_records = Counter::default();
        registry.register("storage_committed_records", "Records made durable by group commits", committed_records.clone());
        Metrics {
            commits,
            committed_records,
            registry,
            requests,
            request_seconds,
            forwarded,
            replication,
            causal_fetches,
            anti_entropy_repairs,
            anti_entropy_pushed,
            gossip_rounds,
            keys,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition, with gauges refreshed from `stats`.
    pub fn render(&self, stats: StoreStats, commits: CommitCounts) -> String {
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
