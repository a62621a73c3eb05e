//! HorizontalPodAutoscaler (autoscaling/v2), as upstream's: every sync
//! period it reads the target's scale subresource, its pods and their
//! usage reports (`crate::usage::PodMetrics`), proposes a replica count
//! per Resource metric (cpu or memory, as a utilization of the requests
//! or an average value), takes the largest, stabilizes it over the
//! behavior's windows, limits it by the scaling policies and
//! min/maxReplicas, and writes it through the scale subresource.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use chrono::{DateTime, Utc};
use k8s_openapi::{
    api::{
        autoscaling::v2::{
            HPAScalingPolicy, HPAScalingRules, HorizontalPodAutoscaler,
            HorizontalPodAutoscalerCondition, HorizontalPodAutoscalerSpec,
            HorizontalPodAutoscalerStatus, MetricSpec, MetricStatus, MetricValueStatus,
            ResourceMetricSource, ResourceMetricStatus,
        },
        core::v1::Pod,
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::Time},
};
use kube::{
    Api, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams},
    runtime::controller::Action,
};

use super::{Context, Error, write_status};
use crate::{events::EventType, pods, usage::PodMetrics};

/// Ratios this close to 1 leave the replicas alone (upstream's
/// `--horizontal-pod-autoscaler-tolerance`).
const TOLERANCE: f64 = 0.1;
/// A pod started this recently reports start-up CPU, trusted only from
/// a sample taken after it became ready (`cpu-initialization-period`).
const CPU_INITIALIZATION: chrono::Duration = chrono::Duration::minutes(5);
/// A pod that turned unready this soon after starting is still starting
/// (`initial-readiness-delay`).
const INITIAL_READINESS_DELAY: chrono::Duration = chrono::Duration::seconds(30);

/// One pod's usage report, summed over its containers.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Sample {
    pub milli: i64,
    pub timestamp: DateTime<Utc>,
    pub window: chrono::Duration,
}

/// What one metric proposes.
#[derive(Debug, PartialEq)]
pub(super) struct Proposal {
    pub replicas: i32,
    pub status: MetricStatus,
    /// For the rescale event: `cpu resource utilization (percentage of request)`.
    pub description: String,
}

/// Reads a report's usage of `resource`, in milli-units.
pub(super) fn sample(metrics: &PodMetrics, resource: &str) -> Option<Sample> {
    let milli = metrics
        .containers
        .iter()
        .map(|c| c.usage.get(resource).and_then(wharf_quantity::milli))
        .sum::<Option<i64>>()?;
    let window = go_duration_seconds(&metrics.window).unwrap_or(0);
    Some(Sample {
        milli,
        timestamp: metrics.timestamp.0,
        window: chrono::Duration::seconds(window),
    })
}

/// `15s`, `1m30s`, `2m` as seconds (the windows metrics reports carry).
fn go_duration_seconds(text: &str) -> Option<i64> {
    let mut total = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let value: i64 = number.parse().ok()?;
        number.clear();
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        // A window is whatever a node wrote: overflow is a bad report.
        total = value.checked_mul(unit)?.checked_add(total)?;
    }
    // Days are far beyond any window; they also keep `Duration` in range.
    number.is_empty().then_some(total).filter(|t| *t < 86_400)
}

/// Upstream's `groupPods`: pods whose sample counts, and the rest.
#[derive(Debug, Default)]
struct Groups {
    /// Ready pods with a usable sample.
    usage: BTreeMap<String, i64>,
    unready: Vec<String>,
    missing: Vec<String>,
}

fn group(
    pods: &[Arc<Pod>],
    samples: &HashMap<String, Sample>,
    cpu: bool,
    now: DateTime<Utc>,
) -> Groups {
    let mut groups = Groups::default();
    for pod in pods {
        let name = pod.name_any();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if pods::is_deleting(&pod.metadata) || phase == Some("Failed") {
            continue;
        }
        if phase == Some("Pending") {
            groups.unready.push(name);
            continue;
        }
        let Some(sample) = samples.get(&name) else {
            groups.missing.push(name);
            continue;
        };
        if cpu && !cpu_sample_counts(pod, sample, now) {
            groups.unready.push(name);
            continue;
        }
        groups.usage.insert(name, sample.milli);
    }
    groups
}

/// Whether a pod's CPU sample reflects steady work: not from start-up
/// and not from a pod that is unready for reasons other than starting.
fn cpu_sample_counts(pod: &Pod, sample: &Sample, now: DateTime<Utc>) -> bool {
    let status = pod.status.as_ref();
    let start = status.and_then(|s| s.start_time.as_ref()).map(|t| t.0);
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    let (Some(start), Some(ready)) = (start, ready) else {
        return false;
    };
    let changed = ready.last_transition_time.as_ref().map_or(start, |t| t.0);
    if start + CPU_INITIALIZATION > now {
        ready.status == "True" && sample.timestamp >= changed + sample.window
    } else {
        !(ready.status == "False" && start + INITIAL_READINESS_DELAY > changed)
    }
}

/// Upstream's `GetResourceReplicas` / `GetRawResourceReplicas`: the
/// replicas that bring the metric to its target. Missing samples count
/// against the direction of change (full use when shrinking, none when
/// growing) and unready pods as idle when growing, so neither can cause
/// a change the known samples do not support.
pub(super) fn resource_replicas(
    source: &ResourceMetricSource,
    current: i32,
    pods: &[Arc<Pod>],
    samples: &HashMap<String, Sample>,
    now: DateTime<Utc>,
) -> Result<Proposal, String> {
    let resource = source.name.as_str();
    let groups = group(pods, samples, resource == "cpu", now);
    if groups.usage.is_empty() {
        return Err(format!(
            "did not receive metrics for targeted pods (pods might be unready) for {resource}"
        ));
    }
    let target = &source.target;
    let utilization = match (target.type_.as_str(), target.average_utilization) {
        ("Utilization", Some(percent)) => Some(i64::from(percent.max(1))),
        ("Utilization", None) => {
            return Err("target.averageUtilization is required for Utilization".to_owned());
        }
        _ => None,
    };
    let average = match (&utilization, &target.average_value) {
        (Some(_), _) => 0,
        (None, Some(value)) => wharf_quantity::milli(value)
            .filter(|v| *v > 0)
            .ok_or_else(|| format!("invalid target.averageValue {value:?}"))?,
        (None, None) => return Err("target.averageValue is required for AverageValue".to_owned()),
    };
    let mut requests = BTreeMap::new();
    if utilization.is_some() {
        for pod in pods {
            let mut total = 0;
            for container in pod.spec.iter().flat_map(|s| &s.containers) {
                let request = container
                    .resources
                    .as_ref()
                    .and_then(|r| r.requests.as_ref())
                    .and_then(|r| r.get(resource))
                    .and_then(wharf_quantity::milli);
                let Some(request) = request else {
                    return Err(format!(
                        "missing request for {resource} in container {} of Pod {}",
                        container.name,
                        pod.name_any()
                    ));
                };
                total += request;
            }
            requests.insert(pod.name_any(), total);
        }
    }
    // The ratio of usage to target over the pods in `usage`, and the
    // status values (utilization percent, average milli-units).
    let ratio = |usage: &BTreeMap<String, i64>| -> (f64, Option<i32>, i64) {
        let total: i64 = usage.values().sum();
        let count = i64::try_from(usage.len()).unwrap_or(i64::MAX).max(1);
        match utilization {
            Some(target) => {
                let requested: i64 = usage.keys().filter_map(|p| requests.get(p)).sum();
                let percent = if requested > 0 {
                    total * 100 / requested
                } else {
                    0
                };
                let percent = i32::try_from(percent).unwrap_or(i32::MAX);
                (
                    f64::from(percent) / target as f64,
                    Some(percent),
                    total / count,
                )
            }
            None => ((total / count) as f64 / average as f64, None, total / count),
        }
    };
    let (first_ratio, percent, per_pod) = ratio(&groups.usage);
    let status = MetricStatus {
        type_: "Resource".to_owned(),
        resource: Some(ResourceMetricStatus {
            name: resource.to_owned(),
            current: MetricValueStatus {
                average_utilization: percent,
                average_value: Some(Quantity(if resource == "cpu" {
                    wharf_quantity::format_milli_cpu(per_pod)
                } else {
                    (per_pod / 1000).to_string()
                })),
                value: None,
            },
        }),
        ..Default::default()
    };
    let description = match utilization {
        Some(_) => format!("{resource} resource utilization (percentage of request)"),
        None => format!("{resource} resource"),
    };
    let proposal = |replicas| Proposal {
        replicas,
        status: status.clone(),
        description: description.clone(),
    };
    let grow_with_unready = !groups.unready.is_empty() && first_ratio > 1.0;
    let ready_count = f64::from(u32::try_from(groups.usage.len()).unwrap_or(u32::MAX));
    if !grow_with_unready && groups.missing.is_empty() {
        if (1.0 - first_ratio).abs() <= TOLERANCE {
            return Ok(proposal(current));
        }
        return Ok(proposal(ceil_replicas(first_ratio * ready_count)));
    }
    let mut usage = groups.usage.clone();
    // (At exactly the target, upstream leaves silent pods out of a
    // utilization, and counts them idle for an average value.)
    let exact = (first_ratio - 1.0).abs() < f64::EPSILON;
    for pod in groups
        .missing
        .iter()
        .filter(|_| !(exact && utilization.is_some()))
    {
        let assumed = if first_ratio < 1.0 {
            match utilization {
                Some(target) => requests.get(pod).copied().unwrap_or(0) * target.max(100) / 100,
                None => average,
            }
        } else {
            0
        };
        usage.insert(pod.clone(), assumed);
    }
    if grow_with_unready {
        for pod in &groups.unready {
            usage.insert(pod.clone(), 0);
        }
    }
    let (new_ratio, _, _) = ratio(&usage);
    let flipped = (first_ratio < 1.0 && new_ratio > 1.0) || (first_ratio > 1.0 && new_ratio < 1.0);
    if (1.0 - new_ratio).abs() <= TOLERANCE || flipped {
        return Ok(proposal(current));
    }
    let count = f64::from(u32::try_from(usage.len()).unwrap_or(u32::MAX));
    let replicas = ceil_replicas(new_ratio * count);
    if (new_ratio < 1.0 && replicas > current) || (new_ratio > 1.0 && replicas < current) {
        return Ok(proposal(current));
    }
    Ok(proposal(replicas))
}

fn ceil_replicas(value: f64) -> i32 {
    // Float to int: saturating in Rust, which is what a replica count wants.
    #[allow(clippy::cast_possible_truncation, reason = "saturating by definition")]
    let replicas = value.ceil() as i32;
    replicas
}

/// Recent recommendations and scale changes of one autoscaler, kept in
/// memory as upstream does (a restarted controller starts afresh).
#[derive(Debug, Default)]
pub struct History {
    /// When the autoscaler was last evaluated: its own status writes
    /// wake it, but it evaluates once per sync period, as upstream's.
    evaluated: Option<DateTime<Utc>>,
    recommendations: Vec<(DateTime<Utc>, i32)>,
    /// Replica changes made: positive up, negative down.
    changes: Vec<(DateTime<Utc>, i32)>,
}

/// Upstream's defaults when `spec.behavior` leaves a direction out.
fn rules(spec: &HorizontalPodAutoscalerSpec, up: bool) -> HPAScalingRules {
    let given = spec
        .behavior
        .as_ref()
        .and_then(|b| {
            if up {
                b.scale_up.clone()
            } else {
                b.scale_down.clone()
            }
        })
        .unwrap_or_default();
    let policy = |type_: &str, value: i32| HPAScalingPolicy {
        type_: type_.to_owned(),
        value,
        period_seconds: 15,
    };
    HPAScalingRules {
        stabilization_window_seconds: given.stabilization_window_seconds.or(Some(if up {
            0
        } else {
            300
        })),
        select_policy: given.select_policy.or_else(|| Some("Max".to_owned())),
        policies: given.policies.or_else(|| {
            Some(if up {
                vec![policy("Pods", 4), policy("Percent", 100)]
            } else {
                vec![policy("Percent", 100)]
            })
        }),
    }
}

/// The replica count after stabilization and the rate and size limits,
/// and the ScalingLimited reason if a limit applied.
#[derive(Debug, PartialEq)]
pub(super) struct Normalized {
    pub replicas: i32,
    pub limited: Option<(&'static str, &'static str)>,
}

/// Upstream's `normalizeDesiredReplicasWithBehaviors`: the proposal is
/// held back by the highest recommendation in the scale-down window (no
/// flapping down) and the lowest in the scale-up window, then limited
/// to what the policies allow given the changes of their periods.
pub(super) fn normalize(
    spec: &HorizontalPodAutoscalerSpec,
    current: i32,
    proposed: i32,
    history: &mut History,
    now: DateTime<Utc>,
) -> Normalized {
    let up = rules(spec, true);
    let down = rules(spec, false);
    // Upstream's initial recommendation: a new (or restarted) autoscaler
    // does not scale down before a window's worth of recommendations.
    if history.recommendations.is_empty() {
        history.recommendations.push((now, current));
    }
    let window = |rules: &HPAScalingRules| {
        chrono::Duration::seconds(rules.stabilization_window_seconds.unwrap_or(0).into())
    };
    let (mut up_bound, mut down_bound) = (proposed, proposed);
    for (at, replicas) in &history.recommendations {
        if *at > now - window(&up) {
            up_bound = up_bound.min(*replicas);
        }
        if *at > now - window(&down) {
            down_bound = down_bound.max(*replicas);
        }
    }
    let longest = window(&up).max(window(&down));
    history
        .recommendations
        .retain(|(at, _)| *at > now - longest);
    history.recommendations.push((now, proposed));
    let stabilized = current.max(up_bound).min(down_bound);

    let min = spec.min_replicas.unwrap_or(1);
    let max = spec.max_replicas;
    let changed_within = |seconds: i32, sign: i32| -> i32 {
        history
            .changes
            .iter()
            .filter(|(at, change)| {
                *at > now - chrono::Duration::seconds(seconds.into()) && change.signum() == sign
            })
            .map(|(_, change)| change.abs())
            .sum()
    };
    let policies = |rules: &HPAScalingRules| rules.policies.clone().unwrap_or_default();
    let select = |rules: &HPAScalingRules| rules.select_policy.clone().unwrap_or_default();
    let (replicas, limited) = if stabilized > current {
        let mut limit = if select(&up) == "Min" {
            i32::MAX
        } else {
            i32::MIN
        };
        for policy in policies(&up) {
            let start = current - changed_within(policy.period_seconds, 1);
            let proposed = match policy.type_.as_str() {
                "Percent" => {
                    ceil_replicas(f64::from(start) * (1.0 + f64::from(policy.value) / 100.0))
                }
                _ => start.saturating_add(policy.value),
            };
            limit = if select(&up) == "Min" {
                limit.min(proposed)
            } else {
                limit.max(proposed)
            };
        }
        if select(&up) == "Disabled" {
            limit = current;
        }
        let limit = limit.max(current);
        let (limit, reason) = if max > limit {
            (
                limit,
                (
                    "ScaleUpLimit",
                    "the desired replica count is increasing faster than the maximum scale rate",
                ),
            )
        } else {
            (
                max,
                (
                    "TooManyReplicas",
                    "the desired replica count is more than the maximum replica count",
                ),
            )
        };
        if stabilized > limit {
            (limit, Some(reason))
        } else {
            (stabilized, None)
        }
    } else if stabilized < current {
        let mut limit = if select(&down) == "Min" {
            i32::MIN
        } else {
            i32::MAX
        };
        for policy in policies(&down) {
            let start = current + changed_within(policy.period_seconds, -1);
            let proposed = match policy.type_.as_str() {
                "Percent" => {
                    #[allow(clippy::cast_possible_truncation, reason = "upstream truncates here")]
                    let value = (f64::from(start) * (1.0 - f64::from(policy.value) / 100.0)) as i32;
                    value
                }
                _ => start - policy.value,
            };
            limit = if select(&down) == "Min" {
                limit.max(proposed)
            } else {
                limit.min(proposed)
            };
        }
        if select(&down) == "Disabled" {
            limit = current;
        }
        let limit = limit.min(current);
        let (limit, reason) = if min < limit {
            (
                limit,
                (
                    "ScaleDownLimit",
                    "the desired replica count is decreasing faster than the maximum scale rate",
                ),
            )
        } else {
            (
                min,
                (
                    "TooFewReplicas",
                    "the desired replica count is less than the minimum replica count",
                ),
            )
        };
        if stabilized < limit {
            (limit, Some(reason))
        } else {
            (stabilized, None)
        }
    } else {
        (stabilized, None)
    };
    Normalized { replicas, limited }
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    now: DateTime<Utc>,
) -> HorizontalPodAutoscalerCondition {
    HorizontalPodAutoscalerCondition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.into()),
        last_transition_time: Some(Time(now)),
    }
}

/// Sets conditions, keeping a transition time while the status stays.
fn set_conditions(
    status: &mut HorizontalPodAutoscalerStatus,
    previous: Option<&HorizontalPodAutoscalerStatus>,
    next: Vec<HorizontalPodAutoscalerCondition>,
) {
    let before = previous.and_then(|s| s.conditions.as_ref());
    status.conditions = Some(
        next.into_iter()
            .map(|mut c| {
                if let Some(old) = before
                    .into_iter()
                    .flatten()
                    .find(|o| o.type_ == c.type_ && o.status == c.status)
                {
                    c.last_transition_time.clone_from(&old.last_transition_time);
                }
                c
            })
            .collect(),
    );
}

fn default_metrics() -> Vec<MetricSpec> {
    serde_json::from_value(serde_json::json!([{ "type": "Resource", "resource": {
        "name": "cpu", "target": { "type": "Utilization", "averageUtilization": 80 } } }]))
    .unwrap_or_default()
}

pub(super) async fn reconcile(
    hpa: Arc<HorizontalPodAutoscaler>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let period = Action::requeue(ctx.options.autoscaler_sync_period);
    let namespace = hpa.namespace().unwrap_or_default();
    let key = pods::key(&hpa.metadata);
    let spec = hpa.spec.clone().unwrap_or_default();
    let previous = hpa.status.as_ref();
    let now = Utc::now();
    {
        let mut histories = ctx
            .autoscaler_history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let history = histories.entry(key.clone()).or_default();
        let seen = previous.and_then(|s| s.observed_generation) == hpa.metadata.generation;
        let next = history
            .evaluated
            .map(|at| at + ctx.options.autoscaler_sync_period);
        // A changed spec is evaluated at once; anything else (its own
        // status write, most often) waits for the period.
        if let Some(next) = next.filter(|next| seen && *next > now) {
            return Ok(Action::requeue((next - now).to_std().unwrap_or_default()));
        }
        history.evaluated = Some(now);
    }
    let target = &spec.scale_target_ref;
    let (group, version) = target
        .api_version
        .as_deref()
        .unwrap_or("apps/v1")
        .split_once('/')
        .unwrap_or(("", "v1"));
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &target.kind));
    let scales: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &namespace, &resource);
    let mut status = HorizontalPodAutoscalerStatus {
        observed_generation: hpa.metadata.generation,
        last_scale_time: previous.and_then(|s| s.last_scale_time.clone()),
        current_metrics: previous.and_then(|s| s.current_metrics.clone()),
        ..Default::default()
    };
    let scale = match scales.get_scale(&target.name).await {
        Ok(scale) => scale,
        Err(error) => {
            let message =
                format!("the HPA controller was unable to get the target's current scale: {error}");
            ctx.recorder
                .record(&*hpa, EventType::Warning, "FailedGetScale", &message);
            set_conditions(
                &mut status,
                previous,
                vec![condition(
                    "AbleToScale",
                    false,
                    "FailedGetScale",
                    message,
                    now,
                )],
            );
            write_status(&ctx, &*hpa, previous, &status, None).await?;
            return Ok(period);
        }
    };
    let current = scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    status.current_replicas = Some(scale.status.as_ref().map_or(0, |s| s.replicas));
    let min = spec.min_replicas.unwrap_or(1);
    let able = condition(
        "AbleToScale",
        true,
        "SucceededGetScale",
        "the HPA controller was able to get the target's current scale",
        now,
    );
    if current == 0 && min != 0 {
        status.desired_replicas = 0;
        status.current_metrics = None;
        set_conditions(
            &mut status,
            previous,
            vec![
                able,
                condition(
                    "ScalingActive",
                    false,
                    "ScalingDisabled",
                    "scaling is disabled since the replica count of the target is zero",
                    now,
                ),
            ],
        );
        write_status(&ctx, &*hpa, previous, &status, None).await?;
        return Ok(period);
    }
    let mut conditions = vec![able];
    let out_of_range = current > spec.max_replicas || current < min;
    let (proposed, reason) = if current > spec.max_replicas {
        (
            spec.max_replicas,
            "Current number of replicas above Spec.MaxReplicas".to_owned(),
        )
    } else if current < min {
        (
            min,
            "Current number of replicas below Spec.MinReplicas".to_owned(),
        )
    } else {
        let selector = scale
            .status
            .as_ref()
            .and_then(|s| s.selector.clone())
            .unwrap_or_default();
        if selector.is_empty() {
            // An empty selector would take the whole namespace's pods.
            let message = "the HPA target's scale is missing a selector";
            ctx.recorder
                .record(&*hpa, EventType::Warning, "SelectorRequired", message);
            set_conditions(
                &mut status,
                previous,
                vec![
                    conditions.remove(0),
                    condition("ScalingActive", false, "InvalidSelector", message, now),
                ],
            );
            write_status(&ctx, &*hpa, previous, &status, None).await?;
            return Ok(period);
        }
        let pods = Api::<Pod>::namespaced(ctx.client.clone(), &namespace)
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(Error::api("listing the pods of", &key))?
            .items
            .into_iter()
            .map(Arc::new)
            .collect::<Vec<_>>();
        // Reports carry their pod's labels (as metrics-server's do).
        let reports = Api::<PodMetrics>::namespaced(ctx.client.clone(), &namespace)
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(Error::api("listing pod metrics for", &key))?
            .items;
        let metrics = spec
            .metrics
            .clone()
            .filter(|m| !m.is_empty())
            .unwrap_or_else(default_metrics);
        let mut best: Option<Proposal> = None;
        let mut statuses = Vec::new();
        let mut failures = Vec::new();
        for metric in &metrics {
            let result = match (metric.type_.as_str(), &metric.resource) {
                ("Resource", Some(source)) => {
                    let samples = reports
                        .iter()
                        .filter_map(|r| Some((r.metadata.name.clone()?, sample(r, &source.name)?)))
                        .collect();
                    resource_replicas(source, current, &pods, &samples, now)
                }
                (other, _) => Err(format!(
                    "metric type {other} is not supported; use Resource"
                )),
            };
            match result {
                Ok(proposal) => {
                    statuses.push(proposal.status.clone());
                    if best.as_ref().is_none_or(|b| proposal.replicas > b.replicas) {
                        best = Some(proposal);
                    }
                }
                Err(error) => failures.push(error),
            }
        }
        status.current_metrics = Some(statuses);
        for failure in &failures {
            ctx.recorder.record(
                &*hpa,
                EventType::Warning,
                "FailedGetResourceMetric",
                failure,
            );
        }
        match best {
            // A metric that failed might have wanted more: never shrink then.
            Some(best) if failures.is_empty() || best.replicas >= current => {
                conditions.push(condition(
                    "ScalingActive",
                    true,
                    "ValidMetricFound",
                    format!(
                        "the HPA was able to successfully calculate a replica count from {}",
                        best.description
                    ),
                    now,
                ));
                let reason = if best.replicas > current {
                    format!("{} above target", best.description)
                } else {
                    "All metrics below target".to_owned()
                };
                (best.replicas, reason)
            }
            _ => {
                let message = format!(
                    "the HPA was unable to compute the replica count: {}",
                    failures.join("; ")
                );
                conditions.push(condition(
                    "ScalingActive",
                    false,
                    "FailedGetResourceMetric",
                    message,
                    now,
                ));
                (current, String::new())
            }
        }
    };
    let normalized = if out_of_range {
        // Back into [min, max] at once, as upstream: no window or rate.
        Normalized {
            replicas: proposed,
            limited: None,
        }
    } else {
        let mut histories = ctx
            .autoscaler_history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        normalize(
            &spec,
            current,
            proposed,
            histories.entry(key.clone()).or_default(),
            now,
        )
    };
    conditions.push(match normalized.limited {
        Some((reason, message)) => condition("ScalingLimited", true, reason, message, now),
        None => condition(
            "ScalingLimited",
            false,
            "DesiredWithinRange",
            "the desired count is within the acceptable range",
            now,
        ),
    });
    let desired = normalized.replicas;
    status.desired_replicas = desired;
    if desired != current {
        let patch = serde_json::json!({ "spec": { "replicas": desired } });
        match scales
            .patch_scale(&target.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                ctx.autoscaler_history
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(key.clone())
                    .or_default()
                    .changes
                    .push((now, desired - current));
                status.last_scale_time = Some(Time(now));
                conditions[0] = condition(
                    "AbleToScale",
                    true,
                    "SucceededRescale",
                    format!("the HPA controller was able to update the target scale to {desired}"),
                    now,
                );
                ctx.recorder.record(
                    &*hpa,
                    EventType::Normal,
                    "SuccessfulRescale",
                    format!("New size: {desired}; reason: {reason}"),
                );
            }
            Err(error) => {
                let message =
                    format!("the HPA controller was unable to update the target scale: {error}");
                ctx.recorder
                    .record(&*hpa, EventType::Warning, "FailedRescale", &message);
                conditions[0] = condition("AbleToScale", false, "FailedUpdateScale", message, now);
            }
        }
    }
    set_conditions(&mut status, previous, conditions);
    write_status(&ctx, &*hpa, previous, &status, None).await?;
    Ok(period)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            autoscaling::v2::{HorizontalPodAutoscalerBehavior, MetricTarget},
            core::v1::{Container, PodCondition, PodSpec, PodStatus, ResourceRequirements},
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    /// A pod requesting 100m CPU, started 10 minutes ago.
    fn pod(name: &str, phase: &str, ready: bool) -> Arc<Pod> {
        Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".to_owned(),
                    resources: Some(ResourceRequirements {
                        requests: Some([("cpu".to_owned(), Quantity("100m".to_owned()))].into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.to_owned()),
                start_time: Some(Time(now() - chrono::Duration::minutes(10))),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".to_owned(),
                    status: if ready { "True" } else { "False" }.to_owned(),
                    last_transition_time: Some(Time(now() - chrono::Duration::minutes(9))),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        })
    }

    fn cpu_target(percent: i32) -> ResourceMetricSource {
        ResourceMetricSource {
            name: "cpu".to_owned(),
            target: MetricTarget {
                type_: "Utilization".to_owned(),
                average_utilization: Some(percent),
                ..Default::default()
            },
        }
    }

    fn samples(usage: &[(&str, i64)]) -> HashMap<String, Sample> {
        usage
            .iter()
            .map(|(name, milli)| {
                (
                    (*name).to_owned(),
                    Sample {
                        milli: *milli,
                        timestamp: now(),
                        window: chrono::Duration::seconds(15),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn utilization_above_target_scales_in_proportion() {
        let pods = [pod("a", "Running", true), pod("b", "Running", true)];
        let proposal = resource_replicas(
            &cpu_target(50),
            2,
            &pods,
            &samples(&[("a", 200), ("b", 100)]),
            now(),
        )
        .unwrap();
        // 150% against 50%: three times the pods.
        assert_eq!(proposal.replicas, 6);
        let current = proposal.status.resource.unwrap().current;
        assert_eq!(current.average_utilization, Some(150));
        assert_eq!(current.average_value, Some(Quantity("150m".to_owned())));
    }

    #[test]
    fn within_tolerance_nothing_changes() {
        let pods = [pod("a", "Running", true), pod("b", "Running", true)];
        let proposal = resource_replicas(
            &cpu_target(50),
            2,
            &pods,
            &samples(&[("a", 55), ("b", 52)]),
            now(),
        )
        .unwrap();
        assert_eq!(proposal.replicas, 2);
    }

    #[test]
    fn missing_samples_never_support_a_shrink_they_might_contradict() {
        // One idle pod reports; the two silent ones are assumed at 100%
        // of their request, which outweighs it: no scale-down.
        let pods = [
            pod("a", "Running", true),
            pod("b", "Running", true),
            pod("c", "Running", true),
        ];
        let proposal =
            resource_replicas(&cpu_target(50), 3, &pods, &samples(&[("a", 10)]), now()).unwrap();
        assert_eq!(proposal.replicas, 3);
    }

    #[test]
    fn unready_pods_count_as_idle_when_growing() {
        let pods = [pod("a", "Running", true), pod("b", "Pending", false)];
        // a alone is at 200% of a 100% target: ratio 2, but b counts as
        // 0, so the pair is at 100%: no change.
        let proposal =
            resource_replicas(&cpu_target(100), 2, &pods, &samples(&[("a", 200)]), now()).unwrap();
        assert_eq!(proposal.replicas, 2);
    }

    #[test]
    fn no_samples_and_no_requests_are_errors() {
        let pods = [pod("a", "Running", true)];
        assert!(resource_replicas(&cpu_target(50), 1, &pods, &samples(&[]), now()).is_err());
        let mut bare = (*pods[0]).clone();
        bare.spec.as_mut().unwrap().containers[0].resources = None;
        let error = resource_replicas(
            &cpu_target(50),
            1,
            &[Arc::new(bare)],
            &samples(&[("a", 5)]),
            now(),
        )
        .unwrap_err();
        assert!(error.contains("missing request for cpu"), "{error}");
    }

    fn spec(min: i32, max: i32, down_window: Option<i32>) -> HorizontalPodAutoscalerSpec {
        HorizontalPodAutoscalerSpec {
            min_replicas: Some(min),
            max_replicas: max,
            behavior: down_window.map(|seconds| HorizontalPodAutoscalerBehavior {
                scale_down: Some(HPAScalingRules {
                    stabilization_window_seconds: Some(seconds),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn scale_up_is_limited_to_four_pods_or_double_per_period_and_max() {
        let mut history = History::default();
        let up = normalize(&spec(1, 100, None), 2, 50, &mut history, now());
        assert_eq!(up.replicas, 6);
        assert_eq!(up.limited.unwrap().0, "ScaleUpLimit");
        let capped = normalize(&spec(1, 5, None), 2, 50, &mut History::default(), now());
        assert_eq!(
            (capped.replicas, capped.limited.unwrap().0),
            (5, "TooManyReplicas")
        );
    }

    #[test]
    fn scale_down_waits_out_the_stabilization_window() {
        let mut history = History::default();
        let hpa = spec(1, 10, None);
        assert_eq!(normalize(&hpa, 8, 8, &mut history, now()).replicas, 8);
        // Two minutes later the load is gone; the 5-minute window still
        // holds the recommendation of 8.
        let later = now() + chrono::Duration::minutes(2);
        assert_eq!(normalize(&hpa, 8, 2, &mut history, later).replicas, 8);
        let after = now() + chrono::Duration::minutes(6);
        let down = normalize(&hpa, 8, 2, &mut history, after);
        assert_eq!((down.replicas, down.limited), (2, None));
        // Without a window it goes at once, but not below minReplicas.
        let eager = normalize(&spec(3, 10, Some(0)), 8, 1, &mut History::default(), now());
        assert_eq!(
            (eager.replicas, eager.limited.unwrap().0),
            (3, "TooFewReplicas")
        );
    }

    #[test]
    fn usage_reports_sum_their_containers() {
        let report: PodMetrics = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a"}, "timestamp": "2026-11-21T10:00:00Z", "window": "1m30s",
            "containers": [
                {"name": "x", "usage": {"cpu": "250m", "memory": "1Mi"}},
                {"name": "y", "usage": {"cpu": "1", "memory": "1Mi"}},
            ],
        }))
        .unwrap();
        let cpu = sample(&report, "cpu").unwrap();
        assert_eq!((cpu.milli, cpu.window.num_seconds()), (1250, 90));
        assert_eq!(sample(&report, "memory").unwrap().milli, 2 * 1_048_576_000);
        assert_eq!(sample(&report, "gpu"), None);
        assert_eq!(go_duration_seconds("99999999999999999h"), None);
        assert_eq!(go_duration_seconds("15s"), Some(15));
    }
}
