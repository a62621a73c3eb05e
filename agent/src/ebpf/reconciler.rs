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
    AffinityKey, AffinityValue, BACKEND_FLAG_TERMINATING, Backend as BackendEntry, CT_FLAG_CLOSING,
    CT_FLAG_REPLY, CT_FLAG_SNAT, CtKey, CtValue, MaglevTable, RevNat, SERVICE_FLAG_EXTERNAL,
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
    /// Written by the datapath; the reconciler forgets clients of
    /// backends that leave a frontend.
    pub affinity: Box<dyn Table<AffinityKey, AffinityValue>>,
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
    fn of(backend: &crate::proxy::Backend, protocol: Protocol) -> Self {
        Self {
            address: backend.address,
            port: backend.port,
            protocol,
        }
    }

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
    /// Each frontend as last fully programmed; unchanged ones are skipped.
    synced: BTreeMap<FrontendKey, Frontend>,
    /// How many programmed frontends use each backend, and how.
    users: HashMap<BackendAddr, Users>,
    /// The mirror was just rebuilt from the maps: look for orphans.
    sweep: bool,
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
            synced: BTreeMap::new(),
            users: HashMap::new(),
            sweep: true,
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
        self.synced.clear();
        self.users.clear();
        self.sweep = true;
        self.stale = false;
        Ok(())
    }

    /// Makes the next sync re-read the maps instead of trusting the mirror.
    pub fn distrust_mirror(&mut self) {
        self.stale = true;
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
        // Only frontends whose desired version differs from the one last
        // programmed are looked at: one endpoint change costs one
        // frontend's diff, not a pass over every service.
        let changed: Vec<(&FrontendKey, &Frontend)> = desired
            .frontends
            .iter()
            .filter(|(key, frontend)| self.synced.get(key) != Some(frontend))
            .collect();
        let removed: Vec<FrontendKey> = self
            .frontends
            .keys()
            .filter(|key| !desired.frontends.contains_key(key))
            .copied()
            .collect();

        // 1. Move backend references from each changed or removed
        //    frontend's programmed version to its desired one.
        let mut touched = BTreeSet::new();
        for (key, frontend) in &changed {
            if let Some(old) = self.synced.get(key) {
                count_uses(&mut self.users, key.protocol, old, Uses::Drop, &mut touched);
            }
            count_uses(
                &mut self.users,
                key.protocol,
                frontend,
                Uses::Add,
                &mut touched,
            );
        }
        for key in &removed {
            if let Some(old) = self.synced.get(key) {
                count_uses(&mut self.users, key.protocol, old, Uses::Drop, &mut touched);
            }
        }
        let mut unused = Vec::new();
        if self.sweep {
            // After a restore every backend in the maps is judged, and
            // entries this version cannot read are dropped.
            touched.extend(self.backend_ids.keys().copied());
            unused.extend(
                self.backends
                    .iter()
                    .filter(|(_, entry)| BackendAddr::from_entry(entry).is_none())
                    .map(|(id, _)| *id),
            );
        }

        // 2. Backends in use, written before anything points at them
        //    (sorted, so ids are allocated in the same order every time).
        for addr in &touched {
            match self.users.get(addr).and_then(Users::state) {
                Some(state) => self.upsert_backend(addr, state, stats)?,
                None => unused.extend(self.backend_ids.get(addr)),
            }
        }

        // 3. Changed frontends. Backends that leave one (removed from its
        //    endpoints, though maybe still serving another) lose that
        //    frontend's flows below.
        let mut left = HashSet::new();
        for (key, frontend) in changed {
            if let (Some(old), Some(header)) = (
                self.synced.get(key),
                self.frontends.get(key).and_then(|p| p.header),
            ) {
                for gone in old
                    .backends
                    .iter()
                    .filter(|b| !frontend.backends.iter().any(|n| same_endpoint(b, n)))
                {
                    let addr = BackendAddr::of(gone, key.protocol);
                    left.extend(
                        self.backend_ids
                            .get(&addr)
                            .map(|id| (header.rev_nat_id, *id)),
                    );
                }
            }
            self.sync_frontend(key, frontend, stats)?;
            self.synced.insert(*key, frontend.clone());
        }

        // 4. Frontends no longer desired, header first.
        let mut dead_rev_nat = BTreeSet::new();
        for key in removed {
            dead_rev_nat.extend(self.remove_frontend(&key, stats)?);
            self.synced.remove(&key);
        }

        // 5. After a restore: reverse-NAT ids and Maglev tables that no
        //    frontend uses (left by a sync that failed half-way).
        if self.sweep {
            let live: HashSet<u32> = self
                .frontends
                .values()
                .filter_map(|p| p.header.map(|h| h.rev_nat_id))
                .collect();
            dead_rev_nat.extend(self.rev_nat_ids.iter().filter(|id| !live.contains(id)));
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
        }

        // 6. Flows of removed backends and frontends, before their ids are
        //    freed (a crash in between must not leave flows pointing at an
        //    id that a new backend reuses). No slot or Maglev table points
        //    at them any more, so no new flow re-creates what is purged.
        //    UDP included: a stale entry would black-hole the 5-tuple.
        //    After a restore, also flows whose backend no longer exists.
        unused.sort_unstable();
        unused.dedup();
        if !unused.is_empty() || !dead_rev_nat.is_empty() || !left.is_empty() || self.sweep {
            let unused: HashSet<u32> = unused.iter().copied().collect();
            let (sweep, known) = (self.sweep, &self.backends);
            // After a restore the mirror cannot say which backends left
            // which frontend, so every flow is checked against its
            // frontend's desired backends.
            let allowed = if sweep {
                self.desired_pairs(desired)
            } else {
                HashMap::new()
            };
            let dead = |rev_nat_id: u32, backend_id: u32| {
                unused.contains(&backend_id)
                    || dead_rev_nat.contains(&rev_nat_id)
                    || left.contains(&(rev_nat_id, backend_id))
                    || (sweep && !known.contains_key(&backend_id))
                    || allowed
                        .get(&rev_nat_id)
                        .is_some_and(|ids| !ids.contains(&backend_id))
            };
            stats.flows_purged += purge_conntrack(self.maps.conntrack.as_mut(), |value| {
                dead(value.rev_nat_id, value.backend_id)
            })?;
            // Session affinity must not lead a client back to a backend
            // that left the frontend (it may still exist for another).
            for (key, value) in self.maps.affinity.entries()? {
                if dead(key.rev_nat_id, value.backend_id) {
                    self.maps.affinity.remove(&key)?;
                    stats.map_operations += 1;
                }
            }
        }

        // 7. Backends nothing points at any more.
        for id in &unused {
            self.maps.backends.remove(id)?;
            stats.map_operations += 1;
            stats.backends_removed += 1;
            if let Some(addr) = self
                .backends
                .remove(id)
                .as_ref()
                .and_then(BackendAddr::from_entry)
            {
                self.backend_ids.remove(&addr);
            }
        }
        for id in dead_rev_nat {
            self.maps.rev_nat.remove(&id)?;
            self.rev_nat_ids.remove(&id);
            stats.map_operations += 1;
        }
        self.sweep = false;
        Ok(())
    }

    /// Each programmed frontend's reverse-NAT id with the ids of the
    /// backends `desired` gives it (terminating ones included).
    fn desired_pairs(&self, desired: &DesiredState) -> HashMap<u32, HashSet<u32>> {
        desired
            .frontends
            .iter()
            .filter_map(|(key, frontend)| {
                let header = self.frontends.get(key)?.header?;
                let ids = frontend
                    .backends
                    .iter()
                    .filter_map(|b| {
                        self.backend_ids
                            .get(&BackendAddr::of(b, key.protocol))
                            .copied()
                    })
                    .collect();
                Some((header.rev_nat_id, ids))
            })
            .collect()
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
                let addr = BackendAddr::of(b, protocol);
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

        let flags = match frontend.kind {
            FrontendKind::ClusterIp => 0,
            FrontendKind::NodePort => SERVICE_FLAG_NODEPORT | SERVICE_FLAG_EXTERNAL,
            FrontendKind::ExternalIp | FrontendKind::LoadBalancer => SERVICE_FLAG_EXTERNAL,
        };
        let header = ServiceValue {
            // Slot 0's `backend_id` is the affinity timeout.
            backend_id: frontend.affinity_timeout.unwrap_or(0),
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

    /// Removes a frontend; returns its reverse-NAT id, which the caller
    /// deletes once the frontend's flows are purged.
    fn remove_frontend(
        &mut self,
        key: &FrontendKey,
        stats: &mut SyncStats,
    ) -> Result<Option<u32>, ReconcileError> {
        let Some(programmed) = self.frontends.get_mut(key) else {
            return Ok(None);
        };
        let rev_nat_id = programmed.header.map(|h| h.rev_nat_id);
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
        Ok(rev_nat_id)
    }

    /// Deletes the conntrack entries of flows idle longer than their
    /// timeout, both directions of a flow together (the datapath stamps
    /// `last_seen` on whichever direction it sees). `now` is
    /// CLOCK_MONOTONIC seconds, the datapath's clock. Returns the number
    /// of entries deleted.
    pub fn expire_flows(
        &mut self,
        now: u32,
        timeouts: &FlowTimeouts,
    ) -> Result<usize, ReconcileError> {
        let entries: HashMap<CtKey, CtValue> = self.maps.conntrack.entries()?.into_iter().collect();
        let mut paired = HashSet::new();
        let mut expired = Vec::new();
        for (key, value) in entries.iter().filter(|(_, v)| v.flags & CT_FLAG_REPLY == 0) {
            let reply_key = self
                .backends
                .get(&value.backend_id)
                .map(|b| reply_key(key, value, b));
            let reply = reply_key.filter(|k| entries.contains_key(k));
            let (mut last_seen, mut flags) = (value.last_seen, value.flags);
            if let Some(reply) = reply.and_then(|k| entries.get(&k)) {
                last_seen = last_seen.max(reply.last_seen);
                flags |= reply.flags;
            }
            paired.extend(reply);
            if now.saturating_sub(last_seen) > timeouts.of(key.protocol, flags) {
                expired.push([Some(*key), reply]);
            }
        }
        // Reply entries whose original direction is gone age on their own.
        for (key, value) in &entries {
            let orphan = value.flags & CT_FLAG_REPLY != 0 && !paired.contains(key);
            if orphan
                && now.saturating_sub(value.last_seen) > timeouts.of(key.protocol, value.flags)
            {
                expired.push([Some(*key), None]);
            }
        }
        // The table was read a while ago (a full dump of a big table takes
        // about a second): a flow a packet used since is kept, both of its
        // entries, or the survivor would be half a flow.
        let mut deleted = 0;
        for flow in &expired {
            let keys = flow.iter().flatten();
            let mut unchanged = true;
            for key in keys.clone() {
                let current = self.maps.conntrack.lookup(key)?;
                unchanged &= current.is_some_and(|now| now.last_seen == entries[key].last_seen);
            }
            if unchanged {
                for key in keys {
                    self.maps.conntrack.remove(key)?;
                    deleted += 1;
                }
            }
        }
        Ok(deleted)
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

/// How many programmed frontends reference a backend, by the state they
/// give it.
#[derive(Clone, Copy, Debug, Default)]
struct Users {
    active: usize,
    terminating: usize,
}

impl Users {
    /// A backend active for any frontend is active.
    fn state(&self) -> Option<BackendState> {
        if self.active > 0 {
            Some(BackendState::Active)
        } else if self.terminating > 0 {
            Some(BackendState::Terminating)
        } else {
            None
        }
    }

    fn count(&mut self, state: BackendState) -> &mut usize {
        match state {
            BackendState::Active => &mut self.active,
            BackendState::Terminating => &mut self.terminating,
        }
    }
}

/// Counts `frontend`'s references to its backends in (`Uses::Add`) or out
/// (`Uses::Drop`), noting every backend touched.
fn count_uses(
    users: &mut HashMap<BackendAddr, Users>,
    protocol: Protocol,
    frontend: &Frontend,
    uses: Uses,
    touched: &mut BTreeSet<BackendAddr>,
) {
    for backend in &frontend.backends {
        let addr = BackendAddr::of(backend, protocol);
        let entry = users.entry(addr).or_default();
        let count = entry.count(backend.state);
        *count = match uses {
            Uses::Add => *count + 1,
            Uses::Drop => count.saturating_sub(1),
        };
        if entry.state().is_none() {
            users.remove(&addr);
        }
        touched.insert(addr);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Uses {
    Add,
    Drop,
}

/// How long an idle flow keeps its conntrack entries, in seconds
/// (Cilium's defaults). Closing TCP flows go quickly so their SNAT ports
/// are free again within seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowTimeouts {
    pub tcp: u32,
    pub tcp_closing: u32,
    pub other: u32,
}

impl Default for FlowTimeouts {
    fn default() -> Self {
        Self {
            tcp: 6 * 3600,
            tcp_closing: 10,
            other: 60,
        }
    }
}

impl FlowTimeouts {
    fn of(&self, protocol: u8, flags: u8) -> u32 {
        match (protocol, flags & CT_FLAG_CLOSING != 0) {
            (dataplane_common::protocol::TCP, true) => self.tcp_closing,
            (dataplane_common::protocol::TCP, false) => self.tcp,
            _ => self.other,
        }
    }
}

/// The reply-direction key of the flow whose original-direction entry is
/// (`key`, `value`), going to `backend`.
fn reply_key(key: &CtKey, value: &CtValue, backend: &BackendEntry) -> CtKey {
    if value.flags & CT_FLAG_SNAT != 0 {
        CtKey::new(
            backend.address,
            value.nat_address,
            backend.port,
            value.nat_port,
            key.protocol,
        )
    } else {
        CtKey::new(
            backend.address,
            key.saddr,
            backend.port,
            key.sport,
            key.protocol,
        )
    }
}

/// Deletes the conntrack entries `dead` picks; returns how many.
fn purge_conntrack(
    conntrack: &mut dyn Table<CtKey, CtValue>,
    dead: impl Fn(&CtValue) -> bool,
) -> Result<usize, ReconcileError> {
    let mut purged = 0;
    for (key, value) in conntrack.entries()? {
        if dead(&value) {
            conntrack.remove(&key)?;
            purged += 1;
        }
    }
    Ok(purged)
}

/// The same endpoint (address and port), whatever its state.
fn same_endpoint(a: &crate::proxy::Backend, b: &crate::proxy::Backend) -> bool {
    a.address == b.address && a.port == b.port
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
/// newcomers are appended in the order given. A backend found in two slots
/// (a sync that failed between filling a hole and shrinking) keeps one.
fn stable_slots(old: &[u32], ids: &[u32], count: usize) -> Vec<u32> {
    let keep: HashSet<u32> = ids.iter().copied().collect();
    let mut slots: Vec<u32> = old.iter().take(count).copied().collect();
    let mut kept = HashSet::new();
    let mut index = 0;
    while index < slots.len() {
        if keep.contains(&slots[index]) && kept.insert(slots[index]) {
            index += 1;
        } else {
            slots.swap_remove(index);
        }
    }
    slots.extend(ids.iter().filter(|id| !kept.contains(id)));
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

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use dataplane_common::names;

    use super::*;
    use crate::{
        ebpf::table::{FakeTable, FaultPlan},
        proxy::{Backend, ServicePortName, ServiceProxy},
    };

    /// Handles on the fake maps, shared with the reconciler under test.
    #[derive(Clone)]
    struct Fakes {
        plan: Rc<FaultPlan>,
        services: FakeTable<ServiceKey, ServiceValue>,
        backends: FakeTable<u32, BackendEntry>,
        rev_nat: FakeTable<u32, RevNat>,
        maglev: FakeTable<u32, MaglevTable>,
        conntrack: FakeTable<CtKey, CtValue>,
        affinity: FakeTable<AffinityKey, AffinityValue>,
    }

    impl Fakes {
        fn new() -> Self {
            let plan = Rc::new(FaultPlan::default());
            Self {
                services: FakeTable::new(names::SERVICES, &plan),
                backends: FakeTable::new(names::BACKENDS, &plan),
                rev_nat: FakeTable::new(names::REV_NAT, &plan),
                maglev: FakeTable::new(names::MAGLEV, &plan),
                conntrack: FakeTable::new(names::CONNTRACK, &plan),
                affinity: FakeTable::new(names::AFFINITY, &plan),
                plan,
            }
        }

        fn maps(&self) -> Maps {
            Maps {
                services: Box::new(self.services.clone()),
                backends: Box::new(self.backends.clone()),
                rev_nat: Box::new(self.rev_nat.clone()),
                maglev: Box::new(self.maglev.clone()),
                conntrack: Box::new(self.conntrack.clone()),
                affinity: Box::new(self.affinity.clone()),
            }
        }

        fn reconciler(&self) -> Reconciler {
            Reconciler::new(self.maps()).unwrap()
        }

        /// What the datapath relies on, at any instant: a header's count
        /// covers only written slots, slots and Maglev tables point at
        /// existing backends, and every header has its reverse-NAT entry.
        fn check_datapath_invariants(&self) {
            for (key, header) in self.services.entries().unwrap() {
                if key.backend_slot != 0 {
                    continue;
                }
                assert!(
                    self.rev_nat.get(&header.rev_nat_id).is_some(),
                    "{key:?} has no reverse NAT"
                );
                for slot in 1..=header.count {
                    let entry = self.services.get(&ServiceKey {
                        backend_slot: slot,
                        ..key
                    });
                    let entry = entry.unwrap_or_else(|| {
                        panic!("{key:?}: slot {slot} of {} missing", header.count)
                    });
                    assert!(
                        self.backends.get(&entry.backend_id).is_some(),
                        "{key:?}: slot {slot} dangles"
                    );
                }
                if let Some(table) = self.maglev.get(&header.rev_nat_id) {
                    for id in table.backend_ids {
                        assert!(
                            self.backends.get(&id).is_some(),
                            "{key:?}: Maglev points at missing backend {id}"
                        );
                    }
                }
            }
        }

        /// A translated flow to the first backend: both conntrack entries,
        /// as the datapath would have written them. Returns their keys.
        fn insert_flow(
            &self,
            sport: u16,
            protocol: u8,
            last_seen: u32,
            flags: u8,
        ) -> (CtKey, CtKey) {
            let (id, backend) = self.backends.entries().unwrap()[0];
            let key = CtKey::new(
                0x0a00_0005,
                u32::from(Ipv4Addr::new(10, 96, 0, 1)).to_be(),
                sport,
                80u16.to_be(),
                protocol,
            );
            let value = CtValue {
                backend_id: id,
                last_seen,
                flags,
                ..CtValue::default()
            };
            let reply = reply_key(&key, &value, &backend);
            self.conntrack.insert_directly(key, value);
            self.conntrack.insert_directly(
                reply,
                CtValue {
                    flags: flags | CT_FLAG_REPLY,
                    ..value
                },
            );
            (key, reply)
        }

        fn sizes(&self) -> [usize; 4] {
            [
                self.services.len(),
                self.backends.len(),
                self.rev_nat.len(),
                self.maglev.len(),
            ]
        }
    }

    fn frontend(kind: FrontendKind, backends: &[(u8, BackendState)]) -> Frontend {
        Frontend {
            kind,
            service: ServicePortName {
                namespace: "test".into(),
                name: "svc".into(),
                port: String::new(),
            },
            backends: backends
                .iter()
                .map(|(host, state)| Backend {
                    address: Ipv4Addr::new(10, 0, 0, *host),
                    port: 8080,
                    state: *state,
                })
                .collect(),
            affinity_timeout: None,
            policy: crate::proxy::TrafficPolicy::Cluster,
        }
    }

    fn vip(last: u8, port: u16, protocol: Protocol) -> FrontendKey {
        FrontendKey {
            address: Ipv4Addr::new(10, 96, 0, last),
            port,
            protocol,
        }
    }

    fn active(hosts: impl IntoIterator<Item = u8>) -> Vec<(u8, BackendState)> {
        hosts
            .into_iter()
            .map(|h| (h, BackendState::Active))
            .collect()
    }

    /// A ClusterIP with TCP and UDP ports and a NodePort, sharing backends.
    fn web(backends: &[(u8, BackendState)]) -> DesiredState {
        let mut state = DesiredState::default();
        state.frontends.insert(
            vip(1, 80, Protocol::Tcp),
            frontend(FrontendKind::ClusterIp, backends),
        );
        state.frontends.insert(
            vip(1, 53, Protocol::Udp),
            frontend(FrontendKind::ClusterIp, backends),
        );
        let node_port = FrontendKey {
            address: Ipv4Addr::UNSPECIFIED,
            port: 30080,
            protocol: Protocol::Tcp,
        };
        state
            .frontends
            .insert(node_port, frontend(FrontendKind::NodePort, backends));
        state
    }

    /// A walk through the life of a service: creation, scale-up, a
    /// backend terminating, scale-down, scale to zero and back, deletion.
    fn lifecycle() -> Vec<DesiredState> {
        vec![
            web(&active([1, 2])),
            web(&active([1, 2, 3, 4])),
            web(&[
                (1, BackendState::Active),
                (2, BackendState::Terminating),
                (3, BackendState::Active),
            ]),
            web(&active([3])),
            web(&[]),
            web(&active([5, 6])),
            DesiredState::default(),
        ]
    }

    #[test]
    fn programs_the_desired_state_and_converges() {
        let fakes = Fakes::new();
        let mut reconciler = fakes.reconciler();
        for desired in lifecycle() {
            let stats = reconciler.sync(&desired).unwrap();
            assert!(stats.map_operations > 0);
            assert_eq!(reconciler.dump().unwrap(), desired.forwarding());
            fakes.check_datapath_invariants();
            // Level-triggered and idempotent: nothing left to do.
            assert_eq!(reconciler.sync(&desired).unwrap(), SyncStats::default());
        }
        assert_eq!(fakes.sizes(), [0, 0, 0, 0], "a flush leaves nothing behind");
    }

    #[test]
    fn a_resync_repairs_what_changed_behind_the_reconcilers_back() {
        let fakes = Fakes::new();
        let mut reconciler = fakes.reconciler();
        let desired = web(&active([1, 2]));
        reconciler.sync(&desired).unwrap();
        let mut services = fakes.services.clone();
        services
            .remove(&service_key(&vip(1, 80, Protocol::Tcp), 2))
            .unwrap();
        // The mirror still believes the slot is there...
        assert_eq!(reconciler.sync(&desired).unwrap(), SyncStats::default());
        assert_ne!(reconciler.dump().unwrap(), desired.forwarding());
        // ...until a resync reads the maps again.
        ServiceProxy::resync(&mut reconciler, &desired).unwrap();
        assert_eq!(reconciler.dump().unwrap(), desired.forwarding());
    }

    #[test]
    fn node_port_header_carries_the_flag() {
        let fakes = Fakes::new();
        fakes.reconciler().sync(&web(&active([1]))).unwrap();
        let header = fakes
            .services
            .get(&ServiceKey::new(0, 30080u16.to_be(), 6, 0))
            .unwrap();
        assert_eq!(header.flags, SERVICE_FLAG_NODEPORT | SERVICE_FLAG_EXTERNAL);
        assert_eq!(header.count, 1);
    }

    #[test]
    fn every_intermediate_state_is_safe_for_the_datapath() {
        let fakes = Fakes::new();
        let observer = fakes.clone();
        fakes
            .plan
            .observe(move || observer.check_datapath_invariants());
        let mut reconciler = fakes.reconciler();
        for desired in lifecycle() {
            reconciler.sync(&desired).unwrap();
        }
    }

    #[test]
    fn a_failed_write_anywhere_leaves_a_safe_state_and_the_next_sync_repairs_it() {
        let steps = lifecycle();
        for (from, to) in steps.iter().zip(steps.iter().skip(1)) {
            let writes = {
                let fakes = Fakes::new();
                let mut reconciler = fakes.reconciler();
                reconciler.sync(from).unwrap();
                let before = fakes.plan.writes();
                reconciler.sync(to).unwrap();
                fakes.plan.writes() - before
            };
            let clean = {
                let fakes = Fakes::new();
                fakes.reconciler().sync(to).unwrap();
                fakes.sizes()
            };
            for fail_at in 0..writes {
                let fakes = Fakes::new();
                let mut reconciler = fakes.reconciler();
                reconciler.sync(from).unwrap();
                fakes.plan.fail_write(fail_at);
                let error = reconciler.sync(to).unwrap_err();
                assert!(
                    matches!(error, ReconcileError::Map(TableError::Injected { .. })),
                    "{error}"
                );
                fakes.check_datapath_invariants();
                reconciler.sync(to).unwrap();
                assert_eq!(
                    reconciler.dump().unwrap(),
                    to.forwarding(),
                    "failing write {fail_at}"
                );
                assert_eq!(fakes.sizes(), clean, "failing write {fail_at} left orphans");
            }
        }
    }

    #[test]
    fn one_endpoint_change_touches_only_its_frontend() {
        let fakes = Fakes::new();
        let mut reconciler = fakes.reconciler();
        let mut desired = DesiredState::default();
        for i in 0..200u16 {
            let key = FrontendKey {
                address: Ipv4Addr::new(10, 96, (i >> 8) as u8, i as u8),
                port: 80,
                protocol: Protocol::Tcp,
            };
            desired
                .frontends
                .insert(key, frontend(FrontendKind::ClusterIp, &active([1, 2, 3])));
        }
        reconciler.sync(&desired).unwrap();
        let key = FrontendKey {
            address: Ipv4Addr::new(10, 96, 0, 7),
            port: 80,
            protocol: Protocol::Tcp,
        };
        desired.frontends.insert(
            key,
            frontend(FrontendKind::ClusterIp, &active([1, 2, 3, 4])),
        );
        let stats = reconciler.sync(&desired).unwrap();
        // New backend, Maglev table, new slot, header.
        assert_eq!(stats.map_operations, 4, "{stats:?}");
        assert_eq!((stats.frontends_updated, stats.backends_added), (1, 1));
    }

    #[test]
    fn surviving_backends_keep_their_slots() {
        let fakes = Fakes::new();
        let mut reconciler = fakes.reconciler();
        let key = vip(1, 80, Protocol::Tcp);
        let slot = |n: u16| {
            fakes
                .services
                .get(&service_key(&key, n))
                .map(|v| v.backend_id)
        };
        reconciler.sync(&web(&active([1, 2, 3]))).unwrap();
        let (first, third) = (slot(1), slot(3));
        reconciler.sync(&web(&active([1, 3]))).unwrap();
        assert_eq!(slot(1), first);
        assert_eq!(slot(2), third, "the last backend fills the hole");
        assert_eq!(slot(3), None);
    }

    #[test]
    fn terminating_backends_keep_flows_but_get_no_slot() {
        let fakes = Fakes::new();
        let mut reconciler = fakes.reconciler();
        reconciler.sync(&web(&active([1, 2]))).unwrap();
        let id_of = |host: u8| {
            let address = u32::from(Ipv4Addr::new(10, 0, 0, host)).to_be();
            fakes
                .backends
                .entries()
                .unwrap()
                .into_iter()
                .find(|(_, b)| b.address == address)
                .map(|(id, _)| id)
        };
        let (one, two) = (id_of(1).unwrap(), id_of(2).unwrap());
        let flow = |id: u32, sport: u16| {
            let key = CtKey::new(1, 2, sport, 80, 17);
            fakes.conntrack.insert_directly(
                key,
                CtValue {
                    backend_id: id,
                    rev_nat_id: 1,
                    ..CtValue::default()
                },
            );
            fakes.conntrack.insert_directly(
                key.reversed(),
                CtValue {
                    backend_id: id,
                    flags: CT_FLAG_REPLY,
                    ..CtValue::default()
                },
            );
        };
        flow(one, 1000);
        flow(two, 2000);

        reconciler
            .sync(&web(&[
                (1, BackendState::Active),
                (2, BackendState::Terminating),
            ]))
            .unwrap();
        assert_eq!(
            fakes.backends.get(&two).unwrap().flags,
            BACKEND_FLAG_TERMINATING
        );
        assert_eq!(
            fakes.conntrack.len(),
            4,
            "a terminating backend keeps its flows"
        );
        let forwarding = reconciler.dump().unwrap();
        assert!(forwarding.values().all(|targets| targets.len() == 1));

        let stats = reconciler.sync(&web(&active([1]))).unwrap();
        assert_eq!(
            stats.flows_purged, 2,
            "both directions of the removed backend's flow"
        );
        assert!(
            fakes
                .conntrack
                .entries()
                .unwrap()
                .iter()
                .all(|(_, v)| v.backend_id == one)
        );
    }

    #[test]
    fn a_backend_leaving_one_service_loses_that_services_flows_only() {
        let fakes = Fakes::new();
        let mut reconciler = fakes.reconciler();
        let mut both_services = web(&active([1, 2]));
        let other = vip(2, 80, Protocol::Tcp);
        both_services
            .frontends
            .insert(other, frontend(FrontendKind::ClusterIp, &active([1])));
        reconciler.sync(&both_services).unwrap();
        let rev_nat =
            |key: &FrontendKey| fakes.services.get(&service_key(key, 0)).unwrap().rev_nat_id;
        let backend_one = fakes
            .services
            .get(&service_key(&other, 1))
            .unwrap()
            .backend_id;
        let (web_flow, other_flow) = (CtKey::new(1, 2, 3, 80, 6), CtKey::new(1, 3, 3, 80, 6));
        for (key, frontend) in [(web_flow, vip(1, 80, Protocol::Tcp)), (other_flow, other)] {
            let value = CtValue {
                backend_id: backend_one,
                rev_nat_id: rev_nat(&frontend),
                ..CtValue::default()
            };
            fakes.conntrack.insert_directly(key, value);
        }
        // Backend 1 leaves web but still serves the other service.
        let mut desired = web(&active([2]));
        desired
            .frontends
            .insert(other, frontend(FrontendKind::ClusterIp, &active([1])));
        let stats = reconciler.sync(&desired).unwrap();
        assert!(stats.flows_purged >= 1, "{stats:?}");
        assert_eq!(
            fakes.conntrack.get(&web_flow),
            None,
            "web's flow to the departed backend is purged"
        );
        assert!(
            fakes.conntrack.get(&other_flow).is_some(),
            "the other service's flow stays"
        );
    }

    #[test]
    fn affinity_timeouts_reach_the_header_and_clients_of_departed_backends_are_forgotten() {
        let fakes = Fakes::new();
        let mut reconciler = fakes.reconciler();
        let sticky = |backends: &[u8]| {
            let mut state = web(&active(backends.iter().copied()));
            for frontend in state.frontends.values_mut() {
                frontend.affinity_timeout = Some(60);
            }
            state
        };
        reconciler.sync(&sticky(&[1, 2])).unwrap();
        let web_key = vip(1, 80, Protocol::Tcp);
        let header = fakes.services.get(&service_key(&web_key, 0)).unwrap();
        assert_eq!(header.backend_id, 60, "slot 0 carries the timeout");
        let id_of = |slot| {
            fakes
                .services
                .get(&service_key(&web_key, slot))
                .unwrap()
                .backend_id
        };
        let (first, second) = (id_of(1), id_of(2));
        let client = |n: u64| AffinityKey {
            client: n,
            rev_nat_id: header.rev_nat_id,
            ..AffinityKey::default()
        };
        for (n, backend_id) in [(1, first), (2, second)] {
            fakes.affinity.insert_directly(
                client(n),
                AffinityValue {
                    backend_id,
                    last_used: 0,
                },
            );
        }
        let addr_of = |id| fakes.backends.get(&id).unwrap().address;
        // The backend in slot 2 leaves; slot 1's stays.
        let staying = (u32::from_be(addr_of(first)) & 0xff) as u8;
        reconciler.sync(&sticky(&[staying])).unwrap();
        assert!(
            fakes.affinity.get(&client(1)).is_some(),
            "the staying backend's client stays"
        );
        assert_eq!(
            fakes.affinity.get(&client(2)),
            None,
            "the departed backend's client is forgotten"
        );
    }

    #[test]
    fn after_a_restart_flows_to_backends_a_frontend_lost_are_purged() {
        let fakes = Fakes::new();
        let mut both_services = web(&active([1, 2]));
        let other = vip(2, 80, Protocol::Tcp);
        both_services
            .frontends
            .insert(other, frontend(FrontendKind::ClusterIp, &active([1])));
        fakes.reconciler().sync(&both_services).unwrap();
        let web_key = vip(1, 80, Protocol::Tcp);
        let web_rev_nat = fakes
            .services
            .get(&service_key(&web_key, 0))
            .unwrap()
            .rev_nat_id;
        let one = fakes
            .services
            .get(&service_key(&other, 1))
            .unwrap()
            .backend_id;
        let flow = CtKey::new(1, 2, 3, 80, 6);
        fakes.conntrack.insert_directly(
            flow,
            CtValue {
                backend_id: one,
                rev_nat_id: web_rev_nat,
                ..CtValue::default()
            },
        );
        // While the agent was down, backend 1 left web (but still serves
        // the other service).
        let mut desired = web(&active([2]));
        desired
            .frontends
            .insert(other, frontend(FrontendKind::ClusterIp, &active([1])));
        fakes.reconciler().sync(&desired).unwrap();
        assert_eq!(fakes.conntrack.get(&flow), None);
    }

    #[test]
    fn with_no_ready_backend_terminating_ones_take_new_flows() {
        let fakes = Fakes::new();
        let mut reconciler = fakes.reconciler();
        let desired = web(&[
            (1, BackendState::Terminating),
            (2, BackendState::Terminating),
        ]);
        reconciler.sync(&desired).unwrap();
        let forwarding = reconciler.dump().unwrap();
        assert!(
            forwarding.values().all(|targets| targets.len() == 2),
            "{forwarding:?}"
        );
        assert_eq!(forwarding, desired.forwarding());
    }

    #[test]
    fn removed_frontends_lose_their_flows() {
        let fakes = Fakes::new();
        let mut reconciler = fakes.reconciler();
        reconciler.sync(&web(&active([1]))).unwrap();
        let header = fakes
            .services
            .get(&service_key(&vip(1, 53, Protocol::Udp), 0))
            .unwrap();
        fakes.conntrack.insert_directly(
            CtKey::new(1, 2, 3, 53, 17),
            CtValue {
                backend_id: 999,
                rev_nat_id: header.rev_nat_id,
                ..CtValue::default()
            },
        );
        let mut desired = web(&active([1]));
        desired.frontends.remove(&vip(1, 53, Protocol::Udp));
        assert_eq!(reconciler.sync(&desired).unwrap().flows_purged, 1);
    }

    #[test]
    fn a_restarted_reconciler_adopts_the_maps() {
        let fakes = Fakes::new();
        fakes.reconciler().sync(&web(&active([1, 2, 3]))).unwrap();
        let before = fakes.services.entries().unwrap();
        let mut restarted = fakes.reconciler();
        assert_eq!(
            restarted.sync(&web(&active([1, 2, 3]))).unwrap(),
            SyncStats::default()
        );
        let mut after = fakes.services.entries().unwrap();
        let mut before = before;
        before.sort_by_key(|(k, _)| *k);
        after.sort_by_key(|(k, _)| *k);
        assert_eq!(before, after);
    }

    #[test]
    fn maglev_tables_agree_across_nodes_with_different_ids() {
        let node_a = Fakes::new();
        let node_b = Fakes::new();
        node_a.reconciler().sync(&web(&active([1, 2, 3]))).unwrap();
        // Node B learnt other backends first, so its ids differ.
        let mut b = node_b.reconciler();
        b.sync(&web(&active([7, 8]))).unwrap();
        b.sync(&web(&active([3, 2, 1]))).unwrap();

        let table = |fakes: &Fakes| {
            let header = fakes
                .services
                .get(&service_key(&vip(1, 80, Protocol::Tcp), 0))
                .unwrap();
            let table = fakes.maglev.get(&header.rev_nat_id).unwrap();
            table
                .backend_ids
                .map(|id| fakes.backends.get(&id).unwrap().address)
        };
        assert_ne!(node_a.backends.entries().unwrap().len(), 0);
        assert_eq!(table(&node_a), table(&node_b));
    }

    #[test]
    fn idle_flows_expire_with_both_directions_and_closing_ones_sooner() {
        let fakes = Fakes::new();
        let mut reconciler = fakes.reconciler();
        reconciler.sync(&web(&active([1]))).unwrap();
        let flow = |sport, protocol, last_seen, flags| {
            fakes.insert_flow(sport, protocol, last_seen, flags)
        };
        let now = 100_000;
        let timeouts = FlowTimeouts::default();
        let busy_tcp = flow(1, 6, now - 5, 0);
        let closed_tcp = flow(2, 6, now - 11, CT_FLAG_CLOSING);
        let idle_udp = flow(3, 17, now - 61, 0);
        let live_udp = flow(4, 17, now - 59, 0);
        // Only the reply direction was active lately: the flow is alive.
        let (one_way_key, one_way_reply) = flow(5, 17, now - 500, 0);
        let mut fresh_reply = fakes.conntrack.get(&one_way_reply).unwrap();
        fresh_reply.last_seen = now;
        fakes.conntrack.insert_directly(one_way_reply, fresh_reply);
        let orphan = CtKey::new(9, 9, 9, 9, 17);
        fakes.conntrack.insert_directly(
            orphan,
            CtValue {
                flags: CT_FLAG_REPLY,
                last_seen: now - 61,
                ..CtValue::default()
            },
        );

        assert_eq!(reconciler.expire_flows(now, &timeouts).unwrap(), 5);
        for (key, reply) in [closed_tcp, idle_udp] {
            assert!(fakes.conntrack.get(&key).is_none() && fakes.conntrack.get(&reply).is_none());
        }
        for (key, reply) in [busy_tcp, live_udp, (one_way_key, one_way_reply)] {
            assert!(fakes.conntrack.get(&key).is_some() && fakes.conntrack.get(&reply).is_some());
        }
        assert!(fakes.conntrack.get(&orphan).is_none());
    }

    #[test]
    fn a_flow_used_while_expiry_runs_is_kept_whole() {
        let fakes = Fakes::new();
        let mut reconciler = fakes.reconciler();
        reconciler.sync(&web(&active([1]))).unwrap();
        let now = 1_000;
        let flows: Vec<(CtKey, CtKey)> = [1, 2]
            .map(|sport| fakes.insert_flow(sport, 17, 1, 0))
            .to_vec();
        // A packet refreshes whichever flow is still there when expiry
        // makes its first delete.
        let (datapath, flows_seen) = (fakes.conntrack.clone(), flows.clone());
        fakes.plan.observe(move || {
            for (key, _) in &flows_seen {
                if let Some(mut value) = datapath.get(key) {
                    value.last_seen = now;
                    datapath.insert_directly(*key, value);
                }
            }
        });
        assert_eq!(
            reconciler
                .expire_flows(now, &FlowTimeouts::default())
                .unwrap(),
            2
        );
        let whole = flows
            .iter()
            .filter(|(k, r)| fakes.conntrack.get(k).is_some() && fakes.conntrack.get(r).is_some());
        assert_eq!(
            whole.count(),
            1,
            "one flow expired, the refreshed one kept both entries"
        );
        assert_eq!(fakes.conntrack.len(), 2);
    }

    #[test]
    fn stable_slots_fill_holes_from_the_end() {
        assert_eq!(stable_slots(&[1, 2, 3, 4], &[1, 3, 4], 4), [1, 4, 3]);
        assert_eq!(stable_slots(&[1, 2], &[2, 5, 1], 2), [1, 2, 5]);
        assert_eq!(
            stable_slots(&[1, 2, 9], &[1, 2], 2),
            [1, 2],
            "slots past the count are ignored"
        );
        assert_eq!(
            stable_slots(&[1, 5, 5], &[1, 5], 3),
            [1, 5],
            "a duplicate from a failed sync goes"
        );
    }

    #[test]
    fn ids_wrap_and_exhaust() {
        let mut hint = 3;
        assert_eq!(allocate(&mut hint, 3, "test", |id| id == 1).unwrap(), 3);
        assert_eq!(allocate(&mut hint, 3, "test", |id| id == 1).unwrap(), 2);
        assert!(matches!(
            allocate(&mut hint, 3, "test", |_| true),
            Err(ReconcileError::IdsExhausted { .. })
        ));
    }
}
