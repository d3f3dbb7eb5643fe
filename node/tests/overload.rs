//! Overload: far more concurrent clients than a node runs at once. Slowness is not death: with
//! every node up, every request succeeds and every write is acknowledged on both replicas, however
//! long it queues; with a node killed, requests to the others still succeed without waiting out
//! any deadline on the dead one.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::Cluster;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Concurrent client connections, each held open for the whole round.
const CONNECTIONS: usize = 1024;

/// One client connection's round: connect, wait for every other connection, then PUT and read
/// back its own keys (with its causal context). Returns the latency of every request.
async fn client_round(node: String, id: usize, round: usize, ready: Arc<tokio::sync::Barrier>) -> Vec<Duration> {
    // One client per connection, so the connections are really concurrent and distinct.
    let http = kvs_api::http_client().timeout(Duration::from_secs(120)).pool_max_idle_per_host(1).build().unwrap();
    let health =
        http.get(format!("http://{node}/healthz")).send().await.unwrap_or_else(|e| panic!("connect to {node}: {e}"));
    assert!(health.status().is_success());
    ready.wait().await;
    let mut latencies = Vec::new();
    let mut context = String::new();
    for i in 0..2 {
        let key = format!("r{round}c{id}k{i}");
        let value = format!("v{round}-{id}-{i}");
        let started = Instant::now();
        let put = http
            .put(format!("http://{node}/v1/kv/{key}"))
            .header("kvs-causal-context", &context)
            .body(value.clone())
            .send()
            .await;
        let put = put.unwrap_or_else(|e| panic!("PUT {key} via {node}: {e}"));
        let status = put.status();
        let replicas = put.headers().get("kvs-replicas").map(|v| v.to_str().unwrap().to_owned());
        let next_context = put.headers().get("kvs-causal-context").map(|v| v.to_str().unwrap().to_owned());
        let body = put.text().await.unwrap();
        assert!(status.is_success(), "PUT {key} via {node}: {status} {body}");
        context = next_context.expect("every write answers with a causal context");
        assert!(replicas.is_some(), "every write says how many replicas hold it");
        latencies.push(started.elapsed());
        let started = Instant::now();
        let get = http.get(format!("http://{node}/v1/kv/{key}")).header("kvs-causal-context", &context).send().await;
        let get = get.unwrap_or_else(|e| panic!("GET {key} via {node}: {e}"));
        let status = get.status();
        let body = get.text().await.unwrap();
        assert_eq!((status.as_u16(), body.as_str()), (200, value.as_str()), "GET {key} via {node}");
        latencies.push(started.elapsed());
    }
    latencies
}

/// Runs `CONNECTIONS` clients spread over `nodes`; returns every request's latency.
async fn round(nodes: &[String], round: usize) -> Vec<Duration> {
    let ready = Arc::new(tokio::sync::Barrier::new(CONNECTIONS));
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|id| tokio::spawn(client_round(nodes[id % nodes.len()].clone(), id, round, ready.clone())))
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all
}

fn describe(latencies: &[Duration]) -> String {
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    format!(
        "{} requests, p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        at(0.5),
        at(0.99),
        latencies[latencies.len() - 1]
    )
}

/// Sum over `nodes` of the metric lines starting with `prefix`.
async fn total(c: &Cluster, nodes: &[String], prefix: &str) -> f64 {
    let mut sum = 0.0;
    for n in nodes {
        sum += c.metric(n, prefix).await;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_a_thousand_connections_all_succeed_with_every_copy_then_a_dead_node_costs_no_deadline() {
    kvs_testkit::process::raise_open_files_limit();
    let mut c = Cluster::start(4, 2, &[]).await;
    let nodes = c.addrs();
    // Peers that were not listening yet when a node first pinged them were (rightly) declared
    // dead while the cluster started; count only what happens under load.
    let mut deaths_at_start = Vec::new();
    for n in &nodes {
        deaths_at_start.push(c.metric(n, "kvs_peer_deaths_total").await);
    }

    let latencies = round(&nodes, 0).await;
    println!("{CONNECTIONS} connections, 4 healthy nodes: {}", describe(&latencies));
    for (n, at_start) in nodes.iter().zip(&deaths_at_start) {
        for reason in ["replica_dead", "replica_slow", "replica_refused"] {
            let line = format!("kvs_under_replicated_writes_total{{reason=\"{reason}\"}}");
            assert_eq!(
                c.metric(n, &line).await,
                0.0,
                "{n}: a write was acknowledged without a live replica's copy ({reason})"
            );
        }
        assert_eq!(c.metric(n, "kvs_requests_overloaded_total").await, 0.0, "{n} refused a request as overloaded");
        assert_eq!(c.metric(n, "kvs_peer_deaths_total").await, *at_start, "{n} took a busy peer for dead");
    }
    let stored = total(&c, &nodes, "kvs_replication_total{outcome=\"stored\"}").await;
    println!("replications stored: {stored}");

    // A replica dies: every request to the others still succeeds, and no write waits out the
    // replica deadline on it (the dead replica is given up on, not waited for).
    let layout = c.partitions(&nodes[0]).await;
    let dead = layout[1][1].clone();
    c.node(&dead).kill();
    let live: Vec<String> = nodes.iter().filter(|n| **n != dead).cloned().collect();
    let latencies = round(&live, 1).await;
    println!("{CONNECTIONS} connections, {dead} killed: {}", describe(&latencies));
    for n in &live {
        let slow = c.metric(n, "kvs_replication_total{outcome=\"slow\"}").await;
        assert_eq!(slow, 0.0, "{n}: a write waited out the replica deadline instead of giving up on the dead replica");
        let line = "kvs_under_replicated_writes_total{reason=\"replica_slow\"}";
        assert_eq!(c.metric(n, line).await, 0.0, "{n}: no live replica was too slow");
    }
    let without_dead = total(&c, &live, "kvs_under_replicated_writes_total{reason=\"replica_dead\"}").await;
    println!("writes acknowledged without the dead replica's copy: {without_dead}");
    assert!(without_dead > 0.0, "writes to the dead replica's partition say so in the metrics");
}
