//! The node's kubelet API, as much of it as the API server uses: container
//! logs (`GET /containerLogs/<namespace>/<pod>/<container>` with
//! `follow`, `previous`, `tailLines` and `limitBytes`) for `kubectl logs`
//! through the API server's `pods/log` proxy. HTTPS with a serving
//! certificate the cluster CA signed (asked for through a
//! CertificateSigningRequest) and mutual TLS: only clients whose
//! certificate the cluster CA signed, in `system:masters` (the API
//! server's kubelet client identity), are answered.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Path as UrlPath, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder,
    service::TowerToHyperService,
};
use kube::Client;
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use super::{containers, runtime::Runtime};
use crate::bootstrap;

/// The group whose members may read logs (the API server's kubelet
/// client certificate is in it).
const MASTERS: &str = "system:masters";

/// How long a client may take to shake hands.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a followed log is checked for more.
const FOLLOW_PERIOD: Duration = Duration::from_millis(200);

/// Where the server finds logs, and who knows whether their containers
/// still run.
#[derive(Clone, Debug)]
struct Logs {
    pods_dir: PathBuf,
    runtime: Arc<dyn Runtime>,
}

/// Asks for the serving certificate, or takes the one kept in the
/// node's `state` directory (retrying every 10 s), and serves the kubelet
/// API on `bind` until the agent stops.
pub async fn serve(
    client: Client,
    node: String,
    addresses: Vec<IpAddr>,
    bind: SocketAddr,
    ca_pem: String,
    state: PathBuf,
    runtime: Arc<dyn Runtime>,
) {
    let (cert_pem, key_pem) = loop {
        match bootstrap::serving_certificate(&client, &node, &addresses, &state, &ca_pem).await {
            Ok(pair) => break pair,
            Err(error) => {
                warn!(%error, "no serving certificate for the kubelet API yet; retrying in 10 s");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    };
    let config = match server_config(&ca_pem, &cert_pem, &key_pem) {
        Ok(config) => config,
        Err(error) => {
            warn!(%error, "the kubelet API cannot serve");
            return;
        }
    };
    let listener = match tokio::net::TcpListener::bind(bind).await {
        Ok(listener) => listener,
        Err(error) => {
            warn!(%bind, %error, "the kubelet API cannot listen");
            return;
        }
    };
    info!(%bind, "kubelet API serving");
    let router = Router::new()
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .with_state(Logs {
            pods_dir: state.join("pods"),
            runtime,
        });
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors, say: not a reason to spin.
                debug!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    debug!(%remote, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let allowed = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .is_some_and(|cert| in_group(cert, MASTERS));
            let service = tower::service_fn(
                move |request: axum::extract::Request<hyper::body::Incoming>| {
                    let router = router.clone();
                    async move {
                        if !allowed {
                            return Ok::<_, std::convert::Infallible>(
                                (StatusCode::FORBIDDEN, "only the API server may ask")
                                    .into_response(),
                            );
                        }
                        router.oneshot(request.map(Body::new)).await
                    }
                },
            );
            if let Err(error) = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(service))
                .await
            {
                debug!(%remote, %error, "connection ended with an error");
            }
        });
    }
}

fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let general =
        |what: &str, e: &dyn std::fmt::Display| rustls::Error::General(format!("{what}: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| general("CA certificate", &e))?)?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|e| general("client verifier", &e))?;
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| general("serving certificate", &e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| general("serving key", &e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Whether a (verified) client certificate names `group` as an
/// organization.
fn in_group(der: &[u8], group: &str) -> bool {
    x509_parser::parse_x509_certificate(der).is_ok_and(|(_, cert)| {
        cert.subject()
            .iter_organization()
            .any(|o| o.as_str() == Ok(group))
    })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogQuery {
    #[serde(default)]
    follow: bool,
    #[serde(default)]
    previous: bool,
    tail_lines: Option<usize>,
    limit_bytes: Option<usize>,
}

fn error(status: StatusCode, message: String) -> Response {
    (status, message).into_response()
}

/// The pod directory of `namespace/name` (each records its name).
fn pod_dir(pods_dir: &Path, namespace: &str, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(pods_dir)
        .ok()?
        .flatten()
        .find_map(|entry| {
            let recorded: serde_json::Value =
                serde_json::from_slice(&std::fs::read(entry.path().join("pod.json")).ok()?).ok()?;
            (recorded["namespace"] == namespace && recorded["name"] == name).then(|| entry.path())
        })
}

/// The instance numbers that have logs, ascending.
fn instances(dir: &Path) -> Vec<i32> {
    let mut found: Vec<i32> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
        .collect();
    found.sort_unstable();
    found
}

/// The last `lines` lines of `text`.
fn tail(text: &[u8], lines: usize) -> &[u8] {
    let mut end = text.len();
    if text.ends_with(b"\n") {
        end -= 1;
    }
    let mut seen = 0;
    for (i, byte) in text[..end].iter().enumerate().rev() {
        if *byte == b'\n' {
            seen += 1;
            if seen == lines {
                return &text[i + 1..];
            }
        }
    }
    if lines == 0 { &[] } else { text }
}

async fn container_logs(
    State(logs): State<Logs>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    Query(query): Query<LogQuery>,
) -> Response {
    // Names as the API has them (DNS labels and subdomains): never a path.
    let valid = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !s.contains("..")
    };
    if !(valid(&namespace) && valid(&pod) && valid(&container)) {
        return error(StatusCode::BAD_REQUEST, "invalid names".into());
    }
    let Some(dir) = pod_dir(&logs.pods_dir, &namespace, &pod) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("pod {namespace}/{pod} is not on this node"),
        );
    };
    let log_dir = dir.join("logs").join(&container);
    let instances = instances(&log_dir);
    let layout = containers::Layout {
        pod_dir: &dir,
        container: &container,
    };
    // The newest instance, if it no longer runs (a container in
    // back-off), is the previous one, as kubelet has it.
    let record = containers::recorded(&layout);
    let newest_ended = match &record {
        Some(record) => !logs.runtime.running(record).await,
        None => true,
    };
    let chosen = match (query.previous, newest_ended) {
        (true, true) => instances.last(),
        (true, false) => instances.iter().rev().nth(1),
        (false, _) => instances.last(),
    };
    let Some(&instance) = chosen else {
        let what = if query.previous {
            "previous terminated container"
        } else {
            "container"
        };
        return error(
            StatusCode::NOT_FOUND,
            format!("{what} \"{container}\" in pod \"{pod}\" not found"),
        );
    };
    let path = log_dir.join(format!("{instance}.log"));
    let Ok(text) = tokio::fs::read(&path).await else {
        return error(StatusCode::NOT_FOUND, format!("{} is gone", path.display()));
    };
    let format = logs.runtime.log_format();
    let (output, used) = format.decode(&text);
    let mut head = match query.tail_lines {
        Some(lines) => tail(&output, lines).to_vec(),
        None => output,
    };
    let limit = query.limit_bytes.unwrap_or(usize::MAX);
    head.truncate(limit);
    if !query.follow || query.previous || head.len() >= limit {
        return Body::from(head).into_response();
    }
    // Following: what is there, then what is appended while the instance
    // runs.
    let record = record.filter(|r| r.restart_count == instance);
    let runtime = Arc::clone(&logs.runtime);
    let state = (Some(head), used as u64, limit, path);
    let stream = futures::stream::unfold(state, move |(first, mut offset, left, path)| {
        let (record, runtime) = (record.clone(), Arc::clone(&runtime));
        async move {
            if let Some(first) = first {
                let left = left.saturating_sub(first.len());
                return Some((Ok::<_, std::io::Error>(first), (None, offset, left, path)));
            }
            loop {
                if left == 0 {
                    return None;
                }
                // Asked before reading, so what it wrote before it ended
                // is read.
                let running = match &record {
                    Some(record) => runtime.running(record).await,
                    None => false,
                };
                let mut file = tokio::fs::File::open(&path).await.ok()?;
                file.seek(std::io::SeekFrom::Start(offset)).await.ok()?;
                let mut more = Vec::new();
                file.read_to_end(&mut more).await.ok()?;
                let (mut output, used) = format.decode(&more);
                offset += used as u64;
                output.truncate(left);
                if !output.is_empty() {
                    let left = left - output.len();
                    return Some((Ok(output), (None, offset, left, path)));
                }
                if !running {
                    return None;
                }
                tokio::time::sleep(FOLLOW_PERIOD).await;
            }
        }
    });
    Body::from_stream(stream).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_take_the_last_lines() {
        assert_eq!(tail(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", 1), b"c");
        assert_eq!(tail(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail(b"a\nb\n", 0), b"");
    }

    #[test]
    fn logs_are_found_by_pod_and_instance() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("uid-1");
        std::fs::create_dir_all(pod.join("logs/web")).unwrap();
        std::fs::write(pod.join("pod.json"), r#"{"namespace": "ns", "name": "p"}"#).unwrap();
        for n in [0, 1, 10] {
            std::fs::write(pod.join(format!("logs/web/{n}.log")), "x").unwrap();
        }
        assert_eq!(pod_dir(dir.path(), "ns", "p"), Some(pod.clone()));
        assert_eq!(pod_dir(dir.path(), "ns", "q"), None);
        assert_eq!(instances(&pod.join("logs/web")), [0, 1, 10]);
    }
}
