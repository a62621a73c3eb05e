//! Pod addresses from the node's podCIDR, for the CNI plugin: one address
//! per attachment (container ID + interface name, as CNI identifies
//! them), handed out round-robin after the last one so a freed address is
//! not reused at once, and written to disk before it is returned, so an
//! agent restart never hands out a live address twice.
//!
//! The first host address of the CIDR is the pods' gateway (the node side
//! of every pod's veth carries it); the network and broadcast addresses
//! are never handed out.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("this node has no podCIDR yet: no pod addresses to hand out")]
    NoCidr,
    #[error("{cidr} is not an IPv4 CIDR for pods (/8 to /30)")]
    BadCidr { cidr: String },
    #[error("no free address in {cidr}: all {capacity} are in use")]
    Exhausted { cidr: String, capacity: u32 },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged: {source}")]
    Damaged {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One network attachment, as CNI names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// An address handed to an attachment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

/// A node's pod CIDR, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodCidr {
    network: u32,
    prefix: u8,
}

impl PodCidr {
    pub fn parse(text: &str) -> Result<Self, IpamError> {
        let bad = || IpamError::BadCidr {
            cidr: text.to_string(),
        };
        let (address, prefix) = text.split_once('/').ok_or_else(bad)?;
        let address: Ipv4Addr = address.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Self {
            network: u32::from(address) & mask,
            prefix,
        })
    }

    fn size(self) -> u32 {
        1 << (32 - self.prefix)
    }

    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(self.network)
    }

    pub fn prefix(self) -> u8 {
        self.prefix
    }

    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1)
    }

    /// Addresses pods may get: all but the network, gateway and broadcast.
    pub fn capacity(self) -> u32 {
        self.size() - 3
    }
}

impl std::fmt::Display for PodCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network), self.prefix)
    }
}

/// What is kept on disk.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct State {
    /// The CIDR addresses are handed out from, kept so a restarted agent
    /// can release addresses before it learns the CIDR again.
    #[serde(default)]
    cidr: Option<String>,
    allocations: BTreeMap<Ipv4Addr, Attachment>,
    /// The last address handed out; the next search starts after it.
    last: Option<Ipv4Addr>,
}

/// The node's pod addresses.
#[derive(Debug)]
pub struct Ipam {
    path: PathBuf,
    cidr: Option<PodCidr>,
    state: State,
}

impl Ipam {
    /// Opens the allocations kept at `path` (none if it does not exist),
    /// with the CIDR they were made from, if one was known.
    pub fn open(path: &Path) -> Result<Self, IpamError> {
        let state: State = match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| IpamError::Damaged {
                path: path.to_path_buf(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(source) => {
                return Err(IpamError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let cidr = state.cidr.as_deref().map(PodCidr::parse).transpose()?;
        Ok(Self {
            path: path.to_path_buf(),
            cidr,
            state,
        })
    }

    /// Hands out addresses from `cidr` from now on. Allocations outside
    /// it (the CIDR changed) are kept until released or collected: their
    /// pods may still run.
    pub fn set_cidr(&mut self, cidr: PodCidr) -> Result<(), IpamError> {
        if self.cidr == Some(cidr) {
            return Ok(());
        }
        self.commit(|state| state.cidr = Some(cidr.to_string()))?;
        self.cidr = Some(cidr);
        Ok(())
    }

    pub fn cidr(&self) -> Option<PodCidr> {
        self.cidr
    }

    /// Addresses handed out and not yet released.
    pub fn allocated(&self) -> u32 {
        u32::try_from(self.state.allocations.len()).unwrap_or(u32::MAX)
    }

    /// The attachment's address: the one it already has (ADD is retried
    /// by runtimes), or the next free one, persisted before it is returned.
    pub fn allocate(&mut self, attachment: &Attachment) -> Result<Assignment, IpamError> {
        let cidr = self.cidr.ok_or(IpamError::NoCidr)?;
        let assignment = |address| Assignment {
            address,
            prefix: cidr.prefix,
            gateway: cidr.gateway(),
        };
        // Pod addresses: a changed CIDR may have made an old address its
        // network, gateway or broadcast address.
        let (first, last) = (cidr.network + 2, cidr.network + (cidr.size() - 2));
        let usable = |address: &Ipv4Addr| (first..=last).contains(&u32::from(*address));
        if let Some((address, _)) = self
            .state
            .allocations
            .iter()
            .find(|(address, a)| *a == attachment && usable(address))
        {
            return Ok(assignment(*address));
        }
        // After the last one handed out, if that is still a pod address.
        let start = self
            .state
            .last
            .filter(usable)
            .map_or(first, |a| u32::from(a) + 1);
        let found = (start..=last)
            .chain(first..start)
            .map(Ipv4Addr::from)
            .find(|a| !self.state.allocations.contains_key(a))
            .ok_or_else(|| IpamError::Exhausted {
                cidr: cidr.to_string(),
                capacity: cidr.capacity(),
            })?;
        self.commit(|state| {
            state.allocations.insert(found, attachment.clone());
            state.last = Some(found);
        })?;
        Ok(assignment(found))
    }

    /// Frees the attachment's addresses (two, if it was allocated again
    /// after a CIDR change); releasing an unknown attachment is not an
    /// error (CNI DEL is idempotent). Needs no CIDR.
    pub fn release(&mut self, attachment: &Attachment) -> Result<Vec<Ipv4Addr>, IpamError> {
        self.free(|a| a == attachment)
    }

    /// Frees every address whose attachment is not in `valid` (CNI GC);
    /// returns those freed. Needs no CIDR.
    pub fn collect(&mut self, valid: &[Attachment]) -> Result<Vec<Ipv4Addr>, IpamError> {
        self.free(|a| !valid.contains(a))
    }

    fn free(&mut self, doomed: impl Fn(&Attachment) -> bool) -> Result<Vec<Ipv4Addr>, IpamError> {
        let freed: Vec<Ipv4Addr> = self
            .state
            .allocations
            .iter()
            .filter(|(_, a)| doomed(a))
            .map(|(address, _)| *address)
            .collect();
        if !freed.is_empty() {
            self.commit(|state| state.allocations.retain(|_, a| !doomed(a)))?;
        }
        Ok(freed)
    }

    /// Applies `change` to a copy of the state, persists the copy, and only
    /// then makes it the state: memory never runs ahead of the disk.
    fn commit(&mut self, change: impl FnOnce(&mut State)) -> Result<(), IpamError> {
        let mut next = self.state.clone();
        change(&mut next);
        self.persist(&next)?;
        self.state = next;
        Ok(())
    }

    /// Writes `state` to a temporary file, syncs it and renames it over
    /// the old one: a crash leaves the old state or the new, never half.
    fn persist(&self, state: &State) -> Result<(), IpamError> {
        let error = |source| IpamError::Write {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(state).expect("IPAM state serializes");
        let mut file = fs::File::create(&tmp).map_err(error)?;
        file.write_all(&bytes).map_err(error)?;
        file.sync_all().map_err(error)?;
        fs::rename(&tmp, &self.path).map_err(error)?;
        if let Some(dir) = self.path.parent() {
            // The rename is durable once the directory is.
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(error)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment(id: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn cidrs_are_parsed_and_checked() {
        let cidr = PodCidr::parse("10.244.1.77/24").unwrap();
        assert_eq!(cidr.to_string(), "10.244.1.0/24");
        assert_eq!(cidr.gateway(), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(cidr.capacity(), 253);
        for bad in [
            "10.244.1.0",
            "10.244.1.0/31",
            "10.0.0.0/1",
            "fd00::/64",
            "10.244.1.0/x",
        ] {
            assert!(PodCidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses_survive_a_restart_and_are_not_reused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let cidr = PodCidr::parse("10.244.1.0/29").unwrap();
        let mut ipam = Ipam::open(&path).unwrap();
        assert!(matches!(
            ipam.allocate(&attachment("a")),
            Err(IpamError::NoCidr)
        ));
        ipam.set_cidr(cidr).unwrap();
        let a = ipam.allocate(&attachment("a")).unwrap();
        assert_eq!(a.address, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!((a.prefix, a.gateway), (29, Ipv4Addr::new(10, 244, 1, 1)));
        assert_eq!(ipam.allocate(&attachment("a")).unwrap(), a, "idempotent");
        let b = ipam.allocate(&attachment("b")).unwrap().address;
        assert_eq!(ipam.release(&attachment("a")).unwrap(), [a.address]);
        assert!(ipam.release(&attachment("a")).unwrap().is_empty());

        // A restarted agent knows the CIDR, that b is taken, and carries
        // on after it.
        let mut ipam = Ipam::open(&path).unwrap();
        assert_eq!(ipam.cidr(), Some(cidr));
        let c = ipam.allocate(&attachment("c")).unwrap().address;
        assert_eq!(c, Ipv4Addr::from(u32::from(b) + 1));
        assert_ne!(c, a.address, "a freed address waits its turn");
    }

    #[test]
    fn an_exhausted_pool_says_so_and_gc_frees_leaks() {
        let dir = tempfile::tempdir().unwrap();
        let cidr = PodCidr::parse("10.244.1.0/29").unwrap();
        let mut ipam = Ipam::open(&dir.path().join("ipam.json")).unwrap();
        ipam.set_cidr(cidr).unwrap();
        let ids = ["a", "b", "c", "d", "e"];
        for id in ids {
            ipam.allocate(&attachment(id)).unwrap();
        }
        let error = ipam.allocate(&attachment("f")).unwrap_err();
        assert!(error.to_string().contains("all 5 are in use"), "{error}");
        let freed = ipam.collect(&[attachment("a"), attachment("c")]).unwrap();
        assert_eq!(freed.len(), 3);
        assert!(ipam.allocate(&attachment("f")).is_ok());
    }

    #[test]
    fn a_damaged_file_is_an_error_not_an_empty_pool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        fs::write(&path, "{not json").unwrap();
        let error = Ipam::open(&path).unwrap_err();
        assert!(matches!(error, IpamError::Damaged { .. }), "{error}");
    }

    #[test]
    fn a_changed_cidr_never_hands_out_its_reserved_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::open(&dir.path().join("ipam.json")).unwrap();
        ipam.set_cidr(PodCidr::parse("10.244.0.0/16").unwrap())
            .unwrap();
        // Walk the last-handed-out mark to 10.244.0.254.
        for n in 0..253 {
            let id = format!("p{n}");
            ipam.allocate(&attachment(&id)).unwrap();
            ipam.release(&attachment(&id)).unwrap();
        }
        ipam.allocate(&attachment("old")).unwrap();
        // Shrunk to a /24: .255 is its broadcast. The next address is .2;
        // a retried ADD of "old" gets a pod address, not its .255, and
        // releasing it frees both.
        ipam.set_cidr(PodCidr::parse("10.244.0.0/24").unwrap())
            .unwrap();
        let next = ipam.allocate(&attachment("new")).unwrap().address;
        assert_eq!(next, Ipv4Addr::new(10, 244, 0, 2));
        let again = ipam.allocate(&attachment("old")).unwrap().address;
        assert_eq!(again, Ipv4Addr::new(10, 244, 0, 3));
        assert_eq!(ipam.release(&attachment("old")).unwrap().len(), 2);
    }
}
