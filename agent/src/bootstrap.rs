//! A node's own credentials, the way kubelet's TLS bootstrap gets them:
//!
//! - joining with `--server URL --token ID.SECRET --ca-cert-hash
//!   sha256:HEX` (from `wharf-control token create`), the agent first
//!   learns the cluster CA from the server's TLS handshake and trusts it
//!   only if its hash matches the pin, so the token is never sent to an
//!   impostor; then, authenticated by the token, it asks for a client
//!   certificate (`system:node:<name>` in `system:nodes`) with a
//!   CertificateSigningRequest and keeps the result as
//!   `<state>/<node>/kubelet.kubeconfig`, which later starts reuse;
//! - any node agent asks the same way for the serving certificate of its
//!   kubelet API (`kubernetes.io/kubelet-serving`, naming its address),
//!   which the API server verifies when it proxies `pods/log`.
//!
//! wharf-control approves and signs both kinds when they name exactly
//! this node.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use k8s_openapi::{
    ByteString,
    api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
    config::Kubeconfig,
};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PublicKeyData as _, SanType};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use tracing::info;

/// The signers (kube-controller-manager's names).
const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
const SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";

/// How long a join's client certificate request may wait for approval
/// and signing (a serving request waits as long as it takes: a cluster
/// whose approver leaves them to a human may approve it any time).
const ISSUE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long the server may take to connect and shake hands.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("--server {0} is not an https:// URL with a host")]
    Server(String),
    #[error("reaching {server} for its CA: {message}")]
    Handshake { server: String, message: String },
    #[error(
        "no certificate {server} presented matches --ca-cert-hash {pin}: refusing to send it the token"
    )]
    Pin { server: String, pin: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("making a key or request: {0}")]
    Key(#[from] rcgen::Error),
    #[error("API client: {0}")]
    Client(#[from] crate::cluster::ClusterError),
    #[error("certificate request: {0}")]
    Request(#[source] kube::Error),
    #[error("certificate request {name} was {outcome}: {message}")]
    Refused {
        name: String,
        outcome: String,
        message: String,
    },
    #[error("certificate request {name} was not issued within {ISSUE_TIMEOUT:?}")]
    Timeout { name: String },
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BootstrapError + '_ {
    move |source| BootstrapError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The pin of a CA certificate (DER): `sha256:` and its hex SHA-256, as
/// `wharf-control token create` prints it.
pub fn ca_cert_hash(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Accepts any server certificate and keeps what was presented: only to
/// read the chain, before anything is sent.
#[derive(Debug)]
struct Capture {
    chain: Mutex<Vec<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = self
            .chain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        chain.push(end_entity.to_vec());
        chain.extend(intermediates.iter().map(|c| c.to_vec()));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The certificate in the server's handshake whose hash is `pin`.
async fn pinned_ca(server: &str, pin: &str) -> Result<Vec<u8>, BootstrapError> {
    let uri: axum::http::Uri = server
        .parse()
        .map_err(|_| BootstrapError::Server(server.into()))?;
    let host = uri
        .host()
        .filter(|_| uri.scheme_str() == Some("https"))
        .ok_or_else(|| BootstrapError::Server(server.into()))?
        .trim_matches(['[', ']'])
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let handshake = |message: String| BootstrapError::Handshake {
        server: server.into(),
        message,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let capture = Arc::new(Capture {
        chain: Mutex::new(Vec::new()),
        provider: Arc::clone(&provider),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| handshake(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&capture) as Arc<dyn ServerCertVerifier>)
        .with_no_client_auth();
    let name = match host.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(host.clone()).map_err(|e| handshake(e.to_string()))?,
    };
    // Only the handshake: nothing is written on this connection. The pin
    // alone does not authenticate the server (the CA certificate is
    // public); the client built on the pinned CA does, verifying the
    // server's certificate before the token is sent.
    let connect = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| handshake(e.to_string()))?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| handshake(e.to_string()))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
        .await
        .map_err(|_| handshake(format!("no handshake within {HANDSHAKE_TIMEOUT:?}")))??;
    let chain = capture
        .chain
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    chain
        .into_iter()
        .find(|der| ca_cert_hash(der) == pin)
        .ok_or_else(|| BootstrapError::Pin {
            server: server.into(),
            pin: pin.into(),
        })
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .filter_map(|c| std::str::from_utf8(c).ok())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// Writes a file only its owner may read, whole.
fn write_private(path: &Path, text: &str) -> Result<(), BootstrapError> {
    crate::files::write_atomically(path, text.as_bytes(), 0o600).map_err(io(path))
}

/// A kubeconfig for `server` trusting `ca_pem`, with `user` (YAML lines
/// of the user entry).
fn kubeconfig(server: &str, ca_pem: &str, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: wharf\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: node\n  user:\n{user}contexts:\n- name: wharf\n  context: {{cluster: wharf, user: node}}\ncurrent-context: wharf\n",
        ca = STANDARD.encode(ca_pem),
    )
}

/// The cluster CA (PEM) a kubeconfig trusts.
pub fn cluster_ca(path: &Path) -> Result<String, BootstrapError> {
    let error = |message: String| BootstrapError::Kubeconfig {
        path: path.display().to_string(),
        message,
    };
    let config = Kubeconfig::read_from(path).map_err(|e| error(e.to_string()))?;
    let cluster = config
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .ok_or_else(|| error("no cluster".into()))?;
    if let Some(data) = &cluster.certificate_authority_data {
        let bytes = STANDARD
            .decode(data)
            .map_err(|e| error(format!("certificate-authority-data: {e}")))?;
        return String::from_utf8(bytes).map_err(|e| error(e.to_string()));
    }
    if let Some(file) = &cluster.certificate_authority {
        // A relative path is the kubeconfig's, as kubectl reads it.
        let file = path.parent().unwrap_or(Path::new(".")).join(file);
        return std::fs::read_to_string(&file)
            .map_err(|e| error(format!("{}: {e}", file.display())));
    }
    Err(error("no certificate authority".into()))
}

/// A key and a request for `system:node:<node>` in `system:nodes`,
/// naming `addresses` and the node's name when it is for serving.
fn request(node: &str, addresses: &[IpAddr]) -> Result<(KeyPair, String), BootstrapError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::OrganizationName, "system:nodes");
    subject.push(DnType::CommonName, format!("system:node:{node}"));
    params.distinguished_name = subject;
    for address in addresses {
        params.subject_alt_names.push(SanType::IpAddress(*address));
    }
    if !addresses.is_empty()
        && let Ok(name) = node.to_string().try_into()
    {
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    let pem = params.serialize_request(&key)?.pem()?;
    Ok((key, pem))
}

/// Asks for a certificate and waits until it is issued (for `timeout`
/// at most, if given); returns its PEM, checked to be for `key`.
async fn issue(
    client: &Client,
    node: &str,
    signer: &str,
    usages: &[&str],
    key: &KeyPair,
    request_pem: &str,
    timeout: Option<Duration>,
) -> Result<String, BootstrapError> {
    let api = Api::<CertificateSigningRequest>::all(client.clone());
    let kind = if signer == SERVING_SIGNER {
        "serving"
    } else {
        "client"
    };
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some(format!("node-{kind}-{node}-")),
            ..ObjectMeta::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(request_pem.as_bytes().to_vec()),
            signer_name: signer.to_owned(),
            usages: Some(usages.iter().map(|u| (*u).to_owned()).collect()),
            ..CertificateSigningRequestSpec::default()
        },
        status: None,
    };
    let created = api
        .create(&PostParams::default(), &csr)
        .await
        .map_err(BootstrapError::Request)?;
    let name = created.metadata.name.unwrap_or_default();
    info!(csr = %name, signer, "certificate requested");
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut waited = Duration::ZERO;
    loop {
        let current = api.get(&name).await.map_err(BootstrapError::Request)?;
        let status = current.status.unwrap_or_default();
        if let Some(certificate) = status.certificate.filter(|c| !c.0.is_empty()) {
            let pem = String::from_utf8_lossy(&certificate.0).into_owned();
            return if certifies(&pem, key) {
                Ok(pem)
            } else {
                Err(BootstrapError::Refused {
                    name,
                    outcome: "answered".into(),
                    message: "the issued certificate is not for this request's key".into(),
                })
            };
        }
        if let Some(refused) = status
            .conditions
            .iter()
            .flatten()
            .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True")
        {
            return Err(BootstrapError::Refused {
                name,
                outcome: refused.type_.to_lowercase(),
                message: refused.message.clone().unwrap_or_default(),
            });
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() > d) {
            return Err(BootstrapError::Timeout { name });
        }
        if waited == Duration::from_secs(60) {
            info!(csr = %name, "still waiting for the certificate request to be approved (kubectl certificate approve {name})");
        }
        // Quick at first (wharf-control approves at once), then patient.
        let pause = if waited < Duration::from_secs(60) {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(5)
        };
        tokio::time::sleep(pause).await;
        waited += pause;
    }
}

/// Whether the certificate (PEM) is for `key`.
fn certifies(pem: &str, key: &KeyPair) -> bool {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .ok()
        .and_then(|(_, block)| {
            let (_, cert) = x509_parser::parse_x509_certificate(&block.contents).ok()?;
            Some(cert.public_key().raw == key.subject_public_key_info().as_slice())
        })
        .unwrap_or(false)
}

/// What joining needs.
#[derive(Clone, Debug)]
pub struct Join {
    pub server: String,
    pub token: String,
    pub ca_cert_hash: String,
}

/// The node's own kubeconfig (`<state>/<node>/kubelet.kubeconfig`):
/// made once by joining with the token, then reused.
pub async fn node_kubeconfig(
    join: &Join,
    state: &Path,
    node: &str,
) -> Result<PathBuf, BootstrapError> {
    let path = state.join("kubelet.kubeconfig");
    if path.exists() {
        return Ok(path);
    }
    let ca_der = pinned_ca(&join.server, &join.ca_cert_hash).await?;
    let ca_pem = pem("CERTIFICATE", &ca_der);
    let bootstrap = state.join("bootstrap.kubeconfig");
    write_private(
        &bootstrap,
        &kubeconfig(
            &join.server,
            &ca_pem,
            &format!("    token: {:?}\n", join.token),
        ),
    )?;
    let asked = async {
        let client = crate::cluster::client(&bootstrap).await?;
        let (key, request_pem) = request(node, &[])?;
        let usages = ["digital signature", "key encipherment", "client auth"];
        let certificate = issue(
            &client,
            node,
            CLIENT_SIGNER,
            &usages,
            &key,
            &request_pem,
            Some(ISSUE_TIMEOUT),
        )
        .await?;
        Ok::<_, BootstrapError>((key, certificate))
    }
    .await;
    // The token goes from the disk whatever happened.
    let _ = std::fs::remove_file(&bootstrap);
    let (key, certificate) = asked?;
    let user = format!(
        "    client-certificate-data: {}\n    client-key-data: {}\n",
        STANDARD.encode(&certificate),
        STANDARD.encode(key.serialize_pem())
    );
    write_private(&path, &kubeconfig(&join.server, &ca_pem, &user))?;
    info!(node, path = %path.display(), "joined: node credentials written");
    Ok(path)
}

/// A serving certificate and key (PEM) for the node's kubelet API at
/// `addresses`: the one kept under `<state>/pki` while it was issued by
/// `ca_pem`, names every address and has a day left, else a new one,
/// which is kept there.
pub async fn serving_certificate(
    client: &Client,
    node: &str,
    addresses: &[IpAddr],
    state: &Path,
    ca_pem: &str,
) -> Result<(String, String), BootstrapError> {
    let dir = state.join("pki");
    let (cert_path, key_path, ca_path) = (
        dir.join("kubelet-serving.crt"),
        dir.join("kubelet-serving.key"),
        dir.join("kubelet-serving.ca"),
    );
    let kept = (
        std::fs::read_to_string(&cert_path),
        std::fs::read_to_string(&key_path),
        std::fs::read_to_string(&ca_path),
    );
    if let (Ok(cert), Ok(key), Ok(ca)) = kept
        && ca == ca_pem
        && still_serves(&cert, addresses)
    {
        return Ok((cert, key));
    }
    let (key, request_pem) = request(node, addresses)?;
    let usages = ["digital signature", "key encipherment", "server auth"];
    let certificate = issue(
        client,
        node,
        SERVING_SIGNER,
        &usages,
        &key,
        &request_pem,
        None,
    )
    .await?;
    let key = key.serialize_pem();
    write_private(&key_path, &key)?;
    write_private(&cert_path, &certificate)?;
    write_private(&ca_path, ca_pem)?;
    Ok((certificate, key))
}

/// Whether a kept serving certificate names every address and has more
/// than a day left.
fn still_serves(pem: &str, addresses: &[IpAddr]) -> bool {
    let Ok((_, block)) = x509_parser::pem::parse_x509_pem(pem.as_bytes()) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&block.contents) else {
        return false;
    };
    let day_left = cert
        .validity()
        .time_to_expiration()
        .is_some_and(|left| left.whole_seconds() > 86_400);
    let named: Vec<IpAddr> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::IPAddress(bytes) => match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    day_left && addresses.iter().all(|a| named.contains(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_the_node() {
        let (_, pem) = request("n1", &["192.168.90.1".parse().unwrap()]).unwrap();
        let params = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        let subject = &params.params.distinguished_name;
        assert_eq!(
            subject.get(&DnType::CommonName),
            Some(&rcgen::DnValue::Utf8String("system:node:n1".into()))
        );
        assert_eq!(params.params.subject_alt_names.len(), 2);
    }

    #[test]
    fn kubeconfigs_carry_the_ca_and_the_user() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_private(
            &path,
            &kubeconfig("https://10.0.0.1:6443", "PEM", "    token: t\n"),
        )
        .unwrap();
        assert_eq!(cluster_ca(&path).unwrap(), "PEM");
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(ca_cert_hash(b"x").starts_with("sha256:"));
    }
}
