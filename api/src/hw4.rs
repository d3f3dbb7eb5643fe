//! The compatibility ("HW4") API's JSON answers, exactly as the course's contract spells them:
//! the node serves these types, and clients and tests read them.

use serde::{Deserialize, Serialize};

/// The `result` field of every successful HW4 answer.
pub const SUCCESS: &str = "success";

/// `GET /kv-store/<key>` when the key exists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Get {
    pub result: String,
    pub value: String,
    pub partition_id: u32,
    pub causal_payload: String,
    pub timestamp: u64,
}

/// `PUT` and `DELETE /kv-store/<key>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    pub result: String,
    pub partition_id: u32,
    pub causal_payload: String,
    pub timestamp: u64,
}

/// `GET /kv-store/get_partition_id`: `-1` for a proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionId {
    pub result: String,
    pub partition_id: i64,
}

/// `GET /kv-store/get_all_partition_ids`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionIds {
    pub result: String,
    pub partition_id_list: Vec<u32>,
}

/// `GET /kv-store/get_partition_members`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMembers {
    pub result: String,
    pub partition_members: Vec<String>,
}

/// `PUT /kv-store/update_view?type=add`: the partition the new node joined (`-1`: a proxy).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Added {
    pub result: String,
    pub partition_id: i64,
    pub number_of_partitions: usize,
}

/// `PUT /kv-store/update_view?type=remove`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub result: String,
    pub number_of_partitions: usize,
}

/// `result: "success"`, for building answers.
pub fn success() -> String {
    SUCCESS.to_owned()
}
