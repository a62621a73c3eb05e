//! wharf-agent command line.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use tokio::sync::watch;
use tracing::info;
use wharf_agent::{
    agent_api::{self, DatapathService, IpamService},
    bootstrap,
    cluster::{self, Cluster},
    cni_install,
    ebpf::{Dataplane, Reconciler, read_counters},
    egress,
    host::{self, System},
    iptables::{Flavor, IptablesProxy},
    ipvs::IpvsProxy,
    kubelet::{
        self,
        cgroups::Cgroups,
        cri::CriRuntime,
        runtime::{ProcessRuntime, Runtime},
        sandbox::CniPaths,
        worker::Context,
    },
    mode::{self, Mode},
    netdev,
    nftables::NftablesProxy,
    proxy::ServiceProxy,
    registration::{self, NodeConfig},
    routes,
    standalone::Manifests,
    sync,
    telemetry::{self, Telemetry},
    vxlan,
};

/// How pods' containers are run.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum RuntimeKind {
    /// Each container's command runs on the node's filesystem (copy on
    /// write) in its own namespaces and cgroups; images are recorded,
    /// not pulled.
    Process,
    /// A CRI runtime (containerd, CRI-O) at --container-runtime-endpoint
    /// runs sandboxes and images; it calls the CNI plugins itself.
    Cri,
}

/// How pods reach pods on other nodes: one way for the whole cluster.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum RoutingMode {
    /// A route to each other node's podCIDR through its address: nodes
    /// on one L2 segment.
    Native,
    /// A VXLAN overlay (UDP 8472, VNI 1): nodes that only route each
    /// other's addresses. Pods get the underlay's MTU minus 50.
    Vxlan,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProxyMode {
    /// eBPF socket-LB, TC and XDP.
    Ebpf,
    /// iptables rules in kube-proxy's layout (nft or legacy backend,
    /// whichever the node uses).
    Iptables,
    /// One nftables table with verdict maps.
    Nftables,
    /// IPVS virtual servers (the kernel's ip_vs).
    Ipvs,
    /// eBPF where the kernel supports it, else nftables, else iptables.
    Auto,
}

/// wharf node agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// This node's name: its Node object, the EndpointSlice `nodeName` of
    /// its local endpoints, and the key of its pinned state under
    /// <bpffs>/wharf/<name>.
    #[arg(long, default_value_t = default_node_name())]
    node_name: String,

    /// How services are forwarded.
    #[arg(long, value_enum, default_value = "ebpf")]
    proxy_mode: ProxyMode,

    /// The API server to follow Services, EndpointSlices and Nodes on
    /// (wharf-control's or any kube-apiserver's).
    #[arg(long, required_unless_present_any = ["standalone", "teardown", "counters", "server"], conflicts_with_all = ["standalone", "services_from", "server"])]
    kubeconfig: Option<PathBuf>,

    /// Join the cluster at this API server URL with a bootstrap token
    /// instead of a kubeconfig: the agent obtains its own node
    /// credentials (`--state-dir/<node>/kubelet.kubeconfig`, reused on
    /// later starts). `wharf-control token create --print-join-command`
    /// prints the three flags.
    #[arg(long, requires_all = ["token", "ca_cert_hash"], conflicts_with_all = ["standalone", "services_from"])]
    server: Option<String>,

    /// The bootstrap token (`<id>.<secret>`), with --server.
    #[arg(long, requires = "server")]
    token: Option<String>,

    /// The cluster CA's pin (`sha256:<hex>` of its certificate), with
    /// --server: the token is sent only to a server that presents it.
    #[arg(long, requires = "server")]
    ca_cert_hash: Option<String>,

    /// Where the kubelet API (container logs for `kubectl logs`) is
    /// served, over mutual TLS with a serving certificate the cluster CA
    /// signed.
    #[arg(long, default_value = "0.0.0.0:10250")]
    kubelet_bind_address: SocketAddr,

    /// Run only the service proxy: the kube-proxy replacement on a node
    /// whose kubelet is another's. Without it, an agent following an API
    /// server also registers its Node and renews its Lease.
    #[arg(long, requires = "kubeconfig")]
    proxy_only: bool,

    /// How the pods bound to this node are run.
    #[arg(long, value_enum, default_value = "process")]
    runtime: RuntimeKind,

    /// The CRI runtime's UNIX socket, with --runtime cri (kubelet's flag;
    /// a `unix://` prefix is accepted).
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    container_runtime_endpoint: String,

    /// How pods reach pods on other nodes; every node of a cluster must
    /// say the same.
    #[arg(long, value_enum, default_value = "native")]
    routing: RoutingMode,

    /// Where v1 cgroup hierarchies are mounted: on a hybrid host, pod
    /// memory and CPU limits go to the v1 memory and cpu hierarchies
    /// when cgroup v2 lacks those controllers.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_v1_root: PathBuf,

    /// The pod capacity the Node announces (kubelet's default).
    #[arg(long, default_value_t = 110)]
    max_pods: u32,

    /// The node Lease's duration; it is renewed every quarter of it.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(4..))]
    node_lease_duration_seconds: u64,

    /// The agent API's UNIX socket (wharf-cni asks it for pod addresses).
    #[arg(long, default_value = wharf_proto::DEFAULT_SOCKET)]
    api_socket: PathBuf,

    /// Where the agent keeps its state (pod address allocations, under a
    /// directory per node name).
    #[arg(long, default_value = "/var/lib/wharf-agent")]
    state_dir: PathBuf,

    /// The pods' CIDR on this node; by default the Node's `spec.podCIDR`
    /// (assigned by the control plane's node IPAM).
    #[arg(long)]
    pod_cidr: Option<String>,

    /// The cluster's pod addresses: pod traffic to anything outside them
    /// (and the nodes) is masqueraded.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: String,

    /// Where wharf-cni is installed for the container runtime.
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,

    /// Where its network configuration list (10-wharf.conflist) is
    /// written, once the node has a podCIDR.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,

    /// Take services from manifests instead of an API server.
    #[arg(long, requires = "services_from")]
    standalone: bool,

    /// Service + EndpointSlice YAML: a file or a directory, watched.
    #[arg(long)]
    services_from: Option<PathBuf>,

    /// External devices: XDP (native where the driver has it) and TC.
    /// Their IPv4 addresses answer NodePort frontends.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,

    /// Pod-facing devices: TC only.
    #[arg(long, value_delimiter = ',')]
    pod_devices: Vec<String>,

    /// cgroup v2 directory whose processes get socket-LB.
    #[arg(long, default_value_os_t = kubelet::cgroups::v2_mount())]
    cgroup: PathBuf,

    /// Skip socket-LB: every packet is translated by TC/XDP instead.
    #[arg(long)]
    no_socket_lb: bool,

    /// IPVS scheduler for virtual servers (ipvs mode): rr, wrr, sh, ...
    #[arg(long, default_value = "rr")]
    ipvs_scheduler: String,

    /// Extra node addresses that answer NodePort frontends.
    #[arg(long, value_delimiter = ',')]
    node_ip: Vec<Ipv4Addr>,

    /// Where `/metrics` is served (kube-proxy's default port).
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: SocketAddr,

    /// Where the kube-proxy-style `/healthz` for external load balancers is
    /// served: 200 while no change waits over 60 s to be programmed.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: SocketAddr,

    /// Where bpffs is (mounted there if it is not).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,

    /// Remove this node's programs, maps and rules (every mode's), then
    /// exit.
    #[arg(long, conflicts_with_all = ["standalone", "kubeconfig", "counters"])]
    teardown: bool,

    /// Print this node's datapath counters (packets and bytes by reason),
    /// then exit.
    #[arg(long, conflicts_with_all = ["standalone", "kubeconfig"])]
    counters: bool,
}

fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "node".into())
}

/// Multi-threaded: a sync blocks its thread (iptables-restore at 10k
/// services takes seconds), and `/healthz`, `/metrics`, the watches and
/// the node's Lease must not wait for it. The sync loop runs on the main
/// thread, everything else on the workers.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();

    let node_addresses = node_addresses(&args)?;
    if args.teardown {
        mode::remove_state(None, &System, &args.bpffs, &args.node_name, &node_addresses)
            .context("teardown")?;
        if host::installed("nft") && egress::remove(&System).context("teardown")? {
            info!("removed the pod egress table");
        }
        routes::remove_all().context("removing the routes to other nodes' pods")?;
        // Pods go first: their CNI DEL needs the configuration, and the
        // agent API to give their addresses back (served here for the
        // while if the agent is not running).
        let runtime = pod_runtime(&args, &node_addresses);
        let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
        let ipam = args.state_dir.join(&args.node_name).join("ipam.json");
        let serving = if ipam.exists()
            && tokio::net::UnixStream::connect(&args.api_socket)
                .await
                .is_err()
        {
            let service = IpamService::open(&ipam, watch::channel(None).1)
                .context("teardown: opening the pod address allocations")?;
            let socket = args.api_socket.clone();
            Some(tokio::spawn(async move {
                let stopped = async {
                    let _ = api_stopped.await;
                };
                agent_api::serve(&socket, service, DatapathService::default(), stopped).await
            }))
        } else {
            None
        };
        if serving.is_some() {
            for _ in 0..100 {
                if tokio::net::UnixStream::connect(&args.api_socket)
                    .await
                    .is_ok()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        kubelet::remove_orphans(
            &pods_dir(&args),
            runtime.as_ref(),
            &[],
            kubelet::Cleanup::Everything,
        )
        .await;
        let _ = stop_api.send(());
        if let Some(serving) = serving {
            let _ = serving.await;
        }
        cgroups(&args)
            .remove_all()
            .context("teardown: pod cgroups")?;
        // The node's state (pod address allocations, pods) goes with it.
        let state = args.state_dir.join(&args.node_name);
        if state.exists() {
            std::fs::remove_dir_all(&state)
                .with_context(|| format!("teardown: removing {}", state.display()))?;
        }
        if cni_install::uninstall(&args.cni_conf_dir).context("teardown")? {
            info!("removed the CNI configuration");
        }
        info!(node = %args.node_name, "dataplane removed");
        return Ok(());
    }
    if args.counters {
        for (reason, counter) in
            read_counters(&args.bpffs, &args.node_name).context("reading counters")?
        {
            println!(
                "{:<26} {:>12} packets {:>14} bytes",
                reason.name(),
                counter.packets,
                counter.bytes
            );
        }
        return Ok(());
    }
    let telemetry = Arc::new(Telemetry::new());
    let kubeconfig = match (
        &args.kubeconfig,
        &args.server,
        &args.token,
        &args.ca_cert_hash,
    ) {
        (Some(path), ..) => Some(path.clone()),
        (None, Some(server), Some(token), Some(ca_cert_hash)) => {
            let join = bootstrap::Join {
                server: server.clone(),
                token: token.clone(),
                ca_cert_hash: ca_cert_hash.clone(),
            };
            let state = args.state_dir.join(&args.node_name);
            Some(
                bootstrap::node_kubeconfig(&join, &state, &args.node_name)
                    .await
                    .context("joining the cluster")?,
            )
        }
        _ => None,
    };
    let client = match &kubeconfig {
        Some(path) => Some(cluster::client(path).await?),
        None => None,
    };
    let routing = routing(&args, &node_addresses)?;
    let (pod_cidr, pod_cidrs) = watch::channel(args.pod_cidr.clone());
    if let Some(client) = client.clone().filter(|_| !args.proxy_only) {
        let config = NodeConfig {
            name: args.node_name.clone(),
            address: node_addresses.first().copied(),
            max_pods: args.max_pods,
            lease_duration: Duration::from_secs(args.node_lease_duration_seconds),
            kubelet_port: args.kubelet_bind_address.port(),
        };
        // A --pod-cidr stands; otherwise the Node's is followed.
        let reported = if args.pod_cidr.is_some() {
            watch::channel(None).0
        } else {
            pod_cidr
        };
        tokio::spawn(registration::run(
            client.clone(),
            config,
            Arc::clone(&telemetry),
            reported,
        ));
        tokio::spawn(routes::follow(
            client.clone(),
            args.node_name.clone(),
            args.cluster_cidr.clone(),
            routing,
        ));
        let capacity = registration::system::capacity(args.max_pods);
        let amount = |name: &str| {
            capacity[name]
                .as_str()
                .map(|q| k8s_openapi::apimachinery::pkg::api::resource::Quantity(q.into()))
        };
        let client_for_kubelet = client.clone();
        let runtime = pod_runtime(&args, &node_addresses);
        let ctx = Context {
            client,
            node: args.node_name.clone(),
            node_ip: node_addresses
                .first()
                .map(ToString::to_string)
                .unwrap_or_default(),
            pods_dir: pods_dir(&args),
            runtime: Arc::clone(&runtime),
            node_milli_cpu: amount("cpu")
                .as_ref()
                .and_then(wharf_quantity::milli)
                .unwrap_or(1000),
            node_memory: amount("memory")
                .as_ref()
                .and_then(wharf_quantity::value)
                .unwrap_or(0),
        };
        tokio::spawn(kubelet::run(Arc::new(ctx)));
        match kubeconfig.as_deref().map(bootstrap::cluster_ca) {
            Some(Ok(ca)) => {
                let addresses = node_addresses.iter().copied().map(Into::into).collect();
                tokio::spawn(kubelet::server::serve(
                    client_for_kubelet,
                    args.node_name.clone(),
                    addresses,
                    args.kubelet_bind_address,
                    ca,
                    args.state_dir.join(&args.node_name),
                    runtime,
                ));
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "no cluster CA to verify clients with: the kubelet API (kubectl logs) is not served");
            }
            None => {}
        }
    }
    let datapath = DatapathService::default();
    if !args.proxy_only && (kubeconfig.is_some() || args.pod_cidr.is_some()) {
        let state = args.state_dir.join(&args.node_name);
        std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
        let service = IpamService::open(&state.join("ipam.json"), pod_cidrs)
            .context("opening the pod address allocations")?;
        // Pods reach each other, the node and other nodes' pods through
        // this node.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling IPv4 forwarding")?;
        let available = service.available();
        let socket = args.api_socket.clone();
        let pod_links = datapath.clone();
        tokio::spawn(async move {
            if let Err(error) =
                agent_api::serve(&socket, service, pod_links, std::future::pending()).await
            {
                tracing::error!(%error, "the agent API stopped");
            }
        });
        let (bin_dir, conf_dir) = (args.cni_bin_dir.clone(), args.cni_conf_dir.clone());
        let (socket, network) = (args.api_socket.clone(), Arc::clone(&telemetry));
        let mtu = pod_mtu(routing, &node_addresses);
        tokio::spawn(async move {
            loop {
                match cni_install::install(&bin_dir, &conf_dir, &socket, mtu, available.clone())
                    .await
                {
                    Ok(()) => break network.set_network_ready(true),
                    Err(error) => {
                        tracing::error!(%error, "installing the CNI plugin failed; retrying in 10 s");
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                }
            }
        });
    }
    tokio::spawn(
        telemetry::serve(
            Arc::clone(&telemetry),
            args.metrics_bind_address,
            args.healthz_bind_address,
        )
        .await?,
    );
    let (mode, reason) = match args.proxy_mode {
        ProxyMode::Ebpf => (Mode::Ebpf, "chosen by flag".to_string()),
        ProxyMode::Nftables => (Mode::Nftables, "chosen by flag".to_string()),
        ProxyMode::Ipvs => (Mode::Ipvs, "chosen by flag".to_string()),
        ProxyMode::Iptables => {
            let (flavor, why) =
                Flavor::detect(&System).context("detecting the iptables backend")?;
            (Mode::Iptables(flavor), format!("chosen by flag; {why}"))
        }
        ProxyMode::Auto => mode::choose(&System),
    };
    info!(?mode, %reason, "proxy mode");
    if mode != Mode::Ebpf {
        // Rule-based modes act on forwarded packets: pod links need nothing.
        datapath.set(None);
    }
    mode::remove_state(
        Some(mode),
        &System,
        &args.bpffs,
        &args.node_name,
        &node_addresses,
    )
    .context("removing other proxy modes' state")?;
    match mode {
        Mode::Ebpf => {
            let (mut reconciler, dataplane) = load_ebpf(&args, &node_addresses)?;
            datapath.set(Some(dataplane));
            serve(&mut reconciler, &args, client, &telemetry).await?;
            // Programs and maps stay pinned: forwarding continues while
            // the agent is away, and the next start picks up where this
            // one stopped.
            info!("shutting down; dataplane left in place");
        }
        Mode::Iptables(flavor) => {
            serve(
                &mut IptablesProxy::new(System, flavor),
                &args,
                client,
                &telemetry,
            )
            .await?;
            info!("shutting down; rules left in place");
        }
        Mode::Nftables => {
            serve(&mut NftablesProxy::new(System), &args, client, &telemetry).await?;
            info!("shutting down; rules left in place");
        }
        Mode::Ipvs => {
            let mut proxy = IpvsProxy::open(node_addresses, args.ipvs_scheduler.clone())
                .context("opening IPVS")?;
            serve(&mut proxy, &args, client, &telemetry).await?;
            info!("shutting down; virtual servers left in place");
        }
    }
    Ok(())
}

/// Programs `proxy` from the API server or the manifests, as the flags
/// say, until SIGTERM or SIGINT.
async fn serve<P: ServiceProxy>(
    proxy: &mut P,
    args: &Args,
    client: Option<kube::Client>,
    telemetry: &Arc<Telemetry>,
) -> anyhow::Result<()> {
    match (client, &args.services_from) {
        (Some(client), _) => {
            let mut source = Cluster::watch(client, &args.node_name, Arc::clone(telemetry));
            sync::run(proxy, &mut source, telemetry, shutdown_signal()).await;
        }
        (None, Some(services_from)) => {
            let mut source = Manifests::watch(services_from.clone(), &args.node_name)?;
            sync::run(proxy, &mut source, telemetry, shutdown_signal()).await;
        }
        // clap requires one of them.
        (None, None) => anyhow::bail!("--kubeconfig or --standalone --services-from is needed"),
    }
    Ok(())
}
/// Where this node's pods keep their state.
fn pods_dir(args: &Args) -> PathBuf {
    args.state_dir.join(&args.node_name).join("pods")
}

fn cgroups(args: &Args) -> Cgroups {
    Cgroups::new(&args.cgroup, &args.cgroup_v1_root, &args.node_name)
}

/// What runs this node's pods (`--runtime`).
fn pod_runtime(args: &Args, node_addresses: &[Ipv4Addr]) -> Arc<dyn Runtime> {
    let node_ip = node_addresses
        .first()
        .map(ToString::to_string)
        .unwrap_or_default();
    match args.runtime {
        RuntimeKind::Process => Arc::new(ProcessRuntime {
            cgroups: cgroups(args),
            cni: CniPaths {
                bin_dir: args.cni_bin_dir.clone(),
                conf_dir: args.cni_conf_dir.clone(),
            },
            node_ip,
        }),
        RuntimeKind::Cri => {
            let endpoint = &args.container_runtime_endpoint;
            Arc::new(CriRuntime::new(
                PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(endpoint)),
                args.node_name.clone(),
                node_ip,
                cgroups(args),
            ))
        }
    }
}

/// The cluster routing the flags ask for; the overlay is carried by the
/// node's first address.
fn routing(args: &Args, node_addresses: &[Ipv4Addr]) -> anyhow::Result<routes::Routing> {
    Ok(match args.routing {
        RoutingMode::Native => routes::Routing::Native,
        RoutingMode::Vxlan => {
            let local = node_addresses.first().copied().context(
                "--routing vxlan needs the node's address (--node-ip or --devices) to carry the overlay",
            )?;
            routes::Routing::Vxlan(
                vxlan::Overlay::for_node(local).context("finding the overlay's underlay")?,
            )
        }
    })
}

/// The pods' MTU: the overlay's, or that of the device with the node's
/// address; unknown (the plugin's default of 1500) without one.
fn pod_mtu(routing: routes::Routing, node_addresses: &[Ipv4Addr]) -> Option<u32> {
    match routing {
        routes::Routing::Vxlan(overlay) => Some(overlay.mtu()),
        routes::Routing::Native => {
            let device = netdev::holding(*node_addresses.first()?).ok()??;
            netdev::mtu(&device).ok()
        }
    }
}

/// The addresses NodePort frontends answer on: `--node-ip` and those of
/// the external devices.
fn node_addresses(args: &Args) -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut addresses = args.node_ip.clone();
    for device in &args.devices {
        addresses.extend(
            netdev::ipv4_addresses(device).with_context(|| format!("addresses of {device}"))?,
        );
    }
    Ok(addresses)
}

/// Loads and attaches the eBPF datapath as the flags say.
fn load_ebpf(args: &Args, node_addresses: &[Ipv4Addr]) -> anyhow::Result<(Reconciler, Dataplane)> {
    let mut dataplane =
        Dataplane::load(&args.bpffs, &args.node_name).context("loading the eBPF dataplane")?;
    let mut snat_addresses = Vec::new();
    for device in &args.devices {
        let addresses =
            netdev::ipv4_addresses(device).with_context(|| format!("addresses of {device}"))?;
        // Traffic SNATed on its way back out of a device leaves with the
        // device's first address.
        if let Some(first) = addresses.first() {
            snat_addresses.push((netdev::ifindex(device)?, *first));
        }
        let native = dataplane
            .attach_xdp(device)
            .with_context(|| format!("XDP on {device}"))?;
        dataplane
            .attach_tc(device)
            .with_context(|| format!("TC on {device}"))?;
        info!(device, xdp = native, "external device attached");
    }
    for device in &args.pod_devices {
        dataplane
            .attach_tc(device)
            .with_context(|| format!("TC on {device}"))?;
        info!(device, "pod-facing device attached");
    }
    if !args.no_socket_lb {
        dataplane.attach_cgroup(&args.cgroup).context("socket-LB")?;
    }
    dataplane
        .set_node_addresses(node_addresses)
        .context("node addresses")?;
    dataplane
        .set_snat_addresses(&snat_addresses)
        .context("SNAT addresses")?;
    info!(node = %args.node_name, addresses = ?node_addresses, "dataplane ready");

    let reconciler = Reconciler::new(dataplane.maps()?).context("reading the pinned maps")?;
    Ok((reconciler, dataplane))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
