//! Flow-log events: one `FlowEvent` per policy decision on a logged endpoint's packet,
//! through the `FLOW_EVENTS` ring buffer.
//!
//! The caller tests the endpoints' flags first (one test when logging is off); this module
//! only runs for logged packets. A full ring buffer is counted in `FLOWLOG_LOST`, never
//! silent.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use dataplane_common::{
    flowlog::{Decision, FLOW_ACCEPT, FLOW_REJECT, FlowEvent},
    parse::IpPacket,
};

use crate::{
    maps::{FLOW_EVENTS, FLOWLOG_LOST},
    policy::Sides,
};

/// Reserves, fills and submits the event of the packet `ip` (`len` bytes) between `sides`,
/// decided as `d` with drop reason `reason` (0: accepted). A BPF subprogram: the event is
/// written in the ring buffer, not on the stack.
#[inline(never)]
pub fn emit(ip: &IpPacket, sides: &Sides, d: &Decision, reason: u32, len: u32) {
    let Some(mut entry) = FLOW_EVENTS.reserve::<FlowEvent>(0) else {
        if let Some(lost) = FLOWLOG_LOST.get_ptr_mut(0) {
            // SAFETY: this CPU's slot of a per-CPU array, valid for the run; no other CPU
            // writes it and the program is not re-entered on this CPU meanwhile.
            unsafe { *lost += 1 };
        }
        return;
    };
    // SAFETY: a helper without arguments or side effects.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    entry.write(FlowEvent {
        ts_ns,
        vni: sides.vni,
        out_ifindex: sides.out_ifindex,
        in_ifindex: sides.in_ifindex,
        bytes: len,
        src: ip.src,
        dst: ip.dst,
        src_port: ip.src_port,
        dst_port: ip.dst_port,
        proto: ip.proto,
        action: if reason == 0 {
            FLOW_ACCEPT
        } else {
            FLOW_REJECT
        },
        _pad: [0; 2],
        reason,
        decision: *d,
    });
    entry.submit(0);
}
