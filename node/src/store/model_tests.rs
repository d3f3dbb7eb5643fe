//! Model-based tests: both stores, driven by random operation sequences, must behave exactly like a
//! `BTreeMap` that keeps the greatest version per key — including digests, counts, pruning and (for
//! redb) flushing the memtable, reopening the database and crashing.

use super::*;
use crate::causal::{VectorClock, Version};
use crate::placement::slot_of;
use proptest::prelude::*;
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
enum Op {
    Put {
        key: u8,
        ts: u64,
        writer: u8,
        value: Option<u8>,
    },
    Prune {
        key: u8,
    },
    Reopen,
    Crash,
    /// Move the durable store's memtable into its B-tree now.
    Flush,
}

fn key_name(k: u8) -> String {
    format!("k{k}")
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..12, 1u64..20, 0u8..3, proptest::option::of(any::<u8>())).prop_map(|(key, ts, writer, value)| Op::Put { key, ts, writer, value }),
        1 => (0u8..12).prop_map(|key| Op::Prune { key }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
        2 => Just(Op::Flush),
    ]
}

fn record(ts: u64, writer: u8, value: Option<u8>) -> Record {
    Record {
        version: Version { ts, writer: format!("n{writer}") },
        clock: VectorClock::new(),
        value: value.map(|v| bytes::Bytes::from(vec![v; 3])),
    }
}

fn check(store: &dyn Store, model: &BTreeMap<String, Record>) -> Result<(), TestCaseError> {
    let mut digests = vec![0u64; crate::placement::SLOT_COUNT];
    for k in 0..12u8 {
        let key = key_name(k);
        let stored = store.get(&key).unwrap();
        prop_assert_eq!(stored.as_ref(), model.get(&key));
    }
    for (key, r) in model {
        digests[slot_of(key.as_bytes()) as usize] ^= version_hash(key, r);
        let scanned = store.scan_slot(slot_of(key.as_bytes())).unwrap();
        prop_assert!(scanned.iter().any(|(k, s)| k == key && s == r));
    }
    for k in 0..12u8 {
        let slot = slot_of(key_name(k).as_bytes());
        let expected = model.keys().filter(|key| slot_of(key.as_bytes()) == slot).count() as u64;
        prop_assert_eq!(store.digests().records_in(slot), expected);
    }
    for (slot, d) in digests.iter().enumerate() {
        prop_assert_eq!(store.digests().get(slot as u16), *d, "slot {}", slot);
    }
    let live = model.values().filter(|r| !r.is_deleted()).count() as u64;
    let live_bytes = model.iter().filter_map(|(k, r)| Some((k.len() + r.value.as_ref()?.len()) as u64)).sum();
    prop_assert_eq!(
        store.digests().stats(),
        StoreStats { live_keys: live, tombstones: model.len() as u64 - live, live_bytes }
    );
    Ok(())
}

fn run(ops: Vec<Op>, durable: bool) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    enum Either {
        Redb(RedbStore),
        Memory(MemoryStore),
    }
    impl Either {
        fn store(&self) -> &dyn Store {
            match self {
                Either::Redb(s) => s,
                Either::Memory(s) => s,
            }
        }
    }
    let open = || {
        if durable { Either::Redb(RedbStore::open(dir.path()).unwrap()) } else { Either::Memory(MemoryStore::new()) }
    };
    let mut store = open();
    let mut model: BTreeMap<String, Record> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Put { key, ts, writer, value } => {
                let (key, rec) = (key_name(key), record(ts, writer, value));
                let expected = decide(model.get(&key), &rec);
                let got = rt.block_on(store.store().apply(vec![(key.clone(), rec.clone())])).unwrap();
                prop_assert_eq!(got, vec![expected]);
                if expected != Applied::Stale {
                    model.insert(key, rec);
                }
            }
            Op::Prune { key } => {
                let slot = slot_of(key_name(key).as_bytes());
                let expected = model.keys().filter(|k| slot_of(k.as_bytes()) == slot).count() as u64;
                model.retain(|k, _| slot_of(k.as_bytes()) != slot);
                prop_assert_eq!(rt.block_on(store.store().prune(vec![slot])).unwrap(), expected);
            }
            Op::Reopen if durable => {
                drop(store);
                store = open();
            }
            Op::Crash if durable => {
                if let Either::Redb(s) = store {
                    s.simulate_crash();
                }
                store = open();
            }
            Op::Flush => {
                if let Either::Redb(s) = &store {
                    rt.block_on(s.flush_memtable()).unwrap();
                }
            }
            Op::Reopen | Op::Crash => {}
        }
        check(store.store(), &model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn memory_store_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, false)?;
    }

    #[test]
    fn redb_store_matches_model(ops in proptest::collection::vec(op(), 1..25)) {
        run(ops, true)?;
    }
}

#[tokio::test]
async fn concurrent_writers_share_commits_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(RedbStore::open(dir.path()).unwrap());
    let mut tasks = Vec::new();
    for w in 0..32u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20u64 {
                let rec = record(w * 100 + i + 1, 0, Some(1));
                store.apply(vec![(format!("w{w}_{i}"), rec)]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.digests().stats().live_keys, 640);
    drop(store);
    let reopened = RedbStore::open(dir.path()).unwrap();
    assert_eq!(reopened.digests().stats().live_keys, 640);
    assert_eq!(reopened.max_timestamp(), 31 * 100 + 20);
}
