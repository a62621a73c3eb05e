//! What a sync must rewrite, for the modes that program whole rules per
//! frontend (iptables, nftables, IPVS): the frontends that differ from
//! what was last programmed, and the UDP flows whose backend went away.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
};

use super::{DesiredState, Frontend, FrontendKey, Protocol, SyncStats};

/// What was last programmed in full, frontend by frontend.
pub type Programmed = BTreeMap<FrontendKey, Frontend>;

/// The difference between what is programmed and what is desired.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// New frontends and frontends whose programming differs.
    pub changed: BTreeSet<FrontendKey>,
    /// Frontends to remove.
    pub removed: BTreeSet<FrontendKey>,
}

impl Changes {
    pub fn between(programmed: &Programmed, desired: &DesiredState) -> Self {
        let changed = desired
            .frontends
            .iter()
            .filter(|(key, frontend)| programmed.get(key) != Some(frontend))
            .map(|(key, _)| *key)
            .collect();
        let removed = programmed
            .keys()
            .filter(|key| !desired.frontends.contains_key(key))
            .copied()
            .collect();
        Self { changed, removed }
    }

    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }
}

/// UDP flows conntrack must forget. A UDP "connection" lives as long as
/// its client keeps sending, so one translated to a backend that is gone
/// would black-hole that client for good (kube-proxy's longest-running
/// bug class).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct StaleUdp {
    pub frontend: FrontendKey,
    /// Flows translated to this backend; None: every flow to the frontend
    /// (it had no backends, so any flow there is a leftover of a rejected
    /// or unanswered packet that would otherwise keep its old verdict).
    pub backend: Option<SocketAddrV4>,
}

/// The UDP flows to forget after programming `desired` over `programmed`:
/// those to backends that no longer take new flows (removed, or now
/// terminating: UDP has no connection to let finish), and the untranslated
/// flows to a frontend that had no backends (or was not programmed: a new
/// service, or the first sync after a restart) and now has some.
pub fn stale_udp(programmed: &Programmed, desired: &DesiredState) -> Vec<StaleUdp> {
    let mut stale: Vec<StaleUdp> = desired
        .frontends
        .iter()
        .filter(|(key, frontend)| {
            key.protocol == Protocol::Udp
                && !programmed.contains_key(key)
                && frontend.active().next().is_some()
        })
        .map(|(key, _)| StaleUdp {
            frontend: *key,
            backend: None,
        })
        .collect();
    for (key, before) in programmed {
        if key.protocol != Protocol::Udp {
            continue;
        }
        let now: BTreeSet<SocketAddrV4> = desired
            .frontends
            .get(key)
            .map(|f| {
                f.active()
                    .map(|b| SocketAddrV4::new(b.address, b.port))
                    .collect()
            })
            .unwrap_or_default();
        let had: BTreeSet<SocketAddrV4> = before
            .active()
            .map(|b| SocketAddrV4::new(b.address, b.port))
            .collect();
        if had.is_empty() && !now.is_empty() {
            stale.push(StaleUdp {
                frontend: *key,
                backend: None,
            });
        }
        stale.extend(had.difference(&now).map(|backend| StaleUdp {
            frontend: *key,
            backend: Some(*backend),
        }));
    }
    stale
}

/// After `desired` was written in full: counts what changed into
/// `stats`, queues the UDP flows to forget, and remembers `desired` as
/// what is programmed.
pub fn commit(
    programmed: &mut Programmed,
    stale: &mut StaleFlows,
    changes: &Changes,
    desired: &DesiredState,
    stats: &mut SyncStats,
) {
    for key in &changes.changed {
        match programmed.get(key) {
            Some(_) => stats.frontends_updated += 1,
            None => stats.frontends_added += 1,
        }
    }
    stats.frontends_removed = changes.removed.len();
    stale.add(stale_udp(programmed, desired));
    *programmed = desired.frontends.clone();
}

/// UDP flows waiting to be forgotten. A failure to forget (conntrack
/// unavailable) is logged and retried at the next sync rather than failing
/// it: the rules are in place either way.
#[derive(Debug, Default)]
pub struct StaleFlows {
    pending: BTreeSet<StaleUdp>,
}

impl StaleFlows {
    pub fn add(&mut self, stale: Vec<StaleUdp>) {
        self.pending.extend(stale);
    }

    /// Forgets the pending flows through `host`; returns how many entries
    /// went.
    pub fn forget(&mut self, host: &impl crate::host::Host) -> usize {
        if self.pending.is_empty() {
            return 0;
        }
        let pending: Vec<StaleUdp> = self.pending.iter().copied().collect();
        match host.forget_udp(&pending) {
            Ok(forgotten) => {
                self.pending.clear();
                forgotten
            }
            Err(e) => {
                tracing::warn!(error = %e, flows = pending.len(), "forgetting stale UDP flows failed; retrying at the next sync");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::proxy::{Backend, BackendState, FrontendKind, ServicePortName, TrafficPolicy};

    fn frontend(backends: &[(u8, BackendState)]) -> Frontend {
        Frontend {
            kind: FrontendKind::ClusterIp,
            service: ServicePortName::default(),
            backends: backends
                .iter()
                .map(|(host, state)| Backend {
                    address: Ipv4Addr::new(10, 0, 0, *host),
                    port: 53,
                    state: *state,
                })
                .collect(),
            affinity_timeout: None,
            policy: TrafficPolicy::Cluster,
        }
    }

    fn key(last: u8, protocol: Protocol) -> FrontendKey {
        FrontendKey {
            address: Ipv4Addr::new(10, 96, 0, last),
            port: 53,
            protocol,
        }
    }

    #[test]
    fn changes_name_new_different_and_removed_frontends() {
        use BackendState::Active;
        let programmed: Programmed = [
            (key(1, Protocol::Tcp), frontend(&[(1, Active)])),
            (key(2, Protocol::Tcp), frontend(&[(1, Active)])),
            (key(3, Protocol::Tcp), frontend(&[(1, Active)])),
        ]
        .into();
        let mut desired = DesiredState::default();
        desired
            .frontends
            .insert(key(1, Protocol::Tcp), frontend(&[(1, Active)]));
        desired
            .frontends
            .insert(key(2, Protocol::Tcp), frontend(&[(2, Active)]));
        desired
            .frontends
            .insert(key(4, Protocol::Tcp), frontend(&[(1, Active)]));
        let changes = Changes::between(&programmed, &desired);
        assert_eq!(
            changes.changed,
            [key(2, Protocol::Tcp), key(4, Protocol::Tcp)].into()
        );
        assert_eq!(changes.removed, [key(3, Protocol::Tcp)].into());
        let programmed: Programmed = desired.frontends.clone();
        assert!(Changes::between(&programmed, &desired).is_empty());
    }

    #[test]
    fn stale_udp_flows_are_those_of_gone_backends_and_revived_frontends() {
        use BackendState::{Active, Terminating};
        let programmed: Programmed = [
            (key(1, Protocol::Udp), frontend(&[(1, Active), (2, Active)])),
            (key(2, Protocol::Udp), frontend(&[])),
            (key(3, Protocol::Udp), frontend(&[(1, Active)])),
            (key(4, Protocol::Tcp), frontend(&[(1, Active)])),
        ]
        .into();
        let mut desired = DesiredState::default();
        desired.frontends.insert(
            key(1, Protocol::Udp),
            frontend(&[(1, Active), (2, Terminating)]),
        );
        desired
            .frontends
            .insert(key(2, Protocol::Udp), frontend(&[(3, Active)]));
        desired
            .frontends
            .insert(key(5, Protocol::Udp), frontend(&[(4, Active)]));
        let backend = |host| Some(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, host), 53));
        assert_eq!(
            stale_udp(&programmed, &desired),
            [
                StaleUdp {
                    frontend: key(5, Protocol::Udp),
                    backend: None
                },
                StaleUdp {
                    frontend: key(1, Protocol::Udp),
                    backend: backend(2)
                },
                StaleUdp {
                    frontend: key(2, Protocol::Udp),
                    backend: None
                },
                StaleUdp {
                    frontend: key(3, Protocol::Udp),
                    backend: backend(1)
                },
            ],
            "TCP flows are left to finish"
        );
    }
}
