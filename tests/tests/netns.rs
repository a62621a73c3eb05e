//! The eBPF mode's own paths on a node built from network namespaces
//! (`wharf_tests::node`): socket-LB, TC, XDP, SNAT bounced at XDP, the
//! bridge fallback and restarts, read back through the datapath counters.
//! What every mode must do alike is in `conformance.rs`.

use std::{thread, time::Duration};

use dataplane_common::counters::Reason;
use wharf_tests::node::{External, Node, both, tally};

#[test]
fn socket_lb_translates_tcp_and_udp_at_the_socket() {
    let mut node = Node::new("sock", "ebpf");
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
    let mut node = Node::new("tc", "ebpf");
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
    let mut node = Node::new("xdp", "ebpf");
    node.start_agent();
    let http = node.external(&["get", "192.168.77.1:30080", "--count", "40"]);
    both(&tally(&http, "192.168.77.1:30080"));
    let udp = node.external(&["udp", "192.168.77.1:30053", "--count", "40"]);
    both(&tally(&udp, "192.168.77.1:30053"));
    let cluster_ip = node.external(&["get", "10.96.0.10:80", "--count", "20"]);
    both(&tally(&cluster_ip, "10.96.0.10:80"));
    // XDP translates what it passes up only where it can mark it for TC;
    // elsewhere TC does (`xdp_metadata_supported`).
    let translator = if wharf_agent::ebpf::xdp_metadata_supported() {
        Reason::XdpDnat
    } else {
        Reason::TcDnat
    };
    assert!(
        node.counter(translator) >= 100,
        "{translator:?} translated {}",
        node.counter(translator)
    );
}

#[test]
fn nodeport_to_a_backend_behind_the_ingress_device_is_snated_and_bounced_at_xdp() {
    let mut node = Node::new("snat", "ebpf");
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
    let mut node = Node::new("hostnet", "ebpf");
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
    let mut node = Node::with("bridge", "ebpf", External::Bridge);
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
fn open_connections_survive_an_agent_restart() {
    let mut node = Node::new("restart", "ebpf");
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
