//! Joining a node with a bootstrap token: `wharf-control token create
//! --print-join-command` gives the flags; the agent pins the cluster CA,
//! obtains its own client certificate through a CertificateSigningRequest
//! (approved and signed by wharf-control), registers its Node with it,
//! and is held to the node authorizer. A wrong pin or an unknown token
//! is refused before anything is sent or done.

use std::process::Command;

use base64::Engine as _;
use serde_json::Value;
use wharf_tests::{
    cluster::eventually,
    control::{ControlPlane, StoreKind},
    lab::{Lab, agent_binary, workspace_binary},
    node::node_files,
};

fn kubectl_as(kubeconfig: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("HOME", kubeconfig.parent().unwrap())
        .output()
        .unwrap()
}

#[test]
fn nodes_join_with_a_token_and_act_as_themselves() {
    let mut lab = Lab::new("join");
    let ns = lab.netns("n1");
    let (host, inside) = lab.uplink(&ns);
    let api = ControlPlane::listening_on(host, StoreKind::Embedded, &["--without=scheduler"]);
    let output = Command::new(workspace_binary("wharf-control"))
        .args([
            "token",
            "create",
            "--print-join-command",
            "--ttl-seconds=600",
        ])
        .arg(format!("--kubeconfig={}", api.kubeconfig().display()))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let command = String::from_utf8(output.stdout).unwrap();
    let words: Vec<&str> = command.split_whitespace().collect();
    let flag = |name: &str| {
        let at = words.iter().position(|w| *w == name).unwrap();
        words[at + 1].to_string()
    };
    let (server, token, pin) = (flag("--server"), flag("--token"), flag("--ca-cert-hash"));
    assert_eq!(server, api.url());

    let name = lab.node("n1");
    let files = lab.dir.join("n1");
    let base = [
        "--proxy-mode=iptables".to_string(),
        format!("--node-name={name}"),
        format!("--node-ip={inside}"),
        "--node-lease-duration-seconds=8".into(),
        format!("--cgroup={}", lab.cgroup_dir("n1").display()),
    ];
    let args: Vec<String> = base.iter().cloned().chain(node_files(&files)).collect();
    let mut teardown = args[1..].to_vec();
    teardown.push("--teardown".into());
    lab.cleanup_on_drop(&ns, &agent_binary(), teardown);
    let join = |token: &str, pin: &str| {
        vec![
            format!("--server={server}"),
            format!("--token={token}"),
            format!("--ca-cert-hash={pin}"),
        ]
    };

    // A wrong pin: the token is never sent.
    let wrong = join(&token, &format!("sha256:{}", "0".repeat(64)));
    let refused = with(&args, &wrong);
    let output = lab.try_run(&ns, false, &agent_binary(), &refused);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("matches --ca-cert-hash"), "{stderr}");
    // An unknown token: refused by the API server.
    let unknown_token = join("abcdef.0123456789abcdef", &pin);
    let unknown = with(&args, &unknown_token);
    let output = lab.try_run(&ns, false, &agent_binary(), &unknown);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("Unauthorized"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let good = join(&token, &pin);
    let joining = with(&args, &good);
    lab.spawn(&ns, false, &agent_binary(), &joining, "agent.log");
    eventually("the joined node Ready", || {
        let output = api.kubectl(&[
            "get",
            "node",
            &name,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ]);
        String::from_utf8_lossy(&output.stdout) == "True"
    });
    let kubeconfig = files.join("state").join(&name).join("kubelet.kubeconfig");
    assert!(kubeconfig.exists());
    assert!(
        !files
            .join("state")
            .join(&name)
            .join("bootstrap.kubeconfig")
            .exists()
    );

    // Both requests were approved and issued: the client certificate
    // (asked for by the token) and the kubelet API's serving one.
    let csrs: Value = serde_json::from_str(&api.kubectl_ok(&["get", "csr", "-o", "json"])).unwrap();
    let issued: Vec<(String, String)> = csrs["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"]["certificate"].is_string())
        .map(|c| {
            (
                c["spec"]["signerName"].as_str().unwrap().to_string(),
                c["spec"]["username"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let token_id = token.split('.').next().unwrap();
    assert!(
        issued.contains(&(
            "kubernetes.io/kube-apiserver-client-kubelet".into(),
            format!("system:bootstrap:{token_id}")
        )),
        "{issued:?}"
    );
    eventually("the serving certificate issued", || {
        let csrs: Value =
            serde_json::from_str(&api.kubectl_ok(&["get", "csr", "-o", "json"])).unwrap();
        csrs["items"].as_array().unwrap().iter().any(|c| {
            c["spec"]["signerName"] == "kubernetes.io/kubelet-serving"
                && c["spec"]["username"] == format!("system:node:{name}")
                && c["status"]["certificate"].is_string()
        })
    });
    let table = api.kubectl_ok(&["get", "csr"]);
    assert!(table.contains("Approved,Issued"), "{table}");

    // The node acts as itself: it reads what a node reads, not Secrets;
    // it may change its own Node and no other.
    assert!(
        kubectl_as(&kubeconfig, &["get", "pods", "-A"])
            .status
            .success()
    );
    let secrets = kubectl_as(&kubeconfig, &["get", "secrets", "-A"]);
    assert!(!secrets.status.success());
    assert!(String::from_utf8_lossy(&secrets.stderr).contains("Forbidden"));
    let own = kubectl_as(&kubeconfig, &["label", "node", &name, "joined=yes"]);
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    api.apply("apiVersion: v1\nkind: Node\nmetadata: {name: someone-else}\n");
    let other = kubectl_as(
        &kubeconfig,
        &["label", "node", "someone-else", "joined=yes"],
    );
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("Forbidden"));

    // Decisions need `approve` on the signer: a node may ask for another
    // signer's certificate but not approve it; an admin may, and the
    // controllers leave other signers' requests alone.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "app");
    let request = params.serialize_request(&key).unwrap().pem().unwrap();
    let csr = format!(
        "apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata: {{name: other-signer}}\nspec:\n  signerName: example.com/other\n  usages: [client auth]\n  request: {}\n",
        base64::engine::general_purpose::STANDARD.encode(request.as_bytes())
    );
    let created = Command::new("kubectl")
        .args(["create", "-f", "-"])
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", kubeconfig.parent().unwrap())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(csr.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let approve = kubectl_as(&kubeconfig, &["certificate", "approve", "other-signer"]);
    assert!(!approve.status.success(), "a node approved a request");
    // Access to the approval subresource is not enough: the signer's
    // `approve` is needed too.
    api.apply(&format!(
        "apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: csr-approval}}
rules:
- {{apiGroups: [certificates.k8s.io], resources: [certificatesigningrequests/approval], verbs: [update, patch]}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: csr-approval}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: csr-approval}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: 'system:node:{name}'}}]
"
    ));
    let approve = kubectl_as(&kubeconfig, &["certificate", "approve", "other-signer"]);
    assert!(
        !approve.status.success(),
        "approved without the signer's approve"
    );
    assert!(
        String::from_utf8_lossy(&approve.stderr).contains("not permitted to approve"),
        "{}",
        String::from_utf8_lossy(&approve.stderr)
    );
    api.kubectl_ok(&["certificate", "approve", "other-signer"]);
    let other = api.kubectl_ok(&["get", "csr", "other-signer", "-o", "json"]);
    let other: Value = serde_json::from_str(&other).unwrap();
    assert_eq!(other["spec"]["username"], format!("system:node:{name}"));
    assert_eq!(other["status"]["conditions"][0]["type"], "Approved");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let other = api.kubectl_ok(&[
        "get",
        "csr",
        "other-signer",
        "-o",
        "jsonpath={.status.certificate}",
    ]);
    assert!(other.is_empty(), "another signer's request was signed");

    // Deleting a token's Secret revokes it.
    let secret = format!("bootstrap-token-{token_id}");
    api.kubectl_ok(&["-n", "kube-system", "delete", "secret", &secret]);
    let fresh: Vec<String> = base
        .iter()
        .cloned()
        .chain(node_files(&lab.dir.join("n2")))
        .collect();
    let revoked = with(&fresh, &good);
    let output = lab.try_run(&ns, false, &agent_binary(), &revoked);
    assert!(!output.status.success(), "a deleted token still joins");
}

/// `args` and `more`, as `&str`s for the lab.
fn with<'a>(args: &'a [String], more: &'a [String]) -> Vec<&'a str> {
    args.iter().chain(more).map(String::as_str).collect()
}
