//! Per-CPU datapath counters, indexed by [`Reason`].

/// Packets and bytes counted under one reason on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(size_of::<Counter>() == 16);

/// Why a packet (or socket operation) was counted. The discriminant is the
/// index in the counters array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Socket-LB translated a connect/sendmsg to a backend.
    SockTranslated = 0,
    /// TC rewrote a packet's destination to a backend.
    TcDnat = 1,
    /// TC restored a reply's source to the service frontend.
    TcRevNat = 2,
    /// XDP rewrote a packet's destination to a backend.
    XdpDnat = 3,
    /// XDP restored a reply to a SNATed flow.
    XdpRevNat = 4,
    /// TC or XDP translated an ICMP error about a translated flow.
    IcmpErrorTranslated = 5,
    /// A new flow to a frontend with no ready backend: refused, so the
    /// client fails at once (ECONNREFUSED) instead of timing out: by an
    /// ICMP port unreachable from TC (XDP hands such packets to TC), or by
    /// connect()/sendmsg() failing under socket-LB.
    RejectNoBackend = 6,
    /// IPv4 header inconsistent (IHL < 5, truncated): dropped.
    DropMalformed = 7,
    /// IP fragment: passed untranslated (fragments carry no L4 ports after
    /// the first, so they cannot be matched to a service).
    PassFragment = 8,
    /// SNAT found no free source port after a few tries: dropped.
    DropNatPortsExhausted = 9,
    /// The frontend's backend slot or backend entry is missing (a sync in
    /// progress): dropped rather than sent to the wrong place.
    DropStaleService = 10,
}

impl Reason {
    /// Number of reasons: the counters array's size.
    pub const COUNT: u32 = 11;

    /// Every reason, in index order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::SockTranslated,
        Reason::TcDnat,
        Reason::TcRevNat,
        Reason::XdpDnat,
        Reason::XdpRevNat,
        Reason::IcmpErrorTranslated,
        Reason::RejectNoBackend,
        Reason::DropMalformed,
        Reason::PassFragment,
        Reason::DropNatPortsExhausted,
        Reason::DropStaleService,
    ];

    /// Stable snake_case name, used in metrics and `inspect` output.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::SockTranslated => "sock_translated",
            Reason::TcDnat => "tc_dnat",
            Reason::TcRevNat => "tc_rev_nat",
            Reason::XdpDnat => "xdp_dnat",
            Reason::XdpRevNat => "xdp_rev_nat",
            Reason::IcmpErrorTranslated => "icmp_error_translated",
            Reason::RejectNoBackend => "reject_no_backend",
            Reason::DropMalformed => "drop_malformed",
            Reason::PassFragment => "pass_fragment",
            Reason::DropNatPortsExhausted => "drop_nat_ports_exhausted",
            Reason::DropStaleService => "drop_stale_service",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_index_order() {
        for (index, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index, "{}", reason.name());
        }
    }
}
