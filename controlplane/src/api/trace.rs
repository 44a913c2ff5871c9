//! `TraceService.TracePacket` (`vpc trace`): "why was this dropped?"
//!
//! The control plane resolves the caller's source instance (host, MAC, IP) and destination
//! (an instance, a load balancer's VIP or an address), then asks the source host's agent,
//! over its exec channel ([`super::exec::ExecHub`]: agents dial out, hosts open no port), to
//! run one trace hop: the live port program on a synthetic packet in trace mode. When the
//! packet leaves encapsulated, the hop's output frame goes to the agent of the host behind
//! the outer destination (VTEP), which runs its underlay program on it. Stages of both hops
//! are concatenated; the last hop's verdict is the trace's. Nothing changes connection state.

use std::net::Ipv4Addr;

use tonic::{Request, Response, Status};
use vpc_proto::v1::{self as pb, trace_service_server::TraceService};

use super::{
    Api,
    error::ApiError,
    records::{InstanceRec, LbRec, kind, state},
    validate,
};

/// Time an agent has to run one hop.
const HOP_TIMEOUT_SECONDS: u32 = 5;
/// Hops followed at most (source, destination; a hairpin through a VIP stays on one).
const MAX_HOPS: usize = 3;

/// The service.
#[derive(Clone, Debug)]
pub struct Trace {
    api: Api,
}

impl Trace {
    /// Over the shared API state.
    pub fn new(api: Api) -> Self {
        Trace { api }
    }
}

/// A checked request: protocol name and ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    pub protocol: String,
    pub port: u16,
    pub source_port: u16,
}

/// Validates protocol and ports (pure).
pub fn check(req: &pb::TracePacketRequest) -> Result<Checked, ApiError> {
    let protocol = req.protocol.to_ascii_lowercase();
    let with_ports = match protocol.as_str() {
        "tcp" | "udp" => true,
        "icmp" => false,
        _ => return Err(ApiError::invalid("protocol", "tcp, udp or icmp")),
    };
    let port = |field: &str, p: u32| {
        u16::try_from(p).map_err(|_| ApiError::invalid(field, format!("{p}: at most 65535")))
    };
    let (port, source_port) = if with_ports {
        let dport = port("port", req.port)?;
        if dport == 0 {
            return Err(ApiError::invalid(
                "port",
                format!("required for {protocol} (1-65535)"),
            ));
        }
        let sport = match port("source_port", req.source_port)? {
            // An ephemeral port (Linux's default range).
            0 => 32768 + (rand_u16() % 28232),
            p => p,
        };
        (dport, sport)
    } else {
        if req.port != 0 || req.source_port != 0 {
            return Err(ApiError::invalid("port", "icmp has no ports"));
        }
        (0, 0)
    };
    Ok(Checked {
        protocol,
        port,
        source_port,
    })
}

fn rand_u16() -> u16 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    u16::from_le_bytes(b)
}

/// The hops' results joined into the response (pure): stages in order, the last hop's
/// verdict; an "encapsulated" last hop (no next host answered) stays as it is.
pub fn join(hops: &[pb::TraceHopResult], packet: String) -> pb::TracePacketResponse {
    let mut out = pb::TracePacketResponse {
        packet,
        ..Default::default()
    };
    for h in hops {
        out.stages.extend(h.stages.iter().cloned());
    }
    if let Some(last) = hops.last() {
        out.verdict = last.verdict.clone();
        out.drop_reason = last.drop_reason.clone();
        out.delivered_to = last.delivered_to.clone();
        if last.verdict == "dropped" {
            out.drop_host_id = last
                .stages
                .last()
                .map(|s| s.host_id.clone())
                .unwrap_or_default();
        }
    }
    out
}

impl Trace {
    /// Runs one hop on `host`.
    async fn hop(&self, host: &str, hop: pb::TraceHop) -> Result<pb::TraceHopResult, ApiError> {
        let r = self
            .api
            .exec
            .run(
                host,
                pb::ExecCommand {
                    timeout_seconds: HOP_TIMEOUT_SECONDS,
                    trace: Some(hop),
                    ..Default::default()
                },
            )
            .await?;
        if !r.error.is_empty() {
            return Err(ApiError::Unavailable(format!("host {host}: {}", r.error)));
        }
        let result = r.trace.ok_or_else(|| {
            ApiError::Precondition(format!(
                "host {host}'s agent does not support packet traces (upgrade it)"
            ))
        })?;
        if result.verdict == "error" {
            // The host cannot run this trace (no such port, no trace support): not transient.
            return Err(ApiError::Precondition(format!(
                "host {host}: {}",
                result.drop_reason
            )));
        }
        Ok(result)
    }
}

#[tonic::async_trait]
impl TraceService for Trace {
    async fn trace_packet(
        &self,
        r: Request<pb::TracePacketRequest>,
    ) -> Result<Response<pb::TracePacketResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let req = r.into_inner();
        let from = validate::id("from_instance_id", kind::INSTANCE, &req.from_instance_id)?;
        let checked = check(&req)?;
        if req.to.is_empty() {
            return Err(ApiError::invalid(
                "to",
                "an instance id, a load balancer id or VIP, or an IPv4 address",
            )
            .into());
        }
        let tx = self.api.read(&account).await?;
        let src: InstanceRec = tx.must(kind::INSTANCE, "instance", &from).await?;
        if src.state != state::RUNNING {
            return Err(ApiError::Precondition(format!(
                "instance {from} is {}; a trace needs it running (IncorrectInstanceState)",
                src.state
            ))
            .into());
        }
        // The destination, within the caller's account.
        let dst_ip: Ipv4Addr = if req.to.starts_with("i-") {
            let id = validate::id("to", kind::INSTANCE, &req.to)?;
            let d: InstanceRec = tx.must(kind::INSTANCE, "instance", &id).await?;
            d.ip
        } else if req.to.starts_with("lb-") {
            let id = validate::id("to", kind::LB, &req.to)?;
            let lb: LbRec = tx.must(kind::LB, "load balancer", &id).await?;
            lb.vip
        } else {
            validate::ipv4("to", &req.to)?
        };
        let packet = match checked.protocol.as_str() {
            "icmp" => format!("icmp echo {} -> {dst_ip}", src.ip),
            p => format!(
                "{p} {}:{} -> {dst_ip}:{}",
                src.ip, checked.source_port, checked.port
            ),
        };
        let mut hops = vec![
            self.hop(
                &src.host,
                pb::TraceHop {
                    instance_id: src.meta.id.clone(),
                    src_mac: src.mac.clone(),
                    // The agent's router MAC.
                    dst_mac: String::new(),
                    src_ip: src.ip.to_string(),
                    dst_ip: dst_ip.to_string(),
                    protocol: checked.protocol.clone(),
                    src_port: u32::from(checked.source_port),
                    dst_port: u32::from(checked.port),
                    underlay_frame: Vec::new(),
                },
            )
            .await?,
        ];
        while hops.len() < MAX_HOPS {
            let last = hops.last().expect("one hop at least");
            if last.verdict != "encapsulated" {
                break;
            }
            let vtep: Ipv4Addr = last.next_vtep.parse().map_err(|_| {
                ApiError::Internal(format!("a hop gave no next VTEP ({:?})", last.next_vtep))
            })?;
            let next = {
                let d = self.api.desired.borrow();
                d.hosts
                    .iter()
                    .find(|h| h.vtep == vtep)
                    .map(|h| h.id.clone())
            };
            let Some(next) = next else {
                break;
            };
            let frame = last.frame_out.clone();
            hops.push(
                self.hop(
                    &next,
                    pb::TraceHop {
                        underlay_frame: frame,
                        ..Default::default()
                    },
                )
                .await?,
            );
        }
        Ok(Response::new(join(&hops, packet)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(protocol: &str, port: u32, source_port: u32) -> pb::TracePacketRequest {
        pb::TracePacketRequest {
            from_instance_id: "i-0123456789abcdef0".into(),
            to: "10.0.0.5".into(),
            protocol: protocol.into(),
            port,
            source_port,
        }
    }

    #[test]
    fn requests_are_checked() {
        assert_eq!(
            check(&req("TCP", 443, 40000)).unwrap(),
            Checked {
                protocol: "tcp".into(),
                port: 443,
                source_port: 40000
            }
        );
        let eph = check(&req("udp", 53, 0)).unwrap();
        assert!((32768..61000).contains(&eph.source_port), "{eph:?}");
        assert_eq!(check(&req("icmp", 0, 0)).unwrap().port, 0);
        for bad in [
            req("sctp", 1, 0),
            req("tcp", 0, 0),
            req("tcp", 70000, 0),
            req("udp", 53, 70000),
            req("icmp", 8, 0),
        ] {
            assert!(check(&bad).is_err(), "{bad:?}");
        }
    }

    fn stage(host: &str, name: &str) -> pb::TraceStageResult {
        pb::TraceStageResult {
            host_id: host.into(),
            stage: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn hops_join_in_order_with_the_last_verdict() {
        let first = pb::TraceHopResult {
            stages: vec![stage("h1", "endpoint"), stage("h1", "encap")],
            verdict: "encapsulated".into(),
            next_vtep: "192.0.2.2".into(),
            ..Default::default()
        };
        let second = pb::TraceHopResult {
            stages: vec![stage("h2", "sg_ingress"), stage("h2", "verdict")],
            verdict: "dropped".into(),
            drop_reason: "sg_ingress".into(),
            ..Default::default()
        };
        let r = join(&[first.clone(), second], "tcp".into());
        assert_eq!(r.stages.len(), 4);
        assert_eq!(
            (
                r.verdict.as_str(),
                r.drop_reason.as_str(),
                r.drop_host_id.as_str()
            ),
            ("dropped", "sg_ingress", "h2")
        );
        let one = join(&[first], String::new());
        assert_eq!(
            (one.verdict.as_str(), one.drop_host_id.as_str()),
            ("encapsulated", "")
        );
    }
}
