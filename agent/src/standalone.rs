//! Standalone mode: services come from manifest files instead of an API
//! server. The files are watched; every change re-reads them all and
//! syncs. An invalid manifest is reported (file, object, reason) and the
//! last good state stays programmed.

use std::{path::PathBuf, time::Duration};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    manifest,
    proxy::{DesiredState, ServiceProxy},
};

/// Changes arriving within this window are handled by one sync: editors
/// and `kubectl`-style tools write a file in several steps.
const DEBOUNCE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("watching {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// Programs `proxy` from `path` until `shutdown` resolves.
pub async fn run<P: ServiceProxy>(
    proxy: &mut P,
    path: PathBuf,
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

    let mut last_good: Option<DesiredState> = None;
    reload(proxy, &path, &mut last_good);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            Some(()) = rx.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
                reload(proxy, &path, &mut last_good);
            }
        }
    }
}

fn reload<P: ServiceProxy>(
    proxy: &mut P,
    path: &std::path::Path,
    last_good: &mut Option<DesiredState>,
) {
    let desired = match manifest::load_path(path) {
        Ok(desired) => desired,
        Err(e) => {
            error!(error = %e, "invalid manifests; the last good state stays in force");
            return;
        }
    };
    if last_good.as_ref() == Some(&desired) {
        return;
    }
    let started = std::time::Instant::now();
    match proxy.sync(&desired) {
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
            *last_good = Some(desired);
        }
        // The next change (or restart) retries; the reconciler re-reads the
        // maps first, so nothing half-done is left behind for long.
        Err(e) => warn!(error = %e, "sync failed; will retry on the next change"),
    }
}
