//! ControllerRevisions: the template history of DaemonSets and
//! StatefulSets, kept as upstream's controllers keep it, so that `kubectl
//! rollout history` lists it and `kubectl rollout undo` goes back.
//!
//! - A revision is named `<owner>-<hash>`, controlled by its owner and
//!   labelled like the template (so the owner's selector finds it) plus
//!   the hash. Its `data` is a strategic merge patch that puts the
//!   template back whole: `{"spec":{"template":{…,"$patch":"replace"}}}`,
//!   which kubectl sends as is to roll back.
//! - Revision numbers only grow: a template seen before (a rollback) gets
//!   its old revision renumbered to the newest, as upstream does, so
//!   `undo` twice swaps between two templates.
//! - Beyond `revisionHistoryLimit` old revisions, the oldest ones no live
//!   pod runs are deleted.
//! - A hash already taken by a different template is a collision:
//!   `status.collisionCount` is bumped, which changes the hash.

use std::{collections::HashSet, sync::Arc};

use k8s_openapi::{
    api::{apps::v1::ControllerRevision, core::v1::PodTemplateSpec},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, runtime::RawExtension},
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use super::{
    Context, Error, Namespaced, claim_selected, controlled_by, controller_reference,
    deployment::template_hash, merge_status,
};

/// The strategic merge patch that restores `template`.
fn restoring_patch(template: &PodTemplateSpec) -> Value {
    let mut template = serde_json::to_value(template).unwrap_or_else(|_| json!({}));
    if let Some(fields) = template.as_object_mut() {
        fields.insert("$patch".to_owned(), json!("replace"));
    }
    json!({ "spec": { "template": template } })
}

/// What one sync does to an owner's revisions.
#[derive(Debug, Default)]
pub(super) struct Plan {
    pub create: Option<ControllerRevision>,
    /// A revision whose template is current again, and its new number.
    pub renumber: Option<(String, i64)>,
    pub delete: Vec<String>,
    /// The current template's revision: its name and hash. A revision
    /// made before keeps the hash it was made with, whatever the
    /// collision count is now. `None` when `<owner>-<hash>` holds another
    /// template: nothing is created until the collision count (and so
    /// the hash) changes.
    pub current: Option<Current>,
}

/// A revision's name, and the hash its pods carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Current {
    pub name: String,
    pub hash: String,
}

/// Where an owner's history stands.
pub(super) struct History<'a, O> {
    pub owner: &'a O,
    pub template: &'a PodTemplateSpec,
    /// The owner's `status.collisionCount`, part of the hash.
    pub collisions: Option<i32>,
    /// The label that carries the hash on each revision.
    pub hash_label: &'a str,
    /// Revision names the owner's live pods run.
    pub live: &'a HashSet<String>,
    pub limit: i32,
}

impl<O: Resource<DynamicType = ()>> History<'_, O> {
    /// The template's hash with the current collision count.
    fn hash(&self) -> String {
        template_hash(self.template, self.collisions)
    }

    /// The name a new revision of the template gets.
    fn name(&self) -> String {
        format!(
            "{}-{}",
            self.owner.meta().name.as_deref().unwrap_or(""),
            self.hash()
        )
    }

    pub fn plan(&self, owned: &[Arc<ControllerRevision>]) -> Plan {
        let data = restoring_patch(self.template);
        let name = self.name();
        let newest = owned.iter().map(|r| r.revision).max().unwrap_or(0);
        let holds_template = |r: &ControllerRevision| r.data.as_ref().map(|d| &d.0) == Some(&data);
        let mut plan = Plan::default();
        let current = owned
            .iter()
            .filter(|r| holds_template(r))
            .max_by_key(|r| r.revision);
        match current {
            Some(current) => {
                if current.revision < newest {
                    plan.renumber = Some((current.name_any(), newest + 1));
                }
                plan.current = Some(Current {
                    name: current.name_any(),
                    hash: current
                        .labels()
                        .get(self.hash_label)
                        .cloned()
                        .unwrap_or_else(|| self.hash()),
                });
            }
            None if owned.iter().any(|r| r.name_any() == name) => {}
            None => {
                plan.create = Some(self.revision(name.clone(), data, newest + 1));
                plan.current = Some(Current {
                    name: name.clone(),
                    hash: self.hash(),
                });
            }
        }
        let current_name = current.map_or(name, |r| r.name_any());
        let mut old: Vec<&Arc<ControllerRevision>> = owned
            .iter()
            .filter(|r| r.name_any() != current_name)
            .collect();
        old.sort_by_key(|r| r.revision);
        let excess = old
            .len()
            .saturating_sub(usize::try_from(self.limit).unwrap_or(0));
        plan.delete = old
            .into_iter()
            .map(|r| r.name_any())
            .filter(|name| !self.live.contains(name))
            .take(excess)
            .collect();
        plan
    }

    fn revision(&self, name: String, data: Value, number: i64) -> ControllerRevision {
        let meta = self.owner.meta();
        let mut labels = self
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        labels.insert(self.hash_label.to_owned(), self.hash());
        ControllerRevision {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: meta.namespace.clone(),
                labels: Some(labels),
                // The change-cause annotation is what `rollout history`
                // prints.
                annotations: meta.annotations.clone(),
                owner_references: Some(vec![controller_reference(self.owner)]),
                ..Default::default()
            },
            data: Some(RawExtension(data)),
            revision: number,
        }
    }

    /// Claims the owner's revisions (by `selector`), then creates,
    /// renumbers and prunes them as [`History::plan`] says, and returns
    /// the current revision. On a hash collision it bumps the owner's
    /// collision count instead and returns `None`: the owner must not act
    /// on this hash.
    pub async fn sync(
        &self,
        ctx: &Context,
        selector: &LabelSelector,
    ) -> Result<Option<Current>, Error>
    where
        O: Namespaced,
    {
        let owned = claim_selected(ctx, self.owner, &ctx.revisions, selector).await?;
        let plan = self.plan(&owned);
        let meta = self.owner.meta();
        let namespace = meta.namespace.as_deref().unwrap_or_default();
        let api: Api<ControllerRevision> = Api::namespaced(ctx.client.clone(), namespace);
        let Some(current) = plan.current else {
            return self.count_collision(ctx).await;
        };
        if let Some(revision) = &plan.create {
            match api.create(&PostParams::default(), revision).await {
                Ok(_) => {}
                // Ours from an earlier sync the cache does not show yet,
                // or someone else's: a collision.
                Err(kube::Error::Api(kube::core::ErrorResponse { code: 409, .. })) => {
                    let existing = api
                        .get(&revision.name_any())
                        .await
                        .map_err(Error::api("reading revision", revision.name_any()))?;
                    if !controlled_by(&existing.metadata, meta.uid.as_deref())
                        || existing.data != revision.data
                    {
                        return self.count_collision(ctx).await;
                    }
                }
                Err(error) => {
                    return Err(Error::api("creating revision", revision.name_any())(error));
                }
            }
        }
        if let Some((name, number)) = &plan.renumber {
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "revision": number })),
            )
            .await
            .map_err(Error::api("renumbering revision", name.clone()))?;
        }
        for name in &plan.delete {
            match api.delete(name, &DeleteParams::default()).await {
                Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 404, .. })) => {}
                Err(error) => return Err(Error::api("deleting revision", name.clone())(error)),
            }
        }
        Ok(Some(current))
    }

    /// Bumps the owner's `status.collisionCount`, which changes the hash.
    async fn count_collision(&self, ctx: &Context) -> Result<Option<Current>, Error>
    where
        O: Namespaced,
    {
        let bumped = json!({ "status": { "collisionCount": self.collisions.unwrap_or(0) + 1 } });
        merge_status(ctx, self.owner, bumped, "counting a hash collision of").await?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::DaemonSet;

    use super::*;

    fn daemonset() -> DaemonSet {
        serde_json::from_value(json!({
            "metadata": {"name": "agent", "namespace": "kube-system", "uid": "ds",
                "annotations": {"kubernetes.io/change-cause": "v2"}},
            "spec": {"selector": {"matchLabels": {"app": "agent"}}, "template": {}},
        }))
        .unwrap()
    }

    fn template(image: &str) -> PodTemplateSpec {
        serde_json::from_value(json!({
            "metadata": {"labels": {"app": "agent"}},
            "spec": {"containers": [{"name": "a", "image": image}]},
        }))
        .unwrap()
    }

    /// The plan for the DaemonSet running `image` (limit 2).
    fn plan(image: &str, live: &[&str], owned: &[Arc<ControllerRevision>]) -> Plan {
        let ds = daemonset();
        let template = template(image);
        let live = live.iter().map(|name| (*name).to_owned()).collect();
        let history = History {
            owner: &ds,
            template: &template,
            collisions: None,
            hash_label: "controller-revision-hash",
            live: &live,
            limit: 2,
        };
        history.plan(owned)
    }

    /// The revision stored for `image`, numbered `number`.
    fn stored(image: &str, number: i64) -> Arc<ControllerRevision> {
        let mut revision = plan(image, &[], &[]).create.unwrap();
        revision.revision = number;
        Arc::new(revision)
    }

    #[test]
    fn a_new_template_gets_the_next_number_and_a_restoring_patch() {
        let plan = plan("v2", &[], &[stored("v1", 1)]);
        let created = plan.create.unwrap();
        let hash = template_hash(&template("v2"), None);
        assert_eq!(created.name_any(), format!("agent-{hash}"));
        assert_eq!(
            plan.current,
            Some(Current {
                name: created.name_any(),
                hash: hash.clone()
            })
        );
        assert_eq!(created.revision, 2);
        assert_eq!(created.labels()["app"], "agent");
        assert_eq!(created.labels()["controller-revision-hash"], hash);
        assert_eq!(created.annotations()["kubernetes.io/change-cause"], "v2");
        assert_eq!(
            created.owner_references()[0].uid,
            "ds",
            "controlled by the DaemonSet"
        );
        assert_eq!(
            created.data.unwrap().0,
            json!({"spec": {"template": {
                "metadata": {"labels": {"app": "agent"}},
                "spec": {"containers": [{"name": "a", "image": "v2"}]},
                "$patch": "replace",
            }}})
        );
        assert!(plan.renumber.is_none() && plan.delete.is_empty());
    }

    #[test]
    fn a_template_seen_before_is_renumbered_newest() {
        let old = stored("v1", 1);
        let renumbered = plan("v1", &[], &[Arc::clone(&old), stored("v2", 2)]);
        assert!(renumbered.create.is_none());
        assert_eq!(renumbered.renumber, Some((old.name_any(), 3)));
        let newest = plan("v1", &[], &[stored("v1", 3), stored("v2", 2)]);
        assert!(newest.create.is_none() && newest.renumber.is_none());
        assert_eq!(newest.current.unwrap().name, old.name_any());
    }

    #[test]
    fn old_revisions_beyond_the_limit_go_unless_a_pod_runs_them() {
        let owned: Vec<_> = (1..=5).map(|n| stored(&format!("v{n}"), n)).collect();
        let plan = plan("v5", &[&owned[0].name_any()], &owned);
        assert_eq!(
            plan.delete,
            [owned[1].name_any(), owned[2].name_any()],
            "v1 is live, v5 current, and two old ones are kept"
        );
    }

    #[test]
    fn a_template_seen_before_keeps_the_hash_it_was_made_with() {
        let old = stored("v1", 1);
        let ds = daemonset();
        let template = template("v1");
        let live = HashSet::new();
        let after_a_collision = History {
            owner: &ds,
            template: &template,
            collisions: Some(1),
            hash_label: "controller-revision-hash",
            live: &live,
            limit: 2,
        };
        let current = after_a_collision.plan(&[Arc::clone(&old)]).current.unwrap();
        assert_eq!(current.name, old.name_any());
        assert_eq!(current.hash, old.labels()["controller-revision-hash"]);
    }

    #[test]
    fn a_name_taken_by_another_template_is_a_collision() {
        let mut impostor = (*stored("v1", 1)).clone();
        impostor.metadata.name = stored("v2", 1).metadata.name.clone();
        let plan = plan("v2", &[], &[Arc::new(impostor)]);
        assert!(plan.current.is_none() && plan.create.is_none());
    }
}
