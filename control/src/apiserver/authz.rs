//! Authorization: `system:masters` may do anything; node identities get
//! the node authorizer's narrow rights; everyone else gets what RBAC
//! (Roles, ClusterRoles and their bindings) grants.
//!
//! RBAC objects are indexed in memory from the watch cache, as upstream's
//! authorizer reads them from informers: a new binding takes effect
//! within the cache's delay, and no request pays a store read.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject,
};
use serde::Deserialize as _;
use serde_json::{Value, json};

use super::authn::User;

/// The group whose members bypass authorization.
pub const MASTERS: &str = "system:masters";
/// Node identities: `system:node:<name>` in this group.
pub const NODES: &str = "system:nodes";

/// What a request wants to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attributes {
    Resource {
        verb: String,
        group: String,
        resource: String,
        subresource: Option<String>,
        namespace: Option<String>,
        name: Option<String>,
    },
    NonResource {
        verb: String,
        path: String,
    },
}

/// The answer, with the upstream-shaped reason when denied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Allowed for a node if the pod named in the request is bound to it;
    /// the handler checks the binding against the stored pod.
    AllowIfPodBoundTo(String),
    Deny(String),
}

#[derive(Default)]
struct Index {
    roles: HashMap<(String, String), Vec<PolicyRule>>,
    cluster_roles: HashMap<String, Vec<PolicyRule>>,
    role_bindings: HashMap<(String, String), RoleBinding>,
    cluster_role_bindings: HashMap<String, ClusterRoleBinding>,
}

/// The RBAC index, updated from the watch cache.
#[derive(Clone, Default)]
pub struct Authorizer {
    index: Arc<RwLock<Index>>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authorizer(..)")
    }
}

/// The store key prefix of RBAC objects.
pub const RBAC_PREFIX: &str = "/registry/rbac.authorization.k8s.io/";

fn matches_list(list: &[String], value: &str) -> bool {
    list.iter().any(|item| item == "*" || item == value)
}

fn rule_allows(rule: &PolicyRule, attributes: &Attributes) -> bool {
    match attributes {
        Attributes::Resource {
            verb,
            group,
            resource,
            subresource,
            name,
            ..
        } => {
            let groups = rule.api_groups.as_deref().unwrap_or_default();
            let resources = rule.resources.as_deref().unwrap_or_default();
            let full = match subresource {
                Some(sub) => format!("{resource}/{sub}"),
                None => resource.clone(),
            };
            let resource_ok = resources.iter().any(|r| {
                r == "*"
                    || *r == full
                    || subresource
                        .as_ref()
                        .is_some_and(|sub| *r == format!("*/{sub}"))
            });
            let names = rule.resource_names.as_deref().unwrap_or_default();
            let name_ok = names.is_empty() || name.as_ref().is_some_and(|n| names.contains(n));
            matches_list(&rule.verbs, verb) && matches_list(groups, group) && resource_ok && name_ok
        }
        Attributes::NonResource { verb, path } => {
            let urls = rule.non_resource_urls.as_deref().unwrap_or_default();
            let url_ok = urls.iter().any(|url| match url.strip_suffix('*') {
                Some(prefix) => path.starts_with(prefix),
                None => url == path,
            });
            matches_list(&rule.verbs, verb) && url_ok
        }
    }
}

fn subject_matches(subject: &Subject, user: &User, binding_namespace: Option<&str>) -> bool {
    match subject.kind.as_str() {
        "User" => subject.name == user.name,
        "Group" => user.in_group(&subject.name),
        "ServiceAccount" => {
            let namespace = subject
                .namespace
                .as_deref()
                .or(binding_namespace)
                .unwrap_or_default();
            user.name == format!("system:serviceaccount:{namespace}:{}", subject.name)
        }
        _ => false,
    }
}

/// Upstream's denial message.
fn forbidden_reason(user: &User, attributes: &Attributes) -> String {
    match attributes {
        Attributes::Resource {
            verb,
            group,
            resource,
            subresource,
            namespace,
            ..
        } => {
            let full = match subresource {
                Some(sub) => format!("{resource}/{sub}"),
                None => resource.clone(),
            };
            let scope = match namespace {
                Some(namespace) => format!("in the namespace \"{namespace}\""),
                None => "at the cluster scope".to_owned(),
            };
            format!(
                "User \"{}\" cannot {verb} resource \"{full}\" in API group \"{group}\" {scope}",
                user.name
            )
        }
        Attributes::NonResource { verb, path } => {
            format!("User \"{}\" cannot {verb} path \"{path}\"", user.name)
        }
    }
}

/// The node authorizer's rules: a node reads what it needs to run pods and
/// forward services (not Secrets: those will be granted per pod bound to
/// the node), writes its own Node and Lease, the status of its pods, and
/// events. Anything else falls through to RBAC.
fn node_decision(node: &str, attributes: &Attributes) -> Option<Decision> {
    let Attributes::Resource {
        verb,
        group,
        resource,
        subresource,
        namespace,
        name,
    } = attributes
    else {
        return None;
    };
    let read = matches!(verb.as_str(), "get" | "list" | "watch");
    let own = name.as_deref() == Some(node);
    Some(
        match (group.as_str(), resource.as_str(), subresource.as_deref()) {
            ("", "secrets", _) => return None,
            _ if read => Decision::Allow,
            // For creates, `name` is the body's (the handler fills it in).
            ("", "nodes", None | Some("status")) if own => Decision::Allow,
            ("coordination.k8s.io", "leases", None)
                if namespace.as_deref() == Some("kube-node-lease") && own =>
            {
                Decision::Allow
            }
            ("", "pods", Some("status")) if matches!(verb.as_str(), "update" | "patch") => {
                Decision::AllowIfPodBoundTo(node.to_owned())
            }
            // Usage reports (see `crate::usage`): its own and its pods'.
            ("metrics.k8s.io", "nodes", None) if own => Decision::Allow,
            ("metrics.k8s.io", "pods", None) => Decision::AllowIfPodBoundTo(node.to_owned()),
            // The agent deletes its pods once they have stopped.
            ("", "pods", None) if verb == "delete" => Decision::AllowIfPodBoundTo(node.to_owned()),
            // Its serving certificate (or a new client certificate):
            // the approver checks that the request names this node.
            ("certificates.k8s.io", "certificatesigningrequests", None) if verb == "create" => {
                Decision::Allow
            }
            ("", "events", None) | ("events.k8s.io", "events", None)
                if matches!(verb.as_str(), "create" | "update" | "patch") =>
            {
                Decision::Allow
            }
            _ => return None,
        },
    )
}

impl Authorizer {
    pub fn decide(&self, user: &User, attributes: &Attributes) -> Decision {
        if user.in_group(MASTERS) {
            return Decision::Allow;
        }
        if user.in_group(NODES)
            && let Some(node) = user.name.strip_prefix("system:node:")
            && let Some(decision) = node_decision(node, attributes)
        {
            return decision;
        }
        if self.rbac_allows(user, attributes) {
            return Decision::Allow;
        }
        Decision::Deny(forbidden_reason(user, attributes))
    }

    fn rbac_allows(&self, user: &User, attributes: &Attributes) -> bool {
        let index = self
            .index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let allows = |rules: Option<&Vec<PolicyRule>>| {
            rules.is_some_and(|rules| rules.iter().any(|rule| rule_allows(rule, attributes)))
        };
        let cluster_wide = index.cluster_role_bindings.values().any(|binding| {
            binding
                .subjects
                .iter()
                .flatten()
                .any(|subject| subject_matches(subject, user, None))
                && binding.role_ref.kind == "ClusterRole"
                && allows(index.cluster_roles.get(&binding.role_ref.name))
        });
        if cluster_wide {
            return true;
        }
        let Attributes::Resource {
            namespace: Some(namespace),
            ..
        } = attributes
        else {
            return false;
        };
        index
            .role_bindings
            .iter()
            .filter(|((binding_namespace, _), _)| binding_namespace == namespace)
            .any(|(_, binding)| {
                binding
                    .subjects
                    .iter()
                    .flatten()
                    .any(|subject| subject_matches(subject, user, Some(namespace)))
                    && match binding.role_ref.kind.as_str() {
                        "Role" => allows(
                            index
                                .roles
                                .get(&(namespace.clone(), binding.role_ref.name.clone())),
                        ),
                        "ClusterRole" => allows(index.cluster_roles.get(&binding.role_ref.name)),
                        _ => false,
                    }
            })
    }

    /// RBAC's escalation check: writing a Role or ClusterRole needs every
    /// permission it grants (or `escalate` on it); writing a binding needs
    /// every permission of the role it binds (or `bind` on that role).
    /// Wildcards must be held as wildcards. Returns the denial message.
    pub fn check_escalation(
        &self,
        user: &User,
        plural: &str,
        namespace: Option<&str>,
        object: &Value,
    ) -> Result<(), String> {
        if user.in_group(MASTERS) {
            return Ok(());
        }
        let namespace = namespace.map(str::to_owned);
        let name = object["metadata"]["name"].as_str().map(str::to_owned);
        let holds = |verb: &str, resource: &str, name: Option<String>| {
            let attributes = Attributes::Resource {
                verb: verb.to_owned(),
                group: "rbac.authorization.k8s.io".to_owned(),
                resource: resource.to_owned(),
                subresource: None,
                namespace: namespace.clone(),
                name,
            };
            self.decide(user, &attributes) == Decision::Allow
        };
        let rules: Vec<PolicyRule> = match plural {
            "roles" | "clusterroles" => {
                if holds("escalate", plural, name) {
                    return Ok(());
                }
                serde_json::from_value(object["rules"].clone()).unwrap_or_default()
            }
            "rolebindings" | "clusterrolebindings" => {
                let kind = object["roleRef"]["kind"].as_str().unwrap_or_default();
                let role = object["roleRef"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let role_plural = if kind == "Role" {
                    "roles"
                } else {
                    "clusterroles"
                };
                if holds("bind", role_plural, Some(role.clone())) {
                    return Ok(());
                }
                let index = self
                    .index
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let rules = match (kind, &namespace) {
                    ("Role", Some(namespace)) => {
                        index.roles.get(&(namespace.clone(), role)).cloned()
                    }
                    ("ClusterRole", _) => index.cluster_roles.get(&role).cloned(),
                    _ => None,
                };
                rules.unwrap_or_default()
            }
            _ => return Ok(()),
        };
        let missing: Vec<String> = rules
            .iter()
            .filter(|rule| !self.holds_rule(user, rule, namespace.as_deref()))
            .map(|rule| {
                format!(
                    "{{APIGroups:{:?}, Resources:{:?}, ResourceNames:{:?}, NonResourceURLs:{:?}, Verbs:{:?}}}",
                    rule.api_groups.clone().unwrap_or_default(),
                    rule.resources.clone().unwrap_or_default(),
                    rule.resource_names.clone().unwrap_or_default(),
                    rule.non_resource_urls.clone().unwrap_or_default(),
                    rule.verbs
                )
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(format!(
            "user \"{}\" (groups={:?}) is attempting to grant RBAC permissions not currently held:\n{}",
            user.name,
            user.groups,
            missing.join("\n")
        ))
    }

    /// Whether `user` holds everything `rule` grants (in `namespace`).
    fn holds_rule(&self, user: &User, rule: &PolicyRule, namespace: Option<&str>) -> bool {
        let groups = rule.api_groups.clone().unwrap_or_default();
        let names: Vec<Option<String>> = match rule.resource_names.as_deref() {
            Some(names) if !names.is_empty() => names.iter().cloned().map(Some).collect(),
            _ => vec![None],
        };
        let resources_held = rule.resources.iter().flatten().all(|resource| {
            let (resource, subresource) = match resource.split_once('/') {
                Some((resource, sub)) => (resource.to_owned(), Some(sub.to_owned())),
                None => (resource.clone(), None),
            };
            rule.verbs.iter().all(|verb| {
                groups.iter().all(|group| {
                    names.iter().all(|name| {
                        let attributes = Attributes::Resource {
                            verb: verb.clone(),
                            group: group.clone(),
                            resource: resource.clone(),
                            subresource: subresource.clone(),
                            namespace: namespace.map(str::to_owned),
                            name: name.clone(),
                        };
                        self.decide(user, &attributes) == Decision::Allow
                    })
                })
            })
        });
        let urls_held = rule.non_resource_urls.iter().flatten().all(|path| {
            rule.verbs.iter().all(|verb| {
                let attributes = Attributes::NonResource {
                    verb: verb.clone(),
                    path: path.clone(),
                };
                self.decide(user, &attributes) == Decision::Allow
            })
        });
        resources_held && urls_held
    }

    /// Forgets every RBAC object (before a reload).
    pub fn clear(&self) {
        *self
            .index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Index::default();
    }

    /// Applies one stored RBAC object (`object` None: deleted).
    pub fn update(&self, key: &str, object: Option<&Value>) {
        let Some(rest) = key.strip_prefix(RBAC_PREFIX) else {
            return;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let mut index = self
            .index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match parts.as_slice() {
            ["roles", namespace, name] => {
                let id = ((*namespace).to_owned(), (*name).to_owned());
                match object.and_then(|v| Role::deserialize(v).ok()) {
                    Some(role) => index.roles.insert(id, role.rules.unwrap_or_default()),
                    None => index.roles.remove(&id),
                };
            }
            ["clusterroles", name] => {
                match object.and_then(|v| ClusterRole::deserialize(v).ok()) {
                    Some(role) => index
                        .cluster_roles
                        .insert((*name).to_owned(), role.rules.unwrap_or_default()),
                    None => index.cluster_roles.remove(*name),
                };
            }
            ["rolebindings", namespace, name] => {
                let id = ((*namespace).to_owned(), (*name).to_owned());
                match object.and_then(|v| RoleBinding::deserialize(v).ok()) {
                    Some(binding) => index.role_bindings.insert(id, binding),
                    None => index.role_bindings.remove(&id),
                };
            }
            ["clusterrolebindings", name] => {
                match object.and_then(|v| ClusterRoleBinding::deserialize(v).ok()) {
                    Some(binding) => index
                        .cluster_role_bindings
                        .insert((*name).to_owned(), binding),
                    None => index.cluster_role_bindings.remove(*name),
                };
            }
            _ => {}
        }
    }
}

fn rule(verbs: &[&str], groups: &[&str], resources: &[&str]) -> Value {
    json!({ "verbs": verbs, "apiGroups": groups, "resources": resources })
}

/// Upstream's bootstrap roles and bindings that matter for a cluster of
/// wharf's scope: cluster-admin for system:masters; discovery, version and
/// health for every authenticated user; admin, edit and view to bind.
pub fn bootstrap_policy() -> Vec<(&'static str, Value)> {
    let read = ["get", "list", "watch"];
    let write = ["create", "delete", "deletecollection", "patch", "update"];
    let all_write: Vec<&str> = read.iter().chain(write.iter()).copied().collect();
    let workloads = [
        "pods",
        "pods/log",
        "pods/status",
        "services",
        "endpoints",
        "configmaps",
        "persistentvolumeclaims",
        "events",
        "serviceaccounts",
    ];
    let apps = [
        "deployments",
        "deployments/scale",
        "replicasets",
        "replicasets/scale",
        "daemonsets",
        "statefulsets",
        "statefulsets/scale",
    ];
    let view_rules = json!([
        rule(&read, &[""], &workloads),
        rule(&read, &[""], &["namespaces"]),
        rule(&read, &["apps"], &apps),
        rule(&read, &["apps"], &["controllerrevisions"]),
        rule(&read, &["batch"], &["jobs", "cronjobs"]),
        rule(&read, &["discovery.k8s.io"], &["endpointslices"]),
        rule(&read, &["autoscaling"], &["horizontalpodautoscalers"]),
        rule(&read, &["policy"], &["poddisruptionbudgets"]),
        rule(&read, &["metrics.k8s.io"], &["pods"]),
    ]);
    let edit_rules = json!([
        rule(&all_write, &[""], &workloads),
        rule(&all_write, &[""], &["secrets"]),
        rule(&["create"], &[""], &["pods/eviction"]),
        rule(&read, &[""], &["namespaces"]),
        rule(&all_write, &["apps"], &apps),
        rule(&read, &["apps"], &["controllerrevisions"]),
        rule(&all_write, &["batch"], &["jobs", "cronjobs"]),
        rule(&all_write, &["discovery.k8s.io"], &["endpointslices"]),
        rule(&all_write, &["autoscaling"], &["horizontalpodautoscalers"]),
        rule(&all_write, &["policy"], &["poddisruptionbudgets"]),
        rule(&all_write, &["coordination.k8s.io"], &["leases"]),
        rule(&read, &["metrics.k8s.io"], &["pods"]),
    ]);
    let mut admin_rules = edit_rules.clone();
    if let Some(rules) = admin_rules.as_array_mut() {
        rules.push(rule(
            &all_write,
            &["rbac.authorization.k8s.io"],
            &["roles", "rolebindings"],
        ));
    }
    let cluster_role = |name: &str, rules: Value| {
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": { "name": name, "annotations": { "rbac.authorization.kubernetes.io/autoupdate": "true" }, "labels": { "kubernetes.io/bootstrapping": "rbac-defaults" } },
            "rules": rules,
        })
    };
    let binding = |name: &str, role: &str, group: &str| {
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": { "name": name, "annotations": { "rbac.authorization.kubernetes.io/autoupdate": "true" }, "labels": { "kubernetes.io/bootstrapping": "rbac-defaults" } },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role },
            "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group }],
        })
    };
    let user_binding = |name: &str, role: &str, user: &str| {
        let mut object = binding(name, role, user);
        object["subjects"][0]["kind"] = json!("User");
        object
    };
    let scheduler_rules = json!([
        rule(&read, &[""], &["pods", "nodes", "namespaces"]),
        rule(&["delete"], &[""], &["pods"]),
        rule(&["create"], &[""], &["pods/binding", "bindings"]),
        rule(&["patch", "update"], &[""], &["pods/status"]),
        rule(&["create", "patch", "update"], &[""], &["events"]),
        rule(
            &["get", "create", "update"],
            &["coordination.k8s.io"],
            &["leases"]
        ),
        rule(&read, &["policy"], &["poddisruptionbudgets"]),
        rule(&read, &["scheduling.k8s.io"], &["priorityclasses"]),
    ]);
    let discovery_urls = json!([{
        "verbs": ["get"],
        "nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*", "/version", "/version/", "/healthz", "/livez", "/readyz"],
    }]);
    vec![
        // New nodes join with a bootstrap token: they may ask for their
        // client certificate and follow the request (kubeadm's
        // system:node-bootstrapper binding).
        (
            "clusterroles",
            cluster_role(
                "system:node-bootstrapper",
                json!([rule(
                    &["create", "get", "list", "watch"],
                    &["certificates.k8s.io"],
                    &["certificatesigningrequests"]
                )]),
            ),
        ),
        (
            "clusterrolebindings",
            binding(
                "wharf:node-bootstrappers",
                "system:node-bootstrapper",
                "system:bootstrappers",
            ),
        ),
        (
            "clusterroles",
            cluster_role(
                "cluster-admin",
                json!([
                    rule(&["*"], &["*"], &["*"]),
                    { "verbs": ["*"], "nonResourceURLs": ["*"] },
                ]),
            ),
        ),
        (
            "clusterroles",
            cluster_role("system:discovery", discovery_urls),
        ),
        (
            "clusterroles",
            cluster_role("system:kube-scheduler", scheduler_rules),
        ),
        // The controllers delete whatever a terminating namespace holds
        // and collect any kind of dependent, so, like upstream's
        // namespace and garbage collector controllers, they may act on
        // every resource.
        (
            "clusterroles",
            cluster_role(
                "system:kube-controller-manager",
                json!([rule(&["*"], &["*"], &["*"])]),
            ),
        ),
        (
            "clusterrolebindings",
            user_binding(
                "system:kube-scheduler",
                "system:kube-scheduler",
                "system:kube-scheduler",
            ),
        ),
        (
            "clusterrolebindings",
            user_binding(
                "system:kube-controller-manager",
                "system:kube-controller-manager",
                "system:kube-controller-manager",
            ),
        ),
        ("clusterroles", cluster_role("admin", admin_rules)),
        ("clusterroles", cluster_role("edit", edit_rules)),
        ("clusterroles", cluster_role("view", view_rules)),
        (
            "clusterrolebindings",
            binding("cluster-admin", "cluster-admin", MASTERS),
        ),
        (
            "clusterrolebindings",
            binding(
                "system:discovery",
                "system:discovery",
                super::authn::AUTHENTICATED,
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> User {
        User {
            name: name.to_owned(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        }
    }

    fn resource(
        verb: &str,
        resource: &str,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Attributes {
        Attributes::Resource {
            verb: verb.to_owned(),
            group: String::new(),
            resource: resource.to_owned(),
            subresource: None,
            namespace: namespace.map(str::to_owned),
            name: name.map(str::to_owned),
        }
    }

    fn authorizer() -> Authorizer {
        let authorizer = Authorizer::default();
        for (plural, object) in bootstrap_policy() {
            let key = format!(
                "{RBAC_PREFIX}{plural}/{}",
                object["metadata"]["name"].as_str().unwrap()
            );
            authorizer.update(&key, Some(&object));
        }
        authorizer
    }

    #[test]
    fn role_bindings_grant_within_their_namespace_only() {
        let authorizer = authorizer();
        let alice = user("alice", &["system:authenticated"]);
        let list_pods = resource("list", "pods", Some("team"), None);
        assert_eq!(
            authorizer.decide(&alice, &list_pods),
            Decision::Deny("User \"alice\" cannot list resource \"pods\" in API group \"\" in the namespace \"team\"".to_owned())
        );
        let binding = json!({
            "metadata": {"name": "alice-view", "namespace": "team"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "User", "name": "alice"}],
        });
        authorizer.update(
            &format!("{RBAC_PREFIX}rolebindings/team/alice-view"),
            Some(&binding),
        );
        assert_eq!(authorizer.decide(&alice, &list_pods), Decision::Allow);
        assert!(matches!(
            authorizer.decide(&alice, &resource("list", "pods", Some("other"), None)),
            Decision::Deny(_)
        ));
        assert!(matches!(
            authorizer.decide(&alice, &resource("delete", "pods", Some("team"), Some("p"))),
            Decision::Deny(_)
        ));
        authorizer.update(&format!("{RBAC_PREFIX}rolebindings/team/alice-view"), None);
        assert!(matches!(
            authorizer.decide(&alice, &list_pods),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn nobody_grants_what_they_do_not_hold() {
        let authorizer = authorizer();
        let alice = user("alice", &["system:authenticated"]);
        let binding = json!({
            "metadata": {"name": "alice-admin", "namespace": "team"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
            "subjects": [{"kind": "User", "name": "alice"}],
        });
        authorizer.update(
            &format!("{RBAC_PREFIX}rolebindings/team/alice-admin"),
            Some(&binding),
        );
        let pod_reader = json!({"metadata": {"name": "reader", "namespace": "team"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]});
        assert_eq!(
            authorizer.check_escalation(&alice, "roles", Some("team"), &pod_reader),
            Ok(())
        );
        let everything = json!({"metadata": {"name": "all", "namespace": "team"},
            "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]});
        let denied = authorizer
            .check_escalation(&alice, "roles", Some("team"), &everything)
            .unwrap_err();
        assert!(
            denied.contains("attempting to grant RBAC permissions not currently held"),
            "{denied}"
        );
        let cluster_admin = json!({"metadata": {"name": "x", "namespace": "team"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "User", "name": "alice"}]});
        assert!(
            authorizer
                .check_escalation(&alice, "rolebindings", Some("team"), &cluster_admin)
                .is_err()
        );
        let view = json!({"metadata": {"name": "y", "namespace": "team"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "User", "name": "bob"}]});
        assert_eq!(
            authorizer.check_escalation(&alice, "rolebindings", Some("team"), &view),
            Ok(())
        );
        assert!(
            authorizer
                .check_escalation(&alice, "rolebindings", Some("other"), &view)
                .is_err()
        );
    }

    #[test]
    fn masters_and_discovery() {
        let authorizer = authorizer();
        let admin = user("kubernetes-admin", &[MASTERS]);
        assert_eq!(
            authorizer.decide(&admin, &resource("delete", "nodes", None, Some("n"))),
            Decision::Allow
        );
        let anyone = user("bob", &["system:authenticated"]);
        let api = Attributes::NonResource {
            verb: "get".to_owned(),
            path: "/apis/apps/v1".to_owned(),
        };
        assert_eq!(authorizer.decide(&anyone, &api), Decision::Allow);
        let metrics = Attributes::NonResource {
            verb: "get".to_owned(),
            path: "/metrics".to_owned(),
        };
        assert!(matches!(
            authorizer.decide(&anyone, &metrics),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn nodes_write_only_their_own_objects() {
        let authorizer = authorizer();
        let node = user("system:node:n1", &[NODES, "system:authenticated"]);
        assert_eq!(
            authorizer.decide(&node, &resource("update", "nodes", None, Some("n1"))),
            Decision::Allow
        );
        assert!(matches!(
            authorizer.decide(&node, &resource("update", "nodes", None, Some("n2"))),
            Decision::Deny(_)
        ));
        let status = Attributes::Resource {
            verb: "patch".to_owned(),
            group: String::new(),
            resource: "pods".to_owned(),
            subresource: Some("status".to_owned()),
            namespace: Some("default".to_owned()),
            name: Some("p".to_owned()),
        };
        assert_eq!(
            authorizer.decide(&node, &status),
            Decision::AllowIfPodBoundTo("n1".to_owned())
        );
        let lease = Attributes::Resource {
            verb: "update".to_owned(),
            group: "coordination.k8s.io".to_owned(),
            resource: "leases".to_owned(),
            subresource: None,
            namespace: Some("kube-node-lease".to_owned()),
            name: Some("n2".to_owned()),
        };
        assert!(matches!(
            authorizer.decide(&node, &lease),
            Decision::Deny(_)
        ));
        assert!(matches!(
            authorizer.decide(&node, &resource("list", "secrets", None, None)),
            Decision::Deny(_)
        ));
        assert!(matches!(
            authorizer.decide(
                &node,
                &resource("create", "configmaps", Some("default"), None)
            ),
            Decision::Deny(_)
        ));
    }
}
