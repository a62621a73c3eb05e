//! `pods/{name}/log`: proxied, streaming, to the kubelet API of the node
//! the pod is bound to (`https://<InternalIP>:<kubeletEndpoint port>/
//! containerLogs/<namespace>/<pod>/<container>`, as kube-apiserver does).
//! The API server authenticates with its kubelet client certificate and
//! verifies the node's serving certificate against the cluster CA.

use std::{net::IpAddr, sync::Arc};

use axum::{
    body::Body,
    http::{Request, StatusCode, header},
    response::{IntoResponse, Response},
};
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, RootCertStore,
    crypto::ring::default_provider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::status::ApiError;
use crate::pki::Credential;

/// The kubelet's default port, when a Node does not report one.
const DEFAULT_KUBELET_PORT: u16 = 10250;

/// Query parameters passed on to the kubelet.
const PASSED_ON: &[&str] = &[
    "follow",
    "previous",
    "sinceSeconds",
    "sinceTime",
    "timestamps",
    "tailLines",
    "limitBytes",
];

/// Talks to node agents' kubelet APIs.
#[derive(Clone)]
pub struct KubeletClient {
    tls: TlsConnector,
}

impl std::fmt::Debug for KubeletClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeletClient(..)")
    }
}

fn pem_error(what: &str, error: impl std::fmt::Display) -> rustls::Error {
    rustls::Error::General(format!("{what}: {error}"))
}

impl KubeletClient {
    pub fn new(ca_pem: &str, identity: &Credential) -> Result<Self, rustls::Error> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.map_err(|e| pem_error("CA certificate", e))?)?;
        }
        let chain = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error("kubelet client certificate", e))?;
        let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
            .map_err(|e| pem_error("kubelet client key", e))?;
        let config = ClientConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok(Self {
            tls: TlsConnector::from(Arc::new(config)),
        })
    }

    async fn get(&self, address: IpAddr, port: u16, path: &str) -> Result<Response, ApiError> {
        let unreachable = |error: &dyn std::fmt::Display| {
            ApiError::internal(format!(
                "cannot reach the kubelet at {address}:{port}: {error}"
            ))
        };
        let tcp = TcpStream::connect((address, port))
            .await
            .map_err(|e| unreachable(&e))?;
        let tls = self
            .tls
            .connect(ServerName::IpAddress(address.into()), tcp)
            .await
            .map_err(|e| unreachable(&e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unreachable(&e))?;
        tokio::spawn(connection);
        let request = Request::get(path)
            .header(header::HOST, format!("{address}:{port}"))
            .body(Body::empty())
            .map_err(ApiError::internal)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(&e))?;
        Ok(response.map(Body::new))
    }
}

/// The container whose log is asked for: named, or the pod's only one.
fn container(pod: &Value, name: &str, asked: Option<&str>) -> Result<String, ApiError> {
    let spec = &pod["spec"];
    let names: Vec<&str> = ["initContainers", "containers"]
        .iter()
        .flat_map(|list| spec[list].as_array().into_iter().flatten())
        .filter_map(|c| c["name"].as_str())
        .collect();
    match asked {
        Some(asked) if names.contains(&asked) => Ok(asked.to_owned()),
        Some(asked) => Err(ApiError::bad_request(format!(
            "container {asked} is not valid for pod {name}"
        ))),
        None => {
            let main: Vec<&str> = spec["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["name"].as_str())
                .collect();
            match main.as_slice() {
                [only] => Ok((*only).to_owned()),
                many => Err(ApiError::bad_request(format!(
                    "a container name must be specified for pod {name}, choose one of: [{}]",
                    many.join(" ")
                ))),
            }
        }
    }
}

/// Where the node's kubelet API listens.
fn kubelet_address(node: &Value) -> Result<(IpAddr, u16), ApiError> {
    let name = node["metadata"]["name"].as_str().unwrap_or_default();
    let address = node["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["type"] == "InternalIP")
        .and_then(|a| a["address"].as_str())
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| {
            ApiError::bad_request(format!("node {name} reports no InternalIP address"))
        })?;
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .unwrap_or(DEFAULT_KUBELET_PORT);
    Ok((address, port))
}

/// Streams a container's log from its node.
pub async fn pod_log(
    client: &KubeletClient,
    pod: &Value,
    node: &Value,
    asked: Option<&str>,
    query: &[(String, String)],
) -> Result<Response, ApiError> {
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let container = container(pod, name, asked)?;
    for (key, value) in query {
        if matches!(key.as_str(), "sinceSeconds" | "tailLines" | "limitBytes")
            && value.parse::<u64>().is_err()
        {
            return Err(ApiError::bad_request(format!(
                "{key} must be a non-negative integer, got {value:?}"
            )));
        }
    }
    let passed: Vec<String> = query
        .iter()
        .filter(|(key, _)| PASSED_ON.contains(&key.as_str()))
        .map(|(key, value)| format!("{key}={}", percent_encode(value)))
        .collect();
    let mut path = format!("/containerLogs/{namespace}/{name}/{container}");
    if !passed.is_empty() {
        path = format!("{path}?{}", passed.join("&"));
    }
    let (address, port) = kubelet_address(node)?;
    let response = client.get(address, port, &path).await?;
    if response.status() != StatusCode::OK {
        let code = response.status();
        let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
            .await
            .unwrap_or_default();
        let message = String::from_utf8_lossy(&body).trim().to_owned();
        return Err(match code {
            StatusCode::NOT_FOUND => ApiError::bad_request(format!(
                "the node has no log for container {container}: {message}"
            )),
            _ => ApiError::internal(format!("the kubelet answered {code}: {message}")),
        });
    }
    Ok(([(header::CONTENT_TYPE, "text/plain")], response.into_body()).into_response())
}

/// Percent-encodes a query value (RFC 3986 unreserved characters kept).
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_container_is_named_or_the_only_one() {
        let single = json!({"spec": {"containers": [{"name": "web"}]}});
        assert_eq!(container(&single, "p", None).unwrap(), "web");
        let double = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}], "initContainers": [{"name": "init"}]}});
        let error = container(&double, "p", None).unwrap_err();
        assert_eq!(
            error.to_string(),
            "a container name must be specified for pod p, choose one of: [a b]"
        );
        assert_eq!(container(&double, "p", Some("init")).unwrap(), "init");
        assert!(container(&double, "p", Some("c")).is_err());
    }

    #[test]
    fn the_kubelet_address_comes_from_node_status() {
        let node = json!({"metadata": {"name": "n1"}, "status": {
            "addresses": [{"type": "Hostname", "address": "n1"}, {"type": "InternalIP", "address": "10.0.0.5"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10999}},
        }});
        assert_eq!(
            kubelet_address(&node).unwrap(),
            ("10.0.0.5".parse().unwrap(), 10999)
        );
        let bare = json!({"metadata": {"name": "n2"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.6"}]}});
        assert_eq!(kubelet_address(&bare).unwrap().1, DEFAULT_KUBELET_PORT);
        assert!(kubelet_address(&json!({"metadata": {"name": "n3"}})).is_err());
        assert_eq!(
            percent_encode("2026-01-01T00:00:00Z"),
            "2026-01-01T00%3A00%3A00Z"
        );
    }
}
