//! The user's workflow from the README's "On Kubernetes" section, end to end against a real API
//! server: `helm install` the chart → the operator runs → `kubectl apply -f
//! examples/cluster.yaml` → Available → a `KVStoreBackup` → Succeeded → a schedule's backups →
//! `kubectl patch` to 6 replicas → rebalanced → `kubectl scale --replicas=2` → drained and shrunk
//! → delete the cluster → `helm uninstall`.
//!
//! The test server has no kubelet, so two stand-ins play its part: `kvs_e2e::kubelet` runs the node
//! pods, and this test runs the operator the way the chart's Deployment describes it — its
//! container `args` and `env` read back from the installed Deployment (downward-API values filled
//! in), the listen address moved to loopback. The server does not enforce RBAC (it cannot issue
//! ServiceAccount tokens either), so the process uses the admin credentials; that the chart's
//! ClusterRole grants exactly what the operator calls is checked by `operator/tests/chart.rs`.
//! Needs `KUBECONFIG` and `helm`: `cargo test -p kvs-e2e --test k8s_helm -- --ignored`.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::Client;
use kube::api::Api;
use kvs_e2e::authorizer::{RbacProxy, Request};
use kvs_e2e::k8s::{api_client, eventually, fresh_namespace, get_text, kubectl, node_binary};
use kvs_e2e::kubelet::{KubeletOptions, StandInKubelet};
use kvs_e2e::kvsc::{OperatorProcess, STEP, assert_keys, pod_addresses, wait_running, workspace_root, write_keys};
use kvs_testkit::net::LoopbackNet;
use std::collections::BTreeSet;
use std::process::Command;

const KEYS: usize = 300;
const CRDS: [&str; 3] = [
    "customresourcedefinitions/kvstoreclusters.kvstore.dev",
    "customresourcedefinitions/kvstorebackups.kvstore.dev",
    "customresourcedefinitions/kvstorebackupschedules.kvstore.dev",
];

fn helm(args: &[&str]) -> String {
    let out = Command::new("helm")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running helm (on PATH after `eval \"$(../shared/k8s/up)\"`): {e}"));
    assert!(out.status.success(), "helm {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Lets this release take over the CRDs that an earlier test applied with kubectl (Helm refuses to
/// overwrite objects it does not own). On a fresh cluster there is nothing to adopt.
fn adopt_existing_crds(release: &str, ns: &str) {
    for crd in CRDS {
        let exists = Command::new("kubectl").args(["get", crd]).output().is_ok_and(|o| o.status.success());
        if exists {
            kubectl(&[
                "annotate",
                "--overwrite",
                crd,
                &format!("meta.helm.sh/release-name={release}"),
                &format!("meta.helm.sh/release-namespace={ns}"),
            ]);
            kubectl(&["label", "--overwrite", crd, "app.kubernetes.io/managed-by=Helm"]);
        }
    }
}

/// The operator's command line, environment and ServiceAccount as the installed Deployment gives
/// them.
async fn operator_from_deployment(
    client: &Client,
    ns: &str,
    name: &str,
    http: &str,
) -> (Vec<String>, Vec<(String, String)>, String) {
    let deployment: Deployment = Api::namespaced(client.clone(), ns).get(name).await.unwrap();
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    let account = pod.service_account_name.clone().expect("the Deployment runs under the chart's ServiceAccount");
    Api::<ServiceAccount>::namespaced(client.clone(), ns).get(&account).await.unwrap();
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap_or_default();
    let mut env = Vec::new();
    for var in container.env.clone().unwrap_or_default() {
        let value = match (var.value, var.value_from.and_then(|f| f.field_ref)) {
            (Some(v), _) => v,
            (None, Some(field)) if field.field_path == "metadata.namespace" => ns.to_owned(),
            (None, Some(field)) if field.field_path == "metadata.name" => format!("{name}-0"),
            other => panic!("the operator's env {} has a source this stand-in cannot fill: {other:?}", var.name),
        };
        env.push((var.name, value));
    }
    // A pod has its own network namespace; this process shares loopback with everything else.
    for (name, value) in &mut env {
        if name == "KVS_OPERATOR_HTTP_ADDRESS" {
            *value = http.to_owned();
        }
    }
    (args, env, account)
}

/// Nothing the operator asked was denied, and every permission the chart grants was used at
/// least once over the workflow — or is named here with the reason the workflow cannot show it.
fn assert_least_privilege(authorizer: &RbacProxy) {
    /// Granted, but not necessarily asked for in one run of this workflow.
    const NOT_ALWAYS_USED: &[(&str, &str, &str, &str)] = &[
        ("events.k8s.io", "events", "patch", "kube's Recorder patches an Event only when the same one repeats"),
        ("", "pods", "delete", "only a changed pod template (a roll) or a member replacement deletes a pod"),
        ("", "persistentvolumeclaims", "delete", "only a member replacement deletes a volume claim"),
        ("", "secrets", "patch", "only a cluster with spec.tls has certificates written (tests/tests/k8s_security.rs)"),
    ];
    let decisions = authorizer.decisions();
    let denied: Vec<&Request> = decisions.iter().filter(|d| !d.allowed).map(|d| &d.request).collect();
    assert!(
        denied.is_empty(),
        "the chart's RBAC denied the operator (add to operator/src/rbac.rs and the chart): {denied:#?}"
    );
    let used: BTreeSet<(String, String, String)> = decisions
        .iter()
        .filter_map(|d| match &d.request {
            // As RBAC names it (`kvstoreclusters/status`), to compare with what the chart grants.
            Request::Resource(a) => Some((a.group.clone(), a.rbac_resource(), a.verb.clone())),
            Request::NonResource { .. } => None,
        })
        .collect();
    let unused: Vec<_> = authorizer
        .granted()
        .into_iter()
        .filter(|g| !used.contains(g))
        .filter(|(g, r, v)| {
            !NOT_ALWAYS_USED.iter().any(|&(eg, er, ev, _)| (g.as_str(), r.as_str(), v.as_str()) == (eg, er, ev))
        })
        .collect();
    assert!(
        unused.is_empty(),
        "the chart grants what the operator never asked for (remove it from operator/src/rbac.rs): {unused:#?}"
    );
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server (KUBECONFIG) and helm; scripts/test starts one"]
async fn helm_install_then_create_scale_and_uninstall() {
    let client = api_client().await;
    let namespace = fresh_namespace(&client, "kvs-helm-e2e").await;
    let ns = namespace.name().to_owned();
    let release = "kvstore-operator";
    let chart = workspace_root().join("charts/kvstore-operator");
    let root = tempfile::tempdir().unwrap();

    // helm install (the README's command, in this test's namespace).
    adopt_existing_crds(release, &ns);
    helm(&["install", release, chart.to_str().unwrap(), "--namespace", &ns]);
    for crd in CRDS {
        kubectl(&["wait", "--for=condition=established", crd, "--timeout=30s"]);
    }
    let notes = helm(&["status", release, "--namespace", &ns]);
    assert!(notes.contains("kubectl get kvsc"), "NOTES tell the user what to do next:\n{notes}");
    let role: ClusterRole = Api::all(client.clone()).get(release).await.unwrap();
    assert!(!role.rules.unwrap().is_empty());

    // The operator runs as its Deployment says; the node pods run under the stand-in kubelet.
    // The operator's HTTP endpoint and the pods' addresses, on a loopback net of this test's own.
    let net = LoopbackNet::take();
    let http = &net.service(8081);
    let (args, mut env, account) = operator_from_deployment(&client, &ns, release, http).await;
    assert_eq!(args, ["run"]);
    // With the permissions the chart binds to its ServiceAccount, and no others.
    let authorizer = RbacProxy::start(&ns, &account, root.path()).unwrap();
    env.push(("KUBECONFIG".into(), authorizer.kubeconfig().display().to_string()));
    let _operator = OperatorProcess::start(&args, &env, &root.path().join("operator.log"));
    let ready = eventually("the operator is ready and leads", STEP, || async {
        let body = get_text(&format!("http://{http}/readyz")).await?;
        body.contains("leader").then_some(body)
    })
    .await;
    assert_eq!(ready, "ready (leader)");
    let opts = KubeletOptions { node_bin: node_binary(), root: root.path().to_owned(), address_prefix: net.prefix() };
    let kubelet = StandInKubelet::start(client.clone(), &ns, opts).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    // kubectl apply -f examples/cluster.yaml → Available.
    kubectl(&["apply", "-n", &ns, "-f", workspace_root().join("examples/cluster.yaml").to_str().unwrap()]);
    wait_running(&ns, "demo", 4, 2, "the example cluster: 4 nodes, 2 partitions").await;
    write_keys(&pods, "demo", KEYS).await;

    // A backup as a custom resource (to a directory: the operator runs on this machine) → Succeeded.
    let backup = root.path().join("backup.yaml");
    let destination = format!("file://{}/backups/demo", root.path().display());
    let yaml = format!(
        "apiVersion: kvstore.dev/v1alpha1\nkind: KVStoreBackup\nmetadata:\n  name: first\nspec:\n  cluster: demo\n  \
         destination: {destination}\n"
    );
    std::fs::write(&backup, yaml).unwrap();
    kubectl(&["apply", "-n", &ns, "-f", backup.to_str().unwrap()]);
    eventually("the backup succeeded", STEP, || async {
        let phase = kubectl(&["get", "-n", &ns, "kvsb", "first", "-o", "jsonpath={.status.phase}"]);
        (phase == "Succeeded").then_some(())
    })
    .await;

    // A schedule (every second, keeping one): it creates backups and deletes the older ones.
    let schedule = root.path().join("schedule.yaml");
    let yaml = format!(
        "apiVersion: kvstore.dev/v1alpha1\nkind: KVStoreBackupSchedule\nmetadata:\n  name: often\nspec:\n  cluster: \
         demo\n  schedule: \"* * * * * *\"\n  destination: {destination}-often\n  keep: 1\n"
    );
    std::fs::write(&schedule, yaml).unwrap();
    kubectl(&["apply", "-n", &ns, "-f", schedule.to_str().unwrap()]);
    eventually("the schedule deleted an older backup", STEP, || async {
        let reasons = kubectl(&["get", "-n", &ns, "events.events.k8s.io", "-o", "custom-columns=R:.reason"]);
        reasons.contains("BackupDeleted").then_some(())
    })
    .await;
    kubectl(&["delete", "-n", &ns, "kvsbs", "often"]);

    // kubectl patch to 6 replicas → rebalanced.
    kubectl(&["patch", "-n", &ns, "kvsc", "demo", "--type", "merge", "-p", r#"{"spec":{"replicas":6}}"#]);
    wait_running(&ns, "demo", 6, 3, "6 nodes, 3 partitions").await;
    assert_keys(&pods, "demo", KEYS, "after kubectl patch replicas 6").await;

    // kubectl scale to 2 → drained and shrunk.
    kubectl(&["scale", "-n", &ns, "kvsc", "demo", "--replicas=2"]);
    wait_running(&ns, "demo", 2, 1, "2 nodes, 1 partition").await;
    let sts: StatefulSet = Api::namespaced(client.clone(), &ns).get("demo").await.unwrap();
    assert_eq!(sts.spec.unwrap().replicas, Some(2));
    eventually("the removed pods are gone", STEP, || async {
        (pod_addresses(&pods, "demo").await.len() == 2).then_some(())
    })
    .await;
    assert_keys(&pods, "demo", KEYS, "after kubectl scale --replicas=2").await;
    let metrics = get_text(&format!("http://{http}/metrics")).await.expect("the operator's metrics");
    assert!(metrics.contains(r#"kvs_operator_view_changes_total{result="ok"}"#), "{metrics}");

    // Delete the cluster while the operator still runs (its finalizer cleans up), then uninstall.
    kubectl(&["delete", "-n", &ns, "kvsc", "demo", "--timeout=60s"]);
    eventually("the cluster's StatefulSet is gone", STEP, || async {
        Api::<StatefulSet>::namespaced(client.clone(), &ns).get_opt("demo").await.unwrap().is_none().then_some(())
    })
    .await;
    assert_least_privilege(&authorizer);
    helm(&["uninstall", release, "--namespace", &ns]);
    assert!(Api::<Deployment>::namespaced(client.clone(), &ns).get_opt(release).await.unwrap().is_none());
    assert!(Api::<ClusterRole>::all(client.clone()).get_opt(release).await.unwrap().is_none());
    // The CRDs stay (helm.sh/resource-policy: keep): uninstalling the operator never deletes data.
    for crd in CRDS {
        kubectl(&["get", crd]);
    }
    kubelet.stop().await;
}
