//! The `cri` runtime: pods run by a CRI runtime (containerd, CRI-O) over
//! its UNIX socket (`--container-runtime-endpoint`), as kubelet drives
//! one. RunPodSandbox makes the sandbox and calls the node's CNI plugins
//! itself (wharf-cni, as the agent installed it); images are used when
//! on the node and pulled otherwise, as `imagePullPolicy` says; each
//! container is created and started in the sandbox with the command,
//! environment, mounts and limits the pod asks for, and logs in the CRI
//! format to `logs/<container>/<n>.log` in the pod's directory (the
//! sandbox's log directory), where the kubelet API reads them.
//!
//! The runtime is asked about containers the way kubelet's PLEG does:
//! a container's status is polled every second until it has exited.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use k8s_openapi::{
    api::core::v1::{Container, Pod},
    chrono::Utc,
};
use tokio::sync::{Mutex, OnceCell};
use tonic::{Code, transport::Channel};
use tracing::{info, warn};
use wharf_proto::cri::{
    self, ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus,
    ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest, ImageSpec, ImageStatusRequest,
    KeyValue, LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, ListPodSandboxRequest, Mount,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxFilter, PodSandboxMetadata,
    PodSandboxState, PodSandboxStatusRequest, PullImageRequest, RemoveContainerRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopContainerRequest,
    StopPodSandboxRequest, VersionRequest, image_service_client::ImageServiceClient,
    runtime_service_client::RuntimeServiceClient,
};

use super::{
    cgroups::{CPU_PERIOD_US, Cgroups},
    containers::{self, ContainerError, Layout, Record, Start},
    env,
    probe::Outcome,
    runtime::{Instance, LogFormat, PodRef, Runtime, RuntimeError},
    sandbox::Sandbox,
    spawn::Exit,
};

/// How often a running container's status is asked for (kubelet's PLEG
/// relists every second).
const POLL: Duration = Duration::from_secs(1);

/// Labels kubelet puts on sandboxes and containers, and wharf's own for
/// the node whose agent made them (one runtime may serve several).
const POD_UID: &str = "io.kubernetes.pod.uid";
const POD_NAME: &str = "io.kubernetes.pod.name";
const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
const CONTAINER_NAME: &str = "io.kubernetes.container.name";
const NODE: &str = "wharf.io/node";

/// Clients of the runtime's two services, and its name (the scheme of
/// container IDs: `containerd://<id>`).
#[derive(Clone, Debug)]
struct Clients {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    name: String,
}

/// A CRI runtime at a UNIX socket.
#[derive(Debug)]
pub struct CriRuntime {
    endpoint: std::path::PathBuf,
    node: String,
    /// The node's address: `hostNetwork` pods'.
    node_ip: String,
    cgroups: Cgroups,
    /// Connected on first use, so the agent starts while the runtime
    /// does.
    clients: OnceCell<Clients>,
}

fn cri_error(action: impl Into<String>) -> impl FnOnce(tonic::Status) -> RuntimeError {
    let action = action.into();
    move |status| RuntimeError::Cri { action, status }
}

/// A call whose object is gone already counts as done.
fn gone_is_done<T>(result: Result<T, tonic::Status>) -> Result<(), tonic::Status> {
    match result {
        Ok(_) => Ok(()),
        Err(status) if status.code() == Code::NotFound => Ok(()),
        Err(status) => Err(status),
    }
}

/// The runtime's container ID in a recorded `<runtime>://<id>`.
fn raw_id(record: &Record) -> Option<&str> {
    let (scheme, id) = record.id.split_once("://")?;
    (scheme != containers::PROCESS_SCHEME).then_some(id)
}

impl CriRuntime {
    pub fn new(
        endpoint: std::path::PathBuf,
        node: String,
        node_ip: String,
        cgroups: Cgroups,
    ) -> Self {
        Self {
            endpoint,
            node,
            node_ip,
            cgroups,
            clients: OnceCell::new(),
        }
    }

    async fn clients(&self) -> Result<Clients, RuntimeError> {
        let clients = self
            .clients
            .get_or_try_init(|| async {
                let endpoint = self.endpoint.display().to_string();
                let (mut runtime, images) =
                    cri::connect(&self.endpoint)
                        .await
                        .map_err(|source| RuntimeError::Connect {
                            endpoint: endpoint.clone(),
                            source,
                        })?;
                let version = runtime
                    .version(VersionRequest {
                        version: "v1".into(),
                    })
                    .await
                    .map_err(cri_error(format!("asking {endpoint} its version")))?
                    .into_inner();
                info!(
                    runtime = %version.runtime_name,
                    version = %version.runtime_version,
                    api = %version.runtime_api_version,
                    "CRI runtime connected"
                );
                Ok::<_, RuntimeError>(Clients {
                    runtime,
                    images,
                    name: version.runtime_name,
                })
            })
            .await?;
        Ok(clients.clone())
    }

    /// The labels that name a pod's sandbox and containers.
    fn labels(&self, at: PodRef<'_>) -> HashMap<String, String> {
        HashMap::from([
            (POD_UID.into(), at.uid.into()),
            (POD_NAME.into(), at.name.into()),
            (POD_NAMESPACE.into(), at.namespace.into()),
            (NODE.into(), self.node.clone()),
        ])
    }

    /// The sandbox's configuration, as kubelet makes it from the pod
    /// (also handed to every CreateContainer).
    fn sandbox_config(&self, pod: &Pod, at: PodRef<'_>) -> PodSandboxConfig {
        let spec = pod.spec.clone().unwrap_or_default();
        let mode = |on_node: bool| -> i32 {
            if on_node {
                NamespaceMode::Node.into()
            } else {
                NamespaceMode::Pod.into()
            }
        };
        let mut labels: HashMap<String, String> = pod
            .metadata
            .labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        labels.extend(self.labels(at));
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: at.name.into(),
                uid: at.uid.into(),
                namespace: at.namespace.into(),
                attempt: 0,
            }),
            hostname: env::hostname(pod),
            log_directory: at.dir.join("logs").display().to_string(),
            labels,
            annotations: pod
                .metadata
                .annotations
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.cgroups.pod_parent(at.uid).unwrap_or_default(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: mode(spec.host_network.unwrap_or(false)),
                        pid: if spec.share_process_namespace.unwrap_or(false) {
                            NamespaceMode::Pod.into()
                        } else if spec.host_pid.unwrap_or(false) {
                            NamespaceMode::Node.into()
                        } else {
                            NamespaceMode::Container.into()
                        },
                        ipc: mode(spec.host_ipc.unwrap_or(false)),
                        target_id: String::new(),
                    }),
                    ..LinuxSandboxSecurityContext::default()
                }),
                ..LinuxPodSandboxConfig::default()
            }),
            ..PodSandboxConfig::default()
        }
    }

    /// The ids of pod `uid`'s sandboxes the runtime has.
    async fn sandboxes_of(
        &self,
        clients: &mut Clients,
        uid: &str,
    ) -> Result<Vec<String>, RuntimeError> {
        let items = clients
            .runtime
            .list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    label_selector: HashMap::from([
                        (POD_UID.into(), uid.into()),
                        (NODE.into(), self.node.clone()),
                    ]),
                    ..PodSandboxFilter::default()
                }),
            })
            .await
            .map_err(cri_error("listing sandboxes"))?
            .into_inner()
            .items;
        Ok(items.into_iter().map(|s| s.id).collect())
    }

    /// Makes sure `image` is on the node as `policy` (imagePullPolicy)
    /// wants it.
    async fn ensure_image(
        &self,
        clients: &mut Clients,
        image: &str,
        policy: &str,
    ) -> Result<(), ContainerError> {
        let spec = ImageSpec {
            image: image.into(),
            ..ImageSpec::default()
        };
        let present = clients
            .images
            .image_status(ImageStatusRequest {
                image: Some(spec.clone()),
                verbose: false,
            })
            .await
            .map_err(cri_error(format!("asking for image {image}")))
            .map_err(ContainerError::from)?
            .into_inner()
            .image
            .is_some();
        match (present, policy) {
            (true, "IfNotPresent" | "Never") => return Ok(()),
            (false, "Never") => {
                return Err(ContainerError::ImageNeverPull {
                    image: image.into(),
                });
            }
            _ => {}
        }
        clients
            .images
            .pull_image(PullImageRequest {
                image: Some(spec),
                ..PullImageRequest::default()
            })
            .await
            .map_err(cri_error(format!("pulling image {image}")))?;
        info!(image, "image pulled");
        Ok(())
    }
}

/// kubelet's default pull policy: Always for `:latest` or no tag,
/// IfNotPresent otherwise.
fn pull_policy(container: &Container) -> String {
    if let Some(policy) = &container.image_pull_policy {
        return policy.clone();
    }
    let image = container.image.as_deref().unwrap_or_default();
    let name = image.rsplit('/').next().unwrap_or(image);
    let tag = name.split_once('@').map_or_else(
        || name.split_once(':').map(|(_, tag)| tag),
        |_| Some("digest"),
    );
    match tag {
        None | Some("latest") => "Always".into(),
        Some(_) => "IfNotPresent".into(),
    }
}

/// The container's resources as the CRI has them (kubelet's mapping:
/// shares from the CPU request, a CFS quota from the CPU limit).
fn resources(container: &Container) -> LinuxContainerResources {
    let limits = containers::limits(container);
    let millicores = |m: u64| i64::try_from(m).unwrap_or(i64::MAX);
    LinuxContainerResources {
        cpu_period: CPU_PERIOD_US as i64,
        cpu_quota: limits
            .cpu_limit
            .map_or(0, |m| millicores(m) * CPU_PERIOD_US as i64 / 1000),
        cpu_shares: limits
            .cpu_request
            .or(limits.cpu_limit)
            .map_or(2, |m| (millicores(m) * 1024 / 1000).max(2)),
        memory_limit_in_bytes: limits
            .memory
            .map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)),
        ..LinuxContainerResources::default()
    }
}

#[async_trait]
impl Runtime for CriRuntime {
    async fn run_sandbox(&self, pod: &Pod, at: PodRef<'_>) -> Result<Sandbox, RuntimeError> {
        let mut clients = self.clients().await?;
        std::fs::create_dir_all(at.dir.join("logs")).ok();
        let id = clients
            .runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(self.sandbox_config(pod, at)),
                runtime_handler: String::new(),
            })
            .await
            .map_err(cri_error("running the pod's sandbox"))?
            .into_inner()
            .pod_sandbox_id;
        let status = clients
            .runtime
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: false,
            })
            .await
            .map_err(cri_error("asking for the sandbox's status"))?
            .into_inner()
            .status;
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let ip = if host_network {
            self.node_ip.clone()
        } else {
            status
                .and_then(|s| s.network)
                .map(|n| n.ip)
                .unwrap_or_default()
        };
        let Ok(address) = ip.parse() else {
            let made = Sandbox::of_runtime(id.clone(), std::net::Ipv4Addr::UNSPECIFIED);
            let _ = self.remove_sandbox(at, Some(&made)).await;
            return Err(RuntimeError::NoAddress { id });
        };
        Ok(Sandbox::of_runtime(id, address))
    }

    async fn sandbox_stands(&self, sandbox: &Sandbox) -> bool {
        let Ok(mut clients) = self.clients().await else {
            return false;
        };
        clients
            .runtime
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: sandbox.id.clone(),
                verbose: false,
            })
            .await
            .ok()
            .and_then(|r| r.into_inner().status)
            .is_some_and(|s| s.state() == PodSandboxState::SandboxReady)
    }

    async fn remove_sandbox(
        &self,
        at: PodRef<'_>,
        sandbox: Option<&Sandbox>,
    ) -> Result<(), RuntimeError> {
        let mut clients = self.clients().await?;
        let mut ids = self.sandboxes_of(&mut clients, at.uid).await?;
        ids.extend(sandbox.map(|s| s.id.clone()).filter(|id| !id.is_empty()));
        ids.sort();
        ids.dedup();
        for id in ids {
            // Stopping calls the CNI DEL: a failure keeps the sandbox,
            // so the next try calls it again.
            gone_is_done(
                clients
                    .runtime
                    .stop_pod_sandbox(StopPodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    })
                    .await,
            )
            .map_err(cri_error(format!("stopping sandbox {id}")))?;
            gone_is_done(
                clients
                    .runtime
                    .remove_pod_sandbox(RemovePodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    })
                    .await,
            )
            .map_err(cri_error(format!("removing sandbox {id}")))?;
        }
        Ok(())
    }

    async fn start(&self, start: Start<'_>) -> Result<Arc<dyn Instance>, ContainerError> {
        let mut clients = self.clients().await?;
        let container = start.container;
        let image = container.image.clone().unwrap_or_default();
        self.ensure_image(&mut clients, &image, &pull_policy(container))
            .await?;
        // The instance before this one has ended: only its log stays.
        if let Some(previous) = containers::recorded(&start.layout)
            && let Some(id) = raw_id(&previous)
        {
            let removed = clients
                .runtime
                .remove_container(RemoveContainerRequest {
                    container_id: id.into(),
                })
                .await;
            if let Err(error) = gone_is_done(removed) {
                warn!(container = %container.name, %error, "removing the previous instance failed");
            }
        }
        let log = start.layout.log(start.restart_count);
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ContainerError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let (namespace, name) = (
            start.pod.metadata.namespace.clone().unwrap_or_default(),
            start.pod.metadata.name.clone().unwrap_or_default(),
        );
        let at = PodRef {
            namespace: &namespace,
            name: &name,
            uid: start.uid,
            dir: start.layout.pod_dir,
        };
        let (user, group) = containers::identity(start.pod, container);
        let working_dir = container.working_dir.clone().unwrap_or_default();
        let mut labels = self.labels(at);
        labels.insert(CONTAINER_NAME.into(), container.name.clone());
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: container.name.clone(),
                attempt: u32::try_from(start.restart_count).unwrap_or_default(),
            }),
            image: Some(ImageSpec {
                image: image.clone(),
                ..ImageSpec::default()
            }),
            command: start.command_line.command,
            args: start.command_line.args,
            working_dir: working_dir.clone(),
            envs: start
                .env
                .iter()
                .map(|(key, value)| KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
            mounts: start
                .binds
                .iter()
                .map(|bind| Mount {
                    container_path: bind.target.display().to_string(),
                    host_path: bind.source.display().to_string(),
                    readonly: bind.read_only,
                    ..Mount::default()
                })
                .collect(),
            labels,
            log_path: format!("{}/{}.log", container.name, start.restart_count),
            linux: Some(LinuxContainerConfig {
                resources: Some(resources(container)),
                security_context: Some(LinuxContainerSecurityContext {
                    run_as_user: user.map(|u| cri::Int64Value { value: u.into() }),
                    run_as_group: group.map(|g| cri::Int64Value { value: g.into() }),
                    ..LinuxContainerSecurityContext::default()
                }),
            }),
            ..ContainerConfig::default()
        };
        let id = clients
            .runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: start.sandbox.id.clone(),
                config: Some(config),
                sandbox_config: Some(self.sandbox_config(start.pod, at)),
            })
            .await
            .map_err(cri_error(format!("creating container {}", container.name)))?
            .into_inner()
            .container_id;
        let record = Record {
            pid: 0,
            start_time: 0,
            started_at: Utc::now(),
            restart_count: start.restart_count,
            id: format!("{}://{id}", clients.name),
            env: start.env,
            working_dir,
            user,
            group,
        };
        // Recorded before it starts, so a failed start is still removed
        // by the next one.
        containers::save(&start.layout, &record)?;
        clients
            .runtime
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(cri_error(format!("starting container {}", container.name)))?;
        Ok(Arc::new(CriInstance {
            clients,
            id,
            record,
            ended: Mutex::new(None),
        }))
    }

    async fn adopt(
        &self,
        _at: PodRef<'_>,
        _container: &Container,
        layout: &Layout<'_>,
    ) -> Option<Arc<dyn Instance>> {
        let record = containers::recorded(layout)?;
        let id = raw_id(&record)?.to_string();
        let mut clients = self.clients().await.ok()?;
        let status = clients
            .runtime
            .container_status(ContainerStatusRequest {
                container_id: id.clone(),
                verbose: false,
            })
            .await
            .ok()?
            .into_inner()
            .status?;
        (status.state() == ContainerState::ContainerRunning).then(|| {
            Arc::new(CriInstance {
                clients,
                id,
                record,
                ended: Mutex::new(None),
            }) as Arc<dyn Instance>
        })
    }

    async fn kill(&self, record: &Record) {
        let (Some(id), Ok(mut clients)) = (raw_id(record), self.clients().await) else {
            return;
        };
        let _ = clients
            .runtime
            .stop_container(StopContainerRequest {
                container_id: id.into(),
                timeout: 0,
            })
            .await;
    }

    async fn running(&self, record: &Record) -> bool {
        let (Some(id), Ok(mut clients)) = (raw_id(record), self.clients().await) else {
            return false;
        };
        clients
            .runtime
            .container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .ok()
            .and_then(|r| r.into_inner().status)
            .is_some_and(|s| s.state() == ContainerState::ContainerRunning)
    }

    async fn release_pod(&self, uid: &str) -> Result<(), RuntimeError> {
        Ok(self.cgroups.release_runtime_pod(uid).await?)
    }

    async fn pods(&self) -> Vec<String> {
        let Ok(mut clients) = self.clients().await else {
            return Vec::new();
        };
        let listed = clients
            .runtime
            .list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    label_selector: HashMap::from([(NODE.into(), self.node.clone())]),
                    ..PodSandboxFilter::default()
                }),
            })
            .await;
        match listed {
            Ok(listed) => listed
                .into_inner()
                .items
                .into_iter()
                .filter_map(|s| s.labels.get(POD_UID).cloned())
                .collect(),
            Err(error) => {
                warn!(%error, "listing the runtime's sandboxes failed");
                Vec::new()
            }
        }
    }

    fn log_format(&self) -> LogFormat {
        LogFormat::Cri
    }
}

/// A container a CRI runtime runs.
#[derive(Debug)]
struct CriInstance {
    clients: Clients,
    id: String,
    record: Record,
    /// Its status once it exited.
    ended: Mutex<Option<ContainerStatus>>,
}

impl CriInstance {
    async fn status(&self) -> Result<Option<ContainerStatus>, tonic::Status> {
        let mut runtime = self.clients.runtime.clone();
        Ok(runtime
            .container_status(ContainerStatusRequest {
                container_id: self.id.clone(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status)
    }
}

#[async_trait]
impl Instance for CriInstance {
    fn record(&self) -> &Record {
        &self.record
    }

    async fn wait(&self) -> Exit {
        loop {
            if let Some(status) = self.ended.lock().await.as_ref() {
                return Exit::Code(status.exit_code);
            }
            match self.status().await {
                Ok(Some(status)) if status.state() == ContainerState::ContainerExited => {
                    let code = status.exit_code;
                    *self.ended.lock().await = Some(status);
                    return Exit::Code(code);
                }
                // Removed behind the agent's back: how it ended is lost.
                Ok(None) => return Exit::Unknown,
                Err(status) if status.code() == Code::NotFound => return Exit::Unknown,
                // Running, or the runtime is away for a moment.
                Ok(Some(_)) | Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    async fn finish(&self) -> bool {
        self.ended
            .lock()
            .await
            .as_ref()
            .is_some_and(|s| s.reason == "OOMKilled")
    }

    async fn stop(&self, grace: Duration) -> Exit {
        let mut runtime = self.clients.runtime.clone();
        // The runtime sends the image's stop signal, then SIGKILL after
        // the timeout.
        let stopped = runtime
            .stop_container(StopContainerRequest {
                container_id: self.id.clone(),
                timeout: i64::try_from(grace.as_secs()).unwrap_or(i64::MAX),
            })
            .await;
        if let Err(error) = gone_is_done(stopped) {
            warn!(container = %self.id, %error, "stopping the container failed");
        }
        self.wait().await
    }

    async fn exec(&self, argv: &[String], timeout: Duration) -> Outcome {
        let mut runtime = self.clients.runtime.clone();
        let request = ExecSyncRequest {
            container_id: self.id.clone(),
            cmd: argv.to_vec(),
            timeout: i64::try_from(timeout.as_secs().max(1)).unwrap_or(i64::MAX),
        };
        // The runtime enforces the timeout; this bounds a runtime that
        // does not answer.
        let answer =
            tokio::time::timeout(timeout + Duration::from_secs(2), runtime.exec_sync(request))
                .await;
        match answer {
            Err(_) => Outcome::Failure(format!("command timed out after {timeout:?}")),
            Ok(Err(status)) => Outcome::Failure(status.message().to_string()),
            Ok(Ok(reply)) => {
                let reply = reply.into_inner();
                if reply.exit_code == 0 {
                    Outcome::Success
                } else {
                    let mut output = reply.stdout;
                    output.extend(reply.stderr);
                    Outcome::Failure(format!(
                        "command {argv:?} exited with {}: {}",
                        reply.exit_code,
                        String::from_utf8_lossy(&output).trim()
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(image: &str, policy: Option<&str>) -> Container {
        Container {
            name: "c".into(),
            image: Some(image.into()),
            image_pull_policy: policy.map(Into::into),
            ..Container::default()
        }
    }

    #[test]
    fn pull_policy_defaults_as_kubelets() {
        assert_eq!(pull_policy(&container("busybox", None)), "Always");
        assert_eq!(pull_policy(&container("busybox:latest", None)), "Always");
        assert_eq!(
            pull_policy(&container("busybox:1.36", None)),
            "IfNotPresent"
        );
        assert_eq!(pull_policy(&container("host:5000/busybox", None)), "Always");
        assert_eq!(
            pull_policy(&container("host:5000/busybox:1", None)),
            "IfNotPresent"
        );
        assert_eq!(
            pull_policy(&container("busybox@sha256:ab", None)),
            "IfNotPresent"
        );
        assert_eq!(pull_policy(&container("busybox", Some("Never"))), "Never");
    }

    #[test]
    fn cpu_and_memory_map_as_kubelet_maps_them() {
        let mut c = container("busybox:1", None);
        c.resources = Some(
            serde_json::from_value(serde_json::json!({
                "requests": {"cpu": "250m"},
                "limits": {"cpu": "500m", "memory": "64Mi"},
            }))
            .unwrap(),
        );
        let r = resources(&c);
        assert_eq!(
            (r.cpu_period, r.cpu_quota, r.cpu_shares),
            (100_000, 50_000, 256)
        );
        assert_eq!(r.memory_limit_in_bytes, 64 << 20);
        let none = resources(&container("busybox:1", None));
        assert_eq!(
            (none.cpu_quota, none.cpu_shares, none.memory_limit_in_bytes),
            (0, 2, 0)
        );
    }

    #[test]
    fn only_runtime_ids_are_the_runtimes() {
        let mut record: Record = serde_json::from_value(serde_json::json!({
            "pid": 0, "start_time": 0, "started_at": "2026-01-01T00:00:00Z",
            "restart_count": 0, "id": "containerd://abc", "env": [],
        }))
        .unwrap();
        assert_eq!(raw_id(&record), Some("abc"));
        record.id = "wharf-process://uid-c-0".into();
        assert_eq!(raw_id(&record), None);
    }
}
