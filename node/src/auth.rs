//! Client authentication and authorization: which identity a request comes from (a bearer token
//! listed in the node's auth file, or the subject of a TLS client certificate it lists) and whether that identity's role lets it do what the request
//! asks. The HTTP layer (`http::guard`) asks [`decide`] before any handler runs and maps a
//! [`Denied`] to 401 or 403.
//!
//! The auth file (`--auth-file`, a mounted Secret on Kubernetes) is YAML (or JSON):
//!
//! ```yaml
//! tokens:
//!   - name: reporting        # shown in errors and logs instead of the token
//!     token: "…"             # at least 16 characters
//!     role: read             # read | write | admin
//!     prefixes: ["reports/"] # optional: the only keys it may touch
//!   - name: etl
//!     subject: etl-client    # instead of a token: a client certificate from the cluster CA
//!     role: write            #   whose subject Common Name is this
//! ```
//!
//! Roles nest: `write` may read, `admin` may write and use the admin routes (view changes, status,
//! backups). Key prefixes limit reads and writes of keys; they do not limit admin routes.
//!
//! Invariants:
//! - No auth file: every client route is open, as before (the HW4 start from the environment alone
//!   keeps working). Admin routes then need the cluster token when one is set, as before.
//! - With an auth file, every client route needs a known token; `/metrics`, `/healthz` and
//!   `/readyz` stay open (probes), and the internal routes keep needing the cluster token only.
//! - The cluster token may do everything, sent in its header or as the bearer token (the operator
//!   and `kvsctl --token-file` send it both ways); admin routes otherwise need a token whose role
//!   is `admin`.
//! - A request with an `Authorization` header is judged by its token alone; one without is judged
//!   by its client certificate's subject, when the connection presented one (verified against the
//!   cluster CA by the TLS handshake) and the file lists it.
//! - A token is compared in constant time with every listed token (the time does not depend on
//!   which one matches or where a wrong one differs), and never appears in a message or a log.
//! - [`decide`] and [`need_for`] are pure; reading and re-reading the file is [`Gate`]'s job.

use axum::http::Method;
use serde::Deserialize;
use std::path::Path;

/// Shortest token accepted in the auth file: shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// What an identity may do. Ordered: each role may do what the ones before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Write,
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        })
    }
}

/// One identity of the auth file, without its token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub name: String,
    pub role: Role,
    /// Keys it may read or write start with one of these; empty means every key.
    pub prefixes: Vec<String>,
}

impl Grant {
    fn covers(&self, key: &str) -> bool {
        self.prefixes.is_empty() || self.prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }
}

/// How an identity of the auth file proves itself.
#[derive(Clone, PartialEq, Eq)]
enum Credential {
    /// A bearer token.
    Token(Vec<u8>),
    /// A TLS client certificate's subject Common Name.
    Subject(String),
}

/// The parsed auth file.
pub struct Policy {
    entries: Vec<(Credential, Grant)>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names and roles only: tokens are never printed.
        f.debug_list().entries(self.entries.iter().map(|(_, g)| g)).finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    name: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    role: Role,
    #[serde(default)]
    prefixes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tokens: Vec<FileEntry>,
}

/// Why an auth file was refused; says what to fix, never a token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error(
        "not an auth file: {0}; expected `tokens:` with entries of `name`, `token` (or a client certificate's `subject`), `role` (read, write or admin) and optional `prefixes`"
    )]
    Syntax(String),
    #[error("the auth file lists no tokens; list at least one, or run without --auth-file")]
    Empty,
    #[error("token entry {0} has an empty name")]
    EmptyName(usize),
    #[error("two token entries are named {0:?}; names must be unique")]
    DuplicateName(String),
    #[error("the token of {name:?} is {len} characters; use at least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 24`)")]
    ShortToken { name: String, len: usize },
    #[error("the token of {name:?} contains whitespace or control characters, which no Authorization header can carry")]
    UnsendableToken { name: String },
    #[error("{0:?} and {1:?} have the same token; give every identity its own")]
    SharedToken(String, String),
    #[error("{0:?} lists an empty prefix; omit `prefixes` to allow every key")]
    EmptyPrefix(String),
    #[error("give {0:?} either a `token` or a client certificate's `subject`, not both and not neither")]
    Credential(String),
    #[error("{0:?} and {1:?} name the same certificate subject; give every identity its own")]
    SharedSubject(String, String),
}

impl Policy {
    /// Parses and checks an auth file's text.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let file: File = serde_yaml::from_str(text).map_err(|e| PolicyError::Syntax(e.to_string()))?;
        if file.tokens.is_empty() {
            return Err(PolicyError::Empty);
        }
        let mut entries: Vec<(Credential, Grant)> = Vec::with_capacity(file.tokens.len());
        for (i, e) in file.tokens.into_iter().enumerate() {
            let name = e.name.trim().to_owned();
            if name.is_empty() {
                return Err(PolicyError::EmptyName(i + 1));
            }
            if entries.iter().any(|(_, g)| g.name == name) {
                return Err(PolicyError::DuplicateName(name));
            }
            let credential = match (e.token, e.subject) {
                (Some(token), None) => {
                    let len = token.chars().count();
                    if len < MIN_TOKEN_LEN {
                        return Err(PolicyError::ShortToken { name, len });
                    }
                    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        return Err(PolicyError::UnsendableToken { name });
                    }
                    let token = Credential::Token(token.into_bytes());
                    if let Some((_, other)) = entries.iter().find(|(c, _)| *c == token) {
                        return Err(PolicyError::SharedToken(other.name.clone(), name));
                    }
                    token
                }
                (None, Some(subject)) if !subject.trim().is_empty() => {
                    let subject = Credential::Subject(subject.trim().to_owned());
                    if let Some((_, other)) = entries.iter().find(|(c, _)| *c == subject) {
                        return Err(PolicyError::SharedSubject(other.name.clone(), name));
                    }
                    subject
                }
                _ => return Err(PolicyError::Credential(name)),
            };
            if e.prefixes.iter().any(String::is_empty) {
                return Err(PolicyError::EmptyPrefix(name));
            }
            entries.push((credential, Grant { name, role: e.role, prefixes: e.prefixes }));
        }
        Ok(Policy { entries })
    }

    /// The identity `token` belongs to. Compares with every entry, whatever matches, in time that
    /// does not depend on the tokens' contents.
    pub fn authenticate(&self, token: &[u8]) -> Option<&Grant> {
        let mut found = None;
        for (credential, grant) in &self.entries {
            if let Credential::Token(known) = credential
                && crate::http::constant_time_eq(known, token)
            {
                found = Some(grant);
            }
        }
        found
    }

    /// The identity whose client certificate has subject Common Name `subject` (not a secret: the
    /// TLS handshake proved the certificate).
    pub fn authenticate_subject(&self, subject: &str) -> Option<&Grant> {
        self.entries.iter().find(|(c, _)| matches!(c, Credential::Subject(s) if s == subject)).map(|(_, g)| g)
    }

    pub fn grants(&self) -> impl Iterator<Item = &Grant> {
        self.entries.iter().map(|(_, g)| g)
    }
}

/// What a request asks for, from its method and path alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// Probes and metrics; also routes that do not exist (they answer 404 whoever asks).
    Open,
    /// Node-to-node routes: the cluster token, checked by their handler.
    Internal,
    /// Reading: a key, or which partition holds what (`key` is `None`).
    Read { key: Option<String> },
    /// Writing or deleting a key.
    Write { key: String },
    /// View changes, status, usage, backups and restores.
    Admin,
}

/// What a request to `path` with `method` needs. Keys are percent-decoded as the handlers decode
/// them, so a prefix check sees the key the handler will use.
pub fn need_for(method: &Method, path: &str) -> Need {
    let key = |raw: &str| percent_encoding::percent_decode_str(raw).decode_utf8_lossy().into_owned();
    let reads = matches!(*method, Method::GET | Method::HEAD);
    match path {
        "/metrics" | "/healthz" | "/readyz" => Need::Open,
        "/v1/cluster-map"
        | "/kv-store/get_partition_id"
        | "/kv-store/get_all_partition_ids"
        | "/kv-store/get_partition_members" => Need::Read { key: None },
        p if p.starts_with("/internal/") => Need::Internal,
        p if is_admin_path(p) => Need::Admin,
        p => match p.strip_prefix("/v1/kv/").or_else(|| p.strip_prefix("/kv-store/")) {
            Some(raw) if reads => Need::Read { key: Some(key(raw)) },
            Some(raw) => Need::Write { key: key(raw) },
            None => Need::Open,
        },
    }
}

/// Whether `path` is one of the admin routes (view changes, status, usage, backups, restores).
pub fn is_admin_path(path: &str) -> bool {
    path.starts_with("/v1/admin/") || path == "/v1/admin" || path == "/kv-store/update_view"
}

/// How the request's cluster token compares with this node's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterToken {
    /// The node has none.
    NotSet,
    /// The request carries the node's token (in its header, or as the bearer token).
    Matches,
    /// The node has one; the request carries none.
    Missing,
    /// The node has one; the request carries another.
    Wrong,
}

/// Why a request may not go on. 401s for missing or unknown credentials, 403s for a known
/// identity asking for more than its role allows.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Denied {
    #[error(
        "this node requires authentication: send `Authorization: Bearer <token>` with a token from the node's auth file, or present a client certificate whose subject it lists"
    )]
    NoCredentials,
    #[error("the Authorization header must be `Bearer <token>`")]
    Malformed,
    #[error("the bearer token is not one of this node's tokens (its auth file lists them)")]
    UnknownToken,
    #[error("{name:?} has role {role} and may not {what}: that needs role {needed}")]
    Role { name: String, role: Role, needed: Role, what: String },
    #[error("{name:?} may only read and write keys starting with {prefixes:?}, not {key:?}")]
    Prefix { name: String, prefixes: Vec<String>, key: String },
    #[error("the {header} header does not match this cluster's token")]
    WrongClusterToken { header: &'static str },
    #[error("this route needs the cluster token in the {header} header")]
    NoClusterToken { header: &'static str },
    #[error(
        "this route needs an admin token (`Authorization: Bearer <token>` of an identity with role admin) or the cluster token in the {header} header"
    )]
    NoAdminCredentials { header: &'static str },
}

impl Denied {
    /// Whether the client lacks valid credentials (401) rather than permission (403).
    pub fn is_unauthenticated(&self) -> bool {
        !matches!(self, Denied::Role { .. } | Denied::Prefix { .. })
    }
}

/// Whether a request that needs `need`, carrying `authorization` (the raw header, if any), a
/// client certificate with subject Common Name `subject` (if its connection presented one) and a
/// cluster token that compares as `cluster`, may go on. `policy` is the auth file, if the node has
/// one. Returns the identity's name when a token or certificate identified one.
pub fn decide(
    policy: Option<&Policy>,
    authorization: Option<&[u8]>,
    subject: Option<&str>,
    cluster: ClusterToken,
    need: &Need,
) -> Result<Option<String>, Denied> {
    const HEADER: &str = kvs_api::HEADER_CLUSTER_TOKEN;
    if cluster == ClusterToken::Matches && !matches!(need, Need::Internal) {
        return Ok(None);
    }
    // A header decides alone; without one, a listed certificate subject identifies the client.
    let certified = match (policy, authorization, subject) {
        (Some(policy), None, Some(subject)) => policy.authenticate_subject(subject),
        _ => None,
    };
    let credentials = authorization.is_some() || certified.is_some();
    let required = match need {
        Need::Open | Need::Internal => return Ok(None),
        Need::Admin => match (policy, cluster) {
            (None, ClusterToken::NotSet) => return Ok(None),
            (None, ClusterToken::Wrong) => return Err(Denied::WrongClusterToken { header: HEADER }),
            (None, _) => return Err(Denied::NoClusterToken { header: HEADER }),
            (Some(_), ClusterToken::Wrong) if !credentials => {
                return Err(Denied::WrongClusterToken { header: HEADER });
            }
            (Some(_), _) if !credentials => return Err(Denied::NoAdminCredentials { header: HEADER }),
            (Some(_), _) => Role::Admin,
        },
        Need::Read { .. } => Role::Read,
        Need::Write { .. } => Role::Write,
    };
    let Some(policy) = policy else { return Ok(None) };
    let grant = match (authorization, certified) {
        (Some(header), _) => {
            let token = bearer(header).ok_or(Denied::Malformed)?;
            policy.authenticate(token).ok_or(Denied::UnknownToken)?
        }
        (None, Some(grant)) => grant,
        (None, None) => return Err(Denied::NoCredentials),
    };
    if grant.role < required {
        let what = match need {
            Need::Read { key: Some(k) } => format!("read key {k:?}"),
            Need::Read { key: None } => "read the cluster's layout".to_owned(),
            Need::Write { key } => format!("write key {key:?}"),
            _ => "use the admin routes".to_owned(),
        };
        return Err(Denied::Role { name: grant.name.clone(), role: grant.role, needed: required, what });
    }
    let key = match need {
        Need::Read { key: Some(k) } | Need::Write { key: k } => Some(k),
        _ => None,
    };
    if let Some(key) = key
        && !grant.covers(key)
    {
        return Err(Denied::Prefix { name: grant.name.clone(), prefixes: grant.prefixes.clone(), key: key.clone() });
    }
    Ok(Some(grant.name.clone()))
}

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case, as RFC 9110
/// says), or `None` for any other form.
pub fn bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// The auth file in force, re-read when it changes (a mounted Secret is replaced in place): a
/// broken change keeps the tokens in force ([`crate::watched`]).
pub type Gate = crate::watched::Watched<Policy>;

/// The auth file at `path`; a node does not start with one it cannot use.
pub fn load(path: &Path) -> anyhow::Result<Gate> {
    let shown = path.display().to_string();
    Gate::load("the auth file", vec![path.to_owned()], move |contents| {
        parse_bytes(&contents[0]).map_err(|e| anyhow::anyhow!("the auth file {shown}: {e}"))
    })
}

fn parse_bytes(text: &[u8]) -> Result<Policy, PolicyError> {
    let text = std::str::from_utf8(text).map_err(|e| PolicyError::Syntax(format!("not UTF-8: {e}")))?;
    Policy::parse(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "tokens:
  - name: reader
    token: read-token-0123456789
    role: read
  - name: writer
    token: write-token-0123456789
    role: write
    prefixes: [\"app/\", \"tmp/\"]
  - name: ops
    token: admin-token-0123456789
    role: admin
";

    fn policy() -> Policy {
        Policy::parse(FILE).unwrap()
    }

    fn read(key: &str) -> Need {
        Need::Read { key: Some(key.to_owned()) }
    }

    fn write(key: &str) -> Need {
        Need::Write { key: key.to_owned() }
    }

    fn with(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    #[test]
    fn certificate_subjects_identify_clients_that_send_no_token() {
        let file = format!(
            "{FILE}  - name: etl\n    subject: etl-client\n    role: write\n  - name: watcher\n    subject: watch\n    role: read\n"
        );
        let p = Policy::parse(&file).unwrap();
        let d = |auth: Option<&[u8]>, subject: Option<&str>, need: Need| {
            decide(Some(&p), auth, subject, ClusterToken::NotSet, &need)
        };
        assert_eq!(d(None, Some("etl-client"), write("k")), Ok(Some("etl".to_owned())));
        let denied = d(None, Some("watch"), write("k")).unwrap_err();
        assert!(denied.to_string().contains("\"watcher\" has role read"), "{denied}");
        assert!(!denied.is_unauthenticated(), "a listed subject beyond its role: 403");
        assert_eq!(d(None, Some("stranger"), read("k")), Err(Denied::NoCredentials), "an unlisted subject: 401");
        assert_eq!(
            d(None, Some("etl-client"), Need::Admin),
            Err(Denied::Role {
                name: "etl".into(),
                role: Role::Write,
                needed: Role::Admin,
                what: "use the admin routes".into(),
            })
        );
        // A header decides alone: a wrong token is not rescued by a good certificate.
        assert_eq!(d(Some(&with("nope-nope-nope-nope")), Some("etl-client"), read("k")), Err(Denied::UnknownToken));
        assert_eq!(
            d(Some(&with("read-token-0123456789")), Some("etl-client"), write("k")).unwrap_err().to_string(),
            "\"reader\" has role read and may not write key \"k\": that needs role write"
        );
        // Tokens never match subjects, nor subjects tokens.
        assert!(p.authenticate(b"etl-client").is_none());
        assert!(p.authenticate_subject("read-token-0123456789").is_none());
        // Each entry has a token or a subject, never both or neither; subjects are unique.
        let both = "tokens:\n  - {name: x, token: 0123456789abcdef, subject: x, role: read}\n";
        assert_eq!(Policy::parse(both).unwrap_err(), PolicyError::Credential("x".into()));
        let neither = "tokens:\n  - {name: x, role: read}\n";
        assert_eq!(Policy::parse(neither).unwrap_err(), PolicyError::Credential("x".into()));
        let twice = "tokens:\n  - {name: x, subject: s, role: read}\n  - {name: y, subject: s, role: write}\n";
        assert_eq!(Policy::parse(twice).unwrap_err(), PolicyError::SharedSubject("x".into(), "y".into()));
    }

    #[test]
    fn routes_need_what_they_do() {
        assert_eq!(need_for(&Method::GET, "/v1/kv/a%2Fb"), read("a/b"));
        assert_eq!(need_for(&Method::HEAD, "/kv-store/x"), read("x"));
        assert_eq!(need_for(&Method::PUT, "/v1/kv/x"), write("x"));
        assert_eq!(need_for(&Method::DELETE, "/kv-store/x"), write("x"));
        assert_eq!(need_for(&Method::PUT, "/kv-store/update_view"), Need::Admin);
        assert_eq!(need_for(&Method::GET, "/v1/admin/status"), Need::Admin);
        assert_eq!(need_for(&Method::POST, "/v1/admin/backup/hold"), Need::Admin);
        assert_eq!(need_for(&Method::GET, "/kv-store/get_partition_id"), Need::Read { key: None });
        assert_eq!(need_for(&Method::GET, "/v1/cluster-map"), Need::Read { key: None });
        assert_eq!(need_for(&Method::POST, "/internal/v1/rpc"), Need::Internal);
        for open in ["/metrics", "/healthz", "/readyz", "/nothing/here"] {
            assert_eq!(need_for(&Method::GET, open), Need::Open, "{open}");
        }
    }

    #[test]
    fn without_an_auth_file_everything_stays_as_before() {
        for need in [read("k"), write("k"), Need::Read { key: None }, Need::Open] {
            assert_eq!(decide(None, None, None, ClusterToken::NotSet, &need), Ok(None));
        }
        assert_eq!(decide(None, None, None, ClusterToken::NotSet, &Need::Admin), Ok(None));
        assert_eq!(decide(None, None, None, ClusterToken::Matches, &Need::Admin), Ok(None));
        assert!(matches!(
            decide(None, None, None, ClusterToken::Missing, &Need::Admin),
            Err(Denied::NoClusterToken { .. })
        ));
        assert!(matches!(
            decide(None, None, None, ClusterToken::Wrong, &Need::Admin),
            Err(Denied::WrongClusterToken { .. })
        ));
    }

    #[test]
    fn roles_nest_and_prefixes_limit_keys() {
        let p = policy();
        let d = |token: &str, need: Need| decide(Some(&p), Some(&with(token)), None, ClusterToken::NotSet, &need);
        assert_eq!(d("read-token-0123456789", read("any")), Ok(Some("reader".to_owned())));
        let e = d("read-token-0123456789", write("any")).unwrap_err();
        assert!(!e.is_unauthenticated());
        assert_eq!(e.to_string(), "\"reader\" has role read and may not write key \"any\": that needs role write");
        assert_eq!(d("write-token-0123456789", write("app/1")), Ok(Some("writer".to_owned())));
        assert_eq!(d("write-token-0123456789", read("tmp/x")), Ok(Some("writer".to_owned())));
        let e = d("write-token-0123456789", read("other")).unwrap_err();
        assert!(matches!(e, Denied::Prefix { .. }) && !e.is_unauthenticated(), "{e}");
        assert_eq!(d("write-token-0123456789", Need::Read { key: None }), Ok(Some("writer".to_owned())));
        assert!(matches!(d("write-token-0123456789", Need::Admin), Err(Denied::Role { needed: Role::Admin, .. })));
        assert_eq!(d("admin-token-0123456789", Need::Admin), Ok(Some("ops".to_owned())));
        assert_eq!(d("admin-token-0123456789", write("x")), Ok(Some("ops".to_owned())));
        assert_eq!(d("admin-token-0123456789", Need::Open), Ok(None));
    }

    #[test]
    fn missing_malformed_and_unknown_credentials_are_401s() {
        let p = policy();
        let d = |auth: Option<&[u8]>| decide(Some(&p), auth, None, ClusterToken::NotSet, &read("k"));
        assert_eq!(d(None), Err(Denied::NoCredentials));
        assert_eq!(d(Some(b"Basic dXNlcjpwYXNz")), Err(Denied::Malformed));
        assert_eq!(d(Some(b"Bearer ")), Err(Denied::Malformed));
        assert_eq!(d(Some(b"Bearer read-token-012345678")), Err(Denied::UnknownToken));
        assert_eq!(d(Some(b"bearer  read-token-0123456789 ")), Ok(Some("reader".to_owned())));
        for denied in [Denied::NoCredentials, Denied::Malformed, Denied::UnknownToken] {
            assert!(denied.is_unauthenticated());
            assert!(!denied.to_string().contains("read-token"), "no token in {denied}");
        }
    }

    #[test]
    fn admin_routes_take_the_cluster_token_or_an_admin_token() {
        let p = policy();
        let admin = |auth: Option<&[u8]>, cluster| decide(Some(&p), auth, None, cluster, &Need::Admin);
        assert_eq!(admin(None, ClusterToken::Matches), Ok(None));
        assert_eq!(
            decide(Some(&p), None, None, ClusterToken::Matches, &write("k")),
            Ok(None),
            "the cluster token may write"
        );
        assert_eq!(admin(Some(&with("admin-token-0123456789")), ClusterToken::Missing), Ok(Some("ops".to_owned())));
        assert_eq!(admin(Some(&with("admin-token-0123456789")), ClusterToken::NotSet), Ok(Some("ops".to_owned())));
        assert!(matches!(admin(None, ClusterToken::NotSet), Err(Denied::NoAdminCredentials { .. })));
        assert!(matches!(admin(None, ClusterToken::Missing), Err(Denied::NoAdminCredentials { .. })));
        assert!(matches!(admin(None, ClusterToken::Wrong), Err(Denied::WrongClusterToken { .. })));
        assert!(matches!(
            admin(Some(&with("read-token-0123456789")), ClusterToken::Missing),
            Err(Denied::Role { needed: Role::Admin, .. })
        ));
    }

    #[test]
    fn auth_files_that_cannot_work_are_refused_with_what_to_fix() {
        let entry = |name: &str, token: &str| format!("  - name: {name}\n    token: \"{token}\"\n    role: read\n");
        let file = |entries: &[String]| format!("tokens:\n{}", entries.concat());
        let good = "0123456789abcdef";
        assert_eq!(Policy::parse("tokens: []").unwrap_err(), PolicyError::Empty);
        assert!(matches!(Policy::parse("users: []").unwrap_err(), PolicyError::Syntax(_)));
        assert!(matches!(
            Policy::parse("tokens:\n  - name: a\n    token: 0123456789abcdef\n    role: root\n").unwrap_err(),
            PolicyError::Syntax(m) if m.contains("root")
        ));
        assert_eq!(
            Policy::parse(&file(&[entry("a", "short")])).unwrap_err(),
            PolicyError::ShortToken { name: "a".into(), len: 5 }
        );
        assert_eq!(
            Policy::parse(&file(&[entry("a", "0123456789 abcdef")])).unwrap_err(),
            PolicyError::UnsendableToken { name: "a".into() }
        );
        assert_eq!(
            Policy::parse(&file(&[entry("a", good), entry("a", "fedcba9876543210")])).unwrap_err(),
            PolicyError::DuplicateName("a".into())
        );
        assert_eq!(
            Policy::parse(&file(&[entry("a", good), entry("b", good)])).unwrap_err(),
            PolicyError::SharedToken("a".into(), "b".into())
        );
        let e = Policy::parse(&file(&[entry("a", "short")])).unwrap_err().to_string();
        assert!(!e.contains("short\""), "the token is not repeated: {e}");
        // JSON is YAML too.
        let json = r#"{"tokens":[{"name":"a","token":"0123456789abcdef","role":"write"}]}"#;
        assert_eq!(Policy::parse(json).unwrap().grants().next().unwrap().role, Role::Write);
    }

    #[test]
    fn a_changed_file_is_put_in_force_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.yaml");
        std::fs::write(&path, FILE).unwrap();
        let gate = load(&path).unwrap();
        let token = b"new-token-0123456789";
        assert!(gate.current().authenticate(token).is_none());
        std::fs::write(&path, "tokens:\n  - name: new\n    token: new-token-0123456789\n    role: read\n").unwrap();
        gate.reload();
        assert_eq!(gate.current().authenticate(token).unwrap().name, "new");
        std::fs::write(&path, "tokens: [").unwrap();
        gate.reload();
        assert_eq!(gate.current().authenticate(token).unwrap().name, "new", "the last good file stays in force");
        std::fs::remove_file(&path).unwrap();
        gate.reload();
        assert_eq!(gate.current().authenticate(token).unwrap().name, "new");
        assert!(load(&path).is_err(), "no start without a usable file");
    }
}
