//! CNI conformance: every verb of the real wharf-cni binary with the
//! spec's environment and stdin, against a real agent (standalone, with
//! `--pod-cidr`) serving addresses on its socket, on a node of network
//! namespaces; pods wired by it reach each other and the node.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
};

use serde_json::{Value, json};
use wharf_tests::{
    lab::{Lab, agent_binary, workspace_binary},
    node::node_files,
};

/// A /29: five pod addresses, .2 to .6.
const POD_CIDR: &str = "10.244.7.0/29";

struct Node {
    lab: Lab,
    node_ns: String,
    socket: PathBuf,
    agent: Option<usize>,
}

impl Node {
    fn new(test: &str) -> Self {
        let mut lab = Lab::new(test);
        let node_ns = lab.netns("node");
        let socket = lab.dir.join("run/agent.sock");
        let mut node = Self {
            lab,
            node_ns,
            socket,
            agent: None,
        };
        node.start_agent();
        node
    }

    fn start_agent(&mut self) {
        let manifests = self.lab.dir.join("manifests");
        std::fs::create_dir_all(&manifests).unwrap();
        let name = self.lab.node("node");
        let args = [
            "--standalone".to_string(),
            format!("--services-from={}", manifests.display()),
            "--proxy-mode=nftables".into(),
            format!("--node-name={name}"),
            format!("--pod-cidr={POD_CIDR}"),
        ];
        let args: Vec<String> = args.into_iter().chain(node_files(&self.lab.dir)).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let ns = self.node_ns.clone();
        self.agent = Some(
            self.lab
                .spawn(&ns, false, &agent_binary(), &args, "agent.log"),
        );
        self.lab.wait_for_log("agent.log", "agent API serving", 1);
        self.lab.wait_for_log("agent.log", "CNI configured", 1);
        self.lab
            .wait_for_log("agent.log", "pod addresses available", 1);
    }

    fn stop_agent(&mut self) {
        let agent = self.agent.take().expect("agent running");
        self.lab.stop(agent);
    }

    /// A pod's network namespace; returns its path.
    fn pod(&mut self, name: &str) -> PathBuf {
        let full = self.lab.netns(name);
        PathBuf::from(format!("/run/netns/{full}"))
    }

    fn conf(&self, version: &str, extra: Value) -> String {
        let mut conf = json!({
            "cniVersion": version,
            "name": "wharf",
            "type": "wharf-cni",
            "mtu": 1400,
            "agentSocket": self.socket,
        });
        if let (Some(conf), Some(extra)) = (conf.as_object_mut(), extra.as_object()) {
            conf.extend(extra.clone());
        }
        conf.to_string()
    }

    /// Runs wharf-cni in the node's namespace; (success, stdout as JSON
    /// or Null when empty).
    fn cni(&mut self, env: &[(&str, &str)], stdin: &str) -> (bool, Value) {
        let ns = self.node_ns.clone();
        // The copy the agent installed, as a runtime would run it.
        let plugin = self.lab.dir.join("cni/bin/wharf-cni");
        let mut command = self.lab.command(&ns, false, &plugin, &[]);
        command
            .env_clear()
            .env("CNI_PATH", "/opt/cni/bin")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("wharf-cni");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let value = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
        };
        (output.status.success(), value)
    }

    fn add(&mut self, container: &str, netns: &Path, ifname: &str) -> (bool, Value) {
        let conf = self.conf("1.1.0", json!({}));
        let netns = netns.to_str().unwrap().to_string();
        self.cni(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", container),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", ifname),
            ],
            &conf,
        )
    }

    fn del(&mut self, container: &str, ifname: &str) -> (bool, Value) {
        let conf = self.conf("1.1.0", json!({}));
        self.cni(
            &[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", container),
                ("CNI_IFNAME", ifname),
            ],
            &conf,
        )
    }

    /// `ip -n NS ARGS` output.
    fn ip(&self, ns: &str, args: &str) -> String {
        let output = std::process::Command::new("ip")
            .args(["-n", ns])
            .args(args.split_whitespace())
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

fn namespace_name(netns: &Path) -> String {
    netns.file_name().unwrap().to_str().unwrap().to_string()
}

fn error_code(value: &Value) -> u64 {
    value["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("not an error: {value}"))
}

#[test]
fn add_check_del_wire_pods_that_reach_each_other() {
    let mut node = Node::new("cni-add");
    // The agent installed the plugin and a configuration pointing at it.
    let conflist: Value = serde_json::from_str(
        &std::fs::read_to_string(node.lab.dir.join("cni/net.d/10-wharf.conflist")).unwrap(),
    )
    .unwrap();
    // 1.0.0 for older runtimes; newer ones pick 1.1.0 from the list.
    assert_eq!(conflist["cniVersion"], "1.0.0");
    assert_eq!(conflist["cniVersions"], json!(["1.0.0", "1.1.0"]));
    assert_eq!(conflist["plugins"][0]["type"], "wharf-cni");
    assert_eq!(conflist["plugins"][0]["agentSocket"], json!(node.socket));
    let (ok, version) = node.cni(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.1.0"}"#);
    assert!(ok, "{version}");
    assert!(
        version["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.1.0"))
    );
    let status_conf = node.conf("1.1.0", json!({}));
    let (ok, status) = node.cni(&[("CNI_COMMAND", "STATUS")], &status_conf);
    assert!(ok, "{status}");

    let p1 = node.pod("p1");
    let p2 = node.pod("p2");
    let (ok, first) = node.add("c1", &p1, "eth0");
    assert!(ok, "{first}");
    assert_eq!(first["cniVersion"], "1.1.0");
    assert_eq!(first["ips"][0]["address"], "10.244.7.2/32");
    assert_eq!(first["ips"][0]["gateway"], "10.244.7.1");
    assert_eq!(first["interfaces"][1]["name"], "eth0");
    assert_eq!(first["interfaces"][1]["sandbox"], json!(p1));
    assert!(first["interfaces"][1]["mac"].is_string(), "{first}");
    let (ok, second) = node.add("c2", &p2, "eth0");
    assert!(ok, "{second}");
    assert_eq!(second["ips"][0]["address"], "10.244.7.3/32");

    // The pod's side: address, MTU, default route via the gateway.
    let p1_name = namespace_name(&p1);
    let link = node.ip(&p1_name, "addr show dev eth0");
    assert!(link.contains("inet 10.244.7.2/32"), "{link}");
    assert!(link.contains("mtu 1400"), "{link}");
    let routes = node.ip(&p1_name, "route");
    assert!(
        routes.contains("default via 10.244.7.1 dev eth0"),
        "{routes}"
    );

    // Pod to pod (each sees the other's real address) and node to pod.
    let probe = workspace_binary("wharf-probe");
    let p2_name = namespace_name(&p2);
    node.lab.spawn(
        &p2_name,
        false,
        &probe,
        &["serve", "p2", "--http", "8080"],
        "p2.log",
    );
    node.lab.wait_for_log("p2.log", "serving", 1);
    let lines = node.lab.run(
        &p1_name,
        false,
        &probe,
        &["get", "10.244.7.3:8080", "--client"],
    );
    assert!(lines[0].starts_with("p2 "), "{lines:?}");
    assert!(
        lines[0].contains(" 10.244.7.2:"),
        "the backend sees the pod's own address: {lines:?}"
    );
    let node_ns = node.node_ns.clone();
    let lines = node
        .lab
        .run(&node_ns, false, &probe, &["get", "10.244.7.3:8080"]);
    assert!(lines[0].starts_with("p2 "), "{lines:?}");

    // CHECK passes on what ADD made and fails once it is broken.
    let check_conf = node.conf("1.1.0", json!({ "prevResult": first }));
    let p1_path = p1.to_str().unwrap().to_string();
    let check_env = [
        ("CNI_COMMAND", "CHECK"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", p1_path.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let (ok, checked) = node.cni(&check_env, &check_conf);
    assert!(ok, "{checked}");
    node.lab.ip(&p1_name, "addr flush dev eth0");
    let (ok, checked) = node.cni(&check_env, &check_conf);
    assert!(!ok);
    assert_eq!(error_code(&checked), 102);

    // DEL removes both ends and frees the address; twice is fine.
    let host_end = wharf_agent::podnet::host_ifname("c1", "eth0");
    assert!(node.ip(&node_ns, "link").contains(&host_end));
    for _ in 0..2 {
        let (ok, deleted) = node.del("c1", "eth0");
        assert!(ok, "{deleted}");
        assert_eq!(deleted, Value::Null, "DEL prints nothing");
    }
    assert!(!node.ip(&node_ns, "link").contains(&host_end));
    assert!(!node.ip(&p1_name, "link").contains("eth0"));

    // A restarted agent remembers c2's address: the next is .4, not .3.
    node.stop_agent();
    node.start_agent();
    let p3 = node.pod("p3");
    let (ok, third) = node.add("c3", &p3, "eth0");
    assert!(ok, "{third}");
    assert_eq!(third["ips"][0]["address"], "10.244.7.4/32");
}

#[test]
fn failures_are_spec_errors_on_stdout() {
    let mut node = Node::new("cni-errors");
    let pod = node.pod("p1");
    let path = pod.to_str().unwrap().to_string();
    let env = |command: &'static str| {
        [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", path.as_str()),
            ("CNI_IFNAME", "eth0"),
        ]
    };
    let (ok, error) = node.cni(&env("ADD"), "{not json");
    assert!(!ok);
    assert_eq!(error_code(&error), 6);
    let old = r#"{"cniVersion":"0.0.1","name":"wharf","type":"wharf-cni"}"#;
    let (_, error) = node.cni(&env("ADD"), old);
    assert_eq!(error_code(&error), 1);
    let conf = node.conf("1.1.0", json!({}));
    let (_, error) = node.cni(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")], &conf);
    assert_eq!(error_code(&error), 4);
    let (_, error) = node.cni(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/no-such-pod"),
            ("CNI_IFNAME", "eth0"),
        ],
        &conf,
    );
    assert_eq!(error_code(&error), 3);
    // An older configuration gets an older result.
    let conf_040 = node.conf("0.4.0", json!({}));
    let (ok, result) = node.cni(&env("ADD"), &conf_040);
    assert!(ok, "{result}");
    assert_eq!(result["cniVersion"], "0.4.0");
    assert_eq!(result["ips"][0]["version"], "4");

    // The pool runs out after five addresses (one taken above).
    for ifname in ["eth1", "eth2", "eth3", "eth4"] {
        let (ok, result) = node.add("c1", &pod, ifname);
        assert!(ok, "{result}");
    }
    let (ok, error) = node.add("c1", &pod, "eth5");
    assert!(!ok);
    assert_eq!(error_code(&error), 100);
    assert!(
        error["details"].as_str().unwrap().contains("in use"),
        "{error}"
    );

    // GC keeps only the listed attachments: the others' addresses are
    // freed and their node ends removed.
    // Without the list GC refuses rather than take everything for a leak.
    let (ok, error) = node.cni(&[("CNI_COMMAND", "GC")], &node.conf("1.1.0", json!({})));
    assert!(!ok);
    assert_eq!(error_code(&error), 7);
    let gc_conf = node.conf(
        "1.1.0",
        json!({ "cni.dev/valid-attachments": [{ "containerID": "c1", "ifname": "eth0" }] }),
    );
    let (ok, collected) = node.cni(&[("CNI_COMMAND", "GC")], &gc_conf);
    assert!(ok, "{collected}");
    let node_ns = node.node_ns.clone();
    let links = node.ip(&node_ns, "link");
    assert!(links.contains(&wharf_agent::podnet::host_ifname("c1", "eth0")));
    assert!(!links.contains(&wharf_agent::podnet::host_ifname("c1", "eth1")));
    let (ok, result) = node.add("c1", &pod, "eth5");
    assert!(ok, "freed addresses are handed out again: {result}");

    // With the agent down: ADD asks to be retried, STATUS says not
    // available; nothing is guessed.
    node.stop_agent();
    let (ok, error) = node.add("c9", &pod, "eth9");
    assert!(!ok);
    assert_eq!(error_code(&error), 11);
    let (ok, error) = node.cni(&[("CNI_COMMAND", "STATUS")], &conf);
    assert!(!ok);
    assert_eq!(error_code(&error), 50);
}
