//! wharf-agent: the node agent. Today: the service proxy in four modes
//! (eBPF, iptables, nftables, IPVS), driven by an API server's Services
//! and EndpointSlices or, in standalone mode, by manifests; the node's
//! registration (Node object, Lease, conditions); and the pod network:
//! IPAM behind the agent API, the CNI plugin's install and pod wiring,
//! routes to other nodes' pods (native or through a VXLAN overlay) and
//! egress masquerading; and the kubelet
//! role, which runs the pods bound to the node (process runtime).

pub mod agent_api;
pub mod bootstrap;
pub mod cluster;
pub mod cni_install;
pub mod conntrack;
pub mod ebpf;
pub mod egress;
pub mod files;
pub mod host;
pub mod ipam;
pub mod iptables;
pub mod ipvs;
pub mod kubelet;
pub mod manifest;
pub mod mode;
pub mod netdev;
pub mod netlink;
pub mod nftables;
pub mod podnet;
pub mod proxy;
pub mod registration;
pub mod routes;
pub mod standalone;
pub mod sync;
pub mod telemetry;
pub mod vxlan;
