//! The failure detector's heartbeats: every `heartbeat_interval` this node pings each other
//! member of its view (and of a pending view) that has no ping outstanding, and feeds the answers
//! to [`crate::liveness`]. A ping waits as long as it takes: a late answer is still proof of
//! life; silence is judged by the detector, not by a timeout here.

use crate::liveness::Death;
use crate::node::Node;
use crate::peers::{PeerError, PeerRequest};
use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest one ping is kept waiting for (a ping this late has long been judged by the detector).
const PING_LIMIT: Duration = Duration::from_secs(30);

/// Pings peers until `shutdown` completes.
pub async fn run(node: Arc<Node>, shutdown: impl Future<Output = ()>) {
    let mut ticker = tokio::time::interval(node.liveness.config().heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Peers with a ping outstanding. `std` mutex: held only to insert or remove.
    let outstanding: Arc<Mutex<HashSet<String>>> = Arc::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = ticker.tick() => {}
        }
        let peers = node.peers_to_watch();
        for peer in &peers {
            if !outstanding.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(peer.clone()) {
                continue;
            }
            let (node, outstanding, peer) = (node.clone(), outstanding.clone(), peer.clone());
            tokio::spawn(async move {
                match node.peers.call(&peer, &PeerRequest::Ping, PING_LIMIT).await {
                    // A refusal (say, a wrong cluster token) is an answer too.
                    Ok(_) | Err(PeerError::Refused { .. }) => node.liveness.heartbeat(&peer),
                    Err(PeerError::Unreachable { .. }) => node.liveness.connection_failed(&peer, Death::Refused),
                    Err(PeerError::ConnectTimeout { .. }) => node.liveness.connection_failed(&peer, Death::Unreachable),
                    Err(e) => tracing::debug!(peer = %peer, error = %e, "heartbeat not answered"),
                }
                outstanding.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&peer);
            });
        }
        node.liveness.tick(&peers);
    }
}
