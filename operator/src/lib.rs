//! kvs-operator: the `KVStoreCluster` custom resource, its controller (Kubernetes) and the local
//! mode (processes on this machine), which share one rebalance driver ([`rebalance`], which knows
//! nothing of Kubernetes); and the `KVStoreBackup` controller ([`backup`]).

pub mod backup;
pub mod controller;
pub mod crd;
pub mod local;
pub mod metrics;
pub mod rbac;
pub mod rebalance;
pub mod serve;
pub mod shutdown;
pub mod telemetry;
