//! Standalone mode: services come from manifest files instead of an API
//! server. The files are watched; every change re-reads them all and
//! syncs. An invalid manifest is reported (file, object, reason) and the
//! last good state stays programmed.

use std::{path::PathBuf, time::Duration};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::{
    manifest,
    proxy::{DesiredState, ServiceProxy},
};

/// Changes arriving within this window are handled by one sync: editors
/// and `kubectl`-style tools write a file in several steps.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// How often the dataplane is read back in full and repaired if something
/// changed it behind the agent's back (kube-proxy resyncs periodically
/// too). A resync of 10k services reads every map, about a second.
const FULL_RESYNC_INTERVAL: Duration = Duration::from_secs(600);

/// How often idle flows are looked for. A sweep reads the whole conntrack
/// table, so not too often; 30 s bounds a closed SNAT flow's port to under
/// 40 s (10 s closing timeout + one interval).
const FLOW_EXPIRY_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("watching {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// Programs `proxy` with node `node`'s share of the manifests under `path`
/// until `shutdown` resolves.
pub async fn run<P: ServiceProxy>(
    proxy: &mut P,
    path: PathBuf,
    node: &str,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StandaloneError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.send(());
        }
    })
    .map_err(|source| StandaloneError::Watch {
        path: path.clone(),
        source,
    })?;
    // Watch the directory holding a file too: tools replace files by
    // renaming a new one over them, which a watch on the file misses.
    let watched = if path.is_dir() {
        path.clone()
    } else {
        path.parent().map(PathBuf::from).unwrap_or_default()
    };
    watcher
        .watch(&watched, RecursiveMode::NonRecursive)
        .map_err(|source| StandaloneError::Watch {
            path: watched.clone(),
            source,
        })?;

    let mut states = States::default();
    let mut retry = Retry::default();
    let mut expiry = tokio::time::interval(FLOW_EXPIRY_INTERVAL);
    let first_resync = tokio::time::Instant::now() + FULL_RESYNC_INTERVAL;
    let mut full_resync = tokio::time::interval_at(first_resync, FULL_RESYNC_INTERVAL);
    retry.after(reload(proxy, &path, node, &mut states));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            Some(()) = rx.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
                retry.after(reload(proxy, &path, node, &mut states));
            }
            () = tokio::time::sleep_until(retry.at.unwrap_or_else(tokio::time::Instant::now)), if retry.at.is_some() => {
                retry.after(reload(proxy, &path, node, &mut states));
            }
            _ = full_resync.tick() => {
                if let Some(desired) = &states.programmed {
                    // Drift is judged on what the dataplane forwards, read
                    // back first: a full resync rewrites everything in the
                    // rule-based modes, changed or not.
                    let drifted = proxy.dump().map_or(true, |f| f != desired.forwarding());
                    match proxy.resync(desired) {
                        Ok(stats) if drifted => {
                            warn!(map_operations = stats.map_operations, "the dataplane had drifted; full resync repaired it");
                        }
                        Ok(_) => {}
                        Err(e) => {
                            warn!(error = %e, "full resync failed; retrying");
                            states.programmed = None;
                            retry.after(false);
                        }
                    }
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
/// or the manifests change.
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

/// What standalone mode knows of the manifests and the dataplane.
#[derive(Debug, Default)]
struct States {
    /// The latest valid manifests: what the dataplane should hold.
    wanted: Option<DesiredState>,
    /// What a sync last programmed in full; None after a failed sync (the
    /// maps may hold part of something), so the next try syncs again.
    programmed: Option<DesiredState>,
}

/// Reads the manifests and syncs the latest valid ones. Invalid manifests
/// are reported and leave `wanted` as it was. Returns false when a sync is
/// still owed (it failed), for the caller to retry.
fn reload<P: ServiceProxy>(
    proxy: &mut P,
    path: &std::path::Path,
    node: &str,
    states: &mut States,
) -> bool {
    match manifest::load_path(path, node) {
        Ok(desired) => states.wanted = Some(desired),
        Err(e) => error!(error = %e, "invalid manifests; the last good state stays in force"),
    }
    let Some(desired) = &states.wanted else {
        return true;
    };
    if states.programmed.as_ref() == Some(desired) {
        return true;
    }
    let started = std::time::Instant::now();
    match proxy.sync(desired) {
        Ok(stats) => {
            info!(
                frontends = desired.frontends.len(),
                added = stats.frontends_added,
                updated = stats.frontends_updated,
                removed = stats.frontends_removed,
                backends_added = stats.backends_added,
                backends_removed = stats.backends_removed,
                flows_purged = stats.flows_purged,
                map_operations = stats.map_operations,
                elapsed_us = started.elapsed().as_micros() as u64,
                "synced"
            );
            states.programmed = Some(desired.clone());
            true
        }
        // Retried with back-off; the reconciler re-reads the maps first,
        // so nothing half-done is left behind.
        Err(e) => {
            warn!(error = %e, "sync failed; retrying");
            states.programmed = None;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{Forwarding, SyncStats};

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

    #[test]
    fn a_failed_sync_is_retried_with_growing_delays_until_it_works() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("svc.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{port: 80}]\n",
        )
        .unwrap();
        let mut proxy = Flaky {
            failures: 2,
            synced: None,
        };
        let mut states = States::default();
        let mut retry = Retry::default();

        retry.after(reload(&mut proxy, dir.path(), "node", &mut states));
        assert_eq!(retry.delay, Retry::FIRST);
        // The manifests turn invalid meanwhile: the retry still programs
        // the last valid ones.
        std::fs::write(
            dir.path().join("broken.yaml"),
            "kind: Service\nmetadata: [\n",
        )
        .unwrap();
        retry.after(reload(&mut proxy, dir.path(), "node", &mut states));
        assert_eq!(retry.delay, 2 * Retry::FIRST);
        retry.after(reload(&mut proxy, dir.path(), "node", &mut states));
        assert!(retry.at.is_none(), "the third try worked");
        assert_eq!(proxy.dump().unwrap().len(), 1);
    }
}
