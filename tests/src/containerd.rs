//! A containerd of a test's own (Debian's containerd and runc): started
//! in a node's network namespace with its CRI plugin using the CNI
//! configuration and plugins the agent installed, its state under the
//! lab's directory, configured and given images (built from Debian's
//! busybox-static: no registry is reachable) as `wharf cluster up
//! --runtime cri` does it (`wharf_cli::containerd`).
//!
//! Dropping it leaves nothing: containerd and its shims are killed, the
//! mounts it made under its directories are unmounted, and the cgroups of
//! its pods (all under one parent of the test's) are removed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

pub use wharf_cli::containerd::{BUSYBOX_IMAGE, PAUSE_IMAGE};
use wharf_cli::containerd::{configure, ctr, import_images, serving, socket};

use crate::lab::Lab;

/// The v1 hierarchies runc makes pod cgroups in on a hybrid host.
const V1_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug)]
pub struct Containerd {
    /// Its root, state, socket and log.
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// The lab's cgroup as a path from the hierarchies' roots: pods are
    /// to be below it (`LinuxPodSandboxConfig::cgroup_parent`), and what
    /// runc leaves there in any hierarchy goes at drop.
    pub cgroup_parent: String,
    child: Child,
}

impl Containerd {
    /// Starts containerd in `ns` (only its network namespace entered:
    /// containerd mounts in the host's), its CRI plugin calling the CNI
    /// plugins in `cni_bin` with the configuration in `cni_conf`, and
    /// imports the sandbox and busybox images.
    pub fn start(lab: &mut Lab, ns: &str, cni_bin: &Path, cni_conf: &Path) -> Self {
        let short = ns.rsplit('-').next().unwrap_or(ns);
        let dir = lab.dir.join(format!("containerd-{short}"));
        let config = configure(&dir, cni_bin, cni_conf).expect("containerd's configuration");
        let socket = socket(&dir);
        let log = fs::File::create(dir.join("containerd.log")).unwrap();
        let config_arg = config.display().to_string();
        let child = lab
            .command(
                ns,
                false,
                Path::new("/usr/bin/containerd"),
                &["--config", &config_arg],
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd (Debian's containerd package)");
        let cgroup_parent = format!("/{}", lab.cgroup_name());
        let containerd = Self {
            dir,
            socket,
            cgroup_parent,
            child,
        };
        containerd.wait_until_serving();
        import_images(&containerd.socket, &containerd.dir.join("images")).expect("images");
        containerd
    }

    fn wait_until_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !serving(&self.socket) {
            assert!(
                Instant::now() < deadline,
                "containerd never served its socket: {}",
                self.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// containerd's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr` in the k8s.io namespace (the CRI plugin's).
    pub fn ctr(&self, args: &[&str]) -> String {
        ctr(&self.socket, args).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Shims outlive containerd; theirs name its socket.
        let socket = self.socket.display().to_string();
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &format!("containerd-shim.*{socket}")])
            .status();
        // Their containers, if any survived, went with their PID
        // namespaces. What they mounted stays (pod network namespaces
        // included, under its state directory): deepest first.
        let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split(' ').nth(4).map(str::to_string))
            .filter(|target| Path::new(target).starts_with(&self.dir))
            .collect();
        mounts.sort_by_key(|target| std::cmp::Reverse(target.len()));
        for target in mounts {
            let _ = Command::new("umount").args(["-l", &target]).status();
        }
        // runc leaves no cgroups for removed containers; a test that
        // failed half-way may. Deepest first, in every hierarchy.
        if let Ok(hierarchies) = fs::read_dir(V1_ROOT) {
            for hierarchy in hierarchies.flatten() {
                remove_tree(
                    &hierarchy
                        .path()
                        .join(self.cgroup_parent.trim_start_matches('/')),
                );
            }
        }
    }
}

/// Removes a cgroup directory and its children (cgroups are removed
/// with rmdir, children first).
fn remove_tree(dir: &Path) {
    if let Ok(children) = fs::read_dir(dir) {
        for child in children.flatten() {
            if child.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&child.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}
