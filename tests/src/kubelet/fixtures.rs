//! Objects for the kubelet's unit tests: a StatefulSet as the operator writes it (in short), its
//! Pods as the API server lists them, and slots running them.

use super::pod::Slot;
use super::statefulset::{build_pod, statefulset_owner};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde_json::json;
use std::collections::BTreeMap;

/// The StatefulSet `demo` (uid `uid`) with one claim template, `data`.
pub(super) fn demo(uid: &str, replicas: i32) -> StatefulSet {
    serde_json::from_value(json!({
        "metadata": { "name": "demo", "namespace": "t", "uid": uid, "generation": 1 },
        "spec": {
            "replicas": replicas,
            "serviceName": "demo-nodes",
            "selector": { "matchLabels": { "app": "demo" } },
            "template": {
                "metadata": { "labels": { "app": "demo" } },
                "spec": { "containers": [{ "name": "kvs", "image": "kvs-node" }] }
            },
            "volumeClaimTemplates": [{
                "metadata": { "name": "data" },
                "spec": { "accessModes": ["ReadWriteOnce"], "resources": { "requests": { "storage": "1Gi" } } }
            }]
        }
    }))
    .expect("a valid StatefulSet")
}

/// Pod `demo-<i>` as listed, with uid `uid`.
pub(super) fn listed(sts: &StatefulSet, i: i32, uid: &str) -> Pod {
    let mut pod = build_pod(sts, i);
    pod.metadata.uid = Some(uid.into());
    pod
}

/// Slots running `pods`, each at its host number.
pub(super) fn slots(pods: &[(&Pod, u8)]) -> BTreeMap<String, Slot> {
    pods.iter()
        .map(|(pod, host)| {
            let owner = statefulset_owner(pod).map(|o| o.uid.clone()).unwrap_or_default();
            (pod.name_any(), Slot::new((*pod).clone(), owner, "127.0.61.", *host))
        })
        .collect()
}
