//! Pod and container cgroups: `pod<uid>/<container>` under a directory
//! of the node's (`wharf-pods-<node>`) in the cgroup v2 tree the agent
//! was given (so socket-LB, attached there, covers pods), and resource
//! limits through whichever hierarchy has the controller. On a unified
//! host that is cgroup v2 (`memory.max`, `cpu.max`, `cpu.weight`); on a
//! hybrid host such as this project's CI, v2 has no memory or cpu
//! controller (they are bound to v1 hierarchies), so the same limits go
//! to `/sys/fs/cgroup/{memory,cpu}/wharf-pods-<node>/...`
//! (`memory.limit_in_bytes`, `cpu.cfs_quota_us`, `cpu.shares`) and the
//! process joins both.

use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cgroup v2 mount: hybrid hosts (like this project's CI) have it at
/// /sys/fs/cgroup/unified, unified hosts at /sys/fs/cgroup.
pub fn v2_mount() -> PathBuf {
    let unified = PathBuf::from("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").exists() {
        unified
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

/// CFS period for CPU limits, as kubelet sets it (100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

/// What a container may use, from its resources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Bytes (limits.memory).
    pub memory: Option<u64>,
    /// Millicores (limits.cpu): a CFS quota.
    pub cpu_limit: Option<u64>,
    /// Millicores (requests.cpu): the share under contention.
    pub cpu_request: Option<u64>,
}

impl Limits {
    /// cgroup v1 `cpu.shares` for a CPU request (kubelet's formula: 1024
    /// per core, at least 2).
    fn shares(millicores: u64) -> u64 {
        (millicores * 1024 / 1000).max(2)
    }

    /// cgroup v2 `cpu.weight` for the same shares (the formula runc and
    /// systemd use to map [2, 262144] onto [1, 10000]).
    fn weight(millicores: u64) -> u64 {
        1 + (Self::shares(millicores) - 2) * 9999 / 262_142
    }

    fn quota(millicores: u64) -> u64 {
        // At least 1 ms, the kernel's minimum quota.
        (millicores * CPU_PERIOD_US / 1000).max(1000)
    }
}

/// A hierarchy's directory for this node's pods.
#[derive(Clone, Debug)]
struct Hierarchy {
    /// The hierarchy's (or the v2 subtree's) root.
    root: PathBuf,
    pods: PathBuf,
}

/// This node's pod cgroups.
#[derive(Clone, Debug)]
pub struct Cgroups {
    v2: Hierarchy,
    /// Where the cgroup2 file system holding `v2` is mounted.
    v2_mount: Option<PathBuf>,
    /// Where v1 hierarchies are mounted.
    v1_root: PathBuf,
    /// Controllers enabled for pods in v2.
    v2_memory: bool,
    v2_cpu: bool,
    /// v1 hierarchies standing in for v2's missing controllers.
    v1_memory: Option<Hierarchy>,
    v1_cpu: Option<Hierarchy>,
}

/// One container's cgroups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerCgroup {
    pub v2: PathBuf,
    pub v1: Vec<PathBuf>,
    memory_v1: Option<PathBuf>,
}

fn controllers(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("cgroup.controllers"))
        .map(|text| text.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io_error(path))
}

fn make_dir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(io_error(path)(e)),
        _ => Ok(()),
    }
}

impl Cgroups {
    /// Pods of node `node` under `v2_root` (the agent's `--cgroup`);
    /// `v1_root` is where v1 hierarchies are mounted
    /// (`/sys/fs/cgroup`). Nothing is created before the first pod.
    pub fn new(v2_root: &Path, v1_root: &Path, node: &str) -> Self {
        let dir = format!("wharf-pods-{node}");
        let available = controllers(v2_root);
        let in_v2 = |controller: &str| available.iter().any(|c| c == controller);
        let v1 = |controller: &str| {
            let root = v1_root.join(controller);
            (!in_v2(controller) && root.join("cgroup.procs").exists()).then(|| Hierarchy {
                pods: root.join(&dir),
                root,
            })
        };
        Self {
            v2_mount: cgroup2_mount(v2_root),
            v1_root: v1_root.to_path_buf(),
            v1_memory: v1("memory"),
            v1_cpu: v1("cpu"),
            v2_memory: in_v2("memory"),
            v2_cpu: in_v2("cpu"),
            v2: Hierarchy {
                root: v2_root.to_path_buf(),
                pods: v2_root.join(&dir),
            },
        }
    }

    /// The v2 controllers pods get, as `cgroup.subtree_control` wants
    /// them.
    fn v2_controllers(&self) -> String {
        let mut controllers = Vec::new();
        if self.v2_memory {
            controllers.push("+memory");
        }
        if self.v2_cpu {
            controllers.push("+cpu");
        }
        controllers.join(" ")
    }

    fn hierarchies(&self) -> impl Iterator<Item = &Hierarchy> {
        std::iter::once(&self.v2)
            .chain(self.v1_memory.as_ref())
            .chain(self.v1_cpu.as_ref())
    }

    /// Creates a container's cgroups with its limits.
    pub fn create(
        &self,
        pod_uid: &str,
        container: &str,
        limits: Limits,
    ) -> Result<ContainerCgroup, CgroupError> {
        let controllers = self.v2_controllers();
        let leaf = |h: &Hierarchy| -> Result<PathBuf, CgroupError> {
            make_dir(&h.pods)?;
            let pod = h.pods.join(format!("pod{pod_uid}"));
            make_dir(&pod)?;
            let dir = pod.join(container);
            // Anew for every start: a restarted container's OOM count
            // (memory.events) starts from zero.
            remove_dir(&dir)?;
            make_dir(&dir)?;
            Ok(dir)
        };
        if !controllers.is_empty() {
            // Delegated from the agent's cgroup down to the pod's; this
            // fails while processes sit in the agent's cgroup (v2's
            // no-internal-processes rule), and the container with it.
            write(&self.v2.root.join("cgroup.subtree_control"), &controllers)?;
            make_dir(&self.v2.pods)?;
            write(&self.v2.pods.join("cgroup.subtree_control"), &controllers)?;
        }
        let v2 = leaf(&self.v2)?;
        if !controllers.is_empty() {
            let pod = v2.parent().unwrap_or(&v2);
            write(&pod.join("cgroup.subtree_control"), &controllers)?;
        }
        if self.v2_memory {
            let max = limits.memory.map_or("max".into(), |m| m.to_string());
            write(&v2.join("memory.max"), &max)?;
        }
        if self.v2_cpu {
            let quota = limits
                .cpu_limit
                .map_or("max".into(), |m| Limits::quota(m).to_string());
            write(&v2.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            let weight = limits.cpu_request.map_or(1, Limits::weight);
            write(&v2.join("cpu.weight"), &weight.to_string())?;
        }
        let mut v1 = Vec::new();
        let mut memory_v1 = None;
        if let Some(h) = &self.v1_memory {
            let dir = leaf(h)?;
            // -1: unlimited (a restarted container's directory may hold
            // an older limit).
            let limit = limits.memory.map_or("-1".into(), |m| m.to_string());
            write(&dir.join("memory.limit_in_bytes"), &limit)?;
            memory_v1 = Some(dir.clone());
            v1.push(dir);
        }
        if let Some(h) = &self.v1_cpu {
            let dir = leaf(h)?;
            let quota = limits
                .cpu_limit
                .map_or("-1".into(), |m| Limits::quota(m).to_string());
            write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write(&dir.join("cpu.cfs_quota_us"), &quota)?;
            // No request: the minimum, as kubelet gives BestEffort.
            let shares = limits.cpu_request.map_or(2, Limits::shares);
            write(&dir.join("cpu.shares"), &shares.to_string())?;
            v1.push(dir);
        }
        Ok(ContainerCgroup { v2, v1, memory_v1 })
    }

    /// A container's cgroups as `create` made them (for an adopted
    /// instance).
    pub fn existing(&self, pod_uid: &str, container: &str) -> ContainerCgroup {
        let leaf = |h: &Hierarchy| h.pods.join(format!("pod{pod_uid}")).join(container);
        let memory_v1 = self.v1_memory.as_ref().map(leaf);
        ContainerCgroup {
            v2: leaf(&self.v2),
            v1: memory_v1
                .iter()
                .cloned()
                .chain(self.v1_cpu.as_ref().map(leaf))
                .collect(),
            memory_v1,
        }
    }

    /// Removes a pod's cgroups, off the runtime (see `remove_pod`).
    pub async fn release_pod(&self, pod_uid: &str) -> Result<(), CgroupError> {
        let (cgroups, uid) = (self.clone(), pod_uid.to_string());
        tokio::task::spawn_blocking(move || cgroups.remove_pod(&uid))
            .await
            .unwrap_or(Ok(()))
    }

    /// Removes a pod's cgroups, killing whatever still runs in them
    /// first; a cgroup still emptying is retried for a second.
    pub fn remove_pod(&self, pod_uid: &str) -> Result<(), CgroupError> {
        let _ = std::fs::write(
            self.v2
                .pods
                .join(format!("pod{pod_uid}"))
                .join("cgroup.kill"),
            "1",
        );
        for h in self.hierarchies() {
            let pod = h.pods.join(format!("pod{pod_uid}"));
            let Ok(entries) = std::fs::read_dir(&pod) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_dir(&entry.path())?;
                }
            }
            remove_dir(&pod)?;
        }
        Ok(())
    }

    /// The pod uids that have cgroups here, in any hierarchy.
    pub fn pods(&self) -> Vec<String> {
        let mut uids: Vec<String> = self
            .hierarchies()
            .flat_map(|h| std::fs::read_dir(&h.pods).into_iter().flatten().flatten())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("pod")
                    .map(str::to_string)
            })
            .collect();
        uids.sort();
        uids.dedup();
        uids
    }

    /// Removes the node's pod directories (teardown; pods must be gone).
    pub fn remove_all(&self) -> Result<(), CgroupError> {
        for uid in self.pods() {
            self.remove_pod(&uid)?;
        }
        for h in self.hierarchies() {
            if h.pods != h.root {
                remove_dir(&h.pods)?;
            }
        }
        Ok(())
    }
}

/// The mount point of the cgroup2 file system `dir` is in: the longest
/// cgroup2 mount (from /proc/self/mountinfo) that is a prefix of it.
fn cgroup2_mount(dir: &Path) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            let point = fields.split(' ').nth(4)?;
            (rest.split(' ').next() == Some("cgroup2")).then(|| PathBuf::from(point))
        })
        .filter(|point| dir.starts_with(point))
        .max_by_key(|point| point.as_os_str().len())
}

/// Removes a cgroup directory, its children first.
fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    let Ok(children) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for child in children.flatten() {
        if child.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&child.path())?;
        }
    }
    remove_dir(dir)
}

impl Cgroups {
    /// Pod `uid`'s cgroup as a path from the hierarchies' roots, for a
    /// CRI runtime that makes it (the sandbox's `cgroup_parent`): the
    /// same place in the v2 tree as the process runtime's, so socket-LB
    /// covers both; runc makes it in every v1 hierarchy too.
    pub fn pod_parent(&self, pod_uid: &str) -> Option<String> {
        let relative = self.v2.pods.strip_prefix(self.v2_mount.as_ref()?).ok()?;
        Some(format!("/{}/pod{pod_uid}", relative.display()))
    }

    /// Removes what a CRI runtime left of pod `uid`'s cgroup (runc
    /// removes its containers' cgroups but not their parent), in every
    /// hierarchy; the containers must be gone.
    pub async fn release_runtime_pod(&self, pod_uid: &str) -> Result<(), CgroupError> {
        let Some(parent) = self.pod_parent(pod_uid) else {
            return Ok(());
        };
        let roots: Vec<PathBuf> = std::fs::read_dir(&self.v1_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .chain(self.v2_mount.clone())
            .collect();
        tokio::task::spawn_blocking(move || {
            for root in roots {
                remove_tree(&root.join(parent.trim_start_matches('/')))?;
            }
            Ok(())
        })
        .await
        .unwrap_or(Ok(()))
    }
}

fn remove_dir(path: &Path) -> Result<(), CgroupError> {
    for _ in 0..100 {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io_error(path)(e)),
        }
    }
    std::fs::remove_dir(path).map_err(io_error(path))
}

impl ContainerCgroup {
    /// Kills whatever is left in the container's cgroup v2 directory
    /// (`cgroup.kill`, Linux 5.14): processes an exec started that
    /// outlived the container's first process.
    pub fn kill_all(&self) {
        let _ = std::fs::write(self.v2.join("cgroup.kill"), "1");
    }

    /// Whether the kernel's OOM killer has killed a process here.
    pub fn oom_killed(&self) -> bool {
        let count = |path: PathBuf| {
            std::fs::read_to_string(path).ok().and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
        };
        count(self.v2.join("memory.events")).unwrap_or(0) > 0
            || self
                .memory_v1
                .as_ref()
                .and_then(|dir| count(dir.join("memory.oom_control")))
                .unwrap_or(0)
                > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_requests_and_limits_map_as_kubelet_maps_them() {
        assert_eq!(Limits::shares(1000), 1024);
        assert_eq!(Limits::shares(1), 2);
        assert_eq!(Limits::weight(1000), 39);
        assert_eq!(Limits::weight(1), 1);
        assert_eq!(Limits::quota(500), 50_000);
        assert_eq!(Limits::quota(1), 1000);
    }
}
