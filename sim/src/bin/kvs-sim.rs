//! `kvs-sim`: runs seeds of the deterministic simulation and reports every failing one with the
//! command that replays it.
//!
//!     cargo run --release -p kvs-sim -- --seed 42              # one seed, its summary
//!     cargo run --release -p kvs-sim -- --seeds 0..1000        # many, on every core

use clap::Parser;
use kvs_sim::{Config, Outcome, run_all};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "kvs-sim", about = "Deterministic simulation of kvstore clusters, judged by the history checker")]
struct Args {
    /// One seed to run (replays a failure bit for bit).
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// A range of seeds, `A..B`.
    #[arg(long, default_value = "0..100")]
    seeds: String,
    /// Virtual seconds of clients and faults per seed.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Parallel runs (default: one per CPU).
    #[arg(long)]
    jobs: Option<usize>,
    /// With --seed: print the nemesis's timeline and every operation on these keys (comma-separated).
    #[arg(long, value_delimiter = ',')]
    keys: Vec<String>,
}

fn print(o: &Outcome, config: &Config) {
    let faults: Vec<String> = o.faults.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "seed {}: {} ({} operations, {} acknowledged; faults: {}; fingerprint {:016x})",
        o.seed,
        if o.passed() { "ok" } else { "FAILED" },
        o.operations,
        o.acknowledged,
        faults.join(", "),
        o.fingerprint
    );
    for v in &o.violations {
        println!("  - {v}");
    }
    if !o.passed() {
        println!(
            "  replay: cargo run --release -p kvs-sim -- --seed {} --seconds {}",
            o.seed,
            config.duration.as_secs_f64()
        );
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    // The nodes' logs, for a replay: RUST_LOG=kvs_node=debug (off by default).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    }
    let config = Config { duration: Duration::from_secs_f64(a.seconds), ..Config::default() };
    let seeds: Vec<u64> = match a.seed {
        Some(s) => vec![s],
        None => {
            let (lo, hi) = a.seeds.split_once("..").ok_or_else(|| anyhow::anyhow!("--seeds is A..B, e.g. 0..1000"))?;
            (lo.parse()?..hi.parse()?).collect()
        }
    };
    let jobs = a.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let outcomes = run_all(&seeds, config, jobs);
    let failed = outcomes.iter().filter(|o| !o.passed()).count();
    for o in &outcomes {
        if a.seed.is_some() || !o.passed() {
            print(o, &config);
        }
        if a.seed.is_some() && !a.keys.is_empty() {
            for (t, what) in &o.timeline {
                println!("{:>10} µs  nemesis: {what}", t);
            }
            for op in o.history.iter().filter(|op| a.keys.contains(&op.key)) {
                println!(
                    "{:>10}–{:>10} µs  client {} {} {:?} → {:?}",
                    op.invoke, op.complete, op.client, op.key, op.kind, op.outcome
                );
            }
        }
    }
    println!("{} seeds, {failed} failed", outcomes.len());
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
