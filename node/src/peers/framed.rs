//! [`Peers`] over the framed protocol ([`super::wire`]): one long-lived TCP connection per peer,
//! many calls in flight on it, answered in any order.
//!
//! Per peer a [`Link`] holds the data lane (at most [`MAX_IN_FLIGHT_PER_PEER`] data calls) and
//! the current connection. A connection is two tasks: a writer that gathers every frame queued
//! meanwhile into one write, and a reader that hands each answer to the call waiting for its id.
//!
//! Invariants:
//! - A call waits for its answer at most until its deadline; an answer that comes later is
//!   dropped. A late answer is slowness ([`PeerError::Timeout`]), never death.
//! - When a connection breaks (reset, closed, undecodable), every call waiting on it fails at once
//!   with [`PeerError::Unreachable`] (the peer's process is gone, or the stream cannot be trusted),
//!   and the next call connects again. A connection is never reused after it broke.
//! - A peer that answers the preface with something that is not a frame (an older node that only
//!   speaks HTTP, during a rolling upgrade) is called over HTTP for [`HTTP_ONLY_FOR`], then frames
//!   are tried again; the call that found out is sent again over HTTP at once: that node could not
//!   have performed it, since it never parsed it.

use super::wire::{self, AnswerFrame};
use super::{HttpPeers, MAX_IN_FLIGHT_PER_PEER, PeerError, Peers, error_chain};
use crate::hosts::HostsFileResolver;
use crate::protocol::{PeerRequest, PeerResponse};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

/// [`Peers`] over framed TCP connections, with HTTP for peers that do not speak frames.
pub struct FramedPeers {
    token: Vec<u8>,
    connect_timeout: Duration,
    hosts: Option<HostsFileResolver>,
    /// For peers that answered the preface with something else than frames.
    http: HttpPeers,
    /// `std` lock, never held across `.await`.
    links: std::sync::RwLock<HashMap<String, Arc<Link>>>,
    /// Calls go over TLS with this, when set (see [`FramedPeers::with_tls`]).
    tls: Option<Arc<crate::tls::Tls>>,
}

/// Everything about calling one peer.
struct Link {
    lane: Arc<Semaphore>,
    /// The current connection. An async lock because the caller that finds none connects while
    /// holding it (the others wait for that connection rather than opening their own).
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// The peer did not speak frames: call it over HTTP until then. `std` lock, never held across
    /// `.await`.
    http_until: Mutex<Option<Instant>>,
}

/// One TCP connection to a peer.
struct Connection {
    /// Frames for the writer task (closed when the writer stopped).
    frames: mpsc::UnboundedSender<Bytes>,
    calls: Arc<Calls>,
    next_id: AtomicU64,
}

/// The calls waiting for an answer on one connection. `std` lock, never held across `.await`.
#[derive(Default)]
struct Calls {
    state: Mutex<CallsState>,
    /// An answer frame arrived (so the peer speaks frames).
    answered: AtomicBool,
}

#[derive(Default)]
struct CallsState {
    /// `Some(reason)` once the connection broke: no call can be added any more.
    broken: Option<PeerError>,
    waiting: HashMap<u64, oneshot::Sender<Result<PeerResponse, PeerError>>>,
}

type Answer = Result<PeerResponse, PeerError>;

impl Calls {
    fn lock(&self) -> std::sync::MutexGuard<'_, CallsState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn add(&self, id: u64) -> Result<oneshot::Receiver<Answer>, PeerError> {
        let mut state = self.lock();
        if let Some(broken) = &state.broken {
            return Err(broken.clone());
        }
        let (tx, rx) = oneshot::channel();
        state.waiting.insert(id, tx);
        Ok(rx)
    }

    fn forget(&self, id: u64) {
        self.lock().waiting.remove(&id);
    }

    fn answer(&self, id: u64, response: PeerResponse) {
        self.answered.store(true, Ordering::Release);
        if let Some(tx) = self.lock().waiting.remove(&id) {
            // The caller may have given up meanwhile: nobody to tell.
            let _ = tx.send(Ok(response));
        }
    }

    /// Marks the connection broken and fails every waiting call with `error`.
    fn break_all(&self, error: PeerError) {
        let waiting = {
            let mut state = self.lock();
            if state.broken.is_none() {
                state.broken = Some(error.clone());
            }
            std::mem::take(&mut state.waiting)
        };
        for (_, tx) in waiting {
            let _ = tx.send(Err(error.clone()));
        }
    }

    fn is_broken(&self) -> bool {
        self.lock().broken.is_some()
    }
}

/// What the reader saw that shows the peer does not speak frames.
const NOT_FRAMES: &str = "the peer does not speak the framed protocol";

/// How long a peer that did not speak frames is called over HTTP before frames are tried again.
pub const HTTP_ONLY_FOR: Duration = Duration::from_secs(60);

impl FramedPeers {
    /// `connect_timeout` bounds TCP connection setup (a dead host must not cost more than this).
    /// `hosts_file` maps peer names to addresses ahead of DNS (see [`crate::hosts`]).
    /// `peer_idle_close` is for the HTTP fallback (see [`HttpPeers::new`]).
    pub fn new(
        connect_timeout: Duration,
        token: Option<String>,
        hosts_file: Option<std::path::PathBuf>,
        peer_idle_close: Duration,
    ) -> Self {
        let http = HttpPeers::new(connect_timeout, token.clone(), hosts_file.clone(), peer_idle_close);
        FramedPeers {
            token: token.map(String::into_bytes).unwrap_or_default(),
            connect_timeout,
            hosts: hosts_file.map(HostsFileResolver::new),
            http,
            links: Default::default(),
            tls: None,
        }
    }

    /// Calls peers over TLS with `tls` (mutual: this node's certificate is the client
    /// certificate), when given. TLS connections never fall back to HTTP.
    pub fn with_tls(mut self, tls: Option<Arc<crate::tls::Tls>>) -> Self {
        self.tls = tls;
        self
    }

    fn link(&self, peer: &str) -> Arc<Link> {
        if let Some(link) = self.links.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(peer) {
            return link.clone();
        }
        let mut links = self.links.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        links
            .entry(peer.to_owned())
            .or_insert_with(|| {
                Arc::new(Link {
                    lane: Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_PEER)),
                    conn: tokio::sync::Mutex::new(None),
                    http_until: Mutex::new(None),
                })
            })
            .clone()
    }

    /// The address of `peer` (`host:port`): the hosts file first, then the system resolver.
    async fn resolve(&self, peer: &str) -> Result<SocketAddr, PeerError> {
        let unreachable = |detail: String| PeerError::Unreachable { peer: peer.to_owned(), detail };
        if let Ok(addr) = peer.parse::<SocketAddr>() {
            return Ok(addr);
        }
        let (host, port) = peer.rsplit_once(':').ok_or_else(|| unreachable("not a host:port address".into()))?;
        let port: u16 = port.parse().map_err(|_| unreachable(format!("{port:?} is not a port")))?;
        if let Some(ip) = self.hosts.as_ref().and_then(|h| h.lookup(host)) {
            return Ok(SocketAddr::new(ip, port));
        }
        let mut addrs = tokio::net::lookup_host((host, port)).await.map_err(|e| unreachable(e.to_string()))?;
        addrs.next().ok_or_else(|| unreachable(format!("{host} has no address")))
    }

    /// The connection to `peer`, connecting if there is none (or it broke).
    async fn connection(&self, peer: &str, link: &Link, deadline: Instant) -> Result<Arc<Connection>, PeerError> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        let mut current = tokio::time::timeout_at(deadline, link.conn.lock())
            .await
            .map_err(|_| PeerError::Timeout { peer: peer.to_owned(), timeout })?;
        if let Some(conn) = current.as_ref().filter(|c| !c.calls.is_broken()) {
            return Ok(conn.clone());
        }
        let addr = self.resolve(peer).await?;
        let connect_by = deadline.min(Instant::now() + self.connect_timeout);
        // Connecting (TCP, then TLS when on) ran out of time: the connect timeout's, or the call's.
        let late = || match connect_by < deadline {
            true => PeerError::ConnectTimeout { peer: peer.to_owned() },
            false => PeerError::Timeout { peer: peer.to_owned(), timeout },
        };
        let stream = match tokio::time::timeout_at(connect_by, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(PeerError::Unreachable { peer: peer.to_owned(), detail: error_chain(&e) }),
            Err(_) => return Err(late()),
        };
        let conn = match &self.tls {
            None => Connection::start_plain(peer, stream, &self.token),
            Some(tls) => {
                let name = crate::tls::server_name(peer)
                    .map_err(|detail| PeerError::Unreachable { peer: peer.to_owned(), detail })?;
                let _ = stream.set_nodelay(true);
                let stream = match tokio::time::timeout_at(connect_by, tls.connector().connect(name, stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        let detail = format!("TLS handshake failed: {}", error_chain(&e));
                        return Err(PeerError::Unreachable { peer: peer.to_owned(), detail });
                    }
                    Err(_) => return Err(late()),
                };
                let (read, write) = tokio::io::split(stream);
                Connection::start(peer, read, write, &self.token)
            }
        };
        *current = Some(conn.clone());
        Ok(conn)
    }

    async fn call_framed(
        &self,
        peer: &str,
        link: &Link,
        request: &PeerRequest,
        deadline: Instant,
        timeout: Duration,
    ) -> Answer {
        let conn = self.connection(peer, link, deadline).await?;
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let answer = conn.calls.add(id)?;
        if conn.frames.send(wire::call(id, request)).is_err() {
            conn.calls.forget(id);
            let detail = "the connection closed before the call was sent".to_owned();
            return Err(PeerError::Unreachable { peer: peer.to_owned(), detail });
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => {
                let detail = "the connection closed without an answer".to_owned();
                Err(PeerError::Unreachable { peer: peer.to_owned(), detail })
            }
            Err(_) => {
                conn.calls.forget(id);
                Err(PeerError::Timeout { peer: peer.to_owned(), timeout })
            }
        }
    }
}

impl Link {
    fn lock_http_until(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.http_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn speaks_frames(&self) -> bool {
        let mut until = self.lock_http_until();
        match *until {
            Some(t) if Instant::now() < t => false,
            Some(_) => {
                *until = None;
                true
            }
            None => true,
        }
    }
}

impl Connection {
    /// Starts the writer and reader of a new connection; the preface and the token go first.
    fn start_plain(peer: &str, stream: TcpStream, token: &[u8]) -> Arc<Connection> {
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        Connection::start(peer, read, write, token)
    }

    fn start<R, W>(peer: &str, read: R, mut write: W, token: &[u8]) -> Arc<Connection>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (frames, queue) = mpsc::unbounded_channel();
        let calls = Arc::new(Calls::default());
        frames.send(wire::auth(token)).expect("the queue was just made");
        let writer_calls = calls.clone();
        let writer_peer = peer.to_owned();
        tokio::spawn(async move {
            let written = async {
                write.write_all(wire::PREFACE).await?;
                wire::write_frames(write, queue).await
            };
            if let Err(e) = written.await {
                writer_calls.break_all(PeerError::Unreachable { peer: writer_peer, detail: error_chain(&e) });
            }
        });
        tokio::spawn(read_answers(peer.to_owned(), FramedRead::new(read, wire::codec()), calls.clone()));
        Arc::new(Connection { frames, calls, next_id: AtomicU64::new(1) })
    }
}

/// Hands each answer to its call until the connection ends, then fails the calls still waiting.
async fn read_answers<R: AsyncRead + Unpin>(
    peer: String,
    mut frames: FramedRead<R, tokio_util::codec::LengthDelimitedCodec>,
    calls: Arc<Calls>,
) {
    let broken = loop {
        // `garbled`: what came is not a frame (as opposed to a connection that ended).
        let (detail, garbled) = match frames.next().await {
            Some(Ok(frame)) => match wire::decode_answer(&frame) {
                Ok(AnswerFrame::Answer { id, response }) => {
                    calls.answer(id, response);
                    continue;
                }
                Ok(AnswerFrame::Reject { message }) => {
                    break PeerError::Rejected { peer, status: 401, body: message };
                }
                Err(e) => (format!("undecodable frame: {e}"), true),
            },
            Some(Err(e)) => (error_chain(&e), e.kind() == std::io::ErrorKind::InvalidData),
            None => ("the peer closed the connection".to_owned(), false),
        };
        if garbled && !calls.answered.load(Ordering::Acquire) {
            // Nothing framed ever came back and what came is not a frame: an HTTP-only peer.
            break PeerError::Protocol { peer, detail: format!("{NOT_FRAMES}: {detail}") };
        }
        break PeerError::Unreachable { peer, detail };
    };
    calls.break_all(broken);
}

#[async_trait]
impl Peers for FramedPeers {
    async fn call(&self, peer: &str, request: &PeerRequest, timeout: Duration) -> Result<PeerResponse, PeerError> {
        let deadline = Instant::now() + timeout;
        let link = self.link(peer);
        if !link.speaks_frames() {
            return self.http.call(peer, request, timeout).await;
        }
        let _slot = if request.is_heartbeat() {
            None
        } else {
            let slot = tokio::time::timeout_at(deadline, link.lane.clone().acquire_owned()).await;
            Some(
                slot.map_err(|_| PeerError::Timeout { peer: peer.to_owned(), timeout })?
                    .expect("the lane is never closed"),
            )
        };
        let result = match self.call_framed(peer, &link, request, deadline, timeout).await {
            // Over TLS every node speaks frames (HTTP peers cannot be called with TLS).
            Err(PeerError::Protocol { detail, .. }) if detail.starts_with(NOT_FRAMES) && self.tls.is_none() => {
                tracing::info!(peer, "peer does not speak the framed protocol; calling it over HTTP for a while");
                *link.lock_http_until() = Some(Instant::now() + HTTP_ONLY_FOR);
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                return self.http.call(peer, request, left).await;
            }
            other => other,
        };
        match result? {
            PeerResponse::Refused(refusal) => Err(PeerError::Refused { peer: peer.to_owned(), refusal }),
            other => Ok(other),
        }
    }
}
