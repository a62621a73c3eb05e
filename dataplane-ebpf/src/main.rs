//! wharf's eBPF service dataplane.
//!
//! Entry points are thin: each calls one function of the module for its
//! hook. The modules follow Cilium's `bpf/lib` split, one concern each:
//! `parse` (headers), `packet` (XDP/TC access and checksum rewrites),
//! `lb` (service lookup and backend selection), `conntrack`, `nat`
//! (rewrites of one flow), `icmp` (errors about translated flows), `sock`
//! (socket-LB) and `counters`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod counters;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod sock;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{TC_ACT_OK, xdp_action},
        macros::{cgroup_sock_addr, classifier, xdp},
        programs::{SockAddrContext, TcContext, XdpContext},
    };

    use crate::{
        lb,
        packet::{self, TcPacket, XdpPacket},
        sock,
    };

    /// Socket-LB for `connect()`: TCP connections and connected UDP
    /// sockets go straight to a backend.
    #[cgroup_sock_addr(connect4)]
    pub fn wharf_connect4(ctx: SockAddrContext) -> i32 {
        sock::connect4(&ctx)
    }

    /// Socket-LB for unconnected UDP `sendto()`/`sendmsg()`.
    #[cgroup_sock_addr(sendmsg4)]
    pub fn wharf_sendmsg4(ctx: SockAddrContext) -> i32 {
        sock::sendmsg4(&ctx)
    }

    /// Reports the service address as the source of UDP replies.
    #[cgroup_sock_addr(recvmsg4)]
    pub fn wharf_recvmsg4(ctx: SockAddrContext) -> i32 {
        sock::reverse4(&ctx)
    }

    /// Reports the service address as the peer of a translated socket.
    #[cgroup_sock_addr(getpeername4)]
    pub fn wharf_getpeer4(ctx: SockAddrContext) -> i32 {
        sock::reverse4(&ctx)
    }

    /// Per-packet load-balancing on ingress of pod-facing and external
    /// devices: DNAT, conntrack, reverse NAT, ICMP errors.
    #[classifier]
    pub fn wharf_tc(ctx: TcContext) -> i32 {
        if packet::translated_by_xdp(&ctx) {
            return TC_ACT_OK;
        }
        match lb::process(&mut TcPacket::new(ctx)) {
            lb::Verdict::Pass => TC_ACT_OK,
            verdict => TcPacket::finish(verdict),
        }
    }

    /// Reverse NAT of replies from backends on the node itself, on
    /// egress of the same devices.
    #[classifier]
    pub fn wharf_tc_egress(ctx: TcContext) -> i32 {
        match lb::process_egress(&mut TcPacket::new(ctx)) {
            lb::Verdict::Pass => TC_ACT_OK,
            verdict => TcPacket::finish(verdict),
        }
    }

    /// NodePort (and ClusterIP from outside) acceleration on external
    /// devices; anything it cannot finish goes on to `wharf_tc`.
    #[xdp]
    pub fn wharf_xdp(ctx: XdpContext) -> u32 {
        match lb::process(&mut XdpPacket::new(ctx)) {
            lb::Verdict::Pass => xdp_action::XDP_PASS,
            verdict => XdpPacket::finish(verdict),
        }
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic; this is never called.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
