//! One view of a packet for both hooks. XDP rewrites the frame through
//! direct packet access and updates checksums in software (frames from the
//! wire carry full checksums); TC goes through the kernel's helpers, which
//! also keep `CHECKSUM_PARTIAL`/`COMPLETE` skbs consistent.

use core::{ffi::c_void, mem::size_of, ptr};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_SHOT, bpf_adj_room_mode, xdp_action,
    },
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_skb_change_tail, bpf_xdp_adjust_meta},
    programs::{TcContext, XdpContext},
};
use dataplane_common::checksum;

use crate::lb::Verdict;

/// Where an L4 checksum lives and how it treats zero.
#[derive(Clone, Copy)]
pub struct L4Csum {
    pub off: usize,
    /// UDP over IPv4: a zero checksum means "none" and stays zero.
    pub udp: bool,
    /// The rewritten field is part of the pseudo header (an address).
    pub pseudo: bool,
}

/// Every bounds check reads `data_end` afresh (volatile): LLVM then cannot
/// prove one check redundant with an earlier one on a differently computed
/// pointer and drop it, which would leave the verifier without the range
/// for the pointer actually dereferenced.
pub trait Packet {
    /// True for XDP: the hook that must hand anything it cannot finish on
    /// to TC untouched (see `lb`).
    const XDP: bool;

    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    fn len(&self) -> u32;
    fn ctx_ptr(&self) -> *mut c_void;
    fn ingress_ifindex(&self) -> u32;
    /// Writes `value` at `off`.
    fn store<T: Copy>(&mut self, off: usize, value: T) -> Result<(), ()>;
    /// Updates the IPv4 header checksum at `csum_off` for a 4-byte change.
    fn l3_csum_replace(&mut self, csum_off: usize, old: u32, new: u32) -> Result<(), ()>;
    /// Updates an L4 (or ICMP) checksum for a 4-byte change.
    fn l4_csum_replace4(&mut self, csum: L4Csum, old: u32, new: u32) -> Result<(), ()>;
    /// Updates an L4 (or ICMP) checksum for a 2-byte change.
    fn l4_csum_replace2(&mut self, csum: L4Csum, old: u16, new: u16) -> Result<(), ()>;

    /// Reshapes the packet for an ICMP error built in place: `room` new
    /// bytes right after the Ethernet header, then the whole cut to `len`
    /// bytes. TC only: XDP leaves such packets to TC.
    fn make_room(&mut self, room: u32, len: u32) -> Result<(), ()>;

    /// XDP: marks the packet, in XDP metadata, as translated here, so TC on
    /// the same device (as with Cilium's transfer flags) neither translates
    /// it again nor mistakes its backend-addressed 5-tuple for a new direct
    /// connection. Call before rewriting: if the driver has no metadata
    /// room it returns false, and the packet must go to TC untouched.
    fn mark_translated(&mut self) -> bool;
}

/// The XDP metadata word that marks a packet XDP translated.
const TRANSLATED_BY_XDP: u32 = 0x5748_5844; // "WHXD"

/// Whether this kernel lets XDP programs call bpf_xdp_adjust_meta (set by
/// the loader from a probe: some kernel builds refuse it). A constant of
/// the frozen `.rodata` map, so the verifier never walks the call it
/// guards where it is 0.
#[unsafe(no_mangle)]
static XDP_METADATA: u8 = 1;

/// Whether XDP on this device already translated the packet.
#[inline(always)]
pub fn translated_by_xdp(ctx: &TcContext) -> bool {
    // SAFETY: `skb` is the program's context pointer; data_meta and data
    // are readable __sk_buff fields (direct packet access for sched_cls).
    let (meta, data) = unsafe {
        (
            (*ctx.skb.skb).data_meta as usize,
            (*ctx.skb.skb).data as usize,
        )
    };
    if meta + size_of::<u32>() > data {
        return false;
    }
    // SAFETY: the 4 bytes before `data` are XDP metadata, checked above.
    unsafe { ptr::read_unaligned(meta as *const u32) == TRANSLATED_BY_XDP }
}

/// Reads a `T` at `off`, or `None` past the end of the linear data.
#[inline(always)]
pub fn load<P: Packet, T: Copy>(pkt: &P, off: usize) -> Option<T> {
    let start = pkt.data();
    if start + off + size_of::<T>() > pkt.data_end() {
        return None;
    }
    // SAFETY: `[start + off, start + off + size_of::<T>())` was just checked
    // to lie inside the packet; the read is unaligned-safe and `T` is plain
    // data (integers), valid for any bit pattern.
    Some(unsafe { ptr::read_unaligned((start + off) as *const T) })
}

/// The address of a `len`-byte header at `off`, or `None` if the packet is
/// shorter. Read its fields with [`read`] at constant offsets: the verifier
/// ties the bounds check to this one pointer, so every field read through
/// it is known in bounds however `off` was computed (IPv4 options make
/// the L4 offset variable).
#[inline(always)]
pub fn header_at<P: Packet>(pkt: &P, off: usize, len: usize) -> Option<usize> {
    let header = pkt.data() + off;
    if header + len > pkt.data_end() {
        return None;
    }
    Some(header)
}

/// Reads a `T` at `field` bytes into a header from [`header_at`].
///
/// # Safety
///
/// `header` must come from `header_at` with a `len` of at least
/// `field + size_of::<T>()`, on the current packet data.
#[inline(always)]
pub unsafe fn read<T: Copy>(header: usize, field: usize) -> T {
    // SAFETY: the caller guarantees the bytes are inside the packet.
    unsafe { ptr::read_unaligned((header as *const u8).add(field) as *const T) }
}

pub struct XdpPacket {
    ctx: XdpContext,
}

impl XdpPacket {
    pub fn new(ctx: XdpContext) -> Self {
        Self { ctx }
    }

    pub fn finish(verdict: Verdict) -> u32 {
        match verdict {
            Verdict::Pass => xdp_action::XDP_PASS,
            Verdict::Drop => xdp_action::XDP_DROP,
            // `lb` only asks XDP to forward back out of the ingress device
            // (XDP_TX); other egress devices are left to TC.
            Verdict::Redirect { .. } | Verdict::RedirectNeigh { .. } => xdp_action::XDP_TX,
        }
    }

    /// Writes `value` at `off` in place.
    #[inline(always)]
    fn write<T: Copy>(&self, off: usize, value: T) -> Result<(), ()> {
        let start = self.ctx.data();
        if start + off + size_of::<T>() > self.data_end() {
            return Err(());
        }
        // SAFETY: bounds checked just above; XDP frames are writable.
        unsafe { ptr::write_unaligned((start + off) as *mut T, value) };
        Ok(())
    }

    #[inline(always)]
    fn update_csum(&self, off: usize, udp: bool, f: impl FnOnce(u16) -> u16) -> Result<(), ()> {
        let check: u16 = load(self, off).ok_or(())?;
        let updated = f(check);
        let updated = if udp {
            checksum::udp_mangled(check, updated)
        } else {
            updated
        };
        self.write(off, updated)
    }
}

impl Packet for XdpPacket {
    const XDP: bool = true;

    #[inline(always)]
    fn data(&self) -> usize {
        self.ctx.data()
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: `ctx` is the program's context pointer, valid for the run.
        unsafe { ptr::read_volatile(&(*self.ctx.ctx).data_end) as usize }
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        (self.ctx.data_end() - self.ctx.data()) as u32
    }

    fn ctx_ptr(&self) -> *mut c_void {
        self.ctx.as_ptr()
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        self.ctx.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn store<T: Copy>(&mut self, off: usize, value: T) -> Result<(), ()> {
        self.write(off, value)
    }

    #[inline(always)]
    fn l3_csum_replace(&mut self, csum_off: usize, old: u32, new: u32) -> Result<(), ()> {
        self.update_csum(csum_off, false, |check| {
            checksum::replace_u32(check, old, new)
        })
    }

    #[inline(always)]
    fn l4_csum_replace4(&mut self, csum: L4Csum, old: u32, new: u32) -> Result<(), ()> {
        self.update_csum(csum.off, csum.udp, |check| {
            checksum::replace_u32(check, old, new)
        })
    }

    #[inline(always)]
    fn l4_csum_replace2(&mut self, csum: L4Csum, old: u16, new: u16) -> Result<(), ()> {
        self.update_csum(csum.off, csum.udp, |check| {
            checksum::replace_u16(check, old, new)
        })
    }

    fn make_room(&mut self, _room: u32, _len: u32) -> Result<(), ()> {
        Err(())
    }

    #[inline(always)]
    fn mark_translated(&mut self) -> bool {
        // Already marked (a program run again on the same buffer, as
        // BPF_PROG_TEST_RUN's repeat does): keep the mark.
        let meta = self.ctx.metadata();
        if meta + size_of::<u32>() <= self.ctx.metadata_end()
            // SAFETY: the 4 bytes before `data` are metadata, checked above.
            && unsafe { ptr::read_unaligned(meta as *const u32) } == TRANSLATED_BY_XDP
        {
            return true;
        }
        // SAFETY: a plain read of a global the loader may set.
        if unsafe { ptr::read_volatile(&XDP_METADATA) } == 0 {
            return false;
        }
        // SAFETY: plain helper call on the program's own context.
        if unsafe { bpf_xdp_adjust_meta(self.ctx.ctx, -(size_of::<u32>() as i32)) } != 0 {
            return false;
        }
        let meta = self.ctx.metadata();
        if meta + size_of::<u32>() > self.ctx.metadata_end() {
            return false;
        }
        // SAFETY: [meta, meta + 4) lies before `data`, checked above.
        unsafe { ptr::write_unaligned(meta as *mut u32, TRANSLATED_BY_XDP) };
        true
    }
}

pub struct TcPacket {
    ctx: TcContext,
}

/// Headers pulled into an skb's linear data when it holds fewer: Ethernet,
/// IPv4 and TCP without options. Most drivers keep at least this much
/// linear, so the pull (which can copy the skb) is rare; longer headers
/// (IPv4 options, ICMP quotes) that a driver left non-linear are parsed
/// as far as they are linear, and passed or dropped as parsing says.
const TC_HEADERS: u32 = 14 + 20 + 20;

impl TcPacket {
    /// Wraps the context, first pulling the headers into the linear data
    /// if the skb has them partly in fragments (GRO'd or tunnelled skbs):
    /// `data_end` only covers the linear part.
    pub fn new(ctx: TcContext) -> Self {
        let wanted = ctx.len().min(TC_HEADERS);
        if ((ctx.data_end() - ctx.data()) as u32) < wanted {
            // A failed pull leaves the packet as it was; parsing then sees
            // what is linear and passes or drops it, counted.
            let _ = ctx.pull_data(wanted);
        }
        Self { ctx }
    }

    pub fn finish(verdict: Verdict) -> i32 {
        match verdict {
            Verdict::Pass => aya_ebpf::bindings::TC_ACT_OK,
            Verdict::Drop => TC_ACT_SHOT,
            // SAFETY: plain helper calls; ifindex comes from a FIB lookup.
            Verdict::Redirect { ifindex } => unsafe { bpf_redirect(ifindex, 0) as i32 },
            // SAFETY: a NULL neighbour lets the kernel resolve the next hop
            // from its FIB (kernel >= 5.10), as documented for the helper.
            Verdict::RedirectNeigh { ifindex } => unsafe {
                bpf_redirect_neigh(ifindex, ptr::null_mut(), 0, 0) as i32
            },
        }
    }

    #[inline(always)]
    fn csum_flags(csum: L4Csum, size: u64) -> u64 {
        let mut flags = size;
        if csum.pseudo {
            flags |= BPF_F_PSEUDO_HDR as u64;
        }
        if csum.udp {
            flags |= BPF_F_MARK_MANGLED_0 as u64;
        }
        flags
    }
}

impl Packet for TcPacket {
    const XDP: bool = false;

    #[inline(always)]
    fn data(&self) -> usize {
        self.ctx.data()
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: `skb` is the program's context pointer, valid for the run.
        unsafe { ptr::read_volatile(&(*self.ctx.skb.skb).data_end) as usize }
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        self.ctx.len()
    }

    fn ctx_ptr(&self) -> *mut c_void {
        self.ctx.as_ptr()
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: `skb` is the program's context pointer, valid for the
        // whole run; `ingress_ifindex` is a readable __sk_buff field.
        unsafe { (*self.ctx.skb.skb).ingress_ifindex }
    }

    #[inline(always)]
    fn store<T: Copy>(&mut self, off: usize, value: T) -> Result<(), ()> {
        self.ctx.store(off, &value, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn l3_csum_replace(&mut self, csum_off: usize, old: u32, new: u32) -> Result<(), ()> {
        self.ctx
            .l3_csum_replace(csum_off, old as u64, new as u64, 4)
            .map_err(|_| ())
    }

    #[inline(always)]
    fn l4_csum_replace4(&mut self, csum: L4Csum, old: u32, new: u32) -> Result<(), ()> {
        let flags = Self::csum_flags(csum, 4);
        self.ctx
            .l4_csum_replace(csum.off, old as u64, new as u64, flags)
            .map_err(|_| ())
    }

    #[inline(always)]
    fn l4_csum_replace2(&mut self, csum: L4Csum, old: u16, new: u16) -> Result<(), ()> {
        let flags = Self::csum_flags(csum, 2);
        self.ctx
            .l4_csum_replace(csum.off, old as u64, new as u64, flags)
            .map_err(|_| ())
    }

    fn make_room(&mut self, room: u32, len: u32) -> Result<(), ()> {
        self.ctx
            .adjust_room(room as i32, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, 0)
            .map_err(|_| ())?;
        // SAFETY: plain helper call on the program's own context.
        match unsafe { bpf_skb_change_tail(self.ctx.skb.skb.cast(), len, 0) } {
            0 => Ok(()),
            _ => Err(()),
        }
    }

    fn mark_translated(&mut self) -> bool {
        true
    }
}
