//! The children of a `KVStoreCluster`, built as plain objects (pure: no client) from the validated
//! cluster ([`ValidCluster`], never the raw spec): the StatefulSet of node pods, the headless
//! Service that gives them stable names, the client Service, the PodDisruptionBudget and the token
//! Secret. "Where is the StatefulSet built?" has one answer: here.
//!
//! Node identity: pod `<cluster>-<ordinal>` serves as
//! `<cluster>-<ordinal>.<cluster>-nodes.<namespace>.svc.cluster.local:8080` (the headless
//! Service's stable DNS name), so a restarted pod keeps its identity and its volume. A pod that is
//! not in `VIEW` (one added by scaling out) starts without a view and waits to be added.
//!
//! The pod template carries the cluster's *initial* view (`VIEW`, `K`) and never a later one: a
//! template change restarts every pod, and the nodes keep their current view in their data
//! directory anyway. So the template is built from the [`InitialView`] read back from the existing
//! StatefulSet, and only changes when the user changes the image, resources or scheduling.
//!
//! Without cluster DNS (a test control plane) the same identities work when something provides the
//! name → address mapping: the node's `KVS_HOSTS_FILE` (see `kvs_node::hosts`).

use super::validate::ValidCluster;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, Secret, SecretKeySelector, SecretVolumeSource, SecurityContext, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

/// The port every node serves on.
pub const PORT: i32 = 8080;

/// The user the node image runs as (`node/Dockerfile`: distroless `nonroot`).
pub const NODE_UID: i64 = 65532;

/// Labels on every child; the selector uses the first two.
pub fn labels(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "kvstore".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), cluster.to_owned()),
        ("app.kubernetes.io/managed-by".to_owned(), "kvs-operator".to_owned()),
    ])
}

/// The selector of a cluster's node pods, as a label-selector string (status.selector).
pub fn selector_string(cluster: &str) -> String {
    format!("app.kubernetes.io/instance={cluster},app.kubernetes.io/name=kvstore")
}

fn selector_labels(cluster: &str) -> BTreeMap<String, String> {
    labels(cluster).into_iter().filter(|(k, _)| k != "app.kubernetes.io/managed-by").collect()
}

/// Name of the headless Service (stable pod names).
pub fn headless_name(cluster: &str) -> String {
    format!("{cluster}-nodes")
}

/// Name of the Secret holding the cluster's internal auth token.
pub fn token_secret_name(cluster: &str) -> String {
    format!("{cluster}-token")
}

/// The key of the token in that Secret.
pub const TOKEN_KEY: &str = "token";

/// Name of the Secret holding the cluster CA (certificate and key; `spec.tls`).
pub fn ca_secret_name(cluster: &str) -> String {
    format!("{cluster}-tls-ca")
}

/// Name of the Secret holding the pods' certificates and the CA certificate, mounted by every pod.
pub fn tls_secret_name(cluster: &str) -> String {
    format!("{cluster}-tls")
}

/// Where the pods' certificates are mounted, and the user's auth file.
pub const TLS_DIR: &str = "/etc/kvstore/tls";
pub const AUTH_DIR: &str = "/etc/kvstore/auth";

/// A Secret of the cluster's with the given contents (PEM text by key).
pub fn secret(c: &ValidCluster, name: String, contents: &BTreeMap<String, String>) -> Secret {
    Secret {
        metadata: meta(c, name),
        data: Some(contents.iter().map(|(k, v)| (k.clone(), k8s_openapi::ByteString(v.as_bytes().to_vec()))).collect()),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// Every name pod `ordinal` of cluster `c` answers to (its certificate's names).
pub fn pod_names(c: &ValidCluster, ordinal: u32) -> Vec<String> {
    super::certs::pod_names(&c.name, &c.namespace, &headless_name(&c.name), ordinal)
}

/// The pods that need a certificate, with their names: every pod the StatefulSet has (`running`)
/// or the spec asks for, so a scale-out's pods find theirs when they start.
pub fn certified_pods(c: &ValidCluster, running: u32) -> Vec<(String, Vec<String>)> {
    let pods = c.spec.target.replicas.max(running);
    (0..pods).map(|o| (format!("{}-{o}", c.name), pod_names(c, o))).collect()
}

/// The Secret with the cluster token (created once; the token is never rotated by the operator).
pub fn token_secret(c: &ValidCluster, token: &str) -> Secret {
    Secret {
        metadata: meta(c, token_secret_name(&c.name)),
        string_data: Some(BTreeMap::from([(TOKEN_KEY.to_owned(), token.to_owned())])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// The view the pods start with (the pod template's `VIEW` and `K`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitialView {
    pub members: Vec<String>,
    pub replication_factor: u32,
}

impl InitialView {
    /// A new cluster's first view: every pod of the spec, at the spec's K.
    pub fn for_new_cluster(c: &ValidCluster) -> Self {
        let target = c.spec.target;
        let members = (0..target.replicas).map(|o| identity(&c.name, &c.namespace, o)).collect();
        InitialView { members, replication_factor: target.replication_factor }
    }

    /// The initial view an existing StatefulSet was built with (`None` if it has no such env).
    pub fn of(sts: &StatefulSet) -> Option<Self> {
        let env = sts.spec.as_ref()?.template.spec.as_ref()?.containers.first()?.env.as_ref()?;
        let value = |name: &str| env.iter().find(|e| e.name == name).and_then(|e| e.value.clone());
        let members = value("VIEW")?.split(',').filter(|m| !m.is_empty()).map(str::to_owned).collect();
        let replication_factor = value("K")?.parse().ok()?;
        Some(InitialView { members, replication_factor })
    }
}

/// The ordinal of a node pod named `<cluster>-<ordinal>`.
pub fn ordinal_of(cluster: &str, pod_name: &str) -> Option<u32> {
    pod_name.strip_prefix(cluster)?.strip_prefix('-')?.parse().ok()
}

/// The node identity of pod `ordinal`.
pub fn identity(cluster: &str, namespace: &str, ordinal: u32) -> String {
    format!("{cluster}-{ordinal}.{}.{namespace}.svc.cluster.local:{PORT}", headless_name(cluster))
}

fn meta(c: &ValidCluster, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(c.namespace.clone()),
        labels: Some(labels(&c.name)),
        owner_references: c.owner.clone().map(|r| vec![r]),
        ..Default::default()
    }
}

fn port() -> ServicePort {
    ServicePort {
        name: Some("http".into()),
        port: PORT,
        target_port: Some(IntOrString::Int(PORT)),
        ..Default::default()
    }
}

/// Headless Service: gives every pod a stable DNS name, ready or not (nodes must reach a pod that
/// is joining before it is a member).
pub fn headless_service(c: &ValidCluster) -> Service {
    Service {
        metadata: meta(c, headless_name(&c.name)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&c.name)),
            ports: Some(vec![port()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Client Service: any node answers any request.
pub fn client_service(c: &ValidCluster) -> Service {
    Service {
        metadata: meta(c, c.name.clone()),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(&c.name)),
            ports: Some(vec![port()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// At most one node pod voluntarily disrupted at a time.
pub fn disruption_budget(c: &ValidCluster) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(c, c.name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector { match_labels: Some(selector_labels(&c.name)), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The default affinity: a cluster's pods prefer to run on different nodes, so that losing one
/// machine rarely takes more than one replica of a partition.
fn spread_over_nodes(cluster: &str) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: PodAffinityTerm {
                    label_selector: Some(LabelSelector {
                        match_labels: Some(selector_labels(cluster)),
                        ..Default::default()
                    }),
                    topology_key: "kubernetes.io/hostname".into(),
                    ..Default::default()
                },
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..Default::default() }
}

fn probe(path: &str, period_seconds: i32, timeout_seconds: i32, tls: bool) -> Probe {
    // Over TLS the kubelet does not verify the certificate (as for any HTTPS probe) and presents
    // none: hence `--tls-client-auth optional`; the probe routes need no token.
    let scheme = tls.then(|| "HTTPS".to_owned());
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(PORT),
            scheme,
            ..Default::default()
        }),
        period_seconds: Some(period_seconds),
        timeout_seconds: Some(timeout_seconds),
        ..Default::default()
    }
}

/// A node pod's grace period after SIGTERM beyond its drain (`spec.shutdownDelaySeconds`): time to
/// finish in-flight writes.
const GRACE_AFTER_DRAIN_SECONDS: i64 = 30;

/// The StatefulSet of node pods with `replicas` pods; `initial` is the first view (the pods listed
/// in it start as members; later ones wait to be added).
pub fn stateful_set(c: &ValidCluster, replicas: u32, initial: &InitialView) -> StatefulSet {
    let (name, ns, spec) = (&c.name, &c.namespace, &c.spec);
    let mut env_vars = vec![
        EnvVar {
            name: "POD_NAME".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector { field_path: "metadata.name".into(), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        },
        env("IPPORT", format!("$(POD_NAME).{}.{ns}.svc.cluster.local:{PORT}", headless_name(name))),
        env("LISTEN", format!("0.0.0.0:{PORT}")),
        env("K", initial.replication_factor.to_string()),
        env("VIEW", initial.members.join(",")),
        env("KVS_DATA_DIR", "/data"),
        // On SIGTERM a node keeps serving, not ready, until its endpoint is gone.
        env("KVS_SHUTDOWN_DELAY_MS", spec.shutdown_delay.as_millis().to_string()),
        EnvVar {
            name: "KVS_CLUSTER_TOKEN".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: token_secret_name(name),
                    key: TOKEN_KEY.into(),
                    optional: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    if let Some(max) = spec.max_value_bytes {
        env_vars.push(env("KVS_MAX_VALUE_BYTES", max.to_string()));
    }
    let mut mounts = vec![VolumeMount { name: "data".into(), mount_path: "/data".into(), ..Default::default() }];
    let mut volumes = Vec::new();
    let secret_volume = |volume: &str, secret: String| Volume {
        name: volume.into(),
        // Readable by the node's group (fsGroup) only.
        secret: Some(SecretVolumeSource { secret_name: Some(secret), default_mode: Some(0o440), ..Default::default() }),
        ..Default::default()
    };
    let read_only = |volume: &str, path: &str| VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    };
    if spec.tls {
        // Each pod picks its own files out of the Secret by its name.
        let (cert, key) = super::certs::pod_keys("$(POD_NAME)");
        env_vars.push(env("KVS_TLS_CERT_FILE", format!("{TLS_DIR}/{cert}")));
        env_vars.push(env("KVS_TLS_KEY_FILE", format!("{TLS_DIR}/{key}")));
        env_vars.push(env("KVS_TLS_CA_FILE", format!("{TLS_DIR}/{}", super::certs::CA_CERT_KEY)));
        // Clients may present a certificate; the kubelet's probes present none.
        env_vars.push(env("KVS_TLS_CLIENT_AUTH", "optional"));
        volumes.push(secret_volume("tls", tls_secret_name(name)));
        mounts.push(read_only("tls", TLS_DIR));
    }
    if let Some(auth) = &spec.auth {
        env_vars.push(env("KVS_AUTH_FILE", format!("{AUTH_DIR}/{}", auth.key)));
        volumes.push(secret_volume("auth", auth.secret.clone()));
        mounts.push(read_only("auth", AUTH_DIR));
    }
    let tls = spec.tls;
    let container = Container {
        name: "kvs-node".into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.clone(),
        resources: spec.resources.clone(),
        ports: Some(vec![
            ContainerPort { name: Some("http".into()), container_port: PORT, ..Default::default() },
            // The failure detector's heartbeats: UDP on the same port, between nodes only.
            ContainerPort {
                name: Some("heartbeat".into()),
                container_port: PORT,
                protocol: Some("UDP".into()),
                ..Default::default()
            },
        ]),
        env: Some(env_vars),
        // Ready = caught up: the node holds its partition's data (`/readyz`; see the node's
        // `catch_up`). A pod that is joining has no view and is never ready; the operator adds it
        // once it runs (`rebalance::plan`), and it becomes ready after its first sync.
        readiness_probe: Some(probe("/readyz", 2, 1, tls)),
        // Alive = serving HTTP at all. Slowness is not death: a node busy under load gets 5 s per
        // probe and three misses (30 s) before the kubelet restarts it.
        liveness_probe: Some(Probe { failure_threshold: Some(3), ..probe("/healthz", 10, 5, tls) }),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta { name: Some("data".into()), ..Default::default() },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: spec.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), Quantity(spec.storage_size.clone()))])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut template = PodTemplateSpec {
        metadata: Some(ObjectMeta { labels: Some(labels(name)), ..Default::default() }),
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: (!volumes.is_empty()).then_some(volumes),
            node_selector: spec.node_selector.clone(),
            tolerations: spec.tolerations.clone(),
            affinity: Some(spec.affinity.clone().unwrap_or_else(|| spread_over_nodes(name))),
            // The node image's non-root user; fsGroup makes the data volume writable to it.
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(NODE_UID),
                run_as_group: Some(NODE_UID),
                fs_group: Some(NODE_UID),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
                ..Default::default()
            }),
            // A node drains and then finishes in-flight writes on SIGTERM; give it time for both.
            termination_grace_period_seconds: Some(
                i64::try_from(spec.shutdown_delay.as_secs())
                    .unwrap_or(i64::MAX)
                    .saturating_add(GRACE_AFTER_DRAIN_SECONDS),
            ),
            ..Default::default()
        }),
    };
    let hash = template_hash(&template);
    if let Some(meta) = template.metadata.as_mut() {
        meta.annotations = Some(BTreeMap::from([(TEMPLATE_HASH.to_owned(), hash)]));
    }
    StatefulSet {
        metadata: meta(c, name.clone()),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas as i32),
            service_name: Some(headless_name(name)),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector { match_labels: Some(selector_labels(name)), ..Default::default() },
            template,
            // The operator rolls the pods itself, one at a time and only when the restarted one
            // has caught up (`rebalance::plan`): the StatefulSet never restarts a pod on its own.
            update_strategy: Some(StatefulSetUpdateStrategy { type_: Some("OnDelete".into()), rolling_update: None }),
            volume_claim_templates: Some(vec![claim]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The volume claims of pod `<cluster>-<ordinal>` (`<claim template>-<pod>`, as the StatefulSet
/// names them).
pub fn claim_names(cluster: &str, ordinal: u32) -> Vec<String> {
    vec![format!("data-{cluster}-{ordinal}")]
}

/// The pod-template annotation that names the template a pod was made from.
pub const TEMPLATE_HASH: &str = "kvstore.dev/template-hash";

/// A short, stable fingerprint of a pod template (SHA-1 of its JSON; maps serialize in key order).
/// A pod whose [`TEMPLATE_HASH`] differs from the StatefulSet's runs an old template.
pub fn template_hash(template: &PodTemplateSpec) -> String {
    use sha1::{Digest, Sha1};
    let json = serde_json::to_vec(template).unwrap_or_default();
    Sha1::digest(&json).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The template hash a StatefulSet's pods should carry.
pub fn desired_template_hash(sts: &StatefulSet) -> Option<&str> {
    sts.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref()?.get(TEMPLATE_HASH).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::validate::validate_cluster;
    use crate::crd::{KVStoreCluster, KVStoreClusterSpec};

    fn cluster() -> ValidCluster {
        let mut c = KVStoreCluster::new(
            "demo",
            KVStoreClusterSpec { image: "kvs:1".into(), max_value_bytes: Some(2048), ..KVStoreClusterSpec::new(4, 2) },
        );
        c.metadata.namespace = Some("prod".into());
        c.metadata.uid = Some("uid-1".into());
        validate_cluster(&c).unwrap()
    }

    #[test]
    fn statefulset_runs_nodes_with_stable_identities_and_volumes() {
        let c = cluster();
        let initial = InitialView::for_new_cluster(&c);
        let view: Vec<String> = (0..4).map(|o| identity("demo", "prod", o)).collect();
        assert_eq!(initial.members, view);
        let sts = stateful_set(&c, 4, &initial);
        // The initial view reads back from the StatefulSet: later reconciles keep the template.
        assert_eq!(InitialView::of(&sts), Some(initial.clone()));
        assert_eq!(ordinal_of("demo", "demo-12"), Some(12));
        assert_eq!(ordinal_of("demo", "demox-1"), None);
        let spec = sts.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(4));
        assert_eq!(spec.service_name.as_deref(), Some("demo-nodes"));
        let container = &spec.template.spec.as_ref().unwrap().containers[0];
        let env: BTreeMap<_, _> = container
            .env
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
            .collect();
        assert_eq!(env["IPPORT"], "$(POD_NAME).demo-nodes.prod.svc.cluster.local:8080");
        assert_eq!(env["K"], "2");
        assert_eq!(env["VIEW"], view.join(","));
        assert_eq!(env["KVS_MAX_VALUE_BYTES"], "2048");
        let token = container.env.as_ref().unwrap().iter().find(|e| e.name == "KVS_CLUSTER_TOKEN").unwrap();
        assert_eq!(token.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap().name, "demo-token");
        assert_eq!(identity("demo", "prod", 0), "demo-0.demo-nodes.prod.svc.cluster.local:8080");
        let anti = spec.template.spec.as_ref().unwrap().affinity.as_ref().unwrap().pod_anti_affinity.as_ref().unwrap();
        let term = &anti.preferred_during_scheduling_ignored_during_execution.as_ref().unwrap()[0].pod_affinity_term;
        assert_eq!(
            (term.topology_key.as_str(), term.label_selector.as_ref().unwrap().match_labels.as_ref()),
            ("kubernetes.io/hostname", spec.selector.match_labels.as_ref())
        );
        let pod_security = spec.template.spec.as_ref().unwrap().security_context.as_ref().unwrap();
        assert_eq!(
            (pod_security.run_as_non_root, pod_security.fs_group),
            (Some(true), Some(NODE_UID)),
            "the volume is writable to the node"
        );
        assert_eq!(
            container.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(),
            Some("/readyz")
        );
        let claim = &spec.volume_claim_templates.as_ref().unwrap()[0];
        assert_eq!(
            claim.spec.as_ref().unwrap().resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0,
            "1Gi"
        );
        // Selector matches the pod labels; every child is owned by the cluster.
        let selector = spec.selector.match_labels.as_ref().unwrap();
        let pod_labels = spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
        let owner = &sts.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("KVStoreCluster", "uid-1", Some(true))
        );
    }

    #[test]
    fn the_pod_template_takes_the_validated_spec() {
        let mut c = cluster();
        c.spec.image_pull_policy = Some("Never".into());
        c.spec.node_selector = Some(BTreeMap::from([("disk".to_owned(), "ssd".to_owned())]));
        c.spec.affinity = Some(Affinity::default());
        c.spec.storage_class_name = Some("fast".into());
        c.spec.storage_size = "5Gi".into();
        c.spec.shutdown_delay = std::time::Duration::from_secs(12);
        let sts = stateful_set(&c, 4, &InitialView::for_new_cluster(&c));
        let spec = sts.spec.unwrap();
        let pod = spec.template.spec.unwrap();
        let container = &pod.containers[0];
        let delay = container.env.iter().flatten().find(|e| e.name == "KVS_SHUTDOWN_DELAY_MS");
        assert_eq!(delay.and_then(|e| e.value.as_deref()), Some("12000"), "the node drains as the spec says");
        assert_eq!(pod.termination_grace_period_seconds, Some(42), "the grace period covers the drain and 30 s");
        assert_eq!(
            (container.image.as_deref(), container.image_pull_policy.as_deref()),
            (Some("kvs:1"), Some("Never"))
        );
        assert_eq!(pod.node_selector, c.spec.node_selector);
        assert_eq!(pod.affinity, Some(Affinity::default()), "a given affinity replaces the default spread");
        let claim = spec.volume_claim_templates.unwrap().remove(0).spec.unwrap();
        assert_eq!(claim.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(claim.resources.unwrap().requests.unwrap()["storage"].0, "5Gi");
    }

    #[test]
    fn tls_and_auth_mount_their_secrets_and_set_the_node_flags() {
        use crate::controller::validate::AuthFile;
        let plain = stateful_set(&cluster(), 4, &InitialView::for_new_cluster(&cluster()));
        let plain_pod = plain.spec.unwrap().template.spec.unwrap();
        assert_eq!(plain_pod.volumes, None, "no TLS, no auth: nothing mounted but the data volume");

        let mut c = cluster();
        c.spec.tls = true;
        c.spec.auth = Some(AuthFile { secret: "demo-auth".into(), key: "tokens.yaml".into() });
        let sts = stateful_set(&c, 4, &InitialView::for_new_cluster(&c));
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let container = &pod.containers[0];
        let env: BTreeMap<_, _> =
            container.env.iter().flatten().filter_map(|e| Some((e.name.as_str(), e.value.clone()?))).collect();
        assert_eq!(env["KVS_TLS_CERT_FILE"], "/etc/kvstore/tls/$(POD_NAME).crt");
        assert_eq!(env["KVS_TLS_KEY_FILE"], "/etc/kvstore/tls/$(POD_NAME).key");
        assert_eq!(env["KVS_TLS_CA_FILE"], "/etc/kvstore/tls/ca.crt");
        assert_eq!(env["KVS_TLS_CLIENT_AUTH"], "optional");
        assert_eq!(env["KVS_AUTH_FILE"], "/etc/kvstore/auth/tokens.yaml");
        let volumes: BTreeMap<_, _> = pod
            .volumes
            .iter()
            .flatten()
            .map(|v| (v.name.as_str(), v.secret.as_ref().unwrap().secret_name.clone().unwrap()))
            .collect();
        assert_eq!(volumes, BTreeMap::from([("tls", "demo-tls".to_owned()), ("auth", "demo-auth".to_owned())]));
        let mounts: Vec<_> =
            container.volume_mounts.iter().flatten().map(|m| (m.mount_path.as_str(), m.read_only)).collect();
        assert_eq!(mounts, vec![("/data", None), (TLS_DIR, Some(true)), (AUTH_DIR, Some(true))]);
        for probe in [&container.readiness_probe, &container.liveness_probe] {
            assert_eq!(probe.as_ref().unwrap().http_get.as_ref().unwrap().scheme.as_deref(), Some("HTTPS"));
        }
        // The pods' certificates name every way the pod is reached.
        let names = pod_names(&c, 3);
        for name in ["demo-3.demo-nodes.prod.svc.cluster.local", "demo-3.demo-nodes", "demo.prod.svc", "localhost"] {
            assert!(names.contains(&name.to_owned()), "{name} in {names:?}");
        }
        assert_eq!((ca_secret_name("demo"), tls_secret_name("demo")), ("demo-tls-ca".into(), "demo-tls".into()));
        // Every pod there is or will be has a certificate: the larger of the spec and the set.
        let pods = |running| certified_pods(&c, running).into_iter().map(|(pod, _)| pod).collect::<Vec<_>>();
        assert_eq!(pods(2), ["demo-0", "demo-1", "demo-2", "demo-3"], "the spec's 4 while the set has 2");
        assert_eq!(pods(5).len(), 5, "a pod still leaving keeps its certificate");
        assert_eq!(certified_pods(&c, 0)[1].1, pod_names(&c, 1));
    }

    #[test]
    fn services_and_budget_select_the_node_pods() {
        let c = cluster();
        let headless = headless_service(&c);
        let hs = headless.spec.as_ref().unwrap();
        assert_eq!((hs.cluster_ip.as_deref(), hs.publish_not_ready_addresses), (Some("None"), Some(true)));
        let client = client_service(&c);
        assert_eq!(client.spec.as_ref().unwrap().selector, hs.selector);
        let pdb = disruption_budget(&c);
        assert_eq!(pdb.spec.as_ref().unwrap().max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(selector_string("demo"), "app.kubernetes.io/instance=demo,app.kubernetes.io/name=kvstore");
    }
}
