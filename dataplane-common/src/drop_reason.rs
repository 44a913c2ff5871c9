//! Why a packet was dropped: one numbered list for the datapath, metrics and the API.
//!
//! Architecture invariant: numbers are never reused or renumbered. A reason that is retired
//! keeps its number (and its proto enum value); new reasons take the next free number. The
//! gRPC API (`proto/vpc/v1/datapath.proto`, enum `DropReason`) mirrors these values and a
//! unit test in `vpc-proto` checks that they agree.

/// Number of drop-reason slots reserved per hook in the drop counters.
///
/// Larger than the number of reasons defined today so new reasons do not change the map
/// size (and so the pinned-map ABI) when they are added.
pub const DROP_REASON_SLOTS: u32 = 64;

/// Why the datapath dropped a packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The frame ends inside a header (Ethernet, VLAN, IP, L4) or before the length its IP
    /// header announces.
    Truncated = 1,
    /// IPv4 header is inconsistent: version is not 4, IHL below 5, or total length shorter
    /// than the header.
    MalformedIpv4 = 2,
    /// IPv6 header is inconsistent: version is not 6.
    MalformedIpv6 = 3,
    /// IPv6 extension-header chain is longer than the datapath walks or runs past the packet.
    Ipv6ExtensionChain = 4,
    /// L4 header is inconsistent or does not fit in the IP payload: TCP data offset below 5
    /// or beyond the payload, UDP length below 8, ICMP shorter than 8 bytes.
    MalformedL4 = 5,
    /// A filter-map entry says this flow is dropped.
    FilterRule = 6,
    /// A frame arrived on an instance port the datapath has no endpoint for (the port
    /// program is attached but the agent has not programmed, or has removed, the port).
    UnknownPort = 7,
    /// An instance sent a frame whose source MAC (Ethernet or ARP sender) is not its own.
    SpoofedMac = 8,
    /// An instance sent a packet whose source IPv4 (IP or ARP sender) is not its own.
    SpoofedIp = 9,
    /// An instance port carries only IPv4 and ARP today; other EtherTypes (IPv6, VLAN tags,
    /// LLDP, ...) are dropped rather than leaked to the host.
    UnsupportedProtocol = 10,
    /// An ARP frame the datapath does not answer: not a well-formed IPv4-over-Ethernet
    /// request, a request for an address no instance or gateway of the VPC has, or a probe of
    /// the sender's own address. Nothing is flooded.
    ArpUnanswered = 11,
    /// No route of the VPC covers the destination, or the route is a blackhole.
    NoRoute = 12,
    /// A route matched but no instance has the destination address (this includes the subnet
    /// gateway and broadcast addresses, which the VPC router does not forward to).
    NoNeighbor = 13,
    /// A VXLAN packet came from an underlay address that is not a VTEP of a VPC on this host.
    UnknownVtep = 14,
    /// A VXLAN packet carries a VNI of no VPC present on this host.
    UnknownVni = 15,
    /// A VXLAN packet is malformed (I flag clear, truncated, inner frame not IPv4) or its
    /// outer headers are not in the plain form the datapath decapsulates (IP options).
    MalformedVxlan = 16,
    /// A VXLAN packet's inner source is not an instance that lives behind the sending VTEP:
    /// one host cannot impersonate another host's instances.
    InnerSourceMismatch = 17,
    /// The encapsulated packet would exceed the underlay MTU. IPv4 packets with DF set are
    /// answered with ICMP "fragmentation needed" (path-MTU discovery); others are dropped.
    MtuExceeded = 18,
    /// The underlay has no route (or no usable neighbor) toward the destination VTEP.
    NoUnderlayRoute = 19,
    /// A kernel helper that rewrites the packet (room adjustment, store) failed.
    RewriteFailed = 20,
    /// A new flow toward an instance that no inbound rule of its security groups admits.
    SgIngress = 21,
    /// A new flow from an instance that no outbound rule of its security groups admits.
    SgEgress = 22,
    /// The network ACL of the receiving instance's subnet denies the packet (an explicit deny
    /// rule or the implicit deny at the end).
    AclIngress = 23,
    /// The network ACL of the sending instance's subnet denies the packet.
    AclEgress = 24,
    /// A TCP packet with a flag combination no connection uses (SYN with FIN or RST, FIN
    /// alone, no flags): dropped by connection tracking whatever the rules say.
    CtInvalid = 25,
    /// A packet to a load balancer's VIP on a port (or protocol) without a listener.
    LbNoListener = 26,
    /// A new flow to a listener whose target group has no registered target.
    LbNoTarget = 27,
    /// A new flow of a VPC that already holds its share of the conntrack table on this host
    /// (`CT_BUDGET`): one tenant cannot exhaust the table for the others.
    CtBudgetExceeded = 28,
}

impl DropReason {
    /// Every reason, in number order.
    pub const ALL: [DropReason; 28] = [
        DropReason::Truncated,
        DropReason::MalformedIpv4,
        DropReason::MalformedIpv6,
        DropReason::Ipv6ExtensionChain,
        DropReason::MalformedL4,
        DropReason::FilterRule,
        DropReason::UnknownPort,
        DropReason::SpoofedMac,
        DropReason::SpoofedIp,
        DropReason::UnsupportedProtocol,
        DropReason::ArpUnanswered,
        DropReason::NoRoute,
        DropReason::NoNeighbor,
        DropReason::UnknownVtep,
        DropReason::UnknownVni,
        DropReason::MalformedVxlan,
        DropReason::InnerSourceMismatch,
        DropReason::MtuExceeded,
        DropReason::NoUnderlayRoute,
        DropReason::RewriteFailed,
        DropReason::SgIngress,
        DropReason::SgEgress,
        DropReason::AclIngress,
        DropReason::AclEgress,
        DropReason::CtInvalid,
        DropReason::LbNoListener,
        DropReason::LbNoTarget,
        DropReason::CtBudgetExceeded,
    ];

    /// The stable number of this reason.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }

    /// The reason with this number, if it exists.
    pub fn from_u32(value: u32) -> Option<DropReason> {
        DropReason::ALL.into_iter().find(|r| r.as_u32() == value)
    }

    /// Short snake_case name used in metrics labels and CLI output.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::MalformedIpv4 => "malformed_ipv4",
            DropReason::MalformedIpv6 => "malformed_ipv6",
            DropReason::Ipv6ExtensionChain => "ipv6_extension_chain",
            DropReason::MalformedL4 => "malformed_l4",
            DropReason::FilterRule => "filter_rule",
            DropReason::UnknownPort => "unknown_port",
            DropReason::SpoofedMac => "spoofed_mac",
            DropReason::SpoofedIp => "spoofed_ip",
            DropReason::UnsupportedProtocol => "unsupported_protocol",
            DropReason::ArpUnanswered => "arp_unanswered",
            DropReason::NoRoute => "no_route",
            DropReason::NoNeighbor => "no_neighbor",
            DropReason::UnknownVtep => "unknown_vtep",
            DropReason::UnknownVni => "unknown_vni",
            DropReason::MalformedVxlan => "malformed_vxlan",
            DropReason::InnerSourceMismatch => "inner_source_mismatch",
            DropReason::MtuExceeded => "mtu_exceeded",
            DropReason::NoUnderlayRoute => "no_underlay_route",
            DropReason::RewriteFailed => "rewrite_failed",
            DropReason::SgIngress => "sg_ingress",
            DropReason::SgEgress => "sg_egress",
            DropReason::AclIngress => "acl_ingress",
            DropReason::AclEgress => "acl_egress",
            DropReason::CtInvalid => "ct_invalid",
            DropReason::LbNoListener => "lb_no_listener",
            DropReason::LbNoTarget => "lb_no_target",
            DropReason::CtBudgetExceeded => "ct_budget_exceeded",
        }
    }
}

const _: () = {
    // Every reason must fit in the counter slots reserved per hook.
    let mut i = 0;
    while i < DropReason::ALL.len() {
        assert!(DropReason::ALL[i].as_u32() < DROP_REASON_SLOTS);
        assert!(DropReason::ALL[i].as_u32() != 0);
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_unique_and_round_trip() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(DropReason::from_u32(r.as_u32()), Some(*r));
            for other in &DropReason::ALL[i + 1..] {
                assert_ne!(r.as_u32(), other.as_u32());
                assert_ne!(r.name(), other.name());
            }
        }
        assert_eq!(DropReason::from_u32(0), None);
        assert_eq!(DropReason::from_u32(DROP_REASON_SLOTS), None);
    }
}
