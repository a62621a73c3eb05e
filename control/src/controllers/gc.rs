//! The garbage collector: follows `ownerReferences` across every
//! resource the API serves, as upstream's does.
//!
//! - **Background** (kubectl's default): once an owner is gone, its
//!   dependents are deleted; a dependent that still has another owner
//!   only loses the reference to the gone one.
//! - **Foreground**: an owner deleted with `foregroundDeletion` stays
//!   (with the finalizer) while its dependents are deleted, then the
//!   finalizer is removed and the API server deletes it.
//! - **Orphan**: an owner deleted with `orphan` has its references removed
//!   from every dependent, then the finalizer.
//!
//! The graph is built from a metadata-only watch per resource type found
//! through discovery. An owner missing from the graph is confirmed gone
//! with a live read (by name, and the uid must match) before anything is
//! deleted, and nothing happens before every watch has listed once.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use futures::{FutureExt as _, StreamExt as _, stream::SelectAll};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PropagationPolicy},
    core::PartialObjectMeta,
    discovery::{Discovery, Scope, verbs},
    runtime::{WatchStreamExt, metadata_watcher, watcher},
};
use tracing::{debug, warn};

const ORPHAN: &str = "orphan";
const FOREGROUND: &str = "foregroundDeletion";
/// Everything is looked at again this often, in case a watch missed an
/// event.
const RESCAN: Duration = Duration::from_secs(30);

/// One object in the graph.
#[derive(Clone, Debug)]
struct Entry {
    resource: Arc<Resource>,
    namespace: Option<String>,
    name: String,
    owners: Vec<OwnerReference>,
    deleting: bool,
    finalizers: Vec<String>,
}

/// A resource type the collector watches.
#[derive(Debug)]
struct Resource {
    api: ApiResource,
    namespaced: bool,
}

/// Objects by uid, and dependents by owner uid.
#[derive(Debug, Default)]
struct Graph {
    objects: HashMap<String, Entry>,
    dependents: HashMap<String, HashSet<String>>,
}

impl Graph {
    fn upsert(&mut self, uid: String, entry: Entry) {
        self.remove(&uid);
        for owner in &entry.owners {
            self.dependents
                .entry(owner.uid.clone())
                .or_default()
                .insert(uid.clone());
        }
        self.objects.insert(uid, entry);
    }

    fn remove(&mut self, uid: &str) -> Option<Entry> {
        let entry = self.objects.remove(uid)?;
        for owner in &entry.owners {
            if let Some(set) = self.dependents.get_mut(&owner.uid) {
                set.remove(uid);
                if set.is_empty() {
                    self.dependents.remove(&owner.uid);
                }
            }
        }
        Some(entry)
    }

    fn dependents_of(&self, uid: &str) -> Vec<String> {
        self.dependents
            .get(uid)
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// What the collector does to one object, decided from the graph and
/// the owners' confirmed existence.
#[derive(Debug, PartialEq)]
enum Verdict {
    Nothing,
    /// Every owner is gone.
    Delete,
    /// Some owners are gone: keep the references to the others.
    KeepOnly(Vec<OwnerReference>),
}

/// `present(owner)` answers whether that owner still exists.
fn verdict(entry: &Entry, present: impl Fn(&OwnerReference) -> bool) -> Verdict {
    if entry.owners.is_empty() || entry.deleting {
        return Verdict::Nothing;
    }
    let kept: Vec<OwnerReference> = entry
        .owners
        .iter()
        .filter(|o| present(o))
        .cloned()
        .collect();
    if kept.is_empty() {
        Verdict::Delete
    } else if kept.len() < entry.owners.len() {
        Verdict::KeepOnly(kept)
    } else {
        Verdict::Nothing
    }
}

/// The collector's state.
struct Collector {
    client: Client,
    graph: Graph,
    /// group/version/kind -> resource, to read owners the graph lacks.
    kinds: HashMap<(String, String), Arc<Resource>>,
    queue: VecDeque<String>,
    queued: HashSet<String>,
    /// Per kind being re-listed, the uids listed so far.
    relisting: HashMap<(String, String), HashSet<String>>,
    /// Kinds listed at least once.
    listed: HashSet<(String, String)>,
}

fn api_for(client: &Client, resource: &Resource, namespace: Option<&str>) -> Api<DynamicObject> {
    match (resource.namespaced, namespace) {
        (true, Some(namespace)) => Api::namespaced_with(client.clone(), namespace, &resource.api),
        _ => Api::all_with(client.clone(), &resource.api),
    }
}

/// Runs until the future is dropped.
pub(super) async fn run(client: Client) {
    let discovery = loop {
        match Discovery::new(client.clone()).run().await {
            Ok(discovery) => break discovery,
            Err(error) => {
                warn!(%error, "garbage collector: discovery");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    let mut kinds = HashMap::new();
    let mut streams = SelectAll::new();
    for group in discovery.groups() {
        for (api, capabilities) in group.recommended_resources() {
            let watchable = [verbs::LIST, verbs::WATCH, verbs::DELETE, verbs::PATCH]
                .iter()
                .all(|verb| capabilities.supports_operation(verb));
            // Events and leases are never owners or dependents worth it.
            if !watchable || api.plural == "events" || api.plural == "leases" {
                continue;
            }
            let resource = Arc::new(Resource {
                namespaced: capabilities.scope == Scope::Namespaced,
                api: api.clone(),
            });
            kinds.insert(
                (api.api_version.clone(), api.kind.clone()),
                Arc::clone(&resource),
            );
            let watched = metadata_watcher(
                Api::<DynamicObject>::all_with(client.clone(), &api),
                watcher::Config::default(),
            )
            .default_backoff()
            .map(move |event| (Arc::clone(&resource), event));
            streams.push(watched.boxed());
        }
    }
    let mut collector = Collector {
        client,
        graph: Graph::default(),
        kinds,
        queue: VecDeque::new(),
        queued: HashSet::new(),
        relisting: HashMap::new(),
        listed: HashSet::new(),
    };
    let mut unlisted = streams.len();
    let mut rescan = tokio::time::interval(RESCAN);
    loop {
        // Take in whatever the watches have before acting on the graph.
        while let Some(Some((resource, event))) = streams.next().now_or_never() {
            collector.handle(&resource, event, &mut unlisted);
        }
        if unlisted == 0
            && let Some(uid) = collector.queue.pop_front()
        {
            collector.queued.remove(&uid);
            if let Err(error) = collector.process(&uid).await {
                debug!(%error, uid, "garbage collector; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                collector.enqueue(uid);
            }
            continue;
        }
        tokio::select! {
            Some((resource, event)) = streams.next() => collector.handle(&resource, event, &mut unlisted),
            _ = rescan.tick() => {
                let all: Vec<String> = collector.graph.objects.keys().cloned().collect();
                for uid in all {
                    collector.enqueue(uid);
                }
            }
        }
    }
}

impl Collector {
    fn enqueue(&mut self, uid: String) {
        if self.queued.insert(uid.clone()) {
            self.queue.push_back(uid);
        }
    }

    fn handle(
        &mut self,
        resource: &Arc<Resource>,
        event: Result<watcher::Event<PartialObjectMeta<DynamicObject>>, watcher::Error>,
        unlisted: &mut usize,
    ) {
        let kind = (resource.api.api_version.clone(), resource.api.kind.clone());
        match event {
            Ok(watcher::Event::Init) => {
                self.relisting.insert(kind, HashSet::new());
            }
            Ok(watcher::Event::InitDone) => {
                // Objects of this kind not listed again were deleted while
                // the watch was down.
                let seen = self.relisting.remove(&kind).unwrap_or_default();
                let gone: Vec<String> = self
                    .graph
                    .objects
                    .iter()
                    .filter(|(uid, e)| {
                        e.resource.api.api_version == kind.0
                            && e.resource.api.kind == kind.1
                            && !seen.contains(*uid)
                    })
                    .map(|(uid, _)| uid.clone())
                    .collect();
                for uid in gone {
                    self.forget(&uid);
                }
                if self.listed.insert(kind) {
                    *unlisted = unlisted.saturating_sub(1);
                }
            }
            Ok(event) => {
                if let (watcher::Event::InitApply(object), Some(seen)) =
                    (&event, self.relisting.get_mut(&kind))
                    && let Some(uid) = &object.metadata.uid
                {
                    seen.insert(uid.clone());
                }
                self.observe(resource, event);
            }
            Err(error) => debug!(%error, kind = %resource.api.kind, "garbage collector watch"),
        }
    }

    /// An object is gone: its dependents may be garbage now, and an owner
    /// deleting in the foreground may be free to go.
    fn forget(&mut self, uid: &str) {
        let owners = self.graph.remove(uid).map(|e| e.owners).unwrap_or_default();
        for dependent in self.graph.dependents_of(uid) {
            self.enqueue(dependent);
        }
        for owner in owners {
            self.enqueue(owner.uid);
        }
    }

    fn observe(
        &mut self,
        resource: &Arc<Resource>,
        event: watcher::Event<PartialObjectMeta<DynamicObject>>,
    ) {
        match event {
            watcher::Event::Apply(object) | watcher::Event::InitApply(object) => {
                let meta = object.metadata;
                let Some(uid) = meta.uid.clone() else { return };
                let entry = Entry {
                    resource: Arc::clone(resource),
                    namespace: meta.namespace.clone(),
                    name: meta.name.clone().unwrap_or_default(),
                    owners: meta.owner_references.clone().unwrap_or_default(),
                    deleting: meta.deletion_timestamp.is_some(),
                    finalizers: meta.finalizers.clone().unwrap_or_default(),
                };
                let interesting = !entry.owners.is_empty()
                    || (entry.deleting
                        && entry
                            .finalizers
                            .iter()
                            .any(|f| f == ORPHAN || f == FOREGROUND));
                self.graph.upsert(uid.clone(), entry);
                if interesting {
                    self.enqueue(uid);
                }
            }
            watcher::Event::Delete(object) => {
                if let Some(uid) = object.metadata.uid {
                    self.forget(&uid);
                }
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }

    /// Whether the owner exists: in the graph, or confirmed by a read.
    async fn owner_present(
        &self,
        owner: &OwnerReference,
        namespace: Option<&str>,
    ) -> Result<bool, kube::Error> {
        if self.graph.objects.contains_key(&owner.uid) {
            return Ok(true);
        }
        let Some(resource) = self
            .kinds
            .get(&(owner.api_version.clone(), owner.kind.clone()))
        else {
            // A kind the API does not serve: leave the reference alone.
            return Ok(true);
        };
        let api = api_for(&self.client, resource, namespace);
        Ok(api
            .get_metadata_opt(&owner.name)
            .await?
            .is_some_and(|o| o.metadata.uid.as_deref() == Some(owner.uid.as_str())))
    }

    async fn process(&mut self, uid: &str) -> Result<(), kube::Error> {
        let Some(entry) = self.graph.objects.get(uid).cloned() else {
            return Ok(());
        };
        let api = api_for(&self.client, &entry.resource, entry.namespace.as_deref());
        if entry.deleting && entry.finalizers.iter().any(|f| f == ORPHAN) {
            return self.orphan(uid, &entry, &api).await;
        }
        if entry.deleting && entry.finalizers.iter().any(|f| f == FOREGROUND) {
            return self.foreground(uid, &entry, &api).await;
        }
        let mut present = HashMap::new();
        for owner in &entry.owners {
            present.insert(
                owner.uid.clone(),
                self.owner_present(owner, entry.namespace.as_deref())
                    .await?,
            );
        }
        match verdict(&entry, |o| present.get(&o.uid).copied().unwrap_or(true)) {
            Verdict::Nothing => Ok(()),
            Verdict::Delete => {
                debug!(kind = %entry.resource.api.kind, name = entry.name, "collecting");
                let params = DeleteParams {
                    propagation_policy: Some(PropagationPolicy::Background),
                    preconditions: Some(kube::api::Preconditions {
                        uid: Some(uid.to_owned()),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                ignore_gone(api.delete(&entry.name, &params).await.map(drop))
            }
            Verdict::KeepOnly(kept) => self.set_owners(uid, &entry, &api, &kept).await,
        }
    }

    async fn set_owners(
        &self,
        uid: &str,
        entry: &Entry,
        api: &Api<DynamicObject>,
        owners: &[OwnerReference],
    ) -> Result<(), kube::Error> {
        let patch = serde_json::json!({ "metadata": { "ownerReferences": owners, "uid": uid } });
        ignore_gone(
            api.patch(&entry.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(drop),
        )
    }

    async fn remove_finalizer(
        &self,
        uid: &str,
        entry: &Entry,
        api: &Api<DynamicObject>,
        finalizer: &str,
    ) -> Result<(), kube::Error> {
        let finalizers: Vec<&String> = entry
            .finalizers
            .iter()
            .filter(|f| *f != finalizer)
            .collect();
        let patch = serde_json::json!({ "metadata": { "finalizers": finalizers, "uid": uid } });
        ignore_gone(
            api.patch(&entry.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(drop),
        )
    }

    /// Removes the owner from every dependent, then its finalizer.
    async fn orphan(
        &mut self,
        uid: &str,
        entry: &Entry,
        api: &Api<DynamicObject>,
    ) -> Result<(), kube::Error> {
        for dependent in self.graph.dependents_of(uid) {
            let Some(child) = self.graph.objects.get(&dependent).cloned() else {
                continue;
            };
            let kept: Vec<OwnerReference> = child
                .owners
                .iter()
                .filter(|o| o.uid != uid)
                .cloned()
                .collect();
            let child_api = api_for(&self.client, &child.resource, child.namespace.as_deref());
            self.set_owners(&dependent, &child, &child_api, &kept)
                .await?;
        }
        self.remove_finalizer(uid, entry, api, ORPHAN).await
    }

    /// Deletes the dependents (in the foreground too, so grandchildren go
    /// first), and removes the finalizer once none is left.
    async fn foreground(
        &mut self,
        uid: &str,
        entry: &Entry,
        api: &Api<DynamicObject>,
    ) -> Result<(), kube::Error> {
        let dependents = self.graph.dependents_of(uid);
        if dependents.is_empty() {
            return self.remove_finalizer(uid, entry, api, FOREGROUND).await;
        }
        for dependent in dependents {
            let Some(child) = self.graph.objects.get(&dependent).cloned() else {
                continue;
            };
            if child.deleting {
                continue;
            }
            let child_api = api_for(&self.client, &child.resource, child.namespace.as_deref());
            let others: Vec<OwnerReference> = child
                .owners
                .iter()
                .filter(|o| o.uid != uid)
                .cloned()
                .collect();
            if !others.is_empty() {
                // Others still own it: it only stops naming this owner.
                self.set_owners(&dependent, &child, &child_api, &others)
                    .await?;
                continue;
            }
            let params = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Foreground),
                ..Default::default()
            };
            ignore_gone(child_api.delete(&child.name, &params).await.map(drop))?;
        }
        // Each dependent's disappearance queues this owner again.
        Ok(())
    }
}

fn ignore_gone(result: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match result {
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".to_owned(),
            kind: "ReplicaSet".to_owned(),
            name: uid.to_owned(),
            uid: uid.to_owned(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    fn entry(owners: &[&str]) -> Entry {
        Entry {
            resource: Arc::new(Resource {
                api: ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&()),
                namespaced: true,
            }),
            namespace: Some("default".to_owned()),
            name: "p".to_owned(),
            owners: owners.iter().map(|u| owner(u)).collect(),
            deleting: false,
            finalizers: Vec::new(),
        }
    }

    #[test]
    fn dependents_go_only_when_every_owner_is_gone() {
        assert_eq!(
            verdict(&entry(&[]), |_| false),
            Verdict::Nothing,
            "no owners"
        );
        assert_eq!(verdict(&entry(&["a"]), |_| true), Verdict::Nothing);
        assert_eq!(verdict(&entry(&["a"]), |_| false), Verdict::Delete);
        assert_eq!(
            verdict(&entry(&["a", "b"]), |o| o.uid == "b"),
            Verdict::KeepOnly(vec![owner("b")])
        );
        let mut deleting = entry(&["a"]);
        deleting.deleting = true;
        assert_eq!(
            verdict(&deleting, |_| false),
            Verdict::Nothing,
            "already going"
        );
    }

    #[test]
    fn the_graph_indexes_dependents_by_owner() {
        let mut graph = Graph::default();
        graph.upsert("p1".to_owned(), entry(&["rs"]));
        graph.upsert("p2".to_owned(), entry(&["rs", "other"]));
        let mut found = graph.dependents_of("rs");
        found.sort();
        assert_eq!(found, ["p1", "p2"]);
        graph.upsert("p2".to_owned(), entry(&["other"]));
        assert_eq!(graph.dependents_of("rs"), ["p1"]);
        graph.remove("p1");
        assert!(graph.dependents_of("rs").is_empty());
        assert_eq!(graph.dependents_of("other"), ["p2"]);
    }
}
