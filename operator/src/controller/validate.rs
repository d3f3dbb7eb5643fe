//! Spec validation (pure). The schema already enforces `replicas >= 1` and
//! `replicationFactor >= 1`; this adds what a schema cannot say, and turns
//! "fewer replicas than the replication factor" into a degraded-but-running state rather than an
//! error, as the node itself does.

use crate::crd::KVStoreClusterSpec;

/// A spec the controller can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validated {
    pub replicas: u32,
    pub replication_factor: u32,
    /// `replicas < replicationFactor`: one partition holding every node, each key on fewer than
    /// `replicationFactor` nodes.
    pub degraded: Option<String>,
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
}

/// Checks a spec.
pub fn validate(spec: &KVStoreClusterSpec) -> Result<Validated, Invalid> {
    if spec.replicas < 1 {
        return Err(Invalid::Replicas(spec.replicas));
    }
    if spec.replication_factor < 1 {
        return Err(Invalid::ReplicationFactor(spec.replication_factor));
    }
    if spec.image.trim().is_empty() {
        return Err(Invalid::Image);
    }
    if !is_quantity(&spec.storage.size) {
        return Err(Invalid::StorageSize(spec.storage.size.clone()));
    }
    let degraded = (spec.replicas < spec.replication_factor).then(|| {
        format!(
            "{} replicas cannot hold {} copies of each key: running as one partition of {} (scale up to at least {})",
            spec.replicas, spec.replication_factor, spec.replicas, spec.replication_factor
        )
    });
    Ok(Validated { replicas: spec.replicas as u32, replication_factor: spec.replication_factor as u32, degraded })
}

/// A plain Kubernetes quantity: digits (with an optional fraction) and an optional binary or
/// decimal suffix.
fn is_quantity(s: &str) -> bool {
    let digits_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    !number.is_empty()
        && number.parse::<f64>().is_ok()
        && ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E"].contains(&suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(replicas: i32, rf: i32) -> KVStoreClusterSpec {
        KVStoreClusterSpec { image: "img".into(), ..KVStoreClusterSpec::new(replicas, rf) }
    }

    #[test]
    fn accepts_good_specs_and_marks_degraded_ones() {
        assert_eq!(validate(&spec(4, 2)).unwrap(), Validated { replicas: 4, replication_factor: 2, degraded: None });
        let d = validate(&spec(1, 3)).unwrap();
        assert!(d.degraded.unwrap().contains("scale up to at least 3"));
    }

    #[test]
    fn rejects_bad_specs_with_what_to_fix() {
        assert_eq!(validate(&spec(0, 2)), Err(Invalid::Replicas(0)));
        assert_eq!(validate(&spec(2, 0)), Err(Invalid::ReplicationFactor(0)));
        let mut s = spec(2, 2);
        s.image = " ".into();
        assert_eq!(validate(&s), Err(Invalid::Image));
        s.image = "img".into();
        s.storage.size = "lots".into();
        assert!(validate(&s).unwrap_err().to_string().contains("like 1Gi"));
        for ok in ["1Gi", "500Mi", "10", "1.5G"] {
            s.storage.size = ok.into();
            assert!(validate(&s).is_ok(), "{ok}");
        }
    }
}
