//! The flow hash that picks a backend for a new flow.
//!
//! It has no per-node seed on purpose: given the same backends, every node
//! maps a flow to the same backend (Maglev's promise), so a flow that moves
//! between nodes (ECMP change, node failure) keeps its backend.

/// MurmurHash3 (x86, 32-bit) over the IPv4 5-tuple, as loaded from the
/// packet (network order). Cheap in eBPF (no loops, no tables) and well
/// mixed in every bit, so `hash % M` is uniform for small prime `M`.
#[inline(always)]
pub const fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, protocol: u8) -> u32 {
    let ports = ((sport as u32) << 16) | dport as u32;
    let mut h = 0x5748_4152; // "WHAR": a fixed, cluster-wide seed
    h = mix(h, saddr);
    h = mix(h, daddr);
    h = mix(h, ports);
    h = mix(h, protocol as u32);
    h ^= 16; // length in bytes
    fmix(h)
}

/// The Maglev table slot of a flow hash: `hash * M / 2^32` (Lemire's
/// range reduction) rather than `hash % M`. Equally uniform, and the eBPF
/// verifier can bound it from the multiply and shift alone, where it
/// cannot follow the multiply-shift sequence LLVM emits for `% M`.
#[inline(always)]
pub const fn maglev_slot(hash: u32) -> usize {
    ((hash as u64 * crate::MAGLEV_TABLE_SIZE as u64) >> 32) as usize
}

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_source_ports_evenly_over_a_prime_table() {
        const M: u32 = 1021;
        let mut buckets = [0u32; 10];
        for sport in 1024..=u16::MAX {
            let h = flow_hash(0x0a00_0001, 0x0a60_0001, sport, 80, 6);
            buckets[((h % M) % 10) as usize] += 1;
        }
        let expected = (u16::MAX as u32 - 1024) / 10;
        for count in buckets {
            assert!(count.abs_diff(expected) < expected / 20, "{buckets:?}");
        }
    }

    #[test]
    fn maglev_slots_cover_the_table() {
        assert_eq!(maglev_slot(0), 0);
        assert_eq!(maglev_slot(u32::MAX), crate::MAGLEV_TABLE_SIZE - 1);
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = flow_hash(1, 2, 3, 4, 6);
        assert_ne!(base, flow_hash(9, 2, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 9, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 9, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 9, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 4, 17));
    }
}
