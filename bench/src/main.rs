//! `kvs-bench`: drives a key-value store over HTTP with a chosen concurrency, key count, value size
//! and GET/PUT mix, then reports throughput and latency percentiles.
//!
//! Targets: a kvstore cluster through its native API (`kvs`) or its HW4 API (`hw4`), and etcd
//! through its JSON gateway (`etcd`), so the same load shape runs against each. Every request loop
//! is bounded by `--seconds` and stops by itself.

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
}

#[derive(Parser, Debug)]
struct RebalanceArgs {
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
}

#[derive(Parser, Debug, Clone)]
struct LoadArgs {
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
}

#[derive(Parser, Debug)]
struct ConvergeArgs {
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
enum Target {
    /// kvstore native API: PUT/GET /v1/kv/{key}
    Kvs,
    /// kvstore HW4 API: form-encoded PUT/GET /kv-store/{key}
    Hw4,
    /// etcd v3 JSON gateway: POST /v3/kv/put and /v3/kv/range
    Etcd,
}

#[derive(Serialize, Debug)]
struct Report {
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

/// One client connection: a dedicated HTTP/1.1 connection driven by hyper (no pool, no URL
/// parsing), so the load generator spends as little CPU as possible next to the servers it measures.
struct Conn {
    endpoint: String,
    target: Target,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    context: String,
    causal: bool,
}

impl Conn {
    fn new(endpoint: String, target: Target, causal: bool) -> Self {
        Conn { endpoint, target, sender: None, context: String::new(), causal }
    }

    async fn connect(&mut self) -> anyhow::Result<&mut hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let tcp = tokio::net::TcpStream::connect(&self.endpoint)
                .await
                .with_context(|| format!("connecting to {}", self.endpoint))?;
            tcp.set_nodelay(true)?;
            let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
            tokio::spawn(connection);
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("just connected"))
    }

    async fn send(
        &mut self,
        method: http::Method,
        path: String,
        content_type: Option<&str>,
        body: Bytes,
        is_get: bool,
    ) -> anyhow::Result<()> {
        let mut req =
            http::Request::builder().method(method).uri(path).header(http::header::HOST, self.endpoint.as_str());
        if let Some(ct) = content_type {
            req = req.header(http::header::CONTENT_TYPE, ct);
        }
        if self.causal && self.target == Target::Kvs {
            req = req.header("kvs-causal-context", self.context.as_str());
        }
        let req = req.body(Full::new(body))?;
        let sender = self.connect().await?;
        sender.ready().await?;
        let resp = match tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await {
            Ok(r) => r?,
            Err(_) => {
                self.sender = None;
                bail!("no answer within 10 s");
            }
        };
        let status = resp.status();
        if self.causal
            && self.target == Target::Kvs
            && let Some(c) = resp.headers().get("kvs-causal-context").and_then(|v| v.to_str().ok())
            && !c.is_empty()
        {
            self.context = c.to_owned();
        }
        let body = resp.into_body().collect().await?.to_bytes();
        if self.causal
            && self.target == Target::Hw4
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
            && let Some(c) = v["causal_payload"].as_str()
            && !c.is_empty()
        {
            self.context = c.to_owned();
        }
        if status.is_success() || (is_get && status.as_u16() == 404) {
            Ok(())
        } else {
            bail!("{status}: {}", String::from_utf8_lossy(&body))
        }
    }

    fn hw4_form(&self, fields: &[(&str, &str)]) -> Bytes {
        let mut out = String::new();
        for (i, (k, v)) in fields.iter().enumerate() {
            if i > 0 {
                out.push('&');
            }
            out.push_str(k);
            out.push('=');
            for b in v.bytes() {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                    out.push(b as char);
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
        }
        Bytes::from(out)
    }

    async fn put(&mut self, key: &str, value: &Bytes) -> anyhow::Result<()> {
        match self.target {
            Target::Kvs => self.send(http::Method::PUT, format!("/v1/kv/{key}"), None, value.clone(), false).await,
            Target::Hw4 => {
                let ctx = if self.causal { self.context.clone() } else { String::new() };
                let body = self.hw4_form(&[("val", &String::from_utf8_lossy(value)), ("causal_payload", &ctx)]);
                self.send(http::Method::PUT, format!("/kv-store/{key}"), Some(FORM), body, false).await
            }
            Target::Etcd => {
                let body =
                    serde_json::to_vec(&serde_json::json!({"key": B64.encode(key), "value": B64.encode(value)}))?;
                self.send(http::Method::POST, "/v3/kv/put".into(), Some(JSON), body.into(), false).await
            }
        }
    }

    async fn get(&mut self, key: &str) -> anyhow::Result<()> {
        match self.target {
            Target::Kvs => self.send(http::Method::GET, format!("/v1/kv/{key}"), None, Bytes::new(), true).await,
            Target::Hw4 => {
                let ctx = if self.causal { self.context.clone() } else { String::new() };
                let body = self.hw4_form(&[("causal_payload", &ctx)]);
                self.send(http::Method::GET, format!("/kv-store/{key}"), Some(FORM), body, true).await
            }
            Target::Etcd => {
                let body = serde_json::to_vec(&serde_json::json!({"key": B64.encode(key)}))?;
                self.send(http::Method::POST, "/v3/kv/range".into(), Some(JSON), body.into(), true).await
            }
        }
    }
}

const FORM: &str = "application/x-www-form-urlencoded";
const JSON: &str = "application/json";

fn key_name(i: u64) -> String {
    format!("key_{i:08}")
}

fn value_of(size: usize) -> Bytes {
    Bytes::from((0..size).map(|i| b'a' + (i % 26) as u8).collect::<Vec<u8>>())
}

async fn load(args: LoadArgs) -> anyhow::Result<Report> {
    if args.endpoints.is_empty() || args.connections == 0 {
        bail!("need at least one endpoint and one connection");
    }
    if args.preload {
        preload(&args).await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let timer = {
        let (stop, secs) = (stop.clone(), args.seconds);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let report = measure(&args, stop).await;
    timer.abort();
    report
}

/// Writes every key once, spread over the connections.
async fn preload(args: &LoadArgs) -> anyhow::Result<()> {
    let value = value_of(args.value_size);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let (next, value, keys) = (next.clone(), value.clone(), args.keys);
        let mut conn = Conn::new(args.endpoints[c % args.endpoints.len()].clone(), args.target, false);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return Ok::<_, anyhow::Error>(());
                }
                conn.put(&key_name(i), &value).await.with_context(|| format!("preloading {}", key_name(i)))?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Runs the GET/PUT mix on every connection until `stop` is set.
async fn measure(args: &LoadArgs, stop: Arc<AtomicBool>) -> anyhow::Result<Report> {
    let value = value_of(args.value_size);
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let (value, errors, a, stop) = (value.clone(), errors.clone(), args.clone(), stop.clone());
        let mut conn = Conn::new(a.endpoints[c % a.endpoints.len()].clone(), a.target, a.causal);
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
            let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed.wrapping_mul(1000).wrapping_add(c as u64));
            let mut first_error = None;
            while !stop.load(Ordering::Relaxed) {
                let key = key_name(rng.random_range(0..a.keys));
                let t0 = Instant::now();
                let result = if rng.random_bool(a.get_ratio.clamp(0.0, 1.0)) {
                    conn.get(&key).await
                } else {
                    conn.put(&key, &value).await
                };
                let micros = t0.elapsed().as_micros() as u64;
                match result {
                    Ok(()) => {
                        let _ = hist.record(micros.max(1));
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert(e.to_string());
                    }
                }
            }
            (hist, first_error)
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
    for t in tasks {
        let (h, first_error) = t.await?;
        hist.add(h).expect("same bounds");
        if let Some(e) = first_error {
            eprintln!("kvs-bench: first error on a connection: {e}");
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        label: args.label.clone(),
        target: format!("{:?}", args.target).to_lowercase(),
        connections: args.connections,
        get_ratio: args.get_ratio,
        value_size: args.value_size,
        ops: hist.len(),
        errors: errors.load(Ordering::Relaxed),
        ops_per_sec: hist.len() as f64 / elapsed,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: hist.max() as f64 / 1000.0,
    })
}

async fn live_keys(http: &reqwest::Client, node: &str) -> anyhow::Result<u64> {
    let text = http.get(format!("http://{node}/metrics")).send().await?.text().await?;
    let line = text.lines().find(|l| l.starts_with("kvs_keys{state=\"live\"}")).context("no kvs_keys metric")?;
    Ok(line.rsplit(' ').next().unwrap_or("0").parse::<f64>()? as u64)
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let ok = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status()?.success();
    if !ok {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

async fn converge(args: ConvergeArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let partition: serde_json::Value =
        http.get(format!("http://{}/kv-store/get_partition_id", args.replica)).send().await?.json().await?;
    let partition = partition["partition_id"].as_i64().context("the replica reports no partition_id")?;
    let before = live_keys(&http, &args.replica).await?;
    signal(args.pause_pid, "STOP")?;
    // Write until `keys` of them landed in the paused replica's partition (others are forwarded
    // elsewhere and do not concern it).
    let written = async {
        let mut mine = 0;
        let mut i = 0u64;
        while mine < args.keys {
            i += 1;
            let resp = http
                .put(format!("http://{}/v1/kv/converge_{}_{i}", args.via, std::process::id()))
                .body("v")
                .send()
                .await?;
            if !resp.status().is_success() {
                bail!("write failed: {}", resp.status());
            }
            let w: serde_json::Value = resp.json().await?;
            if w["partition_id"].as_i64() == Some(partition) {
                mine += 1;
            }
        }
        Ok(())
    }
    .await;
    signal(args.pause_pid, "CONT")?;
    written?;
    let resumed = Instant::now();
    let deadline = resumed + Duration::from_secs(30);
    loop {
        let now = live_keys(&http, &args.replica).await.unwrap_or(0);
        if now >= before + args.keys {
            break;
        }
        if Instant::now() > deadline {
            bail!("replica did not converge within 30 s ({} of {} keys)", now.saturating_sub(before), args.keys);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ms = resumed.elapsed().as_secs_f64() * 1000.0;
    println!("{}", serde_json::json!({"converge_ms": ms, "keys": args.keys}));
    Ok(())
}

/// Live keys of each partition (first member's count).
fn partition_keys(status: &kvs_api::ClusterStatus) -> Vec<u64> {
    status.partitions.iter().map(|p| p.live_keys.first().copied().flatten().unwrap_or(0)).collect()
}

async fn rebalance(args: RebalanceArgs) -> anyhow::Result<()> {
    let admin = kvs_api::AdminClient::default().with_change_timeout(Duration::from_secs(3600));
    let members = args.load.endpoints.clone();
    let primary = members[0].clone();
    let t = Instant::now();
    preload(&args.load).await?;
    eprintln!("kvs-bench: preloaded {} keys in {:.1} s", args.load.keys, t.elapsed().as_secs_f64());
    let baseline = load(LoadArgs { preload: false, ..args.load.clone() }).await?;
    println!(
        "{}",
        serde_json::json!({"step": "baseline", "client_ops_per_sec": baseline.ops_per_sec, "p99_ms": baseline.p99_ms, "errors": baseline.errors})
    );
    let with_new: Vec<String> = members.iter().cloned().chain([args.add.clone()]).collect();
    for (step, target) in [("add", with_new), ("remove", members.clone())] {
        let before = admin.status(&primary).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let traffic = {
            let (a, stop) = (args.load.clone(), stop.clone());
            tokio::spawn(async move { measure(&a, stop).await })
        };
        let started = Instant::now();
        let changed = admin.change_view(&primary, target, args.replication_factor).await;
        let seconds = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let during = traffic.await??;
        let changed = changed.with_context(|| format!("{step} failed"))?;
        let after = admin.status(&primary).await?;
        let (p_before, p_after) = (partition_keys(&before), partition_keys(&after));
        // Keys that changed partition: the new partition's keys on add, the removed one's on remove.
        let distinct_moved =
            if p_after.len() > p_before.len() { p_after.last().copied() } else { p_before.last().copied() }
                .unwrap_or(0);
        let partitions = p_after.len().max(p_before.len()) as u64;
        let minimum = args.load.keys / partitions;
        let copies = changed.moved_keys;
        println!(
            "{}",
            serde_json::json!({
                "step": step,
                "seconds": seconds,
                "partitions_before": p_before.len(),
                "partitions_after": p_after.len(),
                "keys_changing_partition": distinct_moved,
                "minimum": minimum,
                "moved_vs_minimum": distinct_moved as f64 / minimum.max(1) as f64,
                "record_copies_sent": copies,
                "keys_per_sec": distinct_moved as f64 / seconds,
                "copies_per_sec": copies as f64 / seconds,
                "client_ops_per_sec": during.ops_per_sec,
                "client_p99_ms": during.p99_ms,
                "client_errors": during.errors,
            })
        );
    }
    Ok(())
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
            let r = load(a).await?;
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
        Cmd::Converge(a) => converge(a).await?,
        Cmd::Rebalance(a) => rebalance(a).await?,
    }
    Ok(())
}
