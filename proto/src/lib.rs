//! The node agent's gRPC API: the messages, the `Ipam` client (for
//! wharf-cni) and server trait (for wharf-agent), generated from
//! `agent.proto`; and a client of the Kubernetes Container Runtime
//! Interface (`cri`), generated from `cri.proto`.

#[allow(
    missing_debug_implementations,
    unused_qualifications,
    clippy::doc_markdown,
    reason = "generated code"
)]
mod generated {
    tonic::include_proto!("wharf.agent.v1");
}

pub use generated::*;

/// The CRI (`runtime.v1`): its `RuntimeService` and `ImageService`
/// clients and messages.
pub mod cri {
    #[allow(
        missing_debug_implementations,
        unused_qualifications,
        clippy::doc_markdown,
        clippy::enum_variant_names,
        reason = "generated code"
    )]
    mod generated {
        tonic::include_proto!("runtime.v1");
    }

    pub use generated::*;

    /// Clients of both CRI services of the runtime whose socket is at
    /// `path`, over one connection.
    pub async fn connect(
        path: &std::path::Path,
    ) -> Result<
        (
            runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
            image_service_client::ImageServiceClient<tonic::transport::Channel>,
        ),
        tonic::transport::Error,
    > {
        let channel = super::unix_channel(path).await?;
        Ok((
            runtime_service_client::RuntimeServiceClient::new(channel.clone()),
            image_service_client::ImageServiceClient::new(channel),
        ))
    }
}

/// Where the agent serves its API unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/wharf/agent.sock";

/// Clients of the agent API's services, over one connection.
#[derive(Clone, Debug)]
pub struct AgentClient {
    pub ipam: ipam_client::IpamClient<tonic::transport::Channel>,
    pub datapath: datapath_client::DatapathClient<tonic::transport::Channel>,
}

/// A client of the agent API on the UNIX socket at `path`.
pub async fn connect(path: &std::path::Path) -> Result<AgentClient, tonic::transport::Error> {
    let channel = unix_channel(path).await?;
    Ok(AgentClient {
        ipam: ipam_client::IpamClient::new(channel.clone()),
        datapath: datapath_client::DatapathClient::new(channel),
    })
}

/// A gRPC channel to the UNIX socket at `path`.
async fn unix_channel(
    path: &std::path::Path,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    // gRPC wants a URI; the connector ignores it and dials the socket.
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}
