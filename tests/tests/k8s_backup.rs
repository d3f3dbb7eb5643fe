//! Backups through custom resources, end to end against a real API server, with the operator
//! process, the stand-in kubelet and real `kvs-node` processes, and a real S3 API server (moto) on
//! the test's loopback net. Needs `KUBECONFIG` (`scripts/test` starts a server):
//! `cargo test -p kvs-e2e --test k8s_backup -- --ignored`.
//!
//! On a 4-node, K=2 cluster holding 1,000 keys, every step asserted:
//! - a `KVStoreBackup` to S3 with its credentials in a Secret, and one to a directory, both reach
//!   `Succeeded` with the keys counted and the manifest named in the status, and `kubectl get kvsb`
//!   shows them; each verifies (every checksum and count) with the library `kvsctl` uses;
//! - a second backup to a destination that holds one already fails and leaves the first intact;
//! - a backup of a cluster that does not exist waits, saying so; one to an unknown kind of URL
//!   fails with a message that names the URL schemes.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use kvs_backup::{Destination, Silent};
use kvs_e2e::k8s::{eventually, kubectl};
use kvs_e2e::kvsc::{OperatorEnv, STEP, wait_running, write_keys};
use kvs_testkit::s3::MotoServer;
use serde_json::Value;

const KEYS: usize = 1000;

fn kvsb(ns: &str, name: &str) -> Value {
    serde_json::from_str(&kubectl(&["-n", ns, "get", "kvsb", name, "-o", "json"])).unwrap()
}

fn apply(ns: &str, root: &std::path::Path, name: &str, yaml: &str) {
    let path = root.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    kubectl(&["-n", ns, "apply", "-f", path.to_str().unwrap()]);
}

fn backup_yaml(name: &str, cluster: &str, destination: &str, credentials: Option<&str>) -> String {
    let credentials = credentials.map(|s| format!("  credentialsSecret: {s}\n")).unwrap_or_default();
    format!(
        "apiVersion: kvstore.dev/v1alpha1\nkind: KVStoreBackup\nmetadata:\n  name: {name}\nspec:\n  cluster: \
         {cluster}\n  destination: {destination}\n{credentials}"
    )
}

/// Waits until backup `name` is in a final phase; returns its status.
async fn finished(ns: &str, name: &str) -> Value {
    eventually(&format!("backup {name} finished"), STEP, || async {
        let s = kvsb(ns, name)["status"].clone();
        (s["phase"] == "Succeeded" || s["phase"] == "Failed").then_some(s)
    })
    .await
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server (KUBECONFIG); scripts/test starts one"]
async fn backups_through_custom_resources() {
    let OperatorEnv { client: _client, namespace, root, net, kubelet: _kubelet, operator: _operator, pods } =
        OperatorEnv::start("kvs-backup-e2e").await;
    let ns = namespace.name().to_owned();
    apply(
        &ns,
        root.path(),
        "cluster",
        "apiVersion: kvstore.dev/v1alpha1\nkind: KVStoreCluster\nmetadata:\n  name: demo\nspec:\n  replicas: 4\n  \
         replicationFactor: 2\n  image: kvstore/kvs-node:1.0\n",
    );
    wait_running(&ns, "demo", 4, 2, "4 nodes, 2 partitions").await;
    write_keys(&pods, "demo", KEYS).await;

    let s3 = MotoServer::start(&net.service(9000)).await;
    s3.bucket("kvs-backups").await;
    let mut secret = vec!["-n", &ns, "create", "secret", "generic", "s3-credentials"];
    let literals: Vec<String> = s3.settings().iter().map(|(k, v)| format!("--from-literal={k}={v}")).collect();
    secret.extend(literals.iter().map(String::as_str));
    kubectl(&secret);

    let directory = format!("file://{}/backups/demo-1", root.path().display());
    let to_s3 = "s3://kvs-backups/demo/1";
    apply(&ns, root.path(), "to-s3", &backup_yaml("to-s3", "demo", to_s3, Some("s3-credentials")));
    apply(&ns, root.path(), "to-dir", &backup_yaml("to-dir", "demo", &directory, None));
    let settings: Vec<(String, String)> = s3.settings().iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    for (name, url) in [("to-s3", to_s3), ("to-dir", directory.as_str())] {
        let s = finished(&ns, name).await;
        assert_eq!(s["phase"], "Succeeded", "backup {name}: {s:#}");
        assert_eq!(s["keys"].as_u64(), Some(KEYS as u64), "backup {name}: {s:#}");
        assert_eq!(s["deletions"].as_u64(), Some(0), "backup {name}: {s:#}");
        assert_eq!(s["progress"].as_str(), Some(format!("{KEYS}/{KEYS}").as_str()), "backup {name}: {s:#}");
        assert_eq!(s["manifest"].as_str(), Some(format!("{url}/manifest.json").as_str()));
        assert!(s["startTime"].is_string() && s["completionTime"].is_string(), "{s:#}");
        let dest = Destination::open_with(url, &settings).unwrap();
        let report = kvs_backup::verify(&dest, &Silent).await.unwrap_or_else(|e| panic!("verifying {url}: {e}"));
        assert_eq!(report.manifest.live_keys, KEYS as u64);
        assert_eq!(report.manifest.cluster.as_deref(), Some("demo"));
    }
    let table = kubectl(&["-n", &ns, "get", "kvsb"]);
    for column in ["CLUSTER", "PHASE", "PROGRESS", "KEYS", "to-s3", "to-dir", "Succeeded"] {
        assert!(table.contains(column), "kubectl get kvsb shows {column}:\n{table}");
    }

    // Backups are never overwritten: a second one to the same place fails, the first still verifies.
    apply(&ns, root.path(), "again", &backup_yaml("again", "demo", &directory, None));
    let s = finished(&ns, "again").await;
    assert_eq!(s["phase"], "Failed", "{s:#}");
    assert!(s["message"].as_str().unwrap_or_default().contains("already"), "the message says why: {s:#}");
    kvs_backup::verify(&Destination::open(&directory).unwrap(), &Silent).await.unwrap();

    // A missing cluster is waited for, and said so; a URL of no known kind fails at once.
    apply(&ns, root.path(), "orphan", &backup_yaml("orphan", "nosuch", &directory, None));
    eventually("the orphan backup says what it waits for", STEP, || async {
        let s = kvsb(&ns, "orphan")["status"].clone();
        (s["phase"] == "Pending" && s["message"].as_str().unwrap_or_default().contains("nosuch")).then_some(())
    })
    .await;
    apply(&ns, root.path(), "bad-url", &backup_yaml("bad-url", "demo", "ftp://example/backups", None));
    let s = finished(&ns, "bad-url").await;
    assert_eq!(s["phase"], "Failed", "{s:#}");
    assert!(s["message"].as_str().unwrap_or_default().contains("s3://"), "the message names the schemes: {s:#}");
}
