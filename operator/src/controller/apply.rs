//! The Kubernetes side effects of a reconcile: server-side apply of the built children and of the
//! status, the cluster token Secret, reading the node pods, and deleting the children on cleanup.
//! Also the Kubernetes [`Backend`] of the shared rebalance driver (the StatefulSet is its "pods").
//!
//! Every write is a server-side apply with the field manager [`MANAGER`] (forced: the operator owns
//! these fields), so re-applying the same objects is a no-op and a restarted operator converges;
//! a field the operator stops setting (a finished rebalance in the status) is removed by the API
//! server, as the manager no longer claims it.

use super::build::{self, InitialView, PORT};
use super::validate::ValidCluster;
use crate::rebalance::{Backend, Pod, Target};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod as KubePod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;

/// Field manager of every object the operator applies.
pub const MANAGER: &str = "kvs-operator";

fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

async fn apply<K>(api: &Api<K>, object: &K) -> kube::Result<K>
where
    K: kube::Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    api.patch(&object.name_any(), &apply_params(), &Patch::Apply(object)).await
}

/// Writes the status of the `K` named `name` (a cluster, a backup, a schedule): a server-side apply
/// of the status subresource carrying the whole status, so what it leaves out (a finished
/// rebalance) disappears. (An invalid object has a status too: this needs only its name.)
pub async fn apply_status<K>(client: &Client, namespace: &str, name: &str, status: &impl Serialize) -> kube::Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "name": name },
        "status": status,
    });
    api.patch_status(name, &apply_params(), &Patch::Apply(&patch)).await?;
    Ok(())
}

/// Publishes an Event about `object` (a failure is logged, never fatal).
pub async fn publish_event<K>(recorder: &Recorder, object: &K, type_: EventType, reason: &str, note: String)
where
    K: Resource<DynamicType = ()>,
{
    let event = Event { type_, reason: reason.into(), note: Some(note), action: reason.into(), secondary: None };
    let reference = object.object_ref(&());
    if let Err(e) = recorder.publish(&event, &reference).await {
        let object = format!("{}/{}", reference.namespace.unwrap_or_default(), reference.name.unwrap_or_default());
        tracing::warn!(%object, error = %e, "could not publish an event");
    }
}

/// `K`s in `namespace`, or in every namespace (what a controller watches).
pub fn api_in<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// One cluster's children, as the operator sees them in the API.
pub struct KubeBackend {
    cluster: ValidCluster,
    statefulsets: Api<StatefulSet>,
    pods: Api<KubePod>,
    /// The view the pod template carries (read back from the StatefulSet; see `build`).
    initial: InitialView,
    /// The StatefulSet's replicas as last applied or read.
    replicas: u32,
    /// The template hash of the StatefulSet as applied: pods without it run an old template.
    template_hash: String,
    claims: Api<PersistentVolumeClaim>,
    /// Asks a started pod whether it serves yet (over TLS when the cluster has it).
    probe: reqwest::Client,
    tls: kvs_api::ClientTls,
}

impl KubeBackend {
    /// Applies the Services, the PodDisruptionBudget and the StatefulSet (at its current size,
    /// or the spec's if it does not exist yet) for `cluster`.
    pub async fn apply_children(
        client: &Client,
        cluster: &ValidCluster,
        tls: &kvs_api::ClientTls,
    ) -> kube::Result<Self> {
        let namespace = &cluster.namespace;
        let services: Api<Service> = Api::namespaced(client.clone(), namespace);
        apply(&services, &build::headless_service(cluster)).await?;
        apply(&services, &build::client_service(cluster)).await?;
        let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), namespace);
        apply(&budgets, &build::disruption_budget(cluster)).await?;
        let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
        let existing = statefulsets.get_opt(&cluster.name).await?;
        let initial =
            existing.as_ref().and_then(InitialView::of).unwrap_or_else(|| InitialView::for_new_cluster(cluster));
        let replicas = existing
            .as_ref()
            .and_then(|s| s.spec.as_ref()?.replicas)
            .map_or(cluster.spec.target.replicas, |r| r.max(0) as u32);
        let sts = build::stateful_set(cluster, replicas, &initial);
        apply(&statefulsets, &sts).await?;
        let template_hash = build::desired_template_hash(&sts).unwrap_or_default().to_owned();
        let pods = Api::namespaced(client.clone(), namespace);
        let claims = Api::namespaced(client.clone(), namespace);
        let probe = tls
            .http_client()
            .timeout(std::time::Duration::from_secs(2))
            .build()
            .expect("an HTTP client with checked TLS settings builds");
        Ok(KubeBackend {
            cluster: cluster.clone(),
            statefulsets,
            pods,
            initial,
            replicas,
            template_hash,
            claims,
            probe,
            tls: tls.clone(),
        })
    }
}

#[async_trait::async_trait]
impl Backend for KubeBackend {
    fn replicas(&self) -> u32 {
        self.replicas
    }

    async fn set_replicas(&mut self, replicas: u32, _target: &Target) -> anyhow::Result<()> {
        apply(&self.statefulsets, &build::stateful_set(&self.cluster, replicas, &self.initial)).await?;
        self.replicas = replicas;
        Ok(())
    }

    async fn pods(&mut self) -> anyhow::Result<Vec<Pod>> {
        let (name, namespace) = (&self.cluster.name, &self.cluster.namespace);
        let list = self.pods.list(&ListParams::default().labels(&build::selector_string(name))).await?;
        let now = k8s_openapi::jiff::Timestamp::now();
        let mut out: Vec<Pod> =
            list.items.iter().filter_map(|p| node_pod(name, namespace, p, &self.template_hash, now)).collect();
        out.sort_by_key(|p| p.ordinal);
        // A pod that runs but is not Ready may be one waiting to join (no view, so `/readyz` says
        // 503): it counts as started only once it serves HTTP, or a view change posted now would
        // find it not listening yet.
        let this = &*self;
        let serving = futures::future::join_all(
            out.iter().map(|p| async move { !p.started || p.ready || this.serves_http(&p.address).await }),
        )
        .await;
        for (pod, serving) in out.iter_mut().zip(serving) {
            pod.started &= serving;
        }
        Ok(out)
    }

    async fn restart_pod(&mut self, ordinal: u32) -> anyhow::Result<()> {
        // With the `OnDelete` strategy the StatefulSet creates it again from the current template,
        // under the same name and on the same volume.
        let pod = format!("{}-{ordinal}", self.cluster.name);
        delete_if_present(&self.pods, &pod).await?;
        Ok(())
    }

    async fn replace_pod(&mut self, ordinal: u32) -> anyhow::Result<()> {
        // The claims first: the StatefulSet re-creates a missing claim (empty, provisioned where
        // the new pod can run) when it re-creates the pod.
        let pod = format!("{}-{ordinal}", self.cluster.name);
        for claim in build::claim_names(&self.cluster.name, ordinal) {
            delete_if_present(&self.claims, &claim).await?;
        }
        delete_if_present(&self.pods, &pod).await?;
        Ok(())
    }
}

impl KubeBackend {
    /// Whether the node at `address` answers `/healthz` (it serves HTTP at all).
    async fn serves_http(&self, address: &str) -> bool {
        let url = self.tls.url(address, "/healthz");
        self.probe.get(url).send().await.is_ok_and(|r| r.status().is_success())
    }
}

async fn delete_if_present<K>(api: &Api<K>, name: &str) -> kube::Result<()>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// A node pod as the planner sees it: identity from its ordinal, address from its IP, ready from
/// its Ready condition (a pod being deleted is not ready), started from its container's state,
/// current from its template hash, unschedulable from its `PodScheduled` condition, and the
/// container's waiting reason as its trouble, terminating from its deletion timestamp.
pub fn node_pod(
    cluster: &str,
    namespace: &str,
    pod: &KubePod,
    template_hash: &str,
    now: k8s_openapi::jiff::Timestamp,
) -> Option<Pod> {
    let ordinal = build::ordinal_of(cluster, &pod.name_any())?;
    let identity = build::identity(cluster, namespace, ordinal);
    let status = pod.status.as_ref();
    let address = status.and_then(|s| s.pod_ip.as_ref()).map_or_else(|| identity.clone(), |ip| format!("{ip}:{PORT}"));
    let alive = pod.metadata.deletion_timestamp.is_none();
    let conditions = status.and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    let ready = alive && conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
    let container = status.and_then(|s| s.container_statuses.as_ref()).and_then(|c| c.first());
    let started = alive && container.is_some_and(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
    let current = pod.annotations().get(build::TEMPLATE_HASH).is_some_and(|h| h == template_hash);
    let unschedulable_for = conditions
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable"))
        .map(|c| {
            let since = c.last_transition_time.as_ref().map_or(now, |t| t.0);
            std::time::Duration::from_millis(u64::try_from(now.as_millisecond() - since.as_millisecond()).unwrap_or(0))
        });
    let trouble = container.and_then(|c| c.state.as_ref()?.waiting.as_ref()).and_then(|w| {
        let reason = w.reason.as_deref()?;
        Some(match w.message.as_deref() {
            Some(m) if !m.is_empty() => format!("{reason}: {m}"),
            _ => reason.to_owned(),
        })
    });
    Some(Pod { ordinal, identity, address, ready, started, current, unschedulable_for, trouble, terminating: !alive })
}

/// The cluster token: read from its Secret, which is created with a fresh random token the first
/// time (and never overwritten, so nodes and operator always agree).
pub async fn ensure_token(client: &Client, cluster: &ValidCluster) -> kube::Result<String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &cluster.namespace);
    let name = build::token_secret_name(&cluster.name);
    if let Some(secret) = secrets.get_opt(&name).await?
        && let Some(token) = read_token(&secret)
    {
        return Ok(token);
    }
    let token = new_token();
    match secrets.create(&PostParams::default(), &build::token_secret(cluster, &token)).await {
        Ok(_) => Ok(token),
        // Created concurrently (another reconcile, a previous operator): use that one.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let secret = secrets.get(&name).await?;
            Ok(read_token(&secret).unwrap_or(token))
        }
        Err(e) => Err(e),
    }
}

fn read_token(secret: &Secret) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(build::TOKEN_KEY)?;
    String::from_utf8(bytes.0.clone()).ok().filter(|t| !t.is_empty())
}

fn new_token() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deletes a cluster's children (owner references let a real cluster's garbage collector do the
/// same; deleting explicitly also works where none runs). Volumes (PVCs) are kept: deleting a
/// cluster never deletes its data. Needs only the cluster's name: a cluster with an invalid spec is
/// cleaned up too.
pub async fn delete_children(client: &Client, namespace: &str, name: &str) -> kube::Result<()> {
    let dp = DeleteParams::background();
    ignore_missing(Api::<StatefulSet>::namespaced(client.clone(), namespace).delete(name, &dp).await)?;
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    ignore_missing(services.delete(name, &dp).await)?;
    ignore_missing(services.delete(&build::headless_name(name), &dp).await)?;
    ignore_missing(Api::<PodDisruptionBudget>::namespaced(client.clone(), namespace).delete(name, &dp).await)?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for secret in [build::token_secret_name(name), build::tls_secret_name(name), build::ca_secret_name(name)] {
        ignore_missing(secrets.delete(&secret, &dp).await)?;
    }
    Ok(())
}

fn ignore_missing<T>(r: kube::Result<T>) -> kube::Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateWaiting, ContainerStatus, PodCondition, PodStatus};

    fn pod(name: &str, ip: Option<&str>, ready: bool) -> KubePod {
        let mut p = KubePod::default();
        p.metadata.name = Some(name.into());
        p.status = Some(PodStatus {
            pod_ip: ip.map(str::to_owned),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        p
    }

    fn now() -> k8s_openapi::jiff::Timestamp {
        "2026-12-03T10:00:00Z".parse().unwrap()
    }

    #[test]
    fn node_pods_have_dns_identities_and_ip_addresses() {
        let p = node_pod("demo", "prod", &pod("demo-3", Some("10.1.2.3"), true), "h1", now()).unwrap();
        assert_eq!(
            (p.ordinal, p.identity.as_str(), p.address.as_str(), p.ready),
            (3, "demo-3.demo-nodes.prod.svc.cluster.local:8080", "10.1.2.3:8080", true)
        );
        let p = node_pod("demo", "prod", &pod("demo-0", None, false), "h1", now()).unwrap();
        assert_eq!((p.address.as_str(), p.ready), ("demo-0.demo-nodes.prod.svc.cluster.local:8080", false));
        assert_eq!(node_pod("demo", "prod", &pod("other-0", None, true), "h1", now()), None);
        let tokens = (new_token(), new_token());
        assert_eq!(tokens.0.len(), 64);
        assert_ne!(tokens.0, tokens.1);
    }

    #[test]
    fn a_pod_reports_its_template_its_container_and_whether_it_can_be_scheduled() {
        let mut p = pod("demo-2", Some("10.1.2.3"), false);
        p.metadata.annotations = Some([(build::TEMPLATE_HASH.to_owned(), "old".to_owned())].into());
        let status = p.status.as_mut().unwrap();
        status.conditions.as_mut().unwrap().push(PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            last_transition_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-12-03T09:59:00Z".parse().unwrap(),
            )),
            ..Default::default()
        });
        status.container_statuses = Some(vec![ContainerStatus {
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ImagePullBackOff".into()),
                    message: Some("no such image".into()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]);
        let seen = node_pod("demo", "prod", &p, "new", now()).unwrap();
        assert!(!seen.current && !seen.started);
        assert_eq!(seen.unschedulable_for, Some(std::time::Duration::from_secs(60)));
        assert_eq!(seen.trouble.as_deref(), Some("ImagePullBackOff: no such image"));
        assert!(node_pod("demo", "prod", &p, "old", now()).unwrap().current);
    }
}
