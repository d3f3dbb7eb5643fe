//! The operator end to end against a real API server: the `kvs-operator run` process, the
//! generated CRD, `kubectl` as a user would type it, and real `kvs-node` processes behind a stand-in
//! StatefulSet controller and kubelet (`kvs_e2e::kubelet`). Needs `KUBECONFIG`
//! (`eval "$(../shared/k8s/up)"`; `scripts/test` starts one), so plain `cargo test` skips it:
//! `cargo test -p kvs-e2e --test k8s_operator -- --ignored`.
//!
//! One scenario, every step asserted: a 4-replica RF 2 cluster becomes Available with 2
//! partitions; 1,000 keys are written; a pod killed and restarted keeps its identity and data;
//! `kubectl patch` to 6 replicas gives 3 partitions; `kubectl scale --replicas=2` drains the data
//! before any pod goes (checked continuously); replicationFactor 2 → 1 → 2; every key is readable
//! after every step; deleting the resource removes its children.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use kvs_api::{ClusterStatus, KvClient};
use kvs_e2e::k8s::{api_client, eventually, fresh_namespace, kubectl, node_binary};
use kvs_e2e::kubelet::{KubeletOptions, StandInKubelet};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const KEYS: usize = 1000;
const STEP: Duration = Duration::from_secs(120);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The `kvs-operator` binary: `KVS_OPERATOR_BIN`, else the workspace's debug build (built if missing).
fn operator_binary() -> PathBuf {
    if let Ok(p) = std::env::var("KVS_OPERATOR_BIN") {
        return PathBuf::from(p);
    }
    let root = workspace_root();
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
    let ok = Command::new(env!("CARGO")).args(["build", "-q", "-p", "kvs-operator", "--bin", "kvs-operator"]).current_dir(&root).status();
    assert!(ok.unwrap().success(), "building kvs-operator failed");
    target.join("debug").join("kvs-operator")
}

/// The operator as a process (standing in for its Deployment), killed on drop.
struct Operator(Child);

impl Operator {
    fn start(namespace: &str, http_port: u16, log: &Path) -> Self {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(operator_binary())
            .args(["run", "--namespace", namespace, "--lease-namespace", namespace, "--identity", "e2e"])
            .args(["--http-address", &format!("127.0.0.1:{http_port}")])
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Operator(child)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kvsc(ns: &str) -> Value {
    serde_json::from_str(&kubectl(&["-n", ns, "get", "kvsc", "demo", "-o", "json"])).unwrap()
}

/// Waits until the cluster's status says Running with `partitions` partitions of the wanted
/// members and K, and Available.
async fn wait_running(ns: &str, replicas: usize, partitions: i64, what: &str) -> Value {
    eventually(what, STEP, || async {
        let c = kvsc(ns);
        let s = &c["status"];
        let available = s["conditions"].as_array()?.iter().any(|c| c["type"] == "Available" && c["status"] == "True");
        let done = s["phase"] == "Running"
            && s["partitions"].as_i64() == Some(partitions)
            && s["members"].as_array()?.len() == replicas
            && s["readyReplicas"].as_i64() == Some(replicas as i64)
            && s["observedGeneration"] == c["metadata"]["generation"]
            && available;
        done.then(|| c.clone())
    })
    .await
}

async fn pod_addresses(pods: &Api<Pod>) -> Vec<String> {
    let list = pods.list(&ListParams::default().labels("app.kubernetes.io/instance=demo")).await.unwrap();
    list.items.iter().filter_map(|p| p.status.as_ref()?.pod_ip.clone()).map(|ip| format!("{ip}:8080")).collect()
}

/// Every key reads back its value through a node (any node serves any key).
async fn assert_all_keys(pods: &Api<Pod>, step: &str) {
    let addresses = pod_addresses(pods).await;
    assert!(!addresses.is_empty(), "{step}: no pods");
    for (i, address) in addresses.iter().enumerate() {
        let client = KvClient::new(address.clone(), Duration::from_secs(5));
        // Every key through the first node, a sample through the others.
        let keys: Vec<usize> = if i == 0 { (0..KEYS).collect() } else { (0..KEYS).step_by(97).collect() };
        for k in keys {
            let got = client.get(&format!("key-{k}")).await.unwrap_or_else(|e| panic!("{step}: GET key-{k} via {address}: {e}"));
            let value = got.unwrap_or_else(|| panic!("{step}: key-{k} missing via {address}")).value;
            assert_eq!(value, format!("value-{k}").as_bytes(), "{step}: key-{k} via {address}");
        }
    }
}

async fn node_status(address: &str, token: &str) -> Option<ClusterStatus> {
    let resp = reqwest::Client::new()
        .get(format!("http://{address}/v1/admin/status"))
        .header(kvs_api::HEADER_CLUSTER_TOKEN, token)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    resp.json().await.ok()
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server (KUBECONFIG); scripts/test starts one"]
async fn operator_runs_scales_and_rebalances_a_cluster() {
    let client: Client = api_client().await;
    let namespace = fresh_namespace(&client, "kvs-operator-e2e").await;
    let ns = namespace.name().to_owned();
    let root = tempfile::tempdir().unwrap();
    let crd = workspace_root().join("crds/kvstorecluster.yaml");
    kubectl(&["apply", "--server-side", "--force-conflicts", "-f", crd.to_str().unwrap()]);
    kubectl(&["wait", "--for=condition=established", "crd/kvstoreclusters.kvstore.dev", "--timeout=30s"]);
    let opts = KubeletOptions { node_bin: node_binary(), root: root.path().to_owned(), address_prefix: "127.0.63.".into() };
    let kubelet = StandInKubelet::start(client.clone(), &ns, opts).await.unwrap();
    let _operator = Operator::start(&ns, 18181, &root.path().join("operator.log"));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    // A 4-replica RF 2 cluster becomes Available with 2 partitions.
    let example = workspace_root().join("examples/cluster.yaml");
    kubectl(&["-n", &ns, "apply", "-f", example.to_str().unwrap()]);
    let c = wait_running(&ns, 4, 2, "4 nodes, 2 partitions, Available").await;
    assert_eq!(c["status"]["selector"], "app.kubernetes.io/instance=demo,app.kubernetes.io/name=kvstore");
    let table = kubectl(&["-n", &ns, "get", "kvsc", "demo"]);
    assert!(table.contains("PARTITIONS") && table.contains("Running"), "kubectl get shows the printer columns:\n{table}");

    // 1,000 keys.
    let first = pod_addresses(&pods).await[0].clone();
    let writer = KvClient::new(first, Duration::from_secs(5));
    for k in 0..KEYS {
        writer.put(&format!("key-{k}"), format!("value-{k}")).await.unwrap();
    }
    assert_all_keys(&pods, "after writing").await;

    // A killed pod comes back (same identity, same data) and the cluster is whole again.
    kubelet.kill_pod("demo-1").unwrap();
    wait_running(&ns, 4, 2, "the restarted pod rejoins").await;
    assert_all_keys(&pods, "after a pod restart").await;

    // kubectl patch to 6 replicas: 3 partitions, nothing lost.
    kubectl(&["-n", &ns, "patch", "kvsc", "demo", "--type", "merge", "-p", r#"{"spec":{"replicas":6}}"#]);
    let c = wait_running(&ns, 6, 3, "6 nodes, 3 partitions").await;
    assert!(c["status"]["viewEpoch"].as_i64().unwrap() >= 2);
    assert_all_keys(&pods, "after scaling out to 6").await;

    // kubectl scale to 2: the view drops pods 2..5 (data moves) before any of them is deleted.
    let token_secret: Secret = Api::namespaced(client.clone(), &ns).get("demo-token").await.unwrap();
    let token = String::from_utf8(token_secret.data.unwrap()["token"].0.clone()).unwrap();
    let violation = Arc::new(AtomicBool::new(false));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (pods, token, violation, watching) = (pods.clone(), token.clone(), violation.clone(), watching.clone());
        let ns = ns.clone();
        tokio::spawn(async move {
            while watching.load(Ordering::Relaxed) {
                // The view as the nodes have it, then the pods that exist: a pod missing while
                // the view (read before) still has it as a member would mean data went with it.
                let Some(status) = node_status(&format!("{}:8080", kubelet_ip(&pods, "demo-0").await.unwrap_or_default()), &token).await
                else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let members: BTreeSet<String> = status.layout.map(|l| l.members().cloned().collect()).unwrap_or_default();
                let present: BTreeSet<String> = pods
                    .list(&ListParams::default().labels("app.kubernetes.io/instance=demo"))
                    .await
                    .map(|l| l.items.iter().map(|p| format!("{}.demo-nodes.{ns}.svc.cluster.local:8080", p.name_any())).collect())
                    .unwrap_or_default();
                if !present.is_empty() && members.iter().any(|m| !present.contains(m)) {
                    eprintln!("pods {present:?} while the view still has {members:?}");
                    violation.store(true, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    kubectl(&["-n", &ns, "scale", "kvsc", "demo", "--replicas=2"]);
    let saw_rebalancing = eventually("the Rebalancing phase", STEP, || async {
        let c = kvsc(&ns);
        (c["status"]["phase"] == "Rebalancing").then_some(true)
    })
    .await;
    assert!(saw_rebalancing);
    wait_running(&ns, 2, 1, "2 nodes, 1 partition").await;
    watching.store(false, Ordering::Relaxed);
    watcher.await.unwrap();
    assert!(!violation.load(Ordering::Relaxed), "a pod was removed while the view still held it");
    let sts: StatefulSet = Api::namespaced(client.clone(), &ns).get("demo").await.unwrap();
    assert_eq!(sts.spec.unwrap().replicas, Some(2));
    eventually("pods 2..5 gone", STEP, || async { (pod_addresses(&pods).await.len() == 2).then_some(()) }).await;
    assert_all_keys(&pods, "after scaling in to 2").await;

    // replicationFactor 2 -> 1 -> 2.
    kubectl(&["-n", &ns, "patch", "kvsc", "demo", "--type", "merge", "-p", r#"{"spec":{"replicationFactor":1}}"#]);
    wait_running(&ns, 2, 2, "K=1: 2 partitions").await;
    assert_all_keys(&pods, "after replicationFactor 1").await;
    kubectl(&["-n", &ns, "patch", "kvsc", "demo", "--type", "merge", "-p", r#"{"spec":{"replicationFactor":2}}"#]);
    wait_running(&ns, 2, 1, "K=2: 1 partition").await;
    assert_all_keys(&pods, "after replicationFactor 2").await;

    // Events were published for the view changes.
    let events = kubectl(&["-n", &ns, "get", "events.events.k8s.io", "-o", "jsonpath={.items[*].reason}"]);
    for reason in ["Scaling", "ViewChange", "ViewChanged"] {
        assert!(events.contains(reason), "no {reason} event in: {events}");
    }

    // Deleting the resource removes its children (and the stand-in GC removes the pods).
    kubectl(&["-n", &ns, "delete", "kvsc", "demo", "--timeout=60s"]);
    eventually("children deleted", STEP, || async {
        let sts = Api::<StatefulSet>::namespaced(client.clone(), &ns).get_opt("demo").await.unwrap();
        let svc = Api::<Service>::namespaced(client.clone(), &ns).list(&ListParams::default()).await.unwrap();
        let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns).get_opt("demo").await.unwrap();
        let secret = Api::<Secret>::namespaced(client.clone(), &ns).get_opt("demo-token").await.unwrap();
        let remaining = pod_addresses(&pods).await;
        (sts.is_none() && svc.items.is_empty() && pdb.is_none() && secret.is_none() && remaining.is_empty()).then_some(())
    })
    .await;
    kubelet.stop().await;
}

async fn kubelet_ip(pods: &Api<Pod>, name: &str) -> Option<String> {
    pods.get_opt(name).await.ok()??.status?.pod_ip
}
