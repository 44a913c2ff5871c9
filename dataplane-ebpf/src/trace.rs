//! Packet trace: in a run whose `skb->mark` is `TRACE_MARK` (only BPF_PROG_TEST_RUN from the
//! agent sets it), each stage writes a `TraceEvent` to `TRACE_EVENTS`, and nothing changes
//! state (see `dataplane_common::trace`). Callers test [`TcPacket::traced`] first, so a
//! normal packet pays one load and compare per stage.

use dataplane_common::{
    Action, DropReason,
    filter::ipv4_mapped,
    flowlog::{DECISION_NONE, Decision},
    lb::Selection,
    overlay::Endpoint,
    policy::budget_admits,
    port::{Forward, PortAction},
    trace::{TraceEvent, TraceStage},
};

use crate::{maps::TRACE_EVENTS, packet::TcPacket, policy::Sides, tables::PolicyKernel};

/// Writes one event (a BPF subprogram: the record lives in its frame). `cd`: `c` in the low
/// and `d` in the high 32 bits (five arguments at most).
#[inline(never)]
pub fn emit(stage: TraceStage, a: u32, b: u32, cd: u64, addr: &[u8; 16]) {
    let ev = TraceEvent {
        stage: stage as u32,
        a,
        b,
        c: cd as u32,
        d: (cd >> 32) as u32,
        _pad: 0,
        addr: *addr,
    };
    // A full ring loses the event; the agent drains it before and after every run, so it
    // only happens if two traces overlap, which the agent serializes.
    let _ = TRACE_EVENTS.output::<TraceEvent>(&ev, 0);
}

/// An endpoint the packet comes from (port program) or goes to (TC ingress): `a` VNI, `b`
/// policy id, `c` ACL id, `d` flags, `addr` its address. A BPF subprogram.
#[inline(never)]
pub fn endpoint(ep: &Endpoint) {
    emit(
        TraceStage::Endpoint,
        ep.vni,
        ep.policy,
        u64::from(ep.acl) | (u64::from(ep.flags) << 32),
        &ep.addr,
    );
}

/// The stages of one policy check: conntrack, then the security-group and ACL stages that
/// ran, then the budget (new flows of a VPC with one). A BPF subprogram.
#[inline(never)]
pub fn policy(sides: &Sides, d: &Decision, reason: u32) {
    emit(
        TraceStage::Conntrack,
        u32::from(d.tracked),
        u32::from(d.tcp_flags),
        0,
        &[0; 16],
    );
    if let Some(o) = sides.out {
        if d.sg_out != DECISION_NONE {
            emit(TraceStage::SgEgress, d.sg_out, o.policy, 0, &[0; 16]);
        }
        if d.acl_out != DECISION_NONE {
            let verdict = acl_verdict(d.acl_out, reason == DropReason::AclEgress as u32);
            emit(
                TraceStage::AclEgress,
                d.acl_out,
                verdict,
                u64::from(o.acl),
                &[0; 16],
            );
        }
    }
    if let Some(i) = sides.inb {
        if d.acl_in != DECISION_NONE {
            let verdict = acl_verdict(d.acl_in, reason == DropReason::AclIngress as u32);
            emit(
                TraceStage::AclIngress,
                d.acl_in,
                verdict,
                u64::from(i.acl),
                &[0; 16],
            );
        }
        if d.sg_in != DECISION_NONE {
            emit(TraceStage::SgIngress, d.sg_in, i.policy, 0, &[0; 16]);
        }
    }
    if d.tracked == 0
        && (reason == 0 || reason == DropReason::CtBudgetExceeded as u32)
        && let Some(b) = PolicyKernel::budget(sides.vni)
    {
        let admits = u64::from(budget_admits(Some(b)));
        emit(TraceStage::CtBudget, b.limit, b.count, admits, &[0; 16]);
    }
}

/// `TraceStage::AclEgress`'s `b`: 1 allow, 2 deny, 0 implicit deny.
#[inline(always)]
fn acl_verdict(rule: u32, denied: bool) -> u32 {
    match (rule, denied) {
        (0, _) => 0,
        (_, true) => 2,
        (_, false) => 1,
    }
}

/// The forwarding decision of the port program: `a` the `port::Forward` number, `b` the
/// local port (deliveries), `c` the drop reason (drops), `addr` the remote VTEP
/// (IPv4-mapped; encapsulation). A BPF subprogram.
#[inline(never)]
pub fn route(action: &PortAction) {
    let mut vtep = [0u8; 16];
    if action.forward == Forward::Remote {
        vtep = ipv4_mapped(action.vtep);
    }
    emit(
        TraceStage::Route,
        action.forward as u32,
        action.ifindex,
        u64::from(action.reason as u32),
        &vtep,
    );
}

/// The final verdict: `a` the `Action` number, `b` the drop reason (0: none), `c` the port
/// a drop is charged to. A BPF subprogram (its zero address stays off the caller's stack).
#[inline(never)]
pub fn verdict(action: Action, reason: u32, charged: u32) {
    emit(
        TraceStage::Verdict,
        action as u32,
        reason,
        u64::from(charged),
        &[0; 16],
    );
}

/// In a trace, local delivery to port `ifindex`. A BPF subprogram that tests the mark
/// itself: a flag held by the caller would double the verifier's work after it.
#[inline(never)]
pub fn deliver(pkt: &TcPacket, ifindex: u32) {
    if pkt.traced() {
        emit(TraceStage::Deliver, ifindex, 0, 0, &[0; 16]);
    }
}

/// In a trace, VXLAN encapsulation (VNI, underlay device, destination VTEP). As
/// [`deliver`].
#[inline(never)]
pub fn encap(pkt: &TcPacket, vni: u32, underlay: u32, vtep: [u8; 4]) {
    if pkt.traced() {
        emit(TraceStage::Encap, vni, underlay, 0, &ipv4_mapped(vtep));
    }
}

/// In a trace, the load balancer's choice: `a` service id, `b` backend id, `c` backend
/// port, `d` 1 if the flow's recorded target was followed, `addr` the backend. As
/// [`deliver`].
#[inline(never)]
pub fn balance(pkt: &TcPacket, sel: &Selection) {
    if pkt.traced() {
        let b = &sel.backend;
        emit(
            TraceStage::LoadBalancer,
            b.service,
            sel.id,
            u64::from(b.port) | (u64::from(!sel.record) << 32),
            &b.addr,
        );
    }
}

/// In a trace, the receiving endpoint of a decapsulated packet. As [`deliver`].
#[inline(never)]
pub fn receiver(pkt: &TcPacket, ep: &Endpoint) {
    if pkt.traced() {
        endpoint(ep);
    }
}

/// In a trace, the sending endpoint (if given) and the port program's forwarding decision.
/// As [`deliver`]; a sibling of `port::classify`, whose frame is large.
#[inline(never)]
pub fn decision(pkt: &TcPacket, ep: Option<&Endpoint>, action: &PortAction) {
    if pkt.traced() {
        if let Some(ep) = ep {
            endpoint(ep);
        }
        route(action);
    }
}
