//! `POST /internal/v1/rpc`: node-to-node messages (postcard in, postcard out). When the node has a
//! cluster token, calls without it get 401 and change nothing.

use super::ApiError;
use crate::auth::{ClusterToken, Denied};
use crate::node::Node;
use crate::peers::RPC_PATH;
use crate::protocol::PeerRequest;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use kvs_api::HEADER_CLUSTER_TOKEN;
use std::sync::Arc;

pub fn routes() -> Router<Arc<Node>> {
    Router::new().route(RPC_PATH, post(rpc))
}

/// Rejects a request lacking the cluster token, when one is configured.
fn authorize(node: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    let header = HEADER_CLUSTER_TOKEN;
    match cluster_token(node, headers, None) {
        ClusterToken::NotSet | ClusterToken::Matches => Ok(()),
        ClusterToken::Wrong => Err(Denied::WrongClusterToken { header }.into()),
        ClusterToken::Missing => Err(Denied::NoClusterToken { header }.into()),
    }
}

/// How the request's cluster token compares with the node's: from its header, or (where a route
/// takes it so) as the `bearer` token.
pub(super) fn cluster_token(node: &Node, headers: &HeaderMap, bearer: Option<&[u8]>) -> ClusterToken {
    let Some(expected) = node.settings().cluster_token.as_deref() else { return ClusterToken::NotSet };
    if bearer.is_some_and(|token| constant_time_eq(token, expected.as_bytes())) {
        return ClusterToken::Matches;
    }
    match headers.get(HEADER_CLUSTER_TOKEN).map(|v| v.as_bytes()) {
        Some(given) if constant_time_eq(given, expected.as_bytes()) => ClusterToken::Matches,
        Some(_) => ClusterToken::Wrong,
        None => ClusterToken::Missing,
    }
}

/// Compares secrets in time that does not depend on where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn rpc(State(node): State<Arc<Node>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorize(&node, &headers)?;
    let request: PeerRequest =
        postcard::from_bytes(&body).map_err(|e| ApiError::bad_request(format!("not a kvstore RPC message: {e}")))?;
    let response = node.handle_rpc(request).await;
    let bytes = postcard::to_stdvec(&response).expect("serializing plain data into a Vec cannot fail");
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}
