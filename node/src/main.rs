//! `kvs-node`: starts one node from flags or the HW4 environment (`K`, `VIEW`, `IPPORT`, `LISTEN`).

use anyhow::Context;
use clap::Parser;
use kvs_node::config::{Args, LogFormat};
use kvs_node::node::Node;
use kvs_node::peers::{FramedPeers, HttpPeers, Peers, Transport};
use kvs_node::store::RedbStore;
use std::sync::Arc;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// mimalloc instead of the system allocator: a request allocates and frees dozens of small
/// buffers (headers, keys, records, futures), and glibc's malloc spent about 8% of a loaded
/// node's CPU on them (profiled with perf; docs/benchmarks.md has the before and after).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);
    raise_open_files_limit();
    let runtime = match args.worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread().worker_threads(n.max(1)).enable_all().build(),
        None => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    }
    .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let settings = args.settings()?;
    let view = args.initial_view()?;
    let listen = args.listen_addr()?;

    // The HW4 start gives no data directory: keep data in a temporary one for this process's life.
    let temp;
    let data_dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("kvs-node-")
                .tempdir()
                .context("creating a temporary data directory")?;
            temp.path().to_owned()
        }
    };
    let mut settings = settings;
    settings.state_dir = Some(data_dir.clone());
    let store =
        Arc::new(RedbStore::open(&data_dir).with_context(|| format!("opening the store in {}", data_dir.display()))?);
    let connect_timeout = Duration::from_millis(args.connect_timeout_ms);
    let (token, hosts, idle) =
        (settings.cluster_token.clone(), args.hosts_file.clone(), args.serve_options().header_timeout);
    let peers: Arc<dyn Peers> = match args.peer_transport {
        Transport::Framed => {
            Arc::new(FramedPeers::new(connect_timeout, token, hosts, idle).with_tls(settings.tls.clone()))
        }
        Transport::Http => Arc::new(HttpPeers::new(connect_timeout, token, hosts, idle)),
    };
    if let Some(tls) = settings.tls.clone() {
        // Rotated certificates (a renewed Secret) take effect for new connections within a second.
        tokio::spawn(tls.watch(Duration::from_secs(1)));
    }
    if let Some(gate) = settings.auth.clone() {
        // Mounted Secrets change in place: tokens added or revoked take effect within a second.
        tokio::spawn(gate.watch(Duration::from_secs(1)));
    }
    let node = Node::new(settings, view, store, peers);
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    tracing::info!(node = %node.id(), %listen, data_dir = %data_dir.display(), has_view = node.view().is_some(), "kvs-node serving");
    let stop = shutdown_signal(args.exit_with_parent.then(std::os::unix::process::parent_id));
    kvs_node::run_with_options(listener, node, args.serve_options(), stop).await.context("serving HTTP")?;
    tracing::info!("stopped");
    Ok(())
}

/// Every client connection and every connection to a peer is a file descriptor: a node serving
/// thousands of them needs more than the usual soft limit of 1024, so it takes the hard limit.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open files limit; many connections may fail with EMFILE")
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves on Ctrl-C, on SIGTERM, or — with `parent` (`--exit-with-parent`) — once this process's
/// parent is no longer `parent` (it exited and this process was handed to another).
async fn shutdown_signal(parent: Option<u32>) {
    let parent_gone = async {
        let Some(parent) = parent else { return std::future::pending::<()>().await };
        loop {
            // A process whose parent exits is adopted by init (or a subreaper): its parent changes.
            if std::os::unix::process::parent_id() != parent {
                tracing::info!(parent, "the process that started this node exited; stopping (--exit-with-parent)");
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the node");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {}, _ = parent_gone => {} }
}
