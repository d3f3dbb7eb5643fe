//! The backup resources: `KVStoreBackup` (short name `kvsb`), one backup of a cluster, taken
//! once by the operator (`crate::backup`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A backup of a `KVStoreCluster`: every key's state at one moment (a consistent cut, taken while
/// clients keep writing), written to object storage or a directory. One resource is one backup;
/// the operator takes it once and records the outcome (see `docs/backup.md`).
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kvstore.dev",
    version = "v1alpha1",
    kind = "KVStoreBackup",
    namespaced,
    shortname = "kvsb",
    status = "KVStoreBackupStatus",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.cluster"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Keys","type":"integer","jsonPath":".status.keys"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.cluster.size() > 0", "message": "cluster must name a KVStoreCluster"},
    {"rule": "self.destination.size() > 0", "message": "destination must be a URL (s3://bucket/prefix, gs://…, az://…, file:///dir)"},
    {"rule": "self == oldSelf", "message": "a KVStoreBackup's spec cannot change: create another one"},
]))]
pub struct KVStoreBackupSpec {
    /// The KVStoreCluster to back up, in the same namespace.
    pub cluster: String,
    /// Where to write the backup: `s3://bucket/prefix` (S3 or S3-compatible), `gs://bucket/prefix`,
    /// `az://container/prefix`, or `file:///dir` (a directory the operator can write). It must
    /// not hold a backup already: backups are never overwritten.
    pub destination: String,
    /// A Secret in the same namespace whose keys configure the object store, named as the
    /// providers' environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, `GOOGLE_SERVICE_ACCOUNT_KEY`,
    /// `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, ...). Without it the operator's own
    /// environment (e.g. a workload identity) is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// Where a backup is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum BackupPhase {
    /// Waiting to start (the cluster does not exist or runs no pod yet; `message` says which).
    #[default]
    Pending,
    /// Being taken.
    Running,
    /// Taken: the manifest is written (`manifest`).
    Succeeded,
    /// Not taken (`message` says why); nothing usable was left at the destination.
    Failed,
}

impl BackupPhase {
    pub fn is_final(self) -> bool {
        matches!(self, BackupPhase::Succeeded | BackupPhase::Failed)
    }
}

/// What the operator reports about a backup.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KVStoreBackupStatus {
    #[serde(default)]
    pub phase: BackupPhase,
    /// Records read so far against the keys the cluster reported at the start (`read/expected`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Live keys, deletions and bytes in the finished backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletions: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<i64>,
    /// The cut (HLC µs since the Unix epoch): the moment whose state the backup holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<i64>,
    /// The view epoch backed up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view_epoch: Option<i64>,
    /// Where the manifest is (`<destination>/manifest.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// When the backup started and finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// Attempts made (an operator restart during a backup starts it again, up to 3 times).
    #[serde(default)]
    pub attempts: i32,
    /// What is waited on, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
