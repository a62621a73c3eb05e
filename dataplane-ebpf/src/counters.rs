//! Per-CPU counters by reason.

use dataplane_common::counters::Reason;

use crate::maps::WHARF_COUNTERS;

/// Counts one packet (or socket operation) of `bytes` under `reason`.
#[inline(always)]
pub fn count(reason: Reason, bytes: u32) {
    if let Some(counter) = WHARF_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup,
        // so it is valid and only this CPU writes it while we run.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
    }
}
