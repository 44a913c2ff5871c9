//! What every hook does with a packet: parse, decide, count.

use aya_ebpf::EbpfContext;
use aya_log_ebpf::debug;
use dataplane_common::{
    Action, FilterKey, FilterValue, Hook,
    packet::PacketView,
    parse::parse,
    verdict::{FilterTable, Verdict, decide},
};

use crate::{maps::FILTER, stats};

/// The kernel `FILTER` map as the verdict logic's table.
struct KernelFilter;

impl FilterTable for KernelFilter {
    #[inline(always)]
    fn get(&self, key: &FilterKey) -> Option<FilterValue> {
        // SAFETY: the value is copied out at once; user space replaces entries whole with
        // BPF_MAP_UPDATE_ELEM (a 4-byte value), so a concurrent update yields the old or the
        // new action, both valid.
        unsafe { FILTER.get(key).copied() }
    }
}

/// Parses the packet, decides its fate, counts it, and returns the verdict.
///
/// Drops are logged at debug level; the loader sets the level (default info), so by default
/// the log costs one branch on the drop path and nothing else.
#[inline(always)]
pub fn run<C: EbpfContext, P: PacketView>(ctx: &C, pkt: &P, hook: Hook) -> Verdict {
    let len = pkt.len();
    let verdict = decide(parse(pkt), &KernelFilter);
    match verdict {
        Verdict::Pass => stats::count_action(hook, Action::Pass, len),
        Verdict::Drop(reason) => {
            stats::count_action(hook, Action::Drop, len);
            stats::count_drop(hook, reason, len);
            debug!(
                ctx,
                "drop: hook {} reason {} len {}", hook as u32, reason as u32, len
            );
        }
    }
    verdict
}
