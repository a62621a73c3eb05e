//! A containerd of a test's own (Debian's containerd and runc): started
//! in a node's network namespace with its CRI plugin using the CNI
//! configuration and plugins the agent installed, its state under the
//! lab's directory, and images built here from Debian's busybox-static
//! (no registry is reachable) and imported with `ctr`.
//!
//! Dropping it leaves nothing: containerd and its shims are killed, the
//! mounts it made under its directories are unmounted, and the cgroups of
//! its pods (all under one parent of the test's) are removed.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde_json::json;

use crate::lab::{Lab, command};

/// The image the CRI plugin runs as each pod's sandbox: busybox
/// sleeping, as the pause image would.
pub const PAUSE_IMAGE: &str = "wharf.local/pause:1";
/// busybox, its applets on PATH.
pub const BUSYBOX_IMAGE: &str = "wharf.local/busybox:1";

/// Where Debian's busybox-static puts the binary.
const BUSYBOX: &str = "/bin/busybox";

/// Debian's containernetworking-plugins: containerd's CRI plugin brings
/// up each pod's loopback with the `loopback` plugin, which real nodes
/// have beside the others in /opt/cni/bin.
const LOOPBACK_PLUGIN: &str = "/usr/lib/cni/loopback";

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
    started: SystemTime,
}

impl Containerd {
    /// Starts containerd in `ns` (only its network namespace entered:
    /// containerd mounts in the host's), its CRI plugin calling the CNI
    /// plugins in `cni_bin` with the configuration in `cni_conf`, and
    /// imports the sandbox and busybox images.
    pub fn start(lab: &mut Lab, ns: &str, cni_bin: &Path, cni_conf: &Path) -> Self {
        let short = ns.rsplit('-').next().unwrap_or(ns);
        let dir = lab.dir.join(format!("containerd-{short}"));
        fs::create_dir_all(cni_bin).unwrap();
        fs::create_dir_all(cni_conf).unwrap();
        fs::create_dir_all(&dir).unwrap();
        assert!(
            Path::new(LOOPBACK_PLUGIN).exists(),
            "{LOOPBACK_PLUGIN} is missing (Debian's containernetworking-plugins)"
        );
        let _ = symlink(LOOPBACK_PLUGIN, cni_bin.join("loopback"));
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  enable_selinux = false
  disable_apparmor = true
  # Sandboxes ask for an oom_score_adj of -998, which this host's root may
  # not set: no container gets below containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#,
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                socket = socket.display(),
                bin = cni_bin.display(),
                conf = cni_conf.display(),
            ),
        )
        .unwrap();
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
        let started = SystemTime::now();
        let containerd = Self {
            dir,
            socket,
            cgroup_parent,
            child,
            started,
        };
        containerd.wait_for_socket();
        for (name, args) in [
            (PAUSE_IMAGE, vec!["sleep", "2147483647"]),
            (BUSYBOX_IMAGE, vec!["sh"]),
        ] {
            let archive = busybox_image(&containerd.dir.join("images"), name, &args);
            containerd.ctr(&["images", "import", &archive.display().to_string()]);
        }
        containerd
    }

    fn wait_for_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket.exists() {
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
        let socket = self.socket.display().to_string();
        let mut all = vec!["--address", &socket, "--namespace", "k8s.io"];
        all.extend(args);
        let output = Command::new("ctr").args(&all).output().expect("ctr");
        assert!(
            output.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
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
        // namespaces. What they mounted stays: deepest first.
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
        // The CRI plugin names pod network namespaces cni-<uuid>; those
        // made since it started are its (one containerd per test
        // process at a time).
        for entry in fs::read_dir("/run/netns").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let made = entry.metadata().and_then(|m| m.modified());
            if name.starts_with("cni-") && made.is_ok_and(|at| at >= self.started) {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
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

/// The SHA-256 of a file, as `sha256:<hex>`.
fn digest(path: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    let text = String::from_utf8_lossy(&output.stdout);
    format!(
        "sha256:{}",
        text.split_whitespace().next().expect("a digest")
    )
}

/// Adds `path` to the layout's blobs; its descriptor's (digest, size).
fn blob(layout: &Path, path: &Path) -> (String, u64) {
    let digest = digest(path);
    let size = fs::metadata(path).unwrap().len();
    let target = layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    fs::rename(path, target).unwrap();
    (digest, size)
}

/// Builds image `name` (one layer: busybox-static and a link per applet
/// in /bin) running `cmd`, as an OCI archive under `dir`; returns its
/// path.
pub fn busybox_image(dir: &Path, name: &str, cmd: &[&str]) -> PathBuf {
    let work = dir.join(name.replace(['/', ':'], "_"));
    let _ = fs::remove_dir_all(&work);
    let (rootfs, layout) = (work.join("rootfs"), work.join("layout"));
    fs::create_dir_all(rootfs.join("bin")).unwrap();
    fs::create_dir_all(rootfs.join("tmp")).unwrap();
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    fs::copy(BUSYBOX, rootfs.join("bin/busybox")).expect("busybox (Debian's busybox-static)");
    let applets = Command::new(BUSYBOX).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        if applet != "busybox" {
            let _ = symlink("busybox", rootfs.join("bin").join(applet));
        }
    }
    let layer = work.join("layer.tar");
    command(
        "tar",
        &[
            "-C",
            &rootfs.display().to_string(),
            "--owner=0",
            "--group=0",
            "-cf",
            &layer.display().to_string(),
            ".",
        ],
    );
    let (layer_digest, layer_size) = blob(&layout, &layer);
    let config = work.join("config.json");
    fs::write(
        &config,
        json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Cmd": cmd, "Env": ["PATH=/bin"] },
            "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        })
        .to_string(),
    )
    .unwrap();
    let (config_digest, config_size) = blob(&layout, &config);
    let manifest = work.join("manifest.json");
    fs::write(
        &manifest,
        json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_size,
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer_size,
            }],
        })
        .to_string(),
    )
    .unwrap();
    let (manifest_digest, manifest_size) = blob(&layout, &manifest);
    let tag = name.rsplit_once(':').map_or("latest", |(_, tag)| tag);
    fs::write(
        layout.join("index.json"),
        json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "platform": { "architecture": "amd64", "os": "linux" },
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        })
        .to_string(),
    )
    .unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let archive = work.join("image.tar");
    command(
        "tar",
        &[
            "-C",
            &layout.display().to_string(),
            "-cf",
            &archive.display().to_string(),
            "oci-layout",
            "index.json",
            "blobs",
        ],
    );
    archive
}
