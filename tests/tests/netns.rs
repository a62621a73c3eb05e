//! The standalone agent on a node built from network namespaces: a client
//! pod, two backend pods and an external host on veths. Real sockets, real
//! programs, the real agent binary.
//!
//! ```text
//!  c1 (10.244.0.20) ─ p-c1 ┐
//!  b1 (10.244.0.11) ─ p-b1 ├─ node ─ ext0 (192.168.77.1) ── ext (192.168.77.2)
//!  b2 (10.244.0.12) ─ p-b2 ┘         [or ext0 in bridge br0]
//! ```
//!
//! Service `web`: ClusterIP 10.96.0.10 (80/TCP, 53/UDP), NodePorts 30080
//! and 30053, backends b1 and b2. Service `outside`: NodePort 30081 and
//! external IP 192.168.78.1:80 with one backend on the external host
//! itself, behind the device its clients come in by (so it needs SNAT).
//! Service `host`: ClusterIP 10.96.0.12:80 and NodePort 30082 with one
//! backend on the node itself (host network, 192.168.77.1:9090).

use std::{collections::BTreeMap, fs, path::PathBuf, thread, time::Duration};

use dataplane_common::counters::Reason;
use wharf_tests::lab::{Lab, agent_binary, counter};

const VIP: &str = "10.96.0.10";
const NODE_IP: &str = "192.168.77.1";
const BACKENDS: [(&str, &str); 2] = [("b1", "10.244.0.11"), ("b2", "10.244.0.12")];

struct Node {
    lab: Lab,
    /// The external device the agent is given.
    ext_device: &'static str,
    node_ns: String,
    client_ns: String,
    ext_ns: String,
    node_name: String,
    manifests: PathBuf,
    agent: Option<usize>,
    agent_starts: usize,
    syncs: usize,
    probe: PathBuf,
}

/// How the node reaches the external host.
#[derive(Clone, Copy, PartialEq, Eq)]
enum External {
    /// A veth: native XDP.
    Veth,
    /// The veth enslaved to a bridge carrying the node address: a bridge
    /// has no native XDP, so TC handles NodePort alone.
    Bridge,
}

impl Node {
    fn new(test: &str) -> Self {
        Self::with(test, External::Veth)
    }

    fn with(test: &str, external: External) -> Self {
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
        lab.offloads_off(&ext_ns, "eth0");
        lab.offloads_off(&node_ns, "ext0");
        // veth delivers XDP_TX frames promptly only to a peer that runs an
        // XDP program (otherwise they wait for unrelated traffic to wake
        // the peer): give the external host an empty dataplane.
        lab.passthrough_xdp(&ext_ns, "eth0");
        lab.sysctl(&node_ns, "net.ipv4.ip_forward", "1");

        let probe = PathBuf::from(env!("CARGO_BIN_EXE_wharf-probe"));
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
        let mut node = Self {
            lab,
            ext_device,
            node_ns,
            client_ns,
            ext_ns,
            node_name,
            manifests,
            agent: None,
            agent_starts: 0,
            syncs: 0,
            probe,
        };
        node.publish(&["b1", "b2"]);
        node
    }

    /// Writes the web service's manifests with these backends ready.
    fn publish(&mut self, ready: &[&str]) {
        self.publish_with(ready, &[]);
    }

    /// Writes the web service's manifests with `ready` backends ready and
    /// `terminating` ones serving but terminating.
    fn publish_with(&mut self, ready: &[&str], terminating: &[&str]) {
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
        // Replace atomically, as deployment tools do.
        let tmp = self.lab.dir.join("web.yaml.tmp");
        fs::write(&tmp, yaml).unwrap();
        fs::rename(&tmp, self.manifests.join("web.yaml")).unwrap();
        if self.agent.is_some() {
            self.syncs += 1;
            self.lab
                .wait_for_log(&self.agent_log(), "synced", self.syncs);
        }
    }

    fn agent_log(&self) -> String {
        format!("agent-{}.log", self.agent_starts)
    }

    fn start_agent(&mut self) {
        self.agent_starts += 1;
        self.syncs = 1;
        let cgroup = self.lab.cgroup();
        let manifests = self.manifests.to_str().unwrap().to_string();
        let args = [
            "--standalone",
            "--services-from",
            &manifests,
            "--node-name",
            &self.node_name,
            "--devices",
            self.ext_device,
            "--pod-devices",
            "p-c1,p-b1,p-b2",
            "--cgroup",
            cgroup.to_str().unwrap(),
        ];
        let (ns, log) = (self.node_ns.clone(), self.agent_log());
        self.agent = Some(self.lab.spawn(&ns, false, &agent_binary(), &args, &log));
        self.lab.wait_for_log(&log, "synced", 1);
    }

    fn stop_agent(&mut self) {
        let agent = self.agent.take().expect("agent running");
        self.lab.stop(agent);
    }

    /// Runs the probe in the client pod; `socket_lb` puts it in the
    /// cgroup socket-LB is attached to.
    fn client(&mut self, socket_lb: bool, args: &[&str]) -> Vec<String> {
        let (ns, probe) = (self.client_ns.clone(), self.probe.clone());
        self.lab.run(&ns, socket_lb, &probe, args)
    }

    fn external(&mut self, args: &[&str]) -> Vec<String> {
        let (ns, probe) = (self.ext_ns.clone(), self.probe.clone());
        self.lab.run(&ns, false, &probe, args)
    }

    fn counter(&self, reason: Reason) -> u64 {
        counter(&self.node_name, reason)
    }
}

/// Responses by backend, checking every peer address is `peer`.
fn tally(lines: &[String], peer: &str) -> BTreeMap<String, usize> {
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

fn both(seen: &BTreeMap<String, usize>) {
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["b1", "b2"],
        "traffic must spread over both backends: {seen:?}"
    );
}

#[test]
fn socket_lb_translates_tcp_and_udp_at_the_socket() {
    let mut node = Node::new("sock");
    node.start_agent();
    let http = node.client(true, &["get", "10.96.0.10:80", "--count", "40"]);
    both(&tally(&http, "10.96.0.10:80"));
    let udp = node.client(true, &["udp", "10.96.0.10:53", "--count", "40"]);
    both(&tally(&udp, "10.96.0.10:53"));
    // NodePort on the node's own address, from a pod.
    let node_port = node.client(true, &["get", "192.168.77.1:30080", "--count", "40"]);
    both(&tally(&node_port, "192.168.77.1:30080"));
    assert!(node.counter(Reason::SockTranslated) >= 120);
    assert_eq!(
        node.counter(Reason::TcDnat),
        0,
        "socket-LB left nothing for per-packet NAT"
    );
}

#[test]
fn tc_translates_clients_outside_the_socket_lb_cgroup() {
    let mut node = Node::new("tc");
    node.start_agent();
    let http = node.client(false, &["get", "10.96.0.10:80", "--count", "40"]);
    both(&tally(&http, "10.96.0.10:80"));
    let udp = node.client(false, &["udp", "10.96.0.10:53", "--count", "40"]);
    both(&tally(&udp, "10.96.0.10:53"));
    assert_eq!(node.counter(Reason::SockTranslated), 0);
    assert!(node.counter(Reason::TcDnat) >= 80);
    assert!(node.counter(Reason::TcRevNat) >= 80);
}

#[test]
fn nodeport_and_cluster_ip_from_an_external_host_go_through_xdp() {
    let mut node = Node::new("xdp");
    node.start_agent();
    let http = node.external(&["get", "192.168.77.1:30080", "--count", "40"]);
    both(&tally(&http, "192.168.77.1:30080"));
    let udp = node.external(&["udp", "192.168.77.1:30053", "--count", "40"]);
    both(&tally(&udp, "192.168.77.1:30053"));
    let cluster_ip = node.external(&["get", "10.96.0.10:80", "--count", "20"]);
    both(&tally(&cluster_ip, "10.96.0.10:80"));
    assert!(
        node.counter(Reason::XdpDnat) >= 100,
        "XDP translated {}",
        node.counter(Reason::XdpDnat)
    );
}

#[test]
fn nodeport_to_a_backend_behind_the_ingress_device_is_snated_and_bounced_at_xdp() {
    let mut node = Node::new("snat");
    node.start_agent();
    let http = node.external(&["get", "192.168.77.1:30081", "--count", "20"]);
    assert_eq!(tally(&http, "192.168.77.1:30081").get("outside"), Some(&20));
    // An external IP is SNATed to the ingress device's address.
    let http = node.external(&["get", "192.168.78.1:80", "--count", "20"]);
    assert_eq!(tally(&http, "192.168.78.1:80").get("outside"), Some(&20));
    // Both directions left by XDP_TX once the neighbour was known; the
    // first packets may have been finished by TC.
    assert!(
        node.counter(Reason::XdpDnat) >= 40,
        "XDP DNAT {}",
        node.counter(Reason::XdpDnat)
    );
    assert!(
        node.counter(Reason::XdpRevNat) >= 40,
        "XDP reverse NAT {}",
        node.counter(Reason::XdpRevNat)
    );
}

#[test]
fn replies_from_a_backend_on_the_node_itself_are_reverse_natted_on_egress() {
    let mut node = Node::new("hostnet");
    let (ns, probe) = (node.node_ns.clone(), node.probe.clone());
    node.lab.spawn(
        &ns,
        false,
        &probe,
        &["serve", "node", "--http", "9090"],
        "node.log",
    );
    node.lab.wait_for_log("node.log", "serving", 1);
    node.start_agent();
    // From a pod outside the socket-LB cgroup (TC DNAT on p-c1), and from
    // the external host (XDP DNAT on ext0): the node's own process answers
    // and its reply leaves by egress.
    let from_pod = node.client(false, &["get", "10.96.0.12:80", "--count", "10"]);
    assert_eq!(tally(&from_pod, "10.96.0.12:80").get("node"), Some(&10));
    let from_outside = node.external(&["get", "192.168.77.1:30082", "--count", "10"]);
    assert_eq!(
        tally(&from_outside, "192.168.77.1:30082").get("node"),
        Some(&10)
    );
}

#[test]
fn nodeport_falls_back_to_tc_on_a_device_without_native_xdp() {
    let mut node = Node::with("bridge", External::Bridge);
    node.start_agent();
    assert!(node.lab.log(&node.agent_log()).contains("no native XDP"));
    let http = node.external(&["get", "192.168.77.1:30080", "--count", "40"]);
    both(&tally(&http, "192.168.77.1:30080"));
    let snat = node.external(&["get", "192.168.77.1:30081", "--count", "10"]);
    assert_eq!(tally(&snat, "192.168.77.1:30081").get("outside"), Some(&10));
    assert_eq!(node.counter(Reason::XdpDnat), 0);
    assert!(node.counter(Reason::TcDnat) >= 50);
}

#[test]
fn endpoint_changes_apply_and_removed_backends_leave_no_black_hole() {
    let mut node = Node::new("churn");
    node.start_agent();

    node.publish(&["b1"]);
    let only = tally(
        &node.client(false, &["get", "10.96.0.10:80", "--count", "20"]),
        "10.96.0.10:80",
    );
    assert_eq!(only.keys().collect::<Vec<_>>(), ["b1"]);
    node.publish(&["b1", "b2"]);
    both(&tally(
        &node.client(true, &["get", "10.96.0.10:80", "--count", "40"]),
        "10.96.0.10:80",
    ));

    // An invalid manifest is reported and the last good state stays.
    fs::write(
        node.manifests.join("broken.yaml"),
        "kind: Service\nmetadata: {name: x}\nspec: {clusterIP: nope}\n",
    )
    .unwrap();
    node.lab
        .wait_for_log(&node.agent_log(), "invalid manifests", 1);
    assert!(node.lab.log(&node.agent_log()).contains("broken.yaml"));
    both(&tally(
        &node.client(false, &["get", "10.96.0.10:80", "--count", "40"]),
        "10.96.0.10:80",
    ));
    fs::remove_file(node.manifests.join("broken.yaml")).unwrap();

    // A UDP flow pinned (by conntrack) to one backend moves when that
    // backend goes: the same 5-tuple must not black-hole.
    let udp = ["udp", "10.96.0.10:53", "--bind", "40053"];
    let first = node.client(false, &udp)[0]
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    let other = if first == "b1" { "b2" } else { "b1" };
    node.publish(&[other]);
    assert!(node.client(false, &udp)[0].starts_with(other));

    // Scale to zero and back, same 5-tuple again.
    node.publish(&[]);
    let (ns, probe) = (node.client_ns.clone(), node.probe.clone());
    assert!(
        !node.lab.try_run(&ns, false, &probe, &udp).status.success(),
        "no backends: no answer"
    );
    node.publish(&["b1", "b2"]);
    assert_eq!(node.client(false, &udp).len(), 1);
    assert!(node.counter(Reason::DropNoBackend) >= 1);
}

#[test]
fn terminating_backends_keep_their_connections_and_get_no_new_ones() {
    let mut node = Node::new("terminating");
    node.start_agent();
    node.publish(&["b1"]);
    let probe = node.probe.clone();
    let mut holds = Vec::new();
    for (socket_lb, log) in [(true, "hold-sock.log"), (false, "hold-tc.log")] {
        let ns = node.client_ns.clone();
        let args = [
            "hold",
            "10.96.0.10:80",
            "--duration-ms",
            "3000",
            "--interval-ms",
            "50",
        ];
        holds.push((node.lab.spawn(&ns, socket_lb, &probe, &args, log), log));
        node.lab.wait_for_log(log, "connected", 1);
    }
    thread::sleep(Duration::from_millis(300));
    node.publish_with(&["b2"], &["b1"]);
    for socket_lb in [true, false] {
        let fresh = tally(
            &node.client(socket_lb, &["get", "10.96.0.10:80", "--count", "20"]),
            "10.96.0.10:80",
        );
        assert_eq!(
            fresh.keys().collect::<Vec<_>>(),
            ["b2"],
            "new connections avoid the terminating backend"
        );
    }
    for (index, log) in holds {
        let output = node.lab.wait(index, log);
        assert!(output.contains("failed=0 backends=b1"), "{log}: {output}");
    }
}

#[test]
fn open_connections_survive_an_agent_restart() {
    let mut node = Node::new("restart");
    node.start_agent();
    let probe = node.probe.clone();
    let hold = ["hold", "--duration-ms", "4000", "--interval-ms", "50"];
    let clients = [
        (
            node.client_ns.clone(),
            true,
            "10.96.0.10:80",
            "hold-sock.log",
        ),
        (
            node.client_ns.clone(),
            false,
            "10.96.0.10:80",
            "hold-tc.log",
        ),
        (
            node.ext_ns.clone(),
            false,
            "192.168.77.1:30080",
            "hold-xdp.log",
        ),
    ];
    let mut running = Vec::new();
    for (ns, socket_lb, target, log) in &clients {
        let args = [hold[0], target, hold[1], hold[2], hold[3], hold[4]];
        running.push((node.lab.spawn(ns, *socket_lb, &probe, &args, log), *log));
        node.lab.wait_for_log(log, "connected", 1);
    }
    thread::sleep(Duration::from_millis(500));
    node.stop_agent();
    thread::sleep(Duration::from_millis(1000));
    node.start_agent();
    for (index, log) in running {
        let output = node.lab.wait(index, log);
        let summary = output
            .lines()
            .find(|l| l.starts_with("ok="))
            .unwrap_or_else(|| panic!("{log}: {output}"));
        assert!(summary.contains("failed=0"), "{log}: {output}");
        assert_eq!(
            summary
                .split("backends=")
                .nth(1)
                .map(|b| b.split(',').count()),
            Some(1),
            "{log}: {summary}"
        );
    }
}
