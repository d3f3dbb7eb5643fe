//! `kvs-operator`: `run` is the Kubernetes controller (leader-elected, with `/metrics`, `/healthz`
//! and `/readyz`); `local -f examples/cluster.yaml` runs a KVStoreCluster on this machine without
//! Kubernetes (see `kvs_operator::local`).

use clap::{Parser, Subcommand};
use kvs_operator::local::{LocalArgs, run_local};
use kvs_operator::serve::{RunArgs, run};

#[derive(Parser, Debug)]
#[command(name = "kvs-operator", version, about = "Operator for kvstore clusters")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the controller against a Kubernetes cluster (in-cluster config or KUBECONFIG).
    Run(RunArgs),
    /// Run a KVStoreCluster from a YAML file on this machine, without Kubernetes.
    Local(LocalArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::Run(a) => run(a).await,
        Cmd::Local(a) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
                )
                .init();
            run_local(a).await
        }
    }
}
