//! View changes with real node processes: adding and removing nodes and changing K while the
//! cluster holds data (and, in one test, while a client keeps writing), checked key by key.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::{Cluster, change_view, get, put, status, update_view};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

async fn write_keys(c: &Cluster, prefix: &str, n: usize) {
    let nodes = c.running();
    for i in 0..n {
        let (status, body) = put(&c.http, &nodes[i % nodes.len()], &format!("{prefix}{i}"), &format!("v{i}"), "").await;
        assert!(status == 200 || status == 201, "{body}");
    }
}

/// Every key reads back with its value through every running node.
async fn assert_all_readable(c: &Cluster, prefix: &str, n: usize) {
    let checks = c.running().into_iter().map(|node| {
        let http = c.http.clone();
        let prefix = prefix.to_owned();
        tokio::spawn(async move {
            for i in 0..n {
                let (status, body) = get(&http, &node, &format!("{prefix}{i}"), "").await;
                assert_eq!(
                    (status, body["value"].as_str()),
                    (200, Some(format!("v{i}").as_str())),
                    "{prefix}{i} via {node}: {body}"
                );
            }
        })
    });
    for check in checks {
        check.await.unwrap();
    }
}

/// Every running node reports the same layout; returns it.
async fn agreed_layout(c: &Cluster) -> Value {
    let mut layouts = Vec::new();
    for node in c.running() {
        layouts.push(status(&c.http, &node).await["layout"].clone());
    }
    for l in &layouts[1..] {
        assert_eq!(l, &layouts[0], "all nodes agree on the view");
    }
    layouts.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_add_two_then_remove_three_one_of_them_killed() {
    let mut c = Cluster::start(4, 2, &[]).await;
    write_keys(&c, "k", 500).await;
    let first = c.addrs()[0].clone();
    for (i, want) in [(4, 2), (5, 3), (6, 3)] {
        let new = c.spawn_joiner(i, 2).await;
        let (status, body) = update_view(&c.http, &first, "add", &new).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["number_of_partitions"], want, "{} nodes at K=2: {body}", i + 1);
        assert!(body["partition_id"].as_i64().is_some());
        assert_all_readable(&c, "k", 500).await;
    }
    assert_eq!(agreed_layout(&c).await["partitions"].as_array().unwrap().len(), 3);
    // Kill a member, then remove it (the course's test does exactly this), then two live ones.
    let victim = c.addrs()[1].clone();
    c.node(&victim).kill();
    let (status, body) = update_view(&c.http, &first, "remove", &victim).await;
    assert_eq!((status, body["number_of_partitions"].as_i64()), (200, Some(3)), "6 nodes: {body}");
    assert_all_readable(&c, "k", 500).await;
    for (who, want) in [(2, 2), (3, 2)] {
        let gone = c.addrs()[who].clone();
        let (status, body) = update_view(&c.http, &first, "remove", &gone).await;
        assert_eq!((status, body["number_of_partitions"].as_i64()), (200, Some(want)), "{body}");
        c.node(&gone).kill();
        assert_all_readable(&c, "k", 500).await;
    }
    let layout = agreed_layout(&c).await;
    assert_eq!(layout["epoch"], 7, "six changes after the initial view");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_removing_a_whole_partition_member_by_member_loses_nothing() {
    let mut c = Cluster::start(4, 2, &[]).await;
    write_keys(&c, "p", 300).await;
    let layout = c.partitions(&c.addrs()[0]).await;
    let via = layout[1][0].clone();
    for member in layout[0].clone() {
        let (status, body) = update_view(&c.http, &via, "remove", &member).await;
        assert_eq!(status, 200, "{body}");
        c.node(&member).kill();
        assert_all_readable(&c, "p", 300).await;
    }
    assert_eq!(c.running().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_changing_k_keeps_every_key_on_every_replica() {
    let c = Cluster::start(6, 2, &[]).await;
    write_keys(&c, "r", 300).await;
    let members = c.addrs();
    for k in [3, 1, 2] {
        let changed = common::change_view(&members[0], &members, k).await;
        assert_eq!(changed.layout.partitions.len(), 6 / k as usize, "{changed:?}");
        assert_all_readable(&c, "r", 300).await;
        let st = status(&c.http, &members[0]).await;
        let mut total = 0;
        for p in st["partitions"].as_array().unwrap() {
            let counts: Vec<u64> = p["live_keys"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            assert!(
                counts.iter().all(|&n| n == counts[0]),
                "K={k}: every replica of a partition holds the same keys: {p}"
            );
            total += counts[0];
        }
        assert_eq!(total, 300, "K={k}: each key in exactly one partition, nothing left over: {st}");
    }
}

/// One writer per key set, sequential per key, so "the last acknowledged value" is well defined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t40_writes_during_add_and_remove_are_never_lost() {
    let mut c = Cluster::start(4, 2, &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (http, nodes, stop) = (c.http.clone(), c.addrs(), stop.clone());
        writers.push(tokio::spawn(async move {
            // key -> (last acknowledged value, values whose outcome is unknown since then)
            let mut history: BTreeMap<String, (Option<u64>, Vec<u64>)> = BTreeMap::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w{w}_{}", n % 25);
                let node = &nodes[(n as usize + w) % nodes.len()];
                let (status, _) = put(&http, node, &key, &n.to_string(), "").await;
                let entry = history.entry(key).or_default();
                if status == 200 || status == 201 {
                    *entry = (Some(n), Vec::new());
                } else {
                    entry.1.push(n);
                }
                n += 1;
            }
            history
        }));
    }
    let first = c.addrs()[0].clone();
    for i in [4, 5] {
        let new = c.spawn_joiner(i, 2).await;
        assert_eq!(update_view(&c.http, &first, "add", &new).await.0, 200);
    }
    let gone = c.addrs()[2].clone();
    assert_eq!(update_view(&c.http, &first, "remove", &gone).await.0, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut checked = 0;
    for w in writers {
        for (key, (acked, unknown)) in w.await.unwrap() {
            for node in c.running() {
                let (status, body) = get(&c.http, &node, &key, "").await;
                let value = body["value"].as_str().and_then(|v| v.parse::<u64>().ok());
                let ok = value == acked || value.is_some_and(|v| unknown.contains(&v));
                assert!(
                    ok && status == 200,
                    "{key} via {node}: got {body}, last acknowledged {acked:?}, unknown {unknown:?}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 4 * 25 * 5, "checked {checked} key/node pairs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_two_concurrent_view_changes_never_share_an_epoch() {
    let mut c = Cluster::start(4, 2, &[]).await;
    write_keys(&c, "c", 100).await;
    let x = c.spawn_joiner(4, 2).await;
    let y = c.spawn_joiner(5, 2).await;
    let nodes = c.addrs();
    let (a, b) = tokio::join!(update_view(&c.http, &nodes[0], "add", &x), update_view(&c.http, &nodes[3], "add", &y));
    let statuses = [a.0, b.0];
    println!("concurrent changes answered {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 409), "each is applied or refused: {a:?} {b:?}");
    assert!(statuses.contains(&200), "one of them wins: {a:?} {b:?}");
    for (s, body) in [&a, &b] {
        if *s == 409 {
            assert!(body["msg"].as_str().unwrap().contains("retry"), "{body}");
        }
    }
    // The loser retries and succeeds; everyone ends on one layout.
    if a.0 == 409 {
        assert_eq!(update_view(&c.http, &nodes[0], "add", &x).await.0, 200);
    }
    if b.0 == 409 {
        assert_eq!(update_view(&c.http, &nodes[3], "add", &y).await.0, 200);
    }
    let layout = agreed_layout(&c).await;
    assert_eq!(layout["epoch"], 3, "two changes, two epochs: {layout}");
    assert_eq!(layout["partitions"].as_array().unwrap().len(), 3);
    assert_all_readable(&c, "c", 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_a_retried_view_change_is_idempotent() {
    let mut c = Cluster::start(4, 2, &[]).await;
    let x = c.spawn_joiner(4, 2).await;
    let first = c.addrs()[0].clone();
    let (s1, b1) = update_view(&c.http, &first, "add", &x).await;
    let (s2, b2) = update_view(&c.http, &c.addrs()[2], "add", &x).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(b1, b2, "the retry answers the same");
    assert_eq!(agreed_layout(&c).await["epoch"], 2, "the retry did not make a new epoch");
    let gone = c.addrs()[1].clone();
    for _ in 0..2 {
        assert_eq!(update_view(&c.http, &first, "remove", &gone).await.0, 200);
    }
    assert_eq!(agreed_layout(&c).await["epoch"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t70_view_change_while_a_replica_is_paused() {
    let mut c = Cluster::start(4, 2, &[]).await;
    write_keys(&c, "z", 300).await;
    let layout = c.partitions(&c.addrs()[0]).await;
    let paused = layout[1][1].clone();
    c.node(&paused).pause();
    let first = layout[0][0].clone();
    for i in [4, 5] {
        let new = c.spawn_joiner(i, 2).await;
        let (status, body) = update_view(&c.http, &first, "add", &new).await;
        assert_eq!(status, 200, "{body}");
    }
    c.node(&paused).resume();
    // The paused node learns the view from its peers and prunes what moved away.
    let mut converged = false;
    for _ in 0..100 {
        let st = status(&c.http, &paused).await;
        if st["layout"]["epoch"] == 3 {
            converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(converged, "the resumed node adopted the new view");
    assert_all_readable(&c, "z", 300).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = status(&c.http, &first).await;
    for p in st["partitions"].as_array().unwrap() {
        let counts: Vec<u64> = p["live_keys"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert!(counts.iter().all(|&n| n == counts[0]), "replicas agree after the paused one caught up: {p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t80_a_new_partition_whose_joiners_all_fail_to_answer_is_refused_then_made() {
    let mut c = Cluster::start(4, 2, &[]).await;
    write_keys(&c, "j", 100).await;
    // Nodes 4 and 5 of this net would form the new partition 2, but nothing listens there yet
    // (a joining pod whose name does not resolve yet looks the same).
    let members: Vec<String> = (0..6).map(|i| c.net.node(i)).collect();
    let first = c.addrs()[0].clone();
    let refused = kvs_api::AdminClient::default().change_view(&first, members.clone(), 2).await.unwrap_err();
    assert_eq!(refused.status(), Some(503), "{refused}");
    assert!(refused.to_string().contains("new partition 2"), "{refused}");
    assert_eq!(agreed_layout(&c).await["epoch"], 1, "nothing was committed");
    // Once they run, the same change goes through and every key is served by the new partitions.
    for i in 4..6 {
        c.spawn_joiner(i, 2).await;
    }
    let changed = change_view(&first, &members, 2).await;
    assert_eq!(changed.layout.partitions.len(), 3);
    assert_eq!(agreed_layout(&c).await["epoch"], 2);
    assert_all_readable(&c, "j", 100).await;
}
