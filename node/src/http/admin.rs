//! Administrative routes: the native whole-view change (`PUT /v1/admin/view`) and its dry run
//! (`POST /v1/admin/view/plan`), cluster status (`GET /v1/admin/status`), what this node holds (`GET /v1/admin/usage`), and HW4's single-node `PUT /kv-store/update_view?type=add|remove`.
//! All of them need the cluster token, when the node has one, or an admin token of its auth file
//! (checked before any handler runs: `super::guard`).

use super::ApiError;
use super::hw4::Params;
use crate::node::Node;
use crate::view_change::ChangeError;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use kvs_api::{
    ADMIN_STATUS_PATH, ADMIN_USAGE_PATH, ADMIN_VIEW_PATH, ADMIN_VIEW_PLAN_PATH, ClusterStatus, NodeUsage, ViewChanged,
    ViewPlan, ViewRequest, hw4,
};
use std::sync::Arc;

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route(ADMIN_VIEW_PATH, put(put_view))
        .route(ADMIN_VIEW_PLAN_PATH, post(plan_view))
        .route(ADMIN_STATUS_PATH, get(status))
        .route(ADMIN_USAGE_PATH, get(usage))
        .route("/kv-store/update_view", put(update_view))
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        let status = match &e {
            ChangeError::ZeroReplicationFactor | ChangeError::NoMembers | ChangeError::BadMember(_) => {
                StatusCode::BAD_REQUEST
            }
            ChangeError::InProgress { .. } | ChangeError::Refused { .. } => StatusCode::CONFLICT,
            ChangeError::NoView
            | ChangeError::NoLiveMember
            | ChangeError::NewPartitionUnreachable { .. }
            | ChangeError::SourcesFailed
            | ChangeError::Stuck { .. } => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

async fn put_view(
    State(node): State<Arc<Node>>,
    body: Result<Json<ViewRequest>, JsonRejection>,
) -> Result<Json<ViewChanged>, ApiError> {
    let req = view_request(body)?;
    let rate = req.transfer_rate.unwrap_or(node.settings().transfer_rate);
    Ok(Json(node.change_view_paced(req.members, req.replication_factor, rate).await?))
}

async fn plan_view(
    State(node): State<Arc<Node>>,
    body: Result<Json<ViewRequest>, JsonRejection>,
) -> Result<Json<ViewPlan>, ApiError> {
    let req = view_request(body)?;
    Ok(Json(node.plan_view(req.members, req.replication_factor).await?))
}

/// The body of a view change or its plan, or a 4xx saying what to send.
fn view_request(body: Result<Json<ViewRequest>, JsonRejection>) -> Result<ViewRequest, ApiError> {
    let Json(req) = body.map_err(|e| {
        ApiError::new(
            e.status(),
            format!("{}; send {{\"members\": [\"host:port\", ...], \"replication_factor\": K}}", e.body_text()),
        )
    })?;
    Ok(req)
}

async fn status(State(node): State<Arc<Node>>) -> Result<Json<ClusterStatus>, ApiError> {
    Ok(Json(node.cluster_status().await))
}

async fn usage(State(node): State<Arc<Node>>) -> Result<Json<NodeUsage>, ApiError> {
    let stats = node.store().digests().stats();
    Ok(Json(NodeUsage {
        node: node.id().to_owned(),
        live_keys: stats.live_keys,
        live_bytes: stats.live_bytes,
        tombstones: stats.tombstones,
    }))
}

async fn update_view(State(node): State<Arc<Node>>, params: Params) -> Result<Response, ApiError> {
    let kind = params
        .get("type")
        .ok_or_else(|| ApiError::bad_request("missing type: use update_view?type=add or update_view?type=remove"))?;
    let target = params.get("ip_port").ok_or_else(|| {
        ApiError::bad_request("missing ip_port: send the node as the form field ip_port (e.g. ip_port=10.0.0.5:8080)")
    })?;
    let target = target.trim().to_owned();
    let view = node.require_view()?;
    let k = view.layout().replication_factor;
    let mut members = view.all_members();
    match kind {
        "add" => {
            if !members.contains(&target) {
                members.push(target.clone());
            }
        }
        "remove" => {
            members.retain(|m| *m != target);
            if members.is_empty() {
                return Err(ApiError::bad_request(format!(
                    "{target} is the only member; a cluster cannot remove its last node"
                )));
            }
        }
        other => return Err(ApiError::bad_request(format!("type must be add or remove, not {other:?}"))),
    }
    let changed = node.change_view(members, k).await?;
    let number_of_partitions = changed.layout.partitions.len();
    let result = hw4::success();
    Ok(if kind == "add" {
        let partition_id = changed.layout.partitions.iter().position(|p| p.contains(&target)).map_or(-1, |p| p as i64);
        Json(hw4::Added { result, partition_id, number_of_partitions }).into_response()
    } else {
        Json(hw4::Removed { result, number_of_partitions }).into_response()
    })
}
