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

use aya_ebpf::programs::{TcContext, XdpContext};
use dataplane_common::packet::PacketView;

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
