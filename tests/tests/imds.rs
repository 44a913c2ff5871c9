//! Tier 3: the instance metadata service (`controlplane::compute::imds`) against the kernel.
//! Two "instances" (namespaces with a dummy `eth0`) hold the same address, as two tenants'
//! instances with overlapping VPCs would; each must get its own metadata from
//! 169.254.169.254. The agent side runs on a multi-thread tokio runtime in the test's own
//! namespace (the device setup enters the instance's namespace on a thread of its own). Needs
//! root; curl is the client, plus a small Rust client for the measurements.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use controlplane::compute::imds::{IMDS_IFNAME, Imds, InstanceMetadata};
use vpc_tests::netns::NetNs;

const IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 4);

/// An instance's namespace: `eth0` with 10.0.1.4/24, up (one end of a veth pair whose other
/// end, `peer0`, is in the same namespace and up: the kernel may lack the dummy driver).
/// Deleted on drop.
fn instance_ns(tag: &str) -> NetNs {
    let ns = NetNs::new(tag).unwrap();
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
    ])
    .unwrap();
    ns.add_addr("eth0", "10.0.1.4/24").unwrap();
    ns.link_up("peer0").unwrap();
    ns.link_up("eth0").unwrap();
    ns
}

fn meta(id: &str, groups: &[&str], user_data: Option<&[u8]>) -> InstanceMetadata {
    InstanceMetadata {
        instance_id: id.into(),
        instance_type: "t3.micro".into(),
        account_id: "123456789012".into(),
        local_ipv4: IP,
        mac: "02:00:0a:00:01:04".into(),
        hostname: "ip-10-0-1-4".into(),
        security_groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        security_group_ids: groups.iter().map(|g| format!("sg-{g}")).collect(),
        subnet_id: "subnet-1".into(),
        subnet_cidr: "10.0.1.0/24".into(),
        vpc_id: "vpc-1".into(),
        vpc_cidr: "10.0.0.0/16".into(),
        availability_zone: "local-1a".into(),
        host_id: "host-1".into(),
        launch_time: "2025-01-02T03:04:05Z".into(),
        user_data: user_data.map(<[u8]>::to_vec),
    }
}

/// `curl -s --max-time 5 ARGS... http://169.254.169.254PATH` in `ns`: (exit code, stdout).
fn curl(ns: &NetNs, path: &str, args: &[&str]) -> (i32, Vec<u8>) {
    let url = format!("http://169.254.169.254{path}");
    let mut all = vec!["-s", "--max-time", "5"];
    all.extend_from_slice(args);
    all.push(&url);
    let out = ns.exec_unchecked("curl", &all).unwrap();
    (out.status.code().unwrap_or(-1), out.stdout)
}

/// GET `path`: the body, expecting success.
fn get(ns: &NetNs, path: &str) -> String {
    let (code, body) = curl(ns, path, &["-f"]);
    assert_eq!(code, 0, "curl {path} in {}", ns.name());
    String::from_utf8(body).unwrap()
}

/// The status code of a request.
fn status(ns: &NetNs, path: &str, args: &[&str]) -> String {
    let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    all.extend_from_slice(args);
    String::from_utf8(curl(ns, path, &all).1).unwrap()
}

/// One request on a new connection from the calling thread's namespace; the whole response.
fn raw_request(request: &[u8]) -> std::io::Result<Vec<u8>> {
    let addr = SocketAddr::from((Ipv4Addr::new(169, 254, 169, 254), 80));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// Sequential requests for `duration` (at most `max`) from one thread in `ns`: requests per
/// second and the latencies, sorted.
fn measure(ns: &NetNs, duration: Duration, max: usize) -> (f64, Vec<Duration>) {
    ns.run(|| {
        let req = b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n";
        let start = Instant::now();
        let mut lat = Vec::new();
        while start.elapsed() < duration && lat.len() < max {
            let t = Instant::now();
            let resp = raw_request(req).unwrap();
            lat.push(t.elapsed());
            assert!(resp.starts_with(b"HTTP/1.1 200 OK"), "{resp:?}");
        }
        let rps = lat.len() as f64 / start.elapsed().as_secs_f64();
        lat.sort();
        (rps, lat)
    })
}

fn pct(lat: &[Duration], p: f64) -> Duration {
    lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)]
}

#[test]
fn imds_serves_each_instance_its_own_metadata() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let a = instance_ns("imdsa");
    let b = instance_ns("imdsb");
    let path_a = a.path();
    let path_b = b.path();
    let meta_a = meta(
        "i-aaaaaaaaaaaaaaaaa",
        &["default"],
        Some(b"#!/bin/sh\necho a\n"),
    );
    let meta_b = meta("i-bbbbbbbbbbbbbbbbb", &["web", "db"], None);

    let imds = Imds::new();
    assert!(
        rt.block_on(imds.ensure(&path_a, IP, meta_a.clone()))
            .unwrap()
    );
    assert!(
        rt.block_on(imds.ensure(&path_b, IP, meta_b.clone()))
            .unwrap()
    );
    assert_eq!(
        imds.served(),
        vec!["i-aaaaaaaaaaaaaaaaa", "i-bbbbbbbbbbbbbbbbb"]
    );
    // The device and the route, in each namespace.
    for ns in [&a, &b] {
        let route = ns.ip(&["route", "get", "169.254.169.254"]).unwrap();
        assert!(
            route.contains(&format!("dev {IMDS_IFNAME} src 10.0.1.4")),
            "{route}"
        );
    }

    // Same address, each its own answer.
    assert_eq!(
        get(&a, "/latest/meta-data/instance-id"),
        "i-aaaaaaaaaaaaaaaaa"
    );
    assert_eq!(
        get(&b, "/latest/meta-data/instance-id"),
        "i-bbbbbbbbbbbbbbbbb"
    );
    assert_eq!(get(&b, "/latest/meta-data/security-groups"), "web\ndb");
    assert_eq!(get(&a, "/latest/meta-data/local-ipv4"), "10.0.1.4");
    assert_eq!(get(&a, "/"), "latest");
    assert_eq!(get(&a, "/latest/"), "dynamic\nmeta-data\nuser-data");
    assert_eq!(
        get(&a, "/latest/meta-data/network/interfaces/macs/"),
        "02:00:0a:00:01:04/"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&get(&b, "/latest/dynamic/instance-identity/document")).unwrap();
    assert_eq!(doc["instanceId"], "i-bbbbbbbbbbbbbbbbb");
    assert_eq!(doc["privateIp"], "10.0.1.4");

    // User data: raw, or 404.
    assert_eq!(get(&a, "/latest/user-data"), "#!/bin/sh\necho a\n");
    assert_eq!(status(&b, "/latest/user-data", &[]), "404");
    assert_eq!(status(&a, "/latest/nope", &[]), "404");
    assert_eq!(status(&a, "/latest/meta-data/", &["-X", "POST"]), "405");
    // wget as well (HTTP/1.1 with its own headers).
    let out = a
        .exec_ok(
            "wget",
            [
                "-q",
                "-O",
                "-",
                "-T",
                "5",
                "http://169.254.169.254/latest/meta-data/hostname",
            ],
        )
        .unwrap();
    assert_eq!(out, "ip-10-0-1-4");

    // IMDSv2.
    let (code, token) = curl(
        &a,
        "/latest/api/token",
        &[
            "-f",
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 60",
        ],
    );
    assert_eq!(code, 0);
    let token = String::from_utf8(token).unwrap();
    assert!(!token.is_empty());
    let with = format!("X-aws-ec2-metadata-token: {token}");
    let (code, id) = curl(&a, "/latest/meta-data/instance-id", &["-f", "-H", &with]);
    assert_eq!((code, id.as_slice()), (0, &b"i-aaaaaaaaaaaaaaaaa"[..]));
    // The token is a's: b does not know it.
    assert_eq!(
        status(&b, "/latest/meta-data/instance-id", &["-H", &with]),
        "401"
    );
    assert_eq!(
        status(
            &a,
            "/latest/meta-data/instance-id",
            &["-H", "X-aws-ec2-metadata-token: bogus"]
        ),
        "401"
    );
    assert_eq!(
        status(
            &a,
            "/latest/api/token",
            &["-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 0"]
        ),
        "400"
    );
    assert_eq!(status(&a, "/latest/api/token", &["-X", "PUT"]), "400");

    // Malformed and oversized requests: 400, and the server goes on.
    a.run(|| {
        let resp = raw_request(b"NONSENSE\r\n\r\n").unwrap();
        assert!(resp.starts_with(b"HTTP/1.1 400 "), "{resp:?}");
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(20_000, b'a');
        // The server may reset while the client is still sending: either way, no answer but 400.
        if let Ok(resp) = raw_request(&big) {
            assert!(
                resp.is_empty() || resp.starts_with(b"HTTP/1.1 400 "),
                "{resp:?}"
            );
        }
        let resp = raw_request(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(resp.ends_with(b"\r\n\r\nlatest"), "{resp:?}");
    });

    // 20 in a row, then 16 at once.
    for _ in 0..20 {
        assert_eq!(
            get(&b, "/latest/meta-data/instance-id"),
            "i-bbbbbbbbbbbbbbbbb"
        );
    }
    thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| s.spawn(|| get(&a, "/latest/meta-data/instance-id")))
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), "i-aaaaaaaaaaaaaaaaa");
        }
    });

    // Ensure again: idempotent; a metadata change is served at once.
    assert!(
        !rt.block_on(imds.ensure(&path_a, IP, meta_a.clone()))
            .unwrap()
    );
    let mut changed = meta_a.clone();
    changed.security_groups = vec!["default".into(), "ssh".into()];
    assert!(!rt.block_on(imds.ensure(&path_a, IP, changed)).unwrap());
    assert_eq!(get(&a, "/latest/meta-data/security-groups"), "default\nssh");

    // Measurements: sequential requests from a Rust client in the instance's namespace.
    let (rps, lat) = measure(&a, Duration::from_secs(3), 20_000);
    eprintln!(
        "imds: {} sequential requests: {rps:.0} req/s, latency p50 {:?} p99 {:?} max {:?}",
        lat.len(),
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        lat[lat.len() - 1]
    );
    // Concurrent: 8 client threads for 2 s.
    let start = Instant::now();
    let total: usize = a.run(|| {
        thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        let mut n = 0;
                        while start.elapsed() < Duration::from_secs(2) {
                            let r =
                                raw_request(b"GET /latest/meta-data/mac HTTP/1.1\r\n\r\n").unwrap();
                            assert!(r.starts_with(b"HTTP/1.1 200 OK"));
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        })
    });
    eprintln!(
        "imds: 8 concurrent clients: {:.0} req/s",
        total as f64 / start.elapsed().as_secs_f64()
    );
    // The other instance is still fine.
    assert_eq!(
        get(&b, "/latest/meta-data/instance-id"),
        "i-bbbbbbbbbbbbbbbbb"
    );

    // Remove: the device and the route go, requests fail.
    assert!(rt.block_on(imds.remove("i-aaaaaaaaaaaaaaaaa")));
    assert!(!rt.block_on(imds.remove("i-aaaaaaaaaaaaaaaaa")));
    assert_eq!(imds.served(), vec!["i-bbbbbbbbbbbbbbbbb"]);
    assert_ne!(curl(&a, "/latest/meta-data/instance-id", &[]).0, 0);
    assert!(a.ip(&["link", "show", "dev", IMDS_IFNAME]).is_err());
    assert_eq!(
        get(&b, "/latest/meta-data/instance-id"),
        "i-bbbbbbbbbbbbbbbbb"
    );

    // An agent restart: the old servers stop, a new agent takes over (deleting any device the
    // old one has not released yet).
    drop(imds);
    let imds = Imds::new();
    assert!(
        rt.block_on(imds.ensure(&path_a, IP, meta_a.clone()))
            .unwrap()
    );
    assert!(
        rt.block_on(imds.ensure(&path_b, IP, meta_b.clone()))
            .unwrap()
    );
    assert_eq!(
        get(&a, "/latest/meta-data/instance-id"),
        "i-aaaaaaaaaaaaaaaaa"
    );
    assert_eq!(
        get(&b, "/latest/meta-data/instance-id"),
        "i-bbbbbbbbbbbbbbbbb"
    );

    // A device deleted behind the agent's back: the server stops, the next ensure recreates it.
    b.ip(&["link", "del", "dev", IMDS_IFNAME]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let recreated = loop {
        let created = rt
            .block_on(imds.ensure(&path_b, IP, meta_b.clone()))
            .unwrap();
        if created || Instant::now() > deadline {
            break created;
        }
        thread::sleep(Duration::from_millis(10));
    };
    assert!(recreated);
    assert_eq!(
        get(&b, "/latest/meta-data/instance-id"),
        "i-bbbbbbbbbbbbbbbbb"
    );
    drop(imds);
    rt.shutdown_timeout(Duration::from_secs(5));
}
