//! Desired states for tests, built directly (no manifests).

use std::net::{Ipv4Addr, SocketAddrV4};

use wharf_agent::proxy::{
    Backend, BackendState, DesiredState, Frontend, FrontendKey, FrontendKind, Protocol,
    ServicePortName,
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
        },
    );
}

/// Backends that are all ready.
pub fn ready(addrs: &[SocketAddrV4]) -> Vec<(SocketAddrV4, BackendState)> {
    addrs.iter().map(|a| (*a, BackendState::Active)).collect()
}
