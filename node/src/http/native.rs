//! The native API: `GET/PUT/DELETE /v1/kv/{key}` with the raw value as the body (binary safe) and
//! metadata in `Kvs-*` headers; writes also answer with a small JSON envelope. See `docs/api.md`.

use super::ApiError;
use crate::causal::VectorClock;
use crate::node::Node;
use crate::protocol::Coordinated;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kvs_api::{
    CLUSTER_MAP_PATH, ClusterMap, HEADER_CAUSAL_CONTEXT, HEADER_PARTITION, HEADER_TIMESTAMP, HEADER_VIEW_EPOCH,
    MAX_NATIVE_KEY_BYTES, WriteResponse,
};
use std::sync::Arc;

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/kv/{key}", get(get_key).put(put_key).delete(delete_key))
        .route(CLUSTER_MAP_PATH, get(cluster_map))
}

/// The view as clients route by it (see `kvs_api::Router`).
async fn cluster_map(State(node): State<Arc<Node>>) -> Result<Json<ClusterMap>, ApiError> {
    let view = node.view().ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "this node has no view yet: it waits to be added to a cluster")
    })?;
    Ok(Json(view.cluster_map()))
}

fn key_from(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(key) = path.map_err(|e| {
        ApiError::bad_request(format!("invalid key in the path: {}; percent-encode keys as UTF-8", e.body_text()))
    })?;
    if key.is_empty() || key.len() > MAX_NATIVE_KEY_BYTES {
        return Err(ApiError::bad_request(format!(
            "key must be 1 to {MAX_NATIVE_KEY_BYTES} bytes of UTF-8; it is {} bytes",
            key.len()
        )));
    }
    if key.chars().any(char::is_control) {
        return Err(ApiError::bad_request("key must not contain control characters"));
    }
    Ok(key)
}

fn context_from(headers: &HeaderMap) -> Result<VectorClock, ApiError> {
    let raw = match headers.get(HEADER_CAUSAL_CONTEXT) {
        None => "",
        Some(v) => v
            .to_str()
            .map_err(|_| ApiError::bad_request(format!("the {HEADER_CAUSAL_CONTEXT} header must be ASCII")))?,
    };
    Ok(VectorClock::from_payload(raw)?)
}

fn meta_headers(context: String, c: &Coordinated) -> [(HeaderName, HeaderValue); 4] {
    let ts = c.record.as_ref().map_or(0, |r| r.version.ts);
    let value = |s: String| HeaderValue::from_str(&s).expect("digits and URL-safe base64 are valid header values");
    [
        (HeaderName::from_static(HEADER_CAUSAL_CONTEXT), value(context)),
        (HeaderName::from_static(HEADER_PARTITION), HeaderValue::from(c.partition)),
        (HeaderName::from_static(HEADER_TIMESTAMP), HeaderValue::from(ts)),
        (HeaderName::from_static(HEADER_VIEW_EPOCH), HeaderValue::from(c.view_epoch)),
    ]
}

async fn get_key(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    // The request itself rather than a `HeaderMap`, which would be a copy of its headers.
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let key = key_from(path)?;
    let context = context_from(request.headers())?;
    let c = node.read(&key, context.clone()).await?;
    let meta = meta_headers(super::context_after(context, &c), &c);
    match c.record.as_ref().and_then(|r| r.value.clone()) {
        Some(value) => {
            Ok((meta, [(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"))], value)
                .into_response())
        }
        None => Ok((meta, ApiError::new(StatusCode::NOT_FOUND, format!("key {key:?} does not exist"))).into_response()),
    }
}

async fn put_key(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let key = key_from(path)?;
    let max = node.settings().max_value_bytes;
    let value = body.map_err(|e| {
        ApiError::new(
            e.status(),
            format!("could not read the value: {}; values are limited to {max} bytes", e.body_text()),
        )
    })?;
    if value.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the value is {} bytes; the limit is {max} bytes", value.len()),
        ));
    }
    write(&node, &key, Some(value), &headers).await
}

async fn delete_key(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = key_from(path)?;
    write(&node, &key, None, &headers).await
}

async fn write(node: &Node, key: &str, value: Option<Bytes>, headers: &HeaderMap) -> Result<Response, ApiError> {
    let is_put = value.is_some();
    let context = context_from(headers)?;
    let min_copies = super::min_copies_from(headers)?;
    let c = node.write(key, value, context.clone(), min_copies).await?;
    let durability = c.durability.unwrap_or_default();
    let causal_context = super::context_after(context, &c);
    let body = WriteResponse {
        partition_id: c.partition,
        causal_context: causal_context.clone(),
        timestamp: c.record.as_ref().map_or(0, |r| r.version.ts),
        changed_liveness: c.changed_liveness,
        copies: durability.copies,
        replicas: durability.replicas,
    };
    let status = if is_put && c.changed_liveness { StatusCode::CREATED } else { StatusCode::OK };
    let replicas = super::replicas_header(&c);
    Ok((status, meta_headers(causal_context, &c), replicas.into_iter().collect::<HeaderMap>(), Json(body))
        .into_response())
}
