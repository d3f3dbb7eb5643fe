//! The reconcile pipeline, `validate → build → apply → rebalance → status`. The pure steps live
//! here and are unit-tested without a cluster: [`validate`] checks a spec, [`plan`] decides the
//! next rebalancing step from what was observed. (The kube-rs controller that applies them is the
//! next piece of work.)

pub mod build;
pub mod plan;
pub mod validate;
