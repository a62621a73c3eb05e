//! Standalone mode: services come from manifest files instead of an API
//! server. The files are watched; every change re-reads them all. An
//! invalid manifest is reported (file, object, reason) and the last good
//! state stays programmed.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::error;

use crate::{
    manifest,
    proxy::DesiredState,
    sync::{Source, Update},
};

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("watching {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// Node `node`'s share of the manifests under a path, followed as the
/// files change.
#[derive(Debug)]
pub struct Manifests {
    path: PathBuf,
    node: String,
    changes: mpsc::UnboundedReceiver<()>,
    /// The latest valid manifests' state.
    last_good: Option<DesiredState>,
    _watcher: RecommendedWatcher,
}

impl Manifests {
    /// Starts watching `path` (a file or a directory).
    pub fn watch(path: PathBuf, node: &str) -> Result<Self, StandaloneError> {
        let (tx, changes) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
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
        Ok(Self {
            path,
            node: node.to_string(),
            changes,
            last_good: None,
            _watcher: watcher,
        })
    }
}

impl Source for Manifests {
    /// Editors and `kubectl`-style tools write a file in several steps.
    const SETTLE: Duration = Duration::from_millis(100);
    const MIN_INTERVAL: Duration = Duration::ZERO;

    async fn changed(&mut self) {
        if self.changes.recv().await.is_none() {
            // The watcher is gone: no change will ever come.
            std::future::pending::<()>().await;
        }
    }

    fn desired(&mut self) -> Update {
        while self.changes.try_recv().is_ok() {}
        Update {
            state: reload(&self.path, &self.node, &mut self.last_good),
            triggers: Vec::new(),
        }
    }
}

/// Reads the manifests, keeping the last valid state when they are not.
fn reload(path: &Path, node: &str, last_good: &mut Option<DesiredState>) -> Option<DesiredState> {
    match manifest::load_path(path, node) {
        Ok(desired) => *last_good = Some(desired),
        Err(e) => error!(error = %e, "invalid manifests; the last good state stays in force"),
    }
    last_good.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_manifests_leave_the_last_good_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut last_good = None;
        assert_eq!(
            reload(dir.path(), "node", &mut last_good),
            Some(DesiredState::default())
        );
        std::fs::write(
            dir.path().join("svc.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{port: 80}]\n",
        )
        .unwrap();
        let good = reload(dir.path(), "node", &mut last_good).expect("a state");
        assert_eq!(good.frontends.len(), 1);
        std::fs::write(
            dir.path().join("broken.yaml"),
            "kind: Service\nmetadata: [\n",
        )
        .unwrap();
        assert_eq!(reload(dir.path(), "node", &mut last_good), Some(good));
    }
}
