//! The deterministic simulation in CI: a thousand seeds of whole clusters under faults, every one
//! judged by the history checker, and a check that a seed replays bit for bit. A failing seed
//! prints the command that replays it. `KVS_SIM_SEEDS=A..B` runs another range.

use kvs_sim::{Config, run_all, run_seed};

fn seeds() -> std::ops::Range<u64> {
    let range = std::env::var("KVS_SIM_SEEDS").unwrap_or_else(|_| "0..1000".into());
    let (lo, hi) = range.split_once("..").expect("KVS_SIM_SEEDS is A..B");
    lo.parse().expect("a number")..hi.parse().expect("a number")
}

#[test]
fn a_thousand_seeds_lose_no_write_and_break_no_causal_read() {
    let seeds: Vec<u64> = seeds().collect();
    let jobs = std::thread::available_parallelism().map_or(1, usize::from);
    let config = Config::default();
    let outcomes = run_all(&seeds, config, jobs);
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(|o| {
            format!(
                "seed {}: {}\n  replay: cargo run --release -p kvs-sim -- --seed {} --seconds {}",
                o.seed,
                o.violations.join("; "),
                o.seed,
                config.duration.as_secs_f64()
            )
        })
        .collect();
    let operations: usize = outcomes.iter().map(|o| o.operations).sum();
    println!("{} seeds, {operations} operations, {} failed", outcomes.len(), failed.len());
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(operations > 100 * seeds.len(), "the workload made progress: {operations} operations");
}

#[test]
fn a_seed_replays_bit_for_bit() {
    let config = Config::default();
    let (a, b) = (run_seed(7, config), run_seed(7, config));
    assert_eq!(a.fingerprint, b.fingerprint, "same seed, same history");
    assert_eq!((a.operations, &a.faults), (b.operations, &b.faults));
    assert_ne!(run_seed(8, config).fingerprint, a.fingerprint, "another seed, another history");
}
