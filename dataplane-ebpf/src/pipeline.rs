//! The underlay hooks: parse, apply the filter map, then handle VXLAN for this host's VTEP.
//!
//! XDP validates VXLAN (unknown VTEP/VNI, spoofed inner sources are dropped before the
//! kernel allocates an skb) and passes valid VXLAN on; TC ingress validates again and
//! decapsulates. Decapsulation stays in TC because it must keep GSO/GRO packets whole: the
//! veth underlay hands XDP either copied single frames (native mode, which disables GRO)
//! or linearised GSO packets it cannot redirect past the MTU check (generic mode).

use aya_ebpf::EbpfContext;
use dataplane_common::{
    Action, DropReason, Hook,
    overlay::EP_LB_CLIENT,
    packet::PacketView,
    parse::{Parsed, parse},
    stats::DIR_INGRESS,
    underlay::{UnderlayAction, decide as overlay_decide},
    verdict::{Verdict, decide},
};

use crate::{
    forward, lb,
    policy::{self, Sides},
    stats,
    tables::{KernelTables, overlay_config},
};

/// What an underlay hook does with a packet.
pub enum Fate {
    /// Leave it to the kernel.
    Pass,
    /// Drop it.
    Drop,
    /// VXLAN for a local instance, to decapsulate (TC ingress only).
    Deliver {
        /// Host-side veth of the instance.
        ifindex: u32,
        /// Inner Ethernet destination and source.
        eth: [u8; 12],
    },
}

/// Parses, filters and (on receive) classifies VXLAN; counts everything but deliveries,
/// which the caller counts once it knows whether they succeeded. A BPF subprogram, so its
/// parsing state is off the stack when a delivery runs the policy subprograms.
#[inline(never)]
pub fn run<C: EbpfContext, P: PacketView>(ctx: &C, pkt: &P, hook: Hook) -> Fate {
    let len = pkt.len();
    let parsed = parse(pkt);
    if let Verdict::Drop(reason) = decide(parsed, &KernelTables) {
        stats::count_and_log_drop(ctx, hook, reason, len);
        return Fate::Drop;
    }
    if hook != Hook::TcEgress
        && let Ok(Parsed::Ip(outer)) = parsed
    {
        match overlay_decide(pkt, &outer, &overlay_config(), &KernelTables) {
            Ok(UnderlayAction::NotOverlay) => {}
            Ok(UnderlayAction::Deliver { ifindex, eth }) if hook == Hook::TcIngress => {
                return Fate::Deliver { ifindex, eth };
            }
            // Valid VXLAN at XDP: TC ingress decapsulates it.
            Ok(UnderlayAction::Deliver { .. }) => {}
            Err(reason) => {
                stats::count_and_log_drop(ctx, hook, reason, len);
                return Fate::Drop;
            }
        }
    }
    stats::count_action(hook, Action::Pass, len);
    Fate::Pass
}

/// Decapsulates, applies the receiver's inbound policy and delivers; counts the outcome.
#[inline(always)]
pub fn deliver<C: EbpfContext>(
    ctx: &C,
    pkt: &crate::packet::TcPacket,
    ifindex: u32,
    eth: &[u8; 12],
) -> Option<i32> {
    let len = pkt.len();
    let result = match policy::endpoint(ifindex) {
        None => Err(DropReason::NoNeighbor),
        Some(ep) => forward::decapsulate(pkt, eth)
            .and_then(|()| {
                if ep.flags & EP_LB_CLIENT != 0 {
                    lb::reverse(pkt, ep)
                } else {
                    Ok(())
                }
            })
            .and_then(|()| policy::check(pkt, &Sides::new(None, 0, Some(ep), ifindex)))
            .and_then(|()| forward::to_port(ifindex)),
    };
    match result {
        Ok(rc) => {
            stats::count_action(Hook::TcIngress, Action::Decap, len);
            stats::count_endpoint(ifindex, DIR_INGRESS, Action::Decap, len);
            Some(rc)
        }
        Err(reason) => {
            stats::count_and_log_drop(ctx, Hook::TcIngress, reason, len);
            stats::count_endpoint_drop(ifindex, reason, len);
            stats::count_endpoint(ifindex, DIR_INGRESS, Action::Drop, len);
            None
        }
    }
}
