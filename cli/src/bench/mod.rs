//! `wharf bench routing`: service routing measured on real local
//! clusters, every proxy mode side by side in one run.
//!
//! For each mode a 2-node cluster (`wharf cluster up`) gets two server
//! pods on node 2 and the measured Service (selectorless, its one
//! endpoint the first server), and node 1 runs the load as pods, so
//! traffic takes the path pod traffic takes: node 1's translation
//! (socket-LB, TC/XDP, or netfilter), the underlay, node 2. Then for each
//! service count, ascending:
//!
//! 1. filler Services (10 endpoints each, never sent to) bring the count
//!    up; the time until node 1 has programmed them is `fill_s`;
//! 2. node 1 is torn down and its agent started again: its first sync,
//!    from nothing, is the full sync;
//! 3. a probe pod asks a second Service for its backend's name every
//!    millisecond while that Service's endpoint is switched between the
//!    servers: API write to new answer, per change, is the programming
//!    latency;
//! 4. keep-alive HTTP (wrk), connect-request-close and UDP
//!    request/response load, each to the server's pod IP (the baseline:
//!    no translation) and then through the ClusterIP.
//!
//! Results are written after each mode (see `report.rs`), so an
//! interrupted run keeps what it measured.

mod in_vm;
pub mod load;
mod report;
mod wrk;

use std::{
    io::{Read as _, Seek as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use futures::{AsyncBufReadExt as _, StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{core::v1::Pod, core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    api::{DeleteParams, LogParams, Patch, PatchParams, PostParams},
};
use serde::de::DeserializeOwned;

use self::{
    load::Summary,
    report::{Load, LoadKind, Point, Results, Settings, Target},
};
use crate::{
    cluster::{self, ClusterError, Host, ProxyMode, RuntimeKind, Spec, StoreKind, layout::Layout},
    progress::Progress,
};

/// The servers' port, TCP and UDP.
const SERVER_PORT: u16 = 8080;
/// The Services' port.
const SERVICE_PORT: u16 = 80;
/// Frontends the measured and the probed Service add (HTTP and UDP, and
/// HTTP): node 1 has programmed `FIXED_FRONTENDS` + fillers when done.
const FIXED_FRONTENDS: u32 = 3;
/// Fillers created at once (the API server answers about 1,000 creates
/// per second with 16 in flight).
const FILLERS_IN_FLIGHT: usize = 32;
/// How long a pod may take to start, and a finished load run to be
/// reported, beyond its own duration.
const POD_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between endpoint changes, so each is timed on its own.
const CHANGE_PAUSE: Duration = Duration::from_millis(100);
/// How often the probe asks (its resolution).
const PROBE_INTERVAL: Duration = Duration::from_millis(1);

/// A proxy mode as the benchmark runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchMode {
    /// eBPF with socket-LB: ClusterIPs translated at connect().
    Ebpf,
    /// eBPF without socket-LB: every packet translated by TC (and XDP).
    EbpfTc,
    Iptables,
    Nftables,
    /// On a kernel without ip_vs, measured in a VM (`in_vm`).
    Ipvs,
}

impl BenchMode {
    fn name(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::EbpfTc => "ebpf-tc",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::Ipvs => "ipvs",
        }
    }

    /// The mode's cluster: `wb` and the mode's letters.
    fn cluster(self) -> String {
        format!("wb{}", self.name().replace('-', ""))
    }

    fn spec(self) -> Spec {
        let (proxy_mode, agent_args) = match self {
            Self::Ebpf => (ProxyMode::Ebpf, vec![]),
            Self::EbpfTc => (ProxyMode::Ebpf, vec!["--no-socket-lb".to_string()]),
            Self::Iptables => (ProxyMode::Iptables, vec![]),
            Self::Nftables => (ProxyMode::Nftables, vec![]),
            Self::Ipvs => (ProxyMode::Ipvs, vec![]),
        };
        Spec {
            nodes: 2,
            proxy_mode,
            store: StoreKind::Embedded,
            runtime: RuntimeKind::Process,
            control_args: vec![],
            agent_args,
        }
    }
}

/// `wharf bench routing`'s flags.
#[derive(Debug, clap::Args)]
pub struct RoutingArgs {
    /// The modes to measure, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ebpf,ebpf-tc,iptables,nftables,ipvs"
    )]
    pub modes: Vec<BenchMode>,
    /// Service counts, each with its filler Services.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
    pub services: Vec<u32>,
    /// Endpoints of each filler Service.
    #[arg(long, default_value_t = 10)]
    pub endpoints: u32,
    /// Seconds per load run.
    #[arg(long, default_value_t = 5)]
    pub duration: u64,
    /// wrk's keep-alive connections.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Threads of the connect-request-close and UDP client.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Rounds of each load, direct and service alternating (the median
    /// is reported; runs on a shared 2-core VM differ by 20% and more).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Endpoint changes timed per point.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// How long node 1 may take to program a service count (iptables on
    /// its nft backend needs minutes at 10k).
    #[arg(long, default_value_t = 300)]
    pub sync_timeout: u64,
    /// Where results.json, results.md and the SVG charts go.
    #[arg(long, default_value = "wharf-bench-routing")]
    pub out: PathBuf,
    /// Leave each mode's cluster up afterwards (named wb<mode>).
    #[arg(long)]
    pub keep_clusters: bool,
}

impl RoutingArgs {
    fn sync_timeout(&self) -> Duration {
        Duration::from_secs(self.sync_timeout)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("{what}: not within {limit:?}")]
    Timeout { what: String, limit: Duration },
    #[error("{object} has no address")]
    NoAddress { object: String },
    #[error(transparent)]
    Client(#[from] wharf_control::components::ComponentError),
    #[error("load pod {pod} ended {phase} without a report; its log:\n{log}")]
    Load {
        pod: String,
        phase: String,
        log: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} not found: {hint}")]
    Missing { program: String, hint: &'static str },
    #[error(transparent)]
    Vm(#[from] wharf_cli::vm::VmError),
    #[error(
        "the run in the VM exited {status} without results ({source}); its console ended:\n{console_tail}"
    )]
    VmResults {
        status: i32,
        #[source]
        source: serde_json::Error,
        console_tail: String,
    },
}

fn api_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Api {
        what,
        source: Box::new(source),
    }
}

/// Runs the benchmark: every mode in turn, results written to `args.out`
/// after each.
pub async fn routing(
    host: &Host,
    args: &RoutingArgs,
    command: String,
) -> Result<Results, BenchError> {
    if !Path::new(wrk::WRK).exists() {
        return Err(BenchError::Missing {
            program: wrk::WRK.into(),
            hint: "apt-get install wrk (scripts/setup.sh does)",
        });
    }
    let exe = std::env::current_exe().map_err(|source| BenchError::Io {
        path: "/proc/self/exe".into(),
        source,
    })?;
    let mut results = Results {
        command,
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        settings: Settings {
            duration_s: args.duration,
            rounds: args.rounds,
            connections: args.connections,
            threads: args.threads,
            samples: args.samples,
            endpoints: args.endpoints,
        },
        points: Vec::new(),
    };
    let mut sizes = args.services.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let mut progress = Progress::new();
    for &mode in &args.modes {
        let mut points: Vec<Point> = sizes
            .iter()
            .map(|&services| Point {
                mode: mode.name().into(),
                services: services.max(1),
                ..Point::default()
            })
            .collect();
        if mode == BenchMode::Ipvs && !wharf_agent::ipvs::Kernel::available() {
            in_vm::measure(host, args, &mut points, &mut progress).await;
        } else {
            run_mode(host, args, mode, &exe, &mut points, &mut progress).await;
        }
        results.points.extend(points);
        results.write(&args.out).map_err(|source| BenchError::Io {
            path: args.out.clone(),
            source,
        })?;
    }
    Ok(results)
}

/// One mode's cluster, its points measured in turn; what fails is written
/// into the points it stopped.
async fn run_mode(
    host: &Host,
    args: &RoutingArgs,
    mode: BenchMode,
    exe: &Path,
    points: &mut [Point],
    progress: &mut Progress,
) {
    let name = mode.cluster();
    let outcome = async {
        // What an interrupted run left.
        match cluster::down(host, &name, false) {
            Ok(_) | Err(ClusterError::Unknown { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let layout = cluster::up(host, &name, mode.spec()).await?;
        let mut bench = Bench::deploy(host, args, mode, layout, exe, progress).await?;
        for index in 0..points.len() {
            let outcome = bench.measure(&mut points[index]).await;
            if let Err(error) = outcome {
                let stop = matches!(error, BenchError::Timeout { .. });
                let services = points[index].services;
                bench
                    .progress
                    .done(&format!("{} at {services} services: {error}", mode.name()));
                points[index].error = Some(error.to_string());
                if stop {
                    // Larger counts only take longer.
                    for later in &mut points[index + 1..] {
                        later.error = Some(format!("skipped after {services} services"));
                    }
                    break;
                }
            }
        }
        Ok::<(), BenchError>(())
    }
    .await;
    if let Err(error) = outcome {
        progress.done(&format!("{}: {error}", mode.name()));
        for point in points
            .iter_mut()
            .filter(|p| p.error.is_none() && p.loads.is_empty())
        {
            point.error = Some(error.to_string());
        }
    }
    if !args.keep_clusters
        && let Err(error) = cluster::down(host, &name, false)
    {
        progress.done(&format!("{name} down: {error}"));
    }
}

/// A mode's cluster with the servers and Services deployed.
struct Bench<'a> {
    host: &'a Host,
    args: &'a RoutingArgs,
    mode: BenchMode,
    layout: Layout,
    exe: PathBuf,
    progress: &'a mut Progress,
    pods: Api<Pod>,
    services: Api<Service>,
    slices: Api<EndpointSlice>,
    /// The two servers' names and pod IPs; the first is the measured
    /// Service's endpoint.
    servers: [(String, Ipv4Addr); 2],
    service_ip: Ipv4Addr,
    flip_ip: Ipv4Addr,
    fillers: u32,
    /// Node 1's agent log, and where its current agent's lines begin.
    agent_log: (PathBuf, u64),
    pods_started: u32,
}

impl<'a> Bench<'a> {
    async fn deploy(
        host: &'a Host,
        args: &'a RoutingArgs,
        mode: BenchMode,
        layout: Layout,
        exe: &Path,
        progress: &'a mut Progress,
    ) -> Result<Self, BenchError> {
        let client: Client = wharf_control::components::client(&layout.kubeconfig()).await?;
        let agent_log = (
            layout
                .logs_dir()
                .join(format!("{}.log", layout.node(0).short)),
            0,
        );
        let mut bench = Self {
            host,
            args,
            mode,
            exe: exe.to_path_buf(),
            progress,
            pods: Api::default_namespaced(client.clone()),
            services: Api::default_namespaced(client.clone()),
            slices: Api::default_namespaced(client),
            servers: [
                (String::new(), Ipv4Addr::UNSPECIFIED),
                (String::new(), Ipv4Addr::UNSPECIFIED),
            ],
            service_ip: Ipv4Addr::UNSPECIFIED,
            flip_ip: Ipv4Addr::UNSPECIFIED,
            fillers: 0,
            agent_log,
            pods_started: 0,
            layout,
        };
        for (index, name) in ["srv-a", "srv-b"].into_iter().enumerate() {
            let command =
                bench.own_command(&["server", "--name", name, "--port", &SERVER_PORT.to_string()]);
            bench.create_pod(name, 1, &command).await?;
            bench.servers[index].0 = name.into();
        }
        for index in 0..2 {
            let name = bench.servers[index].0.clone();
            let pod = bench.wait_for_pod(&name, &["Running"], POD_TIMEOUT).await?;
            bench.servers[index].1 = pod
                .status
                .and_then(|s| s.pod_ip)
                .and_then(|ip| ip.parse().ok())
                .ok_or_else(|| BenchError::NoAddress {
                    object: format!("pod {name}"),
                })?;
        }
        let first = bench.servers[0].1;
        bench.service_ip = bench
            .create_service("bench", &[("http", "TCP"), ("udp", "UDP")], &[first])
            .await?;
        bench.flip_ip = bench
            .create_service("flip", &[("http", "TCP")], &[first])
            .await?;
        bench.wait_programmed(0, FIXED_FRONTENDS).await?;
        let label = bench.mode.name();
        bench
            .progress
            .done(&format!("{label}: servers and Services deployed"));
        Ok(bench)
    }

    /// Measures one service count into `point`.
    async fn measure(&mut self, point: &mut Point) -> Result<(), BenchError> {
        let label = format!("{} at {} services", self.mode.name(), point.services);
        let started = Instant::now();
        self.fill(point.services - 1, &label).await?;
        point.fill_s = Some(started.elapsed().as_secs_f64());
        self.progress.done(&format!("{label}: programmed"));

        self.progress
            .update(&format!("{label}: full sync of a cleaned node"));
        let (log, offset) = cluster::restart_agent(self.host, &self.layout.name, 0, true)?;
        self.agent_log = (log, offset);
        let elapsed_us = self
            .wait_programmed(self.fillers, FIXED_FRONTENDS + self.fillers)
            .await?;
        point.full_sync_ms = Some(elapsed_us as f64 / 1e3);
        self.progress.done(&format!(
            "{label}: full sync {:.1} ms",
            elapsed_us as f64 / 1e3
        ));

        point.programming_ms = self.programming(&label).await?;
        if let Some((p50, p99)) = point.programming() {
            self.progress.done(&format!(
                "{label}: endpoint change p50 {p50:.1} ms, p99 {p99:.1} ms"
            ));
        }

        for kind in [LoadKind::KeepAlive, LoadKind::Crr, LoadKind::Udp] {
            for round in 0..self.args.rounds.max(1) {
                for target in [Target::Direct, Target::Service] {
                    let address = match target {
                        Target::Direct => SocketAddrV4::new(self.servers[0].1, SERVER_PORT),
                        Target::Service => SocketAddrV4::new(self.service_ip, SERVICE_PORT),
                    };
                    self.progress.update(&format!(
                        "{label}: {kind:?} load to {target:?} ({address}), round {}",
                        round + 1
                    ));
                    let summary = self.load(kind, address.into()).await?;
                    point.loads.push(Load {
                        kind,
                        target,
                        round,
                        summary,
                    });
                }
            }
            let (direct, service) = (
                point.load(kind, Target::Direct).expect("measured"),
                point.load(kind, Target::Service).expect("measured"),
            );
            self.progress.done(&format!(
                "{label}: {kind:?} {:.0}/s through the service ({:.2} of direct), p50 {:.0} µs, p99 {:.0} µs",
                service.per_s,
                service.per_s / direct.per_s.max(f64::MIN_POSITIVE),
                service.p50_us,
                service.p99_us
            ));
        }
        Ok(())
    }

    /// Creates fillers until there are `wanted`, then waits for node 1 to
    /// have programmed them.
    async fn fill(&mut self, wanted: u32, label: &str) -> Result<(), BenchError> {
        if wanted <= self.fillers {
            return Ok(());
        }
        let offset = std::fs::metadata(&self.agent_log.0).map_or(0, |m| m.len());
        let (services, slices, endpoints) = (
            self.services.clone(),
            self.slices.clone(),
            self.args.endpoints,
        );
        let mut creates = futures::stream::iter(self.fillers..wanted)
            .map(|index| {
                let (services, slices) = (services.clone(), slices.clone());
                async move { create_filler(&services, &slices, index, endpoints).await }
            })
            .buffer_unordered(FILLERS_IN_FLIGHT);
        while creates.try_next().await?.is_some() {
            self.fillers += 1;
            if self.fillers.is_multiple_of(100) {
                self.progress.update(&format!(
                    "{label}: {}/{wanted} fillers created",
                    self.fillers
                ));
            }
        }
        self.agent_log.1 = offset;
        self.progress
            .update(&format!("{label}: waiting for node 1 to program them"));
        self.wait_programmed(self.fillers, FIXED_FRONTENDS + self.fillers)
            .await?;
        Ok(())
    }

    /// Waits for node 1's agent to log a sync of at least `frontends`
    /// (since `self.agent_log`'s offset); returns its `elapsed_us`.
    async fn wait_programmed(&self, fillers: u32, frontends: u32) -> Result<u64, BenchError> {
        let (path, offset) = &self.agent_log;
        let limit = self.args.sync_timeout();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(elapsed) = synced(&read_from(path, *offset)?, frontends) {
                return Ok(elapsed);
            }
            if Instant::now() > deadline {
                return Err(BenchError::Timeout {
                    what: format!(
                        "node 1 programming {fillers} fillers (see {})",
                        path.display()
                    ),
                    limit,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The programming latency of `samples` endpoint changes, in ms.
    async fn programming(&mut self, label: &str) -> Result<Vec<f64>, BenchError> {
        let target = SocketAddrV4::new(self.flip_ip, SERVICE_PORT).to_string();
        let lifetime = self.args.sync_timeout() * (self.args.samples as u32 + 1);
        let command = self.own_command(&[
            "probe",
            "--target",
            &target,
            "--interval-ms",
            &PROBE_INTERVAL.as_millis().to_string(),
            "--duration",
            &lifetime.as_secs().to_string(),
        ]);
        let pod = self.start_pod("probe", &command).await?;
        let outcome = async {
            let params = LogParams {
                follow: true,
                ..LogParams::default()
            };
            let stream = through_kubelet(&format!("following {pod}'s log"), || {
                self.pods.log_stream(&pod, &params)
            })
            .await?;
            let mut answers = stream.lines();
            let limit = self.args.sync_timeout();
            let mut next_answer = async || -> Result<(u64, String), BenchError> {
                let timeout = || BenchError::Timeout {
                    what: format!("an answer from the probe {pod}"),
                    limit,
                };
                let line = tokio::time::timeout(limit, answers.next())
                    .await
                    .map_err(|_| timeout())?
                    .ok_or_else(timeout)?
                    .map_err(|source| BenchError::Io {
                        path: format!("log of {pod}").into(),
                        source,
                    })?;
                let (at, name) = line.split_once(' ').ok_or_else(timeout)?;
                Ok((at.parse().map_err(|_| timeout())?, name.to_string()))
            };
            let (_, mut current) = next_answer().await?;
            let mut samples = Vec::with_capacity(self.args.samples);
            for sample in 0..self.args.samples {
                self.progress.update(&format!(
                    "{label}: endpoint change {}/{}",
                    sample + 1,
                    self.args.samples
                ));
                let (to, address) = if current == self.servers[0].0 {
                    self.servers[1].clone()
                } else {
                    self.servers[0].clone()
                };
                let written = load::monotonic_ns();
                self.slices
                    .patch(
                        "flip",
                        &PatchParams::default(),
                        &Patch::Merge(endpoints_patch(&[address])),
                    )
                    .await
                    .map_err(api_error("changing flip's endpoint"))?;
                loop {
                    let (at, name) = next_answer().await?;
                    if name == to {
                        samples.push(at.saturating_sub(written) as f64 / 1e6);
                        break;
                    }
                }
                current = to;
                tokio::time::sleep(CHANGE_PAUSE).await;
            }
            Ok(samples)
        }
        .await;
        self.delete_pod(&pod).await;
        outcome
    }

    /// One load run from a pod on node 1 to `target`.
    async fn load(&mut self, kind: LoadKind, target: SocketAddr) -> Result<Summary, BenchError> {
        let duration = Duration::from_secs(self.args.duration);
        let command = match kind {
            LoadKind::KeepAlive => {
                let mut command = vec![wrk::WRK.to_string()];
                command.extend(wrk::args(target, self.args.connections, duration));
                command
            }
            LoadKind::Crr | LoadKind::Udp => {
                let kind = if kind == LoadKind::Crr { "crr" } else { "udp" };
                self.own_command(&[
                    "client",
                    "--kind",
                    kind,
                    "--target",
                    &target.to_string(),
                    "--threads",
                    &self.args.threads.to_string(),
                    "--duration",
                    &self.args.duration.to_string(),
                ])
            }
        };
        let pod = self.start_pod("load", &command).await?;
        let outcome = async {
            let finished = self
                .wait_for_pod(&pod, &["Succeeded", "Failed"], duration + POD_TIMEOUT)
                .await?;
            let params = LogParams::default();
            let log =
                through_kubelet(&format!("{pod}'s log"), || self.pods.logs(&pod, &params)).await?;
            let summary = match kind {
                LoadKind::KeepAlive => wrk::parse(&log),
                LoadKind::Crr | LoadKind::Udp => log
                    .lines()
                    .last()
                    .and_then(|line| serde_json::from_str(line).ok()),
            };
            summary.ok_or_else(|| BenchError::Load {
                pod: pod.clone(),
                phase: finished.status.and_then(|s| s.phase).unwrap_or_default(),
                log,
            })
        }
        .await;
        self.delete_pod(&pod).await;
        outcome
    }

    /// `wharf bench <args>` as a container command.
    fn own_command(&self, args: &[&str]) -> Vec<String> {
        let mut command = vec![self.exe.display().to_string(), "bench".into()];
        command.extend(args.iter().map(|a| a.to_string()));
        command
    }

    /// Starts a pod running `command` on node 1; returns its name once it
    /// runs (or has already finished).
    async fn start_pod(&mut self, prefix: &str, command: &[String]) -> Result<String, BenchError> {
        self.pods_started += 1;
        let name = format!("{prefix}-{}", self.pods_started);
        self.create_pod(&name, 0, command).await?;
        self.wait_for_pod(&name, &["Running", "Succeeded", "Failed"], POD_TIMEOUT)
            .await?;
        Ok(name)
    }

    async fn create_pod(&self, name: &str, node: u8, command: &[String]) -> Result<(), BenchError> {
        let pod: Pod = object(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "wharf-bench"}},
            "spec": {
                "nodeName": self.layout.node(node).name,
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "bench", "image": "wharf-bench", "command": command}],
            },
        }));
        self.pods
            .create(&PostParams::default(), &pod)
            .await
            .map_err(api_error(format!("creating pod {name}")))?;
        Ok(())
    }

    async fn wait_for_pod(
        &self,
        name: &str,
        phases: &[&str],
        limit: Duration,
    ) -> Result<Pod, BenchError> {
        let deadline = Instant::now() + limit;
        loop {
            let pod = self
                .pods
                .get(name)
                .await
                .map_err(api_error(format!("reading pod {name}")))?;
            let phase = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .unwrap_or("");
            if phases.contains(&phase) {
                return Ok(pod);
            }
            if Instant::now() > deadline {
                return Err(BenchError::Timeout {
                    what: format!("pod {name} {}", phases.join(" or ")),
                    limit,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deletes a finished or no longer needed pod (errors only leave it
    /// to the cluster's `down`).
    async fn delete_pod(&self, name: &str) {
        let _ = self
            .pods
            .delete(
                name,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                },
            )
            .await;
    }

    /// A selectorless Service with `ports` (named, by protocol) and its
    /// EndpointSlice of `endpoints`; returns its ClusterIP.
    async fn create_service(
        &self,
        name: &str,
        ports: &[(&str, &str)],
        endpoints: &[Ipv4Addr],
    ) -> Result<Ipv4Addr, BenchError> {
        let created = create_service(&self.services, &self.slices, name, ports, endpoints).await?;
        created
            .spec
            .and_then(|s| s.cluster_ip)
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| BenchError::NoAddress {
                object: format!("Service {name}"),
            })
    }
}

/// A `pods/log` request, retried while the API server cannot reach the
/// node's kubelet API (500): right after node 1's agent restarted, its
/// pods may run before that serves.
async fn through_kubelet<T, F: Future<Output = Result<T, kube::Error>>>(
    what: &str,
    request: impl Fn() -> F,
) -> Result<T, BenchError> {
    let deadline = Instant::now() + POD_TIMEOUT;
    loop {
        match request().await {
            Err(kube::Error::Api(response))
                if response.code == 500 && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            outcome => return outcome.map_err(api_error(what)),
        }
    }
}

fn object<T: DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("the benchmark's objects are well formed")
}

fn endpoints_patch(endpoints: &[Ipv4Addr]) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|ip| serde_json::json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    serde_json::json!({ "endpoints": endpoints })
}

async fn create_service(
    services: &Api<Service>,
    slices: &Api<EndpointSlice>,
    name: &str,
    ports: &[(&str, &str)],
    endpoints: &[Ipv4Addr],
) -> Result<Service, BenchError> {
    let service_ports: Vec<serde_json::Value> = ports
        .iter()
        .map(|(port, protocol)| {
            serde_json::json!({"name": port, "protocol": protocol, "port": SERVICE_PORT, "targetPort": SERVER_PORT})
        })
        .collect();
    let slice_ports: Vec<serde_json::Value> = ports
        .iter()
        .map(|(port, protocol)| serde_json::json!({"name": port, "protocol": protocol, "port": SERVER_PORT}))
        .collect();
    let service: Service = object(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name},
        "spec": {"ports": service_ports},
    }));
    let created = services
        .create(&PostParams::default(), &service)
        .await
        .map_err(api_error(format!("creating Service {name}")))?;
    let mut slice = endpoints_patch(endpoints);
    slice["apiVersion"] = "discovery.k8s.io/v1".into();
    slice["kind"] = "EndpointSlice".into();
    slice["metadata"] =
        serde_json::json!({"name": name, "labels": {"kubernetes.io/service-name": name}});
    slice["addressType"] = "IPv4".into();
    slice["ports"] = slice_ports.into();
    slices
        .create(&PostParams::default(), &object(slice))
        .await
        .map_err(api_error(format!("creating EndpointSlice {name}")))?;
    Ok(created)
}

/// Filler `index`: `endpoints` addresses from 10.200.0.0 on, which no
/// request is sent to.
async fn create_filler(
    services: &Api<Service>,
    slices: &Api<EndpointSlice>,
    index: u32,
    endpoints: u32,
) -> Result<(), BenchError> {
    let addresses = filler_addresses(index, endpoints);
    create_service(
        services,
        slices,
        &format!("f{index}"),
        &[("http", "TCP")],
        &addresses,
    )
    .await
    .map(drop)
}

fn filler_addresses(index: u32, endpoints: u32) -> Vec<Ipv4Addr> {
    let base = u32::from(Ipv4Addr::new(10, 200, 0, 0)) + index * endpoints;
    (0..endpoints).map(|e| Ipv4Addr::from(base + e)).collect()
}

/// The log from `offset` on.
fn read_from(path: &Path, offset: u64) -> Result<String, BenchError> {
    let io = |source| BenchError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    file.seek(std::io::SeekFrom::Start(offset)).map_err(io)?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io)?;
    Ok(text)
}

/// The `elapsed_us` of the agent's first `synced` line in `log` with at
/// least `frontends` frontends.
fn synced(log: &str, frontends: u32) -> Option<u64> {
    log.lines()
        .filter(|line| line.contains(" synced"))
        .find_map(|line| {
            let field = |name: &str| -> Option<u64> {
                line.split_whitespace()
                    .find_map(|word| word.strip_prefix(name)?.parse().ok())
            };
            (field("frontends=")? >= u64::from(frontends)).then(|| field("elapsed_us="))?
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_sync_with_enough_frontends_is_the_one() {
        let log = "\
2026-12-07T15:00:00Z  INFO wharf_agent::sync: synced frontends=3 added=3 elapsed_us=900 state=00ff
2026-12-07T15:00:01Z  INFO wharf_agent::sync: synced frontends=1003 added=1000 elapsed_us=52000 state=01ff
2026-12-07T15:00:02Z  INFO wharf_agent::sync: synced frontends=1004 added=1 elapsed_us=300 state=02ff
";
        assert_eq!(synced(log, 3), Some(900));
        assert_eq!(synced(log, 1003), Some(52_000));
        assert_eq!(synced(log, 2000), None);
    }

    #[test]
    fn modes_have_cluster_names_the_cli_accepts() {
        for mode in [
            BenchMode::Ebpf,
            BenchMode::EbpfTc,
            BenchMode::Iptables,
            BenchMode::Nftables,
            BenchMode::Ipvs,
        ] {
            cluster::layout::check_name(&mode.cluster()).expect("a valid cluster name");
        }
        assert_eq!(BenchMode::EbpfTc.spec().agent_args, ["--no-socket-lb"]);
        assert_eq!(BenchMode::Ebpf.spec().proxy_mode, ProxyMode::Ebpf);
    }

    #[test]
    fn fillers_never_share_an_address_nor_reach_the_cluster_s() {
        let mut seen = std::collections::HashSet::new();
        for index in 0..10_000 {
            for address in filler_addresses(index, 10) {
                assert!(seen.insert(address), "{address} twice");
            }
        }
        assert_eq!(
            filler_addresses(9_999, 10)[9],
            Ipv4Addr::new(10, 201, 134, 159)
        );
        // Below the pod (10.244/16) and node (10.250/16) ranges.
        assert!(seen.iter().all(|a| a.octets()[1] < 244));
    }

    #[test]
    fn endpoint_patches_replace_the_list_with_ready_endpoints() {
        let patch = endpoints_patch(&[Ipv4Addr::new(10, 244, 1, 5)]);
        assert_eq!(
            patch,
            serde_json::json!({"endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": true}}]})
        );
    }
}
