//! kvs-operator: the `KVStoreCluster` custom resource, its controller (Kubernetes) and the local
//! mode (processes on this machine), which share one rebalance driver.

pub mod controller;
pub mod crd;
pub mod driver;
pub mod local;
pub mod metrics;
pub mod rbac;
pub mod serve;
