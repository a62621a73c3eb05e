//! Job: runs pods until `completions` succeed, `parallelism` at a time,
//! giving up after `backoffLimit` failures or `activeDeadlineSeconds`,
//! as upstream's job controller. A Job without `completions` is a work
//! queue: it completes once any pod succeeded and none is left running.
//! Finished pods are kept (they are the Job's record); a finished Job
//! deletes the pods still running.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use k8s_openapi::{
    api::{
        batch::v1::{Job, JobCondition, JobStatus},
        core::v1::Pod,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, PostParams},
    runtime::controller::Action,
};

use super::{Context, Error, claim, new_pod, write_status};
use crate::{events::EventType, labels, pods};

/// What one sync does.
#[derive(Debug, PartialEq)]
pub(super) struct Plan {
    pub create: usize,
    pub delete: Vec<Arc<Pod>>,
    pub status: JobStatus,
    /// The job has just finished (for the event).
    pub finished: Option<(&'static str, String)>,
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn condition(kind: &str, reason: &str, message: &str, now: DateTime<Utc>) -> JobCondition {
    JobCondition {
        type_: kind.to_owned(),
        status: "True".to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        last_probe_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    }
}

pub(super) fn plan(
    job: &Job,
    owned: &[Arc<Pod>],
    expectations_met: bool,
    now: DateTime<Utc>,
) -> Plan {
    let spec = job.spec.clone().unwrap_or_default();
    let previous = job.status.clone().unwrap_or_default();
    let active: Vec<&Arc<Pod>> = owned.iter().filter(|p| pods::is_active(p)).collect();
    let succeeded =
        i32::try_from(owned.iter().filter(|p| phase(p) == "Succeeded").count()).unwrap_or(i32::MAX);
    let failed =
        i32::try_from(owned.iter().filter(|p| phase(p) == "Failed").count()).unwrap_or(i32::MAX);
    let parallelism = spec.parallelism.unwrap_or(1).max(0);
    let backoff_limit = spec.backoff_limit.unwrap_or(6);
    let start = previous.start_time.as_ref().map_or(now, |t| t.0);
    let already = previous
        .conditions
        .iter()
        .flatten()
        .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True");
    let mut status = JobStatus {
        active: Some(i32::try_from(active.len()).unwrap_or(i32::MAX)),
        succeeded: Some(succeeded),
        failed: Some(failed),
        ready: Some(
            i32::try_from(active.iter().filter(|p| pods::is_ready(p)).count()).unwrap_or(i32::MAX),
        ),
        start_time: Some(Time(start)),
        ..previous.clone()
    };
    let mut plan = Plan {
        create: 0,
        delete: Vec::new(),
        status: JobStatus::default(),
        finished: None,
    };
    let deadline = spec
        .active_deadline_seconds
        .is_some_and(|s| start + chrono::Duration::seconds(s) <= now);
    let complete = match spec.completions {
        Some(completions) => succeeded >= completions,
        None => succeeded > 0 && active.is_empty(),
    };
    let failure = if failed > backoff_limit {
        Some((
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        ))
    } else if deadline {
        Some((
            "DeadlineExceeded",
            "Job was active longer than specified deadline",
        ))
    } else {
        None
    };
    if already {
        plan.delete = active.into_iter().cloned().collect();
    } else if complete {
        let mut conditions = previous.conditions.clone().unwrap_or_default();
        conditions.push(condition("Complete", "Completed", "", now));
        status.conditions = Some(conditions);
        status.completion_time = Some(Time(now));
        plan.delete = active.into_iter().cloned().collect();
        plan.finished = Some(("Completed", "Job completed".to_owned()));
    } else if let Some((reason, message)) = failure {
        let mut conditions = previous.conditions.clone().unwrap_or_default();
        conditions.push(condition("Failed", reason, message, now));
        status.conditions = Some(conditions);
        plan.delete = active.into_iter().cloned().collect();
        plan.finished = Some((reason, message.to_owned()));
    } else if expectations_met && !(spec.completions.is_none() && succeeded > 0) {
        // (A work queue whose first pod succeeded lets the others finish
        // and starts no more.)
        let remaining = spec
            .completions
            .map_or(parallelism, |c| (c - succeeded).max(0));
        let wanted = usize::try_from(parallelism.min(remaining)).unwrap_or(0);
        if active.len() < wanted {
            plan.create = wanted - active.len();
        } else if active.len() > wanted {
            // Parallelism went down: the newest go.
            let mut newest = active.clone();
            newest.sort_by_key(|p| std::cmp::Reverse(p.metadata.creation_timestamp.clone()));
            plan.delete = newest
                .into_iter()
                .take(active.len() - wanted)
                .cloned()
                .collect();
        }
    }
    plan.status = status;
    plan
}

pub(super) async fn reconcile(job: Arc<Job>, ctx: Arc<Context>) -> Result<Action, Error> {
    if pods::is_deleting(&job.metadata) {
        return Ok(Action::await_change());
    }
    let namespace = job.namespace().unwrap_or_default();
    let key = pods::key(&job.metadata);
    // Expectations are per owner object: uids never repeat.
    let owner = job.metadata.uid.clone().unwrap_or_default();
    let selector = job
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    let uid = job.metadata.uid.clone().unwrap_or_default();
    // Jobs select their pods by controller-uid (set at creation), which
    // no other Job's pods carry.
    let owned = claim(
        &ctx,
        &*job,
        Context::in_namespace(&ctx.pods, &namespace),
        |pod| {
            let own = pod.metadata.labels.clone().unwrap_or_default();
            own.get("batch.kubernetes.io/controller-uid") == Some(&uid)
                && labels::selector_matches(&selector, &own)
        },
    )
    .await?;
    let met = ctx
        .expectations
        .satisfied(&owner, |name| ctx.pod_live(&namespace, name));
    let plan = plan(&job, &owned, met, Utc::now());
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let template = job
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let params = PostParams::default();
    let mut pod = new_pod(&template, &*job, &format!("{}-", job.name_any()));
    let job_labels = pod.metadata.labels.get_or_insert_with(Default::default);
    for (label, value) in [
        ("batch.kubernetes.io/controller-uid", uid.as_str()),
        ("controller-uid", uid.as_str()),
        ("batch.kubernetes.io/job-name", &job.name_any()),
        ("job-name", &job.name_any()),
    ] {
        job_labels
            .entry(label.to_owned())
            .or_insert_with(|| value.to_owned());
    }
    let results =
        futures::future::join_all((0..plan.create).map(|_| api.create(&params, &pod))).await;
    // Every success is recorded before a failure is reported, or the
    // next sync would create those pods again.
    let mut failure = None;
    for result in results {
        match result {
            Ok(created) => {
                ctx.expectations.created(&owner, created.name_any());
                ctx.recorder.record(
                    &*job,
                    EventType::Normal,
                    "SuccessfulCreate",
                    format!("Created pod: {}", created.name_any()),
                );
            }
            Err(error) => failure = Some(error),
        }
    }
    if let Some(error) = failure {
        return Err(Error::api("creating a pod for", &key)(error));
    }
    for pod in &plan.delete {
        ctx.expectations.deleted(&owner, pod.name_any());
        match api.delete(&pod.name_any(), &DeleteParams::default()).await {
            Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 404, .. })) => {}
            Err(error) => {
                ctx.expectations.delete_failed(&owner, &pod.name_any());
                return Err(Error::api("deleting job pod", pod.name_any())(error));
            }
        }
    }
    write_status(&ctx, &*job, job.status.as_ref(), &plan.status).await?;
    if let Some((reason, message)) = plan.finished {
        let kind = if reason == "Completed" {
            EventType::Normal
        } else {
            EventType::Warning
        };
        ctx.recorder.record(&*job, kind, reason, message);
    }
    // The active deadline needs a look when it passes.
    let requeue = job
        .spec
        .as_ref()
        .and_then(|s| s.active_deadline_seconds)
        .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)).min(Duration::from_secs(60)));
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn job(spec: serde_json::Value) -> Job {
        serde_json::from_value(json!({"metadata": {"name": "work", "uid": "j"}, "spec": spec}))
            .unwrap()
    }

    fn pod(name: &str, phase: &str) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name}, "status": {"phase": phase}}))
                .unwrap(),
        )
    }

    fn template() -> serde_json::Value {
        json!({"spec": {"containers": [], "restartPolicy": "Never"}})
    }

    #[test]
    fn runs_parallelism_pods_until_completions() {
        let now = Utc::now();
        let spec = json!({"completions": 5, "parallelism": 2, "template": template()});
        assert_eq!(plan(&job(spec.clone()), &[], true, now).create, 2);
        let owned = [
            pod("a", "Succeeded"),
            pod("b", "Succeeded"),
            pod("c", "Succeeded"),
            pod("d", "Running"),
        ];
        let nearly = plan(&job(spec.clone()), &owned, true, now);
        assert_eq!(nearly.create, 1, "two left to complete, one running");
        assert_eq!(nearly.status.succeeded, Some(3));
        let owned = [
            pod("a", "Succeeded"),
            pod("b", "Succeeded"),
            pod("c", "Succeeded"),
            pod("d", "Succeeded"),
            pod("e", "Succeeded"),
        ];
        let done = plan(&job(spec), &owned, true, now);
        let conditions = done.status.conditions.unwrap();
        assert_eq!(conditions[0].type_, "Complete");
        assert!(done.status.completion_time.is_some());
    }

    #[test]
    fn gives_up_after_the_backoff_limit() {
        let now = Utc::now();
        let spec = json!({"backoffLimit": 1, "template": template()});
        let retry = plan(&job(spec.clone()), &[pod("a", "Failed")], true, now);
        assert_eq!(retry.create, 1);
        let owned = [pod("a", "Failed"), pod("b", "Failed"), pod("c", "Running")];
        let failed = plan(&job(spec), &owned, true, now);
        assert_eq!(failed.create, 0);
        assert_eq!(failed.delete.len(), 1, "the running pod stops");
        let condition = &failed.status.conditions.unwrap()[0];
        assert_eq!(
            (condition.type_.as_str(), condition.reason.as_deref()),
            ("Failed", Some("BackoffLimitExceeded"))
        );
    }

    #[test]
    fn a_work_queue_completes_when_one_succeeded_and_none_runs() {
        let now = Utc::now();
        let spec = json!({"parallelism": 3, "template": template()});
        assert_eq!(plan(&job(spec.clone()), &[], true, now).create, 3);
        let owned = [pod("a", "Succeeded"), pod("b", "Running")];
        let waiting = plan(&job(spec.clone()), &owned, true, now);
        assert_eq!(
            (waiting.create, waiting.delete.len()),
            (0, 0),
            "no new work once one succeeded"
        );
        let owned = [pod("a", "Succeeded"), pod("b", "Succeeded")];
        assert!(plan(&job(spec), &owned, true, now).finished.is_some());
    }
}
