//! One behaviour, every proxy mode: the same Services on the same
//! network-namespace node (`wharf_tests::node`), checked only through what
//! clients and backends observe. Each case runs once per mode that has it,
//! with the services in manifest files (`files::`), and again for the
//! eBPF and iptables modes with the agent following an API server
//! (`api::`); the tables at the bottom say which.

use std::{fs, process::Command, thread, time::Duration};

use wharf_tests::{
    node::{Node, both, tally},
    vm,
};

/// Responses by backend, not checking peers (affinity and policy cases).
fn backends(lines: &[String]) -> Vec<String> {
    let mut seen: Vec<String> = lines
        .iter()
        .map(|l| l.split(' ').next().unwrap_or_default().to_string())
        .collect();
    seen.sort();
    seen.dedup();
    seen
}

/// A proxy mode, and where the agent reads services from.
#[derive(Clone, Copy, Debug)]
struct Setup {
    mode: &'static str,
    api: bool,
}

fn started(case: &str, setup: Setup) -> Node {
    let name = format!(
        "{}{}-{case}",
        if setup.api { "a" } else { "" },
        &setup.mode[..3]
    );
    let mut node = if setup.api {
        Node::on_api(&name, setup.mode)
    } else {
        Node::new(&name, setup.mode)
    };
    node.start_agent();
    node
}

/// ClusterIP and NodePort, TCP and UDP, from a pod and from outside: every
/// request answered, spread over both backends.
fn spread(setup: Setup) {
    let mut node = started("spread", setup);
    both(&tally(
        &node.client(true, &["get", "10.96.0.10:80", "--count", "40"]),
        "10.96.0.10:80",
    ));
    both(&tally(
        &node.client(true, &["udp", "10.96.0.10:53", "--count", "40"]),
        "10.96.0.10:53",
    ));
    both(&tally(
        &node.external(&["get", "192.168.77.1:30080", "--count", "40"]),
        "192.168.77.1:30080",
    ));
    both(&tally(
        &node.external(&["udp", "192.168.77.1:30053", "--count", "40"]),
        "192.168.77.1:30053",
    ));
    both(&tally(
        &node.external(&["get", "10.96.0.10:80", "--count", "20"]),
        "10.96.0.10:80",
    ));
}

/// sessionAffinity ClientIP: every new connection from one client goes to
/// the backend its first one went to.
fn affinity(setup: Setup) {
    let mut node = started("affinity", setup);
    let seen = backends(&node.client(true, &["get", "10.96.0.20:80", "--count", "30"]));
    assert_eq!(seen.len(), 1, "one client, one backend: {seen:?}");
    // The web service has no affinity: the same client spreads.
    both(&tally(
        &node.client(true, &["get", "10.96.0.10:80", "--count", "40"]),
        "10.96.0.10:80",
    ));
}

/// externalTrafficPolicy Local: NodePort traffic goes only to this node's
/// endpoint, and the backend sees the client's own address.
fn local_policy(setup: Setup) {
    let mut node = started("local", setup);
    let lines = node.external(&["get", "192.168.77.1:30090", "--count", "20", "--client"]);
    for line in &lines {
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(words[0], "b1", "only the local endpoint: {lines:?}");
        assert!(
            words[2].starts_with("192.168.77.2:"),
            "the client address is kept: {line}"
        );
    }
    // Its ClusterIP (internal policy Cluster) still uses both.
    both(&tally(
        &node.client(true, &["get", "10.96.0.21:80", "--count", "40"]),
        "10.96.0.21:80",
    ));
}

/// A service without endpoints is refused at once (ICMP port unreachable
/// or RST), never left to time out.
fn no_endpoints(setup: Setup) {
    let mut node = started("empty", setup);
    let (client, external, probe) = (
        node.client_ns.clone(),
        node.ext_ns.clone(),
        node.probe.clone(),
    );
    for (ns, args) in [
        (&client, ["get", "10.96.0.22:80", ""]),
        (&client, ["udp", "10.96.0.22:53", "--connect"]),
        (&external, ["get", "192.168.77.1:30091", ""]),
        (&external, ["udp", "192.168.77.1:30092", "--connect"]),
    ] {
        let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
        let output = node.lab.try_run(ns, true, &probe, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} answered");
        assert!(
            stderr.contains("refused"),
            "{args:?} must be refused, not time out: {stderr}"
        );
    }
}

/// Endpoints come and go while clients connect: new connections follow the
/// latest endpoints at once, open connections to a terminating backend
/// carry on, and an invalid manifest changes nothing.
fn churn(setup: Setup) {
    let mut node = started("churn", setup);
    node.publish(&["b1"]);
    let only = backends(&node.client(true, &["get", "10.96.0.10:80", "--count", "20"]));
    assert_eq!(only, ["b1"]);

    let probe = node.probe.clone();
    let ns = node.client_ns.clone();
    let hold = [
        "hold",
        "10.96.0.10:80",
        "--duration-ms",
        "3000",
        "--interval-ms",
        "50",
    ];
    let held = node.lab.spawn(&ns, true, &probe, &hold, "hold.log");
    node.lab.wait_for_log("hold.log", "connected", 1);
    thread::sleep(Duration::from_millis(300));
    node.publish_with(&["b2"], &["b1"]);
    let fresh = backends(&node.client(true, &["get", "10.96.0.10:80", "--count", "20"]));
    assert_eq!(
        fresh,
        ["b2"],
        "new connections avoid the terminating backend"
    );
    let output = node.lab.wait(held, "hold.log");
    assert!(output.contains("failed=0 backends=b1"), "{output}");

    node.publish(&["b2"]);
    let after = backends(&node.client(true, &["get", "10.96.0.10:80", "--count", "20"]));
    assert_eq!(after, ["b2"], "nothing reaches a removed backend");

    if setup.api {
        // The API server refuses invalid objects itself.
        return;
    }
    // An invalid manifest is reported and the last good state stays.
    fs::write(
        node.manifests.join("broken.yaml"),
        "kind: Service\nmetadata: {name: x}\nspec: {clusterIP: nope}\n",
    )
    .unwrap();
    node.lab
        .wait_for_log(&node.agent_log(), "invalid manifests", 1);
    assert!(node.lab.log(&node.agent_log()).contains("broken.yaml"));
    fs::remove_file(node.manifests.join("broken.yaml")).unwrap();
    node.publish(&["b1", "b2"]);
    both(&tally(
        &node.client(true, &["get", "10.96.0.10:80", "--count", "40"]),
        "10.96.0.10:80",
    ));
}

/// One UDP 5-tuple across backend removal, scale to zero and back: it is
/// never stuck on a backend that is gone.
fn udp_scale(setup: Setup) {
    let mut node = started("udp", setup);
    let udp = ["udp", "10.96.0.10:53", "--bind", "40053"];
    let first = backends(&node.client(true, &udp))[0].clone();
    let other = if first == "b1" { "b2" } else { "b1" };
    node.publish(&[other]);
    assert_eq!(backends(&node.client(true, &udp)), [other]);

    node.publish(&[]);
    let (ns, probe) = (node.client_ns.clone(), node.probe.clone());
    assert!(
        !node.lab.try_run(&ns, true, &probe, &udp).status.success(),
        "no backends: no answer"
    );
    node.publish(&[&first]);
    assert_eq!(backends(&node.client(true, &udp)), [first]);
}

/// A deleted service stops answering; the others carry on.
fn deletion(setup: Setup) {
    let mut node = started("delete", setup);
    assert_eq!(
        node.client(true, &["get", "10.96.0.20:80"]).len(),
        1,
        "answers before"
    );
    node.remove_manifest("extra.yaml");
    let (ns, probe) = (node.client_ns.clone(), node.probe.clone());
    assert!(
        !node
            .lab
            .try_run(&ns, true, &probe, &["get", "10.96.0.20:80"])
            .status
            .success(),
        "a deleted service must not answer"
    );
    both(&tally(
        &node.client(true, &["get", "10.96.0.10:80", "--count", "40"]),
        "10.96.0.10:80",
    ));
}

macro_rules! conformance {
    ($api:literal; $($(#[$attribute:meta])* $mode:ident: [$($case:ident),* $(,)?];)*) => {
        $(mod $mode {
            conformance!(@cases $api $mode [$(#[$attribute])*] $($case)*);
        })*
    };
    (@cases $api:literal $mode:ident $attributes:tt $($case:ident)*) => {
        $(conformance!(@case $api $mode $attributes $case);)*
    };
    (@case $api:literal $mode:ident [$(#[$attribute:meta])*] $case:ident) => {
        #[test]
        $(#[$attribute])*
        fn $case() {
            super::super::$case(super::super::Setup { mode: stringify!($mode), api: $api });
        }
    };
}

mod files {
    conformance! {
        false;
        ebpf: [spread, affinity, local_policy, no_endpoints, churn, udp_scale, deletion];
        iptables: [spread, affinity, local_policy, no_endpoints, churn, udp_scale, deletion];
        nftables: [spread, affinity, local_policy, no_endpoints, churn, udp_scale, deletion];
        // This host's kernel has no IPVS: `ipvs_in_a_vm` runs these there.
        #[ignore = "needs a kernel with IPVS; ipvs_in_a_vm runs them in a VM"]
        ipvs: [spread, affinity, local_policy, no_endpoints, churn, udp_scale, deletion];
    }
}

/// The kube-proxy replacement: the same cases, the agent following an API
/// server.
mod api {
    conformance! {
        true;
        ebpf: [spread, affinity, local_policy, no_endpoints, churn, udp_scale, deletion];
        iptables: [spread, local_policy, churn, deletion];
    }
}

/// Runs a rule-listing tool inside the node's network namespace.
fn listing(node: &Node, program: &str, args: &[&str]) -> String {
    let output = Command::new("ip")
        .args(["netns", "exec", &node.node_ns, program])
        .args(args)
        .output()
        .expect("listing");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Restarting the agent in another mode removes the previous mode's state
/// and forwards just the same.
#[test]
fn switching_modes_removes_the_previous_modes_state() {
    let mut node = Node::new("switch", "iptables");
    let pins = wharf_agent::ebpf::Dataplane::pin_dir(
        std::path::Path::new(wharf_tests::fixture::BPFFS),
        &node.node_name,
    );
    for mode in ["iptables", "nftables", "ebpf", "iptables"] {
        node.mode = mode;
        node.start_agent();
        both(&tally(
            &node.client(true, &["get", "10.96.0.10:80", "--count", "40"]),
            "10.96.0.10:80",
        ));
        let iptables = listing(&node, "iptables-nft-save", &[]);
        let nft = listing(&node, "nft", &["list", "tables"]);
        assert_eq!(
            iptables.contains("WHARF-SERVICES"),
            mode == "iptables",
            "{mode}: {iptables}"
        );
        assert_eq!(
            nft.contains("table ip wharf"),
            mode == "nftables",
            "{mode}: {nft}"
        );
        assert_eq!(pins.exists(), mode == "ebpf", "{mode}: {}", pins.display());
        node.stop_agent();
    }
}

/// On a node whose rules live in iptables-legacy, the iptables mode
/// writes there too.
#[test]
fn iptables_mode_uses_the_backend_the_node_already_uses() {
    let mut node = Node::new("legacy", "iptables");
    node.seed_legacy_iptables();
    node.start_agent();
    assert!(node.lab.log(&node.agent_log()).contains("Legacy"));
    both(&tally(
        &node.client(true, &["get", "10.96.0.10:80", "--count", "40"]),
        "10.96.0.10:80",
    ));
    assert!(listing(&node, "iptables-legacy-save", &[]).contains("WHARF-SERVICES"));
    assert!(!listing(&node, "iptables-nft-save", &[]).contains("WHARF-SERVICES"));
}

/// The IPVS mode's cases, run by this very test binary inside a VM booted
/// from Debian's kernel (this host's has no IPVS).
#[test]
fn ipvs_in_a_vm() {
    let run = vm::run(
        &vm::for_this_binary("conformance").env("RUST_BACKTRACE", "1"),
        "/wharf/deps/conformance --include-ignored --test-threads 1 ipvs:: switching_from_ipvs\n",
        Duration::from_secs(900),
    );
    assert_eq!(
        run.status, 0,
        "the IPVS cases failed in the VM:\n{}",
        run.console
    );
    assert!(
        run.console.contains("test result: ok. 8 passed"),
        "{}",
        run.console
    );
}

/// Restarting the agent out of IPVS mode removes its virtual servers,
/// dummy device and masquerade table, and back into it removes the
/// nftables mode's table (`ipvs_in_a_vm` runs it in the VM).
#[test]
#[ignore = "needs a kernel with IPVS; ipvs_in_a_vm runs it in a VM"]
fn switching_from_ipvs_removes_its_state() {
    let mut node = Node::new("ipvs-switch", "ipvs");
    for mode in ["ipvs", "nftables", "ipvs"] {
        node.mode = mode;
        node.start_agent();
        both(&tally(
            &node.client(true, &["get", "10.96.0.10:80", "--count", "40"]),
            "10.96.0.10:80",
        ));
        let virtual_servers = listing(&node, "ipvsadm", &["-Ln"]);
        assert_eq!(
            virtual_servers.contains("10.96.0.10:80"),
            mode == "ipvs",
            "{mode}: {virtual_servers}"
        );
        let tables = listing(&node, "nft", &["list", "tables"]);
        let has = |table: &str| tables.lines().any(|l| l.trim() == table);
        assert_eq!(
            has("table ip wharf-ipvs"),
            mode == "ipvs",
            "{mode}: {tables}"
        );
        assert_eq!(
            has("table ip wharf"),
            mode == "nftables",
            "{mode}: {tables}"
        );
        let device = listing(&node, "ip", &["link", "show"]);
        assert_eq!(
            device.contains("wharf-ipvs0"),
            mode == "ipvs",
            "{mode}: {device}"
        );
        node.stop_agent();
    }
}
