//! `kvs-operator`. `kvs-operator local -f examples/cluster.yaml` runs a KVStoreCluster on this
//! machine without Kubernetes: node processes on loopback, data under a local directory, the
//! same planner and view-change driver as in Kubernetes. Edit `replicas` or `replicationFactor`
//! in the file and it rebalances with a progress display; Ctrl-C stops everything; running it
//! again resumes with the data.

use anyhow::Context;
use clap::{Parser, Subcommand};
use kvs_operator::controller::plan::Step;
use kvs_operator::controller::validate::{Validated, validate};
use kvs_operator::crd::KVStoreCluster;
use kvs_operator::driver::{Admin, Backend, observe};
use kvs_operator::local::{LocalBackend, default_node_binary};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

#[derive(Parser, Debug)]
#[command(name = "kvs-operator", version, about = "Operator for kvstore clusters")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a KVStoreCluster from a YAML file on this machine, without Kubernetes.
    Local(LocalArgs),
}

#[derive(Parser, Debug)]
struct LocalArgs {
    /// The KVStoreCluster manifest (watched: edits are applied).
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// Where the nodes keep their data (`<data-dir>/<name>/pod-N`).
    #[arg(long, env = "KVS_LOCAL_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Nodes listen on `<address-base><ordinal+1>:8080`.
    #[arg(long, env = "KVS_LOCAL_ADDRESS_BASE", default_value = "127.0.0.")]
    address_base: String,
    /// The kvs-node binary. Default: next to this executable.
    #[arg(long, env = "KVS_NODE_BIN")]
    node_bin: Option<PathBuf>,
}

fn load(path: &Path) -> anyhow::Result<(KVStoreCluster, Validated)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cluster: KVStoreCluster = serde_yaml::from_str(&text).with_context(|| format!("{} is not a KVStoreCluster", path.display()))?;
    let valid = validate(&cluster.spec).with_context(|| format!("{} has an invalid spec", path.display()))?;
    Ok((cluster, valid))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn describe(step: &Step, status: Option<&kvs_api::ClusterStatus>) -> String {
    let view = status.and_then(|s| s.layout.as_ref()).map_or("no view yet".to_owned(), |l| {
        format!("epoch {} · {} partitions × K={} · {} proxies", l.epoch, l.partitions.len(), l.replication_factor, l.proxies.len())
    });
    let action = match step {
        Step::Done => "in sync".to_owned(),
        Step::ScaleStatefulSet { replicas } => format!("setting pods to {replicas}"),
        Step::WaitForPods { ordinals } => format!("waiting for pods {ordinals:?}"),
        Step::ChangeView { members, replication_factor, .. } => {
            format!("moving data to a view of {} nodes at K={replication_factor}", members.len())
        }
    };
    format!("{view} — {action}")
}

async fn run_local(a: LocalArgs) -> anyhow::Result<()> {
    let (cluster, mut spec) = load(&a.file)?;
    let name = cluster.metadata.name.clone().unwrap_or_else(|| "kvstore".into());
    let node_bin = a.node_bin.unwrap_or_else(default_node_binary);
    let data_dir = a.data_dir.join(&name);
    let mut backend = LocalBackend::start(node_bin, data_dir.clone(), a.address_base, &spec)?;
    println!("kvs-operator local: cluster {name:?}, data in {}, watching {}", data_dir.display(), a.file.display());
    if let Some(d) = &spec.degraded {
        println!("  degraded: {d}");
    }
    let admin = std::sync::Arc::new(Admin::default());
    let mut seen_mtime = modified(&a.file);
    let mut last_line = String::new();
    let mut change: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    // Created once, before any work: a signal that arrives while a step runs is kept, not lost.
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticker.tick() => {}
        }
        if modified(&a.file) != seen_mtime {
            seen_mtime = modified(&a.file);
            match load(&a.file) {
                Ok((_, new)) => {
                    println!(
                        "spec changed: {} replicas, K={} (was {}, K={})",
                        new.replicas, new.replication_factor, spec.replicas, spec.replication_factor
                    );
                    spec = new;
                }
                Err(e) => println!("ignoring the edit: {e:#}"),
            }
        }
        if let Some(task) = &change {
            // A view change is moving data: show its progress, plan again when it is done.
            if !task.is_finished() {
                let pods = backend.pods().await;
                if let Some(r) = admin.status(&pods).await.map(|s| s.rebalance) {
                    let line = format!("  rebalancing to epoch {}: {} — {}/{} keys moved", r.epoch, r.phase, r.moved_keys, r.total_keys);
                    if line != last_line {
                        println!("{line}");
                        last_line = line;
                    }
                }
                continue;
            }
            // Finished, so awaiting it returns at once.
            if let Some(task) = change.take()
                && let Ok(Err(e)) = task.await
            {
                println!("view change failed (will retry): {e:#}");
            }
        }
        let obs = observe(&mut backend, &admin, &spec).await;
        let line = describe(&obs.step, obs.status.as_ref());
        if line != last_line {
            println!("{line}");
            last_line = line;
        }
        match obs.step {
            Step::ScaleStatefulSet { replicas } => {
                if let Err(e) = backend.set_replicas(replicas, &spec).await {
                    println!("scaling failed: {e:#}");
                }
            }
            Step::ChangeView { primary, members, replication_factor } => {
                let admin = admin.clone();
                change = Some(tokio::spawn(async move { admin.change_view(&primary, members, replication_factor).await }));
            }
            Step::WaitForPods { .. } | Step::Done => {}
        }
    }
    println!("stopping the nodes (data kept in {})", data_dir.display());
    backend.stop_all();
    Ok(())
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    match Args::parse().cmd {
        Cmd::Local(a) => run_local(a).await,
    }
}
