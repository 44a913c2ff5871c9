//! The control plane's metrics, read at scrape time from what it already keeps: the store
//! revision, the desired-state document's revision, hosts as this replica sees them
//! (connected, applied revision, lag, conntrack and target health from their last reports),
//! network programming latency, and API latency (the [`ApiMetrics`] layer).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use super::{Exposition, Kind, grpc::ApiMetrics};
use crate::api::{Api, programming::HostLive};

/// VNI -> VPC id, from the desired-state document of one revision.
type VpcNames = Arc<BTreeMap<u32, String>>;

/// The control plane's collector.
#[derive(Debug)]
pub struct ControlPlaneMetrics {
    api: Api,
    calls: Arc<ApiMetrics>,
    /// VPC names of the last document read (parsed again only when its revision changes).
    names: Mutex<(i64, VpcNames)>,
}

/// Just the VPCs of the desired-state document.
#[derive(serde::Deserialize)]
struct VpcsOnly {
    #[serde(default)]
    vpcs: Vec<crate::overlay::statefile::VpcDoc>,
}

impl ControlPlaneMetrics {
    /// Over the API state and the API call histograms.
    pub fn new(api: Api, calls: Arc<ApiMetrics>) -> Self {
        ControlPlaneMetrics {
            api,
            calls,
            names: Mutex::new((-1, Arc::default())),
        }
    }

    fn vpc_names(&self) -> VpcNames {
        let d = self.api.desired.borrow().clone();
        let mut g = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 != d.revision {
            let names = serde_json::from_slice::<VpcsOnly>(&d.document)
                .map(|v| v.vpcs.into_iter().map(|v| (v.vni, v.id)).collect())
                .unwrap_or_default();
            *g = (d.revision, Arc::new(names));
        }
        Arc::clone(&g.1)
    }

    /// One scrape.
    pub async fn render(&self) -> String {
        let mut e = Exposition::new();
        let store_revision = self.api.store.revision().await;
        let desired_revision = self.api.desired.borrow().revision;
        let registered: Vec<String> = self
            .api
            .desired
            .borrow()
            .hosts
            .iter()
            .map(|h| h.id.clone())
            .collect();
        e.gauge(
            "vpc_store_up",
            "1 when the store answered this scrape",
            &[],
            if store_revision.is_ok() { 1.0 } else { 0.0 },
        );
        if let Ok(rev) = &store_revision {
            e.gauge(
                "vpc_store_revision",
                "The store's current revision (every acknowledged write moves it)",
                &[],
                *rev as f64,
            );
        }
        e.gauge(
            "vpc_desired_state_revision",
            "Store revision of the desired-state document streamed to the agents",
            &[],
            desired_revision as f64,
        );
        e.histogram(
            "vpc_programming_latency_seconds",
            "Network programming latency: an API write acknowledged -> applied on every connected host",
            &[],
            &self.api.programming.histogram(),
        );
        let live = self.api.programming.hosts();
        let names = self.vpc_names();
        let mut hosts: BTreeMap<&str, HostLive> = registered
            .iter()
            .map(|h| (h.as_str(), live.get(h).cloned().unwrap_or_default()))
            .collect();
        for (id, h) in &live {
            hosts.entry(id.as_str()).or_insert_with(|| h.clone());
        }
        host_families(&mut e, &hosts, store_revision.ok(), &names);
        self.calls.collect(&mut e);
        e.render()
    }
}

/// Per-host families: liveness, revisions, conntrack and target health from the last
/// reports. Pure.
pub fn host_families(
    e: &mut Exposition,
    hosts: &BTreeMap<&str, HostLive>,
    store_revision: Option<i64>,
    vpc_names: &BTreeMap<u32, String>,
) {
    const CONNECTED: &str = "vpc_host_connected";
    const APPLIED: &str = "vpc_host_applied_revision";
    const LAG: &str = "vpc_host_revision_lag";
    const CT: &str = "vpc_host_conntrack_entries";
    const CT_CAP: &str = "vpc_host_conntrack_capacity";
    const CT_VPC: &str = "vpc_conntrack_vpc_entries";
    const CT_VPC_HELP: &str =
        "Live tracked flows per VPC and host, from the host's last conntrack GC report";
    e.declare(CT_VPC, CT_VPC_HELP, Kind::Gauge);
    super::declare_target_health(e);
    for (host, h) in hosts {
        let l = [("host", *host)];
        let connected = h.streams > 0;
        e.gauge(
            CONNECTED,
            "1 while the host's agent watches its desired state on this replica",
            &l,
            if connected { 1.0 } else { 0.0 },
        );
        e.gauge(
            APPLIED,
            "Highest store revision the host reported applied",
            &l,
            h.applied as f64,
        );
        if let Some(rev) = store_revision {
            e.gauge(
                LAG,
                "Store revision minus the host's applied revision (revisions not yet applied)",
                &l,
                (rev - h.applied).max(0) as f64,
            );
        }
        if let Some(ct) = &h.conntrack {
            e.gauge(
                CT,
                "Entries in the host's conntrack table at its last GC",
                &l,
                ct.entries as f64,
            );
            e.gauge(
                CT_CAP,
                "Capacity of the host's conntrack table",
                &l,
                ct.capacity as f64,
            );
            for f in &ct.per_vni {
                let vni = f.vni.to_string();
                let vpc = vpc_names.get(&f.vni).map_or("", String::as_str);
                e.gauge_add(
                    CT_VPC,
                    CT_VPC_HELP,
                    &[("host", host), ("vpc", vpc), ("vni", &vni)],
                    f.flows as f64,
                );
            }
        }
        for t in &h.target_health {
            super::target_health(e, &[("host", *host)], t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpc_proto::v1 as pb;

    #[test]
    fn hosts_report_liveness_lag_conntrack_and_health() {
        let mut hosts = BTreeMap::new();
        hosts.insert(
            "host-0",
            HostLive {
                streams: 1,
                applied: 40,
                conntrack: Some(pb::ConntrackSummary {
                    entries: 5,
                    capacity: 100,
                    per_vni: vec![pb::VniFlows {
                        vni: 7,
                        flows: 3,
                        vpc_id: String::new(),
                        ..Default::default()
                    }],
                }),
                target_health: vec![pb::TargetHealthReport {
                    target_group_id: "tg-1".into(),
                    target_id: "i-1".into(),
                    port: 80,
                    state: "healthy".into(),
                    reason: String::new(),
                }],
                ..HostLive::default()
            },
        );
        hosts.insert("host-1", HostLive::default());
        let names = BTreeMap::from([(7, "vpc-7".to_owned())]);
        let mut e = Exposition::new();
        host_families(&mut e, &hosts, Some(42), &names);
        let text = e.render();
        for line in [
            "vpc_host_connected{host=\"host-0\"} 1",
            "vpc_host_connected{host=\"host-1\"} 0",
            "vpc_host_revision_lag{host=\"host-0\"} 2",
            "vpc_host_revision_lag{host=\"host-1\"} 42",
            "vpc_conntrack_vpc_entries{host=\"host-0\",vpc=\"vpc-7\",vni=\"7\"} 3",
            "vpc_host_conntrack_capacity{host=\"host-0\"} 100",
            "vpc_lb_target_healthy{host=\"host-0\",target_group=\"tg-1\",target=\"i-1\",port=\"80\"} 1",
            "vpc_lb_target_state{host=\"host-0\",target_group=\"tg-1\",target=\"i-1\",port=\"80\",state=\"healthy\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
