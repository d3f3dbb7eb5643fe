//! Catching up after a start (`node/src/catch_up.rs`): a member restarted under its old identity
//! with an emptied data directory never answers from its empty store; it re-syncs from its
//! partition before `/readyz` says ready, and meanwhile its partition's requests are answered by
//! a replica that holds the data.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::{Cluster, get, put};
use std::time::Duration;

/// Keys written before the restart.
const KEYS: usize = 1000;

/// Kills `node`, empties its data directory, and starts it again under the same identity (the
/// same `VIEW`, `IPPORT`); returns once it answers `/healthz`.
async fn restart_empty(c: &mut Cluster, node: &str) {
    let proc = c.node(node);
    proc.kill();
    for entry in std::fs::read_dir(proc.data_dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { std::fs::remove_dir_all(&path).unwrap() } else { std::fs::remove_file(&path).unwrap() }
    }
    proc.restart().await;
}

/// `/readyz` of `node`: status and body.
async fn readyz(c: &Cluster, node: &str) -> (u16, String) {
    let r = c.http.get(format!("http://{node}/readyz")).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn wait_ready(c: &Cluster, node: &str) {
    for _ in 0..600 {
        if readyz(c, node).await.0 == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{node} never became ready: {:?}", readyz(c, node).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_a_member_restarted_with_an_empty_data_directory_answers_every_key_and_resyncs_before_ready() {
    let mut c = Cluster::start(4, 2, &[]).await;
    let nodes = c.addrs();
    for i in 0..KEYS {
        let (status, body) = put(&c.http, &nodes[i % 4], &format!("k{i}"), &format!("v{i}"), "").await;
        assert_eq!(status, 201, "k{i}: {body}");
    }
    let emptied = nodes[1].clone();
    let partner = c.partitions(&nodes[0]).await.into_iter().find(|p| p.contains(&emptied)).unwrap();
    let partner = partner.into_iter().find(|n| *n != emptied).unwrap();
    let held = c.metric(&partner, "kvs_keys{state=\"live\"}").await;
    assert!(held > 0.0);

    restart_empty(&mut c, &emptied).await;
    // Every read through it, from the moment it answers again, finds its key.
    let mut missing = Vec::new();
    for i in 0..KEYS {
        let (status, body) = get(&c.http, &emptied, &format!("k{i}"), "").await;
        if (status, body["value"].as_str()) != (200, Some(format!("v{i}").as_str())) {
            missing.push(format!("k{i}: {status} {body}"));
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {KEYS} reads through the emptied member failed: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    wait_ready(&c, &emptied).await;
    assert_eq!(
        c.metric(&emptied, "kvs_keys{state=\"live\"}").await,
        held,
        "a ready member holds every key its partner holds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_an_emptied_member_whose_partner_is_down_refuses_instead_of_answering_not_found() {
    let mut c = Cluster::start(2, 2, &[("KVS_REPLICA_DEADLINE_MS", "1000")]).await;
    let [a, b] = [c.addrs()[0].clone(), c.addrs()[1].clone()];
    let (status, _) = put(&c.http, &a, "kept", "v", "").await;
    assert_eq!(status, 201);
    c.node(&b).kill();
    restart_empty(&mut c, &a).await;
    // Its partner is dead and its store empty: it is not ready, and it does not answer "no such
    // key" for a key its partition holds.
    c.wait_peer_deaths(&a, 1.0).await;
    let (status, body) = get(&c.http, &a, "kept", "").await;
    assert_eq!(status, 503, "{body}");
    assert!(body["msg"].as_str().unwrap().contains("catching up"), "{body}");
    let (status, why) = readyz(&c, &a).await;
    assert_eq!(status, 503);
    assert!(why.contains("empty data directory"), "{why}");
    // The partner comes back: the emptied member syncs from it and answers.
    c.node(&b).restart().await;
    wait_ready(&c, &a).await;
    let (status, body) = get(&c.http, &a, "kept", "").await;
    assert_eq!((status, body["value"].as_str()), (200, Some("v")), "{body}");
}
