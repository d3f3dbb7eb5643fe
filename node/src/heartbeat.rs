//! The failure detector's heartbeats, kept off the request path.
//!
//! **UDP, on a thread of its own.** Every `heartbeat_interval` this node sends each other member
//! of its view (and of a pending view) a ping datagram on the node's own address and port (UDP
//! beside the HTTP server's TCP), and answers every ping it receives with a pong. A dedicated OS
//! thread does it, so a node whose request path is saturated — thousands of clients queued,
//! every tokio worker busy — still answers in microseconds: heartbeats measure whether a process
//! is alive and reachable, not how busy it is. A stopped process, a cut link or a dead host
//! answer nothing, and the detector ([`crate::liveness`]) judges the silence.
//!
//! Both a pong and a peer's own ping prove the peer alive. Before each judgement the thread
//! reads every datagram waiting in its socket, so if this node was stopped or starved, the pings
//! its peers sent meanwhile are heard first and its own stall is not taken for their silence.
//! Only the answer to the latest ping teaches the detector a peer's rhythm (answers read late, in
//! a burst, would teach it nonsense).
//!
//! Names the system resolver must look up are looked up on a thread of their own ([`Resolver`]):
//! a lookup that hangs (cluster DNS timing out for a pod that is being replaced) must not stop
//! this thread from answering and judging, or a slow resolver would look like the death of every
//! peer and of this node. Addresses and names in the hosts file are resolved here, at once, as
//! before. A peer whose name does not resolve yet is not pinged (and goes silent, as it should:
//! nobody can reach it by name); a ping from any watched peer still proves it alive.
//!
//! **HTTP, as a fallback.** A peer whose heartbeats have not been answered for five intervals
//! (datagrams may not get through: a firewall that passes only TCP) is also sent the `Ping` RPC
//! over the normal peer transport, every interval: its answers count as "heard" (never as
//! evidence of death by their slowness). Peers that answer datagrams cost no HTTP at all.
//!
//! With a cluster token, every datagram carries an HMAC-SHA1 tag of its content under the token,
//! and a pong must echo a recent ping's sequence number: nobody without the token can make a dead
//! node look alive (or a live one dead: datagrams never declare anyone dead).

use crate::liveness::Death;
use crate::node::Node;
use crate::peers::PeerError;
use crate::protocol::PeerRequest;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak, mpsc};
use std::time::{Duration, Instant};

/// Longest one HTTP ping is kept waiting for.
const PING_LIMIT: Duration = Duration::from_secs(30);
/// How often every peer's name is looked up again (a pod that comes back may have a new
/// address). A peer the heartbeat thread has no address for is looked up at once.
const RESOLVE_EVERY: Duration = Duration::from_secs(2);
/// Pongs are accepted for this many of the latest pings sent to a peer.
const RECENT_SEQS: u64 = 64;

/// One datagram.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Beat {
    Ping { from: String, seq: u64 },
    Pong { from: String, seq: u64 },
}

/// A datagram on the wire: the beat and its tag (zeros without a token).
#[derive(Serialize, Deserialize)]
struct Frame {
    beat: Beat,
    tag: [u8; 8],
}

fn tag(token: Option<&str>, beat: &Beat) -> [u8; 8] {
    let Some(token) = token else { return [0; 8] };
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(token.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(&postcard::to_stdvec(beat).expect("serializing plain data into a Vec cannot fail"));
    let full = mac.finalize().into_bytes();
    full[..8].try_into().expect("HMAC-SHA1 is 20 bytes")
}

/// The datagram carrying `beat`, tagged under `token`.
pub fn encode(token: Option<&str>, beat: Beat) -> Vec<u8> {
    let tag = tag(token, &beat);
    postcard::to_stdvec(&Frame { beat, tag }).expect("serializing plain data into a Vec cannot fail")
}

/// The beat in `bytes` if it is well-formed and correctly tagged (pure; fuzzed).
pub fn decode(token: Option<&str>, bytes: &[u8]) -> Option<Beat> {
    let frame: Frame = postcard::from_bytes(bytes).ok()?;
    // Not constant-time: the tag authenticates liveness only, and a forger learns nothing useful
    // from timing a comparison of an 8-byte tag it must produce for every datagram.
    (frame.tag == tag(token, &frame.beat)).then_some(frame.beat)
}

/// The running heartbeat thread; stopped when dropped or by [`UdpHeartbeats::stop`].
pub struct UdpHeartbeats {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpHeartbeats {
    /// Binds `addr` (the node's own address and port, UDP) and starts the thread.
    pub fn start(node: Arc<Node>, addr: SocketAddr) -> std::io::Result<Self> {
        let socket = UdpSocket::bind(addr)?;
        let stop = Arc::new(AtomicBool::new(false));
        let resolver = Resolver::start(&node)?;
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("kvs-heartbeats".into())
                .spawn(move || UdpLoop::new(node, socket, resolver).run(&stop))?
        };
        Ok(UdpHeartbeats { stop, thread: Some(thread) })
    }

    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for UdpHeartbeats {
    fn drop(&mut self) {
        self.shut_down();
    }
}

struct UdpLoop {
    node: Arc<Node>,
    socket: UdpSocket,
    token: Option<String>,
    interval: Duration,
    resolver: Resolver,
    /// Peer name → sequence number of the latest ping sent to it.
    sent: HashMap<String, u64>,
    /// The peers watched as of the latest tick, whether or not their names resolve yet: a ping
    /// from any of them proves it alive (a peer this node has no address for can still ping it).
    watched: HashSet<String>,
    seq: u64,
}

impl UdpLoop {
    fn new(node: Arc<Node>, socket: UdpSocket, resolver: Resolver) -> Self {
        let token = node.settings().cluster_token.clone();
        let interval = node.liveness.config().heartbeat_interval;
        UdpLoop { node, socket, token, interval, resolver, sent: HashMap::new(), watched: HashSet::new(), seq: 0 }
    }

    fn run(mut self, stop: &AtomicBool) {
        let mut next_tick = Instant::now();
        let mut buf = [0u8; 1024];
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= next_tick {
                self.tick();
                next_tick = now + self.interval;
            }
            let wait = next_tick.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            let _ = self.socket.set_read_timeout(Some(wait));
            // A timeout (the next tick is due) or an error such as ICMP port-unreachable for an
            // earlier datagram needs nothing: the detector judges silence.
            if let Ok((n, from)) = self.socket.recv_from(&mut buf) {
                self.receive(&buf[..n], from);
            }
        }
    }

    /// Reads what is waiting, pings every watched peer and lets the detector judge them.
    fn tick(&mut self) {
        let peers = self.node.peers_to_watch();
        self.watched = peers.iter().cloned().collect();
        self.drain();
        self.seq += 1;
        let ping = encode(self.token.as_deref(), Beat::Ping { from: self.node.id().to_owned(), seq: self.seq });
        for peer in &peers {
            // An address, or a name the hosts file has, costs nothing to look up; only what needs
            // the system resolver goes to the lookup thread.
            let quick = peer.parse::<SocketAddr>().ok().or_else(|| self.node.resolve_peer(peer));
            if let Some(addr) = quick.or_else(|| self.resolver.address_of(peer)) {
                let _ = self.socket.send_to(&ping, addr);
                self.sent.insert(peer.clone(), self.seq);
            }
        }
        self.sent.retain(|p, _| peers.contains(p));
        self.node.liveness.tick(&peers);
    }

    /// Handles every datagram already waiting in the socket.
    fn drain(&mut self) {
        let mut buf = [0u8; 1024];
        if self.socket.set_nonblocking(true).is_err() {
            return;
        }
        while let Ok((n, from)) = self.socket.recv_from(&mut buf) {
            self.receive(&buf[..n], from);
        }
        let _ = self.socket.set_nonblocking(false);
    }

    fn receive(&mut self, bytes: &[u8], from: SocketAddr) {
        match decode(self.token.as_deref(), bytes) {
            Some(Beat::Ping { from: peer, seq }) => {
                let pong = encode(self.token.as_deref(), Beat::Pong { from: self.node.id().to_owned(), seq });
                let _ = self.socket.send_to(&pong, from);
                // A peer that pings is alive (only peers this node watches are tracked).
                if self.watched.contains(&peer) {
                    self.node.liveness.heard(&peer);
                }
            }
            Some(Beat::Pong { from: peer, seq }) => match self.sent.get(&peer) {
                Some(&last) if seq == last => self.node.liveness.heartbeat(&peer),
                Some(&last) if seq < last && last - seq < RECENT_SEQS => self.node.liveness.heard(&peer),
                _ => {}
            },
            None => tracing::debug!(%from, "ignoring a datagram that is not a valid heartbeat"),
        }
    }
}

/// Peer addresses for the heartbeat thread, looked up on a thread of their own so that a slow
/// lookup never holds heartbeats up. The heartbeat thread only reads the table (and asks for a
/// lookup of a name it lacks); the lookup thread refreshes every watched peer every
/// [`RESOLVE_EVERY`]. It holds the node weakly and ends with the heartbeat thread (the sending
/// half of its channel), so a lookup in progress never delays a node's shutdown.
struct Resolver {
    table: Arc<Mutex<HashMap<String, SocketAddr>>>,
    wanted: mpsc::Sender<String>,
}

/// Where the lookup thread learns which names to look up, and looks them up.
trait Names: Send + 'static {
    /// The peers to watch; `None` once the node is gone (the thread ends).
    fn watched(&self) -> Option<Vec<String>>;
    /// `name`'s address now, if it has one (may block).
    fn lookup(&self, name: &str) -> Option<SocketAddr>;
}

/// A node's peers, through its hosts file, then the system resolver. Held weakly: a lookup
/// thread never keeps a stopped node (and its open store) alive.
impl Names for Weak<Node> {
    fn watched(&self) -> Option<Vec<String>> {
        Some(self.upgrade()?.peers_to_watch())
    }

    fn lookup(&self, name: &str) -> Option<SocketAddr> {
        let from_hosts = self.upgrade()?.resolve_peer(name);
        from_hosts.or_else(|| name.to_socket_addrs().ok()?.next())
    }
}

impl Resolver {
    fn start(node: &Arc<Node>) -> std::io::Result<Self> {
        Self::start_with(Arc::downgrade(node))
    }

    fn start_with(names: impl Names) -> std::io::Result<Self> {
        let table = Arc::new(Mutex::new(HashMap::new()));
        let (wanted, requests) = mpsc::channel();
        let shared = table.clone();
        std::thread::Builder::new().name("kvs-resolve".into()).spawn(move || Self::run(&names, &shared, &requests))?;
        Ok(Resolver { table, wanted })
    }

    /// `peer`'s address as last looked up; `None` (and a lookup asked for) if it has none. Never
    /// waits for a lookup.
    fn address_of(&self, peer: &str) -> Option<SocketAddr> {
        let found = lock(&self.table).get(peer).copied();
        if found.is_none() {
            let _ = self.wanted.send(peer.to_owned());
        }
        found
    }

    fn run(names: &impl Names, table: &Mutex<HashMap<String, SocketAddr>>, requests: &mpsc::Receiver<String>) {
        let mut next_round = Instant::now();
        loop {
            let wait = next_round.saturating_duration_since(Instant::now());
            // Asked-for names come once per heartbeat while unresolved: look each up once.
            let batch: BTreeSet<String> = match requests.recv_timeout(wait) {
                Ok(first) => std::iter::once(first).chain(requests.try_iter()).collect(),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    next_round = Instant::now() + RESOLVE_EVERY;
                    let Some(peers) = names.watched() else { return };
                    lock(table).retain(|p, _| peers.contains(p));
                    peers.into_iter().collect()
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            for name in batch {
                let addr = names.lookup(&name);
                let mut table = lock(table);
                match addr {
                    Some(a) => table.insert(name, a),
                    None => table.remove(&name),
                };
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the peer-transport heartbeats are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpHeartbeats {
    /// UDP heartbeats run: ping only peers whose datagrams go unanswered; answers are "heard".
    Fallback,
    /// No UDP heartbeats (they could not start, or a simulated network): ping every peer, learn
    /// its rhythm from the answers, and judge silence here.
    Only,
}

/// Pings watched peers over the peer transport every heartbeat interval (one outstanding per
/// peer) until `shutdown` completes. Answers are proof of life; a failed connection is evidence
/// of death; a slow answer is neither.
pub async fn run_http(node: Arc<Node>, mode: HttpHeartbeats, shutdown: impl Future<Output = ()>) {
    let mut ticker = tokio::time::interval(node.liveness.config().heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Peers with a ping outstanding. `std` mutex: held only to insert or remove.
    let outstanding: Arc<Mutex<HashSet<String>>> = Arc::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => return,
            _ = ticker.tick() => {}
        }
        let peers = node.peers_to_watch();
        for peer in peers.iter().filter(|p| mode == HttpHeartbeats::Only || node.liveness.heartbeats_missing(p)) {
            if !outstanding.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(peer.clone()) {
                continue;
            }
            let (node, outstanding, peer) = (node.clone(), outstanding.clone(), peer.clone());
            tokio::spawn(async move {
                match node.peers.call(&peer, &PeerRequest::Ping, PING_LIMIT).await {
                    Ok(_) if mode == HttpHeartbeats::Only => node.liveness.heartbeat(&peer),
                    // A refusal (say, a wrong cluster token) is an answer too.
                    Ok(_) | Err(PeerError::Refused { .. } | PeerError::Rejected { .. }) => node.liveness.heard(&peer),
                    Err(e @ PeerError::Unreachable { .. }) => {
                        node.liveness.connection_failed(&peer, Death::Refused, &e.to_string())
                    }
                    Err(e @ PeerError::ConnectTimeout { .. }) => {
                        node.liveness.connection_failed(&peer, Death::Unreachable, &e.to_string())
                    }
                    Err(e) => tracing::debug!(peer = %peer, error = %e, "heartbeat not answered"),
                }
                outstanding.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&peer);
            });
        }
        if mode == HttpHeartbeats::Only {
            node.liveness.tick(&peers);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names whose lookups block until the test lets them through.
    struct GatedNames {
        gate: Arc<(Mutex<bool>, std::sync::Condvar)>,
    }

    impl Names for GatedNames {
        fn watched(&self) -> Option<Vec<String>> {
            Some(vec!["peer:1".into()])
        }
        fn lookup(&self, _: &str) -> Option<SocketAddr> {
            let (open, changed) = &*self.gate;
            let mut open = lock(open);
            while !*open {
                open = changed.wait(open).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            Some(SocketAddr::from(([127, 0, 0, 1], 1)))
        }
    }

    /// Regression (the day-2 roll under CI load): the heartbeat thread looked names up itself, so
    /// a lookup that hung (a pod out of cluster DNS while it restarts) stopped it from answering
    /// pings and then had it judge every peer silent at once. A lookup now never holds it up: with
    /// the lookup blocked, asking for the address answers at once (none yet), and once the lookup
    /// is let through the address is there.
    #[test]
    fn a_hanging_lookup_never_holds_up_the_heartbeat_thread() {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let resolver = Resolver::start_with(GatedNames { gate: gate.clone() }).unwrap();
        for _ in 0..3 {
            assert_eq!(resolver.address_of("peer:1"), None, "no address while the lookup hangs");
        }
        *lock(&gate.0) = true;
        gate.1.notify_all();
        while resolver.address_of("peer:1").is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(resolver.address_of("peer:1"), Some(SocketAddr::from(([127, 0, 0, 1], 1))));
    }

    #[test]
    fn beats_round_trip_and_forged_ones_are_dropped() {
        let ping = Beat::Ping { from: "a:1".into(), seq: 7 };
        assert_eq!(decode(None, &encode(None, ping.clone())), Some(ping.clone()));
        let signed = encode(Some("secret"), ping.clone());
        assert_eq!(decode(Some("secret"), &signed), Some(ping.clone()));
        assert_eq!(decode(Some("other"), &signed), None, "wrong token");
        assert_eq!(decode(Some("secret"), &encode(None, ping)), None, "untagged");
        assert_eq!(decode(None, b"\xff\xff garbage"), None);
    }
}
