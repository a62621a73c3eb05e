//! The eBPF proxy mode: programs loaded and attached by `loader`, maps
//! programmed by `reconciler` through the `table` seam.

mod loader;
pub mod maglev;
mod reconciler;
pub mod table;

pub use loader::{Dataplane, LoadError, read_counters};
pub use reconciler::{Maps, ReconcileError, Reconciler};

use crate::proxy::{DesiredState, Forwarding, ServiceProxy, SyncStats};

impl ServiceProxy for Reconciler {
    type Error = ReconcileError;

    fn sync(&mut self, desired: &DesiredState) -> Result<SyncStats, ReconcileError> {
        Reconciler::sync(self, desired)
    }

    fn dump(&self) -> Result<Forwarding, ReconcileError> {
        Reconciler::dump(self)
    }

    fn flush(&mut self) -> Result<(), ReconcileError> {
        Reconciler::sync(self, &DesiredState::default()).map(drop)
    }
}
