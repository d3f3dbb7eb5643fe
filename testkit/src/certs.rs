//! Certificates for TLS tests: a certificate authority of the test's own ([`TestCa`]) that writes
//! PEM files into a directory of its own and issues certificates for servers and clients, each
//! file replaced in one step (a node re-reading its files never sees half of one).

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// A certificate authority, its files under `<parent>/<name>`.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
}

/// The files of one issued certificate: its PEM chain, its key, and the CA that signed it.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TestCa {
    /// A new self-signed CA named `name`, writing into `<parent>/<name with '-' for ' '>`.
    pub fn new(parent: &Path, name: &str) -> TestCa {
        let dir = parent.join(name.replace(' ', "-"));
        std::fs::create_dir_all(&dir).expect("the CA's directory");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("a key");
        TestCa { issuer: CertifiedIssuer::self_signed(params, key).expect("a self-signed CA"), dir }
    }

    /// A certificate for `names` (IP addresses or DNS names), good for servers and clients, and its
    /// key, written as `<stem>.pem` and `<stem>.key` with the CA as `ca.pem` beside them.
    pub fn issue(&self, stem: &str, names: &[String]) -> CertFiles {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::new(names.to_vec()).expect("certificate parameters");
        params.distinguished_name.push(DnType::CommonName, names.first().map_or(stem, String::as_str));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).expect("a signed certificate");
        let files = CertFiles {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
            ca: self.dir.join("ca.pem"),
        };
        replace(&files.cert, &cert.pem());
        replace(&files.key, &key.serialize_pem());
        replace(&files.ca, &self.issuer.pem());
        files
    }
}

/// Writes `text` to `path` in one step (written beside, then renamed).
pub fn replace(path: &Path, text: &str) {
    let beside = path.with_extension("tmp");
    std::fs::write(&beside, text).expect("a test file is written");
    std::fs::rename(&beside, path).expect("a test file is replaced");
}
