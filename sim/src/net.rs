//! The simulated network between nodes (and from clients to nodes).
//!
//! Every message is encoded and decoded (postcard, as on the wire), takes a seeded latency each
//! way, and is delivered by a task of its own, independent of the caller: a caller that gives up
//! (its deadline passed, or its failure detector declared the peer dead) does not take the message
//! back. That is what a real network does, and what lets the simulation find bugs like a held-up
//! request performed after its sender failed over.
//!
//! Faults, as the node's failure detector sees them on a real network:
//! - **crash**: nothing listens there; a call is refused at once (`PeerError::Unreachable`), a
//!   message under way is lost and a request being handled is cut off mid-way;
//! - **isolate** (a partition) and **pause** (SIGSTOP): messages to and from the node wait in
//!   the network, silently, and are delivered when the fault heals;
//! - **lose** (a test's targeted fault, never the nemesis's): requests a rule picks fail as a
//!   reset connection does, before they reach the receiver — e.g. exactly one step of a view
//!   change to one node.

use kvs_node::node::Node;
use kvs_node::peers::{PeerError, Peers};
use kvs_node::protocol::{PeerRequest, PeerResponse};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};

/// The sender name clients use (clients never crash; a fault of the node they call holds them).
pub const CLIENT: &str = "client";

/// One address on the network.
#[derive(Default)]
struct Endpoint {
    /// The process listening there; `None` while crashed.
    node: Option<Arc<Node>>,
    /// Bumped at every crash, so a request handled across a crash is recognised as cut off.
    incarnation: u64,
    paused: bool,
}

/// Picks the requests the network loses: `(from, to, request)`.
pub type LossRule = Arc<dyn Fn(&str, &str, &PeerRequest) -> bool + Send + Sync>;

#[derive(Default)]
struct State {
    endpoints: BTreeMap<String, Endpoint>,
    isolated: BTreeSet<String>,
    loses: Option<LossRule>,
}

/// Why a message cannot go now.
enum Path {
    Open(Arc<Node>, u64),
    /// Nothing listens at the destination (or the sender itself is gone).
    Refused,
    /// A partition or a pause: wait.
    Held,
}

/// The network. Cheap to share (`Arc`); every node holds a [`SimPeers`] onto it.
pub struct SimNet {
    /// `std` mutex: short critical sections, never held across `.await`.
    state: Mutex<State>,
    /// Latencies. Seeded; drawn in the order messages are sent, which is deterministic.
    rng: Mutex<StdRng>,
    /// Woken whenever a fault starts or heals (held messages look again).
    changed: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SimNet {
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(SimNet {
            state: Mutex::default(),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            changed: Notify::new(),
        })
    }

    /// `node` now listens at its id (a start or a restart).
    pub fn attach(&self, node: Arc<Node>) {
        let mut s = lock(&self.state);
        let e = s.endpoints.entry(node.id().to_owned()).or_default();
        e.node = Some(node);
        e.paused = false;
        drop(s);
        self.changed.notify_waiters();
    }

    /// The process at `id` dies: calls are refused, messages under way are lost.
    pub fn crash(&self, id: &str) -> Option<Arc<Node>> {
        let mut s = lock(&self.state);
        let e = s.endpoints.entry(id.to_owned()).or_default();
        e.incarnation += 1;
        e.paused = false;
        let node = e.node.take();
        drop(s);
        self.changed.notify_waiters();
        node
    }

    pub fn set_paused(&self, id: &str, paused: bool) {
        lock(&self.state).endpoints.entry(id.to_owned()).or_default().paused = paused;
        self.changed.notify_waiters();
    }

    pub fn set_isolated(&self, id: &str, isolated: bool) {
        let mut s = lock(&self.state);
        if isolated {
            s.isolated.insert(id.to_owned());
        } else {
            s.isolated.remove(id);
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// From now on, the requests `rule` picks are lost (`None`: none is).
    pub fn set_loss(&self, rule: Option<LossRule>) {
        lock(&self.state).loses = rule;
    }

    fn loses(&self, from: &str, to: &str, request: &PeerRequest) -> bool {
        let rule = lock(&self.state).loses.clone();
        rule.is_some_and(|lose| lose(from, to, request))
    }

    /// The live process at `id`, if any.
    pub fn node(&self, id: &str) -> Option<Arc<Node>> {
        lock(&self.state).endpoints.get(id).and_then(|e| e.node.clone())
    }

    fn latency(&self) -> Duration {
        let mut rng = lock(&self.rng);
        // Mostly sub-millisecond, sometimes slow: reorders messages between the same nodes.
        if rng.random_bool(0.05) {
            Duration::from_micros(rng.random_range(5_000..30_000))
        } else {
            Duration::from_micros(rng.random_range(50..1_000))
        }
    }

    fn path(&self, from: &str, to: &str) -> Path {
        let s = lock(&self.state);
        let process = |id: &str| s.endpoints.get(id).and_then(|e| e.node.clone().map(|n| (n, e.incarnation)));
        let held =
            |id: &str| id != CLIENT && (s.isolated.contains(id) || s.endpoints.get(id).is_some_and(|e| e.paused));
        // Clients are always there; a node must be running to send or to receive.
        if from != CLIENT && process(from).is_none() {
            return Path::Refused;
        }
        let dest = if to == CLIENT { None } else { Some(process(to)) };
        if let Some(None) = dest {
            return Path::Refused;
        }
        if held(from) || held(to) {
            return Path::Held;
        }
        match dest.flatten().or_else(|| process(from)) {
            Some((node, incarnation)) => Path::Open(node, incarnation),
            None => Path::Refused,
        }
    }

    /// Waits until a message from `from` can reach `to`; `None` if it is lost (refused).
    async fn wait_open(&self, from: &str, to: &str) -> Option<(Arc<Node>, u64)> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.path(from, to) {
                Path::Open(node, incarnation) => return Some((node, incarnation)),
                Path::Refused => return None,
                Path::Held => notified.await,
            }
        }
    }

    /// The current incarnation of the process at `id` (bumped by every crash).
    pub fn incarnation(&self, id: &str) -> u64 {
        lock(&self.state).endpoints.get(id).map_or(0, |e| e.incarnation)
    }

    /// Completes once the process at `id` of `incarnation` has crashed.
    async fn crashed(&self, id: &str, incarnation: u64) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.incarnation(id) != incarnation {
                return;
            }
            notified.await;
        }
    }

    /// Delivers `work` to the node at `to` as a message from `from` would go: after a latency,
    /// once the path is open, cut off if the node crashes meanwhile, the answer coming back the
    /// same way. Runs whether or not anyone still waits for the answer.
    pub fn deliver<T, F, Fut>(self: &Arc<Self>, from: &str, to: &str, work: F) -> oneshot::Receiver<Option<T>>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Node>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let (net, from, to) = (self.clone(), from.to_owned(), to.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(net.latency()).await;
            let Some((node, incarnation)) = net.wait_open(&from, &to).await else {
                let _ = tx.send(None);
                return;
            };
            let answer = tokio::select! {
                biased;
                _ = net.crashed(&to, incarnation) => None,
                answer = work(node) => Some(answer),
            };
            let Some(answer) = answer else {
                let _ = tx.send(None);
                return;
            };
            tokio::time::sleep(net.latency()).await;
            // The way back: held by a fault like the way there; lost if the answering node died.
            let back = net.wait_open(&to, &from).await.is_some() && net.incarnation(&to) == incarnation;
            let _ = tx.send(back.then_some(answer));
        });
        rx
    }
}

/// One node's view of the network: its calls leave from its own address, and only while the
/// incarnation they belong to is alive (a crashed process sends nothing).
pub struct SimPeers {
    pub me: String,
    pub incarnation: u64,
    pub net: Arc<SimNet>,
}

#[async_trait::async_trait]
impl Peers for SimPeers {
    async fn call(&self, peer: &str, request: &PeerRequest, timeout: Duration) -> Result<PeerResponse, PeerError> {
        if self.net.incarnation(&self.me) != self.incarnation {
            return Err(PeerError::Unreachable { peer: peer.to_owned(), detail: "this process has crashed".into() });
        }
        if self.net.loses(&self.me, peer, request) {
            return Err(PeerError::Unreachable { peer: peer.to_owned(), detail: "connection reset (lost)".into() });
        }
        let bytes = postcard::to_stdvec(request).expect("requests encode");
        let answer = self.net.deliver(&self.me, peer, move |node| async move {
            let request: PeerRequest = postcard::from_bytes(&bytes).expect("requests decode");
            let response = node.handle_rpc(request).await;
            postcard::to_stdvec(&response).expect("responses encode")
        });
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(Some(bytes))) => {
                let response: PeerResponse = postcard::from_bytes(&bytes).expect("responses decode");
                match response {
                    PeerResponse::Refused(refusal) => Err(PeerError::Refused { peer: peer.to_owned(), refusal }),
                    other => Ok(other),
                }
            }
            Ok(Ok(None) | Err(_)) => {
                Err(PeerError::Unreachable { peer: peer.to_owned(), detail: "connection refused or reset".into() })
            }
            Err(_) => Err(PeerError::Timeout { peer: peer.to_owned(), timeout }),
        }
    }
}
