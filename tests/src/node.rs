//! A node built from network namespaces for the proxy suites: a client
//! pod, two backend pods and an external host on veths, the real agent
//! binary in a chosen proxy mode, real sockets.
//!
//! ```text
//!  c1 (10.244.0.20) ─ p-c1 ┐
//!  b1 (10.244.0.11) ─ p-b1 ├─ node ─ ext0 (192.168.77.1) ── ext (192.168.77.2)
//!  b2 (10.244.0.12) ─ p-b2 ┘         [or ext0 in bridge br0]
//! ```
//!
//! The agent follows the services either in manifest files (standalone
//! mode) or on a wharf-control API server (`Node::on_api`), which it
//! reaches over a veth from the host. Either way a test edits the same
//! manifests: in API mode they are applied with kubectl.
//!
//! Services (namespace `demo`):
//! - `web`: ClusterIP 10.96.0.10 (80/TCP, 53/UDP), NodePorts 30080 and
//!   30053, backends b1 and b2 (`publish` changes which).
//! - `outside`: NodePort 30081 and external IP 192.168.78.1:80, one
//!   backend on the external host itself, behind the device its clients
//!   come in by (so it needs SNAT).
//! - `host`: ClusterIP 10.96.0.12:80 and NodePort 30082, one backend on
//!   the node itself (host network, 192.168.77.1:9090).
//! - `sticky`: ClusterIP 10.96.0.20:80, sessionAffinity ClientIP, b1 and b2.
//! - `local`: NodePort 30090 (ClusterIP 10.96.0.21), externalTrafficPolicy
//!   Local; b1 runs on this node, b2 on another.
//! - `empty`: ClusterIP 10.96.0.22 (80/TCP, 53/UDP), NodePorts 30091 and
//!   30092, no endpoints.

use std::{collections::BTreeMap, fs, path::PathBuf, time::Duration};

use dataplane_common::counters::Reason;

use crate::{
    control::{ControlPlane, StoreKind},
    lab::{Lab, agent_binary, counter},
};

pub const VIP: &str = "10.96.0.10";
pub const NODE_IP: &str = "192.168.77.1";
pub const BACKENDS: [(&str, &str); 2] = [("b1", "10.244.0.11"), ("b2", "10.244.0.12")];

#[derive(Debug)]
pub struct Node {
    pub lab: Lab,
    /// The `--proxy-mode` the agent runs.
    pub mode: &'static str,
    /// The external device the agent is given.
    ext_device: &'static str,
    pub node_ns: String,
    pub client_ns: String,
    pub ext_ns: String,
    pub node_name: String,
    pub manifests: PathBuf,
    /// The API server the agent follows, when not in standalone mode.
    pub api: Option<ControlPlane>,
    /// More flags for the agent.
    pub agent_args: Vec<String>,
    agent: Option<usize>,
    agent_starts: usize,
    pub probe: PathBuf,
    /// How long to wait for one agent sync (benchmarks at 10k services
    /// in iptables mode need minutes).
    pub sync_timeout: Duration,
}

/// How the node reaches the external host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum External {
    /// A veth: native XDP.
    Veth,
    /// The veth enslaved to a bridge carrying the node address: a bridge
    /// has no native XDP, so TC handles NodePort alone.
    Bridge,
}

impl Node {
    pub fn new(test: &str, mode: &'static str) -> Self {
        Self::with(test, mode, External::Veth)
    }

    pub fn with(test: &str, mode: &'static str, external: External) -> Self {
        Self::build(test, mode, external, None)
    }

    /// A node whose agent follows a wharf-control API server (on the
    /// embedded store, with the controllers but no scheduler) instead of
    /// manifest files.
    pub fn on_api(test: &str, mode: &'static str) -> Self {
        Self::on_api_with(test, mode, &[])
    }

    /// `on_api` with extra wharf-control flags.
    pub fn on_api_with(test: &str, mode: &'static str, control_args: &[&str]) -> Self {
        Self::build(test, mode, External::Veth, Some(control_args))
    }

    fn build(
        test: &str,
        mode: &'static str,
        external: External,
        control_args: Option<&[&str]>,
    ) -> Self {
        let mut lab = Lab::new(test);
        let node_ns = lab.netns("node");
        let client_ns = lab.netns("c1");
        let ext_ns = lab.netns("ext");
        let mut pods = vec![(client_ns.clone(), "p-c1", "10.244.0.20")];
        for (name, ip) in BACKENDS {
            pods.push((
                lab.netns(name),
                if name == "b1" { "p-b1" } else { "p-b2" },
                ip,
            ));
        }
        for (ns, device, ip) in &pods {
            lab.veth(&node_ns, device, ns, "eth0");
            lab.ip(&node_ns, &format!("addr add 10.244.0.1/32 dev {device}"));
            lab.ip(&node_ns, &format!("route add {ip}/32 dev {device}"));
            lab.ip(ns, &format!("addr add {ip}/32 dev eth0"));
            lab.ip(ns, "route add 10.244.0.1 dev eth0");
            lab.ip(ns, "route add default via 10.244.0.1 dev eth0");
            // Checksums must be complete on the wire and verified on
            // receipt, or a broken rewrite would go unnoticed.
            lab.offloads_off(ns, "eth0");
            lab.offloads_off(&node_ns, device);
        }
        lab.veth(&node_ns, "ext0", &ext_ns, "eth0");
        let ext_device = match external {
            External::Veth => "ext0",
            External::Bridge => {
                lab.ip(&node_ns, "link add br0 type bridge");
                lab.ip(&node_ns, "link set ext0 master br0");
                lab.ip(&node_ns, "link set br0 up");
                "br0"
            }
        };
        lab.ip(&node_ns, &format!("addr add {NODE_IP}/24 dev {ext_device}"));
        lab.ip(&ext_ns, "addr add 192.168.77.2/24 dev eth0");
        lab.ip(&ext_ns, &format!("route add 10.96.0.0/16 via {NODE_IP}"));
        lab.ip(&ext_ns, &format!("route add 192.168.78.0/24 via {NODE_IP}"));
        // A real node's default gateway: traffic to a service address no
        // rule claims is forwarded there (rather than failing routing on
        // the node), so a mode's own rejection is what a client sees.
        lab.ip(&node_ns, "route add default via 192.168.77.2");
        lab.offloads_off(&ext_ns, "eth0");
        lab.offloads_off(&node_ns, "ext0");
        // veth delivers XDP_TX frames promptly only to a peer that runs an
        // XDP program (otherwise they wait for unrelated traffic to wake
        // the peer): in eBPF mode, give the external host an empty
        // dataplane.
        if mode == "ebpf" {
            lab.passthrough_xdp(&ext_ns, "eth0");
        }
        lab.sysctl(&node_ns, "net.ipv4.ip_forward", "1");

        let probe = crate::lab::workspace_binary("wharf-probe");
        for ((name, _), (ns, _, _)) in BACKENDS.iter().zip(&pods[1..]) {
            let log = format!("{name}.log");
            lab.spawn(
                ns,
                false,
                &probe,
                &["serve", name, "--http", "8080", "--udp", "5353"],
                &log,
            );
            lab.wait_for_log(&log, "serving", 1);
        }
        lab.spawn(
            &ext_ns,
            false,
            &probe,
            &["serve", "outside", "--http", "8080"],
            "outside.log",
        );
        lab.wait_for_log("outside.log", "serving", 1);
        let node_name = lab.node("node");
        let manifests = lab.dir.join("manifests");
        fs::create_dir_all(&manifests).unwrap();
        let api = control_args.map(|extra| {
            let (host, _) = lab.uplink(&node_ns);
            let mut args = vec!["--without=scheduler"];
            args.extend_from_slice(extra);
            let api = ControlPlane::listening_on(host, StoreKind::Embedded, &args);
            api.kubectl_ok(&["create", "namespace", "demo"]);
            // The API server's own `kubernetes` Service is part of what the
            // agent forwards: recorded (not applied) beside the test's
            // manifests, so the expected state includes it.
            let own = ["service", "endpointslice"].map(|kind| {
                api.kubectl_ok(&["get", "-n", "default", kind, "kubernetes", "-o", "yaml"])
            });
            fs::write(manifests.join("kubernetes.yaml"), own.join("---\n")).unwrap();
            api
        });
        let mut node = Self {
            lab,
            mode,
            ext_device,
            node_ns,
            client_ns,
            ext_ns,
            node_name,
            manifests,
            api,
            agent_args: Vec::new(),
            agent: None,
            agent_starts: 0,
            probe,
            sync_timeout: Duration::from_secs(20),
        };
        node.publish(&["b1", "b2"]);
        node.write_manifest("extra.yaml", &extra_services(&node.node_name));
        node
    }

    /// Replaces (or adds) a manifest file atomically, as deployment tools
    /// do (in API mode, applies it too), and waits for the agent to
    /// program it if it runs.
    pub fn write_manifest(&mut self, name: &str, yaml: &str) {
        let tmp = self.lab.dir.join(format!("{name}.tmp"));
        fs::write(&tmp, yaml).unwrap();
        let path = self.manifests.join(name);
        fs::rename(&tmp, &path).unwrap();
        if let Some(api) = &self.api {
            api.kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);
        }
        self.await_sync();
    }

    /// Removes a manifest file (in API mode, deletes its objects too) and
    /// waits for the agent to program that.
    pub fn remove_manifest(&mut self, name: &str) {
        let path = self.manifests.join(name);
        if let Some(api) = &self.api {
            api.kubectl_ok(&["delete", "-f", path.to_str().unwrap()]);
        }
        fs::remove_file(path).unwrap();
        self.await_sync();
    }

    /// Waits until the agent's last sync programmed what the manifests
    /// say: its log names each programmed state by fingerprint.
    pub fn await_sync(&mut self) {
        if self.agent.is_none() {
            return;
        }
        let expected = wharf_agent::manifest::load_path(&self.manifests, &self.node_name)
            .expect("the test's manifests are valid")
            .fingerprint();
        let needle = format!("state={expected:016x}");
        let deadline = std::time::Instant::now() + self.sync_timeout;
        loop {
            let log = self.lab.log(&self.agent_log());
            let last = log.lines().rfind(|l| l.contains(" state="));
            if last.is_some_and(|l| l.contains(&needle)) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the agent never programmed {needle}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes the web service's manifests with these backends ready.
    pub fn publish(&mut self, ready: &[&str]) {
        self.publish_with(ready, &[]);
    }

    /// Writes the web service's manifests with `ready` backends ready and
    /// `terminating` ones serving but terminating.
    pub fn publish_with(&mut self, ready: &[&str], terminating: &[&str]) {
        let endpoints: String = BACKENDS
            .iter()
            .filter_map(|(name, ip)| {
                let conditions = if ready.contains(name) {
                    "ready: true"
                } else if terminating.contains(name) {
                    "ready: false, serving: true, terminating: true"
                } else {
                    return None;
                };
                Some(format!(
                    "- addresses: [{ip}]\n  conditions: {{{conditions}}}\n"
                ))
            })
            .collect();
        let endpoints = if endpoints.is_empty() {
            "[]\n".to_string()
        } else {
            format!("\n{endpoints}")
        };
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\nspec:\n  type: NodePort\n  clusterIP: {VIP}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: 30080}}\n  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: outside, namespace: demo}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.11\n  externalIPs: [192.168.78.1]\n  ports: [{{port: 80, targetPort: 8080, nodePort: 30081}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: outside-1, namespace: demo, labels: {{kubernetes.io/service-name: outside}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [192.168.77.2]}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: host, namespace: demo}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.12\n  ports: [{{port: 80, targetPort: 9090, nodePort: 30082}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: host-1, namespace: demo, labels: {{kubernetes.io/service-name: host}}}}\naddressType: IPv4\nports: [{{port: 9090}}]\nendpoints: [{{addresses: [192.168.77.1]}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080}}\n- {{name: dns, port: 5353, protocol: UDP}}\nendpoints: {endpoints}"
        );
        self.write_manifest("web.yaml", &yaml);
    }

    /// Makes the node look like one whose rules live in iptables-legacy
    /// (one legacy rule, nothing in iptables-nft), which the iptables
    /// mode's backend detection follows.
    pub fn seed_legacy_iptables(&self) {
        crate::lab::command(
            "ip",
            &[
                "netns",
                "exec",
                &self.node_ns,
                "iptables-legacy",
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--dport",
                "9",
                "-j",
                "ACCEPT",
            ],
        );
    }

    /// The agent's sync times so far (its `elapsed_us` log figures), in
    /// order.
    pub fn sync_times_us(&self) -> Vec<u64> {
        self.lab
            .log(&self.agent_log())
            .lines()
            .filter(|l| l.contains(" synced "))
            .filter_map(|l| {
                l.split("elapsed_us=")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    pub fn agent_log(&self) -> String {
        format!("agent-{}.log", self.agent_starts)
    }

    /// Starts the agent and waits for it to program the manifests.
    pub fn start_agent(&mut self) {
        self.spawn_agent();
        self.await_sync();
    }

    /// Starts the agent without waiting for anything.
    pub fn spawn_agent(&mut self) {
        self.agent_starts += 1;
        let cgroup = self.lab.cgroup();
        let source = match &self.api {
            Some(api) => {
                let mut node = vec!["--kubeconfig".to_string(), path_string(&api.kubeconfig())];
                node.extend(node_files(&self.lab.dir));
                node
            }
            None => vec![
                "--standalone".to_string(),
                format!("--services-from={}", path_string(&self.manifests)),
            ],
        };
        let mut args = vec![
            "--proxy-mode",
            self.mode,
            "--node-name",
            &self.node_name,
            "--devices",
            self.ext_device,
            "--pod-devices",
            "p-c1,p-b1,p-b2",
            "--cgroup",
            cgroup.to_str().unwrap(),
        ];
        args.extend(source.iter().map(String::as_str));
        args.extend(self.agent_args.iter().map(String::as_str));
        let (ns, log) = (self.node_ns.clone(), self.agent_log());
        self.agent = Some(self.lab.spawn(&ns, false, &agent_binary(), &args, &log));
    }

    pub fn stop_agent(&mut self) {
        let agent = self.agent.take().expect("agent running");
        self.lab.stop(agent);
    }

    /// Runs the probe in the client pod; `socket_lb` puts it in the
    /// cgroup socket-LB is attached to.
    pub fn client(&mut self, socket_lb: bool, args: &[&str]) -> Vec<String> {
        let (ns, probe) = (self.client_ns.clone(), self.probe.clone());
        self.lab.run(&ns, socket_lb, &probe, args)
    }

    pub fn external(&mut self, args: &[&str]) -> Vec<String> {
        let (ns, probe) = (self.ext_ns.clone(), self.probe.clone());
        self.lab.run(&ns, false, &probe, args)
    }

    pub fn counter(&self, reason: Reason) -> u64 {
        counter(&self.node_name, reason)
    }
}

/// The flags that keep a node agent's files (its API socket, state, and
/// the CNI plugin and configuration it installs) under `dir`, not in the
/// host's /run, /var/lib, /opt/cni and /etc/cni.
pub fn node_files(dir: &std::path::Path) -> Vec<String> {
    vec![
        format!("--api-socket={}", path_string(&dir.join("run/agent.sock"))),
        format!("--state-dir={}", path_string(&dir.join("state"))),
        format!("--cni-bin-dir={}", path_string(&dir.join("cni/bin"))),
        format!("--cni-conf-dir={}", path_string(&dir.join("cni/net.d"))),
    ]
}

fn path_string(path: &std::path::Path) -> String {
    path.to_str().expect("UTF-8 path").to_string()
}

/// Responses by backend, checking every peer address is `peer`.
pub fn tally(lines: &[String], peer: &str) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for line in lines {
        let (backend, from) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("bad probe line {line:?}"));
        assert_eq!(
            from, peer,
            "the application must see the service address, not the backend's"
        );
        *seen.entry(backend.to_string()).or_insert(0) += 1;
    }
    seen
}

pub fn both(seen: &BTreeMap<String, usize>) {
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["b1", "b2"],
        "traffic must spread over both backends: {seen:?}"
    );
}

/// The `sticky`, `local` and `empty` services (see the module doc); `node`
/// is the agent's node name, which `local`'s first endpoint runs on.
fn extra_services(node: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: sticky, namespace: demo}}
spec:
  clusterIP: 10.96.0.20
  sessionAffinity: ClientIP
  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 60}}}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: sticky-1, namespace: demo, labels: {{kubernetes.io/service-name: sticky}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints: [{{addresses: [10.244.0.11]}}, {{addresses: [10.244.0.12]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: local, namespace: demo}}
spec:
  type: NodePort
  clusterIP: 10.96.0.21
  externalTrafficPolicy: Local
  ports: [{{port: 80, targetPort: 8080, nodePort: 30090}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: local-1, namespace: demo, labels: {{kubernetes.io/service-name: local}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
- {{addresses: [10.244.0.11], nodeName: {node}}}
- {{addresses: [10.244.0.12], nodeName: elsewhere}}
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: demo}}
spec:
  type: NodePort
  clusterIP: 10.96.0.22
  ports:
  - {{name: http, port: 80, nodePort: 30091}}
  - {{name: dns, port: 53, protocol: UDP, nodePort: 30092}}
"
    )
}
