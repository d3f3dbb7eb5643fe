//! The fault schedule of a run, drawn from its seed: one fault at a time — a node isolated,
//! paused or crashed and restarted, or a view change (a spare added, a member removed, or K
//! changed) driven through a random member, sometimes with a node paused while it runs.

use crate::cluster::SimCluster;
use crate::workload::Members;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

/// Longest a view change may take in a run before it counts as failed.
const CHANGE_LIMIT: Duration = Duration::from_secs(120);

/// What the nemesis did, for the summary: fault kind → how many.
pub type Faults = BTreeMap<&'static str, usize>;

/// What the nemesis did, when (µs of virtual time since the run started), for a replay.
pub type Timeline = Vec<(u64, String)>;

/// Runs faults until `until`, keeping `members` (what clients may call) current; returns the
/// faults injected and the final membership.
pub async fn run(
    cluster: &mut SimCluster,
    members: Members,
    spares: Vec<String>,
    k: u32,
    seed: u64,
    until: Instant,
    start: Instant,
) -> (Faults, Timeline, Vec<String>, u32) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults = Faults::new();
    let mut timeline = Timeline::new();
    let mut note = |what: String| timeline.push((start.elapsed().as_micros() as u64, what));
    let mut current: Vec<String> = members.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let mut spares = spares;
    let (base_k, mut k_now) = (k, k);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
        let victim = current[rng.random_range(0..current.len())].clone();
        let hold = Duration::from_millis(rng.random_range(200..1200));
        match rng.random_range(0..4) {
            0 => {
                *faults.entry("pause").or_default() += 1;
                note(format!("pause {victim}"));
                cluster.net.set_paused(&victim, true);
                tokio::time::sleep(hold).await;
                cluster.net.set_paused(&victim, false);
                note(format!("resume {victim}"));
            }
            1 => {
                *faults.entry("crash").or_default() += 1;
                note(format!("crash {victim}"));
                cluster.crash(&victim);
                tokio::time::sleep(hold).await;
                cluster.restart(&victim);
                note(format!("restart {victim}"));
            }
            2 => {
                *faults.entry("partition").or_default() += 1;
                note(format!("isolate {victim}"));
                cluster.net.set_isolated(&victim, true);
                tokio::time::sleep(hold).await;
                cluster.net.set_isolated(&victim, false);
                note(format!("heal {victim}"));
            }
            _ => {
                let next_k = if k_now == base_k { base_k + 1 } else { base_k };
                let change_k = rng.random_bool(0.3) && current.len() >= next_k as usize;
                let mut next = current.clone();
                let added = if change_k {
                    None
                } else if !spares.is_empty() && (rng.random_bool(0.5) || current.len() <= 3) {
                    let s = spares.remove(0);
                    next.push(s.clone());
                    Some(s)
                } else {
                    next.retain(|m| *m != victim);
                    None
                };
                let target_k = if change_k { next_k } else { k_now };
                let via = current.iter().find(|m| **m != victim && cluster.is_up(m)).cloned();
                let paused = rng.random_bool(0.3).then(|| victim.clone()).filter(|v| next.contains(v));
                let Some(via) = via.and_then(|v| cluster.net.node(&v)) else { continue };
                note(format!("view change via {} to {next:?} at K={target_k} (pausing {paused:?})", via.id()));
                if let Some(p) = &paused {
                    cluster.net.set_paused(p, true);
                }
                let change = tokio::time::timeout(CHANGE_LIMIT, via.change_view(next.clone(), target_k)).await;
                if let Some(p) = &paused {
                    cluster.net.set_paused(p, false);
                }
                note(format!(
                    "view change ended: {:?}",
                    change.as_ref().map(|r| r.as_ref().map(|c| c.layout.clone()).map_err(|e| e.to_string()))
                ));
                match change {
                    Ok(Ok(_)) => {
                        *faults.entry(if change_k { "K change" } else { "membership change" }).or_default() += 1;
                        if paused.is_some() {
                            *faults.entry("pause during a view change").or_default() += 1;
                        }
                        if added.is_none() && !change_k {
                            spares.push(victim.clone());
                        }
                        k_now = target_k;
                        current = next;
                        *members.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = current.clone();
                    }
                    _ => {
                        *faults.entry("view change refused").or_default() += 1;
                        if let Some(s) = added {
                            spares.insert(0, s);
                        }
                    }
                }
            }
        }
    }
    (faults, timeline, current, k_now)
}
