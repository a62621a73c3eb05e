//! The CNI protocol as the spec (1.1) defines it: the environment a
//! runtime calls a plugin with, the network configuration on stdin,
//! results and errors on stdout, and version negotiation.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Value, json};

/// The versions this plugin speaks, oldest first; results are written in
/// the shape of the version the configuration asks for.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The latest version, used when the input does not say.
pub const LATEST: &str = "1.1.0";

/// The spec's well-known error codes (section "Error").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// STATUS: the plugin cannot set up new containers.
    NotAvailable = 50,
    /// Plugin-specific (100 and up): the node's pod addresses ran out.
    PoolExhausted = 100,
    /// Plugin-specific: wiring the pod's interface failed.
    Wiring = 101,
    /// Plugin-specific: CHECK found the attachment not as ADD left it.
    CheckFailed = 102,
}

/// A CNI error, written to stdout as the spec's error object.
#[derive(Debug, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "code": self.code as u32,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// The verbs of CNI 1.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            _ => return None,
        })
    }

    /// The first spec version with this verb.
    fn since(self) -> &'static str {
        match self {
            Self::Add | Self::Del | Self::Version => "0.3.0",
            Self::Check => "0.4.0",
            Self::Gc | Self::Status => "1.1.0",
        }
    }
}

/// What the runtime passes in the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
}

impl Invocation {
    /// Reads and checks the variables `command` needs (`CNI_CONTAINERID`
    /// and `CNI_IFNAME` for ADD, DEL and CHECK, `CNI_NETNS` for ADD and
    /// CHECK).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let missing = |name: &str| {
            CniError::new(
                Code::InvalidEnvironment,
                "invalid necessary environment variables",
                format!("{name} is not set"),
            )
        };
        let command_text = var("CNI_COMMAND").ok_or_else(|| missing("CNI_COMMAND"))?;
        let command = Command::parse(&command_text).ok_or_else(|| {
            CniError::new(
                Code::InvalidEnvironment,
                "invalid necessary environment variables",
                format!("CNI_COMMAND {command_text:?} is not a CNI verb"),
            )
        })?;
        let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let required = |name: &str| match var(name).filter(|v| !v.is_empty()) {
            Some(value) => Ok(value),
            None if per_container => Err(missing(name)),
            None => Ok(String::new()),
        };
        let container_id = required("CNI_CONTAINERID")?;
        let ifname = required("CNI_IFNAME")?;
        let netns = var("CNI_NETNS")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        if netns.is_none() && matches!(command, Command::Add | Command::Check) {
            return Err(missing("CNI_NETNS"));
        }
        let bad_name = ifname.len() > 15
            || ifname == "."
            || ifname == ".."
            || ifname
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace());
        if per_container && bad_name {
            return Err(CniError::new(
                Code::InvalidEnvironment,
                "invalid necessary environment variables",
                format!("CNI_IFNAME {ifname:?} is not a Linux interface name"),
            ));
        }
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
        })
    }
}

/// One attachment a GC must keep.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration on stdin: the conflist's entry for this
/// plugin, with `name` and `cniVersion` filled in by the runtime.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    /// The pods' interface MTU (default 1500).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The agent's API socket.
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// GC: the attachments to keep (libcni's drafts called the key
    /// `cni.dev/attachments`). Other keys (`type`, `runtimeConfig`,
    /// `args`, ...) are not this plugin's concern and are ignored.
    #[serde(
        default,
        rename = "cni.dev/valid-attachments",
        alias = "cni.dev/attachments"
    )]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

impl NetConf {
    /// Parses and checks a configuration for `command`.
    pub fn parse(bytes: &[u8], command: Command) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(bytes).map_err(|e| {
            let code = if e.is_data() {
                Code::InvalidConfig
            } else {
                Code::Decode
            };
            CniError::new(code, "cannot read the network configuration", e.to_string())
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(incompatible(&conf.cni_version));
        }
        if version_key(&conf.cni_version) < version_key(command.since()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                "incompatible CNI version",
                format!(
                    "{command:?} needs CNI {} or later; the configuration is {}",
                    command.since(),
                    conf.cni_version
                ),
            ));
        }
        // Without the list, GC would take every attachment for a leak.
        if command == Command::Gc && conf.valid_attachments.is_none() {
            return Err(CniError::new(
                Code::InvalidConfig,
                "invalid network configuration",
                "GC needs cni.dev/valid-attachments",
            ));
        }
        if conf.name.is_empty() {
            return Err(CniError::new(
                Code::InvalidConfig,
                "invalid network configuration",
                "name is empty",
            ));
        }
        if conf.mtu.is_some_and(|mtu| !(68..=65_535).contains(&mtu)) {
            return Err(CniError::new(
                Code::InvalidConfig,
                "invalid network configuration",
                format!("mtu {} is not in 68..=65535", conf.mtu.unwrap_or_default()),
            ));
        }
        Ok(conf)
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.agent_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(wharf_proto::DEFAULT_SOCKET))
    }
}

pub fn incompatible(version: &str) -> CniError {
    CniError::new(
        Code::IncompatibleVersion,
        "incompatible CNI version",
        format!(
            "{version:?} is not one of {}",
            SUPPORTED_VERSIONS.join(", ")
        ),
    )
}

/// Orders versions numerically ("0.10.0" after "0.4.0").
fn version_key(version: &str) -> Vec<u32> {
    version
        .split('.')
        .map(|part| part.parse().unwrap_or(0))
        .collect()
}

/// VERSION's answer, in the input's `cniVersion` (the latest if none).
pub fn version_info(stdin: &[u8]) -> Value {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .unwrap_or_else(|| LATEST.to_string());
    json!({ "cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS })
}

/// What ADD set up, to be written as a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub host_ifname: String,
    pub host_mac: Option<String>,
    pub pod_ifname: String,
    pub pod_mac: Option<String>,
    pub sandbox: PathBuf,
    /// CIDR notation, as configured on the pod's interface.
    pub address: String,
    pub gateway: String,
    pub mtu: u32,
}

/// A result in the shape of `version`: 0.3.x and 0.4.0 name each IP's
/// family in `version`; 1.x does not.
pub fn result(version: &str, attached: &Attached) -> Value {
    let interface = |name: &str, mac: &Option<String>, sandbox: Option<&PathBuf>| {
        let mut interface = json!({ "name": name, "mtu": attached.mtu });
        if let Some(mac) = mac {
            interface["mac"] = json!(mac);
        }
        if let Some(sandbox) = sandbox {
            interface["sandbox"] = json!(sandbox);
        }
        interface
    };
    let mut ip = json!({
        "address": attached.address,
        "gateway": attached.gateway,
        "interface": 1,
    });
    if version_key(version) < version_key("1.0.0") {
        ip["version"] = json!("4");
    }
    json!({
        "cniVersion": version,
        "interfaces": [
            interface(&attached.host_ifname, &attached.host_mac, None),
            interface(&attached.pod_ifname, &attached.pod_mac, Some(&attached.sandbox)),
        ],
        "ips": [ip],
        "routes": [{ "dst": "0.0.0.0/0", "gw": attached.gateway }],
        "dns": {},
    })
}

/// The pod's address in a previous result (CHECK): the first IPv4 one.
pub fn previous_address(prev_result: &Value) -> Option<std::net::Ipv4Addr> {
    prev_result["ips"].as_array()?.iter().find_map(|ip| {
        let address = ip["address"].as_str()?;
        address.split('/').next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_environment_is_checked_per_verb() {
        let add = Invocation::from_env(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/p"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap();
        assert_eq!(add.command, Command::Add);
        let error = Invocation::from_env(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap_err();
        assert_eq!(error.code, Code::InvalidEnvironment);
        assert!(error.details.contains("CNI_NETNS"), "{error}");
        // DEL without a namespace is fine (it may be gone); GC needs none
        // of the per-container variables.
        assert!(
            Invocation::from_env(env(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
            ]))
            .is_ok()
        );
        assert!(Invocation::from_env(env(&[("CNI_COMMAND", "GC")])).is_ok());
        let error = Invocation::from_env(env(&[("CNI_COMMAND", "FROB")])).unwrap_err();
        assert_eq!(error.code, Code::InvalidEnvironment);
    }

    #[test]
    fn configurations_are_checked_for_version_and_shape() {
        let conf = br#"{"cniVersion":"1.1.0","name":"wharf","type":"wharf-cni","mtu":1450,"runtimeConfig":{}}"#;
        let parsed = NetConf::parse(conf, Command::Add).unwrap();
        assert_eq!(parsed.mtu, Some(1450));

        let old = br#"{"cniVersion":"0.3.1","name":"wharf","type":"wharf-cni"}"#;
        assert!(NetConf::parse(old, Command::Add).is_ok());
        let error = NetConf::parse(old, Command::Status).unwrap_err();
        assert_eq!(error.code, Code::IncompatibleVersion);

        let error = NetConf::parse(
            br#"{"cniVersion":"9.9.9","name":"wharf","type":"wharf-cni"}"#,
            Command::Add,
        )
        .unwrap_err();
        assert_eq!(error.code, Code::IncompatibleVersion);
        let gc = br#"{"cniVersion":"1.1.0","name":"wharf","type":"wharf-cni"}"#;
        let error = NetConf::parse(gc, Command::Gc).unwrap_err();
        assert_eq!(error.code, Code::InvalidConfig, "no list, no GC");
        let error = NetConf::parse(b"{not json", Command::Add).unwrap_err();
        assert_eq!(error.code, Code::Decode);
        let error = NetConf::parse(br#"{"cniVersion":"1.0.0"}"#, Command::Add).unwrap_err();
        assert_eq!(error.code, Code::InvalidConfig);
    }

    #[test]
    fn results_take_the_shape_of_the_requested_version() {
        let attached = Attached {
            host_ifname: "wh0123".into(),
            host_mac: Some("aa:bb:cc:dd:ee:ff".into()),
            pod_ifname: "eth0".into(),
            pod_mac: None,
            sandbox: "/run/netns/p".into(),
            address: "10.244.1.5/32".into(),
            gateway: "10.244.1.1".into(),
            mtu: 1500,
        };
        let new = result("1.1.0", &attached);
        assert_eq!(new["ips"][0]["interface"], 1);
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["interfaces"][1]["sandbox"], "/run/netns/p");
        let old = result("0.4.0", &attached);
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(
            previous_address(&new),
            Some(std::net::Ipv4Addr::new(10, 244, 1, 5))
        );
    }
}
