//! The XDP and TC programs run through BPF_PROG_TEST_RUN on crafted frames:
//! translation, checksums (recomputed independently), reverse NAT, ICMP
//! errors, and garbage that must never crash or be mis-rewritten.

use std::net::{Ipv4Addr, SocketAddrV4};

use dataplane_common::{CT_FLAG_CLOSING, CT_FLAG_REPLY, counters::Reason};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use wharf_agent::{
    ebpf::{FlowTimeouts, monotonic_secs},
    proxy::{BackendState, DesiredState, FrontendKind, Protocol},
};
use wharf_tests::{
    fixture::{Fixture, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_TX},
    frame::{self, Headers, TCP, TCP_ACK, TCP_FIN, TCP_SYN, UDP},
    services::{add, ready},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

fn sa(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}

/// A TCP segment from `client` to the VIP's port 80.
fn to_vip(client: SocketAddrV4, flags: u8) -> Vec<u8> {
    frame::tcp(client, SocketAddrV4::new(VIP, 80), flags)
}

fn backends() -> [SocketAddrV4; 2] {
    [sa([10, 244, 1, 2], 8080), sa([10, 244, 1, 3], 8080)]
}

/// VIP:80/TCP and VIP:53/UDP on two backends; EMPTY_VIP:80 with none.
fn fixture(name: &str) -> Fixture {
    let mut fixture = Fixture::load(name);
    let mut state = DesiredState::default();
    add(
        &mut state,
        FrontendKind::ClusterIp,
        VIP,
        80,
        Protocol::Tcp,
        &ready(&backends()),
    );
    let udp_backends: Vec<_> = backends()
        .iter()
        .map(|b| sa(b.ip().octets(), 5353))
        .collect();
    add(
        &mut state,
        FrontendKind::ClusterIp,
        VIP,
        53,
        Protocol::Udp,
        &ready(&udp_backends),
    );
    add(
        &mut state,
        FrontendKind::ClusterIp,
        EMPTY_VIP,
        80,
        Protocol::Tcp,
        &[],
    );
    fixture.sync(&state);
    fixture
}

fn counter(fixture: &Fixture, reason: Reason) -> u64 {
    fixture
        .dataplane
        .counters()
        .unwrap()
        .into_iter()
        .find(|(r, _)| *r == reason)
        .unwrap()
        .1
        .packets
}

/// Both hooks, so each scenario checks XDP and TC alike.
#[derive(Clone, Copy, Debug)]
enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    /// The hooks that DNAT a flow they pass up the stack: XDP only where
    /// it can mark the packet for TC (`xdp_metadata_supported`);
    /// elsewhere it leaves such flows to TC.
    fn translating() -> Vec<Hook> {
        if wharf_agent::ebpf::xdp_metadata_supported() {
            vec![Hook::Xdp, Hook::Tc]
        } else {
            vec![Hook::Tc]
        }
    }

    fn run(self, fixture: &mut Fixture, frame: &[u8]) -> (u32, Vec<u8>) {
        match self {
            Hook::Xdp => fixture.run_xdp(frame),
            Hook::Tc => fixture.run_tc(frame),
        }
    }

    fn pass(self) -> u32 {
        match self {
            Hook::Xdp => XDP_PASS,
            Hook::Tc => TC_ACT_OK,
        }
    }

    /// The kernel refuses TC test runs of IPv4 frames shorter than an IPv4
    /// header (XDP covers those lengths).
    fn shortest_ipv4_frame(self) -> usize {
        match self {
            Hook::Xdp => 14,
            Hook::Tc => 34,
        }
    }

    fn drop(self) -> u32 {
        match self {
            Hook::Xdp => XDP_DROP,
            Hook::Tc => TC_ACT_SHOT,
        }
    }
}

#[test]
fn syn_to_a_vip_goes_to_a_backend_with_valid_checksums() {
    let mut fixture = fixture("syn");
    for (hook, sport) in Hook::translating().into_iter().zip(40000..) {
        let client = sa([10, 244, 2, 5], sport);
        let syn = to_vip(client, TCP_SYN);
        let (verdict, out) = hook.run(&mut fixture, &syn);
        assert_eq!(verdict, hook.pass(), "{hook:?}");
        let headers = frame::headers(&out);
        assert!(
            backends().contains(&headers.dst),
            "{hook:?}: went to {}",
            headers.dst
        );
        assert_eq!(
            headers.src, client,
            "{hook:?}: the client's address is preserved"
        );
        assert!(
            frame::checksums_valid(&out),
            "{hook:?}: checksums after DNAT"
        );
        // Conntrack keeps the flow on its backend.
        let ack = to_vip(client, TCP_ACK);
        for _ in 0..5 {
            let (_, again) = hook.run(&mut fixture, &ack);
            assert_eq!(frame::headers(&again).dst, headers.dst, "{hook:?}");
        }
    }
    for hook in Hook::translating() {
        let reason = match hook {
            Hook::Xdp => Reason::XdpDnat,
            Hook::Tc => Reason::TcDnat,
        };
        assert!(counter(&fixture, reason) >= 6, "{hook:?}");
    }
}

#[test]
fn xdp_tells_tc_what_it_translated() {
    let mut fixture = fixture("handoff");
    let syn = to_vip(sa([10, 244, 2, 5], 48000), TCP_SYN);
    let (verdict, metadata, translated) = fixture.run_xdp_with_metadata(&syn);
    assert_eq!(verdict, XDP_PASS);
    if !wharf_agent::ebpf::xdp_metadata_supported() {
        // No metadata on this kernel: XDP leaves the packet to TC, which
        // translates it.
        assert_eq!(metadata, b"");
        assert_eq!(translated, syn, "passed untouched");
        let (_, out) = fixture.run_tc(&syn);
        assert!(backends().contains(&frame::headers(&out).dst));
        return;
    }
    assert_eq!(
        metadata, b"DXHW",
        "the hand-off word, as stored (little-endian)"
    );
    // Untranslated traffic carries no mark.
    let other = frame::tcp(sa([10, 244, 2, 5], 48001), sa([10, 96, 0, 99], 80), TCP_SYN);
    assert_eq!(fixture.run_xdp_with_metadata(&other).1, b"");
    assert!(backends().contains(&frame::headers(&translated).dst));
}

#[test]
fn new_flows_spread_over_all_backends() {
    let mut fixture = fixture("spread");
    let mut seen = std::collections::HashMap::new();
    for sport in 20000..20400 {
        let syn = to_vip(sa([10, 244, 2, 5], sport), TCP_SYN);
        let (_, out) = fixture.run_tc(&syn);
        *seen.entry(frame::headers(&out).dst).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen.values().all(|n| *n > 120),
        "400 flows split unevenly: {seen:?}"
    );
}

#[test]
fn session_affinity_keeps_a_client_address_on_one_backend() {
    let mut fixture = Fixture::load("affinity");
    let mut state = DesiredState::default();
    add(
        &mut state,
        FrontendKind::ClusterIp,
        VIP,
        80,
        Protocol::Tcp,
        &ready(&backends()),
    );
    for frontend in state.frontends.values_mut() {
        frontend.affinity_timeout = Some(60);
    }
    fixture.sync(&state);
    let mut per_client = std::collections::BTreeMap::new();
    for client in 1..=20u8 {
        for sport in 30000..30010 {
            let (_, out) = fixture.run_tc(&to_vip(sa([10, 244, 3, client], sport), TCP_SYN));
            per_client
                .entry(client)
                .or_insert_with(std::collections::BTreeSet::new)
                .insert(frame::headers(&out).dst);
        }
    }
    assert!(
        per_client.values().all(|seen| seen.len() == 1),
        "each client sticks to one backend: {per_client:?}"
    );
    let used: std::collections::BTreeSet<_> = per_client.values().flatten().collect();
    assert_eq!(used.len(), 2, "clients still spread: {per_client:?}");
}

#[test]
fn replies_are_reverse_natted_to_the_vip() {
    let mut fixture = fixture("reply");
    let client = sa([10, 244, 2, 5], 41000);
    let (_, out) = fixture.run_tc(&to_vip(client, TCP_SYN));
    let backend = frame::headers(&out).dst;

    let reply = frame::tcp(backend, client, TCP_SYN | TCP_ACK);
    let (verdict, out) = fixture.run_tc(&reply);
    // Redirected along the FIB's route, or handed to the stack if the
    // test harness's device has none.
    assert!(
        matches!(verdict, TC_ACT_OK | TC_ACT_REDIRECT),
        "verdict {verdict}"
    );
    assert_eq!(
        frame::headers(&out),
        Headers {
            src: SocketAddrV4::new(VIP, 80),
            dst: client,
            protocol: TCP
        }
    );
    assert!(frame::checksums_valid(&out));
    assert!(counter(&fixture, Reason::TcRevNat) >= 1);

    // XDP cannot finish a reply that does not leave by its ingress device:
    // it hands it to TC untouched.
    let (verdict, out) = fixture.run_xdp(&reply);
    assert_eq!((verdict, out), (XDP_PASS, reply));
}

#[test]
fn udp_is_translated_both_ways_and_zero_checksums_stay_zero() {
    let mut fixture = fixture("udp");
    for (sport, zero) in [(42000, false), (42001, true)] {
        let client = sa([10, 244, 2, 5], sport);
        let query = frame::udp(client, SocketAddrV4::new(VIP, 53), b"query", zero);
        let (verdict, out) = fixture.run_tc(&query);
        assert_eq!(verdict, TC_ACT_OK);
        let backend = frame::headers(&out).dst;
        assert_eq!(backend.port(), 5353);
        assert!(frame::checksums_valid(&out));
        let udp_csum = &out[14 + 20 + 6..14 + 20 + 8];
        assert_eq!(
            udp_csum == [0, 0],
            zero,
            "a zero UDP checksum means none and must stay zero"
        );

        let (_, back) = fixture.run_tc(&frame::udp(backend, client, b"answer", zero));
        assert_eq!(frame::headers(&back).src, SocketAddrV4::new(VIP, 53));
        assert!(frame::checksums_valid(&back));
    }
}

#[test]
fn ip_options_shift_the_l4_header_and_are_handled() {
    let mut fixture = fixture("options");
    for (hook, sport) in Hook::translating().into_iter().zip(43000..) {
        let client = sa([10, 244, 2, 6], sport);
        let plain = to_vip(client, TCP_SYN);
        // Rebuild with 8 bytes of options (two NOPs... and end-of-list).
        let l4 = plain[14 + 20..].to_vec();
        let with_options = frame::ipv4(*client.ip(), VIP, TCP, &[1, 1, 1, 1, 1, 1, 1, 0], &l4);
        let (verdict, out) = hook.run(&mut fixture, &with_options);
        assert_eq!(verdict, hook.pass());
        let headers = frame::headers(&out);
        assert!(backends().contains(&headers.dst), "{hook:?}");
        assert!(frame::checksums_valid(&out), "{hook:?}");
    }
}

#[test]
fn traffic_to_other_addresses_and_ports_is_untouched() {
    let mut fixture = fixture("untouched");
    let frames = [
        frame::tcp(sa([10, 244, 2, 5], 1234), sa([10, 96, 0, 99], 80), TCP_SYN),
        frame::tcp(sa([10, 244, 2, 5], 1234), sa([10, 96, 0, 10], 81), TCP_SYN),
        frame::udp(
            sa([10, 244, 2, 5], 1234),
            sa([10, 96, 0, 10], 80),
            b"x",
            false,
        ),
        frame::ipv4(Ipv4Addr::new(1, 1, 1, 1), VIP, 47, &[], &[0; 8]),
    ];
    for hook in [Hook::Xdp, Hook::Tc] {
        for input in &frames {
            let (verdict, out) = hook.run(&mut fixture, input);
            assert_eq!((verdict, &out), (hook.pass(), input), "{hook:?}");
        }
    }
}

#[test]
fn fragments_pass_untouched_and_are_counted() {
    let mut fixture = fixture("fragments");
    let mut fragment = to_vip(sa([10, 244, 2, 5], 1234), TCP_SYN);
    fragment[14 + 6] = 0x20; // more fragments
    let ip_csum = frame::checksum(&{
        let mut header = fragment[14..34].to_vec();
        header[10..12].fill(0);
        header
    });
    fragment[14 + 10..14 + 12].copy_from_slice(&ip_csum.to_be_bytes());
    for hook in [Hook::Xdp, Hook::Tc] {
        let (verdict, out) = hook.run(&mut fixture, &fragment);
        assert_eq!((verdict, out), (hook.pass(), fragment.clone()));
    }
    assert_eq!(counter(&fixture, Reason::PassFragment), 2);
}

#[test]
fn a_service_without_backends_is_refused_with_port_unreachable() {
    let mut fixture = fixture("empty");
    let client = sa([10, 244, 2, 5], 1234);
    let syn = frame::tcp(client, SocketAddrV4::new(EMPTY_VIP, 80), TCP_SYN);
    // XDP hands the refusal to TC, untouched.
    assert_eq!(fixture.run_xdp(&syn), (XDP_PASS, syn.clone()));
    let (verdict, out) = fixture.run_tc(&syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "back out of the ingress device");
    assert_eq!(out.len(), 14 + 20 + 8 + 28);
    assert_eq!(
        (&out[0..6], &out[6..12]),
        (&syn[6..12], &syn[0..6]),
        "MACs swapped"
    );
    let headers = frame::headers(&out);
    assert_eq!(
        (*headers.src.ip(), *headers.dst.ip(), headers.protocol),
        (EMPTY_VIP, *client.ip(), frame::ICMP)
    );
    assert_eq!(&out[34..36], [3, 3], "destination unreachable: port");
    assert_eq!(
        &out[42..],
        &syn[14..42],
        "quotes the IPv4 header and 8 L4 bytes"
    );
    assert!(frame::checksums_valid(&out));
    assert_eq!(counter(&fixture, Reason::RejectNoBackend), 1);
}

#[test]
fn a_new_connection_does_not_reuse_a_terminating_backend() {
    let mut fixture = fixture("terminating");
    let client = sa([10, 244, 2, 7], 44000);
    let syn = to_vip(client, TCP_SYN);
    let (_, out) = fixture.run_tc(&syn);
    let first = frame::headers(&out).dst;

    let mut state = DesiredState::default();
    let backends: Vec<_> = backends()
        .iter()
        .map(|b| {
            (
                *b,
                if *b == first {
                    BackendState::Terminating
                } else {
                    BackendState::Active
                },
            )
        })
        .collect();
    add(
        &mut state,
        FrontendKind::ClusterIp,
        VIP,
        80,
        Protocol::Tcp,
        &backends,
    );
    fixture.sync(&state);

    // The established flow keeps its (terminating) backend...
    let (_, out) = fixture.run_tc(&to_vip(client, TCP_ACK));
    assert_eq!(frame::headers(&out).dst, first);
    // ...but a new SYN on the same 5-tuple picks a ready one.
    let (_, out) = fixture.run_tc(&syn);
    assert_ne!(frame::headers(&out).dst, first);
}

#[test]
fn icmp_errors_from_a_backend_are_translated_back() {
    let mut fixture = fixture("icmp");
    let client = sa([10, 244, 2, 5], 45000);
    let query = frame::udp(client, SocketAddrV4::new(VIP, 53), b"query", false);
    let (_, translated) = fixture.run_tc(&query);
    let backend = frame::headers(&translated).dst;

    let error = frame::icmp_port_unreachable(*backend.ip(), *client.ip(), &translated);
    let (verdict, out) = fixture.run_tc(&error);
    assert!(
        matches!(verdict, TC_ACT_OK | TC_ACT_REDIRECT),
        "verdict {verdict}"
    );
    let outer = &out[14..34];
    assert_eq!(
        Ipv4Addr::new(outer[12], outer[13], outer[14], outer[15]),
        VIP,
        "the backend speaks as the VIP"
    );
    assert_eq!(
        frame::icmp_quoted(&out),
        Headers {
            src: client,
            dst: SocketAddrV4::new(VIP, 53),
            protocol: UDP
        }
    );
    assert!(
        frame::checksums_valid(&out),
        "ICMP and quoted IPv4 checksums"
    );
    assert_eq!(counter(&fixture, Reason::IcmpErrorTranslated), 1);

    // XDP leaves ICMP to TC.
    assert_eq!(fixture.run_xdp(&error), (XDP_PASS, error));
}

#[test]
fn truncated_and_malformed_frames_are_never_rewritten() {
    let mut fixture = fixture("malformed");
    let good = to_vip(sa([10, 244, 2, 5], 46000), TCP_SYN);
    for hook in [Hook::Xdp, Hook::Tc] {
        // Every truncation of a valid SYN to the VIP.
        let shortest = hook.shortest_ipv4_frame();
        for len in shortest..good.len() - 3 {
            let input = &good[..len];
            let (verdict, out) = hook.run(&mut fixture, input);
            assert!(
                verdict == hook.pass() || verdict == hook.drop(),
                "{hook:?} len {len}: verdict {verdict}"
            );
            if verdict == hook.pass() {
                assert_eq!(out, input, "{hook:?} len {len}: rewritten");
            }
        }
        // IHL below 5.
        let mut bad = good.clone();
        bad[14] = 0x44;
        assert_eq!(hook.run(&mut fixture, &bad).0, hook.drop(), "{hook:?}");
    }
    assert!(counter(&fixture, Reason::DropMalformed) >= 2);
}

/// Random frames, and valid frames with random bytes flipped: every run
/// must end in a legal verdict, and any rewrite must send to a backend
/// and keep checksums valid if they were valid.
#[test]
fn fuzzed_frames_get_legal_verdicts_and_only_correct_rewrites() {
    let mut fixture = fixture("fuzz");
    let mut rng = StdRng::seed_from_u64(0x5748_4152);
    let valid = |rng: &mut StdRng| {
        let client = sa([10, 244, 2, rng.random()], rng.random_range(1024..65535));
        if rng.random_bool(0.5) {
            frame::tcp(
                client,
                SocketAddrV4::new(VIP, 80),
                if rng.random() { TCP_SYN } else { TCP_ACK },
            )
        } else {
            frame::udp(client, SocketAddrV4::new(VIP, 53), b"fuzz", rng.random())
        }
    };
    for i in 0..4000 {
        let input: Vec<u8> = match i % 3 {
            0 => (0..rng.random_range(0..80)).map(|_| rng.random()).collect(),
            1 => {
                let mut f = valid(&mut rng);
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..f.len());
                    f[at] = rng.random();
                }
                f
            }
            _ => valid(&mut rng),
        };
        if input.len() <= 14 {
            continue; // the kernel refuses test runs of a bare Ethernet header
        }
        let was_valid =
            input.len() >= 34 && input[12..14] == [8, 0] && frame::checksums_valid(&input);
        for hook in [Hook::Xdp, Hook::Tc] {
            if input[12..14] == [8, 0] && input.len() < hook.shortest_ipv4_frame() {
                continue;
            }
            let (verdict, out) = hook.run(&mut fixture, &input);
            let legal = match hook {
                Hook::Xdp => matches!(verdict, XDP_PASS | XDP_DROP | XDP_TX),
                Hook::Tc => matches!(verdict, TC_ACT_OK | TC_ACT_SHOT | TC_ACT_REDIRECT),
            };
            assert!(legal, "{hook:?} frame {i}: verdict {verdict}");
            if out != input && verdict != hook.drop() {
                let headers = frame::headers(&out);
                let backend_ports = [8080, 5353];
                assert!(
                    backends().iter().any(|b| b.ip() == headers.dst.ip())
                        && backend_ports.contains(&headers.dst.port()),
                    "{hook:?} frame {i}: rewritten to {}",
                    headers.dst
                );
                if was_valid {
                    assert!(
                        frame::checksums_valid(&out),
                        "{hook:?} frame {i}: checksums broken"
                    );
                }
            }
        }
    }
}

#[test]
fn a_direct_connection_on_a_reused_port_is_not_reverse_natted() {
    let mut fixture = fixture("reuse");
    let client = sa([10, 244, 2, 9], 47000);
    let vip = SocketAddrV4::new(VIP, 80);
    // A translated connection leaves a reply entry backend -> client:47000.
    let (_, out) = fixture.run_tc(&frame::tcp(client, vip, TCP_SYN));
    let backend = frame::headers(&out).dst;
    // Later the client reuses port 47000 to talk to the backend directly
    // (socket-LB, or plain pod-to-pod traffic).
    let direct = frame::tcp(client, backend, TCP_SYN);
    let (verdict, out) = fixture.run_tc(&direct);
    assert_eq!((verdict, out), (TC_ACT_OK, direct));
    // Its SYN-ACK must keep the backend's address, and the old flow is
    // forgotten in both directions.
    let syn_ack = frame::tcp(backend, client, TCP_SYN | TCP_ACK);
    let (_, out) = fixture.run_tc(&syn_ack);
    assert_eq!(out, syn_ack);
    assert!(fixture.conntrack().is_empty(), "{:?}", fixture.conntrack());
    // The port goes back to the VIP: a fresh flow, replies translated.
    let (_, out) = fixture.run_tc(&frame::tcp(client, vip, TCP_SYN));
    let backend = frame::headers(&out).dst;
    let (_, out) = fixture.run_tc(&frame::tcp(backend, client, TCP_SYN | TCP_ACK));
    assert_eq!(frame::headers(&out).src, vip);
}

#[test]
fn a_syn_on_a_flow_that_lost_its_reply_entry_opens_it_again() {
    let mut fixture = fixture("halfpair");
    let client = sa([10, 244, 2, 10], 47100);
    let vip = SocketAddrV4::new(VIP, 80);
    fixture.run_tc(&frame::tcp(client, vip, TCP_SYN));
    // Evict the reply entry alone, as a full LRU map may.
    let mut maps = fixture.dataplane.maps().unwrap();
    let (reply, _) = maps
        .conntrack
        .entries()
        .unwrap()
        .into_iter()
        .find(|(_, v)| v.flags & CT_FLAG_REPLY != 0)
        .unwrap();
    maps.conntrack.remove(&reply).unwrap();
    let (_, out) = fixture.run_tc(&frame::tcp(client, vip, TCP_SYN));
    let backend = frame::headers(&out).dst;
    let (_, out) = fixture.run_tc(&frame::tcp(backend, client, TCP_SYN | TCP_ACK));
    assert_eq!(
        frame::headers(&out).src,
        vip,
        "the reply is translated again"
    );
}

#[test]
fn conntrack_records_activity_and_closing_for_expiry() {
    let mut fixture = fixture("ctclock");
    let client = sa([10, 244, 2, 8], 49000);
    fixture.run_tc(&to_vip(client, TCP_SYN));
    let now = monotonic_secs();
    let entries = fixture.conntrack();
    assert_eq!(entries.len(), 2, "one entry per direction");
    for (_, value) in &entries {
        assert!(
            value.last_seen.abs_diff(now) <= 1,
            "stamped {} at {now}",
            value.last_seen
        );
        assert_eq!(value.flags & CT_FLAG_CLOSING, 0);
    }
    // The client closes: its direction is flagged, and the flow expires
    // after the closing timeout rather than the established one.
    let fin = to_vip(client, TCP_FIN | TCP_ACK);
    let closing = |fixture: &mut Fixture| {
        fixture
            .conntrack()
            .iter()
            .any(|(_, v)| v.flags & CT_FLAG_CLOSING != 0)
    };
    fixture.run_tc(&fin);
    assert!(closing(&mut fixture));
    // A new connection on the same tuple is not closing...
    fixture.run_tc(&to_vip(client, TCP_SYN));
    assert!(!closing(&mut fixture));
    // ...until it closes too.
    fixture.run_tc(&fin);
    assert!(closing(&mut fixture));
    let timeouts = FlowTimeouts::default();
    assert_eq!(
        fixture
            .reconciler
            .expire_flows(now + timeouts.tcp_closing - 1, &timeouts)
            .unwrap(),
        0
    );
    assert_eq!(
        fixture
            .reconciler
            .expire_flows(now + timeouts.tcp_closing + 2, &timeouts)
            .unwrap(),
        2
    );
    assert!(fixture.conntrack().is_empty());
}
