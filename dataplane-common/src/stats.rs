//! Per-CPU packet and byte counters, by hook and action and by hook and drop reason.

use crate::drop_reason::{DROP_REASON_SLOTS, DropReason};

/// Where in the stack a program runs. Counters are kept per hook so a packet that crosses
/// two hooks is visible in both.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// XDP, on receive, before the kernel allocates an skb.
    Xdp = 0,
    /// TC (clsact/tcx) ingress.
    TcIngress = 1,
    /// TC (clsact/tcx) egress.
    TcEgress = 2,
    /// TC ingress on the host side of an instance's veth: frames the instance sends.
    Port = 3,
}

impl Hook {
    /// Every hook, in number order.
    pub const ALL: [Hook; 4] = [Hook::Xdp, Hook::TcIngress, Hook::TcEgress, Hook::Port];

    /// The hooks of an underlay (host) interface, which run the filter map.
    pub const UNDERLAY: [Hook; 3] = [Hook::Xdp, Hook::TcIngress, Hook::TcEgress];

    /// Short name used in metrics labels and CLI output.
    pub const fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::TcIngress => "tc_ingress",
            Hook::TcEgress => "tc_egress",
            Hook::Port => "port",
        }
    }
}

/// Hook slots in the counter arrays: more than the hooks defined today, so adding a hook
/// does not change the map sizes (and so the pinned-map ABI).
pub const HOOK_SLOTS: u32 = 8;

const _: () = assert!(Hook::ALL.len() as u32 <= HOOK_SLOTS);

/// What the datapath did with a packet, as counted (independent of the hook's return codes).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Handed on to the kernel stack unchanged.
    Pass = 0,
    /// Dropped; the drop counters say why.
    Drop = 1,
    /// The program hit an internal error (XDP_ABORTED / TC_ACT_SHOT on error).
    Aborted = 2,
    /// Delivered to a local instance port (redirected, MACs rewritten).
    Redirect = 3,
    /// Encapsulated in VXLAN and sent toward another host's VTEP.
    Encap = 4,
    /// Decapsulated from VXLAN and delivered to a local instance port.
    Decap = 5,
    /// Answered by the datapath itself (ARP reply, ICMP "fragmentation needed").
    Reply = 6,
}

impl Action {
    /// Every action, in number order.
    pub const ALL: [Action; 7] = [
        Action::Pass,
        Action::Drop,
        Action::Aborted,
        Action::Redirect,
        Action::Encap,
        Action::Decap,
        Action::Reply,
    ];

    /// The action with this slot number, if it exists.
    pub fn from_u32(value: u32) -> Option<Action> {
        Action::ALL.into_iter().find(|a| *a as u32 == value)
    }

    /// Short name used in metrics labels and CLI output.
    pub const fn name(self) -> &'static str {
        match self {
            Action::Pass => "pass",
            Action::Drop => "drop",
            Action::Aborted => "aborted",
            Action::Redirect => "redirect",
            Action::Encap => "encap",
            Action::Decap => "decap",
            Action::Reply => "reply",
        }
    }
}

/// Action slots reserved per hook (room for more actions without a map resize).
pub const ACTION_SLOTS: u32 = 16;

/// Entries of the `ACTION_STATS` per-CPU array.
pub const ACTION_STATS_ENTRIES: u32 = HOOK_SLOTS * ACTION_SLOTS;

/// Entries of the `DROP_STATS` per-CPU array.
pub const DROP_STATS_ENTRIES: u32 = HOOK_SLOTS * DROP_REASON_SLOTS;

/// Index of (hook, action) in `ACTION_STATS`.
#[inline(always)]
pub const fn action_index(hook: Hook, action: Action) -> u32 {
    action_slot_index(hook, action as u32)
}

/// Index of (hook, action slot number) in `ACTION_STATS`; readers walk every slot this way.
#[inline(always)]
pub const fn action_slot_index(hook: Hook, slot: u32) -> u32 {
    hook as u32 * ACTION_SLOTS + slot
}

/// Index of (hook, reason) in `DROP_STATS`.
#[inline(always)]
pub const fn drop_index(hook: Hook, reason: DropReason) -> u32 {
    drop_slot_index(hook, reason as u32)
}

/// Index of (hook, drop-reason number) in `DROP_STATS`; readers walk every slot this way.
#[inline(always)]
pub const fn drop_slot_index(hook: Hook, slot: u32) -> u32 {
    hook as u32 * DROP_REASON_SLOTS + slot
}

/// Packets and bytes seen, one value per CPU in the map (summed by user space).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted: the frame length as the hook saw it (L2 header included).
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<Counter>() == 16);
const _: () = assert!((Action::Reply as u32) < ACTION_SLOTS);

impl Counter {
    /// Adds another CPU's (or snapshot's) values.
    pub fn add(&mut self, other: &Counter) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
    }

    /// The increase from `earlier` to `self` (counters only grow; wraps like the kernel's).
    pub fn since(&self, earlier: &Counter) -> Counter {
        Counter {
            packets: self.packets.wrapping_sub(earlier.packets),
            bytes: self.bytes.wrapping_sub(earlier.bytes),
        }
    }
}

/// Key of `ENDPOINT_DROPS`: drops charged to one instance port. Security-group and ACL
/// drops are charged to the endpoint whose rules decided (inbound reasons to the receiver,
/// outbound ones to the sender); every other port drop to the sending port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointDropKey {
    /// Host-side veth ifindex of the endpoint.
    pub ifindex: u32,
    /// A [`DropReason`] as its number.
    pub reason: u32,
}

const _: () = assert!(core::mem::size_of::<EndpointDropKey>() == 8);

/// Key of `ENDPOINT_STATS`: what the datapath did with one endpoint's traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointStatsKey {
    /// Host-side veth ifindex of the endpoint.
    pub ifindex: u32,
    /// [`DIR_INGRESS`] (toward the instance) or [`DIR_EGRESS`] (from it).
    pub direction: u32,
    /// An [`Action`] number (accepted traffic: `Redirect`, `Encap`, `Decap`; `Drop` for
    /// drops, which `ENDPOINT_DROPS` splits by reason).
    pub action: u32,
}

const _: () = assert!(core::mem::size_of::<EndpointStatsKey>() == 12);

/// [`EndpointStatsKey::direction`]: traffic delivered to the endpoint.
pub const DIR_INGRESS: u32 = 0;
/// [`EndpointStatsKey::direction`]: traffic the endpoint sent.
pub const DIR_EGRESS: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_distinct() {
        let mut seen = std::vec::Vec::new();
        for h in Hook::ALL {
            for a in Action::ALL {
                let i = action_index(h, a);
                assert!(i < ACTION_STATS_ENTRIES);
                assert!(!seen.contains(&i));
                seen.push(i);
            }
        }
        let mut seen = std::vec::Vec::new();
        for h in Hook::ALL {
            for r in DropReason::ALL {
                let i = drop_index(h, r);
                assert!(i < DROP_STATS_ENTRIES);
                assert!(!seen.contains(&i));
                seen.push(i);
            }
        }
    }
}
