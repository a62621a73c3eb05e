//! CNI conformance with a real runtime: Debian's containerd, started by
//! the test in a node's network namespace, runs a pod through its CRI
//! plugin (driven over the CRI by the test) with wharf-cni, as the agent
//! installed it, as the pod's network. The pod gets an address from the
//! agent, serves the node, exits with its code and logs in the CRI
//! format, and gives its address back when its sandbox stops.

use std::{collections::HashMap, path::Path, time::Duration};

use wharf_proto::cri::{
    self, ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ExecSyncRequest, ImageSpec, ImageStatusRequest, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, ListPodSandboxRequest, Mount, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, PodSandboxState, PodSandboxStatusRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
    VersionRequest,
};
use wharf_tests::{
    containerd::{BUSYBOX_IMAGE, Containerd},
    lab::{Lab, agent_binary},
    node::node_files,
};

const POD_CIDR: &str = "10.244.8.0/24";

/// The agent's pod addresses in use.
async fn allocated(socket: &Path) -> u32 {
    let mut agent = wharf_proto::connect(socket).await.expect("agent API").ipam;
    agent
        .status(wharf_proto::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .allocated
}

#[test]
fn containerd_runs_a_pod_whose_network_is_wharf_cni() {
    let mut lab = Lab::new("ctrd");
    let ns = lab.netns("node");
    let manifests = lab.dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let name = lab.node("node");
    let mut args = vec![
        "--standalone".to_string(),
        format!("--services-from={}", manifests.display()),
        "--proxy-mode=nftables".into(),
        format!("--node-name={name}"),
        format!("--pod-cidr={POD_CIDR}"),
    ];
    args.extend(node_files(&lab.dir));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.spawn(&ns, false, &agent_binary(), &args, "agent.log");
    lab.wait_for_log("agent.log", "CNI configured", 1);
    let agent_socket = lab.dir.join("run/agent.sock");
    let www = lab.dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "served from containerd\n").unwrap();
    let logs = lab.dir.join("logs");
    let (bin, conf) = (lab.dir.join("cni/bin"), lab.dir.join("cni/net.d"));
    let containerd = Containerd::start(&mut lab, &ns, &bin, &conf);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (pod_ip, sandbox) = runtime.block_on(async {
        let (mut service, mut images) = cri::connect(&containerd.socket).await.expect("CRI");
        let version = service
            .version(VersionRequest {
                version: "v1".into(),
            })
            .await
            .expect("Version")
            .into_inner();
        assert_eq!(version.runtime_api_version, "v1");
        let image = images
            .image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: BUSYBOX_IMAGE.into(),
                    ..ImageSpec::default()
                }),
                verbose: false,
            })
            .await
            .expect("ImageStatus")
            .into_inner();
        assert!(image.image.is_some(), "the imported image is there");

        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "web".into(),
                uid: "0c0c0c0c-web".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: "web".into(),
            log_directory: logs.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: containerd.cgroup_parent.clone(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Pod.into(),
                        pid: NamespaceMode::Container.into(),
                        ipc: NamespaceMode::Pod.into(),
                        target_id: String::new(),
                    }),
                    ..LinuxSandboxSecurityContext::default()
                }),
                ..LinuxPodSandboxConfig::default()
            }),
            ..PodSandboxConfig::default()
        };
        // containerd calls wharf-cni ADD; the agent hands out the address.
        let sandbox = service
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log()))
            .into_inner()
            .pod_sandbox_id;
        let status = service
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: sandbox.clone(),
                verbose: false,
            })
            .await
            .expect("PodSandboxStatus")
            .into_inner()
            .status
            .expect("a status");
        assert_eq!(status.state(), PodSandboxState::SandboxReady);
        let pod_ip = status.network.expect("network").ip;
        assert!(pod_ip.starts_with("10.244.8."), "{pod_ip}");
        assert_eq!(allocated(&agent_socket).await, 1);

        let container = |name: &str, command: &[&str], mounts: Vec<Mount>| CreateContainerRequest {
            pod_sandbox_id: sandbox.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: BUSYBOX_IMAGE.into(),
                    ..ImageSpec::default()
                }),
                command: command.iter().map(ToString::to_string).collect(),
                mounts,
                log_path: format!("{name}/0.log"),
                labels: HashMap::from([("app".into(), "web".into())]),
                ..ContainerConfig::default()
            }),
            sandbox_config: Some(config.clone()),
        };
        let httpd = service
            .create_container(container(
                "httpd",
                &["httpd", "-f", "-p", "8080", "-h", "/www"],
                vec![Mount {
                    container_path: "/www".into(),
                    host_path: www.display().to_string(),
                    readonly: true,
                    ..Mount::default()
                }],
            ))
            .await
            .expect("CreateContainer")
            .into_inner()
            .container_id;
        let once = service
            .create_container(container(
                "once",
                &["sh", "-c", "echo hello; exit 3"],
                vec![],
            ))
            .await
            .expect("CreateContainer")
            .into_inner()
            .container_id;
        for id in [&httpd, &once] {
            service
                .start_container(StartContainerRequest {
                    container_id: id.clone(),
                })
                .await
                .expect("StartContainer");
        }
        // The container sees the address wharf-cni gave its pod.
        let exec = service
            .exec_sync(ExecSyncRequest {
                container_id: httpd.clone(),
                cmd: vec![
                    "ip".into(),
                    "-4".into(),
                    "-o".into(),
                    "addr".into(),
                    "show".into(),
                    "eth0".into(),
                ],
                timeout: 10,
            })
            .await
            .expect("ExecSync")
            .into_inner();
        let shown = String::from_utf8_lossy(&exec.stdout).into_owned();
        assert!(shown.contains(&format!("inet {pod_ip}/")), "{shown}");

        // The one-shot container ends with its code; its log is in the
        // CRI format.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let ended = loop {
            let status = service
                .container_status(ContainerStatusRequest {
                    container_id: once.clone(),
                    verbose: false,
                })
                .await
                .expect("ContainerStatus")
                .into_inner()
                .status
                .expect("a status");
            if status.state() == ContainerState::ContainerExited {
                break status;
            }
            assert!(tokio::time::Instant::now() < deadline, "never exited");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(ended.exit_code, 3);
        let log = std::fs::read_to_string(logs.join("once/0.log")).unwrap();
        assert!(log.contains(" stdout F hello"), "{log}");
        (pod_ip, sandbox)
    });

    // The node reaches the pod at the address wharf-cni wired.
    let page = lab.run(
        &ns,
        false,
        Path::new("/bin/busybox"),
        &["wget", "-q", "-O", "-", &format!("http://{pod_ip}:8080/")],
    );
    assert_eq!(page, ["served from containerd"]);

    runtime.block_on(async {
        let (mut service, _) = cri::connect(&containerd.socket).await.expect("CRI");
        // containerd calls wharf-cni DEL; the address goes back.
        service
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: sandbox.clone(),
            })
            .await
            .expect("StopPodSandbox");
        assert_eq!(allocated(&agent_socket).await, 0);
        service
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: sandbox,
            })
            .await
            .expect("RemovePodSandbox");
        let left = service
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await
            .expect("ListPodSandbox")
            .into_inner()
            .items;
        assert!(left.is_empty(), "{left:?}");
    });
    let links = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["-n", &ns, "-o", "link"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        !links.contains("wharf-cni") && !links.contains(": wh"),
        "{links}"
    );
}
