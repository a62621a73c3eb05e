//! apps/v1 and batch/v1 kinds: everything that carries a pod template.

use k8s_openapi::{
    api::{
        apps::v1::{ControllerRevision, DaemonSet, Deployment, ReplicaSet, StatefulSet},
        batch::v1::{CronJob, Job},
        core::v1::PodTemplateSpec,
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
    chrono::{DateTime, Utc},
};
use serde_json::{Value, json};

use super::{
    Kind, ResourceType,
    core::{default_pod_spec, validate_pod_spec},
    register,
};
use crate::apiserver::{
    status::Cause,
    table::{Column, age},
    validation::{Causes, check_labels, check_selector, selector_matches},
};

pub(super) fn register_all(types: &mut Vec<ResourceType>) {
    register::<Deployment>(types);
    register::<ReplicaSet>(types);
    register::<DaemonSet>(types);
    register::<StatefulSet>(types);
    register::<Job>(types);
    register::<CronJob>(types);
    register::<ControllerRevision>(types);
}

const ALL: &[&str] = &["all"];

fn default_template(template: &mut PodTemplateSpec) {
    if let Some(spec) = template.spec.as_mut() {
        default_pod_spec(spec);
    }
}

/// A selector that is set, valid, and selects the template's labels.
fn validate_selected_template(
    selector: Option<&LabelSelector>,
    template: &PodTemplateSpec,
    causes: &mut Causes,
) {
    let labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    check_labels("spec.template.metadata.labels", &labels, causes);
    match selector {
        None => causes.push(Cause::required("spec.selector")),
        Some(selector)
            if selector.match_labels.as_ref().is_none_or(|m| m.is_empty())
                && selector
                    .match_expressions
                    .as_ref()
                    .is_none_or(|e| e.is_empty()) =>
        {
            causes.push(Cause::invalid(
                "spec.selector",
                &json!(selector),
                "empty selector is invalid",
            ));
        }
        Some(selector) => {
            check_selector("spec.selector", selector, causes);
            if !selector_matches(selector, &labels) {
                causes.push(Cause::invalid(
                    "spec.template.metadata.labels",
                    &json!(labels),
                    "`selector` does not match template `labels`",
                ));
            }
        }
    }
    match &template.spec {
        Some(spec) => validate_pod_spec("spec.template.spec", spec, causes),
        None => causes.push(Cause::required("spec.template.spec")),
    }
}

fn check_replicas(replicas: Option<i32>, causes: &mut Causes) {
    if let Some(replicas) = replicas
        && replicas < 0
    {
        causes.push(Cause::invalid(
            "spec.replicas",
            &json!(replicas),
            "must be greater than or equal to 0",
        ));
    }
}

fn containers_and_images(template: &PodTemplateSpec) -> (String, String) {
    let containers = template
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let names: Vec<&str> = containers.iter().map(|c| c.name.as_str()).collect();
    let images: Vec<&str> = containers
        .iter()
        .filter_map(|c| c.image.as_deref())
        .collect();
    (names.join(","), images.join(","))
}

/// A label selector as `kubectl get -o wide` prints it.
pub(super) fn selector_string(selector: &LabelSelector) -> String {
    match selector_query(selector) {
        none if none.is_empty() => "<none>".to_owned(),
        query => query,
    }
}

/// The selector as a `labelSelector` query (empty for none).
pub fn selector_query(selector: &LabelSelector) -> String {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    for expression in selector.match_expressions.iter().flatten() {
        let values = expression.values.clone().unwrap_or_default().join(",");
        parts.push(match expression.operator.as_str() {
            "In" => format!("{} in ({values})", expression.key),
            "NotIn" => format!("{} notin ({values})", expression.key),
            "Exists" => expression.key.clone(),
            _ => format!("!{}", expression.key),
        });
    }
    parts.join(",")
}

impl Kind for Deployment {
    const SHORT_NAMES: &'static [&'static str] = &["deploy"];
    const CATEGORIES: &'static [&'static str] = ALL;
    const STATUS: bool = true;
    const SCALE: bool = true;

    fn default_fields(&mut self) {
        let Some(spec) = self.spec.as_mut() else {
            return;
        };
        spec.replicas.get_or_insert(1);
        spec.revision_history_limit.get_or_insert(10);
        spec.progress_deadline_seconds.get_or_insert(600);
        let strategy = spec.strategy.get_or_insert_with(Default::default);
        let kind = strategy
            .type_
            .get_or_insert_with(|| "RollingUpdate".to_owned());
        if kind == "RollingUpdate" {
            let rolling = strategy.rolling_update.get_or_insert_with(Default::default);
            let quarter = || {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("25%".to_owned())
            };
            rolling.max_surge.get_or_insert_with(quarter);
            rolling.max_unavailable.get_or_insert_with(quarter);
        }
        default_template(&mut spec.template);
    }

    fn validate(&self, causes: &mut Causes) {
        let Some(spec) = &self.spec else {
            causes.push(Cause::required("spec"));
            return;
        };
        check_replicas(spec.replicas, causes);
        validate_selected_template(Some(&spec.selector), &spec.template, causes);
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Ready", "string", 0),
            Column::new("Up-to-date", "integer", 0),
            Column::new("Available", "integer", 0),
            Column::new("Age", "string", 0),
            Column::new("Containers", "string", 1),
            Column::new("Images", "string", 1),
            Column::new("Selector", "string", 1),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let spec = self.spec.clone().unwrap_or_default();
        let status = self.status.clone().unwrap_or_default();
        let (containers, images) = containers_and_images(&spec.template);
        vec![
            json!(format!(
                "{}/{}",
                status.ready_replicas.unwrap_or(0),
                spec.replicas.unwrap_or(1)
            )),
            json!(status.updated_replicas.unwrap_or(0)),
            json!(status.available_replicas.unwrap_or(0)),
            json!(age(&self.metadata, now)),
            json!(containers),
            json!(images),
            json!(selector_string(&spec.selector)),
        ]
    }
}

impl Kind for ReplicaSet {
    const SHORT_NAMES: &'static [&'static str] = &["rs"];
    const CATEGORIES: &'static [&'static str] = ALL;
    const STATUS: bool = true;
    const SCALE: bool = true;
    const FIELDS: &'static [&'static str] = &["status.replicas"];

    fn default_fields(&mut self) {
        let Some(spec) = self.spec.as_mut() else {
            return;
        };
        spec.replicas.get_or_insert(1);
        if let Some(template) = spec.template.as_mut() {
            default_template(template);
        }
    }

    fn validate(&self, causes: &mut Causes) {
        let Some(spec) = &self.spec else {
            causes.push(Cause::required("spec"));
            return;
        };
        check_replicas(spec.replicas, causes);
        match &spec.template {
            Some(template) => validate_selected_template(Some(&spec.selector), template, causes),
            None => causes.push(Cause::required("spec.template")),
        }
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Desired", "integer", 0),
            Column::new("Current", "integer", 0),
            Column::new("Ready", "integer", 0),
            Column::new("Age", "string", 0),
            Column::new("Containers", "string", 1),
            Column::new("Images", "string", 1),
            Column::new("Selector", "string", 1),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let spec = self.spec.clone().unwrap_or_default();
        let status = self.status.clone().unwrap_or_default();
        let (containers, images) =
            containers_and_images(&spec.template.clone().unwrap_or_default());
        vec![
            json!(spec.replicas.unwrap_or(1)),
            json!(status.replicas),
            json!(status.ready_replicas.unwrap_or(0)),
            json!(age(&self.metadata, now)),
            json!(containers),
            json!(images),
            json!(selector_string(&spec.selector)),
        ]
    }
}

impl Kind for DaemonSet {
    const SHORT_NAMES: &'static [&'static str] = &["ds"];
    const CATEGORIES: &'static [&'static str] = ALL;
    const STATUS: bool = true;

    fn default_fields(&mut self) {
        let Some(spec) = self.spec.as_mut() else {
            return;
        };
        spec.revision_history_limit.get_or_insert(10);
        let strategy = spec.update_strategy.get_or_insert_with(Default::default);
        strategy
            .type_
            .get_or_insert_with(|| "RollingUpdate".to_owned());
        default_template(&mut spec.template);
    }

    fn validate(&self, causes: &mut Causes) {
        match &self.spec {
            Some(spec) => validate_selected_template(Some(&spec.selector), &spec.template, causes),
            None => causes.push(Cause::required("spec")),
        }
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Desired", "integer", 0),
            Column::new("Current", "integer", 0),
            Column::new("Ready", "integer", 0),
            Column::new("Up-to-date", "integer", 0),
            Column::new("Available", "integer", 0),
            Column::new("Node Selector", "string", 0),
            Column::new("Age", "string", 0),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let status = self.status.clone().unwrap_or_default();
        let node_selector: Vec<String> = self
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.node_selector.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        vec![
            json!(status.desired_number_scheduled),
            json!(status.current_number_scheduled),
            json!(status.number_ready),
            json!(status.updated_number_scheduled.unwrap_or(0)),
            json!(status.number_available.unwrap_or(0)),
            json!(if node_selector.is_empty() {
                "<none>".to_owned()
            } else {
                node_selector.join(",")
            }),
            json!(age(&self.metadata, now)),
        ]
    }
}

impl Kind for StatefulSet {
    const SHORT_NAMES: &'static [&'static str] = &["sts"];
    const CATEGORIES: &'static [&'static str] = ALL;
    const STATUS: bool = true;
    const SCALE: bool = true;

    fn default_fields(&mut self) {
        let Some(spec) = self.spec.as_mut() else {
            return;
        };
        spec.replicas.get_or_insert(1);
        spec.revision_history_limit.get_or_insert(10);
        spec.pod_management_policy
            .get_or_insert_with(|| "OrderedReady".to_owned());
        let strategy = spec.update_strategy.get_or_insert_with(Default::default);
        strategy
            .type_
            .get_or_insert_with(|| "RollingUpdate".to_owned());
        default_template(&mut spec.template);
    }

    fn validate(&self, causes: &mut Causes) {
        let Some(spec) = &self.spec else {
            causes.push(Cause::required("spec"));
            return;
        };
        check_replicas(spec.replicas, causes);
        validate_selected_template(Some(&spec.selector), &spec.template, causes);
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Ready", "string", 0),
            Column::new("Age", "string", 0),
            Column::new("Containers", "string", 1),
            Column::new("Images", "string", 1),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let spec = self.spec.clone().unwrap_or_default();
        let status = self.status.clone().unwrap_or_default();
        let (containers, images) = containers_and_images(&spec.template);
        vec![
            json!(format!(
                "{}/{}",
                status.ready_replicas.unwrap_or(0),
                spec.replicas.unwrap_or(1)
            )),
            json!(age(&self.metadata, now)),
            json!(containers),
            json!(images),
        ]
    }
}

/// The template history of DaemonSets and StatefulSets, which `kubectl
/// rollout history|undo` reads.
impl Kind for ControllerRevision {
    fn validate(&self, causes: &mut Causes) {
        if self.data.is_none() {
            causes.push(Cause::required("data"));
        }
        if self.revision < 0 {
            causes.push(Cause::invalid(
                "revision",
                &json!(self.revision),
                "must be greater than or equal to 0",
            ));
        }
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Controller", "string", 0),
            Column::new("Revision", "integer", 0),
            Column::new("Age", "string", 0),
        ]
    }

    /// The controller as upstream prints it: `daemonset.apps/agent`.
    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let controller = self
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|r| r.controller == Some(true))
            .map_or_else(
                || "<none>".to_owned(),
                |owner| {
                    let group = owner.api_version.split_once('/').map_or("", |(g, _)| g);
                    let kind = owner.kind.to_lowercase();
                    match group {
                        "" => format!("{kind}/{}", owner.name),
                        group => format!("{kind}.{group}/{}", owner.name),
                    }
                },
            );
        vec![
            json!(controller),
            json!(self.revision),
            json!(age(&self.metadata, now)),
        ]
    }
}

fn validate_job_template(field: &str, template: &PodTemplateSpec, causes: &mut Causes) {
    match &template.spec {
        Some(spec) => {
            validate_pod_spec(&format!("{field}.spec"), spec, causes);
            if let Some(policy) = &spec.restart_policy
                && !matches!(policy.as_str(), "OnFailure" | "Never")
            {
                causes.push(Cause::not_supported(
                    format!("{field}.spec.restartPolicy"),
                    &json!(policy),
                    &["OnFailure", "Never"],
                ));
            }
        }
        None => causes.push(Cause::required(format!("{field}.spec"))),
    }
}

fn default_job_template(template: &mut PodTemplateSpec) {
    if let Some(spec) = template.spec.as_mut() {
        // Jobs have no "Always" default: their pods must end.
        spec.restart_policy
            .get_or_insert_with(|| "Never".to_owned());
    }
    default_template(template);
}

impl Kind for Job {
    const CATEGORIES: &'static [&'static str] = ALL;
    const STATUS: bool = true;
    const FIELDS: &'static [&'static str] = &["status.successful"];

    fn default_fields(&mut self) {
        let Some(spec) = self.spec.as_mut() else {
            return;
        };
        spec.completions.get_or_insert(1);
        spec.parallelism.get_or_insert(1);
        spec.backoff_limit.get_or_insert(6);
        spec.completion_mode
            .get_or_insert_with(|| "NonIndexed".to_owned());
        spec.suspend.get_or_insert(false);
        default_job_template(&mut spec.template);
    }

    fn validate(&self, causes: &mut Causes) {
        match &self.spec {
            Some(spec) => validate_job_template("spec.template", &spec.template, causes),
            None => causes.push(Cause::required("spec")),
        }
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Status", "string", 0),
            Column::new("Completions", "string", 0),
            Column::new("Duration", "string", 0),
            Column::new("Age", "string", 0),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let status = self.status.clone().unwrap_or_default();
        let completions = self.spec.as_ref().and_then(|s| s.completions).unwrap_or(1);
        let condition = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.status == "True" && matches!(c.type_.as_str(), "Complete" | "Failed"))
            .map_or("Running", |c| c.type_.as_str())
            .to_owned();
        let duration = status.start_time.as_ref().map(|start| {
            let end = status.completion_time.as_ref().map_or(now, |t| t.0);
            crate::apiserver::table::human_duration((end - start.0).num_seconds())
        });
        vec![
            json!(condition),
            json!(format!("{}/{completions}", status.succeeded.unwrap_or(0))),
            json!(duration.unwrap_or_default()),
            json!(age(&self.metadata, now)),
        ]
    }
}

impl Kind for CronJob {
    const SHORT_NAMES: &'static [&'static str] = &["cj"];
    const CATEGORIES: &'static [&'static str] = ALL;
    const STATUS: bool = true;

    fn default_fields(&mut self) {
        let Some(spec) = self.spec.as_mut() else {
            return;
        };
        spec.concurrency_policy
            .get_or_insert_with(|| "Allow".to_owned());
        spec.suspend.get_or_insert(false);
        spec.successful_jobs_history_limit.get_or_insert(3);
        spec.failed_jobs_history_limit.get_or_insert(1);
        if let Some(job) = spec.job_template.spec.as_mut() {
            default_job_template(&mut job.template);
        }
    }

    fn validate(&self, causes: &mut Causes) {
        let Some(spec) = &self.spec else {
            causes.push(Cause::required("spec"));
            return;
        };
        if spec.schedule.split_whitespace().count() != 5 && !spec.schedule.starts_with('@') {
            causes.push(Cause::invalid(
                "spec.schedule",
                &json!(spec.schedule),
                format!(
                    "expected exactly 5 fields, found {}",
                    spec.schedule.split_whitespace().count()
                ),
            ));
        }
        match &spec.job_template.spec {
            Some(job) => {
                validate_job_template("spec.jobTemplate.spec.template", &job.template, causes)
            }
            None => causes.push(Cause::required("spec.jobTemplate.spec")),
        }
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Schedule", "string", 0),
            Column::new("Timezone", "string", 0),
            Column::new("Suspend", "boolean", 0),
            Column::new("Active", "integer", 0),
            Column::new("Last Schedule", "string", 0),
            Column::new("Age", "string", 0),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let spec = self.spec.clone().unwrap_or_default();
        let status = self.status.clone().unwrap_or_default();
        vec![
            json!(spec.schedule),
            json!(spec.time_zone.unwrap_or_else(|| "<none>".to_owned())),
            json!(spec.suspend.unwrap_or(false)),
            json!(status.active.map_or(0, |a| a.len())),
            json!(status.last_schedule_time.map_or_else(
                || "<none>".to_owned(),
                |t| crate::apiserver::table::human_duration((now - t.0).num_seconds())
            )),
            json!(age(&self.metadata, now)),
        ]
    }
}
