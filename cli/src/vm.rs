//! Virtual machines for what this host's kernel cannot do (IPVS, loadable
//! modules): Debian's stock kernel under qemu (software emulation; the
//! host's KVM cannot boot it, see ../shared/notes/PLATFORM.md), booted
//! from a throwaway initramfs that carries busybox, the kernel modules
//! asked for (with their dependencies), the networking tools wharf drives
//! (ip, ethtool, nft, ipvsadm) with their libraries, and the files the
//! caller hands over. `/init` moves the files onto a tmpfs root (the
//! initramfs's own root cannot be pivoted away from, which starting a
//! container needs), loads the modules, mounts what wharf expects
//! (/proc, /sys, cgroup v2 at /sys/fs/cgroup/unified, bpffs, /run, /tmp),
//! runs the script, prints `WHARF-VM-EXIT <status>` on the serial console
//! and powers off. The host reads the console, and whatever the script
//! wrote to the second serial port, `/dev/ttyS1` (raw), as the run's
//! outbox: results come back that way, apart from the console's chatter.
//!
//! `wharf bench routing` measures IPVS in one, and the test suites run
//! their IPVS cases in one. `scripts/setup.sh` unpacks the kernel package
//! under `/var/cache/wharf/vm/kernel` (unpacked, never installed).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

/// Where setup.sh unpacks the kernel package.
pub const KERNEL_ROOT: &str = "/var/cache/wharf/vm/kernel";
/// Host tools copied in, with their shared libraries.
const TOOLS: [&str; 4] = [
    "/usr/bin/ip",
    "/usr/sbin/ethtool",
    "/usr/sbin/nft",
    "/usr/sbin/ipvsadm",
];
/// The line `/init` ends the console output with.
const EXIT_MARKER: &str = "WHARF-VM-EXIT ";

/// Modules IPVS mode needs from a stock kernel: veth and dummy devices,
/// IPVS with its schedulers (crc32c first: busybox's insmod does not
/// follow IPVS's soft dependency), ctnetlink for flow deletes, and the
/// nftables pieces of its masquerade table and of nftables mode.
pub const IPVS_MODULES: [&str; 16] = [
    "crc32c_generic",
    "veth",
    "dummy",
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_sh",
    "nf_conntrack_netlink",
    "nf_tables",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_ct",
    "nft_fib_ipv4",
    "nft_numgen",
    "nft_reject_ipv4",
];

/// What stopped a VM from being built or from reporting.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{path}: {source} (scripts/setup.sh unpacks the VM's kernel under {KERNEL_ROOT})")]
    Kernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("nothing named {prefix}* in {dir} (scripts/setup.sh unpacks the VM's kernel there)")]
    NoEntry { dir: PathBuf, prefix: String },
    #[error("no module {name} under {dir}")]
    NoModule { name: String, dir: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {program} ({hint}): {source}")]
    Spawn {
        program: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("packing the initramfs failed: {stderr}")]
    Initramfs { stderr: String },
    #[error("the VM did not report its exit within {limit:?}; its console:\n{console}")]
    NoExit { limit: Duration, console: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> VmError + '_ {
    move |source| VmError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a run printed, wrote to its outbox, and how its script exited.
#[derive(Debug)]
pub struct VmRun {
    pub console: String,
    /// What the script wrote to `/dev/ttyS1`.
    pub outbox: Vec<u8>,
    pub status: i32,
}

/// A VM to build and boot.
#[derive(Debug)]
pub struct Vm {
    modules: Vec<String>,
    files: Vec<(PathBuf, String)>,
    env: Vec<(String, String)>,
    memory_mb: u32,
    /// Console lines are copied to stderr as they come, after this.
    echo: Option<String>,
}

impl Default for Vm {
    fn default() -> Self {
        Self::new()
    }
}

impl Vm {
    /// 2 vCPUs (the host's two cores) and 2 GiB.
    pub fn new() -> Self {
        Self {
            modules: Vec::new(),
            files: Vec::new(),
            env: Vec::new(),
            memory_mb: 2048,
            echo: None,
        }
    }

    /// Loads these modules (by name, dependencies first) at boot.
    pub fn modules(mut self, names: &[&str]) -> Self {
        self.modules.extend(names.iter().map(|n| n.to_string()));
        self
    }

    /// Copies a host file to `destination` (absolute) in the VM; ELF
    /// files lose their debug info on the way and bring their libraries.
    pub fn file(mut self, source: impl Into<PathBuf>, destination: &str) -> Self {
        self.files.push((source.into(), destination.to_string()));
        self
    }

    /// Exports a variable to the script.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn memory_mb(mut self, memory_mb: u32) -> Self {
        self.memory_mb = memory_mb;
        self
    }

    /// Copies each console line to stderr as it arrives, after `prefix`
    /// (for runs long enough that someone watches them).
    pub fn echo(mut self, prefix: &str) -> Self {
        self.echo = Some(prefix.into());
        self
    }

    /// Boots the VM and runs `script` (busybox sh) as root; gives up
    /// after `timeout`.
    pub fn run(&self, script: &str, timeout: Duration) -> Result<VmRun, VmError> {
        let vmlinuz = only_entry(&Path::new(KERNEL_ROOT).join("boot"), "vmlinuz-")?;
        let staging = tempfile::tempdir().map_err(io_error(Path::new("/tmp")))?;
        let root = staging.path().join("root");
        for dir in ["bin", "proc", "sys", "dev", "run", "tmp", "modules", "etc"] {
            let dir = root.join(dir);
            fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        }
        copy(Path::new("/bin/busybox"), &root.join("bin/busybox"))?;
        let mut libraries = BTreeSet::new();
        for tool in TOOLS {
            copy(Path::new(tool), &root.join(tool.trim_start_matches('/')))?;
            libraries.extend(shared_libraries(Path::new(tool))?);
        }
        for (source, destination) in &self.files {
            let target = root.join(destination.trim_start_matches('/'));
            strip_into(source, &target)?;
            libraries.extend(shared_libraries(source)?);
        }
        for library in libraries {
            let inside = root.join(library.strip_prefix("/").unwrap_or(&library));
            copy(&library, &inside)?;
        }
        let order = module_order(&modules_dir()?, &self.modules)?;
        let mut names = Vec::new();
        for module in &order {
            let name = module
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            copy(module, &root.join("modules").join(&name))?;
            names.push(name);
        }
        let exports: String = self
            .env
            .iter()
            .map(|(k, v)| format!("export {k}='{v}'\n"))
            .collect();
        write_executable(
            &root.join("init"),
            &format!(
                "#!/bin/busybox sh\n\
                 if [ ! -e /.root ]; then\n\
                 /bin/busybox mkdir /root-fs\n\
                 /bin/busybox mount -t tmpfs root /root-fs\n\
                 for e in /*; do [ $e = /root-fs ] || /bin/busybox cp -a $e /root-fs/; done\n\
                 /bin/busybox touch /root-fs/.root\n\
                 exec /bin/busybox switch_root /root-fs /init\n\
                 fi\n\
                 /bin/busybox --install -s /bin\n\
                 export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n\
                 mount -t proc proc /proc\n\
                 mount -t sysfs sys /sys\n\
                 mount -t devtmpfs dev /dev\n\
                 mount -t tmpfs run /run\n\
                 mount -t tmpfs tmp /tmp\n\
                 mount -t tmpfs cgroup /sys/fs/cgroup\n\
                 mkdir -p /sys/fs/cgroup/unified /run/netns\n\
                 mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified\n\
                 mount -t bpf bpf /sys/fs/bpf\n\
                 stty -F /dev/ttyS1 raw -echo\n\
                 for m in {}; do insmod /modules/$m || echo \"insmod $m failed\"; done\n\
                 ip link set lo up\n\
                 {exports}\
                 cd /tmp\n\
                 sh /script.sh\n\
                 echo \"{EXIT_MARKER}$?\"\n\
                 poweroff -f\n",
                names.join(" ")
            ),
        )?;
        write_executable(&root.join("script.sh"), script)?;
        let initramfs = staging.path().join("initramfs.cpio");
        let cpio = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd {} && find . | cpio -o -H newc --quiet > {}",
                root.display(),
                initramfs.display()
            ))
            .output()
            .map_err(|source| VmError::Spawn {
                program: "sh".into(),
                hint: "cpio packs the initramfs",
                source,
            })?;
        if !cpio.status.success() {
            return Err(VmError::Initramfs {
                stderr: String::from_utf8_lossy(&cpio.stderr).into_owned(),
            });
        }
        let outbox = staging.path().join("outbox");
        let (console, status) = self.boot(&vmlinuz, &initramfs, &outbox, timeout)?;
        Ok(VmRun {
            console,
            outbox: fs::read(&outbox).map_err(io_error(&outbox))?,
            status,
        })
    }

    /// Boots and collects the console until the exit marker or `timeout`.
    fn boot(
        &self,
        vmlinuz: &Path,
        initramfs: &Path,
        outbox: &Path,
        timeout: Duration,
    ) -> Result<(String, i32), VmError> {
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg,thread=multi", "-smp", "2", "-m"])
            .arg(self.memory_mb.to_string())
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .args(["-serial", "stdio", "-serial"])
            .arg(format!("file:{}", outbox.display()))
            .arg("-kernel")
            .arg(vmlinuz)
            .arg("-initrd")
            .arg(initramfs)
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| VmError::Spawn {
                program: "qemu-system-x86_64".into(),
                hint: "scripts/setup.sh installs qemu-system-x86",
                source,
            })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let echo = self.echo.clone();
        let (sender, receiver) = mpsc::channel();
        thread::spawn(move || {
            let mut console = String::new();
            let mut reader = BufReader::new(stdout);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let text = String::from_utf8_lossy(&line).replace('\r', "");
                if let Some(prefix) = &echo {
                    eprint!("{prefix}{text}");
                }
                console.push_str(&text);
                line.clear();
            }
            let _ = sender.send(console);
        });
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        while child.try_wait().map_err(io_error(vmlinuz))?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                timed_out = true;
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        let console = receiver
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default();
        let status = console
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix(EXIT_MARKER)?.parse().ok());
        match status {
            Some(status) if !timed_out => Ok((console, status)),
            _ => Err(VmError::NoExit {
                limit: timeout,
                console,
            }),
        }
    }
}

/// The unpacked kernel's module tree (`lib/modules/<release>/kernel`).
fn modules_dir() -> Result<PathBuf, VmError> {
    Ok(only_entry(&Path::new(KERNEL_ROOT).join("lib/modules"), "")?.join("kernel"))
}

/// The one entry of `dir` whose name starts with `prefix`.
fn only_entry(dir: &Path, prefix: &str) -> Result<PathBuf, VmError> {
    fs::read_dir(dir)
        .map_err(|source| VmError::Kernel {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .ok_or_else(|| VmError::NoEntry {
            dir: dir.to_path_buf(),
            prefix: prefix.into(),
        })
}

fn copy(source: &Path, destination: &Path) -> Result<(), VmError> {
    if let Some(parent) = destination.parent() {
        fs::create_dir_all(parent).map_err(io_error(parent))?;
    }
    fs::copy(source, destination).map_err(io_error(source))?;
    Ok(())
}

/// Copies an executable without its debug info (test binaries shrink
/// from hundreds of MB to a few).
fn strip_into(source: &Path, destination: &Path) -> Result<(), VmError> {
    if let Some(parent) = destination.parent() {
        fs::create_dir_all(parent).map_err(io_error(parent))?;
    }
    let stripped = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(source)
        .arg(destination)
        .status()
        .is_ok_and(|s| s.success());
    if stripped {
        Ok(())
    } else {
        copy(source, destination)
    }
}

fn write_executable(path: &Path, text: &str) -> Result<(), VmError> {
    fs::write(path, text).map_err(io_error(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(io_error(path))
}

/// The shared libraries (and loader) a dynamically linked binary needs.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, VmError> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|source| VmError::Spawn {
            program: "ldd".into(),
            hint: "libc-bin lists the libraries binaries need",
            source,
        })?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            // "libx.so => /lib/x/libx.so (0x...)" or "/lib64/ld-linux... (0x...)"
            let path = line.split("=>").last()?.trim().split(' ').next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// The module files for `names` and everything they depend on, in an
/// order `insmod` accepts (dependencies first). Dependencies come from
/// each module's `.modinfo` (`depends=`), so no depmod is needed.
fn module_order(kernel: &Path, names: &[String]) -> Result<Vec<PathBuf>, VmError> {
    let mut by_name = BTreeMap::new();
    let mut pending = vec![kernel.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).map_err(io_error(&dir))?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                by_name.insert(name.replace('-', "_"), path);
            }
        }
    }
    fn visit(
        name: &str,
        by_name: &BTreeMap<String, PathBuf>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<PathBuf>,
    ) -> Result<(), VmError> {
        let name = name.replace('-', "_");
        if !seen.insert(name.clone()) {
            return Ok(());
        }
        // Not a module file: built into the kernel.
        let Some(path) = by_name.get(&name) else {
            return Ok(());
        };
        for dependency in module_dependencies(path)? {
            visit(&dependency, by_name, seen, order)?;
        }
        order.push(path.clone());
        Ok(())
    }
    let (mut seen, mut order) = (BTreeSet::new(), Vec::new());
    for name in names {
        if !by_name.contains_key(&name.replace('-', "_")) {
            return Err(VmError::NoModule {
                name: name.clone(),
                dir: kernel.to_path_buf(),
            });
        }
        visit(name, &by_name, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn module_dependencies(module: &Path) -> Result<Vec<String>, VmError> {
    let bytes = fs::read(module).map_err(io_error(module))?;
    let needle = b"depends=";
    Ok(bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|at| {
            let value = &bytes[at + needle.len()..];
            let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
            String::from_utf8_lossy(&value[..end])
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_dependencies_come_from_modinfo() {
        let order = module_order(&modules_dir().unwrap(), &["ip_vs_rr".into()]).unwrap();
        let names: Vec<String> = order
            .iter()
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        let position = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert!(position("ip_vs") < position("ip_vs_rr"), "{names:?}");
        assert!(position("nf_conntrack") < position("ip_vs"), "{names:?}");
    }

    #[test]
    fn a_missing_module_is_named() {
        let error = module_order(&modules_dir().unwrap(), &["no_such_module".into()]).unwrap_err();
        assert!(error.to_string().contains("no_such_module"), "{error}");
    }
}
