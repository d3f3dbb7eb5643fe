//! The kubelet's container runtime: each Pod's first container runs as one `kvs-node` process
//! (`node_bin`; the image and `command` are ignored, the arguments and environment come from
//! [`super::env`]), through `kvs_testkit::process::NodeProcess`.
//!
//! - A process that exits on its own is restarted (`restartPolicy: Always`) after a back-off of
//!   0.5 s doubling to 10 s (reset once a run lasted 10 s), with the same IP and data.
//! - A container whose configuration cannot be resolved (a missing Secret, ConfigMap or key not
//!   marked `optional`) keeps waiting with reason `CreateContainerConfigError`, retried every
//!   second, as the real kubelet does.
//! - Stopping a container: SIGTERM, up to `terminationGracePeriodSeconds` (at most 10 s) to exit,
//!   SIGKILL; then the Pod object is deleted when the stop asked for it (scale-down, garbage
//!   collection), and the slot is gone.
//! - An image whose tag is `broken` (`…:broken`) fails to pull: the container keeps waiting with
//!   reason `ImagePullBackOff` and never runs (how a test gives a roll a version that never
//!   becomes ready). Any other image runs the one node binary.
//! - Logs: a container's stdout and stderr are appended to `<root>/logs/<namespace>/<pod>.log`,
//!   with a marker line at every start.
//!
//! Decisions and effects are apart: a [`Container`] is plain data about one container, and
//! [`Container::step`] decides from it and the time alone what happens next; the loop then does it
//! (a signal, a spawn, an API call) and records the outcome on the container.
//!
//! Invariants: a slot's `process` is `Some` exactly while its `container.run` is. The loop task is
//! the only one to signal or reap its processes, so a signal never reaches a recycled pid, and no
//! lock is held around either. A container being stopped is never started again.
//!
//! Not simulated: resource limits, init and sidecar containers, restart policies other than
//! `Always`.

use super::env::Launch;
use super::{Kubelet, Shared, now};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kvs_testkit::process::Signal;
use kvs_testkit::process::{NodeCommand, NodeProcess};
use serde_json::{Value, json};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// Longest a process gets between SIGTERM and SIGKILL (`terminationGracePeriodSeconds`, capped).
pub(super) const MAX_GRACE: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A run at least this long resets the crash back-off.
const STABLE_RUN: Duration = Duration::from_secs(10);
const CONFIG_RETRY: Duration = Duration::from_secs(1);

/// What one container does and has done, as plain data.
pub(super) struct Container {
    /// The current run, while a process runs.
    pub(super) run: Option<Run>,
    pub(super) started_once: bool,
    pub(super) restarts: i32,
    pub(super) last_exit: Option<Exit>,
    next_start: Instant,
    crash_streak: u32,
    /// Why no process runs yet (`reason`, `message`), e.g. a missing Secret.
    pub(super) waiting: Option<(&'static str, String)>,
    pub(super) ready: bool,
    pub(super) ready_since: Time,
    probe_failures: i32,
    pub(super) stopping: Option<Stopping>,
}

pub(super) struct Run {
    pub(super) started: Time,
    pub(super) since: Instant,
}

#[derive(Clone)]
pub(super) struct Exit {
    code: i32,
    started: Time,
    finished: Time,
}

pub(super) struct Stopping {
    deadline: Instant,
    term_sent: bool,
    kill_sent: bool,
    /// Delete the Pod object once the process is gone; false when the object is already gone.
    pub(super) delete_object: bool,
}

/// What a container needs next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    Wait,
    Start,
    /// Send SIGTERM (a stop has begun).
    Terminate,
    /// Send SIGKILL (the grace period is over).
    Kill,
    /// The process is gone after a stop: delete the object if asked, then forget the Pod.
    Remove {
        delete_object: bool,
    },
}

impl Container {
    pub(super) fn new(now: Instant) -> Container {
        Container {
            run: None,
            started_once: false,
            restarts: 0,
            last_exit: None,
            next_start: now,
            crash_streak: 0,
            waiting: None,
            ready: false,
            ready_since: super::now(),
            probe_failures: 0,
            stopping: None,
        }
    }

    /// The one decision of the runtime.
    pub(super) fn step(&self, now: Instant) -> Step {
        match (&self.stopping, &self.run) {
            (Some(s), Some(_)) if !s.term_sent => Step::Terminate,
            (Some(s), Some(_)) if now >= s.deadline && !s.kill_sent => Step::Kill,
            (Some(_), Some(_)) => Step::Wait,
            (Some(s), None) => Step::Remove { delete_object: s.delete_object },
            (None, None) if now >= self.next_start => Step::Start,
            (None, _) => Step::Wait,
        }
    }

    /// Stopped, and the process gone: only the object's deletion (if asked) is left.
    pub(super) fn is_finished(&self) -> bool {
        self.stopping.is_some() && self.run.is_none()
    }

    pub(super) fn set_ready(&mut self, ready: bool) {
        if self.ready != ready {
            self.ready = ready;
            self.ready_since = super::now();
        }
    }

    /// Begins stopping (idempotent; `delete_object` only ever turns on).
    pub(super) fn stop(&mut self, grace: Duration, delete_object: bool, now: Instant) {
        self.set_ready(false);
        match &mut self.stopping {
            Some(s) => s.delete_object |= delete_object,
            None => {
                let deadline = now + grace;
                self.stopping = Some(Stopping { deadline, term_sent: false, kill_sent: false, delete_object });
            }
        }
    }

    /// The restart count the next start gives.
    pub(super) fn next_restart(&self) -> i32 {
        if self.started_once { self.restarts + 1 } else { 0 }
    }

    pub(super) fn started(&mut self, now: Instant) {
        self.restarts = self.next_restart().max(self.restarts);
        self.started_once = true;
        self.run = Some(Run { started: super::now(), since: now });
        self.waiting = None;
        self.probe_failures = 0;
    }

    pub(super) fn failed_to_start(&mut self, message: String, now: Instant) {
        self.waiting = Some(("CreateContainerConfigError", message));
        self.next_start = now + CONFIG_RETRY;
    }

    pub(super) fn failed_to_pull(&mut self, image: &str, now: Instant) {
        let message = format!("Back-off pulling image \"{image}\" (the stand-in kubelet fails every `:broken` tag)");
        self.waiting = Some(("ImagePullBackOff", message));
        self.next_start = now + CONFIG_RETRY;
    }

    pub(super) fn exited(&mut self, code: i32, now: Instant) {
        let Some(run) = self.run.take() else { return };
        self.last_exit = Some(Exit { code, started: run.started, finished: super::now() });
        self.set_ready(false);
        if now.saturating_duration_since(run.since) >= STABLE_RUN {
            self.crash_streak = 0;
        }
        self.next_start = now + backoff(self.crash_streak);
        self.crash_streak += 1;
    }

    /// Records a readiness probe's answer.
    pub(super) fn probed(&mut self, ok: bool, failure_threshold: i32) {
        if ok {
            self.probe_failures = 0;
            self.set_ready(true);
        } else {
            self.probe_failures += 1;
            if self.probe_failures >= failure_threshold {
                self.set_ready(false);
            }
        }
    }
}

impl Exit {
    pub(super) fn json(&self) -> Value {
        json!({
            "exitCode": self.code,
            "reason": if self.code == 0 { "Completed" } else { "Error" },
            "startedAt": self.started,
            "finishedAt": self.finished,
        })
    }
}

/// The wait before restart number `crash_streak` + 1 of a crashing container.
fn backoff(crash_streak: u32) -> Duration {
    FIRST_BACKOFF.saturating_mul(1 << crash_streak.min(8)).min(MAX_BACKOFF)
}

/// The exit code as Kubernetes reports it: 128 + the signal for a process killed by one.
fn exit_code(status: ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Starts the container's process, appending its output to the Pod's log after a marker line.
fn spawn(shared: &Shared, pod: &str, launch: Launch, restart: i32) -> Result<NodeProcess, String> {
    let path = shared.log_file(pod);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    writeln!(log, "--- stand-in kubelet: starting {pod} at {} (restart {restart}) ---", now().0)
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    let command = NodeCommand {
        program: shared.opts.node_bin.clone(),
        args: launch.args,
        env: launch.env,
        namespace: None,
        log: Some(path),
        // A container sees only its own environment, as in a real pod.
        inherit_env: false,
    };
    NodeProcess::start(command).map_err(|e| format!("starting {}: {e}", shared.opts.node_bin.display()))
}

impl Kubelet {
    /// Collects exited processes, then does what each container's [`Step`] says.
    pub(super) async fn supervise(&mut self) {
        self.reap();
        let now = Instant::now();
        let steps: Vec<(String, Step)> = self
            .slots
            .iter()
            .map(|(name, slot)| (name.clone(), slot.container.step(now)))
            .filter(|(_, step)| *step != Step::Wait)
            .collect();
        for (name, step) in steps {
            match step {
                Step::Wait => {}
                Step::Start => self.start_container(&name).await,
                Step::Terminate | Step::Kill => self.signal(&name, step),
                Step::Remove { delete_object } => self.remove(&name, delete_object).await,
            }
        }
    }

    fn reap(&mut self) {
        let shared = &self.shared;
        for (name, slot) in &mut self.slots {
            let Some(status) = slot.process.as_mut().and_then(NodeProcess::try_exit) else { continue };
            slot.process = None;
            slot.container.exited(exit_code(status), Instant::now());
            if slot.container.stopping.is_none() {
                shared.say(format_args!("pod {name}: process exited ({status}); restarting it"));
            }
        }
    }

    fn signal(&mut self, name: &str, step: Step) {
        let Some(slot) = self.slots.get_mut(name) else { return };
        let Some(process) = &slot.process else { return };
        let Some(stopping) = slot.container.stopping.as_mut() else { return };
        if step == Step::Kill {
            self.shared.say(format_args!("pod {name}: still running after the grace period; SIGKILL"));
            process.signal(Signal::KILL);
            stopping.kill_sent = true;
        } else {
            process.signal(Signal::TERM);
            stopping.term_sent = true;
        }
    }

    async fn start_container(&mut self, name: &str) {
        let Some(slot) = self.slots.get_mut(name) else { return };
        let image = slot.pod.spec.as_ref().and_then(|s| s.containers.first()?.image.clone()).unwrap_or_default();
        if image.ends_with(":broken") {
            slot.container.failed_to_pull(&image, Instant::now());
            return self.complain(format!("pulling image for pod {name}"), format_args!("{image} is broken"));
        }
        let (pod, ip) = (slot.pod.clone(), slot.ip.clone());
        let launch = self.launch_config(&pod, &ip).await;
        let Some(slot) = self.slots.get_mut(name) else { return };
        let outcome = launch.and_then(|launch| spawn(&self.shared, name, launch, slot.container.next_restart()));
        let key = format!("starting pod {name}");
        match outcome {
            Ok(process) => {
                slot.process = Some(process);
                slot.container.started(Instant::now());
                let restarts = slot.container.restarts;
                self.resolved(&key);
                self.say(format_args!("started pod {name} (restarts: {restarts})"));
            }
            Err(message) => {
                slot.container.failed_to_start(message.clone(), Instant::now());
                self.complain(key, message);
            }
        }
    }

    async fn remove(&mut self, name: &str, delete_object: bool) {
        let Some(uid) = self.slots.get(name).map(|s| s.uid.clone()) else { return };
        if delete_object {
            // Its address goes first: once a test sees the object gone, it sees no address.
            self.publish();
            let key = format!("deleting pod {name}");
            match self.delete_pod(name, &uid).await {
                Ok(()) => self.resolved(&key),
                Err(e) => return self.complain(key, e),
            }
        }
        self.slots.remove(name);
        self.publish();
        self.say(format_args!("stopped pod {name}"));
    }

    /// SIGKILLs the Pod's process (a test's crash); the next tick reaps it and restarts it.
    pub(super) fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let slot = self.slots.get(name).ok_or_else(|| anyhow::anyhow!("the kubelet runs no pod {name}"))?;
        let process = slot.process.as_ref().ok_or_else(|| anyhow::anyhow!("pod {name} has no running process"))?;
        process.signal(Signal::KILL);
        self.say(format_args!("killed the process of {name} (SIGKILL)"));
        Ok(())
    }

    /// Every process gets SIGTERM and up to [`MAX_GRACE`] to exit; what is left is killed. The
    /// slots are forgotten, the objects left as they are.
    pub(super) async fn shut_down(&mut self) {
        for process in self.slots.values().filter_map(|s| s.process.as_ref()) {
            process.signal(Signal::TERM);
        }
        let deadline = Instant::now() + MAX_GRACE;
        while Instant::now() < deadline {
            let mut running = 0;
            for process in self.slots.values_mut().filter_map(|s| s.process.as_mut()) {
                running += usize::from(process.is_running());
            }
            if running == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Dropping a `NodeProcess` kills and reaps it.
        self.slots.clear();
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_crashing_container_backs_off_doubling_to_10_s() {
        let t0 = Instant::now();
        let mut c = Container::new(t0);
        assert_eq!(c.step(t0), Step::Start);
        let mut t = t0;
        for wait_ms in [500, 1000, 2000, 4000, 8000, 10_000, 10_000] {
            c.started(t);
            assert_eq!(c.step(t), Step::Wait, "running");
            t += Duration::from_secs(1);
            c.exited(1, t);
            assert_eq!(c.step(t + (wait_ms - 1) * MS), Step::Wait);
            assert_eq!(c.step(t + wait_ms * MS), Step::Start);
            t += wait_ms * MS;
        }
        assert_eq!(c.restarts, 6);
        // A run of 10 s counts as stable: the next wait is the first one again.
        c.started(t);
        t += STABLE_RUN;
        c.exited(137, t);
        assert_eq!(c.step(t + 500 * MS), Step::Start);
        assert_eq!(c.restarts, 7);
        assert_eq!(c.last_exit.as_ref().map(|e| e.json()["reason"].clone()), Some(json!("Error")));
    }

    #[test]
    fn a_stop_terms_then_kills_then_removes() {
        let t0 = Instant::now();
        let mut c = Container::new(t0);
        c.started(t0);
        c.set_ready(true);
        c.stop(Duration::from_secs(2), false, t0);
        assert!(!c.ready);
        assert_eq!(c.step(t0), Step::Terminate);
        c.stopping.as_mut().expect("stopping").term_sent = true;
        assert_eq!(c.step(t0 + Duration::from_secs(1)), Step::Wait, "within the grace period");
        assert_eq!(c.step(t0 + Duration::from_secs(2)), Step::Kill);
        c.stopping.as_mut().expect("stopping").kill_sent = true;
        assert_eq!(c.step(t0 + Duration::from_secs(3)), Step::Wait, "SIGKILL is sent once");
        c.exited(137, t0 + Duration::from_secs(3));
        assert!(c.is_finished());
        // Never started again, however long it waits; a later stop may still ask for deletion.
        assert_eq!(c.step(t0 + Duration::from_secs(60)), Step::Remove { delete_object: false });
        c.stop(Duration::ZERO, true, t0);
        c.stop(Duration::ZERO, false, t0);
        assert_eq!(c.step(t0), Step::Remove { delete_object: true });
    }

    #[test]
    fn a_container_that_never_ran_is_removed_at_once_and_retries_its_config() {
        let t0 = Instant::now();
        let mut c = Container::new(t0);
        c.failed_to_start("secret \"t\" not found".into(), t0);
        assert_eq!(c.waiting.as_ref().map(|w| w.0), Some("CreateContainerConfigError"));
        assert_eq!(c.step(t0 + 999 * MS), Step::Wait);
        assert_eq!(c.step(t0 + CONFIG_RETRY), Step::Start);
        c.started(t0 + CONFIG_RETRY);
        assert_eq!((c.restarts, c.waiting.is_none()), (0, true), "a failed start is no restart");
        let mut never = Container::new(t0);
        never.stop(MAX_GRACE, true, t0);
        assert_eq!(never.step(t0), Step::Remove { delete_object: true });
    }

    #[test]
    fn readiness_needs_the_threshold_of_failures() {
        let mut c = Container::new(Instant::now());
        c.probed(true, 3);
        assert!(c.ready);
        c.probed(false, 3);
        c.probed(false, 3);
        assert!(c.ready);
        c.probed(false, 3);
        assert!(!c.ready);
    }
}
