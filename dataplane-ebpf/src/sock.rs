//! Socket-LB: translate the address a socket connects or sends to, once,
//! in the cgroup `sock_addr` hooks, so established flows carry no
//! per-packet NAT. `recvmsg`/`getpeername` translate back, so the
//! application still sees the service address as its peer.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use dataplane_common::{
    AFFINITY_CLIENT_NETNS, SockRevKey, SockRevValue, counters::Reason, flow_hash::flow_hash,
    protocol,
};

use crate::{
    counters::count,
    lb::{backend, lookup_frontend, pick_backend},
    maps::WHARF_SOCK_REV,
};

/// Return values of `sock_addr` programs.
const ALLOW: i32 = 1;
/// Fails the syscall (EPERM unless `bpf_set_retval` chose another errno).
const REFUSE: i32 = 0;
/// The errno a service without backends is refused with, as a kernel that
/// got ICMP port unreachable would report it: connect() and sendmsg()
/// fail at once instead of timing out.
const ECONNREFUSED: i32 = 111;

const AF_INET: u32 = 2;

/// `connect()`: a random backend per connection.
pub fn connect4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: plain helper call without arguments.
    translate(ctx, |_| unsafe { bpf_get_prandom_u32() })
}

/// `sendmsg()` on an unconnected UDP socket: the backend follows from the
/// socket cookie, so one socket's datagrams keep going to one backend
/// while the backend set is unchanged.
pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    translate(ctx, |cookie| {
        flow_hash(cookie as u32, (cookie >> 32) as u32, 0, 0, 0)
    })
}

fn translate(ctx: &SockAddrContext, pick: impl FnOnce(u64) -> u32) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: `sock_addr` is the program's context, valid for this run;
    // these fields are readable in connect4/sendmsg4.
    let (family, address, port, proto) = unsafe {
        (
            (*addr).user_family,
            (*addr).user_ip4,
            (*addr).user_port,
            (*addr).protocol,
        )
    };
    let proto = proto as u8;
    if family != AF_INET || !(proto == protocol::TCP || proto == protocol::UDP) {
        return ALLOW;
    }
    // `user_port` holds the port in network order in its low 16 bits.
    let port = port as u16;
    let Some(frontend) = lookup_frontend(address, port, proto) else {
        return ALLOW;
    };
    if frontend.value.count == 0 {
        count(Reason::RejectNoBackend, 0);
        // SAFETY: plain helper call; connect4 and sendmsg4 may set the
        // syscall's return value (kernel >= 5.18).
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REFUSE;
    }
    // SAFETY: the helper only reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A pod's sockets share its network namespace: that is the client
    // session affinity remembers.
    // SAFETY: the helper only reads the context it is given.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let picked = pick_backend(&frontend, pick(cookie), netns, AFFINITY_CLIENT_NETNS);
    let Some(backend) = picked.and_then(backend) else {
        count(Reason::DropStaleService, 0);
        return REFUSE;
    };
    let key = SockRevKey {
        cookie,
        address: backend.address,
        port: backend.port,
        _pad: 0,
    };
    let value = SockRevValue {
        address,
        port,
        _pad: 0,
        rev_nat_id: frontend.value.rev_nat_id,
    };
    // Without the reverse entry replies would show the backend's address;
    // an LRU map only fails to insert on memory pressure, so refusing is
    // the honest answer.
    if WHARF_SOCK_REV.insert(key, value, 0).is_err() {
        return REFUSE;
    }
    // SAFETY: `user_ip4`/`user_port` are writable in connect4/sendmsg4.
    unsafe {
        (*addr).user_ip4 = backend.address;
        (*addr).user_port = backend.port as u32;
    }
    count(Reason::SockTranslated, 0);
    ALLOW
}

/// `recvmsg()`/`getpeername()`: report the frontend, not the backend.
pub fn reverse4(ctx: &SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: as in `translate`; readable in recvmsg4/getpeername4.
    let (family, address, port) =
        unsafe { ((*addr).user_family, (*addr).user_ip4, (*addr).user_port) };
    if family != AF_INET {
        return ALLOW;
    }
    // SAFETY: the helper only reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        address,
        port: port as u16,
        _pad: 0,
    };
    // SAFETY: plain data, see `lb::lookup_frontend`.
    if let Some(value) = unsafe { WHARF_SOCK_REV.get(key) } {
        // SAFETY: `user_ip4`/`user_port` are writable in these hooks.
        unsafe {
            (*addr).user_ip4 = value.address;
            (*addr).user_port = value.port as u32;
        }
    }
    ALLOW
}
