//! The compatibility ("HW4") API under `/kv-store/`, exactly as `docs/hw4-api.md` in the shared docs
//! specifies: parameters as form fields in the body (even on GET) or the query string, JSON answers
//! with `result`, errors as `{"result":"error","msg":...}`.

use super::ApiError;
use crate::causal::VectorClock;
use crate::node::Node;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use kvs_api::{MAX_HW4_KEY_CHARS, hw4};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/kv-store/get_partition_id", get(get_partition_id))
        .route("/kv-store/get_all_partition_ids", get(get_all_partition_ids))
        .route("/kv-store/get_partition_members", get(get_partition_members))
        .route("/kv-store/{key}", get(get_key).put(put_key).delete(delete_key))
        .route("/kv-store/", get(empty_key).put(empty_key).delete(empty_key))
}

/// Form fields from the query string and the body (body wins on conflict).
pub struct Params(HashMap<String, String>);

impl Params {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn causal_context(&self) -> Result<VectorClock, ApiError> {
        Ok(VectorClock::from_payload(self.get("causal_payload").unwrap_or(""))?)
    }
}

impl<S: Send + Sync> FromRequest<S> for Params {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let content_type =
            req.headers().get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if !matches!(essence.as_str(), "" | "application/x-www-form-urlencoded" | "text/plain") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "the body is {essence}; send fields as application/x-www-form-urlencoded (val=...&causal_payload=...)"
                ),
            ));
        }
        let query = req.uri().query().unwrap_or("").to_owned();
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(e.status(), format!("could not read the request body: {}", e.body_text())))?;
        parse_params(query.as_bytes(), &body).map(Params).map_err(ApiError::bad_request)
    }
}

/// Form fields from a query string and a form body (body wins on conflict). Pure; fuzzed.
pub fn parse_params(query: &[u8], body: &[u8]) -> Result<HashMap<String, String>, String> {
    let mut params: HashMap<String, String> = HashMap::new();
    for (source, text) in [("query string", query), ("body", body)] {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(text).map_err(|e| {
            format!("the {source} is not valid application/x-www-form-urlencoded data ({e}); send fields like val=...&causal_payload=...")
        })?;
        params.extend(pairs);
    }
    Ok(params)
}

fn check_key(key: &str) -> Result<(), ApiError> {
    let chars = key.chars().count();
    if chars == 0 || chars > MAX_HW4_KEY_CHARS {
        return Err(ApiError::bad_request(format!(
            "key must be 1 to {MAX_HW4_KEY_CHARS} characters long; it is {chars}"
        )));
    }
    if let Some(bad) = key.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_')) {
        return Err(ApiError::bad_request(format!("key may contain only a-z, A-Z, 0-9 and _; {bad:?} is not allowed")));
    }
    Ok(())
}

fn key_from(path: Result<Path<String>, axum::extract::rejection::PathRejection>) -> Result<String, ApiError> {
    let Path(key) = path.map_err(|e| ApiError::bad_request(format!("invalid key in the path: {}", e.body_text())))?;
    check_key(&key)?;
    Ok(key)
}

async fn empty_key() -> ApiError {
    ApiError::bad_request(format!("key must be 1 to {MAX_HW4_KEY_CHARS} characters long; it is empty"))
}

async fn get_key(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    params: Params,
) -> Result<Response, ApiError> {
    let key = key_from(path)?;
    let context = params.causal_context()?;
    let c = node.read(&key, context.clone()).await?;
    let payload = super::context_after(context, &c);
    match c.record.as_ref().and_then(|r| r.value.as_ref().map(|v| (r, v))) {
        Some((record, value)) => Ok(Json(hw4::Get {
            result: hw4::success(),
            value: String::from_utf8_lossy(value).into_owned(),
            partition_id: c.partition,
            causal_payload: payload,
            timestamp: record.version.ts,
        })
        .into_response()),
        None => {
            let mut e = ApiError::new(StatusCode::NOT_FOUND, "key does not exist");
            e.extra = Some(serde_json::Map::from_iter([
                ("partition_id".to_owned(), json!(c.partition)),
                ("causal_payload".to_owned(), json!(payload)),
            ]));
            Err(e)
        }
    }
}

async fn put_key(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    params: Params,
) -> Result<Response, ApiError> {
    let key = key_from(path)?;
    let Some(value) = params.get("val") else {
        return Err(ApiError::bad_request("missing val: send the value as the form field val (e.g. val=hello)"));
    };
    let max = node.settings().max_value_bytes;
    if value.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("val is {} bytes; the limit is {max} bytes", value.len()),
        ));
    }
    let value = Bytes::copy_from_slice(value.as_bytes());
    write_answer(&node, &key, Some(value), params.causal_context()?, &headers).await
}

async fn delete_key(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    params: Params,
) -> Result<Response, ApiError> {
    let key = key_from(path)?;
    write_answer(&node, &key, None, params.causal_context()?, &headers).await
}

/// A write's answer. Beside the HW4 JSON, the `kvs-replicas` header says how many replicas hold
/// it, and a `kvs-min-replicas` request header is honoured (headers are outside the HW4 contract,
/// so its clients see no difference).
async fn write_answer(
    node: &Node,
    key: &str,
    value: Option<Bytes>,
    context: VectorClock,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let is_put = value.is_some();
    let min_copies = super::min_copies_from(headers)?;
    let c = node.write(key, value, context.clone(), min_copies).await?;
    let ts = c.record.as_ref().map_or(0, |r| r.version.ts);
    let status = if is_put && c.changed_liveness { StatusCode::CREATED } else { StatusCode::OK };
    let body = hw4::Write {
        result: hw4::success(),
        partition_id: c.partition,
        causal_payload: super::context_after(context, &c),
        timestamp: ts,
    };
    let replicas = super::replicas_header(&c);
    Ok((status, replicas.into_iter().collect::<HeaderMap>(), Json(body)).into_response())
}

async fn get_partition_id(State(node): State<Arc<Node>>) -> Result<Json<hw4::PartitionId>, ApiError> {
    let view = node.require_view()?;
    let partition_id = view.partition_of_node(node.id()).map_or(-1, i64::from);
    Ok(Json(hw4::PartitionId { result: hw4::success(), partition_id }))
}

async fn get_all_partition_ids(State(node): State<Arc<Node>>) -> Result<Json<hw4::PartitionIds>, ApiError> {
    let view = node.require_view()?;
    let partition_id_list: Vec<u32> = (0..view.number_of_partitions()).collect();
    Ok(Json(hw4::PartitionIds { result: hw4::success(), partition_id_list }))
}

async fn get_partition_members(
    State(node): State<Arc<Node>>,
    params: Params,
) -> Result<Json<hw4::PartitionMembers>, ApiError> {
    let view = node.require_view()?;
    let raw = params
        .get("partition_id")
        .ok_or_else(|| ApiError::bad_request("missing partition_id: send it as a form field (e.g. partition_id=0)"))?;
    let count = view.number_of_partitions();
    let id: u32 = raw.trim().parse().map_err(|_| {
        ApiError::bad_request(format!(
            "partition_id must be an integer from 0 to {}; got {raw:?}",
            count.saturating_sub(1)
        ))
    })?;
    if id >= count {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("partition {id} does not exist; partition ids are 0 to {}", count.saturating_sub(1)),
        ));
    }
    Ok(Json(hw4::PartitionMembers { result: hw4::success(), partition_members: view.members(id).to_vec() }))
}
