//! wharf-agent: the node agent. Today: the eBPF service proxy, driven by
//! manifests in standalone mode.

pub mod ebpf;
pub mod manifest;
pub mod netdev;
pub mod proxy;
pub mod standalone;
