//! The node's backup routes, as a backup runner (`kvs-backup`, used by `kvsctl` and the operator)
//! speaks them: hold a cut, read each partition as of the cut a page of whole slots at a time,
//! release the hold; and write restored records to their owners.
//!
//! A *hold* makes a node keep every version it replaces or refuses as stale from then on, so that
//! it can answer what each key was at a cut timestamp chosen after every member holds (see the
//! node's `backup` module). Records travel as postcard (binary-safe values), not JSON.

use crate::client::ClientError;
use crate::{AdminClient, ErrorBody};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// `POST` [`HoldRequest`] → [`Held`]: start (or renew) a hold.
pub const BACKUP_HOLD_PATH: &str = "/v1/admin/backup/hold";
/// `POST` [`HoldRequest`] (its `ttl_seconds` ignored): end a hold.
pub const BACKUP_RELEASE_PATH: &str = "/v1/admin/backup/release";
/// `POST` [`ReadRequest`] → postcard [`BackupPage`].
pub const BACKUP_READ_PATH: &str = "/v1/admin/backup/read";
/// `POST` postcard `Vec<BackupRecord>` → [`Restored`]: store records on every owner of their keys.
pub const RESTORE_PATH: &str = "/v1/admin/restore";

/// One version of one key, as backups hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRecord {
    pub key: String,
    /// `None`: the key was deleted (a tombstone, so a restore over data deletes it too).
    pub value: Option<Bytes>,
    /// The version: its HLC timestamp and the node that coordinated it (ties).
    pub timestamp: u64,
    pub writer: String,
    /// The write's causal clock (node → counter).
    pub clock: Vec<(String, u64)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRequest {
    /// The backup's id: holds of different backups are independent.
    pub backup: String,
    /// The hold ends by itself this long after the last request naming it (a runner that died
    /// leaves nothing behind for long).
    pub ttl_seconds: u64,
}

/// Answer to a hold: the node's clock once holding — at least its wall clock and every timestamp
/// it has issued, observed or stored, so a cut at the greatest of all members' answers covers
/// every write acknowledged before the hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub node: String,
    pub clock: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadRequest {
    pub backup: String,
    pub partition: u32,
    /// The view the backup reads (a node on another one refuses: the slots moved).
    pub view_epoch: u64,
    pub cut: u64,
    /// Continue after this slot (of the partition's, in slot order); `None`: from the start.
    pub after_slot: Option<u16>,
    /// Catch up from the partition's other replicas first: the runner asks it of the first read
    /// from each replica, so the replica holds every write acknowledged before the cut.
    pub catch_up: bool,
    /// Stop after the slot that brings the page to this many records (whole slots only).
    pub max_records: u32,
}

/// Records of whole slots as of the cut, in slot order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupPage {
    pub records: Vec<BackupRecord>,
    /// The last slot this page covers (`None`: the partition has no slots after `after_slot`).
    pub last_slot: Option<u16>,
    /// No slot of the partition follows this page.
    pub done: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    pub records: u64,
}

impl AdminClient {
    /// Starts or renews `backup`'s hold on `node`.
    pub async fn backup_hold(&self, node: &str, backup: &str, ttl_seconds: u64) -> Result<Held, ClientError> {
        let body = HoldRequest { backup: backup.to_owned(), ttl_seconds };
        self.post_json(node, BACKUP_HOLD_PATH, &body).await
    }

    /// Ends `backup`'s hold on `node`.
    pub async fn backup_release(&self, node: &str, backup: &str) -> Result<(), ClientError> {
        let body = HoldRequest { backup: backup.to_owned(), ttl_seconds: 0 };
        self.post_json::<serde_json::Value>(node, BACKUP_RELEASE_PATH, &body).await.map(|_| ())
    }

    /// One page of a partition as of the cut.
    pub async fn backup_read(&self, node: &str, request: &ReadRequest) -> Result<BackupPage, ClientError> {
        let req = self.http().post(self.url(node, BACKUP_READ_PATH)).json(request);
        let bytes = binary_answer(node, self.long_call(req).send().await).await?;
        postcard::from_bytes(&bytes).map_err(|e| ClientError::Protocol { node: node.to_owned(), detail: e.to_string() })
    }

    /// Stores `records` on every owner of their keys, through `node`.
    pub async fn restore(&self, node: &str, records: &[BackupRecord]) -> Result<Restored, ClientError> {
        let body = postcard::to_stdvec(records).expect("records encode");
        let req = self
            .http()
            .post(self.url(node, RESTORE_PATH))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        let bytes = binary_answer(node, self.long_call(req).send().await).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol { node: node.to_owned(), detail: e.to_string() })
    }
}

/// The body of a successful answer, or the node's error.
async fn binary_answer(node: &str, sent: Result<reqwest::Response, reqwest::Error>) -> Result<Bytes, ClientError> {
    let transport = |source| ClientError::Transport { node: node.to_owned(), source };
    let resp = sent.map_err(transport)?;
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.map_err(transport)?;
    if !(200..300).contains(&status) {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let msg = serde_json::from_str::<ErrorBody>(&text).map(|e| e.msg).unwrap_or(text);
        return Err(ClientError::Status { node: node.to_owned(), status, msg });
    }
    Ok(bytes)
}
