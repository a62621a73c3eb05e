//! Virtual machines for what this host's kernel cannot do (IPVS, loadable
//! modules): Debian's stock kernel under qemu (software emulation; the
//! host's KVM cannot boot it, see ../shared/notes/PLATFORM.md), booted
//! from a throwaway initramfs that carries busybox, the kernel modules
//! asked for (with their dependencies), the networking tools the suites
//! drive (ip, ethtool, nft, ipvsadm) with their libraries, and the files
//! a test hands over. `/init` loads the modules, mounts what the suites
//! expect (/proc, /sys, cgroup v2 at /sys/fs/cgroup/unified, bpffs, /run,
//! /tmp), runs the script, prints `WHARF-VM-EXIT <status>` on the serial
//! console and powers off. The host reads the console.
//!
//! `scripts/setup.sh` unpacks the kernel package under
//! `/var/cache/wharf/vm/kernel` (unpacked, never installed).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Read as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

/// Where setup.sh unpacks the kernel package.
const KERNEL_ROOT: &str = "/var/cache/wharf/vm/kernel";
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

/// What a run printed and how its script exited.
#[derive(Debug)]
pub struct VmRun {
    pub console: String,
    pub status: i32,
}

/// A VM to build and boot.
#[derive(Debug, Default)]
pub struct Vm {
    modules: Vec<String>,
    files: Vec<(PathBuf, String)>,
    env: Vec<(String, String)>,
    memory_mb: u32,
}

impl Vm {
    pub fn new() -> Self {
        Self {
            memory_mb: 2048,
            ..Self::default()
        }
    }

    /// A VM for running the calling test or benchmark binary again inside
    /// (as `/wharf/deps/<name>`, next to `/wharf/wharf-agent` and
    /// `/wharf/wharf-probe`, where `lab::workspace_binary` looks), with
    /// the modules IPVS mode needs.
    pub fn for_this_binary(name: &str) -> Self {
        Self::new()
            .modules(&IPVS_MODULES)
            .file(
                std::env::current_exe().expect("own path"),
                &format!("/wharf/deps/{name}"),
            )
            .file(
                crate::lab::workspace_binary("wharf-agent"),
                "/wharf/wharf-agent",
            )
            .file(
                crate::lab::workspace_binary("wharf-probe"),
                "/wharf/wharf-probe",
            )
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

    /// Boots the VM and runs `script` (busybox sh) as root; gives up
    /// after `timeout`.
    pub fn run(&self, script: &str, timeout: Duration) -> VmRun {
        let kernel_root = Path::new(KERNEL_ROOT);
        let vmlinuz = only_entry(&kernel_root.join("boot"), "vmlinuz-");
        let modules_root = only_entry(&kernel_root.join("lib/modules"), "");
        let staging = tempfile::tempdir().expect("staging directory");
        let root = staging.path().join("root");
        for dir in ["bin", "proc", "sys", "dev", "run", "tmp", "modules", "etc"] {
            fs::create_dir_all(root.join(dir)).expect("initramfs directory");
        }
        copy(Path::new("/bin/busybox"), &root.join("bin/busybox"));
        let mut libraries = BTreeSet::new();
        for tool in TOOLS {
            copy(Path::new(tool), &root.join(tool.trim_start_matches('/')));
            libraries.extend(shared_libraries(Path::new(tool)));
        }
        for (source, destination) in &self.files {
            let target = root.join(destination.trim_start_matches('/'));
            fs::create_dir_all(target.parent().expect("absolute path")).expect("directory");
            strip_into(source, &target);
            libraries.extend(shared_libraries(source));
        }
        for library in libraries {
            copy(
                &library,
                &root.join(library.strip_prefix("/").expect("absolute")),
            );
        }
        let order = module_order(&modules_root.join("kernel"), &self.modules);
        let mut names = Vec::new();
        for module in &order {
            let name = module
                .file_name()
                .expect("file")
                .to_string_lossy()
                .into_owned();
            copy(module, &root.join("modules").join(&name));
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
                 for m in {}; do insmod /modules/$m || echo \"insmod $m failed\"; done\n\
                 ip link set lo up\n\
                 {exports}\
                 cd /tmp\n\
                 sh /script.sh\n\
                 echo \"{EXIT_MARKER}$?\"\n\
                 poweroff -f\n",
                names.join(" ")
            ),
        );
        write_executable(&root.join("script.sh"), script);
        let initramfs = staging.path().join("initramfs.cpio");
        let cpio = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd {} && find . | cpio -o -H newc --quiet > {}",
                root.display(),
                initramfs.display()
            ))
            .status()
            .expect("cpio");
        assert!(cpio.success(), "building the initramfs failed");
        boot(&vmlinuz, &initramfs, self.memory_mb, timeout)
    }
}

/// The one entry of `dir` whose name starts with `prefix`.
fn only_entry(dir: &Path, prefix: &str) -> PathBuf {
    fs::read_dir(dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (scripts/setup.sh unpacks the VM kernel)",
                dir.display()
            )
        })
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .unwrap_or_else(|| panic!("nothing named {prefix}* in {}", dir.display()))
}

fn copy(source: &Path, destination: &Path) {
    fs::create_dir_all(destination.parent().expect("has a parent")).expect("directory");
    fs::copy(source, destination).unwrap_or_else(|e| panic!("copying {}: {e}", source.display()));
}

/// Copies an executable without its debug info (test binaries shrink
/// from hundreds of MB to a few).
fn strip_into(source: &Path, destination: &Path) {
    let stripped = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(source)
        .arg(destination)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        copy(source, destination);
    }
}

fn write_executable(path: &Path, text: &str) {
    fs::write(path, text).expect("writing a script");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// The shared libraries (and loader) a dynamically linked binary needs.
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let output = Command::new("ldd").arg(binary).output().expect("ldd");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            // "libx.so => /lib/x/libx.so (0x...)" or "/lib64/ld-linux... (0x...)"
            let path = line.split("=>").last()?.trim().split(' ').next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The module files for `names` and everything they depend on, in an
/// order `insmod` accepts (dependencies first). Dependencies come from
/// each module's `.modinfo` (`depends=`), so no depmod is needed.
fn module_order(kernel: &Path, names: &[String]) -> Vec<PathBuf> {
    let mut by_name = BTreeMap::new();
    let mut pending = vec![kernel.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).expect("modules directory").flatten() {
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
    ) {
        let name = name.replace('-', "_");
        if !seen.insert(name.clone()) {
            return;
        }
        // Not a module file: built into the kernel.
        let Some(path) = by_name.get(&name) else {
            return;
        };
        for dependency in module_dependencies(path) {
            visit(&dependency, by_name, seen, order);
        }
        order.push(path.clone());
    }
    let (mut seen, mut order) = (BTreeSet::new(), Vec::new());
    for name in names {
        assert!(
            by_name.contains_key(&name.replace('-', "_")),
            "no module {name} in {}",
            kernel.display()
        );
        visit(name, &by_name, &mut seen, &mut order);
    }
    order
}

fn module_dependencies(module: &Path) -> Vec<String> {
    let bytes = fs::read(module).expect("module file");
    let needle = b"depends=";
    bytes
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
        .unwrap_or_default()
}

/// Boots and collects the console until the exit marker or `timeout`.
fn boot(vmlinuz: &Path, initramfs: &Path, memory_mb: u32, timeout: Duration) -> VmRun {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=multi", "-smp", "2", "-m"])
        .arg(memory_mb.to_string())
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 (scripts/setup.sh installs qemu-system-x86)");
    let mut stdout = child.stdout.take().expect("piped");
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let mut console = Vec::new();
        let _ = stdout.read_to_end(&mut console);
        let _ = sender.send(console);
    });
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().expect("qemu status").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let console = receiver
        .recv_timeout(Duration::from_secs(5))
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default();
    let status = console
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(EXIT_MARKER)?.parse().ok())
        .unwrap_or_else(|| panic!("the VM never reported its exit within {timeout:?}:\n{console}"));
    VmRun { console, status }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_dependencies_come_from_modinfo() {
        let kernel = Path::new(KERNEL_ROOT);
        let modules = only_entry(&kernel.join("lib/modules"), "").join("kernel");
        let order = module_order(&modules, &["ip_vs_rr".into()]);
        let names: Vec<String> = order
            .iter()
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        let position = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert!(position("ip_vs") < position("ip_vs_rr"), "{names:?}");
        assert!(position("nf_conntrack") < position("ip_vs"), "{names:?}");
    }
}
