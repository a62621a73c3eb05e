//! A pod's volumes on the node and their mounts into containers:
//! `emptyDir` (a directory of the pod's, shared by its containers and
//! kept across their restarts), `hostPath` (with kubelet's type checks),
//! and `configMap`, `secret`, `downwardAPI` and `projected` volumes
//! written as files when the pod starts. Plus the pod's `/etc/hosts`,
//! which kubelet manages too (pod address and name, `hostAliases`).

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt as _,
    path::{Component, Path, PathBuf},
};

use k8s_openapi::api::core::v1::{Container, DownwardAPIVolumeFile, KeyToPath, Pod, Volume};

use super::{
    env::{self, Downward, Refs},
    spawn::Bind,
};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume}: {message}")]
    Invalid { volume: String, message: String },
    #[error("volume {volume}: {path}: {source}")]
    Io {
        volume: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("container {container} mounts volume {volume}, which the pod does not have")]
    UnknownVolume { container: String, volume: String },
    #[error("container {container}: mount path {path:?} must be absolute")]
    RelativeMountPath { container: String, path: String },
}

/// A volume ready on the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    pub path: PathBuf,
    /// configMap, secret, downwardAPI and projected volumes are mounted
    /// read-only whatever the mount says.
    pub read_only: bool,
}

fn invalid(volume: &str, message: impl Into<String>) -> VolumeError {
    VolumeError::Invalid {
        volume: volume.into(),
        message: message.into(),
    }
}

fn io(volume: &str, path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError {
    let (volume, path) = (volume.to_string(), path.to_path_buf());
    move |source| VolumeError::Io {
        volume,
        path,
        source,
    }
}

/// A file of a file-backed volume: (path in the volume, contents, mode).
type File = (PathBuf, Vec<u8>, i32);

/// A relative path with no `..`: item paths and subPaths.
fn relative(volume: &str, path: &str) -> Result<PathBuf, VolumeError> {
    let path = Path::new(path);
    if path.as_os_str().is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(invalid(
            volume,
            format!("{path:?} must be a relative path without '..'"),
        ));
    }
    Ok(path.to_path_buf())
}

/// The files of a projected source: every entry, or the listed items.
fn project(
    volume: &str,
    entries: Option<BTreeMap<String, Vec<u8>>>,
    items: Option<&Vec<KeyToPath>>,
    optional: bool,
    what: &str,
    default_mode: i32,
) -> Result<Vec<File>, VolumeError> {
    let Some(entries) = entries else {
        if optional {
            return Ok(Vec::new());
        }
        return Err(invalid(volume, format!("{what} not found")));
    };
    match items {
        None => entries
            .into_iter()
            .map(|(key, value)| Ok((relative(volume, &key)?, value, default_mode)))
            .collect(),
        Some(items) => items
            .iter()
            .filter_map(|item| match entries.get(&item.key) {
                Some(value) => Some(
                    relative(volume, &item.path)
                        .map(|p| (p, value.clone(), item.mode.unwrap_or(default_mode))),
                ),
                None if optional => None,
                None => Some(Err(invalid(
                    volume,
                    format!("{what} has no key {:?}", item.key),
                ))),
            })
            .collect(),
    }
}

fn downward_files(
    volume: &str,
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    downward: &Downward,
    default_mode: i32,
) -> Result<Vec<File>, VolumeError> {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or(&[]);
    items
        .iter()
        .map(|item| {
            let value = if let Some(r) = &item.field_ref {
                env::field(pod, &r.field_path, downward)
            } else if let Some(r) = &item.resource_field_ref {
                let container = containers
                    .iter()
                    .find(|c| Some(&c.name) == r.container_name.as_ref())
                    .ok_or_else(|| {
                        invalid(volume, "resourceFieldRef names no container of the pod")
                    })?;
                env::resource(
                    container,
                    &r.resource,
                    r.divisor.as_ref().map(|d| d.0.as_str()),
                    downward,
                )
            } else {
                return Err(invalid(
                    volume,
                    format!("item {:?} has no source", item.path),
                ));
            }
            .map_err(|e| invalid(volume, e.to_string()))?;
            Ok((
                relative(volume, &item.path)?,
                value.into_bytes(),
                item.mode.unwrap_or(default_mode),
            ))
        })
        .collect()
}

/// The files a file-backed volume holds, or None for other kinds.
fn files(
    volume: &Volume,
    pod: &Pod,
    refs: &Refs,
    downward: &Downward,
) -> Result<Option<Vec<File>>, VolumeError> {
    let name = volume.name.as_str();
    if let Some(source) = &volume.config_map {
        return project(
            name,
            refs.config_map(&source.name),
            source.items.as_ref(),
            source.optional.unwrap_or(false),
            &format!("configmap {:?}", source.name),
            source.default_mode.unwrap_or(0o644),
        )
        .map(Some);
    }
    if let Some(source) = &volume.secret {
        let secret = source.secret_name.clone().unwrap_or_default();
        return project(
            name,
            refs.secret(&secret),
            source.items.as_ref(),
            source.optional.unwrap_or(false),
            &format!("secret {secret:?}"),
            source.default_mode.unwrap_or(0o644),
        )
        .map(Some);
    }
    if let Some(source) = &volume.downward_api {
        let items = source.items.as_deref().unwrap_or(&[]);
        return downward_files(
            name,
            pod,
            items,
            downward,
            source.default_mode.unwrap_or(0o644),
        )
        .map(Some);
    }
    if let Some(source) = &volume.projected {
        let mode = source.default_mode.unwrap_or(0o644);
        let mut all = Vec::new();
        for part in source.sources.iter().flatten() {
            if let Some(c) = &part.config_map {
                all.extend(project(
                    name,
                    refs.config_map(&c.name),
                    c.items.as_ref(),
                    c.optional.unwrap_or(false),
                    &format!("configmap {:?}", c.name),
                    mode,
                )?);
            } else if let Some(s) = &part.secret {
                all.extend(project(
                    name,
                    refs.secret(&s.name),
                    s.items.as_ref(),
                    s.optional.unwrap_or(false),
                    &format!("secret {:?}", s.name),
                    mode,
                )?);
            } else if let Some(d) = &part.downward_api {
                all.extend(downward_files(
                    name,
                    pod,
                    d.items.as_deref().unwrap_or(&[]),
                    downward,
                    mode,
                )?);
            } else {
                return Err(invalid(
                    name,
                    "only configMap, secret and downwardAPI projections are supported",
                ));
            }
        }
        return Ok(Some(all));
    }
    Ok(None)
}

/// Makes the pod's volumes ready under `pod_dir/volumes`. With
/// `keep_written`, file-backed volumes already written are left as they
/// are: running containers (adopted by a restarted agent) mount them.
pub fn prepare(
    pod: &Pod,
    pod_dir: &Path,
    refs: &Refs,
    downward: &Downward,
    keep_written: bool,
) -> Result<BTreeMap<String, Ready>, VolumeError> {
    let mut ready = BTreeMap::new();
    for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let name = volume.name.as_str();
        let dir = pod_dir.join("volumes").join(name);
        let file_backed = volume.config_map.is_some()
            || volume.secret.is_some()
            || volume.downward_api.is_some()
            || volume.projected.is_some();
        if file_backed && keep_written && dir.is_dir() {
            ready.insert(
                name.to_string(),
                Ready {
                    path: dir,
                    read_only: true,
                },
            );
        } else if let Some(files) = files(volume, pod, refs, downward)? {
            // Written anew into a fresh directory, then swapped in, so a
            // container never sees half of it.
            let fresh = pod_dir.join("volumes").join(format!(".{name}.new"));
            let _ = std::fs::remove_dir_all(&fresh);
            for (path, bytes, mode) in files {
                let file = fresh.join(path);
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent).map_err(io(name, parent))?;
                }
                std::fs::write(&file, bytes).map_err(io(name, &file))?;
                let mode = u32::try_from(mode).unwrap_or(0o644) & 0o7777;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))
                    .map_err(io(name, &file))?;
            }
            std::fs::create_dir_all(&fresh).map_err(io(name, &fresh))?;
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&fresh, &dir).map_err(io(name, &dir))?;
            ready.insert(
                name.to_string(),
                Ready {
                    path: dir,
                    read_only: true,
                },
            );
        } else if volume.empty_dir.is_some() {
            std::fs::create_dir_all(&dir).map_err(io(name, &dir))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
                .map_err(io(name, &dir))?;
            ready.insert(
                name.to_string(),
                Ready {
                    path: dir,
                    read_only: false,
                },
            );
        } else if let Some(host) = &volume.host_path {
            let path = PathBuf::from(&host.path);
            if !path.is_absolute() {
                return Err(invalid(name, "hostPath must be absolute"));
            }
            check_host_path(name, &path, host.type_.as_deref().unwrap_or(""))?;
            ready.insert(
                name.to_string(),
                Ready {
                    path,
                    read_only: false,
                },
            );
        } else {
            return Err(invalid(
                name,
                "unsupported volume type (emptyDir, hostPath, configMap, secret, downwardAPI and projected are)",
            ));
        }
    }
    Ok(ready)
}

/// kubelet's hostPath type checks (and creations).
fn check_host_path(volume: &str, path: &Path, kind: &str) -> Result<(), VolumeError> {
    use std::os::unix::fs::FileTypeExt as _;
    // Read at each check: the OrCreate kinds create first.
    let is = |check: fn(&std::fs::FileType) -> bool| {
        std::fs::metadata(path).is_ok_and(|m| check(&m.file_type()))
    };
    let fail = |what: &str| {
        Err(invalid(
            volume,
            format!(
                "hostPath type check failed: {} is not {what}",
                path.display()
            ),
        ))
    };
    match kind {
        "" => Ok(()),
        "DirectoryOrCreate" => {
            if !path.exists() {
                std::fs::create_dir_all(path).map_err(io(volume, path))?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
                    .map_err(io(volume, path))?;
            }
            if is(std::fs::FileType::is_dir) {
                Ok(())
            } else {
                fail("a directory")
            }
        }
        "FileOrCreate" => {
            if !path.exists() {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(io(volume, path))?;
            }
            if is(std::fs::FileType::is_file) {
                Ok(())
            } else {
                fail("a file")
            }
        }
        "Directory" if is(std::fs::FileType::is_dir) => Ok(()),
        "File" if is(std::fs::FileType::is_file) => Ok(()),
        "Socket" if is(std::fs::FileType::is_socket) => Ok(()),
        "CharDevice" if is(std::fs::FileType::is_char_device) => Ok(()),
        "BlockDevice" if is(std::fs::FileType::is_block_device) => Ok(()),
        "Directory" => fail("a directory"),
        "File" => fail("a file"),
        "Socket" => fail("a socket"),
        "CharDevice" => fail("a character device"),
        "BlockDevice" => fail("a block device"),
        other => Err(invalid(volume, format!("unknown hostPath type {other:?}"))),
    }
}

/// The pod's /etc/hosts, as kubelet writes it.
pub fn hosts_file(pod: &Pod, pod_ip: &str) -> String {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let hostname = spec.and_then(|s| s.hostname.clone()).unwrap_or(name);
    let fqdn = match (
        spec.and_then(|s| s.subdomain.as_ref()),
        pod.metadata.namespace.as_ref(),
    ) {
        (Some(sub), Some(ns)) => format!("{hostname}.{sub}.{ns}.svc.cluster.local\t{hostname}"),
        _ => hostname,
    };
    let mut text = String::from(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    text.push_str(&format!("{pod_ip}\t{fqdn}\n"));
    for alias in spec.iter().flat_map(|s| s.host_aliases.iter().flatten()) {
        text.push_str(&format!(
            "{}\t{}\n",
            alias.ip,
            alias
                .hostnames
                .iter()
                .flatten()
                .cloned()
                .collect::<Vec<_>>()
                .join("\t")
        ));
    }
    text
}

/// A subPath of a volume, made if missing; refused if it leads out of
/// the volume (a symlink a container planted there would otherwise bind
/// the node's files into a later container, CVE-2017-1002101).
fn sub_path(volume: &str, root: &Path, sub: &str) -> Result<PathBuf, VolumeError> {
    let path = root.join(relative(volume, sub)?);
    if !path.exists() {
        std::fs::create_dir_all(&path).map_err(io(volume, &path))?;
    }
    let resolved = std::fs::canonicalize(&path).map_err(io(volume, &path))?;
    let root = std::fs::canonicalize(root).map_err(io(volume, root))?;
    if !resolved.starts_with(&root) {
        return Err(invalid(
            volume,
            format!("subPath {sub:?} leads out of the volume"),
        ));
    }
    Ok(resolved)
}

/// A container's mounts: its volumeMounts, then the pod's /etc/hosts
/// unless a mount covers it.
pub fn binds(
    container: &Container,
    volumes: &BTreeMap<String, Ready>,
    hosts: &Path,
) -> Result<Vec<Bind>, VolumeError> {
    let mut binds = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let ready = volumes
            .get(&mount.name)
            .ok_or_else(|| VolumeError::UnknownVolume {
                container: container.name.clone(),
                volume: mount.name.clone(),
            })?;
        if !mount.mount_path.starts_with('/') {
            return Err(VolumeError::RelativeMountPath {
                container: container.name.clone(),
                path: mount.mount_path.clone(),
            });
        }
        let source = match mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => sub_path(&mount.name, &ready.path, sub)?,
            None => ready.path.clone(),
        };
        binds.push(Bind {
            source,
            target: PathBuf::from(&mount.mount_path),
            read_only: ready.read_only || mount.read_only.unwrap_or(false),
        });
    }
    if !binds.iter().any(|b| b.target == Path::new("/etc/hosts")) {
        binds.push(Bind {
            source: hosts.to_path_buf(),
            target: PathBuf::from("/etc/hosts"),
            read_only: false,
        });
    }
    Ok(binds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn volumes_are_written_and_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host/data");
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "labels": {"tier": "web"}},
            "spec": {
                "hostAliases": [{"ip": "10.0.0.9", "hostnames": ["db", "db.local"]}],
                "containers": [{"name": "c", "volumeMounts": [
                    {"name": "cfg", "mountPath": "/etc/config"},
                    {"name": "scratch", "mountPath": "/scratch", "subPath": "part"},
                    {"name": "host", "mountPath": "/host", "readOnly": true},
                    {"name": "info", "mountPath": "/info"}
                ]}],
                "volumes": [
                    {"name": "cfg", "configMap": {"name": "settings", "items": [{"key": "a", "path": "sub/a.txt", "mode": 0o600}]}},
                    {"name": "scratch", "emptyDir": {}},
                    {"name": "host", "hostPath": {"path": host.display().to_string(), "type": "DirectoryOrCreate"}},
                    {"name": "info", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}
                ]
            }
        }))
        .unwrap();
        let mut refs = Refs::default();
        refs.config_maps.insert(
            "settings".into(),
            Some(serde_json::from_value(json!({"data": {"a": "alpha", "b": "beta"}})).unwrap()),
        );
        let ready = prepare(&pod, dir.path(), &refs, &Downward::default(), false).unwrap();
        let cfg = &ready["cfg"];
        assert!(cfg.read_only);
        assert_eq!(
            std::fs::read_to_string(cfg.path.join("sub/a.txt")).unwrap(),
            "alpha"
        );
        assert!(!cfg.path.join("b").exists(), "only the listed items");
        let mode = std::fs::metadata(cfg.path.join("sub/a.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(host.is_dir(), "DirectoryOrCreate made it");
        assert_eq!(
            std::fs::read_to_string(ready["info"].path.join("labels")).unwrap(),
            "tier=\"web\""
        );

        let hosts = dir.path().join("hosts");
        let container = &pod.spec.as_ref().unwrap().containers[0];
        let binds = binds(container, &ready, &hosts).unwrap();
        let targets: Vec<_> = binds
            .iter()
            .map(|b| (b.target.display().to_string(), b.read_only))
            .collect();
        assert_eq!(
            targets,
            [
                ("/etc/config".to_string(), true),
                ("/scratch".to_string(), false),
                ("/host".to_string(), true),
                ("/info".to_string(), true),
                ("/etc/hosts".to_string(), false),
            ]
        );
        assert!(binds[1].source.ends_with("scratch/part") && binds[1].source.is_dir());
        // A subPath through a symlink out of the volume is refused.
        std::os::unix::fs::symlink("/etc", ready["scratch"].path.join("escape")).unwrap();
        let mut escaping = container.clone();
        escaping.volume_mounts = Some(vec![
            serde_json::from_value(
                json!({"name": "scratch", "mountPath": "/x", "subPath": "escape"}),
            )
            .unwrap(),
        ]);
        assert!(super::binds(&escaping, &ready, &hosts).is_err());
        // Written volumes are kept when asked to.
        std::fs::write(cfg.path.join("sub/a.txt"), "changed").unwrap();
        let kept = prepare(&pod, dir.path(), &refs, &Downward::default(), true).unwrap();
        assert_eq!(
            std::fs::read_to_string(kept["cfg"].path.join("sub/a.txt")).unwrap(),
            "changed"
        );
        let text = hosts_file(&pod, "10.244.1.5");
        assert!(
            text.contains("10.244.1.5\tp\n") && text.contains("10.0.0.9\tdb\tdb.local\n"),
            "{text}"
        );
    }

    #[test]
    fn bad_volumes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pod = |volume: serde_json::Value| -> Pod {
            serde_json::from_value(
                json!({"metadata": {"name": "p"}, "spec": {"containers": [], "volumes": [volume]}}),
            )
            .unwrap()
        };
        let refs = Refs::default();
        for volume in [
            json!({"name": "v", "configMap": {"name": "absent"}}),
            json!({"name": "v", "hostPath": {"path": "/no/such/dir", "type": "Directory"}}),
            json!({"name": "v", "hostPath": {"path": "relative"}}),
            json!({"name": "v", "nfs": {"server": "s", "path": "/"}}),
        ] {
            assert!(
                prepare(
                    &pod(volume.clone()),
                    dir.path(),
                    &refs,
                    &Downward::default(),
                    false,
                )
                .is_err(),
                "{volume}"
            );
        }
        let optional = json!({"name": "v", "configMap": {"name": "absent", "optional": true}});
        assert!(
            prepare(
                &pod(optional),
                dir.path(),
                &refs,
                &Downward::default(),
                false
            )
            .is_ok()
        );
    }
}
