use k8s_openapi::{api::core::v1::PodCondition, apimachinery::pkg::apis::meta::v1::Time};
use serde_json::json;

use super::*;

fn service(target_port: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "default", "uid": "svc-uid", "labels": {"team": "a"}},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": target_port}]},
    }))
    .unwrap()
}

fn pod(name: &str, ip: &str, ready: bool, http_port: i32) -> Arc<Pod> {
    let mut pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "uid": format!("{name}-uid"), "labels": {"app": "web"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": http_port}]}]},
        "status": {"phase": "Running", "podIP": ip},
    }))
    .unwrap();
    if ready {
        pod.status.as_mut().unwrap().conditions = Some(vec![PodCondition {
            type_: "Ready".to_owned(),
            status: "True".to_owned(),
            ..Default::default()
        }]);
    }
    Arc::new(pod)
}

fn conditions(desired: &Desired, ip: &str) -> (bool, bool, bool) {
    let endpoint = desired.values().find_map(|(_, e)| e.get(ip)).unwrap();
    let c = endpoint.conditions.clone().unwrap();
    (c.ready.unwrap(), c.serving.unwrap(), c.terminating.unwrap())
}

#[test]
fn endpoints_carry_readiness_and_termination() {
    let mut terminating = Pod::clone(&pod("c", "10.0.0.3", true, 8080));
    terminating.metadata.deletion_timestamp = Some(Time(Utc::now()));
    let mut finished = Pod::clone(&pod("d", "10.0.0.4", false, 8080));
    finished.status.as_mut().unwrap().phase = Some("Succeeded".to_owned());
    let mut other = Pod::clone(&pod("e", "10.0.0.5", true, 8080));
    other.metadata.labels = Some([("app".to_owned(), "db".to_owned())].into());
    let candidates = vec![
        pod("a", "10.0.0.1", true, 8080),
        pod("b", "10.0.0.2", false, 8080),
        Arc::new(terminating),
        Arc::new(finished),
        Arc::new(other),
        pod("no-ip", "", true, 8080),
    ];
    let desired = desired(&service(json!(8080)), &candidates, |_| {
        Some("zone-a".to_owned())
    });
    assert_eq!(desired.len(), 1);
    let (ports, endpoints) = desired.values().next().unwrap();
    assert_eq!(ports[0].port, Some(8080));
    assert_eq!(endpoints.len(), 3);
    assert_eq!(conditions(&desired, "10.0.0.1"), (true, true, false));
    assert_eq!(conditions(&desired, "10.0.0.2"), (false, false, false));
    assert_eq!(conditions(&desired, "10.0.0.3"), (false, true, true));
    let a = &endpoints["10.0.0.1"];
    assert_eq!(a.node_name.as_deref(), Some("n1"));
    assert_eq!(a.zone.as_deref(), Some("zone-a"));
    assert_eq!(a.target_ref.as_ref().unwrap().uid.as_deref(), Some("a-uid"));

    let legacy = endpoints_object(&service(json!(8080)), &desired);
    let subset = &legacy.subsets.unwrap()[0];
    assert_eq!(subset.addresses.as_ref().unwrap().len(), 1);
    assert_eq!(
        subset.not_ready_addresses.as_ref().unwrap().len(),
        1,
        "terminating left out"
    );
}

#[test]
fn named_ports_resolve_per_pod() {
    let candidates = vec![
        pod("a", "10.0.0.1", true, 8080),
        pod("b", "10.0.0.2", true, 9090),
    ];
    let desired = desired(&service(json!("http")), &candidates, |_| None);
    let numbers: Vec<i32> = desired.values().map(|(p, _)| p[0].port.unwrap()).collect();
    assert_eq!(numbers, [8080, 9090], "one slice group per port number");
}

fn existing_from(plan: &SlicePlan) -> Vec<Arc<EndpointSlice>> {
    plan.create
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut s = s.clone();
            s.metadata.name = Some(format!("web-{i}"));
            Arc::new(s)
        })
        .collect()
}

#[test]
fn slices_hold_at_most_100_and_endpoints_stay_put() {
    let svc = service(json!(8080));
    let many: Vec<Arc<Pod>> = (0..250)
        .map(|i| {
            pod(
                &format!("p{i}"),
                &format!("10.0.{}.{}", i / 200, i % 200 + 1),
                true,
                8080,
            )
        })
        .collect();
    let plan = plan_slices(&svc, &[], desired(&svc, &many, |_| None), None);
    let sizes: Vec<usize> = plan.create.iter().map(|s| s.endpoints.len()).collect();
    assert_eq!(sizes, [100, 100, 50]);
    let slice = &plan.create[0];
    assert_eq!(slice.labels()[SERVICE_NAME], "web");
    assert_eq!(slice.labels()[MANAGED_BY], CONTROLLER);
    assert_eq!(slice.labels()["team"], "a");
    assert_eq!(slice.owner_references()[0].uid, "svc-uid");

    let existing = existing_from(&plan);
    let unchanged = plan_slices(&svc, &existing, desired(&svc, &many, |_| None), None);
    assert!(
        unchanged.create.is_empty() && unchanged.update.is_empty() && unchanged.delete.is_empty()
    );

    // Dropping one pod rewrites only the slice that held it.
    let fewer: Vec<Arc<Pod>> = many.iter().skip(1).cloned().collect();
    let plan = plan_slices(&svc, &existing, desired(&svc, &fewer, |_| None), None);
    assert!(plan.create.is_empty() && plan.delete.is_empty());
    assert_eq!(plan.update.len(), 1);

    // No endpoints: one empty placeholder remains.
    let plan = plan_slices(&svc, &existing, desired(&svc, &[], |_| None), None);
    assert_eq!(plan.update.len(), 1);
    assert!(plan.update[0].endpoints.is_empty());
    assert_eq!(plan.delete.len(), 2);
    let plan = plan_slices(&svc, &[], desired(&svc, &[], |_| None), None);
    assert_eq!(plan.create.len(), 1);
}

#[test]
fn slices_carry_the_earliest_change_not_yet_reflected() {
    let at = |second: u32| {
        DateTime::parse_from_rfc3339(&format!("2026-11-22T10:00:{second:02}Z"))
            .unwrap()
            .with_timezone(&Utc)
    };
    let ready_at = |name: &str, ip: &str, second: u32| {
        let mut pod = Pod::clone(&pod(name, ip, true, 8080));
        pod.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].last_transition_time =
            Some(Time(at(second)));
        Arc::new(pod)
    };
    let mut svc = service(json!(8080));
    svc.metadata.creation_timestamp = Some(Time(at(1)));
    let times = TriggerTimes::default();
    let pods = vec![ready_at("a", "10.0.0.1", 5), ready_at("b", "10.0.0.2", 7)];
    // First sight: the Service's creation, even if its pods were ready
    // before it existed.
    let early = vec![ready_at("z", "10.0.0.9", 0)];
    assert_eq!(times.earliest_change(&svc, &early), Some(at(1)));
    assert_eq!(times.earliest_change(&svc, &pods), Some(at(5)));
    assert_eq!(times.earliest_change(&svc, &pods), None, "nothing moved");
    let pods = vec![ready_at("a", "10.0.0.1", 9), ready_at("b", "10.0.0.2", 8)];
    assert_eq!(times.earliest_change(&svc, &pods), Some(at(8)));

    let plan = plan_slices(&svc, &[], desired(&svc, &pods, |_| None), Some(at(8)));
    assert_eq!(
        plan.create[0].annotations()[TRIGGER_TIME],
        "2026-11-22T10:00:08Z"
    );
    // An unchanged slice is not rewritten for a new trigger time; a
    // changed one written without a trigger loses the old one.
    let existing = existing_from(&plan);
    let same = plan_slices(&svc, &existing, desired(&svc, &pods, |_| None), Some(at(9)));
    assert!(same.update.is_empty());
    let plan = plan_slices(&svc, &existing, desired(&svc, &pods[..1], |_| None), None);
    assert_eq!(plan.update.len(), 1);
    assert!(!plan.update[0].annotations().contains_key(TRIGGER_TIME));
}
