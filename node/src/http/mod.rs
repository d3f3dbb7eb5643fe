//! The HTTP surface: routes, request metrics, limits. Handlers are thin — they parse and validate,
//! call [`Node`], and format the answer.
//!
//! - `/kv-store/...` — the compatibility ("HW4") API (`hw4`)
//! - `/v1/kv/{key}` — the native API (`native`)
//! - `/v1/admin/view`, `/v1/admin/status`, HW4 `update_view` — view changes and status (`admin`)
//! - `/v1/admin/backup/...`, `/v1/admin/restore` — consistent backups and restores (`backup`)
//! - `/internal/v1/rpc` — node-to-node RPC (`internal`)
//! - `/metrics`, `/healthz`, `/readyz` — operations (`ops`)

mod admin;
mod backup;
mod error;
mod hw4;
mod internal;
mod native;
mod ops;

pub use error::ApiError;
pub use hw4::parse_params;
pub(crate) use internal::constant_time_eq;

use crate::metrics::{RequestLabels, RouteLabels};
use crate::node::Node;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

/// Longest a client may take to send a request body.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Largest node-to-node message (transfer batches are capped at 4 MiB of records plus values up
/// to the value limit each).
const INTERNAL_BODY_LIMIT: usize = 256 << 20;

/// Room for form encoding and metadata on top of the largest value.
const BODY_OVERHEAD: usize = 64 * 1024;

/// The node's whole HTTP application.
pub fn router(node: Arc<Node>) -> Router {
    // Form-encoding can triple a value's size (%XX per byte). Internal batches (transfers of many
    // records) get a limit of their own on the internal routes only.
    let body_limit = node.settings().max_value_bytes * 3 + BODY_OVERHEAD;
    Router::new()
        .merge(hw4::routes())
        .merge(admin::routes())
        .merge(backup::routes().layer(DefaultBodyLimit::max(INTERNAL_BODY_LIMIT)))
        .merge(native::routes())
        .merge(internal::routes().layer(DefaultBodyLimit::max(INTERNAL_BODY_LIMIT)))
        .merge(ops::routes())
        .fallback(no_such_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        // A client trickling its body ties up a connection, not the node: cut it off.
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(BODY_TIMEOUT))
        // One middleware for both (each layer costs a boxed future and a clone per request).
        .layer(axum::middleware::from_fn_with_state(node.clone(), track_and_guard))
        .with_state(node)
}

/// Every request: counted and timed by its route template (see [`track`]), admitted or refused by
/// [`guard`], and, while the node drains, answered with `Connection: close`.
async fn track_and_guard(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| intern(p.as_str()));
    let method = method_label(req.method());
    let started = Instant::now();
    let mut response = guard(&node, req, next).await;
    track(&node, route, method, started, response.status());
    if node.is_draining() {
        // Shutting down (see `ServeOptions::shutdown_delay`): hyper closes the connection once this
        // answer is written, so the client's next request goes to another node.
        response.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    }
    response
}

/// Who may do what (see `auth`), before any handler runs. Without an auth file only the admin
/// routes are guarded (by the cluster token, when the node has one), and other requests pass
/// without any work here.
async fn guard(node: &Node, req: Request, next: Next) -> Response {
    let settings = node.settings();
    let path = req.uri().path();
    let channel = req.extensions().get::<crate::tls::Channel>().copied();
    if path.starts_with("/internal/") && channel.is_some_and(|c| !c.admits_peers()) {
        return ApiError::new(StatusCode::FORBIDDEN, crate::tls::PEER_NEEDS_CERTIFICATE).into_response();
    }
    let policy = settings.auth.as_ref().map(|gate| gate.current());
    if policy.is_none() && !crate::auth::is_admin_path(path) {
        return next.run(req).await;
    }
    let need = crate::auth::need_for(req.method(), path);
    let authorization = req.headers().get(axum::http::header::AUTHORIZATION).map(|v| v.as_bytes());
    let cluster = internal::cluster_token(node, req.headers(), authorization.and_then(crate::auth::bearer));
    let subject = req.extensions().get::<crate::tls::ClientSubject>().map(|s| &*s.0);
    match crate::auth::decide(policy.as_deref(), authorization, subject, cluster, &need) {
        Ok(_) => next.run(req).await,
        Err(denied) => {
            let bearer = policy.is_some() && denied.is_unauthenticated();
            let mut response = ApiError::from(denied).into_response();
            if bearer {
                // RFC 6750: a 401 names the scheme it wants.
                response
                    .headers_mut()
                    .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}

/// The causal context to hand back: the client's, merged with what this answer depends on and
/// the view epoch it was served under.
pub(crate) fn context_after(mut context: crate::causal::VectorClock, c: &crate::protocol::Coordinated) -> String {
    if let Some(r) = &c.record {
        context.merge(&r.clock);
    }
    context.observe(crate::causal::EPOCH_ENTRY, c.view_epoch);
    context.to_payload()
}

/// The client's `kvs-min-replicas` (0 when absent: any number of copies will do).
pub(crate) fn min_copies_from(headers: &axum::http::HeaderMap) -> Result<u32, ApiError> {
    use kvs_api::HEADER_MIN_REPLICAS;
    let Some(raw) = headers.get(HEADER_MIN_REPLICAS) else { return Ok(0) };
    raw.to_str().ok().and_then(|v| v.trim().parse::<u32>().ok()).ok_or_else(|| {
        ApiError::bad_request(format!(
            "the {HEADER_MIN_REPLICAS} header must be a whole number of copies (e.g. 2); got {raw:?}"
        ))
    })
}

/// The `kvs-replicas: copies/replicas` header of a write's answer.
pub(crate) fn replicas_header(
    c: &crate::protocol::Coordinated,
) -> Option<(axum::http::HeaderName, axum::http::HeaderValue)> {
    let d = c.durability?;
    let value = axum::http::HeaderValue::from_str(&format!("{}/{}", d.copies, d.replicas))
        .expect("digits and a slash are a valid header value");
    Some((axum::http::HeaderName::from_static(kvs_api::HEADER_REPLICAS), value))
}

async fn no_such_route(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {} {}; see docs/api.md for the routes", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not supported on {}; see docs/api.md", req.method(), req.uri().path()),
    )
}

/// Counts and times a request by its route template (not the raw path: keys would explode the
/// label space).
fn track(node: &Node, route: &'static str, method: &'static str, started: Instant, status: StatusCode) {
    let metrics = node.metrics();
    metrics.request_seconds.get_or_create(&RouteLabels { route, method }).observe(started.elapsed().as_secs_f64());
    metrics.requests.get_or_create(&RequestLabels { route, method, status: status.as_u16() }).inc();
}

/// Route templates as `&'static str`, so labelling a request allocates nothing. The set is bounded
/// by the router's templates, so the leaked strings are too.
fn intern(route: &str) -> &'static str {
    static INTERNED: std::sync::RwLock<BTreeSet<&'static str>> = std::sync::RwLock::new(BTreeSet::new());
    if let Some(s) = INTERNED.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(route) {
        return s;
    }
    let mut set = INTERNED.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(s) = set.get(route) {
        return s;
    }
    let leaked: &'static str = Box::leak(route.to_owned().into_boxed_str());
    set.insert(leaked);
    leaked
}

fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}
