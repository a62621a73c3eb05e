//! What runs a pod's sandbox and containers (`--runtime`), behind one
//! trait the pod workers drive:
//!
//! - `process` (`ProcessRuntime`): the agent itself; a network
//!   namespace and CNI calls for the sandbox (`sandbox`), each
//!   container's command on an overlay of the node's filesystem in its
//!   own namespaces and cgroups (`containers`, `spawn`);
//! - `cri` (`cri::CriRuntime`): a CRI runtime such as containerd over
//!   its UNIX socket, which makes the sandbox (calling the CNI plugins
//!   itself) and runs images.
//!
//! Both keep a container's log at `logs/<container>/<n>.log` in the pod's
//! directory and record each instance there, so the kubelet API serves
//! logs and a restarted agent adopts what runs, whichever runtime it is.

use std::{path::Path, sync::Arc, time::Duration};

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Container, Pod};

use super::{
    cgroups::{CgroupError, Cgroups},
    containers::{self, ContainerError, Layout, Record, Start},
    probe::Outcome,
    sandbox::{self, CniPaths, Sandbox, SandboxError},
    spawn::{Exit, Process},
};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{action}: {status}")]
    Cri {
        action: String,
        #[source]
        status: tonic::Status,
    },
    #[error("connecting to the CRI runtime at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the CRI runtime reported no address for sandbox {id}")]
    NoAddress { id: String },
}

/// A pod as a runtime names it.
#[derive(Clone, Copy, Debug)]
pub struct PodRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    /// The pod's directory: its logs, volumes and records.
    pub dir: &'a Path,
}

/// How a runtime writes container logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// The container's output as it wrote it.
    Raw,
    /// The CRI's: a line per write, `<RFC 3339 time> <stream> <F|P>
    /// <text>`, P marking a line continued by the next.
    Cri,
}

impl LogFormat {
    /// The output in the complete lines of `bytes`, and how many bytes
    /// those lines took (a partial line at the end waits for the rest).
    pub fn decode(self, bytes: &[u8]) -> (Vec<u8>, usize) {
        match self {
            Self::Raw => (bytes.to_vec(), bytes.len()),
            Self::Cri => {
                let mut output = Vec::with_capacity(bytes.len());
                let mut used = 0;
                while let Some(end) = bytes[used..].iter().position(|b| *b == b'\n') {
                    let line = &bytes[used..used + end];
                    used += end + 1;
                    let mut fields = line.splitn(4, |b| *b == b' ');
                    let (_, _, tag) = (fields.next(), fields.next(), fields.next());
                    let text = fields.next().unwrap_or_default();
                    output.extend_from_slice(text);
                    if tag != Some(b"P") {
                        output.push(b'\n');
                    }
                }
                (output, used)
            }
        }
    }
}

/// One running container instance.
#[async_trait]
pub trait Instance: Send + Sync + std::fmt::Debug {
    /// What was recorded when it started.
    fn record(&self) -> &Record;

    /// Waits for it to end.
    async fn wait(&self) -> Exit;

    /// Once it ended: whatever it left running is killed; whether it
    /// was killed for running out of memory.
    async fn finish(&self) -> bool;

    /// Stops it: SIGTERM, then SIGKILL after `grace`; how it ended.
    async fn stop(&self, grace: Duration) -> Exit;

    /// Runs `argv` inside it, bounded by `timeout` (exec probes, hooks).
    async fn exec(&self, argv: &[String], timeout: Duration) -> Outcome;
}

/// Runs pods' sandboxes and containers.
#[async_trait]
pub trait Runtime: Send + Sync + std::fmt::Debug {
    /// Makes the pod's sandbox: its network, as the CNI configuration
    /// says (or the node's, for `hostNetwork`).
    async fn run_sandbox(&self, pod: &Pod, at: PodRef<'_>) -> Result<Sandbox, RuntimeError>;

    /// Whether a sandbox an earlier agent recorded still stands.
    async fn sandbox_stands(&self, sandbox: &Sandbox) -> bool;

    /// Removes the pod's sandbox and gives its address back; `sandbox`
    /// is what was recorded, if anything. A failure leaves enough behind
    /// to try again.
    async fn remove_sandbox(
        &self,
        at: PodRef<'_>,
        sandbox: Option<&Sandbox>,
    ) -> Result<(), RuntimeError>;

    /// Starts a container instance in the pod's sandbox and records it.
    async fn start(&self, start: Start<'_>) -> Result<Arc<dyn Instance>, ContainerError>;

    /// The recorded instance, if it still runs.
    async fn adopt(
        &self,
        at: PodRef<'_>,
        container: &Container,
        layout: &Layout<'_>,
    ) -> Option<Arc<dyn Instance>>;

    /// Kills the instance `record` names if it still runs (cleaning up
    /// after a pod that is gone).
    async fn kill(&self, record: &Record);

    /// Whether the instance `record` names still runs.
    async fn running(&self, record: &Record) -> bool;

    /// Removes what is left of a pod that is gone (its cgroups).
    async fn release_pod(&self, uid: &str) -> Result<(), RuntimeError>;

    /// The pods (uids) this runtime still has something of.
    async fn pods(&self) -> Vec<String>;

    /// How container logs are written.
    fn log_format(&self) -> LogFormat {
        LogFormat::Raw
    }
}

/// The process runtime.
#[derive(Debug)]
pub struct ProcessRuntime {
    pub cgroups: Cgroups,
    pub cni: CniPaths,
    /// The node's address: `hostNetwork` pods'.
    pub node_ip: String,
}

#[async_trait]
impl Instance for containers::ProcessInstance {
    fn record(&self) -> &Record {
        &self.record
    }

    async fn wait(&self) -> Exit {
        self.process.wait().await
    }

    async fn finish(&self) -> bool {
        // Whatever the first process left (an exec probe's children)
        // goes with it.
        self.cgroup.kill_all();
        self.cgroup.oom_killed()
    }

    async fn stop(&self, grace: Duration) -> Exit {
        containers::stop(self, grace).await
    }

    async fn exec(&self, argv: &[String], timeout: Duration) -> Outcome {
        containers::exec(self, argv, timeout).await
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    async fn run_sandbox(&self, pod: &Pod, at: PodRef<'_>) -> Result<Sandbox, RuntimeError> {
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        Ok(if host_network {
            sandbox::host(&self.node_ip)?
        } else {
            sandbox::create(&self.cni, at.namespace, at.name, at.uid).await?
        })
    }

    async fn sandbox_stands(&self, sandbox: &Sandbox) -> bool {
        sandbox.netns.exists()
    }

    async fn remove_sandbox(
        &self,
        at: PodRef<'_>,
        sandbox: Option<&Sandbox>,
    ) -> Result<(), RuntimeError> {
        Ok(sandbox::remove(&self.cni, at.namespace, at.name, at.uid, sandbox).await?)
    }

    async fn start(&self, start: Start<'_>) -> Result<Arc<dyn Instance>, ContainerError> {
        Ok(Arc::new(containers::start(&self.cgroups, start).await?))
    }

    async fn adopt(
        &self,
        at: PodRef<'_>,
        container: &Container,
        layout: &Layout<'_>,
    ) -> Option<Arc<dyn Instance>> {
        let adopted = containers::adopt(&self.cgroups, at.uid, container, layout)?;
        Some(Arc::new(adopted))
    }

    async fn kill(&self, record: &Record) {
        if let Some(process) = Process::adopt(record.pid, record.start_time) {
            process.signal(libc::SIGKILL);
            process.wait().await;
        }
    }

    async fn running(&self, record: &Record) -> bool {
        record.pid > 0 && super::spawn::start_time_of(record.pid) == Some(record.start_time)
    }

    async fn release_pod(&self, uid: &str) -> Result<(), RuntimeError> {
        Ok(self.cgroups.release_pod(uid).await?)
    }

    async fn pods(&self) -> Vec<String> {
        self.cgroups.pods()
    }
}

#[cfg(test)]
mod tests {
    use super::LogFormat;

    #[test]
    fn cri_logs_decode_to_what_was_written() {
        let log = b"2026-12-07T06:50:35.1Z stdout F hello\n\
2026-12-07T06:50:35.2Z stderr P par\n\
2026-12-07T06:50:35.3Z stderr F tial\n\
2026-12-07T06:50:35.4Z stdout F  spaced  \n\
2026-12-07T06:50:35.5Z stdout F unfinish";
        let (output, used) = LogFormat::Cri.decode(log);
        assert_eq!(output, b"hello\npartial\n spaced  \n");
        assert_eq!(&log[used..], b"2026-12-07T06:50:35.5Z stdout F unfinish");
        assert_eq!(LogFormat::Raw.decode(b"as is"), (b"as is".to_vec(), 5));
    }
}
