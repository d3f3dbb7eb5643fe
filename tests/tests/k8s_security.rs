//! `spec.tls` and `spec.auth` end to end against a real API server, with the operator process, the
//! stand-in StatefulSet controller and kubelet, and real `kvs-node` processes. Needs `KUBECONFIG`
//! (`scripts/test` starts a server): `cargo test -p kvs-e2e --test k8s_security -- --ignored`.
//!
//! One scenario, every step asserted:
//! - `examples/secure-cluster.yaml` (3 nodes, `tls.enabled`, a token Secret) becomes Available, as
//!   its comment says to create it: the operator made the
//!   CA and the pods' certificates, the kubelet's probes and the operator's own calls went over TLS
//!   (the nodes refuse plain HTTP, checked too);
//! - clients with the CA from `<cluster>-tls-ca`: a writer token writes, a reader token reads and is
//!   refused a write (403), no token gets 401, nothing changed by the refused calls;
//! - `tls.enabled` cannot be turned off (the API server refuses with the reason);
//! - scaled to 4: the new pod's certificate is issued before it starts, the view change (posted by
//!   the operator over TLS) moves data to it;
//! - a pod's certificate issued again (its entry removed from the Secret, as an expiry would make
//!   the operator do) under a writer making a new TLS connection per request: the pod presents the
//!   new certificate without a restart and no request fails;
//! - a `KVStoreBackup` of the cluster succeeds (the operator reads the partitions over TLS) with
//!   every key written;
//! - a token added to the auth Secret works without a restart.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kvs_api::{ClientTls, KvClient};
use kvs_e2e::k8s::{eventually, kubectl};
use kvs_e2e::kvsc::{OperatorEnv, STEP, pod_addresses, pod_incarnation, wait_running, workspace_root};
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The cluster of `examples/secure-cluster.yaml`.
const NAME: &str = "secure-demo";
const READER: &str = "reader-token-0123456789";
const WRITER: &str = "writer-token-0123456789";
const LATE: &str = "added-later-token-0123456789";

fn auth_file(extra: &str) -> String {
    format!(
        "tokens:\n  - {{name: reader, token: {READER}, role: read}}\n  - {{name: writer, token: {WRITER}, role: write}}\n{extra}"
    )
}

fn secret(name: &str, key: &str, text: &str) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some(name.into());
    s.string_data = Some(BTreeMap::from([(key.to_owned(), text.to_owned())]));
    s
}

/// The text under `key` in Secret `name`, if both exist.
async fn secret_text(secrets: &Api<Secret>, name: &str, key: &str) -> Option<String> {
    let data = secrets.get_opt(name).await.unwrap()?.data?;
    Some(String::from_utf8(data.get(key)?.0.clone()).unwrap())
}

/// The serial number of a PEM certificate, or of the one `address` presents, as openssl prints it.
fn serial_of_pem(pem: &str, dir: &std::path::Path) -> String {
    let file = dir.join("serial-check.pem");
    std::fs::write(&file, pem).unwrap();
    let out = Command::new("openssl").args(["x509", "-noout", "-serial", "-in"]).arg(&file).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn presented_serial(address: &str) -> String {
    let script = format!("openssl s_client -connect {address} </dev/null 2>/dev/null | openssl x509 -noout -serial");
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
#[ignore = "needs KUBECONFIG (a Kubernetes API server); scripts/test starts one"]
async fn a_tls_cluster_with_tokens_serves_only_over_tls_and_only_who_may() {
    let OperatorEnv { client, namespace, root, net: _net, kubelet: _kubelet, operator: _operator, pods } =
        OperatorEnv::start("kvs-security-e2e").await;
    let ns = namespace.name().to_owned();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets.create(&PostParams::default(), &secret("secure-demo-auth", "auth.yaml", &auth_file(""))).await.unwrap();
    // The example users start from, as its comment says: the auth Secret, then the cluster.
    let example = workspace_root().join("examples/secure-cluster.yaml");
    kubectl(&["-n", &ns, "apply", "-f", example.to_str().unwrap()]);
    wait_running(&ns, NAME, 3, 1, "the example's 3-node TLS cluster with tokens").await;

    // The Secrets: the CA with its key; the pods' certificates with the CA certificate.
    let ca = secret_text(&secrets, "secure-demo-tls-ca", "ca.crt").await.expect("the CA certificate");
    assert!(secret_text(&secrets, "secure-demo-tls-ca", "ca.key").await.is_some(), "the CA key");
    for key in ["ca.crt", "secure-demo-0.crt", "secure-demo-0.key", "secure-demo-2.crt", "secure-demo-2.key"] {
        assert!(secret_text(&secrets, "secure-demo-tls", key).await.is_some(), "secure-demo-tls has {key}");
    }
    assert_eq!(secret_text(&secrets, "secure-demo-tls", "ca.crt").await.as_deref(), Some(ca.as_str()));

    // Clients trust the CA from the Secret; they reach pods by IP, so only the chain is checked.
    let tls = ClientTls::from_pem(ca.as_bytes(), None).unwrap().accepting_any_name();
    let timeout = Duration::from_secs(10);
    let addresses = pod_addresses(&pods, NAME).await;
    let via = addresses[0].clone();
    let session = |token: Option<&str>| KvClient::connect(&via, timeout, token, &tls);
    session(Some(WRITER)).put("greeting", "hello").await.unwrap();
    let read = session(Some(READER)).get("greeting").await.unwrap().unwrap();
    assert_eq!(read.value, "hello");
    let refused = session(Some(READER)).put("greeting", "changed").await.unwrap_err();
    assert_eq!(refused.status(), Some(403), "{refused}");
    assert!(refused.to_string().contains("reader"), "the 403 names the identity: {refused}");
    let anonymous = session(None).get("greeting").await.unwrap_err();
    assert_eq!(anonymous.status(), Some(401), "{anonymous}");
    let plain = KvClient::with_token(&via, timeout, Some(WRITER)).put("greeting", "plain").await.unwrap_err();
    assert_eq!(plain.status(), Some(400), "plain HTTP is refused: {plain}");
    let read = session(Some(READER)).get("greeting").await.unwrap().unwrap();
    assert_eq!(read.value, "hello", "the refused calls changed nothing");

    // TLS cannot be turned off on a running cluster: the API server refuses, saying why.
    let off = Command::new("kubectl")
        .args(["-n", &ns, "patch", "kvsc", NAME, "--type", "merge", "-p", r#"{"spec":{"tls":{"enabled":false}}}"#])
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&off.stderr);
    assert!(!off.status.success() && why.contains("tls.enabled cannot change after creation"), "{why}");

    // Scale out: the new pod has its certificate before it starts, and joins over TLS.
    kubectl(&["-n", &ns, "patch", "kvsc", NAME, "--type", "merge", "-p", r#"{"spec":{"replicas":4}}"#]);
    wait_running(&ns, NAME, 4, 2, "4 nodes after a scale-out over TLS").await;
    let new_pod = "secure-demo-3";
    assert!(secret_text(&secrets, "secure-demo-tls", &format!("{new_pod}.crt")).await.is_some(), "its certificate");
    let fourth = pods.get(new_pod).await.unwrap().status.unwrap().pod_ip.unwrap();
    let moved = KvClient::connect(format!("{fourth}:8080"), timeout, Some(READER), &tls).get("greeting").await;
    assert_eq!(moved.unwrap().unwrap().value, "hello", "the new pod serves (its partition's data moved to it)");

    // secure-demo-0's certificate issued again (as an expiry would have it) under load: presented without
    // a restart, no request fails.
    let demo0 = pods.get("secure-demo-0").await.unwrap().status.unwrap().pod_ip.unwrap();
    let demo0 = format!("{demo0}:8080");
    let old_pem = secret_text(&secrets, "secure-demo-tls", "secure-demo-0.crt").await.unwrap();
    assert_eq!(presented_serial(&demo0), serial_of_pem(&old_pem, root.path()));
    let incarnation = pod_incarnation(&pods, "secure-demo-0").await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::<String>::new())));
    let writer = {
        let (stop, done, failures, tls, demo0) =
            (stop.clone(), done.clone(), failures.clone(), tls.clone(), demo0.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                // A new client each time: a new TLS handshake, which sees the certificate in force.
                let client = KvClient::connect(&demo0, timeout, Some(WRITER), &tls);
                if let Err(e) = client.put(&format!("renewal-{i}"), "v").await {
                    failures.lock().unwrap().push(e.to_string());
                }
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };
    eventually("writes before the renewal", STEP, || async { (done.load(Ordering::Relaxed) >= 20).then_some(()) })
        .await;
    kubectl(&[
        "-n",
        &ns,
        "patch",
        "secret",
        "secure-demo-tls",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/data/secure-demo-0.crt"}]"#,
    ]);
    // Any change to the cluster object has it reconciled now rather than at the next minute.
    kubectl(&["-n", &ns, "annotate", "--overwrite", "kvsc", NAME, "e2e.kvstore.dev/poke=renewal"]);
    let new_pem = eventually("secure-demo-0's certificate issued again", STEP, || async {
        secret_text(&secrets, "secure-demo-tls", "secure-demo-0.crt").await.filter(|p| *p != old_pem)
    })
    .await;
    let new_serial = serial_of_pem(&new_pem, root.path());
    eventually("secure-demo-0 presenting its new certificate", STEP, || async {
        (presented_serial(&demo0) == new_serial).then_some(())
    })
    .await;
    let after = done.load(Ordering::Relaxed);
    eventually("writes after the renewal", STEP, || async {
        (done.load(Ordering::Relaxed) >= after + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let failures = failures.lock().unwrap().clone();
    let total = done.load(Ordering::Relaxed);
    println!("{total} requests over new TLS connections while secure-demo-0's certificate was replaced");
    assert!(failures.is_empty(), "{} of {total} requests failed: {failures:#?}", failures.len());
    assert_eq!(pod_incarnation(&pods, "secure-demo-0").await.unwrap(), incarnation, "secure-demo-0 was not restarted");

    // A backup of the TLS cluster: the operator reads every partition over TLS.
    let directory = format!("file://{}/backups/secure", root.path().display());
    let backup = root.path().join("backup.yaml");
    std::fs::write(
        &backup,
        format!(
            "apiVersion: kvstore.dev/v1alpha1\nkind: KVStoreBackup\nmetadata:\n  name: over-tls\nspec:\n  cluster: \
             {NAME}\n  destination: {directory}\n"
        ),
    )
    .unwrap();
    kubectl(&["-n", &ns, "apply", "-f", backup.to_str().unwrap()]);
    let status = eventually("the backup over TLS finished", STEP, || async {
        let b: serde_json::Value =
            serde_json::from_str(&kubectl(&["-n", &ns, "get", "kvsb", "over-tls", "-o", "json"])).unwrap();
        let s = b["status"].clone();
        (s["phase"] == "Succeeded" || s["phase"] == "Failed").then_some(s)
    })
    .await;
    assert_eq!(status["phase"], "Succeeded", "{status:#}");
    // `greeting` and one key per request of the renewal (all acknowledged, checked above).
    let written = 1 + total as u64;
    assert_eq!(status["keys"].as_u64(), Some(written), "every key written is in it: {status:#}");

    // A token added to the auth Secret is honoured without a restart.
    let late_entry = format!("  - {{name: late, token: {LATE}, role: write}}\n");
    let mut auth = secrets.get("secure-demo-auth").await.unwrap();
    let text = auth_file(&late_entry).into_bytes();
    auth.data = Some(BTreeMap::from([("auth.yaml".to_owned(), k8s_openapi::ByteString(text))]));
    secrets.replace("secure-demo-auth", &PostParams::default(), &auth).await.unwrap();
    eventually("the added token honoured", STEP, || async { session(Some(LATE)).put("late", "yes").await.ok() }).await;
    assert_eq!(pod_incarnation(&pods, "secure-demo-0").await.unwrap(), incarnation, "secure-demo-0 was not restarted");
}
