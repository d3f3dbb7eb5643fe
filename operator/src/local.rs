//! Local mode (`kvs-operator local -f cluster.yaml`): a KVStoreCluster run on this machine without
//! Kubernetes. Node "pods" are `kvs-node` processes on loopback addresses
//! (`<address-base><ordinal+1>:8080`), each with its data under `<data-dir>/pod-<ordinal>`; the
//! same planner and view-change driver as the controller move the data. The file is watched:
//! edits to `replicas` or `replicationFactor` are applied with a progress display.
//!
//! Like a StatefulSet: pods have stable ordinals and identities, scaling removes the highest
//! ordinals, and a pod's data directory outlives the process (so running again resumes). Unlike
//! one, a removed pod's data is deleted: the driver only removes pods after the view no longer
//! contains them, so their data has already moved.

use crate::controller::plan::{Pod, Step};
use crate::controller::validate::{Validated, validate};
use crate::crd::KVStoreCluster;
use crate::driver::{Backend, NodeAdmin, ViewChangeTask, observe};
use anyhow::Context;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

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

#[async_trait::async_trait]
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

    async fn pods(&mut self) -> anyhow::Result<Vec<Pod>> {
        let mut out = Vec::new();
        let ordinals: Vec<u32> = self.pods.keys().copied().collect();
        for o in ordinals {
            let identity = self.identity(o);
            let exited = self.pods.get_mut(&o).is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            // Ready = serving HTTP (a new node has no view until it is added: /healthz, not /readyz).
            let ready = !exited
                && self
                    .http
                    .get(format!("http://{identity}/healthz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
            out.push(Pod { ordinal: o, address: identity.clone(), identity, ready });
        }
        Ok(out)
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

/// `kvs-operator local`.
#[derive(clap::Args, Debug)]
pub struct LocalArgs {
    /// The KVStoreCluster manifest (watched: edits are applied).
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// Where the nodes keep their data (`<data-dir>/<name>/pod-N`).
    #[arg(long, env = "KVS_LOCAL_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Nodes listen on `<address-base><ordinal+1>:8080`.
    #[arg(long, env = "KVS_LOCAL_ADDRESS_BASE", default_value = "127.0.0.")]
    pub address_base: String,
    /// The kvs-node binary. Default: next to this executable.
    #[arg(long, env = "KVS_NODE_BIN")]
    pub node_bin: Option<PathBuf>,
}

fn load(path: &Path) -> anyhow::Result<(KVStoreCluster, Validated)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cluster: KVStoreCluster =
        serde_yaml::from_str(&text).with_context(|| format!("{} is not a KVStoreCluster", path.display()))?;
    let valid = validate(&cluster.spec).with_context(|| format!("{} has an invalid spec", path.display()))?;
    Ok((cluster, valid))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn describe(step: &Step, status: Option<&kvs_api::ClusterStatus>) -> String {
    let view = status.and_then(|s| s.layout.as_ref()).map_or("no view yet".to_owned(), |l| {
        format!(
            "epoch {} · {} partitions × K={} · {} proxies",
            l.epoch,
            l.partitions.len(),
            l.replication_factor,
            l.proxies.len()
        )
    });
    let action = match step {
        Step::Done => "in sync".to_owned(),
        Step::ScaleStatefulSet { replicas } => format!("setting pods to {replicas}"),
        Step::WaitForPods { ordinals } => format!("waiting for pods {ordinals:?}"),
        Step::ChangeView { members, replication_factor, .. } => {
            format!("moving data to a view of {} nodes at K={replication_factor}", members.len())
        }
    };
    format!("{view} — {action}")
}

/// Runs the cluster described by `a.file` until Ctrl-C or SIGTERM.
pub async fn run_local(a: LocalArgs) -> anyhow::Result<()> {
    let (cluster, mut spec) = load(&a.file)?;
    let name = cluster.metadata.name.clone().unwrap_or_else(|| "kvstore".into());
    let node_bin = a.node_bin.unwrap_or_else(default_node_binary);
    let data_dir = a.data_dir.join(&name);
    let mut backend = LocalBackend::start(node_bin, data_dir.clone(), a.address_base, &spec)?;
    println!("kvs-operator local: cluster {name:?}, data in {}, watching {}", data_dir.display(), a.file.display());
    if let Some(d) = &spec.degraded {
        println!("  degraded: {d}");
    }
    let admin: std::sync::Arc<dyn NodeAdmin> = std::sync::Arc::new(kvs_api::AdminClient::default());
    let mut seen_mtime = modified(&a.file);
    let mut last_line = String::new();
    let mut change: Option<ViewChangeTask> = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    // Created once, before any work: a signal that arrives while a step runs is kept, not lost.
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticker.tick() => {}
        }
        if modified(&a.file) != seen_mtime {
            seen_mtime = modified(&a.file);
            match load(&a.file) {
                Ok((_, new)) => {
                    println!(
                        "spec changed: {} replicas, K={} (was {}, K={})",
                        new.replicas, new.replication_factor, spec.replicas, spec.replication_factor
                    );
                    spec = new;
                }
                Err(e) => println!("ignoring the edit: {e:#}"),
            }
        }
        if let Some(task) = &change {
            // A view change is moving data: show its progress, plan again when it is done.
            if !task.is_finished() {
                let pods = backend.pods().await.unwrap_or_default();
                if let Some(r) = admin.status(&pods).await.map(|s| s.rebalance) {
                    let line = format!(
                        "  rebalancing to epoch {}: {} — {}/{} keys moved",
                        r.epoch, r.phase, r.moved_keys, r.total_keys
                    );
                    if line != last_line {
                        println!("{line}");
                        last_line = line;
                    }
                }
                continue;
            }
            // Finished, so awaiting it returns at once.
            if let Some(task) = change.take()
                && let Err(e) = task.outcome().await
            {
                println!("view change failed (will retry): {e:#}");
            }
        }
        let obs = observe(&mut backend, admin.as_ref(), &spec).await?;
        let line = if obs.changing {
            "a view change is under way on the nodes — waiting for it".to_owned()
        } else {
            describe(&obs.step, obs.status.as_ref())
        };
        if line != last_line {
            println!("{line}");
            last_line = line;
        }
        if obs.changing {
            continue;
        }
        match obs.step {
            Step::ScaleStatefulSet { replicas } => {
                if let Err(e) = backend.set_replicas(replicas, &spec).await {
                    println!("scaling failed: {e:#}");
                }
            }
            Step::ChangeView { primary, members, replication_factor } => {
                change = Some(ViewChangeTask::start(admin.clone(), primary, members, replication_factor));
            }
            Step::WaitForPods { .. } | Step::Done => {}
        }
    }
    println!("stopping the nodes (data kept in {})", data_dir.display());
    backend.stop_all();
    Ok(())
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM.
async fn stop_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
