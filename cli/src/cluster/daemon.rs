//! The cluster's long-running processes (etcd, wharf-control, one agent
//! per node): started detached from the command that made them, each in
//! its own session, network namespace and cgroup, and known afterwards by
//! pid *and* start time, so a recycled pid is never signalled.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// What a daemon is and how to start it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Daemon {
    /// `etcd`, `control`, or the node's short name.
    pub role: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The network namespace it runs in (`/run/netns/<name>`); the
    /// host's if none.
    pub netns: Option<String>,
    /// The cgroup v2 directory it starts in.
    pub cgroup: PathBuf,
    /// Its stdout and stderr, appended to.
    pub log: PathBuf,
}

/// A started daemon: pid and start time (clock ticks since boot,
/// `/proc/<pid>/stat` field 22).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    pub pid: i32,
    pub start: u64,
}

/// Why a daemon could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{role}: cannot prepare {path}: {source}")]
    Prepare {
        role: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{role}: cannot start {program}: {source}")]
    Spawn {
        role: String,
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Daemon {
    /// The daemon's command: in its own session (no terminal signals
    /// reach it), its namespace and cgroup, both entered before exec so
    /// nothing it starts is ever outside them, its output to its log.
    pub fn command(&self) -> Result<Command, DaemonError> {
        let prepare = |path: &Path| {
            let path = path.to_path_buf();
            let role = self.role.clone();
            move |source| DaemonError::Prepare { role, path, source }
        };
        if let Some(parent) = self.log.parent() {
            fs::create_dir_all(parent).map_err(prepare(parent))?;
        }
        fs::create_dir_all(&self.cgroup).map_err(prepare(&self.cgroup))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(prepare(&self.log))?;
        let procs = self.cgroup.join("cgroup.procs");
        let cgroup = OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(prepare(&procs))?;
        let netns = match &self.netns {
            Some(name) => {
                let path = Path::new("/run/netns").join(name);
                Some(File::open(&path).map_err(prepare(&path))?)
            }
            None => None,
        };
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(prepare(&self.log))?)
            .stderr(log);
        // SAFETY: the closure runs in the forked child before exec and
        // makes only async-signal-safe system calls (setsid, setns,
        // write) on descriptors it owns, open until the command is
        // dropped.
        unsafe {
            command.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(netns) = &netns
                    && libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process.
                if libc::write(cgroup.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command)
    }

    /// Starts the daemon, detached: it outlives this process.
    pub fn start(&self) -> Result<Running, DaemonError> {
        let child = self
            .command()?
            .spawn()
            .map_err(|source| self.spawn_error(source))?;
        let pid = i32::try_from(child.id()).expect("pids fit in i32");
        // Reaped by init once this command exits; until then a zombie,
        // which `alive` does not count as running.
        drop(child);
        Ok(Running {
            pid,
            start: start_time(pid).unwrap_or(0),
        })
    }

    /// Runs it to its end instead (a one-off such as a teardown).
    pub fn run(&self) -> Result<std::process::ExitStatus, DaemonError> {
        self.command()?
            .status()
            .map_err(|source| self.spawn_error(source))
    }

    fn spawn_error(&self, source: std::io::Error) -> DaemonError {
        DaemonError::Spawn {
            role: self.role.clone(),
            program: self.program.clone(),
            source,
        }
    }
}

/// A process's start time, if it exists and is not a zombie.
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: fields after it are
    // counted from its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // rest starts at field 3 (state); field 22 is starttime.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

impl Running {
    /// Whether this very process still runs.
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start)
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`; returns
    /// once it is gone.
    pub fn stop(&self, grace: Duration) {
        if !self.alive() {
            return;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while self.alive() {
            if Instant::now() > deadline {
                self.signal(libc::SIGKILL);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, signal: i32) {
        if self.alive() {
            // SAFETY: kill(2) on a pid whose start time was just checked;
            // the worst case of a race is a signal to a process that
            // exited, which kill reports as ESRCH.
            unsafe {
                libc::kill(self.pid, signal);
            }
        }
    }
}

/// Kills every process in the cgroup `dir` and below (cgroup v2's
/// `cgroup.kill`, Linux 5.14) and removes the directories, deepest
/// first. Missing directories are fine.
pub fn remove_cgroup(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(mut kill) = OpenOptions::new().write(true).open(dir.join("cgroup.kill")) {
        let _ = kill.write_all(b"1");
    }
    remove_tree(dir)
}

/// Removes `relative` (a cgroup path, e.g. `wharf/<cluster>`) from every
/// cgroup v1 hierarchy beside the v2 mount `v2_mount`, children first;
/// its processes must be gone (killed through the v2 tree).
pub fn remove_v1_cgroups(v2_mount: &Path, relative: &Path) -> std::io::Result<()> {
    let Some(root) = v2_mount.parent() else {
        return Ok(());
    };
    let Ok(hierarchies) = fs::read_dir(root) else {
        return Ok(());
    };
    for hierarchy in hierarchies.flatten() {
        let path = hierarchy.path();
        if path == v2_mount || !hierarchy.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = path.join(relative);
        if dir.exists() {
            remove_tree(&dir)?;
            // The clusters' common parent goes with the last of them.
            if let Some(parent) = dir.parent() {
                let _ = fs::remove_dir(parent);
            }
        }
    }
    Ok(())
}

/// Detaches every mount below `dir`, deepest first (what a killed
/// containerd left: overlay root filesystems, sandbox shm).
pub fn unmount_below(dir: &Path) {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut targets: Vec<&str> = mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|target| Path::new(target).starts_with(dir))
        .collect();
    targets.sort_by_key(|target| std::cmp::Reverse(target.len()));
    for target in targets {
        let Ok(target) = std::ffi::CString::new(target) else {
            continue;
        };
        // SAFETY: `target` is a valid NUL-terminated path; a failure (not
        // mounted any more) leaves nothing to undo.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

fn remove_tree(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    // A killed process leaves its cgroup once it has exited: rmdir says
    // EBUSY until then (a few milliseconds).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_read_and_a_recycled_pid_is_not_alive() {
        let me = i32::try_from(std::process::id()).unwrap();
        let start = start_time(me).expect("this process's start time");
        assert!(Running { pid: me, start }.alive());
        assert!(
            !Running {
                pid: me,
                start: start + 1
            }
            .alive()
        );
    }
}
