//! The agent as a kube-proxy replacement: following a wharf-control API
//! server whose EndpointSlice controller writes the slices, exposing
//! metrics and health, and never pruning the dataplane while it cannot
//! see the API server. (The per-mode forwarding cases in API mode are in
//! `conformance.rs`, under `api::`.)

use std::{path::Path, thread, time::Duration, time::Instant};

use wharf_tests::node::{Node, both, tally};

/// `curl -s` inside the node's namespace; (HTTP code, body).
fn curl(node: &mut Node, url: &str) -> (String, String) {
    let ns = node.node_ns.clone();
    let output = node.lab.try_run(
        &ns,
        false,
        Path::new("curl"),
        &["-s", "-w", "\n%{http_code}", "--max-time", "5", url],
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

/// The value of an unlabelled sample in a Prometheus text page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "{what} never happened");
        thread::sleep(Duration::from_millis(100));
    }
}

/// A Service with a selector and a pod that becomes Ready: the controller
/// writes the slice with its trigger time, the agent forwards to the pod
/// and times the change from the pod's readiness to programmed.
#[test]
fn endpoints_from_the_controller_are_programmed_and_timed() {
    let mut node = Node::on_api("api-timed", "ebpf");
    node.start_agent();
    let api = node.api.as_ref().expect("API mode");
    api.apply(
        "apiVersion: v1
kind: Service
metadata: {name: selected, namespace: demo}
spec:
  clusterIP: 10.96.0.30
  selector: {app: selected}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: selected-b1, namespace: demo, labels: {app: selected}}
spec:
  containers: [{name: web, image: wharf-probe}]
",
    );
    // What a kubelet reports once b1's probe passes: b1 is the pod.
    let ready_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    api.kubectl_ok(&[
        "patch",
        "pod",
        "selected-b1",
        "-n",
        "demo",
        "--subresource=status",
        "--type=merge",
        "-p",
        &format!(
            r#"{{"status":{{"phase":"Running","podIP":"10.244.0.11","podIPs":[{{"ip":"10.244.0.11"}}],"conditions":[{{"type":"Ready","status":"True","lastTransitionTime":"{ready_at}"}}]}}}}"#
        ),
    ]);
    eventually("a response from the selected pod", || {
        let (ns, probe) = (node.client_ns.clone(), node.probe.clone());
        let output = node
            .lab
            .try_run(&ns, true, &probe, &["get", "10.96.0.30:80"]);
        String::from_utf8_lossy(&output.stdout).starts_with("b1 ")
    });
    let (code, page) = curl(&mut node, "http://127.0.0.1:10249/metrics");
    assert_eq!(code, "200", "{page}");
    let timed = sample(&page, "wharf_network_programming_duration_seconds_count").unwrap_or(0.0);
    assert!(timed >= 1.0, "the change was timed: {page}");
    let syncs = sample(&page, "wharf_sync_proxy_rules_duration_seconds_count").unwrap_or(0.0);
    assert!(syncs >= 2.0, "{page}");
    assert!(
        page.contains("wharf_proxy_frontends"),
        "frontends are counted: {page}"
    );

    let (code, body) = curl(&mut node, "http://127.0.0.1:10256/healthz");
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("\"lastUpdated\":\"20"), "{body}");
}

/// With the API server gone, a restarted agent leaves the dataplane as it
/// was (it cannot know what to prune) and catches up when the server is
/// back.
#[test]
fn nothing_is_pruned_while_the_api_server_is_away() {
    let mut node = Node::on_api("api-away", "ebpf");
    node.start_agent();
    node.stop_agent();
    node.api.as_mut().expect("API mode").kill();
    node.spawn_agent();
    // The agent is up and has tried the API server more than once.
    node.lab.wait_for_log(&node.agent_log(), "watch failed", 6);
    assert!(
        !node.lab.log(&node.agent_log()).contains(" synced "),
        "no sync without the API server"
    );
    both(&tally(
        &node.client(true, &["get", "10.96.0.10:80", "--count", "40"]),
        "10.96.0.10:80",
    ));

    node.api.as_mut().expect("API mode").restart();
    // kube-rs backs off failed watches, with jitter, up to about a minute.
    node.sync_timeout = Duration::from_secs(90);
    node.await_sync();
    node.publish(&["b2"]);
    let seen = tally(
        &node.client(true, &["get", "10.96.0.10:80", "--count", "20"]),
        "10.96.0.10:80",
    );
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["b2"]);
}

/// The Ready condition's status on node `name`, read with kubectl.
fn node_ready(node: &Node) -> String {
    let api = node.api.as_ref().expect("API mode");
    let output = api.kubectl(&[
        "get",
        "node",
        &node.node_name,
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
    ]);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The agent registers its Node (labels, address, capacity, Ready once
/// the dataplane is programmed) and renews its Lease; stopped, the node
/// goes Unknown; restarted, Ready again.
#[test]
fn the_agent_registers_its_node_and_keeps_it_ready() {
    let mut node = Node::on_api_with("api-node", "iptables", &["--node-monitor-grace-period=4"]);
    // A 4 s lease, renewed every second.
    node.agent_args = vec!["--node-lease-duration-seconds=4".into()];
    node.start_agent();
    eventually("Ready=True", || node_ready(&node) == "True");
    let api = node.api.as_ref().expect("API mode");
    let get = |path: &str| {
        api.kubectl_ok(&[
            "get",
            "node",
            &node.node_name,
            "-o",
            &format!("jsonpath={{{path}}}"),
        ])
    };
    assert_eq!(
        get(".metadata.labels.kubernetes\\.io/hostname"),
        node.node_name
    );
    assert_eq!(get(".metadata.labels.kubernetes\\.io/os"), "linux");
    assert_eq!(
        get(".status.addresses[?(@.type==\"InternalIP\")].address"),
        "192.168.77.1"
    );
    assert_eq!(get(".status.capacity.pods"), "110");
    assert!(get(".status.capacity.memory").ends_with("Ki"));
    assert_eq!(get(".status.daemonEndpoints.kubeletEndpoint.Port"), "10250");
    let renewed = || {
        api.kubectl_ok(&[
            "get",
            "lease",
            "-n",
            "kube-node-lease",
            &node.node_name,
            "-o",
            "jsonpath={.spec.renewTime}",
        ])
    };
    let first = renewed();
    eventually("a lease renewal", || renewed() != first);

    // The node IPAM gave the node a podCIDR; the agent hands out pod
    // addresses from it on its socket.
    eventually("a podCIDR", || !get(".spec.podCIDR").is_empty());
    let pod_cidr = get(".spec.podCIDR");
    // Once set, it stays: pods are addressed from it, peers route it.
    let moved = api.kubectl(&[
        "patch",
        "node",
        &node.node_name,
        "--type=merge",
        "-p",
        r#"{"spec":{"podCIDR":"10.244.99.0/24","podCIDRs":["10.244.99.0/24"]}}"#,
    ]);
    assert!(!moved.status.success());
    assert!(
        String::from_utf8_lossy(&moved.stderr).contains("may not change podCIDR"),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    assert_eq!(get(".spec.podCIDR"), pod_cidr);
    let socket = node.lab.dir.join("run/agent.sock");
    let status = api.runtime().block_on(async {
        let mut client = wharf_proto::connect(&socket).await.expect("agent API").ipam;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match client.status(wharf_proto::StatusRequest {}).await {
                Ok(status) => break status.into_inner(),
                Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    });
    assert_eq!(status.pod_cidr, pod_cidr);
    assert_eq!(status.capacity, 253);

    node.stop_agent();
    eventually("Ready=Unknown", || node_ready(&node) == "Unknown");
    node.start_agent();
    eventually("Ready=True again", || node_ready(&node) == "True");
}
