//! The certificates of a cluster with `spec.tls.enabled` (pure: PEM in, PEM out, the time given).
//!
//! - **The cluster CA** (Secret `<cluster>-tls-ca`: `ca.crt`, `ca.key`): made once, valid
//!   [`CA_VALIDITY`], signs nothing but this cluster's pods and the operator's client certificates.
//!   Only the operator reads its key; users take `ca.crt` from it for `kvsctl --cacert`.
//! - **The pods' certificates** (Secret `<cluster>-tls`, mounted by every pod): `ca.crt`, and for
//!   each ordinal `<pod>.crt` and `<pod>.key`, a certificate for servers and clients (nodes call
//!   each other with it) naming the pod's DNS identities, the client Service's names and
//!   `localhost` (for `kubectl port-forward`). Pod IPs are not in it: they are not known before the
//!   pod starts, and every caller reaches pods by name (the operator, reaching them by IP, checks the
//!   chain only: [`kvs_api::ClientTls::accepting_any_name`]).
//!
//! [`plan_pod_certificates`] decides, from what the Secret holds, which certificates to issue: a
//! missing one (or its key), one the CA did not sign or whose key is not its own (all of them when
//! the CA is made again), one whose names are not the wanted ones, and one with less than
//! [`RENEW_BEFORE`] left. The rest are kept byte for byte, so an
//! unchanged Secret is not written. Nodes re-read their files every second, so a renewal takes
//! effect without a restart once the kubelet has updated the mounted Secret.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use std::collections::BTreeMap;
use std::net::IpAddr;
use time::{Duration, OffsetDateTime};

/// How long the cluster CA is valid. It is not rotated by the operator (see `docs/security.md`).
pub const CA_VALIDITY: Duration = Duration::days(3650);
/// How long a pod's certificate is valid.
pub const LEAF_VALIDITY: Duration = Duration::days(90);
/// A pod's certificate is renewed once less than this is left.
pub const RENEW_BEFORE: Duration = Duration::days(30);
/// How long the operator's own client certificate is valid (it makes a new one for each reconcile).
const OPERATOR_VALIDITY: Duration = Duration::days(1);
/// Certificates start this long before they are made, so clocks a little behind accept them.
const BACKDATE: Duration = Duration::minutes(5);

/// Keys of the Secrets.
pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";

/// The key of pod `pod`'s certificate and of its private key in the pods' Secret.
pub fn pod_keys(pod: &str) -> (String, String) {
    (format!("{pod}.crt"), format!("{pod}.key"))
}

/// A certificate and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Pair {
    /// Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair").field("cert", &self.cert).finish_non_exhaustive()
    }
}

/// Why a certificate or key the operator needs cannot be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("making a certificate: {0}")]
    Make(#[from] rcgen::Error),
    #[error(
        "the cluster CA in Secret {secret} cannot be used ({detail}); delete the Secret to have a new CA made (every pod's certificate is then issued again)"
    )]
    BadCa { secret: String, detail: String },
}

/// A new cluster CA for `cluster` (namespace/name in its subject).
pub fn new_ca(namespace: &str, cluster: &str, now: OffsetDateTime) -> Result<Pair, CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::OrganizationName, "kvstore");
    params.distinguished_name.push(DnType::CommonName, format!("kvstore CA {namespace}/{cluster}"));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_VALIDITY;
    let cert = params.self_signed(&key)?;
    Ok(Pair { cert: cert.pem(), key: key.serialize_pem() })
}

/// A CA that can sign: its certificate and key as stored.
pub struct Ca {
    pem: String,
    /// The CA certificate's DER, to check what it signed.
    der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// The CA stored in Secret `secret` (named in errors); its key must be its certificate's.
    pub fn load(pair: &Pair, secret: &str) -> Result<Ca, CertError> {
        let bad = |detail: String| CertError::BadCa { secret: secret.to_owned(), detail };
        let key = KeyPair::from_pem(&pair.key).map_err(|e| bad(format!("{CA_KEY_KEY}: {e}")))?;
        let der = der_of(&pair.cert).ok_or_else(|| bad(format!("{CA_CERT_KEY} is not a PEM certificate")))?;
        if !key_matches(&der, &key) {
            return Err(bad(format!("{CA_KEY_KEY} is not the key of {CA_CERT_KEY}")));
        }
        let issuer = Issuer::from_ca_cert_pem(&pair.cert, key).map_err(|e| bad(format!("{CA_CERT_KEY}: {e}")))?;
        Ok(Ca { pem: pair.cert.clone(), der, issuer })
    }

    /// Whether this CA signed the certificate `der`.
    fn signed(&self, der: &[u8]) -> bool {
        let (Ok((_, ca)), Ok((_, cert))) =
            (x509_parser::parse_x509_certificate(&self.der), x509_parser::parse_x509_certificate(der))
        else {
            return false;
        };
        cert.verify_signature(Some(ca.public_key())).is_ok()
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    fn issue(
        &self,
        names: &[String],
        common_name: &str,
        server: bool,
        now: OffsetDateTime,
        validity: Duration,
    ) -> Result<Pair, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name.push(DnType::OrganizationName, "kvstore");
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = if server {
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.not_before = now - BACKDATE;
        params.not_after = now + validity;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pair { cert: cert.pem(), key: key.serialize_pem() })
    }

    /// A client certificate for the operator itself (valid a day; made anew for each reconcile).
    pub fn operator_client(&self, now: OffsetDateTime) -> Result<Pair, CertError> {
        self.issue(&[], "kvs-operator", false, now, OPERATOR_VALIDITY)
    }
}

/// Every name pod `ordinal` answers to: its DNS identity in each short form, the client Service's
/// names, and `localhost`/`127.0.0.1`.
pub fn pod_names(cluster: &str, namespace: &str, headless: &str, ordinal: u32) -> Vec<String> {
    let pod = format!("{cluster}-{ordinal}.{headless}");
    let mut names = Vec::new();
    for base in [pod, cluster.to_owned()] {
        names.push(format!("{base}.{namespace}.svc.cluster.local"));
        names.push(format!("{base}.{namespace}.svc"));
        names.push(format!("{base}.{namespace}"));
        names.push(base);
    }
    names.push("localhost".into());
    names.push("127.0.0.1".into());
    names
}

/// Why a pod's certificate is (re)issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Issue {
    /// No certificate, or no key.
    Missing,
    /// The certificate does not parse, this CA did not sign it, or the key is not its key.
    Unusable,
    /// The wanted names differ from the certificate's.
    Names,
    /// Less than [`RENEW_BEFORE`] left.
    Expiring,
}

impl Issue {
    /// For an Event.
    pub fn describe(&self) -> &'static str {
        match self {
            Issue::Missing => "new",
            Issue::Unusable => "the stored one was not usable with this CA",
            Issue::Names => "its names changed",
            Issue::Expiring => "renewed before expiry",
        }
    }
}

/// The DER of the first certificate in `pem`.
fn der_of(pem: &str) -> Option<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    Some(pem.contents)
}

/// Whether `key` is the key of the certificate `der`.
fn key_matches(der: &[u8], key: &KeyPair) -> bool {
    x509_parser::parse_x509_certificate(der)
        .is_ok_and(|(_, cert)| cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}

/// What a stored certificate says: its names and when it ends.
struct Stored {
    names: Vec<String>,
    not_after: OffsetDateTime,
}

fn read(der: &[u8]) -> Option<Stored> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let not_after = OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp()).ok()?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => names.push((*dns).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => names.push(IpAddr::from(<[u8; 4]>::try_from(*bytes).ok()?).to_string()),
                    16 => names.push(IpAddr::from(<[u8; 16]>::try_from(*bytes).ok()?).to_string()),
                    _ => return None,
                },
                _ => {}
            }
        }
    }
    Some(Stored { names, not_after })
}

/// Whether the stored certificate and key (PEM) of a pod must be issued again for `names` at
/// `now`, by `ca`.
pub fn reissue(stored: Option<(&str, &str)>, ca: &Ca, names: &[String], now: OffsetDateTime) -> Option<Issue> {
    let Some((cert, key)) = stored else { return Some(Issue::Missing) };
    let usable =
        der_of(cert).filter(|der| ca.signed(der) && KeyPair::from_pem(key).is_ok_and(|key| key_matches(der, &key)));
    let Some(stored) = usable.as_deref().and_then(read) else { return Some(Issue::Unusable) };
    let (mut have, mut want) = (stored.names, names.to_vec());
    have.sort();
    want.sort();
    if have != want {
        return Some(Issue::Names);
    }
    (stored.not_after - now < RENEW_BEFORE).then_some(Issue::Expiring)
}

/// New contents for the pods' Secret, and what was issued in them.
pub struct PodCertificates {
    /// Every entry: kept certificates byte for byte, entries of pods no longer wanted dropped.
    pub contents: BTreeMap<String, String>,
    /// Pods whose certificate is new, and why (for the Event).
    pub issued: Vec<(String, Issue)>,
}

/// The pods' Secret contents for `pods` (name and wanted names each) of `cluster`, from what it
/// `held`: `None` when nothing the operator keeps there changes (entries someone else added are
/// neither kept nor compared: the operator's apply does not own them).
pub fn plan_pod_certificates(
    cluster: &str,
    held: &BTreeMap<String, String>,
    ca: &Ca,
    pods: &[(String, Vec<String>)],
    now: OffsetDateTime,
) -> Result<Option<PodCertificates>, CertError> {
    let mut next = BTreeMap::from([(CA_CERT_KEY.to_owned(), ca.cert_pem().to_owned())]);
    let mut issued = Vec::new();
    // A new CA: every certificate is issued again, whatever the old ones say.
    let same_ca = held.get(CA_CERT_KEY).is_some_and(|stored| stored == ca.cert_pem());
    for (pod, names) in pods {
        let (cert_key, key_key) = pod_keys(pod);
        let kept = held.get(&cert_key).zip(held.get(&key_key)).filter(|_| same_ca);
        match reissue(kept.map(|(c, k)| (c.as_str(), k.as_str())), ca, names, now) {
            None => {
                let (cert, key) = kept.expect("a kept certificate exists");
                next.insert(cert_key, cert.clone());
                next.insert(key_key, key.clone());
            }
            Some(why) => {
                let pair =
                    ca.issue(names, names.first().map_or(pod.as_str(), String::as_str), true, now, LEAF_VALIDITY)?;
                next.insert(cert_key, pair.cert);
                next.insert(key_key, pair.key);
                issued.push((pod.clone(), why));
            }
        }
    }
    let ours = |key: &String| {
        key == CA_CERT_KEY
            || (key.starts_with(&format!("{cluster}-")) && (key.ends_with(".crt") || key.ends_with(".key")))
    };
    let held_ours: BTreeMap<&String, &String> = held.iter().filter(|(k, _)| ours(k)).collect();
    let next_ours: BTreeMap<&String, &String> = next.iter().collect();
    Ok((next_ours != held_ours).then_some(PodCertificates { contents: next, issued }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(days: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap() + Duration::days(days)
    }

    fn pods(n: u32) -> Vec<(String, Vec<String>)> {
        (0..n).map(|o| (format!("demo-{o}"), pod_names("demo", "prod", "demo-nodes", o))).collect()
    }

    #[test]
    fn pods_get_certificates_once_and_again_only_when_due() {
        let ca_pair = new_ca("prod", "demo", at(0)).unwrap();
        let ca = Ca::load(&ca_pair, "demo-tls-ca").unwrap();
        let PodCertificates { contents: first, issued } =
            plan_pod_certificates("demo", &BTreeMap::new(), &ca, &pods(2), at(0)).unwrap().unwrap();
        assert_eq!(issued, vec![("demo-0".to_owned(), Issue::Missing), ("demo-1".to_owned(), Issue::Missing)]);
        assert_eq!(first.len(), 5, "ca.crt and a certificate and key per pod");
        let names = read(&der_of(&first["demo-0.crt"]).unwrap()).unwrap().names;
        assert!(names.contains(&"demo-0.demo-nodes.prod.svc.cluster.local".to_owned()), "{names:?}");
        assert!(names.contains(&"demo.prod.svc".to_owned()) && names.contains(&"127.0.0.1".to_owned()), "{names:?}");

        // Nothing due: nothing changes (the Secret is not written).
        assert!(plan_pod_certificates("demo", &first, &ca, &pods(2), at(59)).unwrap().is_none());
        // A third pod: only it is issued; the others are kept byte for byte.
        let PodCertificates { contents: grown, issued } =
            plan_pod_certificates("demo", &first, &ca, &pods(3), at(1)).unwrap().unwrap();
        assert_eq!(issued, vec![("demo-2".to_owned(), Issue::Missing)]);
        assert_eq!(grown["demo-0.crt"], first["demo-0.crt"]);
        // Back to two pods: the third's entries go.
        let PodCertificates { contents: shrunk, issued } =
            plan_pod_certificates("demo", &grown, &ca, &pods(2), at(1)).unwrap().unwrap();
        assert!(issued.is_empty() && shrunk == first);
        // Less than 30 days left: renewed; the new one is good for 90 days from then.
        let PodCertificates { contents: renewed, issued } =
            plan_pod_certificates("demo", &first, &ca, &pods(2), at(61)).unwrap().unwrap();
        assert_eq!(issued.iter().map(|(_, why)| why.clone()).collect::<Vec<_>>(), vec![Issue::Expiring; 2]);
        assert_ne!(renewed["demo-0.crt"], first["demo-0.crt"]);
        assert!(plan_pod_certificates("demo", &renewed, &ca, &pods(2), at(120)).unwrap().is_none());
        // Other names (the namespace, the cluster's name): issued again.
        let moved: Vec<_> =
            (0..2).map(|o| (format!("demo-{o}"), pod_names("demo", "staging", "demo-nodes", o))).collect();
        let issued = plan_pod_certificates("demo", &first, &ca, &moved, at(1)).unwrap().unwrap().issued;
        assert_eq!(issued[0].1, Issue::Names);
        // A new CA: everything issued again.
        let other = Ca::load(&new_ca("prod", "demo", at(1)).unwrap(), "demo-tls-ca").unwrap();
        let PodCertificates { contents: again, issued } =
            plan_pod_certificates("demo", &first, &other, &pods(2), at(1)).unwrap().unwrap();
        assert_eq!(issued[1].1, Issue::Missing, "the old ones are not kept");
        assert_eq!(again[CA_CERT_KEY], other.cert_pem());
        // The same CA certificate text beside a certificate another CA signed, or a key that is
        // not the certificate's: issued again.
        let mut forged = first.clone();
        forged.insert("demo-0.crt".into(), again["demo-0.crt"].clone());
        forged.insert("demo-1.key".into(), first["demo-0.key"].clone());
        let issued = plan_pod_certificates("demo", &forged, &ca, &pods(2), at(1)).unwrap().unwrap().issued;
        assert_eq!(issued, vec![("demo-0".to_owned(), Issue::Unusable), ("demo-1".to_owned(), Issue::Unusable)]);
        // Entries someone else added are not the operator's: not compared, not a reason to write.
        let mut added = first.clone();
        added.insert("notes.txt".into(), "hello".into());
        assert!(plan_pod_certificates("demo", &added, &ca, &pods(2), at(1)).unwrap().is_none());
    }

    #[test]
    fn keys_never_show_in_debug_output() {
        let pair = new_ca("prod", "demo", at(0)).unwrap();
        assert!(!format!("{pair:?}").contains("PRIVATE KEY"), "{pair:?}");
    }

    #[test]
    fn a_broken_ca_says_what_to_do() {
        let mut pair = new_ca("prod", "demo", at(0)).unwrap();
        pair.key = "not a key".into();
        let Err(e) = Ca::load(&pair, "demo-tls-ca") else { panic!("a broken CA loaded") };
        let e = e.to_string();
        assert!(e.contains("demo-tls-ca") && e.contains("delete the Secret"), "{e}");
        // A key of another CA beside the certificate.
        let mut pair = new_ca("prod", "demo", at(0)).unwrap();
        pair.key = new_ca("prod", "demo", at(0)).unwrap().key;
        let Err(e) = Ca::load(&pair, "demo-tls-ca") else { panic!("a mismatched CA loaded") };
        assert!(e.to_string().contains("is not the key of"), "{e}");
    }
}
