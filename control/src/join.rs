//! Join tokens for new nodes, as kubeadm makes them: a bootstrap token
//! Secret in kube-system (`bootstrap-token-<id>`, authenticating
//! `<id>.<secret>` as `system:bootstrap:<id>` until it expires), and the
//! hash of the cluster CA that a joining agent pins before it trusts the
//! server with the token: `sha256:` and the hex SHA-256 of the CA
//! certificate's DER.

use std::{path::Path, time::Duration};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
    config::Kubeconfig,
};
use rand::Rng as _;
use rustls::pki_types::{CertificateDer, pem::PemObject as _};

use crate::components::{self, ComponentError};

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Client(#[from] ComponentError),
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("kubeconfig {path} has no {what}")]
    Incomplete { path: String, what: &'static str },
    #[error("creating the token's Secret: {0}")]
    Create(#[source] kube::Error),
    #[error("the token's lifetime is too long")]
    Ttl,
}

/// What a node needs to join.
#[derive(Clone, Debug)]
pub struct Join {
    pub server: String,
    pub token: String,
    pub ca_cert_hash: String,
}

/// The pin of a CA certificate (DER).
pub fn ca_cert_hash(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// `count` characters of `[a-z0-9]`.
fn token_part(count: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..count)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// Creates a token valid for `ttl`, with an admin's kubeconfig.
pub async fn create(kubeconfig: &Path, ttl: Duration) -> Result<Join, JoinError> {
    let shown = kubeconfig.display().to_string();
    let config = Kubeconfig::read_from(kubeconfig).map_err(|source| JoinError::Kubeconfig {
        path: shown.clone(),
        source,
    })?;
    let incomplete = |what| JoinError::Incomplete {
        path: shown.clone(),
        what,
    };
    let cluster = config
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .ok_or_else(|| incomplete("cluster"))?;
    let server = cluster.server.clone().ok_or_else(|| incomplete("server"))?;
    let ca_pem = cluster
        .certificate_authority_data
        .as_deref()
        .and_then(|data| STANDARD.decode(data).ok())
        .ok_or_else(|| incomplete("certificate-authority-data"))?;
    let ca_der =
        CertificateDer::from_pem_slice(&ca_pem).map_err(|_| incomplete("CA certificate"))?;

    let (id, secret) = (token_part(6), token_part(16));
    let mut data = vec![
        ("token-id", id.clone()),
        ("token-secret", secret.clone()),
        ("usage-bootstrap-authentication", "true".to_owned()),
        (
            "auth-extra-groups",
            "system:bootstrappers:wharf:default-node-token".to_owned(),
        ),
        ("description", "wharf-control token create".to_owned()),
    ];
    // A ttl of 0 never expires, as kubeadm's.
    if !ttl.is_zero() {
        let expires = chrono::Duration::from_std(ttl)
            .ok()
            .and_then(|ttl| chrono::Utc::now().checked_add_signed(ttl))
            .ok_or(JoinError::Ttl)?;
        data.push(("expiration", expires.to_rfc3339()));
    }
    let data = data
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.into_bytes())))
        .collect();
    let object = Secret {
        metadata: ObjectMeta {
            name: Some(format!("bootstrap-token-{id}")),
            namespace: Some("kube-system".to_owned()),
            ..ObjectMeta::default()
        },
        type_: Some("bootstrap.kubernetes.io/token".to_owned()),
        data: Some(data),
        ..Secret::default()
    };
    let client = components::client(kubeconfig).await?;
    Api::<Secret>::namespaced(client, "kube-system")
        .create(&PostParams::default(), &object)
        .await
        .map_err(JoinError::Create)?;
    Ok(Join {
        server,
        token: format!("{id}.{secret}"),
        ca_cert_hash: ca_cert_hash(&ca_der),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_pins_have_their_shapes() {
        let part = token_part(16);
        assert_eq!(part.len(), 16);
        assert!(
            part.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        let hash = ca_cert_hash(b"certificate");
        assert!(hash.starts_with("sha256:") && hash.len() == 7 + 64);
    }
}
