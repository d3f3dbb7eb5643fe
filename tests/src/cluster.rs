//! Real `kvs-node` processes for fault-injection runs, on one of two networks:
//!
//! - **Loopback**: node `i` on `127.0.<net>.<i+1>:8080`, `<net>` leased from `kvs_testkit::net` for
//!   the cluster's life. Faults: pause, crash/restart.
//! - **Namespaces** (root only): every node in its own network namespace, linked by a veth pair to
//!   a bridge in a hub namespace; the test process reaches the bridge through one veth in its own
//!   namespace. Addresses are `10.77.<run>.<i+1>` — a private range used only inside these
//!   namespaces, `<run>` leased like a loopback net. Faults add **partition**: taking a node's link down on the bridge cuts it off
//!   from every other node and from clients. Every namespace and link is removed on drop, also
//!   when a test fails (and stale ones of an earlier run with the same id are removed first).

use anyhow::{Context, bail};
use kvs_testkit::net::{Lease, LoopbackNet, NODE_PORT};
use kvs_testkit::process::{NodeCommand, NodeProcess};
use std::process::Command;
use std::time::Duration;

pub use kvs_testkit::process::node_binary;

/// How long a node gets to answer `/healthz` after a start.
const START_WITHIN: Duration = Duration::from_secs(20);

/// Where the nodes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    Loopback,
    Namespaces,
}

/// The addresses a cluster was given: a loopback `/24`, or a namespace-network id (`10.77.<run>.x`
/// inside the namespaces, and the run's namespace and link names), leased for the cluster's life.
enum Addresses {
    Loopback(LoopbackNet),
    Namespaces(Lease),
}

impl Addresses {
    fn take(network: Network) -> Addresses {
        match network {
            Network::Loopback => Addresses::Loopback(LoopbackNet::take()),
            Network::Namespaces => Addresses::Namespaces(Lease::take("netns")),
        }
    }

    fn node(&self, i: usize) -> String {
        match self {
            Addresses::Loopback(net) => net.node(i),
            Addresses::Namespaces(run) => format!("10.77.{}.{}:{NODE_PORT}", run.number(), i + 1),
        }
    }

    fn run(&self) -> Option<u8> {
        match self {
            Addresses::Loopback(_) => None,
            Addresses::Namespaces(run) => Some(run.number()),
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
    process: NodeProcess,
    pub data_dir: tempfile::TempDir,
}

impl NodeProc {
    pub fn is_running(&self) -> bool {
        self.process.pid().is_some()
    }
}

/// A cluster of node processes plus spare nodes (started without `VIEW`, for view changes).
pub struct Cluster {
    pub network: Network,
    addresses: Addresses,
    pub nodes: Vec<NodeProc>,
    hub: Option<String>,
}

impl Cluster {
    /// Starts `members` nodes forming a cluster at replication factor `k`, plus `spares` nodes
    /// without a view, on addresses of their own. `extra_env` goes to every node.
    pub async fn start(
        network: Network,
        members: usize,
        spares: usize,
        k: u32,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Cluster> {
        let bin = node_binary()?;
        let addresses = Addresses::take(network);
        let mut cluster = Cluster { network, addresses, nodes: Vec::new(), hub: None };
        if let Some(run) = cluster.addresses.run() {
            cluster.build_network(run, members + spares)?;
        }
        let view: Vec<String> = (0..members).map(|i| cluster.addresses.node(i)).collect();
        for i in 0..members + spares {
            let addr = cluster.addresses.node(i);
            let data_dir = tempfile::tempdir()?;
            let mut command = NodeCommand::node(&bin, &addr, data_dir.path(), "error").env("K", k.to_string());
            if i < members {
                command = command.env("VIEW", view.join(","));
            }
            for (k, v) in extra_env {
                command = command.env(*k, *v);
            }
            command.namespace = cluster.addresses.run().map(|run| node_namespace(run, i));
            let process = NodeProcess::start(command).with_context(|| format!("starting {}", bin.display()))?;
            cluster.nodes.push(NodeProc { addr, index: i, process, data_dir });
        }
        for n in &mut cluster.nodes {
            n.process.wait_serving(&n.addr, START_WITHIN).await?;
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
            let ns = node_namespace(run, i);
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

    /// The hub namespace's port of node `i` (namespaces only).
    fn hub_port(&self, i: usize) -> anyhow::Result<(&str, String)> {
        let hub = self.hub.as_deref().context("partitions need the namespace network")?;
        Ok((hub, format!("p{i}")))
    }

    /// Cuts node `i` off from everyone (namespaces only).
    pub fn isolate(&self, i: usize) -> anyhow::Result<()> {
        let (hub, port) = self.hub_port(i)?;
        ip(&["-n", hub, "link", "set", &port, "down"])
    }

    /// Reconnects node `i`.
    pub fn heal(&self, i: usize) -> anyhow::Result<()> {
        let (hub, port) = self.hub_port(i)?;
        ip(&["-n", hub, "link", "set", &port, "up"])
    }

    /// SIGSTOP, returning once the process is stopped.
    pub fn pause(&mut self, i: usize) {
        self.nodes[i].process.pause();
    }

    pub fn resume(&mut self, i: usize) {
        self.nodes[i].process.resume();
    }

    /// SIGKILL: nothing is flushed.
    pub fn crash(&mut self, i: usize) {
        self.nodes[i].process.kill();
    }

    /// Starts node `i` again with the same data directory.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        node.process.restart()?;
        node.process.wait_serving(&node.addr, START_WITHIN).await
    }
}

fn node_namespace(run: u8, i: usize) -> String {
    format!("kvs{run}n{i}")
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
            n.process.kill();
        }
        if let Some(run) = self.addresses.run() {
            cleanup_network(run, self.nodes.len() + 8);
        }
    }
}
