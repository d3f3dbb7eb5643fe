//! What can go wrong, and the exit code each kind gets (documented in `--help` and `docs/cli.md`).

use kvs_api::ClientError;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The cluster could not do it: no endpoint answered, a 5xx, a change that failed.
    #[error("{0}")]
    Unavailable(String),
    /// `get` of a key that does not exist (or was deleted).
    #[error("key {0:?} not found")]
    NotFound(String),
    /// The request was wrong (a 4xx, with the node's message), or a local file or flag was.
    #[error("{0}")]
    Invalid(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unavailable(_) => 1,
            CliError::NotFound(_) => 3,
            CliError::Invalid(_) => 4,
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        match e.status() {
            Some(400..=499) => CliError::Invalid(e.to_string()),
            _ => CliError::Unavailable(e.to_string()),
        }
    }
}

/// Whether trying the next endpoint may help: the request never got an answer.
pub fn unreachable(e: &ClientError) -> bool {
    matches!(e, ClientError::Transport { source, .. } if source.is_connect() || source.is_timeout())
}
