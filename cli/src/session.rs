//! Reaching the cluster: the endpoints in order (the next one when one cannot be reached), TLS
//! (`--cacert`, `--cert`, `--key`: `https://` to every endpoint), the token, and the causal context a run continues from and leaves behind (`--context-file`).
//!
//! The context file holds the opaque context string the cluster hands out, nothing else. It is
//! replaced atomically (written beside, then renamed), so a run killed midway leaves the old one.

use crate::args::Global;
use crate::error::{CliError, unreachable};
use kvs_api::{AdminClient, ClientError, ClientTls, KvClient};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Session {
    endpoints: Vec<String>,
    tls: ClientTls,
    timeout: Duration,
    token: Option<String>,
}

impl Session {
    pub fn new(global: &Global) -> Result<Session, CliError> {
        let tls = match &global.cacert {
            Some(ca) => ClientTls::from_files(ca, global.client_cert.as_deref(), global.client_key.as_deref())
                .map_err(|e| CliError::Invalid(format!("TLS settings: {e}")))?,
            None if global.client_cert.is_some() => {
                return Err(CliError::Invalid(
                    "--cert needs --cacert: the CA that signed the nodes' certificates".into(),
                ));
            }
            None => ClientTls::plain(),
        };
        let mut endpoints = Vec::new();
        for endpoint in &global.endpoints {
            let endpoint = endpoint.trim().trim_end_matches('/');
            let address = match (endpoint.split_once("://"), tls.is_tls()) {
                (None, _) => endpoint,
                (Some(("http", address)), false) | (Some(("https", address)), true) => address,
                (Some(("https", _)), false) => {
                    return Err(CliError::Invalid(format!(
                        "{endpoint} is https: pass --cacert with the CA that signed the nodes' certificates"
                    )));
                }
                (Some(("http", _)), true) => {
                    return Err(CliError::Invalid(format!(
                        "{endpoint} is plain http, but --cacert asks for TLS: use https:// or host:port"
                    )));
                }
                (Some((scheme, _)), _) => {
                    return Err(CliError::Invalid(format!(
                        "{endpoint}: unknown scheme {scheme:?}; give host:port (http or https by --cacert)"
                    )));
                }
            };
            if !address.is_empty() {
                endpoints.push(address.to_owned());
            }
        }
        if endpoints.is_empty() {
            return Err(CliError::Invalid("no endpoint: pass --endpoints host:port (or set KVS_ENDPOINTS)".into()));
        }
        let token = match &global.token_file {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        Ok(Session { endpoints, tls, timeout: global.timeout(), token })
    }

    /// Runs `call` against each endpoint in turn until one answers (an error it answered with
    /// counts as an answer: only an unreachable node makes the next one worth trying).
    pub async fn first_answer<T, F, Fut>(&self, call: F) -> Result<T, CliError>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let mut failures = Vec::new();
        for endpoint in &self.endpoints {
            match call(endpoint.clone()).await {
                Ok(answer) => return Ok(answer),
                Err(e) if unreachable(&e) => failures.push(e.to_string()),
                Err(e) => return Err(e.into()),
            }
        }
        Err(CliError::Unavailable(format!(
            "no endpoint could be reached ({}); check --endpoints / KVS_ENDPOINTS",
            failures.join("; ")
        )))
    }

    /// A key-value session at `endpoint` continuing from `context`.
    pub fn kv(&self, endpoint: &str, context: &str) -> KvClient {
        KvClient::connect(endpoint, self.timeout, self.token.as_deref(), &self.tls).with_context(context)
    }

    pub fn admin(&self) -> AdminClient {
        AdminClient::new(self.token.clone()).with_tls(self.tls.clone()).with_status_timeout(self.timeout)
    }

    /// The cluster as a backup runner reaches it.
    pub fn cluster(&self) -> kvs_backup::Cluster {
        kvs_backup::Cluster::new(self.endpoints.clone(), self.admin())
    }
}

fn read_token(path: &Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Invalid(format!("cannot read the token file {}: {e}", path.display())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(CliError::Invalid(format!("the token file {} is empty", path.display())));
    }
    Ok(token.to_owned())
}

/// The causal context kept in a file between runs (none: every run starts afresh).
pub struct ContextFile {
    path: Option<PathBuf>,
}

impl ContextFile {
    pub fn new(path: Option<PathBuf>) -> ContextFile {
        ContextFile { path }
    }

    /// The saved context; empty when there is no file yet.
    pub fn load(&self) -> Result<String, CliError> {
        let Some(path) = &self.path else { return Ok(String::new()) };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let context = text.trim();
                if context.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(CliError::Invalid(format!(
                        "{} does not hold a causal context (one line written by kvsctl); remove it to start afresh",
                        path.display()
                    )));
                }
                Ok(context.to_owned())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(CliError::Invalid(format!("cannot read the context file {}: {e}", path.display()))),
        }
    }

    /// Replaces the saved context with `context`.
    pub fn save(&self, context: &str) -> Result<(), CliError> {
        let Some(path) = &self.path else { return Ok(()) };
        let fail =
            |e: std::io::Error| CliError::Invalid(format!("cannot write the context file {}: {e}", path.display()));
        let mut beside = path.as_os_str().to_owned();
        beside.push(".tmp");
        let beside = PathBuf::from(beside);
        std::fs::write(&beside, format!("{context}\n")).map_err(fail)?;
        std::fs::rename(&beside, path).map_err(fail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_file_starts_empty_and_keeps_what_was_saved() {
        let dir = tempfile::tempdir().unwrap();
        let file = ContextFile::new(Some(dir.path().join("ctx")));
        assert_eq!(file.load().unwrap(), "");
        file.save("abc123").unwrap();
        assert_eq!(file.load().unwrap(), "abc123");
        std::fs::write(dir.path().join("ctx"), "not a context\n").unwrap();
        assert!(matches!(file.load(), Err(CliError::Invalid(_))));
    }

    fn session(args: &[&str]) -> Result<Session, CliError> {
        use clap::Parser;
        let cli = crate::args::Cli::try_parse_from(["kvsctl"].iter().chain(args).chain(&["status"]))
            .map_err(|e| CliError::Invalid(e.to_string()))?;
        Session::new(&cli.global)
    }

    fn refusal(args: &[&str]) -> String {
        match session(args) {
            Err(CliError::Invalid(why)) => why,
            Err(other) => panic!("{args:?}: {other}"),
            Ok(_) => panic!("{args:?} was accepted"),
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        crate::args::Cli::command().debug_assert();
    }

    #[test]
    fn endpoints_and_tls_settings_must_agree() {
        let plain = session(&["--endpoints", "http://a:1,b:2/"]).unwrap();
        assert_eq!(plain.endpoints, vec!["a:1".to_owned(), "b:2".to_owned()]);
        assert!(!plain.tls.is_tls());
        assert!(refusal(&["--endpoints", "https://a:1"]).contains("pass --cacert"));
        assert!(refusal(&["--endpoints", "ftp://a:1"]).contains("unknown scheme"));
        assert!(refusal(&["--cert", "c.pem", "--key", "k.pem"]).contains("--cert needs --cacert"));
        assert!(refusal(&["--cacert", "/nonexistent/ca.pem"]).contains("/nonexistent/ca.pem"));
        let half = refusal(&["--cacert", "ca.pem", "--cert", "c.pem"]);
        assert!(half.contains("--key"), "{half}");
    }
}
