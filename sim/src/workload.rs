//! Simulated clients: each does one operation at a time — PUT (a unique value), DELETE or GET of a
//! random key, through a random member — carrying its causal context from answer to request as a
//! real client does, and records every operation for the history checker. A request reaches its
//! node over the simulated network, so a fault of that node holds or refuses it.

use crate::net::{CLIENT, SimNet};
use kvs_node::causal::{EPOCH_ENTRY, VectorClock};
use kvs_node::protocol::Coordinated;
use kvs_testkit::history::{Kind, Op, Outcome};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// A client gives up on an answer after this long (its outcome is then unknown).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// The members clients may send to, kept current by the nemesis. `std` mutex, never held across
/// `.await`.
pub type Members = Arc<Mutex<Vec<String>>>;

/// What one client does.
pub struct Client {
    pub id: usize,
    pub keys: usize,
    pub net: Arc<SimNet>,
    pub members: Members,
    pub start: Instant,
    pub stop: Arc<AtomicBool>,
}

fn micros(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// The context to carry on after an answer (what the HTTP layer hands back).
fn context_after(mut context: VectorClock, c: &Coordinated) -> VectorClock {
    if let Some(r) = &c.record {
        context.merge(&r.clock);
    }
    context.observe(EPOCH_ENTRY, c.view_epoch);
    context
}

impl Client {
    /// Runs until told to stop; returns the operations it did.
    pub async fn run(self, seed: u64) -> Vec<Op> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut context = VectorClock::new();
        let mut history = Vec::new();
        let mut seq = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            let node = {
                let m = self.members.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                m[rng.random_range(0..m.len())].clone()
            };
            let key = format!("key{}", rng.random_range(0..self.keys));
            let kind = match rng.random_range(0..10) {
                0..=4 => Kind::Put(format!("c{}-{seq}", self.id)),
                5 => Kind::Delete,
                _ => Kind::Get,
            };
            seq += 1;
            let invoke = micros(self.start);
            let (k, kd, ctx) = (key.clone(), kind.clone(), context.clone());
            let answer = self.net.deliver(CLIENT, &node, move |n| async move {
                match kd {
                    Kind::Get => n.read(&k, ctx).await,
                    Kind::Put(v) => n.write(&k, Some(bytes::Bytes::from(v.into_bytes())), ctx, 0).await,
                    Kind::Delete => n.write(&k, None, ctx, 0).await,
                }
            });
            let answer = tokio::time::timeout(CLIENT_TIMEOUT, answer).await;
            tracing::debug!(target: "kvs_sim::ops", invoke, client = self.id, ?kind, key, node, ?answer, "operation");
            let outcome = match answer {
                Ok(Ok(Some(Ok(c)))) => {
                    context = context_after(context, &c);
                    let read = c
                        .record
                        .as_ref()
                        .and_then(|r| r.value.as_ref())
                        .map(|v| String::from_utf8_lossy(v).into_owned());
                    Outcome::Ok(if matches!(kind, Kind::Get) { read } else { None })
                }
                _ => Outcome::Unknown,
            };
            let failed = outcome == Outcome::Unknown;
            history.push(Op { client: self.id, key, kind, invoke, complete: micros(self.start), outcome });
            if failed {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        history
    }
}
