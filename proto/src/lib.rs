//! The node agent's gRPC API: the messages, the `Ipam` client (for
//! wharf-cni) and server trait (for wharf-agent), generated from
//! `agent.proto`.

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

/// Where the agent serves its API unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/wharf/agent.sock";

/// A client of the agent API on the UNIX socket at `path`.
pub async fn connect(
    path: &std::path::Path,
) -> Result<ipam_client::IpamClient<tonic::transport::Channel>, tonic::transport::Error> {
    let path = path.to_path_buf();
    // gRPC wants a URI; the connector ignores it and dials the socket.
    let channel = tonic::transport::Endpoint::from_static("http://agent")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(ipam_client::IpamClient::new(channel))
}
