//! The one place where packet offsets become pointers.
//!
//! Each context type implements `PacketView::read`, which checks `offset + size_of::<T>()`
//! against `data_end` immediately before the access (the form the verifier needs) and copies
//! the header out, so no pointer into the packet outlives the read.
//!
//! `data` and `data_end` are re-read from the context with volatile loads for every access.
//! Otherwise LLVM merges the loads from before and after a helper call (`bpf_skb_pull_data`)
//! into one value and zero-extends it with shifts, which the verifier rejects on packet
//! pointers ("pointer arithmetic with <<= operator prohibited").

use core::mem;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    programs::{TcContext, XdpContext},
};
use dataplane_common::{DropReason, packet::PacketView};

/// Headers beyond this many bytes from the frame start are not looked at; it bounds the
/// offsets the verifier must reason about. Ethernet + 2 VLAN tags + IPv6 + 4 extension headers
/// of typical size + TCP fit comfortably.
const MAX_HEADER_OFFSET: usize = 512;

/// `data` and `data_end` of a context, loaded fresh (see the module docs).
#[inline(always)]
fn bounds(data: *const u32, data_end: *const u32) -> (usize, usize) {
    // SAFETY: both pointers point at fields of the live context struct the kernel passed to
    // the program (`xdp_md` / `__sk_buff`); reading them is always allowed.
    unsafe {
        (
            core::ptr::read_volatile(data) as usize,
            core::ptr::read_volatile(data_end) as usize,
        )
    }
}

#[inline(always)]
fn read_at<T: Copy>((data, data_end): (usize, usize), offset: usize) -> Option<T> {
    if offset > MAX_HEADER_OFFSET {
        return None;
    }
    let start = data + offset;
    if start + mem::size_of::<T>() > data_end {
        return None;
    }
    // SAFETY: `[start, start + size_of::<T>())` lies inside `[data, data_end)`, the packet
    // bytes the kernel made readable (checked just above, which is also what the verifier
    // proves). `read_unaligned` has no alignment requirement, and `T` is a plain header type
    // for which every bit pattern is valid.
    Some(unsafe { (start as *const T).read_unaligned() })
}

/// An XDP frame.
pub struct XdpPacket<'a> {
    ctx: &'a XdpContext,
}

impl<'a> XdpPacket<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a XdpContext) -> Self {
        XdpPacket { ctx }
    }
}

impl XdpPacket<'_> {
    #[inline(always)]
    fn bounds(&self) -> (usize, usize) {
        let md = self.ctx.ctx;
        // SAFETY: `md` is the `xdp_md` the kernel passed in; taking field addresses does not
        // read memory.
        unsafe { bounds(&raw const (*md).data, &raw const (*md).data_end) }
    }
}

impl PacketView for XdpPacket<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        let (data, data_end) = self.bounds();
        data_end - data
    }

    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        read_at(self.bounds(), offset)
    }
}

/// An skb seen by a TC program. Only its linear part is directly readable; `read` pulls more
/// into the linear part when a header lies beyond it but inside the packet.
pub struct TcPacket<'a> {
    ctx: &'a TcContext,
}

impl<'a> TcPacket<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a TcContext) -> Self {
        TcPacket { ctx }
    }
}

impl TcPacket<'_> {
    #[inline(always)]
    fn bounds(&self) -> (usize, usize) {
        let skb = self.ctx.skb.skb;
        // SAFETY: `skb` is the `__sk_buff` the kernel passed in; taking field addresses does
        // not read memory.
        unsafe { bounds(&raw const (*skb).data, &raw const (*skb).data_end) }
    }
}

impl PacketView for TcPacket<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.ctx.len() as usize
    }

    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        if let Some(v) = read_at(self.bounds(), offset) {
            return Some(v);
        }
        let want = offset + mem::size_of::<T>();
        if want > self.len() || offset > MAX_HEADER_OFFSET {
            return None;
        }
        // Headers of GSO or paged skbs may sit outside the linear part: make them linear and
        // retry. Earlier reads copied their data out, so invalidated pointers do not matter.
        self.ctx.pull_data(want as u32).ok()?;
        read_at(self.bounds(), offset)
    }
}

/// Metadata and rewriting of an skb, through kernel helpers (never raw pointers).
impl TcPacket<'_> {
    /// Device the packet is on (at TC ingress: the device it arrived on).
    #[inline(always)]
    pub fn ifindex(&self) -> u32 {
        // SAFETY: `skb` is the live `__sk_buff` the kernel passed in; reading a field is
        // always allowed.
        unsafe { (*self.ctx.skb.skb).ifindex }
    }

    /// Whether this is a trace run (`skb->mark` is `TRACE_MARK`): change no state, write
    /// trace events.
    #[inline(always)]
    pub fn traced(&self) -> bool {
        // SAFETY: as in `ifindex`.
        unsafe { (*self.ctx.skb.skb).mark == dataplane_common::trace::TRACE_MARK }
    }

    /// GSO segment size, 0 for a plain packet.
    #[inline(always)]
    pub fn gso_size(&self) -> u32 {
        // SAFETY: as in `ifindex`.
        unsafe { (*self.ctx.skb.skb).gso_size }
    }

    /// The flow hash (computed by the kernel if not yet known).
    #[inline(always)]
    pub fn flow_hash(&self) -> u32 {
        // SAFETY: the helper only reads the skb the kernel passed in.
        unsafe { aya_ebpf::helpers::generated::bpf_get_hash_recalc(self.ctx.skb.skb) }
    }

    /// Overwrites `size_of::<T>()` bytes at `offset` with `value`.
    #[inline(always)]
    pub fn write<T>(&self, offset: usize, value: &T) -> Result<(), DropReason> {
        self.ctx
            .store(offset, value, 0)
            .map_err(|_| DropReason::RewriteFailed)
    }

    /// Inserts (`diff > 0`) or removes (`diff < 0`) bytes right after the Ethernet header,
    /// with `BPF_F_ADJ_ROOM_*` `flags` telling the kernel about encapsulation (so GSO and
    /// checksum offload keep working on the inner packet).
    #[inline(always)]
    pub fn adjust_after_mac(&self, diff: i32, flags: u64) -> Result<(), DropReason> {
        self.ctx
            .adjust_room(diff, BPF_ADJ_ROOM_MAC, flags)
            .map_err(|_| DropReason::RewriteFailed)
    }

    /// Replaces the 4 bytes `old` at `offset` (an IPv4 address) with `new`, updating the
    /// IPv4 header checksum at `ip_csum` and the L4 checksum at `l4_csum` (which covers the
    /// address through the pseudo-header; `udp`: a zero checksum means none and stays zero).
    #[inline(always)]
    pub fn replace_addr(
        &self,
        offset: usize,
        ip_csum: usize,
        l4_csum: usize,
        udp: bool,
        old: [u8; 4],
        new: [u8; 4],
    ) -> Result<(), DropReason> {
        // The helpers take the values as they lie in the packet (network order).
        let (from, to) = (
            u64::from(u32::from_ne_bytes(old)),
            u64::from(u32::from_ne_bytes(new)),
        );
        let mut flags = (BPF_F_PSEUDO_HDR as u64) | 4;
        if udp {
            flags |= BPF_F_MARK_MANGLED_0 as u64;
        }
        self.ctx
            .l4_csum_replace(l4_csum, from, to, flags)
            .and_then(|()| self.ctx.l3_csum_replace(ip_csum, from, to, 4))
            .map_err(|_| DropReason::RewriteFailed)?;
        self.write(offset, &new)
    }

    /// Replaces the 2-byte port `old` at `offset` with `new`, updating the L4 checksum at
    /// `l4_csum` (`udp` as in [`Self::replace_addr`]).
    #[inline(always)]
    pub fn replace_port(
        &self,
        offset: usize,
        l4_csum: usize,
        udp: bool,
        old: u16,
        new: u16,
    ) -> Result<(), DropReason> {
        let (old, new) = (old.to_be_bytes(), new.to_be_bytes());
        let (from, to) = (
            u64::from(u16::from_ne_bytes(old)),
            u64::from(u16::from_ne_bytes(new)),
        );
        let mut flags = 2u64;
        if udp {
            flags |= BPF_F_MARK_MANGLED_0 as u64;
        }
        self.ctx
            .l4_csum_replace(l4_csum, from, to, flags)
            .map_err(|_| DropReason::RewriteFailed)?;
        self.write(offset, &new)
    }

    /// Trims or extends the packet to `len` bytes.
    #[inline(always)]
    pub fn resize(&self, len: u32) -> Result<(), DropReason> {
        // SAFETY: the helper resizes the skb the kernel passed in; no pointer into the
        // packet is held across the call (every read copies).
        let rc =
            unsafe { aya_ebpf::helpers::generated::bpf_skb_change_tail(self.ctx.skb.skb, len, 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(DropReason::RewriteFailed)
        }
    }
}
