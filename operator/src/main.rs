//! `kvs-operator`: `run` is the Kubernetes controller (leader-elected, with `/metrics`, `/healthz`
//! and `/readyz`); `local -f examples/cluster.yaml` runs a KVStoreCluster on this machine without
//! Kubernetes (see `kvs_operator::local`).

use clap::{Parser, Subcommand};
use kvs_operator::local::{LocalArgs, run_local};
use kvs_operator::serve::{RunArgs, run};
use kvs_operator::telemetry::{LogFormat, init_logging};

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
        Cmd::Run(a) => {
            init_logging(a.log_format, "info,kube=warn");
            run(a).await
        }
        Cmd::Local(a) => {
            // Quiet unless asked (RUST_LOG): the progress lines are the local mode's output.
            init_logging(LogFormat::Text, "warn");
            run_local(a).await
        }
    }
}
