//! The framed peer transport against a real node server in this process (`kvs_node::run` on a
//! port of its own): many calls in flight on one connection, the cluster token, peers that only
//! speak HTTP, and peers that are gone.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use kvs_node::causal::Version;
use kvs_node::node::{Node, Settings};
use kvs_node::peers::{FramedPeers, PeerError, Peers};
use kvs_node::protocol::{PeerRequest, PeerResponse};
use kvs_node::store::{MemoryStore, Record};
use kvs_node::view::View;
use std::sync::Arc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(10);

/// A network where every peer is unreachable (the node owns every key anyway).
struct NoPeers;

#[async_trait::async_trait]
impl Peers for NoPeers {
    async fn call(&self, peer: &str, _: &PeerRequest, _: Duration) -> Result<PeerResponse, PeerError> {
        Err(PeerError::Unreachable { peer: peer.to_owned(), detail: "no network in this test".into() })
    }
}

/// A one-node cluster at `addr`: it owns every key.
fn lone_node(addr: &str, token: Option<&str>) -> Arc<Node> {
    let mut settings = Settings::new(addr);
    settings.cluster_token = token.map(str::to_owned);
    let view = View::initial(&[addr.to_owned()], 1);
    Node::new(settings, Some(view), Arc::new(MemoryStore::new()), Arc::new(NoPeers))
}

/// A node owning every key, served on a fresh loopback port until the returned sender is dropped.
async fn serve(token: Option<&str>) -> (String, Arc<Node>, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let node = lone_node(&addr, token);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(kvs_node::run(listener, node.clone(), async move {
        let _ = stopped.await;
    }));
    (addr, node, stop)
}

fn client(token: Option<&str>) -> FramedPeers {
    FramedPeers::new(Duration::from_secs(1), token.map(str::to_owned), None, Duration::from_secs(75))
}

fn record(ts: u64, value: &str) -> Record {
    Record {
        version: Version { ts, writer: "w".into() },
        clock: Default::default(),
        value: Some(value.to_owned().into()),
    }
}

fn replicate(key: &str, ts: u64) -> PeerRequest {
    PeerRequest::Replicate {
        records: vec![(key.to_owned(), record(ts, key))],
        from: "w".into(),
        cap: 0,
        pending: vec![],
        view_epoch: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_many_calls_in_flight_on_one_connection_each_get_their_own_answer() {
    let (addr, _node, _stop) = serve(None).await;
    let peers = Arc::new(client(None));
    let writes = (0..300).map(|i| {
        let (peers, addr) = (peers.clone(), addr.clone());
        tokio::spawn(async move { peers.call(&addr, &replicate(&format!("k{i}"), 100 + i), DEADLINE).await })
    });
    for w in writes {
        assert!(matches!(w.await.unwrap(), Ok(PeerResponse::Replicated)));
    }
    let reads = (0..300u64).map(|i| {
        let (peers, addr) = (peers.clone(), addr.clone());
        tokio::spawn(async move {
            let key = format!("k{i}");
            (i, peers.call(&addr, &PeerRequest::Fetch { key, view_epoch: 1 }, DEADLINE).await)
        })
    });
    for r in reads {
        let (i, answer) = r.await.unwrap();
        match answer {
            Ok(PeerResponse::Fetched(Some(rec))) => {
                assert_eq!((rec.version.ts, rec.value.unwrap()), (100 + i, format!("k{i}").into_bytes().into()))
            }
            other => panic!("k{i}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_a_wrong_or_missing_token_is_refused_and_changes_nothing() {
    let (addr, node, _stop) = serve(Some("s3cret")).await;
    for token in [Some("wrong"), None] {
        match client(token).call(&addr, &replicate("k", 1), DEADLINE).await {
            Err(PeerError::Rejected { status: 401, body, .. }) => assert!(body.contains("token"), "{body}"),
            other => panic!("token {token:?}: {other:?}"),
        }
    }
    assert_eq!(node.store().digests().stats().live_keys, 0, "nothing was written");
    let answer = client(Some("s3cret")).call(&addr, &replicate("k", 1), DEADLINE).await;
    assert!(matches!(answer, Ok(PeerResponse::Replicated)), "{answer:?}");
    assert_eq!(node.store().digests().stats().live_keys, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_a_peer_that_only_speaks_http_is_called_over_http() {
    // An older node: the HTTP router alone, no peer connections.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let node = lone_node(&addr, None);
    tokio::spawn(async move { axum::serve(listener, kvs_node::http::router(node)).await });
    let peers = client(None);
    // The call that finds out goes over HTTP at once; later ones go there directly.
    for i in 0..3 {
        let answer = peers.call(&addr, &replicate(&format!("k{i}"), 1), DEADLINE).await;
        assert!(matches!(answer, Ok(PeerResponse::Replicated)), "call {i}: {answer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t40_a_gone_peer_fails_calls_as_unreachable_and_a_restarted_one_is_called_again() {
    let (addr, _node, stop) = serve(None).await;
    let peers = client(None);
    assert!(matches!(peers.call(&addr, &PeerRequest::Ping, DEADLINE).await, Ok(PeerResponse::Pong)));
    drop(stop);
    // The node stops: its connection closes, and nothing listens on the port any more.
    let mut answer = Ok(PeerResponse::Pong);
    for _ in 0..100 {
        answer = peers.call(&addr, &PeerRequest::Ping, DEADLINE).await;
        if answer.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(answer, Err(PeerError::Unreachable { .. })), "{answer:?}");
    // A node back on the same address is reached through a new connection.
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    tokio::spawn(kvs_node::run(listener, lone_node(&addr, None), std::future::pending()));
    assert!(matches!(peers.call(&addr, &PeerRequest::Ping, DEADLINE).await, Ok(PeerResponse::Pong)));
}
