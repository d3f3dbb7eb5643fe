//! Real `kvs-node` processes for fault-injection runs, on one of two networks:
//!
//! - **Loopback**: node `i` on `127.0.<net>.<i+1>:8080`. Faults: pause, crash/restart.
//! - **Namespaces** (root only): every node in its own network namespace, linked by a veth pair to
//!   a bridge in a hub namespace; the test process reaches the bridge through one veth in its own
//!   namespace. Addresses are `10.77.<run>.<i+1>` — a private range used only inside these
//!   namespaces. Faults add **partition**: taking a node's link down on the bridge cuts it off
//!   from every other node and from clients. Every namespace and link is removed on drop, also
//!   when a test fails (and stale ones of an earlier run with the same id are removed first).

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const PORT: u16 = 8080;

/// Where the nodes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    Loopback { net: u8 },
    Namespaces { run: u8 },
}

impl Network {
    fn addr(self, i: usize) -> String {
        match self {
            Network::Loopback { net } => format!("127.0.{net}.{}:{PORT}", i + 1),
            Network::Namespaces { run } => format!("10.77.{run}.{}:{PORT}", i + 1),
        }
    }
}

/// True when this process may create network namespaces (root with `ip` available).
pub fn namespaces_available() -> bool {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    root && Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// One node process.
pub struct NodeProc {
    pub addr: String,
    pub index: usize,
    namespace: Option<String>,
    child: Option<Child>,
    pub data_dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    paused: bool,
}

impl NodeProc {
    fn spawn(&mut self, bin: &Path) -> anyhow::Result<()> {
        let mut cmd = match &self.namespace {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.env_clear()
            .env("IPPORT", &self.addr)
            .env("LISTEN", &self.addr)
            .env("KVS_DATA_DIR", self.data_dir.path())
            .env("RUST_LOG", std::env::var("KVS_TEST_LOG").unwrap_or_else(|_| "error".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().with_context(|| format!("starting {}", bin.display()))?);
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").arg(format!("-{sig}")).arg(c.id().to_string()).status();
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-CONT").arg(c.id().to_string()).status();
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused = false;
    }
}

/// A cluster of node processes plus spare nodes (started without `VIEW`, for view changes).
pub struct Cluster {
    pub network: Network,
    pub nodes: Vec<NodeProc>,
    bin: PathBuf,
    hub: Option<String>,
}

/// The `kvs-node` binary: `KVS_NODE_BIN`, else the workspace's debug build (built if missing).
pub fn node_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("KVS_NODE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?.to_path_buf();
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
    let bin = target.join("debug").join("kvs-node");
    if !bin.exists() {
        let ok = Command::new(env!("CARGO")).args(["build", "-p", "kvs-node"]).current_dir(&root).status()?.success();
        if !ok {
            bail!("building kvs-node failed");
        }
    }
    Ok(bin)
}

impl Cluster {
    /// Starts `members` nodes forming a cluster at replication factor `k`, plus `spares` nodes
    /// without a view. `extra_env` goes to every node.
    pub async fn start(
        network: Network,
        members: usize,
        spares: usize,
        k: u32,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Cluster> {
        let bin = node_binary()?;
        let mut cluster = Cluster { network, nodes: Vec::new(), bin, hub: None };
        if let Network::Namespaces { run } = network {
            cluster.build_network(run, members + spares)?;
        }
        let view: Vec<String> = (0..members).map(|i| network.addr(i)).collect();
        for i in 0..members + spares {
            let mut env = vec![("K".to_owned(), k.to_string())];
            if i < members {
                env.push(("VIEW".to_owned(), view.join(",")));
            }
            env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            let namespace = cluster.hub.as_ref().map(|_| node_namespace(network, i));
            let mut node = NodeProc {
                addr: network.addr(i),
                index: i,
                namespace,
                child: None,
                data_dir: tempfile::tempdir()?,
                env,
                paused: false,
            };
            node.spawn(&cluster.bin)?;
            cluster.nodes.push(node);
        }
        for n in &cluster.nodes {
            wait_healthy(&n.addr).await?;
        }
        Ok(cluster)
    }

    fn build_network(&mut self, run: u8, nodes: usize) -> anyhow::Result<()> {
        let hub = format!("kvs{run}hub");
        let root_if = format!("kvs{run}r");
        cleanup_network(run, nodes + 8);
        self.hub = Some(hub.clone());
        ip(&["netns", "add", &hub])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        ip(&["link", "add", &root_if, "type", "veth", "peer", "name", "pr", "netns", &hub])?;
        ip(&["-n", &hub, "link", "set", "pr", "master", "br0", "up"])?;
        ip(&["addr", "add", &format!("10.77.{run}.254/24"), "dev", &root_if])?;
        ip(&["link", "set", &root_if, "up"])?;
        for i in 0..nodes {
            let ns = node_namespace(self.network, i);
            let port = format!("p{i}");
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &hub])?;
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("10.77.{run}.{}/24", i + 1), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// Cuts node `i` off from everyone (namespaces only).
    pub fn isolate(&self, i: usize) -> anyhow::Result<()> {
        let hub = self.hub.as_ref().context("partitions need the namespace network")?;
        ip(&["-n", hub, "link", "set", &format!("p{i}"), "down"])
    }

    /// Reconnects node `i`.
    pub fn heal(&self, i: usize) -> anyhow::Result<()> {
        let hub = self.hub.as_ref().context("partitions need the namespace network")?;
        ip(&["-n", hub, "link", "set", &format!("p{i}"), "up"])
    }

    pub fn pause(&mut self, i: usize) {
        self.nodes[i].signal("STOP");
        self.nodes[i].paused = true;
    }

    pub fn resume(&mut self, i: usize) {
        self.nodes[i].signal("CONT");
        self.nodes[i].paused = false;
    }

    /// SIGKILL: nothing is flushed.
    pub fn crash(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again with the same data directory.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes[i].kill();
        let bin = self.bin.clone();
        self.nodes[i].spawn(&bin)?;
        wait_healthy(&self.nodes[i].addr).await
    }
}

fn node_namespace(network: Network, i: usize) -> String {
    match network {
        Network::Namespaces { run } => format!("kvs{run}n{i}"),
        Network::Loopback { .. } => String::new(),
    }
}

/// Removes the namespaces and the root-side link of run `run` (ignoring what does not exist).
fn cleanup_network(run: u8, nodes: usize) {
    let _ = ip(&["link", "del", &format!("kvs{run}r")]);
    for i in 0..nodes {
        let _ = ip(&["netns", "del", &format!("kvs{run}n{i}")]);
    }
    let _ = ip(&["netns", "del", &format!("kvs{run}hub")]);
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        if let Network::Namespaces { run } = self.network {
            cleanup_network(run, self.nodes.len() + 8);
        }
    }
}

/// Waits until `addr` answers `/healthz` (20 s at most).
pub async fn wait_healthy(addr: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_millis(500)).build()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("http://{addr}/healthz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{addr} did not become healthy within 20 s")
}
