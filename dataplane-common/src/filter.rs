//! The filter map: per-flow pass/drop decisions installed by user space.
//!
//! A key names a destination (address, IP protocol, port). The all-zero address is the
//! wildcard "any destination address". The datapath looks up the exact destination first,
//! then the wildcard, so an exact `Pass` entry can punch a hole in a wildcard `Drop`.

/// Key of the `FILTER` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FilterKey {
    /// Destination address: IPv6, or IPv4 as an IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`); all zero = any address.
    pub addr: [u8; 16],
    /// Destination port in host byte order (TCP, UDP); for ICMP, `type << 8 | code`.
    pub port: u16,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...).
    pub proto: u8,
    /// Reserved, must be zero (explicit so the key has no implicit padding).
    pub _pad: u8,
}

const _: () = assert!(core::mem::size_of::<FilterKey>() == 20);

impl FilterKey {
    /// A key for a destination address (IPv4-mapped or IPv6 bytes), protocol and port.
    pub const fn new(addr: [u8; 16], proto: u8, port: u16) -> Self {
        FilterKey {
            addr,
            port,
            proto,
            _pad: 0,
        }
    }

    /// The same key with the wildcard ("any") address.
    pub const fn any_addr(self) -> Self {
        FilterKey {
            addr: [0; 16],
            ..self
        }
    }
}

/// What to do with a flow that matches a filter entry.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FilterAction {
    /// Let it through (overrides a wildcard drop for an exact destination).
    Pass = 0,
    /// Drop it and count [`crate::DropReason::FilterRule`].
    Drop = 1,
}

/// Value of the `FILTER` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FilterValue {
    /// A [`FilterAction`] as its number. Unknown numbers are treated as `Drop` (fail closed).
    pub action: u32,
}

const _: () = assert!(core::mem::size_of::<FilterValue>() == 4);

impl FilterValue {
    /// A value for `action`.
    pub const fn new(action: FilterAction) -> Self {
        FilterValue {
            action: action as u32,
        }
    }

    /// The action, failing closed on unknown numbers.
    pub const fn action(&self) -> FilterAction {
        if self.action == FilterAction::Pass as u32 {
            FilterAction::Pass
        } else {
            FilterAction::Drop
        }
    }
}

/// IPv4 address as the IPv4-mapped IPv6 bytes used in keys.
pub const fn ipv4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}
