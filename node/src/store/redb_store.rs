//! [`Store`] on redb: one database file, records keyed by `slot (2 bytes, big-endian) ++ key`, so a
//! slot is one contiguous range (anti-entropy and rebalancing scan by slot).
//!
//! Group commit: every mutation goes through one writer thread. It takes whatever is queued (up to
//! [`MAX_BATCH_JOBS`] jobs), applies it in a single write transaction, commits with
//! `Durability::Immediate` (one fsync for the whole group), and only then answers each job. Many
//! concurrent writers therefore share one fsync, and nobody is acknowledged before it. Reads use
//! redb's MVCC read transactions and never wait for the writer.

use super::{Applied, Record, SlotDigests, Store, StoreError, decide};
use crate::placement::{Slot, slot_of};
use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use tokio::sync::oneshot;

const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_MAX_TS: &str = "max_timestamp";

/// Most jobs folded into one transaction: bounds the latency of the first job in a group.
pub const MAX_BATCH_JOBS: usize = 512;

enum Job {
    Apply { batch: Vec<(String, Record)>, reply: oneshot::Sender<Result<Vec<Applied>, StoreError>> },
    Prune { slots: Vec<Slot>, reply: oneshot::Sender<Result<u64, StoreError>> },
}

/// The production store. Cheap to share: clone the `Arc`.
pub struct RedbStore {
    db: Arc<Database>,
    /// Sending side of the writer thread's queue. `std::sync::mpsc` (not tokio) because the
    /// receiver is a plain thread that blocks on it; `send` never blocks (unbounded), and callers
    /// await the oneshot reply instead.
    jobs: Option<mpsc::Sender<Job>>,
    /// Joined on drop, so the database file is closed (and can be reopened) once the store is gone.
    writer: Option<std::thread::JoinHandle<()>>,
    digests: Arc<SlotDigests>,
    max_ts: Arc<AtomicU64>,
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
    let key = String::from_utf8(db_key[2..].to_vec())
        .map_err(|_| StoreError::Corrupt { key: String::from_utf8_lossy(&db_key[2..]).into_owned(), reason: "key is not UTF-8".into() })?;
    let record = postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt { key: key.clone(), reason: e.to_string() })?;
    Ok((key, record))
}

impl RedbStore {
    /// Opens (or creates) the database in `dir`, rebuilds the slot digests from its contents and
    /// starts the writer thread.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(engine)?;
        let db = Arc::new(Database::create(dir.join("kvstore.redb")).map_err(engine)?);
        let digests = Arc::new(SlotDigests::default());
        let mut max_ts = 0;
        {
            let txn = db.begin_write().map_err(engine)?;
            txn.open_table(RECORDS).map_err(engine)?;
            txn.open_table(META).map_err(engine)?;
            txn.commit().map_err(engine)?;
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
        let writer = Writer { db: db.clone(), digests: digests.clone(), max_ts: max_ts.clone() };
        let writer = std::thread::Builder::new().name("kvs-store-writer".into()).spawn(move || writer.run(queue)).map_err(engine)?;
        Ok(RedbStore { db, jobs: Some(jobs), writer: Some(writer), digests, max_ts })
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        self.jobs.as_ref().ok_or(StoreError::Closed)?.send(job).map_err(|_| StoreError::Closed)
    }
}

#[async_trait]
impl Store for RedbStore {
    fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(RECORDS).map_err(engine)?;
        let k = db_key(key);
        match table.get(k.as_slice()).map_err(engine)? {
            Some(v) => Ok(Some(decode(&k, v.value())?.1)),
            None => Ok(None),
        }
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
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(RECORDS).map_err(engine)?;
        let start = slot.to_be_bytes();
        let mut out = Vec::new();
        // Slots are below SLOT_COUNT (<= 2^15), so `slot + 1` cannot overflow.
        let end = (slot + 1).to_be_bytes();
        for entry in table.range(start.as_slice()..end.as_slice()).map_err(engine)? {
            let (k, v) = entry.map_err(engine)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
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
}

/// The single writer: owns every mutation of the database and of the digests.
struct Writer {
    db: Arc<Database>,
    digests: Arc<SlotDigests>,
    max_ts: Arc<AtomicU64>,
}

/// A change to apply to the digests once the transaction holding it has committed.
struct DigestChange {
    slot: Slot,
    key: String,
    old: Option<Record>,
    new: Record,
}

impl Writer {
    fn run(self, queue: mpsc::Receiver<Job>) {
        while let Ok(first) = queue.recv() {
            let mut group = vec![first];
            while group.len() < MAX_BATCH_JOBS {
                match queue.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            self.commit_group(group);
        }
        tracing::debug!("storage writer stopped: every store handle was dropped");
    }

    fn commit_group(&self, group: Vec<Job>) {
        let mut applies = Vec::new();
        let mut prunes = Vec::new();
        for job in group {
            match job {
                Job::Apply { batch, reply } => applies.push((batch, reply)),
                Job::Prune { slots, reply } => prunes.push((slots, reply)),
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

    fn apply_all(&self, batches: Vec<Vec<(String, Record)>>) -> Result<Vec<Vec<Applied>>, StoreError> {
        let txn = self.db.begin_write().map_err(engine)?;
        let mut outcomes = Vec::with_capacity(batches.len());
        let mut changes = Vec::new();
        let mut max_ts = 0;
        {
            let mut table = txn.open_table(RECORDS).map_err(engine)?;
            for batch in batches {
                let mut batch_outcomes = Vec::with_capacity(batch.len());
                for (key, record) in batch {
                    let k = db_key(&key);
                    let current = match table.get(k.as_slice()).map_err(engine)? {
                        Some(v) => Some(decode(&k, v.value())?.1),
                        None => None,
                    };
                    let outcome = decide(current.as_ref(), &record);
                    if outcome != Applied::Stale {
                        let bytes = postcard::to_stdvec(&record).map_err(engine)?;
                        table.insert(k.as_slice(), bytes.as_slice()).map_err(engine)?;
                        max_ts = max_ts.max(record.version.ts);
                        changes.push(DigestChange { slot: slot_of(key.as_bytes()), key, old: current, new: record });
                    }
                    batch_outcomes.push(outcome);
                }
                outcomes.push(batch_outcomes);
            }
            if max_ts > self.max_ts.load(Ordering::Acquire) {
                txn.open_table(META).map_err(engine)?.insert(META_MAX_TS, max_ts).map_err(engine)?;
            }
        }
        txn.commit().map_err(engine)?;
        self.max_ts.fetch_max(max_ts, Ordering::AcqRel);
        for c in changes {
            self.digests.update(c.slot, &c.key, c.old.as_ref(), Some(&c.new));
        }
        Ok(outcomes)
    }

    fn prune(&self, slots: &[Slot]) -> Result<u64, StoreError> {
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
        for (slot, live, dead) in cleared {
            self.digests.clear_slot(slot, live, dead);
        }
        Ok(removed)
    }
}
