//! A typed client for a node's admin API: cluster status and whole-view changes, with the cluster
//! token handled inside. The only place outside the node's router that knows the admin routes.

use crate::client::ClientError;
use crate::tls::ClientTls;
use crate::{ClusterStatus, ErrorBody, HEADER_CLUSTER_TOKEN, ViewChanged, ViewRequest};
use std::time::Duration;

/// `GET`: the cluster as the node sees it ([`ClusterStatus`]).
pub const ADMIN_STATUS_PATH: &str = "/v1/admin/status";
/// `GET`: what this one node holds ([`crate::NodeUsage`]).
pub const ADMIN_USAGE_PATH: &str = "/v1/admin/usage";
/// `PUT`: change the whole membership and K ([`ViewRequest`] → [`ViewChanged`]).
pub const ADMIN_VIEW_PATH: &str = "/v1/admin/view";
/// `POST`: what that change would do, without doing it ([`ViewRequest`] → [`crate::ViewPlan`]).
pub const ADMIN_VIEW_PLAN_PATH: &str = "/v1/admin/view/plan";

/// How long a status probe may take by default (a node gathers it from every member).
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a view change may take by default: it answers once the data has moved.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(600);

/// Talks to any node's admin API.
#[derive(Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    tls: ClientTls,
    token: Option<String>,
    status_timeout: Duration,
    change_timeout: Duration,
}

impl Default for AdminClient {
    fn default() -> Self {
        AdminClient::new(None)
    }
}

impl AdminClient {
    /// A client sending `token` (the cluster token) when one is given.
    pub fn new(token: Option<String>) -> Self {
        AdminClient {
            http: Self::client(&ClientTls::plain()),
            tls: ClientTls::plain(),
            token,
            status_timeout: STATUS_TIMEOUT,
            change_timeout: CHANGE_TIMEOUT,
        }
    }

    /// Talks to nodes over `tls` (`https://` when it is TLS).
    pub fn with_tls(mut self, tls: ClientTls) -> Self {
        self.http = Self::client(&tls);
        self.tls = tls;
        self
    }

    fn client(tls: &ClientTls) -> reqwest::Client {
        tls.http_client().build().expect("an HTTP client with checked TLS settings builds")
    }

    /// `<scheme>://<node><path>`.
    pub(crate) fn url(&self, node: &str, path: &str) -> String {
        self.tls.url(node, path)
    }

    /// Overrides how long a view change may take (default 600 s).
    pub fn with_change_timeout(mut self, timeout: Duration) -> Self {
        self.change_timeout = timeout;
        self
    }

    /// Overrides how long a status probe may take (default 5 s).
    pub fn with_status_timeout(mut self, timeout: Duration) -> Self {
        self.status_timeout = timeout;
        self
    }

    /// The HTTP client, for long calls (a backup's reads, a restore): their budget is the change
    /// timeout.
    pub(crate) fn http(&self) -> reqwest::Client {
        self.http.clone()
    }

    pub(crate) fn long_call(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        self.authorized(req.timeout(self.change_timeout))
    }

    /// Posts `body` as JSON to `path` on `node` (within the status timeout) and decodes the answer.
    pub(crate) async fn post_json<T: serde::de::DeserializeOwned>(
        &self,
        node: &str,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, ClientError> {
        let req = self.http.post(self.url(node, path)).timeout(self.status_timeout).json(body);
        answer(node, self.authorized(req).send().await).await
    }

    /// Adds the token both ways a node takes one: as the cluster token, and as a bearer token (an
    /// admin token of the nodes' auth file). A node uses whichever it knows.
    pub(crate) fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => {
                let req = req.header(HEADER_CLUSTER_TOKEN, token);
                match crate::bearer_header(token) {
                    Some(bearer) => req.header(reqwest::header::AUTHORIZATION, bearer),
                    None => req,
                }
            }
            None => req,
        }
    }

    /// The cluster as `node` (`host:port`) sees it.
    pub async fn status(&self, node: &str) -> Result<ClusterStatus, ClientError> {
        let req = self.http.get(self.url(node, ADMIN_STATUS_PATH)).timeout(self.status_timeout);
        answer(node, self.authorized(req).send().await).await
    }

    /// The cluster map `node` routes by (the partitions' slot ranges and members, with the epoch).
    pub async fn cluster_map(&self, node: &str) -> Result<crate::ClusterMap, ClientError> {
        let req = self.http.get(self.url(node, crate::CLUSTER_MAP_PATH)).timeout(self.status_timeout);
        answer(node, self.authorized(req).send().await).await
    }

    /// What `node` itself holds (keys and bytes).
    pub async fn usage(&self, node: &str) -> Result<crate::NodeUsage, ClientError> {
        let req = self.http.get(self.url(node, ADMIN_USAGE_PATH)).timeout(self.status_timeout);
        answer(node, self.authorized(req).send().await).await
    }

    /// Asks `node` to change the cluster to exactly `members` at `replication_factor`; returns once
    /// the data has moved.
    pub async fn change_view(
        &self,
        node: &str,
        members: Vec<String>,
        replication_factor: u32,
    ) -> Result<ViewChanged, ClientError> {
        self.change_view_paced(node, members, replication_factor, None).await
    }

    /// [`AdminClient::change_view`], moving at most `transfer_rate` keys per second per sending
    /// node (0: unlimited; `None`: the node's default).
    pub async fn change_view_paced(
        &self,
        node: &str,
        members: Vec<String>,
        replication_factor: u32,
        transfer_rate: Option<u64>,
    ) -> Result<ViewChanged, ClientError> {
        let body = ViewRequest { members, replication_factor, transfer_rate };
        let req = self.http.put(self.url(node, ADMIN_VIEW_PATH)).timeout(self.change_timeout).json(&body);
        answer(node, self.authorized(req).send().await).await
    }

    /// What changing the cluster to `members` at `replication_factor` would move, per node,
    /// without changing anything.
    pub async fn plan_view(
        &self,
        node: &str,
        members: Vec<String>,
        replication_factor: u32,
    ) -> Result<crate::ViewPlan, ClientError> {
        let body = ViewRequest { members, replication_factor, transfer_rate: None };
        let req = self.http.post(self.url(node, ADMIN_VIEW_PLAN_PATH)).timeout(self.status_timeout).json(&body);
        answer(node, self.authorized(req).send().await).await
    }
}

/// Decodes a successful JSON answer, or the node's error.
async fn answer<T: serde::de::DeserializeOwned>(
    node: &str,
    sent: Result<reqwest::Response, reqwest::Error>,
) -> Result<T, ClientError> {
    let transport = |source| ClientError::Transport { node: node.to_owned(), source };
    let resp = sent.map_err(transport)?;
    let status = resp.status().as_u16();
    let text = resp.text().await.map_err(transport)?;
    if !(200..300).contains(&status) {
        let msg = serde_json::from_str::<ErrorBody>(&text).map(|e| e.msg).unwrap_or(text);
        return Err(ClientError::Status { node: node.to_owned(), status, msg });
    }
    serde_json::from_str(&text).map_err(|e| ClientError::Protocol { node: node.to_owned(), detail: e.to_string() })
}
