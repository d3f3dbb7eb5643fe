//! The operator's core, shared by the Kubernetes controller and the local mode: what the cluster
//! should become ([`Target`]), the pure planner of the next step ([`plan()`]), and the driver that
//! observes, plans and acts through a [`Backend`] ([`Driver::step`]), and what a cluster
//! waits on when it does not move ([`Blocker`]).
//!
//! Invariant: nothing here knows about Kubernetes. This module imports neither kube-rs nor
//! k8s-openapi nor the controller or the CRD (a test below checks it), so the rebalance logic can
//! be read, tested and reused without a cluster; the controller and the local mode are backends
//! and reporters around it.

pub mod admin;
pub mod capacity;
pub mod driver;
pub mod plan;
pub mod progress;

pub use admin::{NodeAdmin, ViewChangeTask};
pub use capacity::{CapacityPlan, Refusal};
pub use driver::{Action, Backend, Driver, FinishedViewChange, Observation, StepError, StepReport, observe};
pub use plan::{Pod, Policy, Step, Target, plan};
pub use progress::Blocker;

#[cfg(test)]
mod tests {
    #[test]
    fn the_core_does_not_depend_on_kubernetes() {
        let sources = [
            ("mod.rs", include_str!("mod.rs")),
            ("admin.rs", include_str!("admin.rs")),
            ("capacity.rs", include_str!("capacity.rs")),
            ("driver.rs", include_str!("driver.rs")),
            ("plan.rs", include_str!("plan.rs")),
            ("progress.rs", include_str!("progress.rs")),
        ];
        // Spelled in pieces so that this test does not find itself.
        let forbidden =
            [concat!("kube", "::"), concat!("use ", "kube"), concat!("k8s", "_openapi"), concat!("crate", "::")];
        for (file, text) in sources {
            for word in forbidden {
                assert!(
                    !text.contains(word),
                    "src/rebalance/{file} mentions `{word}`: keep Kubernetes out of the core"
                );
            }
        }
    }
}
