//! Day-2 operations end to end against a real API server, with the operator process, `kubectl` and
//! real `kvs-node` processes behind the stand-in StatefulSet controller and kubelet. Needs
//! `KUBECONFIG` (`scripts/test` starts a server): `cargo test -p kvs-e2e --test k8s_day2 -- --ignored`.
//!
//! One scenario on a 4-node, K=2 cluster with 2,000 keys and a short progress deadline, every step
//! asserted:
//! - a pod restarted with an **empty volume** is not Ready before it holds its partition's data
//!   (its live key count equals its partner's the moment it is Ready);
//! - **pause**: with `spec.paused` an image change restarts no pod and the status says what waits;
//! - unpaused, the image change **rolls** the pods one at a time (each restarted pod is Ready before
//!   the next is deleted) under four writers that go through Ready pods as a Service would: zero
//!   failed requests, and the history checker finds no lost write;
//! - a **broken image** halts the roll after one pod with `Stalled` naming that pod; the good image
//!   back, the roll finishes;
//! - a pod whose **machine is lost** (stand-in: Unschedulable, volume gone) is replaced past the
//!   deadline, and every key is readable again with both replicas holding them;
//! - a **scale-in that does not fit** the pods' volumes is refused with the numbers, nothing moves.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kvs_api::{ClientError, KvClient};
use kvs_e2e::k8s::{eventually, kubectl, pod_ready};
use kvs_e2e::kvsc::{OperatorEnv, STEP, assert_keys, kvsc, node_status, pod_incarnation, wait_running, write_keys};
use kvs_testkit::history::{Kind, Op, Outcome, check_final};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEYS: usize = 2000;
const WRITERS: usize = 4;

fn patch(ns: &str, json: &str) {
    kubectl(&["-n", ns, "patch", "kvsc", "demo", "--type", "merge", "-p", json]);
}

fn condition(c: &serde_json::Value, type_: &str) -> serde_json::Value {
    c["status"]["conditions"].as_array().into_iter().flatten().find(|x| x["type"] == type_).cloned().unwrap_or_default()
}

/// Live keys per member identity, as the node at `address` reports its partitions.
async fn live_keys(address: &str, token: &str) -> BTreeMap<String, Option<u64>> {
    let status = node_status(address, token).await.unwrap_or_else(|| panic!("no status from {address}"));
    status.partitions.iter().flat_map(|p| p.members.iter().cloned().zip(p.live_keys.iter().copied())).collect()
}

fn identity(ns: &str, pod: &str) -> String {
    format!("{pod}.demo-nodes.{ns}.svc.cluster.local:8080")
}

/// The cluster's pods by name, as listed.
async fn list(pods: &Api<Pod>) -> BTreeMap<String, Pod> {
    let l = pods.list(&ListParams::default().labels("app.kubernetes.io/instance=demo")).await.unwrap();
    l.items.into_iter().map(|p| (p.name_any(), p)).collect()
}

fn template_hash(pod: &Pod) -> String {
    pod.annotations().get("kvstore.dev/template-hash").cloned().unwrap_or_default()
}

/// What the writers and the roll watcher share: the Ready pods' addresses (the Service's
/// endpoints), the history, and failures.
#[derive(Default)]
struct Load {
    endpoints: Mutex<Vec<String>>,
    history: Mutex<Vec<Op>>,
    failures: Mutex<Vec<String>>,
    stop: AtomicBool,
}

/// A writer going through the Service: each write to a Ready pod; a connection refused before the
/// request was sent (a pod going away) goes to another endpoint, as a client retries a connect;
/// anything else that is not a 2xx is a failed request.
async fn writer(load: Arc<Load>, client_id: usize, started: Instant) {
    let mut clients: HashMap<String, KvClient> = HashMap::new();
    let mut seq = 0usize;
    while !load.stop.load(Ordering::Relaxed) {
        seq += 1;
        let key = format!("roll-{}", (client_id * 7919 + seq) % 200);
        let value = format!("c{client_id}-{seq}");
        let invoke = started.elapsed().as_micros() as u64;
        let mut outcome = Err("no Ready endpoint".to_owned());
        for attempt in 0..20 {
            let endpoints = load.endpoints.lock().unwrap().clone();
            if endpoints.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let endpoint = endpoints[(seq + attempt) % endpoints.len()].clone();
            let client =
                clients.entry(endpoint.clone()).or_insert_with(|| KvClient::new(endpoint, Duration::from_secs(30)));
            match client.put(&key, value.clone()).await {
                Ok(_) => {
                    outcome = Ok(());
                    break;
                }
                Err(ClientError::Transport { source, .. }) if source.is_connect() => {
                    outcome = Err(format!("connect: {source}"));
                }
                Err(e) => {
                    outcome = Err(e.to_string());
                    break;
                }
            }
        }
        let complete = started.elapsed().as_micros() as u64;
        let acked = outcome.is_ok();
        if let Err(e) = outcome {
            load.failures.lock().unwrap().push(format!("PUT {key}: {e}"));
        }
        load.history.lock().unwrap().push(Op {
            client: client_id,
            key,
            kind: Kind::Put(value),
            invoke,
            complete,
            outcome: if acked { Outcome::Ok(None) } else { Outcome::Unknown },
        });
    }
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server (KUBECONFIG); scripts/test starts one"]
async fn lost_volumes_rolls_pause_and_stalls() {
    let OperatorEnv { client, namespace, root, net: _net, kubelet, operator: _operator, pods } =
        OperatorEnv::start("kvs-day2-e2e").await;
    let ns = namespace.name().to_owned();

    let manifest = root.path().join("cluster.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: kvstore.dev/v1alpha1\nkind: KVStoreCluster\nmetadata:\n  name: demo\nspec:\n  replicas: 4\n  \
         replicationFactor: 2\n  image: kvstore/kvs-node:1.0\n  progressDeadlineSeconds: 5\n  storage:\n    size: \
         40Ki\n",
    )
    .unwrap();
    kubectl(&["-n", &ns, "apply", "-f", manifest.to_str().unwrap()]);
    wait_running(&ns, "demo", 4, 2, "4 nodes, 2 partitions").await;
    write_keys(&pods, "demo", KEYS).await;
    let token_secret: Secret = Api::namespaced(client.clone(), &ns).get("demo-token").await.unwrap();
    let token = String::from_utf8(token_secret.data.unwrap()["token"].0.clone()).unwrap();

    // An emptied volume: the pod is not Ready before it holds what its partner holds.
    let before = pod_incarnation(&pods, "demo-1").await.unwrap();
    kubelet.wipe_volume("demo-1").await.unwrap();
    let address = eventually("demo-1 restarted and Ready", STEP, || async {
        let pod = pods.get("demo-1").await.ok()?;
        let restarts = pod.status.as_ref()?.container_statuses.as_ref()?.first()?.restart_count;
        (restarts > before.1 && pod_ready(&pod)).then(|| Some(format!("{}:8080", pod.status?.pod_ip?))).flatten()
    })
    .await;
    let keys = live_keys(&address, &token).await;
    let (mine, partner) = (keys[&identity(&ns, "demo-1")], keys[&identity(&ns, "demo-0")]);
    assert_eq!(mine, partner, "demo-1 reported Ready with {mine:?} keys while its partner holds {partner:?}");
    assert!(mine.is_some_and(|n| n >= (KEYS / 4) as u64), "demo-1 holds {mine:?} keys");
    assert_keys(&pods, "demo", KEYS, "after a restart on an empty volume").await;

    // Pause: an image change touches no pod, and the status says what waits.
    let old: BTreeMap<String, Pod> = list(&pods).await;
    patch(&ns, r#"{"spec":{"paused":true}}"#);
    patch(&ns, r#"{"spec":{"image":"kvstore/kvs-node:2.0"}}"#);
    eventually("the Paused phase for the new image", STEP, || async {
        let c = kvsc(&ns, "demo");
        let seen = c["status"]["observedGeneration"] == c["metadata"]["generation"];
        let msg = condition(&c, "Progressing")["message"].as_str().unwrap_or_default().to_owned();
        (seen && c["status"]["phase"] == "Paused" && msg.contains("restart pod")).then_some(())
    })
    .await;
    let table = kubectl(&["-n", &ns, "get", "kvsc", "demo"]);
    assert!(table.contains("Paused"), "kubectl get shows the phase:\n{table}");
    let now = list(&pods).await;
    for (name, pod) in &old {
        assert_eq!(now[name].uid(), pod.uid(), "pod {name} was replaced while paused");
    }

    // Unpaused: the roll under writers; each restarted pod is Ready before the next goes.
    let load = Arc::new(Load::default());
    let started = Instant::now();
    let watcher = {
        let (load, pods, old) = (load.clone(), pods.clone(), old.clone());
        tokio::spawn(async move {
            // Per rolled pod (new uid): when first seen, and when first seen Ready.
            let mut rolled: Vec<(String, Option<Instant>, Instant)> = Vec::new();
            while !load.stop.load(Ordering::Relaxed) {
                let now = list(&pods).await;
                let t = Instant::now();
                *load.endpoints.lock().unwrap() = now
                    .values()
                    .filter(|p| pod_ready(p))
                    .filter_map(|p| Some(format!("{}:8080", p.status.as_ref()?.pod_ip.as_ref()?)))
                    .collect();
                for (name, pod) in &now {
                    let uid = pod.uid().unwrap_or_default();
                    if old.get(name).and_then(|o| o.uid()) == Some(uid.clone()) {
                        continue;
                    }
                    match rolled.iter_mut().find(|(u, _, _)| *u == uid) {
                        Some((_, ready, _)) => {
                            if ready.is_none() && pod_ready(pod) {
                                *ready = Some(t);
                            }
                        }
                        None => rolled.push((uid, pod_ready(pod).then_some(t), t)),
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            rolled
        })
    };
    let writers: Vec<_> = (0..WRITERS).map(|i| tokio::spawn(writer(load.clone(), i, started))).collect();
    patch(&ns, r#"{"spec":{"paused":false}}"#);
    let new_hash = eventually("every pod on the new template and Ready", STEP, || async {
        let c = kvsc(&ns, "demo");
        let now = list(&pods).await;
        let hashes: Vec<String> = now.values().map(template_hash).collect();
        let all_new = now.len() == 4 && hashes.iter().all(|h| h != &template_hash(&old["demo-0"]));
        (all_new
            && now.values().all(pod_ready)
            && c["status"]["updatedReplicas"] == 4
            && c["status"]["phase"] == "Running")
            .then(|| hashes[0].clone())
    })
    .await;
    load.stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let rolled = watcher.await.unwrap();
    assert_eq!(rolled.len(), 4, "each pod restarted exactly once: {rolled:?}");
    for pair in rolled.windows(2) {
        let (ready, next_seen) = (pair[0].1, pair[1].2);
        assert!(
            ready.is_some_and(|r| r <= next_seen),
            "a pod was restarted before the previous one was Ready: {rolled:?}"
        );
    }
    let failures = load.failures.lock().unwrap().clone();
    let history = load.history.lock().unwrap().clone();
    eprintln!(
        "the roll: {} writes by {WRITERS} writers, {} failed; pods rolled: {}",
        history.len(),
        failures.len(),
        rolled.len()
    );
    if !failures.is_empty() {
        // For taking a failure apart afterwards: the end of every pod's log (all its restarts).
        for pod in std::fs::read_dir(root.path().join("logs").join(&ns)).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(pod.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- {}:\n{}", pod.path().display(), lines[lines.len().saturating_sub(40)..].join("\n"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the roll: {failures:?}",
        failures.len(),
        history.len()
    );
    assert!(history.len() > 100, "the writers wrote during the roll ({} writes)", history.len());
    let mut finals: BTreeMap<String, Vec<(String, Option<String>)>> = BTreeMap::new();
    let endpoints = load.endpoints.lock().unwrap().clone();
    for endpoint in &endpoints {
        let reader = KvClient::new(endpoint.clone(), Duration::from_secs(30));
        for k in 0..200 {
            let key = format!("roll-{k}");
            let got = reader.get(&key).await.unwrap().map(|s| String::from_utf8(s.value.to_vec()).unwrap());
            finals.entry(key).or_default().push((endpoint.clone(), got));
        }
    }
    let violations = check_final(&history, &finals, 0);
    assert!(violations.is_empty(), "lost writes after the roll: {violations:?}");
    assert_keys(&pods, "demo", KEYS, "after the roll").await;

    // A broken image: one pod restarted, it never becomes Ready, Stalled names it, nothing else rolls.
    patch(&ns, r#"{"spec":{"image":"kvstore/kvs-node:broken"}}"#);
    let stalled = eventually("Stalled naming the broken pod", STEP, || async {
        let c = kvsc(&ns, "demo");
        (condition(&c, "Stalled")["status"] == "True").then_some(c)
    })
    .await;
    assert_eq!(stalled["status"]["blockedBy"], "pod/demo-3", "{stalled:#}");
    let message = condition(&stalled, "Stalled")["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains("ImagePullBackOff"), "the Stalled message says why: {message}");
    let table = kubectl(&["-n", &ns, "get", "kvsc", "demo"]);
    assert!(table.contains("pod/demo-3"), "kubectl get shows what blocks:\n{table}");
    let now = list(&pods).await;
    let on_new: Vec<&String> = now.iter().filter(|(_, p)| template_hash(p) != new_hash).map(|(n, _)| n).collect();
    assert_eq!(on_new, ["demo-3"], "only the first pod of the roll got the broken image");
    patch(&ns, r#"{"spec":{"image":"kvstore/kvs-node:2.1"}}"#);
    eventually("the roll finished on a good image", STEP, || async {
        let c = kvsc(&ns, "demo");
        let done = c["status"]["updatedReplicas"] == 4 && c["status"]["phase"] == "Running";
        (done && condition(&c, "Stalled")["status"] == "False").then_some(())
    })
    .await;
    assert_keys(&pods, "demo", KEYS, "after the broken image was replaced").await;

    // A lost machine: the pod is Unschedulable with its volume gone; past the deadline the operator
    // gives it a fresh volume under the same identity, and it re-syncs.
    let lost_uid = pods.get("demo-2").await.unwrap().uid();
    kubelet.lose_machine("demo-2").await.unwrap();
    let address = eventually("demo-2 replaced and Ready", STEP, || async {
        let pod = pods.get("demo-2").await.ok()?;
        (pod.uid() != lost_uid && pod_ready(&pod)).then(|| Some(format!("{}:8080", pod.status?.pod_ip?))).flatten()
    })
    .await;
    let keys = live_keys(&address, &token).await;
    let (mine, partner) = (keys[&identity(&ns, "demo-2")], keys[&identity(&ns, "demo-3")]);
    assert_eq!(mine, partner, "the replacement reported Ready with {mine:?} keys while its partner holds {partner:?}");
    wait_running(&ns, "demo", 4, 2, "whole again after the replacement").await;
    assert_keys(&pods, "demo", KEYS, "after a member replacement").await;
    // A scale-in whose data would not fit the 40Ki volumes is refused with the numbers, and
    // nothing moves; back to 4 replicas, the cluster runs again.
    kubectl(&["-n", &ns, "scale", "kvsc", "demo", "--replicas=2"]);
    let refused = eventually("the scale-in refused", STEP, || async {
        let c = kvsc(&ns, "demo");
        let seen = c["status"]["observedGeneration"] == c["metadata"]["generation"];
        (seen && condition(&c, "Degraded")["reason"] == "InsufficientStorage").then_some(c)
    })
    .await;
    assert_eq!(refused["status"]["phase"], "Failed");
    let plan = &refused["status"]["capacityPlan"];
    assert_eq!((plan["partitions"].as_i64(), plan["fits"].as_bool()), (Some(1), Some(false)), "{plan:#}");
    assert_eq!(plan["volumeBytes"].as_i64(), Some(40 << 10));
    assert!(plan["totalKeys"].as_i64().unwrap() >= KEYS as i64, "{plan:#}");
    let message = condition(&refused, "Degraded")["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains("does NOT fit the 40.0 KiB volumes"), "{message}");
    assert_eq!(list(&pods).await.len(), 4, "no pod removed");
    let view = node_status(&address, &token).await.unwrap().layout.unwrap();
    assert_eq!(view.members().count(), 4, "no view change posted");
    kubectl(&["-n", &ns, "scale", "kvsc", "demo", "--replicas=4"]);
    wait_running(&ns, "demo", 4, 2, "back to the spec that fits").await;
    let events = kubectl(&["-n", &ns, "get", "events.events.k8s.io", "-o", "jsonpath={.items[*].reason}"]);
    for reason in ["RollingPod", "Stalled", "MemberReplaced"] {
        assert!(events.contains(reason), "no {reason} event in: {events}");
    }
    kubelet.stop().await;
}
