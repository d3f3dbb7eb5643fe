//! The committed CRD is exactly what `crdgen` generates.

use kube::CustomResourceExt;

#[test]
fn committed_crd_matches_crdgen() {
    let generated = serde_yaml::to_string(&kvs_operator::crd::KVStoreCluster::crd()).expect("serializes");
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/kvstorecluster.yaml"))
        .expect("crds/kvstorecluster.yaml exists");
    assert!(
        generated == committed,
        "crds/kvstorecluster.yaml is stale: run `cargo run -p kvs-operator --bin crdgen > crds/kvstorecluster.yaml`"
    );
}
