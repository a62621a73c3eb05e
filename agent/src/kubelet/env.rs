//! A container's environment and command line, as kubelet makes them:
//! `envFrom` first, then `env` in order (values, ConfigMap and Secret
//! keys, the downward API's fields and resources), with `$(VAR)`
//! references expanded in values, command and args.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("configmap {name:?} not found")]
    ConfigMapMissing { name: String },
    #[error("couldn't find key {key} in ConfigMap {name}")]
    ConfigMapKeyMissing { name: String, key: String },
    #[error("secret {name:?} not found")]
    SecretMissing { name: String },
    #[error("couldn't find key {key} in Secret {name}")]
    SecretKeyMissing { name: String, key: String },
    #[error("unsupported fieldPath {path:?}")]
    Field { path: String },
    #[error("unsupported resource {resource:?}")]
    Resource { resource: String },
    #[error("environment variable {name} has no value source")]
    NoSource { name: String },
}

/// The ConfigMaps and Secrets a pod refers to, fetched before its
/// containers start (None: does not exist).
#[derive(Clone, Debug, Default)]
pub struct Refs {
    pub config_maps: BTreeMap<String, Option<ConfigMap>>,
    pub secrets: BTreeMap<String, Option<Secret>>,
}

impl Refs {
    /// The names of what `pod` refers to: (config maps, secrets).
    pub fn wanted(pod: &Pod) -> (Vec<String>, Vec<String>) {
        let mut maps = Vec::new();
        let mut secrets = Vec::new();
        let Some(spec) = &pod.spec else {
            return (maps, secrets);
        };
        let containers = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter());
        for container in containers {
            for from in container.env_from.iter().flatten() {
                maps.extend(from.config_map_ref.as_ref().map(|r| r.name.clone()));
                secrets.extend(from.secret_ref.as_ref().map(|r| r.name.clone()));
            }
            for var in container.env.iter().flatten() {
                let Some(source) = &var.value_from else {
                    continue;
                };
                maps.extend(source.config_map_key_ref.as_ref().map(|r| r.name.clone()));
                secrets.extend(source.secret_key_ref.as_ref().map(|r| r.name.clone()));
            }
        }
        for volume in spec.volumes.iter().flatten() {
            maps.extend(volume.config_map.as_ref().map(|c| c.name.clone()));
            secrets.extend(volume.secret.as_ref().and_then(|s| s.secret_name.clone()));
            for source in volume
                .projected
                .iter()
                .flat_map(|p| p.sources.iter().flatten())
            {
                maps.extend(source.config_map.as_ref().map(|c| c.name.clone()));
                secrets.extend(source.secret.as_ref().map(|s| s.name.clone()));
            }
        }
        maps.sort();
        maps.dedup();
        secrets.sort();
        secrets.dedup();
        (maps, secrets)
    }

    /// A ConfigMap's entries (binary ones as lossy text for env).
    pub fn config_map(&self, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
        let map = self.config_maps.get(name)?.as_ref()?;
        let mut entries: BTreeMap<String, Vec<u8>> = map
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
            .collect();
        entries.extend(
            map.binary_data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.0.clone())),
        );
        Some(entries)
    }

    /// A Secret's entries (`stringData` is folded into `data` by the API
    /// server; kept here for objects that were never stored).
    pub fn secret(&self, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
        let secret = self.secrets.get(name)?.as_ref()?;
        let mut entries: BTreeMap<String, Vec<u8>> = secret
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect();
        entries.extend(
            secret
                .string_data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
        );
        Some(entries)
    }
}

/// What the downward API needs beyond the pod object.
#[derive(Clone, Debug, Default)]
pub struct Downward {
    pub pod_ip: String,
    pub host_ip: String,
    /// Allocatable of the node: what a container without a limit may
    /// use (millicores, bytes).
    pub node_milli_cpu: i64,
    pub node_memory: i64,
}

/// A pod field by `fieldPath`, as the downward API has them.
pub fn field(pod: &Pod, path: &str, downward: &Downward) -> Result<String, EnvError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let indexed = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix("['").or_else(|| rest.strip_prefix("[\"")))
            .and_then(|rest| rest.strip_suffix("']").or_else(|| rest.strip_suffix("\"]")))
            .map(|key| {
                map.as_ref()
                    .and_then(|m| m.get(key))
                    .cloned()
                    .unwrap_or_default()
            })
    };
    let text = |map: &Option<BTreeMap<String, String>>| {
        map.iter()
            .flatten()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => text(&meta.labels),
        "metadata.annotations" => text(&meta.annotations),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" => downward.host_ip.clone(),
        "status.podIP" | "status.podIPs" => downward.pod_ip.clone(),
        _ => indexed("metadata.labels", &meta.labels)
            .or_else(|| indexed("metadata.annotations", &meta.annotations))
            .ok_or_else(|| EnvError::Field { path: path.into() })?,
    })
}

/// A container's resource by `resource` (`limits.cpu`, ...), in units of
/// `divisor`, rounded up as kubelet does.
pub fn resource(
    container: &Container,
    resource: &str,
    divisor: Option<&str>,
    downward: &Downward,
) -> Result<String, EnvError> {
    let unknown = || EnvError::Resource {
        resource: resource.into(),
    };
    let (section, name) = resource.split_once('.').ok_or_else(unknown)?;
    let resources = container.resources.as_ref();
    let amounts = match section {
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        "requests" => resources.and_then(|r| r.requests.as_ref()),
        _ => return Err(unknown()),
    };
    let amount = amounts.and_then(|a| a.get(name));
    let divisor =
        divisor.map(|d| k8s_openapi::apimachinery::pkg::api::resource::Quantity(d.into()));
    Ok(match name {
        "cpu" => {
            // Without a limit, the node's allocatable; without a request,
            // zero (then at least 1 core is reported, as kubelet does).
            let milli = amount
                .and_then(wharf_quantity::milli)
                .unwrap_or(if section == "limits" {
                    downward.node_milli_cpu
                } else {
                    0
                });
            let per = divisor
                .as_ref()
                .and_then(wharf_quantity::milli)
                .unwrap_or(1000)
                .max(1);
            ((milli + per - 1) / per).max(1).to_string()
        }
        "memory" | "ephemeral-storage" => {
            let bytes = amount
                .and_then(wharf_quantity::value)
                .unwrap_or(if section == "limits" {
                    downward.node_memory
                } else {
                    0
                });
            let per = divisor
                .as_ref()
                .and_then(wharf_quantity::value)
                .unwrap_or(1)
                .max(1);
            ((bytes + per - 1) / per).to_string()
        }
        _ => return Err(unknown()),
    })
}

/// Expands `$(NAME)` from `vars`; `$$` escapes a `$`, and an unknown name
/// stays as written (kubelet's expansion rules).
pub fn expand(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.get(name) {
                Some(value) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// One key of a ConfigMap's or Secret's `entries`: None when optional
/// and missing.
fn key_ref(
    entries: Option<BTreeMap<String, Vec<u8>>>,
    key: &str,
    optional: bool,
    missing: impl FnOnce() -> EnvError,
    key_missing: impl FnOnce() -> EnvError,
) -> Result<Option<String>, EnvError> {
    match entries.as_ref().map(|e| e.get(key)) {
        Some(Some(value)) => Ok(Some(String::from_utf8_lossy(value).into_owned())),
        _ if optional => Ok(None),
        None => Err(missing()),
        Some(None) => Err(key_missing()),
    }
}

/// A container's environment, in order (later entries win, as in
/// `execve`'s environment processed by a shell).
pub fn environment(
    pod: &Pod,
    container: &Container,
    refs: &Refs,
    downward: &Downward,
) -> Result<Vec<(String, String)>, EnvError> {
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut set = |name: String, value: String, vars: &mut BTreeMap<String, String>| {
        if !vars.contains_key(&name) {
            order.push(name.clone());
        }
        vars.insert(name, value);
    };
    // HOSTNAME as a container runtime sets it.
    set("HOSTNAME".into(), hostname(pod), &mut vars);
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let entries = match (&from.config_map_ref, &from.secret_ref) {
            (Some(r), _) => {
                let entries = refs.config_map(&r.name);
                if entries.is_none() && !r.optional.unwrap_or(false) {
                    return Err(EnvError::ConfigMapMissing {
                        name: r.name.clone(),
                    });
                }
                entries
            }
            (None, Some(r)) => {
                let entries = refs.secret(&r.name);
                if entries.is_none() && !r.optional.unwrap_or(false) {
                    return Err(EnvError::SecretMissing {
                        name: r.name.clone(),
                    });
                }
                entries
            }
            (None, None) => None,
        };
        for (key, value) in entries.into_iter().flatten() {
            set(
                format!("{prefix}{key}"),
                String::from_utf8_lossy(&value).into_owned(),
                &mut vars,
            );
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => expand(value, &vars),
            (None, None) => String::new(),
            (None, Some(source)) => {
                let key = if let Some(r) = &source.config_map_key_ref {
                    Some(key_ref(
                        refs.config_map(&r.name),
                        &r.key,
                        r.optional.unwrap_or(false),
                        || EnvError::ConfigMapMissing {
                            name: r.name.clone(),
                        },
                        || EnvError::ConfigMapKeyMissing {
                            name: r.name.clone(),
                            key: r.key.clone(),
                        },
                    )?)
                } else {
                    source
                        .secret_key_ref
                        .as_ref()
                        .map(|r| {
                            key_ref(
                                refs.secret(&r.name),
                                &r.key,
                                r.optional.unwrap_or(false),
                                || EnvError::SecretMissing {
                                    name: r.name.clone(),
                                },
                                || EnvError::SecretKeyMissing {
                                    name: r.name.clone(),
                                    key: r.key.clone(),
                                },
                            )
                        })
                        .transpose()?
                };
                if let Some(value) = key {
                    // An optional reference that is not there sets nothing.
                    let Some(value) = value else { continue };
                    value
                } else if let Some(r) = &source.field_ref {
                    field(pod, &r.field_path, downward)?
                } else if let Some(r) = &source.resource_field_ref {
                    let target = match &r.container_name {
                        Some(name) if !name.is_empty() => pod
                            .spec
                            .iter()
                            .flat_map(|s| s.containers.iter())
                            .find(|c| &c.name == name)
                            .unwrap_or(container),
                        _ => container,
                    };
                    resource(
                        target,
                        &r.resource,
                        r.divisor.as_ref().map(|d| d.0.as_str()),
                        downward,
                    )?
                } else {
                    return Err(EnvError::NoSource {
                        name: var.name.clone(),
                    });
                }
            }
        };
        set(var.name.clone(), value, &mut vars);
    }
    if !vars.contains_key("PATH") {
        set("PATH".into(), super::spawn::DEFAULT_PATH.into(), &mut vars);
    }
    Ok(order
        .into_iter()
        .map(|name| {
            let value = vars[&name].clone();
            (name, value)
        })
        .collect())
}

/// A container's command and args, each expanded; a runtime with images
/// puts them in place of the image's entrypoint and cmd (as the CRI
/// does).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandLine {
    pub command: Vec<String>,
    pub args: Vec<String>,
}

impl CommandLine {
    pub fn of(container: &Container, env: &[(String, String)]) -> Self {
        let vars: BTreeMap<String, String> = env.iter().cloned().collect();
        let expanded = |words: Option<&Vec<String>>| -> Vec<String> {
            words
                .into_iter()
                .flatten()
                .map(|word| expand(word, &vars))
                .collect()
        };
        Self {
            command: expanded(container.command.as_ref()),
            args: expanded(container.args.as_ref()),
        }
    }

    /// What the process runtime runs: command then args. Empty without
    /// a command: args alone would go to an image's entrypoint, which
    /// the process runtime does not have.
    pub fn argv(&self) -> Vec<String> {
        if self.command.is_empty() {
            return Vec::new();
        }
        self.command.iter().chain(&self.args).cloned().collect()
    }
}

/// The pod's hostname as kubelet makes it: `spec.hostname` or the pod's
/// name, cut to 63 characters (the kernel's limit is 64) without a
/// trailing `-` or `.`.
pub fn hostname(pod: &Pod) -> String {
    let name = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default();
    let mut cut: String = name.chars().take(63).collect();
    while cut.ends_with('-') || cut.ends_with('.') {
        cut.pop();
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1",
                         "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{
                "name": "web",
                "resources": {"limits": {"memory": "64Mi"}, "requests": {"cpu": "250m"}},
                "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
                "env": [
                    {"name": "GREETING", "value": "hello"},
                    {"name": "MESSAGE", "value": "$(GREETING) from $(POD_NAME) $$(GREETING) $(NOPE)"},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
                    {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
                    {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                    {"name": "OPTIONAL", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": true}}}
                ],
                "command": ["echo", "$(MESSAGE)"],
                "args": ["$(APP)"]
            }]}
        }))
        .unwrap()
    }

    fn refs() -> Refs {
        let mut refs = Refs::default();
        refs.config_maps.insert(
            "settings".into(),
            Some(serde_json::from_value(json!({"data": {"level": "debug"}})).unwrap()),
        );
        refs.secrets.insert(
            "creds".into(),
            Some(serde_json::from_value(json!({"data": {"password": "c2VjcmV0"}})).unwrap()),
        );
        refs.secrets.insert("absent".into(), None);
        refs
    }

    #[test]
    fn the_environment_is_built_in_order_with_references_expanded() {
        let pod = pod();
        let container = &pod.spec.as_ref().unwrap().containers[0];
        let downward = Downward {
            pod_ip: "10.244.1.5".into(),
            ..Downward::default()
        };
        let env = environment(&pod, container, &refs(), &downward).unwrap();
        let get = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        assert_eq!(get("CFG_level"), Some("debug"));
        // POD_NAME is defined after MESSAGE, so it stays unexpanded.
        assert_eq!(
            get("MESSAGE"),
            Some("hello from $(POD_NAME) $(GREETING) $(NOPE)")
        );
        assert_eq!(get("POD_NAME"), Some("web-1"));
        assert_eq!(get("APP"), Some("web"));
        assert_eq!(get("IP"), Some("10.244.1.5"));
        assert_eq!(get("MEM_MI"), Some("64"));
        assert_eq!(get("CPU"), Some("250"));
        assert_eq!(get("PASSWORD"), Some("secret"));
        assert_eq!(get("OPTIONAL"), None);
        assert_eq!(get("HOSTNAME"), Some("web-1"));
        assert!(get("PATH").is_some());
        assert_eq!(
            CommandLine::of(container, &env).argv(),
            ["echo", "hello from $(POD_NAME) $(GREETING) $(NOPE)", "web"]
        );
        assert_eq!(
            Refs::wanted(&pod),
            (
                vec!["settings".into()],
                vec!["absent".into(), "creds".into()]
            )
        );
    }

    #[test]
    fn missing_references_are_errors_unless_optional() {
        let pod = pod();
        let container = &pod.spec.as_ref().unwrap().containers[0];
        let mut refs = refs();
        refs.secrets.insert("creds".into(), None);
        assert_eq!(
            environment(&pod, container, &refs, &Downward::default()),
            Err(EnvError::SecretMissing {
                name: "creds".into()
            })
        );
    }

    #[test]
    fn hostnames_are_cut_as_kubelet_cuts_them() {
        let long = format!("{}-x", "a".repeat(62));
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": long}})).unwrap();
        assert_eq!(hostname(&pod), "a".repeat(62));
        let named: Pod = serde_json::from_value(
            json!({"metadata": {"name": "p"}, "spec": {"hostname": "h", "containers": []}}),
        )
        .unwrap();
        assert_eq!(hostname(&named), "h");
    }

    #[test]
    fn args_without_a_command_have_nothing_to_run() {
        let container: Container =
            serde_json::from_value(json!({"name": "c", "args": ["sleep", "1"]})).unwrap();
        let line = CommandLine::of(&container, &[]);
        assert!(line.argv().is_empty());
        assert_eq!(line.args, ["sleep", "1"], "kept for an image's entrypoint");
    }

    #[test]
    fn expansion_follows_kubelets_rules() {
        let vars = BTreeMap::from([("A".to_string(), "1".to_string())]);
        assert_eq!(expand("$(A)-$$(A)-$(B)-$A-$", &vars), "1-$(A)-$(B)-$A-$");
        assert_eq!(expand("$(A", &vars), "$(A");
    }
}
