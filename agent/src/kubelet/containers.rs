//! The process runtime's containers: a container's command started in
//! its own namespaces and cgroups inside the pod's network namespace
//! (see `spawn`), its output appended to `logs/<container>/<n>.log` in
//! the pod's directory (the nth instance; the file outlives the agent,
//! so a restarted agent neither loses output nor breaks the container's
//! pipe), a record of each instance so a restarted agent adopts it, and
//! commands run inside a running container (exec probes, preStop hooks).
//! The container's `image` is recorded, never pulled: commands come from
//! the node's filesystem.

use std::{
    collections::BTreeMap,
    io::Read as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{Container, Pod},
    apimachinery::pkg::api::resource::Quantity,
    chrono::{DateTime, Utc},
};
use serde::{Deserialize, Serialize};

use super::{
    cgroups::{CgroupError, Cgroups, ContainerCgroup, Limits},
    env::CommandLine,
    probe::Outcome,
    sandbox::Sandbox,
    spawn::{self, Bind, Exit, Placement, Process, SpawnError},
    status::Ended,
};

/// The most of an exec's output kept for a probe's message (kubelet
/// keeps 10 KiB).
const EXEC_OUTPUT_LIMIT: usize = 10 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the process runtime runs no image entrypoint: container {container} needs a command")]
    NoCommand { container: String },
    #[error("the start was cut short: {0}")]
    Interrupted(String),
    #[error(transparent)]
    Runtime(#[from] super::runtime::RuntimeError),
    #[error("image {image} is not on the node and imagePullPolicy is Never")]
    ImageNeverPull { image: String },
}

/// The scheme of the process runtime's container IDs (a CRI runtime's
/// are `<its name>://<id>`).
pub const PROCESS_SCHEME: &str = "wharf-process";

/// What a restarted agent needs to adopt an instance.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub pid: i32,
    /// Clock ticks since boot, with the pid naming the process for good.
    pub start_time: u64,
    pub started_at: DateTime<Utc>,
    pub restart_count: i32,
    pub id: String,
    /// The environment, working directory and identity it runs with
    /// (exec probes and hooks get them too).
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub working_dir: String,
    #[serde(default)]
    pub user: Option<u32>,
    #[serde(default)]
    pub group: Option<u32>,
}

/// A running container instance of the process runtime.
#[derive(Debug)]
pub struct ProcessInstance {
    pub process: Arc<Process>,
    pub record: Record,
    pub cgroup: ContainerCgroup,
}

/// Where a container's things are in the pod's directory.
#[derive(Debug)]
pub struct Layout<'a> {
    pub pod_dir: &'a Path,
    pub container: &'a str,
}

impl Layout<'_> {
    fn dir(&self) -> PathBuf {
        self.pod_dir.join("containers").join(self.container)
    }

    fn record(&self) -> PathBuf {
        self.dir().join("instance.json")
    }

    fn end(&self) -> PathBuf {
        self.dir().join("ended.json")
    }

    /// The log of the container's `n`th instance (0-based).
    pub fn log(&self, n: i32) -> PathBuf {
        self.pod_dir
            .join("logs")
            .join(self.container)
            .join(format!("{n}.log"))
    }
}

/// The limits a container's resources ask for.
pub fn limits(container: &Container) -> Limits {
    let resources = container.resources.as_ref();
    let amount = |section: Option<&BTreeMap<String, Quantity>>,
                  name: &str,
                  parse: fn(&Quantity) -> Option<i64>| {
        section
            .and_then(|s| s.get(name))
            .and_then(parse)
            .and_then(|v| u64::try_from(v).ok())
    };
    let limits = resources.and_then(|r| r.limits.as_ref());
    let requests = resources.and_then(|r| r.requests.as_ref());
    Limits {
        memory: amount(limits, "memory", wharf_quantity::value),
        cpu_limit: amount(limits, "cpu", wharf_quantity::milli),
        cpu_request: amount(requests, "cpu", wharf_quantity::milli),
    }
}

/// The user and group a container runs as: its security context's, else
/// the pod's, else the image's (the process runtime: root).
pub fn identity(pod: &Pod, container: &Container) -> (Option<u32>, Option<u32>) {
    let security = container.security_context.as_ref();
    let pod_security = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let user = security
        .and_then(|s| s.run_as_user)
        .or_else(|| pod_security.and_then(|s| s.run_as_user))
        .and_then(|u| u32::try_from(u).ok());
    let group = security
        .and_then(|s| s.run_as_group)
        .or_else(|| pod_security.and_then(|s| s.run_as_group))
        .and_then(|g| u32::try_from(g).ok());
    (user, group)
}

/// Everything a start needs.
#[derive(Debug)]
pub struct Start<'a> {
    pub pod: &'a Pod,
    pub uid: &'a str,
    pub container: &'a Container,
    pub layout: Layout<'a>,
    pub restart_count: i32,
    pub command_line: CommandLine,
    pub env: Vec<(String, String)>,
    pub sandbox: &'a Sandbox,
    pub binds: Vec<Bind>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ContainerError + '_ {
    move |source| ContainerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Starts an instance and records it.
pub async fn start(cgroups: &Cgroups, start: Start<'_>) -> Result<ProcessInstance, ContainerError> {
    let argv = start.command_line.argv();
    if argv.is_empty() {
        return Err(ContainerError::NoCommand {
            container: start.container.name.clone(),
        });
    }
    let (cgroups, uid, name, limits) = (
        cgroups.clone(),
        start.uid.to_string(),
        start.container.name.clone(),
        limits(start.container),
    );
    // Off the runtime: an emptying cgroup is waited for.
    let cgroup = tokio::task::spawn_blocking(move || cgroups.create(&uid, &name, limits))
        .await
        .map_err(|e| ContainerError::Interrupted(e.to_string()))??;
    let log = start.layout.log(start.restart_count);
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let stage = start.layout.dir().join("stage");
    std::fs::create_dir_all(&stage).map_err(io(&stage))?;
    let (user, group) = identity(start.pod, start.container);
    let working_dir = start.container.working_dir.clone().unwrap_or_default();
    let stdout = spawn::append(&log)?;
    let stderr = stdout.try_clone().map_err(io(&log))?;
    let spec = spawn::Spec {
        argv,
        env: start.env.clone(),
        working_dir: working_dir.clone(),
        placement: Placement::Container {
            netns: start.sandbox.netns.clone(),
            hostname: super::env::hostname(start.pod),
            stage,
            binds: start.binds,
        },
        cgroup: Some(cgroup.v2.clone()),
        v1_cgroups: cgroup.v1.clone(),
        user,
        group,
        stdout,
        stderr,
        kill_on_drop: false,
    };
    let process = tokio::task::spawn_blocking(move || spawn::spawn(spec))
        .await
        .map_err(|e| ContainerError::Interrupted(e.to_string()))??;
    let record = Record {
        pid: process.pid,
        start_time: spawn::start_time_of(process.pid).unwrap_or_default(),
        started_at: Utc::now(),
        restart_count: start.restart_count,
        id: format!(
            "{PROCESS_SCHEME}://{}-{}-{}",
            start.uid, start.container.name, start.restart_count
        ),
        env: start.env,
        working_dir,
        user,
        group,
    };
    if let Err(error) = save(&start.layout, &record) {
        // Unrecorded, it could not be adopted or cleaned up later.
        process.signal(libc::SIGKILL);
        process.wait().await;
        return Err(error);
    }
    Ok(ProcessInstance {
        process: Arc::new(process),
        record,
        cgroup,
    })
}

/// The instance an earlier agent started, if it still runs.
pub fn adopt(
    cgroups: &Cgroups,
    uid: &str,
    container: &Container,
    layout: &Layout<'_>,
) -> Option<ProcessInstance> {
    let record: Record = serde_json::from_slice(&std::fs::read(layout.record()).ok()?).ok()?;
    let process = Process::adopt(record.pid, record.start_time)?;
    let cgroup = cgroups.existing(uid, &container.name);
    Some(ProcessInstance {
        process: Arc::new(process),
        record,
        cgroup,
    })
}

/// Records a started instance (see `recorded`).
pub fn save(layout: &Layout<'_>, record: &Record) -> Result<(), ContainerError> {
    let path = layout.record();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::write(&path, serde_json::to_vec(record).unwrap_or_default()).map_err(io(&path))
}

/// The last instance recorded for a container (its restart count and
/// start), whether or not it still runs.
pub fn recorded(layout: &Layout<'_>) -> Option<Record> {
    serde_json::from_slice(&std::fs::read(layout.record()).ok()?).ok()
}

/// Records how the instance `ended` names ended.
pub fn record_end(layout: &Layout<'_>, ended: &Ended) -> Result<(), ContainerError> {
    let path = layout.end();
    std::fs::write(&path, serde_json::to_vec(ended).unwrap_or_default()).map_err(io(&path))
}

/// How instance `id` ended, if that was recorded.
pub fn recorded_end(layout: &Layout<'_>, id: &str) -> Option<Ended> {
    let ended: Ended = serde_json::from_slice(&std::fs::read(layout.end()).ok()?).ok()?;
    (ended.container_id == id).then_some(ended)
}

/// Stops an instance: SIGTERM, then SIGKILL after `grace`. Returns how
/// it ended.
pub async fn stop(instance: &ProcessInstance, grace: Duration) -> Exit {
    if !grace.is_zero() {
        instance.process.signal(libc::SIGTERM);
        if let Ok(exit) = tokio::time::timeout(grace, instance.process.wait()).await {
            return exit;
        }
    }
    instance.process.signal(libc::SIGKILL);
    instance.process.wait().await
}

/// Runs `argv` inside a running instance, bounded by `timeout`.
pub async fn exec(instance: &ProcessInstance, argv: &[String], timeout: Duration) -> Outcome {
    let (mut output, write) = match spawn::pipe() {
        Ok(pipe) => pipe,
        Err(error) => return Outcome::Failure(error.to_string()),
    };
    let (stderr, pidfd) = match (write.try_clone(), instance.process.pidfd()) {
        (Ok(stderr), Ok(pidfd)) => (stderr, pidfd),
        (Err(error), _) | (_, Err(error)) => return Outcome::Failure(error.to_string()),
    };
    let spec = spawn::Spec {
        argv: argv.to_vec(),
        env: instance.record.env.clone(),
        working_dir: instance.record.working_dir.clone(),
        placement: Placement::Inside { pidfd },
        cgroup: Some(instance.cgroup.v2.clone()),
        v1_cgroups: instance.cgroup.v1.clone(),
        user: instance.record.user,
        group: instance.record.group,
        stdout: write,
        stderr,
        // A probe given up on (timed out, or its container gone) takes
        // its command with it.
        kill_on_drop: true,
    };
    let process = match tokio::task::spawn_blocking(move || spawn::spawn(spec)).await {
        Ok(Ok(process)) => process,
        Ok(Err(error)) => return Outcome::Failure(error.to_string()),
        Err(error) => return Outcome::Failure(error.to_string()),
    };
    // The write ends went with the spec: the pipe ends when the command
    // (and whatever inherited its output) does.
    let reader = tokio::task::spawn_blocking(move || {
        let mut kept = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = output.read(&mut chunk) {
            if n == 0 {
                break;
            }
            let room = EXEC_OUTPUT_LIMIT.saturating_sub(kept.len());
            kept.extend_from_slice(&chunk[..n.min(room)]);
        }
        kept
    });
    let exit = match tokio::time::timeout(timeout, process.wait()).await {
        Ok(exit) => exit,
        Err(_) => {
            process.signal(libc::SIGKILL);
            process.wait().await;
            return Outcome::Failure(format!("command timed out after {timeout:?}"));
        }
    };
    let output = tokio::time::timeout(Duration::from_secs(1), reader)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    match exit {
        Exit::Code(0) => Outcome::Success,
        other => Outcome::Failure(format!(
            "command {argv:?} exited with {}: {}",
            other.code(),
            String::from_utf8_lossy(&output).trim()
        )),
    }
}
