//! Installs wharf-cni on the node: the plugin binary into the CNI binary
//! directory (from beside the agent's own), and, once the agent hands
//! out addresses from a podCIDR, the network configuration list. A
//! container runtime treats the node's network as ready when a
//! configuration appears, so it is written last, as Cilium's agent does.

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde_json::json;
use tokio::sync::watch;
use tracing::info;

use crate::files;

/// The configuration list's file name. Runtimes take the first file by
/// name: one sorting before it (`05-cilium.conflist`) wins over it.
pub const CONFLIST: &str = "10-wharf.conflist";

/// The plugin's binary name.
pub const PLUGIN: &str = "wharf-cni";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path} is missing: {PLUGIN} is built and installed beside the agent")]
    NoPlugin { path: PathBuf },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Copies the plugin into `bin_dir`, waits until the agent hands out
/// addresses (`available`), then writes the configuration list
/// (pointing the plugin at `socket`, and giving pods `mtu` if known)
/// into `conf_dir`. The file work runs
/// on a blocking thread (it reads and syncs a binary of megabytes).
pub async fn install(
    bin_dir: &Path,
    conf_dir: &Path,
    socket: &Path,
    mtu: Option<u32>,
    mut available: watch::Receiver<Option<String>>,
) -> Result<(), InstallError> {
    let bin_dir = bin_dir.to_path_buf();
    blocking(move || {
        let plugin = std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.join(PLUGIN)))
            .unwrap_or_else(|| PathBuf::from(PLUGIN));
        if !plugin.exists() {
            return Err(InstallError::NoPlugin { path: plugin });
        }
        let binary = fs::read(&plugin).map_err(|source| InstallError::Write {
            path: plugin.clone(),
            source,
        })?;
        write_atomically(&bin_dir.join(PLUGIN), &binary, 0o755)
    })
    .await?;
    // A closed channel means no podCIDR will come; nothing to configure.
    if available.wait_for(Option::is_some).await.is_err() {
        return Ok(());
    }
    let mut plugin = json!({ "type": PLUGIN, "agentSocket": socket });
    if let Some(mtu) = mtu {
        plugin["mtu"] = mtu.into();
    }
    // 1.0.0 for runtimes whose libcni predates 1.1 (containerd 1.6 and
    // 1.7 refuse a 1.1.0 list); `cniVersions` lets newer ones pick 1.1.0
    // and with it GC and STATUS.
    let conflist = json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["1.0.0", "1.1.0"],
        "name": "wharf",
        "plugins": [plugin],
    });
    let path = conf_dir.join(CONFLIST);
    let written = path.clone();
    blocking(move || write_atomically(&written, conflist.to_string().as_bytes(), 0o644)).await?;
    info!(conflist = %path.display(), "CNI configured");
    Ok(())
}

async fn blocking(
    work: impl FnOnce() -> Result<(), InstallError> + Send + 'static,
) -> Result<(), InstallError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Removes the configuration list (`--teardown`): left behind, it would
/// tell the runtime the network is ready. True if it was there.
pub fn uninstall(conf_dir: &Path) -> Result<bool, InstallError> {
    let path = conf_dir.join(CONFLIST);
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(InstallError::Write { path, source }),
    }
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    files::write_atomically(path, bytes, mode).map_err(|source| InstallError::Write {
        path: path.to_path_buf(),
        source,
    })
}
