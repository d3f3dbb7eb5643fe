//! Readiness probes. The container's `httpGet` readiness probe is sent to `<podIP>:<port>` (or its
//! `host`), over HTTPS when its `scheme` says so (the certificate not verified and none presented,
//! as the kubelet does), on every tick, for all running containers at once; `initialDelaySeconds`,
//! `timeoutSeconds` and `failureThreshold` are honoured, `periodSeconds` is replaced by the tick. A
//! 2xx or 3xx answer is a success. No probe (or one of another kind) means ready once running. A
//! container being stopped is not probed (and not ready).
//!
//! Not simulated: liveness and startup probes, exec, tcpSocket and grpc probes, `successThreshold`.

use super::Kubelet;
use futures::future::join_all;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::time::{Duration, Instant};

#[derive(Debug, PartialEq, Eq)]
struct ProbeTarget {
    url: String,
    timeout: Duration,
    initial_delay: Duration,
    failure_threshold: i32,
}

/// The container's `httpGet` readiness probe aimed at `ip`; `None` when it has none (or an
/// unsimulated kind, which then counts as ready like no probe).
fn readiness_probe(pod: &Pod, ip: &str) -> Option<ProbeTarget> {
    let container = pod.spec.as_ref()?.containers.first()?;
    let probe = container.readiness_probe.as_ref()?;
    let get = probe.http_get.as_ref()?;
    let port = match &get.port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => {
            container.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name.as_str()))?.container_port
        }
    };
    let host = get.host.as_deref().filter(|h| !h.is_empty()).unwrap_or(ip);
    let scheme = if get.scheme.as_deref() == Some("HTTPS") { "https" } else { "http" };
    let path = get.path.as_deref().unwrap_or("/");
    let path = if path.starts_with('/') { path.to_owned() } else { format!("/{path}") };
    let secs =
        |v: Option<i32>, default: i32| Duration::from_secs(u64::from(v.unwrap_or(default).max(0).unsigned_abs()));
    Some(ProbeTarget {
        url: format!("{scheme}://{host}:{port}{path}"),
        timeout: secs(probe.timeout_seconds, 1).max(Duration::from_millis(100)),
        initial_delay: secs(probe.initial_delay_seconds, 0),
        failure_threshold: probe.failure_threshold.unwrap_or(3).max(1),
    })
}

/// The kubelet's probe client: plain HTTP, or HTTPS that verifies nothing (a probe asks whether
/// the process answers, not who it is).
pub(super) fn probe_client() -> reqwest::Client {
    let config = rustls::ClientConfig::builder_with_provider(kvs_api::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyCertificate))
        .with_no_client_auth();
    reqwest::Client::builder().tls_backend_preconfigured(config).build().expect("the probe client builds")
}

#[derive(Debug)]
struct AnyCertificate;

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        kvs_api::tls::provider().signature_verification_algorithms.supported_schemes()
    }
}

impl Kubelet {
    /// Sends every running container's readiness probe, all at once, and records the answers.
    pub(super) async fn probe(&mut self) {
        let now = Instant::now();
        let mut targets: Vec<(String, ProbeTarget)> = Vec::new();
        for (name, slot) in &mut self.slots {
            let Some(since) = slot.container.run.as_ref().map(|run| run.since) else { continue };
            if slot.container.stopping.is_some() {
                continue;
            }
            match readiness_probe(&slot.pod, &slot.ip) {
                Some(target) if now.saturating_duration_since(since) >= target.initial_delay => {
                    targets.push((name.clone(), target))
                }
                Some(_) => {}
                None => slot.container.set_ready(true),
            }
        }
        let http = &self.http;
        let answers = join_all(targets.iter().map(|(_, t)| async move {
            match http.get(&t.url).timeout(t.timeout).send().await {
                Ok(r) => r.status().is_success() || r.status().is_redirection(),
                Err(_) => false,
            }
        }))
        .await;
        // Nothing else touches the slots while the probes are out (the loop owns them), so each
        // answer is about the run it was sent to.
        for ((name, target), ok) in targets.into_iter().zip(answers) {
            if let Some(slot) = self.slots.get_mut(&name) {
                slot.container.probed(ok, target.failure_threshold);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(probe: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": { "name": "demo-0" },
            "spec": { "containers": [{
                "name": "kvs",
                "ports": [{ "name": "http", "containerPort": 8080 }],
                "readinessProbe": probe,
            }] }
        }))
        .expect("a valid Pod")
    }

    #[test]
    fn probes_aim_at_the_pod_ip_and_named_ports() {
        let target = readiness_probe(&pod(json!({ "httpGet": { "path": "healthz", "port": "http" } })), "127.0.61.2");
        assert_eq!(
            target,
            Some(ProbeTarget {
                url: "http://127.0.61.2:8080/healthz".into(),
                timeout: Duration::from_secs(1),
                initial_delay: Duration::ZERO,
                failure_threshold: 3,
            })
        );
        let p = pod(json!({ "httpGet": { "port": 9000 }, "initialDelaySeconds": 5, "failureThreshold": 0 }));
        let target = readiness_probe(&p, "ip").expect("a probe");
        assert_eq!((target.url.as_str(), target.initial_delay.as_secs()), ("http://ip:9000/", 5));
        assert_eq!(target.failure_threshold, 1);
        assert_eq!(readiness_probe(&pod(json!({ "tcpSocket": { "port": 8080 } })), "ip"), None);
        let https = pod(json!({ "httpGet": { "path": "/readyz", "port": 8080, "scheme": "HTTPS" } }));
        assert_eq!(readiness_probe(&https, "ip").expect("a probe").url, "https://ip:8080/readyz");
        assert_eq!(readiness_probe(&pod(json!({ "httpGet": { "port": "nope" } })), "ip"), None);
    }
}
