//! Installs wharf-cni on the node: the plugin binary into the CNI binary
//! directory (from beside the agent's own), and, once the agent hands
//! out addresses from a podCIDR, the network configuration list. A
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
/// (pointing the plugin at `socket`) into `conf_dir`. The file work runs
/// on a blocking thread (it reads and syncs a binary of megabytes).
pub async fn install(
    bin_dir: &Path,
    conf_dir: &Path,
    socket: &Path,
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
    let conflist = json!({
        "cniVersion": "1.1.0",
        "name": "wharf",
        "plugins": [{ "type": PLUGIN, "agentSocket": socket }],
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

/// Writes a file under a temporary name of this process's own and
/// renames it into place, so a runtime (or a running pod's ADD) never
/// reads half of it and two agents never write one temporary file.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt as _;
    let error = |source| InstallError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(error)?;
    }
    let tmp = path.with_extension(format!("wharf-tmp-{}", std::process::id()));
    // Left by an earlier run of a process with this ID, if at all.
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(error)?;
    file.set_permissions(fs::Permissions::from_mode(mode))
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
        assert_eq!(
            fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "no temporary left"
        );
    }
}
