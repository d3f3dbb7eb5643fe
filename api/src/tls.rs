//! How a client reaches nodes: plain HTTP, or TLS trusting the cluster's CA and optionally
//! presenting a client certificate ([`ClientTls`]); and the one place every HTTP client of the
//! workspace is built ([`ClientTls::http_client`], [`http_client`]).
//!
//! Why one place: reqwest's TLS runs on rustls *without* a built-in crypto provider
//! (`rustls-no-provider`). The workspace builds rustls with `ring` (kube and the node use it);
//! reqwest's own choice would add aws-lc-rs, and with two providers compiled in rustls no longer
//! picks a process default, which kube relies on. So every client gets a rustls configuration on
//! `ring` made here; a reqwest client built any other way panics when built (reqwest finds no
//! provider), which the tests would show at once.
//!
//! Invariants: a plain [`ClientTls`] speaks `http://` and trusts no certificate at all (an
//! `https://` URL fails verification rather than trusting the system's roots); a TLS one speaks
//! `https://` and trusts exactly the given CA bundle. Server names are checked unless
//! [`ClientTls::accepting_any_name`] says otherwise (for callers that reach nodes by pod IP while
//! their certificates name DNS identities: the chain to the cluster's private CA is still checked).

use reqwest::ClientBuilder;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::Path;
use std::sync::Arc;

/// The URL scheme a client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    /// `<scheme>://<authority><path>`.
    pub fn url(self, authority: &str, path: &str) -> String {
        match self {
            Scheme::Http => format!("http://{authority}{path}"),
            Scheme::Https => format!("https://{authority}{path}"),
        }
    }
}

/// A TLS file or PEM text that cannot be used, saying which and why.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{origin} is not PEM {expected}: {detail}")]
    Pem { origin: String, expected: &'static str, detail: String },
    #[error("{origin} holds no {expected}")]
    Empty { origin: String, expected: &'static str },
    #[error("{origin}: {detail}")]
    Unusable { origin: String, detail: String },
    #[error("a client certificate needs its key, and a key its certificate: give both or neither")]
    HalfIdentity,
}

/// Parses a PEM certificate chain (at least one `CERTIFICATE` block); `origin` names it in errors.
pub fn pem_chain(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem { origin: origin.to_owned(), expected: "certificates", detail: e.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::Empty { origin: origin.to_owned(), expected: "certificate (PEM `CERTIFICATE` blocks)" });
    }
    Ok(chain)
}

/// Parses a PEM private key (PKCS#8, PKCS#1 or SEC1); `origin` names it in errors.
pub fn pem_key(pem: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem {
        origin: origin.to_owned(),
        expected: "private key (PKCS#8, PKCS#1 or SEC1)",
        detail: e.to_string(),
    })
}

/// Parses a PEM CA bundle into a root store (at least one usable CA); `origin` names it in errors.
pub fn pem_roots(pem: &[u8], origin: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in pem_chain(pem, origin)? {
        roots.add(ca).map_err(|e| TlsError::Unusable {
            origin: origin.to_owned(),
            detail: format!("holds a certificate that is not a usable CA: {e}"),
        })?;
    }
    Ok(roots)
}

/// Reads a file for the TLS settings, naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

/// The crypto provider of every TLS configuration in the workspace.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How a client reaches nodes. Cheap to clone.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// `None`: plain HTTP.
    settings: Option<Arc<Settings>>,
}

/// What a TLS client trusts and presents; its rustls configuration is built (and so checked) once.
struct Settings {
    roots: Arc<RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    config: ClientConfig,
}

impl std::fmt::Debug for ClientTls {
    /// Never the key: only whether this is TLS and presents a certificate.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.settings {
            None => f.write_str("ClientTls::Plain"),
            Some(s) => write!(f, "ClientTls::Tls {{ client_certificate: {} }}", s.identity.is_some()),
        }
    }
}

impl ClientTls {
    /// Plain HTTP (nodes started without `--tls-*`).
    pub fn plain() -> Self {
        ClientTls { settings: None }
    }

    /// TLS trusting the CA bundle `ca_pem`, presenting `identity` (certificate chain and key, PEM)
    /// when given: nodes with `--tls-client-auth require` need one.
    pub fn from_pem(ca_pem: &[u8], identity: Option<(&[u8], &[u8])>) -> Result<Self, TlsError> {
        let roots = pem_roots(ca_pem, "the CA bundle")?;
        let identity = match identity {
            Some((cert, key)) => Some((pem_chain(cert, "the client certificate")?, pem_key(key, "the client key")?)),
            None => None,
        };
        Self::build(roots, identity, true)
    }

    /// [`ClientTls::from_pem`] from files: `ca` (`--cacert`), and `cert` and `key` (`--cert`,
    /// `--key`), both or neither. Errors name the file.
    pub fn from_files(ca: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<Self, TlsError> {
        let roots = pem_roots(&read_file(ca)?, &ca.display().to_string())?;
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((
                pem_chain(&read_file(cert)?, &cert.display().to_string())?,
                pem_key(&read_file(key)?, &key.display().to_string())?,
            )),
            (None, None) => None,
            _ => return Err(TlsError::HalfIdentity),
        };
        Self::build(roots, identity, true)
    }

    /// The same trust, but a server's certificate need not name the address connected to: its
    /// chain to the CA and its signatures are still verified. For the operator, which reaches pods
    /// by IP while their certificates name their DNS identities; sound only with a CA that signs
    /// nothing but the cluster's own members (the operator's per-cluster CA).
    pub fn accepting_any_name(self) -> Self {
        let Some(settings) = self.settings else { return self };
        let identity = settings.identity.as_ref().map(|(chain, key)| (chain.clone(), key.clone_key()));
        Self::build_with(settings.roots.clone(), identity, false).expect("the same settings built before")
    }

    fn build(
        roots: RootCertStore,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
        check_names: bool,
    ) -> Result<Self, TlsError> {
        Self::build_with(Arc::new(roots), identity, check_names)
    }

    fn build_with(
        roots: Arc<RootCertStore>,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
        check_names: bool,
    ) -> Result<Self, TlsError> {
        let unusable = |detail: String| TlsError::Unusable { origin: "the client TLS settings".into(), detail };
        let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| unusable(e.to_string()))?;
        let verifier: Arc<dyn ServerCertVerifier> = if check_names { verifier } else { Arc::new(AnyName(verifier)) };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| unusable(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match &identity {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|e| unusable(format!("the client certificate and key are not a usable pair: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        Ok(ClientTls { settings: Some(Arc::new(Settings { roots, identity, config })) })
    }

    /// Whether this is TLS.
    pub fn is_tls(&self) -> bool {
        self.settings.is_some()
    }

    /// The scheme of this client's URLs.
    pub fn scheme(&self) -> Scheme {
        if self.is_tls() { Scheme::Https } else { Scheme::Http }
    }

    /// `<scheme>://<node><path>` for this client.
    pub fn url(&self, node: &str, path: &str) -> String {
        self.scheme().url(node, path)
    }

    /// A reqwest client builder with this TLS configuration (plain: one that trusts nothing).
    pub fn http_client(&self) -> ClientBuilder {
        let config = match &self.settings {
            Some(settings) => settings.config.clone(),
            None => ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth(),
        };
        reqwest::Client::builder().tls_backend_preconfigured(config)
    }
}

/// A reqwest client builder for plain HTTP: what every HTTP client that does not talk to a TLS
/// cluster starts from (see the module docs for why not `reqwest::Client::builder()`).
pub fn http_client() -> ClientBuilder {
    ClientTls::plain().http_client()
}

/// A server verifier that checks the chain and signatures but not the name (see
/// [`ClientTls::accepting_any_name`]).
#[derive(Debug)]
struct AnyName(Arc<dyn ServerCertVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
