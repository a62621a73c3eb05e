//! Where everything of a local cluster is: names, addresses and paths,
//! all derived from the cluster's name and its slot, so `down` finds
//! what `up` made from the state file alone.
//!
//! ```text
//!  host ── wh-<name> (10.251.S.1/30) ══ uplink (10.251.S.2/30)
//!                                        │   netns wharf-<name>: the underlay,
//!                                        br0 (10.250.S.1/24), routing
//!                          ┌─────────────┼─────────────┐
//!                      n1 (.11)      n2 (.12)   …  nK (.10+K)   eth0 in netns wharf-<name>-nK
//! ```
//!
//! The slot S (0–63) keeps two clusters' addresses apart. The API server
//! listens on the host end of the uplink; the host routes the underlay
//! through it, so node addresses and NodePorts are reachable from the
//! host, and nodes reach the API server through their default route.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

/// How many clusters may exist at once (the slots' address space).
pub const SLOTS: u8 = 64;
/// How many nodes a cluster may have (addresses .11 to .210).
pub const MAX_NODES: u8 = 200;
/// The API server's port on the uplink address.
pub const API_PORT: u16 = 6443;
/// Pod and Service ranges: the same in every cluster, since each
/// cluster's pods live in its own namespaces.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// A host link name is at most 15 bytes; `wh-` takes three.
const MAX_NAME: usize = 12;

/// Why a cluster name was refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "cluster name {name:?}: use 1 to {MAX_NAME} lowercase letters and digits, starting with a letter (it names host links and namespaces)"
)]
pub struct BadName {
    pub name: String,
}

/// Checks a cluster name: it becomes part of link, namespace, cgroup and
/// Node names. No dashes: `wharf-<name>-n1` must never also be another
/// cluster's underlay namespace.
pub fn check_name(name: &str) -> Result<(), BadName> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if valid {
        Ok(())
    } else {
        Err(BadName { name: name.into() })
    }
}

/// One cluster's names, addresses and paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub name: String,
    pub slot: u8,
    /// `<clusters dir>/<name>`.
    pub dir: PathBuf,
    /// The cgroup v2 directory all of the cluster's processes and pods
    /// are below.
    pub cgroup: PathBuf,
}

/// One node's names, addresses and paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLayout {
    /// `n1`, `n2`, …: the node's short name (its underlay port).
    pub short: String,
    /// The Node's name: `<cluster>-<short>`.
    pub name: String,
    pub netns: String,
    pub address: Ipv4Addr,
    /// The agent's files: socket, state, CNI binary and configuration.
    pub dir: PathBuf,
    /// The node's cgroup (`--cgroup`): socket-LB and its pods.
    pub cgroup: PathBuf,
    /// The agent process's own cgroup, a leaf below the node's.
    pub agent_cgroup: PathBuf,
}

impl Layout {
    pub fn new(name: &str, slot: u8, clusters_dir: &Path, cgroup_root: &Path) -> Self {
        Self {
            name: name.into(),
            slot,
            dir: clusters_dir.join(name),
            cgroup: cgroup_root.join("wharf").join(name),
        }
    }

    /// The underlay's namespace (the bridge joining the nodes).
    pub fn underlay_netns(&self) -> String {
        format!("wharf-{}", self.name)
    }

    /// The host end of the uplink.
    pub fn host_link(&self) -> String {
        format!("wh-{}", self.name)
    }

    /// The host's address on the uplink, where the API server listens.
    pub fn host_address(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 251, self.slot, 1)
    }

    /// The underlay namespace's address on the uplink.
    pub fn uplink_address(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 251, self.slot, 2)
    }

    /// The underlay subnet, routed from the host through the uplink.
    pub fn underlay_subnet(&self) -> String {
        format!("10.250.{}.0/24", self.slot)
    }

    /// The nodes' gateway on the underlay bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.slot, 1)
    }

    pub fn api_url(&self) -> String {
        format!("https://{}:{API_PORT}", self.host_address())
    }

    /// wharf-control's `--data-dir`.
    pub fn control_dir(&self) -> PathBuf {
        self.dir.join("control")
    }

    /// The admin kubeconfig wharf-control writes.
    pub fn kubeconfig(&self) -> PathBuf {
        self.control_dir().join("admin.kubeconfig")
    }

    pub fn etcd_dir(&self) -> PathBuf {
        self.dir.join("etcd")
    }

    /// etcd's client and peer URLs on loopback, by slot.
    pub fn etcd_urls(&self) -> (String, String) {
        let port = 23_790 + 2 * u16::from(self.slot);
        (
            format!("http://127.0.0.1:{port}"),
            format!("http://127.0.0.1:{}", port + 1),
        )
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join("cluster.json")
    }

    /// The control plane's processes' cgroup (wharf-control, etcd).
    pub fn control_cgroup(&self) -> PathBuf {
        self.cgroup.join("control")
    }

    /// Node `index` (0-based).
    pub fn node(&self, index: u8) -> NodeLayout {
        let short = format!("n{}", index + 1);
        let cgroup = self.cgroup.join(&short);
        NodeLayout {
            name: format!("{}-{short}", self.name),
            netns: format!("wharf-{}-{short}", self.name),
            address: Ipv4Addr::new(10, 250, self.slot, 11 + index),
            dir: self.dir.join("nodes").join(&short),
            agent_cgroup: cgroup.join("agent"),
            cgroup,
            short,
        }
    }
}

impl NodeLayout {
    /// The agent's flags naming the node and its files (also what
    /// `--teardown` needs).
    pub fn agent_file_args(&self) -> Vec<String> {
        let path = |p: &str| self.dir.join(p).display().to_string();
        vec![
            format!("--node-name={}", self.name),
            format!("--node-ip={}", self.address),
            // The underlay port: XDP and TC in eBPF mode, NodePorts in all.
            "--devices=eth0".into(),
            format!("--cgroup={}", self.cgroup.display()),
            format!("--api-socket={}", path("run/agent.sock")),
            format!("--state-dir={}", path("state")),
            format!("--cni-bin-dir={}", self.cni_bin().display()),
            format!("--cni-conf-dir={}", self.cni_conf().display()),
        ]
    }

    /// Where the agent installs wharf-cni (and containerd finds it).
    pub fn cni_bin(&self) -> PathBuf {
        self.dir.join("cni/bin")
    }

    /// Where the agent writes the CNI configuration.
    pub fn cni_conf(&self) -> PathBuf {
        self.dir.join("cni/net.d")
    }

    /// The node's containerd (cri runtime): configuration, root, state,
    /// socket.
    pub fn containerd_dir(&self) -> PathBuf {
        self.dir.join("containerd")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_link_names() {
        for good in ["a", "dev", "wharf2", "abcdefghijkl"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "2x", "Dev", "a_b", "a-n1", "abcdefghijklm", "a.b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let layout = Layout::new("abcdefghijkl", 0, Path::new("/c"), Path::new("/g"));
        assert!(layout.host_link().len() <= 15);
    }

    #[test]
    fn slots_and_nodes_get_distinct_addresses() {
        let a = Layout::new("a", 0, Path::new("/c"), Path::new("/g"));
        let b = Layout::new("b", 63, Path::new("/c"), Path::new("/g"));
        assert_ne!(a.host_address(), b.host_address());
        assert_ne!(a.underlay_subnet(), b.underlay_subnet());
        assert_ne!(a.etcd_urls(), b.etcd_urls());
        assert_eq!(b.node(0).address, Ipv4Addr::new(10, 250, 63, 11));
        assert_eq!(
            a.node(MAX_NODES - 1).address,
            Ipv4Addr::new(10, 250, 0, 210)
        );
        let n2 = a.node(1);
        assert_eq!(
            (n2.name.as_str(), n2.netns.as_str()),
            ("a-n2", "wharf-a-n2")
        );
        assert_eq!(n2.cgroup, Path::new("/g/wharf/a/n2"));
        assert!(n2.agent_cgroup.starts_with(&n2.cgroup));
    }
}
