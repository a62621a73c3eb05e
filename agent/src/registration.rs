//! The node's presence in the cluster, as a kubelet keeps it: its Node
//! object (labels, addresses, capacity, system info, conditions) and a
//! Lease in `kube-node-lease` renewed every quarter of its duration
//! (10 s for kubelet's 40 s), which the node lifecycle controller watches.
//! The Ready condition follows the agent's own health: the node is Ready
//! once its dataplane is programmed (and while no change waits too long)
//! and the CNI plugin is configured.

use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Node, NodeCondition},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference, Time},
    chrono::{DateTime, Utc},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::telemetry::Telemetry;

/// The namespace node Leases live in.
const LEASE_NAMESPACE: &str = "kube-node-lease";

/// How often the Node's status is written when nothing in it changed, as
/// kubelet's `nodeStatusReportFrequency`: the lifecycle controller judges
/// liveness by the Lease, so this only refreshes heartbeat times.
const STATUS_REPORT_INTERVAL: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("{action} node {node}: {source}")]
    Api {
        action: &'static str,
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// What the node announces about itself.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: String,
    /// The InternalIP.
    pub address: Option<Ipv4Addr>,
    pub max_pods: u32,
    /// The Lease's duration; it is renewed every quarter of it.
    pub lease_duration: Duration,
    /// The port of the node's kubelet API (`--kubelet-bind-address`),
    /// which the API server proxies `pods/log` to.
    pub kubelet_port: u16,
}

/// How long a restarted agent leaves a live Ready=True alone while it
/// comes up (syncs, installs the CNI configuration).
const STARTUP_GRACE: Duration = Duration::from_secs(60);

/// How often the node is read and its status written while it starts.
const STARTUP_POLL: Duration = Duration::from_millis(500);

/// How long to wait before trying a failed registration again.
const REGISTER_RETRY: Duration = Duration::from_secs(5);

/// How soon a failed lease renewal is tried again (within the renewal
/// period, so a 40 s lease survives several failures in a row).
const LEASE_RETRY: Duration = Duration::from_secs(1);

/// Registers the node (retrying until the API server takes it), then
/// keeps its Lease and status current until dropped, reporting the
/// podCIDR the node IPAM assigned on `pod_cidr`. The Lease is renewed by
/// a loop of its own, each request bounded by the renewal period, so a
/// slow status write never lets it lapse.
pub async fn run(
    client: Client,
    config: NodeConfig,
    telemetry: Arc<Telemetry>,
    pod_cidr: watch::Sender<Option<String>>,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, LEASE_NAMESPACE);
    let registered = loop {
        match register(&nodes, &config).await {
            Ok(node) => break node,
            Err(error) => {
                warn!(%error, "registering the node failed; retrying");
                tokio::time::sleep(REGISTER_RETRY).await;
            }
        }
    };
    info!(node = %config.name, "registered");
    // Deleted with its Node by the garbage collector. (The API server
    // always gives a Node a uid; without one there is nothing to own.)
    let owner = registered
        .metadata
        .uid
        .clone()
        .filter(|uid| !uid.is_empty())
        .map(|uid| OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: config.name.clone(),
            uid,
            ..Default::default()
        });
    tokio::join!(
        renew_lease(&leases, &config, owner),
        report_status(&nodes, &config, &telemetry, &pod_cidr)
    );
}

/// Every quarter of the lease duration (every 500 ms while the node
/// starts, until it is Ready with a podCIDR): reads the Node and writes its
/// status when the live Ready differs from the agent's (the lifecycle
/// controller may have marked it Unknown while the agent was away) or
/// the last write is five minutes old, except that a live Ready=True is
/// left alone while the agent starts; passes the podCIDR on.
async fn report_status(
    nodes: &Api<Node>,
    config: &NodeConfig,
    telemetry: &Telemetry,
    pod_cidr: &watch::Sender<Option<String>>,
) {
    let period = config.lease_duration / 4;
    let mut written: Option<tokio::time::Instant> = None;
    let started = tokio::time::Instant::now();
    let mut been_ready = false;
    // Until the node is Ready with its podCIDR, as kubelet's fast status
    // updates at start: the podCIDR, the addresses peers route by and
    // Ready show within a second instead of a period (10 s by default).
    let mut settled = false;
    let mut first = true;
    loop {
        if !first {
            let fast = !settled && started.elapsed() < STARTUP_GRACE;
            tokio::time::sleep(if fast { STARTUP_POLL } else { period }).await;
        }
        first = false;
        let node = match nodes.get(&config.name).await {
            Ok(node) => node,
            Err(error) => {
                warn!(%error, "reading the node failed; retrying");
                continue;
            }
        };
        let cidr = node.spec.as_ref().and_then(|s| s.pod_cidr.clone());
        let has_cidr = cidr.is_some();
        pod_cidr.send_if_modified(|known| {
            let changed = *known != cidr;
            *known = cidr;
            changed
        });
        let ready = telemetry.ready();
        been_ready |= ready;
        let live = ready_status(&node);
        // A restarted agent's dataplane kept forwarding: a live Ready is
        // not taken back until the agent has been ready once, or for
        // STARTUP_GRACE at most.
        let starting = !been_ready && started.elapsed() < STARTUP_GRACE && live == Some("True");
        let differs = live != Some(if ready { "True" } else { "False" });
        let due = differs || written.is_none_or(|at| at.elapsed() >= STATUS_REPORT_INTERVAL);
        let mut current = !differs && written.is_some();
        if due && !starting {
            match write_status(nodes, config, ready, &node).await {
                Ok(()) => {
                    written = Some(tokio::time::Instant::now());
                    current = true;
                }
                Err(error) => warn!(%error, "writing node status failed; retrying"),
            }
        }
        settled = ready && has_cidr && current;
    }
}

/// Creates the Node, or brings an existing one's labels up to date.
async fn register(nodes: &Api<Node>, config: &NodeConfig) -> Result<Node, RegistrationError> {
    let error = |action| {
        let node = config.name.clone();
        move |source| RegistrationError::Api {
            action,
            node,
            source,
        }
    };
    let node = Node {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            labels: Some(labels(&config.name)),
            ..Default::default()
        },
        ..Default::default()
    };
    let node = match nodes.create(&PostParams::default(), &node).await {
        Ok(node) => node,
        Err(kube::Error::Api(response)) if response.code == 409 => nodes
            .patch(
                &config.name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "labels": labels(&config.name) } })),
            )
            .await
            .map_err(error("updating"))?,
        Err(source) => return Err(error("creating")(source)),
    };
    // Status waits for the first report: writing NotReady here would
    // flap a restarted node whose dataplane never stopped forwarding.
    Ok(node)
}

/// kubelet's well-known labels.
fn labels(name: &str) -> std::collections::BTreeMap<String, String> {
    let arch = architecture();
    [
        ("kubernetes.io/hostname", name),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", arch),
        ("beta.kubernetes.io/os", "linux"),
        ("beta.kubernetes.io/arch", arch),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Go's name for this machine's architecture, as Kubernetes labels use.
fn architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn ready_status(node: &Node) -> Option<&str> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.as_str())
}

/// Writes the status over `current`, pinned at its resourceVersion (a
/// concurrent writer makes this one fail and retry next tick, rather
/// than be overwritten).
async fn write_status(
    nodes: &Api<Node>,
    config: &NodeConfig,
    ready: bool,
    current: &Node,
) -> Result<(), RegistrationError> {
    let status = status(config, ready, Some(current), Utc::now());
    nodes
        .patch_status(
            &config.name,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": { "resourceVersion": current.metadata.resource_version },
                "status": status,
            })),
        )
        .await
        .map(drop)
        .map_err(|source| RegistrationError::Api {
            action: "writing the status of",
            node: config.name.clone(),
            source,
        })
}

/// The Node's status as this agent sees the node now; conditions keep
/// their transition times from `current` when their status is the same,
/// and conditions other writers own (NetworkUnavailable, a problem
/// detector's) are carried over: a merge patch replaces the whole list.
fn status(
    config: &NodeConfig,
    ready: bool,
    current: Option<&Node>,
    now: DateTime<Utc>,
) -> serde_json::Value {
    let previous = |type_: &str| -> Option<&NodeCondition> {
        current?
            .status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == type_)
    };
    let condition = |type_: &str, status: bool, reason: &str, message: &str| {
        let status = if status { "True" } else { "False" };
        let since = previous(type_)
            .filter(|c| c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        NodeCondition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: Some(reason.to_string()),
            message: Some(message.to_string()),
            last_heartbeat_time: Some(Time(now)),
            last_transition_time: Some(since),
        }
    };
    let (reason, message) = if ready {
        ("KubeletReady", "wharf-agent is posting ready status")
    } else {
        (
            "KubeletNotReady",
            "wharf-agent: the service proxy has not programmed the dataplane (or a change has waited over 60 s), or the CNI plugin is not configured yet",
        )
    };
    let mut conditions = vec![
        condition(
            "MemoryPressure",
            false,
            "KubeletHasSufficientMemory",
            "wharf-agent has sufficient memory available",
        ),
        condition(
            "DiskPressure",
            false,
            "KubeletHasNoDiskPressure",
            "wharf-agent has no disk pressure",
        ),
        condition(
            "PIDPressure",
            false,
            "KubeletHasSufficientPID",
            "wharf-agent has sufficient PID available",
        ),
        condition("Ready", ready, reason, message),
    ];
    let ours: Vec<String> = conditions.iter().map(|c| c.type_.clone()).collect();
    conditions.extend(
        current
            .and_then(|n| n.status.as_ref()?.conditions.clone())
            .into_iter()
            .flatten()
            .filter(|c| !ours.contains(&c.type_)),
    );
    let capacity = system::capacity(config.max_pods);
    let mut addresses = Vec::new();
    if let Some(address) = config.address {
        addresses.push(json!({ "type": "InternalIP", "address": address.to_string() }));
    }
    addresses.push(json!({ "type": "Hostname", "address": config.name }));
    json!({
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": conditions,
        "addresses": addresses,
        "daemonEndpoints": { "kubeletEndpoint": { "Port": config.kubelet_port } },
        "nodeInfo": system::info(architecture()),
    })
}

/// Renews the Lease every quarter of its duration, each try bounded by
/// that quarter; a failed try is retried after a second, from a fresh
/// read. The Lease written last is kept, so a renewal is one write.
async fn renew_lease(leases: &Api<Lease>, config: &NodeConfig, owner: Option<OwnerReference>) {
    let period = config.lease_duration / 4;
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut known: Option<Lease> = None;
    loop {
        ticker.tick().await;
        let renewal = renew_once(leases, config, owner.as_ref(), known.take());
        match tokio::time::timeout(period, renewal).await {
            Ok(Ok(lease)) => known = Some(lease),
            Ok(Err(error)) => {
                warn!(%error, "renewing the node lease failed; retrying");
                ticker.reset_after(LEASE_RETRY.min(period));
            }
            Err(_) => {
                warn!(timeout = ?period, "renewing the node lease timed out; retrying");
                ticker.reset_after(LEASE_RETRY.min(period));
            }
        }
    }
}

/// One renewal: `known` (or a fresh read) with a new renew time, written
/// at its resourceVersion, so a lost race fails rather than overwrites.
async fn renew_once(
    leases: &Api<Lease>,
    config: &NodeConfig,
    owner: Option<&OwnerReference>,
    known: Option<Lease>,
) -> Result<Lease, kube::Error> {
    let now = MicroTime(Utc::now());
    let seconds = i32::try_from(config.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let current = match known {
        Some(lease) => Some(lease),
        None => leases.get_opt(&config.name).await?,
    };
    let mut lease = current.unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(LEASE_NAMESPACE.into()),
            ..Default::default()
        },
        spec: None,
    });
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = Some(config.name.clone());
    spec.lease_duration_seconds = Some(seconds);
    spec.renew_time = Some(now);
    if let Some(owner) = owner {
        let owners = lease.metadata.owner_references.get_or_insert_with(Vec::new);
        if !owners.iter().any(|o| o.uid == owner.uid) {
            owners.push(owner.clone());
        }
    }
    if lease.metadata.resource_version.is_some() {
        leases
            .replace(&config.name, &PostParams::default(), &lease)
            .await
    } else {
        leases.create(&PostParams::default(), &lease).await
    }
}

/// What the node has, read from the system.
pub mod system {
    use std::{fs, path::Path};

    use serde_json::{Value, json};

    /// cpu, memory, ephemeral-storage (the root filesystem) and pods.
    pub fn capacity(max_pods: u32) -> Value {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let mut capacity = json!({ "cpu": cpus.to_string(), "pods": max_pods.to_string() });
        if let Some(kib) = memory_kib() {
            capacity["memory"] = json!(format!("{kib}Ki"));
        }
        if let Some(bytes) = filesystem_bytes(Path::new("/")) {
            capacity["ephemeral-storage"] = json!(bytes.to_string());
        }
        capacity
    }

    fn memory_kib() -> Option<u64> {
        let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    }

    fn filesystem_bytes(path: &Path) -> Option<u64> {
        let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
        let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `path` is a NUL-terminated string that outlives the
        // call, and `stats` points to writable memory of the right size.
        let result = unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) };
        if result != 0 {
            return None;
        }
        // SAFETY: statvfs returned 0, so it filled the whole struct.
        let stats = unsafe { stats.assume_init() };
        Some(stats.f_blocks * stats.f_frsize)
    }

    fn read_trimmed(path: &str) -> String {
        fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    /// `status.nodeInfo`.
    pub fn info(architecture: &str) -> Value {
        let os_image = fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                    .map(|v| v.trim_matches('"').to_string())
            })
            .unwrap_or_else(|| "Linux".into());
        let version = env!("CARGO_PKG_VERSION");
        json!({
            "machineID": read_trimmed("/etc/machine-id"),
            "systemUUID": read_trimmed("/sys/class/dmi/id/product_uuid"),
            "bootID": read_trimmed("/proc/sys/kernel/random/boot_id"),
            "kernelVersion": read_trimmed("/proc/sys/kernel/osrelease"),
            "osImage": os_image,
            "containerRuntimeVersion": format!("wharf://{version}"),
            // The Kubernetes API version this agent implements, and its own.
            "kubeletVersion": format!("v1.32.0-wharf.{version}"),
            "kubeProxyVersion": format!("v1.32.0-wharf.{version}"),
            "operatingSystem": "linux",
            "architecture": architecture,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NodeConfig {
        NodeConfig {
            name: "n1".into(),
            address: Some(Ipv4Addr::new(192, 168, 1, 10)),
            max_pods: 110,
            lease_duration: Duration::from_secs(40),
            kubelet_port: 10250,
        }
    }

    #[test]
    fn status_reports_capacity_addresses_and_readiness() {
        let now = Utc::now();
        let status = status(&config(), false, None, now);
        assert_eq!(status["capacity"]["pods"], "110");
        assert_eq!(status["capacity"], status["allocatable"]);
        assert!(
            status["capacity"]["cpu"]
                .as_str()
                .unwrap()
                .parse::<u32>()
                .unwrap()
                >= 1
        );
        assert!(
            status["capacity"]["memory"]
                .as_str()
                .unwrap()
                .ends_with("Ki")
        );
        assert_eq!(status["addresses"][0]["type"], "InternalIP");
        assert_eq!(status["addresses"][0]["address"], "192.168.1.10");
        assert_eq!(status["daemonEndpoints"]["kubeletEndpoint"]["Port"], 10250);
        let ready = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "KubeletNotReady");
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_it_changes() {
        let earlier = Utc::now() - k8s_openapi::chrono::Duration::minutes(5);
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1"},
            "status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": earlier.to_rfc3339()}]},
        }))
        .unwrap();
        let now = Utc::now();
        let transition = |ready| {
            let status = status(&config(), ready, Some(&node), now);
            let condition = status["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Ready")
                .unwrap()
                .clone();
            serde_json::from_value::<Time>(condition["lastTransitionTime"].clone())
                .unwrap()
                .0
        };
        assert_eq!(transition(true).timestamp(), earlier.timestamp());
        let mut watched = node.clone();
        watched
            .status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()
            .push(NodeCondition {
                type_: "NetworkUnavailable".into(),
                status: "False".into(),
                ..Default::default()
            });
        let kept = status(&config(), true, Some(&watched), now);
        assert!(
            kept["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["type"] == "NetworkUnavailable"),
            "another writer's condition survives: {kept}"
        );
        assert_eq!(transition(false).timestamp(), now.timestamp());
    }
}
