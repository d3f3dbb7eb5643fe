//! The load itself: a preload of every key, then every connection running its GET/PUT mix in a
//! closed loop until the time is up, with latencies in one histogram.

use crate::conn::{Conn, Route};
use crate::{LoadArgs, Report, Target};
use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The cluster map, for routed kvstore clients (fetched from the first endpoint).
async fn router(args: &LoadArgs) -> anyhow::Result<Option<Arc<kvs_api::Router>>> {
    if !args.routed {
        return Ok(None);
    }
    if args.target != Target::Kvs {
        bail!("--routed needs --target kvs");
    }
    let seed = &args.endpoints[0];
    let client = kvs_api::KvClient::routed(seed.clone(), Duration::from_secs(10))
        .await
        .with_context(|| format!("fetching the cluster map from {seed}"))?;
    let map = client.cluster_map().context("a routed client has a map")?;
    Ok(Some(Arc::new(kvs_api::Router::new(map))))
}

/// Connection `c`'s route: endpoints round-robin, the map when routed.
fn route(args: &LoadArgs, c: usize, router: &Option<Arc<kvs_api::Router>>) -> Route {
    Route {
        endpoint: args.endpoints[c % args.endpoints.len()].clone(),
        router: router.clone(),
        redis_wait: args.redis_wait,
    }
}

pub fn key_name(i: u64) -> String {
    format!("key_{i:08}")
}

pub fn value_of(size: usize) -> Bytes {
    Bytes::from((0..size).map(|i| b'a' + (i % 26) as u8).collect::<Vec<u8>>())
}

pub async fn load(args: LoadArgs) -> anyhow::Result<Report> {
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
/// Writes every key, then measures a baseline under the load shape, printing both (the start of
/// every benchmark that changes a loaded cluster).
pub async fn preload_and_baseline(args: &LoadArgs) -> anyhow::Result<Report> {
    let t = Instant::now();
    preload(args).await?;
    eprintln!("kvs-bench: preloaded {} keys in {:.1} s", args.keys, t.elapsed().as_secs_f64());
    let baseline = load(LoadArgs { preload: false, ..args.clone() }).await?;
    println!(
        "{}",
        serde_json::json!({"step": "baseline", "client_ops_per_sec": baseline.ops_per_sec, "p99_ms": baseline.p99_ms, "errors": baseline.errors})
    );
    Ok(baseline)
}

pub async fn preload(args: &LoadArgs) -> anyhow::Result<()> {
    let router = router(args).await?;
    let value = value_of(args.value_size);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let (next, value, keys) = (next.clone(), value.clone(), args.keys);
        let mut conn = Conn::new(route(args, c, &router), args.target, false);
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
pub async fn measure(args: &LoadArgs, stop: Arc<AtomicBool>) -> anyhow::Result<Report> {
    let router = router(args).await?;
    let value = value_of(args.value_size);
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let (value, errors, a, stop) = (value.clone(), errors.clone(), args.clone(), stop.clone());
        let mut conn = Conn::new(route(&a, c, &router), a.target, a.causal);
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
