//! The one shutdown signal of both subcommands: SIGTERM (Kubernetes stopping the pod) or SIGINT
//! (Ctrl-C). Callers create the future once, before any work, so a signal that arrives while they
//! are busy is kept rather than lost.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Completes on SIGTERM or SIGINT. A signal that cannot be listened for is logged and left out
/// (the other still stops the process).
pub async fn shutdown_signal() {
    let listen = |kind: SignalKind, name: &str| match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, signal = name, "cannot listen for the signal; the other one still stops");
            None
        }
    };
    let (mut term, mut int) = (listen(SignalKind::terminate(), "SIGTERM"), listen(SignalKind::interrupt(), "SIGINT"));
    tokio::select! {
        _ = received(&mut term) => {}
        _ = received(&mut int) => {}
    }
}

async fn received(signal: &mut Option<Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
