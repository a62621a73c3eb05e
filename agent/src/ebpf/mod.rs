//! The eBPF proxy mode: programs loaded and attached by `loader`, maps
//! programmed by `reconciler` through the `table` seam.

mod loader;
pub mod maglev;
mod reconciler;
pub mod table;

pub use loader::{Dataplane, LoadError, read_counters, xdp_metadata_supported};
pub use reconciler::{FlowTimeouts, Maps, ReconcileError, Reconciler};

use crate::proxy::{DesiredState, Forwarding, ServiceProxy, SyncStats};

impl ServiceProxy for Reconciler {
    type Error = ReconcileError;

    fn sync(&mut self, desired: &DesiredState) -> Result<SyncStats, ReconcileError> {
        Reconciler::sync(self, desired)
    }

    fn resync(&mut self, desired: &DesiredState) -> Result<SyncStats, ReconcileError> {
        self.distrust_mirror();
        Reconciler::sync(self, desired)
    }

    fn dump(&self) -> Result<Forwarding, ReconcileError> {
        Reconciler::dump(self)
    }

    fn flush(&mut self) -> Result<(), ReconcileError> {
        Reconciler::sync(self, &DesiredState::default()).map(drop)
    }

    fn expire_flows(&mut self) -> Result<usize, ReconcileError> {
        Reconciler::expire_flows(self, monotonic_secs(), &FlowTimeouts::default())
    }
}

/// CLOCK_MONOTONIC in whole seconds: the clock the datapath stamps
/// conntrack entries with (`bpf_ktime_get_ns`).
pub fn monotonic_secs() -> u32 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec we own; CLOCK_MONOTONIC is
    // always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u32
}
