//! The cluster's certificates: a CA made on first start, a serving
//! certificate re-issued on every start (so a changed `--listen` address is
//! always covered), client certificates for identities, and the admin
//! kubeconfig that kubectl and the Python client use as-is.
//!
//! Layout under the data directory: `pki/ca.{crt,key}`,
//! `pki/apiserver.{crt,key}`, `pki/admin.{crt,key}`,
//! `pki/apiserver-kubelet-client.{crt,key}`, `admin.kubeconfig`.

use std::{
    fs,
    io::Write as _,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, date_time_ymd,
};

/// Why the certificates could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Certificate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
}

/// A certificate and its private key, PEM encoded.
#[derive(Clone, Debug)]
pub struct Credential {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster CA, able to issue certificates.
#[derive(Debug)]
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    dir: PathBuf,
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn cert_error(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |source| PkiError::Certificate { what, source }
}

/// Writes a file readable only by its owner (keys, kubeconfigs).
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error(path))?;
    file.write_all(contents).map_err(io_error(path))
}

fn subject(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    for organization in organizations {
        name.push(DnType::OrganizationName, *organization);
    }
    name.push(DnType::CommonName, common_name);
    name
}

/// Names the hosts a serving certificate is for.
fn name_hosts(
    params: &mut CertificateParams,
    dns_names: &[String],
    addresses: &[IpAddr],
) -> Result<(), PkiError> {
    for name in dns_names {
        let name = name
            .clone()
            .try_into()
            .map_err(cert_error(format!("DNS name {name}")))?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    params
        .subject_alt_names
        .extend(addresses.iter().copied().map(SanType::IpAddress));
    Ok(())
}

fn validity(params: &mut CertificateParams) {
    // Fixed, generous bounds: a local cluster must not break on a clock
    // that is off by days, and certificates are re-issued on every start.
    params.not_before = date_time_ymd(2024, 1, 1);
    params.not_after = date_time_ymd(2124, 1, 1);
}

impl Authority {
    /// Loads the CA under `data_dir/pki`, which must exist.
    pub fn load(data_dir: &Path) -> Result<Self, PkiError> {
        let cert_path = data_dir.join("pki/ca.crt");
        if !cert_path.exists() {
            return Err(PkiError::Io {
                path: cert_path,
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        Self::load_or_create(data_dir)
    }

    /// Loads the CA under `data_dir/pki`, creating it on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, PkiError> {
        let dir = data_dir.join("pki");
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        if cert_path.exists() && key_path.exists() {
            let cert_pem = fs::read_to_string(&cert_path).map_err(io_error(&cert_path))?;
            let key_pem = fs::read_to_string(&key_path).map_err(io_error(&key_path))?;
            let key =
                KeyPair::from_pem(&key_pem).map_err(cert_error(key_path.display().to_string()))?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
                .map_err(cert_error(cert_path.display().to_string()))?;
            return Ok(Self {
                issuer,
                cert_pem,
                dir,
            });
        }
        let key = KeyPair::generate().map_err(cert_error("CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject("wharf-ca", &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params);
        let cert = params
            .self_signed(&key)
            .map_err(cert_error("CA certificate"))?;
        let cert_pem = cert.pem();
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        fs::write(&cert_path, &cert_pem).map_err(io_error(&cert_path))?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem,
            dir,
        })
    }

    fn issue(&self, params: &mut CertificateParams, what: &str) -> Result<Credential, PkiError> {
        validity(params);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(cert_error(format!("{what} key")))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(cert_error(format!("{what} certificate")))?;
        Ok(Credential {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A serving certificate for the API server's names and addresses.
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        addresses: &[IpAddr],
    ) -> Result<Credential, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = subject("kube-apiserver", &[]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        name_hosts(&mut params, dns_names, addresses)?;
        self.issue(&mut params, "serving")
    }

    /// A client certificate: the API server reads the user from the common
    /// name and the groups from the organizations, as kube-apiserver does.
    pub fn issue_client(&self, user: &str, groups: &[&str]) -> Result<Credential, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(user, groups);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(&mut params, user)
    }

    /// Signs a node's certificate for `request`'s key. Only the request's
    /// key is taken from it: subject and names are the validated ones, the
    /// usages the signer's (`server`: serving, else client, which names no
    /// hosts), never a CA; valid from five minutes ago (clock skew) for
    /// `lifetime`. Returns the certificate's PEM.
    pub fn sign_node(
        &self,
        request: &NodeRequest,
        server: bool,
        lifetime: std::time::Duration,
    ) -> Result<String, PkiError> {
        let der = rustls::pki_types::CertificateSigningRequestDer::from(request.der.as_slice());
        let parsed = rcgen::CertificateSigningRequestParams::from_der(&der)
            .map_err(cert_error("certificate request"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(&format!("system:node:{}", request.node), &[NODES]);
        if server {
            name_hosts(&mut params, &request.dns_names, &request.addresses)?;
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(rcgen::SerialNumber::from(
            rand::random::<[u8; 16]>().to_vec(),
        ));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after =
            now + time::Duration::try_from(lifetime).unwrap_or(time::Duration::days(365));
        let cert = params
            .signed_by(&parsed.public_key, &self.issuer)
            .map_err(cert_error("node certificate"))?;
        Ok(cert.pem())
    }

    /// Writes `pki/<name>.{crt,key}`.
    pub fn save(&self, name: &str, credential: &Credential) -> Result<(), PkiError> {
        let cert_path = self.dir.join(format!("{name}.crt"));
        fs::write(&cert_path, &credential.cert_pem).map_err(io_error(&cert_path))?;
        write_private(
            &self.dir.join(format!("{name}.key")),
            credential.key_pem.as_bytes(),
        )
    }
}

/// The organization of node identities.
pub const NODES: &str = "system:nodes";

/// What a request for a node's certificate asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRequest {
    der: Vec<u8>,
    /// The node it names (`system:node:<node>`).
    pub node: String,
    pub dns_names: Vec<String>,
    pub addresses: Vec<IpAddr>,
}

/// Reads a request for a node's certificate, strictly, so the approver
/// and the signer cannot see different things: one PEM block of type
/// CERTIFICATE REQUEST and nothing else, a valid signature, a subject of
/// exactly one common name `system:node:<name>` and one organization
/// `system:nodes`, and no requested extension but host names (DNS names
/// and IP addresses).
pub fn node_request(pem: &[u8]) -> Result<NodeRequest, String> {
    use x509_parser::{
        certification_request::X509CertificationRequest,
        extensions::{GeneralName, ParsedExtension},
        oid_registry::{OID_X509_COMMON_NAME, OID_X509_ORGANIZATION_NAME},
        prelude::FromDer as _,
    };
    let text = std::str::from_utf8(pem)
        .map_err(|_| "the request is not text")?
        .trim();
    let body = text
        .strip_prefix("-----BEGIN CERTIFICATE REQUEST-----")
        .and_then(|rest| rest.strip_suffix("-----END CERTIFICATE REQUEST-----"))
        .filter(|body| !body.contains("-----"))
        .ok_or("the request must be exactly one PEM CERTIFICATE REQUEST block")?;
    let der = STANDARD
        .decode(body.split_whitespace().collect::<String>())
        .map_err(|e| format!("the request's PEM body: {e}"))?;
    let (rest, request) =
        X509CertificationRequest::from_der(&der).map_err(|e| format!("not a request: {e}"))?;
    if !rest.is_empty() {
        return Err("bytes after the request".into());
    }
    request
        .verify_signature()
        .map_err(|e| format!("the request's signature: {e}"))?;
    let (mut common_names, mut organizations) = (Vec::new(), Vec::new());
    for attribute in request.certification_request_info.subject.iter_attributes() {
        let value = attribute
            .as_str()
            .map_err(|_| "a subject attribute is not a string")?;
        if attribute.attr_type() == &OID_X509_COMMON_NAME {
            common_names.push(value);
        } else if attribute.attr_type() == &OID_X509_ORGANIZATION_NAME {
            organizations.push(value);
        } else {
            return Err(format!(
                "subject attribute {} is not allowed",
                attribute.attr_type()
            ));
        }
    }
    let node = match common_names.as_slice() {
        [name] => name
            .strip_prefix("system:node:")
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("{name} is not a node's name"))?,
        _ => return Err("the subject must have exactly one common name".into()),
    };
    if organizations != [NODES] {
        return Err(format!("organizations {organizations:?} are not [{NODES}]"));
    }
    let (mut dns_names, mut addresses) = (Vec::new(), Vec::new());
    for extension in request.requested_extensions().into_iter().flatten() {
        let ParsedExtension::SubjectAlternativeName(names) = extension else {
            return Err("only subject alternative names may be requested".into());
        };
        for name in &names.general_names {
            match name {
                GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => addresses.push(IpAddr::from(
                        <[u8; 4]>::try_from(*bytes).unwrap_or_default(),
                    )),
                    16 => addresses.push(IpAddr::from(
                        <[u8; 16]>::try_from(*bytes).unwrap_or_default(),
                    )),
                    _ => return Err("a malformed IP address".into()),
                },
                other => return Err(format!("subject alternative name {other:?} is not a host")),
            }
        }
    }
    Ok(NodeRequest {
        node: node.to_owned(),
        dns_names,
        addresses,
        der,
    })
}

/// The signers wharf-control issues certificates for
/// (kube-controller-manager's names): node client certificates, and the
/// serving certificates of node agents' kubelet API.
pub const KUBELET_CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
pub const KUBELET_SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";

/// How a kubeconfig's user authenticates.
#[derive(Clone, Copy, Debug)]
pub enum KubeconfigUser<'a> {
    Certificate(&'a Credential),
    Token(&'a str),
}

/// A kubeconfig with everything embedded, for one user of one cluster.
pub fn kubeconfig(server: &str, ca_pem: &str, user: &str, auth: &KubeconfigUser<'_>) -> String {
    let credentials = match auth {
        KubeconfigUser::Certificate(credential) => serde_json::json!({
            "client-certificate-data": STANDARD.encode(&credential.cert_pem),
            "client-key-data": STANDARD.encode(&credential.key_pem),
        }),
        KubeconfigUser::Token(token) => serde_json::json!({ "token": token }),
    };
    let yaml = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "wharf",
            "cluster": {
                "server": server,
                "certificate-authority-data": STANDARD.encode(ca_pem),
            },
        }],
        "users": [{
            "name": user,
            "user": credentials,
        }],
        "contexts": [{
            "name": format!("{user}@wharf"),
            "context": { "cluster": "wharf", "user": user },
        }],
        "current-context": format!("{user}@wharf"),
        "preferences": {},
    });
    // A JSON value always serialises to YAML.
    serde_yaml::to_string(&yaml).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_request_pem(subject: DistinguishedName, addresses: &[&str]) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = subject;
        for address in addresses {
            params
                .subject_alt_names
                .push(SanType::IpAddress(address.parse().unwrap()));
        }
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn node_requests_are_read_strictly_and_signed_as_validated() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::load_or_create(dir.path()).unwrap();
        let pem = node_request_pem(subject("system:node:n1", &[NODES]), &["192.168.90.1"]);
        let request = node_request(pem.as_bytes()).unwrap();
        assert_eq!(request.node, "n1");
        assert_eq!(
            request.addresses,
            ["192.168.90.1".parse::<IpAddr>().unwrap()]
        );
        let signed = ca
            .sign_node(&request, true, std::time::Duration::from_secs(3600))
            .unwrap();
        let der = rustls_pemfile_der(&signed);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca());
        let user = crate::apiserver::authn::user_from_certificate(&der).unwrap();
        assert_eq!(user.name, "system:node:n1");
        assert!(user.in_group(NODES));
        let usages = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(usages.server_auth && !usages.client_auth);
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 3600 + 300);

        // A request for a CA, or for anything but exactly a node's
        // subject, in one block, is refused.
        let key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = subject("system:node:n1", &[NODES]);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_request = ca_params.serialize_request(&key).unwrap().pem().unwrap();
        for refused in [
            ca_request,
            node_request_pem(subject("system:node:n1", &[NODES, "system:masters"]), &[]),
            node_request_pem(subject("admin", &[NODES]), &[]),
            format!("x{}", pem),
            format!(
                "{pem}{}",
                node_request_pem(subject("admin", &["system:masters"]), &[])
            ),
        ] {
            assert!(node_request(refused.as_bytes()).is_err(), "{refused}");
        }
    }

    #[test]
    fn the_ca_is_made_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let first = Authority::load_or_create(dir.path()).unwrap();
        let again = Authority::load_or_create(dir.path()).unwrap();
        assert_eq!(first.cert_pem, again.cert_pem);
        let mode = fs::metadata(dir.path().join("pki/ca.key"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn client_certificates_carry_user_and_groups() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::load_or_create(dir.path()).unwrap();
        let credential = ca
            .issue_client("system:node:n1", &["system:nodes"])
            .unwrap();
        let der = rustls_pemfile_der(&credential.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let subject = cert.subject();
        assert_eq!(
            subject.iter_common_name().next().unwrap().as_str().unwrap(),
            "system:node:n1"
        );
        assert_eq!(
            subject
                .iter_organization()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "system:nodes"
        );
    }

    fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
        let body: String = pem
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect();
        STANDARD.decode(body).unwrap()
    }
}
