//! Choosing a proxy mode, and removing what the other modes left on the
//! node, so switching modes (agent restarts with another `--proxy-mode`)
//! never leaves two modes translating the same traffic.

use std::{net::Ipv4Addr, path::Path};

use aya::{programs::ProgramType, sys::BpfHelper};
use tracing::info;

use crate::{
    ebpf::Dataplane,
    host::{self, Host},
    iptables::{self, Flavor},
    ipvs, nftables,
};

/// A mode the agent runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Ebpf,
    Iptables(Flavor),
    Nftables,
    Ipvs,
}

/// `auto`: eBPF where the kernel has what the datapath needs, then
/// nftables, then iptables (IPVS only when asked for, as with
/// kube-proxy). Returns the mode and why.
pub fn choose(host: &impl Host) -> (Mode, String) {
    match ebpf_support() {
        Ok(()) => {
            return (
                Mode::Ebpf,
                "the kernel supports XDP, TC, cgroup socket programs and BTF".into(),
            );
        }
        Err(missing) => info!(%missing, "eBPF mode unavailable"),
    }
    if host::installed("nft") && host.run("nft", &["list", "tables"], None).is_ok() {
        return (Mode::Nftables, "no eBPF support; nft works".into());
    }
    match Flavor::detect(host) {
        Ok((flavor, why)) => (
            Mode::Iptables(flavor),
            format!("neither eBPF nor nftables; iptables {flavor:?}: {why}"),
        ),
        Err(e) => (
            Mode::Iptables(Flavor::Nft),
            format!("neither eBPF nor nftables, and iptables detection failed ({e})"),
        ),
    }
}

/// What the eBPF datapath needs from the kernel, or what is missing.
fn ebpf_support() -> Result<(), String> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err("no kernel BTF (/sys/kernel/btf/vmlinux)".into());
    }
    for (program, name) in [
        (ProgramType::Xdp, "XDP"),
        (ProgramType::SchedClassifier, "TC"),
        (ProgramType::CgroupSockAddr, "cgroup socket address"),
    ] {
        match aya::sys::is_program_supported(program) {
            Ok(true) => {}
            Ok(false) => return Err(format!("no {name} programs")),
            Err(e) => return Err(format!("probing {name} programs: {e}")),
        }
    }
    // Socket-LB refuses connections to empty services with it (>= 5.18).
    match aya::sys::is_helper_supported(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_set_retval)
    {
        Ok(true) => Ok(()),
        Ok(false) => Err("no bpf_set_retval for cgroup socket programs (kernel < 5.18)".into()),
        Err(e) => Err(format!("probing bpf_set_retval: {e}")),
    }
}

/// Removes every mode's state from this node but `keep`'s (in iptables
/// mode, the other flavor's rules go too). `None` removes everything.
/// IPVS NodePort virtual servers are found by `node_addresses`.
pub fn remove_state(
    keep: Option<Mode>,
    host: &impl Host,
    bpffs: &Path,
    node: &str,
    node_addresses: &[Ipv4Addr],
) -> Result<(), CleanupError> {
    if keep != Some(Mode::Ebpf) {
        let pins = Dataplane::pin_dir(bpffs, node);
        if pins.exists() {
            Dataplane::teardown(bpffs, node).map_err(|source| CleanupError::Ebpf { source })?;
            info!(pins = %pins.display(), "removed the eBPF mode's programs and maps");
        }
    }
    for flavor in [Flavor::Nft, Flavor::Legacy] {
        if keep == Some(Mode::Iptables(flavor)) || !host::installed(flavor.save()) {
            continue;
        }
        if iptables::remove(host, flavor).map_err(|e| CleanupError::Rules {
            mode: "iptables",
            reason: e.to_string(),
        })? {
            info!(?flavor, "removed the iptables mode's rules");
        }
    }
    if keep != Some(Mode::Nftables)
        && host::installed("nft")
        && nftables::remove(host).map_err(|e| CleanupError::Rules {
            mode: "nftables",
            reason: e.to_string(),
        })?
    {
        info!("removed the nftables mode's table");
    }
    if keep != Some(Mode::Ipvs)
        && ipvs::remove(host, node_addresses).map_err(|e| CleanupError::Rules {
            mode: "ipvs",
            reason: e.to_string(),
        })?
    {
        info!("removed the IPVS mode's virtual servers, device and table");
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("removing the eBPF mode's pins: {source}")]
    Ebpf {
        #[source]
        source: std::io::Error,
    },
    #[error("removing the {mode} mode's rules: {reason}")]
    Rules { mode: &'static str, reason: String },
}
