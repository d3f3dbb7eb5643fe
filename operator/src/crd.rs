//! The `KVStoreCluster` custom resource (group `kvstore.dev`, version `v1alpha1`, short name
//! `kvsc`). Every field's doc comment becomes its description in the CRD (`kubectl explain`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct KVStoreClusterSpec {
    /// Number of kvstore nodes (pods). Partitions = floor(replicas / replicationFactor); the
    /// remainder proxy requests and store nothing.
    #[schemars(range(min = 1))]
    pub replicas: i32,
    /// Replicas per partition (K): every key is stored on this many nodes.
    #[serde(default = "default_replication_factor")]
    #[schemars(range(min = 1))]
    pub replication_factor: i32,
    /// Container image of the kvstore node.
    #[serde(default = "default_image")]
    pub image: String,
    /// Storage for each node's data (one PersistentVolumeClaim per pod).
    #[serde(default)]
    pub storage: StorageSpec,
    /// Largest value a client may store, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_value_bytes: Option<i64>,
}

fn default_replication_factor() -> i32 {
    2
}

fn default_image() -> String {
    "kvstore/kvs-node:0.1.0".into()
}

/// Per-node persistent storage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each node's volume, e.g. `1Gi`.
    #[serde(default = "default_size")]
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
    /// The spec generation this status describes.
    #[serde(default)]
    pub observed_generation: i64,
    /// `Pending`, `Running`, `Rebalancing`, `Degraded` or `Failed`.
    #[serde(default)]
    pub phase: String,
    /// Pods that are Ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Partitions in the current view.
    #[serde(default)]
    pub partitions: i32,
    /// Nodes that proxy (store nothing).
    #[serde(default)]
    pub proxies: i32,
    /// Current view epoch.
    #[serde(default)]
    pub view_epoch: i64,
    /// Members of the current view (`host:port`).
    #[serde(default)]
    pub members: Vec<String>,
    /// Keys moved / to move in the current rebalance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<String>,
    /// Label selector of the node pods (for the scale subresource).
    #[serde(default)]
    pub selector: String,
}
