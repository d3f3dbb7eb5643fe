//! A typed client for the native API (`/v1/kv`), carrying the causal context between calls the way
//! a real session should.
//!
//! Two ways to reach the cluster: through one node (any node forwards to the owners), or routed
//! ([`KvClient::routed`]): the client fetches the cluster map and sends each request to an owner of
//! its key, saving the forwarding hop. A routed client fetches the map again when an answer says the
//! cluster moved to a newer view epoch, or when the node it chose cannot be reached (then the
//! request goes to a seed node instead, which forwards it).

use crate::routing::{CLUSTER_MAP_PATH, ClusterMap, Router};
use crate::tls::{ClientTls, Scheme};
use crate::{ErrorBody, HEADER_CAUSAL_CONTEXT, HEADER_PARTITION, HEADER_TIMESTAMP, HEADER_VIEW_EPOCH, WriteResponse};
use bytes::Bytes;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer: the message carries every cause down to the root (a refused connection, a
    /// certificate not valid for the name, a timeout), since reqwest's own says only "error
    /// sending request".
    #[error("request to {node} failed: {}", causes(source))]
    Transport { node: String, source: reqwest::Error },
    #[error("{node} answered {status}: {msg}")]
    Status { node: String, status: u16, msg: String },
    #[error("{node} sent an unexpected answer: {detail}")]
    Protocol { node: String, detail: String },
}

impl ClientError {
    /// The HTTP status, when the node answered at all.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// `error: cause: root cause`, each cause once (a cause that repeats its parent's text is skipped).
fn causes(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut next = std::error::Error::source(error);
    while let Some(cause) = next {
        let part = cause.to_string();
        if !text.ends_with(&part) {
            text = format!("{text}: {part}");
        }
        next = cause.source();
    }
    text
}

/// A value read back with its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub value: Bytes,
    pub partition_id: u32,
    pub timestamp: u64,
}

/// A client session. Tracks the causal context of everything it has seen, so that reads after
/// writes (on any node) see those writes.
pub struct KvClient {
    http: reqwest::Client,
    /// `http` or `https`, as the client's TLS settings say.
    scheme: Scheme,
    /// The node every request goes to, or (routed) the node used when the map is missing or its
    /// choice cannot be reached.
    node: String,
    /// Routed sessions: the cluster map, ready to route. `std` lock, held only to clone the `Arc`.
    router: Option<RwLock<Option<Arc<Router>>>>,
    /// The session's causal context. A `std` mutex: held only to copy a string, never across `.await`.
    context: Mutex<String>,
}

impl KvClient {
    /// A session talking to `node` (`host:port`), with a per-request timeout.
    pub fn new(node: impl Into<String>, timeout: Duration) -> Self {
        Self::with_token(node, timeout, None)
    }

    /// A session that sends `token` with every request as `Authorization: Bearer` (a token of the
    /// nodes' auth file, or the cluster token), when one is given.
    pub fn with_token(node: impl Into<String>, timeout: Duration, token: Option<&str>) -> Self {
        Self::connect(node, timeout, token, &ClientTls::plain())
    }

    /// A session over `tls` (plain HTTP, or TLS trusting the cluster's CA), sending `token` as
    /// [`KvClient::with_token`] does.
    pub fn connect(node: impl Into<String>, timeout: Duration, token: Option<&str>, tls: &ClientTls) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(value) = token.and_then(crate::bearer_header) {
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = tls
            .http_client()
            .timeout(timeout)
            .default_headers(headers)
            .build()
            .expect("an HTTP client with checked TLS settings builds");
        KvClient { http, scheme: tls.scheme(), node: node.into(), router: None, context: Mutex::new(String::new()) }
    }

    /// A session that sends each request straight to an owner of its key, learning the cluster map
    /// from `seed` (`host:port`, any node) and falling back to it.
    pub async fn routed(seed: impl Into<String>, timeout: Duration) -> Result<Self, ClientError> {
        KvClient::new(seed, timeout).into_routed().await
    }

    /// This session, routed ([`KvClient::routed`]): its node becomes the seed.
    pub async fn into_routed(mut self) -> Result<Self, ClientError> {
        self.router = Some(RwLock::new(None));
        self.refresh_map().await?;
        Ok(self)
    }

    /// Continues a session from a causal context saved earlier ([`KvClient::context`]), e.g. by a
    /// command-line tool between runs: reads then see every write that context had seen.
    pub fn with_context(self, context: impl Into<String>) -> Self {
        *self.context.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = context.into();
        self
    }

    /// The node this session talks to (routed: its seed).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The cluster map a routed session routes by.
    pub fn cluster_map(&self) -> Option<ClusterMap> {
        self.current_router().map(|r| r.map().clone())
    }

    fn current_router(&self) -> Option<Arc<Router>> {
        self.router.as_ref()?.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Fetches the cluster map from the seed node (routed sessions).
    pub async fn refresh_map(&self) -> Result<(), ClientError> {
        let Some(slot) = &self.router else { return Ok(()) };
        let url = self.scheme.url(&self.node, CLUSTER_MAP_PATH);
        let resp = self.http.get(url).send().await.map_err(|e| self.transport(&self.node, e))?;
        if !resp.status().is_success() {
            return Err(self.fail(&self.node, resp).await);
        }
        let map: ClusterMap = resp.json().await.map_err(|e| self.transport(&self.node, e))?;
        *slot.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(Router::new(map)));
        Ok(())
    }

    /// Where an operation on `key` goes.
    fn node_for(&self, key: &str) -> String {
        self.current_router()
            .and_then(|r| r.node_for(key.as_bytes()).map(str::to_owned))
            .unwrap_or_else(|| self.node.clone())
    }

    /// Fetches the map again if `resp` comes from a newer view than the one routed by.
    async fn follow_epoch(&self, resp: &reqwest::Response) {
        let Some(router) = self.current_router() else { return };
        let epoch = resp.headers().get(HEADER_VIEW_EPOCH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if epoch.is_some_and(|e| e > router.epoch()) {
            // A failed refresh keeps the old map: requests still reach a node that forwards them.
            let _ = self.refresh_map().await;
        }
    }

    /// Sends a request built for `node`; a routed session whose chosen owner cannot be reached
    /// (the request never left) sends it to its seed instead and fetches the map again.
    async fn send(
        &self,
        node: String,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<(String, reqwest::Response), ClientError> {
        match build(&node).send().await {
            Ok(resp) => {
                self.follow_epoch(&resp).await;
                Ok((node, resp))
            }
            Err(e) if e.is_connect() && self.router.is_some() && node != self.node => {
                let _ = self.refresh_map().await;
                let resp = build(&self.node).send().await.map_err(|e| self.transport(&self.node, e))?;
                Ok((self.node.clone(), resp))
            }
            Err(e) => Err(self.transport(&node, e)),
        }
    }

    /// The session's current causal context.
    pub fn context(&self) -> String {
        self.context.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn remember(&self, context: Option<&str>) {
        if let Some(c) = context.filter(|c| !c.is_empty()) {
            *self.context.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = c.to_owned();
        }
    }

    fn url(&self, node: &str, key: &str) -> String {
        self.scheme.url(node, &format!("/v1/kv/{}", percent_encode(key)))
    }

    fn transport(&self, node: &str, source: reqwest::Error) -> ClientError {
        ClientError::Transport { node: node.to_owned(), source }
    }

    async fn fail(&self, node: &str, resp: reqwest::Response) -> ClientError {
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<ErrorBody>(&text).map(|e| e.msg).unwrap_or(text);
        ClientError::Status { node: node.to_owned(), status, msg }
    }

    /// Reads `key`; `Ok(None)` when it does not exist (or was deleted).
    pub async fn get(&self, key: &str) -> Result<Option<Stored>, ClientError> {
        let context = self.context();
        let (node, resp) = self
            .send(self.node_for(key), |node| {
                self.http.get(self.url(node, key)).header(HEADER_CAUSAL_CONTEXT, context.as_str())
            })
            .await?;
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        self.remember(header(HEADER_CAUSAL_CONTEXT).as_deref());
        match resp.status().as_u16() {
            200 => {
                let partition_id = header(HEADER_PARTITION).and_then(|p| p.parse().ok());
                let timestamp = header(HEADER_TIMESTAMP).and_then(|t| t.parse().ok());
                let value = resp.bytes().await.map_err(|e| self.transport(&node, e))?;
                match (partition_id, timestamp) {
                    (Some(partition_id), Some(timestamp)) => Ok(Some(Stored { value, partition_id, timestamp })),
                    _ => Err(ClientError::Protocol {
                        node,
                        detail: "missing Kvs-Partition or Kvs-Timestamp header".into(),
                    }),
                }
            }
            404 => Ok(None),
            _ => Err(self.fail(&node, resp).await),
        }
    }

    /// Writes `value` under `key`.
    pub async fn put(&self, key: &str, value: impl Into<Bytes>) -> Result<WriteResponse, ClientError> {
        let (context, value) = (self.context(), value.into());
        let sent = self
            .send(self.node_for(key), |node| {
                self.http.put(self.url(node, key)).header(HEADER_CAUSAL_CONTEXT, context.as_str()).body(value.clone())
            })
            .await?;
        self.write(sent).await
    }

    /// Deletes `key` (a tombstone that replicates like a write).
    pub async fn delete(&self, key: &str) -> Result<WriteResponse, ClientError> {
        let context = self.context();
        let sent = self
            .send(self.node_for(key), |node| {
                self.http.delete(self.url(node, key)).header(HEADER_CAUSAL_CONTEXT, context.as_str())
            })
            .await?;
        self.write(sent).await
    }

    async fn write(&self, (node, resp): (String, reqwest::Response)) -> Result<WriteResponse, ClientError> {
        if !resp.status().is_success() {
            return Err(self.fail(&node, resp).await);
        }
        let body: WriteResponse = resp.json().await.map_err(|e| self.transport(&node, e))?;
        self.remember(Some(&body.causal_context));
        Ok(body)
    }
}

/// Percent-encodes a key for a path segment (everything but unreserved characters).
pub fn percent_encode(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
