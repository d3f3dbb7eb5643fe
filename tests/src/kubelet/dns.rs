//! Cluster DNS, as a hosts file. `<root>/hosts` has one line
//! `<podIP> <hostname>.<subdomain>.<namespace>.svc.cluster.local` per Pod that has its IP (a slot
//! here, started or not, as cluster DNS publishes a headless Service's not-ready addresses) and is
//! not being stopped, written before the tick starts processes; every process gets `KVS_HOSTS_FILE=<root>/hosts` ([`HOSTS_FILE_ENV`]) and
//! resolves through it the names cluster DNS would. Unlike real DNS it does not require a headless
//! Service named `subdomain`.
//!
//! Invariant: a reader sees the old or the new file, never a mix (temp file + rename); the file is
//! rewritten only when its content changes.

use super::Kubelet;
use super::pod::Slot;
use std::collections::BTreeMap;
use std::path::Path;

/// The environment variable that points a node at the simulated DNS (the hosts file).
pub const HOSTS_FILE_ENV: &str = "KVS_HOSTS_FILE";

/// The (IP, name) of every Pod cluster DNS would name now.
fn entries(slots: &BTreeMap<String, Slot>, namespace: &str) -> Vec<(String, String)> {
    slots
        .values()
        .filter(|s| s.container.stopping.is_none())
        .filter_map(|s| {
            let spec = s.pod.spec.as_ref()?;
            let subdomain = spec.subdomain.as_deref().filter(|d| !d.is_empty())?;
            let hostname = spec.hostname.clone().unwrap_or_else(|| s.name());
            Some((s.ip.clone(), format!("{hostname}.{subdomain}.{namespace}.svc.cluster.local")))
        })
        .collect()
}

fn hosts_content(entries: &[(String, String)]) -> String {
    let mut lines: Vec<String> = entries.iter().map(|(ip, name)| format!("{ip} {name}\n")).collect();
    lines.sort();
    lines.concat()
}

/// Replaces `path` so a reader sees the old or the new content, never a mix.
pub(super) fn write_atomically(path: &Path, content: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)
}

impl Kubelet {
    /// Rewrites the hosts file when the set of names changed.
    pub(super) fn write_hosts(&mut self) {
        let content = hosts_content(&entries(&self.slots, &self.shared.namespace));
        if self.hosts_written.as_ref() == Some(&content) {
            return;
        }
        match write_atomically(&self.shared.hosts_file(), &content) {
            Ok(()) => {
                self.resolved("hosts file");
                self.hosts_written = Some(content);
            }
            Err(e) => self.complain("hosts file", e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;
    use std::time::{Duration, Instant};

    #[test]
    fn hosts_lines_are_sorted_and_terminated() {
        let entries = vec![
            ("127.0.61.2".to_owned(), "b.s.t.svc.cluster.local".to_owned()),
            ("127.0.61.1".to_owned(), "a.s.t.svc.cluster.local".to_owned()),
        ];
        assert_eq!(hosts_content(&entries), "127.0.61.1 a.s.t.svc.cluster.local\n127.0.61.2 b.s.t.svc.cluster.local\n");
        assert_eq!(hosts_content(&[]), "");
    }

    #[test]
    fn pods_with_an_ip_and_a_subdomain_not_being_stopped_are_named() {
        let slot = |name: &str, host: u8, subdomain: Option<&str>| {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": { "name": name, "uid": name },
                "spec": { "hostname": name, "subdomain": subdomain, "containers": [] }
            }))
            .expect("a valid Pod");
            Slot::new(pod, "s".into(), "127.0.61.", host)
        };
        let mut slots = BTreeMap::new();
        for (name, host, subdomain) in [("a-0", 1, Some("nodes")), ("a-1", 2, Some("nodes")), ("b-0", 3, None)] {
            let mut s = slot(name, host, subdomain);
            s.container.started(Instant::now());
            slots.insert(name.to_owned(), s);
        }
        slots.insert("a-2".into(), slot("a-2", 4, Some("nodes")));
        if let Some(s) = slots.get_mut("a-1") {
            s.container.stop(Duration::ZERO, true, Instant::now());
        }
        // a-2 has not started yet but has its IP: named, as cluster DNS names not-ready addresses.
        assert_eq!(
            entries(&slots, "t"),
            [
                ("127.0.61.1".to_owned(), "a-0.nodes.t.svc.cluster.local".to_owned()),
                ("127.0.61.4".to_owned(), "a-2.nodes.t.svc.cluster.local".to_owned())
            ]
        );
    }
}
