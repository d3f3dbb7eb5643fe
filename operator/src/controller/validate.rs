//! Spec validation (pure): a `KVStoreCluster` in, everything the later steps need out. The schema
//! already enforces `replicas >= 1` and `replicationFactor >= 1`; this adds what a schema cannot
//! say, and turns "fewer replicas than the replication factor" into a degraded-but-running state
//! rather than an error, as the node itself does.
//!
//! The results ([`Validated`], [`ValidCluster`]) are self-contained: `build` and the local mode
//! read only them, never the raw spec again, so nothing unchecked reaches a child object. The part
//! the rebalance core needs is its kube-free [`Target`].

use crate::crd::{KVStoreCluster, KVStoreClusterSpec};
use crate::rebalance::{Policy, Target};
use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;
use std::time::Duration;

/// A spec the operator can act on.
#[derive(Clone, Debug, PartialEq)]
pub struct Validated {
    /// Nodes and replicas per partition (both at least 1). Fewer nodes than replicas per partition
    /// is valid but degraded ([`Target::degraded`]).
    pub target: Target,
    /// The node container image (not blank).
    pub image: String,
    pub image_pull_policy: Option<String>,
    pub resources: Option<ResourceRequirements>,
    pub node_selector: Option<BTreeMap<String, String>>,
    pub tolerations: Option<Vec<Toleration>>,
    /// Scheduling constraints; `None` means the default spread over machines.
    pub affinity: Option<Affinity>,
    /// Each node's volume size, a Kubernetes quantity.
    pub storage_size: String,
    pub storage_class_name: Option<String>,
    pub max_value_bytes: Option<i64>,
    /// Paused, member replacement on or off, and its deadline.
    pub policy: Policy,
    /// How long the cluster may wait on the same thing before it is `Stalled`.
    pub progress_deadline: Duration,
    /// How long a node pod drains after SIGTERM before it stops (`spec.shutdownDelaySeconds`).
    pub shutdown_delay: Duration,
    /// TLS on (`spec.tls.enabled`).
    pub tls: bool,
    /// Where the nodes' auth file is (`spec.auth`): a Secret name and key, both checked.
    pub auth: Option<AuthFile>,
}

/// The auth file in a Secret of the cluster's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthFile {
    pub secret: String,
    pub key: String,
}

/// A cluster the controller can act on: where it lives, who owns its children, and its spec.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidCluster {
    pub name: String,
    pub namespace: String,
    /// The controller reference every child carries (`None` for a cluster the API server has not
    /// given a uid, which only happens outside Kubernetes).
    pub owner: Option<OwnerReference>,
    pub spec: Validated,
}

/// Why a spec cannot be acted on (the controller waits for the spec to change).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Invalid {
    #[error("spec.replicas must be at least 1 (got {0})")]
    Replicas(i32),
    #[error("spec.replicationFactor must be at least 1 (got {0})")]
    ReplicationFactor(i32),
    #[error("spec.image must name a container image")]
    Image,
    #[error("spec.storage.size {0:?} is not a Kubernetes quantity like 1Gi or 500Mi")]
    StorageSize(String),
    #[error("spec.progressDeadlineSeconds must be at least 1 (got {0})")]
    ProgressDeadline(i32),
    #[error("spec.shutdownDelaySeconds must be 0 to 600 (got {0})")]
    ShutdownDelay(i32),
    #[error("spec.auth.secretName {0:?} is not a Secret name (lower-case letters, digits, '-' and '.', at most 253)")]
    AuthSecret(String),
    #[error("spec.auth.key {0:?} is not a Secret key (letters, digits, '-', '_' and '.', at most 253)")]
    AuthKey(String),
}

/// Checks a spec.
pub fn validate(spec: &KVStoreClusterSpec) -> Result<Validated, Invalid> {
    let replicas = u32::try_from(spec.replicas).ok().filter(|&r| r >= 1).ok_or(Invalid::Replicas(spec.replicas))?;
    let replication_factor = u32::try_from(spec.replication_factor)
        .ok()
        .filter(|&k| k >= 1)
        .ok_or(Invalid::ReplicationFactor(spec.replication_factor))?;
    if spec.image.trim().is_empty() {
        return Err(Invalid::Image);
    }
    if !is_quantity(&spec.storage.size) {
        return Err(Invalid::StorageSize(spec.storage.size.clone()));
    }
    let deadline = u64::try_from(spec.progress_deadline_seconds)
        .ok()
        .filter(|&s| s >= 1)
        .map(Duration::from_secs)
        .ok_or(Invalid::ProgressDeadline(spec.progress_deadline_seconds))?;
    let shutdown_delay = u64::try_from(spec.shutdown_delay_seconds)
        .ok()
        .filter(|&s| s <= 600)
        .map(Duration::from_secs)
        .ok_or(Invalid::ShutdownDelay(spec.shutdown_delay_seconds))?;
    Ok(Validated {
        target: Target { replicas, replication_factor },
        image: spec.image.clone(),
        image_pull_policy: spec.image_pull_policy.clone(),
        resources: spec.resources.clone(),
        node_selector: spec.node_selector.clone(),
        tolerations: spec.tolerations.clone(),
        affinity: spec.affinity.clone(),
        storage_size: spec.storage.size.clone(),
        storage_class_name: spec.storage.storage_class_name.clone(),
        max_value_bytes: spec.max_value_bytes,
        policy: Policy {
            paused: spec.paused,
            auto_replace: spec.auto_replace,
            replace_after: deadline,
            volume_bytes: quantity_bytes(&spec.storage.size),
        },
        progress_deadline: deadline,
        shutdown_delay,
        tls: spec.tls.as_ref().is_some_and(|t| t.enabled),
        auth: match &spec.auth {
            Some(auth) => Some(auth_file(&auth.secret_name, &auth.key)?),
            None => None,
        },
    })
}

/// A Secret name (a DNS subdomain) and key ([-._a-zA-Z0-9]+), as the API server checks them.
fn auth_file(secret: &str, key: &str) -> Result<AuthFile, Invalid> {
    let subdomain = secret.len() <= 253
        && secret.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !subdomain {
        return Err(Invalid::AuthSecret(secret.to_owned()));
    }
    let key_ok = !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    if !key_ok {
        return Err(Invalid::AuthKey(key.to_owned()));
    }
    Ok(AuthFile { secret: secret.to_owned(), key: key.to_owned() })
}

/// Checks a cluster (its spec; its name and namespace come from the API server).
pub fn validate_cluster(cluster: &KVStoreCluster) -> Result<ValidCluster, Invalid> {
    Ok(ValidCluster {
        name: cluster.name_any(),
        namespace: cluster.namespace().unwrap_or_else(|| "default".into()),
        owner: cluster.controller_owner_ref(&()),
        spec: validate(&cluster.spec)?,
    })
}

/// A plain Kubernetes quantity in bytes: digits (with an optional fraction) and an optional binary
/// or decimal suffix; `None` for anything else.
pub fn quantity_bytes(s: &str) -> Option<u64> {
    let digits_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let number: f64 = number.parse().ok().filter(|n: &f64| n.is_finite() && *n >= 0.0)?;
    let scale: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        _ => return None,
    };
    Some((number * scale).min(u64::MAX as f64) as u64)
}

fn is_quantity(s: &str) -> bool {
    quantity_bytes(s).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(replicas: i32, rf: i32) -> KVStoreClusterSpec {
        KVStoreClusterSpec { image: "img".into(), ..KVStoreClusterSpec::new(replicas, rf) }
    }

    #[test]
    fn accepts_good_specs_and_marks_degraded_ones() {
        let v = validate(&spec(4, 2)).unwrap();
        assert_eq!((v.target, v.target.degraded()), (Target { replicas: 4, replication_factor: 2 }, None));
        let d = validate(&spec(1, 3)).unwrap();
        assert!(d.target.degraded().unwrap().contains("scale up to at least 3"));
    }

    #[test]
    fn carries_everything_build_needs() {
        let mut s = spec(3, 1);
        s.image_pull_policy = Some("Never".into());
        s.node_selector = Some(BTreeMap::from([("disk".to_owned(), "ssd".to_owned())]));
        s.storage.size = "5Gi".into();
        s.storage.storage_class_name = Some("fast".into());
        s.max_value_bytes = Some(4096);
        let v = validate(&s).unwrap();
        assert_eq!((v.image.as_str(), v.image_pull_policy.as_deref()), ("img", Some("Never")));
        assert_eq!(v.node_selector, s.node_selector);
        assert_eq!((v.storage_size.as_str(), v.storage_class_name.as_deref()), ("5Gi", Some("fast")));
        assert_eq!(v.max_value_bytes, Some(4096));
        let mut c = KVStoreCluster::new("demo", s);
        c.metadata.namespace = Some("prod".into());
        c.metadata.uid = Some("uid-1".into());
        let vc = validate_cluster(&c).unwrap();
        assert_eq!((vc.name.as_str(), vc.namespace.as_str()), ("demo", "prod"));
        assert_eq!(
            vc.owner.map(|o| (o.kind, o.uid, o.controller)),
            Some(("KVStoreCluster".into(), "uid-1".into(), Some(true)))
        );
        assert_eq!(vc.spec, v);
    }

    #[test]
    fn rejects_bad_specs_with_what_to_fix() {
        assert_eq!(validate(&spec(0, 2)), Err(Invalid::Replicas(0)));
        assert_eq!(validate(&spec(2, 0)), Err(Invalid::ReplicationFactor(0)));
        let mut d = spec(2, 2);
        d.progress_deadline_seconds = 0;
        assert_eq!(validate(&d), Err(Invalid::ProgressDeadline(0)));
        let mut d = spec(2, 2);
        d.shutdown_delay_seconds = -1;
        assert_eq!(validate(&d), Err(Invalid::ShutdownDelay(-1)));
        d.shutdown_delay_seconds = 0;
        assert_eq!(validate(&d).map(|v| v.shutdown_delay), Ok(Duration::ZERO));
        let mut s = spec(2, 2);
        s.image = " ".into();
        assert_eq!(validate(&s), Err(Invalid::Image));
        s.image = "img".into();
        s.storage.size = "lots".into();
        assert!(validate(&s).unwrap_err().to_string().contains("like 1Gi"));
        assert_eq!(quantity_bytes("1Gi"), Some(1 << 30));
        assert_eq!(quantity_bytes("40Ki"), Some(40 << 10));
        assert_eq!(quantity_bytes("1.5G"), Some(1_500_000_000));
        assert_eq!(quantity_bytes("lots"), None);
        for ok in ["1Gi", "500Mi", "10", "1.5G"] {
            s.storage.size = ok.into();
            assert!(validate(&s).is_ok(), "{ok}");
        }
    }

    #[test]
    fn tls_and_auth_are_carried_and_checked() {
        use crate::crd::{AuthSpec, TlsSpec};
        let mut s = spec(3, 1);
        assert_eq!((validate(&s).unwrap().tls, validate(&s).unwrap().auth), (false, None));
        s.tls = Some(TlsSpec { enabled: false });
        assert!(!validate(&s).unwrap().tls, "not enabled: plain");
        s.tls = Some(TlsSpec { enabled: true });
        assert!(validate(&s).unwrap().tls);
        s.auth = Some(AuthSpec { secret_name: "demo-auth".into(), key: "auth.yaml".into() });
        assert_eq!(validate(&s).unwrap().auth, Some(AuthFile { secret: "demo-auth".into(), key: "auth.yaml".into() }));
        for bad in ["Demo", "-x", "a..b", ""] {
            s.auth = Some(AuthSpec { secret_name: bad.into(), key: "auth.yaml".into() });
            assert_eq!(validate(&s), Err(Invalid::AuthSecret(bad.into())));
        }
        s.auth = Some(AuthSpec { secret_name: "ok".into(), key: "a/b".into() });
        assert!(validate(&s).unwrap_err().to_string().contains("not a Secret key"));
    }
}
