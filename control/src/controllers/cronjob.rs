//! CronJob: creates a Job at each time its schedule names, as upstream's
//! controller (schedules parsed by the `croner` crate: five fields, `@hourly`
//! and friends, names of days and months; times in UTC):
//!
//! - only the most recent missed time runs, and not at all once it is
//!   more than `startingDeadlineSeconds` late;
//! - `concurrencyPolicy` Allow runs jobs side by side, Forbid skips a time
//!   while one runs, Replace deletes the running ones first;
//! - Jobs are named `<cronjob>-<scheduled minutes since the epoch>`, so a
//!   time is never run twice;
//! - finished Jobs beyond `successfulJobsHistoryLimit` (3) and
//!   `failedJobsHistoryLimit` (1) are deleted, oldest first.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use croner::{
    Cron,
    parser::{CronParser, Seconds},
};
use k8s_openapi::{
    api::{
        batch::v1::{CronJob, CronJobStatus, Job},
        core::v1::ObjectReference,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ObjectMeta, PostParams},
    runtime::controller::Action,
};

use super::{Context, Error, controlled_by, controller_reference, write_status};
use crate::{events::EventType, pods};

const SCHEDULED_AT: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";

pub(super) fn parse(schedule: &str) -> Result<Cron, croner::errors::CronError> {
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .build()
        .parse(schedule)
}

fn finished(job: &Job) -> Option<bool> {
    job.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        .map(|c| c.type_ == "Complete")
}

/// What one sync does.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// The scheduled time to run now.
    pub run: Option<DateTime<Utc>>,
    pub delete: Vec<String>,
    pub status: CronJobStatus,
    pub requeue: Option<Duration>,
    pub warning: Option<(&'static str, String)>,
}

pub(super) fn plan(cronjob: &CronJob, owned: &[Arc<Job>], now: DateTime<Utc>) -> Plan {
    let spec = cronjob.spec.clone().unwrap_or_default();
    let previous = cronjob.status.clone().unwrap_or_default();
    let mut plan = Plan::default();
    let mut active: Vec<&Arc<Job>> = Vec::new();
    // Finished jobs, with whether they succeeded.
    let mut done: Vec<(&Arc<Job>, bool)> = Vec::new();
    for job in owned {
        match finished(job) {
            None if !pods::is_deleting(&job.metadata) => active.push(job),
            None => {}
            Some(success) => done.push((job, success)),
        }
    }
    // History: oldest first beyond the limits.
    done.sort_by_key(|(job, _)| job.metadata.creation_timestamp.clone());
    for (success, limit) in [
        (true, spec.successful_jobs_history_limit.unwrap_or(3)),
        (false, spec.failed_jobs_history_limit.unwrap_or(1)),
    ] {
        let kind: Vec<&&Arc<Job>> = done
            .iter()
            .filter(|(_, s)| *s == success)
            .map(|(j, _)| j)
            .collect();
        let extra = kind
            .len()
            .saturating_sub(usize::try_from(limit).unwrap_or(0));
        plan.delete
            .extend(kind.iter().take(extra).map(|j| j.name_any()));
    }
    let last_success = done
        .iter()
        .filter(|(_, success)| *success)
        .filter_map(|(job, _)| job.status.as_ref()?.completion_time.clone())
        .max();
    plan.status = CronJobStatus {
        active: Some(active.iter().map(|j| reference(j.as_ref())).collect())
            .filter(|a: &Vec<_>| !a.is_empty()),
        last_schedule_time: previous.last_schedule_time.clone(),
        last_successful_time: last_success.or(previous.last_successful_time),
    };
    if spec
        .time_zone
        .as_deref()
        .is_some_and(|z| z != "UTC" && z != "Etc/UTC")
    {
        plan.warning = Some((
            "UnknownTimeZone",
            format!("time zone {:?} is not supported; only UTC", spec.time_zone),
        ));
        return plan;
    }
    let cron = match parse(&spec.schedule) {
        Ok(cron) => cron,
        Err(error) => {
            plan.warning = Some((
                "InvalidSchedule",
                format!("invalid schedule {:?}: {error}", spec.schedule),
            ));
            return plan;
        }
    };
    let since = previous
        .last_schedule_time
        .as_ref()
        .or(cronjob.metadata.creation_timestamp.as_ref())
        .map_or(now, |t| t.0);
    // The most recent time due, if after the last run (older missed
    // times never run, so they need not be walked).
    if let Ok(next) = cron.find_next_occurrence(&now, false) {
        plan.requeue = Some((next - now).to_std().unwrap_or_default() + Duration::from_millis(100));
    }
    let due = cron
        .find_previous_occurrence(&now, true)
        .ok()
        .filter(|due| *due > since);
    let Some(due) = due else { return plan };
    if spec.suspend == Some(true) {
        return plan;
    }
    if spec
        .starting_deadline_seconds
        .is_some_and(|d| due + chrono::Duration::seconds(d) < now)
    {
        plan.warning = Some((
            "MissSchedule",
            format!("Missed scheduled time to start a job: {}", due.to_rfc3339()),
        ));
        return plan;
    }
    match spec.concurrency_policy.as_deref() {
        Some("Forbid") if !active.is_empty() => {
            // Retried (until the deadline) once the running job ends.
            return plan;
        }
        Some("Replace") => plan.delete.extend(active.iter().map(|j| j.name_any())),
        _ => {}
    }
    plan.run = Some(due);
    plan.status.last_schedule_time = Some(Time(due));
    plan
}

fn reference(job: &Job) -> ObjectReference {
    job.object_ref(&())
}

/// The Job for a scheduled time.
fn job_for(cronjob: &CronJob, at: DateTime<Utc>) -> Job {
    let template = cronjob
        .spec
        .as_ref()
        .map(|s| s.job_template.clone())
        .unwrap_or_default();
    let meta = template.metadata.unwrap_or_default();
    let mut annotations = meta.annotations.unwrap_or_default();
    annotations.insert(SCHEDULED_AT.to_owned(), at.to_rfc3339());
    Job {
        metadata: ObjectMeta {
            name: Some(format!("{}-{}", cronjob.name_any(), at.timestamp() / 60)),
            labels: meta.labels,
            annotations: Some(annotations),
            owner_references: Some(vec![controller_reference(cronjob)]),
            ..Default::default()
        },
        spec: template.spec,
        status: None,
    }
}

pub(super) async fn reconcile(cronjob: Arc<CronJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    if pods::is_deleting(&cronjob.metadata) {
        return Ok(Action::await_change());
    }
    let namespace = cronjob.namespace().unwrap_or_default();
    let key = pods::key(&cronjob.metadata);
    let owned: Vec<Arc<Job>> = Context::in_namespace(&ctx.jobs, &namespace)
        .into_iter()
        .filter(|j| controlled_by(&j.metadata, cronjob.metadata.uid.as_deref()))
        .collect();
    let mut plan = plan(&cronjob, &owned, Utc::now());
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    for name in &plan.delete {
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => ctx.recorder.record(
                &*cronjob,
                EventType::Normal,
                "SuccessfulDelete",
                format!("Deleted job {name}"),
            ),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(Error::api("deleting job", name)(error)),
        }
    }
    if let Some(at) = plan.run {
        let job = job_for(&cronjob, at);
        match api.create(&PostParams::default(), &job).await {
            Ok(created) => {
                ctx.recorder.record(
                    &*cronjob,
                    EventType::Normal,
                    "SuccessfulCreate",
                    format!("Created job {}", created.name_any()),
                );
                plan.status
                    .active
                    .get_or_insert_with(Vec::new)
                    .push(reference(&created));
            }
            // This time already ran.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => return Err(Error::api("creating a job for", &key)(error)),
        }
    }
    if let Some((reason, message)) = &plan.warning {
        ctx.recorder
            .record(&*cronjob, EventType::Warning, reason, message.clone());
    }
    write_status(&ctx, &*cronjob, cronjob.status.as_ref(), &plan.status, None).await?;
    Ok(plan
        .requeue
        .map_or_else(Action::await_change, Action::requeue))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cronjob(schedule: &str, policy: &str, last: Option<&str>) -> CronJob {
        serde_json::from_value(json!({
            "metadata": {"name": "report", "namespace": "default", "uid": "c", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"schedule": schedule, "concurrencyPolicy": policy, "jobTemplate": {"spec": {"template": {"spec": {"containers": []}}}}},
            "status": {"lastScheduleTime": last},
        }))
        .unwrap()
    }

    fn job(name: &str, finished: Option<&str>) -> Arc<Job> {
        let conditions = finished.map(|kind| json!([{"type": kind, "status": "True"}]));
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "creationTimestamp": format!("2026-01-01T00:{name}:00Z")},
                "status": {"conditions": conditions},
            }))
            .unwrap(),
        )
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn runs_the_latest_due_time_once() {
        let now = at("2026-01-01T00:17:30Z");
        let plan = plan(&cronjob("*/5 * * * *", "Allow", None), &[], now);
        assert_eq!(
            plan.run,
            Some(at("2026-01-01T00:15:00Z")),
            "only the latest of 05, 10, 15"
        );
        assert_eq!(
            plan.requeue,
            Some(Duration::from_millis(150_100)),
            "next at :20"
        );
        let job = job_for(&cronjob("*/5 * * * *", "Allow", None), plan.run.unwrap());
        assert_eq!(
            job.name_any(),
            format!("report-{}", at("2026-01-01T00:15:00Z").timestamp() / 60)
        );
        let ran = super::plan(
            &cronjob("*/5 * * * *", "Allow", Some("2026-01-01T00:15:00Z")),
            &[],
            now,
        );
        assert_eq!(ran.run, None);
        assert_eq!(
            parse("@hourly")
                .unwrap()
                .find_next_occurrence(&now, false)
                .unwrap(),
            at("2026-01-01T01:00:00Z")
        );
        assert!(parse("61 * * * *").is_err());
        let invalid = super::plan(&cronjob("nonsense", "Allow", None), &[], now);
        assert_eq!(invalid.warning.map(|w| w.0), Some("InvalidSchedule"));
    }

    #[test]
    fn concurrency_policies_and_history() {
        let now = at("2026-01-01T00:17:30Z");
        let running = [job("10", None)];
        assert_eq!(
            plan(
                &cronjob("*/5 * * * *", "Forbid", Some("2026-01-01T00:10:00Z")),
                &running,
                now
            )
            .run,
            None
        );
        let replace = plan(
            &cronjob("*/5 * * * *", "Replace", Some("2026-01-01T00:10:00Z")),
            &running,
            now,
        );
        assert_eq!(
            (replace.run.is_some(), replace.delete.as_slice()),
            (true, ["10".to_owned()].as_slice())
        );
        let allow = plan(
            &cronjob("*/5 * * * *", "Allow", Some("2026-01-01T00:10:00Z")),
            &running,
            now,
        );
        assert!(allow.run.is_some() && allow.delete.is_empty());

        let history = [
            job("01", Some("Complete")),
            job("02", Some("Complete")),
            job("03", Some("Failed")),
            job("04", Some("Complete")),
            job("05", Some("Complete")),
            job("06", Some("Failed")),
        ];
        let pruned = plan(
            &cronjob("*/5 * * * *", "Allow", Some("2026-01-01T00:15:00Z")),
            &history,
            now,
        );
        assert_eq!(
            pruned.delete,
            ["01", "03"],
            "keep 3 successful and 1 failed"
        );
    }
}
