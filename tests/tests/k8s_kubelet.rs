//! Tests of the stand-in StatefulSet controller and kubelet (`kvs_e2e::kubelet`) against a real API
//! server: StatefulSets written by hand as the operator will write them, real `kvs-node` processes
//! behind them. They need `KUBECONFIG` (`eval "$(../shared/k8s/up)"`), so plain `cargo test` skips
//! them; run them with `cargo test -p kvs-e2e --test k8s_kubelet -- --ignored`.
//!
//! Only what works without node-to-node traffic is asserted: the nodes find each other by name
//! once they read `KVS_HOSTS_FILE`.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use kvs_api::KvClient;
use kvs_e2e::k8s::{api_client, eventually, fresh_namespace, kubectl, node_binary, pod_ready};
use kvs_e2e::kubelet::{KubeletOptions, StandInKubelet};
use kvs_testkit::net::LoopbackNet;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// The StatefulSet `demo` with the environment the operator gives its nodes.
fn demo_statefulset(ns: &str, replicas: i32, k: u32, members: i32) -> StatefulSet {
    let view: Vec<String> = (0..members).map(|i| format!("demo-{i}.demo-nodes.{ns}.svc.cluster.local:8080")).collect();
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": { "name": "demo", "namespace": ns },
        "spec": {
            "replicas": replicas,
            "serviceName": "demo-nodes",
            "podManagementPolicy": "Parallel",
            "selector": { "matchLabels": { "app": "demo" } },
            "template": {
                "metadata": { "labels": { "app": "demo" } },
                "spec": {
                    "containers": [{
                        "name": "kvs",
                        "image": "kvs-node:test",
                        "ports": [{ "name": "http", "containerPort": 8080 }],
                        "env": [
                            { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
                            { "name": "IPPORT", "value": format!("$(POD_NAME).demo-nodes.{ns}.svc.cluster.local:8080") },
                            { "name": "LISTEN", "value": "0.0.0.0:8080" },
                            { "name": "K", "value": k.to_string() },
                            { "name": "VIEW", "value": view.join(",") },
                            { "name": "KVS_DATA_DIR", "value": "/data" },
                            { "name": "KVS_WORKER_THREADS", "value": "1" },
                            { "name": "KVS_CLUSTER_TOKEN", "valueFrom": { "secretKeyRef": { "name": "demo-token", "key": "token" } } },
                        ],
                        "readinessProbe": { "httpGet": { "path": "/healthz", "port": 8080 }, "periodSeconds": 1 },
                        "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
                    }],
                },
            },
            "volumeClaimTemplates": [{
                "metadata": { "name": "data" },
                "spec": { "accessModes": ["ReadWriteOnce"], "resources": { "requests": { "storage": "1Gi" } } },
            }],
        },
    }))
    .expect("a valid StatefulSet")
}

async fn create_token(client: &Client, ns: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "demo-token", "namespace": ns },
        "stringData": { "token": "not-so-secret" },
    }))
    .expect("a valid Secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("creating the Secret");
}

/// A kubelet whose Pods get addresses on `net`, a loopback `/24` the test holds to its end.
async fn start_kubelet(client: &Client, ns: &str, root: &std::path::Path, net: &LoopbackNet) -> StandInKubelet {
    let opts = KubeletOptions { node_bin: node_binary(), root: root.to_path_buf(), address_prefix: net.prefix() };
    StandInKubelet::start(client.clone(), ns, opts).await.expect("starting the stand-in kubelet")
}

/// The Pod's IP and restart count once it is Ready.
async fn ready_pod(pods: &Api<Pod>, name: &str) -> Option<(String, i32)> {
    let pod = pods.get_opt(name).await.ok()??;
    let ready = pod_ready(&pod);
    let status = pod.status?;
    let restarts = status.container_statuses?.first()?.restart_count;
    (ready && status.phase.as_deref() == Some("Running")).then_some((status.pod_ip?, restarts))
}

async fn healthz(ip: &str) -> bool {
    let http = kvs_api::http_client().timeout(Duration::from_secs(1)).build().expect("a plain HTTP client");
    http.get(format!("http://{ip}:8080/healthz")).send().await.is_ok_and(|r| r.status().is_success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes API server (KUBECONFIG); scripts/test starts one"]
async fn t10_statefulset_pods_run_scale_crash_and_go() {
    let client = api_client().await;
    let ns_guard = fresh_namespace(&client, "kubelet-t10").await;
    let ns = ns_guard.name();
    let root = tempfile::tempdir().expect("a temporary directory");
    let net = LoopbackNet::take();
    let kubelet = start_kubelet(&client, ns, root.path(), &net).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);

    create_token(&client, ns).await;
    sets.create(&PostParams::default(), &demo_statefulset(ns, 2, 2, 2)).await.expect("creating the StatefulSet");

    // Both Pods run and become Ready, each with its own loopback IP.
    let mut ips = Vec::new();
    for name in ["demo-0", "demo-1"] {
        let (ip, _) = eventually(&format!("{name} Ready"), WAIT, || ready_pod(&pods, name)).await;
        assert!(ip.starts_with(&net.prefix()), "{name} got {ip}");
        assert_eq!(kubelet.pod_address(name).as_deref(), Some(ip.as_str()));
        assert!(healthz(&ip).await, "GET http://{ip}:8080/healthz");
        ips.push(ip);
    }
    assert_ne!(ips[0], ips[1]);

    // The Pods look as the StatefulSet controller makes them.
    let pod = pods.get("demo-0").await.expect("demo-0");
    let owner = pod.owner_references().first().cloned().expect("an owner reference");
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("StatefulSet", "demo", Some(true)));
    let spec = pod.spec.expect("a spec");
    assert_eq!(spec.hostname.as_deref(), Some("demo-0"));
    assert_eq!(spec.subdomain.as_deref(), Some("demo-nodes"));
    assert_eq!(pod.status.and_then(|s| s.pod_ips).map(|ips| ips.len()), Some(1));

    // The StatefulSet's status says so.
    eventually("readyReplicas 2", WAIT, || async {
        let status = sets.get("demo").await.ok()?.status?;
        (status.ready_replicas == Some(2) && status.replicas == 2 && status.observed_generation == Some(1))
            .then_some(())
    })
    .await;

    // Cluster DNS: the hosts file names both Pods.
    let hosts = std::fs::read_to_string(kubelet.hosts_file()).expect("the hosts file");
    for (i, ip) in ips.iter().enumerate() {
        let line = format!("{ip} demo-{i}.demo-nodes.{ns}.svc.cluster.local");
        assert!(hosts.lines().any(|l| l == line), "hosts file lacks {line:?}:\n{hosts}");
    }

    // Volumes: a claim object and a directory per Pod, and the node writes into it.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    for claim in ["data-demo-0", "data-demo-1"] {
        claims.get(claim).await.unwrap_or_else(|e| panic!("claim {claim}: {e}"));
        let dir = kubelet.claim_dir(claim);
        let entries = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        assert!(entries > 0, "the node wrote nothing into {}", dir.display());
    }

    // Scale to 1: demo-1 is stopped and deleted, its claim kept.
    kubectl(&["-n", ns, "scale", "statefulset", "demo", "--replicas=1"]);
    eventually("demo-1 deleted", WAIT, || async { pods.get_opt("demo-1").await.ok()?.is_none().then_some(()) }).await;
    assert_eq!(kubelet.pod_address("demo-1"), None);
    assert!(!healthz(&ips[1]).await, "demo-1's process is gone");
    assert!(kubelet.claim_dir("data-demo-1").is_dir(), "the claim outlives the Pod");
    eventually("replicas 1", WAIT, || async {
        let status = sets.get("demo").await.ok()?.status?;
        (status.replicas == 1 && status.ready_replicas == Some(1)).then_some(())
    })
    .await;
    eventually("demo-1 out of the hosts file", WAIT, || async {
        let hosts = std::fs::read_to_string(kubelet.hosts_file()).ok()?;
        (!hosts.contains("demo-1.")).then_some(())
    })
    .await;

    // A crash: restarted with the same IP, Ready again.
    kubelet.kill_pod("demo-0").await.expect("killing demo-0");
    let (ip, restarts) = eventually("demo-0 restarted and Ready", WAIT, || async {
        ready_pod(&pods, "demo-0").await.filter(|(_, restarts)| *restarts >= 1)
    })
    .await;
    assert_eq!((ip.as_str(), restarts), (ips[0].as_str(), 1));
    assert!(healthz(&ip).await);

    // Deleting the StatefulSet takes its Pods and processes with it.
    sets.delete("demo", &DeleteParams::default()).await.expect("deleting the StatefulSet");
    eventually("demo-0 deleted", WAIT, || async { pods.get_opt("demo-0").await.ok()?.is_none().then_some(()) }).await;
    eventually("demo-0's process gone", WAIT, || async { kubelet.pod_address("demo-0").is_none().then_some(()) }).await;
    assert!(!healthz(&ip).await);
    kubelet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes API server (KUBECONFIG); scripts/test starts one"]
async fn t20_pod_waits_for_its_secret_and_a_deleted_pod_keeps_its_data() {
    let client = api_client().await;
    let ns_guard = fresh_namespace(&client, "kubelet-t20").await;
    let ns = ns_guard.name();
    let root = tempfile::tempdir().expect("a temporary directory");
    let net = LoopbackNet::take();
    let kubelet = start_kubelet(&client, ns, root.path(), &net).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);

    // One node owning everything (K=1, itself the whole view): it serves writes with no peers.
    sets.create(&PostParams::default(), &demo_statefulset(ns, 1, 1, 1)).await.expect("creating the StatefulSet");

    // No Secret yet: the container waits, as with CreateContainerConfigError.
    let reason = eventually("demo-0 waiting for its Secret", WAIT, || async {
        let status = pods.get_opt("demo-0").await.ok()??.status?;
        let waiting = status.container_statuses?.first()?.state.clone()?.waiting?;
        (status.phase.as_deref() == Some("Pending")).then_some(waiting.reason?)
    })
    .await;
    assert_eq!(reason, "CreateContainerConfigError");

    create_token(&client, ns).await;
    let (ip, _) = eventually("demo-0 Ready", WAIT, || ready_pod(&pods, "demo-0")).await;
    let uid = pods.get("demo-0").await.expect("demo-0").uid();
    let kv = KvClient::new(format!("{ip}:8080"), Duration::from_secs(2));
    kv.put("survivor", "still here").await.expect("a write to the single node");

    // `kubectl delete pod`: the process stops, the Pod is created again with the same claim.
    kubectl(&["-n", ns, "delete", "pod", "demo-0"]);
    let (ip, _) = eventually("a new demo-0 Ready", WAIT, || async {
        let pod = pods.get_opt("demo-0").await.ok()??;
        if pod.uid() == uid {
            return None;
        }
        ready_pod(&pods, "demo-0").await
    })
    .await;
    let kv = KvClient::new(format!("{ip}:8080"), Duration::from_secs(2));
    let stored = kv.get("survivor").await.expect("a read from the new demo-0").expect("the key survived");
    assert_eq!(&stored.value[..], b"still here");
    kubelet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes API server (KUBECONFIG); scripts/test starts one"]
async fn t30_foreground_deletion_waits_for_the_pods() {
    let client = api_client().await;
    let ns_guard = fresh_namespace(&client, "kubelet-t30").await;
    let ns = ns_guard.name();
    let root = tempfile::tempdir().expect("a temporary directory");
    let net = LoopbackNet::take();
    let kubelet = start_kubelet(&client, ns, root.path(), &net).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    create_token(&client, ns).await;
    sets.create(&PostParams::default(), &demo_statefulset(ns, 2, 2, 2)).await.expect("creating the StatefulSet");
    eventually("demo-1 Ready", WAIT, || ready_pod(&pods, "demo-1")).await;

    // kubectl waits until the StatefulSet is gone, which needs its Pods gone and the
    // foregroundDeletion finalizer released: the garbage collector's part.
    kubectl(&["-n", ns, "delete", "statefulset", "demo", "--cascade=foreground", "--timeout=30s"]);
    assert!(sets.get_opt("demo").await.expect("reading the StatefulSet").is_none());
    assert!(pods.list(&Default::default()).await.expect("listing pods").items.is_empty());
    assert_eq!(kubelet.pod_address("demo-0"), None);
    kubelet.stop().await;
}
