//! HTTPS: rustls with optional client certificates (verified against the
//! cluster CA; a request without one may still bring a bearer token), HTTP/2
//! and HTTP/1.1 by ALPN, one task per connection.

use std::{future::Future, sync::Arc};

use axum::{Router, extract::Request};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder,
    service::TowerToHyperService,
};
use rustls::{
    RootCertStore, ServerConfig,
    crypto::ring::default_provider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;
use tracing::debug;

use super::authn::{User, user_from_certificate};
use crate::pki::Credential;

/// The verified client-certificate identity of a connection, attached to
/// each of its requests.
#[derive(Clone, Debug, Default)]
pub struct PeerIdentity(pub Option<User>);

fn pem_error(what: &str, error: impl std::fmt::Display) -> rustls::Error {
    rustls::Error::General(format!("{what}: {error}"))
}

pub fn server_config(
    ca_pem: &str,
    serving: &Credential,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| pem_error("CA certificate", e))?)?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .allow_unauthenticated()
            .build()
            .map_err(|e| pem_error("client verifier", e))?;
    // The CA goes along: a joining node pins it by hash
    // (`wharf-control token create`) before it trusts the server.
    let chain = CertificateDer::pem_slice_iter(serving.cert_pem.as_bytes())
        .chain(CertificateDer::pem_slice_iter(ca_pem.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error("serving certificate", e))?;
    let key = PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes())
        .map_err(|e| pem_error("serving key", e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts connections until `shutdown` resolves.
pub async fn accept(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send,
) {
    let acceptor = TlsAcceptor::from(config);
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "accept failed");
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(stream).await {
                Ok(tls) => tls,
                Err(error) => {
                    debug!(%remote, %error, "TLS handshake failed");
                    return;
                }
            };
            let peer = PeerIdentity(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|cert| user_from_certificate(cert)),
            );
            let service = tower::service_fn(move |mut request: Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(peer.clone());
                router.clone().oneshot(request.map(axum::body::Body::new))
            });
            if let Err(error) = Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(
                    TokioIo::new(tls),
                    TowerToHyperService::new(service),
                )
                .await
            {
                debug!(%remote, %error, "connection ended with an error");
            }
        });
    }
}
