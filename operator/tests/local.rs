//! `kvs-operator local` end to end: real node processes on loopback, driven by edits of the
//! KVStoreCluster file — scale out, change K, scale in (each printing its capacity plan), stop,
//! resume, pause and unpause — with every key checked; a new cluster made from a backup
//! (`restoreFrom`); and no pod outliving a killed operator.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use kvs_testkit::net::LoopbackNet;
use kvs_testkit::process::{NodeCommand, NodeProcess, Signal, node_binary};
use std::path::Path;
use std::time::{Duration, Instant};

fn write_spec(path: &Path, replicas: u32, k: u32) {
    write_spec_with(path, replicas, k, "");
}

/// The spec with `extra` spec lines (indented by two spaces).
fn write_spec_with(path: &Path, replicas: u32, k: u32, extra: &str) {
    let yaml = format!(
        "apiVersion: kvstore.dev/v1alpha1\nkind: KVStoreCluster\nmetadata:\n  name: t\nspec:\n  replicas: {replicas}\n  replicationFactor: {k}\n{extra}"
    );
    std::fs::write(path, yaml).unwrap();
    // The watcher compares modification times; make sure this edit gets a new one.
    std::thread::sleep(Duration::from_millis(20));
}

fn start(net: &LoopbackNet, spec: &Path, data: &Path) -> NodeProcess {
    let mut command = NodeCommand::new(env!("CARGO_BIN_EXE_kvs-operator"))
        .env("KVS_NODE_BIN", node_binary().unwrap().display().to_string());
    command.log = Some(data.with_extension("log"));
    command.args = ["local", "-f", &spec.display().to_string(), "--data-dir", &data.display().to_string()]
        .into_iter()
        .map(str::to_owned)
        .chain(["--address-base".to_owned(), net.prefix()])
        .collect();
    NodeProcess::start(command).unwrap()
}

/// Where the operator runs pod `ordinal`: `<address-base><ordinal+1>:8080`.
fn addr(net: &LoopbackNet, ordinal: u32) -> String {
    format!("{}{}:8080", net.prefix(), ordinal + 1)
}

/// Waits until node 0 reports a committed view with `members` nodes at `k` and no change pending.
async fn wait_for_view(net: &LoopbackNet, members: usize, k: u32) -> kvs_api::ClusterStatus {
    wait_for_view_at(net, 0, members, k).await
}

/// [`wait_for_view`] as node `ordinal` reports it.
async fn wait_for_view_at(net: &LoopbackNet, ordinal: u32, members: usize, k: u32) -> kvs_api::ClusterStatus {
    let admin = kvs_api::AdminClient::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(s) = admin.status(&addr(net, ordinal)).await {
            let done = s.pending_epoch.is_none()
                && s.layout.as_ref().is_some_and(|l| l.members().count() == members && l.replication_factor == k);
            if done {
                return s;
            }
            last = Some(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no view of {members} nodes at K={k} within 60 s; last status {last:?}");
}

async fn assert_keys(net: &LoopbackNet, http: &reqwest::Client, nodes: u32, n: usize) {
    for o in 0..nodes {
        for i in 0..n {
            let r = http.get(format!("http://{}/v1/kv/k{i}", addr(net, o))).send().await.unwrap();
            assert_eq!(r.status(), 200, "k{i} via {}", addr(net, o));
            assert_eq!(r.text().await.unwrap(), format!("v{i}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_scales_changes_k_and_resumes() {
    // This test's own loopback /24, held until the end: no other test's nodes can answer here.
    let net = LoopbackNet::take();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("cluster.yaml");
    let data = dir.path().join("data");
    let http = kvs_api::http_client().timeout(Duration::from_secs(10)).build().unwrap();
    write_spec(&spec, 4, 2);
    let mut op = start(&net, &spec, &data);
    wait_for_view(&net, 4, 2).await;
    for i in 0..100 {
        let r =
            http.put(format!("http://{}/v1/kv/k{i}", addr(&net, i % 4))).body(format!("v{i}")).send().await.unwrap();
        assert!(r.status().is_success());
    }
    write_spec(&spec, 6, 2);
    let st = wait_for_view(&net, 6, 2).await;
    assert_eq!(st.layout.unwrap().partitions.len(), 3);
    assert_keys(&net, &http, 6, 100).await;
    write_spec(&spec, 6, 3);
    let st = wait_for_view(&net, 6, 3).await;
    assert_eq!(st.layout.unwrap().partitions.len(), 2);
    assert_keys(&net, &http, 6, 100).await;
    write_spec(&spec, 2, 2);
    wait_for_view(&net, 2, 2).await;
    // The leaving pods are stopped once their data has moved.
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get(format!("http://{}/healthz", addr(&net, 5))).send().await.is_ok() {
        assert!(Instant::now() < deadline, "pod 5 still running after scale-in");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_keys(&net, &http, 2, 100).await;
    // Each change that left fewer partitions printed its capacity plan first.
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    for plan in [
        "capacity: 6 nodes at replicationFactor 3: 2 partitions",
        "capacity: 2 nodes at replicationFactor 2: 1 partitions",
    ] {
        assert!(log.contains(plan), "no {plan:?} in the operator's output:\n{log}");
    }
    assert!(log.contains("fits the 1.0 GiB volumes"), "{log}");
    // Ctrl-C stops everything cleanly; running again resumes with the data.
    interrupt(&mut op, &data).await;
    assert!(
        http.get(format!("http://{}/healthz", addr(&net, 0))).send().await.is_err(),
        "nodes stopped with the operator"
    );
    let mut op = start(&net, &spec, &data);
    wait_for_view(&net, 2, 2).await;
    assert_keys(&net, &http, 2, 100).await;
    // Paused: a scale-out is held back and said so; unpaused, it happens.
    write_spec_with(&spec, 4, 2, "  paused: true\n");
    let deadline = Instant::now() + Duration::from_secs(60);
    let held = "paused (spec.paused); would be setting pods to 4";
    while !std::fs::read_to_string(data.with_extension("log")).unwrap().contains(held) {
        assert!(Instant::now() < deadline, "no {held:?} line within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(http.get(format!("http://{}/healthz", addr(&net, 2))).send().await.is_err(), "no pod added while paused");
    write_spec(&spec, 4, 2);
    wait_for_view(&net, 4, 2).await;
    assert_keys(&net, &http, 4, 100).await;
    interrupt(&mut op, &data).await;
}

/// Ctrl-C, then wait (20 s at most) for the operator to stop its nodes and exit successfully. On a
/// timeout, shows the end of the operator's output and of every pod's log.
async fn interrupt(op: &mut NodeProcess, data: &Path) {
    op.signal(Signal::INT);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = op.try_exit() {
            assert!(status.success(), "operator exited with {status}");
            return;
        }
        if Instant::now() >= deadline {
            let tail = |path: &Path| {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(15)..].join("\n")
            };
            let mut logs = format!("operator:\n{}", tail(&data.with_extension("log")));
            // Pods log to <data>/<cluster>/pod-N/node.log.
            for cluster in std::fs::read_dir(data).into_iter().flatten().flatten() {
                for pod in std::fs::read_dir(cluster.path()).into_iter().flatten().flatten() {
                    let log = pod.path().join("node.log");
                    logs.push_str(&format!("\n{}:\n{}", log.display(), tail(&log)));
                }
            }
            panic!("operator did not stop within 20 s of Ctrl-C\n{logs}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (60 s at most) until the operator's output contains `line`; returns the output.
async fn wait_for_line(data: &Path, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
        if log.contains(line) {
            return log;
        }
        assert!(Instant::now() < deadline, "no {line:?} in the operator's output within 60 s:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_makes_a_new_cluster_from_a_backup() {
    let (a_net, b_net) = (LoopbackNet::take(), LoopbackNet::take());
    let dir = tempfile::tempdir().unwrap();
    let http = kvs_api::http_client().timeout(Duration::from_secs(10)).build().unwrap();

    // A cluster with 100 keys, backed up to a directory.
    let (a_spec, a_data) = (dir.path().join("a.yaml"), dir.path().join("a"));
    write_spec(&a_spec, 4, 2);
    let mut a = start(&a_net, &a_spec, &a_data);
    wait_for_view(&a_net, 4, 2).await;
    for i in 0..100 {
        let r = http.put(format!("http://{}/v1/kv/k{i}", addr(&a_net, i % 4))).body(format!("v{i}")).send().await;
        assert!(r.unwrap().status().is_success());
    }
    let url = format!("file://{}/backup", dir.path().display());
    let endpoints = (0..4).map(|o| addr(&a_net, o)).collect();
    let source = kvs_backup::Cluster::new(endpoints, kvs_api::AdminClient::default());
    let dest = kvs_backup::Destination::open(&url).unwrap();
    kvs_backup::backup(&source, &dest, &kvs_backup::BackupOptions::default(), &kvs_backup::Silent).await.unwrap();
    interrupt(&mut a, &a_data).await;

    // A new cluster of 3 nodes at K=3 from it: every key in place, said so, and remembered.
    let (b_spec, b_data) = (dir.path().join("b.yaml"), dir.path().join("b"));
    write_spec_with(&b_spec, 3, 3, &format!("  restoreFrom:\n    url: {url}\n"));
    let mut b = start(&b_net, &b_spec, &b_data);
    let log = wait_for_line(&b_data, "restored 100 keys and 0 deletions").await;
    assert!(log.contains("the cluster is not available until every key is in place"), "{log}");
    assert_keys(&b_net, &http, 3, 100).await;
    assert_eq!(std::fs::read_to_string(b_data.join("t/restored-from")).unwrap(), url);
    interrupt(&mut b, &b_data).await;
    // Running it again resumes with its view and keys (found by hand: a cluster that never changed
    // its view came back with none) and does not restore again.
    let mut b = start(&b_net, &b_spec, &b_data);
    for ordinal in 0..3 {
        wait_for_view_at(&b_net, ordinal, 3, 3).await;
    }
    assert_keys(&b_net, &http, 3, 100).await;
    interrupt(&mut b, &b_data).await;
    let log = std::fs::read_to_string(b_data.with_extension("log")).unwrap();
    assert_eq!(log.matches("restoring from").count(), 1, "restored once:\n{log}");
}

/// Regression (found in CI): pods outlived an operator killed with SIGKILL and answered at
/// addresses later handed to another test. They run with `--exit-with-parent` now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_pods_stop_when_the_operator_is_killed() {
    let net = LoopbackNet::take();
    let dir = tempfile::tempdir().unwrap();
    let (spec, data) = (dir.path().join("cluster.yaml"), dir.path().join("data"));
    write_spec(&spec, 2, 1);
    let mut op = start(&net, &spec, &data);
    wait_for_view(&net, 2, 1).await;
    op.kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    for ordinal in 0..2 {
        while std::net::TcpStream::connect(addr(&net, ordinal)).is_ok() {
            assert!(Instant::now() < deadline, "pod {ordinal} still serves 20 s after the operator was killed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
