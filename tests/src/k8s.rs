//! Harness helpers for tests against a real Kubernetes API server: the one `KUBECONFIG` names
//! (`eval "$(../shared/k8s/up)"` starts the project's test server; kind, k3d or a real cluster
//! work too). Every test works in its own namespace, removed when its guard drops, so tests can
//! share one server and run in parallel. These helpers panic with a clear message instead of
//! returning errors: they are for tests only.

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::config::KubeConfigOptions;
use kube::{Client, Config};
use std::future::Future;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A client for the cluster `KUBECONFIG` names. Panics, saying how to start one, when it is unset.
pub async fn api_client() -> Client {
    if std::env::var_os("KUBECONFIG").is_none_or(|v| v.is_empty()) {
        panic!(
            "KUBECONFIG is not set: this test needs a Kubernetes API server. From the project root run \
             `eval \"$(../shared/k8s/up)\"` first (and `../shared/k8s/down` after), or use `./scripts/test`, which starts one"
        );
    }
    let config = Config::from_kubeconfig(&KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("reading the kubeconfig that KUBECONFIG names: {e}"));
    Client::try_from(config).unwrap_or_else(|e| panic!("building a client from KUBECONFIG: {e}"))
}

/// A namespace made for one test; deleted (with everything in it) when dropped.
pub struct TestNamespace {
    name: String,
}

impl TestNamespace {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be shutting down: kubectl needs neither.
        let out = Command::new("kubectl")
            .args(["delete", "namespace", &self.name, "--wait=false", "--ignore-not-found"])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("deleting namespace {}: {}", self.name, String::from_utf8_lossy(&o.stderr).trim()),
            Err(e) => eprintln!("deleting namespace {}: running kubectl: {e}", self.name),
        }
    }
}

/// Creates a namespace named `<prefix>-<random>` (the prefix is cut to keep a valid name).
pub async fn fresh_namespace(client: &Client, prefix: &str) -> TestNamespace {
    let prefix: String =
        prefix.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).take(40).collect();
    let name = format!("{}-{:08x}", prefix.trim_matches('-'), rand::random::<u32>());
    let ns = Namespace {
        metadata: ObjectMeta { name: Some(name.clone()), ..ObjectMeta::default() },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
    TestNamespace { name }
}

/// Whether a Pod's Ready condition is True.
pub fn pod_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The body of a plain-HTTP GET of `url` (an operator's `/readyz` or `/metrics`), or `None` when it
/// cannot be fetched.
pub async fn get_text(url: &str) -> Option<String> {
    let http = kvs_api::http_client().build().expect("an HTTP client builds");
    http.get(url).send().await.ok()?.text().await.ok()
}

/// Runs `kubectl` (from PATH, on `KUBECONFIG`) and returns its stdout; panics with its stderr if it fails.
pub fn kubectl(args: &[&str]) -> String {
    let out = Command::new("kubectl").args(args).stdin(Stdio::null()).output().unwrap_or_else(|e| {
        panic!("running kubectl (is it on PATH? `eval \"$(../shared/k8s/up)\"` puts it there): {e}")
    });
    if !out.status.success() {
        panic!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `kvs-node` binary the stand-in kubelet runs (see [`kvs_testkit::process::node_binary`]).
pub fn node_binary() -> PathBuf {
    kvs_testkit::process::node_binary().unwrap_or_else(|e| panic!("finding the kvs-node binary: {e:#}"))
}

/// Polls `check` every 100 ms until it returns `Some`, and returns that; panics after `timeout`
/// naming `what` was awaited.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
