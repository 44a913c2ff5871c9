//! The VPC datapath: XDP and TC programs.
//!
//! Entry points are one `match` each; the work is in `pipeline`, raw packet pointers live
//! only in `packet`, maps only in `maps`, counting only in `stats`. The parsing and verdict
//! logic is the pure, host-tested code of `dataplane-common`.
#![no_std]
#![no_main]

mod maps;
mod packet;
mod pipeline;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use dataplane_common::{Hook, verdict::Verdict};

use crate::packet::{TcPacket, XdpPacket};

/// XDP on receive: drops malformed and filtered packets before the kernel allocates an skb.
#[xdp]
pub fn vpc_xdp(ctx: XdpContext) -> u32 {
    match pipeline::run(&ctx, &XdpPacket::new(&ctx), Hook::Xdp) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop(_) => xdp_action::XDP_DROP,
    }
}

/// TC ingress (clsact/tcx): the same checks for paths XDP does not see (e.g. generic XDP
/// off, or packets injected above the driver).
#[classifier]
pub fn vpc_tc_ingress(ctx: TcContext) -> i32 {
    tc_action(pipeline::run(&ctx, &TcPacket::new(&ctx), Hook::TcIngress))
}

/// TC egress (clsact/tcx): checks packets the host sends.
#[classifier]
pub fn vpc_tc_egress(ctx: TcContext) -> i32 {
    tc_action(pipeline::run(&ctx, &TcPacket::new(&ctx), Hook::TcEgress))
}

#[inline(always)]
fn tc_action(verdict: Verdict) -> i32 {
    match verdict {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop(_) => TC_ACT_SHOT,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here, so this never runs.
    loop {}
}

/// License the kernel checks before allowing GPL-only helpers (bpf_redirect_*, ...).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
