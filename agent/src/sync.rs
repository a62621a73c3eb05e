//! The loop that keeps a `ServiceProxy` programmed from a source of
//! desired state (manifest files or an API server): it programs a change
//! at once and batches the rest of a burst into one more sync, retries
//! failed syncs with back-off, reads the dataplane back in full now and
//! then to repair drift, and ages out idle flows. It never syncs (so never
//! prunes a service) before the source knows the whole desired state, so a
//! restart with the API server away leaves forwarding as it was; only
//! idle flows age out meanwhile.

use std::{
    future::Future,
    time::{Duration, SystemTime},
};

use tracing::{debug, info, warn};

use crate::{
    proxy::{DesiredState, ServiceProxy},
    telemetry::Telemetry,
};

/// How often the dataplane is read back in full and repaired if something
/// changed it behind the agent's back (kube-proxy resyncs periodically
/// too). A resync of 10k services reads every map, about a second.
const FULL_RESYNC_INTERVAL: Duration = Duration::from_secs(600);

/// How often idle flows are looked for. A sweep reads the whole conntrack
/// table, so not too often; 30 s bounds a closed SNAT flow's port to under
/// 40 s (10 s closing timeout + one interval).
const FLOW_EXPIRY_INTERVAL: Duration = Duration::from_secs(30);

/// Where desired state comes from.
pub trait Source {
    /// How long to wait after a change before reading the source: for a
    /// change that arrives in pieces (a file written in several steps).
    const SETTLE: Duration;

    /// Least time from the end of one sync to the start of the next. A
    /// change after a quiet spell is programmed at once; the rest of its
    /// burst waits out this interval and costs one more sync, however
    /// long (kube-proxy's `minSyncPeriod` works the same way).
    const MIN_INTERVAL: Duration;

    /// Resolves when something changed that may change the desired state.
    fn changed(&mut self) -> impl Future<Output = ()>;

    /// The latest desired state. `state` is None while the source cannot
    /// say what it is (caches not synced yet, no valid manifests yet): the
    /// dataplane is then left alone.
    fn desired(&mut self) -> Update;
}

/// What a source knows now.
#[derive(Debug, Default)]
pub struct Update {
    pub state: Option<DesiredState>,
    /// When the endpoint changes first seen since the last call were made
    /// (EndpointSlices' `last-change-trigger-time`): once programmed, they
    /// give the network-programming latency.
    pub triggers: Vec<SystemTime>,
}

/// Programs `proxy` from `source` until `shutdown` resolves.
pub async fn run<P: ServiceProxy, S: Source>(
    proxy: &mut P,
    source: &mut S,
    telemetry: &Telemetry,
    shutdown: impl Future<Output = ()>,
) {
    let mut programmer = Programmer {
        programmed: None,
        triggers: Vec::new(),
        telemetry,
    };
    let mut retry = Retry::default();
    let mut expiry = tokio::time::interval(FLOW_EXPIRY_INTERVAL);
    let first_resync = tokio::time::Instant::now() + FULL_RESYNC_INTERVAL;
    let mut full_resync = tokio::time::interval_at(first_resync, FULL_RESYNC_INTERVAL);
    // After a long sync, one sweep or resync, not a burst of missed ones.
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    full_resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    retry.after(programmer.sync(proxy, source));
    let mut last_sync = tokio::time::Instant::now();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            () = source.changed() => {
                telemetry.change_queued();
                // Whatever else arrives meanwhile is taken in by `desired`.
                tokio::time::sleep(S::SETTLE).await;
                tokio::time::sleep_until(last_sync + S::MIN_INTERVAL).await;
                retry.after(programmer.sync(proxy, source));
                last_sync = tokio::time::Instant::now();
            }
            () = tokio::time::sleep_until(retry.at.unwrap_or_else(tokio::time::Instant::now)), if retry.at.is_some() => {
                retry.after(programmer.sync(proxy, source));
            }
            _ = full_resync.tick() => {
                if !programmer.resync(proxy) {
                    retry.after(false);
                }
            }
            _ = expiry.tick() => match proxy.expire_flows() {
                Ok(0) => {}
                Ok(expired) => debug!(expired, "idle flows expired"),
                Err(e) => warn!(error = %e, "expiring idle flows failed"),
            },
        }
    }
}

/// Retries of a failed sync: 1 s, doubling up to 30 s, until one works
/// or the source changes.
#[derive(Debug, Default)]
struct Retry {
    at: Option<tokio::time::Instant>,
    delay: Duration,
}

impl Retry {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);

    fn after(&mut self, synced: bool) {
        if synced {
            *self = Self::default();
        } else {
            self.delay = (self.delay * 2).clamp(Self::FIRST, Self::MAX);
            self.at = Some(tokio::time::Instant::now() + self.delay);
        }
    }
}

/// What the loop knows of the dataplane.
#[derive(Debug)]
struct Programmer<'a> {
    /// What a sync last programmed in full; None after a failed sync (the
    /// maps may hold part of something), so the next try syncs again.
    programmed: Option<DesiredState>,
    /// Trigger times of changes not yet programmed.
    triggers: Vec<SystemTime>,
    telemetry: &'a Telemetry,
}

impl Programmer<'_> {
    /// Syncs the source's latest state if it differs from what is
    /// programmed. Returns false when a sync is still owed (it failed),
    /// for the caller to retry.
    fn sync<P: ServiceProxy, S: Source>(&mut self, proxy: &mut P, source: &mut S) -> bool {
        let Update { state, triggers } = source.desired();
        self.triggers.extend(triggers);
        let Some(desired) = state else {
            return true;
        };
        if self.programmed.as_ref() == Some(&desired) {
            self.programmed_now();
            return true;
        }
        let started = std::time::Instant::now();
        match proxy.sync(&desired) {
            Ok(stats) => {
                let elapsed = started.elapsed();
                info!(
                    frontends = desired.frontends.len(),
                    added = stats.frontends_added,
                    updated = stats.frontends_updated,
                    removed = stats.frontends_removed,
                    backends_added = stats.backends_added,
                    backends_removed = stats.backends_removed,
                    flows_purged = stats.flows_purged,
                    map_operations = stats.map_operations,
                    elapsed_us = elapsed.as_micros() as u64,
                    state = format_args!("{:016x}", desired.fingerprint()),
                    "synced"
                );
                self.telemetry.synced(elapsed, desired.frontends.len());
                self.programmed = Some(desired);
                self.programmed_now();
                true
            }
            // Retried with back-off; the proxies re-read what they need
            // first, so nothing half-done is left behind.
            Err(e) => {
                warn!(error = %e, "sync failed; retrying");
                self.telemetry.sync_failed();
                self.programmed = None;
                false
            }
        }
    }

    /// Everything the source has reported is in the dataplane.
    fn programmed_now(&mut self) {
        self.telemetry.programmed(&self.triggers);
        self.triggers.clear();
    }

    /// Reads the dataplane back and rewrites what drifted. Returns false
    /// when it failed and a sync is owed.
    fn resync<P: ServiceProxy>(&mut self, proxy: &mut P) -> bool {
        let Some(desired) = &self.programmed else {
            return true;
        };
        // Drift is judged on what the dataplane forwards, read back first:
        // a full resync rewrites everything in the rule-based modes,
        // changed or not.
        let drifted = proxy.dump().map_or(true, |f| f != desired.forwarding());
        match proxy.resync(desired) {
            Ok(stats) => {
                if drifted {
                    warn!(
                        map_operations = stats.map_operations,
                        "the dataplane had drifted; full resync repaired it"
                    );
                }
                true
            }
            Err(e) => {
                warn!(error = %e, "full resync failed; retrying");
                self.telemetry.sync_failed();
                // Health counts the owed sync as a waiting change.
                self.telemetry.change_queued();
                self.programmed = None;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{
        Forwarding, Frontend, FrontendKey, FrontendKind, Protocol, ServicePortName, SyncStats,
        TrafficPolicy,
    };

    /// Fails its first `failures` syncs.
    #[derive(Default)]
    struct Flaky {
        failures: usize,
        synced: Option<DesiredState>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("injected")]
    struct Injected;

    impl ServiceProxy for Flaky {
        type Error = Injected;

        fn sync(&mut self, desired: &DesiredState) -> Result<SyncStats, Injected> {
            if self.failures > 0 {
                self.failures -= 1;
                return Err(Injected);
            }
            self.synced = Some(desired.clone());
            Ok(SyncStats::default())
        }

        fn dump(&self) -> Result<Forwarding, Injected> {
            Ok(self
                .synced
                .as_ref()
                .map(DesiredState::forwarding)
                .unwrap_or_default())
        }

        fn flush(&mut self) -> Result<(), Injected> {
            self.synced = None;
            Ok(())
        }
    }

    /// Hands out scripted updates, one per call.
    struct Script(Vec<Update>);

    impl Source for Script {
        const SETTLE: Duration = Duration::ZERO;
        const MIN_INTERVAL: Duration = Duration::ZERO;

        async fn changed(&mut self) {
            std::future::pending().await
        }

        fn desired(&mut self) -> Update {
            if self.0.is_empty() {
                Update::default()
            } else {
                self.0.remove(0)
            }
        }
    }

    /// A state of `frontends` ClusterIPs without backends.
    fn state(frontends: u8) -> DesiredState {
        let mut state = DesiredState::default();
        for n in 0..frontends {
            let key = FrontendKey {
                address: std::net::Ipv4Addr::new(10, 96, 0, n),
                port: 80,
                protocol: Protocol::Tcp,
            };
            let frontend = Frontend {
                kind: FrontendKind::ClusterIp,
                service: ServicePortName::default(),
                backends: Vec::new(),
                affinity_timeout: None,
                policy: TrafficPolicy::Cluster,
            };
            state.frontends.insert(key, frontend);
        }
        state
    }

    #[test]
    fn nothing_is_touched_until_the_source_knows_the_state() {
        let telemetry = Telemetry::new();
        let mut proxy = Flaky {
            synced: Some(state(3)),
            ..Flaky::default()
        };
        let mut programmer = Programmer {
            programmed: None,
            triggers: Vec::new(),
            telemetry: &telemetry,
        };
        let mut source = Script(vec![Update::default()]);
        assert!(programmer.sync(&mut proxy, &mut source));
        assert_eq!(
            proxy.synced,
            Some(state(3)),
            "an unsynced source prunes nothing"
        );
    }

    #[test]
    fn a_failed_sync_is_retried_and_its_triggers_wait_for_success() {
        let telemetry = Telemetry::new();
        let mut proxy = Flaky {
            failures: 2,
            synced: None,
        };
        let mut programmer = Programmer {
            programmed: None,
            triggers: Vec::new(),
            telemetry: &telemetry,
        };
        let changed = SystemTime::now() - Duration::from_secs(2);
        let mut source = Script(vec![
            Update {
                state: Some(state(1)),
                triggers: vec![changed],
            },
            // The source moves on meanwhile: the retry programs the latest.
            Update {
                state: Some(state(2)),
                triggers: Vec::new(),
            },
            Update {
                state: Some(state(2)),
                triggers: Vec::new(),
            },
        ]);
        let mut retry = Retry::default();
        retry.after(programmer.sync(&mut proxy, &mut source));
        assert_eq!(retry.delay, Retry::FIRST);
        assert_eq!(programmer.triggers, [changed], "kept until programmed");
        retry.after(programmer.sync(&mut proxy, &mut source));
        assert_eq!(retry.delay, 2 * Retry::FIRST);
        retry.after(programmer.sync(&mut proxy, &mut source));
        assert!(retry.at.is_none(), "the third try worked");
        assert_eq!(proxy.synced, Some(state(2)));
        assert!(programmer.triggers.is_empty());
        let metrics = telemetry.encode();
        assert!(
            metrics.contains("wharf_network_programming_duration_seconds_count 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains("wharf_sync_proxy_rules_failures_total 2"),
            "{metrics}"
        );
    }
}
