//! What a Kubernetes API request asks for, derived from its method, path and query the way the API
//! server derives it: verb, API group, resource and subresource, namespace, name. One parser for
//! the test doubles that need it (the stand-in RBAC authorizer in `kvs-e2e`, the mocked API server
//! of the operator's reconcile scenarios), so they cannot disagree about a URL.
//!
//! Paths: `/api/v1/...` is the core group (`""`), `/apis/<group>/<version>/...` a named group;
//! then optionally `namespaces/<ns>/`, then `<resource>[/<name>[/<subresource>]]`. `/namespaces/<ns>`
//! alone is the namespace object itself (cluster-scoped). Anything else (`/version`, `/api`) is a
//! non-resource request.

/// A request, as the API server classifies it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Request {
    Resource(Attributes),
    /// A path that names no resource (`/api`, `/version`, ...); the verb is the lower-case method.
    NonResource {
        verb: String,
        path: String,
    },
}

/// The attributes of a resource request.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attributes {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete` or `deletecollection`.
    pub verb: String,
    /// `""` is the core group.
    pub group: String,
    /// The resource without its subresource (`kvstoreclusters`).
    pub resource: String,
    /// The subresource (`status`, `scale`), if any.
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    /// The object's name; for a list or watch, a `metadata.name` field selector's value.
    pub name: Option<String>,
}

impl Attributes {
    /// The resource as RBAC rules name it: `resource` or `resource/subresource`.
    pub fn rbac_resource(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.clone(),
        }
    }
}

/// Classifies a request. `method` is the HTTP method (any case); `query` is the raw query string.
pub fn classify(method: &str, path: &str, query: Option<&str>) -> Request {
    let method = method.to_ascii_uppercase();
    let non_resource = || Request::NonResource { verb: method.to_ascii_lowercase(), path: path.to_owned() };
    let segments: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return non_resource(),
    };
    let (namespace, rest) = match rest {
        // `/namespaces/NAME` is the namespace object itself; longer paths are inside it.
        ["namespaces", ns, inner @ ..] if !inner.is_empty() => (Some((*ns).to_owned()), inner),
        _ => (None, rest),
    };
    let (resource, mut name, subresource) = match rest {
        [] => return non_resource(),
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some((*name).to_owned()), None),
        [resource, name, sub, ..] => (*resource, Some((*name).to_owned()), Some((*sub).to_owned())),
    };
    let params: Vec<(String, String)> = query.and_then(|q| serde_urlencoded::from_str(q).ok()).unwrap_or_default();
    let watching = params.iter().any(|(k, v)| k == "watch" && (v == "true" || v == "1"));
    let verb = match method.as_str() {
        "GET" | "HEAD" if name.is_some() => "get",
        "GET" | "HEAD" if watching => "watch",
        "GET" | "HEAD" => "list",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" if name.is_some() => "delete",
        "DELETE" => "deletecollection",
        _ => "unknown",
    };
    if matches!(verb, "list" | "watch") {
        // A list or watch of one object by name is authorized as that object.
        let selectors = params.iter().filter(|(k, _)| k == "fieldSelector").flat_map(|(_, v)| v.split(','));
        name = selectors.filter_map(|s| s.strip_prefix("metadata.name=")).map(str::to_owned).next();
    }
    Request::Resource(Attributes {
        verb: verb.into(),
        group: group.into(),
        resource: resource.into(),
        subresource,
        namespace,
        name,
    })
}

/// The `labelSelector` of a query as `key=value` pairs (equality terms only; others are skipped).
pub fn label_selector(query: Option<&str>) -> Vec<(String, String)> {
    let params: Vec<(String, String)> = query.and_then(|q| serde_urlencoded::from_str(q).ok()).unwrap_or_default();
    params
        .iter()
        .filter(|(k, _)| k == "labelSelector")
        .flat_map(|(_, v)| v.split(','))
        .filter_map(|term| term.split_once('=').filter(|(k, _)| !k.ends_with('!')))
        .map(|(k, v)| (k.trim_end_matches('=').to_owned(), v.trim_start_matches('=').to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(method: &str, path: &str, query: Option<&str>) -> Attributes {
        match classify(method, path, query) {
            Request::Resource(a) => a,
            other => panic!("{path} is a resource request, got {other:?}"),
        }
    }

    #[test]
    fn urls_give_the_attributes_the_api_server_derives() {
        let a = attrs("PATCH", "/apis/kvstore.dev/v1alpha1/namespaces/prod/kvstoreclusters/demo/status", None);
        assert_eq!(
            (a.verb.as_str(), a.group.as_str(), a.rbac_resource(), a.namespace.as_deref(), a.name.as_deref()),
            ("patch", "kvstore.dev", "kvstoreclusters/status".to_owned(), Some("prod"), Some("demo"))
        );
        let a = attrs("GET", "/api/v1/namespaces/prod/pods", Some("labelSelector=a%3Db&watch=true"));
        assert_eq!((a.verb.as_str(), a.group.as_str(), a.resource.as_str()), ("watch", "", "pods"));
        let a = attrs("get", "/api/v1/namespaces/prod/secrets", Some("fieldSelector=metadata.name%3Dtok"));
        assert_eq!((a.verb.as_str(), a.name.as_deref()), ("list", Some("tok")));
        let a = attrs("GET", "/api/v1/namespaces/prod", None);
        assert_eq!((a.resource.as_str(), a.namespace, a.name.as_deref()), ("namespaces", None, Some("prod")));
        assert_eq!(attrs("DELETE", "/api/v1/namespaces/p/pods", None).verb, "deletecollection");
        assert_eq!(attrs("POST", "/apis/apps/v1/namespaces/p/statefulsets", None).verb, "create");
        assert!(matches!(classify("GET", "/version", None), Request::NonResource { .. }));
        assert!(matches!(classify("GET", "/apis/apps/v1", None), Request::NonResource { .. }));
    }

    #[test]
    fn label_selectors_are_decoded() {
        let q = "labelSelector=app.kubernetes.io%2Fname%3Dkvstore%2Cteam%3Da&limit=5";
        assert_eq!(
            label_selector(Some(q)),
            [("app.kubernetes.io/name".to_owned(), "kvstore".to_owned()), ("team".to_owned(), "a".to_owned())]
        );
        assert!(label_selector(Some("labelSelector=a%21%3Db")).is_empty());
        assert!(label_selector(None).is_empty());
    }
}
