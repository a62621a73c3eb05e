//! Loads the eBPF object, reuses its pinned maps, and attaches programs
//! through pinned links.
//!
//! Everything lives under `<bpffs>/wharf/<node>/`: maps by name, links
//! under `links/`. Pinned links keep the programs attached while the agent
//! is down, and a restarted agent swaps its programs in without a gap, so
//! established connections never see an unprogrammed node. Removing the
//! directory (`Dataplane::teardown`) detaches everything.

use std::{
    fs, io,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, MapError, MapInfo, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, ProgramType, SchedClassifier, TcAttachType,
        Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
    sys::BpfHelper,
};
use dataplane_common::{
    Backend, Counter, CtKey, CtValue, MaglevTable, RevNat, ServiceKey, ServiceValue, SockRevKey,
    SockRevValue, capacity, counters::Reason, names,
};
use tracing::{info, warn};

use super::{
    reconciler::Maps,
    table::{KernelTable, Table, TableError},
};

/// The compiled programs, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Program names, as the eBPF crate's entry points are called.
const XDP_PROGRAM: &str = "wharf_xdp";
/// The programs' switch for XDP metadata (`dataplane-ebpf`'s packet.rs).
const XDP_METADATA: &str = "XDP_METADATA";
const TC_INGRESS_PROGRAM: &str = "wharf_tc";
const TC_EGRESS_PROGRAM: &str = "wharf_tc_egress";
const TC_PROGRAMS: [&str; 2] = [TC_INGRESS_PROGRAM, TC_EGRESS_PROGRAM];
const SOCK_PROGRAMS: [&str; 4] = [
    "wharf_connect4",
    "wharf_sendmsg4",
    "wharf_recvmsg4",
    "wharf_getpeer4",
];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot prepare bpffs at {path}: {source}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Object(#[from] EbpfError),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("program {program} on {target}: {source}")]
    Attach {
        program: &'static str,
        target: String,
        #[source]
        source: ProgramError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("map {name} missing from the object")]
    MissingMap { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("network namespace {path}: {source}")]
    Namespace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The loaded dataplane of one node.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Dataplane {
    /// The pin directory of `node` under the bpffs mount `bpffs`.
    pub fn pin_dir(bpffs: &Path, node: &str) -> PathBuf {
        bpffs.join("wharf").join(node)
    }

    /// Loads the programs, reusing maps pinned by an earlier run. Mounts
    /// bpffs at `bpffs` if nothing is mounted there.
    pub fn load(bpffs: &Path, node: &str) -> Result<Self, LoadError> {
        ensure_bpffs(bpffs)?;
        let pin_dir = Self::pin_dir(bpffs, node);
        let links = pin_dir.join("links");
        fs::create_dir_all(&links).map_err(|source| LoadError::Pin {
            path: links,
            source,
        })?;
        drop_incompatible_pins(&pin_dir)?;
        let xdp_metadata = u8::from(xdp_metadata_supported());
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .override_global(XDP_METADATA, &xdp_metadata, true)
            .load(OBJECT)?;
        let mut dataplane = Self { ebpf, pin_dir };
        dataplane
            .program::<Xdp>(XDP_PROGRAM)?
            .load()
            .map_err(|source| program_error(XDP_PROGRAM, source))?;
        for name in TC_PROGRAMS {
            dataplane
                .program::<SchedClassifier>(name)?
                .load()
                .map_err(|source| program_error(name, source))?;
        }
        for name in SOCK_PROGRAMS {
            dataplane
                .program::<CgroupSockAddr>(name)?
                .load()
                .map_err(|source| program_error(name, source))?;
        }
        Ok(dataplane)
    }

    /// Attaches a dataplane with no services, pinned as `name`, by XDP to
    /// `devices` of the network namespace at `netns`: it passes every
    /// frame. A veth delivers what its partner sends back out (XDP_TX)
    /// only to a peer that runs XDP itself, which a real NIC never needs;
    /// the veth "wires" of local clusters and of the netns tests get one.
    /// Returns whether every device took native XDP.
    pub fn attach_passthrough(
        bpffs: &Path,
        name: &str,
        netns: &Path,
        devices: &[String],
    ) -> Result<bool, LoadError> {
        let namespace_error = |source| LoadError::Namespace {
            path: netns.to_path_buf(),
            source,
        };
        let namespace = fs::File::open(netns).map_err(namespace_error)?;
        // A thread of its own joins the namespace and ends with the work.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns(2) on a descriptor this thread owns;
                    // it changes this short-lived thread's namespace only.
                    let entered = unsafe {
                        libc::setns(
                            std::os::fd::AsRawFd::as_raw_fd(&namespace),
                            libc::CLONE_NEWNET,
                        )
                    };
                    if entered != 0 {
                        return Err(namespace_error(io::Error::last_os_error()));
                    }
                    let mut dataplane = Self::load(bpffs, name)?;
                    let mut native = true;
                    for device in devices {
                        native &= dataplane.attach_xdp(device)?;
                    }
                    Ok(native)
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Removes a node's pins: detaches its programs and frees its maps
    /// once nothing else holds them.
    pub fn teardown(bpffs: &Path, node: &str) -> io::Result<()> {
        match fs::remove_dir_all(Self::pin_dir(bpffs, node)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Attaches socket-LB to a cgroup v2 directory (its whole subtree).
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), LoadError> {
        let cgroup_fd = fs::File::open(cgroup).map_err(|source| LoadError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        for name in SOCK_PROGRAMS {
            let pin = self.pin_dir.join("links").join(name);
            let program: &mut CgroupSockAddr = self.program(name)?;
            // Cgroup links always stack (the kernel takes no mode flags
            // for them): the new program is attached before the old one
            // goes, and the two never disagree (the old one translates
            // first; the new one sees a backend address and leaves it).
            let id = program
                .attach(&cgroup_fd, CgroupAttachMode::Single)
                .map_err(|source| attach_error(name, cgroup.display(), source))?;
            let link: FdLink = program
                .take_link(id)
                .map_err(|source| attach_error(name, cgroup.display(), source))?
                .try_into()
                .map_err(|source| LoadError::Link {
                    path: pin.clone(),
                    source,
                })?;
            swap_pin(&pin, link)?;
        }
        info!(cgroup = %cgroup.display(), "socket-LB attached");
        Ok(())
    }

    /// Attaches per-packet load-balancing to a device (TCX): the pipeline
    /// on ingress, and reverse NAT of local backends' replies on egress.
    pub fn attach_tc(&mut self, device: &str) -> Result<(), LoadError> {
        self.attach_tc_hook(device, TC_INGRESS_PROGRAM, TcAttachType::Ingress, "tc")?;
        self.attach_tc_hook(device, TC_EGRESS_PROGRAM, TcAttachType::Egress, "tc-egress")
    }

    fn attach_tc_hook(
        &mut self,
        device: &str,
        name: &'static str,
        hook: TcAttachType,
        pin_prefix: &str,
    ) -> Result<(), LoadError> {
        let pin = self
            .pin_dir
            .join("links")
            .join(format!("{pin_prefix}-{device}"));
        let program: &mut SchedClassifier = self.program(name)?;
        if let Some(old) = pinned_link(&pin)? {
            let replaced = SchedClassifierLink::try_from(old)
                .map_err(|e| e.to_string())
                .and_then(|link| program.attach_to_link(link).map_err(|e| e.to_string()));
            match replaced {
                Ok(_) => return Ok(()),
                Err(reason) => stale_link(&pin, &reason)?,
            }
        }
        let id = program
            .attach(device, hook)
            .map_err(|source| attach_error(name, device, source))?;
        let link: FdLink = program
            .take_link(id)
            .map_err(|source| attach_error(name, device, source))?
            .try_into()
            .map_err(|source| LoadError::Link {
                path: pin.clone(),
                source,
            })?;
        swap_pin(&pin, link)
    }

    /// Attaches TC to a pod's node-side link (wired by the CNI plugin),
    /// and drops the pins of links whose device is gone (pods deleted
    /// since: their attachments went with their veths).
    pub fn attach_pod_link(&mut self, device: &str) -> Result<(), LoadError> {
        self.attach_tc(device)?;
        let links = self.pin_dir.join("links");
        let entries = fs::read_dir(&links).map_err(|source| LoadError::Pin {
            path: links.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let pin = entry.file_name();
            let Some(pin) = pin.to_str() else { continue };
            let gone = ["tc-egress-", "tc-", "xdp-"]
                .iter()
                .find_map(|prefix| pin.strip_prefix(prefix))
                .is_some_and(|device| crate::netdev::ifindex(device).is_err());
            if gone {
                let _ = fs::remove_file(entry.path());
            }
        }
        info!(device, "pod link attached");
        Ok(())
    }

    /// Attaches XDP in native (driver) mode. Returns false, leaving the
    /// device to TC, where the driver has no native XDP.
    pub fn attach_xdp(&mut self, device: &str) -> Result<bool, LoadError> {
        const NAME: &str = XDP_PROGRAM;
        let pin = self.pin_dir.join("links").join(format!("xdp-{device}"));
        let program: &mut Xdp = self.program(NAME)?;
        if let Some(old) = pinned_link(&pin)? {
            let replaced = XdpLink::try_from(old)
                .map_err(|e| e.to_string())
                .and_then(|link| program.attach_to_link(link).map_err(|e| e.to_string()));
            match replaced {
                Ok(_) => return Ok(true),
                Err(reason) => stale_link(&pin, &reason)?,
            }
        }
        let id = match program.attach(device, XdpMode::Driver) {
            Ok(id) => id,
            Err(error) => {
                warn!(device, %error, "no native XDP: TC handles this device alone");
                return Ok(false);
            }
        };
        let link: FdLink = program
            .take_link(id)
            .map_err(|source| attach_error(NAME, device, source))?
            .try_into()
            .map_err(|source| LoadError::Link {
                path: pin.clone(),
                source,
            })?;
        swap_pin(&pin, link)?;
        Ok(true)
    }

    /// The maps the reconciler programs.
    pub fn maps(&mut self) -> Result<Maps, LoadError> {
        Ok(Maps {
            services: Box::new(self.table(names::SERVICES)?),
            backends: Box::new(self.table(names::BACKENDS)?),
            rev_nat: Box::new(self.table(names::REV_NAT)?),
            maglev: Box::new(self.table(names::MAGLEV)?),
            conntrack: Box::new(self.table(names::CONNTRACK)?),
            affinity: Box::new(self.table(names::AFFINITY)?),
        })
    }

    /// Replaces the node addresses NodePort frontends answer on.
    pub fn set_node_addresses(&mut self, addresses: &[Ipv4Addr]) -> Result<(), LoadError> {
        let wanted: Vec<(u32, u8)> = addresses
            .iter()
            .map(|a| (u32::from(*a).to_be(), 1))
            .collect();
        replace_entries(&mut self.table(names::NODE_ADDRS)?, &wanted)
    }

    /// Replaces the per-device SNAT addresses: (ifindex, address).
    pub fn set_snat_addresses(&mut self, addresses: &[(u32, Ipv4Addr)]) -> Result<(), LoadError> {
        let wanted: Vec<(u32, u32)> = addresses
            .iter()
            .map(|(i, a)| (*i, u32::from(*a).to_be()))
            .collect();
        replace_entries(&mut self.table(names::SNAT_ADDRS)?, &wanted)
    }

    /// Datapath counters summed over CPUs, by reason.
    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>, LoadError> {
        read_counters_in(&self.pin_dir)
    }

    /// A loaded program by name, for tests and benchmarks (test runs).
    pub fn program<'a, T>(&'a mut self, name: &'static str) -> Result<&'a mut T, LoadError>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        let program = self.ebpf.program_mut(name).ok_or(LoadError::Program {
            program: name,
            source: ProgramError::NotLoaded,
        })?;
        program
            .try_into()
            .map_err(|source| program_error(name, source))
    }

    fn table<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<KernelTable<K, V>, LoadError> {
        // Opened from the pin rather than taken from `ebpf`, so several
        // handles (reconciler, node addresses) can coexist.
        let path = self.pin_dir.join(name);
        let data = MapData::from_pin(&path).map_err(|source| LoadError::Map { name, source })?;
        let map = BpfHashMap::try_from(
            aya::maps::Map::from_map_data(data)
                .map_err(|source| LoadError::Map { name, source })?,
        )
        .map_err(|source| LoadError::Map { name, source })?;
        Ok(KernelTable::new(name, map))
    }
}

/// The shape each pinned map must have to be reused: (name, key size,
/// value size, capacity).
const MAP_LAYOUTS: [(&str, usize, usize, u32); 9] = [
    (
        names::SERVICES,
        size_of::<ServiceKey>(),
        size_of::<ServiceValue>(),
        capacity::SERVICES,
    ),
    (
        names::BACKENDS,
        size_of::<u32>(),
        size_of::<Backend>(),
        capacity::BACKENDS,
    ),
    (
        names::REV_NAT,
        size_of::<u32>(),
        size_of::<RevNat>(),
        capacity::REV_NAT,
    ),
    (
        names::CONNTRACK,
        size_of::<CtKey>(),
        size_of::<CtValue>(),
        capacity::CONNTRACK,
    ),
    (
        names::SOCK_REV_NAT,
        size_of::<SockRevKey>(),
        size_of::<SockRevValue>(),
        capacity::SOCK_REV_NAT,
    ),
    (
        names::MAGLEV,
        size_of::<u32>(),
        size_of::<MaglevTable>(),
        capacity::MAGLEV,
    ),
    (
        names::NODE_ADDRS,
        size_of::<u32>(),
        size_of::<u8>(),
        capacity::NODE_ADDRS,
    ),
    (
        names::SNAT_ADDRS,
        size_of::<u32>(),
        size_of::<u32>(),
        capacity::SNAT_ADDRS,
    ),
    (
        names::COUNTERS,
        size_of::<u32>(),
        size_of::<Counter>(),
        Reason::COUNT,
    ),
];

/// Removes pinned maps whose shape differs from what this build's programs
/// declare (an upgrade changed a layout): the loader would otherwise
/// reuse them and the verifier reject the programs. The new maps start
/// empty; the reconciler reprograms services, and flows of the old layout
/// are lost, which a layout change makes unavoidable.
fn drop_incompatible_pins(pin_dir: &Path) -> Result<(), LoadError> {
    for (name, key_size, value_size, max_entries) in MAP_LAYOUTS {
        let path = pin_dir.join(name);
        let info = match MapInfo::from_pin(&path) {
            Ok(info) => info,
            Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
                continue;
            }
            Err(source) => return Err(LoadError::Map { name, source }),
        };
        let found = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if found != (key_size, value_size, max_entries) {
            warn!(
                map = name,
                ?found,
                expected = ?(key_size, value_size, max_entries),
                "pinned map has another layout (key size, value size, capacity); recreating it"
            );
            fs::remove_file(&path).map_err(|source| LoadError::Pin { path, source })?;
        }
    }
    Ok(())
}

/// Makes a small map hold exactly `wanted`.
fn replace_entries<K: aya::Pod + PartialEq, V: aya::Pod>(
    table: &mut KernelTable<K, V>,
    wanted: &[(K, V)],
) -> Result<(), LoadError> {
    for (key, _) in table.entries()? {
        if !wanted.iter().any(|(k, _)| *k == key) {
            table.remove(&key)?;
        }
    }
    for (key, value) in wanted {
        table.set(key, value)?;
    }
    Ok(())
}

/// A node's datapath counters summed over CPUs, read from its pinned map
/// (the node's agent need not be running).
pub fn read_counters(bpffs: &Path, node: &str) -> Result<Vec<(Reason, Counter)>, LoadError> {
    read_counters_in(&Dataplane::pin_dir(bpffs, node))
}

fn read_counters_in(pin_dir: &Path) -> Result<Vec<(Reason, Counter)>, LoadError> {
    let name = names::COUNTERS;
    let map_error = |source| LoadError::Map { name, source };
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_error)?;
    let array = PerCpuArray::<_, Counter>::try_from(
        aya::maps::Map::from_map_data(data).map_err(map_error)?,
    )
    .map_err(map_error)?;
    Reason::ALL
        .iter()
        .map(|reason| {
            let values = array.get(&(*reason as u32), 0).map_err(map_error)?;
            let total = values.iter().fold(Counter::default(), |sum, c| Counter {
                packets: sum.packets + c.packets,
                bytes: sum.bytes + c.bytes,
            });
            Ok((*reason, total))
        })
        .collect()
}

fn program_error(program: &'static str, source: ProgramError) -> LoadError {
    LoadError::Program { program, source }
}

fn attach_error(
    program: &'static str,
    target: impl std::fmt::Display,
    source: ProgramError,
) -> LoadError {
    LoadError::Attach {
        program,
        target: target.to_string(),
        source,
    }
}

/// A link pinned by an earlier run, if any.
fn pinned_link(pin: &Path) -> Result<Option<FdLink>, LoadError> {
    match PinnedLink::from_pin(pin) {
        Ok(link) => Ok(Some(link.into())),
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LoadError::Link {
            path: pin.to_path_buf(),
            source,
        }),
    }
}

/// A pinned link that can no longer be updated (its device was deleted and
/// re-created): drop the pin and attach afresh.
fn stale_link(pin: &Path, reason: &str) -> Result<(), LoadError> {
    warn!(pin = %pin.display(), reason, "pinned link is stale; attaching anew");
    fs::remove_file(pin).map_err(|source| LoadError::Pin {
        path: pin.to_path_buf(),
        source,
    })
}

/// Pins `link` at `pin`, replacing (and so detaching) any link pinned
/// there before, only once the new one is in place.
fn swap_pin(pin: &Path, link: FdLink) -> Result<(), LoadError> {
    // bpffs refuses names with a dot (they are reserved), hence no ".new".
    let mut fresh = pin.as_os_str().to_owned();
    fresh.push("_new");
    let fresh = PathBuf::from(fresh);
    let _ = fs::remove_file(&fresh);
    link.pin(&fresh).map_err(|e| LoadError::Pin {
        path: fresh.clone(),
        source: io::Error::other(e),
    })?;
    fs::rename(&fresh, pin).map_err(|source| LoadError::Pin {
        path: pin.to_path_buf(),
        source,
    })
}

/// Mounts bpffs at `path` unless it already is one.
fn ensure_bpffs(path: &Path) -> Result<(), LoadError> {
    let error = |source| LoadError::Bpffs {
        path: path.to_path_buf(),
        source,
    };
    fs::create_dir_all(path).map_err(error)?;
    if fs_magic(path).map_err(error)? == BPF_FS_MAGIC {
        return Ok(());
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| error(io::Error::other(e)))?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive
    // the call; data is NULL as bpffs takes no required options.
    let ret = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c_path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(error(io::Error::last_os_error()));
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(error)?;
    info!(path = %path.display(), "mounted bpffs");
    Ok(())
}

fn fs_magic(path: &Path) -> io::Result<i64> {
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: statfs is plain data; zeroed is a valid initial value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `stat` is a valid out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_type)
}

/// Whether XDP programs may call bpf_xdp_adjust_meta here. Some kernel
/// builds refuse it (6.18.44 on this project's CI); there XDP passes what
/// it would hand to TC with a mark untranslated, and TC translates it.
pub fn xdp_metadata_supported() -> bool {
    aya::sys::is_helper_supported(ProgramType::Xdp, BpfHelper::BPF_FUNC_xdp_adjust_meta)
        .unwrap_or(false)
}
