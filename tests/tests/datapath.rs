//! Tier 2: the real programs (the object the agent embeds), run on crafted frames with
//! BPF_PROG_TEST_RUN. Each case checks the return code, that the frame is unchanged, and
//! that exactly the right counters moved. Needs root.

use dataplane_common::{
    Action, DropReason, FilterAction, FilterKey, FilterValue, Hook,
    filter::ipv4_mapped,
    testpkt::{
        arp_request, icmp4_echo, icmp6_echo, tcp_syn, udp, v4, v6, vlan_tagged, with_ipv6_ext,
    },
};
use vpc_tests::testrun::{LoadedDatapath, TC_ACT_OK, TC_ACT_SHOT, XDP_DROP, XDP_PASS};

const A: [u8; 4] = [198, 18, 0, 1];
const B: [u8; 4] = [198, 18, 0, 2];

fn pass_code(hook: Hook) -> u32 {
    if hook == Hook::Xdp {
        XDP_PASS
    } else {
        TC_ACT_OK
    }
}

fn drop_code(hook: Hook) -> u32 {
    if hook == Hook::Xdp {
        XDP_DROP
    } else {
        TC_ACT_SHOT
    }
}

fn set(frame: &[u8], i: usize, v: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[i] = v;
    f
}

/// Runs `frame` once on `hook` and asserts the verdict and the exact counter deltas.
fn check(dp: &LoadedDatapath, hook: Hook, name: &str, frame: &[u8], want: Option<DropReason>) {
    let before = dp.stats().unwrap();
    let r = dp.run(hook, frame).unwrap();
    let after = dp.stats().unwrap();
    let len = frame.len() as u64;
    let delta = |a: Action| after.action(hook, a).since(&before.action(hook, a));
    match want {
        None => {
            assert_eq!(r.retval, pass_code(hook), "{name} on {hook:?}: retval");
            assert_eq!(
                (delta(Action::Pass).packets, delta(Action::Pass).bytes),
                (1, len),
                "{name}"
            );
            assert_eq!(delta(Action::Drop).packets, 0, "{name}");
        }
        Some(reason) => {
            assert_eq!(r.retval, drop_code(hook), "{name} on {hook:?}: retval");
            assert_eq!(delta(Action::Drop).packets, 1, "{name}");
            assert_eq!(delta(Action::Pass).packets, 0, "{name}");
            let d = after.drop(hook, reason).since(&before.drop(hook, reason));
            assert_eq!(
                (d.packets, d.bytes),
                (1, len),
                "{name}: drop reason {reason:?}"
            );
        }
    }
    assert_eq!(delta(Action::Aborted).packets, 0, "{name}");
    assert_eq!(
        r.output, frame,
        "{name} on {hook:?}: the skeleton never rewrites frames"
    );
    // Nothing else moved: the sums over all slots grew by exactly one packet.
    let total = |s: &controlplane::datapath::StatsSnapshot| {
        s.actions.iter().map(|(_, _, c)| c.packets).sum::<u64>()
    };
    assert_eq!(
        total(&after) - total(&before),
        1,
        "{name}: one action counted"
    );
}

#[test]
fn verdicts_and_counters_for_valid_malformed_and_truncated_frames() {
    let dp = LoadedDatapath::load("dpverd").unwrap();
    let udp4 = udp(v4(A, B), 1000, 53, b"payload");
    let tcp6 = tcp_syn(v6("fd00::1", "fd00::2"), 1, 443);
    let cases: Vec<(&str, Vec<u8>, Option<DropReason>)> = vec![
        ("udp4", udp4.clone(), None),
        ("tcp4", tcp_syn(v4(A, B), 40000, 80), None),
        ("icmp4", icmp4_echo(A.into(), B.into(), 1, 1), None),
        ("tcp6", tcp6.clone(), None),
        (
            "icmp6",
            icmp6_echo("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap(), 1, 1),
            None,
        ),
        ("vlan udp4", vlan_tagged(&udp4, 7), None),
        ("ipv6 dest-opts tcp", with_ipv6_ext(&tcp6, 60), None),
        ("arp", arp_request(A.into(), B.into()), None),
        (
            "padded udp4",
            {
                let mut f = udp4.clone();
                f.resize(80, 0);
                f
            },
            None,
        ),
        (
            "ipv4 bad version",
            set(&udp4, 14, 0x55),
            Some(DropReason::MalformedIpv4),
        ),
        (
            "ipv4 ihl 3",
            set(&udp4, 14, 0x43),
            Some(DropReason::MalformedIpv4),
        ),
        (
            "ipv4 total > frame",
            set(&udp4, 16, 0x10),
            Some(DropReason::Truncated),
        ),
        (
            "udp length 0",
            set(&set(&udp4, 38, 0), 39, 0),
            Some(DropReason::MalformedL4),
        ),
        (
            "tcp doff 2",
            set(&tcp6, 14 + 40 + 12, 0x20),
            Some(DropReason::MalformedL4),
        ),
        (
            "ipv6 bad version",
            set(&tcp6, 14, 0x40),
            Some(DropReason::MalformedIpv6),
        ),
        (
            "udp header cut",
            udp4[..38].to_vec(),
            Some(DropReason::Truncated),
        ),
        (
            "tcp6 header cut",
            tcp6[..14 + 40 + 10].to_vec(),
            Some(DropReason::Truncated),
        ),
    ];
    for hook in Hook::UNDERLAY {
        for (name, frame, want) in &cases {
            check(&dp, hook, name, frame, *want);
        }
    }
}

#[test]
fn xdp_drops_frames_cut_inside_the_ip_header() {
    // Only XDP test runs accept frames this short (skb test runs need a whole IP header).
    let dp = LoadedDatapath::load("dpshort").unwrap();
    let udp4 = udp(v4(A, B), 1, 2, b"");
    let tcp6 = tcp_syn(v6("fd00::1", "fd00::2"), 1, 2);
    for len in 14..34 {
        check(
            &dp,
            Hook::Xdp,
            "ipv4 cut",
            &udp4[..len],
            Some(DropReason::Truncated),
        );
    }
    for len in 14..54 {
        check(
            &dp,
            Hook::Xdp,
            "ipv6 cut",
            &tcp6[..len],
            Some(DropReason::Truncated),
        );
    }
    check(
        &dp,
        Hook::Xdp,
        "vlan tag cut",
        &vlan_tagged(&udp4, 1)[..16],
        Some(DropReason::Truncated),
    );
}

#[test]
fn filter_entries_drop_exactly_the_chosen_flow_and_pass_entries_override() {
    let mut dp = LoadedDatapath::load("dpfilter").unwrap();
    let to_b_9999 = udp(v4(A, B), 1000, 9999, b"x");
    let to_b_53 = udp(v4(A, B), 1000, 53, b"x");
    let to_c_9999 = udp(v4(A, [198, 18, 0, 3]), 1000, 9999, b"x");
    for hook in Hook::UNDERLAY {
        check(&dp, hook, "before", &to_b_9999, None);
    }
    // Wildcard drop for UDP/9999, exact pass for B.
    let any = FilterKey::new([0; 16], 17, 9999);
    let exact_b = FilterKey::new(ipv4_mapped(B), 17, 9999);
    dp.maps()
        .set_filter(any, FilterValue::new(FilterAction::Drop))
        .unwrap();
    for hook in Hook::UNDERLAY {
        check(
            &dp,
            hook,
            "wildcard",
            &to_b_9999,
            Some(DropReason::FilterRule),
        );
        check(
            &dp,
            hook,
            "wildcard other host",
            &to_c_9999,
            Some(DropReason::FilterRule),
        );
        check(&dp, hook, "other port", &to_b_53, None);
    }
    dp.maps()
        .set_filter(exact_b, FilterValue::new(FilterAction::Pass))
        .unwrap();
    for hook in Hook::UNDERLAY {
        check(&dp, hook, "exact pass", &to_b_9999, None);
        check(
            &dp,
            hook,
            "wildcard still",
            &to_c_9999,
            Some(DropReason::FilterRule),
        );
    }
    assert!(dp.maps().remove_filter(&any).unwrap());
    assert!(!dp.maps().remove_filter(&any).unwrap());
    for hook in Hook::UNDERLAY {
        check(&dp, hook, "removed", &to_c_9999, None);
    }
    assert_eq!(dp.maps().filters().unwrap().len(), 1);
}

#[test]
fn repeated_runs_count_every_run_and_report_time() {
    let dp = LoadedDatapath::load("dprepeat").unwrap();
    let frame = udp(v4(A, B), 1, 53, b"");
    for hook in Hook::UNDERLAY {
        let before = dp.stats().unwrap().action(hook, Action::Pass);
        let r = dp.run_repeat(hook, &frame, 10_000).unwrap();
        let after = dp.stats().unwrap().action(hook, Action::Pass);
        assert_eq!(r.retval, pass_code(hook));
        assert_eq!(after.since(&before).packets, 10_000, "{hook:?}");
        assert!(
            r.per_run.as_nanos() > 0,
            "{hook:?}: kernel reported no time"
        );
        assert!(
            r.per_run.as_micros() < 50,
            "{hook:?}: {:?} per run",
            r.per_run
        );
    }
}

#[test]
fn garbage_frames_are_never_aborted_and_always_counted() {
    let dp = LoadedDatapath::load("dpgarbage").unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let before = dp.stats().unwrap();
    let runs = 3000;
    for i in 0..runs {
        let len = 14 + (next() % 120) as usize;
        let mut frame: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Steer most frames into the IP parsers, where the interesting checks are.
        match i % 3 {
            0 => frame[12..14].copy_from_slice(&[0x08, 0x00]),
            1 => frame[12..14].copy_from_slice(&[0x86, 0xdd]),
            _ => {}
        }
        if i % 3 == 0 && len > 14 {
            frame[14] = 0x40 | (frame[14] & 0x0f);
        }
        let r = dp.run(Hook::Xdp, &frame).unwrap();
        assert!(
            r.retval == XDP_PASS || r.retval == XDP_DROP,
            "frame {frame:02x?}"
        );
    }
    let after = dp.stats().unwrap();
    let counted = |a| {
        after
            .action(Hook::Xdp, a)
            .since(&before.action(Hook::Xdp, a))
            .packets
    };
    assert_eq!(counted(Action::Pass) + counted(Action::Drop), runs);
    assert_eq!(counted(Action::Aborted), 0);
    let drops: u64 = DropReason::ALL
        .iter()
        .map(|r| {
            after
                .drop(Hook::Xdp, *r)
                .since(&before.drop(Hook::Xdp, *r))
                .packets
        })
        .sum();
    assert_eq!(drops, counted(Action::Drop), "every drop has a reason");
}
