//! A fault-injection run: concurrent clients record a history against a real cluster while a
//! nemesis, driven by a seed, injects faults — pauses, crashes, network partitions — in steady
//! state and during view changes. Then everything heals, the run waits for replicas to converge,
//! reads every key from every node, and hands the lot to the checker.

use crate::cluster::{Cluster, Network};
use crate::history::{Kind, Op, Outcome, Violation, check_causal, check_final};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a run does.
#[derive(Clone, Debug)]
pub struct Plan {
    pub network: Network,
    pub seed: u64,
    pub seconds: f64,
    pub members: usize,
    pub spares: usize,
    pub k: u32,
    pub clients: usize,
    pub keys: usize,
    /// Where to write the whole history and the nemesis's timeline (JSON), for post-mortems.
    pub history_out: Option<std::path::PathBuf>,
}

/// A fault the nemesis injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum FaultKind {
    None,
    Pause,
    Crash,
    Partition,
    ViewChange,
}

/// What a run found.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub seed: u64,
    pub operations: usize,
    pub acknowledged_writes: usize,
    pub unknown_writes: usize,
    pub faults: BTreeMap<String, usize>,
    pub lost: usize,
    pub causal_violations: usize,
    pub convergence_ms: Option<f64>,
    /// Per fault kind active at the time: (ops sent to nodes not under fault, successful, p99 ms).
    pub availability: BTreeMap<String, (usize, usize, f64)>,
    /// Most common reasons operations on healthy nodes failed, with counts.
    pub failure_reasons: Vec<(String, usize)>,
    pub violations: Vec<String>,
}

struct Recorded {
    op: Op,
    /// The node the operation was sent to.
    node: usize,
    /// Why it failed (status and the start of the message), for the summary.
    error: Option<String>,
}

/// Shared between clients and nemesis: which node is under which fault right now.
#[derive(Default)]
struct FaultState {
    active: Option<(FaultKind, usize)>,
    /// Nodes clients may send to (members of the current view).
    members: Vec<usize>,
}

fn micros(since: Instant) -> u64 {
    since.elapsed().as_micros() as u64
}

async fn client_loop(
    id: usize,
    plan: Plan,
    addrs: Vec<String>,
    state: Arc<Mutex<FaultState>>,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<(Recorded, Option<FaultKind>)> {
    let http = kvs_api::http_client().timeout(Duration::from_secs(2)).build().expect("client builds");
    let mut rng = StdRng::seed_from_u64(plan.seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut context = String::new();
    let mut out = Vec::new();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let (node, fault) = {
            let s = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let node = s.members[rng.random_range(0..s.members.len())];
            (node, s.active)
        };
        let key = format!("key{}", rng.random_range(0..plan.keys));
        let url = format!("http://{}/v1/kv/{key}", addrs[node]);
        let roll = rng.random_range(0..10);
        let kind = match roll {
            0..=4 => Kind::Put(format!("c{id}-{seq}")),
            5 => Kind::Delete,
            _ => Kind::Get,
        };
        seq += 1;
        let invoke = micros(start);
        let req = match &kind {
            Kind::Put(v) => http.put(&url).body(v.clone()),
            Kind::Delete => http.delete(&url),
            Kind::Get => http.get(&url),
        };
        let result = req.header(kvs_api::HEADER_CAUSAL_CONTEXT, &context).send().await;
        let mut error = None;
        let outcome = match result {
            Ok(resp) => {
                let status = resp.status().as_u16();
                if let Some(c) = resp
                    .headers()
                    .get(kvs_api::HEADER_CAUSAL_CONTEXT)
                    .and_then(|v| v.to_str().ok())
                    .filter(|c| !c.is_empty())
                {
                    context = c.to_owned();
                }
                let body = resp.bytes().await.ok();
                match (&kind, status, body) {
                    (Kind::Get, 200, Some(b)) => Outcome::Ok(Some(String::from_utf8_lossy(&b).into_owned())),
                    (Kind::Get, 404, Some(_)) => Outcome::Ok(None),
                    (Kind::Put(_) | Kind::Delete, 200 | 201, Some(_)) => Outcome::Ok(None),
                    (_, status, body) => {
                        let msg = body
                            .map(|b| String::from_utf8_lossy(&b).chars().take(70).collect::<String>())
                            .unwrap_or_default();
                        error = Some(format!("{status} {msg}"));
                        Outcome::Unknown
                    }
                }
            }
            Err(e) => {
                error = Some(if e.is_timeout() { "client timeout".into() } else { "connection failed".into() });
                Outcome::Unknown
            }
        };
        let complete = micros(start);
        let under_fault = fault.filter(|(_, n)| *n == node).map(|(k, _)| k);
        let active = fault.map(|(k, _)| k);
        let op = Op { client: id, key, kind, invoke, complete, outcome };
        out.push((
            Recorded { op, node, error },
            if under_fault.is_some() { None } else { Some(active.unwrap_or(FaultKind::None)) },
        ));
        if matches!(out.last().map(|(r, _)| &r.op.outcome), Some(Outcome::Unknown)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    out
}

/// Runs one seeded fault-injection run and checks it.
pub async fn run(plan: Plan) -> anyhow::Result<Summary> {
    let mut cluster = Cluster::start(plan.network, plan.members, plan.spares, plan.k, &[]).await?;
    let addrs = cluster.addrs();
    let state = Arc::new(Mutex::new(FaultState { active: None, members: (0..plan.members).collect() }));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let clients: Vec<_> = (0..plan.clients)
        .map(|id| tokio::spawn(client_loop(id, plan.clone(), addrs.clone(), state.clone(), start, stop.clone())))
        .collect();

    let mut rng = StdRng::seed_from_u64(plan.seed);
    let mut faults: BTreeMap<String, usize> = BTreeMap::new();
    let admin = kvs_api::AdminClient::default().with_change_timeout(Duration::from_secs(60));
    let partitions_possible = plan.network == Network::Namespaces;
    let deadline = start + Duration::from_secs_f64(plan.seconds);
    let mut members: Vec<usize> = (0..plan.members).collect();
    let mut spares: Vec<usize> = (plan.members..plan.members + plan.spares).collect();
    let mut k = plan.k;
    // (µs since start, what the nemesis did), for `history_out`.
    let mut events: Vec<(u64, String)> = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..700))).await;
        let victim = members[rng.random_range(0..members.len())];
        let kind = match rng.random_range(0..4) {
            0 => FaultKind::Pause,
            1 => FaultKind::Crash,
            2 if partitions_possible => FaultKind::Partition,
            _ => FaultKind::ViewChange,
        };
        if kind == FaultKind::ViewChange {
            // Add a spare, or remove a member (back to the spares), through a random other member.
            let via = *members.iter().find(|m| **m != victim).unwrap_or(&members[0]);
            let mut next = members.clone();
            // The first change and a quarter of the rest change K instead of the membership.
            let next_k = if k == plan.k { plan.k + 1 } else { plan.k };
            let first = !faults.contains_key("K change") && !faults.contains_key("ViewChange");
            let change_k = (rng.random_bool(0.25) || first) && members.len() >= next_k as usize;
            let added = if change_k {
                None
            } else if !spares.is_empty() && (rng.random_bool(0.5) || members.len() <= plan.members) {
                let s = spares.remove(0);
                next.push(s);
                Some(s)
            } else {
                next.retain(|m| *m != victim);
                None
            };
            let target_k = if change_k { next_k } else { k };
            state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).active =
                Some((FaultKind::ViewChange, usize::MAX));
            // Sometimes a node is paused while the view changes.
            let paused = rng.random_bool(0.3).then_some(victim).filter(|v| Some(*v) != added && next.contains(v));
            if let Some(p) = paused {
                cluster.pause(p);
            }
            events.push((micros(start), format!("view change via {via} to {next:?} K={target_k} (paused {paused:?})")));
            let next_addrs: Vec<String> = next.iter().map(|i| addrs[*i].clone()).collect();
            let ok = admin.change_view(&addrs[via], next_addrs.clone(), target_k).await.is_ok();
            if let Some(p) = paused {
                cluster.resume(p);
            }
            events.push((micros(start), format!("view change {}", if ok { "done" } else { "refused" })));
            if ok {
                // Count only what happened: the view the change installed must have the target
                // members and K.
                let layout = check_view(&admin, &addrs[via], &next_addrs, target_k).await?;
                events.push((
                    micros(start),
                    format!(
                        "installed epoch {}: partitions {:?}, proxies {:?}",
                        layout.epoch, layout.partitions, layout.proxies
                    ),
                ));
                *faults.entry(if change_k { "K change".into() } else { format!("{kind:?}") }).or_default() += 1;
                if paused.is_some() {
                    *faults.entry("Pause (during view change)".into()).or_default() += 1;
                }
                k = target_k;
                if added.is_none() && !change_k {
                    spares.push(victim);
                }
                members = next;
                state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).members = members.clone();
            } else {
                *faults.entry("view change refused".into()).or_default() += 1;
                if let Some(s) = added {
                    spares.insert(0, s);
                }
            }
            state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).active = None;
            continue;
        }
        state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).active = Some((kind, victim));
        *faults.entry(format!("{kind:?}")).or_default() += 1;
        events.push((micros(start), format!("{kind:?} {victim} begins")));
        match kind {
            FaultKind::Pause => cluster.pause(victim),
            FaultKind::Crash => cluster.crash(victim),
            FaultKind::Partition => cluster.isolate(victim)?,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
        match kind {
            FaultKind::Pause => cluster.resume(victim),
            FaultKind::Crash => cluster.restart(victim).await?,
            FaultKind::Partition => cluster.heal(victim)?,
            _ => {}
        }
        events.push((micros(start), format!("{kind:?} {victim} ends")));
        state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).active = None;
    }
    stop.store(true, Ordering::Relaxed);
    let mut recorded = Vec::new();
    for c in clients {
        recorded.extend(c.await?);
    }

    // Healed: wait until every partition's replicas hold the same versions.
    let healed = Instant::now();
    let convergence_ms = converge(&admin, &addrs[members[0]], Duration::from_secs(30))
        .await
        .then(|| healed.elapsed().as_secs_f64() * 1000.0);

    // Read every key from every member.
    let mut finals: BTreeMap<String, Vec<(String, Option<String>)>> = BTreeMap::new();
    let reader = kvs_api::http_client().timeout(Duration::from_secs(5)).build()?;
    for k in 0..plan.keys {
        let key = format!("key{k}");
        for &m in &members {
            let resp = reader.get(format!("http://{}/v1/kv/{key}", addrs[m])).send().await?;
            let state = match resp.status().as_u16() {
                200 => Some(String::from_utf8_lossy(&resp.bytes().await?).into_owned()),
                404 => None,
                s => anyhow::bail!("final read of {key} on {} answered {s}", addrs[m]),
            };
            finals.entry(key.clone()).or_default().push((addrs[m].clone(), state));
        }
    }

    let history: Vec<Op> = recorded.iter().map(|(r, _)| r.op.clone()).collect();
    if let Some(path) = &plan.history_out {
        write_history(path, &recorded, &events, &addrs)?;
    }
    let lost = check_final(&history, &finals, 0);
    let causal = check_causal(&history, 0);
    let mut availability: BTreeMap<String, (usize, usize, Vec<u64>)> = BTreeMap::new();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for (r, healthy_target) in &recorded {
        if let (Some(kind), Some(e)) = (healthy_target, &r.error) {
            *reasons.entry(format!("{kind:?}: {e}")).or_default() += 1;
        }
        if let Some(kind) = healthy_target {
            let e = availability.entry(format!("{kind:?}")).or_default();
            e.0 += 1;
            if matches!(r.op.outcome, Outcome::Ok(_)) {
                e.1 += 1;
            }
            e.2.push(r.op.complete - r.op.invoke);
        }
    }
    let availability = availability
        .into_iter()
        .map(|(k, (n, ok, mut lat))| {
            lat.sort_unstable();
            let p99 = lat.get(lat.len() * 99 / 100).copied().unwrap_or(0) as f64 / 1000.0;
            (k, (n, ok, p99))
        })
        .collect();
    let writes = history.iter().filter(|o| !matches!(o.kind, Kind::Get));
    let (acked, unknown): (Vec<&Op>, Vec<&Op>) = writes.partition(|o| matches!(o.outcome, Outcome::Ok(_)));
    let describe = |v: &Violation| format!("{}: {}", v.kind, v.detail);
    Ok(Summary {
        seed: plan.seed,
        operations: history.len(),
        acknowledged_writes: acked.len(),
        unknown_writes: unknown.len(),
        faults,
        lost: lost.len(),
        causal_violations: causal.len(),
        convergence_ms,
        availability,
        failure_reasons: {
            let mut v: Vec<(String, usize)> = reasons.into_iter().collect();
            v.sort_by_key(|r| std::cmp::Reverse(r.1));
            v.truncate(8);
            v
        },
        violations: lost.iter().chain(&causal).take(20).map(describe).collect(),
    })
}

/// Writes every operation (with the node it went to and why it failed) and the nemesis's
/// timeline as JSON, ordered by time.
fn write_history(
    path: &std::path::Path,
    recorded: &[(Recorded, Option<FaultKind>)],
    events: &[(u64, String)],
    addrs: &[String],
) -> anyhow::Result<()> {
    let mut ops: Vec<&Recorded> = recorded.iter().map(|(r, _)| r).collect();
    ops.sort_by_key(|r| r.op.invoke);
    let ops: Vec<serde_json::Value> = ops
        .iter()
        .map(|r| {
            let (kind, value) = match &r.op.kind {
                Kind::Put(v) => ("put", Some(v.clone())),
                Kind::Delete => ("delete", None),
                Kind::Get => ("get", None),
            };
            let (ok, read) = match &r.op.outcome {
                Outcome::Ok(v) => (true, v.clone()),
                Outcome::Unknown => (false, None),
            };
            serde_json::json!({
                "client": r.op.client, "key": r.op.key, "kind": kind, "value": value, "invoke": r.op.invoke,
                "complete": r.op.complete, "ok": ok, "read": read, "node": addrs[r.node], "error": r.error,
            })
        })
        .collect();
    let events: Vec<serde_json::Value> = events.iter().map(|(t, e)| serde_json::json!({"at": t, "event": e})).collect();
    let nodes: Vec<serde_json::Value> =
        addrs.iter().enumerate().map(|(i, a)| serde_json::json!({"index": i, "addr": a})).collect();
    std::fs::write(path, serde_json::to_vec(&serde_json::json!({"nodes": nodes, "events": events, "ops": ops}))?)?;
    Ok(())
}

/// Fails unless `via` reports a committed view with exactly `members` and replication factor `k`
/// (so the nemesis never counts a change that did not happen).
async fn check_view(
    admin: &kvs_api::AdminClient,
    via: &str,
    members: &[String],
    k: u32,
) -> anyhow::Result<kvs_api::Layout> {
    let status = admin.status(via).await?;
    let layout = status.layout.ok_or_else(|| anyhow::anyhow!("{via} has no view after a successful change"))?;
    let mut have: Vec<&String> = layout.members().collect();
    have.sort();
    let mut want: Vec<&String> = members.iter().collect();
    want.sort();
    anyhow::ensure!(
        have == want && layout.replication_factor == k,
        "the view change was acknowledged but {via}'s view is {have:?} with K={}, not {want:?} with K={k}",
        layout.replication_factor
    );
    Ok(layout)
}

/// Polls cluster status until every partition's members report equal digests (true) or `limit`
/// passes (false).
async fn converge(admin: &kvs_api::AdminClient, via: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(status) = admin.status(via).await
            && status.pending_epoch.is_none()
            && status.partitions.iter().all(|p| p.digests.iter().all(|d| d.is_some() && *d == p.digests[0]))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

impl Summary {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("seed {}\n", self.seed));
        out.push_str("| measure | value |\n|---|---:|\n");
        out.push_str(&format!("| operations | {} |\n", self.operations));
        out.push_str(&format!(
            "| faults injected | {} |\n",
            self.faults.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        ));
        out.push_str(&format!("| acknowledged writes | {} |\n", self.acknowledged_writes));
        out.push_str(&format!("| writes with unknown outcome | {} |\n", self.unknown_writes));
        out.push_str(&format!("| lost acknowledged writes | **{}** |\n", self.lost));
        out.push_str(&format!("| causal violations | **{}** |\n", self.causal_violations));
        out.push_str(&format!(
            "| convergence after the last heal | {} |\n",
            self.convergence_ms.map_or("did not converge in 30 s".to_owned(), |ms| format!("{ms:.0} ms"))
        ));
        out.push_str("\n| fault active | ops to healthy nodes | succeeded | p99 latency |\n|---|---:|---:|---:|\n");
        for (k, (n, ok, p99)) in &self.availability {
            out.push_str(&format!("| {k} | {n} | {:.2} % | {p99:.1} ms |\n", *ok as f64 * 100.0 / (*n).max(1) as f64));
        }
        if !self.failure_reasons.is_empty() {
            out.push_str("\nmost common failures on healthy nodes:\n");
            for (reason, n) in &self.failure_reasons {
                out.push_str(&format!("- {n} × {reason}\n"));
            }
        }
        if !self.violations.is_empty() {
            out.push_str("\nviolations:\n");
            for v in &self.violations {
                out.push_str(&format!("- {v}\n"));
            }
        }
        out
    }
}
