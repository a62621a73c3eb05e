//! The flat pod network across nodes: two agents in network namespaces
//! joined by an underlay, following a wharf-control on the host, each
//! installing wharf-cni and routing to the other's podCIDR; pods wired
//! by the installed plugin, and the Kubernetes network model's rules
//! checked one by one. Once with native routing, the nodes on one
//! segment; once over the VXLAN overlay, the nodes in two subnets behind
//! a router that has no route to any pod.
//!
//! ```text
//!  host ── uplink ── n1 (192.168.N.1) ── underlay ── n2 (192.168.N.2)
//!  (API)              ├ pod a          (or a router)   └ pod b
//!                     └ ext (203.0.113.2): outside the cluster
//! ```

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use serde_json::Value;
use wharf_tests::{
    cluster::{Cluster, Options, Underlay, eventually, ip},
    lab::agent_binary,
};

/// A pod on node `index`, wired by the plugin that node installed;
/// returns (namespace, address).
fn pod(cluster: &mut Cluster, index: usize, name: &str) -> (String, String) {
    let node = cluster.nodes[index].clone();
    let (node_ns, files) = (node.ns, node.files);
    let pod_ns = cluster.lab.netns(name);
    let conflist: Value = serde_json::from_str(
        &std::fs::read_to_string(files.join("cni/net.d/10-wharf.conflist")).unwrap(),
    )
    .unwrap();
    // What libcni hands a plugin: its entry plus name and version.
    let mut conf = conflist["plugins"][0].clone();
    conf["name"] = conflist["name"].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    let netns = format!("/run/netns/{pod_ns}");
    let mut child = cluster
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

#[test]
fn pods_on_two_nodes_follow_the_network_model() {
    let cluster = Cluster::new("podnet", "iptables", &["--without=scheduler"]);
    network_model(cluster, false);
}

#[test]
fn pods_on_nodes_in_two_subnets_follow_the_network_model_over_vxlan() {
    let cluster = Cluster::build(
        "podvx",
        "iptables",
        &["--without=scheduler"],
        Options {
            underlay: Underlay::Routed,
            agent_args: &["--routing=vxlan"],
            ..Options::default()
        },
    );
    network_model(cluster, true);
}

/// `bridge -n NS ARGS` output.
fn bridge(ns: &str, args: &str) -> String {
    let output = Command::new("bridge")
        .args(["-n", ns])
        .args(args.split_whitespace())
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The network model's rules, a Service across nodes, a node leaving and
/// a teardown, with native routing or over the overlay (`vxlan`).
fn network_model(mut cluster: Cluster, vxlan: bool) {
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    for name in &names {
        eventually(&format!("{name} Ready"), || {
            cluster.node_field(name, ".status.conditions[?(@.type==\"Ready\")].status") == "True"
        });
    }
    let cidr_b = cluster.node_field(&names[1], ".spec.podCIDR");
    // n1 routes n2's pods through n2, with wharf's protocol number.
    let n1 = cluster.nodes[0].ns.clone();
    let n2 = cluster.nodes[1].ns.clone();
    let n2_address = cluster.nodes[1].address.clone();
    let route_b = if vxlan {
        // Through n2's pod gateway, the first address of its /24.
        let gateway_b = format!("{}.1", cidr_b.rsplit_once('.').unwrap().0);
        format!("{cidr_b} via {gateway_b} dev wharf-vxlan proto 199 onlink")
    } else {
        format!("{cidr_b} via {n2_address} dev underlay proto 199")
    };
    eventually("n1's route to n2's pods", || {
        ip(&n1, "route").contains(&route_b)
    });
    if vxlan {
        let device = ip(&n1, "-d link show wharf-vxlan");
        assert!(
            device.contains("mtu 1450")
                && device.contains("vxlan id 1 ")
                && device.contains("dstport 8472"),
            "{device}"
        );
        assert!(
            bridge(&n1, "fdb show dev wharf-vxlan").contains(&format!("dst {n2_address}")),
            "{}",
            bridge(&n1, "fdb show dev wharf-vxlan")
        );
    }
    for node in &cluster.nodes {
        assert!(node.files.join("cni/bin/wharf-cni").exists());
    }

    let (pod_a, address_a) = pod(&mut cluster, 0, "a");
    let (pod_b, address_b) = pod(&mut cluster, 1, "b");
    // A full-sized pod packet fits the underlay once wrapped.
    let mtu = if vxlan { "mtu 1450 " } else { "mtu 1500 " };
    assert!(
        ip(&pod_a, "link show eth0").contains(mtu),
        "{}",
        ip(&pod_a, "link show eth0")
    );
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
        cluster.get(&pod_a, &n2_address),
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
    if vxlan {
        eventually("n1's forwarding entry for n2 removed", || {
            !bridge(&n1, "fdb show dev wharf-vxlan").contains(&n2_address)
        });
    }

    // --teardown takes away what the node role added: routes, the
    // egress table, the CNI configuration.
    let cidr_a = cluster.node_field(&names[0], ".spec.podCIDR");
    eventually("n2's route to n1's pods", || {
        ip(&n2, "route").contains(&cidr_a)
    });
    let node = cluster.nodes[1].clone();
    let files = node.files.clone();
    cluster.lab.stop(node.agent);
    let mut teardown = node.file_args();
    teardown.push("--teardown".into());
    let teardown: Vec<&str> = teardown.iter().map(String::as_str).collect();
    cluster.lab.run(&n2, false, &agent_binary(), &teardown);
    assert!(
        !ip(&n2, "route").contains("proto 199"),
        "{}",
        ip(&n2, "route")
    );
    assert!(!files.join("cni/net.d/10-wharf.conflist").exists());
    assert!(
        !ip(&n2, "link").contains("wharf-vxlan"),
        "{}",
        ip(&n2, "link")
    );
    let tables = Command::new("ip")
        .args(["netns", "exec", &n2, "nft", "list", "tables"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&tables.stdout).contains("wharf-egress"));
}
