//! The cluster's network namespaces and links (see `layout`), made and
//! removed with iproute2's `ip`, the tool every node's own setup uses.
//! Every step checks first, so `up` on a half-built cluster finishes it.

use std::{
    fs,
    path::Path,
    process::{Command, Output},
};

use wharf_agent::ebpf::Dataplane;

use super::layout::{Layout, NodeLayout};

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// A command that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot run {program} (is iproute2 installed?): {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
}

fn run(program: &str, args: &[&str]) -> Result<Output, NetworkError> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| NetworkError::Spawn {
            program: program.into(),
            source,
        })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(NetworkError::Failed {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// `ip -n NS ARGS` (or `ip ARGS` in the host's namespace).
fn ip(netns: Option<&str>, args: &str) -> Result<Output, NetworkError> {
    let mut all = Vec::new();
    if let Some(netns) = netns {
        all.extend(["-n", netns]);
    }
    all.extend(args.split_whitespace());
    run("ip", &all)
}

pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn link_exists(netns: Option<&str>, name: &str) -> bool {
    ip(netns, &format!("link show dev {name}")).is_ok()
}

/// Makes namespace `name` with loopback up, unless it exists.
fn netns(name: &str) -> Result<(), NetworkError> {
    if !netns_exists(name) {
        run("ip", &["netns", "add", name])?;
    }
    ip(Some(name), "link set lo up")?;
    Ok(())
}

fn sysctl(netns: &str, key: &str, value: &str) -> Result<(), NetworkError> {
    run(
        "ip",
        &[
            "netns",
            "exec",
            netns,
            "sysctl",
            "-q",
            "-w",
            &format!("{key}={value}"),
        ],
    )?;
    Ok(())
}

/// Adds `address` to `device` unless it has it.
fn address(netns: Option<&str>, device: &str, address: &str) -> Result<(), NetworkError> {
    let shown = ip(netns, &format!("-4 -o addr show dev {device}"))?;
    if !String::from_utf8_lossy(&shown.stdout).contains(&format!(" {address} ")) {
        ip(netns, &format!("addr add {address} dev {device}"))?;
    }
    Ok(())
}

/// Has the kernel fill in checksums before a frame leaves `device`, as a
/// real wire's sender does: over veths a packet may cross with its L4
/// checksum left to "hardware", and a node's XDP program, which rewrites
/// it incrementally and sends it straight back out (NodePorts to other
/// nodes' pods), would pass on a wrong one.
fn checksums_in_software(netns: &str, device: &str) -> Result<(), NetworkError> {
    run(
        "ip",
        &["netns", "exec", netns, "ethtool", "-K", device, "tx", "off"],
    )?;
    Ok(())
}

/// Whether slot `slot` is in use on this host by anything (another
/// cluster, or someone's own route to its subnets).
pub fn slot_taken(layout: &Layout) -> Result<bool, NetworkError> {
    let routes = ip(None, "-4 route show")?;
    let routes = String::from_utf8_lossy(&routes.stdout);
    let uplink = format!("10.251.{}.", layout.slot);
    let underlay = format!("10.250.{}.", layout.slot);
    Ok(routes
        .lines()
        .any(|line| line.contains(&uplink) || line.contains(&underlay)))
}

/// The underlay: its namespace with the bridge the nodes hang off, and
/// the uplink from the host with the host's route to the nodes.
pub fn underlay(layout: &Layout) -> Result<(), NetworkError> {
    let ns = layout.underlay_netns();
    netns(&ns)?;
    sysctl(&ns, "net.ipv4.ip_forward", "1")?;
    if !link_exists(Some(&ns), "br0") {
        ip(Some(&ns), "link add br0 type bridge")?;
    }
    address(Some(&ns), "br0", &format!("{}/24", layout.gateway()))?;
    ip(Some(&ns), "link set br0 up")?;
    let host_link = layout.host_link();
    if !link_exists(None, &host_link) {
        ip(
            None,
            &format!("link add {host_link} type veth peer name uplink netns {ns}"),
        )?;
    }
    address(None, &host_link, &format!("{}/30", layout.host_address()))?;
    ip(None, &format!("link set {host_link} up"))?;
    address(
        Some(&ns),
        "uplink",
        &format!("{}/30", layout.uplink_address()),
    )?;
    ip(Some(&ns), "link set uplink up")?;
    checksums_in_software(&ns, "uplink")?;
    ip(
        None,
        &format!(
            "route replace {} via {}",
            layout.underlay_subnet(),
            layout.uplink_address()
        ),
    )?;
    Ok(())
}

/// A node's namespace, plugged into the underlay bridge as `eth0` with
/// its address and a default route through the underlay.
pub fn node(layout: &Layout, node: &NodeLayout) -> Result<(), NetworkError> {
    let underlay = layout.underlay_netns();
    netns(&node.netns)?;
    if !link_exists(Some(&node.netns), "eth0") {
        // A half-made pair from an interrupted run goes first.
        if link_exists(Some(&underlay), &node.short) {
            ip(Some(&underlay), &format!("link del {}", node.short))?;
        }
        ip(
            Some(&underlay),
            &format!(
                "link add {} type veth peer name eth0 netns {}",
                node.short, node.netns
            ),
        )?;
    }
    ip(
        Some(&underlay),
        &format!("link set {} master br0 up", node.short),
    )?;
    address(Some(&node.netns), "eth0", &format!("{}/24", node.address))?;
    ip(Some(&node.netns), "link set eth0 up")?;
    checksums_in_software(&underlay, &node.short)?;
    checksums_in_software(&node.netns, "eth0")?;
    ip(
        Some(&node.netns),
        &format!("route replace default via {}", layout.gateway()),
    )?;
    Ok(())
}

/// The underlay's name for its pass-through XDP programs' pins
/// (`<bpffs>/wharf/<cluster>-underlay`).
pub fn underlay_pins(name: &str) -> String {
    format!("{name}-underlay")
}

/// The dataplane with no services, by XDP, on the underlay's ports (see
/// `Dataplane::attach_passthrough`: a veth peer must run XDP to receive
/// a node's XDP_TX frames).
pub fn passthrough_xdp(layout: &Layout, ports: &[String]) -> Result<(), NetworkError> {
    let netns = Path::new("/run/netns").join(layout.underlay_netns());
    Dataplane::attach_passthrough(
        Path::new(BPFFS),
        &underlay_pins(&layout.name),
        &netns,
        ports,
    )
    .map_err(|error| NetworkError::Failed {
        command: format!("pass-through XDP in {}", layout.underlay_netns()),
        stderr: error.to_string(),
    })?;
    Ok(())
}

/// The namespaces of the cluster named `name` that exist, nodes first:
/// found by name, so a cluster whose state file is lost is removed too.
pub fn namespaces(name: &str) -> Vec<String> {
    let underlay = format!("wharf-{name}");
    let node_prefix = format!("{underlay}-n");
    let mut found: Vec<String> = fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|ns| {
            ns.strip_prefix(&node_prefix)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    found.sort();
    if netns_exists(&underlay) {
        found.push(underlay);
    }
    found
}

/// Deletes namespace `name` (its links go with it, and the routes
/// through them).
pub fn remove_netns(name: &str) -> Result<(), NetworkError> {
    if netns_exists(name) {
        run("ip", &["netns", "del", name])?;
    }
    Ok(())
}

/// Deletes a host link left behind (its peer's namespace is gone). The
/// kernel dismantles a deleted namespace in the background, taking the
/// link with it at some point: one that vanished while being deleted is
/// gone, as asked (seen in a software-emulated VM, where that takes
/// long enough to race).
pub fn remove_host_link(name: &str) -> Result<(), NetworkError> {
    if link_exists(None, name)
        && let Err(error) = ip(None, &format!("link del {name}"))
        && link_exists(None, name)
    {
        return Err(error);
    }
    Ok(())
}
