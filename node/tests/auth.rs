//! Client authentication and authorization across real node processes (`--auth-file`): who gets
//! 401 and who 403, with nothing changed by a refused request; prefixes; admin routes with an
//! admin token or the cluster token; probes open; tokens re-read when the file changes.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::Cluster;
use reqwest::StatusCode;
use std::path::Path;
use std::time::{Duration, Instant};

const READER: &str = "reader-token-0123456789";
const WRITER: &str = "writer-token-0123456789";
const APP: &str = "app-only-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";
const CLUSTER: &str = "cluster-token-0123456789";

fn auth_file(path: &Path, entries: &[(&str, &str, &str, &str)]) {
    let mut text = String::from("tokens:\n");
    for (name, token, role, prefixes) in entries {
        text.push_str(&format!("  - name: {name}\n    token: {token}\n    role: {role}\n"));
        if !prefixes.is_empty() {
            text.push_str(&format!("    prefixes: [{prefixes}]\n"));
        }
    }
    // Replace the file in one step, as a Secret volume does.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn roles(path: &Path) {
    auth_file(
        path,
        &[
            ("reader", READER, "read", ""),
            ("writer", WRITER, "write", ""),
            ("app", APP, "write", "\"app/\""),
            ("ops", ADMIN, "admin", ""),
        ],
    );
}

async fn call(c: &Cluster, method: reqwest::Method, url: String, token: Option<&str>) -> (StatusCode, String) {
    let mut req = c.http.request(method, url).body("v");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    (resp.status(), resp.text().await.unwrap())
}

async fn get(c: &Cluster, node: &str, key: &str, token: Option<&str>) -> (StatusCode, String) {
    call(c, reqwest::Method::GET, format!("http://{node}/v1/kv/{key}"), token).await
}

async fn put(c: &Cluster, node: &str, key: &str, token: Option<&str>) -> (StatusCode, String) {
    call(c, reqwest::Method::PUT, format!("http://{node}/v1/kv/{key}"), token).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_decide_who_reads_writes_and_administers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.yaml");
    roles(&file);
    let env = [("KVS_AUTH_FILE", file.to_str().unwrap()), ("KVS_CLUSTER_TOKEN", CLUSTER)];
    let c = Cluster::start(2, 2, &env).await;
    let [a, b] = [c.addrs()[0].clone(), c.addrs()[1].clone()];

    // A writer writes through one node; a reader reads it through the other (the nodes still
    // replicate and forward to each other with the cluster token).
    assert_eq!(put(&c, &a, "k", Some(WRITER)).await.0, StatusCode::CREATED);
    assert_eq!(get(&c, &b, "k", Some(READER)).await, (StatusCode::OK, "v".to_owned()));

    // No token: 401, naming the scheme; nothing written.
    let resp = c.http.put(format!("http://{a}/v1/kv/k")).body("stranger").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    assert!(resp.text().await.unwrap().contains("Authorization: Bearer"));
    let (status, body) = get(&c, &a, "k", Some("not-a-known-token-at-all")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("not one of this node's tokens") && !body.contains("not-a-known"), "{body}");

    // A reader may not write: 403 saying which role it needs; the value is unchanged.
    let (status, body) = put(&c, &b, "k", Some(READER)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        body.contains("\\\"reader\\\" has role read and may not write key \\\"k\\\": that needs role write"),
        "{body}"
    );
    assert_eq!(get(&c, &a, "k", Some(ADMIN)).await, (StatusCode::OK, "v".to_owned()));

    // Prefixes: "app" writes and reads under app/ only.
    assert_eq!(put(&c, &a, "app%2F1", Some(APP)).await.0, StatusCode::CREATED);
    assert_eq!(get(&c, &b, "app%2F1", Some(APP)).await.0, StatusCode::OK);
    let (status, body) = get(&c, &a, "k", Some(APP)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("only read and write keys starting with"), "{body}");

    // The HW4 routes are guarded alike.
    let hw4 = |token: Option<&'static str>| {
        let mut req = c.http.get(format!("http://{a}/kv-store/k"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req
    };
    assert_eq!(hw4(None).send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(hw4(Some(READER)).send().await.unwrap().status(), StatusCode::OK);

    // Admin routes: an admin token or the cluster token (header or bearer); a writer is refused.
    let status =
        |token: Option<&'static str>| call(&c, reqwest::Method::GET, format!("http://{a}/v1/admin/status"), token);
    assert_eq!(status(Some(ADMIN)).await.0, StatusCode::OK);
    assert_eq!(status(Some(CLUSTER)).await.0, StatusCode::OK);
    assert_eq!(status(Some(WRITER)).await.0, StatusCode::FORBIDDEN);
    assert_eq!(status(None).await.0, StatusCode::UNAUTHORIZED);
    let resp = c.http.get(format!("http://{a}/v1/admin/status")).header("kvs-cluster-token", CLUSTER).send().await;
    assert_eq!(resp.unwrap().status(), StatusCode::OK);
    // The cluster token may also read and write, as the operator's restores do.
    assert_eq!(get(&c, &b, "k", Some(CLUSTER)).await.0, StatusCode::OK);

    // Probes and metrics stay open.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(c.http.get(format!("http://{a}{path}")).send().await.unwrap().status(), StatusCode::OK, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_auth_file_takes_effect_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.yaml");
    roles(&file);
    let c = Cluster::start(1, 1, &[("KVS_AUTH_FILE", file.to_str().unwrap())]).await;
    let a = c.addrs()[0].clone();
    assert_eq!(put(&c, &a, "k", Some(WRITER)).await.0, StatusCode::CREATED);

    // The writer's token is revoked and a new one issued.
    const ROTATED: &str = "rotated-writer-token-0123456789";
    auth_file(&file, &[("writer", ROTATED, "write", ""), ("ops", ADMIN, "admin", "")]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while put(&c, &a, "k", Some(ROTATED)).await.0 != StatusCode::OK {
        assert!(Instant::now() < deadline, "the new token never took effect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(put(&c, &a, "k", Some(WRITER)).await.0, StatusCode::UNAUTHORIZED, "the old token is revoked");
    // (That a broken file is never put in force is `auth::tests`' job: from outside, a reload
    // that kept the old tokens looks the same as one that has not happened yet.)
}

#[test]
fn a_node_does_not_start_with_an_auth_file_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.yaml");
    std::fs::write(&file, "tokens:\n  - name: a\n    token: short\n    role: read\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvs-node"))
        .env_clear()
        .envs([("IPPORT", "127.0.0.1:1"), ("KVS_AUTH_FILE", file.to_str().unwrap())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth.yaml") && err.contains("at least 16"), "{err}");
}
