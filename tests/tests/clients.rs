//! Clients nobody here wrote, against wharf-control: kube-rs (the agent's
//! watchers are kube-rs), the official Python client, and raw HTTP for
//! the error paths; plus durability of acknowledged writes across kill -9.

use std::{
    path::Path,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{
    Api, Client, Config,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher::{self, Event},
};
use wharf_tests::control::{ControlPlane, StoreKind};

wharf_tests::on_both_stores!(
    bindings_write_the_pod_as_upstream_does,
    kube_watchers_see_every_change,
    acknowledged_writes_survive_kill_9,
    python_client_crud_and_watch,
);

async fn client(kubeconfig: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    Client::try_from(config).expect("kube client")
}

fn config_map(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
        "data": { "k": value },
    }))
    .expect("a ConfigMap")
}

/// pods/binding as upstream's binding storage writes it: only a Node is a
/// target; the pod gets the node, `PodScheduled` and the binding's
/// annotations, and nothing else changes (no field manager's entry, no
/// generation); a bound pod is not bound again.
fn bindings_write_the_pod_as_upstream_does(plane: ControlPlane) {
    plane.runtime().block_on(async {
        let client = client(&plane.kubeconfig()).await;
        let pods: Api<Pod> = Api::namespaced(client, "default");
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "bound"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        }))
        .unwrap();
        let created = pods.create(&PostParams::default(), &pod).await.unwrap();
        let bind = |kind: &str| {
            let binding = serde_json::json!({
                "apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": "bound", "annotations": {"example.com/bound-by": "test"}},
                "target": {"kind": kind, "name": "node-1"},
            });
            let pods = pods.clone();
            async move {
                pods.create_subresource::<serde_json::Value>(
                    "binding",
                    "bound",
                    &PostParams::default(),
                    serde_json::to_vec(&binding).unwrap(),
                )
                .await
            }
        };
        let status = |outcome: Result<serde_json::Value, kube::Error>| match outcome {
            Err(kube::Error::Api(response)) => response.code,
            other => panic!("an API error, not {other:?}"),
        };
        assert_eq!(status(bind("Pod").await), 422, "only Nodes are targets");
        bind("Node").await.expect("bound");

        let bound = pods.get("bound").await.unwrap();
        assert_eq!(
            bound.spec.as_ref().unwrap().node_name.as_deref(),
            Some("node-1")
        );
        let annotations = bound.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(
            annotations.get("example.com/bound-by").map(String::as_str),
            Some("test")
        );
        let conditions = bound.status.as_ref().unwrap().conditions.clone().unwrap();
        let scheduled = conditions
            .iter()
            .find(|c| c.type_ == "PodScheduled")
            .expect("PodScheduled");
        assert_eq!(scheduled.status, "True");
        assert!(scheduled.last_transition_time.is_some());
        assert!(scheduled.last_probe_time.is_none());
        assert_eq!(
            bound.metadata.managed_fields,
            created.metadata.managed_fields
        );
        assert_eq!(bound.metadata.generation, created.metadata.generation);

        assert_eq!(status(bind("").await), 409, "already bound");
    });
}

fn kube_watchers_see_every_change(plane: ControlPlane) {
    plane.runtime().block_on(async {
        let client = client(&plane.kubeconfig()).await;
        let api: Api<ConfigMap> = Api::namespaced(client, "default");
        api.create(&PostParams::default(), &config_map("before", "0"))
            .await
            .unwrap();
        // Both list+watch and streaming lists (sendInitialEvents), as
        // kube-rs offers them.
        for config in [
            watcher::Config::default(),
            watcher::Config::default().streaming_lists(),
        ] {
            let mut events = watcher::watcher(api.clone(), config).boxed();
            let mut initial = Vec::new();
            loop {
                match tokio::time::timeout(Duration::from_secs(10), events.try_next()).await {
                    Ok(Ok(Some(Event::InitApply(cm)))) => initial.push(cm.metadata.name.unwrap()),
                    Ok(Ok(Some(Event::InitDone))) => break,
                    Ok(Ok(Some(Event::Init))) => {}
                    other => panic!("initial listing: {other:?}"),
                }
            }
            assert!(initial.contains(&"before".to_owned()), "{initial:?}");
            let name = format!("live-{}", initial.len());
            api.create(&PostParams::default(), &config_map(&name, "1"))
                .await
                .unwrap();
            let patch = serde_json::json!({ "data": { "k": "2" } });
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
            api.delete(&name, &DeleteParams::default()).await.unwrap();
            let mut seen = Vec::new();
            while seen.len() < 3 {
                let event = tokio::time::timeout(Duration::from_secs(10), events.try_next())
                    .await
                    .expect("event within 10 s")
                    .expect("watch error")
                    .expect("watch ended");
                match event {
                    Event::Apply(cm) => seen.push(format!("apply {}", cm.data.unwrap()["k"])),
                    Event::Delete(cm) => seen.push(format!("delete {}", cm.metadata.name.unwrap())),
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!(
                seen,
                ["apply 1", "apply 2", format!("delete {name}").as_str()]
            );
        }
    });
}

fn acknowledged_writes_survive_kill_9(mut plane: ControlPlane) {
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let kubeconfig = plane.kubeconfig();
    let writers = runtime.block_on(async {
        let client = client(&kubeconfig).await;
        (0..4)
            .map(|writer| {
                let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
                let acknowledged = Arc::clone(&acknowledged);
                tokio::spawn(async move {
                    for i in 0.. {
                        let name = format!("burst-{writer}-{i}");
                        match api
                            .create(&PostParams::default(), &config_map(&name, "x"))
                            .await
                        {
                            Ok(_) => acknowledged.lock().unwrap().push(name),
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(1500));
    plane.kill();
    runtime.block_on(async {
        for writer in writers {
            writer.await.unwrap();
        }
    });
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 10,
        "only {} writes before the kill",
        acknowledged.len()
    );
    plane.restart();
    runtime.block_on(async {
        let api: Api<ConfigMap> = Api::namespaced(client(&kubeconfig).await, "default");
        let stored: Vec<String> = api
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|cm| cm.metadata.name)
            .collect();
        let lost: Vec<&String> = acknowledged
            .iter()
            .filter(|name| !stored.contains(name))
            .collect();
        assert!(
            lost.is_empty(),
            "{} acknowledged writes lost: {lost:?}",
            lost.len()
        );
    });
}

fn python_client_crud_and_watch(plane: ControlPlane) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/client_check.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(plane.kubeconfig())
        .output()
        .expect("run python3 (scripts/setup.sh installs the kubernetes package)");
    assert!(
        output.status.success(),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Status code of a raw HTTPS request made with curl.
fn curl_status(plane: &ControlPlane, args: &[&str]) -> (u16, String) {
    let output = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--cacert"])
        .arg(plane.ca_file())
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or_default();
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn anonymous_requests_are_refused_and_tokens_authenticate() {
    let mut plane = ControlPlane::start(StoreKind::Embedded);
    let url = format!("{}/api/v1/namespaces", plane.url());
    let (code, body) = curl_status(&plane, &[&url]);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("\"reason\":\"Unauthorized\""), "{body}");
    plane.restart_with_tokens("s3cret,alice,1000,\"system:masters\"\nplain,bob,1001\n");
    let (code, body) = curl_status(&plane, &["-H", "Authorization: Bearer s3cret", &url]);
    assert_eq!(code, 200, "{body}");
    // Authenticated but not authorized: 403, not 401.
    let (code, body) = curl_status(&plane, &["-H", "Authorization: Bearer plain", &url]);
    assert_eq!(code, 403, "{body}");
    let (code, _) = curl_status(&plane, &["-H", "Authorization: Bearer wrong", &url]);
    assert_eq!(code, 401);
}

#[test]
fn malformed_and_oversized_bodies_get_statuses_not_writes() {
    let plane = ControlPlane::start(StoreKind::Embedded);
    let path = "/api/v1/namespaces/default/configmaps";
    let bad = plane.path().join("bad.json");
    std::fs::write(&bad, "{\"metadata\": ").unwrap();
    let output = plane.kubectl(&["create", "--raw", path, "-f", bad.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("BadRequest"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let big = plane.path().join("big.json");
    let payload = "x".repeat(4 * 1024 * 1024);
    std::fs::write(
        &big,
        format!("{{\"metadata\":{{\"name\":\"big\"}},\"data\":{{\"k\":\"{payload}\"}}}}"),
    )
    .unwrap();
    let output = plane.kubectl(&["create", "--raw", path, "-f", big.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("RequestEntityTooLarge") || stderr.contains("larger than"),
        "{stderr}"
    );
    let list = plane.kubectl_ok(&["get", "configmaps", "-n", "default", "-o", "name"]);
    assert!(list.trim().is_empty(), "nothing was written: {list}");
    // An applied configuration whose metadata is not an object.
    let pki = plane.data_dir().join("pki");
    let (code, body) = curl_status(
        &plane,
        &[
            "--cert",
            pki.join("admin.crt").to_str().unwrap(),
            "--key",
            pki.join("admin.key").to_str().unwrap(),
            "-X",
            "PATCH",
            "-H",
            "Content-Type: application/apply-patch+yaml",
            "--data-binary",
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":"x"}"#,
            &format!("{}{path}/x?fieldManager=test", plane.url()),
        ],
    );
    assert_eq!(code, 400, "{body}");
    let missing = plane.kubectl(&["get", "--raw", "/apis/nope.example.com/v1/things"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NotFound"));
}

/// A node agent's kubelet API stand-in: serves /containerLogs over TLS
/// with a certificate from the cluster CA, echoing what it was asked.
fn fake_kubelet(plane: &ControlPlane) -> (tokio::runtime::Runtime, u16) {
    use axum::{
        Router,
        extract::{Path as UrlPath, RawQuery},
        routing::get,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ca = wharf_control::pki::Authority::load_or_create(&plane.data_dir()).unwrap();
    let serving = ca
        .issue_serving(&[], &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let tls = wharf_control::apiserver::tls::server_config(&ca.cert_pem, &serving).unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = Router::new().route(
        "/containerLogs/{namespace}/{pod}/{container}",
        get(
            |UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
             RawQuery(query): RawQuery| async move {
                format!(
                    "log of {namespace}/{pod}/{container}\nquery {}\n",
                    query.unwrap_or_default()
                )
            },
        ),
    );
    runtime.spawn(wharf_control::apiserver::tls::accept(
        listener,
        tls,
        router,
        std::future::pending(),
    ));
    (runtime, port)
}

#[test]
fn pod_logs_are_proxied_to_the_node() {
    let plane = ControlPlane::start(StoreKind::Embedded);
    let (_kubelet, port) = fake_kubelet(&plane);
    plane.apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\n\
         status:\n  addresses: [{{type: InternalIP, address: 127.0.0.1}}]\n  daemonEndpoints: {{kubeletEndpoint: {{Port: {port}}}}}\n"
    ));
    plane.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: default}\n\
         spec:\n  nodeName: n1\n  containers: [{name: app, image: nginx}, {name: side, image: envoy}]\n",
    );
    let logs = plane.kubectl_ok(&["logs", "web", "-n", "default", "-c", "app", "--tail=2"]);
    assert_eq!(logs, "log of default/web/app\nquery tailLines=2\n");
    // kubectl picks a container itself; the API asks for one.
    let ambiguous = plane.kubectl(&["get", "--raw", "/api/v1/namespaces/default/pods/web/log"]);
    let stderr = String::from_utf8_lossy(&ambiguous.stderr);
    assert!(
        stderr
            .contains("a container name must be specified for pod web, choose one of: [app side]"),
        "{stderr}"
    );
    plane.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: pending, namespace: default}\nspec:\n  containers: [{name: c, image: busybox}]\n");
    let unbound = plane.kubectl(&["logs", "pending", "-n", "default"]);
    assert!(String::from_utf8_lossy(&unbound.stderr).contains("does not have a host assigned"));
}
