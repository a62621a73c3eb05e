//! A pod's status as kubelet reports it, computed from what the worker
//! knows of its sandbox and containers: phase, the conditions kubelet
//! owns (`PodReadyToStartContainers`, `Initialized`, `ContainersReady`,
//! `Ready`; others' conditions such as `PodScheduled` are carried over),
//! addresses, and container statuses with their current and last states.
//! Pure data, so every rule is unit-tested.

use k8s_openapi::{
    api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
        ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
    chrono::{DateTime, Utc},
};

/// Conditions this agent writes; the rest belong to other writers.
pub const OWNED: [&str; 4] = [
    "PodReadyToStartContainers",
    "Initialized",
    "ContainersReady",
    "Ready",
];

/// How a container instance ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ended {
    pub exit_code: i32,
    pub signal: Option<i32>,
    /// `Completed`, `Error`, `OOMKilled`, `ContainerStatusUnknown`.
    pub reason: String,
    pub message: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub container_id: String,
}

/// Where a container is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Now {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: DateTime<Utc>,
        container_id: String,
    },
    Ended(Ended),
}

/// One container as the status reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub name: String,
    pub image: String,
    pub now: Now,
    /// The instance before the current one, if it ended.
    pub last: Option<Ended>,
    pub restart_count: i32,
    pub ready: bool,
    pub started: bool,
}

/// What the status is computed from.
#[derive(Clone, Debug)]
pub struct Facts {
    pub pod_ip: Option<String>,
    pub host_ip: String,
    pub start_time: DateTime<Utc>,
    pub sandbox_ready: bool,
    pub init: Vec<View>,
    pub containers: Vec<View>,
    /// The pod's restartPolicy: `Always`, `OnFailure` or `Never`.
    pub restart_policy: String,
    /// The pod has failed as a whole, with kubelet's reason and message
    /// (`DeadlineExceeded`).
    pub failed: Option<(String, String)>,
}

fn ended_state(ended: &Ended) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: ended.exit_code,
            signal: ended.signal,
            reason: Some(ended.reason.clone()),
            message: ended.message.clone(),
            started_at: Some(Time(ended.started_at)),
            finished_at: Some(Time(ended.finished_at)),
            container_id: Some(ended.container_id.clone()),
        }),
        ..ContainerState::default()
    }
}

fn container_status(view: &View) -> ContainerStatus {
    let (state, id) = match &view.now {
        Now::Waiting { reason, message } => (
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: message.clone(),
                }),
                ..ContainerState::default()
            },
            view.last.as_ref().map(|l| l.container_id.clone()),
        ),
        Now::Running {
            started_at,
            container_id,
        } => (
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(*started_at)),
                }),
                ..ContainerState::default()
            },
            Some(container_id.clone()),
        ),
        Now::Ended(ended) => (ended_state(ended), Some(ended.container_id.clone())),
    };
    ContainerStatus {
        name: view.name.clone(),
        image: view.image.clone(),
        image_id: String::new(),
        container_id: id,
        state: Some(state),
        last_state: Some(view.last.as_ref().map(ended_state).unwrap_or_default()),
        ready: view.ready,
        started: Some(view.started),
        restart_count: view.restart_count,
        ..ContainerStatus::default()
    }
}

/// Will this ended container run again under the policy?
pub fn restarts(policy: &str, exit_code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

/// The phase, by kubelet's rules (`getPhase`): Failed when the pod
/// failed as a whole or an init container failed for good; Pending
/// while init containers have not all succeeded or a container waits
/// without having run; Succeeded or Failed once every container ended
/// for good; Running otherwise.
pub fn phase(facts: &Facts) -> &'static str {
    if facts.failed.is_some() {
        return "Failed";
    }
    let init_failed = facts.restart_policy == "Never"
        && facts
            .init
            .iter()
            .any(|v| matches!(&v.now, Now::Ended(e) if e.exit_code != 0));
    if init_failed {
        return "Failed";
    }
    let init_done = facts
        .init
        .iter()
        .all(|v| matches!(&v.now, Now::Ended(e) if e.exit_code == 0));
    let waiting = facts
        .containers
        .iter()
        .any(|v| matches!(v.now, Now::Waiting { .. }) && v.last.is_none());
    if !init_done || waiting || facts.containers.is_empty() {
        return "Pending";
    }
    let ended_for_good: Vec<&Ended> = facts
        .containers
        .iter()
        .filter_map(|v| match &v.now {
            Now::Ended(e) if !restarts(&facts.restart_policy, e.exit_code) => Some(e),
            _ => None,
        })
        .collect();
    if ended_for_good.len() == facts.containers.len() {
        return if ended_for_good.iter().all(|e| e.exit_code == 0) {
            "Succeeded"
        } else {
            "Failed"
        };
    }
    "Running"
}

fn condition(kind: &str, ok: bool, reason: Option<&str>, live: &[PodCondition]) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    // The transition time holds while the status does.
    let since = live
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(Utc::now()));
    PodCondition {
        type_: kind.to_string(),
        status: status.to_string(),
        reason: reason.filter(|_| !ok).map(str::to_string),
        last_transition_time: Some(since),
        ..PodCondition::default()
    }
}

/// The status to write, given the live pod (for transition times and
/// readiness gates). Its conditions are only those kubelet owns: sent
/// as a strategic merge patch, they merge by type with others'.
pub fn status(pod: &Pod, facts: &Facts) -> PodStatus {
    let live: Vec<PodCondition> = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let phase = phase(facts);
    let terminal = phase == "Succeeded" || phase == "Failed";
    let initialized = facts
        .init
        .iter()
        .all(|v| matches!(&v.now, Now::Ended(e) if e.exit_code == 0));
    let containers_ready = !terminal && facts.containers.iter().all(|v| v.ready);
    let gates_ok = pod
        .spec
        .iter()
        .flat_map(|s| s.readiness_gates.iter().flatten())
        .all(|gate| {
            live.iter()
                .any(|c| c.type_ == gate.condition_type && c.status == "True")
        });
    let reason_done = if terminal {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    };
    let conditions = vec![
        condition(
            "PodReadyToStartContainers",
            facts.sandbox_ready,
            None,
            &live,
        ),
        condition(
            "Initialized",
            initialized,
            Some("ContainersNotInitialized"),
            &live,
        ),
        condition(
            "ContainersReady",
            containers_ready,
            Some(reason_done),
            &live,
        ),
        condition(
            "Ready",
            containers_ready && gates_ok,
            Some(if containers_ready {
                "ReadinessGatesNotReady"
            } else {
                reason_done
            }),
            &live,
        ),
    ];
    let (reason, message) = facts.failed.clone().unzip();
    PodStatus {
        phase: Some(phase.to_string()),
        conditions: Some(conditions),
        host_ip: Some(facts.host_ip.clone()),
        host_ips: Some(vec![HostIP {
            ip: facts.host_ip.clone(),
        }]),
        pod_ip: facts.pod_ip.clone(),
        pod_ips: facts
            .pod_ip
            .as_ref()
            .map(|ip| vec![PodIP { ip: ip.clone() }]),
        start_time: Some(Time(facts.start_time)),
        init_container_statuses: (!facts.init.is_empty())
            .then(|| facts.init.iter().map(container_status).collect()),
        container_statuses: Some(facts.containers.iter().map(container_status).collect()),
        reason,
        message,
        // Written by the API server at creation; a merge patch without
        // it leaves it alone.
        qos_class: None,
        ..PodStatus::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + seconds, 0).unwrap()
    }

    fn ended(exit_code: i32) -> Ended {
        Ended {
            exit_code,
            signal: None,
            reason: if exit_code == 0 { "Completed" } else { "Error" }.into(),
            message: None,
            started_at: at(0),
            finished_at: at(5),
            container_id: "wharf://c1".into(),
        }
    }

    fn view(name: &str, now: Now, ready: bool) -> View {
        View {
            name: name.into(),
            image: "busybox".into(),
            now,
            last: None,
            restart_count: 0,
            ready,
            started: ready,
        }
    }

    fn running() -> Now {
        Now::Running {
            started_at: at(1),
            container_id: "wharf://c2".into(),
        }
    }

    fn facts(init: Vec<View>, containers: Vec<View>, policy: &str) -> Facts {
        Facts {
            pod_ip: Some("10.244.1.5".into()),
            host_ip: "192.168.90.1".into(),
            start_time: at(0),
            sandbox_ready: true,
            init,
            containers,
            restart_policy: policy.into(),
            failed: None,
        }
    }

    #[test]
    fn phases_follow_kubelets_rules() {
        let waiting = || Now::Waiting {
            reason: "ContainerCreating".into(),
            message: None,
        };
        assert_eq!(
            phase(&facts(vec![], vec![view("a", waiting(), false)], "Always")),
            "Pending"
        );
        assert_eq!(
            phase(&facts(
                vec![view("i", running(), false)],
                vec![view("a", waiting(), false)],
                "Always"
            )),
            "Pending",
            "init still running"
        );
        assert_eq!(
            phase(&facts(
                vec![view("i", Now::Ended(ended(0)), false)],
                vec![view("a", running(), true)],
                "Always"
            )),
            "Running"
        );
        assert_eq!(
            phase(&facts(
                vec![],
                vec![view("a", Now::Ended(ended(0)), false)],
                "Never"
            )),
            "Succeeded"
        );
        assert_eq!(
            phase(&facts(
                vec![],
                vec![view("a", Now::Ended(ended(1)), false)],
                "Never"
            )),
            "Failed"
        );
        assert_eq!(
            phase(&facts(
                vec![],
                vec![view("a", Now::Ended(ended(1)), false)],
                "OnFailure"
            )),
            "Running",
            "restarting"
        );
        assert_eq!(
            phase(&facts(
                vec![],
                vec![
                    view("a", Now::Ended(ended(0)), false),
                    view("b", running(), true)
                ],
                "Never"
            )),
            "Running"
        );
        assert_eq!(
            phase(&facts(
                vec![view("i", Now::Ended(ended(1)), false)],
                vec![view("a", waiting(), false)],
                "Never"
            )),
            "Failed",
            "an init container failed for good"
        );
        assert_eq!(
            phase(&facts(
                vec![view("i", Now::Ended(ended(1)), false)],
                vec![view("a", waiting(), false)],
                "Always"
            )),
            "Pending",
            "an init container to be retried"
        );
        let mut deadline = facts(vec![], vec![view("a", running(), true)], "Always");
        deadline.failed = Some(("DeadlineExceeded".into(), "too long".into()));
        assert_eq!(phase(&deadline), "Failed");
    }

    #[test]
    fn conditions_are_kubelets_and_others_are_kept() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [], "readinessGates": [{"conditionType": "example.com/gate"}]},
            "status": {"conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "False", "lastTransitionTime": "2023-11-14T22:13:20Z"},
                {"type": "example.com/gate", "status": "False"}
            ]}
        }))
        .unwrap();
        let status = status(
            &pod,
            &facts(vec![], vec![view("a", running(), true)], "Always"),
        );
        let conditions = status.conditions.unwrap();
        let get = |kind: &str| conditions.iter().find(|c| c.type_ == kind).unwrap();
        assert!(
            conditions.iter().all(|c| OWNED.contains(&c.type_.as_str())),
            "others' conditions are left to the merge"
        );
        assert_eq!(get("ContainersReady").status, "True");
        // The readiness gate is not met: not Ready, and the transition
        // time of the unchanged condition is kept.
        assert_eq!(get("Ready").status, "False");
        assert_eq!(
            get("Ready").reason.as_deref(),
            Some("ReadinessGatesNotReady")
        );
        assert_eq!(
            get("Ready")
                .last_transition_time
                .as_ref()
                .unwrap()
                .0
                .timestamp(),
            1_700_000_000
        );
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ips.unwrap()[0].ip, "10.244.1.5");
        let container = &status.container_statuses.unwrap()[0];
        assert!(container.ready && container.state.as_ref().unwrap().running.is_some());
    }

    #[test]
    fn restart_policies() {
        assert!(restarts("Always", 0));
        assert!(restarts("OnFailure", 2) && !restarts("OnFailure", 0));
        assert!(!restarts("Never", 1));
    }
}
