//! RBAC and the node authorizer, through kubectl with other identities.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use wharf_tests::control::{ControlPlane, StoreKind};

/// kubectl with another kubeconfig: (success, stderr).
fn kubectl_as(
    plane: &ControlPlane,
    kubeconfig: &Path,
    args: &[&str],
    input: Option<&str>,
) -> (bool, String) {
    let mut full = vec!["--kubeconfig", kubeconfig.to_str().unwrap()];
    full.extend(args);
    let output = plane.kubectl_with_input(&full, input);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// RBAC takes effect through the watch cache: poll briefly.
fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn role_bindings_grant_what_their_roles_say() {
    let mut plane = ControlPlane::start(StoreKind::Embedded);
    plane.restart_with_tokens("alice-token,alice,1000\n");
    let alice = plane.kubeconfig_for_token("alice", "alice-token");
    plane.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: team}\n");

    let (ok, stderr) = kubectl_as(&plane, &alice, &["get", "pods", "-n", "team"], None);
    assert!(!ok);
    assert!(
        stderr.contains("Error from server (Forbidden): pods is forbidden: User \"alice\" cannot list resource \"pods\" in API group \"\" in the namespace \"team\""),
        "{stderr}"
    );
    // Discovery is open to every authenticated user.
    assert!(kubectl_as(&plane, &alice, &["api-resources"], None).0);

    plane.apply(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: alice-admin, namespace: team}\n\
         roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: admin}\n\
         subjects: [{kind: User, name: alice}]\n",
    );
    assert!(eventually(|| kubectl_as(
        &plane,
        &alice,
        &["get", "pods", "-n", "team"],
        None
    )
    .0));
    let config_map = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: team}\n";
    assert!(kubectl_as(&plane, &alice, &["apply", "-f", "-"], Some(config_map)).0);
    let (ok, stderr) = kubectl_as(&plane, &alice, &["get", "pods", "-n", "default"], None);
    assert!(
        !ok && stderr.contains("in the namespace \"default\""),
        "{stderr}"
    );
    let (ok, stderr) = kubectl_as(&plane, &alice, &["get", "nodes"], None);
    assert!(!ok && stderr.contains("at the cluster scope"), "{stderr}");

    // A namespace admin may bind what it holds, not more.
    let binding = |role: &str| {
        format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: to-{role}, namespace: team}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {role}}}\n\
             subjects: [{{kind: User, name: bob}}]\n"
        )
    };
    assert!(
        kubectl_as(
            &plane,
            &alice,
            &["apply", "-f", "-"],
            Some(&binding("view"))
        )
        .0
    );
    let (ok, stderr) = kubectl_as(
        &plane,
        &alice,
        &["apply", "-f", "-"],
        Some(&binding("cluster-admin")),
    );
    assert!(
        !ok && stderr.contains("attempting to grant RBAC permissions not currently held"),
        "{stderr}"
    );

    // Server-side apply of a missing object is a create, and needs it.
    plane.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n\
         ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: patcher, namespace: other}\n\
         rules: [{apiGroups: [\"\"], resources: [configmaps], verbs: [get, patch]}]\n\
         ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: alice-patch, namespace: other}\n\
         roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: patcher}\n\
         subjects: [{kind: User, name: alice}]\n",
    );
    let new_config_map =
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: fresh, namespace: other}\n";
    assert!(eventually(|| {
        let (_, stderr) = kubectl_as(
            &plane,
            &alice,
            &["apply", "--server-side", "-f", "-"],
            Some(new_config_map),
        );
        stderr.contains("cannot create resource \"configmaps\"")
    }));

    plane.kubectl_ok(&["delete", "rolebinding", "alice-admin", "-n", "team"]);
    assert!(eventually(|| !kubectl_as(
        &plane,
        &alice,
        &["get", "pods", "-n", "team"],
        None
    )
    .0));
}

#[test]
fn nodes_write_only_their_own_node_lease_and_pods() {
    let plane = ControlPlane::start(StoreKind::Embedded);
    let node = plane.kubeconfig_for_certificate("system:node:n1", &["system:nodes"]);
    let node_manifest =
        |name: &str| format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n");
    assert!(
        kubectl_as(
            &plane,
            &node,
            &["create", "-f", "-"],
            Some(&node_manifest("n1"))
        )
        .0
    );
    let (ok, stderr) = kubectl_as(
        &plane,
        &node,
        &["create", "-f", "-"],
        Some(&node_manifest("n2")),
    );
    assert!(!ok && stderr.contains("Forbidden"), "{stderr}");
    assert!(kubectl_as(&plane, &node, &["label", "node", "n1", "ready=yes"], None).0);

    let lease = |name: &str| {
        format!(
            "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {{name: {name}, namespace: kube-node-lease}}\nspec: {{holderIdentity: {name}}}\n"
        )
    };
    assert!(kubectl_as(&plane, &node, &["create", "-f", "-"], Some(&lease("n1"))).0);
    assert!(!kubectl_as(&plane, &node, &["create", "-f", "-"], Some(&lease("n2"))).0);

    let pod = |name: &str, node: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  nodeName: {node}\n  containers: [{{name: c, image: busybox}}]\n"
        )
    };
    plane.apply(&pod("mine", "n1"));
    plane.apply(&pod("theirs", "n2"));
    let status = r#"{"status":{"phase":"Running"}}"#;
    let patch = |name: &str| {
        kubectl_as(
            &plane,
            &node,
            &[
                "patch",
                "pod",
                name,
                "-n",
                "default",
                "--subresource=status",
                "--type=merge",
                "-p",
                status,
            ],
            None,
        )
    };
    assert!(patch("mine").0, "{}", patch("mine").1);
    let (ok, stderr) = patch("theirs");
    assert!(
        !ok && stderr.contains("can only change pods bound to it"),
        "{stderr}"
    );
    // Reading is fine; writing what is not the node's is not.
    assert!(kubectl_as(&plane, &node, &["get", "pods", "-A"], None).0);
    assert!(
        !kubectl_as(
            &plane,
            &node,
            &["label", "pod", "mine", "-n", "default", "x=y"],
            None
        )
        .0
    );
    assert!(!kubectl_as(&plane, &node, &["get", "secrets", "-A"], None).0);
}
