//! [`Peers`] over HTTP/1.1: one `POST /internal/v1/rpc` per call, postcard in the body, the cluster
//! token in a header, over a shared pool of keep-alive connections.

use super::{MAX_IN_FLIGHT_PER_PEER, PeerError, Peers, RPC_PATH, error_chain};
use crate::protocol::{PeerRequest, PeerResponse};
use async_trait::async_trait;
use kvs_api::HEADER_CLUSTER_TOKEN;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// [`Peers`] over HTTP/1.1 with a shared connection pool.
pub struct HttpPeers {
    http: reqwest::Client,
    token: Option<String>,
    /// Per peer: its parsed RPC URL (parsing one costs more than the rest of building a request)
    /// and the slots of its data lane. `std` lock, never held across `.await`.
    targets: std::sync::RwLock<HashMap<String, Target>>,
}

#[derive(Clone)]
struct Target {
    url: reqwest::Url,
    lane: Arc<Semaphore>,
}

impl HttpPeers {
    /// `connect_timeout` bounds TCP connection setup (a dead host must not cost more than this).
    /// `hosts_file` maps peer names to addresses ahead of DNS (see [`crate::hosts`]).
    /// `peer_idle_close`: how long peers keep an idle connection open (their header timeout);
    /// pooled connections are dropped well before, so a request never races a peer closing one.
    pub fn new(
        connect_timeout: Duration,
        token: Option<String>,
        hosts_file: Option<std::path::PathBuf>,
        peer_idle_close: Duration,
    ) -> Self {
        let mut builder = kvs_api::http_client();
        if let Some(path) = hosts_file {
            builder = builder.dns_resolver(std::sync::Arc::new(crate::hosts::HostsFileResolver::new(path)));
        }
        let http = builder
            .connect_timeout(connect_timeout)
            .pool_idle_timeout((peer_idle_close / 2).min(Duration::from_secs(30)))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .build()
            .expect("a plain HTTP client always builds");
        HttpPeers { http, token, targets: Default::default() }
    }

    fn target(&self, peer: &str) -> Result<Target, PeerError> {
        if let Some(t) = self.targets.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(peer) {
            return Ok(t.clone());
        }
        let url = reqwest::Url::parse(&format!("http://{peer}{RPC_PATH}")).map_err(|e| PeerError::Unreachable {
            peer: peer.to_owned(),
            detail: format!("not a valid address: {e}"),
        })?;
        let mut targets = self.targets.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let target = targets
            .entry(peer.to_owned())
            .or_insert_with(|| Target { url, lane: Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_PEER)) });
        Ok(target.clone())
    }
}

#[async_trait]
impl Peers for HttpPeers {
    async fn call(&self, peer: &str, request: &PeerRequest, timeout: Duration) -> Result<PeerResponse, PeerError> {
        let started = tokio::time::Instant::now();
        let target = self.target(peer)?;
        let _slot = if request.is_heartbeat() {
            None
        } else {
            let wait = tokio::time::timeout(timeout, target.lane.acquire_owned()).await;
            Some(
                wait.map_err(|_| PeerError::Timeout { peer: peer.to_owned(), timeout })?
                    .expect("the lane is never closed"),
            )
        };
        let remaining = timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(1));
        let body = postcard::to_stdvec(request).expect("serializing plain data into a Vec cannot fail");
        let mut req = self.http.post(target.url).timeout(remaining).body(body);
        if let Some(token) = &self.token {
            req = req.header(HEADER_CLUSTER_TOKEN, token);
        }
        // A connect timeout is a connection failure (nothing answers at that address), not a slow
        // peer: check it first.
        let classify = |e: reqwest::Error| match (e.is_connect(), e.is_timeout()) {
            (true, true) => PeerError::ConnectTimeout { peer: peer.to_owned() },
            (false, true) => PeerError::Timeout { peer: peer.to_owned(), timeout },
            _ => PeerError::Unreachable { peer: peer.to_owned(), detail: error_chain(&e) },
        };
        let resp = req.send().await.map_err(classify)?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(classify)?;
        if status != 200 {
            let body = String::from_utf8_lossy(&bytes).into_owned();
            return Err(PeerError::Rejected { peer: peer.to_owned(), status, body });
        }
        let response = postcard::from_bytes(&bytes)
            .map_err(|e| PeerError::Protocol { peer: peer.to_owned(), detail: e.to_string() })?;
        match response {
            PeerResponse::Refused(refusal) => Err(PeerError::Refused { peer: peer.to_owned(), refusal }),
            other => Ok(other),
        }
    }
}
