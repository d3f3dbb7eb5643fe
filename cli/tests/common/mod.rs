//! What the kvsctl tests share: node processes on a loopback net of the test's own, with a cluster
//! token, and running the kvsctl binary as a user would.

#![allow(dead_code)] // each test binary uses its own part

use kvs_api::{AdminClient, ClusterStatus};
use kvs_testkit::net::LoopbackNet;
use kvs_testkit::process::{NodeCommand, NodeProcess, node_binary};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

pub const TOKEN: &str = "kvsctl-test-token";

pub struct Cluster {
    /// The processes (killed when dropped) and their data directories.
    nodes: Mutex<Vec<(NodeProcess, tempfile::TempDir)>>,
    pub token_file: tempfile::NamedTempFile,
    /// Declared last: dropped (the addresses handed out again) after every node is killed.
    pub net: LoopbackNet,
}

impl Cluster {
    /// `members` nodes at replication factor `k` with a cluster token, plus `spares` started without a view.
    pub async fn start(members: usize, spares: usize, k: u32) -> Cluster {
        let bin = node_binary().expect("the node binary");
        let net = LoopbackNet::take();
        let view: Vec<String> = (0..members).map(|i| net.node(i)).collect();
        let mut nodes = Vec::new();
        for i in 0..members + spares {
            let dir = tempfile::tempdir().expect("a data directory");
            let mut command = NodeCommand::node(&bin, &net.node(i), dir.path(), "warn")
                .env("K", k.to_string())
                .env("KVS_CLUSTER_TOKEN", TOKEN);
            if i < members {
                command = command.env("VIEW", view.join(","));
            }
            nodes.push((NodeProcess::start(command).expect("a node starts"), dir));
        }
        for (i, (process, _)) in nodes.iter_mut().enumerate() {
            process.wait_serving(&net.node(i), Duration::from_secs(30)).await.expect("the node serves");
        }
        let mut token_file = tempfile::NamedTempFile::new().expect("a token file");
        writeln!(token_file, "{TOKEN}").expect("the token is written");
        Cluster { nodes: Mutex::new(nodes), token_file, net }
    }

    pub fn addr(&self, i: usize) -> String {
        self.net.node(i)
    }

    /// Every node's address, comma-separated (for `--endpoints`).
    pub fn endpoints(&self) -> String {
        let n = self.nodes.lock().expect("the nodes").len();
        (0..n).map(|i| self.addr(i)).collect::<Vec<_>>().join(",")
    }

    /// Kills the node at `addr` (SIGKILL).
    pub fn kill(&self, addr: &str) {
        let mut nodes = self.nodes.lock().expect("the nodes");
        let i = (0..nodes.len()).find(|&i| self.addr(i) == addr).expect("a node of this cluster");
        nodes[i].0.kill();
    }

    pub fn token_path(&self) -> &str {
        path(self.token_file.path())
    }

    pub fn admin(&self) -> AdminClient {
        AdminClient::new(Some(TOKEN.into()))
    }

    pub async fn status(&self) -> ClusterStatus {
        self.admin().status(&self.addr(0)).await.expect("status")
    }
}

/// Runs kvsctl with `args`, `stdin` as its input, and the endpoints in the environment.
pub fn kvsctl(endpoints: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvsctl"))
        .args(args)
        .env("KVS_ENDPOINTS", endpoints)
        .env_remove("KVS_TOKEN_FILE")
        .env_remove("KVS_CONTEXT_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kvsctl runs");
    child.stdin.take().expect("stdin").write_all(stdin).expect("stdin is written");
    child.wait_with_output().expect("kvsctl ends")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn ok(out: Output) -> Output {
    assert!(out.status.success(), "kvsctl failed ({}): {}{}", out.status, text(&out.stdout), text(&out.stderr));
    out
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}
