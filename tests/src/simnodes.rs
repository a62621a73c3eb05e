//! Simulated nodes ("hollow" nodes, as upstream's kubemark): Node objects
//! with capacity, Leases renewed like an agent renews them, and pods
//! bound to them marked Running and Ready with an address from the
//! node's podCIDR, or removed once deleted. They let the scheduler and
//! the controllers be tested and benchmarked at scale without running
//! anything. A node can be killed: its lease and its pods then go silent,
//! as a crashed agent's would.
//!
//! A pod may ask to finish: annotation `sim.wharf.dev/exit-code` (with
//! `sim.wharf.dev/run-ms`, default 0) makes it Succeeded (0) or Failed
//! after that long, as a container that exits.
//!
//! A pod may claim to be busy: annotation `sim.wharf.dev/usage`
//! (`cpu=200m,memory=64Mi`, per container) makes its node report that
//! usage every second as metrics.k8s.io PodMetrics (and the node's sum
//! as NodeMetrics), as an agent reports measured usage; the annotation
//! can be changed on a running pod. Pods without it report nothing,
//! which keeps large benchmarks free of that load.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Node, Pod},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{MicroTime, OwnerReference, Time},
    },
};
use kube::{
    Api, Client, Resource as _, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use tokio::sync::Semaphore;
use wharf_control::usage::{ContainerMetrics, NodeMetrics, PodMetrics};

pub const EXIT_CODE: &str = "sim.wharf.dev/exit-code";
pub const RUN_MS: &str = "sim.wharf.dev/run-ms";
pub const USAGE: &str = "sim.wharf.dev/usage";
/// How often usage reports are written.
const USAGE_PERIOD: Duration = Duration::from_secs(1);
/// Pod writes (status, deletion) in flight at once. Each needs its own
/// HTTP/1.1 connection; unbounded, a burst of bindings opened hundreds of
/// connections, each a TLS handshake on both ends. As many as the
/// scheduler's binders, so neither side's writes queue behind the other's.
const WRITES_IN_FLIGHT: usize = 64;
/// Where pod addresses come from on a node without a podCIDR (no IPAM in
/// the benchmarks, or not yet): a /24 of 100.64.0.0/10 per node, in the
/// order nodes first need one, so addresses stay unique across nodes
/// (beyond 16,384 such nodes the /24s are reused).
const UNASSIGNED: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 0);
const UNASSIGNED_BLOCKS: usize = 1 << 14;

/// What every simulated node offers and how often it heartbeats.
#[derive(Clone, Debug)]
pub struct Shape {
    pub cpu: String,
    pub memory: String,
    pub pods: u32,
    /// Lease renewal period; `None` for no leases (benchmarks without a
    /// node lifecycle controller).
    pub heartbeat: Option<Duration>,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            cpu: "8".to_owned(),
            memory: "32Gi".to_owned(),
            pods: 110,
            heartbeat: Some(Duration::from_secs(2)),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Nodes that answer (killed ones are removed).
    alive: HashSet<String>,
    /// Next never-used host number per node for pod addresses, and the
    /// numbers pods that left gave back.
    next_host: HashMap<String, u32>,
    free_hosts: HashMap<String, Vec<u32>>,
    /// Pods already reported (with their node and host number), so watch
    /// events about them are skipped.
    reported: HashMap<String, (String, u32)>,
    /// Each node's podCIDR base address, as a watch on nodes last saw it
    /// (no IPAM runs in the benchmarks: reading the node for every pod
    /// was a third of the simulator's requests there).
    pod_cidrs: HashMap<String, Ipv4Addr>,
    /// The /24 of `UNASSIGNED` each node without a podCIDR uses.
    unassigned: HashMap<String, Ipv4Addr>,
    /// Pods with a usage annotation: what to report, by pod key.
    usage: HashMap<String, Busy>,
    /// Every pod started so far, for benchmarks.
    started: Started,
}

/// When the simulated nodes saw pods bound to them and reported them
/// Running: what a benchmark times scheduling by, without a watch of its
/// own (a second watch of every pod cost as much CPU as the simulator's).
#[derive(Clone, Copy, Debug, Default)]
pub struct Started {
    /// Pods seen bound (a pod deleted and created again counts again).
    pub count: usize,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
    /// Pods whose Running status was written, and when the last one was.
    pub running: usize,
    pub last_running: Option<Instant>,
}

/// A running pod's claimed usage.
#[derive(Clone, Debug)]
struct Busy {
    node: String,
    namespace: String,
    name: String,
    uid: String,
    labels: BTreeMap<String, String>,
    containers: Vec<String>,
    usage: BTreeMap<String, Quantity>,
}

/// The simulated nodes; everything stops when dropped.
pub struct SimNodes {
    runtime: Option<tokio::runtime::Runtime>,
    client: Client,
    shape: Shape,
    state: Arc<Mutex<State>>,
    names: Mutex<Vec<String>>,
}

impl std::fmt::Debug for SimNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNodes")
            .field("shape", &self.shape)
            .field("nodes", &lock_names(&self.names).len())
            .finish_non_exhaustive()
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SimNodes {
    /// Registers `count` nodes named `<prefix>-<i>` and starts serving them.
    pub fn start(kubeconfig: &Path, prefix: &str, count: usize, shape: Shape) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("simulator runtime");
        let client = runtime.block_on(async {
            let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
            let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .expect("client config");
            Client::try_from(config).expect("client")
        });
        let sim = Self {
            runtime: Some(runtime),
            client,
            shape,
            state: Arc::default(),
            names: Mutex::default(),
        };
        let names: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
        sim.add(&names);
        sim.runtime()
            .spawn(follow_pod_cidrs(sim.client.clone(), Arc::clone(&sim.state)));
        sim.runtime()
            .spawn(serve_pods(sim.client.clone(), Arc::clone(&sim.state)));
        sim.runtime()
            .spawn(report_usage(sim.client.clone(), Arc::clone(&sim.state)));
        sim
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("running")
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Registers more nodes (64 at a time) and starts their heartbeats.
    pub fn add(&self, names: &[String]) {
        let client = self.client.clone();
        let shape = self.shape.clone();
        self.runtime().block_on(async {
            futures::stream::iter(names)
                .for_each_concurrent(64, |name| register(client.clone(), name, &shape))
                .await;
        });
        let mut state = lock(&self.state);
        for name in names {
            state.alive.insert(name.clone());
            if let Some(period) = self.shape.heartbeat {
                self.runtime().spawn(heartbeat(
                    self.client.clone(),
                    name.clone(),
                    period,
                    Arc::clone(&self.state),
                ));
            }
        }
        lock_names(&self.names).extend(names.iter().cloned());
    }

    pub fn names(&self) -> Vec<String> {
        lock_names(&self.names).clone()
    }

    pub fn started(&self) -> Started {
        lock(&self.state).started
    }

    /// The node's agent "crashes": no more lease renewals, and its pods
    /// are no longer started, reported or removed.
    pub fn kill(&self, name: &str) {
        lock(&self.state).alive.remove(name);
    }
}

fn lock_names(names: &Mutex<Vec<String>>) -> std::sync::MutexGuard<'_, Vec<String>> {
    names
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Drop for SimNodes {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn register(client: Client, name: &String, shape: &Shape) {
    let resources =
        json!({ "cpu": shape.cpu, "memory": shape.memory, "pods": shape.pods.to_string() });
    let node: Node = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
        }},
        "status": {
            "capacity": resources, "allocatable": resources,
            "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "simulated node is ready", "lastHeartbeatTime": Time(chrono::Utc::now()),
                "lastTransitionTime": Time(chrono::Utc::now()) }],
        },
    }))
    .expect("node object");
    match Api::<Node>::all(client)
        .create(&PostParams::default(), &node)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => panic!("registering node {name}: {error}"),
    }
}

/// Renews the node's Lease while it is alive.
async fn heartbeat(client: Client, name: String, period: Duration, state: Arc<Mutex<State>>) {
    let api: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    loop {
        if !lock(&state).alive.contains(&name) {
            return;
        }
        let now = MicroTime(chrono::Utc::now());
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(name.clone()),
                lease_duration_seconds: Some(40),
                renew_time: Some(now.clone()),
                ..Default::default()
            }),
        };
        let renewal = json!({ "spec": { "renewTime": now } });
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&renewal))
            .await
        {
            Err(kube::Error::Api(status)) if status.code == 404 => {
                // A renewal that fails is what a struggling agent does;
                // the next one tries again.
                let _ = api.create(&PostParams::default(), &lease).await;
            }
            _ => {}
        }
        tokio::time::sleep(period).await;
    }
}

fn bound_to(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()?
        .node_name
        .as_deref()
        .filter(|n| !n.is_empty())
}

/// Keeps `State::pod_cidrs` up to date with the nodes' `spec.podCIDR`.
async fn follow_pod_cidrs(client: Client, state: Arc<Mutex<State>>) {
    let mut events = watcher(Api::<Node>::all(client), watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(event) = events.next().await {
        let Ok(node) = event else { continue };
        let base = node
            .spec
            .and_then(|s| s.pod_cidr)
            .and_then(|c| c.split('/').next()?.parse::<Ipv4Addr>().ok());
        if let (Some(name), Some(base)) = (node.metadata.name, base) {
            lock(&state).pod_cidrs.insert(name, base);
        }
    }
}

/// Runs bound pods on live nodes; removes deleted ones.
async fn serve_pods(client: Client, state: Arc<Mutex<State>>) {
    let writes = Arc::new(Semaphore::new(WRITES_IN_FLIGHT));
    let pods: Api<Pod> = Api::all(client.clone());
    let mut events = watcher(pods, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(event) = events.next().await {
        let Ok(pod) = event else { continue };
        let Some(node) = bound_to(&pod).map(str::to_owned) else {
            continue;
        };
        let key = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        let address = {
            let mut state = lock(&state);
            if !state.alive.contains(&node) {
                continue;
            }
            note_usage(&mut state, &key, &node, &pod);
            if pod.metadata.deletion_timestamp.is_some() {
                if let Some((node, host)) = state.reported.remove(&key) {
                    state.free_hosts.entry(node).or_default().push(host);
                }
                None
            } else if state.reported.contains_key(&key) {
                continue;
            } else {
                let reused = state.free_hosts.get_mut(&node).and_then(Vec::pop);
                let host = reused.unwrap_or_else(|| {
                    let next = state.next_host.entry(node.clone()).or_insert(1);
                    *next += 1;
                    *next
                });
                state.reported.insert(key.clone(), (node.clone(), host));
                let now = Instant::now();
                let started = &mut state.started;
                started.count += 1;
                started.first.get_or_insert(now);
                started.last = Some(now);
                Some(host)
            }
        };
        let client = client.clone();
        let state = Arc::clone(&state);
        let writes = Arc::clone(&writes);
        tokio::spawn(async move {
            let api: Api<Pod> =
                Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
            match address {
                None => {
                    // The node stopped the pod: finish its deletion.
                    // (Only this pod, not a namesake created since.)
                    let params = DeleteParams {
                        grace_period_seconds: Some(0),
                        preconditions: Some(kube::api::Preconditions {
                            uid: pod.metadata.uid.clone(),
                            resource_version: None,
                        }),
                        ..Default::default()
                    };
                    let _permit = writes.acquire().await;
                    let _ = api.delete(&pod.name_any(), &params).await;
                }
                Some(host) => run_pod(&client, &writes, &pod, &node, host, &state).await,
            }
        });
    }
}

/// Keeps the pod's claimed usage (the annotation may change while it
/// runs); a pod that is going or finished claims nothing.
fn note_usage(state: &mut State, key: &str, node: &str, pod: &Pod) {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let claim = pod
        .annotations()
        .get(USAGE)
        .filter(|_| pod.metadata.deletion_timestamp.is_none())
        .filter(|_| !matches!(phase, Some("Succeeded" | "Failed")));
    let Some(claim) = claim else {
        state.usage.remove(key);
        return;
    };
    let usage = claim
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(resource, amount)| {
            (
                resource.trim().to_owned(),
                Quantity(amount.trim().to_owned()),
            )
        })
        .collect();
    state.usage.insert(
        key.to_owned(),
        Busy {
            node: node.to_owned(),
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            labels: pod.labels().clone(),
            containers: pod
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .map(|c| c.name.clone())
                .collect(),
            usage,
        },
    );
}

/// Writes the usage of busy pods on live nodes, and their nodes' sums,
/// every `USAGE_PERIOD`. Each report is owned by its pod, so the garbage
/// collector removes it with the pod.
async fn report_usage(client: Client, state: Arc<Mutex<State>>) {
    let apply = PatchParams::apply("wharf-sim").force();
    loop {
        tokio::time::sleep(USAGE_PERIOD).await;
        let busy: Vec<Busy> = {
            let state = lock(&state);
            state
                .usage
                .iter()
                .filter(|(key, b)| {
                    state.alive.contains(&b.node) && state.reported.contains_key(*key)
                })
                .map(|(_, b)| b.clone())
                .collect()
        };
        let now = Time(chrono::Utc::now());
        let window = format!("{}s", USAGE_PERIOD.as_secs());
        let mut per_node: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
        for pod in &busy {
            let report = PodMetrics {
                api_version: "metrics.k8s.io/v1beta1".to_owned(),
                kind: "PodMetrics".to_owned(),
                metadata: ObjectMeta {
                    name: Some(pod.name.clone()),
                    labels: Some(pod.labels.clone()),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "v1".to_owned(),
                        kind: "Pod".to_owned(),
                        name: pod.name.clone(),
                        uid: pod.uid.clone(),
                        ..Default::default()
                    }]),
                    ..Default::default()
                },
                timestamp: now.clone(),
                window: window.clone(),
                containers: pod
                    .containers
                    .iter()
                    .map(|name| ContainerMetrics {
                        name: name.clone(),
                        usage: pod.usage.clone(),
                    })
                    .collect(),
            };
            let sums = per_node.entry(pod.node.clone()).or_default();
            for (resource, amount) in &pod.usage {
                let milli = wharf_quantity::milli(amount).unwrap_or(0);
                *sums.entry(resource.clone()).or_default() +=
                    milli * i64::try_from(pod.containers.len()).unwrap_or(0);
            }
            let _ = Api::<PodMetrics>::namespaced(client.clone(), &pod.namespace)
                .patch(&pod.name, &apply, &Patch::Apply(&report))
                .await;
        }
        for (node, sums) in per_node {
            let report = NodeMetrics {
                api_version: "metrics.k8s.io/v1beta1".to_owned(),
                kind: "NodeMetrics".to_owned(),
                metadata: ObjectMeta {
                    name: Some(node.clone()),
                    ..Default::default()
                },
                timestamp: now.clone(),
                window: window.clone(),
                usage: sums
                    .into_iter()
                    .map(|(resource, milli)| {
                        let amount = if resource == "cpu" {
                            format!("{milli}m")
                        } else {
                            (milli / 1000).to_string()
                        };
                        (resource, Quantity(amount))
                    })
                    .collect(),
            };
            let _ = Api::<NodeMetrics>::all(client.clone())
                .patch(&node, &apply, &Patch::Apply(&report))
                .await;
        }
    }
}

/// Reports the pod Running and Ready, then finished if it asks to.
async fn run_pod(
    client: &Client,
    writes: &Semaphore,
    pod: &Pod,
    node: &str,
    host: u32,
    state: &Mutex<State>,
) {
    let base = {
        let mut state = lock(state);
        match state.pod_cidrs.get(node) {
            Some(base) => *base,
            None => {
                let block = u32::try_from(state.unassigned.len() % UNASSIGNED_BLOCKS).unwrap_or(0);
                *state
                    .unassigned
                    .entry(node.to_owned())
                    .or_insert_with(|| Ipv4Addr::from(u32::from(UNASSIGNED) + (block << 8)))
            }
        }
    };
    let ip = Ipv4Addr::from(u32::from(base) + host);
    let now = Time(chrono::Utc::now());
    let containers: Vec<serde_json::Value> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| {
            json!({
                "name": c.name, "image": c.image, "imageID": "", "ready": true, "restartCount": 0,
                "started": true, "state": { "running": { "startedAt": now } },
            })
        })
        .collect();
    let condition =
        |kind: &str| json!({ "type": kind, "status": "True", "lastTransitionTime": now });
    let status = json!({ "metadata": { "uid": pod.metadata.uid }, "status": {
        "phase": "Running", "podIP": ip.to_string(), "podIPs": [{ "ip": ip.to_string() }],
        "hostIP": "10.0.0.1", "startTime": now,
        "conditions": [condition("PodScheduled"), condition("Initialized"), condition("ContainersReady"), condition("Ready")],
        "containerStatuses": containers,
    }});
    if patch_status(client, writes, pod, &status).await.is_err() {
        return;
    }
    {
        let started = &mut lock(state).started;
        started.running += 1;
        started.last_running = Some(Instant::now());
    }
    let Some(code) = pod
        .annotations()
        .get(EXIT_CODE)
        .and_then(|c| c.parse::<i32>().ok())
    else {
        return;
    };
    let run_ms = pod
        .annotations()
        .get(RUN_MS)
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(run_ms)).await;
    let phase = if code == 0 { "Succeeded" } else { "Failed" };
    let finished = json!({ "metadata": { "uid": pod.metadata.uid }, "status": {
        "phase": phase,
        "conditions": [{ "type": "Ready", "status": "False", "lastTransitionTime": Time(chrono::Utc::now()) }],
        "containerStatuses": pod.spec.iter().flat_map(|s| &s.containers).map(|c| json!({
            "name": c.name, "image": c.image, "imageID": "", "ready": false, "restartCount": 0,
            "state": { "terminated": { "exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" } } },
        })).collect::<Vec<_>>(),
    }});
    let _ = patch_status(client, writes, pod, &finished).await;
}

/// Merge-patches the pod's status, leaving the answer undecoded: decoding
/// every returned pod was an eighth of the simulator's CPU in the
/// scheduler benchmark.
async fn patch_status(
    client: &Client,
    writes: &Semaphore,
    pod: &Pod,
    patch: &serde_json::Value,
) -> kube::Result<()> {
    let url = Pod::url_path(&(), pod.namespace().as_deref());
    let request = kube::core::Request::new(url)
        .patch_subresource(
            "status",
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .map_err(kube::Error::BuildRequest)?;
    let _permit = writes.acquire().await;
    client.request_text(request).await.map(drop)
}
