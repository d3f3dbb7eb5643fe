//! Persists the node's view (and a view change in progress) in its data directory, so a restarted
//! node comes back with the membership it had rather than the `VIEW` it was first started with.
//!
//! One JSON file, replaced atomically (write a temporary file, fsync, rename, fsync the directory).

use kvs_api::Layout;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

const FILE: &str = "view.json";

/// What is persisted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewState {
    pub view: Option<Layout>,
    /// The layout of a view change that has begun but not committed.
    pub pending: Option<Layout>,
}

/// Reads and writes [`ViewState`]: in a directory (a node's data directory), nowhere (`None`: kept
/// in memory only), or in a shared cell that outlives the node (a simulated disk, so a simulated
/// node restarts with the view it had).
#[derive(Clone, Debug, Default)]
pub struct ViewStore {
    place: Place,
}

#[derive(Clone, Debug, Default)]
enum Place {
    #[default]
    Nowhere,
    Dir(PathBuf),
    Shared(std::sync::Arc<std::sync::Mutex<ViewState>>),
}

impl ViewStore {
    pub fn new(dir: Option<&Path>) -> Self {
        ViewStore { place: dir.map_or(Place::Nowhere, |d| Place::Dir(d.to_path_buf())) }
    }

    /// A store in `cell`, which the caller keeps across restarts.
    pub fn shared(cell: std::sync::Arc<std::sync::Mutex<ViewState>>) -> Self {
        ViewStore { place: Place::Shared(cell) }
    }

    /// The saved state; default when nothing was saved yet.
    pub fn load(&self) -> std::io::Result<ViewState> {
        let dir = match &self.place {
            Place::Nowhere => return Ok(ViewState::default()),
            Place::Shared(cell) => return Ok(cell.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()),
            Place::Dir(dir) => dir,
        };
        match std::fs::read(dir.join(FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ViewState::default()),
            Err(e) => Err(e),
        }
    }

    /// Replaces the saved state durably.
    pub fn save(&self, state: &ViewState) -> std::io::Result<()> {
        let dir = match &self.place {
            Place::Nowhere => return Ok(()),
            Place::Shared(cell) => {
                *cell.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = state.clone();
                return Ok(());
            }
            Place::Dir(dir) => dir,
        };
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!("{FILE}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(FILE))?;
        std::fs::File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let store = ViewStore::new(Some(dir.path()));
        assert_eq!(store.load().unwrap(), ViewState::default());
        let layout = Layout {
            epoch: 3,
            replication_factor: 2,
            partitions: vec![vec!["a:1".into(), "b:1".into()]],
            proxies: vec![],
        };
        let state = ViewState { view: Some(layout.clone()), pending: Some(Layout { epoch: 4, ..layout }) };
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), state);
        assert_eq!(ViewStore::new(None).load().unwrap(), ViewState::default());
    }
}
