//! Flow-log events: what the policy stage decided for a packet, sent to user space through
//! the `FLOW_EVENTS` ring buffer.
//!
//! The datapath writes one [`FlowEvent`] per IPv4 packet that reaches the policy check when
//! either endpoint involved has flow logging on ([`EP_LOG_ACCEPT`], [`EP_LOG_REJECT`] in
//! `Endpoint::flags`, set by the agent from the VPC's or subnet's flow-log configuration).
//! With logging off the cost is one flag test. A full ring buffer is never silent: the
//! event is counted in `FLOWLOG_LOST` (per CPU) and user space reports the sum.
//!
//! User space aggregates events over a window into AWS version-2 style records (one per
//! ENI, 5-tuple and action), adding the rule that decided and the drop reason.

/// [`crate::overlay::Endpoint::flags`]: log flows this endpoint's policy accepts.
pub const EP_LOG_ACCEPT: u32 = 1 << 1;
/// [`crate::overlay::Endpoint::flags`]: log flows this endpoint's policy rejects.
pub const EP_LOG_REJECT: u32 = 1 << 2;
/// Both flow-log flags.
pub const EP_LOG_ANY: u32 = EP_LOG_ACCEPT | EP_LOG_REJECT;

/// Which rule decided, per stage, for one packet (filled in by `policy::evaluate`).
///
/// Security-group values are *rule references* as stored in `SG_PORT` (policy-local, nonzero;
/// user space maps them back to the group and rule), ACL values are the deciding rule's
/// number (`AclVerdict::rule`; 0: the implicit deny). [`DECISION_NONE`] means the stage did
/// not run (no endpoint on that side, the flow stayed inside the subnet for ACLs, or a
/// tracked flow skipped the security group).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Decision {
    /// Outbound security-group rule of the sender.
    pub sg_out: u32,
    /// Outbound ACL rule of the sender's subnet.
    pub acl_out: u32,
    /// Inbound ACL rule of the receiver's subnet.
    pub acl_in: u32,
    /// Inbound security-group rule of the receiver.
    pub sg_in: u32,
    /// TCP flags of the packet (0 for other protocols).
    pub tcp_flags: u8,
    /// 1: the packet belongs to a tracked flow (security groups were skipped).
    pub tracked: u8,
    /// Reserved, zero.
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<Decision>() == 20);

/// A stage that did not run.
pub const DECISION_NONE: u32 = u32::MAX;

impl Decision {
    /// Nothing decided yet.
    pub const EMPTY: Decision = Decision {
        sg_out: DECISION_NONE,
        acl_out: DECISION_NONE,
        acl_in: DECISION_NONE,
        sg_in: DECISION_NONE,
        tcp_flags: 0,
        tracked: 0,
        _pad: [0; 2],
    };
}

/// [`FlowEvent::action`]: the packet was admitted.
pub const FLOW_ACCEPT: u8 = 0;
/// [`FlowEvent::action`]: the packet was dropped (see `reason`).
pub const FLOW_REJECT: u8 = 1;

/// Record of the `FLOW_EVENTS` ring buffer: one packet's policy decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the packet.
    pub ts_ns: u64,
    /// VNI of the VPC.
    pub vni: u32,
    /// Host-side ifindex of the sending endpoint's port when it lives here (egress record),
    /// else 0.
    pub out_ifindex: u32,
    /// Host-side ifindex of the receiving endpoint's port when it lives here (ingress
    /// record), else 0.
    pub in_ifindex: u32,
    /// Frame length as the hook saw it.
    pub bytes: u32,
    /// Source address (IPv4-mapped).
    pub src: [u8; 16],
    /// Destination address (IPv4-mapped).
    pub dst: [u8; 16],
    /// Source port (ICMP: 0).
    pub src_port: u16,
    /// Destination port (ICMP: type << 8 | code).
    pub dst_port: u16,
    /// IP protocol.
    pub proto: u8,
    /// [`FLOW_ACCEPT`] or [`FLOW_REJECT`].
    pub action: u8,
    /// Reserved, zero.
    pub _pad: [u8; 2],
    /// The drop reason's number (`DropReason`), 0 when accepted.
    pub reason: u32,
    /// Which rules decided.
    pub decision: Decision,
}

const _: () = assert!(core::mem::size_of::<FlowEvent>() == 88);

/// Capacity of the `FLOW_EVENTS` ring buffer in bytes (a power of two): 4 MiB, about 40 000
/// events (each record has an 8-byte header), a few ms of line-rate logging on one host;
/// the agent drains it continuously.
pub const FLOW_EVENTS_BYTES: u32 = 1 << 22;
