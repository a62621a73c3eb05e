//! `wharf cluster up|down|status`: a multi-node cluster on this host,
//! each node a network namespace with its own cgroup and BPF pins, joined
//! by an underlay bridge; wharf-control (and etcd) on the host, one
//! wharf-agent per node inside its namespace.
//!
//! A cluster is its state file (`<clusters dir>/<name>/cluster.json`):
//! what was asked for, its address slot, and each daemon with how to
//! start it again. It is written before anything is made, so `down`
//! removes a half-built cluster, and `up` on an existing cluster of the
//! same shape only restarts what died and waits for it.

pub mod daemon;
pub mod layout;
pub mod network;

use std::{
    fs::{self, File},
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use clap::ValueEnum;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client, api::ListParams};
use serde::{Deserialize, Serialize};
use wharf_cli::containerd;
use wharf_control::{etcd_process, join};

use self::{
    daemon::{Daemon, DaemonError, Running},
    layout::{API_PORT, BadName, CLUSTER_CIDR, Layout, MAX_NODES, SERVICE_CIDR, SLOTS},
    network::NetworkError,
};
use crate::progress::Progress;

/// How long wharf-control may take to serve (measured: under 1 s here;
/// etcd adds about 0.3 s).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the nodes may take to be Ready once their agents run
/// (measured: about 3 s for three nodes).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a node's containerd may take to serve its socket (measured:
/// about 0.2 s).
const CONTAINERD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon has between SIGTERM and SIGKILL (the agent's own
/// shutdown takes well under a second).
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a join token made by `up` lasts: nodes join at once and keep
/// their own credentials afterwards.
const JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// The service proxy mode every node's agent runs (`--proxy-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    Ebpf,
    Iptables,
    Nftables,
    Ipvs,
    /// The agent's choice: eBPF where the kernel allows it.
    Auto,
}

/// Where the API server keeps its objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// wharf-control's own store in its data directory.
    Embedded,
    /// A real etcd-server process the cluster starts and owns.
    Etcd,
}

/// How the nodes run pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// Each container's command on the node's filesystem (copy on
    /// write); images are recorded, not pulled.
    Process,
    /// A containerd per node (Debian's, with runc) through its CRI
    /// plugin, wharf-cni as its network; it has the images `up` builds
    /// from busybox-static (`wharf.local/busybox:1`), and pulls others.
    Cri,
}

fn value_name(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// What a cluster is asked to be: `up`'s flags, and what its state file
/// records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
pub struct Spec {
    #[arg(long, default_value_t = 2)]
    pub nodes: u8,
    #[arg(long, value_enum, default_value = "auto")]
    pub proxy_mode: ProxyMode,
    #[arg(long, value_enum, default_value = "embedded")]
    pub store: StoreKind,
    #[arg(long, value_enum, default_value = "process")]
    pub runtime: RuntimeKind,
    /// A further flag for wharf-control (repeat for more), e.g.
    /// `--control-arg=--node-monitor-grace-period=10`.
    #[arg(long = "control-arg", allow_hyphen_values = true)]
    #[serde(default)]
    pub control_args: Vec<String>,
    /// A further flag for every wharf-agent (repeat for more).
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    #[serde(default)]
    pub agent_args: Vec<String>,
}

/// A cluster as recorded.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    name: String,
    slot: u8,
    spec: Spec,
    daemons: Vec<Record>,
}

/// A daemon and, once started, which process it is.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    daemon: Daemon,
    running: Option<Running>,
}

impl Record {
    /// A node's agent (not its containerd, not the control plane).
    fn is_agent(&self) -> bool {
        self.daemon.netns.is_some() && !self.daemon.role.ends_with(CONTAINERD_ROLE)
    }
}

/// The suffix of a node's containerd's role (`n1-containerd`).
const CONTAINERD_ROLE: &str = "-containerd";

/// Where clusters live on this host and what they are made of.
#[derive(Clone, Debug)]
pub struct Host {
    /// One directory per cluster.
    pub clusters_dir: PathBuf,
    /// The cgroup v2 mount.
    pub cgroup_root: PathBuf,
    /// bpffs: agents pin below `<bpffs>/wharf/<node>`.
    pub bpffs: PathBuf,
    /// Where wharf-control, wharf-agent and wharf-cni are (beside `wharf`).
    pub bin_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Name(#[from] BadName),
    #[error("clusters need root: they create network namespaces, cgroups and eBPF programs")]
    NotRoot,
    #[error("--nodes must be 1 to {MAX_NODES}, not {nodes}")]
    Nodes { nodes: u8 },
    #[error("{program} not found: {hint}")]
    Missing { program: String, hint: &'static str },
    #[error(
        "cluster {name} exists as {existing}; `wharf cluster down --name {name}` first to make it {wanted}"
    )]
    Exists {
        name: String,
        existing: String,
        wanted: String,
    },
    #[error("no cluster named {name} (see `wharf cluster status`)")]
    Unknown { name: String },
    #[error("all {SLOTS} address slots (10.250.0.0/16) are in use")]
    NoSlot,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a cluster state file: {source}")]
    BadState {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Etcd(#[from] etcd_process::EtcdProcessError),
    #[error("{role} exited; the end of {log}:\n{tail}")]
    Exited {
        role: String,
        log: PathBuf,
        tail: String,
    },
    #[error("wharf-control did not serve within {CONTROL_TIMEOUT:?}; see {log}")]
    ControlNotReady { log: PathBuf },
    #[error("cannot make a join token: {0}")]
    Join(#[from] join::JoinError),
    #[error("nodes not Ready within {READY_TIMEOUT:?}: {nodes}; see the logs in {logs}")]
    NotReady { nodes: String, logs: PathBuf },
    #[error("teardown of {node} failed; the end of its output:\n{tail}")]
    Teardown { node: String, tail: String },
    #[error("containerd of {node}: {source}")]
    Containerd {
        node: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "containerd of {node} did not serve within {CONTAINERD_TIMEOUT:?}; the end of {log}:\n{tail}"
    )]
    ContainerdNotReady {
        node: String,
        log: PathBuf,
        tail: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError {
    let path = path.to_path_buf();
    move |source| ClusterError::Io { path, source }
}

impl Host {
    /// This host's defaults: clusters under `clusters_dir`, binaries
    /// beside the running `wharf`.
    pub fn new(clusters_dir: PathBuf) -> Result<Self, ClusterError> {
        let exe = std::env::current_exe().map_err(io_error(Path::new("/proc/self/exe")))?;
        Ok(Self {
            clusters_dir,
            cgroup_root: wharf_agent::kubelet::cgroups::v2_mount(),
            bpffs: PathBuf::from(network::BPFFS),
            bin_dir: exe.parent().map(Path::to_path_buf).unwrap_or_default(),
        })
    }

    fn layout(&self, name: &str, slot: u8) -> Layout {
        Layout::new(name, slot, &self.clusters_dir, &self.cgroup_root)
    }

    pub(crate) fn binary(&self, name: &str) -> Result<PathBuf, ClusterError> {
        let path = self.bin_dir.join(name);
        if path.exists() {
            Ok(path)
        } else {
            Err(ClusterError::Missing {
                program: path.display().to_string(),
                hint: "build the workspace's binaries (cargo build --release --workspace --bins)",
            })
        }
    }

    /// Serialises `up` and `down` on this host (slots, namespaces).
    fn lock(&self) -> Result<File, ClusterError> {
        fs::create_dir_all(&self.clusters_dir).map_err(io_error(&self.clusters_dir))?;
        let path = self.clusters_dir.join(".lock");
        let file = File::create(&path).map_err(io_error(&path))?;
        file.lock().map_err(io_error(&path))?;
        Ok(file)
    }

    fn read_state(&self, name: &str) -> Result<Option<State>, ClusterError> {
        let path = self.clusters_dir.join(name).join("cluster.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| ClusterError::BadState { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&path)(e)),
        }
    }

    fn write_state(&self, state: &State) -> Result<(), ClusterError> {
        let layout = self.layout(&state.name, state.slot);
        fs::create_dir_all(&layout.dir).map_err(io_error(&layout.dir))?;
        let path = layout.state_file();
        let temporary = path.with_extension("json.new");
        let bytes = serde_json::to_vec_pretty(state).expect("states serialise");
        fs::write(&temporary, bytes).map_err(io_error(&temporary))?;
        fs::rename(&temporary, &path).map_err(io_error(&path))
    }

    /// Every recorded cluster, by name.
    fn states(&self) -> Result<Vec<State>, ClusterError> {
        let mut states = Vec::new();
        let Ok(entries) = fs::read_dir(&self.clusters_dir) else {
            return Ok(states);
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir())
                && let Some(name) = entry.file_name().to_str()
                && let Some(state) = self.read_state(name)?
            {
                states.push(state);
            }
        }
        states.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(states)
    }

    /// The lowest slot no recorded cluster has and nothing on the host
    /// routes.
    fn free_slot(&self, name: &str) -> Result<u8, ClusterError> {
        let used: Vec<u8> = self.states()?.iter().map(|s| s.slot).collect();
        for slot in (0..SLOTS).filter(|s| !used.contains(s)) {
            if !network::slot_taken(&self.layout(name, slot))? {
                return Ok(slot);
            }
        }
        Err(ClusterError::NoSlot)
    }
}

fn require_root() -> Result<(), ClusterError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        Ok(())
    } else {
        Err(ClusterError::NotRoot)
    }
}

fn describe(spec: &Spec) -> String {
    let mut text = format!(
        "{} node(s), proxy mode {}, store {}, runtime {}",
        spec.nodes,
        value_name(spec.proxy_mode),
        value_name(spec.store),
        value_name(spec.runtime)
    );
    for (whose, args) in [("control", &spec.control_args), ("agent", &spec.agent_args)] {
        if !args.is_empty() {
            text.push_str(&format!(", {whose} flags {}", args.join(" ")));
        }
    }
    text
}

/// The last lines of a log, for an error message.
fn tail(path: &Path) -> String {
    let Ok(file) = File::open(path) else {
        return String::from("(no log)");
    };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Brings cluster `name` up as `spec` says, or finishes and restarts an
/// existing one of that shape; returns its layout once every node is
/// Ready.
pub async fn up(host: &Host, name: &str, spec: Spec) -> Result<Layout, ClusterError> {
    layout::check_name(name)?;
    require_root()?;
    if spec.nodes == 0 || spec.nodes > MAX_NODES {
        return Err(ClusterError::Nodes { nodes: spec.nodes });
    }
    let control = host.binary("wharf-control")?;
    let agent = host.binary("wharf-agent")?;
    host.binary("wharf-cni")?;
    let mut needed = Vec::new();
    if spec.store == StoreKind::Etcd {
        needed.push(("etcd", "apt-get install etcd-server"));
    }
    if spec.runtime == RuntimeKind::Cri {
        needed.extend([
            ("containerd", "apt-get install containerd"),
            ("ctr", "apt-get install containerd"),
            ("runc", "apt-get install runc"),
        ]);
    }
    for (program, hint) in needed {
        if Command::new(program).arg("--version").output().is_err() {
            return Err(ClusterError::Missing {
                program: program.into(),
                hint,
            });
        }
    }
    let _lock = host.lock()?;
    let mut progress = Progress::new();
    let mut state = match host.read_state(name)? {
        Some(state) if state.spec == spec => state,
        Some(state) => {
            return Err(ClusterError::Exists {
                name: name.into(),
                existing: describe(&state.spec),
                wanted: describe(&spec),
            });
        }
        None => {
            let state = State {
                name: name.into(),
                slot: host.free_slot(name)?,
                spec: spec.clone(),
                daemons: Vec::new(),
            };
            host.write_state(&state)?;
            state
        }
    };
    let layout = host.layout(name, state.slot);

    network::underlay(&layout)?;
    for index in 0..spec.nodes {
        network::node(&layout, &layout.node(index))?;
    }
    let ports: Vec<String> = (0..spec.nodes).map(|i| layout.node(i).short).collect();
    network::passthrough_xdp(&layout, &ports)?;
    progress.done(&format!(
        "network: {} node namespaces on {} (slot {})",
        spec.nodes,
        layout.underlay_subnet(),
        state.slot
    ));

    if state.daemons.is_empty() {
        state.daemons = control_daemons(&layout, &spec, &control);
        host.write_state(&state)?;
    }
    for index in 0..state.daemons.len() {
        let record = &mut state.daemons[index];
        if record.running.is_some_and(|r| r.alive()) || record.daemon.netns.is_some() {
            continue;
        }
        let etcd = record.daemon.role == "etcd";
        if etcd {
            etcd_process::prepare(&layout.etcd_dir())?;
        }
        record.running = Some(record.daemon.start()?);
        host.write_state(&state)?;
        if etcd {
            etcd_process::wait_ready(&layout.etcd_urls().0).await?;
        }
    }
    let client = wait_for_control(&layout, &state).await?;
    progress.done(&format!(
        "control plane at {} (store {})",
        layout.api_url(),
        value_name(spec.store)
    ));

    if spec.runtime == RuntimeKind::Cri {
        start_containerds(host, &layout, &mut state).await?;
        progress.done(&format!(
            "containerd on {} node(s), images imported",
            spec.nodes
        ));
    }

    // Nodes join once, with a token of their own; restarted agents use
    // the credentials they got then.
    let unjoined: Vec<u8> = (0..spec.nodes)
        .filter(|&i| {
            let short = layout.node(i).short;
            !state.daemons.iter().any(|r| r.daemon.role == short)
        })
        .collect();
    if !unjoined.is_empty() {
        let join = join::create(&layout.kubeconfig(), JOIN_TOKEN_TTL).await?;
        for index in unjoined {
            state.daemons.push(Record {
                daemon: agent_daemon(&layout, index, &spec, &agent, &join),
                running: None,
            });
        }
        host.write_state(&state)?;
    }
    for index in 0..state.daemons.len() {
        let record = &mut state.daemons[index];
        if record.running.is_none_or(|r| !r.alive()) {
            record.running = Some(record.daemon.start()?);
            host.write_state(&state)?;
        }
    }
    wait_for_nodes(&layout, &state, &client, &mut progress).await?;
    progress.done(&format!("{} node(s) Ready", spec.nodes));
    Ok(layout)
}

/// With the cri runtime: each node's containerd started (or found
/// running), serving, and holding the images, before its agent starts.
async fn start_containerds(
    host: &Host,
    layout: &Layout,
    state: &mut State,
) -> Result<(), ClusterError> {
    let images = layout.dir.join("images");
    for index in 0..state.spec.nodes {
        let node = layout.node(index);
        let failed = |source| ClusterError::Containerd {
            node: node.name.clone(),
            source,
        };
        let dir = node.containerd_dir();
        let config =
            containerd::configure(&dir, &node.cni_bin(), &node.cni_conf()).map_err(failed)?;
        let role = format!("{}{CONTAINERD_ROLE}", node.short);
        let position = match state.daemons.iter().position(|r| r.daemon.role == role) {
            Some(position) => position,
            None => {
                state.daemons.push(Record {
                    daemon: Daemon {
                        log: layout.logs_dir().join(format!("{role}.log")),
                        role,
                        program: PathBuf::from("containerd"),
                        args: vec!["--config".into(), config.display().to_string()],
                        netns: Some(node.netns.clone()),
                        cgroup: node.cgroup.join("containerd"),
                    },
                    running: None,
                });
                state.daemons.len() - 1
            }
        };
        if state.daemons[position].running.is_none_or(|r| !r.alive()) {
            state.daemons[position].running = Some(state.daemons[position].daemon.start()?);
            host.write_state(state)?;
        }
        let socket = containerd::socket(&dir);
        let deadline = Instant::now() + CONTAINERD_TIMEOUT;
        while !containerd::serving(&socket) {
            let record = &state.daemons[position];
            if Instant::now() > deadline || record.running.is_some_and(|r| !r.alive()) {
                return Err(ClusterError::ContainerdNotReady {
                    node: node.name,
                    log: record.daemon.log.clone(),
                    tail: tail(&record.daemon.log),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        containerd::import_images(&socket, &images).map_err(failed)?;
    }
    Ok(())
}

/// etcd (with `--store etcd`) and wharf-control.
fn control_daemons(layout: &Layout, spec: &Spec, control: &Path) -> Vec<Record> {
    let mut daemons = Vec::new();
    let mut args = vec![
        format!("--data-dir={}", layout.control_dir().display()),
        format!("--listen={}:{API_PORT}", layout.host_address()),
        format!("--service-cidr={SERVICE_CIDR}"),
        format!("--cluster-cidr={CLUSTER_CIDR}"),
    ];
    args.extend(spec.control_args.iter().cloned());
    if spec.store == StoreKind::Etcd {
        let (client, peer) = layout.etcd_urls();
        daemons.push(Record {
            daemon: Daemon {
                role: "etcd".into(),
                program: PathBuf::from("etcd"),
                args: etcd_process::args(&layout.etcd_dir(), &client, &peer),
                netns: None,
                cgroup: layout.control_cgroup(),
                log: layout.logs_dir().join("etcd.log"),
            },
            running: None,
        });
        args.push("--store=etcd".into());
        args.push(format!("--etcd-endpoints={client}"));
    }
    daemons.push(Record {
        daemon: Daemon {
            role: "control".into(),
            program: control.to_path_buf(),
            args,
            netns: None,
            cgroup: layout.control_cgroup(),
            log: layout.logs_dir().join("control.log"),
        },
        running: None,
    });
    daemons
}

/// Node `index`'s agent, joining with `join`'s token.
fn agent_daemon(
    layout: &Layout,
    index: u8,
    spec: &Spec,
    agent: &Path,
    join: &join::Join,
) -> Daemon {
    let node = layout.node(index);
    let mut args = node.agent_file_args();
    args.extend([
        format!("--proxy-mode={}", value_name(spec.proxy_mode)),
        format!("--runtime={}", value_name(spec.runtime)),
        format!("--server={}", join.server),
        format!("--token={}", join.token),
        format!("--ca-cert-hash={}", join.ca_cert_hash),
    ]);
    if spec.runtime == RuntimeKind::Cri {
        let socket = containerd::socket(&node.containerd_dir());
        args.push(format!("--container-runtime-endpoint={}", socket.display()));
    }
    args.extend(spec.agent_args.iter().cloned());
    Daemon {
        role: node.short.clone(),
        program: agent.to_path_buf(),
        args,
        netns: Some(node.netns),
        cgroup: node.agent_cgroup,
        log: layout.logs_dir().join(format!("{}.log", node.short)),
    }
}

/// Fails with its log if one of `records` has exited.
fn check_alive<'a>(records: impl IntoIterator<Item = &'a Record>) -> Result<(), ClusterError> {
    for record in records {
        if record.running.is_some_and(|r| !r.alive()) {
            return Err(ClusterError::Exited {
                role: record.daemon.role.clone(),
                log: record.daemon.log.clone(),
                tail: tail(&record.daemon.log),
            });
        }
    }
    Ok(())
}

/// Waits until wharf-control has written the admin kubeconfig and
/// answers with it.
async fn wait_for_control(layout: &Layout, state: &State) -> Result<Client, ClusterError> {
    let deadline = Instant::now() + CONTROL_TIMEOUT;
    loop {
        // Agents that died are started again only after this.
        check_alive(state.daemons.iter().filter(|r| r.daemon.netns.is_none()))?;
        if layout.kubeconfig().exists()
            && let Ok(client) = wharf_control::components::client(&layout.kubeconfig()).await
            && client.apiserver_version().await.is_ok()
        {
            return Ok(client);
        }
        if Instant::now() > deadline {
            return Err(ClusterError::ControlNotReady {
                log: layout.logs_dir().join("control.log"),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The names of the cluster's Nodes whose Ready condition is True.
async fn ready_nodes(client: &Client) -> Result<Vec<String>, kube::Error> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    Ok(nodes
        .into_iter()
        .filter(|node| {
            node.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|conditions| {
                    conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
        })
        .filter_map(|node| node.metadata.name)
        .collect())
}

async fn wait_for_nodes(
    layout: &Layout,
    state: &State,
    client: &Client,
    progress: &mut Progress,
) -> Result<(), ClusterError> {
    let names: Vec<String> = (0..state.spec.nodes).map(|i| layout.node(i).name).collect();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        check_alive(&state.daemons)?;
        let ready = ready_nodes(client).await.unwrap_or_default();
        let waiting: Vec<&String> = names.iter().filter(|n| !ready.contains(n)).collect();
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(ClusterError::NotReady {
                nodes: waiting
                    .iter()
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                logs: layout.logs_dir(),
            });
        }
        progress.update(&format!(
            "nodes Ready: {}/{}",
            names.len() - waiting.len(),
            names.len()
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What `down` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub processes: usize,
    pub namespaces: usize,
}

/// Removes every trace of cluster `name`: its agents stopped and their
/// nodes torn down (pods, pins, rules, routes), the control plane
/// stopped, whatever is left in its cgroups killed, its namespaces and
/// links deleted, and its directory unless `keep_data`.
pub fn down(host: &Host, name: &str, keep_data: bool) -> Result<Removed, ClusterError> {
    layout::check_name(name)?;
    require_root()?;
    let _lock = host.lock()?;
    let state = host.read_state(name)?;
    let namespaces = network::namespaces(name);
    let cgroup = host.layout(name, 0).cgroup;
    let dir = host.clusters_dir.join(name);
    if state.is_none() && namespaces.is_empty() && !cgroup.exists() && !dir.exists() {
        return Err(ClusterError::Unknown { name: name.into() });
    }
    let mut progress = Progress::new();
    let mut removed = Removed::default();
    if let Some(state) = &state {
        let layout = host.layout(name, state.slot);
        // Agents first, and torn down while their containerd still runs
        // (their pods are removed through it).
        let (agents, others): (Vec<&Record>, Vec<&Record>) =
            state.daemons.iter().partition(|r| r.is_agent());
        for record in &agents {
            if let Some(running) = record.running.filter(Running::alive) {
                running.stop(STOP_GRACE);
                removed.processes += 1;
            }
        }
        for record in &agents {
            teardown(&record.daemon, &layout)?;
        }
        progress.done(&format!("{} node(s) torn down", agents.len()));
        // Then containerds, wharf-control, and etcd, its store.
        for record in others.iter().rev() {
            if let Some(running) = record.running.filter(Running::alive) {
                running.stop(STOP_GRACE);
                removed.processes += 1;
            }
        }
    }
    daemon::remove_cgroup(&cgroup).map_err(io_error(&cgroup))?;
    // runc (the cri runtime) also makes pod cgroups in the v1
    // hierarchies of a hybrid host, at the same relative path.
    if let Ok(relative) = cgroup.strip_prefix(&host.cgroup_root) {
        daemon::remove_v1_cgroups(&host.cgroup_root, relative).map_err(io_error(relative))?;
    }
    // The clusters' common parent goes with the last of them.
    if let Some(parent) = cgroup.parent() {
        let _ = fs::remove_dir(parent);
    }
    for ns in &namespaces {
        network::remove_netns(ns)?;
        removed.namespaces += 1;
    }
    network::remove_host_link(&host.layout(name, 0).host_link())?;
    remove_pins(host, name)?;
    progress.done(&format!(
        "{} process(es) stopped, {} namespace(s) removed",
        removed.processes, removed.namespaces
    ));
    // What containerd left mounted there (its processes are gone).
    daemon::unmount_below(&dir);
    if keep_data {
        let state_file = dir.join("cluster.json");
        if state_file.exists() {
            fs::remove_file(&state_file).map_err(io_error(&state_file))?;
        }
    } else if dir.exists() {
        fs::remove_dir_all(&dir).map_err(io_error(&dir))?;
    }
    Ok(removed)
}

/// Stops node `index`'s agent and starts it again; with `clean`, the node
/// is torn down in between (its pods, pins and rules gone), so the new
/// agent programs everything from nothing: what `bench routing` times as
/// a full sync. Returns the agent's log and its length before the start,
/// where the new agent's lines begin.
pub fn restart_agent(
    host: &Host,
    name: &str,
    index: u8,
    clean: bool,
) -> Result<(PathBuf, u64), ClusterError> {
    require_root()?;
    let _lock = host.lock()?;
    let mut state = host
        .read_state(name)?
        .ok_or_else(|| ClusterError::Unknown { name: name.into() })?;
    let layout = host.layout(name, state.slot);
    let short = layout.node(index).short;
    let record = state
        .daemons
        .iter_mut()
        .find(|r| r.daemon.role == short)
        .ok_or_else(|| ClusterError::Unknown {
            name: format!("{name}-{short}"),
        })?;
    if let Some(running) = record.running.take() {
        running.stop(STOP_GRACE);
    }
    if clean {
        teardown(&record.daemon, &layout)?;
    }
    let offset = fs::metadata(&record.daemon.log).map_or(0, |m| m.len());
    record.running = Some(record.daemon.start()?);
    let log = record.daemon.log.clone();
    host.write_state(&state)?;
    Ok((log, offset))
}

/// Runs the node's agent with `--teardown` in its namespace: its pods,
/// their namespaces and addresses, BPF pins, rules, routes and CNI files.
fn teardown(agent: &Daemon, layout: &Layout) -> Result<(), ClusterError> {
    let Some(netns) = &agent.netns else {
        return Ok(());
    };
    if !network::netns_exists(netns) {
        return Ok(());
    }
    let node = (0..MAX_NODES)
        .map(|i| layout.node(i))
        .find(|n| n.short == agent.role)
        .expect("agents are named for their node");
    let mut args = node.agent_file_args();
    // The same mode: it says which rules to remove.
    args.extend(
        agent
            .args
            .iter()
            .filter(|a| a.starts_with("--proxy-mode="))
            .cloned(),
    );
    args.push("--teardown".into());
    let log = layout
        .logs_dir()
        .join(format!("{}-teardown.log", node.short));
    let teardown = Daemon {
        role: format!("{} teardown", node.short),
        program: agent.program.clone(),
        args,
        netns: Some(netns.clone()),
        cgroup: node.agent_cgroup.clone(),
        log: log.clone(),
    };
    if !teardown.run()?.success() {
        return Err(ClusterError::Teardown {
            node: node.name,
            tail: tail(&log),
        });
    }
    Ok(())
}

/// Removes the pin directories of the cluster's nodes that a failed or
/// skipped teardown left.
fn remove_pins(host: &Host, name: &str) -> Result<(), ClusterError> {
    let pins = host.bpffs.join("wharf");
    let prefix = format!("{name}-n");
    let Ok(entries) = fs::read_dir(&pins) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let node = entry.file_name();
        let node = node.to_string_lossy();
        let ours = node
            .strip_prefix(&prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            || node == network::underlay_pins(name);
        if ours {
            fs::remove_dir_all(entry.path()).map_err(io_error(&entry.path()))?;
        }
    }
    Ok(())
}

/// One cluster's health, for `status`.
#[derive(Debug)]
pub struct Status {
    pub name: String,
    pub spec: Spec,
    pub api_url: String,
    pub kubeconfig: PathBuf,
    /// (role, running).
    pub daemons: Vec<(String, bool)>,
    /// (Node, Ready) as the API server says, or why it could not be
    /// asked.
    pub nodes: Result<Vec<(String, bool)>, String>,
}

/// The recorded clusters (or only `name`) and their health.
pub async fn status(host: &Host, name: Option<&str>) -> Result<Vec<Status>, ClusterError> {
    let mut states = host.states()?;
    if let Some(name) = name {
        states.retain(|s| s.name == name);
        if states.is_empty() {
            return Err(ClusterError::Unknown { name: name.into() });
        }
    }
    let mut statuses = Vec::new();
    for state in states {
        let layout = host.layout(&state.name, state.slot);
        let daemons = state
            .daemons
            .iter()
            .map(|r| (r.daemon.role.clone(), r.running.is_some_and(|r| r.alive())))
            .collect();
        let nodes = node_health(&layout, &state).await;
        statuses.push(Status {
            name: state.name.clone(),
            spec: state.spec.clone(),
            api_url: layout.api_url(),
            kubeconfig: layout.kubeconfig(),
            daemons,
            nodes,
        });
    }
    Ok(statuses)
}

async fn node_health(layout: &Layout, state: &State) -> Result<Vec<(String, bool)>, String> {
    let client = wharf_control::components::client(&layout.kubeconfig())
        .await
        .map_err(|e| e.to_string())?;
    let ready = tokio::time::timeout(Duration::from_secs(5), ready_nodes(&client))
        .await
        .map_err(|_| "the API server did not answer within 5 s".to_string())?
        .map_err(|e| e.to_string())?;
    Ok((0..state.spec.nodes)
        .map(|i| {
            let name = layout.node(i).name;
            let is_ready = ready.contains(&name);
            (name, is_ready)
        })
        .collect())
}

impl Status {
    pub fn render(&self) -> String {
        let mut out = format!(
            "cluster {}: {}\n  API server {}  kubeconfig {}\n",
            self.name,
            describe(&self.spec),
            self.api_url,
            self.kubeconfig.display()
        );
        let down: Vec<&str> = self
            .daemons
            .iter()
            .filter(|(_, running)| !running)
            .map(|(role, _)| role.as_str())
            .collect();
        if down.is_empty() {
            out.push_str(&format!(
                "  processes: all {} running\n",
                self.daemons.len()
            ));
        } else {
            out.push_str(&format!("  processes not running: {}\n", down.join(", ")));
        }
        match &self.nodes {
            Ok(nodes) => {
                for (node, ready) in nodes {
                    let word = if *ready { "Ready" } else { "NotReady" };
                    out.push_str(&format!("  node {node}: {word}\n"));
                }
            }
            Err(why) => out.push_str(&format!("  nodes: unknown ({why})\n")),
        }
        out
    }

    /// Every process runs and every node is Ready.
    pub fn healthy(&self) -> bool {
        self.daemons.iter().all(|(_, running)| *running)
            && self
                .nodes
                .as_ref()
                .is_ok_and(|nodes| nodes.iter().all(|(_, ready)| *ready))
    }
}
