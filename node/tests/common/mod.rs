//! Test harness: real `kvs-node` processes, each on its own loopback address `127.0.<net>.<i>:8080`
//! with the HW4 environment (`K`, `VIEW`, `IPPORT`, `LISTEN`), as the course's script starts them.
//! Every cluster leases its own `<net>` from `kvs_testkit::net`, so tests run in parallel (and
//! beside other suites) without sharing addresses; processes are `kvs_testkit::process` ones.
#![allow(dead_code)]

use kvs_testkit::net::LoopbackNet;
use kvs_testkit::process::{NodeCommand, NodeProcess};
use serde_json::Value;
use std::time::Duration;

/// How long a node gets to answer `/healthz` after a start.
const START_WITHIN: Duration = Duration::from_secs(20);

/// One node process and the data directory it keeps across restarts.
pub struct NodeProc {
    pub addr: String,
    pub process: NodeProcess,
    pub data_dir: tempfile::TempDir,
}

impl NodeProc {
    fn start(addr: &str, env: &[(String, String)]) -> NodeProc {
        let data_dir = tempfile::tempdir().expect("tempdir");
        let mut command = NodeCommand::node(env!("CARGO_BIN_EXE_kvs-node"), addr, data_dir.path(), "warn");
        for (k, v) in env {
            command = command.env(k, v);
        }
        let process = NodeProcess::start(command).expect("kvs-node starts");
        NodeProc { addr: addr.to_owned(), process, data_dir }
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGTERM, then waits (up to `within`) for the process to exit; returns its exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let addr = &self.addr;
        self.process.terminate(within).unwrap_or_else(|| panic!("{addr} did not exit within {within:?} of SIGTERM"))
    }

    /// SIGSTOP, returning once every thread of the process is stopped (signals are asynchronous).
    pub fn pause(&self) {
        self.process.pause();
    }

    pub fn resume(&self) {
        self.process.resume();
    }

    /// Kills the process and starts it again on the same data directory.
    pub async fn restart(&mut self) {
        self.process.restart().expect("kvs-node restarts");
        self.wait_serving().await;
    }

    /// Waits until this node's own process serves its address (panics when it exits instead).
    async fn wait_serving(&mut self) {
        self.process.wait_serving(&self.addr, START_WITHIN).await.unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A cluster of node processes.
pub struct Cluster {
    pub nodes: Vec<NodeProc>,
    pub http: reqwest::Client,
    /// This cluster's addresses: node `i` is `net.node(i)`. Declared last, so it is dropped (and
    /// the addresses handed out again) only after every node process is killed.
    pub net: LoopbackNet,
}

impl Cluster {
    /// Starts `n` nodes with replication factor `k` on a loopback net of their own, plus
    /// `extra_env`.
    pub async fn start(n: usize, k: u32, extra_env: &[(&str, &str)]) -> Cluster {
        let net = LoopbackNet::take();
        let addrs: Vec<String> = (0..n).map(|i| net.node(i)).collect();
        let view = addrs.join(",");
        let mut nodes = Vec::new();
        for a in &addrs {
            let mut env = vec![("K".to_owned(), k.to_string()), ("VIEW".to_owned(), view.clone())];
            env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            nodes.push(NodeProc::start(a, &env));
        }
        for node in &mut nodes {
            node.wait_serving().await;
        }
        Cluster { nodes, net, http: client() }
    }

    /// Starts node `i` of this cluster's net with `K` but without `VIEW`: it waits to be added.
    /// Returns its address.
    pub async fn spawn_joiner(&mut self, i: usize, k: u32) -> String {
        let addr = self.net.node(i);
        let mut node = NodeProc::start(&addr, &[("K".to_owned(), k.to_string())]);
        node.wait_serving().await;
        self.nodes.push(node);
        addr
    }

    /// Addresses of nodes whose process was started and not killed or stopped since.
    pub fn running(&self) -> Vec<String> {
        self.nodes.iter().filter(|n| n.process.pid().is_some()).map(|n| n.addr.clone()).collect()
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    pub fn node(&mut self, addr: &str) -> &mut NodeProc {
        self.nodes.iter_mut().find(|n| n.addr == addr).expect("known node")
    }

    /// `partition_id → members` as node 0 reports it.
    pub async fn partitions(&self, via: &str) -> Vec<Vec<String>> {
        let ids = hw4(&self.http, "GET", via, "get_all_partition_ids", &[]).await.1;
        let mut out = Vec::new();
        for id in ids["partition_id_list"].as_array().expect("partition_id_list").iter() {
            let (_, m) =
                hw4(&self.http, "GET", via, "get_partition_members", &[("partition_id", &id.to_string())]).await;
            out.push(
                m["partition_members"]
                    .as_array()
                    .expect("members")
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
                    .collect(),
            );
        }
        out
    }

    /// The value of a Prometheus metric line starting with `prefix` on `node`.
    pub async fn metric(&self, node: &str, prefix: &str) -> f64 {
        metric_value(&self.metrics_text(node).await, prefix)
    }

    /// `node`'s whole Prometheus exposition.
    pub async fn metrics_text(&self, node: &str) -> String {
        let running: Vec<_> = self.nodes.iter().map(|n| (n.addr.clone(), n.process.pid().is_some())).collect();
        match self.http.get(format!("http://{node}/metrics")).send().await {
            Ok(resp) => resp.text().await.expect("a metrics body"),
            Err(e) => panic!("metrics from {node}: {e:?} (nodes, running: {running:?})"),
        }
    }
}

/// The value of the first line of a Prometheus exposition that starts with `prefix` (0 if none).
pub fn metric_value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

impl Cluster {
    /// Waits until `node`'s failure detector has declared a peer dead `times` times in all (a
    /// paused or cut-off peer is declared dead only once it has been silent long enough).
    /// Waits (30 s at most) until `node`'s metric `name` reaches `at_least`.
    pub async fn wait_metric(&self, node: &str, name: &str, at_least: f64) {
        for _ in 0..600 {
            if self.metric(node, name).await >= at_least {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{node}'s {name} never reached {at_least}");
    }

    pub async fn wait_peer_deaths(&self, node: &str, times: f64) {
        for _ in 0..600 {
            if self.metric(node, "kvs_peer_deaths_total").await >= times {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{node} never declared a silent peer dead");
    }
}

pub fn client() -> reqwest::Client {
    kvs_api::http_client().timeout(Duration::from_secs(10)).build().expect("client")
}

/// One HW4 request: form-encoded body (even on GET, as the course's client does). Returns status
/// and JSON.
pub async fn hw4(http: &reqwest::Client, method: &str, node: &str, path: &str, form: &[(&str, &str)]) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let body = serde_urlencoded::to_string(form).expect("form");
    let resp = http
        .request(method, format!("http://{node}/kv-store/{path}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("request to {node} failed: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("non-JSON answer {status} from {node}: {text}"));
    (status, json)
}

pub async fn put(http: &reqwest::Client, node: &str, key: &str, val: &str, payload: &str) -> (u16, Value) {
    hw4(http, "PUT", node, key, &[("val", val), ("causal_payload", payload)]).await
}

pub async fn get(http: &reqwest::Client, node: &str, key: &str, payload: &str) -> (u16, Value) {
    hw4(http, "GET", node, key, &[("causal_payload", payload)]).await
}

/// HW4 `update_view`: `kind` is add or remove.
pub async fn update_view(http: &reqwest::Client, via: &str, kind: &str, ip_port: &str) -> (u16, Value) {
    let resp = http
        .put(format!("http://{via}/kv-store/update_view?type={kind}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("ip_port={ip_port}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("update_view to {via} failed: {e}"));
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON"))
}

/// The cluster status `node` reports (as JSON, for tests that poke at it).
pub async fn status(_http: &reqwest::Client, node: &str) -> Value {
    let status = kvs_api::AdminClient::default().status(node).await.expect("status");
    serde_json::to_value(status).expect("status serializes")
}

/// Changes the whole view through `via`; panics unless it answers 200.
pub async fn change_view(via: &str, members: &[String], k: u32) -> kvs_api::ViewChanged {
    kvs_api::AdminClient::default().change_view(via, members.to_vec(), k).await.expect("view change")
}
