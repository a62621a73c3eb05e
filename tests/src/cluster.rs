//! A two-node cluster in network namespaces: a wharf-control on the
//! host and one agent per node, the nodes joined by an underlay, plus a
//! host outside the cluster. The suites of the pod network and of pods
//! share it.
//!
//! ```text
//!  host ── uplink ── n1 (192.168.N.1) ── underlay ── n2 (192.168.N.2)
//!  (API)              └ ext (203.0.113.2): outside the cluster
//! ```
//!
//! or, with a routed underlay, the nodes in two subnets and a router
//! between them that knows nothing of pods:
//!
//! ```text
//!  n1 (192.168.N.1/25) ── r (.126 | .254) ── n2 (192.168.N.130/25)
//! ```
//!
//! N differs between the clusters of one test process, and the host
//! routes 192.168.N.0/24 through n1, so the API server reaches every
//! node's kubelet API.

use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::{
    containerd::Containerd,
    control::{ControlPlane, StoreKind},
    lab::{Lab, agent_binary, command, workspace_binary},
    node::node_files,
};

/// Waits up to 30 s for `check`.
pub fn eventually(what: &str, check: impl FnMut() -> bool) {
    eventually_within(what, Duration::from_secs(30), check);
}

/// Waits up to `limit` for `check`.
pub fn eventually_within(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what} never happened");
        thread::sleep(Duration::from_millis(100));
    }
}

/// `ip -n NS ARGS` output.
pub fn ip(ns: &str, args: &str) -> String {
    let output = Command::new("ip")
        .args(["-n", ns])
        .args(args.split_whitespace())
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// One node: its namespace, Node name, address, files and agent.
#[derive(Clone, Debug)]
pub struct NodeAgent {
    pub ns: String,
    pub name: String,
    pub address: String,
    /// The agent's files (state, CNI plugin and configuration).
    pub files: PathBuf,
    /// The node's cgroup v2 directory: its pods' cgroups, and socket-LB
    /// in eBPF mode.
    pub cgroup: PathBuf,
    /// The agent's index among the lab's processes.
    pub agent: usize,
    /// The agent's arguments.
    pub args: Vec<String>,
    /// Those past the node's names and files (routing, runtime).
    pub extra: Vec<String>,
}

impl NodeAgent {
    /// The flags naming this node's files, cgroup, routing and runtime,
    /// for `--teardown`.
    pub fn file_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--node-name={}", self.name),
            format!("--cgroup={}", self.cgroup.display()),
        ];
        args.extend(node_files(&self.files));
        args.extend(self.extra.iter().cloned());
        args
    }
}

/// How the nodes are connected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Underlay {
    /// One L2 segment.
    #[default]
    Segment,
    /// Two subnets joined by a router namespace, `r`.
    Routed,
}

/// How a cluster is built, past its proxy mode.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options<'a> {
    pub underlay: Underlay,
    /// More flags for every agent.
    pub agent_args: &'a [&'a str],
    /// Each node runs its pods with a containerd of its own, started in
    /// its namespace (`--runtime cri`).
    pub containerd: bool,
}

#[derive(Debug)]
pub struct Cluster {
    pub lab: Lab,
    pub api: ControlPlane,
    /// The namespace outside the cluster.
    pub ext: String,
    pub nodes: Vec<NodeAgent>,
}

impl Cluster {
    /// Two nodes on one segment whose agents run proxy mode `mode`;
    /// `control_args` go to wharf-control.
    pub fn new(test: &str, mode: &str, control_args: &[&str]) -> Self {
        Self::build(test, mode, control_args, Options::default())
    }

    /// Two nodes built as `options` say whose agents run proxy mode
    /// `mode`; `control_args` go to wharf-control.
    pub fn build(test: &str, mode: &str, control_args: &[&str], options: Options<'_>) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let net = 100 + NEXT.fetch_add(1, Ordering::Relaxed) % 100;
        let mut lab = Lab::new(test);
        let n1 = lab.netns("n1");
        let n2 = lab.netns("n2");
        // n2's way to n1 and the host, and the router's namespace.
        let (a1, a2, n2_gateway, router) = match options.underlay {
            Underlay::Segment => {
                let (a1, a2) = (format!("192.168.{net}.1"), format!("192.168.{net}.2"));
                lab.veth(&n1, "underlay", &n2, "underlay");
                lab.ip(&n1, &format!("addr add {a1}/24 dev underlay"));
                lab.ip(&n2, &format!("addr add {a2}/24 dev underlay"));
                (a1.clone(), a2, a1, None)
            }
            Underlay::Routed => {
                let (a1, a2) = (format!("192.168.{net}.1"), format!("192.168.{net}.130"));
                let r = lab.netns("r");
                lab.veth(&n1, "underlay", &r, "left");
                lab.veth(&r, "right", &n2, "underlay");
                lab.ip(&n1, &format!("addr add {a1}/25 dev underlay"));
                lab.ip(&r, &format!("addr add 192.168.{net}.126/25 dev left"));
                lab.ip(&r, &format!("addr add 192.168.{net}.254/25 dev right"));
                lab.ip(&n2, &format!("addr add {a2}/25 dev underlay"));
                lab.sysctl(&r, "net.ipv4.ip_forward", "1");
                lab.ip(
                    &n1,
                    &format!("route add 192.168.{net}.128/25 via 192.168.{net}.126"),
                );
                lab.ip(
                    &n2,
                    &format!("route add 192.168.{net}.0/25 via 192.168.{net}.254"),
                );
                (a1, a2, format!("192.168.{net}.254"), Some(r))
            }
        };
        let ext = lab.netns("ext");
        lab.veth(&n1, "outside", &ext, "eth0");
        lab.ip(&n1, "addr add 203.0.113.1/24 dev outside");
        lab.ip(&ext, "addr add 203.0.113.2/24 dev eth0");
        // The API server listens on the host end of n1's uplink; n2 gets
        // there through n1, which masquerades it (so the host needs no
        // route of the test's).
        let (host, inside) = lab.uplink(&n1);
        lab.sysctl(&n1, "net.ipv4.ip_forward", "1");
        lab.ip(&n2, &format!("route add {host}/32 via {n2_gateway}"));
        if let Some(router) = router {
            lab.ip(&router, &format!("route add {host}/32 via {a1}"));
        }
        lab.host_route(&format!("192.168.{net}.0/24"), inside);
        for rule in [
            "add table ip lab",
            "add chain ip lab out { type nat hook postrouting priority srcnat ; }",
            "add rule ip lab out oifname uplink masquerade",
        ] {
            let mut args = vec!["netns", "exec", &n1, "nft"];
            args.extend(rule.split(' '));
            command("ip", &args);
        }
        let api = ControlPlane::listening_on(host, StoreKind::Embedded, control_args);
        let mut cluster = Self {
            lab,
            api,
            ext,
            nodes: Vec::new(),
        };
        for (ns, address) in [(n1, a1), (n2, a2)] {
            let mut args: Vec<String> =
                options.agent_args.iter().map(ToString::to_string).collect();
            if options.containerd {
                let short = ns.rsplit('-').next().unwrap().to_string();
                let cni = cluster.lab.dir.join(&short).join("cni");
                let containerd =
                    Containerd::start(&mut cluster.lab, &ns, &cni.join("bin"), &cni.join("net.d"));
                args.push("--runtime=cri".into());
                args.push(format!(
                    "--container-runtime-endpoint={}",
                    containerd.socket.display()
                ));
                // The agents' teardowns still need it.
                cluster.lab.hold(Box::new(containerd));
            }
            cluster.start_agent(ns, address, mode, &args);
        }
        cluster
    }

    fn start_agent(&mut self, ns: String, address: String, mode: &str, extra: &[String]) {
        let short = ns.rsplit('-').next().unwrap().to_string();
        let name = self.lab.node(&short);
        let files = self.lab.dir.join(&short);
        let cgroup = self.lab.cgroup_dir(&short);
        let mut args = vec![
            format!("--proxy-mode={mode}"),
            format!("--cgroup={}", cgroup.display()),
            format!("--kubeconfig={}", self.api.kubeconfig().display()),
            format!("--node-name={name}"),
            format!("--node-ip={address}"),
            // Status every 2 s: Ready shows soon after the node is.
            "--node-lease-duration-seconds=8".into(),
        ];
        args.extend(extra.iter().cloned());
        args.extend(node_files(&files));
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = format!("{short}.log");
        let agent = self.lab.spawn(&ns, false, &agent_binary(), &arg_refs, &log);
        let node = NodeAgent {
            ns: ns.clone(),
            name,
            address,
            files,
            cgroup,
            agent,
            args,
            extra: extra.to_vec(),
        };
        // Whatever the test leaves running on the node goes with the lab.
        let mut teardown = node.file_args();
        teardown.push("--teardown".into());
        self.lab.cleanup_on_drop(&ns, &agent_binary(), teardown);
        self.nodes.push(node);
    }

    /// Starts node `index`'s agent again (after `lab.stop`), with the
    /// same arguments; its log goes to `<node>-<n>.log`.
    pub fn restart_agent(&mut self, index: usize, log: &str) {
        let node = &self.nodes[index];
        let args: Vec<&str> = node.args.iter().map(String::as_str).collect();
        let ns = node.ns.clone();
        let agent = self.lab.spawn(&ns, false, &agent_binary(), &args, log);
        self.nodes[index].agent = agent;
    }

    pub fn node_field(&self, name: &str, path: &str) -> String {
        let output =
            self.api
                .kubectl(&["get", "node", name, "-o", &format!("jsonpath={{{path}}}")]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Waits until every node reports Ready.
    pub fn wait_ready(&self) {
        for node in &self.nodes {
            eventually(&format!("{} Ready", node.name), || {
                self.node_field(
                    &node.name,
                    ".status.conditions[?(@.type==\"Ready\")].status",
                ) == "True"
            });
        }
    }

    /// Serves HTTP on port 8080 in `ns` as `name`.
    pub fn serve(&mut self, ns: &str, name: &str) {
        let log = format!("{name}-serve.log");
        self.lab.spawn(
            ns,
            false,
            &workspace_binary("wharf-probe"),
            &["serve", name, "--http", "8080"],
            &log,
        );
        self.lab.wait_for_log(&log, "serving", 1);
    }

    /// From `ns`, GET `address` (port 8080 unless it names one); (who
    /// answered, the client address it saw).
    pub fn get(&mut self, ns: &str, address: &str) -> (String, String) {
        self.try_get(ns, address)
            .unwrap_or_else(|error| panic!("GET {address} from {ns}: {error}"))
    }

    pub fn try_get(&mut self, ns: &str, address: &str) -> Result<(String, String), String> {
        let target = if address.contains(':') {
            address.to_string()
        } else {
            format!("{address}:8080")
        };
        let output = self.lab.try_run(
            ns,
            false,
            &workspace_binary("wharf-probe"),
            &["get", &target, "--client"],
        );
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let words: Vec<&str> = stdout.split_whitespace().collect();
        let client = words
            .get(2)
            .and_then(|w| w.rsplit_once(':'))
            .ok_or_else(|| format!("unexpected answer {stdout:?}"))?;
        Ok((words[0].to_string(), client.0.to_string()))
    }
}
