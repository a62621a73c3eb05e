//! Converges the service maps to a desired state, one idempotent diff at a
//! time.
//!
//! Write order keeps every intermediate state safe for the datapath, which
//! reads the maps concurrently:
//! 1. backend entries a frontend will use, before anything points at them;
//! 2. a frontend's reverse-NAT entry and Maglev table, then its slots, and
//!    its slot-0 header (the backend count) last, so a count never covers a
//!    slot that is not written yet;
//! 3. removals after: surplus slots once the count excludes them, removed
//!    frontends header-first, then backends nothing points at, then the
//!    conntrack entries of removed backends and frontends (so no new flow
//!    re-creates them).
//!
//! The reconciler mirrors what it wrote. A failed write leaves the mirror
//! unreliable, so the next sync re-reads the maps before diffing.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use dataplane_common::{
    BACKEND_FLAG_TERMINATING, Backend as BackendEntry, CtKey, CtValue, MaglevTable, RevNat,
    SERVICE_FLAG_NODEPORT, ServiceKey, ServiceValue, capacity,
};

use super::{
    maglev::{self, MaglevBackend},
    table::{Table, TableError},
};
use crate::proxy::{
    BackendState, DesiredState, Forwarding, Frontend, FrontendKey, FrontendKind, Protocol,
    SyncStats,
};

/// The maps the reconciler owns (the datapath also writes conntrack).
pub struct Maps {
    pub services: Box<dyn Table<ServiceKey, ServiceValue>>,
    pub backends: Box<dyn Table<u32, BackendEntry>>,
    pub rev_nat: Box<dyn Table<u32, RevNat>>,
    pub maglev: Box<dyn Table<u32, MaglevTable>>,
    pub conntrack: Box<dyn Table<CtKey, CtValue>>,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maps").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Map(#[from] TableError),
    #[error("no free {kind} id: all {limit} are in use")]
    IdsExhausted { kind: &'static str, limit: u32 },
    #[error("frontend {frontend} has {count} ready backends; a frontend holds at most {limit}")]
    TooManyBackends {
        frontend: FrontendKey,
        count: usize,
        limit: usize,
    },
}

/// A backend's identity: the same address, port and protocol is one
/// backend (one id) however many frontends use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct BackendAddr {
    address: Ipv4Addr,
    port: u16,
    protocol: Protocol,
}

impl BackendAddr {
    fn entry(&self, state: BackendState) -> BackendEntry {
        BackendEntry {
            address: u32::from(self.address).to_be(),
            port: self.port.to_be(),
            protocol: self.protocol.number(),
            flags: if state == BackendState::Terminating {
                BACKEND_FLAG_TERMINATING
            } else {
                0
            },
        }
    }

    fn from_entry(entry: &BackendEntry) -> Option<Self> {
        Some(Self {
            address: Ipv4Addr::from(u32::from_be(entry.address)),
            port: u16::from_be(entry.port),
            protocol: Protocol::from_number(entry.protocol)?,
        })
    }

    /// Maglev's name for the backend: identical on every node.
    fn maglev_name(&self) -> u64 {
        (u64::from(u32::from(self.address)) << 16) | u64::from(self.port)
    }
}

/// What is programmed for one frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Programmed {
    /// Slot 0, if written.
    header: Option<ServiceValue>,
    /// Backend ids of slots 1.., 0 where a slot is missing.
    slots: Vec<u32>,
    /// The backend ids the Maglev table was built from (empty: no table).
    maglev: BTreeSet<u32>,
}

/// Most backends one frontend can hold: slots are 16-bit.
const MAX_SLOTS: usize = u16::MAX as usize;

#[derive(Debug)]
pub struct Reconciler {
    maps: Maps,
    frontends: BTreeMap<FrontendKey, Programmed>,
    backends: HashMap<u32, BackendEntry>,
    backend_ids: HashMap<BackendAddr, u32>,
    /// Reverse-NAT ids in the map, whether or not a frontend uses them.
    rev_nat_ids: BTreeSet<u32>,
    /// Maglev tables in the map, whether or not a frontend uses them.
    maglev_ids: BTreeSet<u32>,
    /// Where the next id search starts.
    next_backend_id: u32,
    next_rev_nat_id: u32,
    /// A write failed: re-read the maps before the next diff.
    stale: bool,
}

impl Reconciler {
    /// Adopts whatever the maps hold (a previous agent's state survives a
    /// restart: ids and flows are kept).
    pub fn new(maps: Maps) -> Result<Self, ReconcileError> {
        let mut reconciler = Self {
            maps,
            frontends: BTreeMap::new(),
            backends: HashMap::new(),
            backend_ids: HashMap::new(),
            rev_nat_ids: BTreeSet::new(),
            maglev_ids: BTreeSet::new(),
            next_backend_id: 1,
            next_rev_nat_id: 1,
            stale: true,
        };
        reconciler.restore()?;
        Ok(reconciler)
    }

    /// Rebuilds the mirror from the maps.
    fn restore(&mut self) -> Result<(), ReconcileError> {
        let mut frontends: BTreeMap<FrontendKey, Programmed> = BTreeMap::new();
        for (key, value) in self.maps.services.entries()? {
            let Some(frontend) = frontend_key(&key) else {
                continue;
            };
            let programmed = frontends.entry(frontend).or_default();
            if key.backend_slot == 0 {
                programmed.header = Some(value);
            } else {
                let index = usize::from(key.backend_slot) - 1;
                if programmed.slots.len() <= index {
                    programmed.slots.resize(index + 1, 0);
                }
                programmed.slots[index] = value.backend_id;
            }
        }
        let maglev: HashMap<u32, BTreeSet<u32>> = self
            .maps
            .maglev
            .entries()?
            .into_iter()
            .map(|(id, table)| (id, table.backend_ids.iter().copied().collect()))
            .collect();
        for programmed in frontends.values_mut() {
            if let Some(header) = programmed.header {
                programmed.maglev = maglev.get(&header.rev_nat_id).cloned().unwrap_or_default();
            }
        }
        self.maglev_ids = maglev.into_keys().collect();
        self.frontends = frontends;
        self.backends = self.maps.backends.entries()?.into_iter().collect();
        self.backend_ids = self
            .backends
            .iter()
            .filter_map(|(id, entry)| Some((BackendAddr::from_entry(entry)?, *id)))
            .collect();
        self.rev_nat_ids = self
            .maps
            .rev_nat
            .entries()?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        self.stale = false;
        Ok(())
    }

    /// Converges the maps to `desired`.
    pub fn sync(&mut self, desired: &DesiredState) -> Result<SyncStats, ReconcileError> {
        if self.stale {
            self.restore()?;
        }
        let mut stats = SyncStats::default();
        let result = self.try_sync(desired, &mut stats);
        if result.is_err() {
            self.stale = true;
        }
        result.map(|()| stats)
    }

    fn try_sync(
        &mut self,
        desired: &DesiredState,
        stats: &mut SyncStats,
    ) -> Result<(), ReconcileError> {
        // 1. Backends every desired frontend uses, with their state.
        let mut wanted: HashMap<BackendAddr, BackendState> = HashMap::new();
        for (key, frontend) in &desired.frontends {
            for backend in &frontend.backends {
                let addr = BackendAddr {
                    address: backend.address,
                    port: backend.port,
                    protocol: key.protocol,
                };
                let state = wanted.entry(addr).or_insert(backend.state);
                // A backend active for any frontend is active.
                if backend.state == BackendState::Active {
                    *state = BackendState::Active;
                }
            }
        }
        let mut wanted_addrs: Vec<_> = wanted.iter().collect();
        wanted_addrs.sort();
        for (addr, state) in wanted_addrs {
            self.upsert_backend(addr, *state, stats)?;
        }

        // 2. Desired frontends.
        for (key, frontend) in &desired.frontends {
            self.sync_frontend(key, frontend, stats)?;
        }

        // 3. Frontends no longer desired, header first.
        let removed: Vec<FrontendKey> = self
            .frontends
            .keys()
            .filter(|key| !desired.frontends.contains_key(key))
            .copied()
            .collect();
        for key in removed {
            self.remove_frontend(&key, stats)?;
        }

        // 4. Backends nothing points at any more.
        let used: HashSet<u32> = wanted
            .keys()
            .filter_map(|addr| self.backend_ids.get(addr))
            .copied()
            .collect();
        let mut unused: Vec<u32> = self
            .backends
            .keys()
            .filter(|id| !used.contains(id))
            .copied()
            .collect();
        unused.sort_unstable();
        for id in &unused {
            self.maps.backends.remove(id)?;
            stats.map_operations += 1;
            stats.backends_removed += 1;
            if let Some(entry) = self.backends.remove(id) {
                if let Some(addr) = BackendAddr::from_entry(&entry) {
                    self.backend_ids.remove(&addr);
                }
            }
        }

        // 5. Reverse-NAT ids and Maglev tables no frontend uses.
        let live: HashSet<u32> = self
            .frontends
            .values()
            .filter_map(|p| p.header.map(|h| h.rev_nat_id))
            .collect();
        let dead_rev_nat: BTreeSet<u32> = self
            .rev_nat_ids
            .iter()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        let dead_maglev: Vec<u32> = self
            .maglev_ids
            .iter()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in dead_maglev {
            self.maps.maglev.remove(&id)?;
            self.maglev_ids.remove(&id);
            stats.map_operations += 1;
        }

        // 6. Flows of removed backends and frontends: after steps 3-4 no
        //    new flow can pick them, so purged entries are not re-created.
        //    UDP included: a stale entry would black-hole the 5-tuple.
        if !unused.is_empty() || !dead_rev_nat.is_empty() {
            let unused: HashSet<u32> = unused.into_iter().collect();
            stats.flows_purged += self.purge_conntrack(|value| {
                unused.contains(&value.backend_id) || dead_rev_nat.contains(&value.rev_nat_id)
            })?;
        }
        for id in dead_rev_nat {
            self.maps.rev_nat.remove(&id)?;
            self.rev_nat_ids.remove(&id);
            stats.map_operations += 1;
        }
        Ok(())
    }

    fn upsert_backend(
        &mut self,
        addr: &BackendAddr,
        state: BackendState,
        stats: &mut SyncStats,
    ) -> Result<(), ReconcileError> {
        let entry = addr.entry(state);
        let id = match self.backend_ids.get(addr) {
            Some(id) if self.backends.get(id) == Some(&entry) => return Ok(()),
            Some(id) => *id,
            None => {
                stats.backends_added += 1;
                let backends = &self.backends;
                allocate(
                    &mut self.next_backend_id,
                    capacity::BACKENDS,
                    "backend",
                    |id| backends.contains_key(&id),
                )?
            }
        };
        self.maps.backends.set(&id, &entry)?;
        stats.map_operations += 1;
        self.backends.insert(id, entry);
        self.backend_ids.insert(*addr, id);
        Ok(())
    }

    fn sync_frontend(
        &mut self,
        key: &FrontendKey,
        frontend: &Frontend,
        stats: &mut SyncStats,
    ) -> Result<(), ReconcileError> {
        let protocol = key.protocol;
        let active: Vec<(BackendAddr, u32)> = frontend
            .active()
            .map(|b| {
                let addr = BackendAddr {
                    address: b.address,
                    port: b.port,
                    protocol,
                };
                (addr, self.backend_ids[&addr])
            })
            .collect();
        if active.len() > MAX_SLOTS {
            return Err(ReconcileError::TooManyBackends {
                frontend: *key,
                count: active.len(),
                limit: MAX_SLOTS,
            });
        }
        let old = self.frontends.get(key).cloned().unwrap_or_default();
        let changed_before = stats.map_operations;

        let rev_nat_id = match old.header {
            Some(header) => header.rev_nat_id,
            None => {
                let used = &self.rev_nat_ids;
                let id = allocate(
                    &mut self.next_rev_nat_id,
                    capacity::REV_NAT,
                    "reverse-NAT",
                    |id| used.contains(&id),
                )?;
                let rev_nat = RevNat {
                    address: u32::from(key.address).to_be(),
                    port: key.port.to_be(),
                    _pad: 0,
                };
                self.maps.rev_nat.set(&id, &rev_nat)?;
                self.rev_nat_ids.insert(id);
                stats.map_operations += 1;
                id
            }
        };
        let programmed = self.frontends.entry(*key).or_default();

        // Maglev table, before the slots and count that make it reachable.
        let maglev_set: BTreeSet<u32> = active.iter().map(|(_, id)| *id).collect();
        if maglev_set != programmed.maglev && !maglev_set.is_empty() {
            let names: Vec<MaglevBackend> = active
                .iter()
                .map(|(addr, id)| MaglevBackend {
                    name: addr.maglev_name(),
                    id: *id,
                })
                .collect();
            let mut table = MaglevTable::default();
            if let Some(ids) = maglev::table(&names) {
                table.backend_ids.copy_from_slice(&ids);
            }
            self.maps.maglev.set(&rev_nat_id, &table)?;
            self.maglev_ids.insert(rev_nat_id);
            stats.map_operations += 1;
            programmed.maglev = maglev_set.clone();
        }

        // Slots: survivors keep their slot, holes are filled from the end,
        // newcomers are appended; only slots whose content changes are
        // written.
        let ids: Vec<u32> = active.iter().map(|(_, id)| *id).collect();
        let slots = stable_slots(
            &programmed.slots,
            &ids,
            old.header.map_or(0, |h| usize::from(h.count)),
        );
        let service_key = |slot: usize| service_key(key, slot as u16);
        for (index, id) in slots.iter().enumerate() {
            if programmed.slots.get(index) != Some(id) {
                let value = ServiceValue {
                    backend_id: *id,
                    ..ServiceValue::default()
                };
                self.maps.services.set(&service_key(index + 1), &value)?;
                stats.map_operations += 1;
                if programmed.slots.len() <= index {
                    programmed.slots.resize(index + 1, 0);
                }
                programmed.slots[index] = *id;
            }
        }

        let flags = if frontend.kind == FrontendKind::NodePort {
            SERVICE_FLAG_NODEPORT
        } else {
            0
        };
        let header = ServiceValue {
            backend_id: 0,
            count: slots.len() as u16,
            flags,
            rev_nat_id,
        };
        if programmed.header != Some(header) {
            self.maps.services.set(&service_key(0), &header)?;
            stats.map_operations += 1;
            programmed.header = Some(header);
        }

        // Surplus slots, now outside the count.
        while programmed.slots.len() > slots.len() {
            let slot = programmed.slots.len();
            self.maps.services.remove(&service_key(slot))?;
            stats.map_operations += 1;
            programmed.slots.pop();
        }
        if maglev_set.is_empty() && !programmed.maglev.is_empty() {
            self.maps.maglev.remove(&rev_nat_id)?;
            self.maglev_ids.remove(&rev_nat_id);
            stats.map_operations += 1;
            programmed.maglev.clear();
        }

        if stats.map_operations != changed_before {
            if old.header.is_none() {
                stats.frontends_added += 1;
            } else {
                stats.frontends_updated += 1;
            }
        }
        Ok(())
    }

    fn remove_frontend(
        &mut self,
        key: &FrontendKey,
        stats: &mut SyncStats,
    ) -> Result<(), ReconcileError> {
        let Some(programmed) = self.frontends.get_mut(key) else {
            return Ok(());
        };
        if let Some(header) = programmed.header {
            self.maps.services.remove(&service_key(key, 0))?;
            stats.map_operations += 1;
            programmed.header = None;
            if !programmed.maglev.is_empty() {
                self.maps.maglev.remove(&header.rev_nat_id)?;
                self.maglev_ids.remove(&header.rev_nat_id);
                stats.map_operations += 1;
                programmed.maglev.clear();
            }
        }
        while let Some(&id) = programmed.slots.last() {
            if id != 0 {
                self.maps
                    .services
                    .remove(&service_key(key, programmed.slots.len() as u16))?;
                stats.map_operations += 1;
            }
            programmed.slots.pop();
        }
        self.frontends.remove(key);
        stats.frontends_removed += 1;
        Ok(())
    }

    fn purge_conntrack(
        &mut self,
        dead: impl Fn(&CtValue) -> bool,
    ) -> Result<usize, ReconcileError> {
        let mut purged = 0;
        for (key, value) in self.maps.conntrack.entries()? {
            if dead(&value) {
                self.maps.conntrack.remove(&key)?;
                purged += 1;
            }
        }
        Ok(purged)
    }

    /// What the maps forward, read back from them (not from the mirror).
    pub fn dump(&self) -> Result<Forwarding, ReconcileError> {
        let backends: HashMap<u32, BackendEntry> =
            self.maps.backends.entries()?.into_iter().collect();
        let services = self.maps.services.entries()?;
        let slots: HashMap<ServiceKey, u32> =
            services.iter().map(|(k, v)| (*k, v.backend_id)).collect();
        let mut forwarding = Forwarding::new();
        for (key, header) in services.iter().filter(|(k, _)| k.backend_slot == 0) {
            let Some(frontend) = frontend_key(key) else {
                continue;
            };
            let targets = (1..=header.count)
                .filter_map(|slot| {
                    slots.get(&ServiceKey {
                        backend_slot: slot,
                        ..*key
                    })
                })
                .filter_map(|id| backends.get(id))
                .filter_map(BackendAddr::from_entry)
                .map(|addr| SocketAddrV4::new(addr.address, addr.port))
                .collect();
            forwarding.insert(frontend, targets);
        }
        Ok(forwarding)
    }
}

fn service_key(key: &FrontendKey, slot: u16) -> ServiceKey {
    ServiceKey::new(
        u32::from(key.address).to_be(),
        key.port.to_be(),
        key.protocol.number(),
        slot,
    )
}

fn frontend_key(key: &ServiceKey) -> Option<FrontendKey> {
    Some(FrontendKey {
        address: Ipv4Addr::from(u32::from_be(key.address)),
        port: u16::from_be(key.port),
        protocol: Protocol::from_number(key.protocol)?,
    })
}

/// New slot contents: backends in `old` (the first `count` slots) that
/// stay keep their slot; a leaving backend's slot takes the last survivor;
/// newcomers are appended in the order given.
fn stable_slots(old: &[u32], ids: &[u32], count: usize) -> Vec<u32> {
    let keep: HashSet<u32> = ids.iter().copied().collect();
    let mut slots: Vec<u32> = old.iter().take(count).copied().collect();
    let mut index = 0;
    while index < slots.len() {
        if keep.contains(&slots[index]) {
            index += 1;
        } else {
            slots.swap_remove(index);
        }
    }
    let present: HashSet<u32> = slots.iter().copied().collect();
    slots.extend(ids.iter().filter(|id| !present.contains(id)));
    slots
}

/// The next free id in `1..=limit` at or after `hint` (wrapping), moving
/// the hint past it: a full sync allocating n ids scans O(n) in total.
fn allocate(
    hint: &mut u32,
    limit: u32,
    kind: &'static str,
    in_use: impl Fn(u32) -> bool,
) -> Result<u32, ReconcileError> {
    for _ in 0..limit {
        let id = (*hint).clamp(1, limit);
        *hint = if id >= limit { 1 } else { id + 1 };
        if !in_use(id) {
            return Ok(id);
        }
    }
    Err(ReconcileError::IdsExhausted { kind, limit })
}
