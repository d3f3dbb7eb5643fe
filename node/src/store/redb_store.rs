//! [`Store`] on redb: one database file, records keyed by `slot (2 bytes, big-endian) ++ key`, so a
//! slot is one contiguous range (anti-entropy and rebalancing scan by slot).
//!
//! Group commit: every mutation goes through one writer thread. It takes whatever is queued (up to
//! [`MAX_BATCH_JOBS`] jobs), decides newest-wins against the memtable and the B-tree, appends the
//! records that win to the write-ahead log and `fdatasync`s it once for the whole group, puts them
//! in the memtable ([`super::memtable`]) and only then answers each job. Many concurrent writers
//! share one log fsync; nobody is acknowledged, and no reader sees a record, before it is durable
//! in the log. A *flush* moves the memtable into the B-tree in one transaction without an fsync of
//! its own (`Durability::None`) every [`FLUSH_INTERVAL`], [`FLUSH_RECORDS`] or [`FLUSH_BYTES`]. A
//! checkpoint (a flush, a durable redb commit, then truncating the log) runs every
//! [`CHECKPOINT_INTERVAL`] or [`CHECKPOINT_BYTES`] of log, on pruning and on shutdown; opening
//! replays whatever the log still holds. Reads look in the memtable, then in redb's MVCC read
//! transactions, and never wait for the writer.

use super::memtable::{Memtable, merge_newest};
use super::wal::Wal;
use super::{Applied, CommitCounts, Record, SlotDigests, Store, StoreError, decide};
use crate::placement::{Slot, slot_of};
use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_MAX_TS: &str = "max_timestamp";

/// Most jobs folded into one transaction: bounds the latency of the first job in a group.
pub const MAX_BATCH_JOBS: usize = 512;
/// Longest time log records wait for a checkpoint (bounds replay time after a crash).
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
/// Largest log before a checkpoint.
pub const CHECKPOINT_BYTES: u64 = 64 << 20;
/// Longest a record stays in the memtable before a flush moves it into the B-tree.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Most records the memtable holds before a flush.
pub const FLUSH_RECORDS: usize = 4096;
/// Most bytes of records (as [`Record::approx_size`] counts them) the memtable holds before a flush.
pub const FLUSH_BYTES: usize = 16 << 20;

enum Job {
    Apply {
        batch: Vec<(String, Record)>,
        reply: oneshot::Sender<Result<Vec<Applied>, StoreError>>,
    },
    Prune {
        slots: Vec<Slot>,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// Test only: stop like a killed process would, leaving the log un-checkpointed.
    #[cfg(test)]
    Crash,
    /// Test only: flush the memtable now.
    #[cfg(test)]
    Flush {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// The production store. Cheap to share: clone the `Arc`.
pub struct RedbStore {
    db: Arc<Database>,
    /// Sending side of the writer thread's queue. `std::sync::mpsc` (not tokio) because the
    /// receiver is a plain thread that blocks on it; `send` never blocks (unbounded), and callers
    /// await the oneshot reply instead.
    jobs: Option<mpsc::Sender<Job>>,
    /// Durable records not yet in the B-tree; reads look here first.
    memtable: Arc<Memtable>,
    /// Joined on drop, so the database file is closed (and can be reopened) once the store is gone.
    writer: Option<std::thread::JoinHandle<()>>,
    digests: Arc<SlotDigests>,
    max_ts: Arc<AtomicU64>,
    /// (commits, records) written by the writer thread, read by metrics.
    counts: Arc<[AtomicU64; 2]>,
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn engine<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Engine(e.to_string())
}

fn db_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + key.len());
    k.extend_from_slice(&slot_of(key.as_bytes()).to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

fn decode(db_key: &[u8], bytes: &[u8]) -> Result<(String, Record), StoreError> {
    let key = key_of(db_key)?;
    let record =
        postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt { key: key.clone(), reason: e.to_string() })?;
    Ok((key, record))
}

/// The record the B-tree holds under a B-tree key, as `tree` sees it.
fn tree_get(tree: &impl ReadableTable<&'static [u8], &'static [u8]>, k: &[u8]) -> Result<Option<Record>, StoreError> {
    match tree.get(k).map_err(engine)? {
        Some(v) => Ok(Some(decode(k, v.value())?.1)),
        None => Ok(None),
    }
}

/// The key a B-tree key stands for.
fn key_of(db_key: &[u8]) -> Result<String, StoreError> {
    String::from_utf8(db_key[2..].to_vec()).map_err(|_| StoreError::Corrupt {
        key: String::from_utf8_lossy(&db_key[2..]).into_owned(),
        reason: "key is not UTF-8".into(),
    })
}

impl RedbStore {
    /// Opens (or creates) the database in `dir`, rebuilds the slot digests from its contents and
    /// starts the writer thread.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(engine)?;
        let db = Arc::new(Database::create(dir.join("kvstore.redb")).map_err(engine)?);
        let digests = Arc::new(SlotDigests::default());
        let (mut wal, replay) = Wal::open(&dir.join("kvstore.wal")).map_err(engine)?;
        let mut max_ts = 0;
        {
            // Tables exist, and whatever the log holds is in the B-tree, durably, before the log
            // is emptied (replay is newest-wins, so records already there change nothing).
            let txn = db.begin_write().map_err(engine)?;
            {
                let mut table = txn.open_table(RECORDS).map_err(engine)?;
                txn.open_table(META).map_err(engine)?;
                if !replay.is_empty() {
                    tracing::info!(records = replay.len(), "replaying the write-ahead log");
                }
                for (key, record) in replay {
                    let k = db_key(&key);
                    let current = tree_get(&table, &k)?;
                    if decide(current.as_ref(), &record) != Applied::Stale {
                        let bytes = postcard::to_stdvec(&record).map_err(engine)?;
                        table.insert(k.as_slice(), bytes.as_slice()).map_err(engine)?;
                    }
                }
            }
            txn.commit().map_err(engine)?;
            wal.start_over().map_err(engine)?;
            let read = db.begin_read().map_err(engine)?;
            let table = read.open_table(RECORDS).map_err(engine)?;
            for entry in table.iter().map_err(engine)? {
                let (k, v) = entry.map_err(engine)?;
                let (key, record) = decode(k.value(), v.value())?;
                max_ts = max_ts.max(record.version.ts);
                digests.update(slot_of(key.as_bytes()), &key, None, Some(&record));
            }
            let meta = read.open_table(META).map_err(engine)?;
            if let Some(ts) = meta.get(META_MAX_TS).map_err(engine)? {
                max_ts = max_ts.max(ts.value());
            }
        }
        let max_ts = Arc::new(AtomicU64::new(max_ts));
        let (jobs, queue) = mpsc::channel();
        let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let memtable = Arc::new(Memtable::default());
        let writer = Writer {
            db: db.clone(),
            memtable: memtable.clone(),
            unflushed: None,
            digests: digests.clone(),
            max_ts: max_ts.clone(),
            counts: counts.clone(),
            wal,
            last_checkpoint: Instant::now(),
        };
        let writer = std::thread::Builder::new()
            .name("kvs-store-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(engine)?;
        Ok(RedbStore { db, jobs: Some(jobs), memtable, writer: Some(writer), digests, max_ts, counts })
    }

    /// Test only: closes the store the way `kill -9` would (no final checkpoint), so that the next
    /// `open` has to replay the log.
    #[cfg(test)]
    pub fn simulate_crash(self) {
        let _ = self.send(Job::Crash);
    }

    /// Test only: moves the memtable into the B-tree now.
    #[cfg(test)]
    pub async fn flush_memtable(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Flush { reply })?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        self.jobs.as_ref().ok_or(StoreError::Closed)?.send(job).map_err(|_| StoreError::Closed)
    }
}

#[async_trait]
impl Store for RedbStore {
    fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let k = db_key(key);
        // The memtable before the B-tree's read transaction: a record leaves the memtable only
        // once the B-tree holds it, so one flushed in between is found there.
        if let Some(record) = self.memtable.get(&k) {
            return Ok(Some(record));
        }
        let txn = self.db.begin_read().map_err(engine)?;
        tree_get(&txn.open_table(RECORDS).map_err(engine)?, &k)
    }

    async fn apply(&self, batch: Vec<(String, Record)>) -> Result<Vec<Applied>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.send(Job::Apply { batch, reply })?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    fn scan_slot(&self, slot: Slot) -> Result<Vec<(String, Record)>, StoreError> {
        let start = slot.to_be_bytes();
        // Slots are below SLOT_COUNT (<= 2^15), so `slot + 1` cannot overflow.
        let end = (slot + 1).to_be_bytes();
        // The memtable before the B-tree: a record flushed in between is then in the B-tree.
        let unflushed = self.memtable.range(&start, &end);
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(RECORDS).map_err(engine)?;
        let mut stored = Vec::new();
        for entry in table.range(start.as_slice()..end.as_slice()).map_err(engine)? {
            let (k, v) = entry.map_err(engine)?;
            stored.push(decode(k.value(), v.value())?);
        }
        let mut fresh = Vec::with_capacity(unflushed.len());
        for (k, record) in unflushed {
            fresh.push((key_of(&k)?, record));
        }
        // Within a slot, keys sort as their B-tree keys do.
        Ok(merge_newest(stored, fresh))
    }

    async fn prune(&self, slots: Vec<Slot>) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Prune { slots, reply })?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    fn digests(&self) -> &SlotDigests {
        &self.digests
    }

    fn max_timestamp(&self) -> u64 {
        self.max_ts.load(Ordering::Acquire)
    }

    fn commit_counts(&self) -> CommitCounts {
        CommitCounts {
            commits: self.counts[0].load(Ordering::Relaxed),
            records: self.counts[1].load(Ordering::Relaxed),
        }
    }
}

/// The single writer: owns every mutation of the database, the memtable and the digests.
struct Writer {
    db: Arc<Database>,
    memtable: Arc<Memtable>,
    /// When the oldest record in the memtable went in, and how many bytes it holds (`None`: empty).
    unflushed: Option<(Instant, usize)>,
    digests: Arc<SlotDigests>,
    max_ts: Arc<AtomicU64>,
    counts: Arc<[AtomicU64; 2]>,
    wal: Wal,
    last_checkpoint: Instant,
}

/// A record that wins newest-wins, with what it replaces (for the digests).
struct Change {
    slot: Slot,
    key: String,
    db_key: Vec<u8>,
    old: Option<Record>,
    new: Record,
}

impl Writer {
    fn run(mut self, queue: mpsc::Receiver<Job>) {
        loop {
            let first = match queue.recv_timeout(self.until_maintenance()) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.maintain();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            #[cfg(test)]
            if matches!(first, Job::Crash) {
                return;
            }
            let mut group = vec![first];
            while group.len() < MAX_BATCH_JOBS {
                match queue.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            self.commit_group(group);
            self.maintain();
        }
        if let Err(e) = self.checkpoint() {
            tracing::warn!(error = %e, "final checkpoint failed; the log will be replayed on the next start");
        }
        tracing::debug!("storage writer stopped: every store handle was dropped");
    }

    /// How long the writer may wait for a job before a flush or checkpoint is due.
    fn until_maintenance(&self) -> Duration {
        match self.unflushed {
            Some((since, _)) => FLUSH_INTERVAL.saturating_sub(since.elapsed()),
            None => CHECKPOINT_INTERVAL,
        }
    }

    /// Flushes and checkpoints when they are due.
    fn maintain(&mut self) {
        let flush_due = self.unflushed.is_some_and(|(since, bytes)| {
            since.elapsed() >= FLUSH_INTERVAL || bytes >= FLUSH_BYTES || self.memtable.len() >= FLUSH_RECORDS
        });
        if flush_due && let Err(e) = self.flush() {
            tracing::error!(error = %e, "flushing the memtable failed; its records stay in the log and the memtable, and it will be retried");
        }
        let checkpoint_due = self.wal.len() >= CHECKPOINT_BYTES
            || (!self.wal.is_empty() && self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL);
        if checkpoint_due && let Err(e) = self.checkpoint() {
            tracing::error!(error = %e, "checkpoint failed; the log keeps every record and will be retried");
        }
    }

    /// Moves every memtable record into the B-tree in one transaction (not durable by itself: the
    /// log still holds the records until the next checkpoint), then empties the memtable.
    fn flush(&mut self) -> Result<(), StoreError> {
        if self.unflushed.is_none() {
            return Ok(());
        }
        let mut txn = self.db.begin_write().map_err(engine)?;
        txn.set_durability(Durability::None).map_err(engine)?;
        {
            let mut table = txn.open_table(RECORDS).map_err(engine)?;
            self.memtable.for_each(|k, record| {
                let bytes = postcard::to_stdvec(record).map_err(engine)?;
                table.insert(k, bytes.as_slice()).map_err(engine)?;
                Ok::<_, StoreError>(())
            })?;
            txn.open_table(META)
                .map_err(engine)?
                .insert(META_MAX_TS, self.max_ts.load(Ordering::Acquire))
                .map_err(engine)?;
        }
        txn.commit().map_err(engine)?;
        self.memtable.clear();
        self.unflushed = None;
        Ok(())
    }

    /// Makes everything in the log durable in the B-tree, then empties the log.
    fn checkpoint(&mut self) -> Result<(), StoreError> {
        self.flush()?;
        let txn = self.db.begin_write().map_err(engine)?;
        txn.open_table(META)
            .map_err(engine)?
            .insert(META_MAX_TS, self.max_ts.load(Ordering::Acquire))
            .map_err(engine)?;
        txn.commit().map_err(engine)?;
        self.wal.start_over().map_err(engine)?;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    fn commit_group(&mut self, group: Vec<Job>) {
        let mut applies = Vec::new();
        let mut prunes = Vec::new();
        for job in group {
            match job {
                Job::Apply { batch, reply } => applies.push((batch, reply)),
                Job::Prune { slots, reply } => prunes.push((slots, reply)),
                #[cfg(test)]
                Job::Crash => {}
                #[cfg(test)]
                Job::Flush { reply } => {
                    let _ = reply.send(self.flush());
                }
            }
        }
        if !applies.is_empty() {
            let batches: Vec<_> = applies.iter_mut().map(|(b, _)| std::mem::take(b)).collect();
            match self.apply_all(batches) {
                Ok(outcomes) => {
                    for ((_, reply), outcome) in applies.into_iter().zip(outcomes) {
                        let _ = reply.send(Ok(outcome));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "group commit failed; every write in the group is reported failed");
                    for (_, reply) in applies {
                        let _ = reply.send(Err(StoreError::Engine(e.to_string())));
                    }
                }
            }
        }
        for (slots, reply) in prunes {
            let _ = reply.send(self.prune(&slots));
        }
    }

    /// Decides newest-wins for every record of the group, makes the winners durable with one log
    /// append, then shows them to readers (memtable, digests).
    fn apply_all(&mut self, batches: Vec<Vec<(String, Record)>>) -> Result<Vec<Vec<Applied>>, StoreError> {
        let read = self.db.begin_read().map_err(engine)?;
        let tree = read.open_table(RECORDS).map_err(engine)?;
        let mut outcomes = Vec::with_capacity(batches.len());
        let mut changes: Vec<Change> = Vec::new();
        // The latest change of each key in this group, which later records of the key face.
        let mut latest: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut max_ts = 0;
        for batch in batches {
            let mut batch_outcomes = Vec::with_capacity(batch.len());
            for (key, record) in batch {
                let k = db_key(&key);
                let current = match latest.get(&k) {
                    Some(&i) => Some(changes[i].new.clone()),
                    // The writer alone changes both, so the order of the two looks is free here.
                    None => match self.memtable.get(&k) {
                        Some(r) => Some(r),
                        None => tree_get(&tree, &k)?,
                    },
                };
                let outcome = decide(current.as_ref(), &record);
                if outcome != Applied::Stale {
                    max_ts = max_ts.max(record.version.ts);
                    latest.insert(k.clone(), changes.len());
                    changes.push(Change { slot: slot_of(key.as_bytes()), key, db_key: k, old: current, new: record });
                }
                batch_outcomes.push(outcome);
            }
            outcomes.push(batch_outcomes);
        }
        drop(tree);
        drop(read);
        if changes.is_empty() {
            return Ok(outcomes);
        }
        // Durable in the log before readers see it or it is acknowledged; if the append fails,
        // nothing was shown and every job in the group fails.
        self.wal.append_durable(changes.iter().map(|c| (c.key.as_str(), &c.new))).map_err(engine)?;
        let bytes: usize = changes.iter().map(|c| c.db_key.len() + c.new.approx_size()).sum();
        self.memtable.insert(changes.iter().map(|c| (c.db_key.clone(), c.new.clone())));
        let (since, held) = self.unflushed.unwrap_or((Instant::now(), 0));
        self.unflushed = Some((since, held + bytes));
        self.counts[0].fetch_add(1, Ordering::Relaxed);
        self.counts[1].fetch_add(changes.len() as u64, Ordering::Relaxed);
        self.max_ts.fetch_max(max_ts, Ordering::AcqRel);
        for c in changes {
            self.digests.update(c.slot, &c.key, c.old.as_ref(), Some(&c.new));
        }
        Ok(outcomes)
    }

    /// Removes whole slots durably. The commit is durable (it also persists every earlier
    /// non-durable commit, the flush of the memtable first among them), and the log is emptied
    /// right after, so replay can never bring pruned records back.
    fn prune(&mut self, slots: &[Slot]) -> Result<u64, StoreError> {
        self.flush()?;
        let txn = self.db.begin_write().map_err(engine)?;
        let mut removed = 0;
        let mut cleared = Vec::new();
        {
            let mut table = txn.open_table(RECORDS).map_err(engine)?;
            for &slot in slots {
                let (mut live, mut dead) = (0i64, 0i64);
                let start = slot.to_be_bytes();
                let end = (slot + 1).to_be_bytes();
                for entry in table.extract_from_if(start.as_slice()..end.as_slice(), |_, _| true).map_err(engine)? {
                    let (k, v) = entry.map_err(engine)?;
                    let (_, record) = decode(k.value(), v.value())?;
                    if record.is_deleted() { dead += 1 } else { live += 1 }
                }
                removed += (live + dead) as u64;
                cleared.push((slot, live, dead));
            }
        }
        txn.commit().map_err(engine)?;
        self.wal.start_over().map_err(engine)?;
        self.last_checkpoint = Instant::now();
        for (slot, live, dead) in cleared {
            self.digests.clear_slot(slot, live, dead);
        }
        Ok(removed)
    }
}
