//! TLS across real node processes, with certificates made here (`kvs_testkit::certs`) and `curl` as the client:
//! a TLS cluster serves and replicates over mutual TLS; plain HTTP is told to use TLS; a client
//! certificate from another CA is refused; a node with a certificate from another CA cannot join;
//! certificates rotated under load fail no request.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use kvs_testkit::certs::{CertFiles, TestCa};
use kvs_testkit::net::LoopbackNet;
use kvs_testkit::process::{NodeCommand, NodeProcess};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// What `curl` presents and trusts.
struct Client {
    /// The CA it trusts.
    ca: PathBuf,
    /// Its own certificate and key.
    identity: Option<CertFiles>,
}

/// What a `curl` run ended with: an HTTP status and body, or curl's failure (no HTTP answer).
#[derive(Debug)]
enum Outcome {
    Answered(u16, String),
    Failed(String),
}

impl Client {
    fn call(&self, method: &str, url: &str, body: Option<&str>) -> Outcome {
        self.call_with(method, url, body, &[])
    }

    fn call_with(&self, method: &str, url: &str, body: Option<&str>, headers: &[&str]) -> Outcome {
        let mut cmd = Command::new("curl");
        for h in headers {
            cmd.args(["-H", h]);
        }
        cmd.args(["-sS", "--max-time", "10", "-X", method, "-o", "-", "-w", "\n%{http_code}"]);
        cmd.arg("--cacert").arg(&self.ca);
        if let Some(id) = &self.identity {
            cmd.arg("--cert").arg(&id.cert).arg("--key").arg(&id.key);
        }
        if let Some(body) = body {
            cmd.args(["--data-binary", body]);
        }
        let out = cmd.arg(url).output().expect("curl runs");
        if !out.status.success() {
            return Outcome::Failed(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        Outcome::Answered(code.parse().unwrap(), body.to_owned())
    }

    fn ok(&self, method: &str, url: &str, body: Option<&str>) -> (u16, String) {
        match self.call(method, url, body) {
            Outcome::Answered(code, body) => (code, body),
            Outcome::Failed(why) => panic!("{method} {url}: {why}"),
        }
    }
}

/// A node process on `addr` with TLS from `files` (clients must present a certificate).
fn start_node(addr: &str, files: &CertFiles, view: Option<&str>, k: u32, data: &Path) -> NodeProcess {
    let bin = env!("CARGO_BIN_EXE_kvs-node");
    let mut command = NodeCommand::node(bin, addr, data, "warn")
        .env("K", k.to_string())
        .env("KVS_TLS_CERT_FILE", files.cert.display().to_string())
        .env("KVS_TLS_KEY_FILE", files.key.display().to_string())
        .env("KVS_TLS_CA_FILE", files.ca.display().to_string())
        .env("KVS_TLS_CLIENT_AUTH", "require");
    if let Some(view) = view {
        command = command.env("VIEW", view);
    }
    NodeProcess::start(command).unwrap()
}

/// Waits (20 s at most) until `addr` answers `/healthz` over TLS, while `process` runs.
fn wait_serving(client: &Client, process: &mut NodeProcess, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(process.is_running(), "the node at {addr} exited (its error is above)");
        if matches!(client.call("GET", &format!("https://{addr}/healthz"), None), Outcome::Answered(200, _)) {
            return;
        }
        assert!(Instant::now() < deadline, "{addr} did not serve /healthz over TLS within 20 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_tls_cluster_replicates_over_mutual_tls_and_refuses_strangers() {
    let net = LoopbackNet::take();
    let dir = tempfile::tempdir().unwrap();
    let (ca, other_ca) = (TestCa::new(dir.path(), "kvstore test CA"), TestCa::new(dir.path(), "some other CA"));
    let addrs: Vec<String> = (0..3).map(|i| net.node(i)).collect();
    let ips: Vec<String> = (0..3).map(|i| addrs[i].rsplit_once(':').unwrap().0.to_owned()).collect();
    let node_files: Vec<CertFiles> = (0..2).map(|i| ca.issue(&format!("node{i}"), &ips[i..=i])).collect();
    let client = Client { ca: node_files[0].ca.clone(), identity: Some(ca.issue("client", &["client".into()])) };
    let view = addrs[..2].join(",");
    let data: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<NodeProcess> =
        (0..2).map(|i| start_node(&addrs[i], &node_files[i], Some(&view), 2, data[i].path())).collect();
    for (i, node) in nodes.iter_mut().enumerate() {
        wait_serving(&client, node, &addrs[i]);
    }

    // A write through node 0 is acknowledged with both copies (node 1's over mutual TLS), and
    // node 1 serves it.
    let (code, body) = client.ok("PUT", &format!("https://{}/v1/kv/k", addrs[0]), Some("v"));
    assert_eq!(code, 201, "{body}");
    let written: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(written["copies"], 2, "{body}");
    assert_eq!(client.ok("GET", &format!("https://{}/v1/kv/k", addrs[1]), None), (200, "v".to_owned()));

    // Plain HTTP gets a 400 that says to use TLS.
    let plain =
        Command::new("curl").args(["-sS", "--max-time", "10"]).arg(format!("http://{}/v1/kv/k", addrs[0])).output();
    let plain = String::from_utf8_lossy(&plain.unwrap().stdout).into_owned();
    assert!(plain.contains("serves TLS only: use https://"), "{plain}");

    // No client certificate, or one from another CA: refused at the handshake.
    let anonymous = Client { ca: client.ca.clone(), identity: None };
    let stranger = Client { ca: client.ca.clone(), identity: Some(other_ca.issue("stranger", &["x".into()])) };
    for (who, c) in [("no certificate", &anonymous), ("another CA's certificate", &stranger)] {
        let outcome = c.call("GET", &format!("https://{}/v1/kv/k", addrs[0]), None);
        assert!(matches!(outcome, Outcome::Failed(_)), "{who}: {outcome:?}");
    }

    // A node with a certificate from another CA cannot join: the change is refused and the view
    // stays as it was.
    let foreign = other_ca.issue("foreign", &ips[2..=2]);
    let mut joiner = start_node(&addrs[2], &foreign, None, 1, data[2].path());
    let foreign_client = Client { ca: foreign.ca.clone(), identity: Some(foreign.clone()) };
    wait_serving(&foreign_client, &mut joiner, &addrs[2]);
    let change = format!(r#"{{"members":["{}","{}","{}"],"replication_factor":1}}"#, addrs[0], addrs[1], addrs[2]);
    let outcome = client.call_with(
        "PUT",
        &format!("https://{}/v1/admin/view", addrs[0]),
        Some(&change),
        &["content-type: application/json"],
    );
    let Outcome::Answered(code, body) = outcome else { panic!("the view change got no answer: {outcome:?}") };
    assert!(code == 503 || code == 409, "the change went through: {code} {body}");
    println!("adding a node with another CA's certificate: {code} {body}");
    let (_, status) = client.ok("GET", &format!("https://{}/v1/admin/status", addrs[0]), None);
    let status: kvs_api::ClusterStatus = serde_json::from_str(&status).unwrap();
    let layout = status.layout.unwrap();
    assert_eq!(layout.partitions, vec![vec![addrs[0].clone(), addrs[1].clone()]], "the view is unchanged");
    drop(joiner);
    drop(nodes);
}

#[test]
fn certificates_rotated_under_load_fail_no_request() {
    let net = LoopbackNet::take();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "kvstore test CA");
    let addrs: Vec<String> = (0..2).map(|i| net.node(i)).collect();
    let ips: Vec<String> = addrs.iter().map(|a| a.rsplit_once(':').unwrap().0.to_owned()).collect();
    let files: Vec<CertFiles> = (0..2).map(|i| ca.issue(&format!("node{i}"), &ips[i..=i])).collect();
    let client = Arc::new(Client { ca: files[0].ca.clone(), identity: Some(ca.issue("client", &["c".into()])) });
    let view = addrs.join(",");
    let data: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<NodeProcess> =
        (0..2).map(|i| start_node(&addrs[i], &files[i], Some(&view), 2, data[i].path())).collect();
    for (i, node) in nodes.iter_mut().enumerate() {
        wait_serving(&client, node, &addrs[i]);
    }

    // Clients write and read through both nodes, each request on a new TLS connection (so each
    // sees the certificate in force), while the certificates are replaced.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(std::sync::Mutex::new(Vec::new())));
    let load: Vec<_> = (0..2)
        .map(|t| {
            let (client, stop, done, failures, addrs) =
                (client.clone(), stop.clone(), done.clone(), failures.clone(), addrs.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let url = format!("https://{}/v1/kv/t{t}-{i}", addrs[i % 2]);
                    let (method, body) = if i % 2 == 0 { ("PUT", Some("v")) } else { ("GET", None) };
                    let url =
                        if method == "GET" { format!("https://{}/v1/kv/t{t}-{}", addrs[i % 2], i - 1) } else { url };
                    match client.call(method, &url, body) {
                        Outcome::Answered(200 | 201, _) => {}
                        other => failures.lock().unwrap().push(format!("{method} {url}: {other:?}")),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();

    let serial = |pem: &Path| {
        let out = Command::new("openssl").args(["x509", "-noout", "-serial", "-in"]).arg(pem).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let presented = |addr: &str| {
        let script = format!(
            "openssl s_client -connect {addr} -CAfile {ca} -cert {cert} -key {key} </dev/null 2>/dev/null | openssl x509 -noout -serial",
            ca = client.ca.display(),
            cert = client.identity.as_ref().unwrap().cert.display(),
            key = client.identity.as_ref().unwrap().key.display(),
        );
        let out = Command::new("bash").args(["-c", &script]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    while done.load(Ordering::Relaxed) < 20 {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (i, addr) in addrs.iter().enumerate() {
        let old = serial(&files[i].cert);
        assert_eq!(presented(addr), old);
        let renewed = ca.issue(&format!("node{i}"), &ips[i..=i]);
        let new = serial(&renewed.cert);
        assert_ne!(old, new);
        let deadline = Instant::now() + Duration::from_secs(20);
        while presented(addr) != new {
            assert!(Instant::now() < deadline, "{addr} never presented its renewed certificate");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let after_rotation = done.load(Ordering::Relaxed);
    while done.load(Ordering::Relaxed) < after_rotation + 20 {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    println!(
        "{} requests, {after_rotation} of them before both certificates were replaced",
        done.load(Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:#?}",
        failures.len(),
        done.load(Ordering::Relaxed)
    );
    drop(nodes);
}

/// Polls `addr` with `admin` until it answers its status, while `process` runs (20 s at most).
fn wait_status(admin: &kvs_api::AdminClient, process: &mut NodeProcess, addr: &str, rt: &tokio::runtime::Runtime) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while rt.block_on(admin.status(addr)).is_err() {
        assert!(process.is_running(), "the node at {addr} exited (its error is above)");
        assert!(Instant::now() < deadline, "{addr} did not answer its status over TLS within 20 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_project_clients_speak_tls_check_names_and_present_certificates() {
    use kvs_api::{AdminClient, ClientTls, KvClient};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let net = LoopbackNet::take();
    let dir = tempfile::tempdir().unwrap();
    let (ca, other_ca) = (TestCa::new(dir.path(), "kvstore test CA"), TestCa::new(dir.path(), "some other CA"));
    let addr = net.node(0);
    // The node's certificate names a DNS identity only, as the operator's per-pod certificates do;
    // clients here reach it by IP.
    let files = ca.issue("node0", &["node0.kvs.test".into()]);
    let client_files = ca.issue("client", &["client".into()]);
    let data = tempfile::tempdir().unwrap();
    let mut node = start_node(&addr, &files, Some(&addr), 1, data.path());
    let token = "a-cluster-token-of-the-test";
    let trusted = ClientTls::from_files(&files.ca, Some(&client_files.cert), Some(&client_files.key)).unwrap();
    let any_name = trusted.clone().accepting_any_name();
    let admin = AdminClient::new(Some(token.into())).with_tls(any_name.clone());
    wait_status(&admin, &mut node, &addr, &rt);

    // By IP with a certificate naming a DNS name: refused when names are checked, served when only
    // the chain is (the operator's way).
    let timeout = Duration::from_secs(10);
    let strict = KvClient::connect(&addr, timeout, None, &trusted);
    let refused = rt.block_on(strict.put("k", "v")).unwrap_err().to_string();
    assert!(refused.contains("NotValidForName") || refused.contains("not valid for name"), "{refused}");
    let session = KvClient::connect(&addr, timeout, None, &any_name);
    rt.block_on(session.put("k", "v")).unwrap();
    assert_eq!(rt.block_on(session.get("k")).unwrap().unwrap().value, "v");
    let status = rt.block_on(admin.status(&addr)).unwrap();
    assert_eq!(status.layout.unwrap().partitions, vec![vec![addr.clone()]]);

    // No client certificate (the node requires one), another CA, or plain HTTP: no answer, or a
    // 400 that says to use TLS; nothing written.
    let anonymous = ClientTls::from_files(&files.ca, None, None).unwrap().accepting_any_name();
    let other = other_ca.issue("other", &["other".into()]);
    let foreign = ClientTls::from_files(&other.ca, Some(&other.cert), Some(&other.key)).unwrap().accepting_any_name();
    for (who, tls) in [("no client certificate", &anonymous), ("another CA", &foreign)] {
        let e = rt.block_on(KvClient::connect(&addr, timeout, None, tls).put("k", "w")).unwrap_err();
        assert_eq!(e.status(), None, "{who}: the handshake fails, no HTTP answer: {e}");
    }
    let plain = rt.block_on(KvClient::new(&addr, timeout).put("k", "w")).unwrap_err();
    assert_eq!(plain.status(), Some(400), "{plain}");
    assert!(plain.to_string().contains("use https://"), "{plain}");
    assert_eq!(rt.block_on(session.get("k")).unwrap().unwrap().value, "v", "nothing was written");

    // Unusable settings say which file and what is wrong.
    let missing = dir.path().join("missing.pem");
    let e = ClientTls::from_files(&missing, None, None).unwrap_err().to_string();
    assert!(e.contains("missing.pem"), "{e}");
    let e = ClientTls::from_files(&files.key, None, None).unwrap_err().to_string();
    assert!(e.contains("node0.key") && e.contains("certificate"), "{e}");
    let e = ClientTls::from_files(&files.ca, Some(&client_files.cert), Some(&other.key)).unwrap_err().to_string();
    assert!(e.contains("not a usable pair"), "{e}");
    drop(node);
}

#[test]
fn a_client_certificate_listed_in_the_auth_file_is_an_identity() {
    use kvs_api::{ClientTls, KvClient};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let net = LoopbackNet::take();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "kvstore test CA");
    let addr = net.node(0);
    let ip = addr.rsplit_once(':').unwrap().0.to_owned();
    let files = ca.issue("node0", &[ip]);
    let auth = dir.path().join("auth.yaml");
    std::fs::write(
        &auth,
        "tokens:\n  - {name: app, token: app-token-0123456789, role: write}\n  - {name: dashboards, subject: dashboards-client, role: read}\n",
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_kvs-node");
    let command = NodeCommand::node(bin, &addr, data.path(), "warn")
        .env("K", "1")
        .env("VIEW", &addr)
        .env("KVS_TLS_CERT_FILE", files.cert.display().to_string())
        .env("KVS_TLS_KEY_FILE", files.key.display().to_string())
        .env("KVS_TLS_CA_FILE", files.ca.display().to_string())
        .env("KVS_TLS_CLIENT_AUTH", "optional")
        .env("KVS_AUTH_FILE", auth.display().to_string());
    let mut node = NodeProcess::start(command).unwrap();
    let client = |stem: &str, subject: &str| {
        let id = ca.issue(stem, &[subject.to_owned()]);
        ClientTls::from_files(&id.ca, Some(&id.cert), Some(&id.key)).unwrap()
    };
    let timeout = Duration::from_secs(10);
    let app = KvClient::connect(
        &addr,
        timeout,
        Some("app-token-0123456789"),
        &ClientTls::from_files(&files.ca, None, None).unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while rt.block_on(app.put("k", "v")).is_err() {
        assert!(node.is_running(), "the node exited (its error is above)");
        assert!(Instant::now() < deadline, "the node did not take a write over TLS within 20 s");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The listed certificate, no token: reads as `dashboards`, may not write (403 naming it).
    let dashboards = KvClient::connect(&addr, timeout, None, &client("dashboards", "dashboards-client"));
    assert_eq!(rt.block_on(dashboards.get("k")).unwrap().unwrap().value, "v");
    let refused = rt.block_on(dashboards.put("k", "w")).unwrap_err();
    assert_eq!(refused.status(), Some(403), "{refused}");
    assert!(refused.to_string().contains("\"dashboards\" has role read"), "{refused}");
    // A certificate the file does not list, or none: 401.
    let stranger = KvClient::connect(&addr, timeout, None, &client("stranger", "someone-else"));
    assert_eq!(rt.block_on(stranger.get("k")).unwrap_err().status(), Some(401));
    let anonymous = KvClient::connect(&addr, timeout, None, &ClientTls::from_files(&files.ca, None, None).unwrap());
    assert_eq!(rt.block_on(anonymous.get("k")).unwrap_err().status(), Some(401));
    assert_eq!(rt.block_on(app.get("k")).unwrap().unwrap().value, "v", "nothing changed");
    drop(node);
}
