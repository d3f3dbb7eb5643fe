//! A write fence: lets a view change wait until every write that started under the previous view
//! has finished, without making writes take a lock.
//!
//! Writes register in the counter of the current generation. `advance` moves new writes to the
//! next generation, then waits until the old generation's counter drains. A write registers
//! *before* it reads the view, so once `advance` returns, every write still running read the view
//! (and any pending view) that was in place when `advance` was called.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use tokio::sync::Notify;

#[derive(Default)]
pub struct WriteFence {
    generation: AtomicU64,
    in_flight: [AtomicUsize; 2],
    drained: Notify,
}

/// Held by a write for its whole duration.
pub struct FenceGuard<'a> {
    fence: &'a WriteFence,
    slot: usize,
}

impl WriteFence {
    /// Registers a write under the current generation.
    pub fn enter(&self) -> FenceGuard<'_> {
        loop {
            let generation = self.generation.load(Ordering::Acquire);
            let slot = (generation % 2) as usize;
            self.in_flight[slot].fetch_add(1, Ordering::AcqRel);
            if self.generation.load(Ordering::Acquire) == generation {
                return FenceGuard { fence: self, slot };
            }
            // The generation moved while registering: undo and register under the new one.
            self.leave(slot);
        }
    }

    fn leave(&self, slot: usize) {
        if self.in_flight[slot].fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drained.notify_waiters();
        }
    }

    /// Starts a new generation and waits until every write of the previous one has finished.
    /// Callers serialize `advance` (view changes are serialized per node).
    pub async fn advance(&self) {
        let old = (self.generation.fetch_add(1, Ordering::AcqRel) % 2) as usize;
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight[old].load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for FenceGuard<'_> {
    fn drop(&mut self) {
        self.fence.leave(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn advance_waits_for_old_writes_but_not_new_ones() {
        let fence = Arc::new(WriteFence::default());
        let old = fence.enter();
        let f = fence.clone();
        let waiter = tokio::spawn(async move { f.advance().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _new = fence.enter(); // a write of the new generation does not hold the fence up
        assert!(!waiter.is_finished(), "advance must wait for the old write");
        drop(old);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("advance returns once old writes finish")
            .unwrap();
    }
}
