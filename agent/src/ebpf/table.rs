//! Map access behind a small trait, so the reconciler runs the same against
//! the kernel's maps, an in-memory fake, and a fake that fails on cue.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    fmt::Debug,
    hash::Hash,
    rc::Rc,
};

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, MapData, MapError},
};

/// A failed map operation.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("map {map}: {operation} failed: {source}")]
    Kernel {
        map: &'static str,
        operation: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map}: injected fault on {operation}")]
    Injected {
        map: &'static str,
        operation: &'static str,
    },
}

/// One BPF hash map's operations, as the reconciler needs them.
pub trait Table<K, V> {
    fn name(&self) -> &'static str;
    fn entries(&self) -> Result<Vec<(K, V)>, TableError>;
    fn lookup(&self, key: &K) -> Result<Option<V>, TableError>;
    fn set(&mut self, key: &K, value: &V) -> Result<(), TableError>;
    /// Removes `key`; a missing key is not an error (removal is idempotent).
    fn remove(&mut self, key: &K) -> Result<(), TableError>;
}

/// A pinned kernel map.
pub struct KernelTable<K, V> {
    name: &'static str,
    map: BpfHashMap<MapData, K, V>,
}

impl<K, V> Debug for KernelTable<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelTable")
            .field("name", &self.name)
            .finish()
    }
}

impl<K: Pod, V: Pod> KernelTable<K, V> {
    pub fn new(name: &'static str, map: BpfHashMap<MapData, K, V>) -> Self {
        Self { name, map }
    }

    fn error(&self, operation: &'static str, source: MapError) -> TableError {
        TableError::Kernel {
            map: self.name,
            operation,
            source,
        }
    }
}

impl<K: Pod, V: Pod> Table<K, V> for KernelTable<K, V> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn entries(&self) -> Result<Vec<(K, V)>, TableError> {
        // Keys that vanish between next_key and lookup (LRU eviction, a
        // datapath delete) are skipped rather than failing the dump.
        let mut out = Vec::new();
        for key in self.map.keys() {
            let key = key.map_err(|e| self.error("iterate", e))?;
            match self.map.get(&key, 0) {
                Ok(value) => out.push((key, value)),
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(self.error("lookup", e)),
            }
        }
        Ok(out)
    }

    fn lookup(&self, key: &K) -> Result<Option<V>, TableError> {
        match self.map.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(self.error("lookup", e)),
        }
    }

    fn set(&mut self, key: &K, value: &V) -> Result<(), TableError> {
        self.map
            .insert(key, value, 0)
            .map_err(|e| self.error("update", e))
    }

    fn remove(&mut self, key: &K) -> Result<(), TableError> {
        match self.map.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(self.error("delete", e)),
        }
    }
}

/// Shared between fake tables: counts writes and, when armed, fails the
/// chosen one. Also runs an observer after every successful write, so a
/// test can check invariants at every intermediate state.
#[derive(Default)]
pub struct FaultPlan {
    writes: Cell<usize>,
    fail_at: Cell<Option<usize>>,
    #[allow(clippy::type_complexity, reason = "a boxed callback, named once")]
    observer: RefCell<Option<Box<dyn Fn()>>>,
}

impl Debug for FaultPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultPlan")
            .field("writes", &self.writes.get())
            .field("fail_at", &self.fail_at.get())
            .finish()
    }
}

impl FaultPlan {
    /// Writes (sets and removes) issued so far, failed ones included.
    pub fn writes(&self) -> usize {
        self.writes.get()
    }

    /// Fails the `n`th write from now (0 = the next one), once.
    pub fn fail_write(&self, n: usize) {
        self.fail_at.set(Some(self.writes.get() + n));
    }

    pub fn observe(&self, observer: impl Fn() + 'static) {
        *self.observer.borrow_mut() = Some(Box::new(observer));
    }

    fn write(&self, map: &'static str, operation: &'static str) -> Result<(), TableError> {
        let n = self.writes.get();
        self.writes.set(n + 1);
        if self.fail_at.get() == Some(n) {
            self.fail_at.set(None);
            return Err(TableError::Injected { map, operation });
        }
        Ok(())
    }

    fn written(&self) {
        if let Some(observer) = self.observer.borrow().as_ref() {
            observer();
        }
    }
}

/// An in-memory map. Clones share contents, so a test keeps a handle to
/// inspect what the reconciler wrote.
pub struct FakeTable<K, V> {
    name: &'static str,
    entries: Rc<RefCell<HashMap<K, V>>>,
    plan: Rc<FaultPlan>,
}

impl<K, V> Clone for FakeTable<K, V> {
    fn clone(&self) -> Self {
        Self {
            name: self.name,
            entries: Rc::clone(&self.entries),
            plan: Rc::clone(&self.plan),
        }
    }
}

impl<K, V> Debug for FakeTable<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeTable")
            .field("name", &self.name)
            .finish()
    }
}

impl<K: Clone + Eq + Hash, V: Clone> FakeTable<K, V> {
    pub fn new(name: &'static str, plan: &Rc<FaultPlan>) -> Self {
        Self {
            name,
            entries: Rc::default(),
            plan: Rc::clone(plan),
        }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        self.entries.borrow().get(key).cloned()
    }

    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.borrow().is_empty()
    }

    /// Writes behind the reconciler's back, as the datapath does (conntrack).
    pub fn insert_directly(&self, key: K, value: V) {
        self.entries.borrow_mut().insert(key, value);
    }
}

impl<K: Clone + Eq + Hash, V: Clone> Table<K, V> for FakeTable<K, V> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn entries(&self) -> Result<Vec<(K, V)>, TableError> {
        Ok(self
            .entries
            .borrow()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn lookup(&self, key: &K) -> Result<Option<V>, TableError> {
        Ok(self.get(key))
    }

    fn set(&mut self, key: &K, value: &V) -> Result<(), TableError> {
        self.plan.write(self.name, "update")?;
        self.entries.borrow_mut().insert(key.clone(), value.clone());
        self.plan.written();
        Ok(())
    }

    fn remove(&mut self, key: &K) -> Result<(), TableError> {
        self.plan.write(self.name, "delete")?;
        self.entries.borrow_mut().remove(key);
        self.plan.written();
        Ok(())
    }
}
