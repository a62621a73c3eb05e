//! The scheduler: binds each pending pod to a node, as kube-scheduler's
//! default profile does, through the API like any client.
//!
//! One loop owns the cache and the queue. It takes a pod, filters nodes
//! and scores the feasible ones (`select_node`, pure, tested against
//! fixtures), assumes the pod on the winner and hands the binding to up
//! to `BINDERS` concurrent writes, so the next pod is scheduled while the
//! previous binding is in flight. Like upstream it stops looking once it
//! has found enough feasible nodes in large clusters (50% of nodes minus
//! one point per 125 nodes, at least 5% and at least 100 nodes),
//! starting each search where the last one stopped.

mod cache;
mod filter;
#[cfg(test)]
mod fixtures;
mod preempt;
mod queue;
mod score;

use std::{collections::BTreeMap, sync::Arc};

use chrono::Utc;
use futures::{StreamExt as _, stream::BoxStream};
use k8s_openapi::api::core::v1::{Binding, Node, ObjectReference, Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, PropagationPolicy},
    runtime::{WatchStreamExt, watcher},
};
use rand::Rng;
use tokio::{sync::Semaphore, task::JoinSet, time::Instant};
use tracing::{debug, info, warn};

pub use self::{cache::Cache, filter::node_affinity_matches};
use self::{
    filter::{PodContext, Reason, unschedulable_message},
    queue::Queue,
};
use crate::{
    events::{EventType, Recorder},
    pods,
};

/// The `spec.schedulerName` this scheduler serves.
pub const SCHEDULER_NAME: &str = "default-scheduler";

/// Bindings written concurrently.
const BINDERS: usize = 64;

/// Why no node was chosen: the number of nodes and, per reason, how many
/// nodes it ruled out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FitError {
    pub nodes: usize,
    pub reasons: BTreeMap<Reason, usize>,
}

impl FitError {
    pub fn message(&self) -> String {
        unschedulable_message(self.nodes, &self.reasons)
    }
}

/// How many feasible nodes are enough (upstream's
/// `numFeasibleNodesToFind` with the adaptive percentage).
fn feasible_to_find(nodes: usize) -> usize {
    const MIN_NODES: usize = 100;
    if nodes < MIN_NODES {
        return nodes;
    }
    let percentage = 50usize.saturating_sub(nodes / 125).max(5);
    (nodes * percentage / 100).max(MIN_NODES)
}

/// Picks the node for `pod`: filters from `*start` round-robin until
/// enough nodes fit, scores them, and breaks ties at random.
pub fn select_node(
    cache: &Cache,
    pod: &Pod,
    start: &mut usize,
    rng: &mut impl Rng,
) -> Result<String, FitError> {
    let context = PodContext::new(cache, pod);
    let infos = cache.infos();
    let total = cache.node_count();
    let want = feasible_to_find(total);
    let mut feasible = Vec::with_capacity(want.min(infos.len()));
    let mut reasons: BTreeMap<Reason, usize> = BTreeMap::new();
    let mut examined = 0;
    for offset in 0..infos.len() {
        let info = &infos[(*start + offset) % infos.len()];
        examined += 1;
        if info.node.is_none() {
            continue;
        }
        match context.filter(info) {
            Ok(()) => feasible.push(info),
            Err(failed) => {
                for reason in failed {
                    *reasons.entry(reason).or_default() += 1;
                }
            }
        }
        if feasible.len() >= want {
            break;
        }
    }
    *start = (*start + examined) % infos.len().max(1);
    if feasible.is_empty() {
        return Err(FitError {
            nodes: total,
            reasons,
        });
    }
    let scores = score::score(&context, cache, &feasible);
    // Reservoir sampling over the best: each tied node equally likely.
    let mut best = (i64::MIN, 0, 0usize);
    for (at, score) in scores.iter().enumerate() {
        match score.cmp(&best.0) {
            std::cmp::Ordering::Greater => best = (*score, at, 1),
            std::cmp::Ordering::Equal => {
                best.2 += 1;
                if rng.random_range(0..best.2) == 0 {
                    best.1 = at;
                }
            }
            std::cmp::Ordering::Less => {}
        }
    }
    Ok(feasible[best.1].name().to_owned())
}

/// Whether this scheduler should place the pod now.
fn wants(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else {
        return false;
    };
    spec.node_name.as_deref().is_none_or(str::is_empty)
        && spec
            .scheduler_name
            .as_deref()
            .is_none_or(|n| n == SCHEDULER_NAME)
        && spec.scheduling_gates.as_ref().is_none_or(Vec::is_empty)
        && pods::is_active(pod)
}

/// What a finished binding or preemption reports back to the loop.
#[derive(Debug)]
enum Outcome {
    Done,
    BindFailed,
}

/// The scheduler's state; everything runs on the loop in `run`.
struct Scheduler {
    client: Client,
    recorder: Recorder,
    cache: Cache,
    queue: Queue,
    start: usize,
    rng: rand::rngs::SmallRng,
    /// Keys listed since a watch (re)started, to drop the ones that
    /// disappeared while it was down.
    relisting_pods: Option<std::collections::HashSet<String>>,
    relisting_nodes: Option<std::collections::HashSet<String>>,
    /// Pending pods that preempted others, by the node they wait for:
    /// pods of lower priority must leave them that room.
    nominated: std::collections::HashMap<String, (String, Arc<Pod>)>,
    pods_synced: bool,
    nodes_synced: bool,
}

/// Runs the scheduler until the future is dropped.
pub async fn run(client: Client, recorder: Recorder) {
    let mut scheduler = Scheduler {
        client: client.clone(),
        recorder,
        cache: Cache::default(),
        queue: Queue::default(),
        start: 0,
        rng: rand::SeedableRng::from_os_rng(),
        relisting_pods: None,
        relisting_nodes: None,
        nominated: std::collections::HashMap::new(),
        pods_synced: false,
        nodes_synced: false,
    };
    let mut pod_events: BoxStream<'static, _> =
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .boxed();
    let mut node_events: BoxStream<'static, _> =
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .boxed();
    let (done, mut outcomes) =
        tokio::sync::mpsc::unbounded_channel::<(String, Arc<Pod>, Outcome)>();
    let binders = Arc::new(Semaphore::new(BINDERS));
    let mut tasks = JoinSet::new();
    let mut next_flush = Instant::now();
    loop {
        let ready = scheduler.pods_synced && scheduler.nodes_synced && scheduler.queue.has_active();
        tokio::select! {
            biased;
            Some(event) = pod_events.next() => match event {
                Ok(event) => scheduler.pod_event(event),
                Err(error) => warn!(%error, "pod watch"),
            },
            Some(event) = node_events.next() => match event {
                Ok(event) => scheduler.node_event(event),
                Err(error) => warn!(%error, "node watch"),
            },
            Some((key, pod, outcome)) = outcomes.recv() => scheduler.finished(&key, &pod, outcome),
            Some(_) = tasks.join_next() => {}
            () = tokio::time::sleep_until(next_flush) => {
                next_flush = scheduler
                    .queue
                    .flush()
                    .unwrap_or_else(|| Instant::now() + std::time::Duration::from_secs(1))
                    .min(Instant::now() + std::time::Duration::from_secs(1));
            }
            Ok(permit) = Arc::clone(&binders).acquire_owned(), if ready => {
                if let Some((key, pod)) = scheduler.queue.pop() {
                    let done = done.clone();
                    if let Some(work) = scheduler.attempt(&key, &pod) {
                        tasks.spawn(async move {
                            let outcome = work.await;
                            drop(permit);
                            // The loop is gone only when the scheduler stops.
                            let _ = done.send((key, pod, outcome));
                        });
                    }
                }
            }
        }
    }
}

impl Scheduler {
    fn pod_event(&mut self, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Init => self.relisting_pods = Some(Default::default()),
            watcher::Event::InitApply(pod) => {
                if let Some(seen) = &mut self.relisting_pods {
                    seen.insert(pods::key(&pod.metadata));
                }
                self.pod_applied(pod);
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.relisting_pods.take() {
                    // Pods deleted while the watch was down.
                    self.queue.retain(|key| seen.contains(key));
                    let gone: Vec<Pod> = self
                        .cache
                        .placed()
                        .filter(|(_, pod)| !seen.contains(&pods::key(&pod.metadata)))
                        .map(|(_, pod)| Pod::clone(pod))
                        .collect();
                    for pod in gone {
                        self.cache.remove_pod(&pod);
                    }
                }
                self.pods_synced = true;
                self.queue.cluster_changed();
            }
            watcher::Event::Apply(pod) => self.pod_applied(pod),
            watcher::Event::Delete(pod) => {
                let key = pods::key(&pod.metadata);
                self.nominated.remove(&key);
                self.queue.remove(&key);
                self.cache.remove_pod(&pod);
                self.queue.cluster_changed();
            }
        }
    }

    fn pod_applied(&mut self, pod: Pod) {
        let key = pods::key(&pod.metadata);
        let pod = Arc::new(pod);
        if wants(&pod) {
            match pod
                .status
                .as_ref()
                .and_then(|s| s.nominated_node_name.clone())
            {
                Some(node) => {
                    self.nominated.insert(key.clone(), (node, Arc::clone(&pod)));
                }
                None => {
                    self.nominated.remove(&key);
                }
            }
            self.queue.upsert(&key, pod);
            return;
        }
        self.nominated.remove(&key);
        self.queue.remove(&key);
        // A pod finishing frees room; a pod landing may be what another
        // pod's affinity or spread waits for.
        let finished = pods::is_terminal(&pod);
        let landed = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_some()
            && !self.cache.is_confirmed(&key);
        self.cache.upsert_pod(&pod);
        if finished || landed {
            self.queue.cluster_changed();
        }
    }

    fn node_event(&mut self, event: watcher::Event<Node>) {
        match event {
            watcher::Event::Init => self.relisting_nodes = Some(Default::default()),
            watcher::Event::InitApply(node) => {
                if let Some(seen) = &mut self.relisting_nodes {
                    seen.insert(node.name_any());
                }
                self.cache.upsert_node(node);
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.relisting_nodes.take() {
                    let gone: Vec<String> = self
                        .cache
                        .infos()
                        .iter()
                        .filter(|i| i.node.is_some() && !seen.contains(i.name()))
                        .map(|i| i.name().to_owned())
                        .collect();
                    for name in gone {
                        self.cache.remove_node(&name);
                    }
                }
                self.nodes_synced = true;
                self.queue.cluster_changed();
            }
            watcher::Event::Apply(node) => {
                if self.cache.upsert_node(node) {
                    self.queue.cluster_changed();
                }
            }
            watcher::Event::Delete(node) => self.cache.remove_node(&node.name_any()),
        }
    }

    /// One scheduling cycle; the returned future writes the outcome.
    fn attempt(
        &mut self,
        key: &str,
        pod: &Arc<Pod>,
    ) -> Option<std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>>> {
        // Room freed for a pod of at least this priority is taken.
        let priority = |p: &Pod| p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0);
        let reserved: Vec<Arc<Pod>> = self
            .nominated
            .iter()
            .filter(|(other, (_, p))| *other != key && priority(p) >= priority(pod))
            .map(|(_, (node, p))| {
                self.cache.assume(p, node);
                Arc::clone(p)
            })
            .collect();
        let selected = select_node(&self.cache, pod, &mut self.start, &mut self.rng);
        for p in &reserved {
            self.cache.forget(p);
        }
        match selected {
            Ok(node) => {
                self.cache.assume(pod, &node);
                debug!(pod = key, node, "scheduled");
                Some(Box::pin(bind(
                    self.client.clone(),
                    self.recorder.clone(),
                    Arc::clone(pod),
                    node,
                )))
            }
            Err(fit) => {
                let why_not = match preempt::plan(&self.cache, pod, &fit) {
                    Ok((node, victims)) => {
                        info!(pod = key, node, victims = victims.len(), "preempting");
                        self.queue.failed(key, true);
                        return Some(Box::pin(preempt(
                            self.client.clone(),
                            self.recorder.clone(),
                            Arc::clone(pod),
                            node,
                            victims,
                        )));
                    }
                    Err(why_not) => why_not,
                };
                self.queue.failed(key, true);
                let message = format!("{} preemption: {why_not}", fit.message());
                let condition_current = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"))
                    .is_some_and(|c| c.status == "False" && c.message.as_deref() == Some(&message));
                self.recorder.record(
                    pod.as_ref(),
                    EventType::Warning,
                    "FailedScheduling",
                    &message,
                );
                if condition_current {
                    return None;
                }
                Some(Box::pin(mark_unschedulable(
                    self.client.clone(),
                    Arc::clone(pod),
                    message,
                )))
            }
        }
    }

    fn finished(&mut self, key: &str, pod: &Pod, outcome: Outcome) {
        match outcome {
            Outcome::Done => {}
            Outcome::BindFailed => {
                self.cache.forget(pod);
                self.queue.failed(key, false);
            }
        }
    }
}

fn pods_api(client: Client, pod: &Pod) -> Api<Pod> {
    Api::namespaced(
        client,
        pod.metadata.namespace.as_deref().unwrap_or("default"),
    )
}

async fn bind(client: Client, recorder: Recorder, pod: Arc<Pod>, node: String) -> Outcome {
    let name = pod.name_any();
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: pod.metadata.namespace.clone(),
            uid: pod.metadata.uid.clone(),
            ..Default::default()
        },
        target: ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Node".to_owned()),
            name: Some(node.clone()),
            ..Default::default()
        },
    };
    let body = match serde_json::to_vec(&binding) {
        Ok(body) => body,
        Err(error) => {
            warn!(%error, "encoding a binding");
            return Outcome::BindFailed;
        }
    };
    let api = pods_api(client, &pod);
    match api
        .create_subresource::<serde_json::Value>("binding", &name, &PostParams::default(), body)
        .await
    {
        Ok(_) => {
            recorder.record(
                pod.as_ref(),
                EventType::Normal,
                "Scheduled",
                format!(
                    "Successfully assigned {} to {node}",
                    pods::key(&pod.metadata)
                ),
            );
            Outcome::Done
        }
        Err(error) => {
            debug!(%error, pod = name, node, "binding failed");
            Outcome::BindFailed
        }
    }
}

/// Writes PodScheduled=False with the reasons, as upstream does.
async fn mark_unschedulable(client: Client, pod: Arc<Pod>, message: String) -> Outcome {
    let patch = serde_json::json!({
        "status": { "conditions": [{
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastTransitionTime": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "lastProbeTime": null,
        }]},
    });
    if let Err(error) = pods_api(client, &pod)
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await
    {
        debug!(%error, "writing PodScheduled=False");
    }
    Outcome::Done
}

/// Evicts the victims gracefully and nominates the node; the pod is
/// retried when they are gone.
async fn preempt(
    client: Client,
    recorder: Recorder,
    pod: Arc<Pod>,
    node: String,
    victims: Vec<Arc<Pod>>,
) -> Outcome {
    let patch = serde_json::json!({ "status": { "nominatedNodeName": node } });
    if let Err(error) = pods_api(client.clone(), &pod)
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        debug!(%error, "writing nominatedNodeName");
    }
    for victim in victims {
        recorder.record(
            victim.as_ref(),
            EventType::Normal,
            "Preempted",
            format!(
                "Preempted by pod {} on node {node}",
                pods::key(&pod.metadata)
            ),
        );
        let params = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            ..Default::default()
        };
        if let Err(error) = pods_api(client.clone(), &victim)
            .delete(&victim.name_any(), &params)
            .await
        {
            debug!(%error, victim = victim.name_any(), "preemption delete");
        }
    }
    Outcome::Done
}

#[cfg(test)]
mod tests;
