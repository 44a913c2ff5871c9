//! A flow-log record: AWS's version-2 fields in their order, then what AWS lacks (the rule
//! that decided, the drop reason) and the usual custom-format additions (vpc-id,
//! subnet-id, instance-id, tcp-flags, flow-direction).

use serde::{Deserialize, Serialize};
use vpc_proto::v1 as pb;

/// `log-status`: data recorded.
pub const OK: &str = "OK";
/// `log-status`: no traffic in the window.
pub const NODATA: &str = "NODATA";
/// `log-status`: events were lost in the window (counted in `skipped-events`).
pub const SKIPDATA: &str = "SKIPDATA";

/// One aggregated record, serialized as one JSON line with AWS's field names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FlowRecord {
    /// Always 2.
    pub version: u32,
    /// The flow log's account.
    pub account_id: String,
    /// The instance's interface (`eni-` + the instance id's digits).
    pub interface_id: String,
    /// Source address.
    pub srcaddr: String,
    /// Destination address.
    pub dstaddr: String,
    /// Source port (0 for ICMP).
    pub srcport: u16,
    /// Destination port (0 for ICMP).
    pub dstport: u16,
    /// IANA protocol number.
    pub protocol: u8,
    /// Packets in the window.
    pub packets: u64,
    /// Bytes in the window.
    pub bytes: u64,
    /// Unix seconds of the first packet.
    pub start: i64,
    /// Unix seconds of the last packet.
    pub end: i64,
    /// `ACCEPT` or `REJECT`.
    pub action: String,
    /// `OK`, `NODATA` or `SKIPDATA`.
    pub log_status: String,
    /// VPC.
    pub vpc_id: String,
    /// Subnet.
    pub subnet_id: String,
    /// Instance.
    pub instance_id: String,
    /// OR of the TCP flags seen (AWS bits: FIN 1, SYN 2, RST 4, PSH 8, ACK 16, URG 32).
    pub tcp_flags: u8,
    /// `ingress` or `egress`, as seen from the interface.
    pub flow_direction: String,
    /// The rule that decided.
    pub rule: String,
    /// The drop reason's name, empty when accepted.
    pub reason: String,
    /// The flow log.
    pub flow_log_id: String,
    /// The host that observed it.
    pub host_id: String,
    /// Events lost on this host in the window (with `log-status` SKIPDATA).
    pub skipped_events: u64,
}

impl FlowRecord {
    /// The AWS version-2 default format: the 14 fields separated by spaces, `-` for
    /// fields without a value (a NODATA/SKIPDATA record without traffic).
    pub fn v2_line(&self) -> String {
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                s.to_owned()
            }
        };
        if self.srcaddr.is_empty() {
            return format!(
                "2 {} {} - - - - - - - {} {} - {}",
                self.account_id, self.interface_id, self.start, self.end, self.log_status
            );
        }
        format!(
            "2 {} {} {} {} {} {} {} {} {} {} {} {} {}",
            self.account_id,
            dash(&self.interface_id),
            self.srcaddr,
            self.dstaddr,
            self.srcport,
            self.dstport,
            self.protocol,
            self.packets,
            self.bytes,
            self.start,
            self.end,
            self.action,
            self.log_status
        )
    }
}

impl From<&FlowRecord> for pb::FlowLogRecord {
    fn from(r: &FlowRecord) -> Self {
        pb::FlowLogRecord {
            version: r.version,
            account_id: r.account_id.clone(),
            interface_id: r.interface_id.clone(),
            srcaddr: r.srcaddr.clone(),
            dstaddr: r.dstaddr.clone(),
            srcport: r.srcport.into(),
            dstport: r.dstport.into(),
            protocol: r.protocol.into(),
            packets: r.packets,
            bytes: r.bytes,
            start: r.start,
            end: r.end,
            action: r.action.clone(),
            log_status: r.log_status.clone(),
            vpc_id: r.vpc_id.clone(),
            subnet_id: r.subnet_id.clone(),
            instance_id: r.instance_id.clone(),
            tcp_flags: r.tcp_flags.into(),
            flow_direction: r.flow_direction.clone(),
            rule: r.rule.clone(),
            reason: r.reason.clone(),
            flow_log_id: r.flow_log_id.clone(),
            host_id: r.host_id.clone(),
            skipped_events: r.skipped_events,
        }
    }
}

impl From<&pb::FlowLogRecord> for FlowRecord {
    fn from(r: &pb::FlowLogRecord) -> Self {
        FlowRecord {
            version: r.version,
            account_id: r.account_id.clone(),
            interface_id: r.interface_id.clone(),
            srcaddr: r.srcaddr.clone(),
            dstaddr: r.dstaddr.clone(),
            srcport: r.srcport.min(u32::from(u16::MAX)) as u16,
            dstport: r.dstport.min(u32::from(u16::MAX)) as u16,
            protocol: r.protocol.min(255) as u8,
            packets: r.packets,
            bytes: r.bytes,
            start: r.start,
            end: r.end,
            action: r.action.clone(),
            log_status: r.log_status.clone(),
            vpc_id: r.vpc_id.clone(),
            subnet_id: r.subnet_id.clone(),
            instance_id: r.instance_id.clone(),
            tcp_flags: (r.tcp_flags & 0xff) as u8,
            flow_direction: r.flow_direction.clone(),
            rule: r.rule.clone(),
            reason: r.reason.clone(),
            flow_log_id: r.flow_log_id.clone(),
            host_id: r.host_id.clone(),
            skipped_events: r.skipped_events,
        }
    }
}

/// The interface id of an instance's (single) interface: `i-<digits>` -> `eni-<digits>`.
pub fn interface_id(instance: &str) -> String {
    match instance.strip_prefix("i-") {
        Some(digits) => format!("eni-{digits}"),
        None => instance.to_owned(),
    }
}

#[cfg(test)]
pub(crate) fn sample() -> FlowRecord {
    FlowRecord {
        version: 2,
        account_id: "123456789012".into(),
        interface_id: "eni-0a1b2c3d4e5f60718".into(),
        srcaddr: "10.0.1.5".into(),
        dstaddr: "10.0.1.6".into(),
        srcport: 49152,
        dstport: 443,
        protocol: 6,
        packets: 10,
        bytes: 840,
        start: 1_700_000_000,
        end: 1_700_000_004,
        action: "ACCEPT".into(),
        log_status: OK.into(),
        vpc_id: "vpc-0a1b2c3d4e5f60718".into(),
        subnet_id: "subnet-0a1b2c3d4e5f60718".into(),
        instance_id: "i-0a1b2c3d4e5f60718".into(),
        tcp_flags: 0x13,
        flow_direction: "egress".into(),
        rule: "sg-0a1b2c3d4e5f60718 egress all to 0.0.0.0/0".into(),
        reason: String::new(),
        flow_log_id: "fl-0a1b2c3d4e5f60718".into(),
        host_id: "h1".into(),
        skipped_events: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_line_has_the_aws_field_order() {
        let r = sample();
        assert_eq!(
            r.v2_line(),
            "2 123456789012 eni-0a1b2c3d4e5f60718 10.0.1.5 10.0.1.6 49152 443 6 10 840 \
             1700000000 1700000004 ACCEPT OK"
        );
        let mut none = sample();
        none.srcaddr.clear();
        none.log_status = SKIPDATA.into();
        assert_eq!(
            none.v2_line(),
            "2 123456789012 eni-0a1b2c3d4e5f60718 - - - - - - - 1700000000 1700000004 - SKIPDATA"
        );
    }

    #[test]
    fn json_uses_aws_names_in_order_and_round_trips_through_the_api() {
        let r = sample();
        let json = serde_json::to_string(&r).unwrap();
        let keys: Vec<&str> = [
            "version",
            "account-id",
            "interface-id",
            "srcaddr",
            "dstaddr",
            "srcport",
            "dstport",
            "protocol",
            "packets",
            "bytes",
            "start",
            "end",
            "action",
            "log-status",
            "vpc-id",
            "subnet-id",
            "instance-id",
            "tcp-flags",
            "flow-direction",
            "rule",
            "reason",
        ]
        .to_vec();
        let mut at = 0;
        for k in keys {
            let pos = json[at..]
                .find(&format!("\"{k}\":"))
                .unwrap_or_else(|| panic!("{k} missing or out of order in {json}"));
            at += pos;
        }
        let back: FlowRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        let via = FlowRecord::from(&pb::FlowLogRecord::from(&r));
        assert_eq!(via, r);
        assert_eq!(interface_id("i-0a1b2c3d4e5f60718"), "eni-0a1b2c3d4e5f60718");
    }
}
