//! Backpressure for client requests: at most [`Limits::max_in_flight`] client operations run on a
//! node at once; more wait in a queue (first come, first served) for up to
//! [`Limits::queue_timeout`], and only a request that waited that long is refused — with a
//! message naming the limit and a `Retry-After`.
//!
//! Why: a node that takes on every request at once under overload makes every request slow at
//! the same time, internal messages included (replication, heartbeats), until timeouts fire
//! everywhere. Bounding the work in progress keeps each admitted request, and everything the
//! cluster says internally, as fast as the hardware allows; the rest waits its turn.
//!
//! Only client operations entering the cluster at this node are admitted here. Work a node does
//! for its peers (coordinating a forwarded request, storing a replica, heartbeats) is not: it is
//! already bounded by the admitting node and by the per-peer lanes of [`crate::peers`], and
//! making it wait here could deadlock two nodes that forward to each other.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, SemaphorePermit};

/// The bound and the queue's patience.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Client operations in progress on this node at once.
    pub max_in_flight: usize,
    /// Longest a client operation waits for a slot before it is refused.
    pub queue_timeout: Duration,
}

/// Client operations in progress per CPU core by default. Measured on 2 cores (4 nodes, K=2, PUTs
/// from 128 to 1,024 connections): 16 per core kept throughput within ~20 % of its peak at 1,024
/// connections, where 64 per core lost ~30 % and 8 per core starved the 128-connection load.
pub const IN_FLIGHT_PER_CORE: usize = 16;

impl Default for Limits {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Limits { max_in_flight: IN_FLIGHT_PER_CORE * cores, queue_timeout: Duration::from_secs(5) }
    }
}

/// A request that waited [`Limits::queue_timeout`] without getting a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "this node is overloaded: {max_in_flight} requests are in progress (its --max-in-flight-requests) and this one waited {waited:?} \
     (its --queue-timeout-ms) without a slot; retry later, send requests to other nodes, or add nodes"
)]
pub struct Overloaded {
    pub max_in_flight: usize,
    pub waited: Duration,
}

/// The admission queue of one node.
pub struct Admission {
    limits: Limits,
    slots: Semaphore,
    queued: AtomicI64,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Admission { limits, slots: Semaphore::new(limits.max_in_flight.max(1)), queued: AtomicI64::new(0) }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Requests waiting for a slot right now.
    pub fn queued(&self) -> i64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Requests in progress right now.
    pub fn in_flight(&self) -> usize {
        self.limits.max_in_flight.max(1) - self.slots.available_permits()
    }

    /// Waits for a slot (tokio's semaphore is fair: first come, first served); the slot is held
    /// until the permit is dropped.
    pub async fn admit(&self) -> Result<SemaphorePermit<'_>, Overloaded> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok(permit);
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        let waited = tokio::time::timeout(self.limits.queue_timeout, self.slots.acquire()).await;
        self.queued.fetch_sub(1, Ordering::Relaxed);
        match waited {
            Ok(permit) => Ok(permit.expect("the admission semaphore is never closed")),
            Err(_) => Err(Overloaded { max_in_flight: self.limits.max_in_flight, waited: self.limits.queue_timeout }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn requests_past_the_bound_wait_then_are_refused_naming_the_limit() {
        let a = Admission::new(Limits { max_in_flight: 2, queue_timeout: Duration::from_secs(5) });
        let first = a.admit().await.unwrap();
        let _second = a.admit().await.unwrap();
        assert_eq!(a.in_flight(), 2);
        // A third waits and gets the slot the first frees.
        let waiting = a.admit();
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        assert_eq!(a.queued(), 1);
        drop(first);
        assert!(waiting.await.is_ok());
        assert_eq!(a.queued(), 0);
        // With every slot held, a request waits the whole queue timeout, then is refused.
        let _third = a.admit().await;
        let refused = a.admit().await.unwrap_err();
        assert_eq!(refused, Overloaded { max_in_flight: 2, waited: Duration::from_secs(5) });
        assert!(refused.to_string().contains("--max-in-flight-requests"));
    }
}
