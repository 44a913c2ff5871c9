//! `vpc_port`: frames an instance sends, at TC ingress on the host side of its veth.
//!
//! The decision is the pure `dataplane_common::port::decide`; this module carries it out.

use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use dataplane_common::{
    Action, DropReason, Hook,
    arp::{self, ArpIpv4},
    icmp::{FRAG_NEEDED_FRAME_LEN, QUOTE_LEN, frag_needed},
    overlay::{EP_LB_CLIENT, Endpoint, OverlayConfig, v4},
    packet::PacketView,
    parse::ETH_HLEN,
    port::{Forward, PortAction, decide},
    stats::{DIR_EGRESS, DIR_INGRESS},
};

use crate::{
    forward::{self, Encap},
    lb,
    packet::TcPacket,
    policy::{self, Sides},
    stats,
    tables::{KernelTables, overlay_config},
    trace,
};

/// Runs the port program; returns the TC action.
#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let pkt = TcPacket::new(ctx);
    let len = pkt.len();
    let port = pkt.ifindex();
    // Read after `forward`, not before: a flag held across it would make the verifier
    // explore all of `forward` twice (traced and not).
    match forward(ctx, &pkt, port) {
        Ok((action, rc, receiver)) => {
            if pkt.traced() {
                trace::verdict(action, 0, 0);
                return rc;
            }
            stats::count_action(Hook::Port, action, len);
            stats::count_endpoint(port, DIR_EGRESS, action, len);
            if receiver != 0 {
                stats::count_endpoint(receiver, DIR_INGRESS, action, len);
            }
            rc
        }
        Err((reason, charged)) => {
            if pkt.traced() {
                trace::verdict(Action::Drop, reason as u32, charged);
                return TC_ACT_SHOT;
            }
            stats::count_port_drop(Hook::Port, charged, reason, len);
            let dir = if charged == port {
                DIR_EGRESS
            } else {
                DIR_INGRESS
            };
            stats::count_endpoint(charged, dir, Action::Drop, len);
            TC_ACT_SHOT
        }
    }
}

/// A drop and the port whose endpoint it is charged to.
type Dropped = (DropReason, u32);

/// What was done, the TC action, and the local receiver's port (0: none here).
type Forwarded = (Action, i32, u32);

#[inline(always)]
fn forward(ctx: &TcContext, pkt: &TcPacket, port: u32) -> Result<Forwarded, Dropped> {
    let here = |reason| (reason, port);
    // Not copied, to keep this frame small (see the subprograms below); see
    // `policy::endpoint` on why the reference stays valid.
    let ep: &'static Endpoint = policy::endpoint(port).ok_or(here(DropReason::UnknownPort))?;
    let cfg = overlay_config();
    let mut action = classify(pkt, ep, &cfg);
    trace::decision(pkt, Some(ep), &action);
    // Whose outbound policy is still to apply.
    let mut out = Some(ep);
    if action.forward == Forward::Balance {
        // The client's outbound rules see the VIP (as in AWS); then the packet goes to the
        // chosen target like any other, the target's inbound rules seeing the client.
        policy::check(pkt, &Sides::new(Some(ep), port, None, 0)).map_err(here)?;
        lb::balance(pkt, ep).map_err(here)?;
        out = None;
        action = classify(pkt, ep, &cfg);
        trace::decision(pkt, None, &action);
    }
    match action.forward {
        Forward::Drop => Err(here(action.reason)),
        // A target must be an instance, not another VIP.
        Forward::Balance => Err(here(DropReason::NoNeighbor)),
        Forward::ArpReply => {
            arp_reply(pkt, ep).map_err(here)?;
            Ok((Action::Reply, forward::to_port(port).map_err(here)?, 0))
        }
        Forward::Local => {
            let dst = policy::endpoint(action.ifindex).ok_or(here(DropReason::NoNeighbor))?;
            // Inbound verdicts are the receiver's.
            let charge = |reason| {
                let charged = match reason {
                    DropReason::SgIngress | DropReason::AclIngress => action.ifindex,
                    _ => port,
                };
                (reason, charged)
            };
            if dst.flags & EP_LB_CLIENT != 0 && lb::is_reply(pkt, dst).map_err(here)? {
                // A target's reply to a balanced flow: the target's rules see it as sent,
                // the client's as it receives it (from the VIP).
                if out.is_some() {
                    policy::check(pkt, &Sides::new(out, port, None, 0)).map_err(charge)?;
                }
                lb::reverse(pkt, dst).map_err(here)?;
                policy::check(pkt, &Sides::new(None, 0, Some(dst), action.ifindex))
                    .map_err(charge)?;
            } else {
                policy::check(pkt, &Sides::new(out, port, Some(dst), action.ifindex))
                    .map_err(charge)?;
            }
            pkt.write(0, &action.mac).map_err(here)?;
            pkt.write(6, &ep.router_mac).map_err(here)?;
            trace::deliver(pkt, action.ifindex);
            Ok((
                Action::Redirect,
                forward::to_port(action.ifindex).map_err(here)?,
                action.ifindex,
            ))
        }
        Forward::Remote => {
            if out.is_some() {
                policy::check(pkt, &Sides::new(out, port, None, 0)).map_err(here)?;
            }
            let e = Encap {
                vtep: action.vtep,
                vni: ep.vni,
                dst_mac: action.mac,
                src_mac: ep.router_mac,
                ip_len: action.ip_len,
                fixed_gso: action.fixed_gso,
            };
            trace::encap(pkt, ep.vni, cfg.underlay_ifindex, action.vtep);
            Ok((
                Action::Encap,
                forward::encapsulate(ctx, pkt, &cfg, &e).map_err(here)?,
                0,
            ))
        }
        Forward::FragNeeded => {
            // The packet itself is dropped (and counted so); the instance learns the MTU.
            count_mtu_drop(pkt, port);
            frag_needed_reply(pkt, ep, action.mtu).map_err(here)?;
            Ok((Action::Reply, forward::to_port(port).map_err(here)?, 0))
        }
    }
}

// The functions below are `inline(never)`: each is a BPF subprogram with its own stack
// frame, so their large locals (frames being built) are not all live in `vpc_port`'s
// 512-byte stack at once.

/// The forwarding decision (the pure logic of `dataplane_common::port`).
#[inline(never)]
fn classify(pkt: &TcPacket, ep: &Endpoint, cfg: &OverlayConfig) -> PortAction {
    decide(pkt, ep, cfg, pkt.gso_size(), &KernelTables)
}

/// Counts the drop of a packet too big for the underlay (not in a trace).
#[inline(never)]
fn count_mtu_drop(pkt: &TcPacket, port: u32) {
    if !pkt.traced() {
        stats::count_port_drop(Hook::Port, port, DropReason::MtuExceeded, pkt.len());
    }
}

/// Rewrites the ARP request in place into the router's reply.
#[inline(never)]
fn arp_reply(pkt: &TcPacket, ep: &Endpoint) -> Result<(), DropReason> {
    let request: ArpIpv4 = pkt.read(ETH_HLEN).ok_or(DropReason::Truncated)?;
    pkt.write(0, &arp::reply(&request, ep.router_mac))
}

/// Replaces the packet with ICMP "fragmentation needed" to its sender.
#[inline(never)]
fn frag_needed_reply(pkt: &TcPacket, ep: &Endpoint, mtu: u16) -> Result<(), DropReason> {
    let quote: [u8; QUOTE_LEN] = pkt.read(ETH_HLEN).ok_or(DropReason::Truncated)?;
    let reply = frag_needed(&quote, ep.mac, ep.router_mac, v4(&ep.gateway), mtu);
    pkt.resize(FRAG_NEEDED_FRAME_LEN as u32)?;
    pkt.write(0, &reply)
}
