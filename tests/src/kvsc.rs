//! A `KVStoreCluster` as a user sees it in end-to-end tests: the operator process, the resource's
//! status through `kubectl`, and the cluster's keys through its pods. Shared by the operator and the
//! Helm workflow tests. Panics instead of returning errors: it is for tests only.

use crate::k8s::{eventually, kubectl, pod_ready};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kvs_api::KvClient;
use kvs_testkit::process::{NodeCommand, NodeProcess};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Time one step (scale, rebalance) may take.
pub const STEP: Duration = Duration::from_secs(120);

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace").to_path_buf()
}

/// The `kvs-operator` binary: `KVS_OPERATOR_BIN`, else the workspace's debug build (built now, so it
/// is never stale).
pub fn operator_binary() -> PathBuf {
    if let Ok(p) = std::env::var("KVS_OPERATOR_BIN") {
        return PathBuf::from(p);
    }
    let root = workspace_root();
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
    let built = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "kvs-operator", "--bin", "kvs-operator"])
        .current_dir(&root)
        .status();
    assert!(built.is_ok_and(|s| s.success()), "building kvs-operator failed");
    target.join("debug").join("kvs-operator")
}

/// A `kvs-operator` process (standing in for the operator's Deployment); killed on drop.
pub struct OperatorProcess {
    /// Held for its drop, which kills the operator.
    _process: NodeProcess,
}

impl OperatorProcess {
    /// Starts `kvs-operator` with `args` and `env` on top of this process's environment (it reads
    /// `KUBECONFIG`), logging to `log`; killed on drop.
    pub fn start(args: &[String], env: &[(String, String)], log: &Path) -> Self {
        let mut command = NodeCommand::new(operator_binary());
        command.args = args.to_vec();
        command.env = env.to_vec();
        command.inherit_env = true;
        command.log = Some(log.to_owned());
        let process = NodeProcess::start(command).unwrap_or_else(|e| panic!("starting kvs-operator: {e}"));
        OperatorProcess { _process: process }
    }
}

/// `kubectl get kvsc NAME -o json`.
pub fn kvsc(ns: &str, name: &str) -> Value {
    serde_json::from_str(&kubectl(&["-n", ns, "get", "kvsc", name, "-o", "json"])).expect("kubectl prints JSON")
}

/// Waits until the cluster's status is Running and Available with `replicas` ready members in
/// `partitions` partitions, for the current generation; returns the resource. On timeout the panic
/// shows the last status seen and the cluster's Events, so a failure says where it stood.
pub async fn wait_running(ns: &str, name: &str, replicas: usize, partitions: i64, what: &str) -> Value {
    let deadline = std::time::Instant::now() + STEP;
    loop {
        let c = kvsc(ns, name);
        let s = &c["status"];
        let available = s["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Available" && c["status"] == "True"));
        let done = s["phase"] == "Running"
            && s["partitions"].as_i64() == Some(partitions)
            && s["members"].as_array().is_some_and(|m| m.len() == replicas)
            && s["readyReplicas"].as_i64() == Some(replicas as i64)
            && s["observedGeneration"] == c["metadata"]["generation"]
            && available;
        if done {
            return c;
        }
        if std::time::Instant::now() >= deadline {
            let events =
                kubectl(&["-n", ns, "get", "events.events.k8s.io", "-o", "custom-columns=REASON:.reason,NOTE:.note"]);
            panic!("timed out after {STEP:?} waiting for {what}; last status:\n{s:#}\nevents:\n{events}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What tells one run of a pod from the next: its uid and its containers' restart count.
fn incarnation(pod: &Pod) -> Option<(String, i32)> {
    let restarts = pod.status.as_ref()?.container_statuses.as_ref()?.iter().map(|c| c.restart_count).sum();
    Some((pod.metadata.uid.clone()?, restarts))
}

/// The current incarnation of pod `pod` (see [`wait_pod_back`]).
pub async fn pod_incarnation(pods: &Api<Pod>, pod: &str) -> Option<(String, i32)> {
    incarnation(&pods.get_opt(pod).await.ok()??)
}

/// Waits until pod `pod` runs again, Ready, as another incarnation than `before` (restarted or
/// re-created). Status read before this could still describe the old run.
pub async fn wait_pod_back(pods: &Api<Pod>, pod: &str, before: &(String, i32)) {
    eventually(&format!("pod {pod} back and Ready"), STEP, || async {
        let p = pods.get_opt(pod).await.ok()??;
        (pod_ready(&p) && incarnation(&p).as_ref() != Some(before)).then_some(())
    })
    .await
}

/// `ip:8080` of every pod of cluster `name` that has an IP.
pub async fn pod_addresses(pods: &Api<Pod>, name: &str) -> Vec<String> {
    let list = pods
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={name}")))
        .await
        .expect("listing pods");
    list.items.iter().filter_map(|p| p.status.as_ref()?.pod_ip.clone()).map(|ip| format!("{ip}:8080")).collect()
}

fn key(k: usize) -> String {
    format!("key-{k}")
}

fn value(k: usize) -> String {
    format!("value-{k}")
}

/// Writes `key-0..count` through the cluster's first pod.
pub async fn write_keys(pods: &Api<Pod>, name: &str, count: usize) {
    let first = pod_addresses(pods, name).await.into_iter().next().expect("a pod to write through");
    let client = KvClient::new(first, Duration::from_secs(5));
    for k in 0..count {
        client.put(&key(k), value(k)).await.unwrap_or_else(|e| panic!("PUT {}: {e}", key(k)));
    }
}

/// Every key reads back its value: all of them through the first pod, a sample through the others
/// (any node serves any key).
pub async fn assert_keys(pods: &Api<Pod>, name: &str, count: usize, step: &str) {
    let addresses = pod_addresses(pods, name).await;
    assert!(!addresses.is_empty(), "{step}: no pods");
    for (i, address) in addresses.iter().enumerate() {
        let client = KvClient::new(address.clone(), Duration::from_secs(5));
        let sample: Vec<usize> = if i == 0 { (0..count).collect() } else { (0..count).step_by(97).collect() };
        for k in sample {
            let got = client.get(&key(k)).await.unwrap_or_else(|e| panic!("{step}: GET {} via {address}: {e}", key(k)));
            let stored = got.unwrap_or_else(|| panic!("{step}: {} missing via {address}", key(k)));
            assert_eq!(stored.value, value(k).as_bytes(), "{step}: {} via {address}", key(k));
        }
    }
}
