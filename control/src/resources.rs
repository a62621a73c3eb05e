//! Resource amounts: what a pod requests and what a node can give.

use std::{collections::BTreeMap, ops::AddAssign};

use k8s_openapi::{
    api::core::v1::{Container, Node, Pod},
    apimachinery::pkg::api::resource::Quantity,
};

/// Amounts of the resources the scheduler accounts. CPU is in millicores,
/// memory and ephemeral storage in bytes; `extended` holds any other
/// resource name (`example.com/gpu`) in whole units.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub milli_cpu: i64,
    pub memory: i64,
    pub ephemeral_storage: i64,
    pub pods: i64,
    pub extended: BTreeMap<String, i64>,
}

/// Upstream's defaults for containers that request nothing, used only
/// when scoring, so that 100 request-less pods do not all look free
/// (`schedutil.DefaultMilliCPURequest`, `DefaultMemoryRequest`).
pub const NON_ZERO_MILLI_CPU: i64 = 100;
pub const NON_ZERO_MEMORY: i64 = 200 << 20;

impl Resources {
    fn from_list(list: Option<&BTreeMap<String, Quantity>>) -> Self {
        let mut resources = Self::default();
        for (name, amount) in list.into_iter().flatten() {
            match name.as_str() {
                "cpu" => resources.milli_cpu = wharf_quantity::milli(amount).unwrap_or(0),
                "memory" => resources.memory = wharf_quantity::value(amount).unwrap_or(0),
                "ephemeral-storage" => {
                    resources.ephemeral_storage = wharf_quantity::value(amount).unwrap_or(0);
                }
                "pods" => resources.pods = wharf_quantity::value(amount).unwrap_or(0),
                // hugepages and the like are accounted as extended.
                other => {
                    resources
                        .extended
                        .insert(other.to_owned(), wharf_quantity::value(amount).unwrap_or(0));
                }
            }
        }
        resources
    }

    /// Per-resource maximum (init containers run one at a time).
    fn max_with(&mut self, other: &Self) {
        self.milli_cpu = self.milli_cpu.max(other.milli_cpu);
        self.memory = self.memory.max(other.memory);
        self.ephemeral_storage = self.ephemeral_storage.max(other.ephemeral_storage);
        for (name, amount) in &other.extended {
            let entry = self.extended.entry(name.clone()).or_default();
            *entry = (*entry).max(*amount);
        }
    }

    /// Subtracts, for removing a pod from a node's sum.
    pub fn sub(&mut self, other: &Self) {
        self.milli_cpu -= other.milli_cpu;
        self.memory -= other.memory;
        self.ephemeral_storage -= other.ephemeral_storage;
        self.pods -= other.pods;
        for (name, amount) in &other.extended {
            *self.extended.entry(name.clone()).or_default() -= amount;
        }
    }
}

impl AddAssign<&Resources> for Resources {
    fn add_assign(&mut self, other: &Resources) {
        self.milli_cpu += other.milli_cpu;
        self.memory += other.memory;
        self.ephemeral_storage += other.ephemeral_storage;
        self.pods += other.pods;
        for (name, amount) in &other.extended {
            *self.extended.entry(name.clone()).or_default() += amount;
        }
    }
}

/// A container's requests; a resource with only a limit requests its
/// limit, as the API server's defaulting makes it.
fn container_requests(container: &Container) -> Resources {
    let Some(resources) = &container.resources else {
        return Resources::default();
    };
    let mut list = resources.limits.clone().unwrap_or_default();
    list.extend(resources.requests.clone().unwrap_or_default());
    Resources::from_list(Some(&list))
}

/// What a pod occupies on its node, as upstream's `PodRequests`: the sum
/// of its containers' requests, at least the largest init container's
/// (restartable "sidecar" init containers keep running and are added),
/// plus the pod overhead; `pods` is 1.
pub fn pod_requests(pod: &Pod) -> Resources {
    let Some(spec) = &pod.spec else {
        return Resources {
            pods: 1,
            ..Default::default()
        };
    };
    let mut total = Resources::default();
    for container in &spec.containers {
        total += &container_requests(container);
    }
    let mut sidecars = Resources::default();
    let mut init_peak = Resources::default();
    for init in spec.init_containers.iter().flatten() {
        let requests = container_requests(init);
        if init.restart_policy.as_deref() == Some("Always") {
            sidecars += &requests;
        } else {
            // A plain init container runs beside the sidecars started
            // before it.
            let mut peak = requests;
            peak += &sidecars;
            init_peak.max_with(&peak);
        }
    }
    total += &sidecars;
    total.max_with(&init_peak);
    total += &Resources::from_list(spec.overhead.as_ref());
    total.pods = 1;
    total
}

/// What scoring counts for a pod: its requests, with containers that ask
/// for no CPU or memory counted at upstream's non-zero defaults.
pub fn pod_score_requests(pod: &Pod) -> (i64, i64) {
    let Some(spec) = &pod.spec else {
        return (NON_ZERO_MILLI_CPU, NON_ZERO_MEMORY);
    };
    spec.containers.iter().fold((0, 0), |(cpu, memory), c| {
        let requests = container_requests(c);
        let cpu_request = if requests.milli_cpu == 0 {
            NON_ZERO_MILLI_CPU
        } else {
            requests.milli_cpu
        };
        let memory_request = if requests.memory == 0 {
            NON_ZERO_MEMORY
        } else {
            requests.memory
        };
        (cpu + cpu_request, memory + memory_request)
    })
}

/// What a node offers pods: `status.allocatable`, else its capacity.
pub fn node_allocatable(node: &Node) -> Resources {
    let status = node.status.as_ref();
    let list = status
        .and_then(|s| s.allocatable.as_ref())
        .or_else(|| status.and_then(|s| s.capacity.as_ref()));
    Resources::from_list(list)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodSpec, ResourceRequirements};

    use super::*;

    fn container(requests: &[(&str, &str)], limits: &[(&str, &str)]) -> Container {
        let list = |pairs: &[(&str, &str)]| {
            (!pairs.is_empty()).then(|| {
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
                    .collect()
            })
        };
        Container {
            name: "c".to_owned(),
            resources: Some(ResourceRequirements {
                requests: list(requests),
                limits: list(limits),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn containers_sum_and_init_containers_peak() {
        let mut sidecar = container(&[("cpu", "100m")], &[]);
        sidecar.restart_policy = Some("Always".to_owned());
        let pod = Pod {
            spec: Some(PodSpec {
                containers: vec![
                    container(&[("cpu", "250m"), ("memory", "64Mi")], &[]),
                    container(&[], &[("cpu", "1"), ("memory", "1Gi")]),
                ],
                init_containers: Some(vec![
                    sidecar,
                    container(&[("cpu", "2"), ("example.com/gpu", "1")], &[]),
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let requests = pod_requests(&pod);
        // max(1250m + 100m sidecar, 2 + 100m sidecar) = 2100m
        assert_eq!(requests.milli_cpu, 2100);
        assert_eq!(requests.memory, (64 << 20) + (1 << 30));
        assert_eq!(requests.pods, 1);
        assert_eq!(requests.extended["example.com/gpu"], 1);
    }

    #[test]
    fn scoring_counts_request_less_containers() {
        let pod = Pod {
            spec: Some(PodSpec {
                containers: vec![container(&[], &[]), container(&[("cpu", "1")], &[])],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            pod_score_requests(&pod),
            (1100, 2 * NON_ZERO_MEMORY),
            "100m default + 1 CPU; two memory defaults"
        );
    }
}
