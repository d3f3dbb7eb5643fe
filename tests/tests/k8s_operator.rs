//! The operator end to end against a real API server: the `kvs-operator run` process, the
//! generated CRD, `kubectl` as a user would type it, and real `kvs-node` processes behind a stand-in
//! StatefulSet controller and kubelet (`kvs_e2e::kubelet`). Needs `KUBECONFIG`
//! (`eval "$(../shared/k8s/up)"`; `scripts/test` starts one), so plain `cargo test` skips it:
//! `cargo test -p kvs-e2e --test k8s_operator -- --ignored`.
//!
//! One scenario, every step asserted: a 4-replica RF 2 cluster becomes Available with 2
//! partitions; a deleted child (Service, budget) is put back; 1,000 keys are written; a pod
//! killed and restarted, and a pod deleted and re-created, keep their identity and data; a scale-out reversed midway converges; `kubectl
//! patch` to 6 replicas gives 3 partitions; `kubectl scale --replicas=2` drains the data
//! before any pod goes (checked continuously); replicationFactor 2 → 1 → 2; every key is readable
//! after every step; deleting the resource removes its children.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use kvs_e2e::k8s::{api_client, eventually, fresh_namespace, kubectl};
use kvs_e2e::kvsc::{
    OperatorEnv, OperatorProcess, STEP, assert_keys, kvsc, node_status, pod_addresses, pod_incarnation, wait_pod_back,
    wait_running, workspace_root, write_keys,
};
use kvs_testkit::net::LoopbackNet;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const KEYS: usize = 1000;

#[tokio::test]
#[ignore = "needs a Kubernetes API server (KUBECONFIG); scripts/test starts one"]
async fn operator_runs_scales_and_rebalances_a_cluster() {
    let OperatorEnv { client, namespace, root: _root, net: _net, kubelet, operator: _operator, pods } =
        OperatorEnv::start("kvs-operator-e2e").await;
    let ns = namespace.name().to_owned();

    // A 4-replica RF 2 cluster becomes Available with 2 partitions.
    let example = workspace_root().join("examples/cluster.yaml");
    kubectl(&["-n", &ns, "apply", "-f", example.to_str().unwrap()]);
    let c = wait_running(&ns, "demo", 4, 2, "4 nodes, 2 partitions, Available").await;
    assert_eq!(c["status"]["selector"], "app.kubernetes.io/instance=demo,app.kubernetes.io/name=kvstore");
    let table = kubectl(&["-n", &ns, "get", "kvsc", "demo"]);
    assert!(
        table.contains("PARTITIONS") && table.contains("Running"),
        "kubectl get shows the printer columns:\n{table}"
    );

    // A deleted child is put back (the operator watches what it owns and re-applies it).
    kubectl(&["-n", &ns, "delete", "service/demo", "poddisruptionbudget/demo"]);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    eventually("the client Service and the budget put back", STEP, || async {
        (services.get_opt("demo").await.unwrap().is_some() && budgets.get_opt("demo").await.unwrap().is_some())
            .then_some(())
    })
    .await;

    // 1,000 keys.
    write_keys(&pods, "demo", KEYS).await;
    assert_keys(&pods, "demo", KEYS, "after writing").await;

    // A killed pod comes back (same identity, same data) and the cluster is whole again.
    let before = pod_incarnation(&pods, "demo-1").await.unwrap();
    kubelet.kill_pod("demo-1").await.unwrap();
    wait_pod_back(&pods, "demo-1", &before).await;
    wait_running(&ns, "demo", 4, 2, "the restarted pod rejoins").await;
    assert_keys(&pods, "demo", KEYS, "after a pod restart").await;

    // A pod deleted outright comes back as a new Pod, perhaps on another IP: its DNS identity and
    // its volume are what make it the same member.
    let before = pod_incarnation(&pods, "demo-2").await.unwrap();
    kubectl(&["-n", &ns, "delete", "pod", "demo-2", "--wait=true"]);
    wait_pod_back(&pods, "demo-2", &before).await;
    wait_running(&ns, "demo", 4, 2, "the re-created pod rejoins").await;
    assert_keys(&pods, "demo", KEYS, "after a pod was deleted and re-created").await;

    // A scale-out reversed while under way converges to the newest spec, nothing lost.
    kubectl(&["-n", &ns, "patch", "kvsc", "demo", "--type", "merge", "-p", r#"{"spec":{"replicas":6}}"#]);
    eventually("the scale-out to start", STEP, || async {
        (kvsc(&ns, "demo")["status"]["phase"] == "Rebalancing").then_some(())
    })
    .await;
    kubectl(&["-n", &ns, "patch", "kvsc", "demo", "--type", "merge", "-p", r#"{"spec":{"replicas":4}}"#]);
    wait_running(&ns, "demo", 4, 2, "back to 4 nodes, 2 partitions").await;
    eventually("the extra pods gone", STEP, || async { (pod_addresses(&pods, "demo").await.len() == 4).then_some(()) })
        .await;
    assert_keys(&pods, "demo", KEYS, "after a reversed scale-out").await;

    // kubectl patch to 6 replicas: 3 partitions, nothing lost.
    kubectl(&["-n", &ns, "patch", "kvsc", "demo", "--type", "merge", "-p", r#"{"spec":{"replicas":6}}"#]);
    let c = wait_running(&ns, "demo", 6, 3, "6 nodes, 3 partitions").await;
    assert!(c["status"]["viewEpoch"].as_i64().unwrap() >= 2);
    assert_keys(&pods, "demo", KEYS, "after scaling out to 6").await;

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
                let Some(status) =
                    node_status(&format!("{}:8080", kubelet_ip(&pods, "demo-0").await.unwrap_or_default()), &token)
                        .await
                else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let members: BTreeSet<String> =
                    status.layout.map(|l| l.members().cloned().collect()).unwrap_or_default();
                let present: BTreeSet<String> = pods
                    .list(&ListParams::default().labels("app.kubernetes.io/instance=demo"))
                    .await
                    .map(|l| {
                        l.items
                            .iter()
                            .map(|p| format!("{}.demo-nodes.{ns}.svc.cluster.local:8080", p.name_any()))
                            .collect()
                    })
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
        let c = kvsc(&ns, "demo");
        (c["status"]["phase"] == "Rebalancing").then_some(true)
    })
    .await;
    assert!(saw_rebalancing);
    wait_running(&ns, "demo", 2, 1, "2 nodes, 1 partition").await;
    watching.store(false, Ordering::Relaxed);
    watcher.await.unwrap();
    assert!(!violation.load(Ordering::Relaxed), "a pod was removed while the view still held it");
    let sts: StatefulSet = Api::namespaced(client.clone(), &ns).get("demo").await.unwrap();
    assert_eq!(sts.spec.unwrap().replicas, Some(2));
    eventually("pods 2..5 gone", STEP, || async { (pod_addresses(&pods, "demo").await.len() == 2).then_some(()) })
        .await;
    assert_keys(&pods, "demo", KEYS, "after scaling in to 2").await;

    // replicationFactor 2 -> 1 -> 2.
    kubectl(&["-n", &ns, "patch", "kvsc", "demo", "--type", "merge", "-p", r#"{"spec":{"replicationFactor":1}}"#]);
    wait_running(&ns, "demo", 2, 2, "K=1: 2 partitions").await;
    assert_keys(&pods, "demo", KEYS, "after replicationFactor 1").await;
    kubectl(&["-n", &ns, "patch", "kvsc", "demo", "--type", "merge", "-p", r#"{"spec":{"replicationFactor":2}}"#]);
    wait_running(&ns, "demo", 2, 1, "K=2: 1 partition").await;
    assert_keys(&pods, "demo", KEYS, "after replicationFactor 2").await;

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
        let remaining = pod_addresses(&pods, "demo").await;
        (sts.is_none() && svc.items.is_empty() && pdb.is_none() && secret.is_none() && remaining.is_empty())
            .then_some(())
    })
    .await;
    kubelet.stop().await;
}

async fn kubelet_ip(pods: &Api<Pod>, name: &str) -> Option<String> {
    pods.get_opt(name).await.ok()??.status?.pod_ip
}

async fn role(http: &str) -> Option<String> {
    kvs_e2e::k8s::get_text(&format!("http://{http}/readyz")).await
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server (KUBECONFIG); scripts/test starts one"]
async fn two_operators_elect_one_leader_and_the_standby_takes_over() {
    let client: Client = api_client().await;
    let namespace = fresh_namespace(&client, "kvs-operator-lease").await;
    let ns = namespace.name().to_owned();
    let root = tempfile::tempdir().unwrap();
    let start = |identity: &str, http: &str| {
        let args: Vec<String> = [
            "run",
            "--namespace",
            &ns,
            "--lease-namespace",
            &ns,
            "--lease-seconds",
            "6",
            "--identity",
            identity,
            "--http-address",
            http,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        OperatorProcess::start(&args, &[], &root.path().join(format!("{identity}.log")))
    };
    let net = LoopbackNet::take();
    let (http_a, http_b) = (&net.service(8081), &net.service(8082));
    let a = start("a", http_a);
    eventually("a leads", STEP, || async { role(http_a).await.filter(|r| r.contains("leader")) }).await;
    let _b = start("b", http_b);
    // For a few seconds both run: b stays a standby (never two leaders).
    for _ in 0..30 {
        let (ra, rb) = (role(http_a).await, role(http_b).await);
        assert!(!(ra.as_deref() == Some("ready (leader)") && rb.as_deref() == Some("ready (leader)")), "two leaders");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(role(http_b).await.as_deref(), Some("ready (standby)"));
    let holder = kubectl(&["-n", &ns, "get", "lease", "kvs-operator", "-o", "jsonpath={.spec.holderIdentity}"]);
    assert_eq!(holder, "a");
    // The leader dies without releasing the Lease (SIGKILL): b takes over once it expires.
    drop(a);
    eventually("b takes over", STEP, || async { role(http_b).await.filter(|r| r.contains("leader")) }).await;
    let holder = kubectl(&["-n", &ns, "get", "lease", "kvs-operator", "-o", "jsonpath={.spec.holderIdentity}"]);
    assert_eq!(holder, "b");
}
