//! Test harness: real `kvs-node` processes, each on its own loopback address `127.0.<net>.<i>:8080`
//! with the HW4 environment (`K`, `VIEW`, `IPPORT`, `LISTEN`), as the course's script starts them.
//! Every test picks its own `<net>` so tests run in parallel without sharing addresses.
#![allow(dead_code)]

use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const PORT: u16 = 8080;

/// One node process and the data directory it keeps across restarts.
pub struct NodeProc {
    pub addr: String,
    pub child: Option<Child>,
    pub data_dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl NodeProc {
    fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvs-node"));
        cmd.env_clear()
            .env("IPPORT", &self.addr)
            .env("LISTEN", &self.addr)
            .env("KVS_DATA_DIR", self.data_dir.path())
            .env("RUST_LOG", std::env::var("KVS_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("kvs-node starts"));
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node is running").id()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: &str) {
        let status =
            Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().expect("kill runs");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// SIGTERM, then waits (up to `within`) for the process to exit; returns its exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        self.signal("TERM");
        let mut child = self.child.take().expect("node is running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait works") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{} did not exit within {within:?} of SIGTERM", self.addr);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGSTOP, returning once every thread of the process is stopped (signals are asynchronous).
    pub fn pause(&self) {
        self.signal("STOP");
        let stat = format!("/proc/{}/stat", self.pid());
        for _ in 0..200 {
            let state = std::fs::read_to_string(&stat).unwrap_or_default();
            if state.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('T')) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("{} did not stop", self.addr);
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }

    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        wait_healthy(&self.addr).await;
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").arg("-CONT").arg(c.id().to_string()).status();
        }
        self.kill();
    }
}

/// A cluster of node processes.
pub struct Cluster {
    pub nodes: Vec<NodeProc>,
    pub http: reqwest::Client,
}

pub fn addr(net: u8, i: usize) -> String {
    format!("127.0.{net}.{}:{PORT}", i + 1)
}

impl Cluster {
    /// Starts `n` nodes with replication factor `k` on `127.0.<net>.1..=n`, plus `extra_env`.
    pub async fn start(net: u8, n: usize, k: u32, extra_env: &[(&str, &str)]) -> Cluster {
        let addrs: Vec<String> = (0..n).map(|i| addr(net, i)).collect();
        let view = addrs.join(",");
        let mut nodes = Vec::new();
        for a in &addrs {
            let mut env = vec![("K".to_owned(), k.to_string()), ("VIEW".to_owned(), view.clone())];
            env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            let mut node =
                NodeProc { addr: a.clone(), child: None, data_dir: tempfile::tempdir().expect("tempdir"), env };
            node.spawn();
            nodes.push(node);
        }
        for a in &addrs {
            wait_healthy(a).await;
        }
        Cluster { nodes, http: client() }
    }

    /// Starts one more node at `addr` with `K` but without `VIEW`: it waits to be added.
    pub async fn spawn_joiner(&mut self, addr: &str, k: u32) {
        let env = vec![("K".to_owned(), k.to_string())];
        let mut node =
            NodeProc { addr: addr.to_owned(), child: None, data_dir: tempfile::tempdir().expect("tempdir"), env };
        node.spawn();
        wait_healthy(addr).await;
        self.nodes.push(node);
    }

    /// Addresses of nodes whose process is running.
    pub fn running(&self) -> Vec<String> {
        self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.addr.clone()).collect()
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
        let running: Vec<_> = self.nodes.iter().map(|n| (n.addr.clone(), n.child.is_some())).collect();
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

/// Raises this process's open-files limit to its hard limit (tests that open a thousand client
/// connections need more than the usual soft limit of 1024).
pub fn raise_open_files_limit() {
    let (_, hard) = rlimit::Resource::NOFILE.get().expect("read RLIMIT_NOFILE");
    rlimit::Resource::NOFILE.set(hard, hard).expect("raise RLIMIT_NOFILE to its hard limit");
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client")
}

pub async fn wait_healthy(addr: &str) {
    let http = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().expect("client");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("http://{addr}/healthz")).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr} did not become healthy within 20 s");
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
