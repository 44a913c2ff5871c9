//! Mutual TLS on the real control plane: `vpc-controlplane --tls-cert --tls-key
//! --tls-client-ca` in a fresh namespace on 127.0.0.1, with a CA, a server certificate (SAN
//! IP 127.0.0.1) and client certificates made by rcgen for this run.
//!
//! Checks: a client that trusts the CA and presents a certificate of that CA creates and
//! reads a VPC; a client without a certificate, a client with a certificate of another CA,
//! a client that does not trust the server's CA and a plain-HTTP client are all refused (at
//! the handshake or on the first call).

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use vpc_proto::v1::{
    self as pb, host_service_client::HostServiceClient, vpc_service_client::VpcServiceClient,
};
use vpc_tests::cluster::{
    AGENT_TOKEN, Bearer, ControlPlane, TOKEN_A, TempDir, channel, connect_in, write_credentials,
};
use vpc_tests::netns::{BpffsDir, NetNs};
use vpc_tests::procs::Agent;

/// Longest wait for one attempt (connect and a call) that is expected to fail.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);

/// A CA: its certificate (PEM) and what signs with it.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Result<Ca> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A leaf certificate and key (PEM) for `sans` with `usage`.
    fn leaf(
        &self,
        name: &str,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A TLS channel to `addr` (as `https://addr`, server name 127.0.0.1) with `tls`, whose
/// connections are made from the network namespace at `netns`.
async fn tls_channel(
    netns: &Path,
    addr: SocketAddr,
    tls: ClientTlsConfig,
    token: &str,
) -> Result<InterceptedService<Channel, Bearer>> {
    let netns = netns.to_owned();
    let connector =
        tower::service_fn(move |_: tonic::transport::Uri| connect_in(netns.clone(), addr));
    let ch = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls.domain_name("127.0.0.1"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("connecting to https://{addr}"))?;
    Ok(InterceptedService::new(ch, Bearer::new(token)?))
}

/// Connects with `tls` and creates a VPC: the VPC, or the error (connect or call).
async fn create_vpc(
    netns: &Path,
    addr: SocketAddr,
    tls: ClientTlsConfig,
    cidr: &str,
) -> Result<pb::Vpc> {
    let attempt = async {
        let mut vpcs = VpcServiceClient::new(tls_channel(netns, addr, tls, TOKEN_A).await?);
        let r = vpcs
            .create_vpc(pb::CreateVpcRequest {
                cidr_block: cidr.into(),
                ..Default::default()
            })
            .await?;
        r.into_inner().vpc.context("no VPC in the response")
    };
    tokio::time::timeout(ATTEMPT_TIMEOUT, attempt)
        .await
        .context("the attempt hung")?
}

/// Asserts that the attempt failed, and returns its error for the log.
fn refused(case: &str, got: Result<pb::Vpc>) -> Result<String> {
    match got {
        Ok(v) => bail!("{case}: expected to be refused, created {}", v.vpc_id),
        Err(e) => {
            let text = format!("{e:#}");
            ensure!(
                !text.contains("the attempt hung"),
                "{case}: hung instead of failing"
            );
            eprintln!("{case}: refused as expected: {text}");
            Ok(text)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_clients_of_the_ca() -> Result<()> {
    let ns = NetNs::new("tls")?;
    ns.link_up("lo")?;
    let dir = TempDir::new("tls")?;
    let ca = Ca::new("vpc test CA")?;
    let other_ca = Ca::new("some other CA")?;
    let (server_cert, server_key) = ca.leaf(
        "vpc-controlplane",
        &["127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_cert, client_key) =
        ca.leaf("tenant-a", &[], ExtendedKeyUsagePurpose::ClientAuth)?;
    let (stranger_cert, stranger_key) =
        other_ca.leaf("stranger", &[], ExtendedKeyUsagePurpose::ClientAuth)?;
    let write = |name: &str, text: &str| -> Result<String> {
        let p = dir.path().join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        Ok(p.display().to_string())
    };
    let creds = dir.path().join("credentials.json");
    write_credentials(&creds)?;
    let args = vec![
        "--store".to_owned(),
        "mem".into(),
        "--credentials".into(),
        creds.display().to_string(),
        "--tls-cert".into(),
        write("server.pem", &server_cert)?,
        "--tls-key".into(),
        write("server.key", &server_key)?,
        "--tls-client-ca".into(),
        write("ca.pem", &ca.pem)?,
    ];
    let cp = ControlPlane::start(&ns, "127.0.0.1:0", &args)?;
    let addr: SocketAddr = cp
        .url
        .trim_start_matches("http://")
        .parse()
        .context("control-plane address")?;
    let netns = ns.path();
    let trusts_ca = || ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem));

    // A client of the CA that trusts the CA: served.
    let good = trusts_ca().identity(Identity::from_pem(&client_cert, &client_key));
    let vpc = create_vpc(&netns, addr, good.clone(), "10.0.0.0/16")
        .await
        .context("a client with the CA's certificate")?;
    ensure!(vpc.vpc_id.starts_with("vpc-") && vpc.cidr_block == "10.0.0.0/16");
    let mut vpcs = VpcServiceClient::new(tls_channel(&netns, addr, good, TOKEN_A).await?);
    let listed = vpcs
        .describe_vpcs(pb::DescribeVpcsRequest {
            vpc_ids: vec![vpc.vpc_id.clone()],
            ..Default::default()
        })
        .await?
        .into_inner()
        .vpcs;
    ensure!(listed.len() == 1 && listed[0].vpc_id == vpc.vpc_id);

    // No client certificate: refused.
    refused(
        "no client certificate",
        create_vpc(&netns, addr, trusts_ca(), "10.1.0.0/16").await,
    )?;
    // A certificate of another CA: refused.
    refused(
        "client certificate of another CA",
        create_vpc(
            &netns,
            addr,
            trusts_ca().identity(Identity::from_pem(&stranger_cert, &stranger_key)),
            "10.2.0.0/16",
        )
        .await,
    )?;
    // A client that does not trust the server's CA (it trusts another one): it refuses the
    // server.
    let text = refused(
        "client does not trust the CA",
        create_vpc(
            &netns,
            addr,
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&other_ca.pem))
                .identity(Identity::from_pem(&client_cert, &client_key)),
            "10.3.0.0/16",
        )
        .await,
    )?;
    ensure!(
        text.to_lowercase().contains("certificate") || text.contains("connect"),
        "the client's refusal should be about the certificate: {text}"
    );
    // Plain HTTP/2 to the TLS port: refused.
    let plain = tokio::time::timeout(ATTEMPT_TIMEOUT, async {
        let mut c = VpcServiceClient::new(channel(&netns, &cp.url, TOKEN_A).await?);
        c.describe_vpcs(pb::DescribeVpcsRequest::default()).await?;
        anyhow::Ok(())
    })
    .await;
    ensure!(
        !matches!(plain, Ok(Ok(()))),
        "a plain-HTTP client was served by the TLS server"
    );

    // The refusals created nothing; the server still serves good clients.
    let good = trusts_ca().identity(Identity::from_pem(&client_cert, &client_key));
    let mut vpcs = VpcServiceClient::new(tls_channel(&netns, addr, good, TOKEN_A).await?);
    let all = vpcs
        .describe_vpcs(pb::DescribeVpcsRequest::default())
        .await?
        .into_inner()
        .vpcs;
    ensure!(
        all.len() == 1,
        "expected only the first VPC, found {}",
        all.len()
    );

    // A host agent over mutual TLS registers, watches and applies; one without a client
    // certificate never gets in.
    ns.ip(&["link", "add", "ul0", "type", "veth", "peer", "name", "ul0p"])?;
    ns.link_up("ul0p")?;
    ns.link_up("ul0")?;
    ns.add_addr("ul0", "10.250.0.1/24")?;
    ns.ip(&["link", "add", "ul1", "type", "veth", "peer", "name", "ul1p"])?;
    ns.link_up("ul1p")?;
    ns.link_up("ul1")?;
    ns.add_addr("ul1", "10.250.1.1/24")?;
    let (agent_cert, agent_key) = ca.leaf("agent", &[], ExtendedKeyUsagePurpose::ClientAuth)?;
    let (agent_cert, agent_key) = (
        write("agent.pem", &agent_cert)?,
        write("agent.key", &agent_key)?,
    );
    let ca_file = dir.path().join("ca.pem").display().to_string();
    let url = format!("https://{addr}");
    let pins = BpffsDir::new("tlsag")?;
    // The agents' compute and storage state stays in the test's directory and cgroups of
    // its own (removed at the end, also on failure).
    let cgroup = vpc_tests::netns::unique_name("tlscg");
    let _cgroups = CgroupDirs(vec![format!("{cgroup}-a"), format!("{cgroup}-b")]);
    let data = dir.path().display().to_string();
    let agent_args = |host: &str, with_cert: bool| -> Vec<String> {
        let cg = if with_cert {
            format!("{cgroup}-a")
        } else {
            format!("{cgroup}-b")
        };
        let mut a: Vec<String> = [
            "--data-dir",
            &format!("{data}/{host}"),
            "--snapshot-dir",
            &format!("{data}/snapshots"),
            "--cgroup-name",
            &cg,
            "--host",
            host,
            "--control-plane",
            &url,
            "--agent-token",
            AGENT_TOKEN,
            "--tls-ca",
            &ca_file,
            "--xdp-mode",
            "off",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if with_cert {
            a.extend([
                "--tls-cert".to_owned(),
                agent_cert.clone(),
                "--tls-key".into(),
                agent_key.clone(),
            ]);
        }
        a
    };
    let args = agent_args("tls-host", true);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _agent = Agent::start_with(&ns, pins.path(), &["ul0"], &args)?;
    let pins2 = BpffsDir::new("tlsag2")?;
    let args2 = agent_args("tls-nocert", false);
    let args2: Vec<&str> = args2.iter().map(String::as_str).collect();
    let _agent2 = Agent::start_with(&ns, pins2.path(), &["ul1"], &args2)?;
    let agent_tls = trusts_ca().identity(Identity::from_pem(&client_cert, &client_key));
    let mut hosts =
        HostServiceClient::new(tls_channel(&netns, addr, agent_tls, AGENT_TOKEN).await?);
    let start = std::time::Instant::now();
    loop {
        let r = hosts
            .describe_hosts(pb::DescribeHostsRequest {})
            .await?
            .into_inner();
        let me = r.hosts.iter().find(|h| h.host_id == "tls-host");
        if me.is_some_and(|h| {
            h.connected && h.applied_revision >= r.revision && h.last_error.is_empty()
        }) {
            ensure!(
                r.hosts.iter().all(|h| h.host_id != "tls-nocert"),
                "an agent without a client certificate registered: {r:?}"
            );
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "the agent over mutual TLS did not apply: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    drop(cp);
    Ok(())
}

/// Removes the agents' per-host cgroup directories (empty once their instances are gone).
struct CgroupDirs(Vec<String>);

impl Drop for CgroupDirs {
    fn drop(&mut self) {
        let Ok(ctls) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for ctl in ctls.flatten() {
            for name in &self.0 {
                let _ = std::fs::remove_dir(ctl.path().join(name));
            }
        }
    }
}
