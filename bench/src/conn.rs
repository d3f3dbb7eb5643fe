//! One load-generating client: a closed loop of PUTs and GETs against one target, one request at a
//! time.
//!
//! HTTP targets run on dedicated HTTP/1.1 connections driven by hyper (no pool, no URL parsing), so
//! the load generator spends as little CPU as possible next to the servers it measures. A routed
//! kvstore client keeps one connection per node and sends each request to an owner of its key,
//! by the cluster map (`kvs_api::Router`). Redis runs through the `redis` crate.

use crate::Target;
use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const FORM: &str = "application/x-www-form-urlencoded";
const JSON: &str = "application/json";

/// How a client reaches its target.
#[derive(Clone)]
pub struct Route {
    /// Where requests go (and, routed, where keys without an owner in the map go).
    pub endpoint: String,
    /// Routed kvstore clients: the cluster map.
    pub router: Option<Arc<kvs_api::Router>>,
    /// Redis: after each write, wait until this many replicas acknowledged it (`WAIT n 0`).
    pub redis_wait: Option<u32>,
}

/// One client.
pub enum Conn {
    Http(HttpConn),
    Redis(RedisConn),
}

impl Conn {
    pub fn new(route: Route, target: Target, causal: bool) -> Self {
        match target {
            Target::Redis => Conn::Redis(RedisConn { route, conn: None }),
            _ => Conn::Http(HttpConn { route, target, senders: HashMap::new(), context: String::new(), causal }),
        }
    }

    pub async fn put(&mut self, key: &str, value: &Bytes) -> anyhow::Result<()> {
        match self {
            Conn::Http(c) => c.put(key, value).await,
            Conn::Redis(c) => c.put(key, value).await,
        }
    }

    pub async fn get(&mut self, key: &str) -> anyhow::Result<()> {
        match self {
            Conn::Http(c) => c.get(key).await,
            Conn::Redis(c) => c.get(key).await,
        }
    }
}

pub struct HttpConn {
    route: Route,
    target: Target,
    /// One connection per node this client has talked to.
    senders: HashMap<String, SendRequest<Full<Bytes>>>,
    context: String,
    causal: bool,
}

impl HttpConn {
    fn endpoint_for(&self, key: &str) -> String {
        self.route.router.as_ref().and_then(|r| r.node_for(key.as_bytes())).unwrap_or(&self.route.endpoint).to_owned()
    }

    async fn connect(&mut self, endpoint: &str) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        if self.senders.get(endpoint).is_none_or(|s| s.is_closed()) {
            let tcp =
                tokio::net::TcpStream::connect(endpoint).await.with_context(|| format!("connecting to {endpoint}"))?;
            tcp.set_nodelay(true)?;
            let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
            tokio::spawn(connection);
            self.senders.insert(endpoint.to_owned(), sender);
        }
        Ok(self.senders.get_mut(endpoint).expect("just connected"))
    }

    async fn send(
        &mut self,
        endpoint: String,
        method: http::Method,
        path: String,
        content_type: Option<&str>,
        body: Bytes,
        is_get: bool,
    ) -> anyhow::Result<()> {
        let mut req = http::Request::builder().method(method).uri(path).header(http::header::HOST, endpoint.as_str());
        if let Some(ct) = content_type {
            req = req.header(http::header::CONTENT_TYPE, ct);
        }
        if self.causal && self.target == Target::Kvs {
            req = req.header(kvs_api::HEADER_CAUSAL_CONTEXT, self.context.as_str());
        }
        let req = req.body(Full::new(body))?;
        let sender = self.connect(&endpoint).await?;
        sender.ready().await?;
        let resp = match tokio::time::timeout(ANSWER_DEADLINE, sender.send_request(req)).await {
            Ok(r) => r?,
            Err(_) => {
                self.senders.remove(&endpoint);
                bail!("no answer within {ANSWER_DEADLINE:?}");
            }
        };
        let status = resp.status();
        if self.causal
            && self.target == Target::Kvs
            && let Some(c) = resp.headers().get(kvs_api::HEADER_CAUSAL_CONTEXT).and_then(|v| v.to_str().ok())
            && !c.is_empty()
        {
            self.context = c.to_owned();
        }
        let body = resp.into_body().collect().await?.to_bytes();
        if self.causal
            && self.target == Target::Hw4
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
            && let Some(c) = v["causal_payload"].as_str()
            && !c.is_empty()
        {
            self.context = c.to_owned();
        }
        if status.is_success() || (is_get && status.as_u16() == 404) {
            Ok(())
        } else {
            bail!("{status}: {}", String::from_utf8_lossy(&body))
        }
    }

    fn hw4_form(fields: &[(&str, &str)]) -> Bytes {
        let mut out = String::new();
        for (i, (k, v)) in fields.iter().enumerate() {
            if i > 0 {
                out.push('&');
            }
            out.push_str(k);
            out.push('=');
            out.push_str(&kvs_api::percent_encode(v));
        }
        Bytes::from(out)
    }

    async fn put(&mut self, key: &str, value: &Bytes) -> anyhow::Result<()> {
        let endpoint = self.endpoint_for(key);
        match self.target {
            Target::Kvs => {
                self.send(endpoint, http::Method::PUT, format!("/v1/kv/{key}"), None, value.clone(), false).await
            }
            Target::Hw4 => {
                let ctx = if self.causal { self.context.clone() } else { String::new() };
                let body = Self::hw4_form(&[("val", &String::from_utf8_lossy(value)), ("causal_payload", &ctx)]);
                self.send(endpoint, http::Method::PUT, format!("/kv-store/{key}"), Some(FORM), body, false).await
            }
            Target::Etcd => {
                let body =
                    serde_json::to_vec(&serde_json::json!({"key": B64.encode(key), "value": B64.encode(value)}))?;
                self.send(endpoint, http::Method::POST, "/v3/kv/put".into(), Some(JSON), body.into(), false).await
            }
            Target::Redis => unreachable!("redis clients are RedisConn"),
        }
    }

    async fn get(&mut self, key: &str) -> anyhow::Result<()> {
        let endpoint = self.endpoint_for(key);
        match self.target {
            Target::Kvs => {
                self.send(endpoint, http::Method::GET, format!("/v1/kv/{key}"), None, Bytes::new(), true).await
            }
            Target::Hw4 => {
                let ctx = if self.causal { self.context.clone() } else { String::new() };
                let body = Self::hw4_form(&[("causal_payload", &ctx)]);
                self.send(endpoint, http::Method::GET, format!("/kv-store/{key}"), Some(FORM), body, true).await
            }
            Target::Etcd => {
                let body = serde_json::to_vec(&serde_json::json!({"key": B64.encode(key)}))?;
                self.send(endpoint, http::Method::POST, "/v3/kv/range".into(), Some(JSON), body.into(), true).await
            }
            Target::Redis => unreachable!("redis clients are RedisConn"),
        }
    }
}

/// How long any client waits for an answer before it counts the request as failed.
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);

/// A Redis client on one connection of its own.
pub struct RedisConn {
    route: Route,
    conn: Option<redis::aio::MultiplexedConnection>,
}

impl RedisConn {
    async fn connection(&mut self) -> anyhow::Result<&mut redis::aio::MultiplexedConnection> {
        if self.conn.is_none() {
            let client = redis::Client::open(format!("redis://{}/", self.route.endpoint))?;
            // The same deadline as the HTTP clients: the redis crate's default (500 ms) would count
            // a slow `WAIT` as an error where an HTTP request of that latency counts as latency.
            let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(ANSWER_DEADLINE));
            self.conn = Some(client.get_multiplexed_async_connection_with_config(&config).await?);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    async fn put(&mut self, key: &str, value: &Bytes) -> anyhow::Result<()> {
        let wait = self.route.redis_wait;
        let conn = self.connection().await?;
        let mut pipe = redis::pipe();
        pipe.set(key, value.as_ref()).ignore();
        match wait {
            Some(replicas) => {
                pipe.cmd("WAIT").arg(replicas).arg(0);
                let (acked,): (u32,) = pipe.query_async(conn).await?;
                if acked < replicas {
                    bail!("WAIT {replicas} 0 answered {acked}");
                }
            }
            None => pipe.query_async::<()>(conn).await?,
        }
        Ok(())
    }

    async fn get(&mut self, key: &str) -> anyhow::Result<()> {
        let conn = self.connection().await?;
        let _: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(conn).await?;
        Ok(())
    }
}
