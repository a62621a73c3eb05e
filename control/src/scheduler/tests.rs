//! `select_node` and preemption against fixture clusters.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use proptest::prelude::*;
use rand::SeedableRng as _;
use serde_json::{Value, json};

use super::{
    Cache,
    fixtures::{node, pod},
    preempt, select_node,
};
use crate::{pods, resources};

fn rng() -> rand::rngs::SmallRng {
    rand::rngs::SmallRng::seed_from_u64(7)
}

/// Merges `extra` into the pod's JSON (for affinity and the like).
fn with(pod: Pod, extra: Value) -> Pod {
    let mut value = serde_json::to_value(pod).unwrap();
    json_patch::merge(&mut value, &extra);
    serde_json::from_value(value).unwrap()
}

fn labelled(mut node: Node, labels: &[(&str, &str)]) -> Node {
    let map = node.metadata.labels.get_or_insert_with(Default::default);
    for (k, v) in labels {
        map.insert((*k).to_owned(), (*v).to_owned());
    }
    node
}

fn tainted(mut node: Node, key: &str, value: &str, effect: &str) -> Node {
    node.spec
        .get_or_insert_with(Default::default)
        .taints
        .get_or_insert_with(Vec::new)
        .push(Taint {
            key: key.to_owned(),
            value: Some(value.to_owned()),
            effect: effect.to_owned(),
            time_added: None,
        });
    node
}

fn cluster(nodes: Vec<Node>) -> Cache {
    let mut cache = Cache::default();
    for node in nodes {
        cache.upsert_node(node);
    }
    cache
}

/// Schedules and assumes, as the loop does.
fn place(cache: &mut Cache, pod: &Pod) -> Result<String, String> {
    let mut start = 0;
    let chosen = select_node(cache, pod, &mut start, &mut rng()).map_err(|e| e.message())?;
    cache.assume(pod, &chosen);
    Ok(chosen)
}

#[test]
fn the_message_counts_nodes_per_reason_like_upstream() {
    let mut cache = cluster(vec![
        node("n1", "1", "4Gi"),
        node("n2", "1", "4Gi"),
        tainted(node("n3", "8", "4Gi"), "gpu", "yes", "NoSchedule"),
    ]);
    assert_eq!(
        place(&mut cache, &pod("big", "2", "1Gi")).unwrap_err(),
        "0/3 nodes are available: 1 node(s) had untolerated taint {gpu: yes}, 2 Insufficient cpu."
    );
    assert_eq!(
        place(&mut cache, &pod("huge", "2", "8Gi")).unwrap_err(),
        "0/3 nodes are available: 1 node(s) had untolerated taint {gpu: yes}, 2 Insufficient cpu, 2 Insufficient memory."
    );
    let tolerant = with(
        pod("big", "2", "1Gi"),
        json!({"spec": {"tolerations": [{"key": "gpu", "operator": "Exists"}]}}),
    );
    assert_eq!(place(&mut cache, &tolerant).unwrap(), "n3");
}

#[test]
fn resources_fill_up_and_pod_count_is_a_limit() {
    let mut cache = cluster(vec![node("n1", "2", "4Gi")]);
    for i in 0..4 {
        place(&mut cache, &pod(&format!("p{i}"), "500m", "1Gi")).unwrap();
    }
    assert_eq!(
        place(&mut cache, &pod("p4", "100m", "0")).unwrap_err(),
        "0/1 nodes are available: 1 Insufficient cpu."
    );
    let mut full = cluster(vec![node("n1", "100", "100Gi")]);
    for i in 0..110 {
        place(&mut full, &pod(&format!("p{i}"), "0", "0")).unwrap();
    }
    assert_eq!(
        place(&mut full, &pod("one-more", "0", "0")).unwrap_err(),
        "0/1 nodes are available: 1 Too many pods."
    );
}

#[test]
fn readiness_cordons_selectors_and_required_node_affinity() {
    let mut not_ready = node("n1", "4", "4Gi");
    not_ready
        .status
        .as_mut()
        .unwrap()
        .conditions
        .as_mut()
        .unwrap()[0]
        .status = "Unknown".to_owned();
    let mut cordoned = node("n2", "4", "4Gi");
    cordoned.spec.as_mut().unwrap().unschedulable = Some(true);
    let mut cache = cluster(vec![
        not_ready,
        cordoned,
        labelled(node("n3", "4", "4Gi"), &[("disk", "ssd")]),
        labelled(node("n4", "4", "4Gi"), &[("disk", "hdd")]),
    ]);
    let ssd = with(
        pod("a", "1", "1Gi"),
        json!({"spec": {"nodeSelector": {"disk": "ssd"}}}),
    );
    assert_eq!(place(&mut cache, &ssd).unwrap(), "n3");
    let nvme = with(
        pod("b", "1", "1Gi"),
        json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "disk", "operator": "In", "values": ["nvme"]}]}]
        }}}}}),
    );
    assert_eq!(
        place(&mut cache, &nvme).unwrap_err(),
        "0/4 nodes are available: 1 node(s) had untolerated taint {node.kubernetes.io/not-ready: }, 1 node(s) were unschedulable, 2 node(s) didn't match Pod's node affinity/selector."
    );
}

#[test]
fn host_ports_conflict() {
    let mut cache = cluster(vec![node("n1", "4", "4Gi"), node("n2", "4", "4Gi")]);
    let web = |name: &str| {
        with(
            pod(name, "0", "0"),
            json!({"spec": {"containers": [{"name": "main", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}}),
        )
    };
    let first = place(&mut cache, &web("a")).unwrap();
    let second = place(&mut cache, &web("b")).unwrap();
    assert_ne!(first, second);
    assert_eq!(
        place(&mut cache, &web("c")).unwrap_err(),
        "0/2 nodes are available: 2 node(s) didn't have free ports for the requested pod ports."
    );
}

fn app(name: &str, app: &str, extra: Value) -> Pod {
    let mut pod = with(pod(name, "100m", "64Mi"), extra);
    pod.metadata.labels = Some([("app".to_owned(), app.to_owned())].into());
    pod
}

#[test]
fn required_pod_anti_affinity_spreads_and_affinity_follows() {
    let mut cache = cluster(
        (1..=3)
            .map(|i| node(&format!("n{i}"), "4", "4Gi"))
            .collect(),
    );
    let anti = json!({"spec": {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "db"}}, "topologyKey": "kubernetes.io/hostname"}
    ]}}}});
    let mut nodes: Vec<String> = (0..3)
        .map(|i| place(&mut cache, &app(&format!("db{i}"), "db", anti.clone())).unwrap())
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2", "n3"]);
    // The existing pods repel a fourth (checked first, as upstream).
    assert_eq!(
        place(&mut cache, &app("db3", "db", anti.clone())).unwrap_err(),
        "0/3 nodes are available: 3 node(s) didn't satisfy existing pods anti-affinity rules."
    );
    // A pod they do not repel but that avoids them finds no node either.
    assert_eq!(
        place(&mut cache, &app("web", "web", anti)).unwrap_err(),
        "0/3 nodes are available: 3 node(s) didn't match pod anti-affinity rules."
    );

    let mut cache = cluster(
        (1..=3)
            .map(|i| node(&format!("n{i}"), "4", "4Gi"))
            .collect(),
    );
    let follow = json!({"spec": {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "cache"}}, "topologyKey": "kubernetes.io/hostname"}
    ]}}}});
    // The first of a group that matches its own term goes anywhere...
    let first = place(&mut cache, &app("cache0", "cache", follow.clone())).unwrap();
    // ...and the rest follow it.
    for i in 1..4 {
        assert_eq!(
            place(
                &mut cache,
                &app(&format!("cache{i}"), "cache", follow.clone())
            )
            .unwrap(),
            first
        );
    }
    assert_eq!(
        place(&mut cache, &app("web", "web", follow)).unwrap(),
        first,
        "follows the cache pods"
    );
    let lonely = json!({"spec": {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "nothing"}}, "topologyKey": "kubernetes.io/hostname"}
    ]}}}});
    assert_eq!(
        place(&mut cache, &app("lonely", "web", lonely)).unwrap_err(),
        "0/3 nodes are available: 3 node(s) didn't match pod affinity rules."
    );
}

#[test]
fn topology_spread_keeps_the_skew() {
    let mut cache = cluster(vec![
        labelled(node("a1", "8", "8Gi"), &[("zone", "a")]),
        labelled(node("a2", "8", "8Gi"), &[("zone", "a")]),
        labelled(node("b1", "8", "8Gi"), &[("zone", "b")]),
        node("unzoned", "8", "8Gi"),
    ]);
    let spread = json!({"spec": {"topologySpreadConstraints": [{
        "maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": {"matchLabels": {"app": "web"}}
    }]}});
    let mut zones = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..6 {
        let chosen = place(&mut cache, &app(&format!("w{i}"), "web", spread.clone())).unwrap();
        assert_ne!(chosen, "unzoned");
        let zone = if chosen.starts_with('a') { "a" } else { "b" };
        *zones.entry(zone.to_owned()).or_default() += 1;
        let counts: Vec<usize> = zones.values().copied().collect();
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 1 || zones.len() < 2 && *max <= 1, "{zones:?}");
    }
    assert_eq!(zones["a"], 3);
    assert_eq!(zones["b"], 3);
}

#[test]
fn scores_prefer_emptier_nodes_and_preferred_affinity() {
    let mut cache = cluster(vec![node("n1", "4", "8Gi"), node("n2", "4", "8Gi")]);
    let mut busy = pod("busy", "3", "6Gi");
    busy.spec.as_mut().unwrap().node_name = Some("n1".to_owned());
    cache.upsert_pod(&Arc::new(busy));
    for i in 0..3 {
        assert_eq!(
            place(&mut cache, &pod(&format!("p{i}"), "100m", "128Mi")).unwrap(),
            "n2"
        );
    }
    let mut cache = cluster(vec![
        labelled(node("n1", "4", "8Gi"), &[("disk", "hdd")]),
        labelled(node("n2", "4", "8Gi"), &[("disk", "ssd")]),
    ]);
    let prefer_ssd = with(
        pod("p", "100m", "128Mi"),
        json!({"spec": {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "preference": {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}}
        ]}}}}),
    );
    assert_eq!(place(&mut cache, &prefer_ssd).unwrap(), "n2");
    let mut soft = tainted(node("n3", "4", "8Gi"), "spot", "", "PreferNoSchedule");
    soft.metadata.name = Some("n3".to_owned());
    let mut cache = cluster(vec![soft, node("n4", "4", "8Gi")]);
    assert_eq!(place(&mut cache, &pod("p", "100m", "128Mi")).unwrap(), "n4");
}

#[test]
fn ties_are_broken_at_random() {
    let cache = cluster(
        (1..=4)
            .map(|i| node(&format!("n{i}"), "4", "4Gi"))
            .collect(),
    );
    let mut rng = rng();
    let mut chosen = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let mut start = 0;
        chosen.insert(select_node(&cache, &pod("p", "1", "1Gi"), &mut start, &mut rng).unwrap());
    }
    assert_eq!(chosen.len(), 4, "every equal node gets picked: {chosen:?}");
}

#[test]
fn large_clusters_stop_after_enough_feasible_nodes() {
    assert_eq!(super::feasible_to_find(50), 50);
    assert_eq!(super::feasible_to_find(1000), 420);
    assert_eq!(super::feasible_to_find(5000), 500);
    assert_eq!(super::feasible_to_find(100_000), 5000);
}

fn prioritized(name: &str, cpu: &str, priority: i32) -> Pod {
    let mut pod = pod(name, cpu, "0");
    pod.spec.as_mut().unwrap().priority = Some(priority);
    pod
}

#[test]
fn preemption_evicts_the_fewest_least_important_pods() {
    let mut cache = cluster(vec![node("n1", "4", "8Gi"), node("n2", "4", "8Gi")]);
    for (name, node, cpu, priority) in [
        ("low-a", "n1", "2", 10),
        ("low-b", "n1", "2", 10),
        ("mid-a", "n2", "2", 100),
        ("mid-b", "n2", "2", 5),
    ] {
        let mut placed = prioritized(name, cpu, priority);
        placed.spec.as_mut().unwrap().node_name = Some(node.to_owned());
        cache.upsert_pod(&Arc::new(placed));
    }
    let urgent = prioritized("urgent", "2", 1000);
    let fit = select_node(&cache, &urgent, &mut 0, &mut rng()).unwrap_err();
    let (node, victims) = preempt::plan(&cache, &urgent, &fit).expect("a plan");
    // n2 needs only mid-b (priority 5) gone; n1 would lose a priority-10 pod.
    assert_eq!(node, "n2");
    let names: Vec<_> = victims.iter().map(|v| pods::key(&v.metadata)).collect();
    assert_eq!(names, ["default/mid-b"]);

    let mut never = urgent.clone();
    never.spec.as_mut().unwrap().preemption_policy = Some("Never".to_owned());
    assert_eq!(
        preempt::plan(&cache, &never, &fit).unwrap_err(),
        "not eligible due to preemptionPolicy=Never."
    );
    let equal = prioritized("equal", "2", 5);
    let fit = select_node(&cache, &equal, &mut 0, &mut rng()).unwrap_err();
    assert_eq!(
        preempt::plan(&cache, &equal, &fit).unwrap_err(),
        "0/2 nodes are available: 2 No preemption victims found for incoming pod.",
        "only strictly lower priorities are victims"
    );
    let mut picky = prioritized("picky", "1", 1000);
    picky.spec.as_mut().unwrap().node_selector =
        Some([("disk".to_owned(), "ssd".to_owned())].into());
    let fit = select_node(&cache, &picky, &mut 0, &mut rng()).unwrap_err();
    assert_eq!(
        preempt::plan(&cache, &picky, &fit).unwrap_err(),
        "0/2 nodes are available: 2 Preemption is not helpful for scheduling."
    );
}

fn arbitrary_node() -> impl Strategy<Value = Node> {
    (1u32..8, 1u32..16, proptest::option::of(0u8..3)).prop_map(|(cpu, gib, taint)| {
        let base = node("n", &cpu.to_string(), &format!("{gib}Gi"));
        match taint {
            Some(0) => tainted(base, "dedicated", "db", "NoSchedule"),
            Some(1) => tainted(base, "evict", "", "NoExecute"),
            Some(_) => tainted(base, "spot", "", "PreferNoSchedule"),
            None => base,
        }
    })
}

fn arbitrary_pod() -> impl Strategy<Value = Pod> {
    (0u32..3000, 0u32..4096, 0u8..4).prop_map(|(milli, mib, tolerate)| {
        let base = pod("p", &format!("{milli}m"), &format!("{mib}Mi"));
        let toleration = match tolerate {
            0 => json!([{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}]),
            1 => json!([{"key": "evict", "operator": "Exists"}]),
            _ => json!([]),
        };
        with(base, json!({"spec": {"tolerations": toleration}}))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the cluster and the pods: a node never holds more than it
    /// can give, and a pod never lands where a taint it does not tolerate
    /// forbids it.
    #[test]
    fn bindings_respect_allocatable_and_taints(
        nodes in proptest::collection::vec(arbitrary_node(), 1..12),
        pending in proptest::collection::vec(arbitrary_pod(), 1..80),
    ) {
        let mut cache = Cache::default();
        for (i, mut node) in nodes.into_iter().enumerate() {
            let name = format!("n{i}");
            node.metadata.name = Some(name.clone());
            cache.upsert_node(node);
        }
        let mut start = 0;
        let mut rng = rng();
        for (i, mut pod) in pending.into_iter().enumerate() {
            pod.metadata.name = Some(format!("p{i}"));
            let Ok(chosen) = select_node(&cache, &pod, &mut start, &mut rng) else {
                continue;
            };
            cache.assume(&pod, &chosen);
            let info = cache.info(&chosen).unwrap();
            let taints = info.node.as_ref().unwrap().spec.as_ref().unwrap().taints.clone().unwrap_or_default();
            prop_assert!(pods::untolerated(&taints, pods::tolerations(&pod), &["NoSchedule", "NoExecute"]).is_none());
        }
        for info in cache.infos() {
            let (have, used) = (&info.allocatable, &info.requested);
            prop_assert!(used.milli_cpu <= have.milli_cpu, "cpu {} > {}", used.milli_cpu, have.milli_cpu);
            prop_assert!(used.memory <= have.memory);
            prop_assert!(used.pods <= have.pods);
            let summed = info.pods.iter().fold(resources::Resources::default(), |mut sum, p| {
                sum += &resources::pod_requests(p);
                sum
            });
            prop_assert_eq!(&summed, used);
        }
    }
}
