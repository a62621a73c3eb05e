//! The gRPC API the agent serves on its root-only UNIX socket (see
//! `proto/agent.proto`): today the `Ipam` service wharf-cni asks for pod
//! addresses. Addresses come from the node's podCIDR, which the API
//! server's node IPAM assigns after registration (or `--pod-cidr`); until
//! it is known, every call fails with UNAVAILABLE and a message saying so.

use std::{
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::sync::{Mutex, watch};
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use wharf_proto::{
    Assignment, Attachment, Released, StatusReply, StatusRequest, ValidAttachments,
    ipam_server::{Ipam as IpamRpc, IpamServer},
};

use crate::ipam::{self, Ipam, IpamError, PodCidr};

#[derive(Debug, thiserror::Error)]
pub enum AgentApiError {
    #[error("creating {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the agent API: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The `Ipam` service over the node's allocations.
#[derive(Debug, Clone)]
pub struct IpamService {
    /// None until the podCIDR is known.
    ipam: Arc<Mutex<Option<Ipam>>>,
}

impl IpamService {
    /// Follows the podCIDR on `cidrs`, keeping allocations in `state`.
    pub fn follow(state: PathBuf, mut cidrs: watch::Receiver<Option<String>>) -> Self {
        let ipam = Arc::new(Mutex::new(None));
        let shared = Arc::clone(&ipam);
        tokio::spawn(async move {
            loop {
                let cidr = cidrs.borrow_and_update().clone();
                if let Some(cidr) = cidr {
                    match PodCidr::parse(&cidr).and_then(|cidr| Ipam::open(&state, cidr)) {
                        Ok(opened) => {
                            info!(pod_cidr = %opened.cidr(), "pod addresses available");
                            *shared.lock().await = Some(opened);
                        }
                        Err(error) => warn!(%error, "cannot hand out pod addresses"),
                    }
                }
                if cidrs.changed().await.is_err() {
                    return;
                }
            }
        });
        Self { ipam }
    }

    async fn with<T>(
        &self,
        work: impl FnOnce(&mut Ipam) -> Result<T, IpamError>,
    ) -> Result<T, Status> {
        let mut guard = self.ipam.lock().await;
        let ipam = guard.as_mut().ok_or_else(|| {
            Status::unavailable("this node has no podCIDR yet: no pod addresses to hand out")
        })?;
        work(ipam).map_err(|error| match error {
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
        let assigned = self.with(|ipam| ipam.allocate(&attachment)).await?;
        Ok(Response::new(Assignment {
            address: assigned.address.to_string(),
            prefix: u32::from(assigned.prefix),
            gateway: assigned.gateway.to_string(),
        }))
    }

    async fn release(&self, request: Request<Attachment>) -> Result<Response<Released>, Status> {
        let attachment = attachment(request.into_inner())?;
        let freed = self.with(|ipam| ipam.release(&attachment)).await?;
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
        let freed = self.with(|ipam| ipam.collect(&valid)).await?;
        Ok(Response::new(released(freed)))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let reply = self
            .with(|ipam| {
                Ok(StatusReply {
                    pod_cidr: ipam.cidr().to_string(),
                    allocated: ipam.allocated(),
                    capacity: ipam.cidr().capacity(),
                })
            })
            .await?;
        Ok(Response::new(reply))
    }
}

/// Binds the socket at `path` (its directory made root-only, the socket
/// itself 0600: it hands out addresses) and serves until `shutdown`.
pub async fn serve(
    path: &Path,
    service: IpamService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentApiError> {
    let error = |source| AgentApiError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(error)?;
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
        let service = IpamService::follow(dir.path().join("ipam.json"), watched);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let path = socket.clone();
        let server = tokio::spawn(async move {
            serve(&path, service, async {
                let _ = stopped.await;
            })
            .await
        });
        while !socket.exists() {
            tokio::task::yield_now().await;
        }
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut client = wharf_proto::connect(&socket).await.unwrap();

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

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
