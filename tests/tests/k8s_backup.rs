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
//!   fails with a message that names the URL schemes;
//! - a new 6-node, K=3 cluster with `spec.restoreFrom` the S3 backup is never `Available` before
//!   its restore `Succeeded`, then serves every key;
//! - `restoreFrom` on a cluster that holds keys is refused (`RestoreFailed`, saying to use
//!   `overwrite`), and removing it makes the cluster available again;
//! - a `KVStoreBackupSchedule` every 2 s keeping 2: its backups are verified (`lastVerified`), the
//!   older ones are deleted with their files, never more than one runs at a time; suspended, it
//!   creates no more.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use kvs_backup::{Destination, Silent};
use kvs_e2e::k8s::{eventually, kubectl};
use kvs_e2e::kvsc::{OperatorEnv, STEP, assert_keys, kvsc, wait_running, write_keys};
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

fn cluster_yaml(name: &str, replicas: u32, k: u32, restore_from: &str) -> String {
    format!(
        "apiVersion: kvstore.dev/v1alpha1\nkind: KVStoreCluster\nmetadata:\n  name: {name}\nspec:\n  replicas: \
         {replicas}\n  replicationFactor: {k}\n  image: kvstore/kvs-node:1.0\n{restore_from}"
    )
}

fn available(c: &Value) -> Value {
    c["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|x| x["type"] == "Available")
        .cloned()
        .unwrap_or_default()
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
    apply(&ns, root.path(), "cluster", &cluster_yaml("demo", 4, 2, ""));
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

    // The examples users start from are valid resources.
    let examples = kvs_e2e::kvsc::workspace_root().join("examples/backup.yaml");
    kubectl(&["-n", &ns, "apply", "--dry-run=server", "-f", examples.to_str().unwrap()]);

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

    // A new cluster from the S3 backup, at another size and K: Available only once restored.
    let restore_from = format!("  restoreFrom:\n    url: {to_s3}\n    credentialsSecret: s3-credentials\n");
    apply(&ns, root.path(), "copy", &cluster_yaml("copy", 6, 3, &restore_from));
    let restored = eventually("the copy restored and Available", STEP, || async {
        let c = kvsc(&ns, "copy");
        let (condition, restore) = (available(&c), c["status"]["restore"].clone());
        if condition["status"] == "True" {
            assert_eq!(restore["phase"], "Succeeded", "Available before the restore finished: {:#}", c["status"]);
            return Some(restore);
        }
        None
    })
    .await;
    assert_eq!(restored["keys"].as_u64(), Some(KEYS as u64), "{restored:#}");
    wait_running(&ns, "copy", 6, 2, "the restored cluster: 6 nodes, K=3").await;
    assert_keys(&pods, "copy", KEYS, "in the restored cluster").await;
    let events = kubectl(&["-n", &ns, "get", "events.events.k8s.io", "-o", "custom-columns=REASON:.reason"]);
    assert!(events.contains("Restored"), "a Restored event:\n{events}");

    // Into a cluster that holds keys: refused without overwrite, and said so.
    let patch = format!(r#"{{"spec":{{"restoreFrom":{{"url":"{directory}"}}}}}}"#);
    kubectl(&["-n", &ns, "patch", "kvsc", "demo", "--type", "merge", "-p", &patch]);
    let refused = eventually("the restore into demo refused", STEP, || async {
        let c = kvsc(&ns, "demo");
        (c["status"]["restore"]["phase"] == "Failed").then(|| available(&c))
    })
    .await;
    assert_eq!((refused["status"].as_str(), refused["reason"].as_str()), (Some("False"), Some("RestoreFailed")));
    assert!(refused["message"].as_str().unwrap_or_default().contains("overwrite"), "says what to do: {refused:#}");
    kubectl(&["-n", &ns, "patch", "kvsc", "demo", "--type", "merge", "-p", r#"{"spec":{"restoreFrom":null}}"#]);
    eventually("demo available again", STEP, || async {
        (available(&kvsc(&ns, "demo"))["status"] == "True").then_some(())
    })
    .await;
    assert_keys(&pods, "demo", KEYS, "demo after the refused restore").await;

    // A schedule: backups every 2 s, each verified, the newest 2 successes kept.
    let base = format!("file://{}/backups/scheduled", root.path().display());
    let schedule = format!(
        "apiVersion: kvstore.dev/v1alpha1\nkind: KVStoreBackupSchedule\nmetadata:\n  name: often\nspec:\n  \
         cluster: demo\n  schedule: \"*/2 * * * * *\"\n  destination: {base}\n  keep: 2\n"
    );
    apply(&ns, root.path(), "schedule", &schedule);
    let deleted = eventually("the schedule deleted an old backup", STEP, || async {
        let events =
            kubectl(&["-n", &ns, "get", "events.events.k8s.io", "-o", "custom-columns=REASON:.reason,NOTE:.note"]);
        events.lines().find(|l| l.starts_with("BackupDeleted")).map(str::to_owned)
    })
    .await;
    let status: Value = serde_json::from_str(&kubectl(&["-n", &ns, "get", "kvsbs", "often", "-o", "json"])).unwrap();
    let status = &status["status"];
    assert!(status["lastVerified"].is_string() && status["nextScheduleTime"].is_string(), "{status:#}");
    // The deleted backup (named in the event) has no files left; the kept ones verify.
    let gone = deleted.split_whitespace().find(|w| w.starts_with("often-")).unwrap().to_owned();
    assert!(
        !root.path().join(format!("backups/scheduled/{gone}/manifest.json")).exists(),
        "{gone} still has its manifest"
    );
    let listed: Value =
        serde_json::from_str(&kubectl(&["-n", &ns, "get", "kvsb", "-l", "kvstore.dev/schedule=often", "-o", "json"]))
            .unwrap();
    let items = listed["items"].as_array().unwrap();
    let running =
        items.iter().filter(|b| b["status"]["phase"] != "Succeeded" && b["status"]["phase"] != "Failed").count();
    assert!(running <= 1, "at most one scheduled backup runs at a time: {listed:#}");
    let kept = status["lastSuccessfulBackup"].as_str().unwrap();
    kvs_backup::verify(&Destination::open(&format!("{base}/{kept}")).unwrap(), &Silent).await.unwrap();

    kubectl(&["-n", &ns, "patch", "kvsbs", "often", "--type", "merge", "-p", r#"{"spec":{"suspend":true}}"#]);
    let names = || async {
        let listed: Value = serde_json::from_str(&kubectl(&[
            "-n",
            &ns,
            "get",
            "kvsb",
            "-l",
            "kvstore.dev/schedule=often",
            "-o",
            "json",
        ]))
        .unwrap();
        let mut names: Vec<String> = listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };
    // Once the operator has seen the suspension (its status says so), no newer backup is created
    // over the next two schedule times.
    eventually("the schedule says it is suspended", STEP, || async {
        let s: Value = serde_json::from_str(&kubectl(&["-n", &ns, "get", "kvsbs", "often", "-o", "json"])).unwrap();
        s["status"]["message"].as_str().is_some_and(|m| m.contains("suspended")).then_some(())
    })
    .await;
    let newest_before = names().await.pop();
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert_eq!(names().await.pop(), newest_before, "a backup was created while suspended");
}
