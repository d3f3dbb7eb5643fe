//! A typed client for the native API (`/v1/kv`), carrying the causal context between calls the way
//! a real session should.

use crate::{ErrorBody, HEADER_CAUSAL_CONTEXT, HEADER_PARTITION, HEADER_TIMESTAMP, WriteResponse};
use bytes::Bytes;
use std::sync::Mutex;
use std::time::Duration;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("request to {node} failed: {source}")]
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

/// A value read back with its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub value: Bytes,
    pub partition_id: u32,
    pub timestamp: u64,
}

/// A client session against one node. Tracks the causal context of everything it has seen, so that
/// reads after writes (on any node) see those writes.
pub struct KvClient {
    http: reqwest::Client,
    node: String,
    /// The session's causal context. A `std` mutex: held only to copy a string, never across `.await`.
    context: Mutex<String>,
}

impl KvClient {
    /// A session talking to `node` (`host:port`), with a per-request timeout.
    pub fn new(node: impl Into<String>, timeout: Duration) -> Self {
        let http = reqwest::Client::builder().timeout(timeout).build().expect("a plain HTTP client always builds");
        KvClient { http, node: node.into(), context: Mutex::new(String::new()) }
    }

    /// The node this session talks to.
    pub fn node(&self) -> &str {
        &self.node
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

    fn url(&self, key: &str) -> String {
        format!("http://{}/v1/kv/{}", self.node, percent_encode(key))
    }

    fn transport(&self, source: reqwest::Error) -> ClientError {
        ClientError::Transport { node: self.node.clone(), source }
    }

    async fn fail(&self, resp: reqwest::Response) -> ClientError {
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<ErrorBody>(&text).map(|e| e.msg).unwrap_or(text);
        ClientError::Status { node: self.node.clone(), status, msg }
    }

    /// Reads `key`; `Ok(None)` when it does not exist (or was deleted).
    pub async fn get(&self, key: &str) -> Result<Option<Stored>, ClientError> {
        let resp = self
            .http
            .get(self.url(key))
            .header(HEADER_CAUSAL_CONTEXT, self.context())
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        self.remember(header(HEADER_CAUSAL_CONTEXT).as_deref());
        match resp.status().as_u16() {
            200 => {
                let partition_id = header(HEADER_PARTITION).and_then(|p| p.parse().ok());
                let timestamp = header(HEADER_TIMESTAMP).and_then(|t| t.parse().ok());
                let value = resp.bytes().await.map_err(|e| self.transport(e))?;
                match (partition_id, timestamp) {
                    (Some(partition_id), Some(timestamp)) => Ok(Some(Stored { value, partition_id, timestamp })),
                    _ => Err(ClientError::Protocol {
                        node: self.node.clone(),
                        detail: "missing Kvs-Partition or Kvs-Timestamp header".into(),
                    }),
                }
            }
            404 => Ok(None),
            _ => Err(self.fail(resp).await),
        }
    }

    /// Writes `value` under `key`.
    pub async fn put(&self, key: &str, value: impl Into<Bytes>) -> Result<WriteResponse, ClientError> {
        let req = self.http.put(self.url(key)).header(HEADER_CAUSAL_CONTEXT, self.context()).body(value.into());
        self.write(req).await
    }

    /// Deletes `key` (a tombstone that replicates like a write).
    pub async fn delete(&self, key: &str) -> Result<WriteResponse, ClientError> {
        let req = self.http.delete(self.url(key)).header(HEADER_CAUSAL_CONTEXT, self.context());
        self.write(req).await
    }

    async fn write(&self, req: reqwest::RequestBuilder) -> Result<WriteResponse, ClientError> {
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        if !resp.status().is_success() {
            return Err(self.fail(resp).await);
        }
        let body: WriteResponse = resp.json().await.map_err(|e| self.transport(e))?;
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
