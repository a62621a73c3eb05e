//! The scheduler and the controllers end to end: wharf-control as a
//! process, simulated nodes (`wharf_tests::simnodes`), kubectl driving.

use std::time::{Duration, Instant};

use serde_json::Value;
use wharf_tests::{
    control::{ControlPlane, StoreKind},
    simnodes::{Shape, SimNodes},
};

/// Polls `check` every 100 ms until it returns `Some`, or panics with
/// `what` after `timeout`.
fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn json(plane: &ControlPlane, args: &[&str]) -> Value {
    let mut full = args.to_vec();
    full.extend(["-o", "json"]);
    serde_json::from_str(&plane.kubectl_ok(&full)).expect("kubectl JSON")
}

fn items(plane: &ControlPlane, args: &[&str]) -> Vec<Value> {
    json(plane, args)["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

fn deleting(object: &Value) -> bool {
    object["metadata"]["deletionTimestamp"].is_string()
}

/// Pods with the label, not being deleted.
fn live_pods(plane: &ControlPlane, namespace: &str, selector: &str) -> Vec<Value> {
    items(plane, &["get", "pods", "-n", namespace, "-l", selector])
        .into_iter()
        .filter(|p| !deleting(p))
        .collect()
}

fn nodes(plane: &ControlPlane, count: usize) -> SimNodes {
    SimNodes::start(&plane.kubeconfig(), "sim", count, Shape::default())
}

#[test]
fn deployments_scale_roll_within_max_unavailable_and_undo() {
    let plane = ControlPlane::cluster(StoreKind::Embedded, &[]);
    let _nodes = nodes(&plane, 3);
    plane.kubectl_ok(&[
        "create",
        "deployment",
        "web",
        "--image=registry.local/web:v1",
        "--replicas=5",
    ]);
    plane.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    assert_eq!(live_pods(&plane, "default", "app=web").len(), 5);

    plane.kubectl_ok(&["scale", "deployment/web", "--replicas=10"]);
    plane.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let pods = live_pods(&plane, "default", "app=web");
    assert_eq!(pods.len(), 10);
    let spread: std::collections::BTreeSet<&str> = pods
        .iter()
        .filter_map(|p| p["spec"]["nodeName"].as_str())
        .collect();
    assert_eq!(
        spread.len(),
        3,
        "least-allocated scoring spreads the pods: {spread:?}"
    );

    plane.kubectl_ok(&[
        "patch",
        "deployment/web",
        "--type=merge",
        "-p",
        r#"{"spec":{"strategy":{"rollingUpdate":{"maxUnavailable":2,"maxSurge":3}}}}"#,
    ]);
    plane.kubectl_ok(&[
        "set",
        "image",
        "deployment/web",
        "web=registry.local/web:v2",
    ]);
    // Watch every step of the rollout: never fewer than 10 - 2 ready.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut least_ready = usize::MAX;
    loop {
        let pods = live_pods(&plane, "default", "app=web");
        let ready_now = pods.iter().filter(|p| ready(p)).count();
        least_ready = least_ready.min(ready_now);
        assert!(pods.len() <= 13, "maxSurge 3: {} pods", pods.len());
        let done = pods.len() == 10
            && pods.iter().all(|p| {
                ready(p) && p["spec"]["containers"][0]["image"] == "registry.local/web:v2"
            });
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rolling update did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        least_ready >= 8,
        "maxUnavailable 2 was exceeded: {least_ready} ready"
    );
    plane.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let history = plane.kubectl_ok(&["rollout", "history", "deployment/web"]);
    assert!(history.contains('1') && history.contains('2'), "{history}");

    plane.kubectl_ok(&["rollout", "undo", "deployment/web"]);
    plane.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let deployment = json(&plane, &["get", "deployment/web"]);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.local/web:v1"
    );
    assert_eq!(
        deployment["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "3",
        "the undone revision comes back as the newest"
    );
    wait_for(Duration::from_secs(30), "old pods to go", || {
        let pods = live_pods(&plane, "default", "app=web");
        (pods.len() == 10
            && pods
                .iter()
                .all(|p| p["spec"]["containers"][0]["image"] == "registry.local/web:v1"))
        .then_some(())
    });
    let replica_sets = items(&plane, &["get", "rs", "-l", "app=web"]);
    assert_eq!(replica_sets.len(), 2, "one ReplicaSet per template");

    plane.kubectl_ok(&["rollout", "restart", "deployment/web"]);
    plane.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    assert_eq!(items(&plane, &["get", "rs", "-l", "app=web"]).len(), 3);
    let described = plane.kubectl_ok(&["describe", "deployment/web"]);
    assert!(described.contains("ScalingReplicaSet"), "{described}");
}

#[test]
fn a_silent_node_is_drained_and_its_pods_recreated_elsewhere() {
    let plane = ControlPlane::cluster(
        StoreKind::Embedded,
        &[
            "--node-monitor-grace-period=3",
            "--default-unreachable-toleration-seconds=2",
            "--default-not-ready-toleration-seconds=2",
        ],
    );
    let sim = nodes(&plane, 3);
    plane.kubectl_ok(&["create", "deployment", "web", "--image=web", "--replicas=6"]);
    plane.kubectl_ok(&["create", "service", "clusterip", "web", "--tcp=80:8080"]);
    plane.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let victim = live_pods(&plane, "default", "app=web")[0]["spec"]["nodeName"]
        .as_str()
        .expect("bound")
        .to_owned();
    sim.kill(&victim);

    wait_for(Duration::from_secs(30), "the node to go Unknown", || {
        let node = json(&plane, &["get", "node", &victim]);
        let ready = node["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Ready")?
            .clone();
        let tainted = node["spec"]["taints"].as_array().is_some_and(|t| {
            t.iter()
                .any(|t| t["key"] == "node.kubernetes.io/unreachable" && t["effect"] == "NoExecute")
        });
        (ready["status"] == "Unknown" && tainted).then_some(())
    });
    wait_for(
        Duration::from_secs(60),
        "6 ready pods on the other nodes",
        || {
            let pods = live_pods(&plane, "default", "app=web");
            let elsewhere = pods
                .iter()
                .filter(|p| p["spec"]["nodeName"] != victim.as_str() && ready(p))
                .count();
            (pods.len() == 6 && elsewhere == 6).then_some(())
        },
    );
    // The Service routes only to live backends.
    wait_for(
        Duration::from_secs(30),
        "endpoints without the dead node",
        || {
            let slices = items(
                &plane,
                &[
                    "get",
                    "endpointslices",
                    "-l",
                    "kubernetes.io/service-name=web",
                ],
            );
            let ready_endpoints: Vec<&Value> = slices
                .iter()
                .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
                .filter(|e| e["conditions"]["ready"] == true)
                .collect();
            (ready_endpoints.len() == 6
                && ready_endpoints
                    .iter()
                    .all(|e| e["nodeName"] != victim.as_str()))
            .then_some(())
        },
    );
    let events = plane.kubectl_ok(&["get", "events", "-A"]);
    assert!(events.contains("TaintManagerEviction"), "{events}");

    // Every node silent: the zone is fully disrupted, and nothing more is
    // evicted however long the tolerations have run out.
    let names = |pods: Vec<Value>| {
        let mut names: Vec<String> = pods
            .iter()
            .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
            .collect();
        names.sort();
        names
    };
    for name in sim.names() {
        sim.kill(&name);
    }
    wait_for(Duration::from_secs(30), "every node Unknown", || {
        let nodes = items(&plane, &["get", "nodes"]);
        nodes
            .iter()
            .all(|n| {
                n["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "Unknown")
                })
            })
            .then_some(())
    });
    // The nodes' leases lapse up to a renewal apart, and until the last
    // one has, the zone is only partly disrupted and evicting is right
    // (on a busy machine that took over the 2 s toleration): count from
    // the full disruption, once an eviction decided just before has
    // landed. Grace (3 s) and toleration (2 s) are long past after 8 s.
    std::thread::sleep(Duration::from_secs(1));
    let before = names(live_pods(&plane, "default", "app=web"));
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        names(live_pods(&plane, "default", "app=web")),
        before,
        "no eviction in a full disruption"
    );
    for node in items(&plane, &["get", "nodes"]) {
        let no_execute = node["spec"]["taints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["effect"] == "NoExecute");
        assert!(!no_execute, "{}", node["metadata"]["name"]);
    }
}

#[test]
fn deleting_a_namespace_empties_it() {
    let plane = ControlPlane::cluster(StoreKind::Embedded, &[]);
    let _nodes = nodes(&plane, 2);
    plane.kubectl_ok(&["create", "namespace", "shop"]);
    plane.kubectl_ok(&[
        "-n",
        "shop",
        "create",
        "deployment",
        "cart",
        "--image=cart",
        "--replicas=3",
    ]);
    plane.kubectl_ok(&[
        "-n",
        "shop",
        "create",
        "service",
        "clusterip",
        "cart",
        "--tcp=80",
    ]);
    plane.kubectl_ok(&[
        "-n",
        "shop",
        "create",
        "configmap",
        "settings",
        "--from-literal=a=b",
    ]);
    plane.kubectl_ok(&[
        "-n",
        "shop",
        "rollout",
        "status",
        "deployment/cart",
        "--timeout=60s",
    ]);
    wait_for(
        Duration::from_secs(10),
        "the default service account",
        || {
            plane
                .kubectl(&["-n", "shop", "get", "serviceaccount", "default"])
                .status
                .success()
                .then_some(())
        },
    );
    plane.kubectl_ok(&["delete", "namespace", "shop", "--timeout=60s"]);
    let gone = plane.kubectl(&["get", "namespace", "shop"]);
    assert!(!gone.status.success(), "the namespace is gone");
    for kind in [
        "pods",
        "replicasets",
        "deployments",
        "services",
        "configmaps",
        "endpointslices",
    ] {
        let left = items(&plane, &["get", kind, "-n", "shop"]);
        assert!(left.is_empty(), "{kind} left: {left:?}");
    }
}

#[test]
fn unschedulable_pods_say_why_and_are_retried_when_nodes_change() {
    let plane = ControlPlane::cluster(StoreKind::Embedded, &[]);
    let sim = nodes(&plane, 2);
    plane.apply(
        r"apiVersion: v1
kind: Pod
metadata: {name: big}
spec:
  containers:
  - name: main
    image: big
    resources: {requests: {cpu: '16'}}
",
    );
    let message = wait_for(Duration::from_secs(20), "PodScheduled=False", || {
        let pod = json(&plane, &["get", "pod", "big"]);
        let condition = pod["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "PodScheduled" && c["status"] == "False")?
            .clone();
        condition["message"].as_str().map(str::to_owned)
    });
    assert_eq!(
        message,
        "0/2 nodes are available: 2 Insufficient cpu. preemption: 0/2 nodes are available: \
         2 No preemption victims found for incoming pod."
    );
    let described = plane.kubectl_ok(&["describe", "pod", "big"]);
    assert!(described.contains("FailedScheduling"), "{described}");

    // A bigger node arrives: the pod is retried and lands there.
    drop(sim);
    let _big = SimNodes::start(
        &plane.kubeconfig(),
        "big",
        1,
        Shape {
            cpu: "32".to_owned(),
            ..Shape::default()
        },
    );
    wait_for(Duration::from_secs(30), "the pod to be bound", || {
        let pod = json(&plane, &["get", "pod", "big"]);
        (pod["spec"]["nodeName"] == "big-0").then_some(())
    });
}

#[test]
fn only_the_lease_holder_schedules() {
    let plane = ControlPlane::cluster(StoreKind::Embedded, &["--without=scheduler"]);
    let kubeconfig = plane.data_dir().join("scheduler.kubeconfig");
    let spawn = || {
        std::process::Command::new(wharf_tests::lab::workspace_binary("wharf-control"))
            .arg("scheduler")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("spawn a scheduler")
    };
    let mut first = spawn();
    let holder = wait_for(Duration::from_secs(20), "a lease holder", || {
        let lease = json(
            &plane,
            &["-n", "kube-system", "get", "lease", "kube-scheduler"],
        );
        lease["spec"]["holderIdentity"].as_str().map(str::to_owned)
    });
    let mut second = spawn();
    let _nodes = nodes(&plane, 1);
    plane.kubectl_ok(&["run", "one", "--image=one"]);
    wait_for(Duration::from_secs(20), "the first pod bound", || {
        json(&plane, &["get", "pod", "one"])["spec"]["nodeName"]
            .as_str()
            .map(drop)
    });
    let lease = json(
        &plane,
        &["-n", "kube-system", "get", "lease", "kube-scheduler"],
    );
    assert_eq!(
        lease["spec"]["holderIdentity"],
        holder.as_str(),
        "the second waits"
    );

    // SIGTERM: the leader releases the lease and the other takes over.
    // SAFETY: kill(2) on a child we own, by its pid.
    unsafe { libc::kill(i32::try_from(first.id()).expect("pid"), libc::SIGTERM) };
    first.wait().expect("the first scheduler exits");
    wait_for(Duration::from_secs(20), "a new holder", || {
        let lease = json(
            &plane,
            &["-n", "kube-system", "get", "lease", "kube-scheduler"],
        );
        let now = lease["spec"]["holderIdentity"].as_str()?.to_owned();
        (now != holder).then_some(())
    });
    plane.kubectl_ok(&["run", "two", "--image=two"]);
    wait_for(Duration::from_secs(20), "the second pod bound", || {
        json(&plane, &["get", "pod", "two"])["spec"]["nodeName"]
            .as_str()
            .map(drop)
    });
    let _ = second.kill();
    let _ = second.wait();
}

#[test]
fn garbage_collection_follows_owner_references() {
    let plane = ControlPlane::cluster(StoreKind::Embedded, &[]);
    let _nodes = nodes(&plane, 2);
    for name in ["background", "orphaned", "foreground"] {
        plane.kubectl_ok(&["create", "deployment", name, "--image=app", "--replicas=2"]);
        plane.kubectl_ok(&[
            "rollout",
            "status",
            &format!("deployment/{name}"),
            "--timeout=60s",
        ]);
    }
    let gone = |selector: &str| {
        items(&plane, &["get", "rs,pods", "-l", selector])
            .is_empty()
            .then_some(())
    };

    plane.kubectl_ok(&["delete", "deployment", "background"]);
    wait_for(
        Duration::from_secs(30),
        "background's ReplicaSet and pods to go",
        || gone("app=background"),
    );

    // Orphaning keeps the ReplicaSet and its pods, without the owner.
    plane.kubectl_ok(&["delete", "deployment", "orphaned", "--cascade=orphan"]);
    wait_for(
        Duration::from_secs(30),
        "the orphaned ReplicaSet to lose its owner",
        || {
            let sets = items(&plane, &["get", "rs", "-l", "app=orphaned"]);
            (sets.len() == 1
                && sets[0]["metadata"]["ownerReferences"]
                    .as_array()
                    .is_none_or(Vec::is_empty))
            .then_some(())
        },
    );
    assert!(
        !plane
            .kubectl(&["get", "deployment", "orphaned"])
            .status
            .success()
    );
    assert_eq!(live_pods(&plane, "default", "app=orphaned").len(), 2);

    // Foreground: the owner waits, with the finalizer, for its
    // dependents; a pod held by a finalizer holds the whole chain.
    let held = live_pods(&plane, "default", "app=foreground")[0]["metadata"]["name"]
        .as_str()
        .expect("a pod name")
        .to_owned();
    plane.kubectl_ok(&[
        "patch",
        "pod",
        &held,
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["example.com/hold"]}}"#,
    ]);
    plane.kubectl_ok(&[
        "delete",
        "deployment",
        "foreground",
        "--cascade=foreground",
        "--wait=false",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let waiting = json(&plane, &["get", "deployment", "foreground"]);
    assert!(deleting(&waiting));
    assert!(
        waiting["metadata"]["finalizers"]
            .to_string()
            .contains("foregroundDeletion")
    );
    plane.kubectl_ok(&[
        "patch",
        "pod",
        &held,
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    wait_for(
        Duration::from_secs(30),
        "the foreground deployment to go last",
        || {
            let owner_gone = !plane
                .kubectl(&["get", "deployment", "foreground"])
                .status
                .success();
            (owner_gone && gone("app=foreground").is_some()).then_some(())
        },
    );
}

#[test]
fn a_job_runs_to_completion_and_one_gives_up() {
    let plane = ControlPlane::cluster(StoreKind::Embedded, &[]);
    let _nodes = nodes(&plane, 2);
    let job = |name: &str, exit: u8, extra: &str| {
        format!(
            r"apiVersion: batch/v1
kind: Job
metadata: {{name: {name}}}
spec:
  {extra}
  template:
    metadata:
      annotations: {{sim.wharf.dev/exit-code: '{exit}', sim.wharf.dev/run-ms: '200'}}
    spec:
      restartPolicy: Never
      containers: [{{name: work, image: work}}]
"
        )
    };
    plane.apply(&job("batch", 0, "completions: 4\n  parallelism: 2"));
    plane.apply(&job("broken", 1, "backoffLimit: 1"));
    plane.apply(&job("later", 0, "suspend: true"));
    plane.kubectl_ok(&[
        "wait",
        "--for=condition=complete",
        "job/batch",
        "--timeout=60s",
    ]);
    let batch = json(&plane, &["get", "job", "batch"]);
    assert_eq!(batch["status"]["succeeded"], 4);
    let pods = items(&plane, &["get", "pods", "-l", "job-name=batch"]);
    assert_eq!(pods.len(), 4, "finished pods are kept, none extra");

    plane.kubectl_ok(&[
        "wait",
        "--for=condition=failed",
        "job/broken",
        "--timeout=60s",
    ]);
    let broken = json(&plane, &["get", "job", "broken"]);
    assert_eq!(
        broken["status"]["failed"], 2,
        "backoffLimit 1: two attempts"
    );
    let described = plane.kubectl_ok(&["describe", "job", "broken"]);
    assert!(described.contains("BackoffLimitExceeded"), "{described}");
    // The second attempt waited out the 10 s back-off after the first
    // failed (200 ms after it started).
    let mut created: Vec<chrono::DateTime<chrono::Utc>> =
        items(&plane, &["get", "pods", "-l", "job-name=broken"])
            .iter()
            .map(|p| {
                p["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
    created.sort_unstable();
    assert!(
        created[1] - created[0] >= chrono::Duration::seconds(10),
        "replaced too soon: {created:?}"
    );

    // A suspended Job runs nothing until resumed.
    let later = json(&plane, &["get", "job", "later"]);
    assert_eq!(later["status"]["conditions"][0]["type"], "Suspended");
    assert!(items(&plane, &["get", "pods", "-l", "job-name=later"]).is_empty());
    plane.kubectl_ok(&[
        "patch",
        "job/later",
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":false}}"#,
    ]);
    plane.kubectl_ok(&[
        "wait",
        "--for=condition=complete",
        "job/later",
        "--timeout=60s",
    ]);
    let described = plane.kubectl_ok(&["describe", "job", "later"]);
    assert!(described.contains("Job resumed"), "{described}");
}

#[test]
fn a_daemonset_follows_node_additions() {
    let plane = ControlPlane::cluster(StoreKind::Embedded, &[]);
    let sim = nodes(&plane, 2);
    plane.apply(
        r"apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      containers: [{name: agent, image: agent:v1}]
",
    );
    plane.kubectl_ok(&["rollout", "status", "daemonset/agent", "--timeout=60s"]);
    assert_eq!(live_pods(&plane, "default", "app=agent").len(), 2);
    sim.add(&["sim-2".to_owned()]);
    wait_for(
        Duration::from_secs(30),
        "a daemon pod on the new node",
        || {
            let pods = live_pods(&plane, "default", "app=agent");
            let mut on: Vec<&str> = pods
                .iter()
                .filter(|p| ready(p))
                .filter_map(|p| p["spec"]["nodeName"].as_str())
                .collect();
            on.sort_unstable();
            (on == ["sim-0", "sim-1", "sim-2"]).then_some(())
        },
    );
    plane.kubectl_ok(&["set", "image", "daemonset/agent", "agent=agent:v2"]);
    plane.kubectl_ok(&["rollout", "status", "daemonset/agent", "--timeout=60s"]);
    let pods = live_pods(&plane, "default", "app=agent");
    assert_eq!(pods.len(), 3);
    assert!(
        pods.iter()
            .all(|p| p["spec"]["containers"][0]["image"] == "agent:v2")
    );

    // Each template is a ControllerRevision; undo goes back to the first,
    // which comes back as revision 3.
    let history = plane.kubectl_ok(&["rollout", "history", "daemonset/agent"]);
    assert!(
        history.contains("1 ") && history.contains("2 "),
        "{history}"
    );
    plane.kubectl_ok(&["rollout", "undo", "daemonset/agent"]);
    plane.kubectl_ok(&["rollout", "status", "daemonset/agent", "--timeout=60s"]);
    wait_for(Duration::from_secs(30), "every daemon back on v1", || {
        let pods = live_pods(&plane, "default", "app=agent");
        (pods.len() == 3
            && pods
                .iter()
                .all(|p| p["spec"]["containers"][0]["image"] == "agent:v1"))
        .then_some(())
    });
    let third = plane.kubectl_ok(&["rollout", "history", "daemonset/agent", "--revision=3"]);
    assert!(third.contains("agent:v1"), "{third}");
    let revisions = plane.kubectl_ok(&["get", "controllerrevisions"]);
    assert!(revisions.contains("daemonset.apps/agent"), "{revisions}");
}

#[test]
fn a_statefulset_keeps_stable_names_in_order() {
    let plane = ControlPlane::cluster(StoreKind::Embedded, &[]);
    let _nodes = nodes(&plane, 2);
    plane.apply(
        r"apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  replicas: 3
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers: [{name: db, image: db:v1}]
",
    );
    plane.kubectl_ok(&["rollout", "status", "statefulset/db", "--timeout=60s"]);
    // (The order of creation is checked by the controller's unit tests:
    // timestamps here have one-second precision.)
    let pods = live_pods(&plane, "default", "app=db");
    let mut names: Vec<&str> = pods
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["db-0", "db-1", "db-2"], "stable names");
    assert!(pods.iter().all(|p| p["spec"]["subdomain"] == "db"));

    plane.kubectl_ok(&["set", "image", "statefulset/db", "db=db:v2"]);
    plane.kubectl_ok(&["rollout", "status", "statefulset/db", "--timeout=60s"]);
    let pods = live_pods(&plane, "default", "app=db");
    assert!(
        pods.iter()
            .all(|p| p["spec"]["containers"][0]["image"] == "db:v2")
    );
    let set = json(&plane, &["get", "statefulset/db"]);
    let revision = &set["status"]["updateRevision"];
    assert!(
        pods.iter()
            .all(|p| &p["metadata"]["labels"]["controller-revision-hash"] == revision),
        "pods carry the revision's name {revision}"
    );

    plane.kubectl_ok(&["rollout", "undo", "statefulset/db"]);
    plane.kubectl_ok(&["rollout", "status", "statefulset/db", "--timeout=60s"]);
    wait_for(Duration::from_secs(30), "every pod back on v1", || {
        let pods = live_pods(&plane, "default", "app=db");
        (pods.len() == 3
            && pods
                .iter()
                .all(|p| p["spec"]["containers"][0]["image"] == "db:v1"))
        .then_some(())
    });

    plane.kubectl_ok(&["scale", "statefulset/db", "--replicas=1"]);
    wait_for(Duration::from_secs(30), "db-1 and db-2 to go", || {
        let pods = live_pods(&plane, "default", "app=db");
        let names: Vec<&str> = pods
            .iter()
            .filter_map(|p| p["metadata"]["name"].as_str())
            .collect();
        (names == ["db-0"]).then_some(())
    });
}

/// Up to a minute: it waits for the next minute boundary.
#[test]
fn a_cronjob_starts_a_job_on_schedule() {
    let plane = ControlPlane::cluster(StoreKind::Embedded, &[]);
    let _nodes = nodes(&plane, 1);
    plane.apply(
        r"apiVersion: batch/v1
kind: CronJob
metadata: {name: tick}
spec:
  schedule: '* * * * *'
  concurrencyPolicy: Forbid
  jobTemplate:
    spec:
      template:
        metadata:
          annotations: {sim.wharf.dev/exit-code: '0', sim.wharf.dev/run-ms: '100'}
        spec:
          restartPolicy: Never
          containers: [{name: tick, image: tick}]
",
    );
    let job = wait_for(Duration::from_secs(75), "a job from the cronjob", || {
        let jobs = items(&plane, &["get", "jobs"]);
        jobs.first()?["metadata"]["name"]
            .as_str()
            .map(str::to_owned)
    });
    assert!(job.starts_with("tick-"), "{job}");
    plane.kubectl_ok(&[
        "wait",
        "--for=condition=complete",
        &format!("job/{job}"),
        "--timeout=30s",
    ]);
    let cronjob = json(&plane, &["get", "cronjob", "tick"]);
    assert!(
        cronjob["status"]["lastScheduleTime"].is_string(),
        "{cronjob}"
    );
    let owner = &json(&plane, &["get", "job", &job])["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "CronJob");
}

#[test]
fn a_higher_priority_pod_preempts_lower_ones() {
    let plane = ControlPlane::cluster(StoreKind::Embedded, &[]);
    let _nodes = SimNodes::start(
        &plane.kubeconfig(),
        "small",
        1,
        Shape {
            cpu: "2".to_owned(),
            ..Shape::default()
        },
    );
    plane.apply(
        r"apiVersion: apps/v1
kind: Deployment
metadata: {name: low}
spec:
  replicas: 4
  selector: {matchLabels: {app: low}}
  template:
    metadata: {labels: {app: low}}
    spec:
      containers: [{name: low, image: low, resources: {requests: {cpu: 500m}}}]
---
apiVersion: scheduling.k8s.io/v1
kind: PriorityClass
metadata: {name: high}
value: 1000
",
    );
    plane.kubectl_ok(&["rollout", "status", "deployment/low", "--timeout=60s"]);
    let refused = plane.kubectl_with_input(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Pod\nmetadata: {name: stray}\nspec: {priorityClassName: nope, containers: [{name: c, image: c}]}\n"),
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("no PriorityClass with name nope was found"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    plane.apply(
        r"apiVersion: v1
kind: Pod
metadata: {name: urgent}
spec:
  priorityClassName: high
  containers: [{name: urgent, image: urgent, resources: {requests: {cpu: '1'}}}]
",
    );
    let urgent = json(&plane, &["get", "pod", "urgent"]);
    assert_eq!(urgent["spec"]["priority"], 1000, "resolved from the class");
    wait_for(Duration::from_secs(45), "the urgent pod to run", || {
        let pod = json(&plane, &["get", "pod", "urgent"]);
        (pod["spec"]["nodeName"] == "small-0" && ready(&pod)).then_some(())
    });
    // Two 500m pods made room; their replacements wait.
    wait_for(
        Duration::from_secs(30),
        "two low pods to be pending",
        || {
            let pods = live_pods(&plane, "default", "app=low");
            let pending = pods
                .iter()
                .filter(|p| p["spec"]["nodeName"].is_null())
                .count();
            (pods.len() == 4 && pending == 2).then_some(())
        },
    );
    let events = plane.kubectl_ok(&["get", "events"]);
    assert!(events.contains("Preempted"), "{events}");
}

#[test]
fn a_drain_evicts_no_faster_than_the_disruption_budget_allows() {
    let plane = ControlPlane::cluster(StoreKind::Embedded, &[]);
    let sim = nodes(&plane, 1);
    plane.kubectl_ok(&[
        "create",
        "deployment",
        "web",
        "--image=registry.local/web:v1",
        "--replicas=3",
    ]);
    plane.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    plane.kubectl_ok(&[
        "create",
        "poddisruptionbudget",
        "web",
        "--selector=app=web",
        "--min-available=2",
    ]);
    wait_for(Duration::from_secs(30), "the budget's status", || {
        let status = json(&plane, &["get", "pdb/web"])["status"].clone();
        let counts = [
            "expectedPods",
            "currentHealthy",
            "desiredHealthy",
            "disruptionsAllowed",
        ]
        .map(|field| status[field].as_i64().unwrap_or(-1));
        (counts == [3, 3, 2, 1]).then_some(())
    });
    // Every pod is on sim-0; draining it moves them to sim-1 one at a time.
    sim.add(&["sim-1".to_owned()]);
    let drain = {
        let kubeconfig = plane.kubeconfig();
        std::thread::spawn(move || {
            std::process::Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .args(["drain", "sim-0", "--timeout=120s"])
                .output()
                .expect("kubectl drain runs")
        })
    };
    let mut least_ready = usize::MAX;
    while !drain.is_finished() {
        let pods = live_pods(&plane, "default", "app=web");
        least_ready = least_ready.min(pods.iter().filter(|p| ready(p)).count());
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = drain.join().expect("the drain thread");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kubectl drain failed: {stderr}");
    assert!(
        stderr.contains("Cannot evict pod as it would violate the pod's disruption budget"),
        "the budget held the second eviction back: {stderr}"
    );
    assert!(
        least_ready >= 2,
        "minAvailable 2 was broken: {least_ready} ready"
    );
    let pods = live_pods(&plane, "default", "app=web");
    assert_eq!(pods.len(), 3);
    assert!(
        pods.iter()
            .all(|p| p["spec"]["nodeName"] == "sim-1" && ready(p))
    );
    let node = json(&plane, &["get", "node/sim-0"]);
    assert_eq!(node["spec"]["unschedulable"], true, "drain cordons first");
}

#[test]
fn an_autoscaler_follows_reported_cpu_usage() {
    let plane = ControlPlane::cluster(
        StoreKind::Embedded,
        &["--horizontal-pod-autoscaler-sync-period=1"],
    );
    let _nodes = nodes(&plane, 2);
    plane.apply(
        r"apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations: {sim.wharf.dev/usage: cpu=200m}
    spec:
      containers:
      - name: web
        image: registry.local/web:v1
        resources: {requests: {cpu: 100m}}
",
    );
    plane.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    plane.apply(
        r"apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: web}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  minReplicas: 2
  maxReplicas: 5
  metrics:
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}
  behavior:
    scaleDown: {stabilizationWindowSeconds: 0}
",
    );
    // 200% of the request against a 50% target: four times the pods,
    // capped at maxReplicas.
    wait_for(Duration::from_secs(60), "a scale-up to 5", || {
        let hpa = json(&plane, &["get", "hpa/web"]);
        let utilization =
            &hpa["status"]["currentMetrics"][0]["resource"]["current"]["averageUtilization"];
        (hpa["status"]["desiredReplicas"] == 5 && *utilization == 200).then_some(())
    });
    plane.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    assert_eq!(live_pods(&plane, "default", "app=web").len(), 5);
    // kubectl top reads the reports (new pods' come within a second).
    wait_for(
        Duration::from_secs(10),
        "kubectl top showing 5 pods",
        || {
            let top = plane.kubectl(&["top", "pods", "-l", "app=web"]);
            (String::from_utf8_lossy(&top.stdout).matches("200m").count() == 5).then_some(())
        },
    );

    // The load drops to 20%: 5 * 0.4 = 2 pods.
    plane.kubectl_ok(&[
        "annotate",
        "pods",
        "-l",
        "app=web",
        "--overwrite",
        "sim.wharf.dev/usage=cpu=20m",
    ]);
    wait_for(Duration::from_secs(60), "a scale-down to 2", || {
        let deployment = json(&plane, &["get", "deployment/web"]);
        (deployment["spec"]["replicas"] == 2).then_some(())
    });
    let hpa = json(&plane, &["get", "hpa/web"]);
    let conditions = hpa["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let active = conditions
        .iter()
        .find(|c| c["type"] == "ScalingActive")
        .expect("ScalingActive");
    assert_eq!(active["reason"], "ValidMetricFound");
    let described = plane.kubectl_ok(&["describe", "hpa/web"]);
    assert!(
        described.contains(
            "New size: 5; reason: cpu resource utilization (percentage of request) above target"
        ),
        "{described}"
    );
    assert!(
        described.contains("New size: 2; reason: All metrics below target"),
        "{described}"
    );
}
