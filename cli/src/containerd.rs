//! A node's containerd (Debian's containerd and runc) for the `cri`
//! runtime, as `wharf cluster up --runtime cri` and the CRI tests run
//! it: its configuration (root, state and socket of its own, the CRI
//! plugin calling the node's CNI plugins), and its images, built here
//! from Debian's busybox-static (no registry is reachable) and imported
//! with `ctr`.

use std::{
    fs,
    io::Error,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::json;

/// The image the CRI plugin runs as each pod's sandbox: busybox
/// sleeping, as the pause image would.
pub const PAUSE_IMAGE: &str = "wharf.local/pause:1";
/// busybox, its applets on PATH: what the demo and the tests run.
pub const BUSYBOX_IMAGE: &str = "wharf.local/busybox:1";

/// Where Debian's busybox-static puts the binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Debian's containernetworking-plugins: containerd's CRI plugin brings
/// up each pod's loopback with the `loopback` plugin, which real nodes
/// have beside the others in the CNI binary directory.
pub const LOOPBACK_PLUGIN: &str = "/usr/lib/cni/loopback";

/// The images every node gets, with the command each runs.
pub const IMAGES: [(&str, &[&str]); 2] = [
    (PAUSE_IMAGE, &["sleep", "2147483647"]),
    (BUSYBOX_IMAGE, &["sh"]),
];

/// containerd's configuration: everything under `dir` (`root`, `state`,
/// `containerd.sock`), the CRI plugin using the CNI plugins in `cni_bin`
/// with the configuration in `cni_conf` (where the loopback plugin is
/// linked in too).
pub fn configure(dir: &Path, cni_bin: &Path, cni_conf: &Path) -> Result<PathBuf, Error> {
    fs::create_dir_all(dir)?;
    fs::create_dir_all(cni_bin)?;
    fs::create_dir_all(cni_conf)?;
    if !Path::new(LOOPBACK_PLUGIN).exists() {
        return Err(Error::other(format!(
            "{LOOPBACK_PLUGIN} is missing (Debian's containernetworking-plugins)"
        )));
    }
    let loopback = cni_bin.join("loopback");
    if fs::symlink_metadata(&loopback).is_err() {
        symlink(LOOPBACK_PLUGIN, loopback)?;
    }
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
  # Pod network namespaces under the state directory, not /run/netns: a
  # removed sandbox's stays mounted, and goes with its node's directory.
  netns_mounts_under_state_dir = true
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
            socket = socket(dir).display(),
            bin = cni_bin.display(),
            conf = cni_conf.display(),
        ),
    )?;
    Ok(config)
}

/// The socket of the containerd configured in `dir`.
pub fn socket(dir: &Path) -> PathBuf {
    dir.join("containerd.sock")
}

/// Runs `ctr` against `socket` in the k8s.io namespace (the CRI
/// plugin's); its output.
pub fn ctr(socket: &Path, args: &[&str]) -> Result<String, Error> {
    let socket = socket.display().to_string();
    let mut all = vec!["--address", &socket, "--namespace", "k8s.io"];
    all.extend_from_slice(args);
    run("ctr", &all)
}

/// Whether the containerd at `socket` answers (its socket file appears
/// before it serves).
pub fn serving(socket: &Path) -> bool {
    ctr(socket, &["version"]).is_ok()
}

/// Builds `IMAGES` under `dir` (once: archives already there are kept)
/// and imports them into the containerd at `socket`.
pub fn import_images(socket: &Path, dir: &Path) -> Result<(), Error> {
    for (name, cmd) in IMAGES {
        let archive = dir.join(name.replace(['/', ':'], "_")).join("image.tar");
        let archive = if archive.exists() {
            archive
        } else {
            busybox_image(dir, name, cmd)?
        };
        ctr(
            socket,
            &["images", "import", &archive.display().to_string()],
        )?;
    }
    Ok(())
}

/// Runs `program` to its end; its output, or its error output as the
/// error.
fn run(program: &str, args: &[&str]) -> Result<String, Error> {
    let output = Command::new(program).args(args).output()?;
    if !output.status.success() {
        return Err(Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Adds `path` to the layout's blobs; its descriptor's (digest, size).
fn blob(layout: &Path, path: &Path) -> Result<(String, u64), Error> {
    let sum = run("sha256sum", &[&path.display().to_string()])?;
    let hex = sum
        .split_whitespace()
        .next()
        .ok_or_else(|| Error::other("sha256sum printed no digest"))?;
    let size = fs::metadata(path)?.len();
    fs::rename(path, layout.join("blobs/sha256").join(hex))?;
    Ok((format!("sha256:{hex}"), size))
}

/// Builds image `name` (one layer: busybox-static and a link per applet
/// in /bin) running `cmd`, as an OCI archive under `dir`; returns its
/// path.
pub fn busybox_image(dir: &Path, name: &str, cmd: &[&str]) -> Result<PathBuf, Error> {
    let work = dir.join(name.replace(['/', ':'], "_"));
    let _ = fs::remove_dir_all(&work);
    let (rootfs, layout) = (work.join("rootfs"), work.join("layout"));
    fs::create_dir_all(rootfs.join("bin"))?;
    fs::create_dir_all(rootfs.join("tmp"))?;
    fs::create_dir_all(layout.join("blobs/sha256"))?;
    fs::copy(BUSYBOX, rootfs.join("bin/busybox"))
        .map_err(|e| Error::other(format!("{BUSYBOX} (Debian's busybox-static): {e}")))?;
    for applet in run(BUSYBOX, &["--list"])?.lines() {
        if applet != "busybox" {
            symlink("busybox", rootfs.join("bin").join(applet))?;
        }
    }
    let layer = work.join("layer.tar");
    let (rootfs_arg, layer_arg) = (rootfs.display().to_string(), layer.display().to_string());
    run(
        "tar",
        &[
            "-C",
            &rootfs_arg,
            "--owner=0",
            "--group=0",
            "-cf",
            &layer_arg,
            ".",
        ],
    )?;
    let (layer_digest, layer_size) = blob(&layout, &layer)?;
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
    )?;
    let (config_digest, config_size) = blob(&layout, &config)?;
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
    )?;
    let (manifest_digest, manifest_size) = blob(&layout, &manifest)?;
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
    )?;
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let archive = work.join("image.tar");
    let (layout_arg, archive_arg) = (layout.display().to_string(), archive.display().to_string());
    run(
        "tar",
        &[
            "-C",
            &layout_arg,
            "-cf",
            &archive_arg,
            "oci-layout",
            "index.json",
            "blobs",
        ],
    )?;
    fs::remove_dir_all(&rootfs)?;
    Ok(archive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_oci_archives_naming_their_image() {
        let dir = tempfile::tempdir().unwrap();
        let archive = busybox_image(dir.path(), BUSYBOX_IMAGE, &["sh"]).unwrap();
        let listing = run("tar", &["-tf", &archive.display().to_string()]).unwrap();
        assert!(listing.lines().any(|l| l == "oci-layout"), "{listing}");
        let blobs = listing
            .lines()
            .filter(|l| l.starts_with("blobs/sha256/") && !l.ends_with('/'));
        assert_eq!(blobs.count(), 3, "layer, config and manifest: {listing}");
        let work = archive.parent().unwrap();
        let index = fs::read_to_string(work.join("layout/index.json")).unwrap();
        assert!(index.contains(r#""io.containerd.image.name":"wharf.local/busybox:1""#));
        assert!(
            !work.join("rootfs").exists(),
            "the unpacked tree is not kept"
        );
    }

    #[test]
    fn the_configuration_keeps_everything_under_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (bin, conf) = (dir.path().join("cni/bin"), dir.path().join("cni/net.d"));
        let config = configure(&dir.path().join("containerd"), &bin, &conf).unwrap();
        let text = fs::read_to_string(config).unwrap();
        let root = dir.path().display().to_string();
        for line in text.lines().filter(|l| l.contains(" = \"/")) {
            assert!(line.contains(&root), "outside the node's directory: {line}");
        }
        assert!(text.contains(PAUSE_IMAGE));
        assert_eq!(
            fs::read_link(bin.join("loopback")).unwrap(),
            Path::new(LOOPBACK_PLUGIN)
        );
        // Again: idempotent.
        configure(&dir.path().join("containerd"), &bin, &conf).unwrap();
    }
}
