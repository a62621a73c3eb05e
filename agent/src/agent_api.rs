//! The gRPC API the agent serves on its root-only UNIX socket (see
//! `proto/agent.proto`): the `Ipam` service wharf-cni asks for pod
//! addresses, and the `Datapath` service it tells about each pod link it
//! wired, so the eBPF mode's TC programs are on it before the pod runs. Addresses come from the node's podCIDR, which the API
//! server's node IPAM assigns after registration (or `--pod-cidr`), and
//! which the allocations file remembers across restarts; while none is
//! known, allocating fails with UNAVAILABLE and a message saying so, but
//! releasing (CNI DEL, GC) works.

use std::{
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
};

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use wharf_proto::{
    Assignment, Attachment, PodLink, PodLinkAttached, Released, StatusReply, StatusRequest,
    ValidAttachments,
    datapath_server::{Datapath as DatapathRpc, DatapathServer},
    ipam_server::{Ipam as IpamRpc, IpamServer},
};

use crate::{
    ebpf::Dataplane,
    ipam::{self, Ipam, IpamError, PodCidr},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentApiError {
    #[error("creating {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} (mode {mode:o}) is not the agent's own directory: others could reach the socket; give --api-socket a directory of its own"
    )]
    SharedDirectory { path: PathBuf, mode: u32 },
    #[error("serving the agent API: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// How soon a podCIDR that could not be taken on is tried again.
const CIDR_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// The `Ipam` service over the node's allocations.
#[derive(Debug, Clone)]
pub struct IpamService {
    ipam: Arc<Mutex<Ipam>>,
    available: watch::Receiver<Option<String>>,
}

impl IpamService {
    /// Opens the allocations kept at `state` (a damaged file is an error
    /// here, not a silently empty pool) and follows the podCIDR on `cidrs`.
    pub fn open(
        state: &Path,
        mut cidrs: watch::Receiver<Option<String>>,
    ) -> Result<Self, IpamError> {
        let ipam = Ipam::open(state)?;
        let (taken, available) = watch::channel(ipam.cidr().map(|c| c.to_string()));
        let service = Self {
            ipam: Arc::new(Mutex::new(ipam)),
            available,
        };
        let follower = service.clone();
        tokio::spawn(async move {
            loop {
                let cidr = cidrs.borrow_and_update().clone();
                if let Some(text) = cidr {
                    match PodCidr::parse(&text) {
                        // Nothing to retry: wait for another CIDR.
                        Err(error) => warn!(%error, "cannot hand out pod addresses"),
                        Ok(cidr) => match follower.with(move |ipam| ipam.set_cidr(cidr)).await {
                            Ok(()) => {
                                info!(pod_cidr = %cidr, "pod addresses available");
                                taken.send_replace(Some(cidr.to_string()));
                            }
                            Err(error) => {
                                // Writing the allocations failed: retry.
                                warn!(%error, "cannot hand out pod addresses; retrying in 5 s");
                                tokio::select! {
                                    changed = cidrs.changed() => if changed.is_err() { return },
                                    () = tokio::time::sleep(CIDR_RETRY) => {}
                                }
                                continue;
                            }
                        },
                    }
                }
                if cidrs.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(service)
    }

    /// The podCIDR addresses are handed out from, once there is one.
    pub fn available(&self) -> watch::Receiver<Option<String>> {
        self.available.clone()
    }

    /// Runs `work` on the allocations on a blocking thread: it fsyncs, and
    /// the runtime's two workers carry the node's Lease and health.
    async fn with<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Ipam) -> Result<T, IpamError> + Send + 'static,
    ) -> Result<T, Status> {
        let ipam = Arc::clone(&self.ipam);
        let done = tokio::task::spawn_blocking(move || {
            // Every change is committed whole or not at all, so a panic
            // elsewhere cannot have left the allocations half-written.
            let mut ipam = ipam.lock().unwrap_or_else(|e| e.into_inner());
            work(&mut ipam)
        })
        .await
        .map_err(|e| Status::internal(format!("IPAM task failed: {e}")))?;
        done.map_err(|error| match error {
            IpamError::NoCidr => Status::unavailable(error.to_string()),
            IpamError::Exhausted { .. } => Status::resource_exhausted(error.to_string()),
            other => Status::internal(other.to_string()),
        })
    }
}

fn attachment(request: Attachment) -> Result<ipam::Attachment, Status> {
    if request.container_id.is_empty() || request.ifname.is_empty() {
        return Err(Status::invalid_argument(
            "an attachment needs a container ID and an interface name",
        ));
    }
    Ok(ipam::Attachment {
        container_id: request.container_id,
        ifname: request.ifname,
    })
}

fn released(addresses: impl IntoIterator<Item = std::net::Ipv4Addr>) -> Released {
    Released {
        addresses: addresses.into_iter().map(|a| a.to_string()).collect(),
    }
}

#[tonic::async_trait]
impl IpamRpc for IpamService {
    async fn allocate(&self, request: Request<Attachment>) -> Result<Response<Assignment>, Status> {
        let attachment = attachment(request.into_inner())?;
        let assigned = self.with(move |ipam| ipam.allocate(&attachment)).await?;
        Ok(Response::new(Assignment {
            address: assigned.address.to_string(),
            prefix: u32::from(assigned.prefix),
            gateway: assigned.gateway.to_string(),
        }))
    }

    async fn release(&self, request: Request<Attachment>) -> Result<Response<Released>, Status> {
        let attachment = attachment(request.into_inner())?;
        let freed = self.with(move |ipam| ipam.release(&attachment)).await?;
        Ok(Response::new(released(freed)))
    }

    async fn collect(
        &self,
        request: Request<ValidAttachments>,
    ) -> Result<Response<Released>, Status> {
        let valid = request
            .into_inner()
            .attachments
            .into_iter()
            .map(attachment)
            .collect::<Result<Vec<_>, _>>()?;
        let freed = self.with(move |ipam| ipam.collect(&valid)).await?;
        Ok(Response::new(released(freed)))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let reply = self
            .with(|ipam| {
                let cidr = ipam.cidr().ok_or(IpamError::NoCidr)?;
                Ok(StatusReply {
                    pod_cidr: cidr.to_string(),
                    allocated: ipam.allocated(),
                    capacity: cidr.capacity(),
                })
            })
            .await?;
        Ok(Response::new(reply))
    }
}

/// The `Datapath` service: pod links get the eBPF dataplane's TC
/// programs once the agent runs the eBPF mode, and nothing in the others.
#[derive(Debug, Clone, Default)]
pub struct DatapathService {
    /// Unset while the mode is being chosen; `None` for modes without
    /// per-link programs.
    dataplane: Arc<OnceLock<Option<Arc<Mutex<Dataplane>>>>>,
}

impl DatapathService {
    /// Says what pod links get from now on: the loaded eBPF dataplane, or
    /// nothing (`None`). Only the first call counts.
    pub fn set(&self, dataplane: Option<Dataplane>) {
        let _ = self
            .dataplane
            .set(dataplane.map(|d| Arc::new(Mutex::new(d))));
    }
}

#[tonic::async_trait]
impl DatapathRpc for DatapathService {
    async fn attach_pod_link(
        &self,
        request: Request<PodLink>,
    ) -> Result<Response<PodLinkAttached>, Status> {
        let name = request.into_inner().name;
        if name.is_empty() || name.len() > 15 || name.contains('/') {
            return Err(Status::invalid_argument(format!(
                "{name:?} is not a link name"
            )));
        }
        let Some(chosen) = self.dataplane.get() else {
            return Err(Status::unavailable(
                "the agent has not chosen its proxy mode yet",
            ));
        };
        let Some(dataplane) = chosen.clone() else {
            return Ok(Response::new(PodLinkAttached { attached: false }));
        };
        tokio::task::spawn_blocking(move || {
            let mut dataplane = dataplane.lock().unwrap_or_else(|e| e.into_inner());
            dataplane.attach_pod_link(&name)
        })
        .await
        .map_err(|e| Status::internal(format!("attach task failed: {e}")))?
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(PodLinkAttached { attached: true }))
    }
}

/// Binds the socket at `path` and serves until `shutdown`. Its directory
/// must be the agent's own: created 0700 if missing, and refused if it
/// exists and others may enter it, so the socket is never reachable by
/// anyone but root, even before it is made 0600 itself. (A shared
/// directory such as /run is never chmodded.)
pub async fn serve(
    path: &Path,
    service: IpamService,
    datapath: DatapathService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentApiError> {
    let error = |source| AgentApiError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let metadata = std::fs::metadata(dir).map_err(error)?;
                // SAFETY: geteuid(2) cannot fail and touches no memory.
                let uid = unsafe { libc::geteuid() };
                if metadata.mode() & 0o077 != 0 || metadata.uid() != uid {
                    return Err(AgentApiError::SharedDirectory {
                        path: dir.to_path_buf(),
                        mode: metadata.mode() & 0o7777,
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = dir.parent() {
                    std::fs::create_dir_all(parent).map_err(error)?;
                }
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(dir)
                    .map_err(error)?;
            }
            Err(e) => return Err(error(e)),
        }
    }
    // A socket left by an earlier run refuses the bind.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(error)?;
    info!(socket = %path.display(), "agent API serving");
    tonic::transport::Server::builder()
        .add_service(IpamServer::new(service))
        .add_service(DatapathServer::new(datapath))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment(id: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    #[tokio::test]
    async fn addresses_are_handed_out_once_the_pod_cidr_is_known() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/agent.sock");
        let (cidrs, watched) = watch::channel(None);
        let service = IpamService::open(&dir.path().join("ipam.json"), watched).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let path = socket.clone();
        let datapath = DatapathService::default();
        let pod_links = datapath.clone();
        let server = tokio::spawn(async move {
            serve(&path, service, pod_links, async {
                let _ = stopped.await;
            })
            .await
        });
        while !socket.exists() {
            assert!(!server.is_finished(), "the server stopped");
            tokio::task::yield_now().await;
        }
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let wharf_proto::AgentClient {
            ipam: mut client,
            datapath: mut links,
        } = wharf_proto::connect(&socket).await.unwrap();

        // Pod links wait for the proxy mode; rule-based modes need nothing.
        let link = |name: &str| PodLink { name: name.into() };
        let early = links.attach_pod_link(link("wh0")).await.unwrap_err();
        assert_eq!(early.code(), tonic::Code::Unavailable);
        datapath.set(None);
        let attached = links.attach_pod_link(link("wh0")).await.unwrap();
        assert!(!attached.into_inner().attached);
        let bad = links.attach_pod_link(link("../x")).await.unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);

        let error = client.allocate(attachment("a")).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unavailable);
        assert!(error.message().contains("no podCIDR"), "{error}");

        cidrs.send(Some("10.244.3.0/24".into())).unwrap();
        let assignment = loop {
            match client.allocate(attachment("a")).await {
                Ok(reply) => break reply.into_inner(),
                Err(e) if e.code() == tonic::Code::Unavailable => tokio::task::yield_now().await,
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(
            (
                assignment.address.as_str(),
                assignment.prefix,
                assignment.gateway.as_str()
            ),
            ("10.244.3.2", 24, "10.244.3.1")
        );
        let status = client.status(StatusRequest {}).await.unwrap().into_inner();
        assert_eq!((status.allocated, status.capacity), (1, 253));
        let bad = client.allocate(Attachment::default()).await.unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        client.allocate(attachment("b")).await.unwrap();
        let freed = client
            .collect(ValidAttachments {
                attachments: vec![attachment("b")],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(freed.addresses, ["10.244.3.2"]);
        let freed = client.release(attachment("a")).await.unwrap().into_inner();
        assert!(freed.addresses.is_empty(), "already collected");
        let dir_mode = std::fs::metadata(socket.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_directory_others_can_enter_is_refused_not_changed() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (_cidrs, watched) = watch::channel(None);
        let service = IpamService::open(&dir.path().join("ipam.json"), watched).unwrap();
        let error = serve(
            &shared.join("agent.sock"),
            service,
            DatapathService::default(),
            async {},
        )
        .await
        .unwrap_err();
        assert!(
            matches!(error, AgentApiError::SharedDirectory { mode: 0o755, .. }),
            "{error}"
        );
        let mode = std::fs::metadata(&shared).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "left as it was");
    }
}
