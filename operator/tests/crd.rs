//! The committed CRD, and the Helm chart's copy of it, are exactly what `crdgen` generates.

use kube::CustomResourceExt;

const REGENERATE: &str = "run `cargo run -p kvs-operator --bin crdgen` (it writes both copies)";

fn generated() -> String {
    serde_yaml::to_string(&kvs_operator::crd::KVStoreCluster::crd()).expect("serializes")
}

fn committed(path: &str) -> String {
    let full = format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{path}: {e}; {REGENERATE}"))
}

#[test]
fn committed_crd_matches_crdgen() {
    assert!(generated() == committed("crds/kvstorecluster.yaml"), "crds/kvstorecluster.yaml is stale: {REGENERATE}");
}

#[test]
fn chart_crd_copy_matches_crdgen() {
    // The chart renders this file (templates/crd.yaml), so a stale copy would install an old schema.
    assert!(
        generated() == committed("charts/kvstore-operator/files/kvstorecluster.yaml"),
        "charts/kvstore-operator/files/kvstorecluster.yaml is stale: {REGENERATE}"
    );
}
