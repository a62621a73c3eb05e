//! Namespace deletion: empties a terminating namespace of every
//! namespaced resource the API serves (found through discovery, so it
//! covers kinds this controller has never heard of), waits for the last
//! object to go (pods go when their node has stopped them), then removes
//! the `kubernetes` finalizer through `/finalize`, which lets the API
//! server delete the namespace.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, ResourceExt,
    api::{ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    discovery::{Discovery, Scope, verbs},
    runtime::controller::Action,
};

use super::{Context, Error};
use crate::pods;

const FINALIZER: &str = "kubernetes";

/// Upstream's condition message: "Some resources are remaining: pods.
/// has 3 resource instances, ...".
pub(super) fn remaining_message(counts: &[(String, usize)]) -> String {
    let parts: Vec<String> = counts
        .iter()
        .map(|(resource, count)| format!("{resource} has {count} resource instances"))
        .collect();
    format!("Some resources are remaining: {}", parts.join(", "))
}

/// How long a discovery serves the 1 s retries of a namespace that is
/// emptying (a discovery is about a dozen reads).
const DISCOVERY_TTL: Duration = Duration::from_secs(30);

/// Discovered resources a namespace deletion empties.
pub type NamespacedResources = Arc<Vec<ApiResource>>;

/// The namespaced resources that can be listed and deleted as a
/// collection, and whether they come from a cached discovery.
async fn namespaced_resources(
    ctx: &Context,
    fresh: bool,
) -> Result<(NamespacedResources, bool), kube::Error> {
    let lock = || {
        ctx.discovery
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if !fresh
        && let Some((at, resources)) = lock().as_ref()
        && at.elapsed() < DISCOVERY_TTL
    {
        return Ok((Arc::clone(resources), true));
    }
    let discovery = Discovery::new(ctx.client.clone()).run().await?;
    let resources: NamespacedResources = Arc::new(
        discovery
            .groups()
            .flat_map(|group| group.recommended_resources())
            .filter(|(_, capabilities)| {
                capabilities.scope == Scope::Namespaced
                    && capabilities.supports_operation(verbs::LIST)
                    && capabilities.supports_operation(verbs::DELETE_COLLECTION)
            })
            .map(|(resource, _)| resource)
            .collect(),
    );
    *lock() = Some((Instant::now(), Arc::clone(&resources)));
    Ok((resources, false))
}

/// Deletes what is left of each resource in the namespace; returns the
/// resources (`plural.group`) that still have objects, with counts.
async fn sweep(
    ctx: &Context,
    name: &str,
    resources: &[ApiResource],
) -> Result<Vec<(String, usize)>, Error> {
    let mut remaining = Vec::new();
    for resource in resources {
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), name, resource);
        let left = api
            .list_metadata(&ListParams::default())
            .await
            .map_err(Error::api(
                "listing",
                format!("{} in {name}", resource.plural),
            ))?;
        if left.items.is_empty() {
            continue;
        }
        let live = left
            .items
            .iter()
            .filter(|o| !pods::is_deleting(&o.metadata))
            .count();
        if live > 0 {
            api.delete_collection(&DeleteParams::background(), &ListParams::default())
                .await
                .map_err(Error::api(
                    "deleting",
                    format!("{} in {name}", resource.plural),
                ))?;
        }
        let plural = if resource.group.is_empty() {
            resource.plural.clone()
        } else {
            format!("{}.{}", resource.plural, resource.group)
        };
        remaining.push((plural, left.items.len()));
    }
    Ok(remaining)
}

pub(super) async fn reconcile(
    namespace: Arc<Namespace>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let name = namespace.name_any();
    let pending = namespace
        .spec
        .as_ref()
        .and_then(|s| s.finalizers.as_ref())
        .is_some_and(|f| f.iter().any(|f| f == FINALIZER));
    if !pods::is_deleting(&namespace.metadata) || !pending {
        return Ok(Action::await_change());
    }
    let (resources, cached) = namespaced_resources(&ctx, false).await.map_err(Error::api(
        "discovering resources for deleting namespace",
        &name,
    ))?;
    let mut remaining = sweep(&ctx, &name, &resources).await?;
    if remaining.is_empty() && cached {
        // Finalize only on a fresh view: a resource served since the
        // cached discovery must be emptied too.
        let (resources, _) = namespaced_resources(&ctx, true).await.map_err(Error::api(
            "discovering resources for deleting namespace",
            &name,
        ))?;
        remaining = sweep(&ctx, &name, &resources).await?;
    }
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    if !remaining.is_empty() {
        let message = remaining_message(&remaining);
        // Written only when it says something new (each write would
        // trigger another reconcile).
        let reported = namespace
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "NamespaceContentRemaining"))
            .is_some_and(|c| c.message.as_deref() == Some(message.as_str()));
        if !reported {
            let patch = serde_json::json!({ "status": { "conditions": [{
                "type": "NamespaceContentRemaining",
                "status": "True",
                "reason": "SomeResourcesRemain",
                "message": message,
                "lastTransitionTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(chrono::Utc::now()),
            }]}});
            api.patch_status(&name, &PatchParams::default(), &Patch::Strategic(patch))
                .await
                .map_err(Error::api("reporting remaining content of", &name))?;
        }
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let mut finalized = Namespace::clone(&namespace);
    if let Some(finalizers) = finalized.spec.as_mut().and_then(|s| s.finalizers.as_mut()) {
        finalizers.retain(|f| f != FINALIZER);
    }
    let body = serde_json::to_vec(&finalized).map_err(|e| Error::Encode {
        object: name.clone(),
        source: e,
    })?;
    match api
        .replace_subresource("finalize", &name, &PostParams::default(), body)
        .await
    {
        Ok(_) => Ok(Action::await_change()),
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {
            Ok(Action::requeue(Duration::from_millis(200)))
        }
        Err(error) => Err(Error::api("finalizing namespace", name)(error)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_remaining_message_reads_like_upstream() {
        assert_eq!(
            super::remaining_message(&[("pods".to_owned(), 3), ("replicasets.apps".to_owned(), 1)]),
            "Some resources are remaining: pods has 3 resource instances, replicasets.apps has 1 resource instances"
        );
    }
}
