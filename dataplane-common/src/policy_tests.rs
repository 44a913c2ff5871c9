//! Host tests of the per-packet policy verdict (`policy::evaluate`) over in-memory tables:
//! security groups, network ACLs and connection tracking together, as the datapath runs them.

use core::cell::RefCell;
use std::{collections::BTreeMap, rc::Rc, vec::Vec};

use crate::{
    DropReason,
    conntrack::{CtBudget, CtConfig, CtEntry, CtKey, CtState, tcp_flags::*},
    filter::ipv4_mapped,
    flowlog::{DECISION_NONE, Decision},
    overlay::Endpoint,
    packet::SlicePacket,
    parse::{Parsed, parse},
    policy::{
        ACL_ALLOW, ACL_DENY, AclVerdict, CtSlot, EGRESS, INGRESS, PolicyAddrKey, PolicyPortKey,
        PolicyTables, class_id, evaluate,
    },
    testpkt::{icmp4_echo, tcp, udp, v4},
};

fn bits(bytes: &[u8], n: u32) -> Vec<bool> {
    (0..n as usize)
        .map(|i| bytes[i / 8] & (0x80 >> (i % 8)) != 0)
        .collect()
}

fn addr_bytes(k: &PolicyAddrKey) -> Vec<u8> {
    k.scope_be.iter().chain(k.addr.iter()).copied().collect()
}

fn port_bytes(k: &PolicyPortKey) -> Vec<u8> {
    let mut v: Vec<u8> = k.class_be.to_vec();
    v.push(k.proto);
    v.extend_from_slice(&k.port_be);
    v
}

/// Longest-prefix match by linear scan, as the kernel trie answers.
fn lpm<K, V: Copy>(
    entries: &[(u32, K, V)],
    key: &[u8],
    bytes: impl Fn(&K) -> Vec<u8>,
) -> Option<V> {
    entries
        .iter()
        .filter(|(len, k, _)| bits(&bytes(k), *len) == bits(key, *len))
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, _, v)| *v)
}

#[derive(Default)]
struct Tables {
    sg_addr: Vec<(u32, PolicyAddrKey, u32)>,
    sg_port: Vec<(u32, PolicyPortKey, u32)>,
    acl_addr: Vec<(u32, PolicyAddrKey, u32)>,
    acl_port: Vec<(u32, PolicyPortKey, AclVerdict)>,
    ct: Rc<RefCell<BTreeMap<CtKey, CtEntry>>>,
    budgets: RefCell<BTreeMap<u32, CtBudget>>,
}

struct Slot(Rc<RefCell<BTreeMap<CtKey, CtEntry>>>, CtKey);

impl CtSlot for Slot {
    fn get(&self) -> CtEntry {
        self.0.borrow()[&self.1]
    }
    fn set(&self, e: &CtEntry) {
        let mut ct = self.0.borrow_mut();
        let cur = ct.get_mut(&self.1).unwrap();
        cur.last_seen_ns = e.last_seen_ns;
        cur.state = e.state;
        cur.flags = e.flags;
    }
    fn count(&self, bytes: u32) {
        let mut ct = self.0.borrow_mut();
        let cur = ct.get_mut(&self.1).unwrap();
        cur.packets += 1;
        cur.bytes += u64::from(bytes);
    }
}

impl PolicyTables for Tables {
    type Slot = Slot;
    fn sg_class(&self, key: &PolicyAddrKey) -> Option<u32> {
        lpm(&self.sg_addr, &addr_bytes(key), addr_bytes)
    }
    fn sg_port(&self, key: &PolicyPortKey) -> Option<u32> {
        lpm(&self.sg_port, &port_bytes(key), port_bytes)
    }
    fn acl_class(&self, key: &PolicyAddrKey) -> Option<u32> {
        lpm(&self.acl_addr, &addr_bytes(key), addr_bytes)
    }
    fn acl_port(&self, key: &PolicyPortKey) -> Option<AclVerdict> {
        lpm(&self.acl_port, &port_bytes(key), port_bytes)
    }
    fn ct_get(&self, key: &CtKey) -> Option<Slot> {
        self.ct
            .borrow()
            .contains_key(key)
            .then(|| Slot(self.ct.clone(), *key))
    }
    fn ct_create(&self, key: &CtKey, entry: &CtEntry) {
        self.ct.borrow_mut().insert(*key, *entry);
    }
    fn ct_config(&self) -> CtConfig {
        CtConfig::DEFAULT
    }
    fn ct_budget(&self, vni: u32) -> Option<CtBudget> {
        self.budgets.borrow().get(&vni).copied()
    }
    fn ct_budget_charge(&self, vni: u32) {
        if let Some(b) = self.budgets.borrow_mut().get_mut(&vni) {
            b.count += 1;
        }
    }
}

const VNI: u32 = 7;
const WEB: [u8; 4] = [10, 0, 1, 10];
const DB: [u8; 4] = [10, 0, 2, 20];
const CLIENT: [u8; 4] = [10, 0, 1, 30];
const SG_WEB: u32 = 1;
const SG_DB: u32 = 2;
const SG_CLIENT: u32 = 3;
const ACL_DB: u32 = 9;

fn ep(addr: [u8; 4], policy: u32, acl: u32) -> Endpoint {
    Endpoint {
        vni: VNI,
        addr: ipv4_mapped(addr),
        mac: [2, 0, 0, 0, 0, addr[3]],
        router_mac: [2, 0, 0, 0, 0, 1],
        gateway: ipv4_mapped([addr[0], addr[1], addr[2], 1]),
        policy,
        acl,
        subnet_bits: 24,
        flags: 0,
    }
}

fn cidr(id: u32, dir: u32, a: [u8; 4], plen: u8) -> (u32, PolicyAddrKey) {
    (
        PolicyAddrKey::ipv4_prefix_len(plen),
        PolicyAddrKey::new(id, dir, ipv4_mapped(a)),
    )
}

/// web: inbound tcp/80 from anywhere, outbound all. db: inbound tcp/5432 from web's /32
/// (a group reference), outbound all. client: outbound all, no inbound. The db subnet's ACL:
/// inbound 100 deny tcp/5432 from 10.0.1.30, 110 allow all from 10.0.0.0/16; outbound 100
/// allow tcp ephemeral 1024-65535 to 10.0.0.0/16, 110 allow icmp.
fn tables() -> Tables {
    let mut t = Tables::default();
    let sg = |t: &mut Tables, id: u32, dir: u32, a, plen, n| {
        let (len, key) = cidr(id, dir, a, plen);
        t.sg_addr.push((len, key, class_id(id, n)));
    };
    // web
    sg(&mut t, SG_WEB, INGRESS, [0, 0, 0, 0], 0, 0);
    t.sg_port.push((
        PolicyPortKey::FULL_LEN,
        PolicyPortKey::new(class_id(SG_WEB, 0), 6, 80),
        1,
    ));
    sg(&mut t, SG_WEB, EGRESS, [0, 0, 0, 0], 0, 1);
    t.sg_port.push((
        PolicyPortKey::ALL_PROTOCOLS_LEN,
        PolicyPortKey::new(class_id(SG_WEB, 1), 0, 0),
        1,
    ));
    // db
    sg(&mut t, SG_DB, INGRESS, WEB, 32, 0);
    t.sg_port.push((
        PolicyPortKey::FULL_LEN,
        PolicyPortKey::new(class_id(SG_DB, 0), 6, 5432),
        1,
    ));
    sg(&mut t, SG_DB, EGRESS, [0, 0, 0, 0], 0, 1);
    t.sg_port.push((
        PolicyPortKey::ALL_PROTOCOLS_LEN,
        PolicyPortKey::new(class_id(SG_DB, 1), 0, 0),
        1,
    ));
    // client
    sg(&mut t, SG_CLIENT, EGRESS, [0, 0, 0, 0], 0, 0);
    t.sg_port.push((
        PolicyPortKey::ALL_PROTOCOLS_LEN,
        PolicyPortKey::new(class_id(SG_CLIENT, 0), 0, 0),
        1,
    ));
    // db ACL, inbound: class 0 = 10.0.0.0/16 (rule 110), class 1 = 10.0.1.30/32 (100, 110).
    let (len, key) = cidr(ACL_DB, INGRESS, [10, 0, 0, 0], 16);
    t.acl_addr.push((len, key, class_id(ACL_DB, 0)));
    let (len, key) = cidr(ACL_DB, INGRESS, CLIENT, 32);
    t.acl_addr.push((len, key, class_id(ACL_DB, 1)));
    let allow = |rule| AclVerdict {
        action: ACL_ALLOW,
        rule,
    };
    let deny = |rule| AclVerdict {
        action: ACL_DENY,
        rule,
    };
    t.acl_port.push((
        PolicyPortKey::ALL_PROTOCOLS_LEN,
        PolicyPortKey::new(class_id(ACL_DB, 0), 0, 0),
        allow(110),
    ));
    t.acl_port.push((
        PolicyPortKey::ALL_PROTOCOLS_LEN,
        PolicyPortKey::new(class_id(ACL_DB, 1), 0, 0),
        allow(110),
    ));
    // tcp for class 1: port 5432 denied by rule 100; the rest of tcp falls to rule 110.
    t.acl_port.push((
        PolicyPortKey::ALL_PORTS_LEN,
        PolicyPortKey::new(class_id(ACL_DB, 1), 6, 0),
        allow(110),
    ));
    t.acl_port.push((
        PolicyPortKey::FULL_LEN,
        PolicyPortKey::new(class_id(ACL_DB, 1), 6, 5432),
        deny(100),
    ));
    // db ACL, outbound: class 2 = 10.0.0.0/16: tcp 1024-65535 (blocks 1024/10 .. 32768/15)
    // allowed by 100, tcp 0-1023 implicitly denied, icmp allowed by 110.
    let (len, key) = cidr(ACL_DB, EGRESS, [10, 0, 0, 0], 16);
    t.acl_addr.push((len, key, class_id(ACL_DB, 2)));
    t.acl_port.push((
        PolicyPortKey::block_len(10),
        PolicyPortKey::new(class_id(ACL_DB, 2), 6, 0),
        deny(32767),
    ));
    for b in 10..16 {
        t.acl_port.push((
            PolicyPortKey::block_len(b),
            PolicyPortKey::new(class_id(ACL_DB, 2), 6, 1 << b),
            allow(100),
        ));
    }
    t.acl_port.push((
        PolicyPortKey::ALL_PORTS_LEN,
        PolicyPortKey::new(class_id(ACL_DB, 2), 1, 0),
        allow(110),
    ));
    t
}

fn eval(
    t: &Tables,
    frame: &[u8],
    out: Option<&Endpoint>,
    inb: Option<&Endpoint>,
    now: u64,
) -> Result<(), DropReason> {
    eval_decision(t, frame, out, inb, now).0
}

fn eval_decision(
    t: &Tables,
    frame: &[u8],
    out: Option<&Endpoint>,
    inb: Option<&Endpoint>,
    now: u64,
) -> (Result<(), DropReason>, Decision) {
    let pkt = SlicePacket(frame);
    let Ok(Parsed::Ip(ip)) = parse(&pkt) else {
        panic!("test frame does not parse")
    };
    let mut d = Decision::EMPTY;
    let r = evaluate(&pkt, &ip, VNI, out, inb, now, t, &mut d);
    (r, d)
}

fn tcp_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    tcp(v4(src, dst), sport, dport, flags, &[])
}

#[test]
fn aws_examples_table() {
    let web = ep(WEB, SG_WEB, 0);
    let db = ep(DB, SG_DB, ACL_DB);
    let client = ep(CLIENT, SG_CLIENT, 0);
    struct Case {
        name: &'static str,
        frame: Vec<u8>,
        out: Option<Endpoint>,
        inb: Option<Endpoint>,
        want: Result<(), DropReason>,
    }
    let cases = [
        Case {
            name: "client -> web:80 (both local)",
            frame: tcp_frame(CLIENT, WEB, 40000, 80, SYN),
            out: Some(client),
            inb: Some(web),
            want: Ok(()),
        },
        Case {
            name: "client -> web:22 no inbound rule",
            frame: tcp_frame(CLIENT, WEB, 40001, 22, SYN),
            out: Some(client),
            inb: Some(web),
            want: Err(DropReason::SgIngress),
        },
        Case {
            name: "web -> client: client has no inbound rules",
            frame: tcp_frame(WEB, CLIENT, 40002, 8080, SYN),
            out: Some(web),
            inb: Some(client),
            want: Err(DropReason::SgIngress),
        },
        Case {
            name: "remote sender: only web's inbound applies",
            frame: tcp_frame(CLIENT, WEB, 40003, 80, SYN),
            out: None,
            inb: Some(web),
            want: Ok(()),
        },
        Case {
            name: "web -> db:5432 via group reference",
            frame: tcp_frame(WEB, DB, 40004, 5432, SYN),
            out: Some(web),
            inb: Some(db),
            want: Ok(()),
        },
        Case {
            name: "client -> db:5432: ACL deny 100 beats SG and ACL allow 110",
            frame: tcp_frame(CLIENT, DB, 40005, 5432, SYN),
            out: Some(client),
            inb: Some(db),
            want: Err(DropReason::AclIngress),
        },
        Case {
            name: "client -> db:5433: ACL allows (110), SG does not",
            frame: tcp_frame(CLIENT, DB, 40006, 5433, SYN),
            out: Some(client),
            inb: Some(db),
            want: Err(DropReason::SgIngress),
        },
        Case {
            name: "db -> web:80 outbound ACL: port 80 implicitly denied",
            frame: tcp_frame(DB, WEB, 40007, 80, SYN),
            out: Some(db),
            inb: None,
            want: Err(DropReason::AclEgress),
        },
        Case {
            name: "db -> web icmp: outbound ACL 110",
            frame: icmp4_echo(DB.into(), WEB.into(), 5, 1),
            out: Some(db),
            inb: None,
            want: Ok(()),
        },
        Case {
            name: "same subnet: no ACL (client -> web icmp needs SG)",
            frame: icmp4_echo(CLIENT.into(), WEB.into(), 5, 1),
            out: Some(client),
            inb: Some(web),
            want: Err(DropReason::SgIngress),
        },
        Case {
            name: "invalid flags",
            frame: tcp_frame(CLIENT, WEB, 40008, 80, SYN | FIN),
            out: Some(client),
            inb: Some(web),
            want: Err(DropReason::CtInvalid),
        },
    ];
    for c in cases {
        let t = tables();
        assert_eq!(
            eval(&t, &c.frame, c.out.as_ref(), c.inb.as_ref(), 1),
            c.want,
            "{}",
            c.name
        );
        // Only admitted packets create flows.
        assert_eq!(
            t.ct.borrow().len(),
            usize::from(c.want.is_ok()),
            "{}",
            c.name
        );
    }
}

#[test]
fn replies_pass_without_rules_and_the_handshake_is_tracked() {
    let t = tables();
    let web = ep(WEB, SG_WEB, 0);
    let client = ep(CLIENT, SG_CLIENT, 0);
    assert_eq!(
        eval(
            &t,
            &tcp_frame(CLIENT, WEB, 40000, 80, SYN),
            Some(&client),
            Some(&web),
            1
        ),
        Ok(())
    );
    // web -> client has no rule (client has no inbound rules), but it is the reply.
    assert_eq!(
        eval(
            &t,
            &tcp_frame(WEB, CLIENT, 80, 40000, SYN | ACK),
            Some(&web),
            Some(&client),
            2
        ),
        Ok(())
    );
    let entry = *t.ct.borrow().values().next().unwrap();
    assert_eq!(entry.state, CtState::Established as u32);
    // A new flow in the reverse direction is still denied.
    assert_eq!(
        eval(
            &t,
            &tcp_frame(WEB, CLIENT, 80, 40001, SYN),
            Some(&web),
            Some(&client),
            3
        ),
        Err(DropReason::SgIngress)
    );
    // UDP replies too: web may send anywhere; the client's replies are tracked.
    assert_eq!(
        eval(
            &t,
            &udp(v4(WEB, CLIENT), 5353, 53, b"q"),
            Some(&web),
            None,
            4
        ),
        Ok(())
    );
    assert_eq!(
        eval(
            &t,
            &udp(v4(CLIENT, WEB), 53, 5353, b"a"),
            None,
            Some(&web),
            5
        ),
        Ok(())
    );
    // ICMP echo replies match their request by identifier.
    assert_eq!(
        eval(
            &t,
            &icmp4_echo(WEB.into(), CLIENT.into(), 77, 1),
            Some(&web),
            None,
            6
        ),
        Ok(())
    );
    let mut reply = icmp4_echo(CLIENT.into(), WEB.into(), 77, 1);
    reply[34] = 0; // type 0: echo reply
    assert_eq!(eval(&t, &reply, None, Some(&web), 7), Ok(()));
}

#[test]
fn removing_a_rule_keeps_tracked_flows_and_blocks_new_ones() {
    let mut t = tables();
    let web = ep(WEB, SG_WEB, 0);
    assert_eq!(
        eval(
            &t,
            &tcp_frame(CLIENT, WEB, 40000, 80, SYN),
            None,
            Some(&web),
            1
        ),
        Ok(())
    );
    // The port-80 rule goes away (a new policy id would replace it; here: entries removed).
    t.sg_port
        .retain(|(_, k, _)| k.class_be != class_id(SG_WEB, 0).to_be_bytes());
    assert_eq!(
        eval(
            &t,
            &tcp_frame(CLIENT, WEB, 40000, 80, ACK),
            None,
            Some(&web),
            2
        ),
        Ok(())
    );
    assert_eq!(
        eval(
            &t,
            &tcp_frame(CLIENT, WEB, 40001, 80, SYN),
            None,
            Some(&web),
            3
        ),
        Err(DropReason::SgIngress)
    );
    // Closing the tracked connection and reopening the same 5-tuple is a new flow.
    assert_eq!(
        eval(
            &t,
            &tcp_frame(CLIENT, WEB, 40000, 80, FIN | ACK),
            None,
            Some(&web),
            4
        ),
        Ok(())
    );
    assert_eq!(
        eval(
            &t,
            &tcp_frame(CLIENT, WEB, 40000, 80, SYN),
            None,
            Some(&web),
            5
        ),
        Err(DropReason::SgIngress)
    );
}

#[test]
fn expired_flows_are_evaluated_again() {
    let mut t = tables();
    let web = ep(WEB, SG_WEB, 0);
    let s = 1_000_000_000;
    assert_eq!(
        eval(
            &t,
            &udp(v4(CLIENT, WEB), 5000, 80, b"x"),
            None,
            Some(&web),
            s
        ),
        Err(DropReason::SgIngress)
    );
    // web -> client UDP opens a flow; the reply is admitted until the 30 s timeout.
    assert_eq!(
        eval(
            &t,
            &udp(v4(WEB, CLIENT), 80, 5000, b"x"),
            Some(&web),
            None,
            s
        ),
        Ok(())
    );
    assert_eq!(
        eval(
            &t,
            &udp(v4(CLIENT, WEB), 5000, 80, b"x"),
            None,
            Some(&web),
            30 * s
        ),
        Ok(())
    );
    t.sg_port.clear();
    assert_eq!(
        eval(
            &t,
            &udp(v4(CLIENT, WEB), 5000, 80, b"x"),
            None,
            Some(&web),
            61 * s
        ),
        Err(DropReason::SgIngress)
    );
}

#[test]
fn flows_of_different_vpcs_never_share_state() {
    let t = tables();
    let web = ep(WEB, SG_WEB, 0);
    assert_eq!(
        eval(
            &t,
            &udp(v4(WEB, CLIENT), 80, 5000, b"x"),
            Some(&web),
            None,
            1
        ),
        Ok(())
    );
    let mut other = web;
    other.vni = VNI + 1;
    // Same addresses, other VPC: the reply is not tracked there (and VNI 8 has no rules
    // admitting it: policies are per id, the same id stands for the same rules).
    let pkt_frame = udp(v4(CLIENT, WEB), 5000, 80, b"x");
    let pkt = SlicePacket(&pkt_frame);
    let Ok(Parsed::Ip(ip)) = parse(&pkt) else {
        panic!()
    };
    assert_eq!(
        evaluate(&pkt, &ip, VNI + 1, None, Some(&other), 2, &t, &mut {
            Decision::EMPTY
        }),
        Err(DropReason::SgIngress)
    );
}

/// The rule references of the SG_PORT entries of `tables()` (all 1) made distinct, so a
/// decision names the entry that matched.
fn tables_with_refs() -> Tables {
    let mut t = tables();
    for (i, e) in t.sg_port.iter_mut().enumerate() {
        e.2 = 100 + i as u32;
    }
    t
}

#[test]
fn decisions_name_the_rules_of_each_stage() {
    let t = tables_with_refs();
    let web = ep(WEB, SG_WEB, 0);
    let db = ep(DB, SG_DB, ACL_DB);
    let client = ep(CLIENT, SG_CLIENT, 0);
    // client -> web:80, same subnet: client's outbound entry (index 4), web's inbound (0);
    // no ACL stage.
    let (r, d) = eval_decision(
        &t,
        &tcp_frame(CLIENT, WEB, 40000, 80, SYN),
        Some(&client),
        Some(&web),
        1,
    );
    assert_eq!(r, Ok(()));
    assert_eq!(
        d,
        Decision {
            sg_out: 104,
            acl_out: DECISION_NONE,
            acl_in: DECISION_NONE,
            sg_in: 100,
            tcp_flags: SYN,
            tracked: 0,
            _pad: [0; 2],
        }
    );
    // The reply is tracked: security groups skipped.
    let (r, d) = eval_decision(
        &t,
        &tcp_frame(WEB, CLIENT, 80, 40000, SYN | ACK),
        Some(&web),
        Some(&client),
        2,
    );
    assert_eq!(r, Ok(()));
    assert_eq!(
        (d.sg_out, d.sg_in, d.tracked),
        (DECISION_NONE, DECISION_NONE, 1)
    );
    assert_eq!(d.tcp_flags, SYN | ACK);
    // client -> db:5432 (remote sender): inbound ACL rule 100 denies; SG never runs.
    let (r, d) = eval_decision(
        &t,
        &tcp_frame(CLIENT, DB, 40005, 5432, SYN),
        None,
        Some(&db),
        3,
    );
    assert_eq!(r, Err(DropReason::AclIngress));
    assert_eq!(
        (d.acl_in, d.sg_in, d.sg_out),
        (100, DECISION_NONE, DECISION_NONE)
    );
    // web -> db:5432: ACL 110 then db's inbound SG entry (index 2).
    let (r, d) = eval_decision(
        &t,
        &tcp_frame(WEB, DB, 40004, 5432, SYN),
        None,
        Some(&db),
        4,
    );
    assert_eq!(r, Ok(()));
    assert_eq!((d.acl_in, d.sg_in), (110, 102));
    // db -> web:80: outbound SG (index 3) allows, outbound ACL: implicit deny.
    let (r, d) = eval_decision(&t, &tcp_frame(DB, WEB, 40007, 80, SYN), Some(&db), None, 5);
    assert_eq!(r, Err(DropReason::AclEgress));
    assert_eq!((d.sg_out, d.acl_out), (103, 32767));
    // client -> web:22: no inbound rule, reference 0.
    let (r, d) = eval_decision(
        &t,
        &tcp_frame(CLIENT, WEB, 40001, 22, SYN),
        Some(&client),
        Some(&web),
        6,
    );
    assert_eq!(r, Err(DropReason::SgIngress));
    assert_eq!((d.sg_out, d.sg_in), (104, 0));
}

#[test]
fn conntrack_entries_count_packets_and_bytes_of_both_directions() {
    let t = tables();
    let web = ep(WEB, SG_WEB, 0);
    let syn = tcp_frame(CLIENT, WEB, 40000, 80, SYN);
    let synack = tcp_frame(WEB, CLIENT, 80, 40000, SYN | ACK);
    let ack = tcp_frame(CLIENT, WEB, 40000, 80, ACK);
    assert_eq!(eval(&t, &syn, None, Some(&web), 1), Ok(()));
    assert_eq!(eval(&t, &synack, Some(&web), None, 2), Ok(()));
    assert_eq!(eval(&t, &ack, None, Some(&web), 3), Ok(()));
    // Within a millisecond: the state is not rewritten, the counters still grow.
    assert_eq!(eval(&t, &ack, None, Some(&web), 4), Ok(()));
    let e = *t.ct.borrow().values().next().unwrap();
    assert_eq!(e.packets, 4);
    assert_eq!(e.bytes, (syn.len() + synack.len() + 2 * ack.len()) as u64);
    assert_eq!(e.state, CtState::Established as u32);
    // A dropped packet is not counted.
    assert_eq!(
        eval(
            &t,
            &tcp_frame(CLIENT, WEB, 40000, 80, SYN | FIN),
            None,
            Some(&web),
            5
        ),
        Err(DropReason::CtInvalid)
    );
    assert_eq!(t.ct.borrow().values().next().unwrap().packets, 4);
}

#[test]
fn a_vpc_past_its_conntrack_budget_cannot_open_flows_others_can() {
    let t = tables();
    t.budgets
        .borrow_mut()
        .insert(VNI, CtBudget { limit: 2, count: 0 });
    let web = ep(WEB, SG_WEB, 0);
    for port in [40000, 40001] {
        assert_eq!(
            eval(
                &t,
                &tcp_frame(CLIENT, WEB, port, 80, SYN),
                None,
                Some(&web),
                1
            ),
            Ok(())
        );
    }
    assert_eq!(t.budgets.borrow()[&VNI].count, 2);
    assert_eq!(
        eval(
            &t,
            &tcp_frame(CLIENT, WEB, 40002, 80, SYN),
            None,
            Some(&web),
            2
        ),
        Err(DropReason::CtBudgetExceeded)
    );
    // Tracked flows still pass.
    assert_eq!(
        eval(
            &t,
            &tcp_frame(CLIENT, WEB, 40000, 80, ACK),
            None,
            Some(&web),
            3
        ),
        Ok(())
    );
    assert_eq!(t.ct.borrow().len(), 2);
    // Another VPC (no budget) still tracks new flows.
    let mut other = web;
    other.vni = VNI + 1;
    let frame = tcp_frame(CLIENT, WEB, 40002, 80, SYN);
    let pkt = SlicePacket(&frame);
    let Ok(Parsed::Ip(ip)) = parse(&pkt) else {
        panic!()
    };
    assert_eq!(
        evaluate(&pkt, &ip, VNI + 1, None, Some(&other), 4, &t, &mut {
            Decision::EMPTY
        }),
        Ok(())
    );
    assert_eq!(t.ct.borrow().len(), 3);
    // Limit 0 is unlimited; a recount below the limit admits again.
    t.budgets
        .borrow_mut()
        .insert(VNI, CtBudget { limit: 0, count: 9 });
    assert_eq!(
        eval(
            &t,
            &tcp_frame(CLIENT, WEB, 40003, 80, SYN),
            None,
            Some(&web),
            5
        ),
        Ok(())
    );
}
