//! wharf-control command line.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use wharf_control::{
    apiserver::{self, Config, ServiceRanges, TolerationDefaults},
    components::{self, Component},
    controllers, join, pki,
    store::{EmbeddedStore, EtcdStore},
};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StoreKind {
    /// redb in the data directory: one machine, no other process.
    Embedded,
    /// An etcd cluster (`--etcd-endpoints`).
    Etcd,
}

/// wharf control plane: a Kubernetes-compatible API server with the
/// scheduler and the controllers.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Only the scheduler, against the API in the kubeconfig.
    Scheduler {
        #[arg(long)]
        kubeconfig: PathBuf,
    },
    /// Only the controllers, against the API in the kubeconfig.
    Controllers {
        #[arg(long)]
        kubeconfig: PathBuf,
        #[command(flatten)]
        controllers: ControllerArgs,
    },
    /// Join tokens for new nodes.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, clap::Subcommand)]
enum TokenCommand {
    /// Creates a bootstrap token (a Secret in kube-system) and prints it:
    /// `wharf-agent --server URL --token T --ca-cert-hash H` joins a node
    /// with it.
    Create {
        /// An admin's kubeconfig (the server's `admin.kubeconfig`).
        #[arg(long)]
        kubeconfig: PathBuf,
        /// How long the token authenticates, in seconds (0: forever).
        #[arg(long, default_value_t = 86_400)]
        ttl_seconds: u64,
        /// Print the whole `wharf-agent` command line, not just the token.
        #[arg(long)]
        print_join_command: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Builtin {
    Scheduler,
    Controllers,
}

#[derive(Debug, clap::Args)]
struct ServerArgs {
    /// Certificates, keys, kubeconfigs and the embedded store live here.
    #[arg(long, required = true)]
    data_dir: Option<PathBuf>,

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

    /// Seconds a pod tolerates its node being not ready before eviction
    /// (added to pods that say nothing).
    #[arg(long, default_value_t = 300)]
    default_not_ready_toleration_seconds: i64,

    /// Seconds a pod tolerates its node being unreachable before eviction.
    #[arg(long, default_value_t = 300)]
    default_unreachable_toleration_seconds: i64,

    /// Components not to run in this process (run them with
    /// `wharf-control scheduler|controllers` instead, or not at all).
    #[arg(long, value_enum, value_delimiter = ',')]
    without: Vec<Builtin>,

    #[command(flatten)]
    controllers: ControllerArgs,
}

#[derive(Debug, clap::Args)]
struct ControllerArgs {
    /// Pod addresses; each node gets a slice of it as spec.podCIDR.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: String,

    /// Prefix length of each node's pod CIDR.
    #[arg(long, default_value_t = 24)]
    node_cidr_mask_size: u8,

    /// A node whose lease was not renewed for this many seconds is
    /// marked NotReady (Unknown).
    #[arg(long, default_value_t = 40)]
    node_monitor_grace_period: u64,

    /// Seconds between two syncs of each HorizontalPodAutoscaler.
    #[arg(long, default_value_t = 15)]
    horizontal_pod_autoscaler_sync_period: u64,

    /// A data directory whose cluster CA (`pki/ca.{crt,key}`) signs
    /// approved node certificate requests (default: the server's
    /// `--data-dir`; a standalone `controllers` signs nothing without it).
    #[arg(long)]
    cluster_signing_dir: Option<PathBuf>,
}

impl ControllerArgs {
    fn options(&self, data_dir: Option<&Path>) -> anyhow::Result<controllers::Options> {
        // A signing directory named on the command line must hold a CA
        // (a typo must not make a new one); the server's own is made if
        // missing, as the API server makes it.
        let signer = match (&self.cluster_signing_dir, data_dir) {
            (Some(dir), _) => Some(
                pki::Authority::load(dir)
                    .with_context(|| format!("loading the cluster CA from {}", dir.display()))?,
            ),
            (None, Some(dir)) => Some(
                pki::Authority::load_or_create(dir)
                    .with_context(|| format!("the cluster CA in {}", dir.display()))?,
            ),
            (None, None) => None,
        }
        .map(Arc::new);
        let cluster_cidr = controllers::parse_cidr(&self.cluster_cidr)
            .with_context(|| format!("--cluster-cidr {} is not an IPv4 CIDR", self.cluster_cidr))?;
        anyhow::ensure!(
            (cluster_cidr.1..=30).contains(&self.node_cidr_mask_size),
            "--node-cidr-mask-size {} must be between the cluster CIDR's /{} and /30",
            self.node_cidr_mask_size,
            cluster_cidr.1
        );
        Ok(controllers::Options {
            cluster_cidr,
            node_cidr_mask: self.node_cidr_mask_size,
            node_monitor_grace: Duration::from_secs(self.node_monitor_grace_period),
            autoscaler_sync_period: Duration::from_secs(
                self.horizontal_pod_autoscaler_sync_period.max(1),
            ),
            signer,
        })
    }
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
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Scheduler { kubeconfig }) => {
            let client = components::client(&kubeconfig).await?;
            components::run(Component::Scheduler, client, shutdown_signal()).await;
            Ok(())
        }
        Some(Command::Controllers {
            kubeconfig,
            controllers,
        }) => {
            let component = Component::Controllers(controllers.options(None)?);
            let client = components::client(&kubeconfig).await?;
            components::run(component, client, shutdown_signal()).await;
            Ok(())
        }
        Some(Command::Token(TokenCommand::Create {
            kubeconfig,
            ttl_seconds,
            print_join_command,
        })) => {
            let join = join::create(&kubeconfig, Duration::from_secs(ttl_seconds)).await?;
            if print_join_command {
                println!(
                    "wharf-agent --server {} --token {} --ca-cert-hash {} --node-name <name>",
                    join.server, join.token, join.ca_cert_hash
                );
            } else {
                println!("{}", join.token);
            }
            Ok(())
        }
        None => serve(cli.server).await,
    }
}

/// The API server, with the scheduler and the controllers unless
/// `--without` says otherwise.
async fn serve(args: ServerArgs) -> anyhow::Result<()> {
    let data_dir = args.data_dir.context("--data-dir is required")?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let mut builtins = Vec::new();
    if !args.without.contains(&Builtin::Scheduler) {
        builtins.push((Component::Scheduler, "scheduler.kubeconfig"));
    }
    if !args.without.contains(&Builtin::Controllers) {
        builtins.push((
            Component::Controllers(args.controllers.options(Some(&data_dir))?),
            "controller-manager.kubeconfig",
        ));
    }
    let config = Config {
        data_dir: data_dir.clone(),
        listen: args.listen,
        token_file: args.token_auth_file,
        ranges: ServiceRanges::parse(&args.service_cidr, &args.service_node_port_range)?,
        tolerations: TolerationDefaults {
            not_ready_seconds: args.default_not_ready_toleration_seconds,
            unreachable_seconds: args.default_unreachable_toleration_seconds,
        },
    };
    let listen = match args.listen.ip() {
        ip if ip.is_unspecified() => {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), args.listen.port())
        }
        _ => args.listen,
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let server = async {
        let result = match args.store {
            StoreKind::Embedded => {
                let store = EmbeddedStore::open(&data_dir.join("store.redb"))?;
                apiserver::serve(config, store, shutdown_signal()).await
            }
            StoreKind::Etcd => {
                let store = EtcdStore::connect(&args.etcd_endpoints).await?;
                apiserver::serve(config, store, shutdown_signal()).await
            }
        };
        // The components stop with the server.
        let _ = stop.send(true);
        result.map_err(anyhow::Error::from)
    };
    let components = futures::future::join_all(builtins.into_iter().map(|(component, file)| {
        let path = data_dir.join(file);
        let mut stopped = stopped.clone();
        async move {
            // The server writes the kubeconfig, then listens (or fails
            // to start, and then nothing runs).
            while !path.exists() || tokio::net::TcpStream::connect(listen).await.is_err() {
                if *stopped.borrow() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let client = match components::client(&path).await {
                Ok(client) => client,
                Err(error) => {
                    tracing::error!(%error, "starting a component");
                    return;
                }
            };
            let shutdown = async move {
                // Err: the server is gone, which also means stop.
                let _ = stopped.wait_for(|s| *s).await;
            };
            components::run(component, client, shutdown).await;
        }
    }));
    let (result, _) = tokio::join!(server, components);
    result
}
