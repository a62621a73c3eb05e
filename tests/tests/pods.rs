//! The kubelet role end to end, in iptables and in eBPF mode: two nodes
//! whose agents run the pods the scheduler binds to them (process
//! runtime), with wharf-control's scheduler and controllers. One-shot
//! pods report how they ended (completed, failed, OOM killed) with what
//! their containers saw inside. A Deployment's pods start on both nodes
//! (init container, environment, volumes, probes) and serve client pods
//! on both nodes through a ClusterIP with their addresses intact; they
//! are restarted when killed, leave the Service's endpoints when their
//! readiness probe fails, keep running and serving while their agent is
//! away and are adopted when it returns, and stop gracefully (preStop
//! hook) when deleted; a node's teardown leaves no pod behind.
//!
//! Once more with the `cri` runtime: each node's pods run in a
//! containerd of their own (images built from busybox), its CRI plugin
//! wiring them with wharf-cni.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;
use wharf_tests::{
    cluster::{Cluster, NodeAgent, Options, eventually, eventually_within},
    containerd::BUSYBOX_IMAGE,
    lab::{agent_binary, workspace_binary},
};

fn pod_json(cluster: &Cluster, name: &str) -> Value {
    let output = cluster.api.kubectl(&["get", "pod", name, "-o", "json"]);
    serde_json::from_slice(&output.stdout).unwrap_or(Value::Null)
}

/// The pods of a label selector: (name, uid, node, address, ready).
fn pods(cluster: &Cluster, selector: &str) -> Vec<(String, String, String, String, bool)> {
    let list: Value = serde_json::from_str(
        &cluster
            .api
            .kubectl_ok(&["get", "pods", "-l", selector, "-o", "json"]),
    )
    .unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pod| {
            let ready = pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            (
                pod["metadata"]["name"].as_str().unwrap().to_string(),
                pod["metadata"]["uid"].as_str().unwrap().to_string(),
                pod["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                pod["status"]["podIP"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                ready && pod["metadata"]["deletionTimestamp"].is_null(),
            )
        })
        .collect()
}

/// A pod's directory on its node.
fn pod_dir(node: &NodeAgent, uid: &str) -> PathBuf {
    node.files
        .join("state")
        .join(&node.name)
        .join("pods")
        .join(uid)
}

/// Whether `pid` is a live process (not gone, not a zombie awaiting its
/// reaper).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat[stat.rfind(')')? + 2..].chars().next()?;
            Some(state != 'Z')
        })
        .unwrap_or(false)
}

fn node_of<'a>(cluster: &'a Cluster, name: &str) -> &'a NodeAgent {
    cluster.nodes.iter().find(|n| n.name == name).unwrap()
}

/// Waits for a one-shot pod to finish; returns its status.
fn finished(cluster: &Cluster, name: &str) -> Value {
    let mut status = Value::Null;
    eventually_within(&format!("{name} finished"), Duration::from_secs(60), || {
        status = pod_json(cluster, name)["status"].clone();
        matches!(status["phase"].as_str(), Some("Succeeded" | "Failed"))
    });
    status
}

/// A pod that runs `script` once on `node`; `spec` adds pod fields
/// (YAML flow mappings, comma-separated).
fn one_shot(cluster: &Cluster, name: &str, node: &str, memory: &str, script: &str, spec: &str) {
    cluster.api.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default}}
spec:
  {spec}
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  nodeSelector: {{kubernetes.io/hostname: {node}}}
  containers:
  - name: main
    image: debian:bookworm
    command: ["sh", "-c", {script:?}]
    resources: {{limits: {{memory: {memory}}}}}
    env:
    - {{name: GREETING, valueFrom: {{configMapKeyRef: {{name: settings, key: greeting}}}}}}
    - {{name: MEM_MI, valueFrom: {{resourceFieldRef: {{resource: limits.memory, divisor: 1Mi}}}}}}
    volumeMounts: [{{name: config, mountPath: /config}}]
  volumes:
  - {{name: config, configMap: {{name: settings}}}}
"#
    ));
}

/// Runs a client pod on `node` that makes `count` requests to the
/// ClusterIP; returns (backend, the client address it saw) per request.
fn requests_from(cluster: &Cluster, node: &str, count: u32) -> Vec<(String, String)> {
    let probe = workspace_binary("wharf-probe");
    let name = format!("client-{}", rand_suffix());
    cluster.api.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default}}
spec:
  restartPolicy: Never
  nodeSelector: {{kubernetes.io/hostname: {node}}}
  containers:
  - name: main
    image: wharf.dev/probe:test
    command: ["{probe}", "get", "10.96.0.80:80", "--count", "{count}", "--client"]
"#,
        probe = probe.display(),
    ));
    let status = finished(cluster, &name);
    assert_eq!(status["phase"], "Succeeded", "{name}: {status}");
    let uid = pod_json(cluster, &name)["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let log =
        std::fs::read_to_string(pod_dir(node_of(cluster, node), &uid).join("logs/main/0.log"))
            .unwrap();
    cluster
        .api
        .kubectl_ok(&["delete", "pod", &name, "--wait=false"]);
    log.lines()
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let client = words[2].rsplit_once(':').unwrap().0;
            (words[0].to_string(), client.to_string())
        })
        .collect()
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed).to_string()
}

/// The container's first process, from the agent's record.
fn container_pid(node: &NodeAgent, uid: &str) -> i32 {
    let record: Value = serde_json::from_slice(
        &std::fs::read(pod_dir(node, uid).join("containers/web/instance.json")).unwrap(),
    )
    .unwrap();
    record["pid"].as_i64().unwrap() as i32
}

#[test]
fn nodes_run_their_pods_iptables() {
    scenario("iptables");
}

#[test]
fn nodes_run_their_pods_ebpf() {
    scenario("ebpf");
}

fn scenario(mode: &str) {
    let mut cluster = Cluster::new(&format!("pods-{mode}"), mode, &[]);
    cluster.wait_ready();
    let probe = workspace_binary("wharf-probe");
    let goodbye = cluster.lab.dir.join("goodbye");
    cluster.api.apply(
        "apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: default}
data: {greeting: hello from a configmap}
",
    );

    // One-shot pods on n1: what a container sees, and how pods end.
    let n1 = cluster.nodes[0].name.clone();
    one_shot(
        &cluster,
        "checker",
        &n1,
        "64Mi",
        "hostname; cat /proc/1/comm; cat /config/greeting; echo; echo \"env=$GREETING\"; \
         echo \"mem=$MEM_MI\"; touch /scribble && echo wrote; grep checker /etc/hosts",
        "",
    );
    one_shot(&cluster, "failing", &n1, "64Mi", "echo failing; exit 3", "");
    one_shot(
        &cluster,
        "ticker",
        &n1,
        "64Mi",
        "for i in 1 2 3; do echo tick $i; sleep 1; done",
        "",
    );
    // Past its active deadline, a pod is stopped and failed.
    one_shot(
        &cluster,
        "overdue",
        &n1,
        "64Mi",
        "sleep 60",
        "activeDeadlineSeconds: 2",
    );
    // A hostNetwork pod has the node's network and address.
    one_shot(
        &cluster,
        "hostnet",
        &n1,
        "64Mi",
        "ip -4 -o addr show",
        "hostNetwork: true",
    );
    // tail keeps the whole (newline-free) input in memory: past the
    // limit, the kernel's OOM killer ends it.
    one_shot(
        &cluster,
        "hog",
        &n1,
        "16Mi",
        "head -c 500000000 /dev/zero | tail -n 1 > /dev/null",
        "",
    );

    let status = finished(&cluster, "checker");
    assert_eq!(status["phase"], "Succeeded", "{status}");
    let terminated = &status["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(terminated["exitCode"], 0);
    assert_eq!(terminated["reason"], "Completed");
    let checker_ip = status["podIP"].as_str().unwrap().to_string();
    let logs = |uid: &str| {
        std::fs::read_to_string(pod_dir(&cluster.nodes[0], uid).join("logs/main/0.log"))
            .unwrap_or_default()
    };
    let checker_uid = pod_json(&cluster, "checker")["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let seen = logs(&checker_uid);
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(
        lines,
        [
            "checker",
            "sh",
            "hello from a configmap",
            "env=hello from a configmap",
            "mem=64",
            "wrote",
            &format!("{checker_ip}\tchecker"),
        ],
        "the container's own hostname, PID namespace, volume, environment, writable root and /etc/hosts"
    );
    assert!(
        !Path::new("/scribble").exists(),
        "writes stay in the container's own layer"
    );
    // kubectl logs, through the API server and the node's kubelet API.
    assert_eq!(cluster.api.kubectl_ok(&["logs", "checker"]), seen);
    assert_eq!(
        cluster.api.kubectl_ok(&["logs", "checker", "--tail=1"]),
        format!("{checker_ip}\tchecker\n")
    );
    // Followed until the container ends.
    eventually("the ticker running", || {
        pod_json(&cluster, "ticker")["status"]["phase"] == "Running"
    });
    assert_eq!(
        cluster.api.kubectl_ok(&["logs", "-f", "ticker"]),
        "tick 1\ntick 2\ntick 3\n"
    );

    let status = finished(&cluster, "failing");
    assert_eq!(status["phase"], "Failed", "{status}");
    assert_eq!(
        status["containerStatuses"][0]["state"]["terminated"]["exitCode"],
        3
    );
    assert_eq!(
        status["containerStatuses"][0]["state"]["terminated"]["reason"],
        "Error"
    );

    let status = finished(&cluster, "hog");
    assert_eq!(status["phase"], "Failed", "{status}");
    let terminated = &status["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(terminated["reason"], "OOMKilled", "{status}");
    assert_eq!(terminated["exitCode"], 137);
    let status = finished(&cluster, "overdue");
    assert_eq!(status["phase"], "Failed", "{status}");
    assert_eq!(status["reason"], "DeadlineExceeded", "{status}");

    let status = finished(&cluster, "hostnet");
    assert_eq!(status["phase"], "Succeeded", "{status}");
    let node_address = cluster.nodes[0].address.clone();
    assert_eq!(status["podIP"], node_address.as_str());
    let hostnet_uid = pod_json(&cluster, "hostnet")["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        logs(&hostnet_uid).contains(&format!("inet {node_address}/24")),
        "{}",
        logs(&hostnet_uid)
    );

    // Finished pods give their addresses back.
    assert!(!Path::new(&format!("/run/netns/wharf-{checker_uid}")).exists());

    // A Deployment spread over both nodes, behind a ClusterIP.
    cluster.api.apply(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: default}}
spec:
  replicas: 4
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 3
      topologySpreadConstraints:
      - {{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {{matchLabels: {{app: web}}}}}}
      initContainers:
      - name: init
        image: debian:bookworm
        command: ["touch", "/flags/ready"]
        volumeMounts: [{{name: flags, mountPath: /flags}}]
      containers:
      - name: web
        image: wharf.dev/probe:test
        command: ["{probe}", "serve", "$(POD_NAME)", "--http", "8080"]
        env: [{{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}]
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe: {{exec: {{command: ["test", "-e", "/flags/ready"]}}, periodSeconds: 1, failureThreshold: 1}}
        livenessProbe: {{httpGet: {{port: http, path: /}}, periodSeconds: 2}}
        lifecycle:
          postStart: {{exec: {{command: ["sh", "-c", "echo hello > /flags/post-start"]}}}}
          preStop: {{exec: {{command: ["sh", "-c", "echo bye > /goodbye/$HOSTNAME"]}}}}
        volumeMounts:
        - {{name: flags, mountPath: /flags}}
        - {{name: goodbye, mountPath: /goodbye}}
      volumes:
      - {{name: flags, emptyDir: {{}}}}
      - {{name: goodbye, hostPath: {{path: {goodbye}, type: DirectoryOrCreate}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: 10.96.0.80
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: http}}]
"#,
        probe = probe.display(),
        goodbye = goodbye.display(),
    ));
    eventually_within("4 web pods Ready", Duration::from_secs(60), || {
        let web = pods(&cluster, "app=web");
        web.len() == 4 && web.iter().all(|p| p.4)
    });
    let web = pods(&cluster, "app=web");
    let nodes: BTreeSet<&str> = web.iter().map(|p| p.2.as_str()).collect();
    assert_eq!(nodes.len(), 2, "spread over both nodes: {web:?}");
    for pod in &web {
        let hook = pod_dir(node_of(&cluster, &pod.2), &pod.1).join("volumes/flags/post-start");
        eventually("the postStart hook ran", || {
            std::fs::read_to_string(&hook).is_ok_and(|text| text == "hello\n")
        });
    }

    // Client pods on each node reach all four pods through the
    // ClusterIP; those on the other node see the client pod's own
    // address (no NAT between pods).
    let addresses: Vec<&str> = web.iter().map(|p| p.3.as_str()).collect();
    for node in [&cluster.nodes[0].name, &cluster.nodes[1].name] {
        let answers = requests_from(&cluster, node, 40);
        let backends: BTreeSet<&str> = answers.iter().map(|a| a.0.as_str()).collect();
        assert_eq!(backends.len(), 4, "from {node}: {answers:?}");
        for (_, client) in &answers {
            assert!(
                !addresses.contains(&client.as_str()),
                "{client} is a backend's address"
            );
            assert!(
                client.starts_with("10.244."),
                "the client pod's own address, not {client}"
            );
        }
    }
    // Nodes reach pods.
    let n2_ns = cluster.nodes[1].ns.clone();
    assert_eq!(cluster.get(&n2_ns, &web[0].3).0, web[0].0);

    // A killed container is restarted at once, in the same pod.
    let (name, uid, node, address, _) = web[1].clone();
    let instance: Value = serde_json::from_slice(
        &std::fs::read(
            pod_dir(node_of(&cluster, &node), &uid).join("containers/web/instance.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let pid = instance["pid"].as_i64().unwrap();
    // SAFETY: kill(2) with a pid read from the agent's record.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    eventually_within(
        "the killed container restarted",
        Duration::from_secs(30),
        || {
            let status = &pod_json(&cluster, &name)["status"]["containerStatuses"][0];
            status["restartCount"] == 1 && status["ready"] == true
        },
    );
    let status = pod_json(&cluster, &name)["status"].clone();
    let last = &status["containerStatuses"][0]["lastState"]["terminated"];
    assert_eq!(last["exitCode"], 137, "{status}");
    assert_eq!(last["reason"], "Error", "{status}");
    let previous = cluster.api.kubectl_ok(&["logs", &name, "--previous"]);
    assert!(previous.contains("serving"), "{previous}");
    assert_eq!(
        status["podIP"],
        address.as_str(),
        "the pod keeps its address"
    );
    let n1_ns = cluster.nodes[0].ns.clone();
    eventually("the restarted container serves", || {
        cluster
            .try_get(&n1_ns, &address)
            .is_ok_and(|(who, _)| who == name)
    });

    // A failing readiness probe takes the pod out of the endpoints.
    let (name, uid, node, address, _) = web[2].clone();
    let flag = pod_dir(node_of(&cluster, &node), &uid).join("volumes/flags/ready");
    std::fs::remove_file(&flag).unwrap();
    eventually("the unready pod left the endpoints", || {
        let ready = cluster.api.kubectl_ok(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            &format!("jsonpath={{.items[*].endpoints[?(@.addresses[0]==\"{address}\")].conditions.ready}}"),
        ]);
        ready.trim() == "false"
    });
    let answers = requests_from(&cluster, &node, 20);
    assert!(
        answers.iter().all(|a| a.0 != name),
        "an unready pod got traffic: {answers:?}"
    );
    std::fs::write(&flag, "").unwrap();
    eventually("the pod is Ready again", || {
        pods(&cluster, "app=web").iter().any(|p| p.0 == name && p.4)
    });

    // Pods outlive their agent: n1's keep running and serving while it
    // is away, and the restarted agent adopts them (same processes, no
    // restart counted) and manages them as before.
    let web = pods(&cluster, "app=web");
    let n1 = cluster.nodes[0].clone();
    let on_n1: Vec<_> = web.iter().filter(|p| p.2 == n1.name).cloned().collect();
    let pids: Vec<i32> = on_n1.iter().map(|p| container_pid(&n1, &p.1)).collect();
    cluster.lab.stop(n1.agent);
    let n2_name = cluster.nodes[1].name.clone();
    let answers = requests_from(&cluster, &n2_name, 40);
    for pod in &on_n1 {
        assert!(
            answers.iter().any(|a| a.0 == pod.0),
            "{} unreachable while its agent is away",
            pod.0
        );
    }
    cluster.restart_agent(0, "n1-again.log");
    eventually("the restarted agent's node Ready", || {
        cluster.lab.log("n1-again.log").contains("pod cache synced")
    });
    std::thread::sleep(Duration::from_secs(3));
    for (pod, pid) in on_n1.iter().zip(&pids) {
        assert!(alive(*pid), "{} was not adopted", pod.0);
        assert_eq!(container_pid(&n1, &pod.1), *pid, "{} was restarted", pod.0);
        let status = pod_json(&cluster, &pod.0)["status"].clone();
        assert_eq!(
            status["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Ready")
                .unwrap()["status"],
            "True",
            "{status}"
        );
    }

    // The restarted agent serves its kubelet API with the certificate it
    // kept: no second request.
    let requests = cluster.api.kubectl_ok(&["get", "csr", "-o", "name"]);
    let prefix = format!(
        "certificatesigningrequest.certificates.k8s.io/node-serving-{}-",
        n1.name
    );
    assert_eq!(
        requests.lines().filter(|l| l.starts_with(&prefix)).count(),
        1,
        "{requests}"
    );
    assert!(
        cluster
            .api
            .kubectl_ok(&["logs", &on_n1[0].0])
            .contains("serving")
    );

    // A deleted pod (an adopted one) stops gracefully: preStop runs, the
    // pod object and its network go, and the Deployment replaces it.
    let (name, uid, _, _, _) = on_n1[0].clone();
    cluster
        .api
        .kubectl_ok(&["delete", "pod", &name, "--wait=false"]);
    eventually_within("the deleted pod gone", Duration::from_secs(30), || {
        pod_json(&cluster, &name).is_null()
    });
    assert_eq!(
        std::fs::read_to_string(goodbye.join(&name)).unwrap_or_default(),
        "bye\n",
        "the preStop hook ran"
    );
    assert!(!Path::new(&format!("/run/netns/wharf-{uid}")).exists());
    assert!(!alive(pids[0]));
    eventually_within("4 web pods Ready again", Duration::from_secs(60), || {
        let web = pods(&cluster, "app=web");
        web.len() == 4 && web.iter().all(|p| p.4)
    });

    // Teardown of a stopped node's agent stops its pods and removes
    // their namespaces and cgroups.
    let web = pods(&cluster, "app=web");
    let node = cluster.nodes[1].clone();
    cluster.lab.stop(node.agent);
    let on_node: Vec<_> = web.iter().filter(|p| p.2 == node.name).cloned().collect();
    assert!(!on_node.is_empty());
    let pids: Vec<i32> = on_node.iter().map(|p| container_pid(&node, &p.1)).collect();
    assert!(
        pids.iter().all(|pid| alive(*pid)),
        "pods outlive their agent"
    );
    let mut teardown = node.file_args();
    teardown.push("--teardown".into());
    let teardown: Vec<&str> = teardown.iter().map(String::as_str).collect();
    cluster.lab.run(&node.ns, false, &agent_binary(), &teardown);
    for pid in pids {
        assert!(!alive(pid), "pid {pid} survived the teardown");
    }
    for pod in &on_node {
        assert!(!Path::new(&format!("/run/netns/wharf-{}", pod.1)).exists());
    }
    assert!(
        !node
            .cgroup
            .join(format!("wharf-pods-{}", node.name))
            .exists()
    );
}

/// `ctr` against node `node`'s containerd (CRI namespace), lines out.
fn ctr(node: &NodeAgent, args: &[&str]) -> Vec<String> {
    let endpoint = node
        .extra
        .iter()
        .find_map(|a| a.strip_prefix("--container-runtime-endpoint="))
        .expect("a cri node");
    let output = std::process::Command::new("ctr")
        .args(["--address", endpoint, "--namespace", "k8s.io"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A busybox pod on `node` running `script` under `policy`, with
/// `limits`.
fn busybox_pod(
    cluster: &Cluster,
    name: &str,
    node: &str,
    policy: &str,
    script: &str,
    memory: &str,
) {
    cluster.api.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default}}
spec:
  restartPolicy: {policy}
  terminationGracePeriodSeconds: 1
  nodeSelector: {{kubernetes.io/hostname: {node}}}
  containers:
  - name: main
    image: {BUSYBOX_IMAGE}
    command: ["sh", "-c", {script:?}]
    resources: {{limits: {{memory: {memory}}}}}
"#
    ));
}

#[test]
fn nodes_run_their_pods_cri() {
    let mut cluster = Cluster::build(
        "pods-cri",
        "iptables",
        &[],
        Options {
            containerd: true,
            ..Options::default()
        },
    );
    cluster.wait_ready();
    let (n1, n2) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());

    // A Deployment over both nodes behind a ClusterIP: each pod serves
    // its own name (downward API), ready once it answers.
    cluster.api.apply(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: default}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 2
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
          - {{labelSelector: {{matchLabels: {{app: web}}}}, topologyKey: kubernetes.io/hostname}}
      containers:
      - name: httpd
        image: {BUSYBOX_IMAGE}
        command: ["sh", "-c", "mkdir -p /tmp/www && echo $(POD_NAME) > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"]
        env: [{{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}]
        readinessProbe: {{httpGet: {{port: 8080}}, periodSeconds: 1}}
        livenessProbe: {{exec: {{command: ["test", "-f", "/tmp/www/index.html"]}}, periodSeconds: 2}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  selector: {{app: web}}
  clusterIP: 10.96.0.60
  ports: [{{port: 80, targetPort: 8080}}]
"#
    ));
    eventually_within("2 web pods Ready", Duration::from_secs(60), || {
        let web = pods(&cluster, "app=web");
        web.len() == 2 && web.iter().all(|p| p.4)
    });
    let web = pods(&cluster, "app=web");
    let nodes: BTreeSet<&str> = web.iter().map(|p| p.2.as_str()).collect();
    assert_eq!(nodes, BTreeSet::from([n1.as_str(), n2.as_str()]));
    for pod in &web {
        let status = pod_json(&cluster, &pod.0)["status"].clone();
        let id = status["containerStatuses"][0]["containerID"]
            .as_str()
            .unwrap_or_default();
        assert!(id.starts_with("containerd://"), "{status}");
    }
    // From a pod on n1, through the ClusterIP: both pods answer. (With
    // nc: busybox-static's wget crashes in a root without glibc's
    // modules.)
    busybox_pod(
        &cluster,
        "client",
        &n1,
        "Never",
        "for i in $(seq 30); do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 10.96.0.60 80 | tail -n 1; done",
        "64Mi",
    );
    let status = finished(&cluster, "client");
    assert_eq!(status["phase"], "Succeeded", "{status}");
    let answers: BTreeSet<String> = cluster
        .api
        .kubectl_ok(&["logs", "client"])
        .lines()
        .map(str::to_string)
        .collect();
    let names: BTreeSet<String> = web.iter().map(|p| p.0.clone()).collect();
    assert_eq!(answers, names);

    // One-shot pods: an exit code, and the kernel's OOM killer under a
    // 16 MiB limit; their logs through kubectl.
    busybox_pod(
        &cluster,
        "once",
        &n1,
        "Never",
        "echo hello from cri; exit 3",
        "64Mi",
    );
    busybox_pod(
        &cluster,
        "hog",
        &n1,
        "Never",
        "head -c 500000000 /dev/zero | tail -n 1 > /dev/null",
        "16Mi",
    );
    let status = finished(&cluster, "once");
    assert_eq!(status["phase"], "Failed", "{status}");
    let terminated = &status["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(
        (
            terminated["exitCode"].as_i64(),
            terminated["reason"].as_str()
        ),
        (Some(3), Some("Error"))
    );
    assert_eq!(
        cluster.api.kubectl_ok(&["logs", "once"]),
        "hello from cri\n"
    );
    let status = finished(&cluster, "hog");
    assert_eq!(
        status["containerStatuses"][0]["state"]["terminated"]["reason"], "OOMKilled",
        "{status}"
    );

    // A container that keeps failing is restarted; its previous
    // instance's log stays readable.
    busybox_pod(
        &cluster,
        "flaky",
        &n2,
        "Always",
        "echo run; sleep 1; exit 1",
        "64Mi",
    );
    eventually_within("flaky restarted", Duration::from_secs(60), || {
        pod_json(&cluster, "flaky")["status"]["containerStatuses"][0]["restartCount"]
            .as_i64()
            .is_some_and(|n| n >= 1)
    });
    assert_eq!(
        cluster.api.kubectl_ok(&["logs", "flaky", "--previous"]),
        "run\n"
    );

    // Deleted pods take their sandboxes with them.
    cluster
        .api
        .kubectl_ok(&["delete", "pod", "once", "hog", "client"]);
    let node = cluster.nodes[0].clone();
    eventually("n1's one-shot sandboxes removed", || {
        ctr(&node, &["containers", "ls", "-q"]).len() == 2
    });

    // n2's teardown, its agent stopped, removes its pods from its
    // containerd and gives their addresses back through the agent API.
    let node = cluster.nodes[1].clone();
    cluster.lab.stop(node.agent);
    assert!(!ctr(&node, &["containers", "ls", "-q"]).is_empty());
    let mut teardown = node.file_args();
    teardown.push("--teardown".into());
    let teardown: Vec<&str> = teardown.iter().map(String::as_str).collect();
    cluster.lab.run(&node.ns, false, &agent_binary(), &teardown);
    assert_eq!(
        ctr(&node, &["containers", "ls", "-q"]),
        Vec::<String>::new()
    );
    assert!(
        !ip_links(&node.ns).contains(": wh"),
        "{}",
        ip_links(&node.ns)
    );
}

/// `ip -o link` in `ns`.
fn ip_links(ns: &str) -> String {
    let output = std::process::Command::new("ip")
        .args(["-n", ns, "-o", "link"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}
