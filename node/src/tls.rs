//! TLS on the node's one port, for clients and peers alike (rustls with the ring provider: no
//! OpenSSL), and for the calls this node makes to its peers.
//!
//! Files (`--tls-cert-file`, `--tls-key-file`, `--tls-ca-file`, PEM): the node's certificate chain
//! and key, which it presents to clients and, as a client certificate, to peers; and the cluster
//! CA, which every peer's certificate must chain to.
//!
//! Invariants:
//! - With TLS on, every connection to the port is TLS. A client that speaks plain HTTP gets a
//!   plain-HTTP 400 saying so (`PLAINTEXT_REFUSED`), then the connection closes.
//! - Mutual TLS between nodes: a node calls peers presenting its certificate and verifies theirs
//!   against the CA (and the peer's address or name); a connection that opens the peer protocol,
//!   or calls the internal HTTP routes, without a client certificate from the CA is refused.
//! - Client certificates (`--tls-client-auth`): `none` asks clients for none (a presented one is
//!   still verified), `optional` the same but documents the intent, `require` refuses clients
//!   without one at the handshake. Any certificate presented that does not chain to the CA fails
//!   the handshake.
//! - The files are re-read when their contents change (a mounted Secret is replaced in place): new
//!   connections use the new certificate; open ones keep theirs. A set of files that does not load
//!   (a half-written rotation) leaves the last good one in force.

use crate::watched::Watched;
use anyhow::Context;
use kvs_api::tls::{pem_chain, pem_key, pem_roots};
use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Whether clients must present a certificate from the cluster CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum ClientAuth {
    /// Clients need none (peers always do).
    #[default]
    None,
    /// Clients may present one; if they do, it must chain to the CA.
    Optional,
    /// Every client must present one (refused at the handshake otherwise).
    Require,
}

/// Where the node's TLS material is.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub client_auth: ClientAuth,
}

/// What a connection came over; handlers of peer traffic need to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// Plain TCP (the node runs without TLS).
    Plain,
    /// TLS; `client_certificate`: the client presented one, and it chains to the cluster CA.
    Tls { client_certificate: bool },
}

impl Channel {
    /// Whether peer traffic may come over it: without TLS any connection may (the cluster token
    /// guards it), with TLS only one whose client proved a certificate from the cluster CA.
    pub fn admits_peers(self) -> bool {
        !matches!(self, Channel::Tls { client_certificate: false })
    }
}

/// The subject Common Name of the client certificate a connection presented (verified against the
/// cluster CA by the handshake); on every request of that connection, for the auth file's
/// `subject` entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSubject(pub Arc<str>);

/// The subject Common Name of a certificate (DER), if it has one that is text.
pub fn common_name(certificate: &[u8]) -> Option<Arc<str>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate).ok()?;
    let name = parsed.subject().iter_common_name().next()?.as_str().ok()?;
    Some(Arc::from(name))
}

/// Why a peer connection without a client certificate is refused (sent to the caller).
pub const PEER_NEEDS_CERTIFICATE: &str = "peer connections to this node need a client certificate from the cluster CA: start the calling node with --tls-cert-file, --tls-key-file and --tls-ca-file of this cluster";

/// The answer to a plain-HTTP request on a TLS port.
pub const PLAINTEXT_REFUSED: &str = "this node serves TLS only: use https:// and the cluster's CA certificate";

struct Loaded {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// The node's TLS configuration in force, for serving and for calling peers.
pub struct Tls {
    files: TlsFiles,
    loaded: Arc<Watched<Loaded>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads and checks the files; a node does not start with TLS material it cannot use.
    pub fn load(files: TlsFiles) -> anyhow::Result<Tls> {
        let paths = vec![files.cert.clone(), files.key.clone(), files.ca.clone()];
        let for_build = files.clone();
        let loaded = Watched::load("the TLS files", paths, move |contents| build(&for_build, contents))?;
        Ok(Tls { files, loaded: Arc::new(loaded) })
    }

    fn current(&self) -> Arc<Loaded> {
        self.loaded.current()
    }

    /// Accepts TLS connections with the certificate in force.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current().server.clone())
    }

    /// Connects to peers with the certificate in force as the client certificate.
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.current().client.clone())
    }

    /// The client side's configuration (for HTTP clients built on rustls).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current().client.clone()
    }

    pub fn client_auth(&self) -> ClientAuth {
        self.files.client_auth
    }

    /// Reads the files again and puts them in force if they changed and load (see
    /// [`crate::watched`]); returns whether a new certificate is in force.
    pub fn reload(&self) -> bool {
        self.loaded.reload()
    }

    /// Re-reads the files every `every`, for the process's life.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        self.loaded.clone().watch(every).await
    }
}

fn build(files: &TlsFiles, contents: &[Vec<u8>]) -> anyhow::Result<Loaded> {
    let [cert_pem, key_pem, ca_pem] = contents else { anyhow::bail!("three TLS files expected") };
    let certs = pem_chain(cert_pem, &files.cert.display().to_string())?;
    let key = pem_key(key_pem, &files.key.display().to_string())?;
    let roots = pem_roots(ca_pem, &files.ca.display().to_string())?;
    let roots = Arc::new(roots);
    let provider = kvs_api::tls::provider();

    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
    let verifier = match files.client_auth {
        ClientAuth::Require => verifier.build(),
        ClientAuth::None | ClientAuth::Optional => verifier.allow_unauthenticated().build(),
    }
    .context("building the client certificate verifier")?;
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), key.clone_key())
        .with_context(|| format!("{} and {} do not make a usable pair", files.cert.display(), files.key.display()))?;
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .context("using the certificate as a client certificate")?;
    Ok(Loaded { server: Arc::new(server), client: Arc::new(client) })
}

/// The name a peer's certificate must carry: the host part of its `host:port` address (an IP
/// address or a DNS name).
pub fn server_name(peer: &str) -> Result<ServerName<'static>, String> {
    let host = match peer.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => peer,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| format!("{host:?} cannot be checked against a certificate: {e}"))
}

/// A stream with one byte already read from it put back in front (TLS streams cannot be peeked:
/// the first byte tells a peer connection from HTTP only once it is read).
pub struct Rewound<S> {
    first: Option<u8>,
    inner: S,
}

impl<S> Rewound<S> {
    pub fn new(first: u8, inner: S) -> Self {
        Rewound { first: Some(first), inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewound<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(byte) = self.first
            && buf.remaining() > 0
        {
            buf.put_slice(&[byte]);
            self.first = None;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewound<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn peer_addresses_name_what_their_certificates_must_carry() {
        assert!(matches!(server_name("127.0.3.1:8080").unwrap(), ServerName::IpAddress(_)));
        assert!(matches!(server_name("[::1]:8080").unwrap(), ServerName::IpAddress(_)));
        assert!(matches!(server_name("demo-0.demo.ns.svc:8080").unwrap(), ServerName::DnsName(_)));
        assert!(server_name("bad name:8080").is_err());
    }

    #[tokio::test]
    async fn a_rewound_stream_reads_its_first_byte_first() {
        let mut s = Rewound::new(b'G', &b"ET /"[..]);
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "GET /");
    }
}
