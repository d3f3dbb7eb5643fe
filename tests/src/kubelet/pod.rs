//! One Pod as the kubelet runs it ([`Slot`]): its sandbox (the IP), its container, the process, and
//! the status the kubelet reports for it; and the two writes the kubelet makes to a Pod object
//! (status, deletion).
//!
//! # Pod network
//! Every Pod gets its own loopback address `<address_prefix><n>`, n the lowest free of 1..=253
//! (`.254` is left for the test's other endpoints, `LoopbackNet::service`). A container restart
//! keeps it; a Pod deleted and created again may get another. Real Pods each have a network
//! namespace, so they all bind `0.0.0.0`; here they share the host's loopback, which
//! [`super::env`] makes up for by rewriting `LISTEN`.
//!
//! # Status
//! Through the status subresource: `phase` (`Pending` until the first start, then `Running`),
//! `podIP`, `podIPs`, `startTime`, conditions `PodScheduled`, `Initialized`, `ContainersReady` and
//! `Ready`, and one `containerStatuses` entry with `ready`, `started`, `restartCount`, `state` and
//! `lastState`. The patch carries `metadata.uid`, so it cannot land on a later Pod of the same
//! name, and is sent only when it differs from the last one written.

use super::runtime::{Container, MAX_GRACE};
use super::{Kubelet, now};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kvs_testkit::process::NodeProcess;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// The host numbers Pods get (the last octet of their IP).
const HOSTS: std::ops::RangeInclusive<u8> = 1..=253;

/// One Pod the kubelet runs.
pub(super) struct Slot {
    /// The Pod object as last listed.
    pub(super) pod: Pod,
    /// Tells this Pod apart from a later one of the same name.
    pub(super) uid: String,
    /// The controlling StatefulSet's uid.
    pub(super) owner_uid: String,
    /// The last octet of `ip`.
    pub(super) host: u8,
    pub(super) ip: String,
    pub(super) created: Time,
    /// What the container does and reports (plain data; decisions are made from it).
    pub(super) container: Container,
    /// The process, `Some` exactly while `container` says one runs. Dropping it kills it.
    pub(super) process: Option<NodeProcess>,
    /// The status last written to the API, so unchanged status is not written again.
    pub(super) written: Option<Value>,
}

impl Slot {
    pub(super) fn new(pod: Pod, owner_uid: String, prefix: &str, host: u8) -> Slot {
        Slot {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            pod,
            owner_uid,
            host,
            ip: format!("{prefix}{host}"),
            created: now(),
            container: Container::new(Instant::now()),
            process: None,
            written: None,
        }
    }

    pub(super) fn name(&self) -> String {
        self.pod.name_any()
    }

    /// Begins stopping the container within the Pod's `terminationGracePeriodSeconds` (at most
    /// 10 s); idempotent, and `delete_object` only ever turns on.
    pub(super) fn stop(&mut self, delete_object: bool) {
        let grace = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .map_or(MAX_GRACE, |s| Duration::from_secs(s.max(0).unsigned_abs()).min(MAX_GRACE));
        self.container.stop(grace, delete_object, Instant::now());
    }

    /// The merge patch for the Pod's status subresource.
    pub(super) fn status_patch(&self) -> Value {
        let c = &self.container;
        let spec = self.pod.spec.as_ref().and_then(|s| s.containers.first());
        let ready = c.ready && c.stopping.is_none();
        let state = match (&c.run, &c.stopping, &c.waiting, &c.last_exit) {
            (Some(run), _, _, _) => json!({ "running": { "startedAt": run.started } }),
            (None, Some(_), _, Some(exit)) => json!({ "terminated": exit.json() }),
            (None, _, Some((reason, message)), _) => json!({ "waiting": { "reason": reason, "message": message } }),
            (None, _, None, Some(_)) => {
                json!({ "waiting": { "reason": "CrashLoopBackOff", "message": "back-off restarting the failed container" } })
            }
            (None, _, None, None) => json!({ "waiting": { "reason": "ContainerCreating" } }),
        };
        let last_state = c.last_exit.as_ref().map_or_else(|| json!({}), |e| json!({ "terminated": e.json() }));
        let flag = if ready { "True" } else { "False" };
        json!({
            "metadata": { "uid": self.uid },
            "status": {
                "phase": if c.started_once { "Running" } else { "Pending" },
                "podIP": self.ip,
                "podIPs": [{ "ip": self.ip }],
                "startTime": self.created,
                "conditions": [
                    { "type": "PodScheduled", "status": "True", "lastTransitionTime": self.created },
                    { "type": "Initialized", "status": "True", "lastTransitionTime": self.created },
                    { "type": "ContainersReady", "status": flag, "lastTransitionTime": c.ready_since },
                    { "type": "Ready", "status": flag, "lastTransitionTime": c.ready_since },
                ],
                "containerStatuses": [{
                    "name": spec.map(|c| c.name.as_str()).unwrap_or_default(),
                    "image": spec.and_then(|c| c.image.as_deref()).unwrap_or_default(),
                    "imageID": "",
                    "ready": ready,
                    "started": c.run.is_some(),
                    "restartCount": c.restarts,
                    "state": state,
                    "lastState": last_state,
                }],
            }
        })
    }
}

/// The lowest host number not in `taken`.
pub(super) fn free_host(taken: &BTreeSet<u8>) -> Option<u8> {
    HOSTS.into_iter().find(|h| !taken.contains(h))
}

impl Kubelet {
    /// Writes the status of every Pod whose status changed.
    pub(super) async fn write_pod_statuses(&mut self) {
        let patches: Vec<(String, Value)> = self
            .slots
            .iter()
            // A stop without deletion means the object is already gone.
            .filter(|(_, s)| s.container.stopping.as_ref().is_none_or(|st| st.delete_object))
            .filter_map(|(name, s)| {
                let patch = s.status_patch();
                (s.written.as_ref() != Some(&patch)).then(|| (name.clone(), patch))
            })
            .collect();
        for (name, patch) in patches {
            let key = format!("pod {name} status");
            match self.pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    self.resolved(&key);
                    if let Some(slot) = self.slots.get_mut(&name) {
                        slot.written = Some(patch);
                    }
                }
                // Gone: the next tick's plan deals with it. (A Pod replaced under the same name
                // answers 422, "metadata.uid: field is immutable": logged, as it should be rare.)
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => self.complain(key, e),
            }
        }
    }

    /// Deletes the Pod object `name` if it is still the one with `uid`; gone counts as done.
    pub(super) async fn delete_pod(&self, name: &str, uid: &str) -> Result<(), kube::Error> {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions { uid: Some(uid.to_owned()), resource_version: None }),
            ..DeleteParams::default()
        };
        match self.pods.delete(name, &dp).await {
            Ok(_) => {
                self.say(format_args!("deleted pod {name}"));
                Ok(())
            }
            // Not found, or the uid precondition failed: that Pod is gone either way.
            Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_the_lowest_free_and_leave_254_alone() {
        assert_eq!(free_host(&BTreeSet::new()), Some(1));
        assert_eq!(free_host(&[1, 2, 4].into_iter().collect()), Some(3));
        assert_eq!(free_host(&(1..=253).collect()), None);
    }

    #[test]
    fn status_follows_the_container() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": "demo-0", "uid": "u-0" },
            "spec": { "containers": [{ "name": "kvs", "image": "kvs-node" }] }
        }))
        .expect("a valid Pod");
        let mut slot = Slot::new(pod, "s".into(), "127.0.61.", 3);
        let status = slot.status_patch();
        assert_eq!(status["metadata"]["uid"], "u-0");
        assert_eq!(status["status"]["phase"], "Pending");
        assert_eq!(status["status"]["podIP"], "127.0.61.3");
        assert_eq!(status["status"]["containerStatuses"][0]["state"]["waiting"]["reason"], "ContainerCreating");
        slot.container.started(Instant::now());
        slot.container.set_ready(true);
        let status = slot.status_patch();
        assert_eq!(status["status"]["phase"], "Running");
        assert_eq!(status["status"]["conditions"][3]["status"], "True");
        assert!(status["status"]["containerStatuses"][0]["state"]["running"].is_object());
        // A container being stopped is not ready, whatever its probe said.
        slot.stop(true);
        assert_eq!(slot.status_patch()["status"]["conditions"][3]["status"], "False");
    }
}
