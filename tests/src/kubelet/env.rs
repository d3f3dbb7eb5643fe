//! What a container starts with ([`Launch`]): its environment, arguments and volumes, resolved the
//! way the kubelet resolves them, with the rewrites that stand in for a Pod's own network and mount
//! namespaces.
//!
//! - **Environment**, in order: `value` with Kubernetes `$(VAR)` expansion of variables defined
//!   before it (`$$` escapes), `valueFrom.fieldRef` (`metadata.name`, `metadata.namespace`,
//!   `metadata.uid`, `status.podIP`), `secretKeyRef` and `configMapKeyRef` read through the API.
//!   A missing Secret, ConfigMap or key (not marked `optional`) is an error, which keeps the
//!   container waiting ([`super::runtime`]). Every process also gets `HOSTNAME` and
//!   [`super::HOSTS_FILE_ENV`]. `args` get the same `$(VAR)` expansion. A test aid, not a kubelet
//!   behaviour: when the test runs with `KVS_TEST_LOG` set (as every multi-process test honours
//!   it) and the Pod sets no `RUST_LOG`, the container gets `RUST_LOG` from it.
//! - **Pod network.** Real Pods each have a network namespace, so they all bind `0.0.0.0`; here they
//!   share the host's loopback, so an env var `LISTEN=0.0.0.0:<port>` is rewritten to
//!   `LISTEN=<podIP>:<port>`.
//! - **Volumes**: `persistentVolumeClaim`, `emptyDir` and `secret` (all keys, or `items`). The claim
//!   `<claim>-<pod>` is the directory `<root>/pvc/<namespace>/<claim>-<pod>`, kept when the Pod
//!   goes. `emptyDir` and `secret` volumes are directories under `<root>/pods/<namespace>/<pod
//!   uid>/`. There is no mount namespace, so an env var (or arg) whose value is a mount path `M` or
//!   starts with `M/` is rewritten to the directory (the longest mount path wins). `secret` volumes
//!   follow their Secret while the Pod runs (each tick; a changed file replaced in one step).
//!
//! Not simulated: `envFrom`, `resourceFieldRef` and other field paths, other volume types.

use super::Kubelet;
use k8s_openapi::api::core::v1::{Container, EnvVarSource, Pod, PodSpec, Volume};
use kube::ResourceExt;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::PathBuf;

/// What a container is started with.
pub(super) struct Launch {
    pub(super) env: Vec<(String, String)>,
    pub(super) args: Vec<String>,
}

impl Kubelet {
    /// The container's environment and arguments, with the simulations of the module docs applied.
    pub(super) async fn launch_config(&self, pod: &Pod, ip: &str) -> Result<Launch, String> {
        let spec = pod.spec.as_ref().ok_or("the pod has no spec")?;
        let container = spec.containers.first().ok_or("the pod has no containers")?;
        if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
            return Err("envFrom is not simulated by the stand-in kubelet".into());
        }
        let mut mounts = self.mount_volumes(pod, spec, container).await?;
        // Longest mount path first, so a nested mount wins over its parent.
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        let mut env: Vec<(String, String)> = Vec::new();
        let mut vars: HashMap<String, String> = HashMap::new();
        for var in container.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (_, Some(source)) => match self.env_source(pod, ip, source).await? {
                    Some(v) => v,
                    None => continue,
                },
                (Some(v), None) => expand(v, &vars),
                (None, None) => String::new(),
            };
            let value = simulate(&var.name, &value, ip, &mounts);
            vars.insert(var.name.clone(), value.clone());
            env.retain(|(k, _)| *k != var.name);
            env.push((var.name.clone(), value));
        }
        env.push(("HOSTNAME".into(), pod.name_any()));
        if let Ok(filter) = std::env::var("KVS_TEST_LOG")
            && !env.iter().any(|(k, _)| k == "RUST_LOG")
        {
            env.push(("RUST_LOG".into(), filter));
        }
        env.push((super::HOSTS_FILE_ENV.into(), self.shared.hosts_file().display().to_string()));
        let args = container.args.iter().flatten().map(|a| rewrite_mounts(&expand(a, &vars), &mounts)).collect();
        Ok(Launch { env, args })
    }

    async fn env_source(&self, pod: &Pod, ip: &str, source: &EnvVarSource) -> Result<Option<String>, String> {
        let ns = &self.shared.namespace;
        if let Some(field) = &source.field_ref {
            return match field.field_path.as_str() {
                "metadata.name" => Ok(Some(pod.name_any())),
                "metadata.namespace" => Ok(Some(ns.clone())),
                "metadata.uid" => Ok(pod.metadata.uid.clone()),
                "status.podIP" => Ok(Some(ip.to_owned())),
                other => Err(format!("fieldRef {other} is not simulated by the stand-in kubelet")),
            };
        }
        if let Some(sel) = &source.secret_key_ref {
            let secret =
                self.secrets.get_opt(&sel.name).await.map_err(|e| format!("reading secret {:?}: {e}", sel.name))?;
            let value = secret
                .as_ref()
                .and_then(|s| s.data.as_ref()?.get(&sel.key))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned());
            return match (value, secret.is_some()) {
                (Some(v), _) => Ok(Some(v)),
                (None, _) if sel.optional == Some(true) => Ok(None),
                (None, true) => Err(format!("couldn't find key {} in Secret {ns}/{}", sel.key, sel.name)),
                (None, false) => Err(format!("secret {:?} not found", sel.name)),
            };
        }
        if let Some(sel) = &source.config_map_key_ref {
            let map = self
                .config_maps
                .get_opt(&sel.name)
                .await
                .map_err(|e| format!("reading configmap {:?}: {e}", sel.name))?;
            let value = map.as_ref().and_then(|m| m.data.as_ref()?.get(&sel.key)).cloned();
            return match (value, map.is_some()) {
                (Some(v), _) => Ok(Some(v)),
                (None, _) if sel.optional == Some(true) => Ok(None),
                (None, true) => Err(format!("couldn't find key {} in ConfigMap {ns}/{}", sel.key, sel.name)),
                (None, false) => Err(format!("configmap {:?} not found", sel.name)),
            };
        }
        Err("this valueFrom is not simulated by the stand-in kubelet (fieldRef, secretKeyRef and configMapKeyRef are)"
            .into())
    }

    /// The container's mounts as (mount path, host directory), creating the directories.
    async fn mount_volumes(
        &self,
        pod: &Pod,
        spec: &PodSpec,
        container: &Container,
    ) -> Result<Vec<(String, PathBuf)>, String> {
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        let mut mounts = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let volume: &Volume = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .ok_or_else(|| format!("volume {:?} is mounted but not defined", mount.name))?;
            let dir = if let Some(claim) = &volume.persistent_volume_claim {
                self.shared.claim_dir(&claim.claim_name)
            } else if volume.empty_dir.is_some() {
                self.shared.pod_volume_dir(uid, &volume.name)
            } else if volume.secret.is_some() {
                self.secret_volume(uid, volume).await?
            } else {
                return Err(format!(
                    "volume {:?}: only persistentVolumeClaim, emptyDir and secret volumes are simulated by the stand-in kubelet",
                    volume.name
                ));
            };
            let dir = match mount.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => dir.join(sub),
                _ => dir,
            };
            fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            let path = mount.mount_path.trim_end_matches('/');
            mounts.push((if path.is_empty() { "/".to_owned() } else { path.to_owned() }, dir));
        }
        Ok(mounts)
    }

    /// Writes a `secret` volume's files into its directory and returns the directory.
    async fn secret_volume(&self, pod_uid: &str, volume: &Volume) -> Result<PathBuf, String> {
        let Some(source) = &volume.secret else { return Err(format!("volume {:?} is no secret", volume.name)) };
        let dir = self.shared.pod_volume_dir(pod_uid, &volume.name);
        let name = source.secret_name.clone().unwrap_or_default();
        let secret = self.secrets.get_opt(&name).await.map_err(|e| format!("reading secret {name:?}: {e}"))?;
        let data = match secret {
            Some(s) => s.data.unwrap_or_default(),
            None if source.optional == Some(true) => BTreeMap::new(),
            None => return Err(format!("secret {name:?} not found (volume {:?})", volume.name)),
        };
        let files: Vec<(String, String)> = match &source.items {
            Some(items) => items.iter().map(|i| (i.key.clone(), i.path.clone())).collect(),
            None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
        };
        for (key, path) in files {
            let bytes = data
                .get(&key)
                .ok_or_else(|| format!("couldn't find key {key} in Secret {name} (volume {:?})", volume.name))?;
            let file = dir.join(&path);
            if let Some(parent) = file.parent() {
                fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
            }
            // Unchanged files are left alone; a changed one is replaced in one step (a reader never
            // sees half of it), as the kubelet's atomic writer does.
            if fs::read(&file).ok().as_deref() != Some(bytes.0.as_slice()) {
                let beside = file.with_extension("kubelet-tmp");
                fs::write(&beside, &bytes.0).map_err(|e| format!("writing {}: {e}", beside.display()))?;
                fs::rename(&beside, &file).map_err(|e| format!("replacing {}: {e}", file.display()))?;
            }
        }
        Ok(dir)
    }

    /// Brings the `secret` volumes of the running Pods up to date with their Secrets, as the
    /// kubelet does for mounted Secrets (here every tick; a real kubelet within its sync period,
    /// about a minute). A Secret that cannot be read leaves the files as they were.
    pub(super) async fn refresh_secret_volumes(&mut self) {
        let mut failures = Vec::new();
        for slot in self.slots.values().filter(|s| s.process.is_some()) {
            let volumes = slot.pod.spec.iter().flat_map(|s| s.volumes.iter().flatten());
            for volume in volumes.filter(|v| v.secret.is_some()) {
                if let Err(e) = self.secret_volume(&slot.uid, volume).await {
                    failures.push((format!("refreshing {}", slot.pod.name_any()), e));
                }
            }
        }
        for (key, e) in failures {
            self.complain(key, e);
        }
    }
}

/// Kubernetes' `$(VAR)` expansion: a reference to a defined variable becomes its value, `$$`
/// becomes `$`, anything else (an undefined name, an unclosed `$(`) stays as written.
fn expand(input: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(reference) = after.strip_prefix('(')
            && let Some(close) = reference.find(')')
        {
            let name = &reference[..close];
            match vars.get(name) {
                Some(value) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &reference[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Applies the network and volume simulations to one environment variable.
fn simulate(name: &str, value: &str, ip: &str, mounts: &[(String, PathBuf)]) -> String {
    if name == "LISTEN"
        && let Some(port) = value.strip_prefix("0.0.0.0:")
    {
        return format!("{ip}:{port}");
    }
    rewrite_mounts(value, mounts)
}

/// `M` or `M/...` for a mount path `M` becomes the directory standing in for the volume.
fn rewrite_mounts(value: &str, mounts: &[(String, PathBuf)]) -> String {
    for (path, dir) in mounts {
        if value == path {
            return dir.display().to_string();
        }
        if let Some(rest) = value.strip_prefix(path.as_str()).and_then(|r| r.strip_prefix('/')) {
            return dir.join(rest).display().to_string();
        }
    }
    value.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn expand_follows_kubernetes() {
        let v = vars(&[("POD_NAME", "demo-0"), ("NS", "t")]);
        assert_eq!(expand("$(POD_NAME).demo-nodes.$(NS).svc:8080", &v), "demo-0.demo-nodes.t.svc:8080");
        assert_eq!(expand("$(MISSING)-x", &v), "$(MISSING)-x");
        assert_eq!(expand("$$(POD_NAME)", &v), "$(POD_NAME)");
        assert_eq!(expand("cost $5 and $(POD_NAME", &v), "cost $5 and $(POD_NAME");
        assert_eq!(expand("trailing $", &v), "trailing $");
        assert_eq!(expand("", &v), "");
    }

    #[test]
    fn simulate_rewrites_listen_and_mounts() {
        let mounts = vec![("/data/sub".to_owned(), PathBuf::from("/r/b")), ("/data".to_owned(), PathBuf::from("/r/a"))];
        assert_eq!(simulate("LISTEN", "0.0.0.0:8080", "127.0.61.3", &mounts), "127.0.61.3:8080");
        assert_eq!(simulate("LISTEN", "127.0.0.1:8080", "127.0.61.3", &mounts), "127.0.0.1:8080");
        assert_eq!(simulate("OTHER", "0.0.0.0:8080", "127.0.61.3", &mounts), "0.0.0.0:8080");
        assert_eq!(simulate("KVS_DATA_DIR", "/data", "ip", &mounts), "/r/a");
        assert_eq!(simulate("X", "/data/wal", "ip", &mounts), "/r/a/wal");
        assert_eq!(simulate("X", "/data/sub/x", "ip", &mounts), "/r/b/x");
        assert_eq!(simulate("X", "/database", "ip", &mounts), "/database");
    }
}
