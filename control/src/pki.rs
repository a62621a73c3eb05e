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

fn validity(params: &mut CertificateParams) {
    // Fixed, generous bounds: a local cluster must not break on a clock
    // that is off by days, and certificates are re-issued on every start.
    params.not_before = date_time_ymd(2024, 1, 1);
    params.not_after = date_time_ymd(2124, 1, 1);
}

impl Authority {
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

    /// Signs a PKCS#10 request (PEM), whose signature it checks: the
    /// requested subject and names, with the usages of the signer
    /// (`server`: serving, else client), never as a CA. Returns the
    /// certificate's PEM.
    pub fn sign_request(&self, request_pem: &str, server: bool) -> Result<String, PkiError> {
        let mut request = rcgen::CertificateSigningRequestParams::from_pem(request_pem)
            .map_err(cert_error("certificate request"))?;
        let params = &mut request.params;
        validity(params);
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
        let cert = request
            .signed_by(&self.issuer)
            .map_err(cert_error("signed certificate"))?;
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

    #[test]
    fn requests_are_signed_with_the_signers_usages() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::load_or_create(dir.path()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = subject("system:node:n1", &["system:nodes"]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .subject_alt_names
            .push(SanType::IpAddress("192.168.90.1".parse().unwrap()));
        let request = params.serialize_request(&key).unwrap().pem().unwrap();
        let pem = ca.sign_request(&request, true).unwrap();
        let der = rustls_pemfile_der(&pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca(), "a requested CA flag is dropped");
        let user = crate::apiserver::authn::user_from_certificate(&der).unwrap();
        assert_eq!(user.name, "system:node:n1");
        assert!(user.in_group("system:nodes"));
        let usages = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(usages.server_auth && !usages.client_auth);
        assert!(ca.sign_request("not a request", false).is_err());
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
