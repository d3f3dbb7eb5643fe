//! Local mode's backend: node "pods" are `kvs-node` processes on loopback addresses
//! (`<address-base><ordinal+1>:8080`), each with its data under `<data-dir>/pod-<ordinal>`.
//!
//! Like a StatefulSet: pods have stable ordinals and identities, scaling removes the highest
//! ordinals, and a pod's data directory outlives the process (so running again resumes). Unlike
//! one, a removed pod's data is deleted: the driver only removes pods after the view no longer
//! contains them, so their data has already moved.

use crate::controller::plan::Pod;
use crate::controller::validate::Validated;
use crate::driver::Backend;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct LocalBackend {
    node_bin: PathBuf,
    data_dir: PathBuf,
    address_base: String,
    pods: BTreeMap<u32, Child>,
    http: reqwest::Client,
}

impl LocalBackend {
    /// Starts the pods of a cluster: the ones found under `data_dir` (a restart: each comes back
    /// with its persisted view), or `spec.replicas` new ones forming the initial view.
    pub fn start(node_bin: PathBuf, data_dir: PathBuf, address_base: String, spec: &Validated) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&data_dir)?;
        let http = reqwest::Client::builder().timeout(Duration::from_millis(500)).build()?;
        let mut backend = LocalBackend { node_bin, data_dir, address_base, pods: BTreeMap::new(), http };
        let existing = backend.existing_ordinals()?;
        if existing.is_empty() {
            let view: Vec<String> = (0..spec.replicas).map(|o| backend.identity(o)).collect();
            for o in 0..spec.replicas {
                backend.start_pod(o, spec, Some(&view.join(",")))?;
            }
        } else {
            for o in existing {
                backend.start_pod(o, spec, None)?;
            }
        }
        Ok(backend)
    }

    fn existing_ordinals(&self) -> anyhow::Result<Vec<u32>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.data_dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(o) = name.strip_prefix("pod-").and_then(|n| n.parse().ok()) {
                out.push(o);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// A pod's node identity.
    pub fn identity(&self, ordinal: u32) -> String {
        format!("{}{}:8080", self.address_base, ordinal + 1)
    }

    fn pod_dir(&self, ordinal: u32) -> PathBuf {
        self.data_dir.join(format!("pod-{ordinal}"))
    }

    fn start_pod(&mut self, ordinal: u32, spec: &Validated, view: Option<&str>) -> anyhow::Result<()> {
        let addr = self.identity(ordinal);
        let dir = self.pod_dir(ordinal);
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("node.log"))?;
        let mut cmd = Command::new(&self.node_bin);
        cmd.env("IPPORT", &addr)
            .env("LISTEN", &addr)
            .env("K", spec.replication_factor.to_string())
            .env("KVS_DATA_DIR", &dir)
            .env("KVS_WORKER_THREADS", "1")
            .env_remove("VIEW")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(v) = view {
            cmd.env("VIEW", v);
        }
        let child = cmd.spawn().map_err(|e| anyhow::anyhow!("starting {}: {e}", self.node_bin.display()))?;
        self.pods.insert(ordinal, child);
        Ok(())
    }

    fn stop_pod(&mut self, ordinal: u32) {
        if let Some(mut child) = self.pods.remove(&ordinal) {
            terminate(&mut child);
        }
    }

    /// Stops every pod cleanly (SIGTERM, then SIGKILL after 10 s), keeping the data.
    pub fn stop_all(&mut self) {
        let ordinals: Vec<u32> = self.pods.keys().copied().collect();
        for o in ordinals {
            self.stop_pod(o);
        }
    }
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for LocalBackend {
    fn drop(&mut self) {
        self.stop_all();
    }
}

impl Backend for LocalBackend {
    fn replicas(&self) -> u32 {
        self.pods.keys().next_back().map_or(0, |o| o + 1)
    }

    async fn set_replicas(&mut self, replicas: u32, spec: &Validated) -> anyhow::Result<()> {
        let current = self.replicas();
        for o in current..replicas {
            // New pods join later through a view change: they start without VIEW.
            self.start_pod(o, spec, None)?;
        }
        for o in (replicas..current).rev() {
            self.stop_pod(o);
            let dir = self.pod_dir(o);
            if dir.starts_with(&self.data_dir) {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        Ok(())
    }

    async fn pods(&mut self) -> Vec<Pod> {
        let mut out = Vec::new();
        let ordinals: Vec<u32> = self.pods.keys().copied().collect();
        for o in ordinals {
            let identity = self.identity(o);
            let exited = self.pods.get_mut(&o).is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            // Ready = serving HTTP (a new node has no view until it is added: /healthz, not /readyz).
            let ready = !exited && self.http.get(format!("http://{identity}/healthz")).send().await.is_ok_and(|r| r.status().is_success());
            out.push(Pod { ordinal: o, identity, ready });
        }
        out
    }
}

/// The `kvs-node` binary: next to the running executable, else on PATH.
pub fn default_node_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("kvs-node")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| Path::new("kvs-node").to_path_buf())
}
