//! Name resolution for peer addresses: an optional hosts file (`--hosts-file`, `/etc/hosts`
//! format) consulted before the system resolver.
//!
//! In Kubernetes a node's identity is its stable DNS name (`pod.service.namespace.svc...`) and
//! cluster DNS resolves it. Environments without cluster DNS (the test control plane, a laptop)
//! provide the same mapping as a file instead. The file is re-read when its modification time
//! changes, so a pod that comes back on another address is found again; a name it does not list
//! goes to the system resolver as usual.

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

/// Parses `/etc/hosts`-format text: `address name [name...]`, `#` comments. Later lines win.
pub fn parse_hosts(text: &str) -> HashMap<String, IpAddr> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        let Some(ip) = fields.next().and_then(|a| a.parse::<IpAddr>().ok()) else { continue };
        for name in fields {
            out.insert(name.to_ascii_lowercase(), ip);
        }
    }
    out
}

/// Resolves names from a hosts file first, then through the system.
pub struct HostsFileResolver {
    path: PathBuf,
    /// The parsed file and the modification time it was read at. `std` lock, never held across
    /// `.await` (reading a small file under it is fine: lookups are rare, connections are pooled).
    cache: Mutex<(Option<SystemTime>, HashMap<String, IpAddr>)>,
}

impl HostsFileResolver {
    pub fn new(path: PathBuf) -> Self {
        HostsFileResolver { path, cache: Mutex::new((None, HashMap::new())) }
    }

    /// The address the file gives `name`, reading the file again if it changed.
    pub fn lookup(&self, name: &str) -> Option<IpAddr> {
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if modified != cache.0 || modified.is_none() {
            let text = std::fs::read_to_string(&self.path).unwrap_or_default();
            *cache = (modified, parse_hosts(&text));
        }
        cache.1.get(&name.to_ascii_lowercase()).copied()
    }
}

impl Resolve for HostsFileResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let listed = self.lookup(name.as_str());
        let name = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: the connector puts in the URL's port.
            let addrs: Vec<SocketAddr> = match listed {
                Some(ip) => vec![SocketAddr::new(ip, 0)],
                None => tokio::net::lookup_host((name.as_str(), 0)).await?.collect(),
            };
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_format() {
        let hosts = parse_hosts(
            "# comment\n127.0.61.1 demo-0.demo-nodes.ns.svc.cluster.local demo-0\n\nbad line\n127.0.61.2 B # x\n",
        );
        assert_eq!(hosts["demo-0.demo-nodes.ns.svc.cluster.local"], "127.0.61.1".parse::<IpAddr>().unwrap());
        assert_eq!(hosts["demo-0"], "127.0.61.1".parse::<IpAddr>().unwrap());
        assert_eq!(hosts["b"], "127.0.61.2".parse::<IpAddr>().unwrap());
        assert_eq!(hosts.len(), 3);
    }

    #[test]
    fn rereads_the_file_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        let resolver = HostsFileResolver::new(path.clone());
        assert_eq!(resolver.lookup("a.example"), None, "a missing file lists nothing");
        std::fs::write(&path, "127.0.0.5 a.example\n").unwrap();
        assert_eq!(resolver.lookup("A.example"), Some("127.0.0.5".parse().unwrap()));
        // A new file (different mtime) moves the name.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let tmp = dir.path().join("hosts.new");
        std::fs::write(&tmp, "127.0.0.6 a.example\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(resolver.lookup("a.example"), Some("127.0.0.6".parse().unwrap()));
    }
}
