//! Backup routes (admin, cluster token): hold a cut, read a partition as of it, release; and
//! restore records onto their owners. See the node's `backup` module for what a hold keeps and
//! why a read is consistent; `kvs_api::backup` for the messages.

use super::ApiError;
use crate::backup::BackupError;
use crate::node::Node;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use kvs_api::backup::{
    BACKUP_HOLD_PATH, BACKUP_READ_PATH, BACKUP_RELEASE_PATH, BackupRecord, Held, HoldRequest, RESTORE_PATH,
    ReadRequest, Restored,
};
use std::sync::Arc;
use std::time::Duration;

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route(BACKUP_HOLD_PATH, post(hold))
        .route(BACKUP_RELEASE_PATH, post(release))
        .route(BACKUP_READ_PATH, post(read))
        .route(RESTORE_PATH, post(restore))
}

impl From<BackupError> for ApiError {
    fn from(e: BackupError) -> Self {
        let status = match &e {
            BackupError::NotHeld(_) | BackupError::ViewChanged { .. } | BackupError::NotAReplica(_) => {
                StatusCode::CONFLICT
            }
            BackupError::Overflowed | BackupError::Behind(_) => StatusCode::SERVICE_UNAVAILABLE,
            BackupError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>, shape: &str) -> Result<T, ApiError> {
    body.map(|Json(t)| t).map_err(|e| ApiError::new(e.status(), format!("{}; send {shape}", e.body_text())))
}

const HOLD_SHAPE: &str = "{\"backup\": \"ID\", \"ttl_seconds\": N}";

async fn hold(
    State(node): State<Arc<Node>>,
    body: Result<Json<HoldRequest>, JsonRejection>,
) -> Result<Json<Held>, ApiError> {
    let req = json_body(body, HOLD_SHAPE)?;
    if req.backup.is_empty() || req.ttl_seconds == 0 {
        return Err(ApiError::bad_request(format!(
            "backup must name the backup and ttl_seconds be positive: send {HOLD_SHAPE}"
        )));
    }
    let clock = node.backup_hold(&req.backup, Duration::from_secs(req.ttl_seconds));
    Ok(Json(Held { node: node.id().to_owned(), clock }))
}

async fn release(
    State(node): State<Arc<Node>>,
    body: Result<Json<HoldRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req = json_body(body, HOLD_SHAPE)?;
    node.backup_release(&req.backup);
    Ok(Json(serde_json::json!({ "released": req.backup })))
}

async fn read(
    State(node): State<Arc<Node>>,
    body: Result<Json<ReadRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = json_body(body, "a ReadRequest (see kvs_api::backup)")?;
    let page = node.read_backup_page(&req).await?;
    let bytes =
        postcard::to_stdvec(&page).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn restore(State(node): State<Arc<Node>>, body: Bytes) -> Result<Json<Restored>, ApiError> {
    let records: Vec<BackupRecord> = postcard::from_bytes(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not postcard-encoded backup records ({e}); send what kvs-backup sends"
        ))
    })?;
    let records = node.restore_records(records).await.map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
    Ok(Json(Restored { records }))
}
