//! The Helm chart (`charts/kvstore-operator`): it lints clean, grants exactly what the operator
//! uses (`kvs_operator::rbac::RULES`, compared both ways), renders the generated CRD, rejects bad
//! values through `values.schema.json`, applies to a real API server, and `helm upgrade` upgrades
//! the CRD while `helm uninstall` keeps it.
//!
//! Every test runs `helm` (and some `kubectl` against `KUBECONFIG`), so they are ignored by default:
//!
//! ```sh
//! eval "$(../shared/k8s/up)" && cargo test -p kvs-operator --test chart -- --ignored; ../shared/k8s/down
//! ```
//!
//! `HELM` and `KUBECTL` override the binaries found on `PATH`.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kvs_operator::rbac::RULES;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const CRD_NAME: &str = "kvstoreclusters.kvstore.dev";

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/kvstore-operator")
}

fn tool(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

/// Runs `program args`, feeding `stdin`; Ok(stdout) on success, Err(stdout + stderr) otherwise.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program} (on PATH after `eval \"$(../shared/k8s/up)\"`): {e}"));
    if let Some(input) = stdin {
        child.stdin.take().expect("piped").write_all(input.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{program} {}: {}\n{stdout}{}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr)))
    }
}

fn helm(args: &[&str]) -> Result<String, String> {
    run(&tool("HELM", "helm"), args, None)
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    run(&tool("KUBECTL", "kubectl"), args, stdin)
}

/// `helm template` of the chart as release `kvs` in namespace `kvstore-system`, with `--set`s.
fn template(sets: &[&str]) -> Result<String, String> {
    let chart = chart_dir();
    let mut args = vec!["template", "kvs", chart.to_str().expect("utf-8 path"), "--namespace", "kvstore-system"];
    for s in sets {
        args.extend(["--set", s]);
    }
    helm(&args)
}

/// The rendered objects (empty documents dropped).
fn objects(rendered: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(rendered)
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("helm renders valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(v: &serde_yaml::Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

fn of_kind<T: serde::de::DeserializeOwned>(objs: &[serde_yaml::Value], k: &str) -> Vec<T> {
    objs.iter()
        .filter(|o| kind(o) == k)
        .map(|o| serde_yaml::from_value(o.clone()).unwrap_or_else(|e| panic!("{k}: {e}")))
        .collect()
}

type Grant = (String, String, String);

/// Every (group, resource, verb) a list of rules grants; wildcards and narrowing fields are refused.
fn grants(rules: &[PolicyRule]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for r in rules {
        assert!(r.resource_names.is_none() && r.non_resource_urls.is_none(), "unexpected rule shape: {r:?}");
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    assert!(![g, res, v].iter().any(|s| s.contains('*')), "wildcard in {r:?}");
                    out.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    out
}

fn rbac_rs_grants(filter: impl Fn(&str) -> bool) -> BTreeSet<Grant> {
    RULES
        .iter()
        .filter(|r| filter(r.group))
        .flat_map(|r| r.verbs.iter().map(|v| (r.group.to_owned(), r.resource.to_owned(), (*v).to_owned())))
        .collect()
}

fn assert_same_grants(chart: &BTreeSet<Grant>, code: &BTreeSet<Grant>, what: &str) {
    let missing: Vec<_> = code.difference(chart).collect();
    let extra: Vec<_> = chart.difference(code).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what} differs from operator/src/rbac.rs RULES\n  missing from the chart: {missing:?}\n  granted but not in RULES: {extra:?}"
    );
}

#[test]
#[ignore = "needs helm and a Kubernetes API server (KUBECONFIG); scripts/test starts one"]
fn lint_strict() {
    let chart = chart_dir();
    let chart = chart.to_str().expect("utf-8 path");
    for sets in
        ["", "serviceMonitor.enabled=true,networkPolicy.enabled=true", "watchNamespace=prod,networkPolicy.enabled=true"]
    {
        let mut args = vec!["lint", "--strict", chart];
        if !sets.is_empty() {
            args.extend(["--set", sets]);
        }
        helm(&args).unwrap_or_else(|e| panic!("helm lint --strict with [{sets}]: {e}"));
    }
}

#[test]
#[ignore = "needs helm and a Kubernetes API server (KUBECONFIG); scripts/test starts one"]
fn cluster_role_grants_exactly_rbac_rules() {
    let objs = objects(&template(&[]).expect("renders"));
    let roles: Vec<ClusterRole> = of_kind(&objs, "ClusterRole");
    assert_eq!(roles.len(), 1, "one ClusterRole");
    let rules = roles[0].rules.as_deref().unwrap_or_default();
    assert_same_grants(&grants(rules), &rbac_rs_grants(|_| true), "the ClusterRole");

    let bindings: Vec<ClusterRoleBinding> = of_kind(&objs, "ClusterRoleBinding");
    assert_eq!(bindings.len(), 1, "one ClusterRoleBinding");
    assert_eq!(bindings[0].role_ref.name, roles[0].metadata.name.clone().expect("named"));
    let subject = &bindings[0].subjects.as_ref().expect("subjects")[0];
    assert_eq!((subject.kind.as_str(), subject.namespace.as_deref()), ("ServiceAccount", Some("kvstore-system")));
    assert!(of_kind::<Role>(&objs, "Role").is_empty(), "no Roles when watching every namespace");
}

#[test]
#[ignore = "needs helm and a Kubernetes API server (KUBECONFIG); scripts/test starts one"]
fn watch_namespace_grants_exactly_rbac_rules_in_roles() {
    let objs = objects(&template(&["watchNamespace=prod"]).expect("renders"));
    assert!(of_kind::<ClusterRole>(&objs, "ClusterRole").is_empty(), "nothing cluster-wide");
    assert!(of_kind::<ClusterRoleBinding>(&objs, "ClusterRoleBinding").is_empty(), "nothing cluster-wide");
    let roles: Vec<Role> = of_kind(&objs, "Role");
    let in_ns = |ns: &str| -> BTreeSet<Grant> {
        roles
            .iter()
            .filter(|r| r.metadata.namespace.as_deref() == Some(ns))
            .flat_map(|r| grants(r.rules.as_deref().unwrap_or_default()))
            .collect()
    };
    // The Lease is in the operator's namespace; everything else in the watched one.
    assert_same_grants(
        &in_ns("prod"),
        &rbac_rs_grants(|g| g != "coordination.k8s.io"),
        "the Role in the watched namespace",
    );
    assert_same_grants(
        &in_ns("kvstore-system"),
        &rbac_rs_grants(|g| g == "coordination.k8s.io"),
        "the leader-election Role",
    );
    let deployments: Vec<Deployment> = of_kind(&objs, "Deployment");
    let env = deployments[0].spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec").containers[0]
        .env
        .clone();
    assert!(
        env.unwrap_or_default()
            .iter()
            .any(|e| e.name == "KVS_OPERATOR_NAMESPACE" && e.value.as_deref() == Some("prod"))
    );
}

#[test]
#[ignore = "needs helm and a Kubernetes API server (KUBECONFIG); scripts/test starts one"]
fn deployment_runs_the_operator_as_specified() {
    let objs = objects(&template(&[]).expect("renders"));
    let deployments: Vec<Deployment> = of_kind(&objs, "Deployment");
    assert_eq!(deployments.len(), 1);
    let spec = deployments[0].spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(2), "two replicas for leader election by default");
    let pod = spec.template.spec.as_ref().expect("pod spec");
    let c = &pod.containers[0];
    assert_eq!(c.args.as_deref(), Some(&["run".to_owned()][..]));
    let env: BTreeMap<_, _> = c.env.iter().flatten().map(|e| (e.name.as_str(), e)).collect();
    let field =
        |name: &str| env[name].value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.clone());
    assert_eq!(field("POD_NAME").as_deref(), Some("metadata.name"));
    assert_eq!(field("POD_NAMESPACE").as_deref(), Some("metadata.namespace"));
    assert_eq!(env["KVS_OPERATOR_HTTP_ADDRESS"].value.as_deref(), Some("0.0.0.0:8081"));
    assert!(!env.contains_key("KVS_OPERATOR_NAMESPACE"), "watches every namespace by default");
    let port = c.ports.iter().flatten().find(|p| p.name.as_deref() == Some("http")).expect("http port");
    assert_eq!(port.container_port, 8081);
    for (probe, path) in [(&c.liveness_probe, "/healthz"), (&c.readiness_probe, "/readyz")] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("HTTP probe");
        assert_eq!(get.path.as_deref(), Some(path));
    }
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.capabilities.as_ref().and_then(|c| c.drop.clone()), Some(vec!["ALL".to_owned()]));
    let psc = pod.security_context.as_ref().expect("pod securityContext");
    assert_eq!(psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()), Some("RuntimeDefault"));
}

#[test]
#[ignore = "needs helm and a Kubernetes API server (KUBECONFIG); scripts/test starts one"]
fn rendered_crds_are_the_generated_crds_plus_keep() {
    let generated: BTreeMap<String, CustomResourceDefinition> =
        kvs_operator::crd::definitions().into_iter().map(|(_, crd)| (crd.name_any(), crd)).collect();
    let crds_of = |sets: &[&str]| -> BTreeMap<String, CustomResourceDefinition> {
        let crds: Vec<CustomResourceDefinition> =
            of_kind(&objects(&template(sets).expect("renders")), "CustomResourceDefinition");
        crds.into_iter().map(|crd| (crd.name_any(), crd)).collect()
    };

    let mut kept = crds_of(&[]);
    assert_eq!(
        kept.keys().collect::<Vec<_>>(),
        generated.keys().collect::<Vec<_>>(),
        "every CRD is installed by default"
    );
    for crd in kept.values_mut() {
        let annotations = crd.metadata.annotations.take().expect("annotated");
        assert_eq!(annotations, BTreeMap::from([("helm.sh/resource-policy".to_owned(), "keep".to_owned())]));
    }
    assert_eq!(kept, generated, "the rendered CRDs are the generated ones plus the keep annotation");

    assert_eq!(crds_of(&["crds.keep=false"]), generated, "without crds.keep, exactly the generated CRDs");
    assert!(crds_of(&["crds.install=false"]).is_empty());
}

#[test]
#[ignore = "needs helm and a Kubernetes API server (KUBECONFIG); scripts/test starts one"]
fn network_policies_select_the_node_pods() {
    let objs = objects(&template(&["networkPolicy.enabled=true"]).expect("renders"));
    let policies: Vec<NetworkPolicy> = of_kind(&objs, "NetworkPolicy");
    let nodes = policies
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("kvs-kvstore-operator-nodes"))
        .expect("node policy");
    let spec = nodes.spec.as_ref().expect("spec");
    // The policy's selector must match the labels the operator puts on node pods.
    let pod_labels = kvs_operator::controller::build::labels("demo");
    let selector = spec.pod_selector.as_ref().and_then(|s| s.match_labels.clone()).expect("matchLabels");
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "{selector:?} does not select {pod_labels:?}");
    assert_eq!(selector.get("app.kubernetes.io/managed-by").map(String::as_str), Some("kvs-operator"));
    let ingress = spec.ingress.as_ref().expect("ingress");
    assert_eq!(ingress.len(), 2, "TCP 8080 from nodes, the operator and clients; UDP 8080 (heartbeats) from nodes");
    let port = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(kvs_operator::controller::build::PORT);
    let ports = |i: usize| -> Vec<_> {
        ingress[i].ports.iter().flatten().map(|p| (p.port.clone(), p.protocol.clone())).collect()
    };
    assert_eq!(ports(0), [(Some(port.clone()), Some("TCP".to_owned()))]);
    assert_eq!(ingress[0].from.as_ref().map(Vec::len), Some(3), "nodes, operator, clients");
    assert_eq!(ports(1), [(Some(port), Some("UDP".to_owned()))]);
    assert_eq!(ingress[1].from.as_ref().map(Vec::len), Some(1), "nodes only");
    assert!(policies.iter().any(|p| p.metadata.name.as_deref() == Some("kvs-kvstore-operator")), "operator policy");
}

#[test]
#[ignore = "needs helm and a Kubernetes API server (KUBECONFIG); scripts/test starts one"]
fn schema_rejects_bad_values() {
    template(&[]).expect("the defaults are valid");
    for (set, field) in [
        ("replicaCount=-1", "replicaCount"),
        ("replicaCount=two", "replicaCount"),
        ("logFormat=xml", "logFormat"),
        ("image.pullPolicy=Sometimes", "image.pullPolicy"),
        ("crds.keep=yes", "crds.keep"),
        ("watchNamespace=Not_A_Namespace", "watchNamespace"),
        ("replicas=3", "replicas"),
    ] {
        let err = template(&[set]).err().unwrap_or_else(|| panic!("--set {set} was accepted"));
        assert!(err.contains("schema") && err.contains(field), "--set {set}: {err}");
    }
}

/// A namespace (and release) name no other run uses.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").subsec_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Deletes a namespace (and uninstalls a release in it) when dropped, also when the test panics.
struct Cleanup {
    namespace: String,
    release: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(release) = &self.release {
            let _ = helm(&["uninstall", release, "--namespace", &self.namespace]);
        }
        let _ = kubectl(&["delete", "namespace", &self.namespace, "--wait=false"], None);
    }
}

#[test]
#[ignore = "needs helm and a Kubernetes API server (KUBECONFIG); scripts/test starts one"]
fn applies_to_the_api_server() {
    let ns = unique("kvs-chart-apply");
    kubectl(&["create", "namespace", &ns], None).expect("create namespace");
    let _cleanup = Cleanup { namespace: ns.clone(), release: None };
    let chart = chart_dir();
    // The ServiceMonitor stays off: its CRD (Prometheus Operator) is not on this server.
    for sets in ["networkPolicy.enabled=true".to_owned(), format!("networkPolicy.enabled=true,watchNamespace={ns}")] {
        let rendered =
            helm(&["template", "kvs", chart.to_str().expect("utf-8 path"), "--namespace", &ns, "--set", &sets])
                .expect("renders");
        let out = kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&rendered))
            .unwrap_or_else(|e| panic!("[{sets}]: {e}"));
        for k in
            ["deployment.apps/", "customresourcedefinition.apiextensions.k8s.io/", "networkpolicy.networking.k8s.io/"]
        {
            assert!(out.contains(k), "[{sets}] nothing applied as {k}:\n{out}");
        }
    }
}

fn served_crd() -> serde_json::Value {
    serde_json::from_str(&kubectl(&["get", "crd", CRD_NAME, "-o", "json"], None).expect("CRD exists")).expect("JSON")
}

fn schema_description(crd: &serde_json::Value) -> Option<&str> {
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"].as_str()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read chart dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

#[test]
#[ignore = "needs helm and a Kubernetes API server (KUBECONFIG); scripts/test starts one"]
fn helm_upgrade_upgrades_the_crd_and_uninstall_keeps_it() {
    let ns = unique("kvs-chart-upgrade");
    let release = ns.clone();
    let chart = chart_dir();
    let chart = chart.to_str().expect("utf-8 path");
    kubectl(&["create", "namespace", &ns], None).expect("create namespace");
    let _cleanup = Cleanup { namespace: ns.clone(), release: Some(release.clone()) };

    // A CRD already on the server (applied with kubectl, or kept by an earlier release) is adopted
    // the way docs/operations.md says: by giving it this release's ownership metadata.
    for (_, crd) in kvs_operator::crd::definitions() {
        let name = crd.name_any();
        if kubectl(&["get", "crd", &name], None).is_ok() {
            let owner =
                [format!("meta.helm.sh/release-name={release}"), format!("meta.helm.sh/release-namespace={ns}")];
            kubectl(&["annotate", "crd", &name, "--overwrite", &owner[0], &owner[1]], None).expect("annotate");
            kubectl(&["label", "crd", &name, "--overwrite", "app.kubernetes.io/managed-by=Helm"], None).expect("label");
        }
    }
    helm(&["install", &release, chart, "--namespace", &ns]).expect("helm install");
    let original = schema_description(&served_crd()).map(str::to_owned);

    // The next version of the chart, with a changed CRD: helm upgrade must change the served CRD.
    let next = tempfile::tempdir().expect("tempdir");
    copy_dir(Path::new(chart), next.path());
    let crd_file = next.path().join("files/kvstorecluster.yaml");
    let mut crd: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&crd_file).expect("read")).expect("YAML");
    let marker = format!("upgraded by {release}");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"] = marker.clone().into();
    std::fs::write(&crd_file, serde_yaml::to_string(&crd).expect("YAML")).expect("write");
    helm(&["upgrade", &release, next.path().to_str().expect("utf-8 path"), "--namespace", &ns]).expect("helm upgrade");
    assert_eq!(schema_description(&served_crd()), Some(marker.as_str()), "helm upgrade did not upgrade the CRD");

    // And back, so the server serves the real CRD again.
    helm(&["upgrade", &release, chart, "--namespace", &ns]).expect("helm upgrade back");
    assert_eq!(schema_description(&served_crd()).map(str::to_owned), original);

    // Uninstalling keeps the CRDs (helm.sh/resource-policy: keep), and so every user's clusters
    // and backups.
    helm(&["uninstall", &release, "--namespace", &ns]).expect("helm uninstall");
    for (_, crd) in kvs_operator::crd::definitions() {
        let name = crd.name_any();
        let kept: serde_json::Value =
            serde_json::from_str(&kubectl(&["get", "crd", &name, "-o", "json"], None).expect("kept")).expect("JSON");
        assert_eq!(kept["metadata"]["annotations"]["helm.sh/resource-policy"], "keep", "{name}");
        assert!(kept["metadata"]["deletionTimestamp"].is_null(), "{name} is being deleted");
        // Leave it unowned, as a CRD applied with kubectl would be, for whoever installs next.
        kubectl(&["annotate", "crd", &name, "meta.helm.sh/release-name-", "meta.helm.sh/release-namespace-"], None)
            .expect("annotate");
        kubectl(&["label", "crd", &name, "app.kubernetes.io/managed-by-"], None).expect("label");
    }
}
