//! The one error type every handler returns: a status and a message that says what to fix, always
//! as `{"result":"error","msg":...}`. Server-side failures (5xx) are logged here, once.

use crate::causal::PayloadError;
use crate::node::KvError;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kvs_api::ErrorBody;

/// A failed request.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub msg: String,
    /// Extra JSON fields merged into the body (HW4 adds `partition_id`, `causal_payload`).
    pub extra: Option<serde_json::Map<String, serde_json::Value>>,
    /// Seconds after which a retry may succeed (`Retry-After`), for refusals that are temporary.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        ApiError { status, msg: msg.into(), extra: None, retry_after: None }
    }

    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, msg)
    }
}

impl From<crate::auth::Denied> for ApiError {
    fn from(denied: crate::auth::Denied) -> Self {
        let status = if denied.is_unauthenticated() { StatusCode::UNAUTHORIZED } else { StatusCode::FORBIDDEN };
        ApiError::new(status, denied.to_string())
    }
}

impl From<KvError> for ApiError {
    fn from(e: KvError) -> Self {
        let (status, retry_after) = match &e {
            KvError::NoView
            | KvError::Unavailable { .. }
            | KvError::StaleView { .. }
            | KvError::StaleWrite { .. }
            | KvError::CausalUnavailable { .. }
            | KvError::Expired { .. } => (StatusCode::SERVICE_UNAVAILABLE, None),
            KvError::Overloaded(_)
            | KvError::TooFewReplicas { .. }
            | KvError::UnderReplicated { .. }
            | KvError::CatchingUp { .. } => (StatusCode::SERVICE_UNAVAILABLE, Some(1)),
            KvError::MinCopiesAboveReplicas { .. } => (StatusCode::BAD_REQUEST, None),
            KvError::EpochMismatch { .. } => (StatusCode::CONFLICT, None),
            KvError::NotOwner { .. } => (StatusCode::MISDIRECTED_REQUEST, None),
            KvError::Storage(_) | KvError::RemoteStorage(_) => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        ApiError { retry_after, ..ApiError::new(status, e.to_string()) }
    }
}

impl From<PayloadError> for ApiError {
    fn from(e: PayloadError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Unavailability (503) is expected while nodes are down: a warning. Anything else 5xx is a
        // fault of this node: an error.
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(status = self.status.as_u16(), msg = %self.msg, "request failed");
        } else if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), msg = %self.msg, "request failed");
        }
        let mut body = serde_json::to_value(ErrorBody::new(self.msg)).expect("ErrorBody serializes");
        if let (Some(extra), Some(obj)) = (self.extra, body.as_object_mut()) {
            obj.extend(extra);
        }
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(seconds));
        }
        response
    }
}
