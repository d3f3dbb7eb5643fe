//! The custom resources (group `kvstore.dev`, version `v1alpha1`): `KVStoreCluster` (short name
//! `kvsc`) here, the backup resources in [`backup`]. Every field's doc comment becomes its
//! description in the CRD (`kubectl explain`); [`definitions`] lists every CRD with the file
//! `crdgen` writes it to.

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

mod backup;
pub use backup::*;

/// A kvstore cluster: `replicas` nodes, cut into partitions of `replicationFactor` replicas.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kvstore.dev",
    version = "v1alpha1",
    kind = "KVStoreCluster",
    namespaced,
    shortname = "kvsc",
    status = "KVStoreClusterStatus",
    scale = r#"{"specReplicasPath":".spec.replicas","statusReplicasPath":".status.readyReplicas","labelSelectorPath":".status.selector"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"RF","type":"integer","jsonPath":".spec.replicationFactor"}"#,
    printcolumn = r#"{"name":"Partitions","type":"integer","jsonPath":".status.partitions"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Rebalance","type":"string","jsonPath":".status.rebalance.progress"}"#,
    printcolumn = r#"{"name":"Blocked By","type":"string","jsonPath":".status.blockedBy"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.replicas >= 1", "message": "replicas must be at least 1"},
    {"rule": "self.replicationFactor >= 1", "message": "replicationFactor must be at least 1"},
    {"rule": "self.image.size() > 0", "message": "image must name a container image"},
    {"rule": "(has(self.tls) && self.tls.enabled) == (has(oldSelf.tls) && oldSelf.tls.enabled)",
     "message": "tls.enabled cannot change after creation: nodes with and without TLS cannot talk to each other during a roll; create a new cluster (from a backup) instead"},
]))]
pub struct KVStoreClusterSpec {
    /// Number of kvstore nodes (pods). Partitions = floor(replicas / replicationFactor); the
    /// remainder proxy requests and store nothing.
    #[schemars(range(min = 1))]
    pub replicas: i32,
    /// Replicas per partition (K): every key is stored on this many nodes.
    #[serde(default = "default_replication_factor")]
    #[schemars(range(min = 1))]
    pub replication_factor: i32,
    /// Container image of the kvstore node. Changing it (or any other pod template field) rolls
    /// the pods: the operator restarts one pod at a time, highest ordinal first, and the next only
    /// once the restarted one is ready, i.e. caught up with its partition. A pod whose new version
    /// does not become ready halts the roll (condition `Stalled`). A restarted pod keeps its
    /// identity and its data.
    #[serde(default = "default_image")]
    pub image: String,
    /// When to pull the image (`Always`, `IfNotPresent`, `Never`); the Kubernetes default when
    /// unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Always", "IfNotPresent", "Never"]))]
    pub image_pull_policy: Option<String>,
    /// CPU and memory requests and limits of each node container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels the pods must be scheduled on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Scheduling constraints of the pods. Unset: the pods of a cluster prefer different nodes
    /// (so the replicas of a partition rarely share a machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Storage for each node's data (one PersistentVolumeClaim per pod). Fixed at creation:
    /// a StatefulSet's volume claims cannot change.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "storage cannot be changed after creation (the StatefulSet's volume claims are immutable)"},
    ]))]
    pub storage: StorageSpec,
    /// Largest value a client may store, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_value_bytes: Option<i64>,
    /// Stop every action on the cluster (no view changes, no pod changes) until set back to false;
    /// the status says what would be done. A view change already moving data finishes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Seconds the cluster may wait on the same thing (a pod to become ready, a view change to move
    /// data) before the `Stalled` condition says what blocks it; also how long a pod must stay
    /// unschedulable before it is replaced.
    #[serde(default = "default_progress_deadline_seconds")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: i32,
    /// Seconds a node pod keeps serving after it is told to stop, while it reports not ready:
    /// Kubernetes removes a stopping pod from the Service at the same time as it signals it, and
    /// clients keep sending until that removal reaches them; the node answers those requests,
    /// closing each client connection after its answer, instead of cutting them off. Then it
    /// finishes what is in flight (the pod's grace period is this plus 30 s). 0 stops at once.
    #[serde(default = "default_shutdown_delay_seconds")]
    #[schemars(range(min = 0, max = 600))]
    pub shutdown_delay_seconds: i32,
    /// Replace a member whose pod stays unschedulable (its machine or volume is gone) for
    /// `progressDeadlineSeconds`: its volume claim and pod are deleted, and the new pod, under the
    /// same identity on a fresh volume, re-syncs from its partition before it reports ready. Only
    /// when the partition's other replicas are ready and in sync, one member at a time. When false,
    /// the `Stalled` condition says which pod to replace by hand.
    #[serde(default = "default_true")]
    pub auto_replace: bool,
    /// Load a backup into the cluster once it first runs (a new cluster from a backup): the
    /// operator restores it when every pod is ready, and the cluster becomes `Available` only when
    /// every key of the backup is in place (`status.restore`). A cluster that already holds keys
    /// is refused unless `overwrite` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<RestoreSource>,
    /// TLS for clients and between nodes: the operator makes a CA for the cluster (Secret
    /// `<cluster>-tls-ca`; give its `ca.crt` to clients) and a certificate for every pod (Secret
    /// `<cluster>-tls`), renews them before they expire, and talks to the nodes over TLS itself.
    /// `enabled` is fixed at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Client authentication: bearer tokens with roles, from a Secret the user keeps (see
    /// `docs/security.md` for its format). Without it any client that reaches a node may read and
    /// write. The operator itself uses the cluster token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
}

/// `spec.tls`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Serve clients and peers over TLS only (plain HTTP is refused with a message saying so).
    #[serde(default)]
    pub enabled: bool,
}

/// `spec.auth`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// The Secret (in the cluster's namespace) holding the auth file: named tokens, each with a
    /// role (`read`, `write` or `admin`) and optional key prefixes. Changing its contents takes
    /// effect within a minute or so, without a restart (the nodes re-read the mounted file).
    pub secret_name: String,
    /// The key of the auth file in that Secret.
    #[serde(default = "default_auth_key")]
    pub key: String,
}

fn default_auth_key() -> String {
    "auth.yaml".into()
}

impl KVStoreClusterSpec {
    /// A spec of `replicas` nodes at `replication_factor` with every other field at its default
    /// (what a manifest that sets only those two fields gets).
    pub fn new(replicas: i32, replication_factor: i32) -> Self {
        KVStoreClusterSpec {
            replicas,
            replication_factor,
            image: default_image(),
            image_pull_policy: None,
            resources: None,
            node_selector: None,
            tolerations: None,
            affinity: None,
            storage: StorageSpec::default(),
            max_value_bytes: None,
            paused: false,
            progress_deadline_seconds: default_progress_deadline_seconds(),
            shutdown_delay_seconds: default_shutdown_delay_seconds(),
            auto_replace: true,
            restore_from: None,
            tls: None,
            auth: None,
        }
    }
}

fn default_replication_factor() -> i32 {
    2
}

fn default_progress_deadline_seconds() -> i32 {
    600
}

fn default_shutdown_delay_seconds() -> i32 {
    5
}

fn default_true() -> bool {
    true
}

fn default_image() -> String {
    "kvstore/kvs-node:0.1.0".into()
}

/// Per-node persistent storage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each node's volume, a Kubernetes quantity such as `1Gi` or `500Mi`.
    #[serde(default = "default_size")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "isQuantity(self)", "message": "size must be a Kubernetes quantity such as 1Gi or 500Mi"},
    ]))]
    pub size: String,
    /// StorageClass of the volumes; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

fn default_size() -> String {
    "1Gi".into()
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec { size: default_size(), storage_class_name: None }
    }
}

/// What the operator observed and did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KVStoreClusterStatus {
    /// The `metadata.generation` of the spec this status describes.
    #[serde(default)]
    pub observed_generation: i64,
    /// `Pending` (no view yet), `Running` (matches the spec), `Rebalancing` (pods or data are
    /// moving towards the spec), `Degraded` (serving, but with fewer copies or pods than asked),
    /// `Failed` (the spec cannot be acted on; see the Degraded condition) or `Paused`
    /// (`spec.paused`).
    #[serde(default)]
    pub phase: kvs_api::ClusterPhase,
    /// `Available`, `Progressing`, `Degraded` and `Stalled`, each with a reason and a message.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Node pods that are Ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Partitions in the current view.
    #[serde(default)]
    pub partitions: i32,
    /// Nodes in the current view that proxy (store nothing).
    #[serde(default)]
    pub proxies: i32,
    /// Epoch of the view the nodes run.
    #[serde(default)]
    pub view_epoch: i64,
    /// Members of the current view (`host:port` identities).
    #[serde(default)]
    pub members: Vec<String>,
    /// The view change under way, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<RebalanceStatus>,
    /// Label selector of the node pods (for the scale subresource).
    #[serde(default)]
    pub selector: String,
    /// Node pods that run the current pod template (the rest are rolled one at a time).
    #[serde(default)]
    pub updated_replicas: i32,
    /// What the cluster waits on (a pod to become ready, a view change to move data), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// Since when it waits on exactly that (RFC 3339); `Stalled` once longer than
    /// `spec.progressDeadlineSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<String>,
    /// While `Stalled`: the objects that block, as `kubectl` names them (`pod/demo-3`,
    /// `viewchange/epoch-5`, `statefulset`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<String>,
    /// Before a change that leaves fewer partitions (a scale-in, a higher replicationFactor): what
    /// each node would hold, and whether that fits the pods' volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_plan: Option<CapacityPlanStatus>,
    /// The restore asked for by `spec.restoreFrom`, if any: where it stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreStatus>,
}

/// What a change would make each node hold (see `docs/operations.md`, "Capacity").
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CapacityPlanStatus {
    /// Nodes and replicationFactor of the change.
    pub members: i64,
    pub replication_factor: i64,
    /// Partitions after the change, and the nodes that hold one (the rest proxy).
    pub partitions: i64,
    pub storing_nodes: i64,
    /// Distinct live keys in the cluster now, and their key and value bytes.
    pub total_keys: i64,
    pub total_bytes: i64,
    /// What the fullest storing node would hold.
    pub per_node_keys: i64,
    pub per_node_bytes: i64,
    /// The volume that needs (data, B-tree and log), and each pod's volume.
    pub needed_bytes: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_bytes: Option<i64>,
    /// Whether it fits; a change that does not is refused.
    pub fits: bool,
    /// The same in words.
    pub summary: String,
}

/// A view change in progress, as the nodes report it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceStatus {
    /// The epoch the cluster is moving to.
    pub epoch: i64,
    /// The protocol step the driving node reports: `preparing`, `beginning`, `transferring`,
    /// `committing`, `pruning`, then `done` or `failed` (`idle` before any change).
    pub phase: kvs_api::RebalancePhase,
    /// Keys copied to their new owners so far.
    pub moved_keys: i64,
    /// Keys that have to move.
    pub total_keys: i64,
    /// Human summary for `kubectl get`, e.g. `transfer 41% (4100/10000 keys)`.
    pub progress: String,
}

/// One aspect of the cluster's state (the usual Kubernetes condition shape).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Available`, `Progressing`, `Degraded` or `Stalled`.
    #[serde(rename = "type")]
    pub type_: kvs_api::ConditionType,
    /// `True`, `False` or `Unknown`.
    pub status: kvs_api::ConditionStatus,
    /// Machine-readable cause in CamelCase.
    pub reason: String,
    /// What is going on, for people.
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The generation the condition was computed for.
    #[serde(default)]
    pub observed_generation: i64,
}

/// Every CRD of the project, with the name of the file it is checked in as (under `crds/` and the
/// chart's `files/`).
pub fn definitions() -> Vec<(&'static str, CustomResourceDefinition)> {
    use kube::CustomResourceExt;
    vec![
        ("kvstorecluster.yaml", KVStoreCluster::crd()),
        ("kvstorebackup.yaml", KVStoreBackup::crd()),
        ("kvstorebackupschedule.yaml", KVStoreBackupSchedule::crd()),
    ]
}
