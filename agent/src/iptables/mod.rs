//! The iptables proxy mode: kube-proxy's rule layout (see `render`),
//! applied with `iptables-restore --noflush` in one atomic transaction per
//! sync. The first sync (and every resync) writes everything and deletes
//! whatever wharf chain it did not write; later syncs rewrite only the
//! chains of frontends that changed, plus the dispatch chains.

mod render;
mod save;

use std::collections::BTreeSet;

use tracing::info;

use crate::{
    conntrack::ConntrackError,
    host::{ExecError, Host, System},
    proxy::{
        Changes, DesiredState, Forwarding, FrontendKey, Programmed, ServiceProxy, StaleFlows,
        SyncStats, commit,
    },
};
use render::{JUMPS, Jump, Plan, STATIC_CHAINS, chains_of};
use save::Saved;

/// Which of the two iptables implementations the node uses. Both may be
/// installed; rules in the other one would be invisible to (and fight
/// with) everything else on the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// iptables over nf_tables (`iptables-nft`).
    Nft,
    /// The legacy x_tables backend (`iptables-legacy`).
    Legacy,
}

impl Flavor {
    pub fn save(self) -> &'static str {
        match self {
            Flavor::Nft => "iptables-nft-save",
            Flavor::Legacy => "iptables-legacy-save",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Flavor::Nft => "iptables-nft-restore",
            Flavor::Legacy => "iptables-legacy-restore",
        }
    }

    /// Picks the flavor the node's other rule owners use, as kube-proxy's
    /// iptables wrapper does: the one holding more rules; on a tie, what
    /// the `iptables` command itself is.
    pub fn detect(host: &impl Host) -> Result<(Self, String), IptablesError> {
        let count = |flavor: Flavor| -> usize {
            host.run(flavor.save(), &[], None)
                .map(|text| Saved::parse(&text).foreign_rule_count())
                .unwrap_or(0)
        };
        let (nft, legacy) = (count(Flavor::Nft), count(Flavor::Legacy));
        if nft != legacy {
            let flavor = if nft > legacy {
                Flavor::Nft
            } else {
                Flavor::Legacy
            };
            return Ok((
                flavor,
                format!("{nft} nft rules, {legacy} legacy rules on this node"),
            ));
        }
        let version = host
            .run("iptables", &["--version"], None)
            .map_err(IptablesError::Tool)?;
        let flavor = if version.contains("legacy") {
            Flavor::Legacy
        } else {
            Flavor::Nft
        };
        Ok((
            flavor,
            format!("no rules either way; `iptables` is {}", version.trim()),
        ))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error(transparent)]
    Tool(ExecError),
    #[error(transparent)]
    Conntrack(#[from] ConntrackError),
}

#[derive(Debug)]
pub struct IptablesProxy<H: Host = System> {
    host: H,
    flavor: Flavor,
    /// What the last successful sync wrote, frontend by frontend.
    programmed: Programmed,
    /// Trust nothing about the tables: write everything next time (at
    /// start, after a failed restore, on resync).
    full: bool,
    /// UDP flows still to forget (a failed attempt is retried).
    stale: StaleFlows,
}

impl<H: Host> IptablesProxy<H> {
    pub fn new(host: H, flavor: Flavor) -> Self {
        Self {
            host,
            flavor,
            programmed: Programmed::new(),
            full: true,
            stale: StaleFlows::default(),
        }
    }

    fn saved(&self) -> Result<Saved, IptablesError> {
        self.host
            .run(self.flavor.save(), &[], None)
            .map(|text| Saved::parse(&text))
            .map_err(IptablesError::Tool)
    }

    fn restore(&self, script: &str) -> Result<(), IptablesError> {
        // -w: wait for the xtables lock other rule owners may hold.
        self.host
            .run(
                self.flavor.restore(),
                &["--noflush", "-w", "5"],
                Some(script),
            )
            .map(drop)
            .map_err(IptablesError::Tool)
    }
}

impl<H: Host> ServiceProxy for IptablesProxy<H> {
    type Error = IptablesError;

    fn sync(&mut self, desired: &DesiredState) -> Result<SyncStats, IptablesError> {
        let changes = Changes::between(&self.programmed, desired);
        let mut stats = SyncStats::default();
        if self.full || !changes.is_empty() {
            let (rewrite, delete, add_jumps): (
                BTreeSet<FrontendKey>,
                BTreeSet<String>,
                Vec<&Jump>,
            ) = if self.full {
                let saved = self.saved()?;
                let wanted: BTreeSet<String> = desired
                    .frontends
                    .iter()
                    .flat_map(|(key, frontend)| chains_of(key, frontend))
                    .collect();
                let delete = saved
                    .wharf_chains("nat")
                    .into_iter()
                    .filter(|c| !wanted.contains(c) && !STATIC_CHAINS.contains(&c.as_str()))
                    .collect();
                let add_jumps = JUMPS.iter().filter(|j| !saved.has_jump(j)).collect();
                (
                    desired.frontends.keys().copied().collect(),
                    delete,
                    add_jumps,
                )
            } else {
                let mut delete = BTreeSet::new();
                for key in changes.removed.iter().chain(&changes.changed) {
                    let Some(old) = self.programmed.get(key) else {
                        continue;
                    };
                    let new = desired
                        .frontends
                        .get(key)
                        .map(|f| chains_of(key, f))
                        .unwrap_or_default();
                    delete.extend(chains_of(key, old).difference(&new).cloned());
                }
                (changes.changed.clone(), delete, Vec::new())
            };
            let (script, rules) = Plan {
                desired,
                rewrite: &rewrite,
                delete: &delete,
                add_jumps: &add_jumps,
                full: self.full,
            }
            .render();
            // Pessimistic until the restore is known to have worked.
            let was_full = std::mem::replace(&mut self.full, true);
            self.restore(&script)?;
            self.full = false;
            if was_full {
                info!(
                    flavor = ?self.flavor,
                    rules,
                    chains_deleted = delete.len(),
                    "iptables rules written in full"
                );
            }
            stats.map_operations = rules + delete.len();
            commit(
                &mut self.programmed,
                &mut self.stale,
                &changes,
                desired,
                &mut stats,
            );
        }
        stats.flows_purged = self.stale.forget(&self.host);
        Ok(stats)
    }

    fn resync(&mut self, desired: &DesiredState) -> Result<SyncStats, IptablesError> {
        self.full = true;
        self.sync(desired)
    }

    fn dump(&self) -> Result<Forwarding, IptablesError> {
        Ok(self.saved()?.forwarding())
    }

    fn flush(&mut self) -> Result<(), IptablesError> {
        remove(&self.host, self.flavor)?;
        self.programmed.clear();
        self.full = true;
        Ok(())
    }
}

/// Removes every wharf chain and jump from one flavor's tables (another
/// mode's leftovers, or this mode's on flush).
pub fn remove(host: &impl Host, flavor: Flavor) -> Result<bool, IptablesError> {
    let saved = Saved::parse(
        &host
            .run(flavor.save(), &[], None)
            .map_err(IptablesError::Tool)?,
    );
    let mut script = String::new();
    let mut found = false;
    for table in ["nat", "filter"] {
        let chains = saved.wharf_chains(table);
        let jumps: Vec<&Jump> = JUMPS
            .iter()
            .filter(|j| j.table == table && saved.has_jump(j))
            .collect();
        if chains.is_empty() && jumps.is_empty() {
            continue;
        }
        found = true;
        script.push_str(&format!("*{table}\n"));
        for chain in &chains {
            script.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for jump in jumps {
            script.push_str(&format!("-D {} {}\n", jump.chain, jump.rule()));
        }
        for chain in &chains {
            script.push_str(&format!("-X {chain}\n"));
        }
        script.push_str("COMMIT\n");
    }
    if found {
        host.run(flavor.restore(), &["--noflush", "-w", "5"], Some(&script))
            .map_err(IptablesError::Tool)?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, net::Ipv4Addr};

    use super::*;
    use crate::proxy::StaleUdp;
    use crate::proxy::{Backend, BackendState, Frontend, FrontendKind, Protocol, TrafficPolicy};

    /// Records restores, answers saves with nothing, and fails the first
    /// `failures` restores.
    #[derive(Default)]
    struct Recorder {
        restores: RefCell<Vec<String>>,
        failures: RefCell<usize>,
        forgotten: RefCell<Vec<StaleUdp>>,
    }

    impl Host for &Recorder {
        fn run(
            &self,
            program: &str,
            args: &[&str],
            stdin: Option<&str>,
        ) -> Result<String, ExecError> {
            if !program.ends_with("-restore") {
                return Ok(String::new());
            }
            let mut failures = self.failures.borrow_mut();
            if *failures > 0 {
                *failures -= 1;
                return Err(ExecError::Failed {
                    program: program.into(),
                    args: args.join(" "),
                    status: std::process::ExitStatus::default(),
                    stderr: "injected".into(),
                });
            }
            self.restores
                .borrow_mut()
                .push(stdin.unwrap_or_default().into());
            Ok(String::new())
        }

        fn forget_udp(&self, stale: &[StaleUdp]) -> Result<usize, ConntrackError> {
            self.forgotten.borrow_mut().extend_from_slice(stale);
            Ok(stale.len())
        }
    }

    fn state(services: u8, backends: &[u8]) -> DesiredState {
        let mut desired = DesiredState::default();
        for service in 0..services {
            desired.frontends.insert(
                FrontendKey {
                    address: Ipv4Addr::new(10, 96, 0, service),
                    port: 53,
                    protocol: Protocol::Udp,
                },
                Frontend {
                    kind: FrontendKind::ClusterIp,
                    service: Default::default(),
                    backends: backends
                        .iter()
                        .map(|host| Backend {
                            address: Ipv4Addr::new(10, 244, service, *host),
                            port: 5353,
                            state: BackendState::Active,
                        })
                        .collect(),
                    affinity_timeout: None,
                    policy: TrafficPolicy::Cluster,
                },
            );
        }
        desired
    }

    #[test]
    fn after_the_first_sync_only_changed_frontends_are_rewritten() {
        let recorder = Recorder::default();
        let mut proxy = IptablesProxy::new(&recorder, Flavor::Nft);
        let stats = proxy.sync(&state(3, &[1, 2])).unwrap();
        assert_eq!(stats.frontends_added, 3);
        let first = recorder.restores.borrow()[0].clone();
        assert_eq!(first.matches("-j DNAT").count(), 6);
        assert!(first.contains("-I PREROUTING 1 "), "jumps are added");

        assert_eq!(
            proxy.sync(&state(3, &[1, 2])).unwrap(),
            SyncStats::default()
        );
        assert_eq!(recorder.restores.borrow().len(), 1, "nothing changed");

        // One frontend loses a backend: only its chains are written, the
        // gone backend's chain is deleted and its UDP flows forgotten.
        let mut desired = state(3, &[1, 2]);
        let key = *desired.frontends.keys().next().unwrap();
        desired.frontends.get_mut(&key).unwrap().backends.pop();
        let stats = proxy.sync(&desired).unwrap();
        assert_eq!((stats.frontends_updated, stats.flows_purged), (1, 1));
        let partial = recorder.restores.borrow()[1].clone();
        assert_eq!(partial.matches("-j DNAT").count(), 1);
        assert_eq!(partial.matches("-X WHARF-SEP-").count(), 1);
        assert!(!partial.contains("-I PREROUTING"));
        let forgotten = recorder.forgotten.borrow();
        assert_eq!(
            forgotten.last().unwrap().backend,
            Some("10.244.0.2:5353".parse().unwrap())
        );
        assert!(
            forgotten[..3].iter().all(|s| s.backend.is_none()),
            "the first sync forgets untranslated flows to the new UDP services"
        );
    }

    #[test]
    fn a_failed_restore_makes_the_next_sync_a_full_one() {
        let recorder = Recorder::default();
        let mut proxy = IptablesProxy::new(&recorder, Flavor::Legacy);
        proxy.sync(&state(2, &[1])).unwrap();
        *recorder.failures.borrow_mut() = 1;
        assert!(proxy.sync(&state(2, &[1, 2])).is_err());
        proxy.sync(&state(2, &[1, 2])).unwrap();
        let retry = recorder.restores.borrow().last().unwrap().clone();
        assert_eq!(
            retry.matches("-j DNAT").count(),
            4,
            "every frontend rewritten"
        );
        assert!(retry.contains("-A WHARF-POSTROUTING"));
    }
}
