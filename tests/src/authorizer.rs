//! A stand-in for the API server's RBAC authorizer, which the test server does not run: a reverse
//! proxy in front of the API server that lets a request through only when the Roles and
//! ClusterRoles bound to one ServiceAccount allow it, and otherwise answers `403 Forbidden` the way
//! the real server does. The process under test (the operator) reaches the proxy through a
//! kubeconfig the proxy writes (plain HTTP on loopback); the proxy forwards with the test's admin
//! credentials. Every decision is recorded, so a test can assert that nothing was denied and which
//! of the granted permissions were used.
//!
//! What it simulates, and how far:
//! - the request attributes the server derives from a URL: verb, API group, resource and
//!   subresource, namespace and name, derived by `kvs_testkit::k8s_request::classify` (the parser
//!   the operator's mocked API server uses too);
//! - RBAC's rule matching ([`rule_allows`]): API groups, resources (`resource/subresource` as RBAC
//!   names them, and `*/subresource`), verbs, resource names, `*`; a RoleBinding grants only in its
//!   namespace, a ClusterRoleBinding everywhere;
//! - the bindings are read once, when the proxy starts (install the chart first); discovery and
//!   health paths are open to everyone, as the default `system:discovery` and
//!   `system:public-info-viewer` roles make them. Aggregated ClusterRoles, impersonation and
//!   non-resource URL rules are not modelled.

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject};
use kube::Client;
use kube::api::{Api, ListParams};
pub use kvs_testkit::k8s_request::{Attributes, Request};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Whether one RBAC rule allows a resource request.
pub fn rule_allows(rule: &PolicyRule, a: &Attributes) -> bool {
    let has = |list: &Option<Vec<String>>, value: &str| {
        list.as_ref().is_some_and(|l| l.iter().any(|x| x == "*" || x == value))
    };
    let resource = a.rbac_resource();
    let resource_matches = rule.resources.as_ref().is_some_and(|rs| {
        rs.iter().any(|r| {
            r == "*" || *r == resource || a.subresource.as_ref().is_some_and(|s| r.strip_prefix("*/") == Some(s))
        })
    });
    let name_matches = match (&rule.resource_names, &a.name) {
        (None, _) => true,
        (Some(names), _) if names.is_empty() => true,
        (Some(names), Some(name)) => names.contains(name),
        (Some(_), None) => false,
    };
    rule.verbs.iter().any(|v| v == "*" || *v == a.verb)
        && has(&rule.api_groups, &a.group)
        && resource_matches
        && name_matches
}

/// The rules a binding grants, and where: `None` everywhere (a ClusterRoleBinding), or one
/// namespace (a RoleBinding).
#[derive(Clone, Debug)]
pub struct Grant {
    pub namespace: Option<String>,
    pub rules: Vec<PolicyRule>,
}

/// Paths every authenticated user may read (the default discovery and health roles).
const OPEN_PATHS: &[&str] = &["/api", "/apis", "/version", "/healthz", "/livez", "/readyz", "/openapi"];

/// Whether `grants` allow `request`.
pub fn authorize(grants: &[Grant], request: &Request) -> bool {
    match request {
        Request::NonResource { verb, path } => {
            verb == "get" && OPEN_PATHS.iter().any(|p| path == p || path.starts_with(&format!("{p}/")))
        }
        Request::Resource(a) => grants
            .iter()
            .filter(|g| g.namespace.is_none() || g.namespace == a.namespace)
            .any(|g| g.rules.iter().any(|r| rule_allows(r, a))),
    }
}

/// Every (group, resource, verb) the grants name, for comparing with what was used.
pub fn granted(grants: &[Grant]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in grants.iter().flat_map(|g| &g.rules) {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    out.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    out
}

fn binds(subjects: &Option<Vec<Subject>>, namespace: &str, account: &str) -> bool {
    let groups = [
        "system:serviceaccounts".to_owned(),
        format!("system:serviceaccounts:{namespace}"),
        "system:authenticated".to_owned(),
    ];
    subjects.iter().flatten().any(|s| match s.kind.as_str() {
        "ServiceAccount" => s.name == account && s.namespace.as_deref() == Some(namespace),
        "Group" => groups.contains(&s.name),
        _ => false,
    })
}

/// Reads what the cluster grants `namespace/account`.
pub async fn grants_of(client: &Client, namespace: &str, account: &str) -> kube::Result<Vec<Grant>> {
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    let mut grants = Vec::new();
    for b in Api::<ClusterRoleBinding>::all(client.clone()).list(&ListParams::default()).await? {
        if binds(&b.subjects, namespace, account)
            && b.role_ref.kind == "ClusterRole"
            && let Some(role) = cluster_roles.get_opt(&b.role_ref.name).await?
        {
            grants.push(Grant { namespace: None, rules: role.rules.unwrap_or_default() });
        }
    }
    for b in Api::<RoleBinding>::all(client.clone()).list(&ListParams::default()).await? {
        let Some(ns) = b.metadata.namespace.clone() else { continue };
        if !binds(&b.subjects, namespace, account) {
            continue;
        }
        let rules = match b.role_ref.kind.as_str() {
            "Role" => {
                Api::<Role>::namespaced(client.clone(), &ns).get_opt(&b.role_ref.name).await?.and_then(|r| r.rules)
            }
            "ClusterRole" => cluster_roles.get_opt(&b.role_ref.name).await?.and_then(|r| r.rules),
            _ => None,
        };
        grants.push(Grant { namespace: Some(ns), rules: rules.unwrap_or_default() });
    }
    Ok(grants)
}

/// One request and what the authorizer said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub request: Request,
    pub allowed: bool,
}

struct Shared {
    upstream: Client,
    grants: Vec<Grant>,
    user: String,
    /// Every decision, in order. `std` lock: held only to push or copy, never across `.await`.
    decisions: Mutex<Vec<Decision>>,
    /// One line a request (`METHOD path-and-query -> status`), for reading after a failed test.
    /// `std` lock: held only to write a line.
    log: Mutex<std::fs::File>,
}

impl Shared {
    fn log(&self, line: std::fmt::Arguments<'_>) {
        use std::io::Write;
        let mut file = self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = writeln!(file, "{line}");
    }
}

/// The proxy, serving until dropped. It runs on a thread and runtime of its own, so a test that
/// blocks its own runtime (running `kubectl delete --wait`, say) does not stall the process
/// behind the proxy.
pub struct RbacProxy {
    shared: Arc<Shared>,
    kubeconfig: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RbacProxy {
    /// Starts a proxy that acts as `namespace/account`, with the permissions its bindings give it
    /// now, in front of the cluster `KUBECONFIG` names; writes its own kubeconfig and a request
    /// log into `dir`.
    pub fn start(namespace: &str, account: &str, dir: &Path) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ns, sa, log_path) =
            (namespace.to_owned(), account.to_owned(), dir.join(format!("rbac-proxy-{account}.log")));
        let thread = std::thread::Builder::new().name("rbac-proxy".into()).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(r) => r,
                Err(e) => return drop(ready_tx.send(Err(anyhow::Error::from(e)))),
            };
            runtime.block_on(async move {
                let started = async {
                    let upstream = crate::k8s::api_client().await;
                    let grants = grants_of(&upstream, &ns, &sa).await?;
                    anyhow::ensure!(!grants.is_empty(), "no Role or ClusterRole is bound to ServiceAccount {ns}/{sa}");
                    let user = format!("system:serviceaccount:{ns}:{sa}");
                    let log = Mutex::new(std::fs::File::create(&log_path)?);
                    let shared = Arc::new(Shared { upstream, grants, user, decisions: Mutex::default(), log });
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    Ok((shared, listener))
                };
                let (shared, listener) = match started.await {
                    Ok(s) => s,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                let address = listener.local_addr();
                let _ = ready_tx.send(address.map(|a| (shared.clone(), a)).map_err(anyhow::Error::from));
                let app = Router::new().fallback(forward).with_state(shared);
                tokio::select! {
                    served = axum::serve(listener, app) => if let Err(e) = served { eprintln!("the RBAC proxy stopped: {e}") },
                    _ = stopped => {}
                }
                // Leaving drops the runtime, which ends every connection (watches included).
            });
        })?;
        let (shared, address) =
            ready_rx.recv().map_err(|_| anyhow::anyhow!("the RBAC proxy's thread ended while starting"))??;
        let kubeconfig = dir.join(format!("kubeconfig-{account}"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: rbac-proxy\n  cluster: {{server: \"http://{address}\"}}\n\
             users:\n- name: {account}\n  user: {{}}\ncontexts:\n- name: rbac-proxy\n  context: {{cluster: rbac-proxy, user: {account}, namespace: {namespace}}}\n\
             current-context: rbac-proxy\n"
        );
        std::fs::write(&kubeconfig, text)?;
        Ok(RbacProxy { shared, kubeconfig, stop: Some(stop), thread: Some(thread) })
    }

    /// A kubeconfig that reaches the API server through this proxy, as the ServiceAccount.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Every decision so far.
    pub fn decisions(&self) -> Vec<Decision> {
        self.shared.decisions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The (group, resource, verb) the grants name.
    pub fn granted(&self) -> BTreeSet<(String, String, String)> {
        granted(&self.shared.grants)
    }
}

impl Drop for RbacProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Headers that belong to one connection, not to the request or response.
fn drop_hop_headers(headers: &mut HeaderMap) {
    for h in ["host", "connection", "content-length", "transfer-encoding", "keep-alive", "authorization"] {
        headers.remove(h);
    }
}

async fn forward(State(shared): State<Arc<Shared>>, incoming: axum::extract::Request) -> Response {
    let (mut parts, body) = incoming.into_parts();
    let request = kvs_testkit::k8s_request::classify(parts.method.as_str(), parts.uri.path(), parts.uri.query());
    let allowed = authorize(&shared.grants, &request);
    shared
        .decisions
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Decision { request: request.clone(), allowed });
    let request_line = format!("{} {}", parts.method, parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    if !allowed {
        eprintln!("RBAC stand-in: denied {} {request:?}", shared.user);
        shared.log(format_args!("{request_line} -> 403 (denied by RBAC)"));
        return forbidden(&shared.user, &request);
    }
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("reading the request body: {e}")).into_response(),
    };
    drop_hop_headers(&mut parts.headers);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let mut upstream = http::Request::builder().method(parts.method).uri(path);
    if let Some(h) = upstream.headers_mut() {
        *h = parts.headers;
    }
    let upstream = match upstream.body(kube::client::Body::from(body)) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("rebuilding the request: {e}")).into_response(),
    };
    match shared.upstream.send(upstream).await {
        Ok(response) => {
            shared.log(format_args!("{request_line} -> {}", response.status().as_u16()));
            let (mut parts, body) = response.into_parts();
            drop_hop_headers(&mut parts.headers);
            Response::from_parts(parts, axum::body::Body::new(body))
        }
        Err(e) => {
            shared.log(format_args!("{request_line} -> 502 ({e})"));
            (StatusCode::BAD_GATEWAY, format!("forwarding to the API server: {e}")).into_response()
        }
    }
}

/// The API server's answer to a request RBAC does not allow.
fn forbidden(user: &str, request: &Request) -> Response {
    let message = match request {
        Request::Resource(a) => {
            let what = format!("resource \"{}\"", a.rbac_resource());
            let scope = a
                .namespace
                .as_ref()
                .map_or_else(|| "at the cluster scope".to_owned(), |ns| format!("in the namespace \"{ns}\""));
            format!("User \"{user}\" cannot {} {what} in API group \"{}\" {scope}", a.verb, a.group)
        }
        Request::NonResource { verb, path } => format!("User \"{user}\" cannot {verb} path \"{path}\""),
    };
    let status = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("forbidden: {message}"), "reason": "Forbidden", "code": 403,
    });
    (StatusCode::FORBIDDEN, [("content-type", "application/json")], status.to_string()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvs_testkit::k8s_request::classify;

    fn attrs(method: &str, path: &str, query: Option<&str>) -> Attributes {
        match classify(method, path, query) {
            Request::Resource(a) => a,
            other => panic!("{path} is a resource request, not {other:?}"),
        }
    }

    fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        PolicyRule {
            api_groups: Some(owned(groups)),
            resources: Some(owned(resources)),
            verbs: owned(verbs),
            ..PolicyRule::default()
        }
    }

    #[test]
    fn rules_match_like_rbac() {
        let get_pods = attrs("GET", "/api/v1/namespaces/p/pods/x", None);
        assert!(rule_allows(&rule(&[""], &["pods"], &["get"]), &get_pods));
        assert!(rule_allows(&rule(&["*"], &["*"], &["*"]), &get_pods));
        assert!(!rule_allows(&rule(&["apps"], &["pods"], &["get"]), &get_pods), "wrong group");
        assert!(!rule_allows(&rule(&[""], &["pods"], &["list"]), &get_pods), "wrong verb");
        let status = attrs("PATCH", "/api/v1/namespaces/p/pods/x/status", None);
        assert!(!rule_allows(&rule(&[""], &["pods"], &["patch"]), &status), "a subresource is granted separately");
        assert!(rule_allows(&rule(&[""], &["pods/status"], &["patch"]), &status));
        assert!(rule_allows(&rule(&[""], &["*/status"], &["patch"]), &status));
        assert!(!rule_allows(&rule(&[""], &["*/scale"], &["patch"]), &status), "another subresource");
        assert!(!rule_allows(&rule(&[""], &["*/status"], &["get"]), &get_pods), "*/status is no resource");
        let named = PolicyRule { resource_names: Some(vec!["y".into()]), ..rule(&[""], &["pods"], &["get"]) };
        assert!(!rule_allows(&named, &get_pods), "another name");
        let create = attrs("POST", "/api/v1/namespaces/p/pods", None);
        assert!(
            !rule_allows(&PolicyRule { verbs: vec!["create".into()], ..named }, &create),
            "resourceNames never allow create"
        );
    }

    #[test]
    fn a_watch_by_name_is_authorized_as_that_object() {
        // The operator's lease manager watches its one Lease; a rule naming it must cover that.
        let watch = attrs(
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/p/leases",
            Some("fieldSelector=metadata.name%3Dop&watch=1"),
        );
        let lease = |name: &str| PolicyRule {
            resource_names: Some(vec![name.into()]),
            ..rule(&["coordination.k8s.io"], &["leases"], &["watch"])
        };
        assert!(rule_allows(&lease("op"), &watch));
        assert!(!rule_allows(&lease("other"), &watch));
    }

    #[test]
    fn a_role_binding_grants_only_in_its_namespace() {
        let grants = [Grant { namespace: Some("a".into()), rules: vec![rule(&[""], &["pods"], &["list"])] }];
        let get = |path: &str| classify("GET", path, None);
        assert!(authorize(&grants, &get("/api/v1/namespaces/a/pods")));
        assert!(!authorize(&grants, &get("/api/v1/namespaces/b/pods")));
        assert!(!authorize(&grants, &get("/api/v1/pods")), "all namespaces needs a ClusterRoleBinding");
        assert!(authorize(&grants, &get("/apis")), "discovery is open");
        assert!(authorize(&grants, &get("/apis/apps/v1")), "discovery is open");
        assert!(!authorize(&grants, &get("/metrics")));
        assert!(!authorize(&grants, &classify("POST", "/version", None)), "open paths are open to reads only");
    }
}
