//! Parsing, checks, order and plans (no API).

use vpc_proto::v1 as pb;

use super::MANAGED_BY;
use super::model::{Kind, Resource, check_duplicates, creation_order, parse_file};
use super::plan::{Action, Create, Current, Op, check_refs, client_token, create_request, plan};

const TWO_TIER: &str = r#"
kind: Vpc
name: two-tier
spec:
  cidrBlock: 10.0.0.0/16
---
kind: Subnet
name: public
spec: { vpc: two-tier, cidrBlock: 10.0.1.0/24 }
---
kind: SecurityGroup
name: web
spec:
  vpc: two-tier
  description: web tier
  ingress:
    - { protocol: tcp, port: 80, cidr: 0.0.0.0/0 }
---
kind: SecurityGroup
name: db
spec:
  vpc: two-tier
  ingress: [ { protocol: tcp, port: 5432, sourceGroup: web } ]
  egress: []
---
kind: Instance
name: web-1
spec: { subnet: public, securityGroups: [web] }
---
kind: TargetGroup
name: web
spec: { vpc: two-tier, port: 80, targets: [ { instance: web-1 } ] }
---
kind: LoadBalancer
name: front
spec:
  subnet: public
  listeners: [ { port: 80, targetGroup: web } ]
---
"#;

fn parse(text: &str) -> Vec<Resource> {
    parse_file("m.yaml", text).unwrap_or_else(|e| panic!("{e:?}"))
}

fn errors(text: &str) -> Vec<String> {
    match parse_file("m.yaml", text) {
        Ok(rs) => check_duplicates(&rs).into_iter().map(|p| p.0).collect(),
        Err(ps) => ps.into_iter().map(|p| p.0).collect(),
    }
}

fn tags(name: &str) -> Vec<pb::Tag> {
    vec![
        pb::Tag {
            key: "Name".into(),
            value: name.into(),
        },
        pb::Tag {
            key: MANAGED_BY.into(),
            value: "apply".into(),
        },
    ]
}

fn rule(
    proto: &str,
    from: i32,
    to: i32,
    cidr: &str,
    group: &str,
    id: &str,
) -> pb::SecurityGroupRule {
    pb::SecurityGroupRule {
        security_group_rule_id: id.into(),
        ip_protocol: proto.into(),
        from_port: from,
        to_port: to,
        cidr_ipv4: cidr.into(),
        referenced_group_id: group.into(),
        ..Default::default()
    }
}

/// The account as the two-tier manifest leaves it.
fn applied() -> Current {
    let all_out = rule("-1", -1, -1, "0.0.0.0/0", "", "sgr-e");
    Current {
        vpcs: vec![pb::Vpc {
            vpc_id: "vpc-1".into(),
            cidr_block: "10.0.0.0/16".into(),
            tags: tags("two-tier"),
            ..Default::default()
        }],
        subnets: vec![pb::Subnet {
            subnet_id: "subnet-1".into(),
            vpc_id: "vpc-1".into(),
            cidr_block: "10.0.1.0/24".into(),
            tags: tags("public"),
            ..Default::default()
        }],
        groups: vec![
            pb::SecurityGroup {
                group_id: "sg-web".into(),
                group_name: "web".into(),
                description: "web tier".into(),
                vpc_id: "vpc-1".into(),
                ingress_rules: vec![rule("tcp", 80, 80, "0.0.0.0/0", "", "sgr-1")],
                egress_rules: vec![all_out],
                tags: tags("web"),
                ..Default::default()
            },
            pb::SecurityGroup {
                group_id: "sg-db".into(),
                group_name: "db".into(),
                description: "db".into(),
                vpc_id: "vpc-1".into(),
                ingress_rules: vec![rule("tcp", 5432, 5432, "", "sg-web", "sgr-2")],
                tags: tags("db"),
                ..Default::default()
            },
        ],
        acls: vec![pb::NetworkAcl {
            network_acl_id: "acl-def".into(),
            vpc_id: "vpc-1".into(),
            is_default: true,
            subnet_ids: vec!["subnet-1".into()],
            ..Default::default()
        }],
        instances: vec![
            pb::Instance {
                instance_id: "i-1".into(),
                subnet_id: "subnet-1".into(),
                security_group_ids: vec!["sg-web".into()],
                state: "pending".into(),
                instance_type: "t3.micro".into(),
                tags: tags("web-1"),
                ..Default::default()
            },
            // A terminated namesake does not count.
            pb::Instance {
                instance_id: "i-0".into(),
                state: "terminated".into(),
                tags: tags("web-1"),
                ..Default::default()
            },
        ],
        volumes: vec![],
        target_groups: vec![pb::TargetGroup {
            target_group_id: "tg-1".into(),
            name: "web".into(),
            vpc_id: "vpc-1".into(),
            protocol: "TCP".into(),
            port: 80,
            health_check: Some(pb::HealthCheck::default()),
            deregistration_delay_seconds: 300,
            targets: vec![pb::Target {
                id: "i-1".into(),
                port: 80,
                weight: 1,
            }],
            tags: tags("web"),
            ..Default::default()
        }],
        load_balancers: vec![pb::LoadBalancer {
            load_balancer_id: "lb-1".into(),
            name: "front".into(),
            subnet_id: "subnet-1".into(),
            vpc_id: "vpc-1".into(),
            listeners: vec![pb::Listener {
                listener_id: "lis-1".into(),
                protocol: "TCP".into(),
                port: 80,
                target_group_id: "tg-1".into(),
            }],
            tags: tags("front"),
            ..Default::default()
        }],
    }
}

#[test]
fn parses_yaml_streams_lists_and_json() {
    let all = parse(TWO_TIER);
    assert_eq!(all.len(), 7);
    assert_eq!(all[0].kind, Kind::Vpc);
    assert_eq!(all[1].name, "public");
    assert_eq!(all[6].loc.index, 7);
    let list = parse(
        "- {kind: vpc, name: a, spec: {cidrBlock: 10.0.0.0/16}}\n- {kind: VPC, name: b, spec: {cidrBlock: 10.1.0.0/16}}\n",
    );
    assert_eq!(list.len(), 2);
    assert_eq!(list[1].kind, Kind::Vpc);
    let json = parse_file(
        "m.json",
        r#"[{"kind": "Vpc", "name": "a", "spec": {"cidrBlock": "10.0.0.0/16"}, "tags": {"env": "x"}}]"#,
    )
    .unwrap();
    assert_eq!(json[0].tags["env"], "x");
    let bad = parse_file("m.json", "{").unwrap_err();
    assert!(bad[0].0.starts_with("m.json: not valid JSON"), "{bad:?}");
}

#[test]
fn problems_are_located() {
    let e =
        errors("kind: Vpc\nname: a\nspec: {cidrBlock: 10.0.0.0/16}\n---\nkind: Router\nname: r\n");
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("m.yaml: document 2: kind: unknown kind \"Router\""),
        "{e:?}"
    );
    let e = errors("kind: Subnet\nspec: {vpc: a, cidrBlock: 10.0.0.0/24}\n");
    assert_eq!(e, ["m.yaml: document 1: name: required (Subnet)"]);
    let e = errors("kind: Subnet\nname: s\nspec: {vpc: a, cidr: 10.0.0.0/24}\n");
    assert!(
        e[0].starts_with("m.yaml: document 1 (Subnet/s): spec: unknown field `cidr`"),
        "{e:?}"
    );
    let e = errors("kind: Vpc\nname: a\nspce: {}\n");
    assert!(e[0].contains("unknown field `spce`"), "{e:?}");
    let e = errors("kind: Vpc\nname: a\nspec: {cidrBlock: 10.0.0.0/99}\n");
    assert!(
        e[0].starts_with("m.yaml: document 1 (Vpc/a): spec.cidrBlock:"),
        "{e:?}"
    );
    let e = errors(
        "kind: Vpc\nname: a\nspec: {cidrBlock: 10.0.0.0/16}\n---\nkind: Vpc\nname: a\nspec: {cidrBlock: 10.1.0.0/16}\n",
    );
    assert_eq!(
        e,
        ["m.yaml: document 2 (Vpc/a): name: duplicate: Vpc/a is also m.yaml: document 1"]
    );
    let e = errors(
        "kind: SecurityGroup\nname: g\nspec: {vpc: v, ingress: [{protocol: tcp, port: 80}]}\n",
    );
    assert_eq!(
        e,
        [
            "m.yaml: document 1 (SecurityGroup/g): spec.ingress[0]: exactly one of cidr and sourceGroup"
        ]
    );
    let e = errors(
        "kind: SecurityGroup\nname: g\nspec: {vpc: v, ingress: [{protocol: tcp, port: http, cidr: 0.0.0.0/0}]}\n",
    );
    assert!(e[0].contains("spec.ingress[0].port"), "{e:?}");
    // Several problems are all reported.
    let e = errors("kind: X\nname: a\n---\nkind: Vpc\n");
    assert_eq!(e.len(), 2, "{e:?}");
}

#[test]
fn references_resolve_in_the_file_or_the_account() {
    let all = parse(TWO_TIER);
    assert!(check_refs(&all, &Current::default()).is_empty());
    let one = parse("kind: Subnet\nname: public\nspec: {vpc: x, cidrBlock: 10.0.1.0/24}\n");
    let p = check_refs(&one, &Current::default());
    assert_eq!(p.len(), 1);
    assert_eq!(
        p[0].0,
        "m.yaml: document 1 (Subnet/public): spec.vpc: no Vpc named \"x\""
    );
    let one = parse("kind: Subnet\nname: public\nspec: {vpc: two-tier, cidrBlock: 10.0.1.0/24}\n");
    assert!(check_refs(&one, &applied()).is_empty());
    // Two VPCs with the same name: ambiguous.
    let mut cur = applied();
    let mut v = cur.vpcs[0].clone();
    v.vpc_id = "vpc-2".into();
    cur.vpcs.push(v);
    let p = check_refs(&one, &cur);
    assert!(p[0].0.contains("2 Vpcs are named \"two-tier\""), "{p:?}");
}

#[test]
fn creation_order_puts_parents_first() {
    let mut all = parse(TWO_TIER);
    all.reverse();
    let order = creation_order(&all);
    let pos = |k: Kind, n: &str| {
        order
            .iter()
            .position(|&i| all[i].kind == k && all[i].name == n)
            .unwrap()
    };
    for (i, r) in all.iter().enumerate() {
        let me = order.iter().position(|&j| j == i).unwrap();
        for x in r.refs().into_iter().filter(|x| x.hard) {
            assert!(pos(x.kind, &x.name) < me, "{} before {}", x.name, r.id());
        }
    }
}

#[test]
fn applied_state_is_unchanged() {
    let all = parse(TWO_TIER);
    let mut cur = applied();
    // The db group has no egress (egress: []) and its description defaults to the name.
    let steps = plan(&all, &cur);
    for s in &steps {
        assert_eq!(s.action, Action::Unchanged, "{}", all[s.index].id());
    }
    // An instance without a live namesake is created.
    cur.instances.retain(|i| i.instance_id != "i-1");
    let steps = plan(&all, &cur);
    assert_eq!(steps[4].action, Action::Create);
}

#[test]
fn everything_is_created_in_an_empty_account() {
    let all = parse(TWO_TIER);
    let steps = plan(&all, &Current::default());
    assert!(steps.iter().all(|s| s.action == Action::Create));
}

#[test]
fn rules_converge() {
    let text = TWO_TIER.replace(
        "- { protocol: tcp, port: 80, cidr: 0.0.0.0/0 }",
        "- { protocol: tcp, port: 443, cidr: 0.0.0.0/0 }\n    - { protocol: icmp, port: 8, cidr: 10.0.0.0/8 }",
    );
    let all = parse(&text);
    let steps = plan(&all, &applied());
    let Action::Update(ch) = &steps[2].action else {
        panic!("{:?}", steps[2].action)
    };
    assert_eq!(ch.len(), 2, "{ch:?}");
    assert_eq!(
        ch[0].op,
        Op::Revoke {
            egress: false,
            rule_ids: vec!["sgr-1".into()]
        }
    );
    let Op::Authorize { egress, rules } = &ch[1].op else {
        panic!("{ch:?}")
    };
    assert!(!egress);
    assert_eq!((rules[0].from_port, rules[0].to_port), (443, 443));
    // icmp type 8: the code shows as -1.
    assert_eq!(
        (
            rules[1].ip_protocol.as_str(),
            rules[1].from_port,
            rules[1].to_port
        ),
        ("icmp", 8, -1)
    );
    assert!(ch[1].text.contains("+ tcp 443 0.0.0.0/0"), "{}", ch[1].text);
    // Every other resource is unchanged.
    for s in steps.iter().filter(|s| s.index != 2) {
        assert_eq!(s.action, Action::Unchanged);
    }
    // A rule naming a group that does not exist yet adds a rule (placeholder peer).
    let text = TWO_TIER.replace("sourceGroup: web", "sourceGroup: cache");
    let text = format!("{text}kind: SecurityGroup\nname: cache\nspec: {{vpc: two-tier}}\n");
    let all = parse(&text);
    let steps = plan(&all, &applied());
    let Action::Update(ch) = &steps[3].action else {
        panic!("{:?}", steps[3].action)
    };
    assert!(
        ch.iter()
            .any(|c| c.text.contains("<new securitygroup/cache>")),
        "{ch:?}"
    );
    assert_eq!(steps[7].action, Action::Create);
}

#[test]
fn immutable_fields_are_reported() {
    let text = TWO_TIER.replace("10.0.1.0/24", "10.0.9.0/24");
    let steps = plan(&parse(&text), &applied());
    let Action::Immutable(f) = &steps[1].action else {
        panic!("{:?}", steps[1].action)
    };
    assert!(
        f[0].starts_with("spec.cidrBlock: field is immutable"),
        "{f:?}"
    );
    let text = TWO_TIER.replace("securityGroups: [web]", "securityGroups: [db]");
    let steps = plan(&parse(&text), &applied());
    assert!(
        matches!(&steps[4].action, Action::Immutable(f) if f[0].starts_with("spec.securityGroups")),
        "{:?}",
        steps[4].action
    );
}

#[test]
fn targets_listeners_and_tags_converge() {
    let text = TWO_TIER
        .replace(
            "targets: [ { instance: web-1 } ]",
            "targets: [ { instance: web-1, port: 8080 } ], deregistrationDelaySeconds: 10",
        )
        .replace(
            "{ port: 80, targetGroup: web }",
            "{ port: 443, targetGroup: web }",
        );
    let mut all = parse(&text);
    all[0].tags.insert("env".into(), "prod".into());
    let steps = plan(&all, &applied());
    let Action::Update(ch) = &steps[5].action else {
        panic!("{:?}", steps[5].action)
    };
    let ops: Vec<&Op> = ch.iter().map(|c| &c.op).collect();
    assert!(matches!(
        ops[0],
        Op::ModifyTargetGroup {
            deregistration_delay_seconds: Some(10),
            health_check: None
        }
    ));
    assert!(matches!(ops[1], Op::Deregister(t) if t[0].port == 80));
    assert!(matches!(ops[2], Op::Register(t) if t[0].port == 8080 && t[0].id == "i-1"));
    let Action::Update(ch) = &steps[6].action else {
        panic!("{:?}", steps[6].action)
    };
    assert_eq!(ch[0].op, Op::DeleteListener("lis-1".into()));
    assert!(
        matches!(&ch[1].op, Op::CreateListener { port: 443, target_group_id, .. } if target_group_id == "tg-1")
    );
    let Action::Update(ch) = &steps[0].action else {
        panic!("{:?}", steps[0].action)
    };
    assert!(matches!(&ch[0].op, Op::Tags(t) if t.len() == 1 && t[0].key == "env"));
}

#[test]
fn create_requests_and_tokens() {
    let all = parse(TWO_TIER);
    let cur = applied();
    let Create::Instance(req) = create_request(&all[4], &cur, 0).unwrap() else {
        panic!()
    };
    assert_eq!(req.subnet_id, "subnet-1");
    assert_eq!(req.security_group_ids, ["sg-web"]);
    assert_eq!(req.count, 1);
    assert!(
        req.tags
            .iter()
            .any(|t| t.key == "Name" && t.value == "web-1")
    );
    assert!(
        req.tags
            .iter()
            .any(|t| t.key == MANAGED_BY && t.value == "apply")
    );
    let parents = ["subnet-1".to_owned(), "sg-web".to_owned()];
    let t0 = client_token(&all[4], &parents, 0);
    assert_eq!(t0, req.client_token);
    assert_ne!(
        t0,
        client_token(&all[4], &["subnet-2".into(), "sg-web".into()], 0)
    );
    assert_ne!(t0, client_token(&all[4], &parents, 1));
    assert!(t0.len() <= 64 && !t0.contains('/'), "{t0}");
    let changed = parse(&TWO_TIER.replace("securityGroups: [web]", "securityGroups: [web, db]"));
    assert_ne!(t0, client_token(&changed[4], &parents, 0));
    let Create::SecurityGroup(g) = create_request(&all[3], &cur, 0).unwrap() else {
        panic!()
    };
    assert_eq!(
        (g.group_name.as_str(), g.description.as_str()),
        ("db", "db")
    );
    // Parents must exist.
    assert!(create_request(&all[1], &Current::default(), 0).is_err());
}

const ACL: &str = r#"
kind: NetworkAcl
name: public-acl
spec:
  vpc: two-tier
  subnets: [public]
  inbound:
    - { rule: 100, protocol: tcp, port: 80, cidr: 0.0.0.0/0, action: allow }
    - { rule: 200, protocol: all, cidr: 0.0.0.0/0, action: Deny }
  outbound:
    - { rule: 100, protocol: tcp, port: "1024-65535", cidr: 0.0.0.0/0, action: allow }
"#;

fn entry(
    rule: u32,
    proto: &str,
    from: i32,
    to: i32,
    action: &str,
    egress: bool,
) -> pb::NetworkAclEntry {
    pb::NetworkAclEntry {
        rule_number: rule,
        protocol: proto.into(),
        rule_action: action.into(),
        egress,
        cidr_block: "0.0.0.0/0".into(),
        from_port: from,
        to_port: to,
    }
}

/// The account with the ACL of `ACL` applied.
fn applied_acl() -> Current {
    let mut cur = applied();
    cur.acls[0].subnet_ids.clear();
    cur.acls.push(pb::NetworkAcl {
        network_acl_id: "acl-1".into(),
        vpc_id: "vpc-1".into(),
        entries: vec![
            entry(100, "tcp", 80, 80, "allow", false),
            entry(200, "-1", -1, -1, "deny", false),
            entry(100, "tcp", 1024, 65535, "allow", true),
        ],
        subnet_ids: vec!["subnet-1".into()],
        tags: tags("public-acl"),
        ..Default::default()
    });
    cur
}

#[test]
fn network_acls_parse_and_are_checked() {
    let all = parse(&format!("{TWO_TIER}{ACL}"));
    assert_eq!(all[7].kind, Kind::NetworkAcl);
    assert_eq!(Kind::parse("networkacl"), Some(Kind::NetworkAcl));
    assert!(check_refs(&all, &Current::default()).is_empty());
    // Created after the VPC, with the security groups; subnets are soft references.
    let order = creation_order(&all);
    let pos = |i: usize| order.iter().position(|&j| j == i).unwrap();
    assert!(pos(0) < pos(7) && pos(7) < pos(4));
    assert!(
        all[7]
            .refs()
            .iter()
            .any(|r| r.kind == Kind::Subnet && !r.hard)
    );
    let bad = |from: &str, to: &str| errors(&ACL.replace(from, to));
    let e = bad("rule: 200", "rule: 32767");
    assert!(
        e[0].contains("spec.inbound[1].rule: 32767: expected a rule number 1-32766"),
        "{e:?}"
    );
    let e = bad("rule: 200", "rule: 0");
    assert!(e[0].contains("spec.inbound[1].rule"), "{e:?}");
    let e = bad("rule: 200", "rule: 100");
    assert!(
        e[0].contains("spec.inbound[1].rule: rule 100 is also inbound[0]"),
        "{e:?}"
    );
    let e = bad("action: Deny", "action: reject");
    assert!(
        e[0].contains("spec.inbound[1].action: \"reject\": expected allow or deny"),
        "{e:?}"
    );
    let e = bad("port: 80,", "port: http,");
    assert!(e[0].contains("spec.inbound[0].port"), "{e:?}");
    let e = bad(
        "cidr: 0.0.0.0/0, action: Deny",
        "cidr: 0.0.0.0, action: Deny",
    );
    assert!(e[0].contains("spec.inbound[1].cidr"), "{e:?}");
    let e = bad("protocol: all", "protocol: gre");
    assert!(e[0].contains("spec.inbound[1].protocol"), "{e:?}");
    let e = bad("subnets: [public]", "subnets: [public, public]");
    assert!(
        e[0].contains("spec.subnets[1]: subnet \"public\" is listed twice"),
        "{e:?}"
    );
    let e = bad("inbound:", "inboud:");
    assert!(e[0].contains("unknown field `inboud`"), "{e:?}");
    // Two ACLs claiming one subnet.
    let two = format!("{ACL}---\n{}", ACL.replace("public-acl", "other-acl"));
    let e = errors(&two);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("(NetworkAcl/other-acl): spec.subnets[0]: subnet \"public\" is also associated with NetworkAcl/public-acl"), "{e:?}");
    // References: an unknown subnet; a subnet of another VPC.
    let one = parse(&ACL.replace("[public]", "[nope]"));
    let p = check_refs(&one, &applied());
    assert_eq!(p.len(), 1);
    assert!(
        p[0].0.contains("spec.subnets[0]: no Subnet named \"nope\""),
        "{p:?}"
    );
    let mut cur = applied();
    cur.vpcs.push(pb::Vpc {
        vpc_id: "vpc-2".into(),
        tags: tags("other"),
        ..Default::default()
    });
    let other = parse(&ACL.replace("vpc: two-tier", "vpc: other"));
    let p = check_refs(&other, &cur);
    assert!(
        p[0].0
            .contains("spec.subnets[0]: subnet \"public\" is in VPC vpc-1"),
        "{p:?}"
    );
}

#[test]
fn network_acls_converge() {
    let all = parse(&format!("{TWO_TIER}{ACL}"));
    // Created with no entries; entries and associations follow as changes.
    let steps = plan(&all, &applied());
    assert_eq!(steps[7].action, Action::Create);
    let Create::NetworkAcl(req) = create_request(&all[7], &applied(), 0).unwrap() else {
        panic!()
    };
    assert_eq!(req.vpc_id, "vpc-1");
    assert!(req.client_token.starts_with("apply-networkacl-"));
    let mut cur = applied();
    cur.acls.push(pb::NetworkAcl {
        network_acl_id: "acl-1".into(),
        vpc_id: "vpc-1".into(),
        tags: tags("public-acl"),
        ..Default::default()
    });
    let Action::Update(ch) = &plan(&all, &cur)[7].action else {
        panic!()
    };
    let ops: Vec<&Op> = ch.iter().map(|c| &c.op).collect();
    assert!(
        matches!(ops[0], Op::CreateAclEntries(e) if e.len() == 2 && e[1].protocol == "-1" && e[1].rule_action == "deny")
    );
    assert!(
        matches!(ops[1], Op::CreateAclEntries(e) if e[0].egress && (e[0].from_port, e[0].to_port) == (1024, 65535))
    );
    assert_eq!(
        ops[2],
        &Op::Associate {
            subnet_ids: vec!["subnet-1".into()],
            network_acl_id: "acl-1".into()
        }
    );
    // Applied: unchanged.
    let steps = plan(&all, &applied_acl());
    for s in &steps {
        assert_eq!(s.action, Action::Unchanged, "{}", all[s.index].id());
    }
    // One entry changed, one gone, one new: deleted and re-created by number.
    let text = format!("{TWO_TIER}{ACL}")
        .replace("port: 80, cidr", "port: 443, cidr")
        .replace(
            "    - { rule: 200, protocol: all, cidr: 0.0.0.0/0, action: Deny }\n",
            "    - { rule: 300, protocol: icmp, port: 8, cidr: 0.0.0.0/0, action: allow }\n",
        );
    let all2 = parse(&text);
    let Action::Update(ch) = &plan(&all2, &applied_acl())[7].action else {
        panic!()
    };
    assert_eq!(ch.len(), 2, "{ch:?}");
    assert_eq!(
        ch[0].op,
        Op::DeleteAclEntries {
            egress: false,
            rule_numbers: vec![100, 200]
        }
    );
    let Op::CreateAclEntries(e) = &ch[1].op else {
        panic!()
    };
    assert_eq!((e[0].rule_number, e[0].from_port), (100, 443));
    assert_eq!(
        (e[1].protocol.as_str(), e[1].from_port, e[1].to_port),
        ("icmp", 8, -1)
    );
    assert!(
        ch[0]
            .text
            .starts_with("spec.inbound: - 100 allow tcp 80 0.0.0.0/0"),
        "{}",
        ch[0].text
    );
    assert!(
        ch[1].text.contains("+ 300 allow icmp 8 0.0.0.0/0"),
        "{}",
        ch[1].text
    );
    // A subnet no longer listed goes back to the default ACL.
    let none = parse(&format!("{TWO_TIER}{}", ACL.replace("[public]", "[]")));
    let Action::Update(ch) = &plan(&none, &applied_acl())[7].action else {
        panic!()
    };
    assert_eq!(
        ch[0].op,
        Op::Associate {
            subnet_ids: vec!["subnet-1".into()],
            network_acl_id: "acl-def".into()
        }
    );
    assert!(
        ch[0].text.contains("- public (to the default ACL acl-def)"),
        "{}",
        ch[0].text
    );
    // The VPC cannot change.
    let mut cur = applied_acl();
    cur.acls[1].vpc_id = "vpc-9".into();
    assert!(
        matches!(&plan(&all, &cur)[7].action, Action::Immutable(f) if f[0].starts_with("spec.vpc"))
    );
}
