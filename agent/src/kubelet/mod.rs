//! The kubelet role: run the pods bound to this node. A kube-rs watcher
//! follows the pods whose `spec.nodeName` is this node; each gets a
//! worker (`worker`) that drives it through the process runtime:
//!
//! - `sandbox`: the pod's network namespace and CNI calls;
//! - `containers` over `spawn`: each container's processes in their own
//!   namespaces and cgroups (`cgroups`), with an overlay of the node's
//!   root filesystem as their root;
//! - `env` and `volumes`: environment, command line and mounts, as
//!   kubelet makes them;
//! - `probe`: startup, liveness and readiness probes;
//! - `status`: the pod status written back.
//!
//! Pods outlive the agent: a restarted agent adopts the sandboxes and
//! containers its predecessor recorded, and only once the pod watch has
//! listed does it stop and remove what belongs to pods no longer bound
//! here.

pub mod cgroups;
pub mod containers;
pub mod cri;
pub mod env;
pub mod probe;
pub mod runtime;
pub mod sandbox;
pub mod server;
pub mod spawn;
pub mod status;
pub mod volumes;
pub mod worker;

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::Arc,
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use serde_json::Value;
use tokio::{sync::watch, task::JoinSet};
use tracing::{info, warn};

use self::{
    runtime::{PodRef, Runtime},
    sandbox::Sandbox,
    worker::Context,
};

/// Follows this node's pods until the agent stops; the pods keep
/// running after that.
pub async fn run(ctx: Arc<Context>) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node));
    let (store, writer) = reflector::store();
    let stream = watcher(api, config).default_backoff().reflect(writer);
    let mut stream = std::pin::pin!(stream);
    let mut workers: HashMap<String, watch::Sender<Option<Arc<Pod>>>> = HashMap::new();
    let mut running: JoinSet<(String, worker::Finish)> = JoinSet::new();
    // Pods whose worker stopped and deleted them, still in the cache
    // until the watch reports the deletion: no new worker for them.
    let mut done: HashSet<String> = HashSet::new();
    let mut listed = false;
    loop {
        tokio::select! {
            event = stream.next() => match event {
                Some(Ok(watcher::Event::InitDone)) => {
                    if !listed {
                        info!(pods = store.state().len(), "pod cache synced");
                        listed = true;
                        let known: Vec<String> = store
                            .state()
                            .iter()
                            .filter_map(|p| p.metadata.uid.clone())
                            .collect();
                        remove_orphans(&ctx.pods_dir, ctx.runtime.as_ref(), &known, Cleanup::KeepFailed).await;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => warn!(%error, "pod watch failed; retrying"),
                None => return,
            },
            Some(joined) = running.join_next() => {
                match joined {
                    Ok((uid, ended)) => {
                        workers.remove(&uid);
                        if ended == worker::Finish::Deleted {
                            done.insert(uid);
                        }
                    }
                    // A worker that panicked: its pod gets a new one.
                    Err(_) => workers.retain(|_, updates| !updates.is_closed()),
                }
            }
        }
        let pods = store.state();
        done.retain(|uid| pods.iter().any(|p| p.metadata.uid.as_ref() == Some(uid)));
        for pod in &pods {
            let Some(uid) = pod.metadata.uid.clone().filter(|uid| !done.contains(uid)) else {
                continue;
            };
            match workers.get(&uid) {
                Some(updates) => {
                    updates.send_if_modified(|current| {
                        let changed = current.as_ref().map(|c| &c.metadata.resource_version)
                            != Some(&pod.metadata.resource_version);
                        if changed {
                            *current = Some(Arc::clone(pod));
                        }
                        changed
                    });
                }
                None => {
                    let (updates, receiver) = watch::channel(Some(Arc::clone(pod)));
                    workers.insert(uid.clone(), updates);
                    let ctx = Arc::clone(&ctx);
                    let pod = Arc::clone(pod);
                    running.spawn(async move {
                        let ended = worker::run(ctx, pod, receiver).await;
                        (uid, ended)
                    });
                }
            }
        }
        // Pods gone from the node: only a listed cache says so.
        if listed {
            for (uid, updates) in &workers {
                if !pods.iter().any(|p| p.metadata.uid.as_ref() == Some(uid)) {
                    updates.send_if_modified(|current| current.take().is_some());
                }
            }
        }
    }
}

/// Whether cleaning up may give up on a pod's network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cleanup {
    /// The node goes on: a pod whose CNI DEL fails keeps its namespace
    /// (and its files), so the DEL is retried at the next start.
    KeepFailed,
    /// The node goes away (`--teardown`, with the agent's IPAM gone
    /// too): namespaces are removed whatever DEL says.
    Everything,
}

/// Stops and removes what pods not in `known` left on the node: their
/// containers, sandboxes, cgroups and files.
pub async fn remove_orphans(
    pods_dir: &Path,
    runtime: &dyn Runtime,
    known: &[String],
    cleanup: Cleanup,
) {
    let mut uids: Vec<String> = std::fs::read_dir(pods_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    uids.extend(runtime.pods().await);
    uids.sort();
    uids.dedup();
    for uid in uids.into_iter().filter(|uid| !known.contains(uid)) {
        let dir = pods_dir.join(&uid);
        info!(pod = %uid, "removing a pod no longer bound here");
        // Every recorded instance still alive is killed.
        for entry in std::fs::read_dir(dir.join("containers"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let layout = containers::Layout {
                pod_dir: &dir,
                container: &name,
            };
            if let Some(record) = containers::recorded(&layout) {
                runtime.kill(&record).await;
            }
        }
        let named: Value = std::fs::read(dir.join("pod.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let recorded: Option<Sandbox> = std::fs::read(dir.join("sandbox.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let at = PodRef {
            namespace: named["namespace"].as_str().unwrap_or_default(),
            name: named["name"].as_str().unwrap_or_default(),
            uid: &uid,
            dir: &dir,
        };
        if let Err(error) = runtime.remove_sandbox(at, recorded.as_ref()).await {
            warn!(pod = %uid, %error, "releasing an orphaned pod's sandbox failed");
            if cleanup == Cleanup::KeepFailed {
                continue;
            }
            // The node goes away: its namespace goes whatever DEL said.
            if let Err(error) = sandbox::remove_namespace(&uid).await {
                warn!(pod = %uid, %error, "removing an orphaned pod's network namespace failed");
            }
        }
        if let Err(error) = runtime.release_pod(&uid).await {
            warn!(pod = %uid, %error, "removing an orphaned pod's cgroups failed");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
