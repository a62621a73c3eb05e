//! A pod's sandbox in the process runtime: its network namespace
//! (`/run/netns/wharf-<uid>`, made and removed with `ip netns`, so `ip
//! netns exec` reaches pods for debugging) and its network, set up by
//! the CNI plugins of the node's configuration list exactly as a
//! container runtime calls them (libcni's rules: the first configuration
//! file in name order; ADD through the list with each result passed on
//! as `prevResult`, DEL in reverse with the cached ADD result).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{io::AsyncWriteExt as _, process::Command};

/// A plugin that has not answered in this long is killed and the call
/// failed (kubelet's CRI call timeout is 2 minutes for a whole sandbox).
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("ip netns {verb} {name}: {message}")]
    Namespace {
        verb: &'static str,
        name: String,
        message: String,
    },
    #[error("no CNI configuration in {dir}")]
    NoConfiguration { dir: PathBuf },
    #[error("reading CNI configuration {path}: {message}")]
    Configuration { path: PathBuf, message: String },
    #[error("CNI plugin {plugin} ({verb}): {message}")]
    Plugin {
        plugin: String,
        verb: &'static str,
        message: String,
    },
    #[error("CNI result has no IPv4 address: {0}")]
    NoAddress(String),
}

/// Where the node's CNI plugins and configuration are.
#[derive(Clone, Debug)]
pub struct CniPaths {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
}

/// A pod's sandbox: its network, as ADD left it (process runtime), or the
/// CRI runtime's sandbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sandbox {
    /// The CRI runtime's sandbox id; empty in the process runtime.
    #[serde(default)]
    pub id: String,
    pub netns: PathBuf,
    pub address: Ipv4Addr,
    /// The configuration list's name and version and the last plugin's
    /// result (DEL's `prevResult`).
    pub network: String,
    pub cni_version: String,
    pub result: Value,
}

impl Sandbox {
    /// A CRI runtime's sandbox `id`, whose pod has `address`: the runtime
    /// keeps its network to itself.
    pub fn of_runtime(id: String, address: Ipv4Addr) -> Self {
        Self {
            id,
            netns: PathBuf::new(),
            address,
            network: String::new(),
            cni_version: String::new(),
            result: Value::Null,
        }
    }
}

/// The namespace name of pod `uid`.
pub fn netns_name(uid: &str) -> String {
    format!("wharf-{uid}")
}

/// What every plugin of one call through the list gets.
struct Invocation {
    network: String,
    version: String,
    container_id: String,
    /// Empty once the namespace is gone (DEL must still work).
    netns: String,
    /// The CNI_ARGS a kubelet passes (plugins such as host-local and
    /// portmap read them).
    args: String,
}

/// The CNI version to call a list's plugins with: as libcni 1.2 does,
/// the highest of `cniVersions` this side speaks (1.1.0), else
/// `cniVersion`.
fn version(config: &Value) -> String {
    let listed = config["cniVersions"].as_array();
    if listed.is_some_and(|versions| versions.iter().any(|v| v == "1.1.0")) {
        return "1.1.0".into();
    }
    config["cniVersion"].as_str().unwrap_or("1.1.0").to_string()
}

impl Invocation {
    fn new(config: &Value, namespace: &str, name: &str, uid: &str, netns: &Path) -> Self {
        Self {
            network: config["name"].as_str().unwrap_or_default().to_string(),
            version: version(config),
            container_id: uid.to_string(),
            netns: if netns.exists() {
                netns.display().to_string()
            } else {
                String::new()
            },
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={uid};K8S_POD_UID={uid}"
            ),
        }
    }

    fn env(&self) -> [(&str, &str); 4] {
        [
            ("CNI_CONTAINERID", &self.container_id),
            ("CNI_NETNS", &self.netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", &self.args),
        ]
    }

    /// A plugin's entry as libcni hands it over: with the list's name
    /// and version, and the previous result.
    fn configuration(&self, plugin: &Value, previous: Option<&Value>) -> Value {
        let mut plugin = plugin.clone();
        plugin["name"] = Value::String(self.network.clone());
        plugin["cniVersion"] = Value::String(self.version.clone());
        if let Some(previous) = previous {
            plugin["prevResult"] = previous.clone();
        }
        plugin
    }
}

async fn ip_netns(verb: &'static str, name: &str) -> Result<(), SandboxError> {
    let error = |message: String| SandboxError::Namespace {
        verb,
        name: name.to_string(),
        message,
    };
    let output = Command::new("ip")
        .args(["netns", verb, name])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| error(e.to_string()))?;
    if output.status.success() {
        return Ok(());
    }
    Err(error(
        String::from_utf8_lossy(&output.stderr).trim().to_string(),
    ))
}

/// The configuration list libcni would pick: the first `.conflist` (or
/// single-plugin `.conf`/`.json`) in name order.
fn load_configuration(dir: &Path) -> Result<(PathBuf, Value), SandboxError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|_| SandboxError::NoConfiguration {
            dir: dir.to_path_buf(),
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
        })
        .collect();
    files.sort();
    let path = files
        .into_iter()
        .next()
        .ok_or_else(|| SandboxError::NoConfiguration {
            dir: dir.to_path_buf(),
        })?;
    let error = |message: String| SandboxError::Configuration {
        path: path.clone(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| error(e.to_string()))?;
    let mut config: Value = serde_json::from_str(&text).map_err(|e| error(e.to_string()))?;
    if config.get("plugins").is_none() {
        // A single-plugin .conf is a list of one.
        let plugin = config.clone();
        config = serde_json::json!({
            "name": plugin["name"],
            "cniVersion": plugin["cniVersion"],
            "plugins": [plugin],
        });
    }
    if config["plugins"].as_array().is_none_or(Vec::is_empty) {
        return Err(error("no plugins".into()));
    }
    Ok((path, config))
}

/// Calls one plugin.
async fn call(
    paths: &CniPaths,
    verb: &'static str,
    plugin: &Value,
    env: &[(&str, &str)],
) -> Result<Value, SandboxError> {
    let kind = plugin["type"].as_str().unwrap_or_default().to_string();
    let error = |message: String| SandboxError::Plugin {
        plugin: kind.clone(),
        verb,
        message,
    };
    if kind.is_empty() || kind.contains('/') {
        return Err(error("the configuration names no plugin type".into()));
    }
    let mut child = Command::new(paths.bin_dir.join(&kind))
        .env_clear()
        // As libcni: the runtime's environment goes along (plugins that
        // run iptables need PATH).
        .envs(std::env::vars_os().filter(|(k, _)| !k.to_string_lossy().starts_with("CNI_")))
        .env("CNI_COMMAND", verb)
        .env("CNI_PATH", &paths.bin_dir)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| error(format!("{}: {e}", paths.bin_dir.join(&kind).display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(plugin.to_string().as_bytes())
            .await
            .map_err(|e| error(format!("writing its configuration: {e}")))?;
    }
    let output = tokio::time::timeout(PLUGIN_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| error(format!("no answer in {PLUGIN_TIMEOUT:?}")))?
        .map_err(|e| error(e.to_string()))?;
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    if !output.status.success() {
        // The spec's error object: msg and details.
        let message = match (&answer["msg"], &answer["details"]) {
            (Value::String(msg), Value::String(details)) if !details.is_empty() => {
                format!("{msg}: {details}")
            }
            (Value::String(msg), _) => msg.clone(),
            _ => String::from_utf8_lossy(&output.stderr).trim().to_string(),
        };
        return Err(error(message));
    }
    Ok(answer)
}

/// The first IPv4 address of a CNI result.
fn first_address(result: &Value) -> Option<Ipv4Addr> {
    result["ips"]
        .as_array()?
        .iter()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .next()
}

/// The sandbox of a `hostNetwork` pod: the node's own namespace (the
/// agent's, opened when a container starts) and address; no CNI.
pub fn host(node_ip: &str) -> Result<Sandbox, SandboxError> {
    let address = node_ip.parse().map_err(|_| {
        SandboxError::NoAddress(format!("the node has no IPv4 address ({node_ip:?})"))
    })?;
    Ok(Sandbox {
        id: String::new(),
        netns: PathBuf::from("/proc/self/ns/net"),
        address,
        network: String::new(),
        cni_version: String::new(),
        result: Value::Null,
    })
}

/// Creates pod `uid`'s namespace and network; a failed ADD is undone
/// (DEL through the list) before the error is returned, so a retry
/// starts clean and leaks no address.
pub async fn create(
    paths: &CniPaths,
    namespace: &str,
    name: &str,
    uid: &str,
) -> Result<Sandbox, SandboxError> {
    let (_, config) = load_configuration(&paths.conf_dir)?;
    let netns_name = netns_name(uid);
    let netns = PathBuf::from("/run/netns").join(&netns_name);
    if !netns.exists() {
        ip_netns("add", &netns_name).await?;
    }
    let call_for = Invocation::new(&config, namespace, name, uid, &netns);
    let added = async {
        let mut previous: Option<Value> = None;
        for plugin in config["plugins"].as_array().into_iter().flatten() {
            let plugin = call_for.configuration(plugin, previous.as_ref());
            previous = Some(call(paths, "ADD", &plugin, &call_for.env()).await?);
        }
        let result = previous.unwrap_or(Value::Null);
        let address =
            first_address(&result).ok_or_else(|| SandboxError::NoAddress(result.to_string()))?;
        Ok::<_, SandboxError>((result, address))
    }
    .await;
    let (result, address) = match added {
        Ok(added) => added,
        Err(error) => {
            let _ = delete_network(paths, namespace, name, uid, None).await;
            return Err(error);
        }
    };
    Ok(Sandbox {
        id: String::new(),
        netns,
        address,
        network: call_for.network,
        cni_version: call_for.version,
        result,
    })
}

/// Undoes pod `uid`'s network (CNI DEL through the list, in reverse);
/// done twice, it does nothing the second time (DEL is idempotent by
/// the spec). Without a configuration there is nothing a DEL could
/// undo: the plugins that ADDed went with it.
pub async fn delete_network(
    paths: &CniPaths,
    namespace: &str,
    name: &str,
    uid: &str,
    sandbox: Option<&Sandbox>,
) -> Result<(), SandboxError> {
    // A hostNetwork pod was never ADDed.
    if sandbox.is_some_and(|s| s.network.is_empty()) {
        return Ok(());
    }
    let Ok((_, config)) = load_configuration(&paths.conf_dir) else {
        return Ok(());
    };
    let netns = PathBuf::from("/run/netns").join(netns_name(uid));
    let call_for = Invocation::new(&config, namespace, name, uid, &netns);
    let previous = sandbox
        .filter(|s| s.network == call_for.network)
        .map(|s| &s.result);
    let plugins: Vec<Value> = config["plugins"].as_array().cloned().unwrap_or_default();
    for plugin in plugins.iter().rev() {
        let plugin = call_for.configuration(plugin, previous);
        call(paths, "DEL", &plugin, &call_for.env()).await?;
    }
    Ok(())
}

/// Removes pod `uid`'s network namespace (and with it the pod's end of
/// every link in it).
pub async fn remove_namespace(uid: &str) -> Result<(), SandboxError> {
    let name = netns_name(uid);
    if PathBuf::from("/run/netns").join(&name).exists() {
        ip_netns("delete", &name).await?;
    }
    Ok(())
}

/// Removes pod `uid`'s network, then its namespace. A failed DEL keeps
/// the namespace, so the DEL can be retried.
pub async fn remove(
    paths: &CniPaths,
    namespace: &str,
    name: &str,
    uid: &str,
    sandbox: Option<&Sandbox>,
) -> Result<(), SandboxError> {
    delete_network(paths, namespace, name, uid, sandbox).await?;
    remove_namespace(uid).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_configuration_in_name_order_is_used() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("20-other.conflist"),
            r#"{"name": "other", "cniVersion": "1.0.0", "plugins": [{"type": "x"}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("10-single.conf"),
            r#"{"name": "single", "cniVersion": "0.4.0", "type": "wharf-cni"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("00-ignored.txt"), "not a configuration").unwrap();
        let (path, config) = load_configuration(dir.path()).unwrap();
        assert!(path.ends_with("10-single.conf"));
        assert_eq!(config["name"], "single");
        assert_eq!(config["plugins"][0]["type"], "wharf-cni");
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_configuration(empty.path()),
            Err(SandboxError::NoConfiguration { .. })
        ));
    }

    #[test]
    fn the_highest_listed_version_is_spoken() {
        let both = serde_json::json!({"cniVersion": "1.0.0", "cniVersions": ["1.0.0", "1.1.0"]});
        assert_eq!(version(&both), "1.1.0");
        let old = serde_json::json!({"cniVersion": "0.4.0"});
        assert_eq!(version(&old), "0.4.0");
    }

    #[test]
    fn results_give_their_first_ipv4_address() {
        let result = serde_json::json!({"ips": [{"address": "10.244.1.7/32"}]});
        assert_eq!(first_address(&result), Some(Ipv4Addr::new(10, 244, 1, 7)));
        assert_eq!(first_address(&serde_json::json!({})), None);
    }
}
