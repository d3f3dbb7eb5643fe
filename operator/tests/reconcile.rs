//! Reconcile scenarios against a mocked API server (kube's `tower-test` service) and scripted
//! nodes: a new cluster, scaling out and in, an operator restarted in the middle of a rebalance,
//! an invalid spec, deletion. The mock keeps objects in memory and applies patches the way the API
//! server does (server-side apply as a merge, JSON merge patch, JSON patch), so scenarios assert
//! on the resulting objects rather than on the exact order of requests. Requests are classified by
//! the shared parser of `kvs_testkit::k8s_request`, and every one is checked against the
//! operator's RBAC rules (`kvs_operator::rbac`).
//!
//! Simplified on purpose: server-side apply merges the applied fields into the object (the
//! operator is the only manager of its children), except on the `status` subresource, where an
//! apply replaces the whole status — the operator applies its complete status, and a field it
//! omits (a finished rebalance) must disappear, as it does on a real API server once no manager
//! owns it. Writes to a subresource change only that part of the object.

#![allow(clippy::unwrap_used)] // a test harness: a failed unwrap is a failed test

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::{Client, client::Body};
use kvs_api::{ClusterStatus, Layout, NodeUsage, RebalanceProgress};
use kvs_operator::controller::{Context, FINALIZER, reconcile};
use kvs_operator::crd::{KVStoreCluster, KVStoreClusterSpec};
use kvs_operator::metrics::Metrics;
use kvs_operator::rebalance::{NodeAdmin, Pod};
use kvs_testkit::k8s_request::{self, Attributes};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const NS: &str = "prod";

/// One request the operator made.
#[derive(Clone, Debug)]
struct Call {
    verb: String,
    group: String,
    /// As RBAC names it: `resource` or `resource/subresource`.
    resource: String,
}

/// An in-memory API server.
#[derive(Default)]
struct FakeApi {
    objects: Mutex<BTreeMap<String, Value>>,
    calls: Mutex<Vec<Call>>,
    /// Reasons of the Events created (the mock does not keep Events as objects).
    event_reasons: Mutex<Vec<String>>,
}

fn status_response(code: u16, reason: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": reason, "code": code});
    Response::builder().status(code).body(Body::from(serde_json::to_vec(&body).unwrap())).unwrap()
}

fn ok(value: &Value) -> Response<Body> {
    Response::builder().status(StatusCode::OK).body(Body::from(serde_json::to_vec(value).unwrap())).unwrap()
}

/// Server-side apply, simplified: the applied fields win, objects merge, lists are replaced.
fn merge_applied(into: &mut Value, applied: &Value) {
    match (into, applied) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge_applied(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (into, v) => *into = v.clone(),
    }
}

impl FakeApi {
    fn key(group: &str, resource: &str, namespace: &str, name: &str) -> String {
        format!("{group}/{resource}/{namespace}/{name}")
    }

    fn put(&self, group: &str, resource: &str, object: Value) {
        let ns = object["metadata"]["namespace"].as_str().unwrap_or(NS).to_owned();
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        self.objects.lock().unwrap().insert(Self::key(group, resource, &ns, &name), object);
    }

    fn get(&self, group: &str, resource: &str, name: &str) -> Option<Value> {
        self.objects.lock().unwrap().get(&Self::key(group, resource, NS, name)).cloned()
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let method = req.method().clone();
        let content_type =
            req.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let query = req.uri().query().map(str::to_owned);
        let t = match k8s_request::classify(method.as_str(), req.uri().path(), query.as_deref()) {
            k8s_request::Request::Resource(attributes) => attributes,
            other => panic!("the operator made a non-resource request: {other:?}"),
        };
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let body: Value = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap() };
        self.calls.lock().unwrap().push(Call {
            verb: t.verb.clone(),
            group: t.group.clone(),
            resource: t.rbac_resource(),
        });
        let Attributes { verb, group, resource, subresource, namespace, name } = t;
        let namespace = namespace.unwrap_or_default();
        let mut objects = self.objects.lock().unwrap();
        match verb.as_str() {
            "list" => {
                let wanted = k8s_request::label_selector(query.as_deref());
                let prefix = format!("{group}/{resource}/{namespace}/");
                let items: Vec<Value> = objects
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix))
                    .map(|(_, v)| v.clone())
                    .filter(|o| wanted.iter().all(|(k, v)| o["metadata"]["labels"][k].as_str() == Some(v)))
                    .collect();
                ok(&json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}))
            }
            "get" => match objects.get(&Self::key(&group, &resource, &namespace, name.as_deref().unwrap())) {
                Some(o) => ok(o),
                None => status_response(404, "NotFound"),
            },
            "create" => {
                let mut object = body;
                if resource == "events" {
                    self.event_reasons.lock().unwrap().push(object["reason"].as_str().unwrap_or_default().to_owned());
                    return ok(&object);
                }
                let name = object["metadata"]["name"].as_str().unwrap().to_owned();
                let key = Self::key(&group, &resource, &namespace, &name);
                if objects.contains_key(&key) {
                    return status_response(409, "AlreadyExists");
                }
                if let Some(data) = object.get("stringData").cloned() {
                    use base64::Engine;
                    let encoded: serde_json::Map<String, Value> = data
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| {
                            (k.clone(), json!(base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap())))
                        })
                        .collect();
                    object["data"] = Value::Object(encoded);
                    object.as_object_mut().unwrap().remove("stringData");
                }
                objects.insert(key, object.clone());
                ok(&object)
            }
            "patch" => {
                if resource == "events" {
                    return ok(&body);
                }
                let key = Self::key(&group, &resource, &namespace, name.as_deref().unwrap());
                let applying = content_type == "application/apply-patch+yaml";
                // The API server refuses an apply without the object's type and name.
                if applying
                    && (!body["apiVersion"].is_string()
                        || !body["kind"].is_string()
                        || body["metadata"]["name"].as_str() != name.as_deref())
                {
                    return status_response(400, "BadRequest");
                }
                let existing = objects.get(&key).cloned();
                let patched = match (content_type.as_str(), existing) {
                    // A subresource belongs to an existing object, and a write to it changes only it.
                    (_, None) if subresource.is_some() => return status_response(404, "NotFound"),
                    (_, Some(mut o)) if applying && subresource.as_deref() == Some("status") => {
                        // The whole status is applied: what it leaves out is no longer there.
                        o["status"] = body.get("status").cloned().unwrap_or(Value::Null);
                        o
                    }
                    (other, _) if subresource.is_some() => panic!("unexpected {other} patch of {subresource:?}"),
                    ("application/apply-patch+yaml", existing) => {
                        let mut o = existing.unwrap_or(json!({}));
                        merge_applied(&mut o, &body);
                        o
                    }
                    (_, None) => return status_response(404, "NotFound"),
                    ("application/merge-patch+json", Some(mut o)) => {
                        json_patch::merge(&mut o, &body);
                        o
                    }
                    ("application/json-patch+json", Some(mut o)) => {
                        // The API server's JSON patch treats a missing field as null in `test` ops.
                        if o["metadata"].get("finalizers").is_none() {
                            o["metadata"]["finalizers"] = Value::Null;
                        }
                        let ops: json_patch::Patch = serde_json::from_value(body).unwrap();
                        if json_patch::patch(&mut o, &ops).is_err() {
                            return status_response(422, "Invalid");
                        }
                        o
                    }
                    (other, _) => panic!("unexpected patch type {other}"),
                };
                objects.insert(key, patched.clone());
                ok(&patched)
            }
            "delete" => match objects.remove(&Self::key(&group, &resource, &namespace, name.as_deref().unwrap())) {
                Some(o) => ok(&o),
                None => status_response(404, "NotFound"),
            },
            other => panic!("unexpected {other} request"),
        }
    }
}

/// Nodes whose answers the scenario scripts.
#[derive(Default)]
struct ScriptedNodes {
    status: Mutex<Option<ClusterStatus>>,
    posted: Mutex<Vec<(String, Vec<String>, u32)>>,
    tokens: Mutex<Vec<Option<String>>>,
    /// View changes still to refuse (as a node answers 409 to a concurrent change).
    refusals: Mutex<u32>,
    /// Live bytes every node reports holding (`GET /v1/admin/usage`).
    bytes_per_node: Mutex<u64>,
}

#[async_trait::async_trait]
impl NodeAdmin for ScriptedNodes {
    async fn status(&self, pods: &[Pod]) -> Option<ClusterStatus> {
        if pods.iter().any(|p| p.ready) { self.status.lock().unwrap().clone() } else { None }
    }

    async fn change_view(&self, primary: &str, members: Vec<String>, replication_factor: u32) -> anyhow::Result<()> {
        self.posted.lock().unwrap().push((primary.to_owned(), members, replication_factor));
        let mut refusals = self.refusals.lock().unwrap();
        if *refusals > 0 {
            *refusals -= 1;
            anyhow::bail!("{primary} answered 409 Conflict: another view change is in progress");
        }
        Ok(())
    }

    async fn usage(&self, pods: &[Pod]) -> Vec<NodeUsage> {
        let bytes = *self.bytes_per_node.lock().unwrap();
        let usage =
            |p: &Pod| NodeUsage { node: p.identity.clone(), live_keys: bytes / 100, live_bytes: bytes, tombstones: 0 };
        pods.iter().filter(|p| p.started).map(usage).collect()
    }
}

struct Scenario {
    api: Arc<FakeApi>,
    nodes: Arc<ScriptedNodes>,
    ctx: Arc<Context>,
}

impl Scenario {
    fn new() -> Self {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = Arc::new(FakeApi::default());
        let served = api.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                send.send_response(served.handle(req).await);
            }
        });
        let client = Client::new(service, "default");
        let nodes = Arc::new(ScriptedNodes::default());
        let for_nodes = nodes.clone();
        let admin_for: kvs_operator::controller::AdminFactory = Arc::new(move |token, _tls| {
            for_nodes.tokens.lock().unwrap().push(token);
            for_nodes.clone() as Arc<dyn NodeAdmin>
        });
        let reporter = Reporter { controller: "kvs-operator".into(), instance: Some("test".into()) };
        let ctx = Arc::new(Context::new(client, reporter, Arc::new(Metrics::default()), admin_for));
        Scenario { api, nodes, ctx }
    }

    fn cluster(&self, replicas: i32, rf: i32) {
        let mut c = KVStoreCluster::new(
            "demo",
            KVStoreClusterSpec { image: "kvs:1".into(), ..KVStoreClusterSpec::new(replicas, rf) },
        );
        c.metadata.namespace = Some(NS.into());
        c.metadata.uid = Some("uid-demo".into());
        c.metadata.generation = Some(1);
        let mut value = serde_json::to_value(&c).unwrap();
        // Keep the finalizer and status of an existing object (a spec edit).
        if let Some(old) = self.api.get("kvstore.dev", "kvstoreclusters", "demo") {
            value["metadata"]["finalizers"] = old["metadata"]["finalizers"].clone();
            value["status"] = old["status"].clone();
        }
        self.api.put("kvstore.dev", "kvstoreclusters", value);
    }

    fn stored_cluster(&self) -> KVStoreCluster {
        serde_json::from_value(self.api.get("kvstore.dev", "kvstoreclusters", "demo").expect("cluster exists")).unwrap()
    }

    async fn reconcile(&self) -> Action {
        reconcile(Arc::new(self.stored_cluster()), self.ctx.clone()).await.expect("reconcile succeeds")
    }

    fn statefulset(&self) -> Option<StatefulSet> {
        self.api.get("apps", "statefulsets", "demo").map(|v| serde_json::from_value(v).unwrap())
    }

    fn sts_replicas(&self) -> i32 {
        self.statefulset().and_then(|s| s.spec?.replicas).expect("the StatefulSet has replicas")
    }

    /// `n` node pods on the StatefulSet's current template, the first `ready` of them running and
    /// Ready, the others still starting (what the StatefulSet controller and the kubelet report).
    fn pods(&self, n: u32, ready: u32) {
        let hash = self
            .statefulset()
            .and_then(|s| s.spec?.template.metadata?.annotations?.get("kvstore.dev/template-hash").cloned())
            .unwrap_or_default();
        for o in 0..n {
            let ready = if o < ready { "True" } else { "False" };
            self.api.put(
                "",
                "pods",
                json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("demo-{o}"), "namespace": NS, "labels": {
                        "app.kubernetes.io/name": "kvstore", "app.kubernetes.io/instance": "demo", "app.kubernetes.io/managed-by": "kvs-operator"},
                        "annotations": {"kvstore.dev/template-hash": hash}},
                    "status": {"podIP": format!("10.0.0.{o}"), "conditions": [{"type": "Ready", "status": ready}],
                        "containerStatuses": [{"name": "kvs-node", "image": "i", "imageID": "", "ready": ready == "True",
                            "restartCount": 0, "state": if ready == "True" { json!({"running": {}}) } else { json!({"waiting": {"reason": "ContainerCreating"}}) }}]}
                }),
            );
        }
    }

    fn nodes_report(&self, members: u32, k: u32, pending: Option<u64>) {
        let all: Vec<String> = (0..members).map(identity).collect();
        let full = (members / k) as usize * k as usize;
        let layout = Layout {
            epoch: 5,
            replication_factor: k,
            partitions: all[..full].chunks(k as usize).map(|c| c.to_vec()).collect(),
            proxies: all[full..].to_vec(),
        };
        *self.nodes.status.lock().unwrap() = Some(ClusterStatus {
            node: identity(0),
            layout: Some(layout),
            pending_epoch: pending,
            partitions: vec![],
            rebalance: RebalanceProgress {
                epoch: 6,
                phase: kvs_api::RebalancePhase::Transferring,
                moved_keys: 400,
                total_keys: 1000,
                ..Default::default()
            },
        });
    }

    async fn posted_views(&self) -> Vec<(String, Vec<String>, u32)> {
        // The view change runs in a background task: give it a moment to post.
        for _ in 0..50 {
            if !self.nodes.posted.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.nodes.posted.lock().unwrap().clone()
    }

    fn status(&self) -> Value {
        self.api.get("kvstore.dev", "kvstoreclusters", "demo").unwrap()["status"].clone()
    }

    fn condition(&self, type_: &str) -> Value {
        self.status()["conditions"].as_array().unwrap().iter().find(|c| c["type"] == type_).cloned().unwrap()
    }

    /// The requests that wrote Events (the mock does not keep Events).
    fn event_writes(&self) -> Vec<String> {
        self.api.calls().into_iter().filter(|c| c.resource == "events").map(|c| c.verb).collect()
    }

    fn assert_rbac_covers_every_call(&self) {
        for c in self.api.calls() {
            assert!(
                kvs_operator::rbac::allows(&c.group, &c.resource, &c.verb),
                "the operator made a call its RBAC rules do not allow: {c:?} — add it to operator/src/rbac.rs (and the chart)"
            );
        }
    }
}

fn identity(o: u32) -> String {
    format!("demo-{o}.demo-nodes.{NS}.svc.cluster.local:8080")
}

/// A cluster that exists with its finalizer and children (reconciled once before).
async fn established(replicas: i32, rf: i32) -> Scenario {
    let s = Scenario::new();
    s.cluster(replicas, rf);
    s.reconcile().await; // adds the finalizer
    s.reconcile().await; // applies the children
    s
}

#[tokio::test]
async fn a_new_cluster_gets_a_finalizer_then_its_children_and_a_pending_status() {
    let s = Scenario::new();
    s.cluster(4, 2);
    s.reconcile().await;
    assert_eq!(s.stored_cluster().metadata.finalizers, Some(vec![FINALIZER.to_owned()]));
    assert!(s.statefulset().is_none(), "the first pass only adds the finalizer");

    assert_eq!(s.reconcile().await, Action::requeue(Duration::from_secs(2)));
    let sts = s.statefulset().expect("StatefulSet applied");
    assert_eq!(sts.spec.as_ref().unwrap().replicas, Some(4));
    let env = &sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0].env.as_ref().unwrap();
    let view = env.iter().find(|e| e.name == "VIEW").unwrap().value.clone().unwrap();
    assert_eq!(view, (0..4).map(identity).collect::<Vec<_>>().join(","));
    assert_eq!(sts.metadata.owner_references.unwrap()[0].uid, "uid-demo");
    for (group, resource, name) in
        [("", "services", "demo"), ("", "services", "demo-nodes"), ("policy", "poddisruptionbudgets", "demo")]
    {
        assert!(s.api.get(group, resource, name).is_some(), "{resource}/{name} applied");
    }
    let secret = s.api.get("", "secrets", "demo-token").expect("token Secret created");
    assert_eq!(secret["data"]["token"].as_str().unwrap().len(), 88, "32 random bytes, hex, base64-encoded");
    assert_eq!(s.status()["phase"], "Pending");
    assert_eq!(s.condition("Progressing")["reason"], "WaitingForPods");
    assert!(s.nodes.posted.lock().unwrap().is_empty());

    // Reconciling again changes nothing: the token is kept, the StatefulSet is the same.
    let token = secret["data"]["token"].clone();
    s.reconcile().await;
    assert_eq!(s.api.get("", "secrets", "demo-token").unwrap()["data"]["token"], token);
    assert_eq!(s.sts_replicas(), 4);
    assert_eq!(
        s.nodes.tokens.lock().unwrap().last().unwrap().as_ref().map(String::len),
        Some(64),
        "nodes are called with the token"
    );
    s.assert_rbac_covers_every_call();
}

#[tokio::test]
async fn ready_pods_and_the_right_view_make_it_available() {
    let s = established(4, 2).await;
    s.pods(4, 4);
    s.nodes_report(4, 2, None);
    assert_eq!(s.reconcile().await, Action::requeue(Duration::from_secs(60)));
    let status = s.status();
    assert_eq!(
        (status["phase"].as_str(), status["partitions"].as_i64(), status["readyReplicas"].as_i64()),
        (Some("Running"), Some(2), Some(4))
    );
    assert_eq!(s.condition("Available")["status"], "True");
    assert_eq!(status["members"].as_array().unwrap().len(), 4);
    assert!(s.nodes.posted.lock().unwrap().is_empty());
    s.assert_rbac_covers_every_call();
}

#[tokio::test]
async fn scaling_out_grows_the_statefulset_waits_for_the_pods_then_moves_data() {
    let s = established(4, 2).await;
    s.pods(4, 4);
    s.nodes_report(4, 2, None);
    s.reconcile().await;
    s.cluster(6, 2);
    s.reconcile().await;
    assert_eq!(s.sts_replicas(), 6);
    assert!(s.nodes.posted.lock().unwrap().is_empty(), "no view change before the new pods are ready");
    // The new pods are still starting.
    s.pods(6, 4);
    s.reconcile().await;
    assert_eq!(s.condition("Progressing")["reason"], "WaitingForPods");
    assert!(s.nodes.posted.lock().unwrap().is_empty());
    s.pods(6, 6);
    s.reconcile().await;
    let posted = s.posted_views().await;
    assert_eq!(posted, vec![("10.0.0.0:8080".to_owned(), (0..6).map(identity).collect(), 2)], "posted once, to pod 0");
    assert_eq!(s.status()["phase"], "Rebalancing");
    s.assert_rbac_covers_every_call();
}

#[tokio::test]
async fn a_scale_in_that_does_not_fit_the_volumes_is_refused_with_the_numbers() {
    let s = established(6, 2).await;
    s.pods(6, 6);
    s.nodes_report(6, 2, None);
    // 3 partitions of 100 MiB each: 2 nodes would each hold 300 MiB, needing 4 × 300 MiB + 32 MiB,
    // more than 1Gi.
    *s.nodes.bytes_per_node.lock().unwrap() = 100 << 20;
    s.cluster(2, 2);
    s.reconcile().await;
    assert!(s.nodes.posted.lock().unwrap().is_empty(), "no view change was posted");
    assert_eq!(s.sts_replicas(), 6);
    let status = s.status();
    assert_eq!(status["phase"], "Failed");
    let degraded = s.condition("Degraded");
    assert_eq!(degraded["reason"], "InsufficientStorage");
    assert!(degraded["message"].as_str().unwrap().contains("does NOT fit the 1.0 GiB volumes"), "{degraded}");
    let plan = &status["capacityPlan"];
    assert_eq!((plan["partitions"].as_i64(), plan["perNodeBytes"].as_i64()), (Some(1), Some(300 << 20)));
    assert_eq!((plan["fits"].as_bool(), plan["volumeBytes"].as_i64()), (Some(false), Some(1 << 30)));
    // A scale-in that fits goes ahead: 3 × 50 MiB on each node needs 632 MiB.
    *s.nodes.bytes_per_node.lock().unwrap() = 50 << 20;
    s.reconcile().await;
    assert_eq!(s.posted_views().await.len(), 1);
    s.assert_rbac_covers_every_call();
}

#[tokio::test]
async fn scaling_in_moves_the_data_before_the_statefulset_shrinks() {
    let s = established(6, 2).await;
    s.pods(6, 6);
    s.nodes_report(6, 2, None);
    s.cluster(2, 2);
    s.reconcile().await;
    assert_eq!(s.posted_views().await, vec![("10.0.0.0:8080".to_owned(), (0..2).map(identity).collect(), 2)]);
    assert_eq!(s.sts_replicas(), 6, "pods stay until their data has moved");
    s.assert_rbac_covers_every_call();
}

#[tokio::test]
async fn an_operator_restarted_mid_rebalance_waits_for_the_change_under_way() {
    // A fresh operator (new context: it started nothing) finds the nodes moving to a 6-node view.
    let s = established(6, 2).await;
    s.pods(6, 6);
    s.nodes_report(4, 2, Some(6));
    assert_eq!(s.reconcile().await, Action::requeue(Duration::from_secs(2)));
    assert!(s.nodes.posted.lock().unwrap().is_empty(), "the running change is not posted again");
    let status = s.status();
    assert_eq!(status["phase"], "Rebalancing");
    assert_eq!(status["rebalance"]["progress"], "transferring 40% (400/1000 keys)");
    assert_eq!(s.condition("Progressing")["reason"], "MovingData");
    // The change finishes (view of 6): the next look finds the cluster in sync.
    s.nodes_report(6, 2, None);
    s.reconcile().await;
    assert_eq!(s.status()["phase"], "Running");
    assert!(s.status().get("rebalance").is_none(), "the finished rebalance is gone: {}", s.status());
    s.assert_rbac_covers_every_call();
}

#[tokio::test]
async fn an_operator_restarted_after_a_scale_in_view_change_shrinks_the_statefulset() {
    // The view already excludes pods 2..5 (data moved) but the operator died before shrinking.
    let s = established(6, 2).await;
    s.pods(6, 6);
    s.cluster(2, 2);
    s.nodes_report(2, 2, None);
    s.reconcile().await;
    assert_eq!(s.sts_replicas(), 2);
    assert!(s.nodes.posted.lock().unwrap().is_empty(), "nothing to move again");
    s.assert_rbac_covers_every_call();
}

#[tokio::test]
async fn a_replication_factor_change_goes_through_the_view() {
    let s = established(4, 2).await;
    s.pods(4, 4);
    s.nodes_report(4, 2, None);
    s.cluster(4, 1);
    s.reconcile().await;
    assert_eq!(s.posted_views().await, vec![("10.0.0.0:8080".to_owned(), (0..4).map(identity).collect(), 1)]);
    assert_eq!(s.sts_replicas(), 4);
    // The pod template keeps its initial K: changing it would restart every pod.
    let sts = s.statefulset().unwrap();
    let env = sts.spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap();
    assert_eq!(env.iter().find(|e| e.name == "K").unwrap().value.as_deref(), Some("2"));
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_waits_for_a_change() {
    let s = Scenario::new();
    s.cluster(4, 2);
    s.reconcile().await;
    // Only reachable past the CRD's own validation (e.g. an older CRD installed): still handled.
    let mut c = s.api.get("kvstore.dev", "kvstoreclusters", "demo").unwrap();
    c["spec"]["storage"]["size"] = json!("lots");
    s.api.put("kvstore.dev", "kvstoreclusters", c);
    assert_eq!(s.reconcile().await, Action::await_change());
    assert_eq!(s.status()["phase"], "Failed");
    let degraded = s.condition("Degraded");
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert!(degraded["message"].as_str().unwrap().contains("like 1Gi"));
    assert!(s.statefulset().is_none(), "nothing is built from an invalid spec");
    assert_eq!(s.event_writes(), ["create"], "one Warning event");
    s.assert_rbac_covers_every_call();
}

#[tokio::test]
async fn deleting_a_cluster_removes_its_children_then_the_finalizer() {
    let s = established(4, 2).await;
    let mut c = s.api.get("kvstore.dev", "kvstoreclusters", "demo").unwrap();
    c["metadata"]["deletionTimestamp"] = json!("2026-11-25T00:00:00Z");
    s.api.put("kvstore.dev", "kvstoreclusters", c);
    s.reconcile().await;
    for (group, resource, name) in [
        ("apps", "statefulsets", "demo"),
        ("", "services", "demo"),
        ("", "services", "demo-nodes"),
        ("policy", "poddisruptionbudgets", "demo"),
        ("", "secrets", "demo-token"),
    ] {
        assert!(s.api.get(group, resource, name).is_none(), "{resource}/{name} deleted");
    }
    let finalizers = s.stored_cluster().metadata.finalizers.unwrap_or_default();
    assert!(finalizers.is_empty(), "finalizer removed: {finalizers:?}");
    s.assert_rbac_covers_every_call();
}

#[tokio::test]
async fn a_failed_view_change_is_reported_and_posted_again() {
    let s = established(4, 2).await;
    s.pods(4, 4);
    s.nodes_report(4, 2, None);
    *s.nodes.refusals.lock().unwrap() = 1;
    s.cluster(4, 1);
    s.reconcile().await;
    assert_eq!(s.posted_views().await.len(), 1);
    // The next reconcile collects the failure (a Warning event) and, the view still being wrong,
    // posts it again.
    s.reconcile().await;
    let reasons = s.api.event_reasons.lock().unwrap().clone();
    assert!(reasons.contains(&"ViewChangeFailed".to_owned()), "the failure is published as an Event: {reasons:?}");
    for _ in 0..50 {
        if s.nodes.posted.lock().unwrap().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let posted = s.nodes.posted.lock().unwrap().clone();
    assert_eq!(posted.len(), 2, "posted again after the failure");
    assert_eq!(posted[0], posted[1]);
}
