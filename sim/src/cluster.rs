//! Simulated nodes: each a real [`Node`] over a simulated disk ([`SimStore`], a memory store whose
//! writes take a seeded time, and a view cell), a simulated clock ([`SimClock`], with a seeded skew
//! within what the design allows) and the simulated network. A crash drops the process (its
//! background work stops, requests it was handling are cut off); a restart builds a new node over
//! the same disk, as a real restart reads its data directory.

use crate::net::{SimNet, SimPeers};
use async_trait::async_trait;
use kvs_node::HttpHeartbeats;
use kvs_node::causal::Clock;
use kvs_node::node::{Node, Parts, Settings};
use kvs_node::placement::Slot;
use kvs_node::store::{Applied, MemoryStore, Record, SlotDigests, Store, StoreError};
use kvs_node::view::View;
use kvs_node::view_store::{ViewState, ViewStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// Wall time of the simulation's start (µs since the Unix epoch): fixed, so runs repeat.
const EPOCH_MICROS: u64 = 1_800_000_000_000_000;
/// Largest clock skew between nodes (the design needs them within 50 ms of each other).
const MAX_SKEW_MICROS: i64 = 20_000;
/// How far apart two nodes' clocks may be: what the history checker must allow between writes it
/// holds ordered by real time (see `kvs_testkit::history`).
pub const CLOCK_UNCERTAINTY_MICROS: u64 = 2 * MAX_SKEW_MICROS as u64;

/// A node's wall clock: the simulation's virtual time plus the node's skew.
pub struct SimClock {
    start: tokio::time::Instant,
    skew_micros: i64,
}

impl Clock for SimClock {
    fn wall_micros(&self) -> u64 {
        let elapsed = self.start.elapsed().as_micros() as i64;
        (EPOCH_MICROS as i64 + elapsed + self.skew_micros) as u64
    }
}

/// A disk: the memory store, with every write taking a seeded while (as an fsync does), so writes
/// interleave with everything else. It outlives the node that uses it.
pub struct SimStore {
    inner: MemoryStore,
    rng: Mutex<StdRng>,
}

impl SimStore {
    fn new(seed: u64) -> Self {
        SimStore { inner: MemoryStore::new(), rng: Mutex::new(StdRng::seed_from_u64(seed)) }
    }

    /// A new, empty disk for the same machine (seeded from this one's generator, so runs repeat).
    fn replacement(&self) -> SimStore {
        let seed = self.rng.lock().unwrap_or_else(std::sync::PoisonError::into_inner).random();
        SimStore::new(seed)
    }

    fn delay(&self) -> Duration {
        let mut rng = self.rng.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Duration::from_micros(rng.random_range(20..1_500))
    }
}

/// One incarnation's handle on a disk: a process that crashed can no longer read or write it
/// (its leftover tasks get errors, as a dead process's threads do nothing at all).
struct DiskHandle {
    disk: Arc<SimStore>,
    net: Arc<SimNet>,
    id: String,
    incarnation: u64,
}

impl DiskHandle {
    fn alive(&self) -> Result<(), StoreError> {
        match self.net.incarnation(&self.id) == self.incarnation {
            true => Ok(()),
            false => Err(StoreError::Closed),
        }
    }
}

#[async_trait]
impl Store for DiskHandle {
    fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.alive()?;
        self.disk.inner.get(key)
    }

    async fn apply(&self, batch: Vec<(String, Record)>) -> Result<Vec<Applied>, StoreError> {
        tokio::time::sleep(self.disk.delay()).await;
        self.alive()?;
        self.disk.inner.apply(batch).await
    }

    fn scan_slot(&self, slot: Slot) -> Result<Vec<(String, Record)>, StoreError> {
        self.alive()?;
        self.disk.inner.scan_slot(slot)
    }

    async fn prune(&self, slots: Vec<Slot>) -> Result<u64, StoreError> {
        tokio::time::sleep(self.disk.delay()).await;
        self.alive()?;
        self.disk.inner.prune(slots).await
    }

    fn digests(&self) -> &SlotDigests {
        self.disk.inner.digests()
    }

    fn max_timestamp(&self) -> u64 {
        self.disk.inner.max_timestamp()
    }
}

/// What survives a crash of one node: its disk, its saved view, its clock.
struct Machine {
    id: String,
    store: Arc<SimStore>,
    views: Arc<Mutex<ViewState>>,
    clock: Arc<SimClock>,
    /// The view it was first started with (`None`: a spare, waiting to be added).
    initial: Option<View>,
    /// The running process's background work, stopped by a crash.
    background: Option<JoinHandle<()>>,
}

/// The nodes of one simulated cluster.
pub struct SimCluster {
    pub net: Arc<SimNet>,
    machines: Vec<Machine>,
}

/// Node ids of a simulated cluster: `10.0.0.<i>:8080`.
pub fn node_id(i: usize) -> String {
    format!("10.0.0.{}:8080", i + 1)
}

impl SimCluster {
    /// `members` nodes forming a cluster at `k`, plus `spares` without a view.
    pub fn start(seed: u64, members: usize, spares: usize, k: u32) -> SimCluster {
        let net = SimNet::new(seed);
        let mut rng = StdRng::seed_from_u64(seed ^ 0x005e_edc1_u64);
        let ids: Vec<String> = (0..members).map(node_id).collect();
        let view = View::initial(&ids, k);
        let machines = (0..members + spares)
            .map(|i| Machine {
                id: node_id(i),
                store: Arc::new(SimStore::new(rng.random())),
                views: Arc::default(),
                clock: Arc::new(SimClock {
                    start: tokio::time::Instant::now(),
                    skew_micros: rng.random_range(-MAX_SKEW_MICROS..=MAX_SKEW_MICROS),
                }),
                initial: (i < members).then(|| view.clone()),
                background: None,
            })
            .collect();
        let mut cluster = SimCluster { net, machines };
        for i in 0..members + spares {
            cluster.boot(i);
        }
        cluster
    }

    pub fn ids(&self) -> Vec<String> {
        self.machines.iter().map(|m| m.id.clone()).collect()
    }

    /// Starts the process of machine `i` over its disk.
    fn boot(&mut self, i: usize) {
        let m = &mut self.machines[i];
        let mut settings = Settings::new(m.id.clone());
        // Fixed, not derived from this machine's cores: the simulation must not depend on it.
        settings.admission = kvs_node::admission::Limits { max_in_flight: 64, queue_timeout: Duration::from_secs(5) };
        let incarnation = self.net.incarnation(&m.id);
        let store = DiskHandle { disk: m.store.clone(), net: self.net.clone(), id: m.id.clone(), incarnation };
        let parts = Parts {
            settings,
            initial: m.initial.clone(),
            store: Arc::new(store),
            peers: Arc::new(SimPeers { me: m.id.clone(), incarnation, net: self.net.clone() }),
            clock: m.clock.clone(),
            view_store: ViewStore::shared(m.views.clone()),
        };
        let node = Node::from_parts(parts);
        self.net.attach(node.clone());
        m.background =
            Some(tokio::spawn(kvs_node::run_background(node, HttpHeartbeats::Only, std::future::pending::<()>())));
    }

    fn index(&self, id: &str) -> usize {
        self.machines.iter().position(|m| m.id == id).expect("a node of this cluster")
    }

    /// Kills the process at `id` (its disk survives).
    pub fn crash(&mut self, id: &str) {
        let i = self.index(id);
        if let Some(bg) = self.machines[i].background.take() {
            bg.abort();
        }
        self.net.crash(id);
    }

    /// Starts the process at `id` again over its disk.
    pub fn restart(&mut self, id: &str) {
        let i = self.index(id);
        if self.machines[i].background.is_none() {
            self.boot(i);
        }
    }

    /// Gives the stopped machine at `id` a new, empty disk (its volume is lost): its data and its
    /// saved view are gone; a restart starts from its initial view, or none for a spare.
    pub fn wipe_disk(&mut self, id: &str) {
        let i = self.index(id);
        assert!(self.machines[i].background.is_none(), "wipe a crashed machine's disk, not a running one's");
        let m = &mut self.machines[i];
        m.store = Arc::new(m.store.replacement());
        m.views = Arc::default();
    }

    pub fn is_up(&self, id: &str) -> bool {
        self.net.node(id).is_some()
    }
}
