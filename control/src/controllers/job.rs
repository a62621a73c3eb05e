//! Job: runs pods until `completions` succeed, `parallelism` at a time,
//! giving up after `backoffLimit` failures or `activeDeadlineSeconds`,
//! as upstream's job controller. A failed pod is replaced after a back-off
//! that doubles with each failure (10 s, 20 s, ... up to 10 minutes); a
//! suspended Job (`spec.suspend`) stops its pods and its deadline clock. A Job without `completions` is a work
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
    /// It was just suspended (`true`) or resumed (`false`), for the event.
    pub suspension: Option<bool>,
    /// A replacement waits out the failure back-off until then.
    pub retry_at: Option<DateTime<Utc>>,
}

/// Back-off before replacing the first failed pod, doubling per failure
/// up to [`BACKOFF_MAX`] (upstream's `DefaultJobPodFailureBackOff` and
/// `MaxJobPodFailureBackOff`).
const BACKOFF_BASE: chrono::Duration = chrono::Duration::seconds(10);
const BACKOFF_MAX: chrono::Duration = chrono::Duration::minutes(10);

/// When a finished pod finished: its containers' latest termination,
/// else when it stopped being ready, else its creation.
fn finished_at(pod: &Pod) -> Option<DateTime<Utc>> {
    let status = pod.status.as_ref();
    let terminated = status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
        .map(|t| t.0)
        .max();
    let unready = || {
        status?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == "Ready")?
            .last_transition_time
            .as_ref()
            .map(|t| t.0)
    };
    terminated
        .or_else(unready)
        .or_else(|| pod.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// The back-off after `failures` failed pods.
fn backoff(failures: i32) -> chrono::Duration {
    let doublings = u32::try_from(failures.saturating_sub(1))
        .unwrap_or(0)
        .min(16);
    (BACKOFF_BASE * 2_i32.pow(doublings)).min(BACKOFF_MAX)
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
    let suspended = spec.suspend == Some(true);
    let was_suspended = previous
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Suspended" && c.status == "True");
    // The deadline clock runs only while the Job is not suspended: a
    // resumed Job starts it afresh.
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
        start_time: (!suspended).then_some(Time(start)),
        ..previous.clone()
    };
    let mut plan = Plan {
        create: 0,
        delete: Vec::new(),
        status: JobStatus::default(),
        finished: None,
        suspension: None,
        retry_at: None,
    };
    let deadline = !suspended
        && spec
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
    } else if suspended || was_suspended {
        // Entering or leaving suspension; a suspended Job runs nothing.
        if suspended != was_suspended {
            let mut conditions = previous.conditions.clone().unwrap_or_default();
            conditions.retain(|c| c.type_ != "Suspended");
            let (reason, message) = if suspended {
                ("JobSuspended", "Job suspended")
            } else {
                ("JobResumed", "Job resumed")
            };
            let mut suspension = condition("Suspended", reason, message, now);
            suspension.status = if suspended { "True" } else { "False" }.to_owned();
            conditions.push(suspension);
            status.conditions = Some(conditions);
            plan.suspension = Some(suspended);
        }
        if suspended {
            plan.delete = active.into_iter().cloned().collect();
            status.active = Some(0);
        }
    } else if expectations_met && !(spec.completions.is_none() && succeeded > 0) {
        // (A work queue whose first pod succeeded lets the others finish
        // and starts no more.)
        let remaining = spec
            .completions
            .map_or(parallelism, |c| (c - succeeded).max(0));
        let wanted = usize::try_from(parallelism.min(remaining)).unwrap_or(0);
        let retry_at = owned
            .iter()
            .filter(|p| phase(p) == "Failed")
            .filter_map(|p| finished_at(p))
            .max()
            .map(|last| last + backoff(failed));
        if active.len() < wanted && retry_at.is_some_and(|at| at > now) {
            plan.retry_at = retry_at;
        } else if active.len() < wanted {
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
    write_status(&ctx, &*job, job.status.as_ref(), &plan.status, None).await?;
    if let Some((reason, message)) = plan.finished {
        let kind = if reason == "Completed" {
            EventType::Normal
        } else {
            EventType::Warning
        };
        ctx.recorder.record(&*job, kind, reason, message);
    }
    match plan.suspension {
        Some(true) => ctx
            .recorder
            .record(&*job, EventType::Normal, "Suspended", "Job suspended"),
        Some(false) => ctx
            .recorder
            .record(&*job, EventType::Normal, "Resumed", "Job resumed"),
        None => {}
    }
    // The active deadline and the failure back-off need a look when
    // they pass.
    let deadline = job
        .spec
        .as_ref()
        .and_then(|s| s.active_deadline_seconds)
        .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)).min(Duration::from_secs(60)));
    let retry = plan
        .retry_at
        .map(|at| (at - Utc::now()).to_std().unwrap_or_default());
    let requeue = match (deadline, retry) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
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
    fn a_failed_pod_is_replaced_after_a_doubling_back_off() {
        // Whole seconds: times travel as RFC 3339 seconds.
        let failed_at = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
        let failed = |name: &str| {
            Arc::new(
                serde_json::from_value::<Pod>(json!({"metadata": {"name": name}, "status": {
                    "phase": "Failed",
                    "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": Time(failed_at)}],
                }}))
                .unwrap(),
            )
        };
        let spec = json!({"backoffLimit": 6, "template": template()});
        let soon = plan(
            &job(spec.clone()),
            &[failed("a")],
            true,
            failed_at + chrono::Duration::seconds(5),
        );
        assert_eq!(soon.create, 0);
        assert_eq!(
            soon.retry_at,
            Some(failed_at + chrono::Duration::seconds(10))
        );
        let later = plan(
            &job(spec.clone()),
            &[failed("a")],
            true,
            failed_at + chrono::Duration::seconds(10),
        );
        assert_eq!(later.create, 1);
        let twice = plan(
            &job(spec),
            &[failed("a"), failed("b")],
            true,
            failed_at + chrono::Duration::seconds(15),
        );
        assert_eq!(
            twice.retry_at,
            Some(failed_at + chrono::Duration::seconds(20))
        );
        assert_eq!(backoff(12), BACKOFF_MAX);
    }

    #[test]
    fn a_suspended_job_stops_its_pods_and_resumes() {
        let now = Utc::now();
        let spec = json!({"suspend": true, "parallelism": 2, "template": template()});
        let suspended = plan(&job(spec), &[pod("a", "Running")], true, now);
        assert_eq!((suspended.create, suspended.delete.len()), (0, 1));
        assert_eq!(suspended.suspension, Some(true));
        assert_eq!(suspended.status.start_time, None);
        let condition = &suspended.status.conditions.clone().unwrap()[0];
        assert_eq!(
            (condition.type_.as_str(), condition.status.as_str()),
            ("Suspended", "True")
        );
        let mut resumed_job =
            job(json!({"suspend": false, "parallelism": 2, "template": template()}));
        resumed_job.status = Some(suspended.status);
        let resumed = plan(&resumed_job, &[], true, now);
        assert_eq!(resumed.suspension, Some(false));
        let condition = &resumed.status.conditions.clone().unwrap()[0];
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_deref()),
            ("False", Some("JobResumed"))
        );
        // The next sync starts pods.
        resumed_job.status = Some(resumed.status);
        assert_eq!(plan(&resumed_job, &[], true, now).create, 2);
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
