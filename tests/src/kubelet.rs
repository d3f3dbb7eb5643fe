//! A stand-in for the parts of a Kubernetes cluster that the test API server lacks (see
//! `../shared/k8s/README.md`): the StatefulSet controller, the kubelet, the garbage collector and
//! cluster DNS. It runs as one tokio task in the test process and starts a real `kvs-node` process
//! for every Pod, so an end-to-end test can drive the operator against a real API server and see
//! real nodes come and go. It is deliberately small: it does what the operator relies on, and says
//! here what it fakes and what it leaves out.
//!
//! # What it does, as the real components would
//! Every 200 ms it lists the StatefulSets and Pods of one namespace and:
//! - **StatefulSet controller** — for `spec.replicas = N` it keeps Pods `<sts>-0 … <sts>-N-1`,
//!   built from `spec.template` with an owner reference to the StatefulSet (`controller: true`),
//!   `hostname = <pod>`, `subdomain = spec.serviceName`, the labels
//!   `statefulset.kubernetes.io/pod-name` and `apps.kubernetes.io/pod-index`, and one
//!   `persistentVolumeClaim` volume per `volumeClaimTemplates[i]` named `<claim>-<pod>` (the claim
//!   object is created first when missing). All missing Pods are created at once (the `Parallel`
//!   pod management policy, whatever the spec says). Pods with an ordinal `>= N` are removed one at
//!   a time, highest ordinal first: SIGTERM, up to 10 s to exit, SIGKILL, then the Pod object is
//!   deleted. A Pod deleted by someone else (`kubectl delete pod`) loses its process and is
//!   created again under the same name with the same claim, so identity and data survive. Writes
//!   the status subresource: `replicas`, `readyReplicas`, `currentReplicas`, `updatedReplicas`,
//!   `availableReplicas` (honouring `minReadySeconds`), `observedGeneration`, computed from the
//!   Pods as listed (so it never runs ahead of what the Pods say).
//! - **kubelet** — runs each Pod's first container as one `kvs-node` process (`node_bin`; the
//!   image and `command` are ignored, `args` are passed with `$(VAR)` expansion) with the
//!   container's `env` resolved in order: `value` with Kubernetes `$(VAR)` expansion of variables
//!   defined before it (`$$` escapes), `valueFrom.fieldRef` (`metadata.name`, `metadata.namespace`,
//!   `metadata.uid`, `status.podIP`), `secretKeyRef` and `configMapKeyRef` read through the API.
//!   A missing Secret, ConfigMap or key (not marked `optional`) keeps the container waiting with
//!   reason `CreateContainerConfigError`, retried every second, as the real kubelet does. Volumes:
//!   `persistentVolumeClaim`, `emptyDir` and `secret` (all keys, or `items`). A process that exits
//!   on its own is restarted (`restartPolicy: Always`) after a back-off of 0.5 s doubling to 10 s
//!   (reset once a run lasted 10 s), with the same IP and data. The readiness probe (`httpGet`
//!   only; `initialDelaySeconds`, `timeoutSeconds` and `failureThreshold` honoured, `periodSeconds`
//!   replaced by every tick) is sent to `<podIP>:<port>`; no probe (or one of another kind) means
//!   ready once running. Pod status goes through the status subresource: `phase` (`Pending` until
//!   the first start, then `Running`), `podIP`, `podIPs`, `startTime`, conditions `PodScheduled`,
//!   `Initialized`, `ContainersReady` and `Ready`, and one `containerStatuses` entry with `ready`,
//!   `started`, `restartCount`, `state` and `lastState`.
//! - **garbage collector** — Pods whose controlling StatefulSet is gone lose their process and are
//!   deleted; a StatefulSet deleted with `propagationPolicy: Foreground` has its Pods removed and
//!   then its `foregroundDeletion` finalizer released. Claims are kept (like the default
//!   `persistentVolumeClaimRetentionPolicy`, Retain), object and directory alike.
//!
//! # What is simulated, and how
//! - **Pod network.** Every Pod gets its own loopback address `<address_prefix><n>` (n = the lowest
//!   free of 1..=254). A container restart keeps it; a Pod deleted and created again may get
//!   another. Real Pods each have a network namespace, so they all bind `0.0.0.0`; here they
//!   share the host's loopback, so an env var `LISTEN=0.0.0.0:<port>` is rewritten to
//!   `LISTEN=<podIP>:<port>`.
//! - **Volumes.** The claim `<claim>-<pod>` is the directory `<root>/pvc/<namespace>/<claim>-<pod>`,
//!   kept when the Pod goes. `emptyDir` and `secret` volumes are directories under
//!   `<root>/pods/<namespace>/<pod uid>/`. There is no mount namespace, so an env var (or arg)
//!   whose value is a mount path `M` or starts with `M/` is rewritten to the directory.
//! - **Cluster DNS.** `<root>/hosts` has one line `<podIP> <pod>.<subdomain>.<namespace>.svc.cluster.local`
//!   per Pod that has started and is not being removed (rewritten atomically: temp file +
//!   rename); every process gets `KVS_HOSTS_FILE=<root>/hosts` and resolves through it the names
//!   cluster DNS would. Unlike real DNS it does not require a headless Service named `subdomain`.
//! - **Logs.** A container's stdout and stderr are appended to `<root>/logs/<namespace>/<pod>.log`,
//!   with a marker line at every start.
//!
//! # What it does not do
//! No rolling updates: a template changed after a Pod was created is ignored until that Pod is
//! deleted (no `controller-revision-hash`, no `currentRevision`/`updateRevision`). No scheduler,
//! so `spec.nodeName` stays empty and the API server deletes Pods at once, without the graceful
//! deletion handshake (a Pod that does carry a `deletionTimestamp` is stopped and then deleted).
//! `OrderedReady`, `spec.ordinals`, `updateStrategy`, orphan deletion, adoption of orphaned
//! Pods, liveness and startup probes, exec/tcp/grpc probes, `envFrom`, other volume types,
//! resource limits, init and sidecar containers, Events, Services and EndpointSlices are not
//! simulated. Only Pods controlled by a StatefulSet are run, by one kubelet per namespace, which
//! polls rather than watches. Stopping the kubelet ([`StandInKubelet::stop`] or drop) stops every
//! process but leaves the objects as they were, like a node that vanished.

use futures::future::join_all;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVarSource, PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, PodSpec, Secret,
    Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// The environment variable that points a node at the simulated DNS (the hosts file).
pub const HOSTS_FILE_ENV: &str = "KVS_HOSTS_FILE";

const TICK: Duration = Duration::from_millis(200);
/// Longest a process gets between SIGTERM and SIGKILL (`terminationGracePeriodSeconds`, capped).
const MAX_GRACE: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A run at least this long resets the crash back-off.
const STABLE_RUN: Duration = Duration::from_secs(10);
const CONFIG_RETRY: Duration = Duration::from_secs(1);
const FOREGROUND_DELETION: &str = "foregroundDeletion";

/// Where and how the kubelet runs its processes.
#[derive(Clone, Debug)]
pub struct KubeletOptions {
    /// The `kvs-node` binary every container runs.
    pub node_bin: PathBuf,
    /// Holds `hosts`, `logs/`, `pvc/` and `pods/` (a test's temporary directory).
    pub root: PathBuf,
    /// Pod IPs are this plus 1..=254; a loopback prefix such as `127.0.61.`, distinct per kubelet.
    pub address_prefix: String,
}

/// The running stand-in; see the module docs. Dropping it kills every process it started.
pub struct StandInKubelet {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

struct Shared {
    namespace: String,
    opts: KubeletOptions,
    /// The Pods this kubelet runs. A std mutex: no holder awaits (the loop copies out what an API
    /// call needs and locks again for the answer), and `Drop` must reach it outside any runtime.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Set once by `stop`/`Drop`; after it nothing is started again.
    stopped: bool,
    /// By Pod name: at most one process per name, so two processes never share a claim directory.
    slots: BTreeMap<String, Slot>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind, still fit to stop processes.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

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
        let shared = Arc::new(Shared { namespace: namespace.to_owned(), opts, state: Mutex::new(State::default()) });
        for dir in ["logs", "pvc", "pods"] {
            let dir = shared.opts.root.join(dir).join(namespace);
            fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        }
        let hosts = shared.hosts_file();
        if !hosts.exists() {
            write_atomically(&hosts, "")?;
        }
        let kubelet = Kubelet::new(client, shared.clone());
        kubelet
            .sets
            .list(&ListParams::default())
            .await
            .map_err(|e| anyhow::anyhow!("listing StatefulSets in {namespace} (is the API server up?): {e}"))?;
        let task = tokio::spawn(kubelet.run());
        Ok(StandInKubelet { shared, task: Some(task) })
    }

    /// Stops the loop, sends every process SIGTERM and gives them 10 s before SIGKILL. Objects in
    /// the API are left as they are.
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // Wait for the loop to be gone so it cannot start anything after this.
            let _ = task.await;
        }
        let deadline = Instant::now() + MAX_GRACE;
        {
            let mut state = self.shared.lock();
            state.stopped = true;
            for slot in state.slots.values_mut() {
                if let Some(p) = &slot.process {
                    signal(p.child.id(), "TERM");
                }
            }
        }
        while Instant::now() < deadline {
            let running = {
                let mut state = self.shared.lock();
                let slots = state.slots.values_mut();
                slots.map(|s| s.reap().is_none() && s.process.is_some()).filter(|running| *running).count()
            };
            if running == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Drop kills whatever is left.
    }

    /// SIGKILLs the Pod's process, as a crashed container; the kubelet restarts it with the same IP
    /// and data directory. Fails when no process runs for that Pod.
    pub fn kill_pod(&self, name: &str) -> anyhow::Result<()> {
        let mut state = self.shared.lock();
        let slot = state.slots.get_mut(name).ok_or_else(|| anyhow::anyhow!("the kubelet runs no pod {name}"))?;
        let process = slot.process.as_mut().ok_or_else(|| anyhow::anyhow!("pod {name} has no running process"))?;
        process.child.kill().map_err(|e| anyhow::anyhow!("killing pod {name}: {e}"))?;
        eprintln!("stand-in kubelet ({}): killed the process of {name} (SIGKILL)", self.shared.namespace);
        Ok(())
    }

    /// The Pod's IP, while the kubelet runs that Pod.
    pub fn pod_address(&self, name: &str) -> Option<String> {
        self.shared.lock().slots.get(name).map(|s| s.ip.clone())
    }

    /// The simulated DNS: `<podIP> <fqdn>` lines (see the module docs).
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
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let mut state = self.shared.lock();
        // The flag keeps a loop that is between two awaits from starting anything new.
        state.stopped = true;
        for slot in state.slots.values_mut() {
            if let Some(mut p) = slot.process.take() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
    }
}

/// One Pod the kubelet runs: its sandbox (the IP), its container (the process) and what it reports.
struct Slot {
    /// The Pod object as last listed.
    pod: Pod,
    /// Tells this Pod apart from a later one of the same name.
    uid: String,
    /// The controlling StatefulSet's uid.
    owner_uid: String,
    ip: String,
    octet: u8,
    created: Time,
    process: Option<Process>,
    started_once: bool,
    restarts: i32,
    last_exit: Option<Exit>,
    next_start: Instant,
    crash_streak: u32,
    /// Why no process runs yet (`reason`, `message`), e.g. a missing Secret.
    waiting: Option<(&'static str, String)>,
    ready: bool,
    ready_since: Time,
    probe_failures: i32,
    stopping: Option<Stopping>,
    /// The status last written to the API, so unchanged status is not written again.
    written: Option<Value>,
}

struct Process {
    child: Child,
    started: Time,
    since: Instant,
}

#[derive(Clone)]
struct Exit {
    code: i32,
    started: Time,
    finished: Time,
}

struct Stopping {
    deadline: Instant,
    term_sent: bool,
    /// Delete the Pod object once the process is gone (scale-down, garbage collection); false
    /// when the object is already gone.
    delete_object: bool,
}

impl Slot {
    fn new(pod: &Pod, uid: &str, owner_uid: &str, prefix: &str, octet: u8) -> Slot {
        Slot {
            pod: pod.clone(),
            uid: uid.to_owned(),
            owner_uid: owner_uid.to_owned(),
            ip: format!("{prefix}{octet}"),
            octet,
            created: now(),
            process: None,
            started_once: false,
            restarts: 0,
            last_exit: None,
            next_start: Instant::now(),
            crash_streak: 0,
            waiting: None,
            ready: false,
            ready_since: now(),
            probe_failures: 0,
            stopping: None,
            written: None,
        }
    }

    fn name(&self) -> String {
        self.pod.name_any()
    }

    fn set_ready(&mut self, ready: bool) {
        if self.ready != ready {
            self.ready = ready;
            self.ready_since = now();
        }
    }

    /// Begins stopping the process (idempotent; `delete_object` only ever turns on).
    fn stop(&mut self, delete_object: bool) {
        self.set_ready(false);
        match &mut self.stopping {
            Some(s) => s.delete_object |= delete_object,
            None => {
                let grace = self
                    .pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
                    .map_or(MAX_GRACE, |s| Duration::from_secs(s.max(0).unsigned_abs()).min(MAX_GRACE));
                self.stopping = Some(Stopping { deadline: Instant::now() + grace, term_sent: false, delete_object });
            }
        }
    }

    /// Collects the process if it has exited.
    fn reap(&mut self) -> Option<ExitStatus> {
        let process = self.process.as_mut()?;
        let status = process.child.try_wait().ok()??;
        let since = process.since;
        let started = process.started.clone();
        self.process = None;
        let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        self.last_exit = Some(Exit { code, started, finished: now() });
        self.set_ready(false);
        if since.elapsed() >= STABLE_RUN {
            self.crash_streak = 0;
        }
        let backoff = FIRST_BACKOFF.saturating_mul(1 << self.crash_streak.min(8)).min(MAX_BACKOFF);
        self.crash_streak += 1;
        self.next_start = Instant::now() + backoff;
        Some(status)
    }

    fn start(&mut self, shared: &Shared, launch: Launch) -> Result<(), String> {
        let name = self.name();
        let path = shared.log_file(&name);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        let restart = if self.started_once { self.restarts + 1 } else { 0 };
        let _ = writeln!(log, "--- stand-in kubelet: starting {name} at {} (restart {restart}) ---", now().0);
        let stderr = log.try_clone().map_err(|e| format!("opening {}: {e}", path.display()))?;
        let child = Command::new(&shared.opts.node_bin)
            .args(&launch.args)
            .env_clear()
            .envs(launch.env)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", shared.opts.node_bin.display()))?;
        self.restarts = restart.max(self.restarts);
        self.started_once = true;
        self.process = Some(Process { child, started: now(), since: Instant::now() });
        self.waiting = None;
        self.probe_failures = 0;
        Ok(())
    }

    /// The merge patch for the Pod's status subresource. It carries `metadata.uid` so it cannot
    /// land on a later Pod of the same name.
    fn status_patch(&self) -> Value {
        let container = self.pod.spec.as_ref().and_then(|s| s.containers.first());
        let ready = self.ready && self.stopping.is_none();
        let state = match (&self.process, &self.stopping, &self.waiting, &self.last_exit) {
            (Some(p), _, _, _) => json!({ "running": { "startedAt": p.started } }),
            (None, Some(_), _, Some(exit)) => json!({ "terminated": exit.json() }),
            (None, _, Some((reason, message)), _) => json!({ "waiting": { "reason": reason, "message": message } }),
            (None, _, None, Some(_)) => {
                json!({ "waiting": { "reason": "CrashLoopBackOff", "message": "back-off restarting the failed container" } })
            }
            (None, _, None, None) => json!({ "waiting": { "reason": "ContainerCreating" } }),
        };
        let last_state = self.last_exit.as_ref().map_or_else(|| json!({}), |e| json!({ "terminated": e.json() }));
        let flag = if ready { "True" } else { "False" };
        json!({
            "metadata": { "uid": self.uid },
            "status": {
                "phase": if self.started_once { "Running" } else { "Pending" },
                "podIP": self.ip,
                "podIPs": [{ "ip": self.ip }],
                "startTime": self.created,
                "conditions": [
                    { "type": "PodScheduled", "status": "True", "lastTransitionTime": self.created },
                    { "type": "Initialized", "status": "True", "lastTransitionTime": self.created },
                    { "type": "ContainersReady", "status": flag, "lastTransitionTime": self.ready_since },
                    { "type": "Ready", "status": flag, "lastTransitionTime": self.ready_since },
                ],
                "containerStatuses": [{
                    "name": container.map(|c| c.name.as_str()).unwrap_or_default(),
                    "image": container.and_then(|c| c.image.as_deref()).unwrap_or_default(),
                    "imageID": "",
                    "ready": ready,
                    "started": self.process.is_some(),
                    "restartCount": self.restarts,
                    "state": state,
                    "lastState": last_state,
                }],
            }
        })
    }
}

impl Exit {
    fn json(&self) -> Value {
        json!({
            "exitCode": self.code,
            "reason": if self.code == 0 { "Completed" } else { "Error" },
            "startedAt": self.started,
            "finishedAt": self.finished,
        })
    }
}

/// What a container is started with.
struct Launch {
    env: Vec<(String, String)>,
    args: Vec<String>,
}

/// What one tick decided to do through the API, beyond the slots it changed.
#[derive(Default)]
struct Plan {
    /// Pods to create: (StatefulSet, ordinal).
    create: Vec<(StatefulSet, i32)>,
    /// Pod objects that run no process here to delete: (name, uid).
    delete: Vec<(String, String)>,
    /// StatefulSets in foreground deletion whose Pods are all gone.
    release: Vec<StatefulSet>,
    /// Problems worth a log line: (key, message).
    complaints: Vec<(String, String)>,
}

/// The loop: the StatefulSet controller, kubelet, garbage collector and DNS in one.
struct Kubelet {
    shared: Arc<Shared>,
    pods: Api<Pod>,
    sets: Api<StatefulSet>,
    claims: Api<PersistentVolumeClaim>,
    secrets: Api<Secret>,
    config_maps: Api<ConfigMap>,
    http: reqwest::Client,
    /// The last complaint per key, so a persisting problem is logged once rather than every tick.
    complaints: HashMap<String, String>,
    hosts_written: Option<String>,
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
            http: reqwest::Client::new(),
            complaints: HashMap::new(),
            hosts_written: None,
        }
    }

    async fn run(mut self) {
        loop {
            self.tick().await;
            tokio::time::sleep(TICK).await;
        }
    }

    fn say(&self, what: impl Display) {
        eprintln!("stand-in kubelet ({}): {what}", self.shared.namespace);
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

    async fn tick(&mut self) {
        let lp = ListParams::default();
        let (sets, pods) = match tokio::try_join!(self.sets.list(&lp), self.pods.list(&lp)) {
            Ok((sets, pods)) => (sets.items, pods.items),
            Err(e) => return self.complain("listing", e),
        };
        self.resolved("listing");
        let plan = self.plan(&sets, &pods);
        self.apply(plan).await;
        self.supervise().await;
        self.probe().await;
        self.write_pod_statuses().await;
        self.write_set_statuses(&sets, &pods).await;
        self.write_hosts();
    }

    /// Compares what the StatefulSets want with the Pods and the processes; changes the slots
    /// (new Pods to run, processes to stop) and returns the API calls to make.
    fn plan(&self, sets: &[StatefulSet], pods: &[Pod]) -> Plan {
        let mut plan = Plan::default();
        let live: HashMap<&str, &StatefulSet> = sets
            .iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .filter_map(|s| Some((s.metadata.uid.as_deref()?, s)))
            .collect();
        let listed: HashMap<&str, &Pod> = pods.iter().filter_map(|p| Some((p.metadata.name.as_deref()?, p))).collect();
        let mut state = self.shared.lock();
        let slots = &mut state.slots;

        // A Pod object that is gone, or replaced by another of the same name: stop its process.
        for (name, slot) in slots.iter_mut() {
            if listed.get(name.as_str()).and_then(|p| p.metadata.uid.as_deref()) != Some(slot.uid.as_str()) {
                slot.stop(false);
            }
        }

        let mut excess: BTreeMap<&str, Vec<(i32, &str, &str)>> = BTreeMap::new();
        for pod in pods {
            let (Some(name), Some(uid)) = (pod.metadata.name.as_deref(), pod.metadata.uid.as_deref()) else { continue };
            let Some(owner) = statefulset_owner(pod) else {
                // Not ours to run (only StatefulSet Pods are).
                if let Some(slot) = slots.get_mut(name).filter(|s| s.uid == uid) {
                    slot.stop(false);
                }
                continue;
            };
            let Some(sts) = live.get(owner.uid.as_str()) else {
                // The garbage collector's part: the controller is gone (or going).
                stop_and_delete(slots, &mut plan, name, uid);
                continue;
            };
            if pod.metadata.deletion_timestamp.is_some() {
                // Graceful deletion: the kubelet stops the container, then confirms.
                stop_and_delete(slots, &mut plan, name, uid);
                continue;
            }
            let sts_name = sts.metadata.name.as_deref().unwrap_or_default();
            match ordinal(name, sts_name) {
                Some(i) if i < replicas(sts) => match slots.get_mut(name) {
                    Some(slot) if slot.uid == uid => slot.pod = pod.clone(),
                    // The process of an earlier Pod of this name is still stopping; start after it.
                    Some(_) => {}
                    None => match free_octet(slots) {
                        Some(octet) => {
                            let slot = Slot::new(pod, uid, &owner.uid, &self.shared.opts.address_prefix, octet);
                            self.say(format_args!("running pod {name} at {}", slot.ip));
                            slots.insert(name.to_owned(), slot);
                        }
                        None => {
                            plan.complaints.push((format!("pod {name}"), "no free address left in the pool".into()))
                        }
                    },
                },
                other => excess.entry(sts_name).or_default().push((other.unwrap_or(i32::MAX), name, uid)),
            }
        }

        // Scale down one Pod at a time per StatefulSet, highest ordinal first.
        for doomed in excess.into_values() {
            if let Some(&(_, name, uid)) = doomed.iter().max_by_key(|(ordinal, _, _)| *ordinal) {
                stop_and_delete(slots, &mut plan, name, uid);
            }
        }

        // Scale up: every missing Pod at once, unless a process of that name still stops.
        for sts in live.values() {
            let sts_name = sts.metadata.name.as_deref().unwrap_or_default();
            for i in 0..replicas(sts) {
                let name = format!("{sts_name}-{i}");
                if !listed.contains_key(name.as_str()) && !slots.contains_key(&name) {
                    plan.create.push(((*sts).clone(), i));
                }
            }
        }

        // Foreground deletion: release the StatefulSet once nothing of it is left.
        for sts in sets.iter().filter(|s| s.metadata.deletion_timestamp.is_some()) {
            let waiting = sts.finalizers().iter().any(|f| f == FOREGROUND_DELETION);
            let uid = sts.metadata.uid.as_deref().unwrap_or_default();
            let left = pods.iter().any(|p| statefulset_owner(p).is_some_and(|o| o.uid == uid))
                || slots.values().any(|s| s.owner_uid == uid);
            if waiting && !left {
                plan.release.push(sts.clone());
            }
        }
        plan
    }

    async fn apply(&mut self, plan: Plan) {
        for (key, message) in plan.complaints {
            self.complain(key, message);
        }
        for (sts, i) in plan.create {
            self.create_pod(&sts, i).await;
        }
        for (name, uid) in plan.delete {
            let key = format!("deleting pod {name}");
            match self.delete_pod(&name, &uid).await {
                Ok(()) => self.resolved(&key),
                Err(e) => self.complain(key, e),
            }
        }
        for sts in plan.release {
            let name = sts.name_any();
            let finalizers: Vec<&String> = sts.finalizers().iter().filter(|f| *f != FOREGROUND_DELETION).collect();
            // The resourceVersion makes this fail on a concurrent change; the next tick retries.
            let patch = json!({ "metadata": { "finalizers": finalizers, "resourceVersion": sts.resource_version() } });
            let key = format!("releasing statefulset {name}");
            match self.sets.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    self.resolved(&key);
                    self.say(format_args!("released statefulset {name} (its pods are gone)"));
                }
                Err(e) => self.complain(key, e),
            }
        }
    }

    /// Creates the claims of Pod `<sts>-<i>` when missing, then the Pod.
    async fn create_pod(&mut self, sts: &StatefulSet, ordinal: i32) {
        let pod = build_pod(sts, ordinal);
        let name = pod.name_any();
        let key = format!("creating pod {name}");
        for claim in build_claims(sts, &name) {
            let claim_name = claim.name_any();
            if let Err(e) = fs::create_dir_all(self.shared.claim_dir(&claim_name)) {
                return self.complain(key, format_args!("claim directory: {e}"));
            }
            match self.claims.create(&PostParams::default(), &claim).await {
                Ok(_) => self.say(format_args!("created persistentvolumeclaim {claim_name}")),
                Err(kube::Error::Api(s)) if s.is_already_exists() => {}
                Err(e) => return self.complain(key, format_args!("claim {claim_name}: {e}")),
            }
        }
        match self.pods.create(&PostParams::default(), &pod).await {
            Ok(_) => {
                self.resolved(&key);
                self.say(format_args!("created pod {name}"));
            }
            // Someone else was quicker; the next tick sees it.
            Err(kube::Error::Api(s)) if s.is_already_exists() => {}
            Err(e) => self.complain(key, e),
        }
    }

    /// Deletes the Pod object `name` if it is still the one with `uid`; gone counts as done.
    async fn delete_pod(&self, name: &str, uid: &str) -> Result<(), kube::Error> {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions { uid: Some(uid.to_owned()), resource_version: None }),
            ..DeleteParams::default()
        };
        match self.pods.delete(name, &dp).await {
            Ok(_) => {
                self.say(format_args!("deleted pod {name}"));
                Ok(())
            }
            // Not found, or the uid precondition failed: that Pod is gone either way.
            Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Collects exited processes, drives stops (SIGTERM, SIGKILL after the grace period, then the
    /// object's deletion) and starts the processes that are due.
    async fn supervise(&mut self) {
        let shared = self.shared.clone();
        let mut finished = Vec::new();
        let mut due = Vec::new();
        {
            let mut state = shared.lock();
            let stopped = state.stopped;
            for (name, slot) in state.slots.iter_mut() {
                if let Some(status) = slot.reap()
                    && slot.stopping.is_none()
                {
                    self.say(format_args!("pod {name}: process exited ({status}); restarting it"));
                }
                if let Some(stop) = slot.stopping.as_mut() {
                    match slot.process.as_mut() {
                        Some(p) if !stop.term_sent => {
                            signal(p.child.id(), "TERM");
                            stop.term_sent = true;
                        }
                        Some(p) if Instant::now() >= stop.deadline => {
                            self.say(format_args!("pod {name}: still running after the grace period; SIGKILL"));
                            let _ = p.child.kill();
                        }
                        Some(_) => {}
                        None => finished.push((name.clone(), slot.uid.clone(), stop.delete_object)),
                    }
                } else if slot.process.is_none() && !stopped && Instant::now() >= slot.next_start {
                    due.push((name.clone(), slot.uid.clone(), slot.pod.clone(), slot.ip.clone()));
                }
            }
        }
        for (name, uid, delete_object) in finished {
            if delete_object {
                let key = format!("deleting pod {name}");
                match self.delete_pod(&name, &uid).await {
                    Ok(()) => self.resolved(&key),
                    Err(e) => {
                        self.complain(key, e);
                        continue;
                    }
                }
            }
            let mut state = shared.lock();
            if state.slots.get(&name).is_some_and(|s| s.uid == uid) {
                state.slots.remove(&name);
                self.say(format_args!("stopped pod {name}"));
            }
        }
        for (name, uid, pod, ip) in due {
            let launch = self.launch_config(&pod, &ip).await;
            let key = format!("starting pod {name}");
            let outcome = {
                let mut state = shared.lock();
                if state.stopped {
                    return;
                }
                let Some(slot) =
                    state.slots.get_mut(&name).filter(|s| s.uid == uid && s.stopping.is_none() && s.process.is_none())
                else {
                    continue;
                };
                let outcome = launch.and_then(|launch| slot.start(&shared, launch));
                if let Err(message) = &outcome {
                    slot.waiting = Some(("CreateContainerConfigError", message.clone()));
                    slot.next_start = Instant::now() + CONFIG_RETRY;
                }
                outcome.map(|()| slot.restarts)
            };
            match outcome {
                Ok(restarts) => {
                    self.resolved(&key);
                    self.say(format_args!("started pod {name} (restarts: {restarts})"));
                }
                Err(message) => self.complain(key, message),
            }
        }
    }

    /// The container's environment and arguments, with the simulations of the module docs applied.
    async fn launch_config(&self, pod: &Pod, ip: &str) -> Result<Launch, String> {
        let spec = pod.spec.as_ref().ok_or("the pod has no spec")?;
        let container = spec.containers.first().ok_or("the pod has no containers")?;
        if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
            return Err("envFrom is not simulated by the stand-in kubelet".into());
        }
        let mut mounts = self.mount_volumes(pod, spec, container).await?;
        // Longest mount path first, so a nested mount wins over its parent.
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        let mut env: Vec<(String, String)> = Vec::new();
        let mut vars: HashMap<String, String> = HashMap::new();
        for var in container.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (_, Some(source)) => match self.env_source(pod, ip, source).await? {
                    Some(v) => v,
                    None => continue,
                },
                (Some(v), None) => expand(v, &vars),
                (None, None) => String::new(),
            };
            let value = simulate(&var.name, &value, ip, &mounts);
            vars.insert(var.name.clone(), value.clone());
            env.retain(|(k, _)| *k != var.name);
            env.push((var.name.clone(), value));
        }
        env.push(("HOSTNAME".into(), pod.name_any()));
        env.push((HOSTS_FILE_ENV.into(), self.shared.hosts_file().display().to_string()));
        let args = container.args.iter().flatten().map(|a| rewrite_mounts(&expand(a, &vars), &mounts)).collect();
        Ok(Launch { env, args })
    }

    async fn env_source(&self, pod: &Pod, ip: &str, source: &EnvVarSource) -> Result<Option<String>, String> {
        if let Some(field) = &source.field_ref {
            return match field.field_path.as_str() {
                "metadata.name" => Ok(Some(pod.name_any())),
                "metadata.namespace" => Ok(Some(self.shared.namespace.clone())),
                "metadata.uid" => Ok(pod.metadata.uid.clone()),
                "status.podIP" => Ok(Some(ip.to_owned())),
                other => Err(format!("fieldRef {other} is not simulated by the stand-in kubelet")),
            };
        }
        if let Some(sel) = &source.secret_key_ref {
            let secret =
                self.secrets.get_opt(&sel.name).await.map_err(|e| format!("reading secret {:?}: {e}", sel.name))?;
            let value = secret
                .as_ref()
                .and_then(|s| s.data.as_ref()?.get(&sel.key))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned());
            return match (value, secret.is_some()) {
                (Some(v), _) => Ok(Some(v)),
                (None, _) if sel.optional == Some(true) => Ok(None),
                (None, true) => {
                    Err(format!("couldn't find key {} in Secret {}/{}", sel.key, self.shared.namespace, sel.name))
                }
                (None, false) => Err(format!("secret {:?} not found", sel.name)),
            };
        }
        if let Some(sel) = &source.config_map_key_ref {
            let map = self
                .config_maps
                .get_opt(&sel.name)
                .await
                .map_err(|e| format!("reading configmap {:?}: {e}", sel.name))?;
            let value = map.as_ref().and_then(|m| m.data.as_ref()?.get(&sel.key)).cloned();
            return match (value, map.is_some()) {
                (Some(v), _) => Ok(Some(v)),
                (None, _) if sel.optional == Some(true) => Ok(None),
                (None, true) => {
                    Err(format!("couldn't find key {} in ConfigMap {}/{}", sel.key, self.shared.namespace, sel.name))
                }
                (None, false) => Err(format!("configmap {:?} not found", sel.name)),
            };
        }
        Err("this valueFrom is not simulated by the stand-in kubelet (fieldRef, secretKeyRef and configMapKeyRef are)"
            .into())
    }

    /// The container's mounts as (mount path, host directory), creating the directories.
    async fn mount_volumes(
        &self,
        pod: &Pod,
        spec: &PodSpec,
        container: &Container,
    ) -> Result<Vec<(String, PathBuf)>, String> {
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        let mut mounts = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let volume: &Volume = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .ok_or_else(|| format!("volume {:?} is mounted but not defined", mount.name))?;
            let dir = if let Some(claim) = &volume.persistent_volume_claim {
                self.shared.claim_dir(&claim.claim_name)
            } else if volume.empty_dir.is_some() {
                self.shared.pod_volume_dir(uid, &volume.name)
            } else if let Some(source) = &volume.secret {
                let dir = self.shared.pod_volume_dir(uid, &volume.name);
                let name = source.secret_name.clone().unwrap_or_default();
                let secret = self.secrets.get_opt(&name).await.map_err(|e| format!("reading secret {name:?}: {e}"))?;
                let data = match secret {
                    Some(s) => s.data.unwrap_or_default(),
                    None if source.optional == Some(true) => BTreeMap::new(),
                    None => return Err(format!("secret {name:?} not found (volume {:?})", volume.name)),
                };
                let files: Vec<(String, String)> = match &source.items {
                    Some(items) => items.iter().map(|i| (i.key.clone(), i.path.clone())).collect(),
                    None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
                };
                for (key, path) in files {
                    let bytes = data.get(&key).ok_or_else(|| {
                        format!("couldn't find key {key} in Secret {name} (volume {:?})", volume.name)
                    })?;
                    let file = dir.join(&path);
                    if let Some(parent) = file.parent() {
                        fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
                    }
                    fs::write(&file, &bytes.0).map_err(|e| format!("writing {}: {e}", file.display()))?;
                }
                dir
            } else {
                return Err(format!(
                    "volume {:?}: only persistentVolumeClaim, emptyDir and secret volumes are simulated by the stand-in kubelet",
                    volume.name
                ));
            };
            let dir = match mount.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => dir.join(sub),
                _ => dir,
            };
            fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            let path = mount.mount_path.trim_end_matches('/');
            mounts.push((if path.is_empty() { "/".to_owned() } else { path.to_owned() }, dir));
        }
        Ok(mounts)
    }

    /// Sends every running container's readiness probe, all at once, and records the answers.
    async fn probe(&mut self) {
        // (name, the process's start time identifying this run, probe)
        let mut targets: Vec<(String, Instant, ProbeTarget)> = Vec::new();
        {
            let mut state = self.shared.lock();
            for (name, slot) in state.slots.iter_mut() {
                let Some(process) = &slot.process else { continue };
                if slot.stopping.is_some() {
                    continue;
                }
                match readiness_probe(&slot.pod, &slot.ip) {
                    Some(target) if process.since.elapsed() >= target.initial_delay => {
                        targets.push((name.clone(), process.since, target))
                    }
                    Some(_) => {}
                    None => slot.set_ready(true),
                }
            }
        }
        let http = &self.http;
        let answers = join_all(targets.iter().map(|(_, _, t)| async move {
            match http.get(&t.url).timeout(t.timeout).send().await {
                Ok(r) => r.status().is_success() || r.status().is_redirection(),
                Err(_) => false,
            }
        }))
        .await;
        let mut state = self.shared.lock();
        for ((name, since, target), ok) in targets.into_iter().zip(answers) {
            let Some(slot) = state.slots.get_mut(&name) else { continue };
            // A probe of an earlier run, or of a process being stopped, says nothing now.
            if slot.process.as_ref().map(|p| p.since) != Some(since) || slot.stopping.is_some() {
                continue;
            }
            if ok {
                slot.probe_failures = 0;
                slot.set_ready(true);
            } else {
                slot.probe_failures += 1;
                if slot.probe_failures >= target.failure_threshold {
                    slot.set_ready(false);
                }
            }
        }
    }

    async fn write_pod_statuses(&mut self) {
        let patches: Vec<(String, String, Value)> = {
            let state = self.shared.lock();
            state
                .slots
                .iter()
                // A stop without deletion means the object is already gone.
                .filter(|(_, s)| s.stopping.as_ref().is_none_or(|st| st.delete_object))
                .filter_map(|(name, s)| {
                    let patch = s.status_patch();
                    (s.written.as_ref() != Some(&patch)).then(|| (name.clone(), s.uid.clone(), patch))
                })
                .collect()
        };
        for (name, uid, patch) in patches {
            let key = format!("pod {name} status");
            match self.pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    self.resolved(&key);
                    if let Some(slot) = self.shared.lock().slots.get_mut(&name).filter(|s| s.uid == uid) {
                        slot.written = Some(patch);
                    }
                }
                // Gone: the next tick's plan deals with it. (A Pod replaced under the same name
                // answers 422, "metadata.uid: field is immutable": logged, as it should be rare.)
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => self.complain(key, e),
            }
        }
    }

    async fn write_set_statuses(&mut self, sets: &[StatefulSet], pods: &[Pod]) {
        for sts in sets.iter().filter(|s| s.metadata.deletion_timestamp.is_none()) {
            let Some(uid) = sts.metadata.uid.as_deref() else { continue };
            let min_ready = sts.spec.as_ref().and_then(|s| s.min_ready_seconds).unwrap_or(0).max(0);
            let mine: Vec<&Pod> = pods
                .iter()
                .filter(|p| {
                    p.metadata.deletion_timestamp.is_none() && statefulset_owner(p).is_some_and(|o| o.uid == uid)
                })
                .collect();
            let replicas = i32::try_from(mine.len()).unwrap_or(i32::MAX);
            let ready_since: Vec<Option<&Time>> = mine.iter().map(|p| ready_condition_since(p)).collect();
            let ready = i32::try_from(ready_since.iter().filter(|r| r.is_some()).count()).unwrap_or(i32::MAX);
            let horizon = k8s_openapi::jiff::SignedDuration::from_secs(i64::from(min_ready));
            let now = now();
            let available =
                ready_since.iter().flatten().filter(|t| t.0.checked_add(horizon).is_ok_and(|at| at <= now.0)).count();
            let available = i32::try_from(available).unwrap_or(i32::MAX);
            let generation = sts.metadata.generation.unwrap_or(0);
            let current = sts.status.as_ref();
            let unchanged = current.is_some_and(|s| {
                s.replicas == replicas
                    && s.ready_replicas.unwrap_or(0) == ready
                    && s.current_replicas.unwrap_or(0) == replicas
                    && s.updated_replicas.unwrap_or(0) == replicas
                    && s.available_replicas.unwrap_or(0) == available
                    && s.observed_generation.unwrap_or(0) == generation
            });
            if unchanged {
                continue;
            }
            let name = sts.name_any();
            let patch = json!({
                "metadata": { "uid": uid },
                "status": {
                    "replicas": replicas,
                    "readyReplicas": ready,
                    "currentReplicas": replicas,
                    "updatedReplicas": replicas,
                    "availableReplicas": available,
                    "observedGeneration": generation,
                }
            });
            let key = format!("statefulset {name} status");
            match self.sets.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => self.resolved(&key),
                Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => {}
                Err(e) => self.complain(key, e),
            }
        }
    }

    /// Rewrites the hosts file when the set of names changed.
    fn write_hosts(&mut self) {
        let entries: Vec<(String, String)> = {
            let state = self.shared.lock();
            state
                .slots
                .values()
                .filter(|s| s.started_once && s.stopping.is_none())
                .filter_map(|s| {
                    let spec = s.pod.spec.as_ref()?;
                    let subdomain = spec.subdomain.as_deref().filter(|d| !d.is_empty())?;
                    let hostname = spec.hostname.clone().unwrap_or_else(|| s.name());
                    Some((s.ip.clone(), format!("{hostname}.{subdomain}.{}.svc.cluster.local", self.shared.namespace)))
                })
                .collect()
        };
        let content = hosts_content(&entries);
        if self.hosts_written.as_ref() == Some(&content) {
            return;
        }
        match write_atomically(&self.shared.hosts_file(), &content) {
            Ok(()) => {
                self.resolved("hosts file");
                self.hosts_written = Some(content);
            }
            Err(e) => self.complain("hosts file", e),
        }
    }
}

/// Stops the slot running Pod `name`/`uid` and deletes the object after it; with no such slot,
/// just deletes the object.
fn stop_and_delete(slots: &mut BTreeMap<String, Slot>, plan: &mut Plan, name: &str, uid: &str) {
    match slots.get_mut(name) {
        Some(slot) if slot.uid == uid => slot.stop(true),
        _ => plan.delete.push((name.to_owned(), uid.to_owned())),
    }
}

fn free_octet(slots: &BTreeMap<String, Slot>) -> Option<u8> {
    (1..=254).find(|o| slots.values().all(|s| s.octet != *o))
}

fn statefulset_owner(pod: &Pod) -> Option<&OwnerReference> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true) && o.kind == "StatefulSet" && o.api_version.starts_with("apps/"))
}

fn replicas(sts: &StatefulSet) -> i32 {
    sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0)
}

/// The ordinal of Pod `pod` of StatefulSet `sts` (`<sts>-<ordinal>`), if the name is one.
fn ordinal(pod: &str, sts: &str) -> Option<i32> {
    let digits = pod.strip_prefix(sts)?.strip_prefix('-')?;
    let i: i32 = digits.parse().ok()?;
    (i >= 0 && i.to_string() == digits).then_some(i)
}

/// Since when the listed Pod has been Ready, if it is.
fn ready_condition_since(pod: &Pod) -> Option<&Time> {
    let cond = pod.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "Ready" && c.status == "True")?;
    cond.last_transition_time.as_ref()
}

/// Pod `<sts>-<ordinal>` as the StatefulSet controller builds it from the template.
fn build_pod(sts: &StatefulSet, ordinal: i32) -> Pod {
    let sts_name = sts.name_any();
    let name = format!("{sts_name}-{ordinal}");
    let spec = sts.spec.clone().unwrap_or_default();
    let template = spec.template;
    let meta = template.metadata.unwrap_or_default();
    let mut labels = meta.labels.unwrap_or_default();
    labels.insert("statefulset.kubernetes.io/pod-name".into(), name.clone());
    labels.insert("apps.kubernetes.io/pod-index".into(), ordinal.to_string());
    let mut pod_spec = template.spec.unwrap_or_default();
    pod_spec.hostname = Some(name.clone());
    pod_spec.subdomain = spec.service_name.filter(|s| !s.is_empty());
    let volumes = pod_spec.volumes.get_or_insert_with(Vec::new);
    for claim in spec.volume_claim_templates.iter().flatten() {
        let claim_name = claim.name_any();
        volumes.retain(|v| v.name != claim_name);
        volumes.push(Volume {
            name: claim_name.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: format!("{claim_name}-{name}"),
                read_only: None,
            }),
            ..Volume::default()
        });
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: sts.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: meta.annotations,
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "StatefulSet".into(),
                name: sts_name,
                uid: sts.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(pod_spec),
        status: None,
    }
}

/// The claims of Pod `pod`: one per `volumeClaimTemplates` entry, named `<claim>-<pod>`.
fn build_claims(sts: &StatefulSet, pod: &str) -> Vec<PersistentVolumeClaim> {
    let Some(spec) = sts.spec.as_ref() else { return Vec::new() };
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    spec.volume_claim_templates
        .iter()
        .flatten()
        .map(|template| {
            let mut labels = template.metadata.labels.clone().unwrap_or_default();
            labels.extend(selector.clone());
            PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(format!("{}-{pod}", template.name_any())),
                    namespace: sts.metadata.namespace.clone(),
                    labels: Some(labels),
                    annotations: template.metadata.annotations.clone(),
                    ..ObjectMeta::default()
                },
                spec: template.spec.clone(),
                status: None,
            }
        })
        .collect()
}

struct ProbeTarget {
    url: String,
    timeout: Duration,
    initial_delay: Duration,
    failure_threshold: i32,
}

/// The container's `httpGet` readiness probe aimed at `ip`; `None` when it has none (or an
/// unsimulated kind, which then counts as ready like no probe).
fn readiness_probe(pod: &Pod, ip: &str) -> Option<ProbeTarget> {
    let container = pod.spec.as_ref()?.containers.first()?;
    let probe = container.readiness_probe.as_ref()?;
    let get = probe.http_get.as_ref()?;
    let port = match &get.port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => {
            container.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name.as_str()))?.container_port
        }
    };
    let host = get.host.as_deref().filter(|h| !h.is_empty()).unwrap_or(ip);
    let path = get.path.as_deref().unwrap_or("/");
    let path = if path.starts_with('/') { path.to_owned() } else { format!("/{path}") };
    let secs =
        |v: Option<i32>, default: i32| Duration::from_secs(u64::from(v.unwrap_or(default).max(0).unsigned_abs()));
    Some(ProbeTarget {
        url: format!("http://{host}:{port}{path}"),
        timeout: secs(probe.timeout_seconds, 1).max(Duration::from_millis(100)),
        initial_delay: secs(probe.initial_delay_seconds, 0),
        failure_threshold: probe.failure_threshold.unwrap_or(3).max(1),
    })
}

/// Kubernetes' `$(VAR)` expansion: a reference to a defined variable becomes its value, `$$`
/// becomes `$`, anything else (an undefined name, an unclosed `$(`) stays as written.
fn expand(input: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(reference) = after.strip_prefix('(')
            && let Some(close) = reference.find(')')
        {
            let name = &reference[..close];
            match vars.get(name) {
                Some(value) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &reference[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Applies the network and volume simulations to one environment variable.
fn simulate(name: &str, value: &str, ip: &str, mounts: &[(String, PathBuf)]) -> String {
    if name == "LISTEN"
        && let Some(port) = value.strip_prefix("0.0.0.0:")
    {
        return format!("{ip}:{port}");
    }
    rewrite_mounts(value, mounts)
}

/// `M` or `M/...` for a mount path `M` becomes the directory standing in for the volume.
fn rewrite_mounts(value: &str, mounts: &[(String, PathBuf)]) -> String {
    for (path, dir) in mounts {
        if value == path {
            return dir.display().to_string();
        }
        if let Some(rest) = value.strip_prefix(path.as_str()).and_then(|r| r.strip_prefix('/')) {
            return dir.join(rest).display().to_string();
        }
    }
    value.to_owned()
}

fn hosts_content(entries: &[(String, String)]) -> String {
    let mut lines: Vec<String> = entries.iter().map(|(ip, name)| format!("{ip} {name}\n")).collect();
    lines.sort();
    lines.concat()
}

/// Replaces `path` so a reader sees the old or the new content, never a mix.
fn write_atomically(path: &Path, content: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, content)?;
    fs::rename(&tmp, path)
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn expand_follows_kubernetes() {
        let v = vars(&[("POD_NAME", "demo-0"), ("NS", "t")]);
        assert_eq!(expand("$(POD_NAME).demo-nodes.$(NS).svc:8080", &v), "demo-0.demo-nodes.t.svc:8080");
        assert_eq!(expand("$(MISSING)-x", &v), "$(MISSING)-x");
        assert_eq!(expand("$$(POD_NAME)", &v), "$(POD_NAME)");
        assert_eq!(expand("cost $5 and $(POD_NAME", &v), "cost $5 and $(POD_NAME");
        assert_eq!(expand("trailing $", &v), "trailing $");
        assert_eq!(expand("", &v), "");
    }

    #[test]
    fn simulate_rewrites_listen_and_mounts() {
        let mounts = vec![("/data/sub".to_owned(), PathBuf::from("/r/b")), ("/data".to_owned(), PathBuf::from("/r/a"))];
        assert_eq!(simulate("LISTEN", "0.0.0.0:8080", "127.0.61.3", &mounts), "127.0.61.3:8080");
        assert_eq!(simulate("LISTEN", "127.0.0.1:8080", "127.0.61.3", &mounts), "127.0.0.1:8080");
        assert_eq!(simulate("OTHER", "0.0.0.0:8080", "127.0.61.3", &mounts), "0.0.0.0:8080");
        assert_eq!(simulate("KVS_DATA_DIR", "/data", "ip", &mounts), "/r/a");
        assert_eq!(simulate("X", "/data/wal", "ip", &mounts), "/r/a/wal");
        assert_eq!(simulate("X", "/data/sub/x", "ip", &mounts), "/r/b/x");
        assert_eq!(simulate("X", "/database", "ip", &mounts), "/database");
    }

    #[test]
    fn ordinals_are_exact() {
        assert_eq!(ordinal("demo-0", "demo"), Some(0));
        assert_eq!(ordinal("demo-12", "demo"), Some(12));
        assert_eq!(ordinal("demo-01", "demo"), None);
        assert_eq!(ordinal("demo-x", "demo"), None);
        assert_eq!(ordinal("demo-nodes-0", "demo"), None);
        assert_eq!(ordinal("other-0", "demo"), None);
    }

    #[test]
    fn pods_are_built_from_the_template() {
        let sts: StatefulSet = serde_json::from_value(json!({
            "metadata": { "name": "demo", "namespace": "t", "uid": "u-1" },
            "spec": {
                "replicas": 2,
                "serviceName": "demo-nodes",
                "selector": { "matchLabels": { "app": "demo" } },
                "template": {
                    "metadata": { "labels": { "app": "demo" } },
                    "spec": { "containers": [{ "name": "kvs", "image": "kvs-node" }] }
                },
                "volumeClaimTemplates": [{
                    "metadata": { "name": "data" },
                    "spec": { "accessModes": ["ReadWriteOnce"], "resources": { "requests": { "storage": "1Gi" } } }
                }]
            }
        }))
        .expect("a valid StatefulSet");
        let pod = build_pod(&sts, 1);
        assert_eq!(pod.metadata.name.as_deref(), Some("demo-1"));
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("app").map(String::as_str), Some("demo"));
        assert_eq!(labels.get("apps.kubernetes.io/pod-index").map(String::as_str), Some("1"));
        let owner = statefulset_owner(&pod).expect("controlled by the StatefulSet");
        assert_eq!((owner.name.as_str(), owner.uid.as_str()), ("demo", "u-1"));
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.hostname.as_deref(), Some("demo-1"));
        assert_eq!(spec.subdomain.as_deref(), Some("demo-nodes"));
        let volume = spec.volumes.iter().flatten().find(|v| v.name == "data").expect("the claim's volume");
        assert_eq!(volume.persistent_volume_claim.as_ref().map(|c| c.claim_name.as_str()), Some("data-demo-1"));
        let claims = build_claims(&sts, "demo-1");
        assert_eq!(claims.len(), 1);
        assert_eq!(claims[0].metadata.name.as_deref(), Some("data-demo-1"));
    }

    #[test]
    fn hosts_lines_are_sorted_and_terminated() {
        let entries = vec![
            ("127.0.61.2".to_owned(), "b.s.t.svc.cluster.local".to_owned()),
            ("127.0.61.1".to_owned(), "a.s.t.svc.cluster.local".to_owned()),
        ];
        assert_eq!(hosts_content(&entries), "127.0.61.1 a.s.t.svc.cluster.local\n127.0.61.2 b.s.t.svc.cluster.local\n");
        assert_eq!(hosts_content(&[]), "");
    }
}
