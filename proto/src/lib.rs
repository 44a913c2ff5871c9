//! The gRPC API of the VPC appliance: generated types and services, plus conversions from the
//! datapath's own types (`dataplane-common`).
//!
//! Services: `VpcService` (VPCs, subnets, route tables), `SecurityService` (security groups,
//! network ACLs), `LoadBalancerService`, `InstanceService`, `VolumeService` and
//! `HostService` (agents), `FlowLogService` (flow logs and their records). Conventions are in `proto/vpc/v1/common.proto`.

/// `vpc.v1`, generated from `proto/vpc/v1/*.proto`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("vpc.v1");
}

/// Adds `authorization: Bearer <token>` to every call of a client: how tenants (the CLI),
/// agents and tests authenticate. Without a token nothing is added (the control plane then
/// answers UNAUTHENTICATED).
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// For `token` (empty: none); fails if the token is not valid header text.
    pub fn new(token: &str) -> Result<Bearer, tonic::metadata::errors::InvalidMetadataValue> {
        if token.is_empty() {
            return Ok(Bearer(None));
        }
        format!("Bearer {token}").parse().map(|v| Bearer(Some(v)))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// The encoded `FileDescriptorSet` of `vpc.v1`, for the gRPC reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("vpc_descriptor");

use dataplane_common as dp;

impl From<dp::DropReason> for v1::DropReason {
    fn from(r: dp::DropReason) -> Self {
        match r {
            dp::DropReason::Truncated => v1::DropReason::Truncated,
            dp::DropReason::MalformedIpv4 => v1::DropReason::MalformedIpv4,
            dp::DropReason::MalformedIpv6 => v1::DropReason::MalformedIpv6,
            dp::DropReason::Ipv6ExtensionChain => v1::DropReason::Ipv6ExtensionChain,
            dp::DropReason::MalformedL4 => v1::DropReason::MalformedL4,
            dp::DropReason::FilterRule => v1::DropReason::FilterRule,
            dp::DropReason::UnknownPort => v1::DropReason::UnknownPort,
            dp::DropReason::SpoofedMac => v1::DropReason::SpoofedMac,
            dp::DropReason::SpoofedIp => v1::DropReason::SpoofedIp,
            dp::DropReason::UnsupportedProtocol => v1::DropReason::UnsupportedProtocol,
            dp::DropReason::ArpUnanswered => v1::DropReason::ArpUnanswered,
            dp::DropReason::NoRoute => v1::DropReason::NoRoute,
            dp::DropReason::NoNeighbor => v1::DropReason::NoNeighbor,
            dp::DropReason::UnknownVtep => v1::DropReason::UnknownVtep,
            dp::DropReason::UnknownVni => v1::DropReason::UnknownVni,
            dp::DropReason::MalformedVxlan => v1::DropReason::MalformedVxlan,
            dp::DropReason::InnerSourceMismatch => v1::DropReason::InnerSourceMismatch,
            dp::DropReason::MtuExceeded => v1::DropReason::MtuExceeded,
            dp::DropReason::NoUnderlayRoute => v1::DropReason::NoUnderlayRoute,
            dp::DropReason::RewriteFailed => v1::DropReason::RewriteFailed,
            dp::DropReason::SgIngress => v1::DropReason::SgIngress,
            dp::DropReason::SgEgress => v1::DropReason::SgEgress,
            dp::DropReason::AclIngress => v1::DropReason::AclIngress,
            dp::DropReason::AclEgress => v1::DropReason::AclEgress,
            dp::DropReason::CtInvalid => v1::DropReason::CtInvalid,
            dp::DropReason::LbNoListener => v1::DropReason::LbNoListener,
            dp::DropReason::LbNoTarget => v1::DropReason::LbNoTarget,
            dp::DropReason::CtBudgetExceeded => v1::DropReason::CtBudgetExceeded,
        }
    }
}

impl From<dp::Hook> for v1::Hook {
    fn from(h: dp::Hook) -> Self {
        match h {
            dp::Hook::Xdp => v1::Hook::Xdp,
            dp::Hook::TcIngress => v1::Hook::TcIngress,
            dp::Hook::TcEgress => v1::Hook::TcEgress,
            dp::Hook::Port => v1::Hook::Port,
        }
    }
}

impl From<dp::Action> for v1::Action {
    fn from(a: dp::Action) -> Self {
        match a {
            dp::Action::Pass => v1::Action::Pass,
            dp::Action::Drop => v1::Action::Drop,
            dp::Action::Aborted => v1::Action::Aborted,
            dp::Action::Redirect => v1::Action::Redirect,
            dp::Action::Encap => v1::Action::Encap,
            dp::Action::Decap => v1::Action::Decap,
            dp::Action::Reply => v1::Action::Reply,
        }
    }
}

impl From<dp::Counter> for v1::Counter {
    fn from(c: dp::Counter) -> Self {
        v1::Counter {
            packets: c.packets,
            bytes: c.bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reason_numbers_and_names_match_the_datapath() {
        for r in dp::DropReason::ALL {
            let api = v1::DropReason::from(r);
            assert_eq!(api as i32, r.as_u32() as i32, "{r:?}");
            let want = format!("DROP_REASON_{}", r.name().to_uppercase());
            assert_eq!(api.as_str_name(), want);
        }
        // Every API value except UNSPECIFIED is a datapath reason.
        let mut n = 1;
        while let Ok(api) = v1::DropReason::try_from(n) {
            assert!(
                dp::DropReason::from_u32(n as u32).is_some(),
                "{api:?} has no datapath reason"
            );
            n += 1;
        }
        assert_eq!(n as usize, dp::DropReason::ALL.len() + 1);
    }

    #[test]
    fn hook_and_action_names_match() {
        for h in dp::Hook::ALL {
            let want = format!("HOOK_{}", h.name().to_uppercase());
            assert_eq!(v1::Hook::from(h).as_str_name(), want);
        }
        for a in dp::Action::ALL {
            let want = format!("ACTION_{}", a.name().to_uppercase());
            assert_eq!(v1::Action::from(a).as_str_name(), want);
        }
    }
}
