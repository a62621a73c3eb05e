//! Installs wharf-cni on the node: the plugin binary into the CNI binary
//! directory (from beside the agent's own), and, once the node has a
//! podCIDR to hand addresses out of, the network configuration list. A
//! container runtime treats the node's network as ready when a
//! configuration appears, so it is written last, as Cilium's agent does.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use serde_json::json;
use tokio::sync::watch;
use tracing::info;

/// The configuration list's file name: sorted first among the usual
/// `10-`.. names, as runtimes take the first.
pub const CONFLIST: &str = "10-wharf.conflist";

/// The plugin's binary name.
pub const PLUGIN: &str = "wharf-cni";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{PLUGIN} is not beside the agent at {path}: build it with the agent")]
    NoPlugin { path: PathBuf },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Copies the plugin into `bin_dir`, waits for a podCIDR on `pod_cidr`,
/// then writes the configuration list (pointing the plugin at
/// `socket`) into `conf_dir`.
pub async fn install(
    bin_dir: &Path,
    conf_dir: &Path,
    socket: &Path,
    mut pod_cidr: watch::Receiver<Option<String>>,
) -> Result<(), InstallError> {
    let plugin = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(PLUGIN)))
        .filter(|path| path.exists())
        .ok_or_else(|| InstallError::NoPlugin {
            path: std::env::current_exe().unwrap_or_default(),
        })?;
    let binary = fs::read(&plugin).map_err(|source| InstallError::Write {
        path: plugin.clone(),
        source,
    })?;
    write_atomically(&bin_dir.join(PLUGIN), &binary, 0o755)?;
    // A closed channel means no podCIDR will come; nothing to configure.
    if pod_cidr.wait_for(Option::is_some).await.is_err() {
        return Ok(());
    }
    let conflist = json!({
        "cniVersion": "1.1.0",
        "name": "wharf",
        "plugins": [{ "type": PLUGIN, "agentSocket": socket }],
    });
    let path = conf_dir.join(CONFLIST);
    write_atomically(&path, conflist.to_string().as_bytes(), 0o644)?;
    info!(conflist = %path.display(), "CNI configured");
    Ok(())
}

/// Writes a file under a temporary name and renames it into place, so a
/// runtime (or a running pod's ADD) never reads half of it.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let error = |source| InstallError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(error)?;
    }
    let tmp = path.with_extension("wharf-tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(error)?;
    file.write_all(bytes).map_err(error)?;
    file.sync_all().map_err(error)?;
    fs::rename(&tmp, path).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn files_are_replaced_whole_with_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin/plugin");
        write_atomically(&path, b"one", 0o755).unwrap();
        write_atomically(&path, b"two", 0o755).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(!path.with_extension("wharf-tmp").exists());
    }
}
