//! kvstore node: a sharded, replicated, durable key-value server that speaks the course-era HW4 API
//! and a native `/v1` API.
//!
//! Layers, each in its own module:
//! - pure logic: [`placement`] (key → slot → partition), [`causal`] (vector clocks, HLC),
//!   [`view`] (membership), [`freshness`] (what a replica provably holds), [`liveness`] (the
//!   failure detector's state machine), [`admission`] (the client-request bound);
//! - boundaries: [`store`] (storage engine behind a trait), [`peers`] (network behind a trait);
//! - the protocol: [`protocol`] (every node-to-node message and refusal, typed);
//! - state: [`node`] (views, clocks, store, liveness; calling a peer);
//! - behaviour, each an `impl Node` over that state: [`ops`] (the client-operation path: route,
//!   forward, coordinate, replicate), [`view_change`] (coordinator, participant, transfer, with
//!   its decisions as pure state machines), [`anti_entropy`] (replica repair, and with it
//!   [`catch_up`]: whether a started node holds its partition's data), [`heartbeat`]
//!   (the failure detector's heartbeats, off the request path), [`backup`] (reading a partition
//!   as of a cut while clients write, and restoring), `status`, `rpc` (answering peers);
//! - surface: [`http`] (thin handlers), [`metrics`], [`config`].

pub mod admission;
pub mod anti_entropy;
pub mod auth;
pub mod backup;
pub mod catch_up;
pub mod causal;
pub mod config;
mod fence;
pub mod freshness;
pub mod heartbeat;
pub mod hosts;
pub mod http;
pub mod liveness;
pub mod metrics;
pub mod node;
pub mod ops;
mod peer_server;
pub mod peers;
pub mod placement;
pub mod protocol;
mod rpc;
mod status;
pub mod store;
pub mod tls;
pub mod view;
pub mod view_change;
pub mod view_store;
pub mod watched;

pub use heartbeat::HttpHeartbeats;
use node::Node;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How a node serves connections: limits that keep it responsive to everyone when some clients
/// misbehave, and how it stops.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// Open connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Time a client may take to send a request's headers (slowloris), counted from when the
    /// connection starts waiting for a request: it is also how long an idle keep-alive
    /// connection is kept open (hyper has one timer for both). Clients that pool connections
    /// must drop them sooner, or retry a request on a connection the node just closed.
    pub header_timeout: Duration,
    /// How long the node drains before it stops, once told to: it reports not ready, keeps
    /// accepting and serving, and closes each client connection after its next answer
    /// (`Connection: close`). Clients that pool connections move off on their own, and requests
    /// already on their way find the node still serving: closing an idle keep-alive connection
    /// at once races a request a client may be sending on it, which then fails unanswered. Behind
    /// a load balancer it should outlast the balancer noticing the node is not ready (Kubernetes:
    /// the endpoint's removal). Zero stops at once, for a node run by hand.
    pub shutdown_delay: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions { max_connections: 4096, header_timeout: Duration::from_secs(75), shutdown_delay: Duration::ZERO }
    }
}

/// Serves `node` on `listener` and runs its background work until `shutdown` completes; then stops
/// accepting, finishes in-flight requests and returns.
pub async fn run(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_with_options(listener, node, ServeOptions::default(), shutdown).await
}

/// [`run`] with explicit options. Once `shutdown` completes the node drains for
/// `options.shutdown_delay` (see [`ServeOptions::shutdown_delay`]), then stops accepting, lets
/// in-flight requests finish, closes idle connections and returns.
pub async fn run_with_options(
    listener: TcpListener,
    node: Arc<Node>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let shutdown = {
        let (node, delay) = (node.clone(), options.shutdown_delay);
        async move {
            shutdown.await;
            if !delay.is_zero() {
                node.start_draining();
                tracing::info!(
                    ?delay,
                    "draining before the shutdown: not ready, still serving, closing each client connection after its next answer"
                );
                tokio::time::sleep(delay).await;
            }
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let udp_heartbeats = match listener
        .local_addr()
        .and_then(|addr| heartbeat::UdpHeartbeats::start(node.clone(), addr))
    {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start UDP heartbeats; peers are watched over HTTP only (slower to tell busy from dead)");
            None
        }
    };
    let mode = if udp_heartbeats.is_some() { HttpHeartbeats::Fallback } else { HttpHeartbeats::Only };
    let background = tokio::spawn(run_background(node.clone(), mode, async move {
        let mut rx = stop_rx;
        let _ = rx.wait_for(|&s| s).await;
    }));
    let app = http::router(node.clone());
    // Each connection holds a permit; a full server answers 503 instead of queueing forever.
    let permits = Arc::new(tokio::sync::Semaphore::new(options.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // Peer connections (the framed protocol) stop taking calls when this turns true.
    let (peers_stop_tx, peers_stop_rx) = tokio::sync::watch::channel(false);
    let peer_connections = tokio_util::task::TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tokio::spawn(refuse_connection(stream));
            continue;
        };
        let connection = Connection {
            node: node.clone(),
            app: app.clone(),
            watcher: graceful.watcher(),
            peers_stop: peers_stop_rx.clone(),
            peer_connections: peer_connections.clone(),
            within: options.header_timeout,
        };
        let tls = node.settings().tls.clone();
        tokio::spawn(async move {
            match tls {
                None => connection.serve_plain(stream).await,
                Some(tls) => connection.serve_tls(stream, &tls).await,
            }
            drop(permit);
        });
    }
    tracing::info!("shutting down: finishing in-flight requests");
    drop(listener);
    // Background work stops only after the last request: requests in flight may still depend
    // on the failure detector's heartbeats (to give up on a replica that died meanwhile).
    let _ = peers_stop_tx.send(true);
    peer_connections.close();
    tokio::join!(graceful.shutdown(), peer_connections.wait());
    let _ = stop_tx.send(true);
    let _ = background.await;
    if let Some(h) = udp_heartbeats {
        tokio::task::spawn_blocking(move || h.stop()).await.ok();
    }
    Ok(())
}

/// What serving one accepted connection needs.
struct Connection {
    node: Arc<Node>,
    app: axum::Router,
    watcher: hyper_util::server::graceful::Watcher,
    /// Turns true when the node starts shutting down (peer connections stop taking calls).
    peers_stop: tokio::sync::watch::Receiver<bool>,
    peer_connections: tokio_util::task::TaskTracker,
    /// Bounds the first byte, the TLS handshake and the peer handshake, as the header timeout
    /// bounds a request's headers.
    within: Duration,
}

impl Connection {
    /// Plain TCP: peers open with a zero byte (see `peers::wire`), which never starts an HTTP
    /// request.
    async fn serve_plain(self, stream: tokio::net::TcpStream) {
        match self.until_stopping(first_byte(&stream, self.within)).await.flatten() {
            Some(0) => {
                let serving = peer_server::serve_plain(self.node.clone(), stream, self.within, self.peers_stop.clone());
                self.peer_connections.track_future(serving).await;
            }
            Some(_) => self.serve_http(stream, tls::Channel::Plain, None).await,
            None => {}
        }
    }

    /// TLS: the handshake first (a plain-HTTP client is told to use TLS), then the first byte
    /// inside it tells a peer from HTTP, as on plain TCP.
    async fn serve_tls(self, stream: tokio::net::TcpStream, tls: &tls::Tls) {
        use tokio::io::AsyncReadExt;
        // Every TLS connection opens with a handshake record (content type 22).
        match self.until_stopping(first_byte(&stream, self.within)).await.flatten() {
            Some(0x16) => {}
            Some(_) => return refuse_plaintext(stream).await,
            None => return,
        }
        let accepting = tokio::time::timeout(self.within, tls.acceptor().accept(stream));
        let mut stream = match self.until_stopping(accepting).await {
            None => return,
            Some(Ok(Ok(stream))) => stream,
            Some(Ok(Err(e))) => return tracing::debug!(error = %e, "TLS handshake failed"),
            Some(Err(_)) => return,
        };
        let presented = stream.get_ref().1.peer_certificates().and_then(|c| c.first());
        let subject = presented.and_then(|c| tls::common_name(c)).map(tls::ClientSubject);
        let channel = tls::Channel::Tls { client_certificate: presented.is_some() };
        let first = match self.until_stopping(tokio::time::timeout(self.within, stream.read_u8())).await {
            Some(Ok(Ok(byte))) => byte,
            _ => return,
        };
        let stream = tls::Rewound::new(first, stream);
        if first == 0 {
            let (read, write) = tokio::io::split(stream);
            let serving =
                peer_server::serve(self.node.clone(), read, write, channel, self.within, self.peers_stop.clone());
            self.peer_connections.track_future(serving).await;
        } else {
            self.serve_http(stream, channel, subject).await;
        }
    }

    /// `step`, unless the node starts shutting down first (`None`). Until a connection's first
    /// byte tells what it is, it holds a place in the graceful shutdown: a connection that stays
    /// silent (or is mid-handshake) must not hold the shutdown up for the header timeout.
    async fn until_stopping<T>(&self, step: impl std::future::Future<Output = T>) -> Option<T> {
        let mut stopping = self.peers_stop.clone();
        tokio::select! {
            // A step that is ready (a request's first bytes already arrived) goes on: dropping
            // the connection then would leave that request unanswered.
            biased;
            out = step => Some(out),
            _ = stopping.wait_for(|s| *s) => None,
        }
    }

    /// HTTP/1.1 on `stream`; every request carries the `channel` it came over and the client
    /// certificate's `subject`, if any (for the guard).
    async fn serve_http<S>(self, stream: S, channel: tls::Channel, subject: Option<tls::ClientSubject>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        use tower::ServiceExt;
        let app = self.app.map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(channel);
            if let Some(subject) = &subject {
                req.extensions_mut().insert(subject.clone());
            }
            req
        });
        let service = hyper_util::service::TowerToHyperService::new(app);
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.within)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let _ = self.watcher.watch(connection).await;
    }
}

/// Answers a plain-HTTP request on a TLS port with a 400 that says to use TLS, then closes.
async fn refuse_plaintext(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Read what the client sent first (a request's head fits in one read here): closing a socket
    // with unread data resets the connection, and the client would see a reset instead of why.
    let mut request = [0u8; 8192];
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut request)).await;
    let body = format!(r#"{{"result":"error","msg":"{}"}}"#, tls::PLAINTEXT_REFUSED);
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(response.as_bytes())).await;
    let _ = stream.shutdown().await;
}

/// The first byte a new connection sends, without consuming it; `None` if the connection closes
/// or stays silent for `within`.
async fn first_byte(stream: &tokio::net::TcpStream, within: Duration) -> Option<u8> {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(within, stream.peek(&mut byte)).await {
        Ok(Ok(1)) => Some(byte[0]),
        _ => None,
    }
}

/// Runs a node's background work — anti-entropy with view gossip, and heartbeats over the peer
/// transport — until `shutdown` completes. [`run`] starts it beside the HTTP server; a simulated
/// cluster runs it alone, calling nodes directly.
pub async fn run_background(node: Arc<Node>, heartbeats: HttpHeartbeats, shutdown: impl Future<Output = ()> + Send) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|&s| s).await;
        }
    };
    let repair = anti_entropy::run(node.clone(), stopped());
    let beats = heartbeat::run_http(node, heartbeats, stopped());
    let stop = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    tokio::join!(repair, beats, stop);
}

/// Answers a connection over the limit with a 503 that says why, then closes it.
async fn refuse_connection(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = r#"{"result":"error","msg":"too many open connections to this node; retry later or use another node"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(response.as_bytes())).await;
}
