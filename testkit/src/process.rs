//! Node processes for multi-process tests: start one from a [`NodeCommand`], signal it, pause and
//! resume it, stop it cleanly or kill it, start it again with the same command (and so the same
//! data directory), and wait until it answers `/healthz`.
//!
//! Invariants:
//! - A [`NodeProcess`] owns at most one child, and reaps every child it kills or sees exit, so no
//!   zombie outlives a test. Dropping it kills the child (resuming it first: a stopped process
//!   would otherwise hold its SIGKILL until resumed). Every node started here also stops by itself
//!   once the test process is gone (`--exit-with-parent`), however that process ended.
//! - [`NodeProcess::pause`] returns only once the kernel reports the process stopped: signals are
//!   asynchronous, and a test that judges "B is paused" right after `kill -STOP` would judge a
//!   process that may still be running.
//! - Nothing here sleeps while holding a lock or blocks an async runtime except the explicitly
//!   blocking [`NodeProcess::terminate`] and [`NodeProcess::pause`] (bounded, and documented).

use rustix::process::{Pid, kill_process};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The signals [`NodeProcess::signal`] sends (`Signal::INT`, `Signal::TERM`, ...).
pub use rustix::process::Signal;

/// How a node process is started: the program, its arguments and environment (by default nothing
/// else is inherited but `PATH`, so a test controls exactly what a node sees), optionally inside a
/// network namespace, with output to a log file or discarded.
#[derive(Clone, Debug)]
pub struct NodeCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Run it with `ip netns exec <namespace>`.
    pub namespace: Option<String>,
    /// Append stdout and stderr here; `None` discards stdout and passes stderr through.
    pub log: Option<PathBuf>,
    /// Start from this process's whole environment (for tools that read e.g. `KUBECONFIG`).
    pub inherit_env: bool,
}

impl NodeCommand {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        NodeCommand {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            namespace: None,
            log: None,
            inherit_env: false,
        }
    }

    /// Adds (or replaces) an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.into()));
        self
    }

    /// The HW4 start: `IPPORT` and `LISTEN` at `addr`, data in `data_dir`, logs at `RUST_LOG`
    /// (`KVS_TEST_LOG` when set, else `default_log`).
    pub fn node(program: impl Into<PathBuf>, addr: &str, data_dir: &Path, default_log: &str) -> Self {
        NodeCommand::new(program)
            .env("IPPORT", addr)
            .env("LISTEN", addr)
            .env("KVS_DATA_DIR", data_dir.display().to_string())
            .env("RUST_LOG", std::env::var("KVS_TEST_LOG").unwrap_or_else(|_| default_log.to_owned()))
    }

    fn spawn(&self) -> std::io::Result<Child> {
        let mut cmd = match &self.namespace {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        cmd.args(&self.args).stdin(Stdio::null());
        if !self.inherit_env {
            cmd.env_clear();
            if let Ok(path) = std::env::var("PATH") {
                cmd.env("PATH", path);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        // A node outlives nothing of the test: were the test process killed before it dropped its
        // processes, its nodes would keep holding their addresses for later tests. Other programs
        // ignore the variable.
        cmd.env("KVS_EXIT_WITH_PARENT", "true");
        match &self.log {
            Some(path) => {
                let log = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
                cmd.stdout(log.try_clone()?).stderr(log);
            }
            None => {
                cmd.stdout(Stdio::null());
            }
        }
        cmd.spawn()
    }
}

/// One node process, started and restarted from the same [`NodeCommand`].
#[derive(Debug)]
pub struct NodeProcess {
    command: NodeCommand,
    child: Option<Child>,
}

impl NodeProcess {
    /// Starts the process.
    pub fn start(command: NodeCommand) -> std::io::Result<NodeProcess> {
        let child = command.spawn()?;
        Ok(NodeProcess { command, child: Some(child) })
    }

    /// A process that is not running yet (see [`NodeProcess::restart`]).
    pub fn stopped(command: NodeCommand) -> NodeProcess {
        NodeProcess { command, child: None }
    }

    pub fn command(&self) -> &NodeCommand {
        &self.command
    }

    /// Changes how the next (re)start runs it.
    pub fn command_mut(&mut self) -> &mut NodeCommand {
        &mut self.command
    }

    /// Kills the process if it runs, then starts it again with the same command.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.child = Some(self.command.spawn()?);
        Ok(())
    }

    /// Whether a child was started and not yet killed, stopped or seen to exit.
    pub fn is_running(&mut self) -> bool {
        self.try_exit();
        self.child.is_some()
    }

    /// The running child's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` to the running child (nothing when none runs).
    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid().and_then(|p| Pid::from_raw(p as i32)) {
            // It can only fail for a child that already exited and is waiting to be reaped.
            let _ = kill_process(pid, signal);
        }
    }

    /// Reaps the child if it has exited on its own, returning how it ended.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// SIGKILL (resuming a stopped process first), then reaps it: nothing is flushed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.signal_pid(child.id(), Signal::CONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal_pid(&self, pid: u32, signal: Signal) {
        if let Some(pid) = Pid::from_raw(pid as i32) {
            let _ = kill_process(pid, signal);
        }
    }

    /// SIGTERM, then waits up to `grace` for the process to exit, then SIGKILL. Blocks the calling
    /// thread for at most `grace`. Returns the exit status, `None` if it had to be killed (or was
    /// not running).
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        self.signal_pid(child.id(), Signal::CONT);
        self.signal_pid(child.id(), Signal::TERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// SIGSTOP, returning once the kernel reports every thread stopped (at most 2 s of polling
    /// `/proc/<pid>/stat`; panics beyond, as a test cannot go on with a process it cannot pause).
    pub fn pause(&self) {
        let Some(pid) = self.pid() else { panic!("pause: {:?} is not running", self.command.program) };
        self.signal(Signal::STOP);
        let stat = format!("/proc/{pid}/stat");
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let state = std::fs::read_to_string(&stat).unwrap_or_default();
            // The state is the first field after the command name, which is in parentheses.
            if state.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('T')) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("process {pid} did not stop within 2 s of SIGSTOP");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal(Signal::CONT);
    }

    /// Waits (at most `within`) until this process serves `addr`: `/healthz` answers and the
    /// process still runs. A process that exits first is an error with its status — so a node that
    /// could not bind its address is never mistaken for whatever else answers there.
    pub async fn wait_serving(&mut self, addr: &str, within: Duration) -> anyhow::Result<()> {
        let exited = |status: ExitStatus| {
            anyhow::anyhow!(
                "{addr}: the process exited ({status}) instead of serving; its error is above (\
                 \"Address already in use\" means another process holds {addr})"
            )
        };
        poll_healthy(addr, within, || match self.try_exit() {
            Some(status) => Err(exited(status)),
            None => Ok(()),
        })
        .await
    }
}

/// Polls `addr`'s `/healthz` every 50 ms for at most `within` until it answers with a success
/// status, failing as soon as `still_fine` (asked before every poll and after the answer) fails.
async fn poll_healthy(
    addr: &str,
    within: Duration,
    mut still_fine: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let http = kvs_api::http_client().timeout(Duration::from_millis(500)).build()?;
    let deadline = Instant::now() + within;
    loop {
        still_fine()?;
        let answered = http.get(format!("http://{addr}/healthz")).send().await;
        if answered.is_ok_and(|r| r.status().is_success()) {
            return still_fine();
        }
        if Instant::now() >= deadline {
            anyhow::bail!("{addr} did not answer /healthz within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `addr` answers `GET /healthz` with a success status, polling every 50 ms for at
/// most `within`.
pub async fn wait_healthy(addr: &str, within: Duration) -> anyhow::Result<()> {
    poll_healthy(addr, within, || Ok(())).await
}

/// The workspace's `kvs-node` binary for tests outside the node crate: `KVS_NODE_BIN` when set,
/// else `target/debug/kvs-node` (built first if it is missing).
pub fn node_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("KVS_NODE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit lives in the workspace").to_path_buf();
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
    let bin = target.join("debug").join("kvs-node");
    if !bin.exists() {
        let ok = Command::new(env!("CARGO")).args(["build", "-p", "kvs-node"]).current_dir(&root).status()?.success();
        anyhow::ensure!(ok, "building kvs-node failed");
    }
    Ok(bin)
}

/// Raises this process's open-files limit to its hard limit (tests that open a thousand client
/// connections need more than the usual soft limit of 1024).
pub fn raise_open_files_limit() {
    let (_, hard) = rlimit::Resource::NOFILE.get().expect("read RLIMIT_NOFILE");
    rlimit::Resource::NOFILE.set(hard, hard).expect("raise RLIMIT_NOFILE to its hard limit");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> NodeCommand {
        let mut c = NodeCommand::new("sleep");
        c.args.push("30".into());
        c
    }

    #[test]
    fn pause_resume_terminate_and_restart() {
        let _starts = crate::no_process_starts_meanwhile();
        let mut p = NodeProcess::start(sleeper()).expect("sleep starts");
        let first = p.pid().expect("running");
        p.pause();
        p.resume();
        // `sleep` dies of SIGTERM: an exit status, not a kill after the grace period.
        assert!(p.terminate(Duration::from_secs(5)).is_some());
        assert!(!p.is_running());
        p.restart().expect("restarts");
        assert_ne!(p.pid(), Some(first));
        p.pause();
        // Killing a stopped process works (it is resumed first) and reaps it.
        p.kill();
        assert!(!p.is_running());
    }

    #[test]
    fn an_exit_is_seen_and_reaped() {
        let _starts = crate::no_process_starts_meanwhile();
        let mut p = NodeProcess::start(NodeCommand::new("true")).expect("true starts");
        let deadline = Instant::now() + Duration::from_secs(5);
        while p.is_running() {
            assert!(Instant::now() < deadline, "`true` did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
