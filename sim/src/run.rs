//! One seed, start to verdict: a cluster, clients and the nemesis for the configured virtual time;
//! then every fault heals, the replicas converge, every member is read, and the history checker
//! judges the lot.

use crate::cluster::{CLOCK_UNCERTAINTY_MICROS, SimCluster};
use crate::nemesis::{self, Faults};
use crate::workload::Client;
use kvs_node::causal::VectorClock;
use kvs_testkit::history::{Op, check_causal, check_final};
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How much of everything a run has.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Virtual time clients run while faults are injected.
    pub duration: Duration,
    pub members: usize,
    pub spares: usize,
    pub k: u32,
    pub clients: usize,
    pub keys: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config { duration: Duration::from_secs(4), members: 4, spares: 2, k: 2, clients: 4, keys: 12 }
    }
}

/// What a run found.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub seed: u64,
    pub operations: usize,
    pub acknowledged: usize,
    pub faults: Faults,
    /// The nemesis's actions with their virtual times.
    pub timeline: nemesis::Timeline,
    /// Every operation the clients did (for a replay's post-mortem).
    pub history: Vec<Op>,
    /// Broken guarantees, in words (empty: the run passed).
    pub violations: Vec<String>,
    /// A hash of the whole history (operations with their virtual times and results): equal for
    /// two runs of one seed, or the simulation is not deterministic.
    pub fingerprint: u64,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Runs every seed, `jobs` at a time (each on a thread and runtime of its own), in seed order.
pub fn run_all(seeds: &[u64], config: Config, jobs: usize) -> Vec<Outcome> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Mutex<Vec<Outcome>> = Mutex::new(Vec::with_capacity(seeds.len()));
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&seed) = seeds.get(i) else { return };
                    let outcome = run_seed(seed, config);
                    results.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(outcome);
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    results.sort_by_key(|o| o.seed);
    results
}

/// Longest the replicas may take to converge once every fault has healed.
const CONVERGE_LIMIT: Duration = Duration::from_secs(60);

/// Runs `seed` on a fresh single-threaded runtime with paused time.
pub fn run_seed(seed: u64, config: Config) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime builds");
    runtime.block_on(simulate(seed, config))
}

async fn simulate(seed: u64, config: Config) -> Outcome {
    let mut cluster = SimCluster::start(seed, config.members, config.spares, config.k);
    let ids = cluster.ids();
    let members = Arc::new(Mutex::new(ids[..config.members].to_vec()));
    let spares = ids[config.members..].to_vec();
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..config.clients)
        .map(|id| {
            let client = Client {
                id,
                keys: config.keys,
                net: cluster.net.clone(),
                members: members.clone(),
                start,
                stop: stop.clone(),
            };
            tokio::spawn(client.run(seed.wrapping_mul(31).wrapping_add(id as u64 + 1)))
        })
        .collect();
    let until = start + config.duration;
    let (faults, timeline, final_members, _) =
        nemesis::run(&mut cluster, members.clone(), spares, config.k, seed ^ 0xfa17, until, start).await;
    stop.store(true, Ordering::Relaxed);
    let mut history: Vec<Op> = Vec::new();
    for c in clients {
        history.extend(c.await.expect("clients do not panic"));
    }

    let mut violations = Vec::new();
    if let Err(why) = converge(&cluster, &final_members).await {
        violations.push(format!("replicas did not converge within {CONVERGE_LIMIT:?} of the last heal: {why}"));
    }
    let mut finals: BTreeMap<String, Vec<(String, Option<String>)>> = BTreeMap::new();
    for key in (0..config.keys).map(|k| format!("key{k}")) {
        for m in &final_members {
            match final_read(&cluster, m, &key).await {
                Ok(state) => finals.entry(key.clone()).or_default().push((m.clone(), state)),
                Err(e) => violations.push(format!("final read of {key} on {m} failed: {e}")),
            }
        }
    }
    violations.extend(
        check_final(&history, &finals, CLOCK_UNCERTAINTY_MICROS)
            .into_iter()
            .map(|v| format!("{}: {}", v.kind, v.detail)),
    );
    violations.extend(
        check_causal(&history, CLOCK_UNCERTAINTY_MICROS).into_iter().map(|v| format!("{}: {}", v.kind, v.detail)),
    );
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for op in &history {
        (op.client, &op.key, format!("{:?}", op.kind), op.invoke, op.complete, format!("{:?}", op.outcome))
            .hash(&mut hasher);
    }
    Outcome {
        seed,
        operations: history.len(),
        acknowledged: history.iter().filter(|o| matches!(o.outcome, kvs_testkit::history::Outcome::Ok(_))).count(),
        faults,
        timeline,
        history,
        violations,
        fingerprint: hasher.finish(),
    }
}

/// Waits (virtual time) until the cluster has caught up with itself: every running node holds the
/// first member's committed view with no change pending, every partition's replicas report equal
/// digests, and no node outside a partition still holds keys (a node that missed a view change
/// has pushed what it had to the owners and pruned it).
async fn converge(cluster: &SimCluster, members: &[String]) -> Result<(), String> {
    let deadline = Instant::now() + CONVERGE_LIMIT;
    loop {
        let state = converged(cluster, members).await;
        if state.is_ok() || Instant::now() >= deadline {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `Ok` when caught up, else what is not.
async fn converged(cluster: &SimCluster, members: &[String]) -> Result<(), String> {
    let first = cluster.net.node(&members[0]).ok_or("the first member is down")?;
    let status = first.cluster_status().await;
    if let Some(epoch) = status.pending_epoch {
        return Err(format!("{} has a change to epoch {epoch} pending", members[0]));
    }
    let layout = status.layout.ok_or("the first member has no view")?;
    if let Some(p) = status.partitions.iter().find(|p| !p.digests.iter().all(|d| d.is_some() && *d == p.digests[0])) {
        return Err(format!("partition {} replicas disagree: {:?} {:?}", p.partition_id, p.members, p.digests));
    }
    let replicas: Vec<&String> = layout.partitions.iter().flatten().collect();
    for id in cluster.ids() {
        let Some(node) = cluster.net.node(&id) else { continue };
        let in_view = layout.members().any(|m| *m == id);
        let view = node.view().map(|v| v.layout().clone());
        if in_view && (view.as_ref() != Some(&layout) || node.pending().is_some()) {
            return Err(format!(
                "{id} is on {view:?} (pending {:?}), not epoch {}",
                node.pending().map(|p| p.epoch()),
                layout.epoch
            ));
        }
        let keys = node.store().digests().stats().live_keys;
        if !replicas.contains(&&id) && keys > 0 {
            return Err(format!(
                "{id} is not a replica of epoch {} but holds {keys} keys (view {view:?})",
                layout.epoch
            ));
        }
    }
    Ok(())
}

/// A member's value of `key`, read without a context (a few tries: a node may still be catching
/// up on the view).
async fn final_read(cluster: &SimCluster, member: &str, key: &str) -> Result<Option<String>, String> {
    let mut last = String::new();
    for _ in 0..20 {
        let Some(node) = cluster.net.node(member) else { return Err("the node is down".into()) };
        match node.read(key, VectorClock::new()).await {
            Ok(c) => {
                return Ok(c.record.and_then(|r| r.value).map(|v| String::from_utf8_lossy(&v).into_owned()));
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}
