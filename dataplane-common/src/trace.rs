//! Packet trace: `vpc trace` runs the loaded programs on a synthetic packet
//! (BPF_PROG_TEST_RUN) against the live maps, and the programs describe each stage.
//!
//! A run is a trace when the context's `mark` is [`TRACE_MARK`] (user space sets it in the
//! `__sk_buff` passed as `ctx_in`; instances cannot set a mark that survives the namespace
//! crossing, and the host never uses this value). In a trace the programs change no state:
//! no conntrack insert or refresh, no load-balancer flow recorded, no counters, no flow-log
//! events. Each stage writes one [`TraceEvent`] to the `TRACE_EVENTS` ring buffer, in order.

/// `skb->mark` of a trace run.
pub const TRACE_MARK: u32 = 0x7ace_0b5e;

/// What a [`TraceEvent`] describes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TraceStage {
    /// The endpoint (the sender in the port program, the receiver of a decapsulated
    /// packet): `a` VNI, `b` policy id, `c` ACL id, `d` flags, `addr` its address.
    Endpoint = 1,
    /// The port program's forwarding decision: `a` the `port::Forward` number, `b` local
    /// port ifindex or 0, `c` the drop reason number when `a` is `Drop`, `addr` the remote
    /// VTEP (IPv4-mapped) when `a` is `Remote`. A packet to a VIP has two (before and after
    /// the load balancer).
    Route = 2,
    /// Conntrack: `a` 1 if the flow is tracked (security groups skipped), `b` the packet's
    /// TCP flags.
    Conntrack = 3,
    /// Outbound security group: `a` rule reference (0: none matched), `b` policy id.
    SgEgress = 4,
    /// Outbound ACL: `a` rule number, `b` 1 allow / 2 deny / 0 implicit deny, `c` ACL id.
    AclEgress = 5,
    /// Load balancer: `a` service id, `b` backend id, `c` backend port, `addr` backend
    /// address; `d` 1 if an existing flow was followed.
    LoadBalancer = 6,
    /// Inbound ACL: as `AclEgress`.
    AclIngress = 7,
    /// Inbound security group: as `SgEgress`.
    SgIngress = 8,
    /// VXLAN encapsulation: `a` VNI, `b` underlay ifindex, `addr` destination VTEP.
    Encap = 9,
    /// Local delivery: `a` destination port ifindex.
    Deliver = 10,
    /// Conntrack budget of a new flow's VPC: `a` limit, `b` count, `c` 1 if it admits the
    /// flow (only when a budget exists).
    CtBudget = 11,
    /// Final verdict: `a` `stats::Action` number, `b` drop reason number (0: none), `c`
    /// the port a drop is charged to.
    Verdict = 12,
}

impl TraceStage {
    /// The stage with this number.
    pub fn from_u32(v: u32) -> Option<TraceStage> {
        use TraceStage::*;
        [
            Endpoint,
            Route,
            Conntrack,
            SgEgress,
            AclEgress,
            LoadBalancer,
            AclIngress,
            SgIngress,
            Encap,
            Deliver,
            CtBudget,
            Verdict,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }
}

/// Record of the `TRACE_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TraceEvent {
    /// A [`TraceStage`] number.
    pub stage: u32,
    /// Stage-specific values (see [`TraceStage`]).
    pub a: u32,
    /// Stage-specific.
    pub b: u32,
    /// Stage-specific.
    pub c: u32,
    /// Stage-specific.
    pub d: u32,
    /// Reserved, zero.
    pub _pad: u32,
    /// Stage-specific address (IPv4-mapped).
    pub addr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<TraceEvent>() == 40);

/// Capacity of the `TRACE_EVENTS` ring buffer in bytes: traces are serialized by the agent
/// and have a dozen stages.
pub const TRACE_EVENTS_BYTES: u32 = 1 << 16;
