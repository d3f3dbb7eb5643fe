//! The StatefulSet controller. For `spec.replicas = N` it keeps Pods `<sts>-0 … <sts>-N-1`, built
//! from `spec.template` with an owner reference to the StatefulSet (`controller: true`),
//! `hostname = <pod>`, `subdomain = spec.serviceName`, the labels
//! `statefulset.kubernetes.io/pod-name` and `apps.kubernetes.io/pod-index`, and one
//! `persistentVolumeClaim` volume per `volumeClaimTemplates[i]` named `<claim>-<pod>` (the claim
//! object is created first when missing). All missing Pods are created at once (the `Parallel`
//! pod management policy, whatever the spec says). Pods with an ordinal `>= N` are removed one at
//! a time, highest ordinal first: the runtime stops the process (SIGTERM, grace period, SIGKILL),
//! then the Pod object is deleted. A Pod deleted by someone else (`kubectl delete pod`) loses its
//! process and is created again under the same name with the same claim, so identity and data
//! survive. It writes the status subresource: `replicas`, `readyReplicas`, `currentReplicas`,
//! `updatedReplicas`, `availableReplicas` (honouring `minReadySeconds`), `observedGeneration`,
//! computed from the Pods as listed (so it never runs ahead of what the Pods say).
//!
//! Every tick, [`plan`] — pure, from the listed objects and the slots — decides which Pods this
//! kubelet starts and stops running and which API calls to make; the loop applies it.
//!
//! A lost machine (`StandInKubelet::lose_machine`): the Pods whose claim is on it stop, the claim's
//! directory is deleted, and while that claim (the same uid) exists the Pod is not run: its status
//! says `Pending` with `PodScheduled=False`, reason `Unschedulable`, as a Pod bound to a local
//! volume on a vanished node does. Deleting the claim and the Pod (the operator's replacement)
//! gives a new claim, an empty directory, and a Pod that runs.
//!
//! Update strategy: always `OnDelete`, whatever the spec says (a template changed after a Pod was
//! created reaches it only when that Pod is deleted; the operator rolls its pods itself). Not
//! simulated: `RollingUpdate`, `controller-revision-hash`, `currentRevision`/`updateRevision`,
//! `OrderedReady`, `spec.ordinals`.

use super::pod::{Slot, free_host};
use super::{Kubelet, gc, now};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, Volume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::ResourceExt;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A listed Pod this kubelet starts running.
#[derive(Debug)]
pub(super) struct NewSlot {
    pub(super) pod: Pod,
    pub(super) owner_uid: String,
    /// The last octet of its address.
    pub(super) host: u8,
}

/// What one tick decided.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Pods to run here: listed, wanted, and with no slot of that name.
    pub(super) run: Vec<NewSlot>,
    /// Pods already run here, as listed now.
    pub(super) refresh: Vec<Pod>,
    /// Slots to stop: (name, delete the object once the process is gone).
    pub(super) stop: Vec<(String, bool)>,
    /// Pods to create: (StatefulSet, ordinal).
    pub(super) create: Vec<(StatefulSet, i32)>,
    /// Pod objects that run no process here to delete: (name, uid).
    pub(super) delete: Vec<(String, String)>,
    /// StatefulSets in foreground deletion whose Pods are all gone.
    pub(super) release: Vec<StatefulSet>,
    /// Problems worth a log line: (key, message).
    pub(super) complaints: Vec<(String, String)>,
    /// Pods bound to a lost machine, run nowhere: (name, uid).
    pub(super) unschedulable: Vec<(String, String)>,
}

impl Plan {
    /// Stops the slot running Pod `name`/`uid` and deletes the object after it; with no such slot,
    /// just deletes the object.
    fn stop_and_delete(&mut self, slots: &BTreeMap<String, Slot>, name: &str, uid: &str) {
        match slots.get(name) {
            Some(slot) if slot.uid == uid => self.stop.push((name.to_owned(), true)),
            _ => self.delete.push((name.to_owned(), uid.to_owned())),
        }
    }
}

/// Compares what the StatefulSets want with the Pods and the slots. `lost`: the names of the Pods
/// whose volume is on a lost machine (they cannot run anywhere).
pub(super) fn plan(
    sets: &[StatefulSet],
    pods: &[Pod],
    slots: &BTreeMap<String, Slot>,
    lost: &BTreeSet<String>,
) -> Plan {
    let mut plan = Plan::default();
    let live: HashMap<&str, &StatefulSet> = sets
        .iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .filter_map(|s| Some((s.metadata.uid.as_deref()?, s)))
        .collect();
    let listed: HashMap<&str, &Pod> = pods.iter().filter_map(|p| Some((p.metadata.name.as_deref()?, p))).collect();
    let mut taken: BTreeSet<u8> = slots.values().map(|s| s.host).collect();

    // A Pod object that is gone, or replaced by another of the same name: stop its process.
    for (name, slot) in slots {
        if listed.get(name.as_str()).and_then(|p| p.metadata.uid.as_deref()) != Some(slot.uid.as_str()) {
            plan.stop.push((name.clone(), false));
        }
    }

    let mut excess: BTreeMap<&str, Vec<(i32, &str, &str)>> = BTreeMap::new();
    for pod in pods {
        let (Some(name), Some(uid)) = (pod.metadata.name.as_deref(), pod.metadata.uid.as_deref()) else { continue };
        let slot_uid = slots.get(name).map(|s| s.uid.as_str());
        let Some(owner) = statefulset_owner(pod) else {
            // Not ours to run (only StatefulSet Pods are).
            if slot_uid == Some(uid) {
                plan.stop.push((name.to_owned(), false));
            }
            continue;
        };
        let Some(sts) = live.get(owner.uid.as_str()) else {
            // The garbage collector's part (see `gc`): the controller is gone (or going).
            plan.stop_and_delete(slots, name, uid);
            continue;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            // Graceful deletion: the kubelet stops the container, then confirms.
            plan.stop_and_delete(slots, name, uid);
            continue;
        }
        let sts_name = sts.metadata.name.as_deref().unwrap_or_default();
        if lost.contains(name) && ordinal(name, sts_name).is_some_and(|i| i < replicas(sts)) {
            if slot_uid == Some(uid) {
                plan.stop.push((name.to_owned(), false));
            }
            plan.unschedulable.push((name.to_owned(), uid.to_owned()));
            continue;
        }
        match ordinal(name, sts_name) {
            Some(i) if i < replicas(sts) => match slot_uid {
                Some(u) if u == uid => plan.refresh.push(pod.clone()),
                // The process of an earlier Pod of this name is still stopping; start after it.
                Some(_) => {}
                None => match free_host(&taken) {
                    Some(host) => {
                        taken.insert(host);
                        plan.run.push(NewSlot { pod: pod.clone(), owner_uid: owner.uid.clone(), host });
                    }
                    None => plan.complaints.push((format!("pod {name}"), "no free address left in the pool".into())),
                },
            },
            other => excess.entry(sts_name).or_default().push((other.unwrap_or(i32::MAX), name, uid)),
        }
    }

    // Scale down one Pod at a time per StatefulSet, highest ordinal first.
    for doomed in excess.into_values() {
        if let Some(&(_, name, uid)) = doomed.iter().max_by_key(|(ordinal, _, _)| *ordinal) {
            plan.stop_and_delete(slots, name, uid);
        }
    }

    // Scale up: every missing Pod at once, unless a process of that name still stops.
    for sts in live.values() {
        let sts_name = sts.metadata.name.as_deref().unwrap_or_default();
        for i in 0..replicas(sts) {
            let name = format!("{sts_name}-{i}");
            if !listed.contains_key(name.as_str()) && !slots.contains_key(&name) {
                plan.create.push(((*sts).clone(), i));
            }
        }
    }

    plan.release = gc::releasable(sets, pods, slots);
    plan
}

pub(super) fn statefulset_owner(pod: &Pod) -> Option<&OwnerReference> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true) && o.kind == "StatefulSet" && o.api_version.starts_with("apps/"))
}

fn replicas(sts: &StatefulSet) -> i32 {
    sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0)
}

/// The ordinal of Pod `pod` of StatefulSet `sts` (`<sts>-<ordinal>`), if the name is one.
fn ordinal(pod: &str, sts: &str) -> Option<i32> {
    let digits = pod.strip_prefix(sts)?.strip_prefix('-')?;
    let i: i32 = digits.parse().ok()?;
    (i >= 0 && i.to_string() == digits).then_some(i)
}

/// Pod `<sts>-<ordinal>` as the StatefulSet controller builds it from the template.
pub(super) fn build_pod(sts: &StatefulSet, ordinal: i32) -> Pod {
    let sts_name = sts.name_any();
    let name = format!("{sts_name}-{ordinal}");
    let spec = sts.spec.clone().unwrap_or_default();
    let template = spec.template;
    let meta = template.metadata.unwrap_or_default();
    let mut labels = meta.labels.unwrap_or_default();
    labels.insert("statefulset.kubernetes.io/pod-name".into(), name.clone());
    labels.insert("apps.kubernetes.io/pod-index".into(), ordinal.to_string());
    let mut pod_spec = template.spec.unwrap_or_default();
    pod_spec.hostname = Some(name.clone());
    pod_spec.subdomain = spec.service_name.filter(|s| !s.is_empty());
    let volumes = pod_spec.volumes.get_or_insert_with(Vec::new);
    for claim in spec.volume_claim_templates.iter().flatten() {
        let claim_name = claim.name_any();
        volumes.retain(|v| v.name != claim_name);
        volumes.push(Volume {
            name: claim_name.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: format!("{claim_name}-{name}"),
                read_only: None,
            }),
            ..Volume::default()
        });
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: sts.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: meta.annotations,
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "StatefulSet".into(),
                name: sts_name,
                uid: sts.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(pod_spec),
        status: None,
    }
}

/// The claims of Pod `pod`: one per `volumeClaimTemplates` entry, named `<claim>-<pod>`.
fn build_claims(sts: &StatefulSet, pod: &str) -> Vec<PersistentVolumeClaim> {
    let Some(spec) = sts.spec.as_ref() else { return Vec::new() };
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    spec.volume_claim_templates
        .iter()
        .flatten()
        .map(|template| {
            let mut labels = template.metadata.labels.clone().unwrap_or_default();
            labels.extend(selector.clone());
            PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(format!("{}-{pod}", template.name_any())),
                    namespace: sts.metadata.namespace.clone(),
                    labels: Some(labels),
                    annotations: template.metadata.annotations.clone(),
                    ..ObjectMeta::default()
                },
                spec: template.spec.clone(),
                status: None,
            }
        })
        .collect()
}

/// Since when the listed Pod has been Ready, if it is.
fn ready_condition_since(pod: &Pod) -> Option<&Time> {
    let cond = pod.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "Ready" && c.status == "True")?;
    cond.last_transition_time.as_ref()
}

/// The merge patch for a live StatefulSet's status, from its Pods as listed; `None` when its status
/// already says so.
fn set_status(sts: &StatefulSet, pods: &[Pod], now: &Time) -> Option<Value> {
    let uid = sts.metadata.uid.as_deref()?;
    let min_ready = sts.spec.as_ref().and_then(|s| s.min_ready_seconds).unwrap_or(0).max(0);
    let mine: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && statefulset_owner(p).is_some_and(|o| o.uid == uid))
        .collect();
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let replicas = count(mine.len());
    let ready_since: Vec<&Time> = mine.iter().filter_map(|p| ready_condition_since(p)).collect();
    let ready = count(ready_since.len());
    let horizon = k8s_openapi::jiff::SignedDuration::from_secs(i64::from(min_ready));
    let available = count(ready_since.iter().filter(|t| t.0.checked_add(horizon).is_ok_and(|at| at <= now.0)).count());
    let generation = sts.metadata.generation.unwrap_or(0);
    let unchanged = sts.status.as_ref().is_some_and(|s| {
        s.replicas == replicas
            && s.ready_replicas.unwrap_or(0) == ready
            && s.current_replicas.unwrap_or(0) == replicas
            && s.updated_replicas.unwrap_or(0) == replicas
            && s.available_replicas.unwrap_or(0) == available
            && s.observed_generation.unwrap_or(0) == generation
    });
    (!unchanged).then(|| {
        json!({
            "metadata": { "uid": uid },
            "status": {
                "replicas": replicas,
                "readyReplicas": ready,
                "currentReplicas": replicas,
                "updatedReplicas": replicas,
                "availableReplicas": available,
                "observedGeneration": generation,
            }
        })
    })
}

impl Kubelet {
    /// Plans, takes on the slot changes, then makes the API calls.
    pub(super) async fn control(&mut self, sets: &[StatefulSet], pods: &[Pod]) {
        let lost = self.pods_on_lost_machines(pods).await;
        let plan = plan(sets, pods, &self.slots, &lost);
        for pod in plan.refresh {
            if let Some(slot) = self.slots.get_mut(&pod.name_any()) {
                slot.pod = pod;
            }
        }
        for new in plan.run {
            let slot = Slot::new(new.pod, new.owner_uid, &self.shared.opts.address_prefix, new.host);
            self.say(format_args!("running pod {} at {}", slot.name(), slot.ip));
            self.slots.insert(slot.name(), slot);
        }
        for (name, delete_object) in plan.stop {
            if let Some(slot) = self.slots.get_mut(&name) {
                slot.stop(delete_object);
            }
        }
        self.publish();
        for (key, message) in plan.complaints {
            self.complain(key, message);
        }
        for (sts, i) in plan.create {
            self.create_pod(&sts, i).await;
        }
        for (name, uid) in plan.delete {
            let key = format!("deleting pod {name}");
            match self.delete_pod(&name, &uid).await {
                Ok(()) => self.resolved(&key),
                Err(e) => self.complain(key, e),
            }
        }
        for sts in plan.release {
            self.release(&sts).await;
        }
        for (name, uid) in plan.unschedulable {
            if !self.slots.contains_key(&name) {
                self.report_unschedulable(&name, &uid).await;
            }
        }
    }

    /// Creates the claims of Pod `<sts>-<i>` when missing, then the Pod.
    async fn create_pod(&mut self, sts: &StatefulSet, ordinal: i32) {
        let pod = build_pod(sts, ordinal);
        let name = pod.name_any();
        let key = format!("creating pod {name}");
        for claim in build_claims(sts, &name) {
            let claim_name = claim.name_any();
            if let Err(e) = std::fs::create_dir_all(self.shared.claim_dir(&claim_name)) {
                return self.complain(key, format_args!("claim directory: {e}"));
            }
            match self.claims.create(&PostParams::default(), &claim).await {
                Ok(_) => self.say(format_args!("created persistentvolumeclaim {claim_name}")),
                Err(kube::Error::Api(s)) if s.is_already_exists() => {}
                Err(e) => return self.complain(key, format_args!("claim {claim_name}: {e}")),
            }
        }
        match self.pods.create(&PostParams::default(), &pod).await {
            Ok(_) => {
                self.resolved(&key);
                self.say(format_args!("created pod {name}"));
            }
            // Someone else was quicker; the next tick sees it.
            Err(kube::Error::Api(s)) if s.is_already_exists() => {}
            Err(e) => self.complain(key, e),
        }
    }

    pub(super) async fn write_set_statuses(&mut self, sets: &[StatefulSet], pods: &[Pod]) {
        let now = now();
        for sts in sets.iter().filter(|s| s.metadata.deletion_timestamp.is_none()) {
            let Some(patch) = set_status(sts, pods, &now) else { continue };
            let name = sts.name_any();
            let key = format!("statefulset {name} status");
            match self.sets.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => self.resolved(&key),
                Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => {}
                Err(e) => self.complain(key, e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubelet::fixtures::{demo, listed, slots};

    fn names(pods: &[NewSlot]) -> Vec<(String, u8)> {
        pods.iter().map(|n| (n.pod.name_any(), n.host)).collect()
    }

    #[test]
    fn ordinals_are_exact() {
        assert_eq!(ordinal("demo-0", "demo"), Some(0));
        assert_eq!(ordinal("demo-12", "demo"), Some(12));
        assert_eq!(ordinal("demo-01", "demo"), None);
        assert_eq!(ordinal("demo-x", "demo"), None);
        assert_eq!(ordinal("demo-nodes-0", "demo"), None);
        assert_eq!(ordinal("other-0", "demo"), None);
    }

    #[test]
    fn pods_are_built_from_the_template() {
        let sts = demo("u-1", 2);
        let pod = build_pod(&sts, 1);
        assert_eq!(pod.metadata.name.as_deref(), Some("demo-1"));
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("app").map(String::as_str), Some("demo"));
        assert_eq!(labels.get("apps.kubernetes.io/pod-index").map(String::as_str), Some("1"));
        let owner = statefulset_owner(&pod).expect("controlled by the StatefulSet");
        assert_eq!((owner.name.as_str(), owner.uid.as_str()), ("demo", "u-1"));
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.hostname.as_deref(), Some("demo-1"));
        assert_eq!(spec.subdomain.as_deref(), Some("demo-nodes"));
        let volume = spec.volumes.iter().flatten().find(|v| v.name == "data").expect("the claim's volume");
        assert_eq!(volume.persistent_volume_claim.as_ref().map(|c| c.claim_name.as_str()), Some("data-demo-1"));
        let claims = build_claims(&sts, "demo-1");
        assert_eq!(claims.len(), 1);
        assert_eq!(claims[0].metadata.name.as_deref(), Some("data-demo-1"));
    }

    #[test]
    fn missing_pods_are_created_and_listed_ones_run_at_the_lowest_free_addresses() {
        let sts = demo("s", 4);
        let (p0, p1, p2) = (listed(&sts, 0, "p0"), listed(&sts, 1, "p1"), listed(&sts, 2, "p2"));
        let plan = plan(std::slice::from_ref(&sts), &[p0.clone(), p1, p2], &slots(&[(&p0, 2)]), &BTreeSet::new());
        assert_eq!(names(&plan.run), [("demo-1".to_owned(), 1), ("demo-2".to_owned(), 3)]);
        assert_eq!(plan.refresh.iter().map(|p| p.name_any()).collect::<Vec<_>>(), ["demo-0"]);
        assert_eq!(plan.create.iter().map(|(_, i)| *i).collect::<Vec<_>>(), [3]);
        assert!(plan.stop.is_empty() && plan.delete.is_empty() && plan.release.is_empty());
    }

    #[test]
    fn scale_down_removes_one_pod_at_a_time_highest_first() {
        let sts = demo("s", 1);
        let pods: Vec<Pod> = (0..3).map(|i| listed(&sts, i, &format!("p{i}"))).collect();
        let plan = plan(
            std::slice::from_ref(&sts),
            &pods,
            &slots(&[(&pods[0], 1), (&pods[1], 2), (&pods[2], 3)]),
            &BTreeSet::new(),
        );
        assert_eq!(plan.stop, [("demo-2".to_owned(), true)]);
        assert!(plan.delete.is_empty() && plan.create.is_empty());
        // An excess Pod this kubelet does not run is deleted outright.
        let plan = super::plan(&[sts], &pods, &slots(&[(&pods[0], 1)]), &BTreeSet::new());
        assert_eq!(plan.delete, [("demo-2".to_owned(), "p2".to_owned())]);
    }

    #[test]
    fn a_replaced_pod_waits_for_the_old_process_to_stop() {
        let sts = demo("s", 1);
        let (old, new) = (listed(&sts, 0, "old"), listed(&sts, 0, "new"));
        let plan = plan(&[sts], &[new], &slots(&[(&old, 1)]), &BTreeSet::new());
        assert_eq!(plan.stop, [("demo-0".to_owned(), false)], "the old object is gone: nothing to delete");
        assert!(plan.run.is_empty() && plan.create.is_empty(), "no second process under one name");
    }

    #[test]
    fn a_gone_pod_is_not_created_again_until_its_process_stopped() {
        let sts = demo("s", 1);
        let p0 = listed(&sts, 0, "p0");
        let plan = plan(std::slice::from_ref(&sts), &[], &slots(&[(&p0, 1)]), &BTreeSet::new());
        assert_eq!(plan.stop, [("demo-0".to_owned(), false)]);
        assert!(plan.create.is_empty());
        assert_eq!(super::plan(&[sts], &[], &BTreeMap::new(), &BTreeSet::new()).create.len(), 1);
    }

    #[test]
    fn a_pod_being_deleted_is_stopped_then_deleted() {
        let sts = demo("s", 2);
        let mut p1 = listed(&sts, 1, "p1");
        p1.metadata.deletion_timestamp = Some(now());
        let plan = plan(&[sts], &[p1.clone()], &slots(&[(&p1, 1)]), &BTreeSet::new());
        assert_eq!(plan.stop, [("demo-1".to_owned(), true)]);
        assert_eq!(plan.create.iter().map(|(_, i)| *i).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn set_status_counts_ready_and_available_pods() {
        let mut sts = demo("s", 3);
        if let Some(spec) = sts.spec.as_mut() {
            spec.min_ready_seconds = Some(10);
        }
        let now = now();
        let ready_since = |pod: &mut Pod, secs: i64| {
            let at = now.0.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(secs)).expect("in range");
            pod.status = serde_json::from_value(json!({
                "conditions": [{ "type": "Ready", "status": "True", "lastTransitionTime": Time(at) }]
            }))
            .expect("a valid status");
        };
        let mut pods: Vec<Pod> = (0..3).map(|i| listed(&sts, i, &format!("p{i}"))).collect();
        ready_since(&mut pods[0], 60);
        ready_since(&mut pods[1], 1);
        let patch = set_status(&sts, &pods, &now).expect("a status to write");
        let status = &patch["status"];
        assert_eq!((status["replicas"].as_i64(), status["readyReplicas"].as_i64()), (Some(3), Some(2)));
        assert_eq!((status["availableReplicas"].as_i64(), status["observedGeneration"].as_i64()), (Some(1), Some(1)));
        // Written once, not again.
        sts.status = serde_json::from_value(status.clone()).expect("a valid status");
        assert_eq!(set_status(&sts, &pods, &now), None);
    }
}
