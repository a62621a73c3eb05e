//! The flat pod network across nodes: two agents in network namespaces
//! joined by an underlay, following a wharf-control on the host, each
//! installing wharf-cni and routing to the other's podCIDR; pods wired
//! by the installed plugin, and the Kubernetes network model's rules
//! checked one by one.
//!
//! ```text
//!  host ── uplink ── n1 (192.168.90.1) ── underlay ── n2 (192.168.90.2)
//!  (API)              ├ pod a                          └ pod b
//!                     └ ext (203.0.113.2): outside the cluster
//! ```

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use wharf_tests::{
    control::{ControlPlane, StoreKind},
    lab::{Lab, agent_binary, command, workspace_binary},
    node::node_files,
};

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "{what} never happened");
        thread::sleep(Duration::from_millis(100));
    }
}

/// `ip -n NS ARGS` output.
fn ip(ns: &str, args: &str) -> String {
    let output = Command::new("ip")
        .args(["-n", ns])
        .args(args.split_whitespace())
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

struct Cluster {
    lab: Lab,
    api: ControlPlane,
    /// The namespace outside the cluster.
    ext: String,
    /// (namespace, node name, node address, files directory, agent)
    nodes: Vec<(String, String, &'static str, PathBuf, usize)>,
}

impl Cluster {
    fn new(test: &str) -> Self {
        let mut lab = Lab::new(test);
        let n1 = lab.netns("n1");
        let n2 = lab.netns("n2");
        lab.veth(&n1, "underlay", &n2, "underlay");
        lab.ip(&n1, "addr add 192.168.90.1/24 dev underlay");
        lab.ip(&n2, "addr add 192.168.90.2/24 dev underlay");
        let ext = lab.netns("ext");
        lab.veth(&n1, "outside", &ext, "eth0");
        lab.ip(&n1, "addr add 203.0.113.1/24 dev outside");
        lab.ip(&ext, "addr add 203.0.113.2/24 dev eth0");
        // The API server listens on the host end of n1's uplink; n2 gets
        // there through n1, which masquerades it (so the host needs no
        // route of the test's).
        let (host, _) = lab.uplink(&n1);
        lab.sysctl(&n1, "net.ipv4.ip_forward", "1");
        lab.ip(&n2, &format!("route add {host}/32 via 192.168.90.1"));
        for rule in [
            "add table ip lab",
            "add chain ip lab out { type nat hook postrouting priority srcnat ; }",
            "add rule ip lab out oifname uplink masquerade",
        ] {
            let mut args = vec!["netns", "exec", &n1, "nft"];
            args.extend(rule.split(' '));
            command("ip", &args);
        }
        let api = ControlPlane::listening_on(host, StoreKind::Embedded, &["--without=scheduler"]);
        let mut cluster = Self {
            lab,
            api,
            ext,
            nodes: Vec::new(),
        };
        for (ns, address) in [(n1, "192.168.90.1"), (n2, "192.168.90.2")] {
            cluster.start_agent(ns, address);
        }
        cluster
    }

    fn start_agent(&mut self, ns: String, address: &'static str) {
        let short = ns.rsplit('-').next().unwrap().to_string();
        let name = self.lab.node(&short);
        let files = self.lab.dir.join(&short);
        let mut args = vec![
            "--proxy-mode=iptables".to_string(),
            format!("--kubeconfig={}", self.api.kubeconfig().display()),
            format!("--node-name={name}"),
            format!("--node-ip={address}"),
            // Status every 2 s: Ready shows soon after the node is.
            "--node-lease-duration-seconds=8".into(),
        ];
        args.extend(node_files(&files));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = format!("{short}.log");
        let agent = self.lab.spawn(&ns, false, &agent_binary(), &args, &log);
        self.nodes.push((ns, name, address, files, agent));
    }

    fn node_field(&self, name: &str, path: &str) -> String {
        let output =
            self.api
                .kubectl(&["get", "node", name, "-o", &format!("jsonpath={{{path}}}")]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A pod on node `index`, wired by the plugin that node installed;
    /// returns (namespace, address).
    fn pod(&mut self, index: usize, name: &str) -> (String, String) {
        let (node_ns, _, _, files, _) = self.nodes[index].clone();
        let pod_ns = self.lab.netns(name);
        let conflist: Value = serde_json::from_str(
            &std::fs::read_to_string(files.join("cni/net.d/10-wharf.conflist")).unwrap(),
        )
        .unwrap();
        // What libcni hands a plugin: its entry plus name and version.
        let mut conf = conflist["plugins"][0].clone();
        conf["name"] = conflist["name"].clone();
        conf["cniVersion"] = conflist["cniVersion"].clone();
        let netns = format!("/run/netns/{pod_ns}");
        let mut child = self
            .lab
            .command(&node_ns, false, &files.join("cni/bin/wharf-cni"), &[])
            .env_clear()
            .envs([
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", name),
                ("CNI_NETNS", netns.as_str()),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/opt/cni/bin"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "ADD failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let result: Value = serde_json::from_slice(&output.stdout).unwrap();
        let address = result["ips"][0]["address"].as_str().unwrap();
        let address = address.split('/').next().unwrap().to_string();
        (pod_ns, address)
    }

    /// Serves HTTP on port 8080 in `ns` as `name`.
    fn serve(&mut self, ns: &str, name: &str) {
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
    fn get(&mut self, ns: &str, address: &str) -> (String, String) {
        self.try_get(ns, address)
            .unwrap_or_else(|error| panic!("GET {address} from {ns}: {error}"))
    }

    fn try_get(&mut self, ns: &str, address: &str) -> Result<(String, String), String> {
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

#[test]
fn pods_on_two_nodes_follow_the_network_model() {
    let mut cluster = Cluster::new("podnet");
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.1.clone()).collect();
    for name in &names {
        eventually(&format!("{name} Ready"), || {
            cluster.node_field(name, ".status.conditions[?(@.type==\"Ready\")].status") == "True"
        });
    }
    let cidr_b = cluster.node_field(&names[1], ".spec.podCIDR");
    // n1 routes n2's pods through n2, with wharf's protocol number.
    let n1 = cluster.nodes[0].0.clone();
    let n2 = cluster.nodes[1].0.clone();
    eventually("n1's route to n2's pods", || {
        ip(&n1, "route").contains(&format!("{cidr_b} via 192.168.90.2 dev underlay proto 199"))
    });
    for (_, _, _, files, _) in &cluster.nodes {
        assert!(files.join("cni/bin/wharf-cni").exists());
    }

    let (pod_a, address_a) = cluster.pod(0, "a");
    let (pod_b, address_b) = cluster.pod(1, "b");
    cluster.serve(&pod_b, "b");
    cluster.serve(&pod_a, "a");
    cluster.serve(&n2, "n2");

    // 1. Pods reach pods on other nodes without NAT: b sees a's own
    //    address.
    assert_eq!(
        cluster.get(&pod_a, &address_b),
        ("b".into(), address_a.clone())
    );
    assert_eq!(
        cluster.get(&pod_b, &address_a),
        ("a".into(), address_b.clone())
    );
    // 2. Nodes reach every pod, their own and the other node's.
    assert_eq!(cluster.get(&n1, &address_b).0, "b");
    assert_eq!(cluster.get(&n2, &address_a).0, "a");
    // 3. Pods reach other nodes, which see the pod's own address.
    assert_eq!(
        cluster.get(&pod_a, "192.168.90.2"),
        ("n2".into(), address_a.clone())
    );

    // 4. Egress to outside the cluster is masqueraded: the outside has
    //    no route to pods.
    let ext = cluster.ext.clone();
    cluster.serve(&ext, "ext");
    assert_eq!(
        cluster.get(&pod_a, "203.0.113.2"),
        ("ext".into(), "203.0.113.1".into())
    );

    // A Service with a backend on each node, reached from pods on both
    // nodes (iptables mode): spread over both, and the other node's
    // backend sees the client pod's own address.
    cluster.api.apply(&format!(
        "apiVersion: v1
kind: Service
metadata: {{name: both, namespace: default}}
spec:
  clusterIP: 10.96.0.50
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: both-1, namespace: default, labels: {{kubernetes.io/service-name: both}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints: [{{addresses: [{address_a}]}}, {{addresses: [{address_b}]}}]
"
    ));
    for (client, name, address) in [(&pod_a, "a", &address_a), (&pod_b, "b", &address_b)] {
        let mut seen = std::collections::BTreeSet::new();
        // Until the agents have synced the Service, nothing routes it.
        eventually("both backends through the ClusterIP", || {
            if let Ok((backend, source)) = cluster.try_get(client, "10.96.0.50:80") {
                // A pod sent to itself is masqueraded (hairpin), as
                // kube-proxy does, or its reply would skip the NAT.
                if backend != name {
                    assert_eq!(&source, address, "no NAT between pods");
                }
                seen.insert(backend);
            }
            seen.len() == 2
        });
    }

    // A node that leaves takes its route with it.
    cluster.api.kubectl_ok(&["delete", "node", &names[1]]);
    eventually("n1's route to n2's pods removed", || {
        !ip(&n1, "route").contains(&cidr_b)
    });

    // --teardown takes away what the node role added: routes, the
    // egress table, the CNI configuration.
    let cidr_a = cluster.node_field(&names[0], ".spec.podCIDR");
    eventually("n2's route to n1's pods", || {
        ip(&n2, "route").contains(&cidr_a)
    });
    let (_, name, _, files, agent) = cluster.nodes[1].clone();
    cluster.lab.stop(agent);
    let conf_dir = format!("--cni-conf-dir={}", files.join("cni/net.d").display());
    let name = format!("--node-name={name}");
    cluster.lab.run(
        &n2,
        false,
        &agent_binary(),
        &[&name, &conf_dir, "--teardown"],
    );
    assert!(
        !ip(&n2, "route").contains("proto 199"),
        "{}",
        ip(&n2, "route")
    );
    assert!(!files.join("cni/net.d/10-wharf.conflist").exists());
    let tables = Command::new("ip")
        .args(["netns", "exec", &n2, "nft", "list", "tables"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&tables.stdout).contains("wharf-egress"));
}
