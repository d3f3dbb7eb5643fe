//! kvstore's cross-process test kit: real node processes on loopback or in network namespaces
//! (`cluster`), seeded fault-injection runs with a recording workload (`chaos`), the checker
//! that judges the recorded history (`history`, from `kvs-testkit`), and for tests against a real Kubernetes API
//! server, a stand-in StatefulSet controller, kubelet and DNS (`kubelet`), a stand-in RBAC authorizer
//! (`authorizer`) and harness helpers (`k8s`, `kvsc`).

pub mod authorizer;
pub mod chaos;
pub mod cluster;
pub use kvs_testkit::history;
pub mod k8s;
pub mod kubelet;
pub mod kvsc;
