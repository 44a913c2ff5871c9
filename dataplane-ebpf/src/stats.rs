//! Per-CPU counting of actions and drop reasons.

use aya_ebpf::EbpfContext;
use aya_log_ebpf::debug;
use dataplane_common::{
    Action, DropReason, Hook,
    stats::{action_index, drop_index},
};

use crate::maps::{ACTION_STATS, DROP_STATS};

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
///
/// Underlay drops are logged at debug level; the loader sets the level (default info), so
/// by default the log costs one branch on the drop path and nothing else. Port drops are
/// only counted: the log record's formatting needs ~360 bytes of stack, which the port
/// program (with its own frames) cannot spare within the kernel's 512-byte limit. `hook` is
/// a constant at every call site, so the test costs nothing.
#[inline(always)]
pub fn count_drop<C: EbpfContext>(ctx: &C, hook: Hook, reason: DropReason, bytes: usize) {
    bump(&ACTION_STATS, action_index(hook, Action::Drop), bytes);
    bump(&DROP_STATS, drop_index(hook, reason), bytes);
    if hook == Hook::Port {
        return;
    }
    debug!(
        ctx,
        "drop: hook {} reason {} len {}", hook as u32, reason as u32, bytes
    );
}
