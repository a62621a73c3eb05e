//! wharf-control command line.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use wharf_control::{
    apiserver::{self, Config, ServiceRanges},
    store::{EmbeddedStore, EtcdStore},
};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StoreKind {
    /// redb in the data directory: one machine, no other process.
    Embedded,
    /// An etcd cluster (`--etcd-endpoints`).
    Etcd,
}

/// wharf control plane: a Kubernetes-compatible API server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Certificates, keys, admin.kubeconfig and the embedded store live here.
    #[arg(long)]
    data_dir: PathBuf,

    /// HTTPS address to serve on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,

    /// Where objects are stored.
    #[arg(long, value_enum, default_value = "embedded")]
    store: StoreKind,

    /// etcd client URLs, comma separated (with --store etcd).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    etcd_endpoints: Vec<String>,

    /// ClusterIPs are allocated from this IPv4 range.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: String,

    /// NodePorts are allocated from this range.
    #[arg(long, default_value = "30000-32767")]
    service_node_port_range: String,

    /// Static bearer tokens: CSV lines of token,user,uid[,"group1,group2"].
    #[arg(long)]
    token_auth_file: Option<PathBuf>,
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail at startup");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let config = Config {
        data_dir: args.data_dir.clone(),
        listen: args.listen,
        token_file: args.token_auth_file,
        ranges: ServiceRanges::parse(&args.service_cidr, &args.service_node_port_range)?,
    };
    match args.store {
        StoreKind::Embedded => {
            let store = EmbeddedStore::open(&args.data_dir.join("store.redb"))?;
            apiserver::serve(config, store, shutdown_signal()).await?;
        }
        StoreKind::Etcd => {
            let store = EtcdStore::connect(&args.etcd_endpoints).await?;
            apiserver::serve(config, store, shutdown_signal()).await?;
        }
    }
    Ok(())
}
