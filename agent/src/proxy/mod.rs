//! The seam between "what services exist" and "how this node forwards
//! them": desired state as plain data, and the `ServiceProxy` trait every
//! proxy mode implements.

mod changes;
mod state;

pub use changes::{Changes, Programmed, StaleFlows, StaleUdp, commit, stale_udp};
pub use state::{
    Backend, BackendState, DesiredState, Forwarding, Frontend, FrontendKey, FrontendKind, Protocol,
    ServicePortName, TrafficPolicy,
};

/// A proxy mode's programming interface. Implementations are
/// level-triggered and idempotent: `sync` is handed the complete desired
/// state each time and converges the node to it, touching only what
/// differs; calling it twice with the same state does nothing the second
/// time.
pub trait ServiceProxy {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Converges the dataplane to `desired`. On error the dataplane holds
    /// a consistent mix of old and new services (never a half-written
    /// one) and the next `sync` finishes the job.
    fn sync(&mut self, desired: &DesiredState) -> Result<SyncStats, Self::Error>;

    /// Like `sync`, but trusting no cached knowledge of the dataplane: it is
    /// read back first, so whatever changed behind the proxy's back (an
    /// operator's manual edit, another tool) is repaired. Called
    /// periodically. Modes that always read the dataplane before writing
    /// have nothing more to do than sync.
    fn resync(&mut self, desired: &DesiredState) -> Result<SyncStats, Self::Error> {
        self.sync(desired)
    }

    /// Reads back what the dataplane actually forwards.
    fn dump(&self) -> Result<Forwarding, Self::Error>;

    /// Removes every service from the dataplane.
    fn flush(&mut self) -> Result<(), Self::Error>;

    /// Forgets flows idle past their timeout; returns how many entries
    /// went. Called periodically. Modes whose flow state the kernel's own
    /// conntrack ages out have nothing to do.
    fn expire_flows(&mut self) -> Result<usize, Self::Error> {
        Ok(0)
    }
}

/// What one `sync` changed, for logs, metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub frontends_added: usize,
    pub frontends_updated: usize,
    pub frontends_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    /// Conntrack entries purged because their backend or frontend is gone.
    pub flows_purged: usize,
    /// Individual map writes and deletes issued.
    pub map_operations: usize,
}
