//! Incremental Internet checksum updates (RFC 1624), used where the datapath
//! rewrites headers itself (XDP, ICMP error payloads) instead of through the
//! kernel's `bpf_l3/l4_csum_replace` helpers.
//!
//! Values are taken exactly as loaded from packet memory (no byte swaps):
//! the one's-complement sum is byte-order independent as long as the
//! checksum and the words it covers are loaded the same way.

/// Folds a 32-bit one's-complement accumulator to 16 bits. Two rounds are
/// enough for any sum of up to 65,537 16-bit words, and a fixed count keeps
/// the eBPF verifier's job trivial.
#[inline(always)]
pub const fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum after one 16-bit word changes from `old` to `new`
/// (RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')`).
#[inline(always)]
pub const fn replace_u16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    !fold(sum)
}

/// The checksum after a 32-bit field (an IPv4 address) changes.
#[inline(always)]
pub const fn replace_u32(check: u16, old: u32, new: u32) -> u16 {
    let sum = (!check) as u32
        + (!(old as u16)) as u32
        + (!((old >> 16) as u16)) as u32
        + (new & 0xffff)
        + (new >> 16);
    !fold(sum)
}

/// UDP over IPv4 uses 0 for "no checksum": such a datagram must keep 0, and
/// a computed 0 is sent as 0xffff (RFC 768).
#[inline(always)]
pub const fn udp_mangled(check: u16, updated: u16) -> u16 {
    if check == 0 {
        0
    } else if updated == 0 {
        0xffff
    } else {
        updated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full checksum over 16-bit words, the slow way, to check the
    /// incremental updates against.
    fn full(words: &[u16]) -> u16 {
        let sum: u32 = words.iter().map(|w| *w as u32).sum();
        !fold(sum)
    }

    #[test]
    fn replace_u16_matches_recompute() {
        let mut words = [
            0x4500, 0x0073, 0x0000, 0x4000, 0x4011, 0xc0a8, 0x0001, 0xc0a8,
        ];
        let mut check = full(&words);
        for new in [0u16, 1, 0x7fff, 0xffff, 0x1234] {
            check = replace_u16(check, words[6], new);
            words[6] = new;
            assert_eq!(check, full(&words), "after writing {new:#x}");
        }
    }

    #[test]
    fn replace_u32_matches_recompute() {
        let mut words = [
            0x4500u16, 0x0054, 0xabcd, 0x0000, 0x4006, 0x0a00, 0x0001, 0x0a60, 0x0001,
        ];
        let mut check = full(&words);
        for new in [0u32, 0xffff_ffff, 0x0a00_0102, 0x0101_0101, 0xdead_beef] {
            let old = (words[7] as u32) | ((words[8] as u32) << 16);
            words[7] = new as u16;
            words[8] = (new >> 16) as u16;
            check = replace_u32(check, old, new);
            assert_eq!(check, full(&words), "after writing {new:#x}");
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_mangled(0, 0x1234), 0);
        assert_eq!(udp_mangled(0x55, 0), 0xffff);
        assert_eq!(udp_mangled(0x55, 0x66), 0x66);
    }
}
