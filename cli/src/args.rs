//! The command line, as clap parses it (and as `kvsctl completion` describes it to shells).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "kvsctl",
    version,
    about = "Read and write kvstore keys, watch the cluster, preview view changes.",
    after_help = "Exit codes: 0 done; 1 the cluster could not do it (unreachable, 5xx, a failed change); \
                  2 usage; 3 key not found; 4 the request or a local file is wrong (4xx, unreadable file)."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Nodes to talk to (host:port, comma-separated); the next is tried when one cannot be reached.
    #[arg(long, env = "KVS_ENDPOINTS", value_delimiter = ',', default_value = "127.0.0.1:8080", global = true)]
    pub endpoints: Vec<String>,
    /// File holding a token, sent with every request: the cluster token (admin commands need it
    /// when the cluster has one), or a token of the nodes' auth file (its role decides what
    /// commands may do).
    #[arg(long, env = "KVS_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// CA bundle (PEM) that signed the nodes' certificates: talk TLS (`https://`) to a cluster
    /// started with `--tls-*` (the operator's `<cluster>-tls-ca` Secret, key `ca.crt`).
    #[arg(long, env = "KVS_CACERT", global = true)]
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM) to present over TLS, for nodes that require one; with `--key`.
    #[arg(long = "cert", env = "KVS_CERT", global = true, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM); with `--cert`.
    #[arg(long = "key", env = "KVS_KEY", global = true, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// How answers are printed.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    /// Longest one request may take, in seconds.
    #[arg(long, default_value_t = 10.0, global = true)]
    pub timeout: f64,
}

impl Global {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout.max(0.001))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people: values as they are, tables for the rest.
    Table,
    /// One JSON document per command, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a key's value (exit code 3 when it does not exist).
    Get {
        key: String,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Store a value under a key (`-` reads the value from standard input).
    Put {
        key: String,
        value: String,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Delete a key.
    Del {
        key: String,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// The view, partitions, members and key counts; while a view change runs, its progress
    /// until it ends.
    Status {
        /// Print at once, even while a view change runs.
        #[arg(long)]
        no_wait: bool,
    },
    /// What a view change would move, per node, without making it.
    Plan(PlanArgs),
    /// Back the cluster up (a consistent cut while clients keep writing), or verify a backup.
    Backup(BackupArgs),
    /// Restore a backup into this (empty) cluster, whatever its size and K.
    Restore {
        /// Where the backup is (s3://bucket/prefix, gs://…, az://…, file:///dir or a path).
        #[arg(long)]
        from: String,
        /// Restore into a cluster that already holds keys (the newer version of each key wins).
        #[arg(long)]
        overwrite: bool,
    },
    /// Print a shell completion script (e.g. `kvsctl completion bash > /etc/bash_completion.d/kvsctl`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct SessionArgs {
    /// Keep the causal context in this file between runs, so a read sees the writes of earlier
    /// runs that used the same file (created when missing).
    #[arg(long, env = "KVS_CONTEXT_FILE")]
    pub context_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Nodes after the change; new ones are named after the current ones' numbering (as a
    /// StatefulSet numbers pods), and a smaller number removes the highest.
    #[arg(long, conflicts_with = "members")]
    pub replicas: Option<usize>,
    /// The exact members after the change (host:port, comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub members: Option<Vec<String>>,
    /// Replicas per partition after the change (default: unchanged).
    #[arg(long)]
    pub replication_factor: Option<u32>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub action: Option<BackupAction>,
    /// Where to write it: s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, file:///dir
    /// or a path (credentials from the environment, see docs/cli.md). Must hold no backup yet.
    #[arg(long)]
    pub to: Option<String>,
    /// The cluster's name, recorded in the manifest.
    #[arg(long)]
    pub cluster_name: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum BackupAction {
    /// Re-read a backup and check every file against its manifest (counts, sizes, SHA-256).
    Verify {
        /// Where the backup is.
        url: String,
    },
}
