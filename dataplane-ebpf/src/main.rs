//! The VPC datapath: XDP and TC programs.
//!
//! Entry points are one `match` each; the work is in `pipeline` (underlay hooks) and `port`
//! (instance ports), sending on in `forward`, raw packet pointers only in `packet`, maps only
//! in `maps` and `tables`, counting only in `stats`. The per-packet decisions are the pure,
//! host-tested code of `dataplane-common`.
#![no_std]
// BPF atomic adds (`tables::atomic_add`): the eBPF build runs on nightly or bootstrap.
#![allow(internal_features)]
#![feature(core_intrinsics)]
#![no_main]

mod flowlog;
mod forward;
mod lb;
mod maps;
mod packet;
mod pipeline;
mod policy;
mod port;
mod stats;
mod tables;
mod trace;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use dataplane_common::Hook;

use crate::{
    packet::{TcPacket, XdpPacket},
    pipeline::Fate,
};

/// XDP on underlay receive: drops malformed, filtered and spoofed or unknown VXLAN packets
/// before the kernel allocates an skb.
#[xdp]
pub fn vpc_xdp(ctx: XdpContext) -> u32 {
    match pipeline::run(&ctx, &XdpPacket::new(&ctx), Hook::Xdp, false) {
        Fate::Drop => xdp_action::XDP_DROP,
        Fate::Pass | Fate::Deliver { .. } => xdp_action::XDP_PASS,
    }
}

/// TC ingress on the underlay: the same checks for what XDP did not see, and VXLAN
/// decapsulation into local instances.
#[classifier]
pub fn vpc_tc_ingress(ctx: TcContext) -> i32 {
    let pkt = TcPacket::new(&ctx);
    match pipeline::run(&ctx, &pkt, Hook::TcIngress, pkt.traced()) {
        Fate::Pass => TC_ACT_OK,
        Fate::Drop => TC_ACT_SHOT,
        Fate::Deliver { ifindex, eth } => {
            pipeline::deliver(&ctx, &pkt, ifindex, &eth).unwrap_or(TC_ACT_SHOT)
        }
    }
}

/// TC egress on the underlay: the filter checks for packets the host sends.
#[classifier]
pub fn vpc_tc_egress(ctx: TcContext) -> i32 {
    let pkt = TcPacket::new(&ctx);
    match pipeline::run(&ctx, &pkt, Hook::TcEgress, pkt.traced()) {
        Fate::Drop => TC_ACT_SHOT,
        Fate::Pass | Fate::Deliver { .. } => TC_ACT_OK,
    }
}

/// TC ingress on the host side of an instance's veth: anti-spoofing, ARP answers, routing
/// within the VPC, local delivery or VXLAN encapsulation.
#[classifier]
pub fn vpc_port(ctx: TcContext) -> i32 {
    port::run(&ctx)
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
