//! kvs-operator: the `KVStoreCluster` custom resource and the pure parts of its controller.

pub mod controller;
pub mod crd;
pub mod driver;
pub mod local;
