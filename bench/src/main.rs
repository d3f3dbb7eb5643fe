//! `kvs-bench`: drives a key-value store over HTTP with a chosen concurrency, key count, value size
//! and GET/PUT mix, then reports throughput and latency percentiles.
//!
//! Targets: a kvstore cluster through its native API (`kvs`, optionally `--routed`: each request
//! straight to an owner by the cluster map) or its HW4 API (`hw4`), etcd through its JSON gateway
//! (`etcd`), and Redis (`redis`, optionally `--redis-wait N` after each write), so the same load
//! shape runs against each. Every request loop is bounded by `--seconds` and stops by itself.
//!
//! `scripts/bench` drives kvstore and etcd with one outside tool (`wrk`) for the headline table, and
//! uses this tool for what `wrk` cannot do (routed and causal clients, replicated Redis writes).

mod backup;
mod conn;
mod converge;
mod load;
mod rebalance;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(name = "kvs-bench", about = "Load generator for kvstore, etcd and comparable HTTP stores")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a timed load and report throughput and latency.
    Load(LoadArgs),
    /// Pause a replica (SIGSTOP), write keys through another node, resume it and measure how long
    /// until the paused replica holds them all (anti-entropy convergence).
    Converge(ConvergeArgs),
    /// Load a cluster, then add one node and remove it again under client traffic; report the
    /// time, keys moved against the minimum, client throughput and errors during each move.
    Rebalance(RebalanceArgs),
    /// Back a loaded cluster up to a directory under client traffic, verify the backup, and
    /// restore it into a second, empty cluster: the throughput of each.
    Backup(BackupArgs),
}

#[derive(Parser, Debug)]
pub struct BackupArgs {
    /// The source cluster, the preload, and the client traffic during the backup (`--seconds`:
    /// the baseline measurement before it).
    #[command(flatten)]
    load: LoadArgs,
    /// Where to write the backup (a directory that holds none).
    #[arg(long)]
    to: String,
    /// Nodes of the empty cluster to restore into.
    #[arg(long, value_delimiter = ',', required = true)]
    restore_endpoints: Vec<String>,
}

#[derive(Parser, Debug)]
pub struct RebalanceArgs {
    /// Load shape for the preload and the client traffic during the moves (`--seconds` is the
    /// baseline measurement before the first move).
    #[command(flatten)]
    load: LoadArgs,
    /// The node (`host:port`, started without VIEW) to add and then remove.
    #[arg(long)]
    add: String,
    /// Replication factor of the cluster.
    #[arg(long, default_value_t = 2)]
    replication_factor: u32,
    /// Keys per second each sending node moves (0: unlimited; default: the nodes' own default).
    #[arg(long)]
    transfer_rate: Option<u64>,
}

#[derive(Parser, Debug, Clone)]
pub struct LoadArgs {
    /// What to drive.
    #[arg(long, value_enum, default_value_t = Target::Kvs)]
    target: Target,
    /// Comma-separated `host:port` endpoints; connections spread over them round-robin.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Concurrent connections (each runs one request at a time).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Fraction of requests that are GETs (the rest are PUTs).
    #[arg(long, default_value_t = 0.5)]
    get_ratio: f64,
    /// Measured duration in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Write every key once before measuring (so GETs hit).
    #[arg(long)]
    preload: bool,
    /// Carry the causal context from answer to request, per connection, as a real client does.
    #[arg(long)]
    causal: bool,
    /// Label for the result line.
    #[arg(long, default_value = "")]
    label: String,
    /// Print the result as one JSON line instead of a table row.
    #[arg(long)]
    json: bool,
    /// Seed for key choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// kvstore: send each request straight to an owner of its key, by the cluster map.
    #[arg(long)]
    routed: bool,
    /// Redis: after each write, wait until this many replicas have it (`WAIT N 0`).
    #[arg(long)]
    redis_wait: Option<u32>,
}

#[derive(Parser, Debug)]
pub struct ConvergeArgs {
    /// PID of the replica to pause.
    #[arg(long)]
    pause_pid: u32,
    /// The paused replica's `host:port`.
    #[arg(long)]
    replica: String,
    /// A live node of the same partition to write through.
    #[arg(long)]
    via: String,
    /// Keys to write while the replica is paused.
    #[arg(long, default_value_t = 1000)]
    keys: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Target {
    /// kvstore native API: PUT/GET /v1/kv/{key}
    Kvs,
    /// kvstore HW4 API: form-encoded PUT/GET /kv-store/{key}
    Hw4,
    /// etcd v3 JSON gateway: POST /v3/kv/put and /v3/kv/range
    Etcd,
    /// Redis: SET and GET (RESP)
    Redis,
}

#[derive(Serialize, Debug)]
pub struct Report {
    label: String,
    target: String,
    connections: usize,
    get_ratio: f64,
    value_size: usize,
    ops: u64,
    errors: u64,
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // A thousand connections need more file descriptors than the usual soft limit of 1024.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("kvs-bench: cannot raise the open files limit ({e}); many connections may fail");
    }
    match Args::parse().cmd {
        Cmd::Load(a) => {
            let json = a.json;
            let r = load::load(a).await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{:<24} {:>10.0} ops/s  p50 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  errors {}",
                    if r.label.is_empty() { &r.target } else { &r.label },
                    r.ops_per_sec,
                    r.p50_ms,
                    r.p99_ms,
                    r.p999_ms,
                    r.errors
                );
            }
        }
        Cmd::Converge(a) => converge::converge(a).await?,
        Cmd::Rebalance(a) => rebalance::rebalance(a).await?,
        Cmd::Backup(a) => backup::backup(a).await?,
    }
    Ok(())
}
