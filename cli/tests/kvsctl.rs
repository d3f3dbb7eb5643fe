//! `kvsctl` as a user runs it, against node processes on a loopback net of the test's own: keys
//! with the causal context kept in a file, exit codes, endpoint fail-over, the cluster token,
//! a plan that changes nothing, and `status` following a view change to its end.

mod common;

use common::{Cluster, kvsctl, ok, path, text};
use kvs_api::ViewPlan;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn keys_context_exit_codes_failover_and_token() {
    let c = Cluster::start(4, 0, 2).await;
    let dir = tempfile::tempdir().expect("a directory");
    let ctx = dir.path().join("context");
    let ctx = path(&ctx);
    // A node that is not there, then a live one: the live one answers.
    let endpoints = format!("127.0.0.1:1,{}", c.addr(1));

    let put = ok(kvsctl(&endpoints, &["put", "greeting", "hello", "--context-file", ctx], b""));
    assert!(text(&put.stdout).starts_with("stored \"greeting\" (partition"), "{}", text(&put.stdout));
    let saved = std::fs::read_to_string(ctx).expect("the context file was written");
    assert!(!saved.trim().is_empty());
    let got = ok(kvsctl(&c.addr(2), &["get", "greeting", "--context-file", ctx], b""));
    assert_eq!(got.stdout, b"hello", "a pipe gets the value's bytes, nothing added");

    // Binary values through standard input come back as base64 in JSON.
    let binary = [0u8, 159, 146, 150, 255];
    ok(kvsctl(&c.addr(0), &["put", "blob", "-", "--context-file", ctx], &binary));
    let json = ok(kvsctl(&c.addr(3), &["-o", "json", "get", "blob", "--context-file", ctx], b""));
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(doc["value_base64"], "AJ+Slv8=");
    assert_eq!(doc["key"], "blob");

    // Deleted and never-written keys: exit code 3, with the key named.
    ok(kvsctl(&c.addr(0), &["del", "greeting", "--context-file", ctx], b""));
    for key in ["greeting", "never-written"] {
        let missing = kvsctl(&c.addr(1), &["get", key, "--context-file", ctx], b"");
        assert_eq!(missing.status.code(), Some(3), "{}", text(&missing.stderr));
        assert!(text(&missing.stderr).contains(&format!("key \"{key}\" not found")), "{}", text(&missing.stderr));
    }

    // A corrupt context file is refused before anything is sent (exit 4), saying what to do.
    std::fs::write(ctx, "not a context\n").expect("written");
    let corrupt = kvsctl(&c.addr(0), &["get", "blob", "--context-file", ctx], b"");
    assert_eq!(corrupt.status.code(), Some(4));
    assert!(text(&corrupt.stderr).contains("remove it to start afresh"), "{}", text(&corrupt.stderr));

    // No endpoint reachable: exit 1, naming the flag to fix.
    let nobody = kvsctl("127.0.0.1:1", &["get", "blob"], b"");
    assert_eq!(nobody.status.code(), Some(1));
    assert!(text(&nobody.stderr).contains("--endpoints"), "{}", text(&nobody.stderr));

    // Admin commands need the cluster token: 401 without it (exit 4), the status with it.
    let refused = kvsctl(&c.addr(0), &["status"], b"");
    assert_eq!(refused.status.code(), Some(4), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("401"), "{}", text(&refused.stderr));
    let token = path(c.token_file.path());
    let status = text(&ok(kvsctl(&c.addr(0), &["status", "--token-file", token], b"")).stdout);
    assert!(status.starts_with("epoch 1 · replication factor 2 · 2 partitions · 4 members"), "{status}");
    assert_eq!(status.lines().filter(|l| l.contains(" yes ")).count(), 4, "every replica in sync:\n{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_changes_nothing_and_status_follows_a_change_to_its_end() {
    let c = Cluster::start(4, 2, 2).await;
    let client = kvs_api::KvClient::new(c.addr(0), Duration::from_secs(10));
    const KEYS: u64 = 300;
    for i in 0..KEYS {
        client.put(&format!("key{i}"), format!("v{i}")).await.expect("a write");
    }
    let token = path(c.token_file.path());

    // The loopback net numbers its nodes in the last byte, so `--replicas 6` names the spares.
    let out = ok(kvsctl(&c.addr(0), &["-o", "json", "plan", "--replicas", "6", "--token-file", token], b""));
    let plan: ViewPlan = serde_json::from_slice(&out.stdout).expect("a plan");
    assert_eq!(plan.target.partitions.len(), 3);
    let joining: Vec<&str> = plan.nodes.iter().filter(|n| n.records_now == 0).map(|n| n.node.as_str()).collect();
    assert_eq!(joining, vec![c.addr(4).as_str(), c.addr(5).as_str()]);
    let stored: u64 = plan.nodes.iter().map(|n| n.records_now).sum();
    assert_eq!(stored, 2 * KEYS, "every key counted on both replicas");
    assert_eq!(plan.nodes.iter().map(|n| n.records_after).sum::<u64>(), stored);
    assert!(plan.moved_records > 0 && plan.unmeasured_partitions.is_empty());
    assert_eq!(c.status().await.layout.expect("a view").epoch, 1, "a plan changes nothing");
    let table = text(&ok(kvsctl(&c.addr(0), &["plan", "--replicas", "6", "--token-file", token], b"")).stdout);
    assert!(table.contains("records would be sent") && table.contains("joins"), "{table}");

    // A change paced to 5 records per second per source: each source sends its share of the new
    // partition (a third of the keys) to one new replica, then waits share/5 seconds (several)
    // before sending it to the other; `status` must follow the change to its end.
    let members: Vec<String> = (0..6).map(|i| c.addr(i)).collect();
    let admin = c.admin();
    let primary = c.addr(0);
    let change = tokio::spawn(async move { admin.change_view_paced(&primary, members, 2, Some(5)).await });
    while c.status().await.pending_epoch.is_none() {
        assert!(!change.is_finished(), "the change ended before it was seen pending: {:?}", change.await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = ok(kvsctl(&c.addr(1), &["status", "--token-file", token], b""));
    let (progress, status) = (text(&out.stderr), text(&out.stdout));
    assert!(progress.contains("change to epoch 2"), "progress lines while it ran:\n{progress}");
    assert!(status.starts_with("epoch 2 · replication factor 2 · 3 partitions · 6 members"), "{status}");
    let after = c.admin().status(&c.addr(1)).await.expect("status");
    assert_eq!((after.pending_epoch, after.layout.map(|l| l.epoch)), (None, Some(2)), "status ended with the change");
    let changed = change.await.expect("the task").expect("the change");
    assert!(changed.changed && changed.moved_keys > 0);
}
