//! A `KVStoreCluster` as a user sees it in end-to-end tests: the operator process, the resource's
//! status through `kubectl`, and the cluster's keys through its pods. Shared by the operator and the
//! Helm workflow tests. Panics instead of returning errors: it is for tests only.

use crate::k8s::{TestNamespace, api_client, eventually, fresh_namespace, kubectl, node_binary, pod_ready};
use crate::kubelet::{KubeletOptions, StandInKubelet};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams};
use kvs_api::{ClusterStatus, KvClient};
use kvs_testkit::net::LoopbackNet;
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

/// What an operator end-to-end test runs against: a fresh namespace with the CRDs applied, the
/// stand-in kubelet, and one `kvs-operator run` process, on a loopback net of the test's own.
/// Tests destructure it, binding every field (a field matched with `_` would be dropped at once:
/// the volumes with `root`, the addresses with `net`); they are in the order they are dropped, last
/// first.
pub struct OperatorEnv {
    pub client: Client,
    pub namespace: TestNamespace,
    /// The pods' and the operator's files (logs, volumes).
    pub root: tempfile::TempDir,
    pub net: LoopbackNet,
    pub kubelet: StandInKubelet,
    pub operator: OperatorProcess,
    pub pods: Api<Pod>,
}

impl OperatorEnv {
    /// Sets everything up in a namespace named after `prefix`.
    pub async fn start(prefix: &str) -> OperatorEnv {
        let client = api_client().await;
        let namespace = fresh_namespace(&client, prefix).await;
        let ns = namespace.name().to_owned();
        let root = tempfile::tempdir().expect("a temporary directory");
        let crds = workspace_root().join("crds");
        kubectl(&["apply", "--server-side", "--force-conflicts", "-f", crds.to_str().expect("a UTF-8 path")]);
        for crd in ["kvstoreclusters", "kvstorebackups", "kvstorebackupschedules"] {
            kubectl(&["wait", "--for=condition=established", &format!("crd/{crd}.kvstore.dev"), "--timeout=30s"]);
        }
        let net = LoopbackNet::take();
        let opts =
            KubeletOptions { node_bin: node_binary(), root: root.path().to_owned(), address_prefix: net.prefix() };
        let kubelet = StandInKubelet::start(client.clone(), &ns, opts).await.expect("the stand-in kubelet starts");
        let http = net.service(8081);
        let args: Vec<String> =
            ["run", "--namespace", &ns, "--lease-namespace", &ns, "--identity", "e2e", "--http-address", &http]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let operator = OperatorProcess::start(&args, &[], &root.path().join("operator.log"));
        let pods = Api::namespaced(client.clone(), &ns);
        OperatorEnv { client, namespace, root, net, kubelet, operator, pods }
    }
}

/// The cluster status `address` reports, if it answers within 5 s.
pub async fn node_status(address: &str, token: &str) -> Option<ClusterStatus> {
    let admin = kvs_api::AdminClient::new(Some(token.to_owned())).with_status_timeout(Duration::from_secs(5));
    admin.status(address).await.ok()
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
