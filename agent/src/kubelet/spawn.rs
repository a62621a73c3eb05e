//! Starting a process in a container, the way runc does it but in one
//! step: a `clone3` (fork-like, so the child continues here) that makes
//! the new namespaces, puts the child in its cgroup v2 directory and
//! hands back a pidfd; the child then joins the pod's network namespace,
//! builds its root and execs. A failure in the child is reported through
//! a close-on-exec pipe as (step, errno), so the caller learns which step
//! failed; a successful exec closes the pipe.
//!
//! A container's root is an overlay whose lower layer is the node's own
//! root filesystem and whose upper layer is a tmpfs private to the
//! container: the process runtime runs commands from the node's
//! filesystem (there is no image), and whatever the container writes,
//! and every mount point it needs, stays in its own layer and goes with
//! it. `/proc` is its own, `/dev` and `/sys` are the node's.
//!
//! Everything the child touches is prepared before the clone: after a
//! fork of a multi-threaded process only async-signal-safe calls are
//! allowed (no allocation, no locks), so the child only makes syscalls
//! on prepared C strings and descriptors.

use std::{
    ffi::{CStr, CString},
    fs::File,
    io::Read as _,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use tokio::io::unix::AsyncFd;

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{what} contains a NUL byte")]
    Nul { what: String },
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{step}: {source}")]
    Syscall {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("in the new process, {step} failed: {source}")]
    Child {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What the child did last before failing: its index is what it reports.
const STEPS: &[&str] = &[
    "joining the pod's network namespace",
    "joining a namespace of the container",
    "joining a cgroup",
    "making mounts private",
    "mounting the container's writable layer",
    "creating the overlay's directories",
    "mounting the overlay root",
    "mounting /proc",
    "binding /dev",
    "binding /sys",
    "creating a volume's mount point",
    "binding a volume",
    "making a volume read-only",
    "pivoting into the container's root",
    "detaching the node's root",
    "changing to the working directory",
    "setting the hostname",
    "dropping supplementary groups",
    "setting the group",
    "setting the user",
    "redirecting standard streams",
    "executing the command",
];

/// The step names' indexes, kept in the order of `STEPS`.
#[derive(Clone, Copy)]
#[repr(u32)]
enum Step {
    JoinPodNetwork,
    JoinNamespace,
    JoinCgroup,
    MakePrivate,
    MountLayer,
    MakeLayerDirs,
    MountOverlay,
    MountProc,
    BindDev,
    BindSys,
    MakeMountPoint,
    BindVolume,
    RemountReadOnly,
    PivotRoot,
    DetachOldRoot,
    Chdir,
    Hostname,
    Setgroups,
    Setgid,
    Setuid,
    Dup,
    Exec,
}

// Every step has its name.
const _: () = assert!(STEPS.len() == Step::Exec as usize + 1);

/// A directory or file made visible inside the container.
#[derive(Clone, Debug)]
pub struct Bind {
    pub source: PathBuf,
    /// Absolute, inside the container.
    pub target: PathBuf,
    pub read_only: bool,
}

/// Where a new process lives.
#[derive(Debug)]
pub enum Placement {
    /// A container of its own: new PID, mount, UTS and IPC namespaces in
    /// the pod's network namespace, with an overlay root built in `stage`
    /// (an empty directory of the node's).
    Container {
        netns: PathBuf,
        hostname: String,
        stage: PathBuf,
        binds: Vec<Bind>,
    },
    /// Inside the container whose first process `pidfd` refers to (exec
    /// probes and hooks): its network, IPC, UTS and mount namespaces,
    /// joined through the pidfd, so a recycled pid cannot misdirect it.
    Inside { pidfd: OwnedFd },
}

/// One process to start.
#[derive(Debug)]
pub struct Spec {
    /// argv; the first word is looked up in the `PATH` of `env`.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Inside the container; `/` when empty.
    pub working_dir: String,
    pub placement: Placement,
    /// cgroup v2 directory the process starts in.
    pub cgroup: Option<PathBuf>,
    /// Further cgroup directories (cgroup v1 hierarchies) it joins.
    pub v1_cgroups: Vec<PathBuf>,
    pub user: Option<u32>,
    pub group: Option<u32>,
    /// Its standard output and error (standard input is /dev/null).
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// Kill (and reap) it if its `Process` is dropped before it ended:
    /// for commands run inside a container, never for containers, which
    /// outlive the agent.
    pub kill_on_drop: bool,
}

/// `struct clone_args` (linux/sched.h), the first 88 bytes (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

fn c_string(what: &str, bytes: &[u8]) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError::Nul { what: what.into() })
}

fn c_path(path: &Path) -> Result<CString, SpawnError> {
    c_string(&path.display().to_string(), path.as_os_str().as_bytes())
}

fn open(path: &Path, flags: libc::c_int) -> Result<OwnedFd, SpawnError> {
    let c = c_path(path)?;
    // SAFETY: open(2) on a NUL-terminated path; the result is checked
    // before it is owned.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(SpawnError::Open {
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a descriptor just opened and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Finds `program` as execvp would, in `path` (a `PATH` value).
fn look_up(program: &str, path: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| {
            std::fs::metadata(candidate).is_ok_and(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
        })
}

/// The default `PATH` inside containers (runc's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A mount of the root the child builds.
struct PreparedBind {
    source: CString,
    /// Directories to create, outermost first, so the target exists.
    dirs: Vec<CString>,
    /// A file to create when the source is a file.
    file: Option<CString>,
    target: CString,
    read_only: bool,
}

struct PreparedRoot {
    stage: CString,
    layer_dirs: [CString; 3],
    root: CString,
    overlay: CString,
    proc_dir: CString,
    dev_dir: CString,
    sys_dir: CString,
    binds: Vec<PreparedBind>,
    hostname: CString,
}

/// Everything the child needs, ready before the clone.
struct Prepared {
    program: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    working_dir: CString,
    /// (descriptor, namespace type) to setns into, in order.
    namespaces: Vec<(OwnedFd, libc::c_int)>,
    root: Option<PreparedRoot>,
    v1_cgroups: Vec<OwnedFd>,
    user: Option<u32>,
    group: Option<u32>,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    new_namespaces: u64,
    kill_on_drop: bool,
}

fn prepare_root(stage: &Path, hostname: &str, binds: &[Bind]) -> Result<PreparedRoot, SpawnError> {
    let root = stage.join("root");
    let inside = |path: &Path| root.join(path.strip_prefix("/").unwrap_or(path));
    let mut prepared = Vec::new();
    for bind in binds {
        let target = inside(&bind.target);
        let source_is_file = std::fs::metadata(&bind.source).is_ok_and(|m| !m.is_dir());
        let dir_of_target = if source_is_file {
            target.parent().unwrap_or(&root).to_path_buf()
        } else {
            target.clone()
        };
        let mut dirs = Vec::new();
        for ancestor in dir_of_target.ancestors() {
            if ancestor == root {
                break;
            }
            dirs.push(c_path(ancestor)?);
        }
        dirs.reverse();
        prepared.push(PreparedBind {
            source: c_path(&bind.source)?,
            dirs,
            file: source_is_file.then(|| c_path(&target)).transpose()?,
            target: c_path(&target)?,
            read_only: bind.read_only,
        });
    }
    let overlay = format!(
        "lowerdir=/,upperdir={},workdir={}",
        stage.join("upper").display(),
        stage.join("work").display()
    );
    Ok(PreparedRoot {
        stage: c_path(stage)?,
        layer_dirs: [
            c_path(&stage.join("upper"))?,
            c_path(&stage.join("work"))?,
            c_path(&root)?,
        ],
        overlay: c_string("overlay options", overlay.as_bytes())?,
        proc_dir: c_path(&root.join("proc"))?,
        dev_dir: c_path(&root.join("dev"))?,
        sys_dir: c_path(&root.join("sys"))?,
        root: c_path(&root)?,
        binds: prepared,
        hostname: c_string("hostname", hostname.as_bytes())?,
    })
}

fn prepare(spec: Spec) -> Result<(Prepared, Option<OwnedFd>), SpawnError> {
    let path = spec
        .env
        .iter()
        .rev()
        .find(|(name, _)| name == "PATH")
        .map_or(DEFAULT_PATH, |(_, value)| value.as_str());
    let first = spec.argv.first().ok_or_else(|| SpawnError::Child {
        step: STEPS[Step::Exec as usize],
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no command"),
    })?;
    let program = look_up(first, path).ok_or_else(|| SpawnError::Child {
        step: STEPS[Step::Exec as usize],
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{first:?}: executable file not found in $PATH"),
        ),
    })?;
    let argv = spec
        .argv
        .iter()
        .map(|arg| c_string("an argument", arg.as_bytes()))
        .collect::<Result<_, _>>()?;
    let env = spec
        .env
        .iter()
        .map(|(name, value)| {
            c_string(
                &format!("variable {name}"),
                format!("{name}={value}").as_bytes(),
            )
        })
        .collect::<Result<_, _>>()?;
    let working_dir = if spec.working_dir.is_empty() {
        "/"
    } else {
        spec.working_dir.as_str()
    };
    let (namespaces, root, new_namespaces) = match &spec.placement {
        Placement::Container {
            netns,
            hostname,
            stage,
            binds,
        } => (
            vec![(open(netns, libc::O_RDONLY)?, libc::CLONE_NEWNET)],
            Some(prepare_root(stage, hostname, binds)?),
            (libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC)
                as u64,
        ),
        Placement::Inside { pidfd } => {
            let pidfd = pidfd.try_clone().map_err(|source| SpawnError::Syscall {
                step: "duplicating the container's pidfd",
                source,
            })?;
            // setns(2) with a pidfd joins several namespaces at once.
            let kinds =
                libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNS;
            (vec![(pidfd, kinds)], None, 0)
        }
    };
    let cgroup = spec
        .cgroup
        .as_deref()
        .map(|dir| open(dir, libc::O_RDONLY | libc::O_DIRECTORY))
        .transpose()?;
    let v1_cgroups = spec
        .v1_cgroups
        .iter()
        .map(|dir| open(&dir.join("cgroup.procs"), libc::O_WRONLY))
        .collect::<Result<_, _>>()?;
    let prepared = Prepared {
        program: c_path(&program)?,
        argv,
        env,
        working_dir: c_string("working directory", working_dir.as_bytes())?,
        namespaces,
        root,
        v1_cgroups,
        user: spec.user,
        group: spec.group,
        stdin: open(Path::new("/dev/null"), libc::O_RDONLY)?,
        stdout: spec.stdout,
        stderr: spec.stderr,
        new_namespaces,
        kill_on_drop: spec.kill_on_drop,
    };
    Ok((prepared, cgroup))
}

/// Starts the process; returns its pidfd and pid once it has exec'd.
/// Blocks until then (mounts take a few milliseconds): call it from a
/// blocking thread.
pub fn spawn(spec: Spec) -> Result<Process, SpawnError> {
    let (prepared, cgroup) = prepare(spec)?;
    let mut report = [0; 2];
    // SAFETY: pipe2(2) fills the two-element array.
    if unsafe { libc::pipe2(report.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(SpawnError::Syscall {
            step: "creating the report pipe",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: both descriptors were just created and are owned here.
    let (report_read, report_write) = unsafe {
        (
            File::from_raw_fd(report[0]),
            OwnedFd::from_raw_fd(report[1]),
        )
    };
    let argv: Vec<*const libc::c_char> = prepared
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = prepared
        .env
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let mut pidfd: RawFd = -1;
    let mut args = CloneArgs {
        flags: CLONE_PIDFD | prepared.new_namespaces,
        pidfd: std::ptr::addr_of_mut!(pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if let Some(cgroup) = &cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = cgroup.as_raw_fd() as u64;
    }
    // SAFETY: clone3 without CLONE_VM or a stack behaves like fork: the
    // child gets a copy of this address space and returns 0 here. The
    // child only runs `child`, which makes async-signal-safe syscalls on
    // data prepared above and never returns.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::addr_of_mut!(args),
            size_of::<CloneArgs>(),
        )
    };
    if pid == 0 {
        // SAFETY: in the child, see above.
        unsafe { child(&prepared, &argv, &envp, report_write.as_raw_fd()) }
    }
    if pid < 0 {
        return Err(SpawnError::Syscall {
            step: "clone3",
            source: std::io::Error::last_os_error(),
        });
    }
    drop(report_write);
    // SAFETY: CLONE_PIDFD stored a new descriptor owned by this process.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let process = Process::new(pidfd, pid as i32, prepared.kill_on_drop)?;
    let mut failure = [0u8; 8];
    let mut read = 0;
    let mut report_read = report_read;
    while read < failure.len() {
        match report_read.read(&mut failure[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(SpawnError::Syscall {
                    step: "reading the report pipe",
                    source,
                });
            }
        }
    }
    if read == 0 {
        return Ok(process);
    }
    // The child failed and exits; reap it.
    let _ = process.reap_blocking();
    let step = u32::from_ne_bytes(failure[..4].try_into().unwrap_or_default());
    let errno = i32::from_ne_bytes(failure[4..].try_into().unwrap_or_default());
    Err(SpawnError::Child {
        step: STEPS
            .get(step as usize)
            .copied()
            .unwrap_or("an unknown step"),
        source: std::io::Error::from_raw_os_error(errno),
    })
}

/// Reports `step` and the current errno on `report`, then exits.
///
/// # Safety
/// Only in the child of `spawn`.
unsafe fn fail(report: RawFd, step: Step) -> ! {
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let mut message = [0u8; 8];
    message[..4].copy_from_slice(&(step as u32).to_ne_bytes());
    message[4..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: write(2) and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(report, message.as_ptr().cast(), message.len());
        libc::_exit(127)
    }
}

/// The child's side: namespaces, cgroups, root, identity, streams, exec.
///
/// # Safety
/// Only in the child of `spawn`'s clone3: it makes only async-signal-safe
/// syscalls on memory prepared before the clone.
unsafe fn child(
    prepared: &Prepared,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    report: RawFd,
) -> ! {
    // SAFETY: each call below is a plain syscall wrapper on descriptors
    // and NUL-terminated strings prepared before the clone; on failure
    // `fail` reports and exits.
    unsafe {
        // Rust ignores SIGPIPE and an ignored signal stays ignored across
        // exec; the container gets the default, as std::process does.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

        for (fd, kind) in &prepared.namespaces {
            if libc::setns(fd.as_raw_fd(), *kind) != 0 {
                let step = if *kind == libc::CLONE_NEWNET && prepared.root.is_some() {
                    Step::JoinPodNetwork
                } else {
                    Step::JoinNamespace
                };
                fail(report, step);
            }
        }
        for fd in &prepared.v1_cgroups {
            if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                fail(report, Step::JoinCgroup);
            }
        }
        if let Some(root) = &prepared.root {
            build_root(root, report);
        }
        if libc::chdir(prepared.working_dir.as_ptr()) != 0 {
            fail(report, Step::Chdir);
        }
        if let Some(root) = &prepared.root
            && libc::sethostname(root.hostname.as_ptr(), root.hostname.as_bytes().len()) != 0
        {
            fail(report, Step::Hostname);
        }
        // Raw syscalls: glibc's wrappers synchronise the change across
        // the threads it believes exist (the parent's, copied), which
        // can deadlock in a child of clone3.
        if (prepared.user.is_some() || prepared.group.is_some())
            && libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
        {
            fail(report, Step::Setgroups);
        }
        if let Some(group) = prepared.group
            && libc::syscall(libc::SYS_setresgid, group, group, group) != 0
        {
            fail(report, Step::Setgid);
        }
        if let Some(user) = prepared.user
            && libc::syscall(libc::SYS_setresuid, user, user, user) != 0
        {
            fail(report, Step::Setuid);
        }
        for (fd, target) in [
            (&prepared.stdin, 0),
            (&prepared.stdout, 1),
            (&prepared.stderr, 2),
        ] {
            if libc::dup2(fd.as_raw_fd(), target) < 0 {
                fail(report, Step::Dup);
            }
        }
        libc::execve(prepared.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(report, Step::Exec)
    }
}

/// mount(2), or report `step` and exit.
///
/// # Safety
/// Only in the child of `spawn`.
unsafe fn mount(
    report: RawFd,
    step: Step,
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) {
    let pointer = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: mount(2) on NUL-terminated strings (or null) prepared
    // before the clone; `fail` is async-signal-safe.
    unsafe {
        if libc::mount(
            pointer(source),
            target.as_ptr(),
            pointer(fstype),
            flags,
            pointer(data).cast(),
        ) != 0
        {
            fail(report, step);
        }
    }
}

/// Builds the overlay root and pivots into it.
///
/// # Safety
/// Only in the child of `spawn`, in its own mount namespace.
unsafe fn build_root(root: &PreparedRoot, report: RawFd) {
    let rbind = libc::MS_BIND | libc::MS_REC;
    // SAFETY: as in `child`: syscalls on prepared strings.
    unsafe {
        mount(
            report,
            Step::MakePrivate,
            None,
            c"/",
            None,
            libc::MS_REC | libc::MS_PRIVATE,
            None,
        );
        let tmpfs = Some(c"tmpfs");
        mount(
            report,
            Step::MountLayer,
            tmpfs,
            &root.stage,
            tmpfs,
            libc::MS_NODEV,
            Some(c"mode=0755"),
        );
        for dir in &root.layer_dirs {
            if libc::mkdir(dir.as_ptr(), 0o755) != 0 {
                fail(report, Step::MakeLayerDirs);
            }
        }
        let overlay = Some(c"overlay");
        mount(
            report,
            Step::MountOverlay,
            overlay,
            &root.root,
            overlay,
            0,
            Some(&root.overlay),
        );
        let proc = Some(c"proc");
        let no_exec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        mount(
            report,
            Step::MountProc,
            proc,
            &root.proc_dir,
            proc,
            no_exec,
            None,
        );
        mount(
            report,
            Step::BindDev,
            Some(c"/dev"),
            &root.dev_dir,
            None,
            rbind,
            None,
        );
        mount(
            report,
            Step::BindSys,
            Some(c"/sys"),
            &root.sys_dir,
            None,
            rbind,
            None,
        );
        for bind in &root.binds {
            for dir in &bind.dirs {
                if libc::mkdir(dir.as_ptr(), 0o755) != 0
                    && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                {
                    fail(report, Step::MakeMountPoint);
                }
            }
            if let Some(file) = &bind.file {
                let fd = libc::open(
                    file.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                );
                if fd < 0 {
                    fail(report, Step::MakeMountPoint);
                }
                libc::close(fd);
            }
            mount(
                report,
                Step::BindVolume,
                Some(&bind.source),
                &bind.target,
                None,
                rbind,
                None,
            );
            if bind.read_only {
                let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
                mount(
                    report,
                    Step::RemountReadOnly,
                    None,
                    &bind.target,
                    None,
                    flags,
                    None,
                );
            }
        }
        if libc::chdir(root.root.as_ptr()) != 0 {
            fail(report, Step::PivotRoot);
        }
        // pivot_root(".", ".") stacks the old root on the new one; the
        // detach below removes it (as runc does).
        if libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0 {
            fail(report, Step::PivotRoot);
        }
        if libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0 {
            fail(report, Step::DetachOldRoot);
        }
    }
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// The process was adopted (started by an earlier agent), so its
    /// status went to someone else.
    Unknown,
}

impl Exit {
    /// The exit code Kubernetes reports (128 + signal for a signal).
    pub fn code(self) -> i32 {
        match self {
            Self::Code(code) => code,
            Self::Signal(signal) => 128 + signal,
            Self::Unknown => 137,
        }
    }
}

/// A started (or adopted) process, through its pidfd: signals and waits
/// never reach a recycled pid.
#[derive(Debug)]
pub struct Process {
    pidfd: AsyncFd<OwnedFd>,
    pub pid: i32,
    /// The exit once reaped: a process is reaped once, and every waiter
    /// (the worker's, a stop's) learns the same exit.
    exit: std::sync::Mutex<Option<Exit>>,
    kill_on_drop: bool,
}

impl Drop for Process {
    fn drop(&mut self) {
        let reaped = self
            .exit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some();
        if !self.kill_on_drop || reaped {
            return;
        }
        self.signal(libc::SIGKILL);
        // Reaped off the runtime: a killed process ends at once, but
        // waitid blocks until it has.
        if let Ok(pidfd) = self.pidfd.get_ref().try_clone() {
            std::thread::spawn(move || {
                // SAFETY: siginfo_t is plain data; waitid(2) fills it.
                let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                // SAFETY: a blocking waitid on a pidfd this thread owns.
                unsafe {
                    libc::waitid(
                        libc::P_PIDFD,
                        pidfd.as_raw_fd() as libc::id_t,
                        &mut info,
                        libc::WEXITED,
                    )
                };
            });
        }
    }
}

impl Process {
    fn new(pidfd: OwnedFd, pid: i32, kill_on_drop: bool) -> Result<Self, SpawnError> {
        // SAFETY: an OwnedFd keeps its descriptor open and unchanged
        // until the AsyncFd that owns it is dropped.
        let pidfd =
            unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
                .map_err(|e| SpawnError::Syscall {
                    step: "registering the pidfd",
                    source: e.into(),
                })?;
        Ok(Self {
            pidfd,
            pid,
            exit: std::sync::Mutex::new(None),
            kill_on_drop,
        })
    }

    /// A process started by an earlier agent, if `pid` is still the one
    /// that started at `start_time` (clock ticks since boot, as
    /// /proc/PID/stat has it).
    pub fn adopt(pid: i32, start_time: u64) -> Option<Self> {
        // SAFETY: pidfd_open(2) returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a descriptor just opened and owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // Checked after opening: the pidfd pins this process, so a match
        // now cannot turn into a recycled pid later.
        if start_time_of(pid) != Some(start_time) {
            return None;
        }
        Self::new(pidfd, pid, false).ok()
    }

    /// A second descriptor for the process (to join its namespaces).
    pub fn pidfd(&self) -> std::io::Result<OwnedFd> {
        self.pidfd.get_ref().try_clone()
    }

    /// Sends `signal` (through the pidfd); false once the process is
    /// gone.
    pub fn signal(&self, signal: i32) -> bool {
        // SAFETY: pidfd_send_signal(2) on a descriptor this struct owns.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.get_ref().as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            ) == 0
        }
    }

    /// Waits for the process to end and reaps it.
    pub async fn wait(&self) -> Exit {
        loop {
            let Ok(mut guard) = self.pidfd.readable().await else {
                return Exit::Unknown;
            };
            match self.reap() {
                Some(exit) => return exit,
                None => guard.clear_ready(),
            }
        }
    }

    fn reap_blocking(&self) -> Exit {
        loop {
            if let Some(exit) = self.reap() {
                return exit;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// The exit, if the process has ended.
    fn reap(&self) -> Option<Exit> {
        let mut reaped = self
            .exit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if reaped.is_none() {
            *reaped = self.try_reap();
        }
        *reaped
    }

    fn try_reap(&self) -> Option<Exit> {
        // SAFETY: siginfo_t is plain data; waitid(2) fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on this struct's pidfd, WNOHANG.
        let result = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.pidfd.get_ref().as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        if result != 0 {
            // ECHILD: not our child (adopted); it has ended when the
            // pidfd is readable.
            return Some(Exit::Unknown);
        }
        // SAFETY: waitid filled the siginfo; si_pid 0 means not yet.
        let (pid, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
        if pid == 0 {
            return None;
        }
        Some(if code == libc::CLD_EXITED {
            Exit::Code(status)
        } else {
            Exit::Signal(status)
        })
    }
}

/// A process's start time, in clock ticks since boot (field 22 of
/// /proc/PID/stat): with the pid, it names one process for good.
pub fn start_time_of(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command (field 2) is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split(' ').nth(19)?.parse().ok()
}

/// Opens `path` for appending (a container's log).
pub fn append(path: &Path) -> Result<OwnedFd, SpawnError> {
    let c = c_path(path)?;
    // SAFETY: open(2) on a NUL-terminated path; checked before owned.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC,
            0o640,
        )
    };
    if fd < 0 {
        return Err(SpawnError::Open {
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: just opened, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pipe's (read, write) ends.
pub fn pipe() -> Result<(File, OwnedFd), SpawnError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(SpawnError::Syscall {
            step: "creating a pipe",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: both descriptors were just created and are owned here.
    Ok(unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_looked_up_in_path() {
        assert!(look_up("sh", DEFAULT_PATH).is_some_and(|p| p.is_absolute() && p.ends_with("sh")));
        assert_eq!(look_up("/x/y", ""), Some(PathBuf::from("/x/y")));
        assert_eq!(look_up("no-such-program-here", DEFAULT_PATH), None);
    }

    #[test]
    fn start_times_name_live_processes() {
        let me = std::process::id() as i32;
        assert!(start_time_of(me).is_some());
        assert_eq!(start_time_of(-1), None);
    }
}
