//! A stand-in for the parts of a Kubernetes cluster that the test API server lacks (see
//! `../shared/k8s/README.md`): the StatefulSet controller, the kubelet, the garbage collector and
//! cluster DNS. It runs as one tokio task in the test process and starts a real `kvs-node` process
//! for every Pod, so an end-to-end test can drive the operator against a real API server and see
//! real nodes come and go. It is deliberately small: it does what the operator relies on, and says
//! (here and in each part's docs) what it fakes and what it leaves out.
//!
//! # The parts
//! Every 200 ms the loop lists the StatefulSets and Pods of one namespace and runs, in order:
//! - `statefulset` — the StatefulSet controller: which Pods to create and delete, Pods and claims
//!   built from the template, the StatefulSet's status;
//! - `gc` — the garbage collector: Pods whose StatefulSet is gone, foreground deletion;
//! - `runtime` — the kubelet's container runtime: one `kvs-node` process per Pod, restarted with
//!   back-off, stopped with a grace period, logged to a file;
//! - `env` — what a container starts with: its environment, arguments and volumes, with the
//!   network and mount rewrites that stand in for a Pod's own namespaces;
//! - `probe` — readiness probes;
//! - `pod` — one Pod as the kubelet runs it: its loopback address and the status it reports;
//! - `dns` — cluster DNS, as a hosts file every node reads.
//!
//! # Who owns what
//! The loop task owns every Pod it runs (a `pod::Slot`) and every process, and nothing else
//! touches them, so no lock is ever held around a signal, a spawn or an API call. Decisions are
//! pure functions of the listed objects and the slots' data (`statefulset::plan`,
//! `runtime::Container::step`), unit-tested; the loop carries them out afterwards. A test reaches
//! the loop through messages ([`StandInKubelet::kill_pod`], [`StandInKubelet::stop`]) and reads the
//! Pod addresses the loop publishes (the one lock, held only to copy the map).
//! [`StandInKubelet::lose_machine`] takes a Pod's machine and volume away for good (the Pod stays
//! `Unschedulable` until its claim is deleted); an image tagged `:broken` never pulls.
//!
//! # What it does not do
//! No scheduler, so `spec.nodeName` stays empty and the API server deletes Pods at once, without
//! the graceful deletion handshake (a Pod that does carry a `deletionTimestamp` is stopped and then
//! deleted). Events, Services and EndpointSlices are not simulated; each part's docs list what else
//! it leaves out. Only Pods controlled by a StatefulSet are run, by one kubelet per namespace,
//! which polls rather than watches. Stopping the kubelet ([`StandInKubelet::stop`] or drop) stops
//! every process but leaves the objects as they were, like a node that vanished.

mod dns;
mod env;
#[cfg(test)]
mod fixtures;
mod gc;
mod pod;
mod probe;
mod runtime;
mod statefulset;

pub use dns::HOSTS_FILE_ENV;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::api::{Api, ListParams};
use pod::Slot;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Display;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

const TICK: Duration = Duration::from_millis(200);

/// Where and how the kubelet runs its processes.
#[derive(Clone, Debug)]
pub struct KubeletOptions {
    /// The `kvs-node` binary every container runs.
    pub node_bin: PathBuf,
    /// Holds `hosts`, `logs/`, `pvc/` and `pods/` (a test's temporary directory).
    pub root: PathBuf,
    /// Pod IPs are this plus 1..=253: a loopback prefix such as `127.0.61.`, distinct per kubelet
    /// (`kvs_testkit::net::LoopbackNet::prefix` of a net the test holds).
    pub address_prefix: String,
}

/// The running stand-in; see the module docs. Dropping it ends the loop, which kills every process
/// it started (at once on a running runtime, else when the runtime shuts down).
pub struct StandInKubelet {
    shared: Arc<Shared>,
    requests: mpsc::UnboundedSender<Request>,
    /// Sending (or dropping) it tells the loop to stop its processes and end.
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// What a test asks of the loop.
enum Request {
    /// SIGKILL the Pod's process; the answer says whether one ran.
    Kill { pod: String, reply: oneshot::Sender<anyhow::Result<()>> },
    /// The machine under the Pod and its volume is gone (see `statefulset`).
    LoseMachine { pod: String, reply: oneshot::Sender<anyhow::Result<()>> },
    /// Crash the Pod's process and empty its volumes before it restarts.
    WipeVolume { pod: String, reply: oneshot::Sender<anyhow::Result<()>> },
}

/// What the test side and the loop both read.
struct Shared {
    namespace: String,
    opts: KubeletOptions,
    /// Pod name → IP for every Pod the loop runs, as the loop last published it. A std mutex: it is
    /// held only to replace or read the map, never across an await or around a process call.
    addresses: Mutex<BTreeMap<String, String>>,
}

impl Shared {
    fn hosts_file(&self) -> PathBuf {
        self.opts.root.join("hosts")
    }

    fn log_file(&self, pod: &str) -> PathBuf {
        self.opts.root.join("logs").join(&self.namespace).join(format!("{pod}.log"))
    }

    fn claim_dir(&self, claim: &str) -> PathBuf {
        self.opts.root.join("pvc").join(&self.namespace).join(claim)
    }

    fn pod_volume_dir(&self, pod_uid: &str, volume: &str) -> PathBuf {
        self.opts.root.join("pods").join(&self.namespace).join(pod_uid).join(volume)
    }

    fn say(&self, what: impl Display) {
        eprintln!("stand-in kubelet ({}): {what}", self.namespace);
    }
}

impl StandInKubelet {
    /// Checks the options and that the API server answers, then starts the loop.
    pub async fn start(client: Client, namespace: &str, opts: KubeletOptions) -> anyhow::Result<StandInKubelet> {
        let first: Ipv4Addr = format!("{}1", opts.address_prefix)
            .parse()
            .map_err(|_| anyhow::anyhow!("address_prefix {:?} is not like \"127.0.61.\"", opts.address_prefix))?;
        anyhow::ensure!(
            first.is_loopback(),
            "address_prefix {:?} must be a loopback prefix such as 127.0.61.",
            opts.address_prefix
        );
        anyhow::ensure!(opts.node_bin.is_file(), "no node binary at {}", opts.node_bin.display());
        let shared = Arc::new(Shared { namespace: namespace.to_owned(), opts, addresses: Mutex::default() });
        for dir in ["logs", "pvc", "pods"] {
            let dir = shared.opts.root.join(dir).join(namespace);
            std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        }
        let hosts = shared.hosts_file();
        if !hosts.exists() {
            dns::write_atomically(&hosts, "")?;
        }
        let kubelet = Kubelet::new(client, shared.clone());
        kubelet
            .sets
            .list(&ListParams::default())
            .await
            .map_err(|e| anyhow::anyhow!("listing StatefulSets in {namespace} (is the API server up?): {e}"))?;
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let (shutdown, shutdown_rx) = oneshot::channel();
        let task = tokio::spawn(kubelet.run(requests_rx, shutdown_rx));
        Ok(StandInKubelet { shared, requests, shutdown: Some(shutdown), task: Some(task) })
    }

    /// Ends the loop: every process gets SIGTERM and 10 s to exit before SIGKILL. Objects in the
    /// API are left as they are.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            // The loop stops its processes before it ends.
            let _ = task.await;
        }
    }

    /// SIGKILLs the Pod's process, as a crashed container; the kubelet restarts it with the same IP
    /// and data directory. Fails when no process runs for that Pod. Answered between two ticks.
    pub async fn kill_pod(&self, name: &str) -> anyhow::Result<()> {
        let (reply, answer) = oneshot::channel();
        let gone = || anyhow::anyhow!("the stand-in kubelet has stopped");
        self.requests.send(Request::Kill { pod: name.to_owned(), reply }).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// The machine that runs the Pod and holds its volume is gone for good: the process is killed,
    /// the claims' directories are deleted, and the Pod stays `Unschedulable` for as long as those
    /// claims exist (see `statefulset`). Fails when no process runs for that Pod.
    pub async fn lose_machine(&self, name: &str) -> anyhow::Result<()> {
        let (reply, answer) = oneshot::channel();
        let gone = || anyhow::anyhow!("the stand-in kubelet has stopped");
        self.requests.send(Request::LoseMachine { pod: name.to_owned(), reply }).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Crashes the Pod's process (SIGKILL, reaped at once) and empties its volumes' directories
    /// before the kubelet restarts it: the same Pod, identity and claim, with no data (a disk
    /// replaced under a node, or a volume wiped by hand).
    pub async fn wipe_volume(&self, name: &str) -> anyhow::Result<()> {
        let (reply, answer) = oneshot::channel();
        let gone = || anyhow::anyhow!("the stand-in kubelet has stopped");
        self.requests.send(Request::WipeVolume { pod: name.to_owned(), reply }).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// The Pod's IP, while the kubelet runs that Pod.
    pub fn pod_address(&self, name: &str) -> Option<String> {
        self.shared.addresses.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(name).cloned()
    }

    /// The simulated DNS: `<podIP> <fqdn>` lines, one per started Pod with a `subdomain`.
    pub fn hosts_file(&self) -> PathBuf {
        self.shared.hosts_file()
    }

    /// Where the Pod's process writes its stdout and stderr.
    pub fn log_file(&self, pod: &str) -> PathBuf {
        self.shared.log_file(pod)
    }

    /// The directory standing in for the PersistentVolumeClaim `claim`.
    pub fn claim_dir(&self, claim: &str) -> PathBuf {
        self.shared.claim_dir(claim)
    }
}

impl Drop for StandInKubelet {
    fn drop(&mut self) {
        // Aborting drops the loop's future, and with it every `NodeProcess`, which kills and reaps.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The loop: the StatefulSet controller, kubelet, garbage collector and DNS in one. Its methods
/// live in the module of the part they belong to.
struct Kubelet {
    shared: Arc<Shared>,
    pods: Api<Pod>,
    sets: Api<StatefulSet>,
    claims: Api<PersistentVolumeClaim>,
    secrets: Api<Secret>,
    config_maps: Api<ConfigMap>,
    http: reqwest::Client,
    /// The Pods this kubelet runs, by name: at most one per name, so two processes never share a
    /// claim directory. Owned by the loop alone (no lock).
    slots: BTreeMap<String, Slot>,
    /// The last complaint per key, so a persisting problem is logged once rather than every tick.
    complaints: HashMap<String, String>,
    hosts_written: Option<String>,
    /// Uids of the claims whose machine is lost.
    lost_claims: BTreeSet<String>,
    /// Uids of the Pods whose `Unschedulable` status is written.
    reported_unschedulable: BTreeSet<String>,
}

impl Kubelet {
    fn new(client: Client, shared: Arc<Shared>) -> Kubelet {
        let ns = shared.namespace.clone();
        Kubelet {
            pods: Api::namespaced(client.clone(), &ns),
            sets: Api::namespaced(client.clone(), &ns),
            claims: Api::namespaced(client.clone(), &ns),
            secrets: Api::namespaced(client.clone(), &ns),
            config_maps: Api::namespaced(client, &ns),
            shared,
            http: probe::probe_client(),
            slots: BTreeMap::new(),
            complaints: HashMap::new(),
            hosts_written: None,
            lost_claims: BTreeSet::new(),
            reported_unschedulable: BTreeSet::new(),
        }
    }

    /// Ticks until told to stop, answering requests between ticks; then stops every process.
    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Request>, mut shutdown: oneshot::Receiver<()>) {
        'ticks: loop {
            tokio::select! {
                // A tick cut short leaves consistent slots: nothing awaits between a spawn or a
                // signal and recording it.
                _ = &mut shutdown => break,
                () = self.tick() => {}
            }
            let pause = tokio::time::sleep(TICK);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut shutdown => break 'ticks,
                    Some(request) = requests.recv() => self.serve(request).await,
                    () = &mut pause => break,
                }
            }
        }
        self.shut_down().await;
    }

    async fn serve(&mut self, request: Request) {
        match request {
            Request::Kill { pod, reply } => {
                let _ = reply.send(self.kill(&pod));
            }
            Request::LoseMachine { pod, reply } => {
                let _ = reply.send(self.lose_machine(&pod).await);
            }
            Request::WipeVolume { pod, reply } => {
                let _ = reply.send(self.wipe_volume(&pod));
            }
        }
    }

    /// See [`StandInKubelet::wipe_volume`].
    fn wipe_volume(&mut self, name: &str) -> anyhow::Result<()> {
        let slot = self.slots.get_mut(name).ok_or_else(|| anyhow::anyhow!("the kubelet runs no pod {name}"))?;
        let mut process = slot.process.take().ok_or_else(|| anyhow::anyhow!("pod {name} has no running process"))?;
        process.kill();
        slot.container.exited(137, std::time::Instant::now());
        let claims = claim_names(&slot.pod);
        for claim in &claims {
            let dir = self.shared.claim_dir(claim);
            std::fs::remove_dir_all(&dir).map_err(|e| anyhow::anyhow!("emptying {}: {e}", dir.display()))?;
            std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        }
        self.say(format_args!("killed pod {name} and emptied its volumes ({})", claims.join(", ")));
        Ok(())
    }

    /// See [`StandInKubelet::lose_machine`].
    async fn lose_machine(&mut self, name: &str) -> anyhow::Result<()> {
        let slot = self.slots.get(name).ok_or_else(|| anyhow::anyhow!("the kubelet runs no pod {name}"))?;
        let claims = claim_names(&slot.pod);
        for claim in &claims {
            let uid = self.claims.get(claim).await?.metadata.uid.unwrap_or_default();
            self.lost_claims.insert(uid);
        }
        // Stopping (not restarted), then killed at once: the machine is gone, not shut down.
        if let Some(slot) = self.slots.get_mut(name) {
            slot.stop(false);
            if let Some(process) = slot.process.as_ref() {
                process.signal(kvs_testkit::process::Signal::KILL);
            }
        }
        for claim in &claims {
            let dir = self.shared.claim_dir(claim);
            std::fs::remove_dir_all(&dir).map_err(|e| anyhow::anyhow!("deleting {}: {e}", dir.display()))?;
        }
        self.say(format_args!("lost the machine of pod {name} and its volume ({})", claims.join(", ")));
        Ok(())
    }

    /// The Pods (by name) whose claims are on a lost machine.
    async fn pods_on_lost_machines(&mut self, pods: &[Pod]) -> BTreeSet<String> {
        if self.lost_claims.is_empty() {
            return BTreeSet::new();
        }
        let claims = match self.claims.list(&ListParams::default()).await {
            Ok(list) => list.items,
            Err(e) => {
                self.complain("listing claims", e);
                return BTreeSet::new();
            }
        };
        let lost: BTreeSet<&str> = claims
            .iter()
            .filter(|c| c.metadata.uid.as_ref().is_some_and(|u| self.lost_claims.contains(u)))
            .filter_map(|c| c.metadata.name.as_deref())
            .collect();
        pods.iter()
            .filter(|p| claim_names(p).iter().any(|c| lost.contains(c.as_str())))
            .filter_map(|p| p.metadata.name.clone())
            .collect()
    }

    /// Writes the status of a Pod that cannot be scheduled (once per Pod).
    async fn report_unschedulable(&mut self, name: &str, uid: &str) {
        if self.reported_unschedulable.contains(uid) {
            return;
        }
        let patch = serde_json::json!({
            "metadata": { "uid": uid },
            "status": {
                "phase": "Pending",
                "podIP": null,
                "podIPs": null,
                "containerStatuses": null,
                "conditions": [
                    { "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": now(),
                      "message": "0/1 nodes are available: the node that holds this pod's volume is gone (stand-in kubelet)" },
                    { "type": "Ready", "status": "False", "lastTransitionTime": now() },
                ],
            }
        });
        let key = format!("pod {name} status");
        match self.pods.patch_status(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await {
            Ok(_) => {
                self.resolved(&key);
                self.reported_unschedulable.insert(uid.to_owned());
                self.say(format_args!("pod {name} is unschedulable (its machine is lost)"));
            }
            Err(e) => self.complain(key, e),
        }
    }

    async fn tick(&mut self) {
        let lp = ListParams::default();
        let (sets, pods) = match tokio::try_join!(self.sets.list(&lp), self.pods.list(&lp)) {
            Ok((sets, pods)) => (sets.items, pods.items),
            Err(e) => return self.complain("listing", e),
        };
        self.resolved("listing");
        self.control(&sets, &pods).await;
        // A Pod's name resolves once it has an IP, before its process starts (cluster DNS
        // publishes not-ready addresses of the headless Service), so peers can reach a node as
        // soon as it serves.
        self.write_hosts();
        self.supervise().await;
        self.refresh_secret_volumes().await;
        self.probe().await;
        self.write_pod_statuses().await;
        self.write_set_statuses(&sets, &pods).await;
        self.write_hosts();
    }

    /// Publishes the addresses of the Pods the loop runs (not those whose process is gone and
    /// whose object is about to be deleted: a test that sees the object gone must not see them).
    fn publish(&self) {
        let addresses = self
            .slots
            .iter()
            .filter(|(_, s)| !s.container.is_finished())
            .map(|(name, s)| (name.clone(), s.ip.clone()))
            .collect();
        *self.shared.addresses.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = addresses;
    }

    fn say(&self, what: impl Display) {
        self.shared.say(what);
    }

    /// Logs `message` under `key` unless it is what was last logged there.
    fn complain(&mut self, key: impl Into<String>, message: impl Display) {
        let (key, message) = (key.into(), message.to_string());
        if self.complaints.get(&key) != Some(&message) {
            self.say(format_args!("{key}: {message}"));
            self.complaints.insert(key, message);
        }
    }

    fn resolved(&mut self, key: &str) {
        self.complaints.remove(key);
    }
}

/// The claims a Pod's volumes name.
fn claim_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| Some(v.persistent_volume_claim.as_ref()?.claim_name.clone()))
        .collect()
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}
