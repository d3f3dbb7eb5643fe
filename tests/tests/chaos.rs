//! Bounded fault-injection runs for CI, with fixed seeds. Each fails with the checker's findings.
//! The namespace runs need root (CI has it); elsewhere they are skipped with a message.

use kvs_e2e::chaos::{Plan, run};
use kvs_e2e::cluster::{Network, namespaces_available};

async fn check(network: Network, seed: u64, seconds: f64) {
    // The whole history and the nemesis's timeline, kept for a post-mortem (a failure names it).
    let history = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{network:?}-seed-{seed}.json"));
    let plan = Plan {
        network,
        seed,
        seconds,
        members: 4,
        spares: 2,
        k: 2,
        clients: 6,
        keys: 30,
        history_out: Some(history.clone()),
    };
    let summary = run(plan).await.expect("the run completes");
    println!("{}", summary.table());
    println!("history and nemesis timeline: {}", history.display());
    assert!(summary.acknowledged_writes > 50, "the workload made progress: {}", summary.acknowledged_writes);
    assert_eq!(summary.lost, 0, "lost writes:\n{}", summary.table());
    assert_eq!(summary.causal_violations, 0, "causal violations:\n{}", summary.table());
    assert!(summary.convergence_ms.is_some(), "replicas converged after healing");
    assert!(
        summary.faults.get("K change").is_some_and(|&n| n >= 1),
        "the run changed K for real:\n{}",
        summary.table()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_pauses_crashes_and_view_changes_seed_1() {
    check(Network::Loopback, 1, 12.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_partitions_pauses_crashes_and_view_changes_seed_2() {
    if !namespaces_available() {
        eprintln!("SKIPPED: network namespaces need root and iproute2 (CI runs as root)");
        return;
    }
    check(Network::Namespaces, 2, 12.0).await;
}
