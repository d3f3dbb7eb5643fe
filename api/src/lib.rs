//! kvstore's public wire types and a typed HTTP client.
//!
//! Shared by the three parties that talk to a node — other nodes' tools, the operator, the tests
//! and benchmarks — so the JSON they exchange cannot drift apart. Internal node-to-node messages
//! are not here: they are private to `kvs-node`.
//!
//! [`AdminClient`] speaks the admin API (status and view changes); [`KvClient`] the native key-value
//! API, through one node or (with [`KvClient::routed`]) straight to each key's owners by the
//! cluster map ([`Router`]); [`hw4`] holds the compatibility API's answers.
//!
//! Two client-facing APIs exist (see `docs/api.md`):
//! - the native API, `/v1/kv/{key}`: raw value bodies, metadata in `Kvs-*` headers;
//! - the compatibility ("HW4") API, `/kv-store/...`: form bodies in, JSON out.

mod admin;
pub mod backup;
mod client;
pub mod hw4;
mod routing;
pub mod tls;

pub use admin::{ADMIN_STATUS_PATH, ADMIN_USAGE_PATH, ADMIN_VIEW_PATH, ADMIN_VIEW_PLAN_PATH, AdminClient};
pub use client::{ClientError, KvClient, Stored, percent_encode};
pub use routing::{CLUSTER_MAP_PATH, ClusterMap, PartitionSlots, Router, SLOT_COUNT, slot_of, slot_ranges};
pub use tls::{ClientTls, Scheme, http_client};

use serde::{Deserialize, Serialize};

/// Request and response header carrying the opaque causal context (same string as `causal_payload`).
pub const HEADER_CAUSAL_CONTEXT: &str = "kvs-causal-context";
/// Response header: the partition that owns the key.
pub const HEADER_PARTITION: &str = "kvs-partition";
/// Response header: the version's timestamp (µs since the Unix epoch, hybrid logical clock).
pub const HEADER_TIMESTAMP: &str = "kvs-timestamp";
/// Response header on writes: durable copies of the write / replicas of its partition (`2/2`).
pub const HEADER_REPLICAS: &str = "kvs-replicas";
/// Request header on writes: refuse (503) rather than acknowledge a write with fewer durable
/// copies than this.
pub const HEADER_MIN_REPLICAS: &str = "kvs-min-replicas";
/// Response header on the native API: the view epoch the answering node is on (a client routing by
/// a [`ClusterMap`] of an older epoch fetches the map again).
pub const HEADER_VIEW_EPOCH: &str = "kvs-view-epoch";
/// Header carrying the cluster token on internal and administrative routes.
pub const HEADER_CLUSTER_TOKEN: &str = "kvs-cluster-token";

/// `Bearer <token>` as a header value marked sensitive (kept out of debug output), or `None` for a
/// token no header can carry.
pub fn bearer_header(token: &str) -> Option<reqwest::header::HeaderValue> {
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// Longest key accepted by the native API, in bytes.
pub const MAX_NATIVE_KEY_BYTES: usize = 1024;
/// Longest key accepted by the compatibility API, in characters (`[a-zA-Z0-9_]` only).
pub const MAX_HW4_KEY_CHARS: usize = 200;

/// Every error body, on both APIs: `{"result":"error","msg":"..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub result: String,
    pub msg: String,
}

impl ErrorBody {
    pub fn new(msg: impl Into<String>) -> Self {
        ErrorBody { result: "error".into(), msg: msg.into() }
    }
}

/// Native API: the JSON answer to `PUT` and `DELETE /v1/kv/{key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteResponse {
    /// Partition that owns the key.
    pub partition_id: u32,
    /// Causal context to send with the next request.
    pub causal_context: String,
    /// Timestamp of the stored version.
    pub timestamp: u64,
    /// PUT: true when the key had no live value before. DELETE: true when it had one.
    pub changed_liveness: bool,
    /// Replicas of the key's partition that hold the write durably (the `kvs-replicas` header's
    /// first number).
    #[serde(default)]
    pub copies: u32,
    /// Replicas the key's partition has.
    #[serde(default)]
    pub replicas: u32,
}

/// A cluster layout: which nodes form which partition, under which epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Strictly increasing with every view change.
    pub epoch: u64,
    /// Replicas per partition (`K`).
    pub replication_factor: u32,
    /// `partitions[i]` are the replicas of partition `i`.
    pub partitions: Vec<Vec<String>>,
    /// Members that store nothing and forward every request.
    pub proxies: Vec<String>,
}

impl Layout {
    /// Every member, replicas then proxies.
    pub fn members(&self) -> impl Iterator<Item = &String> {
        self.partitions.iter().flatten().chain(&self.proxies)
    }
}

/// Native admin API: `PUT /v1/admin/view` body — the whole desired membership and K.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewRequest {
    /// Every member (`host:port`) the cluster should have.
    pub members: Vec<String>,
    /// Replicas per partition.
    pub replication_factor: u32,
    /// Keys per second each sending node moves, for this change only (0: unlimited; absent: the
    /// driving node's `--transfer-rate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_rate: Option<u64>,
}

/// Where a view change is. The driving node (the primary receiver) goes `preparing`, `beginning`,
/// `transferring`, `committing`, `pruning`, then `done` or `failed`; `idle` before any change. A
/// source node reports its own part as `pending` (begun, not sending yet), `transferring`, `sent`;
/// a node's cluster status during a change another node drives says `pending`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum RebalancePhase {
    /// No change has run (or this node drove none).
    #[default]
    Idle,
    /// Asking every node of the old and new views to promise the new epoch.
    Preparing,
    /// Installing the new layout as the pending view everywhere (dual-writes start).
    Beginning,
    /// Moving slots to their new owners.
    Transferring,
    /// Making the pending view the view everywhere.
    Committing,
    /// Dropping what nodes no longer own.
    Pruning,
    /// The last change completed.
    Done,
    /// The last change failed (`RebalanceProgress::error` says why; it can be retried).
    Failed,
    /// A source node: the change has begun, it has not been asked to send yet. In a cluster
    /// status: a change is under way that another node drives.
    Pending,
    /// A source node: everything it had to send was sent.
    Sent,
}

impl RebalancePhase {
    /// Every phase, in the order above (for documentation and tests).
    pub const ALL: [RebalancePhase; 10] = [
        RebalancePhase::Idle,
        RebalancePhase::Preparing,
        RebalancePhase::Beginning,
        RebalancePhase::Transferring,
        RebalancePhase::Committing,
        RebalancePhase::Pruning,
        RebalancePhase::Done,
        RebalancePhase::Failed,
        RebalancePhase::Pending,
        RebalancePhase::Sent,
    ];

    /// The phase as it appears in JSON (`"transferring"`).
    pub fn as_str(self) -> &'static str {
        match self {
            RebalancePhase::Idle => "idle",
            RebalancePhase::Preparing => "preparing",
            RebalancePhase::Beginning => "beginning",
            RebalancePhase::Transferring => "transferring",
            RebalancePhase::Committing => "committing",
            RebalancePhase::Pruning => "pruning",
            RebalancePhase::Done => "done",
            RebalancePhase::Failed => "failed",
            RebalancePhase::Pending => "pending",
            RebalancePhase::Sent => "sent",
        }
    }

    /// Whether a change driven from here is under way (not idle, done or failed).
    pub fn in_progress(self) -> bool {
        !matches!(self, RebalancePhase::Idle | RebalancePhase::Done | RebalancePhase::Failed)
    }
}

impl std::fmt::Display for RebalancePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `KVStoreCluster`'s phase (`status.phase`), as the operator reports it and `kubectl get`
/// shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ClusterPhase {
    /// No node reports a view yet.
    #[default]
    Pending,
    /// The cluster matches its spec and every member is ready.
    Running,
    /// Pods or data are moving towards the spec.
    Rebalancing,
    /// Serving, but with fewer copies or ready members than asked.
    Degraded,
    /// The spec cannot be acted on (the Degraded condition says what to fix).
    Failed,
    /// `spec.paused`: the operator takes no action (no view changes, no pod changes).
    Paused,
}

impl ClusterPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterPhase::Pending => "Pending",
            ClusterPhase::Running => "Running",
            ClusterPhase::Rebalancing => "Rebalancing",
            ClusterPhase::Degraded => "Degraded",
            ClusterPhase::Failed => "Failed",
            ClusterPhase::Paused => "Paused",
        }
    }
}

impl std::fmt::Display for ClusterPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The conditions of a `KVStoreCluster` (`status.conditions[].type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ConditionType {
    /// Every partition has a ready replica.
    Available,
    /// Something is moving towards the spec.
    Progressing,
    /// Fewer copies or ready members than asked, or a spec that cannot be acted on.
    Degraded,
    /// What the cluster waits on has not changed for longer than `spec.progressDeadlineSeconds`;
    /// `status.blockedBy` names it.
    Stalled,
}

/// A condition's status, as Kubernetes spells it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ConditionStatus {
    True,
    False,
    #[default]
    Unknown,
}

impl From<bool> for ConditionStatus {
    fn from(holds: bool) -> Self {
        if holds { ConditionStatus::True } else { ConditionStatus::False }
    }
}

/// Progress of a view change (data movement), as one node or the whole cluster sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebalanceProgress {
    /// The epoch being moved to (0 when none ever ran).
    pub epoch: u64,
    pub phase: RebalancePhase,
    /// Records sent to new owners so far.
    pub moved_keys: u64,
    /// Bytes of values sent so far.
    pub moved_bytes: u64,
    /// Records to send in all (known once every source has counted).
    pub total_keys: u64,
    /// Why the last change failed, if it did.
    pub error: Option<String>,
}

/// One partition in [`ClusterStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionStatus {
    pub partition_id: u32,
    pub members: Vec<String>,
    /// Live keys per member, in `members` order (`None`: the member did not answer).
    pub live_keys: Vec<Option<u64>>,
    /// Per member, a hash of the versions it stores for this partition: replicas that agree hold
    /// the same data (`None`: the member did not answer).
    pub digests: Vec<Option<String>>,
}

/// `GET /v1/admin/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node: String,
    /// Its committed view (`None` before it was given one).
    pub layout: Option<Layout>,
    /// Epoch of a view change in progress, if any.
    pub pending_epoch: Option<u64>,
    pub partitions: Vec<PartitionStatus>,
    /// The latest view change driven or observed by this node, with cluster-wide movement totals.
    pub rebalance: RebalanceProgress,
}

/// `GET /v1/admin/usage`: what one node holds (not gathered from others).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeUsage {
    /// The node that answered.
    pub node: String,
    pub live_keys: u64,
    /// Key and value bytes of its live keys (its data before any storage overhead).
    pub live_bytes: u64,
    pub tombstones: u64,
}

/// `PUT /v1/admin/view` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChanged {
    pub layout: Layout,
    /// False when the cluster already had this membership and K (nothing was done).
    pub changed: bool,
    pub moved_keys: u64,
}

/// `POST /v1/admin/view/plan` answer: what a view change ([`ViewRequest`]) would do, without
/// doing it. Counts are records (live keys and tombstones: a transfer moves both), read from one
/// replica of each partition at the moment of asking.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewPlan {
    pub current: Layout,
    /// The layout the change would commit (the same rule as `PUT /v1/admin/view`).
    pub target: Layout,
    /// Every node of either layout, in id order.
    pub nodes: Vec<NodePlan>,
    /// Slots whose owners change.
    pub moved_slots: u32,
    /// Records the change would send (a slot's records once to each new owner that lacks them).
    pub moved_records: u64,
    /// Partitions no replica of which answered: their slots count as empty above.
    pub unmeasured_partitions: Vec<u32>,
}

/// One node in a [`ViewPlan`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    pub node: String,
    /// Records of the slots it owns now, and after the change.
    pub records_now: u64,
    pub records_after: u64,
    /// Records it would receive (slots it gains) and drop (slots it loses).
    pub records_in: u64,
    pub records_out: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_serialize_as_their_names() {
        for phase in RebalancePhase::ALL {
            assert_eq!(serde_json::to_string(&phase).unwrap(), format!("\"{phase}\""));
            assert_eq!(serde_json::from_str::<RebalancePhase>(&format!("\"{phase}\"")).unwrap(), phase);
        }
        for phase in [ClusterPhase::Pending, ClusterPhase::Running, ClusterPhase::Rebalancing, ClusterPhase::Failed] {
            assert_eq!(serde_json::to_string(&phase).unwrap(), format!("\"{phase}\""));
        }
        assert_eq!(serde_json::to_string(&ConditionStatus::from(true)).unwrap(), "\"True\"");
        assert_eq!(serde_json::to_string(&ConditionType::Progressing).unwrap(), "\"Progressing\"");
    }
}
