//! Desired states for tests, built directly (no manifests).

use std::net::{Ipv4Addr, SocketAddrV4};

use wharf_agent::proxy::{
    Backend, BackendState, DesiredState, Frontend, FrontendKey, FrontendKind, Protocol,
    ServicePortName, TrafficPolicy,
};

/// Adds a frontend at `address:port` forwarding to `backends`.
pub fn add(
    state: &mut DesiredState,
    kind: FrontendKind,
    address: Ipv4Addr,
    port: u16,
    protocol: Protocol,
    backends: &[(SocketAddrV4, BackendState)],
) {
    let key = FrontendKey {
        address,
        port,
        protocol,
    };
    let mut backends: Vec<Backend> = backends
        .iter()
        .map(|(addr, state)| Backend {
            address: *addr.ip(),
            port: addr.port(),
            state: *state,
        })
        .collect();
    backends.sort();
    let service = ServicePortName {
        namespace: "test".into(),
        name: format!("svc-{address}-{port}"),
        port: String::new(),
    };
    state.frontends.insert(
        key,
        Frontend {
            kind,
            service,
            backends,
            affinity_timeout: None,
            policy: TrafficPolicy::Cluster,
        },
    );
}

/// Backends that are all ready.
pub fn ready(addrs: &[SocketAddrV4]) -> Vec<(SocketAddrV4, BackendState)> {
    addrs.iter().map(|a| (*a, BackendState::Active)).collect()
}

/// The `n`th address from `base` (`base + n`).
pub fn nth(base: Ipv4Addr, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + n)
}

/// Adds `count` ClusterIPs (10.100.0.0 upwards, port 80/TCP), each with
/// `backends` (at most 16) ready backends of its own (10.200.0.0 upwards,
/// 16 addresses per service, port 8080): load for benchmarks.
pub fn add_cluster_ips(state: &mut DesiredState, count: u32, backends: u32) {
    for s in 0..count {
        let addrs: Vec<SocketAddrV4> = (0..backends)
            .map(|b| SocketAddrV4::new(nth(Ipv4Addr::new(10, 200, 0, 0), s * 16 + b), 8080))
            .collect();
        let vip = nth(Ipv4Addr::new(10, 100, 0, 0), s);
        add(
            state,
            FrontendKind::ClusterIp,
            vip,
            80,
            Protocol::Tcp,
            &ready(&addrs),
        );
    }
}
