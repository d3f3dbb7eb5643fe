//! The backup resources: `KVStoreBackup` (short name `kvsb`), one backup of a cluster, taken
//! once by the operator (`crate::backup`); `KVStoreBackupSchedule` (short name `kvsbs`), which
//! creates backups on a cron schedule and keeps the newest few (`crate::backup::schedule`); and
//! the restore a `KVStoreCluster` asks for (`spec.restoreFrom`, `status.restore`).

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
    /// Once written, read the backup back and check every checksum and count (as `kvsctl backup
    /// verify`); the backup succeeds only if it verifies, and `status.lastVerified` says when.
    #[serde(default)]
    pub verify: bool,
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
    /// When the backup was last read back and found whole (with `spec.verify`; RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified: Option<String>,
    /// What is waited on, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A backup to load into a new cluster (`KVStoreCluster.spec.restoreFrom`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.url.size() > 0", "message": "restoreFrom.url must be a backup's URL (a KVStoreBackup's destination)"},
]))]
pub struct RestoreSource {
    /// Where the backup is: a `KVStoreBackup`'s `destination` (`s3://bucket/prefix`, `gs://…`,
    /// `az://…`, `file:///dir`).
    pub url: String,
    /// A Secret in the same namespace with the object store's settings, as for a `KVStoreBackup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// Restore into a cluster that already holds keys: the backup's keys merge with them, the
    /// newer version of each key winning. Without it such a restore is refused.
    #[serde(default)]
    pub overwrite: bool,
}

/// Where a restore stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RestorePhase {
    /// Waiting for the cluster to run (every pod ready, a view, no view change under way).
    #[default]
    Pending,
    /// Loading the backup.
    Running,
    /// Every key of the backup is in place.
    Succeeded,
    /// Not restored (`message` says why and what to do).
    Failed,
}

/// What the operator reports about `spec.restoreFrom`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    /// The backup this describes (a new `spec.restoreFrom.url` starts over).
    pub url: String,
    #[serde(default)]
    pub phase: RestorePhase,
    /// The stage (`verifying`, `restoring`) and records done of those expected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Live keys and deletions restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletions: Option<i64>,
    /// Runs started (an operator restart during a restore starts it again, up to 3 times).
    #[serde(default)]
    pub attempts: i32,
    /// When it finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// What is waited on, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Backups of a `KVStoreCluster` on a schedule: at each time the cron expression names, the
/// operator creates a `KVStoreBackup` (owned by the schedule) under `destination`, verifies it, and
/// deletes the oldest beyond `keep` (the resource and its files).
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kvstore.dev",
    version = "v1alpha1",
    kind = "KVStoreBackupSchedule",
    namespaced,
    shortname = "kvsbs",
    status = "KVStoreBackupScheduleStatus",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.cluster"}"#,
    printcolumn = r#"{"name":"Schedule","type":"string","jsonPath":".spec.schedule"}"#,
    printcolumn = r#"{"name":"Suspend","type":"boolean","jsonPath":".spec.suspend"}"#,
    printcolumn = r#"{"name":"Last Backup","type":"string","jsonPath":".status.lastBackup"}"#,
    printcolumn = r#"{"name":"Last Verified","type":"date","jsonPath":".status.lastVerified"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.cluster.size() > 0", "message": "cluster must name a KVStoreCluster"},
    {"rule": "self.destination.size() > 0", "message": "destination must be a URL (s3://bucket/prefix, gs://…, az://…, file:///dir)"},
    {"rule": "self.keep >= 1", "message": "keep must be at least 1"},
]))]
pub struct KVStoreBackupScheduleSpec {
    /// The KVStoreCluster to back up, in the same namespace.
    pub cluster: String,
    /// When to take a backup: a cron expression in UTC, five fields (`minute hour day-of-month
    /// month day-of-week`, e.g. `0 3 * * *` for 03:00 every day) or six with seconds first. A
    /// time missed while the operator was down is taken once when it is back (only the latest).
    pub schedule: String,
    /// Where backups go: each one under `<destination>/<schedule name>-<time, e.g.
    /// 20261203t030000z>`. Same URL kinds as a `KVStoreBackup`'s destination.
    pub destination: String,
    /// A Secret with the object store's settings, as for a `KVStoreBackup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// Succeeded backups to keep: older ones, and failed ones older than the newest success, are
    /// deleted with their files.
    #[serde(default = "default_keep")]
    pub keep: i32,
    /// Take no new backups (those running finish; retention still applies).
    #[serde(default)]
    pub suspend: bool,
}

fn default_keep() -> i32 {
    7
}

/// What the operator reports about a schedule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KVStoreBackupScheduleStatus {
    /// The scheduled time of the newest backup created (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    /// The next time a backup is due (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<String>,
    /// The newest backup created, and the newest that succeeded (`KVStoreBackup` names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_backup: Option<String>,
    /// When the newest verified backup was verified (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified: Option<String>,
    /// Why the schedule cannot run (an invalid cron expression), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
