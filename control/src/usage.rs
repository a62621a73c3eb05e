//! Resource usage reports: the `metrics.k8s.io/v1beta1` PodMetrics and
//! NodeMetrics that `kubectl top` reads and the HPA controller scales on.
//!
//! Upstream serves these from metrics-server, which scrapes every
//! kubelet. wharf stores them like any object instead: each node agent
//! (or simulated node) writes its pods' and its own usage, with the
//! pod as owner so the garbage collector removes a report with its pod.
//! No extra process, and a watch on them works.

use std::collections::BTreeMap;

use k8s_openapi::{
    ClusterResourceScope, ListableResource, Metadata, NamespaceResourceScope, Resource,
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{ObjectMeta, Time},
    },
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

const GROUP: &str = "metrics.k8s.io";
const VERSION: &str = "v1beta1";
const API_VERSION: &str = "metrics.k8s.io/v1beta1";

/// One container's usage over `window`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "io.k8s.metrics.pkg.apis.metrics.v1beta1.ContainerMetrics")]
pub struct ContainerMetrics {
    pub name: String,
    /// `cpu` (cores, as a quantity) and `memory` (bytes).
    pub usage: BTreeMap<String, Quantity>,
}

/// A pod's usage: the sum over `window` ending at `timestamp`, per
/// container. Named as its pod and labelled with its labels (as
/// metrics-server does), so `kubectl top pods -l` selects them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "io.k8s.metrics.pkg.apis.metrics.v1beta1.PodMetrics")]
pub struct PodMetrics {
    /// Left empty by writers; the server sets it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub timestamp: Time,
    /// A Go duration string (`15s`).
    pub window: String,
    #[serde(default)]
    pub containers: Vec<ContainerMetrics>,
}

/// A node's usage over `window` ending at `timestamp`. Named as its node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "io.k8s.metrics.pkg.apis.metrics.v1beta1.NodeMetrics")]
pub struct NodeMetrics {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub timestamp: Time,
    pub window: String,
    #[serde(default)]
    pub usage: BTreeMap<String, Quantity>,
}

macro_rules! metrics_resource {
    ($kind:ident, $plural:literal, $scope:ty) => {
        impl Resource for $kind {
            const API_VERSION: &'static str = API_VERSION;
            const GROUP: &'static str = GROUP;
            const KIND: &'static str = stringify!($kind);
            const VERSION: &'static str = VERSION;
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = $scope;
        }

        impl ListableResource for $kind {
            const LIST_KIND: &'static str = concat!(stringify!($kind), "List");
        }

        impl Metadata for $kind {
            type Ty = ObjectMeta;

            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

metrics_resource!(PodMetrics, "pods", NamespaceResourceScope);
metrics_resource!(NodeMetrics, "nodes", ClusterResourceScope);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_in_metrics_server_shape() {
        let wire = serde_json::json!({
            "apiVersion": "metrics.k8s.io/v1beta1",
            "kind": "PodMetrics",
            "metadata": {"name": "web-1", "namespace": "default"},
            "timestamp": "2026-11-21T10:00:00Z",
            "window": "15s",
            "containers": [{"name": "web", "usage": {"cpu": "250m", "memory": "64Mi"}}],
        });
        let metrics: PodMetrics = serde_json::from_value(wire.clone()).unwrap();
        assert_eq!(
            metrics.containers[0].usage["cpu"],
            Quantity("250m".to_owned())
        );
        assert_eq!(serde_json::to_value(&metrics).unwrap(), wire);
    }
}
