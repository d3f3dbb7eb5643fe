//! The Kubernetes side of `spec.tls`: the cluster CA's Secret (made once, never overwritten), the
//! pods' Secret (written only when [`certs::plan_pod_certificates`] issues something), and the TLS
//! settings the operator reaches the nodes with (the CA, a client certificate of its own, names
//! not checked because it calls pods by IP: see [`kvs_api::ClientTls::accepting_any_name`]).
//!
//! Ordering: the pods' Secret holds a certificate for every pod the StatefulSet has or is about to
//! have (the larger of its size and the spec's), and is written before the StatefulSet in the
//! same reconcile, so a pod added by a scale-out finds its certificate when it starts.

use super::build;
use super::certs::{self, CA_CERT_KEY, CA_KEY_KEY, Ca, Issue, Pair};
use super::validate::ValidCluster;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use kvs_api::ClientTls;
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// Why the certificates could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Cert(#[from] certs::CertError),
    #[error("the operator's client TLS settings: {0}")]
    Client(#[from] kvs_api::tls::TlsError),
    #[error("Secret {0} (the cluster CA) does not exist yet; the cluster's reconcile makes it")]
    NoCa(String),
}

/// What [`ensure`] did and what the operator talks TLS with.
pub struct Certificates {
    pub client: ClientTls,
    /// Pods whose certificate was issued now, and why.
    pub issued: Vec<(String, Issue)>,
}

/// Makes the CA if there is none, issues and renews the pods' certificates as due, and returns the
/// operator's TLS settings for the cluster.
pub async fn ensure(client: &Client, cluster: &ValidCluster) -> Result<Certificates, TlsError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &cluster.namespace);
    let now = OffsetDateTime::now_utc();
    let ca_name = build::ca_secret_name(&cluster.name);
    let ca_pair = match secrets.get_opt(&ca_name).await?.as_ref().and_then(read_ca) {
        Some(pair) => pair,
        None => {
            let pair = certs::new_ca(&cluster.namespace, &cluster.name, now)?;
            let contents = BTreeMap::from([
                (CA_CERT_KEY.to_owned(), pair.cert.clone()),
                (CA_KEY_KEY.to_owned(), pair.key.clone()),
            ]);
            match secrets.create(&PostParams::default(), &build::secret(cluster, ca_name.clone(), &contents)).await {
                Ok(_) => pair,
                // Made concurrently (another reconcile, a previous operator): use that one.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    read_ca(&secrets.get(&ca_name).await?).ok_or_else(|| certs::CertError::BadCa {
                        secret: ca_name.clone(),
                        detail: format!("it lacks {CA_CERT_KEY} or {CA_KEY_KEY}"),
                    })?
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let ca = Ca::load(&ca_pair, &ca_name)?;

    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &cluster.namespace);
    let running = statefulsets.get_opt(&cluster.name).await?.and_then(|s| s.spec?.replicas).unwrap_or(0);
    let wanted = build::certified_pods(cluster, running.max(0).unsigned_abs());
    let name = build::tls_secret_name(&cluster.name);
    let held = secrets.get_opt(&name).await?.map(|s| text_of(&s)).unwrap_or_default();
    let mut issued = Vec::new();
    if let Some(planned) = certs::plan_pod_certificates(&cluster.name, &held, &ca, &wanted, now)? {
        let params = PatchParams::apply(super::apply::MANAGER).force();
        let secret = build::secret(cluster, name.clone(), &planned.contents);
        secrets.patch(&name, &params, &Patch::Apply(&secret)).await?;
        issued = planned.issued;
    }
    Ok(Certificates { client: operator_settings(&ca, now)?, issued })
}

/// The operator's TLS settings for a cluster (a backup, a restore): plain HTTP when `tls_enabled`
/// is false; else the CA from its Secret, and an error (never plain HTTP) while there is none.
pub async fn client_settings(
    client: &Client,
    namespace: &str,
    cluster: &str,
    tls_enabled: bool,
) -> Result<ClientTls, TlsError> {
    if !tls_enabled {
        return Ok(ClientTls::plain());
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let name = build::ca_secret_name(cluster);
    let pair = secrets.get_opt(&name).await?.as_ref().and_then(read_ca).ok_or_else(|| TlsError::NoCa(name.clone()))?;
    operator_settings(&Ca::load(&pair, &name)?, OffsetDateTime::now_utc())
}

fn operator_settings(ca: &Ca, now: OffsetDateTime) -> Result<ClientTls, TlsError> {
    let own = ca.operator_client(now)?;
    let tls = ClientTls::from_pem(ca.cert_pem().as_bytes(), Some((own.cert.as_bytes(), own.key.as_bytes())))?;
    Ok(tls.accepting_any_name())
}

fn read_ca(secret: &Secret) -> Option<Pair> {
    let text = text_of(secret);
    Some(Pair { cert: text.get(CA_CERT_KEY)?.clone(), key: text.get(CA_KEY_KEY)?.clone() })
}

/// A Secret's entries that are text (PEM always is).
fn text_of(secret: &Secret) -> BTreeMap<String, String> {
    let data = secret.data.iter().flatten();
    data.filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.0.clone()).ok()?))).collect()
}
