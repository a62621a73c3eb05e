//! The Kubernetes-compatible API server: HTTPS front door, authentication,
//! discovery, and the generic verbs over every registered resource, backed
//! by any [`Store`].

mod admission;
mod allocation;
pub mod authn;
mod authz;
mod discovery;
pub mod encryption;
mod eviction;
mod http;
mod kinds;
mod logs;
mod managed;
mod metrics;
mod objects;
mod openapi;
mod patch;
mod protobuf;
mod selectors;
mod status;
mod stored;
mod table;
pub mod tls;
mod validation;
mod watch;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use futures::StreamExt as _;
use serde_json::Value;
use tracing::{info, warn};

pub use self::{
    admission::TolerationDefaults, allocation::ServiceRanges, kinds::Registry, status::ApiError,
};
use self::{
    authn::Authenticator,
    encryption::SecretBox,
    watch::{CachedEvent, EventType, WatchCache},
};
use crate::{
    pki::{self, Authority, PkiError},
    store::{EventKind, KeyValue, Revision, Store, StoreError},
};

/// History older than this is compacted away (kube-apiserver's default
/// compaction interval): old continue tokens and resourceVersions then get
/// 410, and the embedded store's history stays bounded.
const COMPACTION_INTERVAL: Duration = Duration::from_secs(300);

/// Everything under the registry prefix is an API object.
const REGISTRY_PREFIX: &str = "/registry/";

/// Server settings (from the command line).
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub token_file: Option<PathBuf>,
    /// Where ClusterIPs and node ports come from.
    pub ranges: ServiceRanges,
    pub tolerations: TolerationDefaults,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("certificates: {0}")]
    Pki(#[from] PkiError),
    #[error("secret encryption key: {0}")]
    Encryption(#[from] encryption::EncryptionError),
    #[error("token file: {0}")]
    Tokens(#[from] authn::TokenFileError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Shared state of all requests.
pub struct App<S> {
    store: S,
    registry: Registry,
    cache: Arc<WatchCache>,
    secrets: SecretBox,
    authn: Authenticator,
    authz: authz::Authorizer,
    metrics: metrics::Metrics,
    openapi: openapi::OpenApi,
    ranges: ServiceRanges,
    /// Where the server listens: the `kubernetes` Service's target port,
    /// and its endpoint when the address is one pods can reach.
    listen: SocketAddr,
    tolerations: TolerationDefaults,
    kubelet: logs::KubeletClient,
}

impl<S> std::fmt::Debug for App<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl<S: Store> App<S> {
    /// Decodes a stored object: decrypts secrets, parses JSON, and sets
    /// resourceVersion to the revision that wrote it.
    fn decode(&self, kv: &KeyValue, revision: Revision) -> Result<Value, ApiError> {
        let plain;
        let bytes = if is_sealed(&kv.key) {
            plain = self.secrets.open(&kv.value).map_err(ApiError::internal)?;
            &plain
        } else {
            &kv.value
        };
        stored::decode(bytes, revision)
            .map_err(|e| ApiError::internal(format!("stored object {} is not JSON: {e}", kv.key)))
    }

    /// The stored form: no resourceVersion (the store revision is it;
    /// it is removed from `object`, whose caller sets the new one once
    /// committed), and secrets sealed.
    fn encode(&self, key: &str, object: &mut Value) -> Vec<u8> {
        if let Some(metadata) = object["metadata"].as_object_mut() {
            metadata.remove("resourceVersion");
        }
        let bytes = serde_json::to_vec(object).unwrap_or_default();
        if is_sealed(key) {
            self.secrets.seal(&bytes)
        } else {
            bytes
        }
    }

    /// Feeds the watch cache from one store watch, forever: re-watches
    /// after errors, resetting the cache when history was lost.
    async fn feed_watch_cache(self: Arc<Self>) {
        loop {
            let after = self.cache.revision();
            let mut stream = match self.store.watch(REGISTRY_PREFIX, after).await {
                Ok(stream) => stream,
                Err(error) => {
                    warn!(%error, after, "watch cache: store watch failed; resetting");
                    match self.store.revision().await {
                        Ok(current) => {
                            self.cache.reset(current);
                            // Changes in between never reach the index:
                            // rebuild it at the revision the cache restarts.
                            self.authz.clear();
                            if let Err(error) = self.load_rbac(current).await {
                                warn!(%error, "watch cache: reloading RBAC failed");
                            }
                        }
                        Err(error) => warn!(%error, "watch cache: store unreachable"),
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(batch) = stream.next().await {
                match batch {
                    Ok(events) => self.cache_batch(events),
                    Err(error) => {
                        warn!(%error, "watch cache: store watch ended; re-watching");
                        break;
                    }
                }
            }
        }
    }

    /// Every interval, compacts the store to the revision it had one
    /// interval earlier.
    async fn compact_history(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(COMPACTION_INTERVAL);
        let mut previous = None;
        loop {
            ticks.tick().await;
            match self.store.revision().await {
                Ok(current) => {
                    if let Some(revision) = previous
                        && let Err(error) = self.store.compact(revision).await
                    {
                        warn!(%error, revision, "compaction failed");
                    }
                    previous = Some(current);
                }
                Err(error) => warn!(%error, "compaction: store unreachable"),
            }
        }
    }

    /// Indexes the RBAC objects as of `revision`; the watch cache applies
    /// every later change.
    async fn load_rbac(&self, revision: Revision) -> Result<(), StoreError> {
        let range = self
            .store
            .range(crate::store::RangeRequest {
                prefix: authz::RBAC_PREFIX.to_owned(),
                revision,
                ..Default::default()
            })
            .await?;
        for kv in range.kvs {
            match self.decode(&kv, kv.mod_revision) {
                Ok(object) => self.authz.update(&kv.key, Some(&object)),
                Err(error) => warn!(%error, "RBAC object skipped"),
            }
        }
        Ok(())
    }

    /// A stored value as plain JSON bytes (secrets opened).
    fn plain(&self, kv: KeyValue) -> Result<bytes::Bytes, ApiError> {
        if is_sealed(&kv.key) {
            let plain = self.secrets.open(&kv.value).map_err(ApiError::internal)?;
            Ok(plain.into())
        } else {
            Ok(kv.value.into())
        }
    }

    fn cache_batch(&self, events: Vec<crate::store::Event>) {
        let Some(revision) = events.first().map(|e| e.kv.mod_revision) else {
            return;
        };
        let mut cached = Vec::with_capacity(events.len());
        for event in events {
            let key = event.kv.key.clone();
            let rbac = key.starts_with(authz::RBAC_PREFIX);
            let prev = match event.prev.map(|prev| self.plain(prev)) {
                Some(Ok(prev)) => Some(prev),
                Some(Err(error)) => {
                    warn!(%error, key, "watch cache: previous value unreadable");
                    None
                }
                None => None,
            };
            let (kind, raw, prev) = match (event.kind, prev) {
                (EventKind::Delete, Some(last)) => (EventType::Deleted, Ok(last), None),
                (EventKind::Delete, None) => {
                    if rbac {
                        // Even without a readable previous value.
                        self.authz.update(&key, None);
                    }
                    continue;
                }
                (EventKind::Put, None) => (EventType::Added, self.plain(event.kv), None),
                (EventKind::Put, prev) => (EventType::Modified, self.plain(event.kv), prev),
            };
            let raw = match raw {
                Ok(raw) => raw,
                Err(error) => {
                    warn!(%error, key, "watch cache: unreadable object skipped");
                    continue;
                }
            };
            let event = CachedEvent::new(revision, key, kind, raw, prev);
            if rbac {
                let object =
                    Some(event.object()).filter(|o| kind != EventType::Deleted && o.is_object());
                self.authz.update(&event.key, object);
            }
            cached.push(event);
        }
        self.cache.push(revision, cached);
    }
}

/// Secrets are sealed at rest (see `encryption`).
fn is_sealed(key: &str) -> bool {
    key.starts_with("/registry/core/secrets/")
}

/// Creates the PKI, kubeconfig and keys on first start, then serves until
/// `shutdown` resolves.
pub async fn serve<S: Store>(
    config: Config,
    store: S,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let ca = Authority::load_or_create(&config.data_dir)?;
    let ip = config.listen.ip();
    // The kubernetes Service's IP too: in-cluster clients dial it.
    let mut addresses = vec![ip, config.ranges.first_ip().into()];
    if ip.is_unspecified() {
        addresses.push(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let names: Vec<String> = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    .map(str::to_owned)
    .to_vec();
    let serving = ca.issue_serving(&names, &addresses)?;
    let mut component_kubeconfigs = Vec::new();
    ca.save("apiserver", &serving)?;
    let admin = ca.issue_client("kubernetes-admin", &["system:masters"])?;
    ca.save("admin", &admin)?;
    // The scheduler's and controllers' identities, for the in-process
    // components and for `wharf-control scheduler|controllers`.
    for (user, file) in [
        ("system:kube-scheduler", "scheduler"),
        ("system:kube-controller-manager", "controller-manager"),
    ] {
        let credential = ca.issue_client(user, &[])?;
        component_kubeconfigs.push((file, user, credential));
    }
    // How the API server authenticates to node agents (pods/log).
    let kubelet_client = ca.issue_client("kube-apiserver-kubelet-client", &["system:masters"])?;
    ca.save("apiserver-kubelet-client", &kubelet_client)?;
    let host = if ip.is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        ip.to_string()
    };
    let server_url = match ip {
        std::net::IpAddr::V6(_) if !ip.is_unspecified() => {
            format!("https://[{host}]:{}", config.listen.port())
        }
        _ => format!("https://{host}:{}", config.listen.port()),
    };
    let kubeconfig = config.data_dir.join("admin.kubeconfig");
    pki::write_private(
        &kubeconfig,
        pki::kubeconfig(
            &server_url,
            &ca.cert_pem,
            "kubernetes-admin",
            &pki::KubeconfigUser::Certificate(&admin),
        )
        .as_bytes(),
    )?;

    for (file, user, credential) in &component_kubeconfigs {
        pki::write_private(
            &config.data_dir.join(format!("{file}.kubeconfig")),
            pki::kubeconfig(
                &server_url,
                &ca.cert_pem,
                user,
                &pki::KubeconfigUser::Certificate(credential),
            )
            .as_bytes(),
        )?;
    }

    let authn = match &config.token_file {
        Some(path) => Authenticator::with_token_file(path)?,
        None => Authenticator::default(),
    };
    let secrets = SecretBox::load_or_create(&config.data_dir.join("encryption.key"))?;
    let revision = store.revision().await?;
    let registry = Registry::new();
    let app = Arc::new(App {
        store,
        openapi: openapi::OpenApi::build(&registry),
        registry,
        cache: Arc::new(WatchCache::new(revision)),
        secrets,
        authn,
        authz: authz::Authorizer::default(),
        metrics: metrics::Metrics::new(),
        ranges: config.ranges.clone(),
        listen: config.listen,
        tolerations: config.tolerations,
        kubelet: logs::KubeletClient::new(&ca.cert_pem, &kubelet_client)?,
    });
    app.load_rbac(revision).await?;
    tokio::spawn(Arc::clone(&app).feed_watch_cache());
    tokio::spawn(Arc::clone(&app).compact_history());
    app.bootstrap().await;

    let tls = tls::server_config(&ca.cert_pem, &serving)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            address: config.listen,
            source,
        })?;
    info!(listen = %config.listen, kubeconfig = %kubeconfig.display(), "serving");
    tls::accept(listener, tls, http::router(app), shutdown).await;
    Ok(())
}
