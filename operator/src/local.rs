//! Local mode (`kvs-operator local -f cluster.yaml`): a KVStoreCluster run on this machine without
//! Kubernetes. Node "pods" are `kvs-node` processes on loopback addresses
//! (`<address-base><ordinal+1>:8080`), each with its data under `<data-dir>/pod-<ordinal>`; the
//! same rebalance driver as the controller ([`crate::rebalance::Driver`]) moves the data, with
//! [`LocalBackend`] as its backend. The file is watched: edits to `replicas` or `replicationFactor`
//! are applied with a progress display (stdout; logs go to stderr). A `restoreFrom` in the file is
//! restored once the cluster runs, as on Kubernetes ([`crate::backup::restore`]).
//!
//! Like a StatefulSet: pods have stable ordinals and identities, scaling removes the highest
//! ordinals, and a pod's data directory outlives the process (so running again resumes). Unlike
//! one, a removed pod's data is deleted: the driver only removes pods after the view no longer
//! contains them, so their data has already moved. Pods never outlive this process: they run with
//! `--exit-with-parent`, so an operator that is killed (or crashes) leaves no node behind holding
//! its address.

use crate::controller::validate::validate;
use crate::crd::KVStoreCluster;
use crate::rebalance::{Action, Backend, Driver, FinishedViewChange, NodeAdmin, Pod, Policy, Step, StepReport, Target};
use crate::shutdown::shutdown_signal;
use anyhow::Context;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
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
    /// with its persisted view), or `target.replicas` new ones forming the initial view.
    pub fn start(node_bin: PathBuf, data_dir: PathBuf, address_base: String, target: &Target) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&data_dir)?;
        let http = kvs_api::http_client().timeout(Duration::from_millis(500)).build()?;
        let mut backend = LocalBackend { node_bin, data_dir, address_base, pods: BTreeMap::new(), http };
        let existing = backend.existing_ordinals()?;
        if existing.is_empty() {
            let view: Vec<String> = (0..target.replicas).map(|o| backend.identity(o)).collect();
            for o in 0..target.replicas {
                backend.start_pod(o, target, Some(&view.join(",")))?;
            }
        } else {
            for o in existing {
                backend.start_pod(o, target, None)?;
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

    fn start_pod(&mut self, ordinal: u32, target: &Target, view: Option<&str>) -> anyhow::Result<()> {
        let addr = self.identity(ordinal);
        let dir = self.pod_dir(ordinal);
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("node.log"))?;
        let mut cmd = Command::new(&self.node_bin);
        cmd.env("IPPORT", &addr)
            .env("LISTEN", &addr)
            .env("K", target.replication_factor.to_string())
            .env("KVS_DATA_DIR", &dir)
            .env("KVS_WORKER_THREADS", "1")
            // Pods stop when this process does, however it ends (also SIGKILL or a panic), so no
            // node is left holding its address for the next run.
            .env("KVS_EXIT_WITH_PARENT", "true")
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

    /// Stops every pod cleanly, keeping the data.
    pub fn stop_all(&mut self) {
        let all: Vec<u32> = self.pods.keys().copied().collect();
        self.stop_pods(&all);
    }

    /// Stops the pods `ordinals` cleanly: SIGTERM to all at once, then SIGKILL to those still
    /// running after [`STOP_GRACE`] — so stopping takes at most that, however many pods (a
    /// scale-in as well as Ctrl-C). A pod that needed more than a second is named, with the time.
    fn stop_pods(&mut self, ordinals: &[u32]) {
        let mut running: Vec<(u32, Child)> =
            ordinals.iter().filter_map(|o| self.pods.remove(o).map(|child| (*o, child))).collect();
        for (_, child) in &running {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        }
        let started = Instant::now();
        let deadline = started + STOP_GRACE;
        while !running.is_empty() && Instant::now() < deadline {
            running.retain_mut(|(ordinal, child)| {
                let exited = matches!(child.try_wait(), Ok(Some(_)));
                if exited && started.elapsed() > Duration::from_secs(1) {
                    println!("pod {ordinal} took {:.1?} to stop after SIGTERM", started.elapsed());
                }
                !exited
            });
            std::thread::sleep(Duration::from_millis(20));
        }
        for (ordinal, mut child) in running {
            println!(
                "pod {ordinal} did not stop within {STOP_GRACE:?} of SIGTERM; killing it (its log: pod-{ordinal}/node.log)"
            );
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How long a pod has to finish its requests and exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

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

    async fn set_replicas(&mut self, replicas: u32, target: &Target) -> anyhow::Result<()> {
        let current = self.replicas();
        for o in current..replicas {
            // New pods join later through a view change: they start without VIEW.
            self.start_pod(o, target, None)?;
        }
        let leaving: Vec<u32> = (replicas..current).rev().collect();
        self.stop_pods(&leaving);
        for o in leaving {
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
            // Every local pod runs the one node binary (always current) on this machine (never
            // unschedulable); joining ones are started once they answer /healthz.
            out.push(Pod::new(o, identity.clone(), identity, ready));
        }
        Ok(out)
    }

    async fn restart_pod(&mut self, ordinal: u32) -> anyhow::Result<()> {
        anyhow::bail!("local mode runs every node on the same binary: pod {ordinal} has nothing to roll to")
    }

    async fn replace_pod(&mut self, ordinal: u32) -> anyhow::Result<()> {
        anyhow::bail!("local mode never loses a machine: pod {ordinal} is restarted in place")
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

/// `spec.restoreFrom` in local mode: the same decision and runner as on Kubernetes, with the
/// object store's settings from the environment (there are no Secrets), and the outcome
/// remembered in `<data-dir>/restored-from` (a run of local mode has no status to keep it in), so
/// running again does not restore again.
struct LocalRestore {
    source: crate::crd::RestoreSource,
    status: crate::crd::RestoreStatus,
    runs: crate::backup::access::Runs,
    marker: PathBuf,
}

impl LocalRestore {
    fn new(source: crate::crd::RestoreSource, data_dir: &Path) -> Self {
        use crate::crd::{RestorePhase, RestoreStatus};
        let marker = data_dir.join("restored-from");
        let done = std::fs::read_to_string(&marker).is_ok_and(|url| url.trim() == source.url);
        let phase = if done { RestorePhase::Succeeded } else { RestorePhase::Pending };
        if source.credentials_secret.is_some() {
            println!(
                "  restoreFrom.credentialsSecret is a Kubernetes Secret: local mode reads the object store's settings from the environment"
            );
        }
        let status = RestoreStatus { url: source.url.clone(), phase, ..Default::default() };
        LocalRestore { source, status, runs: Default::default(), marker }
    }

    /// One step; returns a line to print when something changed.
    fn step(&mut self, report: &StepReport) -> Option<String> {
        use crate::backup::restore::{Next, decide};
        use crate::crd::RestorePhase;
        let obs = &report.observation;
        let settled = obs.settled();
        let url = self.source.url.clone();
        match decide(&self.source, Some(&self.status), self.runs.view(&url), settled) {
            Next::Nothing | Next::WaitForCluster => None,
            Next::Progress(progress) => {
                let changed = self.status.progress.as_ref() != Some(&progress);
                self.status.progress = Some(progress.clone());
                changed.then(|| format!("  restoring from {url}: {progress}"))
            }
            Next::Finish(outcome) => {
                self.runs.remove(&url);
                Some(match outcome {
                    Ok(m) => {
                        self.status.phase = RestorePhase::Succeeded;
                        if let Err(e) = std::fs::write(&self.marker, &url) {
                            println!(
                                "  could not write {}: {e} (running again would restore again)",
                                self.marker.display()
                            );
                        }
                        format!(
                            "restored {} keys and {} deletions from {url}: the cluster is available",
                            m.live_keys, m.tombstones
                        )
                    }
                    Err(why) => {
                        self.status.phase = RestorePhase::Failed;
                        format!(
                            "restoring from {url} failed: {why}\n  fix restoreFrom in the file (a new url starts over) or remove it"
                        )
                    }
                })
            }
            Next::GiveUp => {
                self.status.phase = RestorePhase::Failed;
                Some(format!("restoring from {url} failed too often"))
            }
            Next::Start { attempt, overwrite } => {
                let dest = match kvs_backup::Destination::open(&url) {
                    Ok(dest) => dest,
                    Err(e) => {
                        self.status.phase = RestorePhase::Failed;
                        return Some(format!("cannot restore from {url}: {e}"));
                    }
                };
                let endpoints: Vec<String> = obs.pods.iter().map(|p| p.address.clone()).collect();
                let cluster = kvs_backup::Cluster::new(endpoints, kvs_api::AdminClient::default());
                self.runs.start(url.clone(), move |progress| async move {
                    kvs_backup::restore(&cluster, &dest, overwrite, progress.as_ref()).await.map_err(|e| e.to_string())
                });
                (self.status.phase, self.status.attempts) = (RestorePhase::Running, attempt);
                Some(format!("restoring from {url} (the cluster is not available until every key is in place)"))
            }
        }
    }
}

fn load(path: &Path) -> anyhow::Result<(KVStoreCluster, Target, Policy)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cluster: KVStoreCluster =
        serde_yaml::from_str(&text).with_context(|| format!("{} is not a KVStoreCluster", path.display()))?;
    let valid = validate(&cluster.spec).with_context(|| format!("{} has an invalid spec", path.display()))?;
    anyhow::ensure!(
        !valid.tls && valid.auth.is_none(),
        "{}: spec.tls and spec.auth are not supported in local mode; remove them, or start nodes by hand with \
         --tls-* and --auth-file (docs/security.md)",
        path.display()
    );
    Ok((cluster, valid.target, valid.policy))
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
    format!("{view} — {}", action(step))
}

/// What a step does, in words.
fn action(step: &Step) -> String {
    match step {
        Step::Done => "in sync".to_owned(),
        Step::ScaleStatefulSet { replicas } => format!("setting pods to {replicas}"),
        Step::WaitForPods { ordinals } => format!("waiting for pods {ordinals:?}"),
        Step::ChangeView { members, replication_factor, .. } => {
            format!("moving data to a view of {} nodes at K={replication_factor}", members.len())
        }
        Step::RestartPod { ordinal } => format!("restarting pod {ordinal}"),
        Step::ReplaceMember { ordinal } => format!("replacing member {ordinal}"),
        Step::Paused { next } => format!("paused (spec.paused); would be {}", action(next)),
        Step::Refused { refusal } => refusal.explain(),
    }
}

/// The progress line of a step (`None`: nothing new to show).
fn progress_line(report: &StepReport) -> Option<String> {
    let obs = &report.observation;
    match &report.action {
        // Ours is moving data: show how far it got.
        Action::AwaitViewChange { ours: true } => obs.status.as_ref().map(|s| {
            let r = &s.rebalance;
            format!("  rebalancing to epoch {}: {} — {}/{} keys moved", r.epoch, r.phase, r.moved_keys, r.total_keys)
        }),
        Action::AwaitViewChange { ours: false } => {
            Some("a view change is under way on the nodes — waiting for it".to_owned())
        }
        _ => Some(match &obs.capacity {
            // The capacity plan of a change that leaves fewer partitions, with the step.
            Some(plan) => format!("{}\n  capacity: {}", describe(&obs.step, obs.status.as_ref()), plan.summary()),
            None => describe(&obs.step, obs.status.as_ref()),
        }),
    }
}

/// Runs the cluster described by `a.file` until Ctrl-C or SIGTERM.
pub async fn run_local(a: LocalArgs) -> anyhow::Result<()> {
    let (cluster, mut target, mut policy) = load(&a.file)?;
    let name = cluster.metadata.name.clone().unwrap_or_else(|| "kvstore".into());
    let node_bin = a.node_bin.unwrap_or_else(default_node_binary);
    let data_dir = a.data_dir.join(&name);
    let mut backend = LocalBackend::start(node_bin, data_dir.clone(), a.address_base, &target)?;
    println!("kvs-operator local: cluster {name:?}, data in {}, watching {}", data_dir.display(), a.file.display());
    if let Some(d) = target.degraded() {
        println!("  degraded: {d}");
    }
    let admin: Arc<dyn NodeAdmin> = Arc::new(kvs_api::AdminClient::default());
    let mut seen_mtime = modified(&a.file);
    let mut last_line = String::new();
    let mut driver = Driver::default();
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let mut restore = cluster.spec.restore_from.clone().map(|source| LocalRestore::new(source, &data_dir));
    // Created once, before any work: a signal that arrives while a step runs is kept, not lost.
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticker.tick() => {}
        }
        if modified(&a.file) != seen_mtime {
            seen_mtime = modified(&a.file);
            match load(&a.file) {
                Ok((_, new, new_policy)) => {
                    println!(
                        "spec changed: {} replicas, K={}{} (was {}, K={})",
                        new.replicas,
                        new.replication_factor,
                        if new_policy.paused { ", paused" } else { "" },
                        target.replicas,
                        target.replication_factor
                    );
                    (target, policy) = (new, new_policy);
                }
                Err(e) => println!("ignoring the edit: {e:#}"),
            }
        }
        let report = driver.step(&mut backend, &admin, &target, &policy).await?;
        if let Some(FinishedViewChange { outcome: Err(e), .. }) = &report.finished {
            println!("view change failed (will retry): {e:#}");
        }
        if let Some(line) = progress_line(&report)
            && line != last_line
        {
            println!("{line}");
            last_line = line;
        }
        if let Action::ScaleFailed { error, .. } = &report.action {
            println!("scaling failed: {error:#}");
        }
        if let Some(line) = restore.as_mut().and_then(|r| r.step(&report)) {
            println!("{line}");
        }
    }
    println!("stopping the nodes (data kept in {})", data_dir.display());
    backend.stop_all();
    Ok(())
}
