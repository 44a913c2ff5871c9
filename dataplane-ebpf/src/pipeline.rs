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
    trace,
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
/// `traced`: a trace run (TC only), which counts nothing and reports the verdict.
#[inline(never)]
pub fn run<C: EbpfContext, P: PacketView>(ctx: &C, pkt: &P, hook: Hook, traced: bool) -> Fate {
    let len = pkt.len();
    let parsed = parse(pkt);
    if let Verdict::Drop(reason) = decide(parsed, &KernelTables) {
        dropped(ctx, hook, reason, len, traced);
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
                dropped(ctx, hook, reason, len, traced);
                return Fate::Drop;
            }
        }
    }
    if traced {
        trace::verdict(Action::Pass, 0, 0);
    } else {
        stats::count_action(hook, Action::Pass, len);
    }
    Fate::Pass
}

/// Counts (or, in a trace, reports) a drop on an underlay hook.
#[inline(always)]
fn dropped<C: EbpfContext>(ctx: &C, hook: Hook, reason: DropReason, len: usize, traced: bool) {
    if traced {
        trace::verdict(Action::Drop, reason as u32, 0);
    } else {
        stats::count_and_log_drop(ctx, hook, reason, len);
    }
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
        Some(ep) => {
            trace::receiver(pkt, ep);
            deliver_to(pkt, ep, ifindex, eth)
        }
    };
    // Read here, not held across the delivery (see `port::run`).
    if pkt.traced() {
        match result {
            Ok(_) => {
                trace::deliver(pkt, ifindex);
                trace::verdict(Action::Decap, 0, 0);
            }
            Err(reason) => trace::verdict(Action::Drop, reason as u32, ifindex),
        }
        return result.ok();
    }
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

/// Decapsulates, reverse-NATs replies of balanced flows, applies `ep`'s inbound policy and
/// redirects to its port `ifindex`.
#[inline(always)]
fn deliver_to(
    pkt: &crate::packet::TcPacket,
    ep: &'static dataplane_common::overlay::Endpoint,
    ifindex: u32,
    eth: &[u8; 12],
) -> Result<i32, DropReason> {
    forward::decapsulate(pkt, eth)
        .and_then(|()| {
            if ep.flags & EP_LB_CLIENT != 0 {
                lb::reverse(pkt, ep)
            } else {
                Ok(())
            }
        })
        .and_then(|()| policy::check(pkt, &Sides::new(None, 0, Some(ep), ifindex)))
        .and_then(|()| forward::to_port(ifindex))
}
