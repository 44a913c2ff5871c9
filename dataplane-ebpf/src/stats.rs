//! Per-CPU counting of actions and drop reasons.

use aya_ebpf::EbpfContext;
use aya_log_ebpf::debug;
use dataplane_common::{
    Action, Counter, DropReason, Hook,
    stats::{EndpointDropKey, EndpointStatsKey, action_index, drop_index},
};

use crate::maps::{ACTION_STATS, DROP_STATS, ENDPOINT_DROPS, ENDPOINT_STATS};

#[inline(always)]
fn bump(map: &aya_ebpf::maps::PerCpuArray<dataplane_common::Counter>, index: u32, bytes: usize) {
    if let Some(counter) = map.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array value, valid for the
        // program's run; no other CPU writes it and the program is not re-entered on this CPU
        // while it runs, so a plain read-modify-write is race free.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
    }
}

/// Counts a packet under `action` for `hook`.
#[inline(always)]
pub fn count_action(hook: Hook, action: Action, bytes: usize) {
    bump(&ACTION_STATS, action_index(hook, action), bytes);
}

/// Counts a dropped packet under `Action::Drop` and under its reason for `hook`.
#[inline(always)]
pub fn count_drop(hook: Hook, reason: DropReason, bytes: usize) {
    bump(&ACTION_STATS, action_index(hook, Action::Drop), bytes);
    bump(&DROP_STATS, drop_index(hook, reason), bytes);
}

/// Counts a drop and logs it at debug level. The loader sets the level (default info), so by
/// default the log costs one branch. Only the underlay hooks log: the record's formatting
/// needs ~360 bytes of stack, which the port program (with its own subprogram frames) cannot
/// spare within the kernel's 512-byte limit, so the port program calls [`count_drop`].
/// Never inlined: as a BPF subprogram its record takes stack only while it runs, not in the
/// frame of the program that calls deeper subprograms (policy checks).
#[inline(never)]
pub fn count_and_log_drop<C: EbpfContext>(ctx: &C, hook: Hook, reason: DropReason, bytes: usize) {
    count_drop(hook, reason, bytes);
    debug!(
        ctx,
        "drop: hook {} reason {} len {}", hook as u32, reason as u32, bytes
    );
}

/// Counts a drop under `hook` and charges it to the instance port `ifindex`.
#[inline(always)]
pub fn count_port_drop(hook: Hook, ifindex: u32, reason: DropReason, bytes: usize) {
    count_drop(hook, reason, bytes);
    count_endpoint_drop(ifindex, reason, bytes);
}

/// Charges a drop to the instance port `ifindex` (the per-hook counters are separate).
#[inline(always)]
pub fn count_endpoint_drop(ifindex: u32, reason: DropReason, bytes: usize) {
    let key = EndpointDropKey {
        ifindex,
        reason: reason as u32,
    };
    match ENDPOINT_DROPS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a per-CPU value, as in `bump`.
        Some(counter) => unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        },
        None => {
            let first = Counter {
                packets: 1,
                bytes: bytes as u64,
            };
            // Another CPU may insert first (its count wins for this packet); an LRU map
            // evicts rather than fails when full.
            let _ = ENDPOINT_DROPS.insert(key, first, 0);
        }
    }
}

/// Counts a packet of the endpoint on port `ifindex` in `direction` (`DIR_INGRESS`,
/// `DIR_EGRESS`) under `action`.
#[inline(always)]
pub fn count_endpoint(ifindex: u32, direction: u32, action: Action, bytes: usize) {
    let key = EndpointStatsKey {
        ifindex,
        direction,
        action: action as u32,
    };
    match ENDPOINT_STATS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a per-CPU value, as in `bump`.
        Some(counter) => unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        },
        None => {
            let first = Counter {
                packets: 1,
                bytes: bytes as u64,
            };
            // As in `count_endpoint_drop`.
            let _ = ENDPOINT_STATS.insert(key, first, 0);
        }
    }
}
