//! Handler tests: the whole router in process (`tower::ServiceExt::oneshot`), one node that owns
//! every key, an in-memory store. Covers the API contract and every kind of bad input.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use kvs_node::node::{Node, Settings};
use kvs_node::peers::{PeerError, Peers};
use kvs_node::protocol::{PeerRequest, PeerResponse};
use kvs_node::store::MemoryStore;
use kvs_node::view::View;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

const ME: &str = "127.0.0.1:8080";

/// A network where every peer is unreachable (this node owns everything anyway).
struct NoPeers;

#[async_trait::async_trait]
impl Peers for NoPeers {
    async fn call(&self, peer: &str, _: &PeerRequest, _: Duration) -> Result<PeerResponse, PeerError> {
        Err(PeerError::Unreachable { peer: peer.to_owned(), detail: "no network in this test".into() })
    }
}

fn node_with(settings: Settings, view: Option<View>) -> Arc<Node> {
    Node::new(settings, view, Arc::new(MemoryStore::new()), Arc::new(NoPeers))
}

fn node() -> Arc<Node> {
    let mut s = Settings::new(ME);
    s.max_value_bytes = 1000;
    node_with(s, Some(View::initial(&[ME.to_owned()], 1)))
}

async fn send(node: &Arc<Node>, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = kvs_node::http::router(node.clone()).oneshot(req).await.expect("router answers");
    let (parts, body) = resp.into_parts();
    (parts.status, parts.headers, body.collect().await.expect("body").to_bytes().to_vec())
}

async fn form(node: &Arc<Node>, method: &str, path: &str, body: &str) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let (status, _, bytes) = send(node, req).await;
    let json =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)));
    (status, json)
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, mentions: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["result"], "error", "{body}");
    let msg = body["msg"].as_str().expect("msg");
    assert!(msg.contains(mentions), "msg {msg:?} should mention {mentions:?}");
}

#[tokio::test]
async fn hw4_put_get_roundtrip_with_status_codes() {
    let n = node();
    let (s, put) = form(&n, "PUT", "/kv-store/foo", "val=bar&causal_payload=").await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!((put["result"].as_str(), put["partition_id"].as_i64()), (Some("success"), Some(0)));
    let (s, _) = form(&n, "PUT", "/kv-store/foo", "val=baz").await;
    assert_eq!(s, StatusCode::OK);
    // Parameters also work from the query string.
    let (s, got) =
        form(&n, "GET", &format!("/kv-store/foo?causal_payload={}", put["causal_payload"].as_str().unwrap()), "").await;
    assert_eq!((s, got["value"].as_str()), (StatusCode::OK, Some("baz")));
    assert!(got["timestamp"].as_u64().unwrap() > put["timestamp"].as_u64().unwrap());
    let (s, gone) = form(&n, "DELETE", "/kv-store/foo", "").await;
    assert_eq!((s, gone["result"].as_str()), (StatusCode::OK, Some("success")));
    let (s, missing) = form(&n, "GET", "/kv-store/foo", "").await;
    assert_error(s, &missing, StatusCode::NOT_FOUND, "does not exist");
    assert_eq!(missing["partition_id"], 0);
}

#[tokio::test]
async fn hw4_partition_routes() {
    let n = node();
    assert_eq!(form(&n, "GET", "/kv-store/get_partition_id", "").await.1["partition_id"], 0);
    assert_eq!(
        form(&n, "GET", "/kv-store/get_all_partition_ids", "").await.1["partition_id_list"],
        serde_json::json!([0])
    );
    assert_eq!(
        form(&n, "GET", "/kv-store/get_partition_members", "partition_id=0").await.1["partition_members"],
        serde_json::json!([ME])
    );
    let (s, b) = form(&n, "GET", "/kv-store/get_partition_members", "partition_id=3").await;
    assert_error(s, &b, StatusCode::NOT_FOUND, "partition 3 does not exist");
    let (s, b) = form(&n, "GET", "/kv-store/get_partition_members", "partition_id=zero").await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "must be an integer");
    let (s, b) = form(&n, "GET", "/kv-store/get_partition_members", "").await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "missing partition_id");
}

#[tokio::test]
async fn hw4_bad_keys_values_and_payloads() {
    let n = node();
    let (s, b) = form(&n, "PUT", "/kv-store/bad-key", "val=x").await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "'-' is not allowed");
    let (s, b) = form(&n, "PUT", &format!("/kv-store/{}", "k".repeat(201)), "val=x").await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "1 to 200 characters");
    let (s, b) = form(&n, "PUT", "/kv-store/", "val=x").await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "it is empty");
    let (s, b) = form(&n, "PUT", "/kv-store/k", "value=x").await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "missing val");
    let (s, b) = form(&n, "PUT", "/kv-store/k", &format!("val={}", "x".repeat(1001))).await;
    assert_error(s, &b, StatusCode::PAYLOAD_TOO_LARGE, "limit is 1000 bytes");
    let (s, b) = form(&n, "PUT", "/kv-store/k", "val=x&causal_payload=%%%garbage").await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "causal_payload");
    let (s, b) = form(&n, "GET", "/kv-store/k", "causal_payload=AQ").await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "causal_payload");
    // Nothing was written by any of the rejected requests.
    let (s, _) = form(&n, "GET", "/kv-store/k", "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(n.store().digests().stats().live_keys, 0);
}

#[tokio::test]
async fn hw4_json_body_is_refused_with_advice() {
    let n = node();
    let req = Request::put("/kv-store/k")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"val":"x"}"#))
        .unwrap();
    let (s, _, bytes) = send(&n, req).await;
    let b: Value = serde_json::from_slice(&bytes).unwrap();
    assert_error(s, &b, StatusCode::UNSUPPORTED_MEDIA_TYPE, "application/x-www-form-urlencoded");
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let n = node();
    let (s, b) = form(&n, "GET", "/nope", "").await;
    assert_error(s, &b, StatusCode::NOT_FOUND, "no route for GET /nope");
    let (s, b) = form(&n, "POST", "/kv-store/k", "val=x").await;
    assert_error(s, &b, StatusCode::METHOD_NOT_ALLOWED, "POST is not supported");
}

#[tokio::test]
async fn native_api_is_binary_safe_and_carries_metadata() {
    let n = node();
    let value: Vec<u8> = (0..=255).collect();
    let (s, h, body) =
        send(&n, Request::put("/v1/kv/bin%2Fkey%20%C3%A9").body(Body::from(value.clone())).unwrap()).await;
    assert_eq!(s, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));
    let w: kvs_api::WriteResponse = serde_json::from_slice(&body).unwrap();
    assert!(w.changed_liveness);
    assert_eq!(h["kvs-causal-context"].to_str().unwrap(), w.causal_context);
    let req = Request::get("/v1/kv/bin%2Fkey%20%C3%A9")
        .header("kvs-causal-context", &w.causal_context)
        .body(Body::empty())
        .unwrap();
    let (s, h, got) = send(&n, req).await;
    assert_eq!((s, got), (StatusCode::OK, value));
    assert_eq!(h["kvs-partition"], "0");
    assert_eq!(h["kvs-timestamp"].to_str().unwrap(), w.timestamp.to_string());
    let (s, _, body) = send(&n, Request::delete("/v1/kv/bin%2Fkey%20%C3%A9").body(Body::empty()).unwrap()).await;
    let d: kvs_api::WriteResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!((s, d.changed_liveness), (StatusCode::OK, true));
    let (s, _, _) = send(&n, Request::get("/v1/kv/bin%2Fkey%20%C3%A9").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(n.store().digests().stats().tombstones, 1, "a delete is a tombstone, not an absence");
}

#[tokio::test]
async fn native_api_bad_input() {
    let n = node();
    let json = |b: &[u8]| serde_json::from_slice::<Value>(b).unwrap();
    let (s, _, b) = send(&n, Request::put(format!("/v1/kv/{}", "k".repeat(1025))).body(Body::from("x")).unwrap()).await;
    assert_error(s, &json(&b), StatusCode::BAD_REQUEST, "1 to 1024 bytes");
    let (s, _, b) = send(&n, Request::put("/v1/kv/k").body(Body::from(vec![0u8; 1001])).unwrap()).await;
    assert_error(s, &json(&b), StatusCode::PAYLOAD_TOO_LARGE, "limit is 1000 bytes");
    let (s, _, b) = send(&n, Request::put("/v1/kv/k%0A").body(Body::from("x")).unwrap()).await;
    assert_error(s, &json(&b), StatusCode::BAD_REQUEST, "control characters");
    let (s, _, b) = send(&n, Request::put("/v1/kv/k%FF").body(Body::from("x")).unwrap()).await;
    assert_error(s, &json(&b), StatusCode::BAD_REQUEST, "invalid key");
    let req = Request::get("/v1/kv/k").header("kvs-causal-context", "!!").body(Body::empty()).unwrap();
    let (s, _, b) = send(&n, req).await;
    assert_error(s, &json(&b), StatusCode::BAD_REQUEST, "causal_payload");
    assert_eq!(n.store().digests().stats().live_keys, 0);
}

#[tokio::test]
async fn writes_say_how_many_replicas_hold_them_and_honour_a_minimum() {
    let n = node(); // K=1: one replica, which always holds the write
    let (s, h, body) = send(&n, Request::put("/v1/kv/k").body(Body::from("v")).unwrap()).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(h["kvs-replicas"], "1/1");
    let w: kvs_api::WriteResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!((w.copies, w.replicas), (1, 1));
    let req = Request::put("/kv-store/k")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("kvs-min-replicas", "1");
    let (s, h, _) = send(&n, req.body(Body::from("val=x")).unwrap()).await;
    assert_eq!((s, h["kvs-replicas"].to_str().unwrap()), (StatusCode::OK, "1/1"), "HW4 writes carry it too");
    let json = |b: &[u8]| serde_json::from_slice::<Value>(b).unwrap();
    let (s, h, b) =
        send(&n, Request::put("/v1/kv/k").header("kvs-min-replicas", "2").body(Body::from("w")).unwrap()).await;
    assert_error(s, &json(&b), StatusCode::BAD_REQUEST, "has 1 replicas; ask for at most 1");
    assert!(h.get("kvs-replicas").is_none());
    let (s, _, b) =
        send(&n, Request::delete("/v1/kv/k").header("kvs-min-replicas", "two").body(Body::empty()).unwrap()).await;
    assert_error(s, &json(&b), StatusCode::BAD_REQUEST, "whole number of copies");
    let (s, _, got) = send(&n, Request::get("/v1/kv/k").body(Body::empty()).unwrap()).await;
    assert_eq!((s, got.as_slice()), (StatusCode::OK, b"x".as_slice()), "refused writes wrote nothing");
}

#[tokio::test]
async fn node_without_a_view_waits_with_clear_errors() {
    let n = node_with(Settings::new(ME), None);
    let (s, b) = form(&n, "PUT", "/kv-store/k", "val=x").await;
    assert_error(s, &b, StatusCode::SERVICE_UNAVAILABLE, "no view yet");
    let (s, _, _) = send(&n, Request::get("/readyz").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let (s, _, _) = send(&n, Request::get("/healthz").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn internal_rpc_rejects_garbage_and_missing_tokens() {
    let mut settings = Settings::new(ME);
    settings.cluster_token = Some("s3cret".into());
    let n = node_with(settings, Some(View::initial(&[ME.to_owned()], 1)));
    let record = kvs_node::store::Record {
        version: kvs_node::causal::Version { ts: 5, writer: "x".into() },
        clock: Default::default(),
        value: Some("evil".into()),
    };
    let msg = postcard::to_stdvec(&PeerRequest::Replicate {
        records: vec![("k".into(), record)],
        from: "x".into(),
        cap: 0,
        pending: vec![],
        view_epoch: None,
    })
    .unwrap();
    let rpc = |token: Option<&str>, body: Vec<u8>| {
        let mut r = Request::post("/internal/v1/rpc");
        if let Some(t) = token {
            r = r.header("kvs-cluster-token", t);
        }
        r.body(Body::from(body)).unwrap()
    };
    let (s, _, b) = send(&n, rpc(None, msg.clone())).await;
    assert_error(s, &serde_json::from_slice(&b).unwrap(), StatusCode::UNAUTHORIZED, "needs the cluster token");
    let (s, _, _) = send(&n, rpc(Some("wrong"), msg.clone())).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(n.store().digests().stats().live_keys, 0, "an unauthenticated call changes nothing");
    let (s, _, b) = send(&n, rpc(Some("s3cret"), vec![0xff, 0xff, 0xff])).await;
    assert_error(s, &serde_json::from_slice(&b).unwrap(), StatusCode::BAD_REQUEST, "not a kvstore RPC message");
    let (s, _, b) = send(&n, rpc(Some("s3cret"), msg)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(postcard::from_bytes::<PeerResponse>(&b).unwrap(), PeerResponse::Replicated);
    assert_eq!(n.store().digests().stats().live_keys, 1);
}

#[tokio::test]
async fn metrics_expose_requests_and_keys() {
    let n = node();
    form(&n, "PUT", "/kv-store/a", "val=1").await;
    let (s, _, body) = send(&n, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    let text = String::from_utf8(body).unwrap();
    assert_eq!(s, StatusCode::OK);
    assert!(text.contains(r#"kvs_keys{state="live"} 1"#), "{text}");
    assert!(text.contains(r#"kvs_http_requests_total{route="/kv-store/{key}",method="PUT",status="201"} 1"#), "{text}");
    assert!(text.contains("kvs_http_request_duration_seconds_bucket"), "{text}");
}

#[tokio::test]
async fn view_changes_and_status_need_the_token_when_one_is_configured() {
    let mut settings = Settings::new(ME);
    settings.cluster_token = Some("s3cret".into());
    let n = node_with(settings, Some(View::initial(&[ME.to_owned()], 1)));
    let epoch_before = n.view().unwrap().epoch();
    let (s, b) = form(&n, "PUT", "/kv-store/update_view?type=add", "ip_port=127.0.0.9:8080").await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "cluster token");
    let req = Request::put("/v1/admin/view")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"members":["127.0.0.1:8080","127.0.0.9:8080"],"replication_factor":1}"#))
        .unwrap();
    let (s, _, _) = send(&n, req).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = send(&n, Request::get("/v1/admin/status").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(n.view().unwrap().epoch(), epoch_before, "nothing changed");
    let req = Request::get("/v1/admin/status").header("kvs-cluster-token", "s3cret").body(Body::empty()).unwrap();
    let (s, _, _) = send(&n, req).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn view_change_requests_are_validated() {
    let n = node();
    let (s, b) = form(&n, "PUT", "/kv-store/update_view?type=grow", "ip_port=127.0.0.9:8080").await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "type must be add or remove");
    let (s, b) = form(&n, "PUT", "/kv-store/update_view?type=add", "").await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "missing ip_port");
    let (s, b) = form(&n, "PUT", "/kv-store/update_view?type=add", "ip_port=nonsense").await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "not host:port");
    let (s, b) = form(&n, "PUT", "/kv-store/update_view?type=remove", &format!("ip_port={ME}")).await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "last node");
    let json = |body: &str| {
        Request::put("/v1/admin/view")
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap()
    };
    let (s, _, b) = send(&n, json(r#"{"members":[],"replication_factor":1}"#)).await;
    assert_error(s, &serde_json::from_slice(&b).unwrap(), StatusCode::BAD_REQUEST, "at least one node");
    let (s, _, b) = send(&n, json(r#"{"members":["127.0.0.1:8080"],"replication_factor":0}"#)).await;
    assert_error(s, &serde_json::from_slice(&b).unwrap(), StatusCode::BAD_REQUEST, "at least 1");
    let (s, _, b) = send(&n, json(r#"{"members":"x"}"#)).await;
    assert_error(s, &serde_json::from_slice(&b).unwrap(), StatusCode::UNPROCESSABLE_ENTITY, "replication_factor");
    // The same membership again is a no-op success.
    let (s, _, b) = send(&n, json(r#"{"members":["127.0.0.1:8080"],"replication_factor":1}"#)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(serde_json::from_slice::<Value>(&b).unwrap()["changed"], false);
}

#[tokio::test]
async fn internal_batches_may_be_larger_than_client_bodies() {
    let n = node(); // client values are limited to 1000 bytes
    let big = |i: u32| kvs_node::store::Record {
        version: kvs_node::causal::Version { ts: 10 + i as u64, writer: "x".into() },
        clock: Default::default(),
        value: Some(vec![7u8; 300_000].into()),
    };
    let records = (0..10).map(|i| (format!("k{i}"), big(i))).collect();
    let msg = postcard::to_stdvec(&PeerRequest::Replicate {
        records,
        from: "x".into(),
        cap: 0,
        pending: vec![],
        view_epoch: None,
    })
    .unwrap();
    assert!(msg.len() > 2_000_000);
    let (s, _, _) = send(&n, Request::post("/internal/v1/rpc").body(Body::from(msg)).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(n.store().digests().stats().live_keys, 10);
    let (s, _, b) = send(&n, Request::put("/v1/kv/k").body(Body::from(vec![0u8; 100_000])).unwrap()).await;
    assert_error(s, &serde_json::from_slice(&b).unwrap(), StatusCode::PAYLOAD_TOO_LARGE, "limit");
}
