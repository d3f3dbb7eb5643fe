//! Records that are durable in the write-ahead log but not yet in the B-tree.
//!
//! The storage writer makes each group durable with one log `fdatasync` and then puts the group's
//! records here, instead of paying a B-tree transaction per group; every so often it moves
//! everything here into the B-tree in one transaction and empties the table (a *flush*). One
//! transaction per flush instead of one per group is what this buys: redb's per-commit work and
//! its copy-on-write of the pages a transaction touches are paid once for hundreds of records.
//!
//! Invariants:
//! - A record is here only once it is durable in the log, so readers never see a write before
//!   it can be acknowledged.
//! - A record here is newer than the B-tree's record for its key: the writer decided newest-wins
//!   against this table and the B-tree before putting it here.
//! - Records leave only after the transaction that holds them has committed. A reader that looks
//!   here first and in the B-tree second therefore finds every record in one place or the other;
//!   a reader that combines both (a slot scan) keeps the newer version of each key.
//!
//! Keys are the B-tree's keys (`slot ++ key`), so a slot is one contiguous range here too.

use super::Record;
use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The table: written by the storage writer only, read by anyone.
#[derive(Default)]
pub(super) struct Memtable {
    records: RwLock<BTreeMap<Vec<u8>, Record>>,
}

impl Memtable {
    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<Vec<u8>, Record>> {
        self.records.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<Vec<u8>, Record>> {
        self.records.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The record for a B-tree key, if it is here.
    pub(super) fn get(&self, db_key: &[u8]) -> Option<Record> {
        self.read().get(db_key).cloned()
    }

    /// Every record whose B-tree key lies in `start..end`, in key order.
    pub(super) fn range(&self, start: &[u8], end: &[u8]) -> Vec<(Vec<u8>, Record)> {
        self.read()
            .range::<[u8], _>((std::ops::Bound::Included(start), std::ops::Bound::Excluded(end)))
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect()
    }

    /// Adds records that have just become durable (each newer than what it replaces).
    pub(super) fn insert(&self, records: impl IntoIterator<Item = (Vec<u8>, Record)>) {
        let mut table = self.write();
        for (k, r) in records {
            table.insert(k, r);
        }
    }

    /// Records held.
    pub(super) fn len(&self) -> usize {
        self.read().len()
    }

    /// Calls `f` with every record, in key order (the writer, while it builds a flush).
    pub(super) fn for_each<E>(&self, mut f: impl FnMut(&[u8], &Record) -> Result<(), E>) -> Result<(), E> {
        for (k, r) in self.read().iter() {
            f(k, r)?;
        }
        Ok(())
    }

    /// Empties the table (after the B-tree transaction holding every record committed).
    pub(super) fn clear(&self) {
        self.write().clear();
    }
}

/// Merges a B-tree scan and a memtable scan of the same range, both in key order, keeping the
/// newer version where both hold a key (the two were read at different moments).
pub(super) fn merge_newest<K: Ord>(tree: Vec<(K, Record)>, table: Vec<(K, Record)>) -> Vec<(K, Record)> {
    if table.is_empty() {
        return tree;
    }
    let mut out = Vec::with_capacity(tree.len() + table.len());
    let mut tree = tree.into_iter().peekable();
    let mut table = table.into_iter().peekable();
    loop {
        let take_tree = match (tree.peek(), table.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some((a, _)), Some((b, _))) if a < b => true,
            (Some((a, _)), Some((b, _))) if a > b => false,
            (Some(_), Some(_)) => {
                let (k, a) = tree.next().expect("peeked");
                let (_, b) = table.next().expect("peeked");
                out.push((k, if a.version >= b.version { a } else { b }));
                continue;
            }
        };
        out.push(if take_tree { tree.next() } else { table.next() }.expect("peeked"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causal::{VectorClock, Version};

    fn rec(ts: u64) -> Record {
        Record { version: Version { ts, writer: "n".into() }, clock: VectorClock::new(), value: None }
    }

    #[test]
    fn a_merge_keeps_key_order_and_the_newer_version() {
        let k = |s: &str| s.as_bytes().to_vec();
        let tree = vec![(k("a"), rec(1)), (k("c"), rec(5)), (k("d"), rec(1))];
        let table = vec![(k("b"), rec(2)), (k("c"), rec(3)), (k("d"), rec(9)), (k("e"), rec(1))];
        let merged: Vec<_> = merge_newest(tree, table).into_iter().map(|(k, r)| (k, r.version.ts)).collect();
        assert_eq!(merged, [(k("a"), 1), (k("b"), 2), (k("c"), 5), (k("d"), 9), (k("e"), 1)]);
    }

    #[test]
    fn a_slot_range_holds_exactly_its_keys() {
        let table = Memtable::default();
        table.insert([
            (vec![0, 1, b'x'], rec(1)),
            (vec![0, 2, b'y'], rec(2)),
            (vec![0, 2], rec(3)),
            (vec![0, 3], rec(4)),
        ]);
        let got: Vec<_> = table.range(&[0, 2], &[0, 3]).into_iter().map(|(_, r)| r.version.ts).collect();
        assert_eq!(got, [3, 2]);
        assert_eq!(table.len(), 4);
        table.clear();
        assert_eq!(table.len(), 0);
    }
}
