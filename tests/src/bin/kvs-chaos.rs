//! `kvs-chaos`: a fault-injection run for humans. Starts a cluster, runs clients while injecting
//! faults from a seed, heals, checks the history and prints a summary table.
//!
//!     cargo run --release -p kvs-e2e --bin kvs-chaos -- --seconds 120 --seed 7
//!
//! Network partitions need root (network namespaces); without root the run uses loopback and
//! injects pauses, crashes and view changes only.

use clap::Parser;
use kvs_e2e::chaos::{Plan, run};
use kvs_e2e::cluster::{Network, namespaces_available};

#[derive(Parser, Debug)]
#[command(name = "kvs-chaos", about = "Fault-injection run against real kvstore nodes, checked by a history checker")]
struct Args {
    /// How long clients run while faults are injected.
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    /// Seed for the client mix and the fault schedule (replays a run).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Initial members.
    #[arg(long, default_value_t = 4)]
    members: usize,
    /// Nodes started without a view, for view changes.
    #[arg(long, default_value_t = 2)]
    spares: usize,
    /// Replication factor.
    #[arg(short, long, default_value_t = 2)]
    k: u32,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Keys the clients share.
    #[arg(long, default_value_t = 40)]
    keys: usize,
    /// Use loopback even when network namespaces are available.
    #[arg(long)]
    loopback: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Write the whole history and the nemesis's timeline to this file (JSON), for post-mortems.
    #[arg(long)]
    history: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let network = if !a.loopback && namespaces_available() {
        Network::Namespaces
    } else {
        eprintln!("kvs-chaos: network namespaces need root and iproute2; using loopback (no partitions)");
        Network::Loopback
    };
    let plan = Plan {
        network,
        seed: a.seed,
        seconds: a.seconds,
        members: a.members,
        spares: a.spares,
        k: a.k,
        clients: a.clients,
        keys: a.keys,
        history_out: a.history,
    };
    let summary = run(plan).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{}", summary.table());
    }
    if summary.lost > 0 || summary.causal_violations > 0 || summary.convergence_ms.is_none() {
        std::process::exit(1);
    }
    Ok(())
}
