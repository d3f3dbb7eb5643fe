//! `crdgen`: prints the KVStoreCluster CustomResourceDefinition as YAML
//! (`cargo run -p kvs-operator --bin crdgen > crds/kvstorecluster.yaml`).

use kube::CustomResourceExt;

fn main() {
    let crd = kvs_operator::crd::KVStoreCluster::crd();
    print!("{}", serde_yaml::to_string(&crd).expect("a CRD always serializes"));
}
