//! The garbage collector's part. Pods whose controlling StatefulSet is gone (or being deleted) lose
//! their process and are deleted — decided in [`super::statefulset::plan`], which sees every Pod. A
//! StatefulSet deleted with `propagationPolicy: Foreground` has its Pods removed that way and then
//! its `foregroundDeletion` finalizer released ([`releasable`]), once no Pod object and no process
//! of it is left. Claims are kept (like the default `persistentVolumeClaimRetentionPolicy`,
//! Retain), object and directory alike.
//!
//! Not simulated: orphan deletion (`propagationPolicy: Orphan`), adoption of orphaned Pods, owners
//! other than a controlling StatefulSet.

use super::Kubelet;
use super::pod::Slot;
use super::statefulset::statefulset_owner;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use std::collections::BTreeMap;

const FOREGROUND_DELETION: &str = "foregroundDeletion";

/// The StatefulSets in foreground deletion with nothing of theirs left: no Pod object, no slot.
pub(super) fn releasable(sets: &[StatefulSet], pods: &[Pod], slots: &BTreeMap<String, Slot>) -> Vec<StatefulSet> {
    sets.iter()
        .filter(|s| s.metadata.deletion_timestamp.is_some())
        .filter(|s| s.finalizers().iter().any(|f| f == FOREGROUND_DELETION))
        .filter(|s| {
            let uid = s.metadata.uid.as_deref().unwrap_or_default();
            let left = pods.iter().any(|p| statefulset_owner(p).is_some_and(|o| o.uid == uid))
                || slots.values().any(|s| s.owner_uid == uid);
            !left
        })
        .cloned()
        .collect()
}

impl Kubelet {
    /// Removes the `foregroundDeletion` finalizer, so the API server deletes the StatefulSet.
    pub(super) async fn release(&mut self, sts: &StatefulSet) {
        let name = sts.name_any();
        let finalizers: Vec<&String> = sts.finalizers().iter().filter(|f| *f != FOREGROUND_DELETION).collect();
        // The resourceVersion makes this fail on a concurrent change; the next tick retries.
        let patch = json!({ "metadata": { "finalizers": finalizers, "resourceVersion": sts.resource_version() } });
        let key = format!("releasing statefulset {name}");
        match self.sets.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {
                self.resolved(&key);
                self.say(format_args!("released statefulset {name} (its pods are gone)"));
            }
            Err(e) => self.complain(key, e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{demo, listed, slots};
    use super::super::now;
    use super::super::statefulset::plan;
    use super::*;

    fn deleted(mut sts: StatefulSet, finalizer: &str) -> StatefulSet {
        sts.metadata.deletion_timestamp = Some(now());
        sts.metadata.finalizers = Some(vec![finalizer.into()]);
        sts
    }

    #[test]
    fn orphans_are_stopped_and_deleted() {
        let sts = demo("s", 2);
        let (p0, p1) = (listed(&sts, 0, "p0"), listed(&sts, 1, "p1"));
        // The StatefulSet is gone: the Pod that runs here stops first, the other is deleted outright.
        let plan = plan(&[], &[p0.clone(), p1], &slots(&[(&p0, 1)]), &Default::default());
        assert_eq!(plan.stop, [("demo-0".to_owned(), true)]);
        assert_eq!(plan.delete, [("demo-1".to_owned(), "p1".to_owned())]);
        assert!(plan.create.is_empty());
    }

    #[test]
    fn foreground_deletion_is_released_once_nothing_is_left() {
        let sts = deleted(demo("s", 1), FOREGROUND_DELETION);
        let p0 = listed(&sts, 0, "p0");
        let sets = std::slice::from_ref(&sts);
        assert!(releasable(sets, std::slice::from_ref(&p0), &BTreeMap::new()).is_empty(), "a Pod object is left");
        assert!(releasable(sets, &[], &slots(&[(&p0, 1)])).is_empty(), "a process is left");
        assert_eq!(releasable(sets, &[], &BTreeMap::new()), [sts]);
        let other = deleted(demo("s", 1), "example.com/other");
        assert!(releasable(&[other], &[], &BTreeMap::new()).is_empty(), "not ours to release");
    }
}
