//! A throwaway lab of network namespaces, veths, a cgroup and processes,
//! all named after the test and this process, and all removed when the
//! `Lab` is dropped, including when the test panics.
//!
//! Processes enter only a namespace's *network* namespace (setns before
//! exec), never `ip netns exec`: that one remounts /sys and would hide
//! bpffs and the cgroup v2 tree (../shared/notes/PLATFORM.md).

use std::{
    fs,
    net::Ipv4Addr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use dataplane_common::counters::Reason;
use wharf_agent::ebpf::Dataplane;

use crate::fixture::{BPFFS, require_root};

/// cgroup v2 root on this machine kind (hybrid hierarchy).
const CGROUP2: &str = "/sys/fs/cgroup/unified";

#[derive(Debug)]
pub struct Lab {
    /// Short and unique: namespace names are `<prefix>-<name>`.
    prefix: String,
    namespaces: Vec<String>,
    cgroup: Option<PathBuf>,
    cgroup_dirs: Vec<PathBuf>,
    children: Vec<Child>,
    /// Agent node names whose pins to remove.
    nodes: Vec<String>,
    /// Commands run at drop, after the processes are killed and before
    /// the namespaces go: (namespace, program, arguments).
    cleanups: Vec<(String, PathBuf, Vec<String>)>,
    /// Routes added to the host's table: (destination, next hop).
    host_routes: Vec<(String, Ipv4Addr)>,
    /// Things dropped after the cleanups and before the namespaces and
    /// the directory go (a runtime the cleanups still need).
    held: Vec<Box<dyn std::fmt::Debug>>,
    pub dir: PathBuf,
}

impl Lab {
    pub fn new(test: &str) -> Self {
        require_root();
        let prefix = format!("wt{}-{test}", std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("lab directory");
        Self {
            prefix,
            namespaces: Vec::new(),
            cgroup: None,
            cgroup_dirs: Vec::new(),
            children: Vec::new(),
            nodes: Vec::new(),
            cleanups: Vec::new(),
            host_routes: Vec::new(),
            held: Vec::new(),
            dir,
        }
    }

    /// Creates namespace `name` with loopback up; returns its full name.
    pub fn netns(&mut self, name: &str) -> String {
        let full = format!("{}-{name}", self.prefix);
        command("ip", &["netns", "add", &full]);
        self.namespaces.push(full.clone());
        command("ip", &["-n", &full, "link", "set", "lo", "up"]);
        full
    }

    /// Runs `ip -n NS ARGS...`.
    pub fn ip(&self, ns: &str, args: &str) {
        let mut all = vec!["-n", ns];
        all.extend(args.split_whitespace());
        command("ip", &all);
    }

    /// A veth pair between two namespaces, both ends up. Named directly in
    /// their namespaces, so parallel labs never clash in the host's.
    pub fn veth(&self, ns_a: &str, name_a: &str, ns_b: &str, name_b: &str) {
        command(
            "ip",
            &[
                "link", "add", name_a, "netns", ns_a, "type", "veth", "peer", "name", name_b,
                "netns", ns_b,
            ],
        );
        self.ip(ns_a, &format!("link set {name_a} up"));
        self.ip(ns_b, &format!("link set {name_b} up"));
    }

    /// A veth from the host (root namespace) into `ns`, named `uplink` on
    /// the namespace side, with a /30 of 198.18.0.0/15 (the benchmarking
    /// range: no real network or container runtime's pool uses it) picked
    /// by this process's ID and a counter, so concurrent labs differ;
    /// returns (host address, namespace address). Processes in `ns` reach
    /// host services (an API server) by the host address. The host end
    /// goes when the namespace is deleted.
    pub fn uplink(&self, ns: &str) -> (Ipv4Addr, Ipv4Addr) {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % 64;
        let pid = std::process::id();
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + ((pid % 512) * 64 + n) * 4;
        let (host, inside) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        let name = format!("wu{:x}-{n}", pid & 0xff_ffff);
        command(
            "ip",
            &[
                "link", "add", &name, "type", "veth", "peer", "name", "uplink", "netns", ns,
            ],
        );
        command("ip", &["addr", "add", &format!("{host}/30"), "dev", &name]);
        command("ip", &["link", "set", &name, "up"]);
        self.ip(ns, &format!("addr add {inside}/30 dev uplink"));
        self.ip(ns, "link set uplink up");
        (host, inside)
    }

    /// Writes a sysctl inside a namespace.
    pub fn sysctl(&self, ns: &str, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        command(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "sh",
                "-c",
                &format!("echo {value} > {path}"),
            ],
        );
    }

    /// Turns checksum offloads off: veth otherwise hands CHECKSUM_PARTIAL
    /// packets around, whose checksums nobody verifies (PLATFORM.md).
    pub fn offloads_off(&self, ns: &str, device: &str) {
        command(
            "ip",
            &[
                "netns", "exec", ns, "ethtool", "-K", device, "tx", "off", "rx", "off",
            ],
        );
    }

    /// The lab's own cgroup v2 directory, created on first use.
    pub fn cgroup(&mut self) -> PathBuf {
        let name = self.cgroup_name();
        self.cgroup
            .get_or_insert_with(|| {
                let path = Path::new(CGROUP2).join(name);
                fs::create_dir_all(&path).expect("creating the lab cgroup");
                path
            })
            .clone()
    }

    /// The lab's cgroup's name (in the v2 tree; a runtime's pods below
    /// it get the same path in v1 hierarchies).
    pub fn cgroup_name(&self) -> String {
        format!("wharf-{}", self.prefix)
    }

    /// Keeps `thing` until the lab is dropped: after the processes are
    /// killed and the cleanups ran, before the namespaces and the
    /// directory go.
    pub fn hold(&mut self, thing: Box<dyn std::fmt::Debug>) {
        self.held.push(thing);
    }

    /// A directory of its own below the lab's cgroup (removed at drop,
    /// before the lab's).
    pub fn cgroup_dir(&mut self, name: &str) -> PathBuf {
        let path = self.cgroup().join(name);
        fs::create_dir_all(&path).expect("creating a cgroup below the lab's");
        self.cgroup_dirs.push(path.clone());
        path
    }

    /// A command that will run in `ns` (and the lab cgroup if `in_cgroup`).
    pub fn command(&mut self, ns: &str, in_cgroup: bool, program: &Path, args: &[&str]) -> Command {
        let netns = fs::File::open(format!("/run/netns/{ns}")).expect("namespace file");
        let procs = in_cgroup.then(|| {
            fs::OpenOptions::new()
                .write(true)
                .open(self.cgroup().join("cgroup.procs"))
                .expect("cgroup.procs")
        });
        let mut command = Command::new(program);
        command.args(args);
        let (netns_fd, procs_fd) = (netns.as_raw_fd(), procs.as_ref().map(|f| f.as_raw_fd()));
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe syscalls on descriptors the parent keeps
        // open until spawn returns (they are moved into the closure).
        unsafe {
            command.pre_exec(move || {
                let _keep = (&netns, &procs);
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = procs_fd {
                    // "0" moves the writing process itself.
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        command
    }

    /// Runs to completion; returns stdout lines, panicking on failure.
    pub fn run(&mut self, ns: &str, in_cgroup: bool, program: &Path, args: &[&str]) -> Vec<String> {
        let output = self.try_run(ns, in_cgroup, program, args);
        assert!(
            output.status.success(),
            "{} {args:?} in {ns} failed: {}",
            program.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn try_run(&mut self, ns: &str, in_cgroup: bool, program: &Path, args: &[&str]) -> Output {
        self.command(ns, in_cgroup, program, args)
            .output()
            .expect("spawn")
    }

    /// Starts a long-running process whose stdout and stderr go to
    /// `<lab dir>/<log>`; it is killed when the lab is dropped.
    pub fn spawn(
        &mut self,
        ns: &str,
        in_cgroup: bool,
        program: &Path,
        args: &[&str],
        log: &str,
    ) -> usize {
        let file = fs::File::create(self.dir.join(log)).expect("log file");
        let child = self
            .command(ns, in_cgroup, program, args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", program.display()));
        self.children.push(child);
        self.children.len() - 1
    }

    /// Sends SIGTERM to a spawned process and waits for it to exit.
    pub fn stop(&mut self, index: usize) {
        let child = &mut self.children[index];
        // SAFETY: kill(2) on a child we own and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    }

    /// Waits for a spawned process to exit; returns its log.
    pub fn wait(&mut self, index: usize, log: &str) -> String {
        let _ = self.children[index].wait();
        self.log(log)
    }

    pub fn log(&self, log: &str) -> String {
        fs::read_to_string(self.dir.join(log)).unwrap_or_default()
    }

    /// Waits until `log` contains `needle` at least `count` times.
    pub fn wait_for_log(&self, log: &str, needle: &str, count: usize) {
        self.wait_for_log_within(log, needle, count, Duration::from_secs(20));
    }

    /// `wait_for_log` with a deadline of the caller's choosing.
    pub fn wait_for_log_within(&self, log: &str, needle: &str, count: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.log(log).matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "{log} never showed {needle:?} {count} times:\n{}",
                self.log(log)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Attaches XDP to `device` in `ns` from a dataplane of its own with no
    /// services (it passes everything). veth only wakes a peer for XDP_TX
    /// frames when the peer runs an XDP program; a real external host's
    /// NIC has no such need.
    pub fn passthrough_xdp(&mut self, ns: &str, device: &str) {
        let node = self.node(&format!("xdp-{ns}-{device}"));
        let native = Dataplane::attach_passthrough(
            Path::new(BPFFS),
            &node,
            &Path::new("/run/netns").join(ns),
            &[device.to_string()],
        )
        .expect("attaching the passthrough XDP program");
        assert!(native, "no native XDP on {device}");
    }

    /// Routes `destination` through `via` in the host's own table (an
    /// uplink's namespace end), until the lab is dropped.
    pub fn host_route(&mut self, destination: &str, via: Ipv4Addr) {
        command(
            "ip",
            &["route", "add", destination, "via", &via.to_string()],
        );
        self.host_routes.push((destination.to_string(), via));
    }

    /// Runs `program args` in `ns` when the lab is dropped (an agent's
    /// `--teardown`, which stops the pods it left), even after a failure.
    pub fn cleanup_on_drop(&mut self, ns: &str, program: &Path, args: Vec<String>) {
        self.cleanups
            .push((ns.to_string(), program.to_path_buf(), args));
    }

    /// Registers an agent node name whose pins the lab removes.
    pub fn node(&mut self, name: &str) -> String {
        let full = format!("{}-{name}", self.prefix);
        self.nodes.push(full.clone());
        full
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for (ns, program, args) in std::mem::take(&mut self.cleanups) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let _ = self.command(&ns, false, &program, &args).output();
        }
        self.held.clear();
        for node in &self.nodes {
            let _ = Dataplane::teardown(Path::new(BPFFS), node);
        }
        for (destination, via) in &self.host_routes {
            let _ = Command::new("ip")
                .args(["route", "del", destination, "via", &via.to_string()])
                .status();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for dir in &self.cgroup_dirs {
            let _ = fs::remove_dir(dir);
        }
        if let Some(cgroup) = &self.cgroup {
            let _ = fs::remove_dir(cgroup);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs a setup command, panicking with its stderr on failure.
pub fn command(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The wharf-agent binary next to the test binaries (target/<profile>/).
pub fn agent_binary() -> PathBuf {
    workspace_binary("wharf-agent")
}

/// A binary of this workspace, next to the test executable's directory.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// A node's datapath packet counters, read from its pinned map.
pub fn counter(node: &str, reason: Reason) -> u64 {
    let counters = wharf_agent::ebpf::read_counters(Path::new(BPFFS), node).expect("counters");
    counters
        .into_iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, c)| c.packets)
}
