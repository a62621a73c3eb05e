//! One pod's life on the node: a task per pod that is level-triggered
//! like kubelet's pod workers. Each pass looks at the pod as the API has
//! it and at what runs, and does the next thing: stop everything for a
//! pod being deleted; set up the sandbox (network namespace, CNI,
//! /etc/hosts, volumes); run init containers one by one to success; run
//! the containers, restarting them as `restartPolicy` says with kubelet's
//! back-off (at once, then 10 s doubling to 5 min; reset after 10 min of
//! running); act on probes; and write the status when it changed.
//!
//! A restarted agent picks up where the last one stopped: the sandbox and
//! each container's instance are recorded in the pod's directory and
//! adopted if they still run.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use k8s_openapi::{
    api::core::v1::{ConfigMap, Container, Pod, PodStatus, Secret},
    chrono::Utc,
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
};
use serde_json::json;
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
    time::Instant,
};
use tracing::{info, warn};

use super::{
    containers::{self, Layout},
    env::{self, CommandLine, Downward, Refs},
    probe::{self, Check, Kind, Outcome, Schedule, Tally},
    runtime::{Instance, PodRef, Runtime},
    sandbox::Sandbox,
    spawn::Exit,
    status::{self, Ended, Facts, Now, View},
    volumes,
};

/// kubelet's container restart back-off.
const BACKOFF_INITIAL: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A container that ran this long starts its back-off over.
const BACKOFF_RESET: Duration = Duration::from_secs(600);
/// Retry period for a sandbox that could not be made, or a status write
/// that failed.
const RETRY: Duration = Duration::from_secs(2);
/// The grace period when the pod object is gone (force-deleted): its
/// containers still get a chance to stop.
const GONE_GRACE: Duration = Duration::from_secs(2);

/// What every pod worker shares.
pub struct Context {
    pub client: Client,
    pub node: String,
    pub node_ip: String,
    /// `<state dir>/<node>/pods`: a directory per pod uid.
    pub pods_dir: PathBuf,
    /// What runs the pods (`--runtime`).
    pub runtime: Arc<dyn Runtime>,
    /// Allocatable CPU (millicores) and memory (bytes): what the
    /// downward API reports for a container without limits.
    pub node_milli_cpu: i64,
    pub node_memory: i64,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("node", &self.node)
            .field("pods_dir", &self.pods_dir)
            .finish_non_exhaustive()
    }
}

/// Something that happened to a container instance.
#[derive(Debug)]
enum Event {
    Exited {
        name: String,
        generation: u64,
        exit: Exit,
        /// Killed for running out of memory.
        oom: bool,
    },
    Probe {
        name: String,
        generation: u64,
        kind: Kind,
        ok: bool,
        message: String,
    },
}

/// One container of the pod.
#[derive(Debug)]
struct Slot {
    spec: Container,
    init: bool,
    /// Counts instances, so events of an earlier one are ignored.
    generation: u64,
    restart_count: i32,
    instance: Option<Arc<dyn Instance>>,
    probes: Option<tokio::task::AbortHandle>,
    ready: bool,
    started: bool,
    /// How the previous instance ended (lastState).
    last: Option<Ended>,
    /// How the current one ended, while it is not running.
    ended: Option<Ended>,
    /// Why it does not run (none yet, or a start that failed).
    waiting: Option<(String, Option<String>)>,
    backoff: Option<Duration>,
    /// The back-off the current wait is for (reported).
    applied_backoff: Duration,
    not_before: Option<Instant>,
    /// Being stopped (liveness failure): no new start until it exited.
    stopping: bool,
}

impl Slot {
    fn new(spec: Container, init: bool) -> Self {
        Self {
            spec,
            init,
            generation: 0,
            restart_count: 0,
            instance: None,
            probes: None,
            ready: false,
            started: false,
            last: None,
            ended: None,
            waiting: None,
            backoff: None,
            applied_backoff: Duration::ZERO,
            not_before: None,
            stopping: false,
        }
    }

    fn succeeded(&self) -> bool {
        self.instance.is_none() && self.ended.as_ref().is_some_and(|e| e.exit_code == 0)
    }

    fn view(&self, policy: &str, waiting_reason: &str) -> View {
        let (now, last) = match (&self.instance, &self.ended) {
            (Some(instance), _) => (
                Now::Running {
                    started_at: instance.record().started_at,
                    container_id: instance.record().id.clone(),
                },
                self.last.clone(),
            ),
            // A start that failed after an earlier instance ended.
            (None, Some(ended)) if self.waiting.is_some() && self.restarts(policy) => {
                let (reason, message) = self.waiting.clone().unwrap_or_default();
                (Now::Waiting { reason, message }, Some(ended.clone()))
            }
            (None, Some(ended)) if self.restarts(policy) => (
                Now::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: Some(format!(
                        "back-off {}s restarting failed container={}",
                        self.applied_backoff.as_secs(),
                        self.spec.name
                    )),
                },
                Some(ended.clone()),
            ),
            (None, Some(ended)) => (Now::Ended(ended.clone()), self.last.clone()),
            (None, None) => {
                let (reason, message) = self
                    .waiting
                    .clone()
                    .unwrap_or((waiting_reason.to_string(), None));
                (Now::Waiting { reason, message }, self.last.clone())
            }
        };
        View {
            name: self.spec.name.clone(),
            image: self.spec.image.clone().unwrap_or_default(),
            now,
            last,
            restart_count: self.restart_count,
            ready: self.instance.is_some() && self.ready,
            started: self.instance.is_some() && self.started,
        }
    }

    /// Whether the ended instance is to be followed by another.
    fn restarts(&self, policy: &str) -> bool {
        let Some(ended) = &self.ended else {
            return false;
        };
        // Init containers are retried unless the pod never restarts.
        if self.init {
            return policy != "Never" && ended.exit_code != 0;
        }
        status::restarts(policy, ended.exit_code)
    }
}

/// A pod's worker.
pub struct Worker {
    ctx: Arc<Context>,
    uid: String,
    pod: Arc<Pod>,
    dir: PathBuf,
    sandbox: Option<Sandbox>,
    sandbox_error: Option<String>,
    sandbox_not_before: Option<Instant>,
    volumes: Option<BTreeMap<String, volumes::Ready>>,
    slots: Vec<Slot>,
    /// The pod failed as a whole (activeDeadlineSeconds).
    failed: Option<(String, String)>,
    /// The pod reached Succeeded or Failed here: nothing runs again.
    finished: bool,
    /// The pod is being stopped: containers are reported as ended, not
    /// as restarting, and the phase is terminal.
    terminating: bool,
    /// Instances were adopted from an earlier agent: the volumes they
    /// mount are kept as they are.
    adopted: bool,
    written: Option<PodStatus>,
    write_not_before: Option<Instant>,
    started_at: k8s_openapi::chrono::DateTime<Utc>,
    events: mpsc::UnboundedSender<Event>,
    /// Waiters and probes; aborted with the worker.
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("uid", &self.uid)
            .finish_non_exhaustive()
    }
}

fn pod_name(pod: &Pod) -> (String, String) {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

/// How a worker ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// The pod was stopped and deleted from the API; until the watch
    /// reports that, it must not get a new worker.
    Deleted,
    /// The pod was stopped and is gone (or its deletion failed and a new
    /// worker is to try again).
    Stopped,
    /// The agent is shutting down; the pod runs on.
    Left,
}

/// Runs pod `pod`'s worker until the pod is gone from the node. `updates`
/// carries the pod as the API has it, None once it is gone.
pub async fn run(
    ctx: Arc<Context>,
    pod: Arc<Pod>,
    mut updates: watch::Receiver<Option<Arc<Pod>>>,
) -> Finish {
    let (tx, mut events) = mpsc::unbounded_channel();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let mut worker = Worker::new(ctx, uid, pod, tx);
    worker.adopt().await;
    loop {
        let gone = updates.borrow_and_update().clone();
        match gone {
            Some(pod) => worker.pod = pod,
            None => {
                worker.terminate(GONE_GRACE, false).await;
                return Finish::Stopped;
            }
        }
        if worker.pod.metadata.deletion_timestamp.is_some() {
            let grace = worker
                .pod
                .metadata
                .deletion_grace_period_seconds
                .or_else(|| worker.pod.spec.as_ref()?.termination_grace_period_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or(30);
            if worker.terminate(Duration::from_secs(grace), true).await {
                return Finish::Deleted;
            }
            // Tried again by a new worker, not at once.
            tokio::time::sleep(RETRY).await;
            return Finish::Stopped;
        }
        let wake = worker.step().await;
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = updates.changed() => {
                if changed.is_err() {
                    // The manager is gone (agent shutting down): leave
                    // the pod running for the next agent.
                    return Finish::Left;
                }
            }
            Some(event) = events.recv() => worker.record(event),
            () = sleep => {}
        }
        // Take whatever else is queued before the next pass.
        while let Ok(event) = events.try_recv() {
            worker.record(event);
        }
    }
}

impl Worker {
    fn new(
        ctx: Arc<Context>,
        uid: String,
        pod: Arc<Pod>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Self {
        let dir = ctx.pods_dir.join(&uid);
        let spec = pod.spec.clone().unwrap_or_default();
        let slots = spec
            .init_containers
            .into_iter()
            .flatten()
            .map(|c| Slot::new(c, true))
            .chain(spec.containers.into_iter().map(|c| Slot::new(c, false)))
            .collect();
        let started_at = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map_or_else(Utc::now, |t| t.0);
        Self {
            ctx,
            uid,
            pod,
            dir,
            sandbox: None,
            sandbox_error: None,
            sandbox_not_before: None,
            volumes: None,
            slots,
            failed: None,
            finished: false,
            terminating: false,
            adopted: false,
            written: None,
            write_not_before: None,
            started_at,
            events,
            tasks: JoinSet::new(),
        }
    }

    fn policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    fn pod_ip(&self) -> Option<IpAddr> {
        self.sandbox.as_ref().map(|s| IpAddr::V4(s.address))
    }

    /// Takes on what an earlier agent left: the sandbox and running
    /// instances.
    async fn adopt(&mut self) {
        let record = self.dir.join("sandbox.json");
        if let Some(sandbox) = std::fs::read(&record)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Sandbox>(&bytes).ok())
            && self.ctx.runtime.sandbox_stands(&sandbox).await
        {
            info!(pod = %self.uid, address = %sandbox.address, "sandbox adopted");
            self.sandbox = Some(sandbox);
        }
        let (namespace, name) = pod_name(&self.pod);
        for index in 0..self.slots.len() {
            let layout = Layout {
                pod_dir: &self.dir,
                container: &self.slots[index].spec.name,
            };
            let Some(record) = containers::recorded(&layout) else {
                continue;
            };
            let end = containers::recorded_end(&layout, &record.id);
            let at = PodRef {
                namespace: &namespace,
                name: &name,
                uid: &self.uid,
                dir: &self.dir,
            };
            let adopted = self
                .ctx
                .runtime
                .adopt(at, &self.slots[index].spec, &layout)
                .await;
            let slot = &mut self.slots[index];
            slot.restart_count = record.restart_count;
            match adopted {
                Some(instance) => {
                    self.adopted = true;
                    info!(pod = %self.uid, container = %slot.spec.name, id = %instance.record().id, "container adopted");
                    self.watch(index, instance);
                }
                None => {
                    slot.ended = Some(end.unwrap_or(Ended {
                        exit_code: 137,
                        signal: None,
                        reason: "ContainerStatusUnknown".into(),
                        message: Some("The container ended while the node agent was away".into()),
                        started_at: record.started_at,
                        finished_at: Utc::now(),
                        container_id: record.id,
                    }));
                }
            }
        }
    }

    fn record(&mut self, event: Event) {
        match event {
            Event::Exited {
                name,
                generation,
                exit,
                oom,
            } => {
                let Some(slot) = self.slots.iter_mut().find(|s| s.spec.name == name) else {
                    return;
                };
                if slot.generation != generation {
                    return;
                }
                let Some(instance) = slot.instance.take() else {
                    return;
                };
                if let Some(probes) = slot.probes.take() {
                    probes.abort();
                }
                let reason = match exit {
                    Exit::Unknown => "ContainerStatusUnknown",
                    _ if oom => "OOMKilled",
                    Exit::Code(0) => "Completed",
                    _ => "Error",
                };
                let ran = Utc::now() - instance.record().started_at;
                if ran.num_seconds() >= BACKOFF_RESET.as_secs() as i64 {
                    slot.backoff = None;
                }
                info!(pod = %self.uid, container = %name, ?exit, reason, "container ended");
                slot.ready = false;
                slot.started = false;
                slot.stopping = false;
                let ended = Ended {
                    exit_code: exit.code(),
                    signal: match exit {
                        Exit::Signal(signal) => Some(signal),
                        _ => None,
                    },
                    reason: reason.into(),
                    message: None,
                    started_at: instance.record().started_at,
                    finished_at: Utc::now(),
                    container_id: instance.record().id.clone(),
                };
                // Kept for a restarted agent, which can no longer learn it.
                let layout = Layout {
                    pod_dir: &self.dir,
                    container: &name,
                };
                if let Err(error) = containers::record_end(&layout, &ended) {
                    warn!(pod = %self.uid, container = %name, %error, "recording how the container ended failed");
                }
                slot.ended = Some(ended);
                // The first restart is immediate, then back-off.
                let delay = slot.backoff;
                slot.applied_backoff = delay.unwrap_or_default();
                slot.not_before = delay.map(|d| Instant::now() + d);
                slot.backoff = Some(delay.map_or(BACKOFF_INITIAL, |d| (d * 2).min(BACKOFF_MAX)));
            }
            Event::Probe {
                name,
                generation,
                kind,
                ok,
                message,
            } => {
                let grace = self.grace();
                let uid = self.uid.clone();
                let Some(slot) = self.slots.iter_mut().find(|s| s.spec.name == name) else {
                    return;
                };
                if slot.generation != generation {
                    return;
                }
                match kind {
                    Kind::Startup => {
                        slot.started = ok;
                        slot.ready = ok && slot.spec.readiness_probe.is_none();
                    }
                    Kind::Readiness => slot.ready = ok,
                    Kind::Liveness if !ok && !slot.stopping => {
                        warn!(pod = %uid, container = %name, %message, "liveness probe failed; restarting the container");
                        slot.stopping = true;
                        if let Some(instance) = slot.instance.clone() {
                            tokio::spawn(async move {
                                instance.stop(grace).await;
                            });
                        }
                    }
                    Kind::Liveness => {}
                }
                if !ok && kind != Kind::Liveness {
                    info!(pod = %uid, container = %name, ?kind, %message, "probe failed");
                }
            }
        }
    }

    fn grace(&self) -> Duration {
        Duration::from_secs(
            self.pod
                .spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or(30),
        )
    }

    /// Starts watching an instance: its exit and its probes.
    fn watch(&mut self, index: usize, instance: Arc<dyn Instance>) {
        let pod_ip = self.pod_ip();
        let slot = &mut self.slots[index];
        slot.generation += 1;
        let generation = slot.generation;
        let name = slot.spec.name.clone();
        let spec = slot.spec.clone();
        slot.instance = Some(Arc::clone(&instance));
        slot.started = spec.startup_probe.is_none();
        slot.ready = spec.readiness_probe.is_none() && slot.started;
        let events = self.events.clone();
        let waiter = Arc::clone(&instance);
        let waiter_name = name.clone();
        self.tasks.spawn(async move {
            let exit = waiter.wait().await;
            let oom = waiter.finish().await;
            let _ = events.send(Event::Exited {
                name: waiter_name,
                generation,
                exit,
                oom,
            });
        });
        let has_probes = spec.startup_probe.is_some()
            || spec.liveness_probe.is_some()
            || spec.readiness_probe.is_some();
        if let (Some(pod_ip), true, false) = (pod_ip, has_probes, slot.init) {
            let prober = Prober {
                instance,
                events: self.events.clone(),
                name,
                generation,
                started_at: Instant::now(),
            };
            let handle = self.tasks.spawn(probe_loop(spec, prober, pod_ip));
            self.slots[index].probes = Some(handle);
        }
    }

    /// Whether the API has the pod finished: kubelet never takes a pod
    /// out of Succeeded or Failed, so nothing runs again (an agent
    /// restarted after the pod finished only waits for its deletion).
    fn finished_in_api(&self) -> bool {
        let phase = self.pod.status.as_ref().and_then(|s| s.phase.as_deref());
        matches!(phase, Some("Succeeded" | "Failed"))
            && self.slots.iter().all(|s| s.instance.is_none())
    }

    /// Fails the pod as a whole once it has run past
    /// `activeDeadlineSeconds`: its containers are stopped.
    fn enforce_deadline(&mut self) -> Option<Instant> {
        let deadline = self.pod.spec.as_ref()?.active_deadline_seconds?;
        let deadline = Duration::from_secs(u64::try_from(deadline).ok()?);
        let ran = (Utc::now() - self.started_at).to_std().unwrap_or_default();
        if ran < deadline {
            return Some(Instant::now() + (deadline - ran));
        }
        if self.failed.is_none() {
            info!(pod = %self.uid, "active deadline exceeded; stopping the pod");
            self.failed = Some((
                "DeadlineExceeded".into(),
                "Pod was active on the node longer than the specified deadline".into(),
            ));
            let grace = self.grace();
            for slot in &mut self.slots {
                slot.stopping = true;
                if let Some(instance) = slot.instance.clone() {
                    tokio::spawn(async move {
                        instance.stop(grace).await;
                    });
                }
            }
        }
        None
    }

    /// One pass; returns when the next one is due at the latest.
    async fn step(&mut self) -> Option<Instant> {
        while self.tasks.try_join_next().is_some() {}
        if self.finished_in_api() {
            self.finished = true;
            if self.sandbox.is_some() {
                self.release_sandbox().await;
            }
            return None;
        }
        let mut wake: Vec<Instant> = Vec::new();
        wake.extend(self.enforce_deadline());
        if self.finished || self.failed.is_some() {
            // Nothing starts again.
        } else if self.ensure_sandbox().await {
            self.run_containers(&mut wake).await;
        } else if let Some(at) = self.sandbox_not_before.filter(|at| *at > Instant::now()) {
            wake.push(at);
        }
        let phase = status::phase(&self.facts());
        let running = self.slots.iter().any(|s| s.instance.is_some());
        if (phase == "Succeeded" || phase == "Failed") && !running {
            self.finished = true;
            if self.sandbox.is_some() {
                // A finished pod gives its address back; its logs stay
                // until it is deleted.
                self.release_sandbox().await;
            }
        }
        if let Some(at) = self.write_status().await {
            wake.push(at);
        }
        wake.into_iter().min()
    }

    /// The sandbox, volumes and /etc/hosts; false while they are not
    /// ready.
    async fn ensure_sandbox(&mut self) -> bool {
        if self.sandbox.is_none() {
            if self
                .sandbox_not_before
                .is_some_and(|at| at > Instant::now())
            {
                return false;
            }
            if let Err(error) = std::fs::create_dir_all(&self.dir) {
                self.sandbox_failed(format!("{}: {error}", self.dir.display()));
                return false;
            }
            let (namespace, name) = pod_name(&self.pod);
            // The pod's name is kept for cleaning up after it is gone.
            let _ = std::fs::write(
                self.dir.join("pod.json"),
                json!({"namespace": namespace, "name": name}).to_string(),
            );
            let at = PodRef {
                namespace: &namespace,
                name: &name,
                uid: &self.uid,
                dir: &self.dir,
            };
            let made = self.ctx.runtime.run_sandbox(&self.pod, at).await;
            match made {
                Ok(sandbox) => {
                    info!(pod = %format!("{namespace}/{name}"), address = %sandbox.address, "sandbox ready");
                    let record = serde_json::to_vec(&sandbox).unwrap_or_default();
                    if let Err(error) = std::fs::write(self.dir.join("sandbox.json"), record) {
                        warn!(%error, "recording the sandbox failed; a restarted agent will not adopt it");
                    }
                    self.sandbox = Some(sandbox);
                    self.sandbox_error = None;
                    self.sandbox_not_before = None;
                }
                Err(error) => {
                    self.sandbox_failed(error.to_string());
                    return false;
                }
            }
        }
        if self.volumes.is_none() {
            let downward = self.downward();
            let hosts = volumes::hosts_file(&self.pod, &downward.pod_ip);
            let prepared = self.refs().await.and_then(|refs| {
                let volumes =
                    volumes::prepare(&self.pod, &self.dir, &refs, &downward, self.adopted)
                        .map_err(|e| e.to_string())?;
                let path = self.dir.join("etc-hosts");
                std::fs::write(&path, hosts).map_err(|e| format!("{}: {e}", path.display()))?;
                Ok(volumes)
            });
            match prepared {
                Ok(volumes) => {
                    self.volumes = Some(volumes);
                    self.sandbox_not_before = None;
                }
                Err(error) => {
                    // Containers wait with the reason; retried.
                    for slot in &mut self.slots {
                        slot.waiting =
                            Some(("CreateContainerConfigError".into(), Some(error.clone())));
                    }
                    self.sandbox_not_before = Some(Instant::now() + RETRY);
                    return false;
                }
            }
        }
        true
    }

    fn sandbox_failed(&mut self, message: String) {
        if self.sandbox_error.as_ref() != Some(&message) {
            warn!(pod = %self.uid, %message, "pod sandbox failed; retrying");
        }
        self.sandbox_error = Some(message);
        self.sandbox_not_before = Some(Instant::now() + RETRY);
    }

    fn downward(&self) -> Downward {
        Downward {
            pod_ip: self.pod_ip().map(|ip| ip.to_string()).unwrap_or_default(),
            host_ip: self.ctx.node_ip.clone(),
            node_milli_cpu: self.ctx.node_milli_cpu,
            node_memory: self.ctx.node_memory,
        }
    }

    /// The ConfigMaps and Secrets the pod refers to, as they are now.
    /// A failure to read one (not its absence) fails the whole: an
    /// optional reference must not be dropped for an API hiccup.
    async fn refs(&self) -> Result<Refs, String> {
        let (namespace, _) = pod_name(&self.pod);
        let (maps, secrets) = Refs::wanted(&self.pod);
        let mut refs = Refs::default();
        let config_maps: Api<ConfigMap> = Api::namespaced(self.ctx.client.clone(), &namespace);
        for name in maps {
            let found = config_maps
                .get_opt(&name)
                .await
                .map_err(|e| format!("couldn't get configmap {namespace}/{name}: {e}"))?;
            refs.config_maps.insert(name, found);
        }
        let secret_api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &namespace);
        for name in secrets {
            let found = secret_api
                .get_opt(&name)
                .await
                .map_err(|e| format!("couldn't get secret {namespace}/{name}: {e}"))?;
            refs.secrets.insert(name, found);
        }
        Ok(refs)
    }

    /// Starts what should run and is due; notes when the next start is.
    async fn run_containers(&mut self, wake: &mut Vec<Instant>) {
        let policy = self.policy();
        let init_count = self.slots.iter().filter(|s| s.init).count();
        // Init containers, one at a time, in order.
        for index in 0..init_count {
            if self.slots[index].succeeded() {
                continue;
            }
            let slot = &self.slots[index];
            if slot.instance.is_some() {
                return;
            }
            if slot.ended.is_some() && !slot.restarts(&policy) {
                // Failed for good: the phase says so.
                return;
            }
            self.start_when_due(index, wake).await;
            return;
        }
        for index in init_count..self.slots.len() {
            let slot = &self.slots[index];
            if slot.instance.is_some() || slot.stopping {
                continue;
            }
            if slot.ended.is_some() && !slot.restarts(&policy) {
                continue;
            }
            self.start_when_due(index, wake).await;
        }
    }

    async fn start_when_due(&mut self, index: usize, wake: &mut Vec<Instant>) {
        if let Some(at) = self.slots[index]
            .not_before
            .filter(|at| *at > Instant::now())
        {
            wake.push(at);
            return;
        }
        let Some(sandbox) = self.sandbox.clone() else {
            return;
        };
        let refs = self.refs().await;
        let downward = self.downward();
        let slot = &self.slots[index];
        let restart_count = if slot.ended.is_some() {
            slot.restart_count + 1
        } else {
            slot.restart_count
        };
        let hosts = self.dir.join("etc-hosts");
        let no_volumes = BTreeMap::new();
        let volumes = self.volumes.as_ref().unwrap_or(&no_volumes);
        let config = refs
            .and_then(|refs| {
                env::environment(&self.pod, &slot.spec, &refs, &downward).map_err(|e| e.to_string())
            })
            .and_then(|env| {
                let binds =
                    volumes::binds(&slot.spec, volumes, &hosts).map_err(|e| e.to_string())?;
                Ok((env, binds))
            });
        let (env, binds) = match config {
            Ok(config) => config,
            Err(message) => {
                let slot = &mut self.slots[index];
                slot.waiting = Some(("CreateContainerConfigError".into(), Some(message)));
                slot.not_before = Some(Instant::now() + RETRY);
                wake.push(Instant::now() + RETRY);
                return;
            }
        };
        let command_line = CommandLine::of(&slot.spec, &env);
        let started = self
            .ctx
            .runtime
            .start(containers::Start {
                pod: &self.pod,
                uid: &self.uid,
                container: &slot.spec,
                layout: Layout {
                    pod_dir: &self.dir,
                    container: &slot.spec.name,
                },
                restart_count,
                command_line,
                env,
                sandbox: &sandbox,
                binds,
            })
            .await;
        let name = slot.spec.name.clone();
        match started {
            Ok(instance) => {
                info!(pod = %self.uid, container = %name, id = %instance.record().id, restart_count, "container started");
                let slot = &mut self.slots[index];
                if let Some(ended) = slot.ended.take() {
                    slot.last = Some(ended);
                }
                slot.restart_count = restart_count;
                slot.waiting = None;
                slot.not_before = None;
                let post_start = slot
                    .spec
                    .lifecycle
                    .as_ref()
                    .and_then(|l| l.post_start.clone());
                let (container, generation) = (slot.spec.clone(), slot.generation + 1);
                self.watch(index, Arc::clone(&instance));
                if let Some(hook) = post_start {
                    // A failed postStart hook restarts the container, as
                    // a failed liveness probe does.
                    let (events, pod_ip, grace) =
                        (self.events.clone(), self.pod_ip(), self.grace());
                    self.tasks.spawn(async move {
                        let deadline = Instant::now() + grace;
                        let outcome =
                            run_hook(instance.as_ref(), &container, &hook, pod_ip, deadline).await;
                        if let Outcome::Failure(message) = outcome {
                            let _ = events.send(Event::Probe {
                                name: container.name.clone(),
                                generation,
                                kind: Kind::Liveness,
                                ok: false,
                                message: format!("PostStartHook failed: {message}"),
                            });
                        }
                    });
                }
            }
            Err(error) => {
                warn!(pod = %self.uid, container = %name, %error, "container failed to start");
                let slot = &mut self.slots[index];
                let delay = slot.backoff.unwrap_or(BACKOFF_INITIAL);
                slot.waiting = Some(("CreateContainerError".into(), Some(error.to_string())));
                slot.not_before = Some(Instant::now() + delay);
                slot.backoff = Some((delay * 2).min(BACKOFF_MAX));
                wake.push(Instant::now() + delay);
            }
        }
    }

    fn facts(&self) -> Facts {
        // A pod being stopped restarts nothing: its containers end for
        // good and its phase is terminal, as kubelet reports it.
        let policy = if self.terminating {
            "Never".to_string()
        } else {
            self.policy()
        };
        let init_done = self.slots.iter().filter(|s| s.init).all(Slot::succeeded);
        let waiting = if self.sandbox.is_none() || init_done {
            "ContainerCreating"
        } else {
            "PodInitializing"
        };
        let (init, containers): (Vec<&Slot>, Vec<&Slot>) = self.slots.iter().partition(|s| s.init);
        Facts {
            pod_ip: self.pod_ip().map(|ip| ip.to_string()),
            host_ip: self.ctx.node_ip.clone(),
            start_time: self.started_at,
            sandbox_ready: self.sandbox.is_some(),
            init: init
                .iter()
                .map(|s| s.view(&policy, "PodInitializing"))
                .collect(),
            containers: containers
                .iter()
                .map(|s| s.view(&policy, waiting))
                .collect(),
            restart_policy: policy,
            failed: self.failed.clone(),
        }
    }

    /// Writes the status when it differs from the last written; returns
    /// when to try again after a failure.
    async fn write_status(&mut self) -> Option<Instant> {
        let mut facts = self.facts();
        // A finished pod keeps its address in the status.
        if facts.pod_ip.is_none()
            && let Some(written) = &self.written
        {
            facts.pod_ip = written.pod_ip.clone();
        }
        // Transition times come from what was last written when the
        // watch has not caught up with it yet.
        let mut basis = (*self.pod).clone();
        if let Some(written) = &self.written {
            basis.status = Some(PodStatus {
                conditions: merge_conditions(
                    basis.status.as_ref().and_then(|s| s.conditions.clone()),
                    written.conditions.clone(),
                ),
                ..basis.status.unwrap_or_default()
            });
        }
        let status = status::status(&basis, &facts);
        if self.written.as_ref() == Some(&status) {
            return None;
        }
        if self.write_not_before.is_some_and(|at| at > Instant::now()) {
            return self.write_not_before;
        }
        let (namespace, name) = pod_name(&self.pod);
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let patch = json!({ "status": status });
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
        {
            Ok(_) => {
                self.written = Some(status);
                self.write_not_before = None;
                None
            }
            Err(kube::Error::Api(e)) if e.code == 404 => None,
            Err(error) => {
                warn!(pod = %format!("{namespace}/{name}"), %error, "writing the pod's status failed; retrying");
                let at = Instant::now() + RETRY;
                self.write_not_before = Some(at);
                Some(at)
            }
        }
    }

    /// Gives the pod's network back (CNI DEL, namespace removed).
    async fn release_sandbox(&mut self) {
        let (namespace, name) = pod_name(&self.pod);
        let at = PodRef {
            namespace: &namespace,
            name: &name,
            uid: &self.uid,
            dir: &self.dir,
        };
        match self
            .ctx
            .runtime
            .remove_sandbox(at, self.sandbox.as_ref())
            .await
        {
            Ok(()) => {
                let _ = std::fs::remove_file(self.dir.join("sandbox.json"));
                self.sandbox = None;
            }
            Err(error) => warn!(pod = %self.uid, %error, "releasing the pod's network failed"),
        }
    }

    /// Stops every container (preStop hooks first, SIGTERM, SIGKILL after
    /// `grace`), removes the sandbox, cgroups and files, and, with
    /// `delete`, deletes the pod from the API for good; false if that
    /// failed.
    async fn terminate(&mut self, grace: Duration, delete: bool) -> bool {
        self.terminating = true;
        let (namespace, name) = pod_name(&self.pod);
        info!(pod = %format!("{namespace}/{name}"), ?grace, "stopping the pod");
        let deadline = Instant::now() + grace;
        let mut stops = JoinSet::new();
        for slot in &self.slots {
            let Some(instance) = slot.instance.clone() else {
                continue;
            };
            let hook = slot
                .spec
                .lifecycle
                .as_ref()
                .and_then(|l| l.pre_stop.clone());
            let container = slot.spec.clone();
            let pod_ip = self.pod_ip();
            let name = slot.spec.name.clone();
            stops.spawn(async move {
                if let Some(hook) = hook {
                    let outcome =
                        run_hook(instance.as_ref(), &container, &hook, pod_ip, deadline).await;
                    if let Outcome::Failure(message) = outcome {
                        warn!(container = %name, %message, "preStop hook failed");
                    }
                }
                let left = deadline.saturating_duration_since(Instant::now());
                let exit = instance.stop(left).await;
                (name, exit, instance.finish().await)
            });
        }
        while let Some(Ok((name, exit, oom))) = stops.join_next().await {
            let generation = self
                .slots
                .iter()
                .find(|s| s.spec.name == name)
                .map_or(0, |s| s.generation);
            self.record(Event::Exited {
                name,
                generation,
                exit,
                oom,
            });
        }
        self.tasks.abort_all();
        if delete {
            // The final status: every container terminated.
            self.write_not_before = None;
            self.write_status().await;
        }
        let at = PodRef {
            namespace: &namespace,
            name: &name,
            uid: &self.uid,
            dir: &self.dir,
        };
        let released = match self
            .ctx
            .runtime
            .remove_sandbox(at, self.sandbox.as_ref())
            .await
        {
            Ok(()) => true,
            Err(error) => {
                // The pod's directory stays: the next agent start
                // finds it orphaned and tries the DEL again.
                warn!(pod = %self.uid, %error, "releasing the pod's network failed");
                false
            }
        };
        if let Err(error) = self.ctx.runtime.release_pod(&self.uid).await {
            warn!(pod = %self.uid, %error, "removing the pod's cgroups failed");
        }
        if released {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if delete {
            let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &namespace);
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(self.uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            return match api.delete(&name, &params).await {
                Ok(_) => {
                    info!(pod = %format!("{namespace}/{name}"), "pod deleted");
                    true
                }
                // Gone already, or a new pod of that name.
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => true,
                Err(error) => {
                    warn!(pod = %format!("{namespace}/{name}"), %error, "deleting the pod failed");
                    false
                }
            };
        }
        true
    }
}

/// Live conditions with the owned ones replaced by what was written.
fn merge_conditions(
    live: Option<Vec<k8s_openapi::api::core::v1::PodCondition>>,
    written: Option<Vec<k8s_openapi::api::core::v1::PodCondition>>,
) -> Option<Vec<k8s_openapi::api::core::v1::PodCondition>> {
    let written: Vec<_> = written
        .unwrap_or_default()
        .into_iter()
        .filter(|w| status::OWNED.contains(&w.type_.as_str()))
        .collect();
    let mut merged: Vec<_> = live
        .unwrap_or_default()
        .into_iter()
        .filter(|c| !written.iter().any(|w| w.type_ == c.type_))
        .collect();
    merged.extend(written);
    Some(merged)
}

/// Runs a postStart or preStop handler, bounded by `deadline`.
async fn run_hook(
    instance: &dyn Instance,
    container: &Container,
    handler: &k8s_openapi::api::core::v1::LifecycleHandler,
    pod_ip: Option<IpAddr>,
    deadline: Instant,
) -> Outcome {
    let left = deadline.saturating_duration_since(Instant::now());
    if let Some(exec) = &handler.exec {
        return instance
            .exec(exec.command.as_deref().unwrap_or(&[]), left)
            .await;
    }
    if let Some(sleep) = &handler.sleep {
        let wanted = Duration::from_secs(u64::try_from(sleep.seconds).unwrap_or(0));
        tokio::time::sleep(wanted.min(left)).await;
        return Outcome::Success;
    }
    if let (Some(get), Some(ip)) = (&handler.http_get, pod_ip) {
        let probe = k8s_openapi::api::core::v1::Probe {
            http_get: Some(get.clone()),
            ..Default::default()
        };
        return match probe::check(container, &probe, ip) {
            Ok(Check::Http {
                address,
                path,
                headers,
            }) => probe::http_get(address, &path, &headers, left).await,
            Ok(_) => Outcome::Failure("unexpected handler".into()),
            Err(message) => Outcome::Failure(message),
        };
    }
    Outcome::Failure("the hook has no supported handler (exec, httpGet, sleep)".into())
}

async fn run_check(instance: &dyn Instance, check: &Check, timeout: Duration) -> Outcome {
    match check {
        Check::Exec(argv) => instance.exec(argv, timeout).await,
        Check::Http {
            address,
            path,
            headers,
        } => probe::http_get(*address, path, headers, timeout).await,
        Check::Tcp(address) => probe::tcp(*address, timeout).await,
    }
}

/// One instance's probes and where their transitions go.
struct Prober {
    instance: Arc<dyn Instance>,
    events: mpsc::UnboundedSender<Event>,
    name: String,
    generation: u64,
    started_at: Instant,
}

impl Prober {
    fn send(&self, kind: Kind, ok: bool, message: String) {
        let _ = self.events.send(Event::Probe {
            name: self.name.clone(),
            generation: self.generation,
            kind,
            ok,
            message,
        });
    }

    /// Probes on `schedule`. Until aborted, reporting each transition;
    /// or, with `until_decided` (a startup probe), until the first
    /// transition, which it returns with the last failure's message.
    async fn run(
        &self,
        kind: Kind,
        schedule: Schedule,
        check: Result<Check, String>,
        until_decided: bool,
    ) -> (bool, String) {
        let mut tally = Tally::new(schedule.clone());
        tokio::time::sleep_until(self.started_at + schedule.initial_delay).await;
        loop {
            let outcome = match &check {
                Ok(check) => run_check(self.instance.as_ref(), check, schedule.timeout).await,
                Err(message) => Outcome::Failure(message.clone()),
            };
            if let Some(ok) = tally.record(&outcome) {
                let message = match outcome {
                    Outcome::Failure(m) => m,
                    Outcome::Success => String::new(),
                };
                if until_decided {
                    return (ok, message);
                }
                self.send(kind, ok, message);
            }
            tokio::time::sleep(schedule.period).await;
        }
    }
}

/// Runs an instance's probes until aborted: the startup probe until it
/// succeeds, then liveness and readiness each on its own period.
async fn probe_loop(container: Container, prober: Prober, pod_ip: IpAddr) {
    let resolved = |probe: &Option<k8s_openapi::api::core::v1::Probe>| {
        probe
            .as_ref()
            .map(|p| (Schedule::of(p), probe::check(&container, p, pod_ip)))
    };
    if let Some((schedule, check)) = resolved(&container.startup_probe) {
        let (ok, message) = prober.run(Kind::Startup, schedule, check, true).await;
        if !ok {
            // A container that never starts is restarted, as for a
            // liveness failure.
            prober.send(
                Kind::Liveness,
                false,
                format!("Startup probe failed: {message}"),
            );
            return;
        }
        prober.send(Kind::Startup, true, String::new());
    }
    let liveness = resolved(&container.liveness_probe);
    let readiness = resolved(&container.readiness_probe);
    let forever = |probe: Option<(Schedule, Result<Check, String>)>, kind| {
        let prober = &prober;
        async move {
            if let Some((schedule, check)) = probe {
                prober.run(kind, schedule, check, false).await;
            }
        }
    };
    tokio::join!(
        forever(liveness, Kind::Liveness),
        forever(readiness, Kind::Readiness)
    );
}
