//! kubectl 1.32, unmodified, against a freshly started wharf-control on
//! each store.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;
use wharf_tests::control::{ControlPlane, StoreKind};

wharf_tests::on_both_stores!(
    apply_get_describe_and_reapply,
    patches_of_every_type,
    selectors_pick_objects,
    watch_sees_changes,
    invalid_manifests_are_rejected_like_upstream,
    stale_updates_conflict,
    finalizers_hold_deletion,
    server_side_apply_owns_fields,
    generator_commands_send_protobuf,
);

#[test]
fn service_ips_are_never_shared_embedded() {
    service_ips_are_never_shared(StoreKind::Embedded);
}

#[test]
fn service_ips_are_never_shared_etcd() {
    service_ips_are_never_shared(StoreKind::Etcd);
}

/// A /27 has 30 addresses for Services; the first is the `kubernetes`
/// Service's, so 29 more fit. 35 concurrent creates: 29 win, each with
/// its own IP, 6 are refused, and a delete frees an IP for reuse.
fn service_ips_are_never_shared(store: StoreKind) {
    let plane = ControlPlane::start_with_args(store, &["--service-cidr", "10.96.0.0/27"]);
    let service = |i: usize| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\nspec:\n  type: NodePort\n  ports: [{{port: 80}}]\n"
        )
    };
    let outcomes: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..35)
            .map(|i| {
                let plane = &plane;
                let manifest = service(i);
                scope.spawn(move || {
                    plane
                        .kubectl_with_input(&["create", "-f", "-"], Some(&manifest))
                        .status
                        .success()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(outcomes.iter().filter(|ok| **ok).count(), 29);
    let list = json(&plane, &["get", "services", "-n", "default"]);
    let items = list["items"].as_array().unwrap();
    let mut ips: Vec<&str> = items
        .iter()
        .map(|s| s["spec"]["clusterIP"].as_str().unwrap())
        .collect();
    let mut ports: Vec<i64> = items
        .iter()
        .filter_map(|s| s["spec"]["ports"][0]["nodePort"].as_i64())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(
        (ips.len(), ports.len()),
        (30, 29),
        "distinct IPs (with kubernetes) and node ports"
    );
    let refused = plane.kubectl_with_input(&["create", "-f", "-"], Some(&service(99)));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("range is full"));
    let winner = items
        .iter()
        .find(|s| s["metadata"]["name"] != "kubernetes")
        .unwrap();
    plane.kubectl_ok(&[
        "delete",
        "service",
        winner["metadata"]["name"].as_str().unwrap(),
        "-n",
        "default",
    ]);
    let reused = plane.kubectl_with_input(&["create", "-f", "-"], Some(&service(99)));
    assert!(
        reused.status.success(),
        "{}",
        String::from_utf8_lossy(&reused.stderr)
    );
}

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels: {app: web, tier: front}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: nginx:1.27
        ports:
        - containerPort: 80
        env:
        - {name: MODE, value: fast}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  selector: {app: web}
  ports:
  - name: http
    port: 80
    targetPort: 80
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: shop
  labels: {app: web}
data:
  mode: fast
---
apiVersion: v1
kind: Secret
metadata:
  name: creds
  namespace: shop
stringData:
  password: hunter2
"#;

fn json(plane: &ControlPlane, args: &[&str]) -> Value {
    let mut full = args.to_vec();
    full.extend(["-o", "json"]);
    serde_json::from_str(&plane.kubectl_ok(&full)).expect("kubectl -o json output")
}

fn apply_get_describe_and_reapply(plane: ControlPlane) {
    let first = plane.apply(APP);
    for created in [
        "namespace/shop created",
        "deployment.apps/web created",
        "service/web created",
        "configmap/settings created",
        "secret/creds created",
    ] {
        assert!(first.contains(created), "{created} missing from: {first}");
    }
    let second = plane.apply(APP);
    assert_eq!(
        second.matches("unchanged").count(),
        4,
        "second apply: {second}"
    );
    // stringData is write-only, so kubectl always re-sends it: upstream
    // reports the Secret configured on every apply too.
    assert!(second.contains("secret/creds configured"), "{second}");

    let table = plane.kubectl_ok(&["get", "deployments", "-n", "shop"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]);
    assert!(table.contains("web") && table.contains("0/2"), "{table}");
    let wide = plane.kubectl_ok(&["get", "deployments", "-n", "shop", "-o", "wide"]);
    assert!(
        wide.contains("nginx:1.27") && wide.contains("app=web"),
        "{wide}"
    );
    let services = plane.kubectl_ok(&["get", "svc", "-n", "shop"]);
    assert!(
        services.starts_with("NAME")
            && services.contains("CLUSTER-IP")
            && services.contains("80/TCP"),
        "{services}"
    );

    let deployment = json(&plane, &["get", "deploy", "web", "-n", "shop"]);
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        deployment["spec"]["strategy"]["type"], "RollingUpdate",
        "defaulted"
    );
    assert_eq!(deployment["metadata"]["generation"], 1);
    assert!(
        deployment["metadata"]["uid"]
            .as_str()
            .is_some_and(|uid| uid.len() == 36)
    );
    let yaml = plane.kubectl_ok(&["get", "cm", "settings", "-n", "shop", "-o", "yaml"]);
    assert!(yaml.contains("mode: fast"), "{yaml}");
    let described = plane.kubectl_ok(&["describe", "deployment", "web", "-n", "shop"]);
    assert!(
        described.contains("Image:") && described.contains("nginx:1.27"),
        "{described}"
    );

    let password = plane.kubectl_ok(&[
        "get",
        "secret",
        "creds",
        "-n",
        "shop",
        "-o",
        "jsonpath={.data.password}",
    ]);
    assert_eq!(password, "aHVudGVyMg==");
    if plane.store() == StoreKind::Embedded {
        let raw = std::fs::read(plane.store_file()).unwrap();
        for plaintext in [&b"hunter2"[..], b"aHVudGVyMg=="] {
            assert!(
                !raw.windows(plaintext.len()).any(|w| w == plaintext),
                "secret stored in clear"
            );
        }
    }
}

fn patches_of_every_type(plane: ControlPlane) {
    plane.apply(APP);
    let ns = ["-n", "shop"];
    let patch = |kind: &str, body: &str| {
        let mut args = vec!["patch", "deployment", "web", "--type", kind, "-p", body];
        args.extend(ns);
        plane.kubectl_ok(&args)
    };
    patch("merge", r#"{"spec":{"replicas":3}}"#);
    patch(
        "json",
        r#"[{"op":"add","path":"/metadata/labels/patched","value":"json"}]"#,
    );
    patch(
        "strategic",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"web","image":"nginx:1.28","env":[{"name":"EXTRA","value":"1"}]}]}}}}"#,
    );
    let deployment = json(&plane, &["get", "deploy", "web", "-n", "shop"]);
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(deployment["metadata"]["labels"]["patched"], "json");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "nginx:1.28");
    // Strategic merge keeps the list items the patch did not name.
    assert_eq!(container["ports"][0]["containerPort"], 80);
    let env: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(env, ["MODE", "EXTRA"]);
    assert_eq!(deployment["metadata"]["generation"], 3, "two spec changes");
    plane.kubectl_ok(&["scale", "deployment", "web", "-n", "shop", "--replicas=5"]);
    assert_eq!(
        json(&plane, &["get", "deploy", "web", "-n", "shop"])["spec"]["replicas"],
        5
    );
    let failed = plane.kubectl(&[
        "patch",
        "deployment",
        "web",
        "-n",
        "shop",
        "--type",
        "json",
        "-p",
        r#"[{"op":"test","path":"/spec/replicas","value":1}]"#,
    ]);
    assert!(!failed.status.success());
}

fn selectors_pick_objects(plane: ControlPlane) {
    plane.apply(APP);
    let names = |args: &[&str]| {
        let mut full = vec!["get", "-n", "shop", "-o", "name"];
        full.extend(args);
        let mut out: Vec<String> = plane.kubectl_ok(&full).lines().map(str::to_owned).collect();
        out.sort();
        out
    };
    assert_eq!(
        names(&["deploy,svc,cm", "-l", "app=web"]),
        ["configmap/settings", "deployment.apps/web", "service/web"]
    );
    assert_eq!(
        names(&["deploy,svc,cm", "-l", "tier in (front),app"]),
        ["deployment.apps/web"]
    );
    assert!(names(&["cm", "-l", "app!=web"]).is_empty());
    assert_eq!(
        names(&["cm", "--field-selector", "metadata.name=settings"]),
        ["configmap/settings"]
    );
    let bad = plane.kubectl(&[
        "get",
        "pods",
        "-n",
        "shop",
        "--field-selector",
        "spec.bogus=1",
    ]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("field label not supported: spec.bogus"));
    let all = plane.kubectl_ok(&["get", "cm", "-A", "-l", "app=web"]);
    assert!(
        all.starts_with("NAMESPACE") && all.contains("shop"),
        "{all}"
    );
}

fn watch_sees_changes(plane: ControlPlane) {
    plane.apply(APP);
    let mut watcher = Command::new("kubectl")
        .args([
            "get",
            "configmaps",
            "-n",
            "shop",
            "-w",
            "--output-watch-events",
            "-o",
            "custom-columns=EVENT:.type,NAME:.object.metadata.name,MODE:.object.data.mode",
            "--no-headers",
        ])
        .env("KUBECONFIG", plane.kubeconfig())
        .env("HOME", plane.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = watcher.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx
                .send(line.split_whitespace().collect::<Vec<_>>().join(" "))
                .is_err()
            {
                break;
            }
        }
    });
    let next = || {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("watch event within 10 s")
    };
    assert_eq!(next(), "ADDED settings fast");
    let extra = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: extra\n  namespace: shop\ndata:\n  mode: slow\n";
    plane.kubectl_with_input(&["create", "-f", "-"], Some(extra));
    assert_eq!(next(), "ADDED extra slow");
    plane.kubectl_ok(&[
        "patch",
        "cm",
        "settings",
        "-n",
        "shop",
        "-p",
        r#"{"data":{"mode":"eco"}}"#,
    ]);
    assert_eq!(next(), "MODIFIED settings eco");
    plane.kubectl_ok(&["delete", "cm", "extra", "-n", "shop"]);
    assert_eq!(next(), "DELETED extra slow");
    let metrics = plane.kubectl_ok(&["get", "--raw", "/metrics"]);
    assert!(
        metrics.contains("apiserver_longrunning_requests{resource=\"configmaps\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "apiserver_request_total{verb=\"PATCH\",resource=\"configmaps\",code=\"200\"} 1"
        ),
        "{metrics}"
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
}

fn invalid_manifests_are_rejected_like_upstream(plane: ControlPlane) {
    let bad_pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: Bad_Name\n  namespace: default\nspec:\n  containers:\n  - name: c\n";
    let output = plane.kubectl_with_input(&["apply", "-f", "-"], Some(bad_pod));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("The Pod \"Bad_Name\" is invalid:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("metadata.name: Invalid value: \"Bad_Name\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("spec.containers[0].image: Required value"),
        "{stderr}"
    );

    let unknown_field =
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n  namespace: default\nbogus: 1\n";
    let output = plane.kubectl_with_input(&["apply", "-f", "-"], Some(unknown_field));
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown field \"bogus\""));

    let selector_mismatch = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\n  namespace: default\nspec:\n  selector:\n    matchLabels: {app: a}\n  template:\n    metadata:\n      labels: {app: b}\n    spec:\n      containers:\n      - {name: c, image: busybox}\n";
    let output = plane.kubectl_with_input(&["apply", "-f", "-"], Some(selector_mismatch));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("`selector` does not match template `labels`")
    );

    let missing = plane.kubectl(&["get", "deployment", "nope", "-n", "default"]);
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr).trim(),
        "Error from server (NotFound): deployments.apps \"nope\" not found"
    );
    let no_namespace =
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n  namespace: absent\n";
    let output = plane.kubectl_with_input(&["apply", "-f", "-"], Some(no_namespace));
    assert!(String::from_utf8_lossy(&output.stderr).contains("namespaces \"absent\" not found"));
}

fn stale_updates_conflict(plane: ControlPlane) {
    plane.apply(APP);
    let mut stale = json(&plane, &["get", "cm", "settings", "-n", "shop"]);
    plane.kubectl_ok(&["label", "cm", "settings", "-n", "shop", "fresh=yes"]);
    stale["data"]["mode"] = "stale".into();
    let output = plane.kubectl_with_input(&["replace", "-f", "-"], Some(&stale.to_string()));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "the object has been modified; please apply your changes to the latest version"
        ),
        "{stderr}"
    );
    let current = json(&plane, &["get", "cm", "settings", "-n", "shop"]);
    assert_eq!(current["data"]["mode"], "fast");
    assert_eq!(current["metadata"]["labels"]["fresh"], "yes");
}

fn finalizers_hold_deletion(plane: ControlPlane) {
    let held = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: held\n  namespace: default\n  finalizers: [example.com/hold]\n";
    plane.apply(held);
    plane.kubectl_ok(&["delete", "cm", "held", "-n", "default", "--wait=false"]);
    let marked = json(&plane, &["get", "cm", "held", "-n", "default"]);
    assert!(
        marked["metadata"]["deletionTimestamp"].is_string(),
        "{marked}"
    );
    plane.kubectl_ok(&[
        "patch",
        "cm",
        "held",
        "-n",
        "default",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    let gone = plane.kubectl(&["get", "cm", "held", "-n", "default"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
    plane.apply(APP);
    plane.kubectl_ok(&["delete", "deployment", "web", "-n", "shop"]);
    let gone = plane.kubectl(&["get", "deployment", "web", "-n", "shop"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
}

fn server_side_apply_owns_fields(plane: ControlPlane) {
    let ssa = |extra: &[&str]| {
        let mut args = vec!["apply", "--server-side", "-f", "-"];
        args.extend(extra);
        plane.kubectl_with_input(&args, Some(APP))
    };
    let first = ssa(&[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("deployment.apps/web serverside-applied")
    );
    let version = |plane: &ControlPlane| {
        json(plane, &["get", "deploy", "web", "-n", "shop"])["metadata"]["resourceVersion"].clone()
    };
    let before = version(&plane);
    assert!(ssa(&[]).status.success());
    assert_eq!(
        version(&plane),
        before,
        "re-applying the same configuration is a no-op"
    );

    let deployment = json(
        &plane,
        &[
            "get",
            "deploy",
            "web",
            "-n",
            "shop",
            "--show-managed-fields",
        ],
    );
    let managers = deployment["metadata"]["managedFields"].as_array().unwrap();
    let kubectl = managers
        .iter()
        .find(|m| m["manager"] == "kubectl" && m["operation"] == "Apply")
        .unwrap();
    assert_eq!(
        kubectl["fieldsV1"]["f:spec"]["f:replicas"],
        serde_json::json!({})
    );
    assert!(kubectl["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"]["f:image"].is_object());

    plane.kubectl_ok(&[
        "patch",
        "deployment",
        "web",
        "-n",
        "shop",
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":7}}"#,
        "--field-manager=autoscaler",
    ]);
    let conflict = ssa(&[]);
    assert!(!conflict.status.success());
    let stderr = String::from_utf8_lossy(&conflict.stderr);
    assert!(stderr.contains("Apply failed with 1 conflict: conflict with \"autoscaler\" using apps/v1: .spec.replicas"), "{stderr}");
    assert_eq!(
        json(&plane, &["get", "deploy", "web", "-n", "shop"])["spec"]["replicas"],
        7
    );
    assert!(ssa(&["--force-conflicts"]).status.success());
    assert_eq!(
        json(&plane, &["get", "deploy", "web", "-n", "shop"])["spec"]["replicas"],
        2
    );

    // Dropping a field from the configuration removes it.
    let without_label = APP.replace("labels: {app: web, tier: front}", "labels: {app: web}");
    let applied =
        plane.kubectl_with_input(&["apply", "--server-side", "-f", "-"], Some(&without_label));
    assert!(applied.status.success());
    let labels = &json(&plane, &["get", "deploy", "web", "-n", "shop"])["metadata"]["labels"];
    assert_eq!(*labels, serde_json::json!({"app": "web"}));
}

/// `kubectl create <kind>` sends protobuf bodies.
fn generator_commands_send_protobuf(plane: ControlPlane) {
    for args in [
        &["create", "namespace", "team"][..],
        &[
            "create",
            "configmap",
            "c",
            "-n",
            "team",
            "--from-literal=a=b",
        ],
        &[
            "create",
            "secret",
            "generic",
            "s",
            "-n",
            "team",
            "--from-literal=p=hunter2",
        ],
        &[
            "create",
            "deployment",
            "web",
            "-n",
            "team",
            "--image=nginx",
            "--replicas=3",
            "--port=80",
        ],
        &[
            "create",
            "deployment",
            "idle",
            "-n",
            "team",
            "--image=nginx",
            "--replicas=0",
        ],
        &[
            "create",
            "service",
            "clusterip",
            "web",
            "-n",
            "team",
            "--tcp=80:8080",
        ],
        &["create", "serviceaccount", "bot", "-n", "team"],
        &[
            "create",
            "role",
            "r",
            "-n",
            "team",
            "--verb=get",
            "--resource=pods",
        ],
        &[
            "create",
            "rolebinding",
            "rb",
            "-n",
            "team",
            "--role=r",
            "--user=alice",
        ],
        &["create", "job", "j", "-n", "team", "--image=busybox"],
        &[
            "create",
            "cronjob",
            "cj",
            "-n",
            "team",
            "--image=busybox",
            "--schedule=*/5 * * * *",
        ],
        &[
            "create",
            "poddisruptionbudget",
            "p",
            "-n",
            "team",
            "--selector=app=web",
            "--min-available=1",
        ],
    ] {
        plane.kubectl_ok(args);
    }
    let deployment = json(&plane, &["get", "deploy", "web", "-n", "team"]);
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(deployment["spec"]["selector"]["matchLabels"]["app"], "web");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        (
            container["image"].as_str(),
            container["ports"][0]["containerPort"].as_i64()
        ),
        (Some("nginx"), Some(80))
    );
    assert_eq!(
        json(&plane, &["get", "deploy", "idle", "-n", "team"])["spec"]["replicas"],
        0,
        "an explicit zero is kept"
    );
    let service = json(&plane, &["get", "svc", "web", "-n", "team"]);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], 8080);
    assert_eq!(
        json(&plane, &["get", "secret", "s", "-n", "team"])["data"]["p"],
        "aHVudGVyMg=="
    );
    assert_eq!(
        json(&plane, &["get", "rolebinding", "rb", "-n", "team"])["subjects"][0]["name"],
        "alice"
    );
    assert_eq!(
        json(&plane, &["get", "job", "j", "-n", "team"])["spec"]["template"]["spec"]["restartPolicy"],
        "Never"
    );
}

#[test]
fn watches_get_bookmarks_and_410_when_too_old() {
    let mut plane = ControlPlane::start(StoreKind::Embedded);
    let created =
        plane.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: default}\n");
    assert!(created.contains("created"));
    let version: i64 =
        json(&plane, &["get", "cm", "c", "-n", "default"])["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
    let watch = |plane: &ControlPlane, from: i64, extra: &str| {
        let path = format!(
            "/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={from}&timeoutSeconds=12{extra}"
        );
        plane.kubectl(&["get", "--raw", &path])
    };
    let bookmarked = watch(&plane, version, "&allowWatchBookmarks=true");
    let stdout = String::from_utf8_lossy(&bookmarked.stdout);
    assert!(
        stdout.contains("\"type\":\"BOOKMARK\""),
        "a bookmark within 12 s: {stdout}"
    );
    // A restarted server's watch cache starts at the store's revision:
    // older versions are gone, and clients re-list.
    plane.restart();
    let too_old = watch(&plane, version - 1, "");
    let stderr = String::from_utf8_lossy(&too_old.stderr);
    assert!(stderr.contains("too old resource version"), "{stderr}");
}

#[test]
fn bound_pods_end_gracefully_and_status_is_the_systems() {
    let plane = ControlPlane::start(StoreKind::Embedded);
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: default}\n\
               spec:\n  nodeName: n1\n  containers: [{name: c, image: busybox}]\n\
               status: {phase: Succeeded, podIP: 10.0.0.9}\n";
    plane.apply(pod);
    let created = json(&plane, &["get", "pod", "p", "-n", "default"]);
    assert_eq!(
        created["status"]["phase"], "Pending",
        "a client's status is not taken on create"
    );
    assert!(created["status"]["podIP"].is_null());
    plane.kubectl_ok(&["delete", "pod", "p", "-n", "default", "--wait=false"]);
    let marked = json(&plane, &["get", "pod", "p", "-n", "default"]);
    assert_eq!(marked["metadata"]["deletionGracePeriodSeconds"], 30);
    // The node reporting status while the pod stops must not delete it.
    plane.kubectl_ok(&[
        "patch",
        "pod",
        "p",
        "-n",
        "default",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running"}}"#,
    ]);
    plane.kubectl_ok(&["label", "pod", "p", "-n", "default", "stopping=yes"]);
    assert!(
        json(&plane, &["get", "pod", "p", "-n", "default"])["metadata"]["deletionTimestamp"]
            .is_string()
    );
    plane.kubectl_ok(&[
        "delete",
        "pod",
        "p",
        "-n",
        "default",
        "--grace-period=0",
        "--force",
    ]);
    let gone = plane.kubectl(&["get", "pod", "p", "-n", "default"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
}
