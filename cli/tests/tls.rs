//! kvsctl over TLS with tokens, as a user runs it against a cluster started with `--tls-*` and
//! `--auth-file`: the CA (`--cacert`), a client certificate (`--cert`, `--key`) for nodes that
//! require one, and a token (`--token-file`) whose role decides what it may do.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::{kvsctl, ok, path, text};
use kvs_testkit::certs::TestCa;
use kvs_testkit::net::LoopbackNet;
use kvs_testkit::process::{NodeCommand, NodeProcess, node_binary};
use std::time::{Duration, Instant};

#[test]
fn kvsctl_speaks_tls_with_a_client_certificate_and_a_token() {
    let net = LoopbackNet::take();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "kvsctl test CA");
    let addr = net.node(0);
    let ip = addr.rsplit_once(':').unwrap().0.to_owned();
    let node_files = ca.issue("node", &[ip]);
    let client = ca.issue("client", &["kvsctl".into()]);
    let auth = dir.path().join("auth.yaml");
    std::fs::write(
        &auth,
        "tokens:\n  - {name: reader, token: reader-token-0123456789, role: read}\n  - {name: writer, token: writer-token-0123456789, role: write}\n",
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let command = NodeCommand::node(node_binary().unwrap(), &addr, data.path(), "warn")
        .env("K", "1")
        .env("VIEW", &addr)
        .env("KVS_TLS_CERT_FILE", path(&node_files.cert))
        .env("KVS_TLS_KEY_FILE", path(&node_files.key))
        .env("KVS_TLS_CA_FILE", path(&node_files.ca))
        .env("KVS_TLS_CLIENT_AUTH", "require")
        .env("KVS_AUTH_FILE", path(&auth));
    let mut node = NodeProcess::start(command).unwrap();
    let tokens: Vec<_> = ["writer", "reader"]
        .iter()
        .map(|name| {
            let file = dir.path().join(format!("{name}.token"));
            std::fs::write(&file, format!("{name}-token-0123456789\n")).unwrap();
            file
        })
        .collect();
    let tls = ["--cacert", path(&client.ca), "--cert", path(&client.cert), "--key", path(&client.key)];
    let with = |token: usize, args: &[&str]| -> Vec<String> {
        let mut all: Vec<String> = tls.iter().map(|s| s.to_string()).collect();
        all.extend(["--token-file".to_owned(), path(&tokens[token]).to_owned()]);
        all.extend(args.iter().map(|s| s.to_string()));
        all
    };
    let run = |args: Vec<String>| kvsctl(&addr, &args.iter().map(String::as_str).collect::<Vec<_>>(), b"");

    // The node serves once kvsctl gets an answer over TLS.
    let deadline = Instant::now() + Duration::from_secs(30);
    while run(with(1, &["get", "nothing"])).status.code() != Some(3) {
        assert!(node.is_running(), "the node exited (its error is above)");
        assert!(Instant::now() < deadline, "the node did not answer kvsctl over TLS within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }

    ok(run(with(0, &["put", "greeting", "hello"])));
    assert_eq!(text(&ok(run(with(1, &["get", "greeting"]))).stdout).trim(), "hello");
    // https:// endpoints are taken as they are.
    let https = kvsctl(
        &format!("https://{addr}"),
        &with(1, &["get", "greeting"]).iter().map(String::as_str).collect::<Vec<_>>(),
        b"",
    );
    assert_eq!(text(&ok(https).stdout).trim(), "hello");

    // A read token may not write: exit code 4 and the node's 403 message.
    let refused = run(with(1, &["put", "greeting", "changed"]));
    assert_eq!(refused.status.code(), Some(4), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("403"), "{}", text(&refused.stderr));
    // Without --cacert the node says to use TLS; without the client certificate the handshake
    // fails and kvsctl says why.
    let plain = kvsctl(&addr, &["get", "greeting"], b"");
    assert_eq!(plain.status.code(), Some(4), "{}", text(&plain.stderr));
    assert!(text(&plain.stderr).contains("https"), "{}", text(&plain.stderr));
    let args = ["--cacert", path(&client.ca), "--token-file", path(&tokens[1]), "get", "greeting"];
    let anonymous = kvsctl(&addr, &args, b"");
    assert_eq!(anonymous.status.code(), Some(1), "{}", text(&anonymous.stderr));
    assert_eq!(text(&ok(run(with(1, &["get", "greeting"]))).stdout).trim(), "hello", "nothing changed");
    drop(node);
}
