//! Backups of a running kvstore cluster, their verification, and restores (used by `kvsctl` and
//! the operator).
//!
//! - [`format`]: the files of a backup and their manifest (pure);
//! - [`destination`]: where backups live (S3 and compatible, GCS, Azure, a directory), through
//!   the `object_store` crate;
//! - [`run`]: taking a backup — a consistent cut, every partition read from one in-sync replica in
//!   parallel, moving to another replica mid-partition when one fails; the manifest is written
//!   last, so a backup that did not finish has none;
//! - [`restore`]: checking a backup against its manifest, and loading it into a cluster of any
//!   size and K.

pub mod destination;
pub mod format;
pub mod restore;
pub mod run;

pub use destination::{Destination, DestinationError};
pub use format::{FormatError, Manifest};
pub use restore::{VerifyReport, restore, verify};
pub use run::{BackupOptions, backup};

use kvs_api::{AdminClient, ClientError, ClusterStatus};
use std::collections::HashMap;

/// Why a backup, a verification or a restore did not complete.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Destination(#[from] DestinationError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{0}")]
    Cluster(String),
    #[error("the cluster refused: {0}")]
    Refused(String),
    #[error("partition {partition} could not be read from any replica: {}", failures.join("; "))]
    PartitionFailed { partition: u32, failures: Vec<String> },
    #[error("{url} holds no finished backup ({detail})")]
    NoBackup { url: String, detail: String },
    #[error("the backup at {url} is damaged: {}", problems.join("; "))]
    Damaged { url: String, problems: Vec<String> },
}

impl From<ClientError> for BackupError {
    fn from(e: ClientError) -> Self {
        BackupError::Cluster(e.to_string())
    }
}

/// Reports long work as it goes (kvsctl draws a bar; the operator writes the resource's status).
pub trait Progress: Send + Sync {
    /// A stage begins, with the records it expects to handle (an estimate for a backup).
    fn stage(&self, name: &str, total: u64);
    /// `records` more were handled.
    fn advance(&self, records: u64);
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn stage(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// The cluster a runner talks to: its nodes' addresses (any of them, tried in order when one
/// cannot be reached) and the admin client carrying the cluster token.
#[derive(Clone)]
pub struct Cluster {
    pub endpoints: Vec<String>,
    pub admin: AdminClient,
    /// Where to reach a member, by its identity, when the identity itself does not resolve from
    /// where the runner runs (the operator calls pods by their IPs, as its controller does).
    /// Members not listed are called by their identity.
    pub addresses: HashMap<String, String>,
}

impl Cluster {
    /// A cluster reached through `endpoints`, its members by their identities.
    pub fn new(endpoints: Vec<String>, admin: AdminClient) -> Self {
        Cluster { endpoints, admin, addresses: HashMap::new() }
    }

    /// Where to call `member`.
    pub fn address_of<'a>(&'a self, member: &'a str) -> &'a str {
        self.addresses.get(member).map_or(member, String::as_str)
    }

    /// The cluster status from the first endpoint that answers.
    pub async fn status(&self) -> Result<ClusterStatus, BackupError> {
        let mut failures = Vec::new();
        for endpoint in &self.endpoints {
            match self.admin.status(endpoint).await {
                Ok(status) => return Ok(status),
                Err(e) => failures.push(e.to_string()),
            }
        }
        Err(BackupError::Cluster(format!("no endpoint answered: {}", failures.join("; "))))
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
