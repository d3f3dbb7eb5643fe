//! Command-line and environment configuration. Every flag is also an environment variable; the
//! course's `K`, `VIEW` and `IPPORT` (and our `LISTEN`) keep their names, so a node starts from
//! environment alone exactly as the HW4 contract says.

use crate::node::Settings;
use crate::view::{NodeId, View};
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// kvstore node: a sharded, replicated, durable key-value server.
#[derive(Clone, Debug, Parser)]
#[command(name = "kvs-node", version, about)]
pub struct Args {
    /// This node's identity and the address peers and clients reach it at (`ip:port`).
    #[arg(long, env = "IPPORT")]
    pub ipport: String,

    /// Comma-separated `ip:port` of the initial members. Omit it (or leave this node out of it) on a
    /// node that will be added to a running cluster later: it waits for `update_view`.
    #[arg(long, env = "VIEW")]
    pub view: Option<String>,

    /// Replicas per partition.
    #[arg(short = 'k', long = "replication-factor", env = "K", default_value_t = 1)]
    pub k: u32,

    /// Socket address to bind. Default: all interfaces on the port of IPPORT.
    #[arg(long, env = "LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Directory holding the node's data. Default: a fresh temporary directory (data is not kept).
    #[arg(long, env = "KVS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Largest value accepted, in bytes.
    #[arg(long, env = "KVS_MAX_VALUE_BYTES", default_value_t = 1 << 20)]
    pub max_value_bytes: usize,

    /// TCP connect timeout for calls to other nodes, in milliseconds.
    #[arg(long, env = "KVS_CONNECT_TIMEOUT_MS", default_value_t = 300)]
    pub connect_timeout_ms: u64,

    /// Keys per second each sending node moves in a view change this node drives (0: unlimited).
    /// A change can ask for another rate (`transfer_rate` of `PUT /v1/admin/view`).
    #[arg(long, env = "KVS_TRANSFER_RATE", default_value_t = crate::node::DEFAULT_TRANSFER_RATE)]
    pub transfer_rate: u64,

    /// How this node calls other nodes: `framed` (many calls multiplexed on one connection per
    /// peer) or `http` (one HTTP/1.1 request per call). A node answers both.
    #[arg(long, env = "KVS_PEER_TRANSPORT", value_enum, default_value_t = crate::peers::Transport::Framed)]
    pub peer_transport: crate::peers::Transport,

    /// Longest a forwarded request waits for a live owner before trying the next one, in
    /// milliseconds. A dead owner (see --heartbeat-interval-ms) is skipped at once.
    #[arg(long, env = "KVS_FORWARD_DEADLINE_MS", default_value_t = 10_000)]
    pub forward_deadline_ms: u64,

    /// Longest a write waits for a live replica to store it (or a causal read for a live
    /// replica's record), in milliseconds. A dead replica is given up on at once.
    #[arg(long, env = "KVS_REPLICA_DEADLINE_MS", default_value_t = 5_000)]
    pub replica_deadline_ms: u64,

    /// Interval between heartbeats to each peer, in milliseconds. A peer is declared dead when a
    /// connection to it fails, or when nothing was heard from it for long enough that the
    /// phi-accrual failure detector reaches --phi-threshold (about 0.6 s with the defaults).
    #[arg(long, env = "KVS_HEARTBEAT_INTERVAL_MS", default_value_t = 100)]
    pub heartbeat_interval_ms: u64,

    /// Suspicion at which a silent peer is declared dead (phi-accrual; 8 ≈ one wrong call in 10^8).
    #[arg(long, env = "KVS_PHI_THRESHOLD", default_value_t = 8.0)]
    pub phi_threshold: f64,

    /// Silence tolerated on top of the usual heartbeat interval before suspicion grows, in
    /// milliseconds.
    #[arg(long, env = "KVS_ACCEPTABLE_HEARTBEAT_PAUSE_MS", default_value_t = 250)]
    pub acceptable_heartbeat_pause_ms: u64,

    /// Client requests in progress on this node at once; more wait in a queue. Default: 16 per
    /// CPU core.
    #[arg(long, env = "KVS_MAX_IN_FLIGHT_REQUESTS")]
    pub max_in_flight_requests: Option<usize>,

    /// Longest a client request waits in the queue before it is refused (503 with Retry-After),
    /// in milliseconds.
    #[arg(long, env = "KVS_QUEUE_TIMEOUT_MS", default_value_t = 5_000)]
    pub queue_timeout_ms: u64,

    /// Pause between anti-entropy rounds, in milliseconds.
    #[arg(long, env = "KVS_ANTI_ENTROPY_INTERVAL_MS", default_value_t = 200)]
    pub anti_entropy_interval_ms: u64,

    /// Shared secret for internal routes and view changes. Prefer --cluster-token-file.
    #[arg(long, env = "KVS_CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,

    /// File holding the cluster token (e.g. a mounted Kubernetes Secret).
    #[arg(long, env = "KVS_CLUSTER_TOKEN_FILE")]
    pub cluster_token_file: Option<PathBuf>,

    /// The node's certificate chain (PEM), presented to clients and, as a client certificate, to
    /// peers. With --tls-key-file and --tls-ca-file it turns TLS on for the whole port. Re-read
    /// when it changes.
    #[arg(long, env = "KVS_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,

    /// The private key of --tls-cert-file (PEM).
    #[arg(long, env = "KVS_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,

    /// The cluster CA (PEM): peers' certificates, and clients' when they present one, must chain
    /// to it.
    #[arg(long, env = "KVS_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,

    /// Whether clients must present a certificate from the CA: none, optional or require (peers
    /// always must).
    #[arg(long, env = "KVS_TLS_CLIENT_AUTH", value_enum, default_value_t = crate::tls::ClientAuth::None)]
    pub tls_client_auth: crate::tls::ClientAuth,

    /// Client tokens and their roles (read, write, admin; optionally limited to key prefixes), as
    /// YAML: with it every client request needs `Authorization: Bearer <token>` (see
    /// docs/security.md). Re-read when it changes. Without it client routes are open.
    #[arg(long, env = "KVS_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,

    /// Hosts file (`address name...` lines) resolving peer names before DNS; re-read when it
    /// changes. For environments without cluster DNS (test control planes, laptops).
    #[arg(long, env = "KVS_HOSTS_FILE")]
    pub hosts_file: Option<PathBuf>,

    /// Open connections served at once; more are answered 503 and closed.
    #[arg(long, env = "KVS_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Time a client may take to send a request's headers, in milliseconds (slow clients are cut
    /// off so they cannot hold connections forever). Also how long an idle keep-alive connection
    /// is kept open: clients that pool connections (and peers, which drop idle ones after half of
    /// this) should not keep them longer.
    #[arg(long, env = "KVS_HEADER_TIMEOUT_MS", default_value_t = 75_000)]
    pub header_timeout_ms: u64,

    /// On SIGTERM, how long the node drains before it stops, in milliseconds: it reports not
    /// ready (`/readyz` 503), keeps serving, and closes each client connection after its next
    /// answer, so requests already on their way are answered rather than cut off. Behind a load
    /// balancer, set it longer than the balancer takes to stop sending new requests (the operator
    /// sets it from `spec.shutdownDelaySeconds`, 5 s by default). 0 stops at once.
    #[arg(long, env = "KVS_SHUTDOWN_DELAY_MS", default_value_t = 0)]
    pub shutdown_delay_ms: u64,

    /// Threads serving requests. Default: one per CPU. Set it to the node's share of the CPUs when
    /// several nodes share a machine (1 runs everything on a single thread).
    #[arg(long, env = "KVS_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// Stop (as on SIGTERM: in-flight requests finish) when the process that started this node
    /// exits, however it ends — for supervisors that start nodes as their own children, so a
    /// supervisor killed with SIGKILL leaves no node holding its address (the operator's local
    /// mode and the test harness set it). Checked every 500 ms.
    #[arg(long, env = "KVS_EXIT_WITH_PARENT", default_value_t = false)]
    pub exit_with_parent: bool,

    /// Log format: `text` or `json`. Filter with RUST_LOG (default `info`).
    #[arg(long, env = "KVS_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A configuration that cannot work, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("IPPORT {0:?} is not host:port (e.g. 10.0.0.3:8080)")]
    BadIpPort(String),
    #[error("VIEW entry {0:?} is not host:port; VIEW is a comma-separated list like 10.0.0.3:8080,10.0.0.4:8080")]
    BadViewEntry(String),
    #[error("K must be at least 1")]
    ZeroK,
    #[error("--phi-threshold must be a positive number; it is {0}")]
    BadPhiThreshold(f64),
    #[error("could not read the cluster token file {path}: {source}")]
    TokenFile { path: PathBuf, source: std::io::Error },
    /// The TLS files cannot be used together as given; the message says what to fix.
    #[error("TLS: {0}")]
    Tls(String),
    /// The auth file cannot be read or used; the message names the file and what to fix.
    #[error("{0}")]
    AuthFile(String),
}

fn port_of(hostport: &str) -> Option<u16> {
    let (host, port) = hostport.rsplit_once(':')?;
    if host.is_empty() {
        return None;
    }
    port.parse().ok()
}

impl Args {
    /// The address to bind.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        match self.listen {
            Some(a) => Ok(a),
            None => {
                let port = port_of(&self.ipport).ok_or_else(|| ConfigError::BadIpPort(self.ipport.clone()))?;
                Ok(SocketAddr::from(([0, 0, 0, 0], port)))
            }
        }
    }

    /// The initial view from `VIEW` and `K`; `None` when VIEW is absent or empty.
    pub fn initial_view(&self) -> Result<Option<View>, ConfigError> {
        if self.k == 0 {
            return Err(ConfigError::ZeroK);
        }
        port_of(&self.ipport).ok_or_else(|| ConfigError::BadIpPort(self.ipport.clone()))?;
        let Some(raw) = self.view.as_deref().filter(|v| !v.trim().is_empty()) else { return Ok(None) };
        let mut members: Vec<NodeId> = Vec::new();
        for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            port_of(entry).ok_or_else(|| ConfigError::BadViewEntry(entry.to_owned()))?;
            members.push(entry.to_owned());
        }
        if !members.contains(&self.ipport) {
            // Started with the cluster's initial VIEW but not part of it (e.g. a pod added by
            // scaling out a StatefulSet whose template carries VIEW): wait to be added.
            return Ok(None);
        }
        Ok(Some(View::initial(&members, self.k)))
    }

    /// How to serve connections, from the flags.
    pub fn serve_options(&self) -> crate::ServeOptions {
        crate::ServeOptions {
            max_connections: self.max_connections.max(1),
            header_timeout: Duration::from_millis(self.header_timeout_ms.max(1)),
            shutdown_delay: Duration::from_millis(self.shutdown_delay_ms),
        }
    }

    /// Node settings from the flags.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let mut s = Settings::new(self.ipport.clone());
        s.forward_deadline = Duration::from_millis(self.forward_deadline_ms.max(1));
        s.replica_deadline = Duration::from_millis(self.replica_deadline_ms.max(1));
        if !(self.phi_threshold.is_finite() && self.phi_threshold > 0.0) {
            return Err(ConfigError::BadPhiThreshold(self.phi_threshold));
        }
        s.detector.heartbeat_interval = Duration::from_millis(self.heartbeat_interval_ms.max(1));
        s.detector.phi_threshold = self.phi_threshold;
        s.detector.acceptable_pause = Duration::from_millis(self.acceptable_heartbeat_pause_ms);
        s.admission = crate::admission::Limits {
            max_in_flight: self.max_in_flight_requests.unwrap_or(s.admission.max_in_flight).max(1),
            queue_timeout: Duration::from_millis(self.queue_timeout_ms),
        };
        s.anti_entropy_interval = Duration::from_millis(self.anti_entropy_interval_ms.max(1));
        s.max_value_bytes = self.max_value_bytes;
        s.transfer_rate = self.transfer_rate;
        s.hosts_file = self.hosts_file.clone();
        s.cluster_token = match (&self.cluster_token, &self.cluster_token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::TokenFile { path: path.clone(), source })?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        }
        .filter(|t| !t.is_empty());
        s.tls = match (&self.tls_cert_file, &self.tls_key_file, &self.tls_ca_file) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(ca)) => {
                let files = crate::tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: ca.clone(),
                    client_auth: self.tls_client_auth,
                };
                let tls = crate::tls::Tls::load(files).map_err(|e| ConfigError::Tls(format!("{e:#}")))?;
                Some(std::sync::Arc::new(tls))
            }
            _ => return Err(ConfigError::Tls(
                "--tls-cert-file, --tls-key-file and --tls-ca-file (KVS_TLS_CERT_FILE, KVS_TLS_KEY_FILE, KVS_TLS_CA_FILE) turn TLS on together: give all three or none".into(),
            )),
        };
        if s.tls.is_some() && self.peer_transport == crate::peers::Transport::Http {
            return Err(ConfigError::Tls(
                "TLS between nodes runs over the framed peer transport: drop --peer-transport http".into(),
            ));
        }
        if let Some(path) = &self.auth_file {
            let gate = crate::auth::load(path).map_err(|e| ConfigError::AuthFile(format!("{e:#}")))?;
            s.auth = Some(std::sync::Arc::new(gate));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("kvs-node").chain(v.iter().copied())).unwrap()
    }

    #[test]
    fn hw4_environment_shape() {
        let a = args(&["--ipport", "10.0.0.3:8080", "--view", "10.0.0.4:8080,10.0.0.3:8080", "-k", "2"]);
        assert_eq!(a.listen_addr().unwrap(), "0.0.0.0:8080".parse().unwrap());
        let view = a.initial_view().unwrap().unwrap();
        assert_eq!(view.members(0), ["10.0.0.3:8080", "10.0.0.4:8080"]);
        assert!(args(&["--ipport", "10.0.0.3:8080"]).initial_view().unwrap().is_none());
        assert!(
            args(&["--ipport", "10.0.0.9:8080", "--view", "10.0.0.3:8080,10.0.0.4:8080"])
                .initial_view()
                .unwrap()
                .is_none(),
            "not in VIEW: waits to be added"
        );
    }

    #[test]
    fn bad_values_say_what_to_fix() {
        assert!(matches!(args(&["--ipport", "nope"]).listen_addr(), Err(ConfigError::BadIpPort(_))));
        assert!(
            matches!(args(&["--ipport", "a:1", "--view", "a:1,b"]).initial_view(), Err(ConfigError::BadViewEntry(e)) if e == "b")
        );
        assert!(matches!(args(&["--ipport", "a:1", "-k", "0"]).initial_view(), Err(ConfigError::ZeroK)));
    }
}
