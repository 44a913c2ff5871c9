//! `SecurityService`: security groups and network ACLs.
//!
//! AWS semantics (see `/work/shared/semantics.md`):
//! - A new security group has no inbound rules and one allow-all outbound rule. Names are
//!   unique per VPC (case-insensitively, as in AWS), `default` is reserved and names may
//!   not start with `sg-`. A VPC's default group cannot be deleted; neither can a group
//!   that an instance or another group's rule uses (DependencyViolation).
//! - Rules: protocol, ports, and exactly one of a CIDR and a security group of the same
//!   VPC. A rule equal to an existing one is ALREADY_EXISTS (InvalidPermission.Duplicate).
//!   ICMP codes are not matched (the data plane matches the type only), so two ICMP rules
//!   that differ only in the code are duplicates.
//! - A new custom network ACL has no entries (denies everything). Entries are numbered
//!   1-32766, unique per direction. The default ACL cannot be deleted; neither can an ACL
//!   that subnets are associated with.
//!
//! Differences from AWS: describe does not list the implicit final deny entry (rule
//! `*`/32767) of ACLs; the association call takes a subnet id instead of an association id.

use std::collections::BTreeMap;

use tonic::{Request, Response, Status};
use vpc_proto::v1::{self as pb, security_service_server::SecurityService};

use super::error::{ApiError, ApiResult};
use super::network::{allow_all_egress, pb_tags};
use super::records::{
    AclRec, InstanceRec, Meta, SgRec, SgRuleRec, SubnetRec, VpcRec, child_key, child_prefix, kind,
    now_ms, sg_name_key,
};
use super::tx::Tx;
use super::{Api, by_ids, claim_token, ids, list_page, respond, validate};
use crate::policy::compile::MAX_ACL_RULE;
use crate::policy::model::{AclAction, AclRule, Protocol, SgRule};

/// Longest group name and description, rule description (AWS: 255).
const MAX_TEXT: usize = 255;

/// The service.
#[derive(Clone, Debug)]
pub struct Security {
    api: Api,
}

impl Security {
    /// Over the shared API state.
    pub fn new(api: Api) -> Self {
        Security { api }
    }
}

/// The last segment of an index key (the child's id).
fn last_segment(key: &str) -> String {
    key.rsplit('/').next().unwrap_or_default().to_owned()
}

/// The name key of a group: names are unique per VPC regardless of case.
fn name_key(account: &str, vpc: &str, name: &str) -> String {
    sg_name_key(account, vpc, &name.to_lowercase())
}

/// A protocol as the API shows it (AWS: `-1` for all).
fn pb_protocol(p: Protocol) -> String {
    match p {
        Protocol::All => "-1".into(),
        other => other.to_string(),
    }
}

/// A rule's ports as the API shows them: tcp/udp ranges, the ICMP type (code -1: any),
/// -1 where there are none.
fn pb_ports(protocol: Protocol, from: Option<u16>, to: Option<u16>) -> (i32, i32) {
    match (protocol, from, to) {
        (Protocol::ICMP, Some(t), _) => (i32::from(t), -1),
        (Protocol::TCP | Protocol::UDP, None, _) => (0, 65535),
        (_, Some(f), Some(t)) => (i32::from(f), i32::from(t)),
        _ => (-1, -1),
    }
}

fn pb_rule(r: &SgRuleRec, is_egress: bool) -> pb::SecurityGroupRule {
    let (from_port, to_port) = pb_ports(r.rule.protocol, r.rule.from_port, r.rule.to_port);
    pb::SecurityGroupRule {
        security_group_rule_id: r.id.clone(),
        ip_protocol: pb_protocol(r.rule.protocol),
        from_port,
        to_port,
        cidr_ipv4: r.rule.cidr.map(|c| c.to_string()).unwrap_or_default(),
        referenced_group_id: r.rule.group.clone().unwrap_or_default(),
        description: r.description.clone(),
        is_egress,
    }
}

fn pb_sg(g: &SgRec) -> pb::SecurityGroup {
    pb::SecurityGroup {
        group_id: g.meta.id.clone(),
        group_name: g.name.clone(),
        description: g.description.clone(),
        vpc_id: g.vpc.clone(),
        owner_id: g.meta.account.clone(),
        ingress_rules: g.ingress.iter().map(|r| pb_rule(r, false)).collect(),
        egress_rules: g.egress.iter().map(|r| pb_rule(r, true)).collect(),
        tags: pb_tags(&g.meta.tags),
    }
}

fn pb_entry(r: &AclRule, egress: bool) -> pb::NetworkAclEntry {
    let (from_port, to_port) = pb_ports(r.protocol, r.from_port, r.to_port);
    pb::NetworkAclEntry {
        rule_number: u32::from(r.rule),
        protocol: pb_protocol(r.protocol),
        rule_action: match r.action {
            AclAction::Allow => "allow".into(),
            AclAction::Deny => "deny".into(),
        },
        egress,
        cidr_block: r.cidr.to_string(),
        from_port,
        to_port,
    }
}

fn pb_acl(a: &AclRec, subnet_ids: Vec<String>) -> pb::NetworkAcl {
    pb::NetworkAcl {
        network_acl_id: a.meta.id.clone(),
        vpc_id: a.vpc.clone(),
        is_default: a.default,
        entries: a
            .inbound
            .iter()
            .map(|r| pb_entry(r, false))
            .chain(a.outbound.iter().map(|r| pb_entry(r, true)))
            .collect(),
        subnet_ids,
        owner_id: a.meta.account.clone(),
        tags: pb_tags(&a.meta.tags),
    }
}

/// An error on a field of a nested message (`entry` -> `entry.cidr_block`).
fn nested(e: ApiError, parent: &str) -> ApiError {
    match e {
        ApiError::Invalid { field, message } => ApiError::Invalid {
            field: format!("{parent}.{field}"),
            message,
        },
        other => other,
    }
}

/// A rule as the request gives it, validated except for its group reference (which needs
/// the store).
#[derive(Clone, Debug)]
struct NewRule {
    rule: SgRule,
    description: String,
}

/// Validates one rule of an authorize request (fields relative to the rule).
fn parse_rule(r: &pb::SecurityGroupRule) -> ApiResult<NewRule> {
    let protocol = validate::protocol("ip_protocol", &r.ip_protocol)?;
    let (from_port, to_port) = validate::ports(protocol, r.from_port, r.to_port)?;
    let (cidr, group) = match (
        r.cidr_ipv4.trim().is_empty(),
        r.referenced_group_id.is_empty(),
    ) {
        (true, true) => {
            return Err(ApiError::invalid(
                "cidr_ipv4",
                "one of cidr_ipv4 and referenced_group_id is required",
            ));
        }
        (false, false) => {
            return Err(ApiError::invalid(
                "referenced_group_id",
                "give either cidr_ipv4 or referenced_group_id, not both",
            ));
        }
        (false, true) => (Some(validate::rule_cidr("cidr_ipv4", &r.cidr_ipv4)?), None),
        (true, false) => (
            None,
            Some(validate::id(
                "referenced_group_id",
                kind::SG,
                &r.referenced_group_id,
            )?),
        ),
    };
    if r.description.chars().count() > MAX_TEXT {
        return Err(ApiError::invalid(
            "description",
            format!("at most {MAX_TEXT} characters"),
        ));
    }
    Ok(NewRule {
        rule: SgRule {
            protocol,
            from_port,
            to_port,
            cidr,
            group,
        },
        description: r.description.clone(),
    })
}

/// Validates an ACL entry (fields relative to the entry).
fn parse_entry(e: &pb::NetworkAclEntry) -> ApiResult<AclRule> {
    let rule = u16::try_from(e.rule_number)
        .ok()
        .filter(|n| (1..=MAX_ACL_RULE).contains(n))
        .ok_or_else(|| {
            ApiError::invalid(
                "rule_number",
                format!("{}: expected 1 to {MAX_ACL_RULE}", e.rule_number),
            )
        })?;
    let action = match e.rule_action.trim().to_ascii_lowercase().as_str() {
        "allow" => AclAction::Allow,
        "deny" => AclAction::Deny,
        "" => return Err(ApiError::invalid("rule_action", "required: allow or deny")),
        other => {
            return Err(ApiError::invalid(
                "rule_action",
                format!("{other:?}: expected allow or deny"),
            ));
        }
    };
    let protocol = validate::protocol("protocol", &e.protocol)?;
    let (from_port, to_port) = validate::ports(protocol, e.from_port, e.to_port)?;
    if e.cidr_block.trim().is_empty() {
        return Err(ApiError::invalid(
            "cidr_block",
            "required (an IPv4 CIDR such as 0.0.0.0/0)",
        ));
    }
    let cidr = validate::rule_cidr("cidr_block", &e.cidr_block)?;
    Ok(AclRule {
        rule,
        protocol,
        from_port,
        to_port,
        cidr,
        action,
    })
}

fn direction(egress: bool) -> &'static str {
    if egress { "outbound" } else { "inbound" }
}

impl Security {
    async fn create_security_group_for(
        &self,
        account: String,
        req: pb::CreateSecurityGroupRequest,
    ) -> ApiResult<Response<pb::CreateSecurityGroupResponse>> {
        let vpc_id = validate::id("vpc_id", kind::VPC, &req.vpc_id)?;
        let name = validate::name("group_name", &req.group_name, MAX_TEXT)?;
        if name.eq_ignore_ascii_case("default") {
            return Err(ApiError::invalid(
                "group_name",
                "\"default\" is reserved for the VPC's default group",
            ));
        }
        if name.to_ascii_lowercase().starts_with("sg-") {
            return Err(ApiError::invalid("group_name", "must not start with sg-"));
        }
        let description = validate::name("description", &req.description, MAX_TEXT)?;
        let tags = validate::tags(&req.tags)?;
        let token = validate::client_token(&req.client_token)?;
        let quota = self.api.quotas.security_groups_per_vpc;
        let (g, rev) = self
            .api
            .write(&account, |mut tx| {
                let (req, tags, token) = (&req, tags.clone(), token.clone());
                let (vpc_id, name, description) =
                    (vpc_id.clone(), name.clone(), description.clone());
                async move {
                    let id = ids::new_id(kind::SG);
                    if let Some(existing) = claim_token(
                        &mut tx,
                        kind::SG,
                        token.as_deref(),
                        req,
                        std::slice::from_ref(&id),
                    )
                    .await?
                    {
                        let g: SgRec = tx.must(kind::SG, "security group", &existing[0]).await?;
                        return Ok((tx, g));
                    }
                    tx.must::<VpcRec>(kind::VPC, "VPC", &vpc_id).await?;
                    let acct = tx.account().to_owned();
                    let key = name_key(&acct, &vpc_id, &name);
                    if let Some(kv) = tx.store().get(&key).await? {
                        return Err(ApiError::AlreadyExists(format!(
                            "a security group named {name:?} already exists in VPC {vpc_id} \
                             ({}) (InvalidGroup.Duplicate)",
                            String::from_utf8_lossy(&kv.value)
                        )));
                    }
                    let count = tx
                        .keys(&child_prefix(&acct, &vpc_id, kind::SG), quota + 1)
                        .await?
                        .len();
                    if count >= quota {
                        return Err(ApiError::Exhausted(format!(
                            "VPC {vpc_id} has {count} security groups; the quota is {quota} \
                             (SecurityGroupLimitExceeded)"
                        )));
                    }
                    let g = SgRec {
                        meta: Meta {
                            id: id.clone(),
                            account: acct.clone(),
                            tags,
                            created_ms: now_ms(),
                        },
                        vpc: vpc_id.clone(),
                        name,
                        description,
                        default: false,
                        ingress: Vec::new(),
                        egress: vec![allow_all_egress()],
                    };
                    tx.require_absent(key.clone());
                    tx.put_raw(key, id.as_bytes().to_vec());
                    tx.put(kind::SG, &id, &g)?;
                    tx.put_raw(child_key(&acct, &vpc_id, kind::SG, &id), Vec::new());
                    Ok((tx, g))
                }
            })
            .await?;
        Ok(respond(
            pb::CreateSecurityGroupResponse {
                security_group: Some(pb_sg(&g)),
            },
            rev,
        ))
    }

    async fn describe_security_groups_for(
        &self,
        account: String,
        req: pb::DescribeSecurityGroupsRequest,
    ) -> ApiResult<Response<pb::DescribeSecurityGroupsResponse>> {
        let tx = self.api.read(&account).await?;
        let vpc = if req.vpc_id.is_empty() {
            None
        } else {
            let vpc = validate::id("vpc_id", kind::VPC, &req.vpc_id)?;
            tx.must::<VpcRec>(kind::VPC, "VPC", &vpc).await?;
            Some(vpc)
        };
        let (groups, next_token) = if !req.group_ids.is_empty() {
            let all: Vec<SgRec> =
                by_ids(&tx, kind::SG, "security group", "group_ids", &req.group_ids).await?;
            let groups = all
                .into_iter()
                .filter(|g| vpc.as_ref().is_none_or(|v| g.vpc == *v))
                .collect();
            (groups, String::new())
        } else {
            list_page::<SgRec>(&tx, kind::SG, vpc.as_deref(), req.page.as_ref()).await?
        };
        Ok(Response::new(pb::DescribeSecurityGroupsResponse {
            security_groups: groups.iter().map(pb_sg).collect(),
            next_token,
        }))
    }

    async fn delete_security_group_for(
        &self,
        account: String,
        req: pb::DeleteSecurityGroupRequest,
    ) -> ApiResult<Response<pb::DeleteSecurityGroupResponse>> {
        let id = validate::id("group_id", kind::SG, &req.group_id)?;
        let ((), rev) = self
            .api
            .write(&account, |mut tx| {
                let id = id.clone();
                async move {
                    let g: SgRec = tx.must(kind::SG, "security group", &id).await?;
                    if g.default {
                        return Err(ApiError::Precondition(format!(
                            "{id} is the default security group of VPC {}; it is deleted with \
                             the VPC (CannotDelete)",
                            g.vpc
                        )));
                    }
                    let instances: Vec<InstanceRec> = tx.all(kind::INSTANCE).await?;
                    if let Some(i) = instances
                        .iter()
                        .find(|i| i.state != "terminated" && i.security_groups.contains(&id))
                    {
                        return Err(ApiError::Precondition(format!(
                            "security group {id} is used by instance {}; remove it from the \
                             instance first (DependencyViolation)",
                            i.meta.id
                        )));
                    }
                    let groups: Vec<SgRec> = tx.all(kind::SG).await?;
                    for other in groups.iter().filter(|o| o.meta.id != id) {
                        let uses = other
                            .ingress
                            .iter()
                            .chain(&other.egress)
                            .find(|r| r.rule.group.as_deref() == Some(id.as_str()));
                        if let Some(r) = uses {
                            return Err(ApiError::Precondition(format!(
                                "security group {id} is referenced by rule {} of security group \
                                 {}; revoke it first (DependencyViolation)",
                                r.id, other.meta.id
                            )));
                        }
                    }
                    let acct = tx.account().to_owned();
                    tx.delete(kind::SG, &id);
                    tx.delete_raw(child_key(&acct, &g.vpc, kind::SG, &id));
                    tx.delete_raw(name_key(&acct, &g.vpc, &g.name));
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(respond(pb::DeleteSecurityGroupResponse {}, rev))
    }

    async fn authorize(
        &self,
        account: String,
        req: pb::AuthorizeSecurityGroupRequest,
        egress: bool,
    ) -> ApiResult<Response<pb::AuthorizeSecurityGroupResponse>> {
        let id = validate::id("group_id", kind::SG, &req.group_id)?;
        if req.rules.is_empty() {
            return Err(ApiError::invalid("rules", "at least one rule is required"));
        }
        let mut rules: Vec<NewRule> = Vec::with_capacity(req.rules.len());
        for (i, r) in req.rules.iter().enumerate() {
            let new = parse_rule(r).map_err(|e| e.within("rules", i))?;
            if let Some(j) = rules.iter().position(|o| o.rule == new.rule) {
                return Err(ApiError::invalid(
                    format!("rules[{i}]"),
                    format!("the same rule as rules[{j}] (InvalidPermission.Duplicate)"),
                ));
            }
            rules.push(new);
        }
        let limits = self.api.quotas.policy;
        let quota = if egress {
            limits.sg_outbound_rules
        } else {
            limits.sg_inbound_rules
        };
        let (added, rev) = self
            .api
            .write(&account, |mut tx| {
                let (id, rules) = (id.clone(), rules.clone());
                async move {
                    let mut g: SgRec = tx.must(kind::SG, "security group", &id).await?;
                    for (i, r) in rules.iter().enumerate() {
                        let Some(other) = r.rule.group.as_deref() else {
                            continue;
                        };
                        if other == id {
                            continue;
                        }
                        let o: SgRec = tx.must(kind::SG, "security group", other).await?;
                        if o.vpc != g.vpc {
                            return Err(ApiError::invalid(
                                "referenced_group_id",
                                format!("{other} is in VPC {}, not in {id}'s VPC {}", o.vpc, g.vpc),
                            )
                            .within("rules", i));
                        }
                    }
                    let list = if egress {
                        &mut g.egress
                    } else {
                        &mut g.ingress
                    };
                    for (i, r) in rules.iter().enumerate() {
                        if let Some(e) = list.iter().find(|e| e.rule == r.rule) {
                            return Err(ApiError::AlreadyExists(format!(
                                "rules[{i}] is the same as {} rule {} of {id} \
                                 (InvalidPermission.Duplicate)",
                                direction(egress),
                                e.id
                            )));
                        }
                    }
                    if list.len() + rules.len() > quota {
                        return Err(ApiError::Exhausted(format!(
                            "{id} has {} {} rules; adding {} exceeds the quota of {quota} \
                             (RulesPerSecurityGroupLimitExceeded)",
                            list.len(),
                            direction(egress),
                            rules.len()
                        )));
                    }
                    let added: Vec<SgRuleRec> = rules
                        .into_iter()
                        .map(|r| SgRuleRec {
                            id: ids::new_id(kind::SG_RULE),
                            rule: r.rule,
                            description: r.description,
                        })
                        .collect();
                    list.extend(added.iter().cloned());
                    tx.put(kind::SG, &id, &g)?;
                    Ok((tx, added))
                }
            })
            .await?;
        Ok(respond(
            pb::AuthorizeSecurityGroupResponse {
                rules: added.iter().map(|r| pb_rule(r, egress)).collect(),
            },
            rev,
        ))
    }

    async fn revoke(
        &self,
        account: String,
        req: pb::RevokeSecurityGroupRequest,
        egress: bool,
    ) -> ApiResult<Response<pb::RevokeSecurityGroupResponse>> {
        let id = validate::id("group_id", kind::SG, &req.group_id)?;
        if req.security_group_rule_ids.is_empty() {
            return Err(ApiError::invalid(
                "security_group_rule_ids",
                "at least one rule id is required",
            ));
        }
        let rule_ids = req
            .security_group_rule_ids
            .iter()
            .enumerate()
            .map(|(i, r)| validate::id(&format!("security_group_rule_ids[{i}]"), kind::SG_RULE, r))
            .collect::<ApiResult<Vec<_>>>()?;
        let ((), rev) = self
            .api
            .write(&account, |mut tx| {
                let (id, rule_ids) = (id.clone(), rule_ids.clone());
                async move {
                    let mut g: SgRec = tx.must(kind::SG, "security group", &id).await?;
                    let list = if egress {
                        &mut g.egress
                    } else {
                        &mut g.ingress
                    };
                    if let Some(missing) =
                        rule_ids.iter().find(|r| !list.iter().any(|e| e.id == **r))
                    {
                        return Err(ApiError::NotFound {
                            kind: if egress {
                                "outbound security group rule"
                            } else {
                                "inbound security group rule"
                            },
                            id: format!("{missing} of {id}"),
                        });
                    }
                    list.retain(|e| !rule_ids.contains(&e.id));
                    tx.put(kind::SG, &id, &g)?;
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(respond(pb::RevokeSecurityGroupResponse {}, rev))
    }

    async fn create_network_acl_for(
        &self,
        account: String,
        req: pb::CreateNetworkAclRequest,
    ) -> ApiResult<Response<pb::CreateNetworkAclResponse>> {
        let vpc_id = validate::id("vpc_id", kind::VPC, &req.vpc_id)?;
        let tags = validate::tags(&req.tags)?;
        let token = validate::client_token(&req.client_token)?;
        let quota = self.api.quotas.network_acls_per_vpc;
        let (a, rev) = self
            .api
            .write(&account, |mut tx| {
                let (req, tags, token, vpc_id) =
                    (&req, tags.clone(), token.clone(), vpc_id.clone());
                async move {
                    let id = ids::new_id(kind::ACL);
                    if let Some(existing) = claim_token(
                        &mut tx,
                        kind::ACL,
                        token.as_deref(),
                        req,
                        std::slice::from_ref(&id),
                    )
                    .await?
                    {
                        let a: AclRec = tx.must(kind::ACL, "network ACL", &existing[0]).await?;
                        return Ok((tx, a));
                    }
                    tx.must::<VpcRec>(kind::VPC, "VPC", &vpc_id).await?;
                    let acct = tx.account().to_owned();
                    let count = tx
                        .keys(&child_prefix(&acct, &vpc_id, kind::ACL), quota + 1)
                        .await?
                        .len();
                    if count >= quota {
                        return Err(ApiError::Exhausted(format!(
                            "VPC {vpc_id} has {count} network ACLs; the quota is {quota} \
                             (NetworkAclLimitExceeded)"
                        )));
                    }
                    let a = AclRec {
                        meta: Meta {
                            id: id.clone(),
                            account: acct.clone(),
                            tags,
                            created_ms: now_ms(),
                        },
                        vpc: vpc_id.clone(),
                        default: false,
                        inbound: Vec::new(),
                        outbound: Vec::new(),
                    };
                    tx.put(kind::ACL, &id, &a)?;
                    tx.put_raw(child_key(&acct, &vpc_id, kind::ACL, &id), Vec::new());
                    Ok((tx, a))
                }
            })
            .await?;
        Ok(respond(
            pb::CreateNetworkAclResponse {
                network_acl: Some(pb_acl(&a, Vec::new())),
            },
            rev,
        ))
    }

    /// The subnets of a VPC.
    async fn subnets_of(tx: &Tx, vpc: &str) -> ApiResult<Vec<SubnetRec>> {
        let mut out = Vec::new();
        for kv in tx
            .keys(&child_prefix(tx.account(), vpc, kind::SUBNET), 0)
            .await?
        {
            if let Some(s) = tx
                .get::<SubnetRec>(kind::SUBNET, &last_segment(&kv.key))
                .await?
            {
                out.push(s);
            }
        }
        Ok(out)
    }

    async fn describe_network_acls_for(
        &self,
        account: String,
        req: pb::DescribeNetworkAclsRequest,
    ) -> ApiResult<Response<pb::DescribeNetworkAclsResponse>> {
        let tx = self.api.read(&account).await?;
        let vpc = if req.vpc_id.is_empty() {
            None
        } else {
            let vpc = validate::id("vpc_id", kind::VPC, &req.vpc_id)?;
            tx.must::<VpcRec>(kind::VPC, "VPC", &vpc).await?;
            Some(vpc)
        };
        let (acls, next_token) = if !req.network_acl_ids.is_empty() {
            let all: Vec<AclRec> = by_ids(
                &tx,
                kind::ACL,
                "network ACL",
                "network_acl_ids",
                &req.network_acl_ids,
            )
            .await?;
            let acls = all
                .into_iter()
                .filter(|a| vpc.as_ref().is_none_or(|v| a.vpc == *v))
                .collect();
            (acls, String::new())
        } else {
            list_page::<AclRec>(&tx, kind::ACL, vpc.as_deref(), req.page.as_ref()).await?
        };
        let mut subnets: BTreeMap<String, Vec<SubnetRec>> = BTreeMap::new();
        let mut out = Vec::with_capacity(acls.len());
        for a in &acls {
            if !subnets.contains_key(&a.vpc) {
                subnets.insert(a.vpc.clone(), Self::subnets_of(&tx, &a.vpc).await?);
            }
            let ids = subnets[&a.vpc]
                .iter()
                .filter(|s| s.network_acl == a.meta.id)
                .map(|s| s.meta.id.clone())
                .collect();
            out.push(pb_acl(a, ids));
        }
        Ok(Response::new(pb::DescribeNetworkAclsResponse {
            network_acls: out,
            next_token,
        }))
    }

    async fn delete_network_acl_for(
        &self,
        account: String,
        req: pb::DeleteNetworkAclRequest,
    ) -> ApiResult<Response<pb::DeleteNetworkAclResponse>> {
        let id = validate::id("network_acl_id", kind::ACL, &req.network_acl_id)?;
        let ((), rev) = self
            .api
            .write(&account, |mut tx| {
                let id = id.clone();
                async move {
                    let a: AclRec = tx.must(kind::ACL, "network ACL", &id).await?;
                    if a.default {
                        return Err(ApiError::Precondition(format!(
                            "{id} is the default network ACL of VPC {}; it is deleted with the \
                             VPC (CannotDelete)",
                            a.vpc
                        )));
                    }
                    if let Some(s) = Self::subnets_of(&tx, &a.vpc)
                        .await?
                        .iter()
                        .find(|s| s.network_acl == id)
                    {
                        return Err(ApiError::Precondition(format!(
                            "network ACL {id} is associated with subnet {}; associate the subnet \
                             with another ACL first (DependencyViolation)",
                            s.meta.id
                        )));
                    }
                    let acct = tx.account().to_owned();
                    tx.delete(kind::ACL, &id);
                    tx.delete_raw(child_key(&acct, &a.vpc, kind::ACL, &id));
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(respond(pb::DeleteNetworkAclResponse {}, rev))
    }

    async fn create_network_acl_entry_for(
        &self,
        account: String,
        req: pb::CreateNetworkAclEntryRequest,
    ) -> ApiResult<Response<pb::CreateNetworkAclEntryResponse>> {
        let id = validate::id("network_acl_id", kind::ACL, &req.network_acl_id)?;
        let Some(entry) = req.entry.as_ref() else {
            return Err(ApiError::invalid("entry", "required"));
        };
        let rule = parse_entry(entry).map_err(|e| nested(e, "entry"))?;
        let egress = entry.egress;
        let limits = self.api.quotas.policy;
        let quota = if egress {
            limits.acl_outbound_rules
        } else {
            limits.acl_inbound_rules
        };
        let ((), rev) = self
            .api
            .write(&account, |mut tx| {
                let (id, rule) = (id.clone(), rule.clone());
                async move {
                    let mut a: AclRec = tx.must(kind::ACL, "network ACL", &id).await?;
                    let list = if egress {
                        &mut a.outbound
                    } else {
                        &mut a.inbound
                    };
                    if list.iter().any(|r| r.rule == rule.rule) {
                        return Err(ApiError::AlreadyExists(format!(
                            "{id} already has {} entry {} (NetworkAclEntryAlreadyExists)",
                            direction(egress),
                            rule.rule
                        )));
                    }
                    if list.len() >= quota {
                        return Err(ApiError::Exhausted(format!(
                            "{id} has {} {} entries; the quota is {quota} \
                             (NetworkAclEntryLimitExceeded)",
                            list.len(),
                            direction(egress)
                        )));
                    }
                    let at = list.partition_point(|r| r.rule < rule.rule);
                    list.insert(at, rule);
                    tx.put(kind::ACL, &id, &a)?;
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(respond(pb::CreateNetworkAclEntryResponse {}, rev))
    }

    async fn delete_network_acl_entry_for(
        &self,
        account: String,
        req: pb::DeleteNetworkAclEntryRequest,
    ) -> ApiResult<Response<pb::DeleteNetworkAclEntryResponse>> {
        let id = validate::id("network_acl_id", kind::ACL, &req.network_acl_id)?;
        let number = u16::try_from(req.rule_number)
            .ok()
            .filter(|n| (1..=MAX_ACL_RULE).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(
                    "rule_number",
                    format!("{}: expected 1 to {MAX_ACL_RULE}", req.rule_number),
                )
            })?;
        let egress = req.egress;
        let ((), rev) = self
            .api
            .write(&account, |mut tx| {
                let id = id.clone();
                async move {
                    let mut a: AclRec = tx.must(kind::ACL, "network ACL", &id).await?;
                    let list = if egress {
                        &mut a.outbound
                    } else {
                        &mut a.inbound
                    };
                    let Some(at) = list.iter().position(|r| r.rule == number) else {
                        return Err(ApiError::NotFound {
                            kind: "network ACL entry",
                            id: format!("{} rule {number} of {id}", direction(egress)),
                        });
                    };
                    list.remove(at);
                    tx.put(kind::ACL, &id, &a)?;
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(respond(pb::DeleteNetworkAclEntryResponse {}, rev))
    }

    async fn replace_network_acl_association_for(
        &self,
        account: String,
        req: pb::ReplaceNetworkAclAssociationRequest,
    ) -> ApiResult<Response<pb::ReplaceNetworkAclAssociationResponse>> {
        let subnet_id = validate::id("subnet_id", kind::SUBNET, &req.subnet_id)?;
        let acl_id = validate::id("network_acl_id", kind::ACL, &req.network_acl_id)?;
        let ((), rev) = self
            .api
            .write(&account, |mut tx| {
                let (subnet_id, acl_id) = (subnet_id.clone(), acl_id.clone());
                async move {
                    // Both are looked up in the caller's account: another account's objects
                    // are NOT_FOUND, like unknown ones.
                    let mut s: SubnetRec = tx.must(kind::SUBNET, "subnet", &subnet_id).await?;
                    let a: AclRec = tx.must(kind::ACL, "network ACL", &acl_id).await?;
                    if a.vpc != s.vpc {
                        return Err(ApiError::invalid(
                            "network_acl_id",
                            format!(
                                "{acl_id} is in VPC {}, subnet {subnet_id} in VPC {}; a subnet \
                                 takes an ACL of its own VPC",
                                a.vpc, s.vpc
                            ),
                        ));
                    }
                    if s.network_acl != acl_id {
                        s.network_acl = acl_id;
                        tx.put(kind::SUBNET, &subnet_id, &s)?;
                    }
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(respond(pb::ReplaceNetworkAclAssociationResponse {}, rev))
    }
}

#[tonic::async_trait]
impl SecurityService for Security {
    async fn create_security_group(
        &self,
        r: Request<pb::CreateSecurityGroupRequest>,
    ) -> Result<Response<pb::CreateSecurityGroupResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(Security::create_security_group_for(self, account, r.into_inner()).await?)
    }

    async fn describe_security_groups(
        &self,
        r: Request<pb::DescribeSecurityGroupsRequest>,
    ) -> Result<Response<pb::DescribeSecurityGroupsResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(Security::describe_security_groups_for(self, account, r.into_inner()).await?)
    }

    async fn delete_security_group(
        &self,
        r: Request<pb::DeleteSecurityGroupRequest>,
    ) -> Result<Response<pb::DeleteSecurityGroupResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(Security::delete_security_group_for(self, account, r.into_inner()).await?)
    }

    async fn authorize_security_group_ingress(
        &self,
        r: Request<pb::AuthorizeSecurityGroupRequest>,
    ) -> Result<Response<pb::AuthorizeSecurityGroupResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(self.authorize(account, r.into_inner(), false).await?)
    }

    async fn authorize_security_group_egress(
        &self,
        r: Request<pb::AuthorizeSecurityGroupRequest>,
    ) -> Result<Response<pb::AuthorizeSecurityGroupResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(self.authorize(account, r.into_inner(), true).await?)
    }

    async fn revoke_security_group_ingress(
        &self,
        r: Request<pb::RevokeSecurityGroupRequest>,
    ) -> Result<Response<pb::RevokeSecurityGroupResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(self.revoke(account, r.into_inner(), false).await?)
    }

    async fn revoke_security_group_egress(
        &self,
        r: Request<pb::RevokeSecurityGroupRequest>,
    ) -> Result<Response<pb::RevokeSecurityGroupResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(self.revoke(account, r.into_inner(), true).await?)
    }

    async fn create_network_acl(
        &self,
        r: Request<pb::CreateNetworkAclRequest>,
    ) -> Result<Response<pb::CreateNetworkAclResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(Security::create_network_acl_for(self, account, r.into_inner()).await?)
    }

    async fn describe_network_acls(
        &self,
        r: Request<pb::DescribeNetworkAclsRequest>,
    ) -> Result<Response<pb::DescribeNetworkAclsResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(Security::describe_network_acls_for(self, account, r.into_inner()).await?)
    }

    async fn delete_network_acl(
        &self,
        r: Request<pb::DeleteNetworkAclRequest>,
    ) -> Result<Response<pb::DeleteNetworkAclResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(Security::delete_network_acl_for(self, account, r.into_inner()).await?)
    }

    async fn create_network_acl_entry(
        &self,
        r: Request<pb::CreateNetworkAclEntryRequest>,
    ) -> Result<Response<pb::CreateNetworkAclEntryResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(Security::create_network_acl_entry_for(self, account, r.into_inner()).await?)
    }

    async fn delete_network_acl_entry(
        &self,
        r: Request<pb::DeleteNetworkAclEntryRequest>,
    ) -> Result<Response<pb::DeleteNetworkAclEntryResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(Security::delete_network_acl_entry_for(self, account, r.into_inner()).await?)
    }

    async fn replace_network_acl_association(
        &self,
        r: Request<pb::ReplaceNetworkAclAssociationRequest>,
    ) -> Result<Response<pb::ReplaceNetworkAclAssociationResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(Security::replace_network_acl_association_for(self, account, r.into_inner()).await?)
    }
}

#[cfg(test)]
mod tests {
    use crate::api::test_support::*;
    use std::{sync::Arc, time::Duration};

    use tonic::{Code, Request};

    use vpc_proto::v1::{
        self as pb, security_service_server::SecurityService as _,
        vpc_service_server::VpcService as _,
    };

    use super::Security;
    use crate::api::{
        Api, Quotas,
        network::Network,
        records::{InstanceRec, Meta, kind},
    };

    const UNKNOWN_SG: &str = "sg-0123456789abcdef0";

    struct Env {
        api: Api,
        sec: Security,
        net: Network,
    }

    async fn env_with(quotas: Quotas) -> Env {
        let api = test_api(quotas).await;
        Env {
            sec: Security::new(api.clone()),
            net: Network::new(api.clone()),
            api,
        }
    }

    async fn env() -> Env {
        env_with(Quotas::default()).await
    }

    impl Env {
        async fn vpc(&self, token: &str, cidr: &str) -> pb::Vpc {
            let r = pb::CreateVpcRequest {
                cidr_block: cidr.into(),
                ..Default::default()
            };
            self.net
                .create_vpc(req(token, r))
                .await
                .unwrap()
                .into_inner()
                .vpc
                .unwrap()
        }

        async fn subnet(&self, token: &str, vpc: &str, cidr: &str) -> pb::Subnet {
            let r = pb::CreateSubnetRequest {
                vpc_id: vpc.into(),
                cidr_block: cidr.into(),
                ..Default::default()
            };
            self.net
                .create_subnet(req(token, r))
                .await
                .unwrap()
                .into_inner()
                .subnet
                .unwrap()
        }

        async fn create_sg(
            &self,
            token: &str,
            vpc: &str,
            name: &str,
        ) -> Result<pb::SecurityGroup, tonic::Status> {
            let r = pb::CreateSecurityGroupRequest {
                vpc_id: vpc.into(),
                group_name: name.into(),
                description: format!("{name} servers"),
                ..Default::default()
            };
            Ok(self
                .sec
                .create_security_group(req(token, r))
                .await?
                .into_inner()
                .security_group
                .unwrap())
        }

        async fn sg(&self, token: &str, vpc: &str, name: &str) -> pb::SecurityGroup {
            self.create_sg(token, vpc, name).await.unwrap()
        }

        async fn describe_sg(
            &self,
            token: &str,
            id: &str,
        ) -> Result<pb::SecurityGroup, tonic::Status> {
            let r = pb::DescribeSecurityGroupsRequest {
                group_ids: vec![id.into()],
                ..Default::default()
            };
            let mut got = self
                .sec
                .describe_security_groups(req(token, r))
                .await?
                .into_inner()
                .security_groups;
            assert_eq!(got.len(), 1);
            Ok(got.remove(0))
        }

        async fn authorize(
            &self,
            token: &str,
            group: &str,
            egress: bool,
            rules: Vec<pb::SecurityGroupRule>,
        ) -> Result<tonic::Response<pb::AuthorizeSecurityGroupResponse>, tonic::Status> {
            let r = req(
                token,
                pb::AuthorizeSecurityGroupRequest {
                    group_id: group.into(),
                    rules,
                },
            );
            if egress {
                self.sec.authorize_security_group_egress(r).await
            } else {
                self.sec.authorize_security_group_ingress(r).await
            }
        }

        async fn revoke(
            &self,
            token: &str,
            group: &str,
            egress: bool,
            ids: Vec<String>,
        ) -> Result<(), tonic::Status> {
            let r = req(
                token,
                pb::RevokeSecurityGroupRequest {
                    group_id: group.into(),
                    security_group_rule_ids: ids,
                },
            );
            if egress {
                self.sec.revoke_security_group_egress(r).await?;
            } else {
                self.sec.revoke_security_group_ingress(r).await?;
            }
            Ok(())
        }

        async fn acl(&self, token: &str, vpc: &str) -> Result<pb::NetworkAcl, tonic::Status> {
            let r = pb::CreateNetworkAclRequest {
                vpc_id: vpc.into(),
                ..Default::default()
            };
            Ok(self
                .sec
                .create_network_acl(req(token, r))
                .await?
                .into_inner()
                .network_acl
                .unwrap())
        }

        async fn describe_acl(
            &self,
            token: &str,
            id: &str,
        ) -> Result<pb::NetworkAcl, tonic::Status> {
            let r = pb::DescribeNetworkAclsRequest {
                network_acl_ids: vec![id.into()],
                ..Default::default()
            };
            let mut got = self
                .sec
                .describe_network_acls(req(token, r))
                .await?
                .into_inner()
                .network_acls;
            assert_eq!(got.len(), 1);
            Ok(got.remove(0))
        }

        async fn entry(
            &self,
            token: &str,
            acl: &str,
            entry: Option<pb::NetworkAclEntry>,
        ) -> Result<(), tonic::Status> {
            let r = pb::CreateNetworkAclEntryRequest {
                network_acl_id: acl.into(),
                entry,
            };
            self.sec
                .create_network_acl_entry(req(token, r))
                .await
                .map(|_| ())
        }

        async fn associate(
            &self,
            token: &str,
            subnet: &str,
            acl: &str,
        ) -> Result<(), tonic::Status> {
            let r = pb::ReplaceNetworkAclAssociationRequest {
                subnet_id: subnet.into(),
                network_acl_id: acl.into(),
            };
            self.sec
                .replace_network_acl_association(req(token, r))
                .await
                .map(|_| ())
        }
    }

    fn rule(proto: &str, from: i32, to: i32, cidr: &str, group: &str) -> pb::SecurityGroupRule {
        pb::SecurityGroupRule {
            ip_protocol: proto.into(),
            from_port: from,
            to_port: to,
            cidr_ipv4: cidr.into(),
            referenced_group_id: group.into(),
            ..Default::default()
        }
    }

    fn entry(
        n: u32,
        proto: &str,
        action: &str,
        egress: bool,
        cidr: &str,
        from: i32,
        to: i32,
    ) -> pb::NetworkAclEntry {
        pb::NetworkAclEntry {
            rule_number: n,
            protocol: proto.into(),
            rule_action: action.into(),
            egress,
            cidr_block: cidr.into(),
            from_port: from,
            to_port: to,
        }
    }

    #[tokio::test]
    async fn create_security_group_validation() {
        let e = env().await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let other_vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let base = pb::CreateSecurityGroupRequest {
            vpc_id: vpc.vpc_id.clone(),
            group_name: "web".into(),
            description: "web servers".into(),
            ..Default::default()
        };
        let good = e
            .sec
            .create_security_group(req(TOKEN, base.clone()))
            .await
            .unwrap();
        assert!(revision(&good) > 0);
        let g = good.into_inner().security_group.unwrap();
        assert!(super::ids::is_id(kind::SG, &g.group_id), "{}", g.group_id);
        assert_eq!(
            (
                g.group_name.as_str(),
                g.vpc_id.as_str(),
                g.owner_id.as_str()
            ),
            ("web", vpc.vpc_id.as_str(), ACCT)
        );
        assert!(g.ingress_rules.is_empty());
        assert_eq!(g.egress_rules.len(), 1);
        let out = &g.egress_rules[0];
        assert_eq!(
            (
                out.ip_protocol.as_str(),
                out.cidr_ipv4.as_str(),
                out.is_egress
            ),
            ("-1", "0.0.0.0/0", true)
        );
        assert!(super::ids::is_id(
            kind::SG_RULE,
            &out.security_group_rule_id
        ));

        type Edit = fn(&mut pb::CreateSecurityGroupRequest);
        let cases: Vec<(&str, Edit, Code, &str)> = vec![
            (
                "malformed vpc id",
                |r| r.vpc_id = "vpc-123".into(),
                Code::InvalidArgument,
                "vpc_id",
            ),
            (
                "missing vpc id",
                |r| r.vpc_id.clear(),
                Code::InvalidArgument,
                "vpc_id",
            ),
            (
                "unknown vpc",
                |r| r.vpc_id = "vpc-0123456789abcdef0".into(),
                Code::NotFound,
                "vpc-0123456789abcdef0",
            ),
            (
                "empty name",
                |r| r.group_name.clear(),
                Code::InvalidArgument,
                "group_name",
            ),
            (
                "long name",
                |r| r.group_name = "n".repeat(256),
                Code::InvalidArgument,
                "group_name",
            ),
            (
                "bad character",
                |r| r.group_name = "web<1>".into(),
                Code::InvalidArgument,
                "group_name",
            ),
            (
                "reserved name",
                |r| r.group_name = "default".into(),
                Code::InvalidArgument,
                "group_name",
            ),
            (
                "reserved name, other case",
                |r| r.group_name = "Default".into(),
                Code::InvalidArgument,
                "group_name",
            ),
            (
                "sg- prefix",
                |r| r.group_name = "sg-web".into(),
                Code::InvalidArgument,
                "group_name",
            ),
            (
                "no description",
                |r| r.description.clear(),
                Code::InvalidArgument,
                "description",
            ),
            (
                "long description",
                |r| r.description = "d".repeat(256),
                Code::InvalidArgument,
                "description",
            ),
            (
                "bad tag",
                |r| {
                    r.tags = vec![pb::Tag {
                        key: "aws:x".into(),
                        value: String::new(),
                    }]
                },
                Code::InvalidArgument,
                "tags[0].key",
            ),
            (
                "bad token",
                |r| r.client_token = "t".repeat(65),
                Code::InvalidArgument,
                "client_token",
            ),
            (
                "duplicate name",
                |_| {},
                Code::AlreadyExists,
                "InvalidGroup.Duplicate",
            ),
            (
                "duplicate name, other case",
                |r| r.group_name = "WEB".into(),
                Code::AlreadyExists,
                "InvalidGroup.Duplicate",
            ),
        ];
        for (case, edit, code, field) in cases {
            let mut r = base.clone();
            edit(&mut r);
            check(
                case,
                e.sec.create_security_group(req(TOKEN, r)).await,
                code,
                field,
            );
        }
        // Good edge cases.
        for (name, desc) in [
            ("n".repeat(255), "d".repeat(255)),
            ("a b._-:/()#,@[]+=&;{}!$*".into(), "x".into()),
        ] {
            let r = pb::CreateSecurityGroupRequest {
                group_name: name.clone(),
                description: desc,
                ..base.clone()
            };
            e.sec
                .create_security_group(req(TOKEN, r))
                .await
                .unwrap_or_else(|s| panic!("{name}: {s:?}"));
        }
        // The same name in another VPC is fine.
        e.sg(TOKEN, &other_vpc.vpc_id, "web").await;
        // No token at all.
        let s = e
            .sec
            .create_security_group(Request::new(base.clone()))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated);
    }

    #[tokio::test]
    async fn security_group_quota() {
        let e = env_with(Quotas {
            security_groups_per_vpc: 2,
            ..Quotas::default()
        })
        .await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        // The default group counts.
        e.sg(TOKEN, &vpc.vpc_id, "one").await;
        check(
            "quota",
            e.create_sg(TOKEN, &vpc.vpc_id, "two").await,
            Code::ResourceExhausted,
            "quota is 2",
        );
        // Another VPC has its own quota.
        let vpc2 = e.vpc(TOKEN, "10.1.0.0/16").await;
        e.sg(TOKEN, &vpc2.vpc_id, "two").await;
    }

    #[tokio::test]
    async fn client_token_is_idempotent() {
        let e = env().await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let r = pb::CreateSecurityGroupRequest {
            vpc_id: vpc.vpc_id.clone(),
            group_name: "web".into(),
            description: "web servers".into(),
            client_token: "token-1".into(),
            ..Default::default()
        };
        let a = e
            .sec
            .create_security_group(req(TOKEN, r.clone()))
            .await
            .unwrap()
            .into_inner()
            .security_group
            .unwrap();
        let b = e
            .sec
            .create_security_group(req(TOKEN, r.clone()))
            .await
            .unwrap()
            .into_inner()
            .security_group
            .unwrap();
        assert_eq!(a, b);
        let other = pb::CreateSecurityGroupRequest {
            description: "other".into(),
            ..r.clone()
        };
        check(
            "token reuse",
            e.sec.create_security_group(req(TOKEN, other)).await,
            Code::AlreadyExists,
            "client_token",
        );
        let list = pb::DescribeSecurityGroupsRequest {
            vpc_id: vpc.vpc_id.clone(),
            ..Default::default()
        };
        let groups = e
            .sec
            .describe_security_groups(req(TOKEN, list))
            .await
            .unwrap()
            .into_inner()
            .security_groups;
        assert_eq!(groups.len(), 2, "default and web: {groups:?}");
        // Tokens are per account.
        let vpc_b = e.vpc(OTHER_TOKEN, "10.0.0.0/16").await;
        let rb = pb::CreateSecurityGroupRequest {
            vpc_id: vpc_b.vpc_id.clone(),
            ..r
        };
        let c = e
            .sec
            .create_security_group(req(OTHER_TOKEN, rb))
            .await
            .unwrap()
            .into_inner()
            .security_group
            .unwrap();
        assert_ne!(c.group_id, a.group_id);
    }

    #[tokio::test]
    async fn describe_security_groups_pages() {
        let e = env().await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let vpc2 = e.vpc(TOKEN, "10.1.0.0/16").await;
        for n in ["a", "b", "c"] {
            e.sg(TOKEN, &vpc.vpc_id, n).await;
        }
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let r = pb::DescribeSecurityGroupsRequest {
                vpc_id: vpc.vpc_id.clone(),
                page: Some(pb::Page {
                    max_results: 3,
                    next_token: token.clone(),
                }),
                ..Default::default()
            };
            let got = e
                .sec
                .describe_security_groups(req(TOKEN, r))
                .await
                .unwrap()
                .into_inner();
            assert!(got.security_groups.len() <= 3);
            seen.extend(got.security_groups.into_iter().map(|g| g.group_name));
            if got.next_token.is_empty() {
                break;
            }
            token = got.next_token;
        }
        seen.sort();
        assert_eq!(seen, ["a", "b", "c", "default"]);
        // All of the account: both VPCs' groups.
        let all = e
            .sec
            .describe_security_groups(req(TOKEN, Default::default()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(all.security_groups.len(), 5);
        // By vpc: only that VPC.
        let r = pb::DescribeSecurityGroupsRequest {
            vpc_id: vpc2.vpc_id.clone(),
            ..Default::default()
        };
        let got = e
            .sec
            .describe_security_groups(req(TOKEN, r))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.security_groups.len(), 1);
        assert_eq!(
            got.security_groups[0].group_id,
            vpc2.default_security_group_id
        );
        let cases: Vec<(&str, pb::DescribeSecurityGroupsRequest, Code, &str)> = vec![
            (
                "bad id",
                pb::DescribeSecurityGroupsRequest {
                    group_ids: vec!["sg-1".into()],
                    ..Default::default()
                },
                Code::InvalidArgument,
                "group_ids[0]",
            ),
            (
                "unknown id",
                pb::DescribeSecurityGroupsRequest {
                    group_ids: vec![UNKNOWN_SG.into()],
                    ..Default::default()
                },
                Code::NotFound,
                UNKNOWN_SG,
            ),
            (
                "bad vpc",
                pb::DescribeSecurityGroupsRequest {
                    vpc_id: "vpc-1".into(),
                    ..Default::default()
                },
                Code::InvalidArgument,
                "vpc_id",
            ),
            (
                "bad page size",
                pb::DescribeSecurityGroupsRequest {
                    page: Some(pb::Page {
                        max_results: 1001,
                        next_token: String::new(),
                    }),
                    ..Default::default()
                },
                Code::InvalidArgument,
                "page.max_results",
            ),
            (
                "bad page token",
                pb::DescribeSecurityGroupsRequest {
                    page: Some(pb::Page {
                        max_results: 0,
                        next_token: "x".into(),
                    }),
                    ..Default::default()
                },
                Code::InvalidArgument,
                "page.next_token",
            ),
        ];
        for (case, r, code, field) in cases {
            check(
                case,
                e.sec.describe_security_groups(req(TOKEN, r)).await,
                code,
                field,
            );
        }
    }

    #[tokio::test]
    async fn authorize_validation() {
        let e = env().await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let vpc2 = e.vpc(TOKEN, "10.1.0.0/16").await;
        let web = e.sg(TOKEN, &vpc.vpc_id, "web").await;
        let db = e.sg(TOKEN, &vpc.vpc_id, "db").await;
        let far = e.sg(TOKEN, &vpc2.vpc_id, "far").await;
        let any = "0.0.0.0/0";
        let ok = || rule("tcp", 443, 443, any, "");
        for egress in [false, true] {
            let d = if egress { "egress" } else { "ingress" };
            let cases: Vec<(&str, Vec<pb::SecurityGroupRule>, Code, &str)> = vec![
                ("no rules", vec![], Code::InvalidArgument, "rules"),
                (
                    "no protocol",
                    vec![rule("", 0, 0, any, "")],
                    Code::InvalidArgument,
                    "rules[0].ip_protocol",
                ),
                (
                    "bad protocol",
                    vec![rule("tcpx", 0, 0, any, "")],
                    Code::InvalidArgument,
                    "rules[0].ip_protocol",
                ),
                (
                    "reversed ports",
                    vec![rule("tcp", 100, 50, any, "")],
                    Code::InvalidArgument,
                    "rules[0].to_port",
                ),
                (
                    "negative port",
                    vec![rule("tcp", -5, 50, any, "")],
                    Code::InvalidArgument,
                    "rules[0].from_port",
                ),
                (
                    "port too big",
                    vec![rule("udp", 0, 70000, any, "")],
                    Code::InvalidArgument,
                    "rules[0].to_port",
                ),
                (
                    "icmp type",
                    vec![rule("icmp", 300, -1, any, "")],
                    Code::InvalidArgument,
                    "rules[0].from_port",
                ),
                (
                    "icmp code",
                    vec![rule("icmp", 8, 300, any, "")],
                    Code::InvalidArgument,
                    "rules[0].to_port",
                ),
                (
                    "ports on all",
                    vec![rule("-1", 22, 22, any, "")],
                    Code::InvalidArgument,
                    "rules[0].from_port",
                ),
                (
                    "no remote",
                    vec![rule("tcp", 22, 22, "", "")],
                    Code::InvalidArgument,
                    "rules[0].cidr_ipv4",
                ),
                (
                    "both remotes",
                    vec![rule("tcp", 22, 22, any, &db.group_id)],
                    Code::InvalidArgument,
                    "rules[0].referenced_group_id",
                ),
                (
                    "cidr host bits",
                    vec![rule("tcp", 22, 22, "10.0.0.1/8", "")],
                    Code::InvalidArgument,
                    "rules[0].cidr_ipv4",
                ),
                (
                    "cidr garbage",
                    vec![rule("tcp", 22, 22, "nope", "")],
                    Code::InvalidArgument,
                    "rules[0].cidr_ipv4",
                ),
                (
                    "bad group id",
                    vec![rule("tcp", 22, 22, "", "sg-1")],
                    Code::InvalidArgument,
                    "rules[0].referenced_group_id",
                ),
                (
                    "unknown group",
                    vec![rule("tcp", 22, 22, "", UNKNOWN_SG)],
                    Code::NotFound,
                    UNKNOWN_SG,
                ),
                (
                    "group of another vpc",
                    vec![rule("tcp", 22, 22, "", &far.group_id)],
                    Code::InvalidArgument,
                    "rules[0].referenced_group_id",
                ),
                (
                    "second rule bad",
                    vec![ok(), rule("tcp", 1, 0, any, "")],
                    Code::InvalidArgument,
                    "rules[1].to_port",
                ),
                (
                    "duplicate in request",
                    vec![ok(), ok()],
                    Code::InvalidArgument,
                    "rules[1]",
                ),
                (
                    "long description",
                    vec![pb::SecurityGroupRule {
                        description: "d".repeat(256),
                        ..ok()
                    }],
                    Code::InvalidArgument,
                    "rules[0].description",
                ),
            ];
            for (case, rules, code, field) in cases {
                check(
                    &format!("{d}: {case}"),
                    e.authorize(TOKEN, &web.group_id, egress, rules).await,
                    code,
                    field,
                );
            }
            for (case, group, code, field) in [
                ("bad group id", "sg-xyz", Code::InvalidArgument, "group_id"),
                ("unknown group", UNKNOWN_SG, Code::NotFound, UNKNOWN_SG),
            ] {
                check(
                    &format!("{d}: {case}"),
                    e.authorize(TOKEN, group, egress, vec![ok()]).await,
                    code,
                    field,
                );
            }
        }
        // Nothing was written by the failures.
        let g = e.describe_sg(TOKEN, &web.group_id).await.unwrap();
        assert!(g.ingress_rules.is_empty());
        assert_eq!(g.egress_rules.len(), 1);

        let good = vec![
            ok(),
            rule("tcp", 0, 65535, "10.0.0.0/8", ""),
            rule("udp", 53, 53, "10.0.0.0/16", ""),
            rule("icmp", -1, -1, any, ""),
            rule("icmp", 8, -1, "192.168.0.0/24", ""),
            rule("-1", -1, -1, "", &web.group_id),
            rule("all", 0, 0, "", &db.group_id),
            rule("47", 0, 0, "10.9.0.0/16", ""),
            pb::SecurityGroupRule {
                description: "ssh from admin".into(),
                ..rule("tcp", 22, 22, "10.1.2.3/32", "")
            },
        ];
        let resp = e
            .authorize(TOKEN, &web.group_id, false, good.clone())
            .await
            .unwrap();
        let rev = revision(&resp);
        assert!(rev > 0);
        let added = resp.into_inner().rules;
        assert_eq!(added.len(), good.len());
        for (a, want) in added.iter().zip(&good) {
            assert!(
                super::ids::is_id(kind::SG_RULE, &a.security_group_rule_id),
                "{a:?}"
            );
            assert!(!a.is_egress);
            assert_eq!(
                (
                    a.cidr_ipv4.as_str(),
                    a.referenced_group_id.as_str(),
                    a.description.as_str()
                ),
                (
                    want.cidr_ipv4.as_str(),
                    want.referenced_group_id.as_str(),
                    want.description.as_str()
                )
            );
        }
        assert_eq!(
            (
                added[0].ip_protocol.as_str(),
                added[0].from_port,
                added[0].to_port
            ),
            ("tcp", 443, 443)
        );
        assert_eq!(
            (
                added[3].ip_protocol.as_str(),
                added[3].from_port,
                added[3].to_port
            ),
            ("icmp", -1, -1)
        );
        assert_eq!((added[4].from_port, added[4].to_port), (8, -1));
        assert_eq!(
            (added[5].ip_protocol.as_str(), added[5].from_port),
            ("-1", -1)
        );
        let g = e.describe_sg(TOKEN, &web.group_id).await.unwrap();
        assert_eq!(g.ingress_rules, added);

        // Duplicates of existing rules, in either spelling.
        for (case, r) in [
            ("same rule", ok()),
            ("all spelled -1", rule("-1", 0, 0, "", &db.group_id)),
            ("protocol number", rule("6", 443, 443, any, "")),
        ] {
            check(
                case,
                e.authorize(
                    TOKEN,
                    &web.group_id,
                    false,
                    vec![rule("tcp", 8080, 8080, any, ""), r],
                )
                .await,
                Code::AlreadyExists,
                "InvalidPermission.Duplicate",
            );
        }
        check(
            "default egress",
            e.authorize(
                TOKEN,
                &web.group_id,
                true,
                vec![rule("-1", -1, -1, any, "")],
            )
            .await,
            Code::AlreadyExists,
            "InvalidPermission.Duplicate",
        );
        // The same rule in the other direction is not a duplicate.
        let out = e
            .authorize(TOKEN, &web.group_id, true, vec![ok()])
            .await
            .unwrap()
            .into_inner()
            .rules;
        assert!(out[0].is_egress);
        assert_eq!(
            e.describe_sg(TOKEN, &web.group_id)
                .await
                .unwrap()
                .egress_rules
                .len(),
            2
        );
    }

    #[tokio::test]
    async fn rule_quotas() {
        let mut quotas = Quotas::default();
        quotas.policy.sg_inbound_rules = 2;
        quotas.policy.sg_outbound_rules = 2;
        let e = env_with(quotas).await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let g = e.sg(TOKEN, &vpc.vpc_id, "web").await;
        let r = |p| rule("tcp", p, p, "0.0.0.0/0", "");
        check(
            "three at once",
            e.authorize(TOKEN, &g.group_id, false, vec![r(1), r(2), r(3)])
                .await,
            Code::ResourceExhausted,
            "RulesPerSecurityGroupLimitExceeded",
        );
        e.authorize(TOKEN, &g.group_id, false, vec![r(1), r(2)])
            .await
            .unwrap();
        check(
            "inbound full",
            e.authorize(TOKEN, &g.group_id, false, vec![r(3)]).await,
            Code::ResourceExhausted,
            "RulesPerSecurityGroupLimitExceeded",
        );
        // Outbound: the default allow-all rule counts.
        e.authorize(TOKEN, &g.group_id, true, vec![r(1)])
            .await
            .unwrap();
        check(
            "outbound full",
            e.authorize(TOKEN, &g.group_id, true, vec![r(2)]).await,
            Code::ResourceExhausted,
            "RulesPerSecurityGroupLimitExceeded",
        );
    }

    #[tokio::test]
    async fn revoke_rules() {
        let e = env().await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let g = e.sg(TOKEN, &vpc.vpc_id, "web").await;
        let added = e
            .authorize(
                TOKEN,
                &g.group_id,
                false,
                vec![
                    rule("tcp", 22, 22, "10.0.0.0/8", ""),
                    rule("tcp", 80, 80, "0.0.0.0/0", ""),
                ],
            )
            .await
            .unwrap()
            .into_inner()
            .rules;
        let egress_id = g.egress_rules[0].security_group_rule_id.clone();
        let unknown = "sgr-0123456789abcdef0".to_owned();
        // (case, group, egress, rule ids, code, field)
        type Case<'a> = (&'a str, &'a str, bool, Vec<String>, Code, &'a str);
        let cases: Vec<Case> = vec![
            (
                "no ids",
                &g.group_id,
                false,
                vec![],
                Code::InvalidArgument,
                "security_group_rule_ids",
            ),
            (
                "bad id",
                &g.group_id,
                false,
                vec!["sgr-1".into()],
                Code::InvalidArgument,
                "security_group_rule_ids[0]",
            ),
            (
                "group id as rule id",
                &g.group_id,
                false,
                vec![added[0].security_group_rule_id.clone(), g.group_id.clone()],
                Code::InvalidArgument,
                "security_group_rule_ids[1]",
            ),
            (
                "unknown rule",
                &g.group_id,
                false,
                vec![added[0].security_group_rule_id.clone(), unknown.clone()],
                Code::NotFound,
                &unknown,
            ),
            (
                "egress rule via ingress",
                &g.group_id,
                false,
                vec![egress_id.clone()],
                Code::NotFound,
                &egress_id,
            ),
            (
                "ingress rule via egress",
                &g.group_id,
                true,
                vec![added[0].security_group_rule_id.clone()],
                Code::NotFound,
                &added[0].security_group_rule_id,
            ),
            (
                "bad group",
                "sg-1",
                false,
                vec![unknown.clone()],
                Code::InvalidArgument,
                "group_id",
            ),
            (
                "unknown group",
                UNKNOWN_SG,
                false,
                vec![unknown.clone()],
                Code::NotFound,
                UNKNOWN_SG,
            ),
        ];
        for (case, group, egress, ids, code, field) in cases {
            check(case, e.revoke(TOKEN, group, egress, ids).await, code, field);
        }
        assert_eq!(
            e.describe_sg(TOKEN, &g.group_id)
                .await
                .unwrap()
                .ingress_rules
                .len(),
            2
        );
        e.revoke(
            TOKEN,
            &g.group_id,
            false,
            vec![added[0].security_group_rule_id.clone()],
        )
        .await
        .unwrap();
        let now = e.describe_sg(TOKEN, &g.group_id).await.unwrap();
        assert_eq!(now.ingress_rules, vec![added[1].clone()]);
        e.revoke(TOKEN, &g.group_id, true, vec![egress_id])
            .await
            .unwrap();
        assert!(
            e.describe_sg(TOKEN, &g.group_id)
                .await
                .unwrap()
                .egress_rules
                .is_empty()
        );
        // A revoked rule can be added again.
        e.authorize(
            TOKEN,
            &g.group_id,
            false,
            vec![rule("tcp", 22, 22, "10.0.0.0/8", "")],
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn delete_security_group_dependencies() {
        let e = env().await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let subnet = e.subnet(TOKEN, &vpc.vpc_id, "10.0.1.0/24").await;
        let web = e.sg(TOKEN, &vpc.vpc_id, "web").await;
        let db = e.sg(TOKEN, &vpc.vpc_id, "db").await;
        let del = |id: &str| {
            e.sec.delete_security_group(req(
                TOKEN,
                pb::DeleteSecurityGroupRequest {
                    group_id: id.into(),
                },
            ))
        };
        check(
            "default group",
            del(&vpc.default_security_group_id).await,
            Code::FailedPrecondition,
            "CannotDelete",
        );
        check(
            "bad id",
            del("sg-1").await,
            Code::InvalidArgument,
            "group_id",
        );
        check("unknown", del(UNKNOWN_SG).await, Code::NotFound, UNKNOWN_SG);

        // Referenced by another group's rule (self-references do not count).
        let by_db = e
            .authorize(
                TOKEN,
                &db.group_id,
                false,
                vec![rule("tcp", 5432, 5432, "", &web.group_id)],
            )
            .await
            .unwrap()
            .into_inner()
            .rules;
        e.authorize(
            TOKEN,
            &web.group_id,
            false,
            vec![rule("-1", -1, -1, "", &web.group_id)],
        )
        .await
        .unwrap();
        check(
            "referenced",
            del(&web.group_id).await,
            Code::FailedPrecondition,
            &db.group_id,
        );
        e.revoke(
            TOKEN,
            &db.group_id,
            false,
            vec![by_db[0].security_group_rule_id.clone()],
        )
        .await
        .unwrap();

        // Used by an instance (written directly: the instance service is not wired here).
        let instance = InstanceRec {
            meta: Meta {
                id: "i-0123456789abcdef0".into(),
                account: ACCT.into(),
                tags: vec![],
                created_ms: 0,
            },
            subnet: subnet.subnet_id.clone(),
            vpc: vpc.vpc_id.clone(),
            host: "h1".into(),
            ip: "10.0.1.4".parse().unwrap(),
            mac: "02:00:00:00:00:01".into(),
            security_groups: vec![db.group_id.clone(), web.group_id.clone()],
            state: "running".into(),
            instance_type: "t3.micro".into(),
            state_reason: String::new(),
            user_data: None,
            command: None,
            launch_ms: 0,
            terminated_ms: None,
        };
        let api = &e.api;
        let put = |i: InstanceRec| async move {
            let mut tx = api.read(ACCT).await.unwrap();
            tx.put(kind::INSTANCE, &i.meta.id, &i).unwrap();
            tx.commit().await.unwrap().unwrap();
        };
        put(instance.clone()).await;
        check(
            "in use",
            del(&web.group_id).await,
            Code::FailedPrecondition,
            "i-0123456789abcdef0",
        );
        put(InstanceRec {
            state: "terminated".into(),
            ..instance
        })
        .await;

        let resp = del(&web.group_id).await.unwrap();
        assert!(revision(&resp) > 0);
        check(
            "gone",
            e.describe_sg(TOKEN, &web.group_id).await,
            Code::NotFound,
            &web.group_id,
        );
        check(
            "deleted twice",
            del(&web.group_id).await,
            Code::NotFound,
            &web.group_id,
        );
        // The name is free again.
        e.sg(TOKEN, &vpc.vpc_id, "web").await;
        del(&db.group_id).await.unwrap();
    }

    #[tokio::test]
    async fn tenants_are_isolated() {
        let e = env().await;
        let vpc_a = e.vpc(TOKEN, "10.0.0.0/16").await;
        let vpc_b = e.vpc(OTHER_TOKEN, "10.0.0.0/16").await;
        let subnet_a = e.subnet(TOKEN, &vpc_a.vpc_id, "10.0.1.0/24").await;
        let subnet_b = e.subnet(OTHER_TOKEN, &vpc_b.vpc_id, "10.0.1.0/24").await;
        let a = e.sg(TOKEN, &vpc_a.vpc_id, "web").await;
        let b = e.sg(OTHER_TOKEN, &vpc_b.vpc_id, "web").await;
        let acl_b = e.acl(OTHER_TOKEN, &vpc_b.vpc_id).await.unwrap();
        let id = b.group_id.as_str();
        check(
            "describe",
            e.describe_sg(TOKEN, id).await,
            Code::NotFound,
            id,
        );
        check(
            "delete",
            e.sec
                .delete_security_group(req(
                    TOKEN,
                    pb::DeleteSecurityGroupRequest {
                        group_id: id.into(),
                    },
                ))
                .await,
            Code::NotFound,
            id,
        );
        check(
            "authorize",
            e.authorize(TOKEN, id, false, vec![rule("tcp", 22, 22, "0.0.0.0/0", "")])
                .await,
            Code::NotFound,
            id,
        );
        let rid = b.egress_rules[0].security_group_rule_id.clone();
        check(
            "revoke",
            e.revoke(TOKEN, id, true, vec![rid]).await,
            Code::NotFound,
            id,
        );
        check(
            "reference",
            e.authorize(TOKEN, &a.group_id, false, vec![rule("tcp", 22, 22, "", id)])
                .await,
            Code::NotFound,
            id,
        );
        check(
            "create in other's vpc",
            e.create_sg(TOKEN, &vpc_b.vpc_id, "x").await,
            Code::NotFound,
            &vpc_b.vpc_id,
        );
        check(
            "acl in other's vpc",
            e.acl(TOKEN, &vpc_b.vpc_id).await,
            Code::NotFound,
            &vpc_b.vpc_id,
        );
        let acl = acl_b.network_acl_id.as_str();
        check(
            "describe acl",
            e.describe_acl(TOKEN, acl).await,
            Code::NotFound,
            acl,
        );
        check(
            "delete acl",
            e.sec
                .delete_network_acl(req(
                    TOKEN,
                    pb::DeleteNetworkAclRequest {
                        network_acl_id: acl.into(),
                    },
                ))
                .await,
            Code::NotFound,
            acl,
        );
        check(
            "acl entry",
            e.entry(
                TOKEN,
                acl,
                Some(entry(100, "-1", "allow", false, "0.0.0.0/0", 0, 0)),
            )
            .await,
            Code::NotFound,
            acl,
        );
        check(
            "associate other's acl",
            e.associate(TOKEN, &subnet_a.subnet_id, acl).await,
            Code::NotFound,
            acl,
        );
        check(
            "associate other's subnet",
            e.associate(TOKEN, &subnet_b.subnet_id, &vpc_a.default_network_acl_id)
                .await,
            Code::NotFound,
            &subnet_b.subnet_id,
        );
        // Lists show only the caller's objects.
        let all = e
            .sec
            .describe_security_groups(req(TOKEN, Default::default()))
            .await
            .unwrap()
            .into_inner()
            .security_groups;
        assert!(all.iter().all(|g| g.owner_id == ACCT), "{all:?}");
        assert_eq!(all.len(), 2);
        let acls = e
            .sec
            .describe_network_acls(req(TOKEN, Default::default()))
            .await
            .unwrap()
            .into_inner()
            .network_acls;
        assert!(acls.iter().all(|a| a.owner_id == ACCT), "{acls:?}");
        // B's objects are untouched.
        assert_eq!(e.describe_sg(OTHER_TOKEN, id).await.unwrap(), b);
    }

    #[tokio::test]
    async fn network_acls() {
        let mut quotas = Quotas {
            network_acls_per_vpc: 3,
            ..Quotas::default()
        };
        quotas.policy.acl_inbound_rules = 3;
        let e = env_with(quotas).await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let vpc2 = e.vpc(TOKEN, "10.1.0.0/16").await;
        let s1 = e.subnet(TOKEN, &vpc.vpc_id, "10.0.1.0/24").await;
        let s2 = e.subnet(TOKEN, &vpc.vpc_id, "10.0.2.0/24").await;
        let far_subnet = e.subnet(TOKEN, &vpc2.vpc_id, "10.1.1.0/24").await;

        // Create: a custom ACL has no entries (denies everything).
        for (case, vpc_id, code, field) in [
            ("bad vpc", "vpc-1", Code::InvalidArgument, "vpc_id"),
            (
                "unknown vpc",
                "vpc-0123456789abcdef0",
                Code::NotFound,
                "vpc-0123456789abcdef0",
            ),
        ] {
            check(case, e.acl(TOKEN, vpc_id).await, code, field);
        }
        let r = pb::CreateNetworkAclRequest {
            vpc_id: vpc.vpc_id.clone(),
            tags: vec![pb::Tag {
                key: "".into(),
                value: "".into(),
            }],
            ..Default::default()
        };
        check(
            "bad tag",
            e.sec.create_network_acl(req(TOKEN, r)).await,
            Code::InvalidArgument,
            "tags[0].key",
        );
        let r = pb::CreateNetworkAclRequest {
            vpc_id: vpc.vpc_id.clone(),
            client_token: "acl-token".into(),
            ..Default::default()
        };
        let acl = e
            .sec
            .create_network_acl(req(TOKEN, r.clone()))
            .await
            .unwrap()
            .into_inner()
            .network_acl
            .unwrap();
        let again = e
            .sec
            .create_network_acl(req(TOKEN, r))
            .await
            .unwrap()
            .into_inner()
            .network_acl
            .unwrap();
        assert_eq!(acl.network_acl_id, again.network_acl_id);
        assert!(super::ids::is_id(kind::ACL, &acl.network_acl_id));
        assert!(
            !acl.is_default && acl.entries.is_empty() && acl.subnet_ids.is_empty(),
            "{acl:?}"
        );
        assert_eq!(
            (acl.vpc_id.as_str(), acl.owner_id.as_str()),
            (vpc.vpc_id.as_str(), ACCT)
        );
        let spare = e.acl(TOKEN, &vpc.vpc_id).await.unwrap();
        check(
            "acl quota",
            e.acl(TOKEN, &vpc.vpc_id).await,
            Code::ResourceExhausted,
            "NetworkAclLimitExceeded",
        );
        let far = e.acl(TOKEN, &vpc2.vpc_id).await.unwrap();

        // The default ACL allows everything and has every subnet of its VPC.
        let def = e
            .describe_acl(TOKEN, &vpc.default_network_acl_id)
            .await
            .unwrap();
        assert!(def.is_default);
        let mut both = vec![s1.subnet_id.clone(), s2.subnet_id.clone()];
        both.sort();
        assert_eq!(def.subnet_ids, both);
        assert_eq!(
            def.entries,
            vec![
                entry(100, "-1", "allow", false, "0.0.0.0/0", -1, -1),
                entry(100, "-1", "allow", true, "0.0.0.0/0", -1, -1)
            ]
        );

        // Entries.
        let id = acl.network_acl_id.as_str();
        let good = || entry(100, "tcp", "allow", false, "0.0.0.0/0", 80, 80);
        let cases: Vec<(&str, &str, Option<pb::NetworkAclEntry>, Code, &str)> = vec![
            ("no entry", id, None, Code::InvalidArgument, "entry"),
            (
                "bad acl id",
                "acl-1",
                Some(good()),
                Code::InvalidArgument,
                "network_acl_id",
            ),
            (
                "unknown acl",
                "acl-0123456789abcdef0",
                Some(good()),
                Code::NotFound,
                "acl-0123456789abcdef0",
            ),
            (
                "rule 0",
                id,
                Some(pb::NetworkAclEntry {
                    rule_number: 0,
                    ..good()
                }),
                Code::InvalidArgument,
                "entry.rule_number",
            ),
            (
                "rule 32767",
                id,
                Some(pb::NetworkAclEntry {
                    rule_number: 32767,
                    ..good()
                }),
                Code::InvalidArgument,
                "entry.rule_number",
            ),
            (
                "rule 70000",
                id,
                Some(pb::NetworkAclEntry {
                    rule_number: 70000,
                    ..good()
                }),
                Code::InvalidArgument,
                "entry.rule_number",
            ),
            (
                "no action",
                id,
                Some(pb::NetworkAclEntry {
                    rule_action: "".into(),
                    ..good()
                }),
                Code::InvalidArgument,
                "entry.rule_action",
            ),
            (
                "bad action",
                id,
                Some(pb::NetworkAclEntry {
                    rule_action: "permit".into(),
                    ..good()
                }),
                Code::InvalidArgument,
                "entry.rule_action",
            ),
            (
                "no protocol",
                id,
                Some(pb::NetworkAclEntry {
                    protocol: "".into(),
                    ..good()
                }),
                Code::InvalidArgument,
                "entry.protocol",
            ),
            (
                "bad protocol",
                id,
                Some(pb::NetworkAclEntry {
                    protocol: "sctpx".into(),
                    ..good()
                }),
                Code::InvalidArgument,
                "entry.protocol",
            ),
            (
                "reversed ports",
                id,
                Some(pb::NetworkAclEntry {
                    from_port: 90,
                    to_port: 80,
                    ..good()
                }),
                Code::InvalidArgument,
                "entry.to_port",
            ),
            (
                "port too big",
                id,
                Some(pb::NetworkAclEntry {
                    from_port: 70000,
                    to_port: 70000,
                    ..good()
                }),
                Code::InvalidArgument,
                "entry.from_port",
            ),
            (
                "ports on all",
                id,
                Some(entry(100, "-1", "allow", false, "0.0.0.0/0", 1, 2)),
                Code::InvalidArgument,
                "entry.from_port",
            ),
            (
                "no cidr",
                id,
                Some(pb::NetworkAclEntry {
                    cidr_block: "".into(),
                    ..good()
                }),
                Code::InvalidArgument,
                "entry.cidr_block",
            ),
            (
                "cidr host bits",
                id,
                Some(pb::NetworkAclEntry {
                    cidr_block: "10.0.0.1/16".into(),
                    ..good()
                }),
                Code::InvalidArgument,
                "entry.cidr_block",
            ),
        ];
        for (case, acl_id, en, code, field) in cases {
            check(case, e.entry(TOKEN, acl_id, en).await, code, field);
        }
        e.entry(TOKEN, id, Some(good())).await.unwrap();
        check(
            "same number",
            e.entry(
                TOKEN,
                id,
                Some(entry(100, "udp", "deny", false, "10.0.0.0/8", 53, 53)),
            )
            .await,
            Code::AlreadyExists,
            "NetworkAclEntryAlreadyExists",
        );
        e.entry(
            TOKEN,
            id,
            Some(entry(100, "udp", "deny", true, "10.0.0.0/8", 53, 53)),
        )
        .await
        .unwrap();
        e.entry(
            TOKEN,
            id,
            Some(entry(32766, "-1", "DENY", false, "0.0.0.0/0", -1, -1)),
        )
        .await
        .unwrap();
        e.entry(
            TOKEN,
            id,
            Some(entry(1, "icmp", "deny", false, "192.168.0.0/16", 8, -1)),
        )
        .await
        .unwrap();
        check(
            "entry quota",
            e.entry(
                TOKEN,
                id,
                Some(entry(2, "-1", "allow", false, "0.0.0.0/0", 0, 0)),
            )
            .await,
            Code::ResourceExhausted,
            "NetworkAclEntryLimitExceeded",
        );
        let got = e.describe_acl(TOKEN, id).await.unwrap();
        let numbers: Vec<(u32, bool)> = got
            .entries
            .iter()
            .map(|x| (x.rule_number, x.egress))
            .collect();
        assert_eq!(
            numbers,
            [(1, false), (100, false), (32766, false), (100, true)]
        );
        assert_eq!(got.entries[1], good());
        assert_eq!(got.entries[2].rule_action, "deny");

        // Delete entries.
        let del = |acl: &str, n: u32, egress: bool| {
            e.sec.delete_network_acl_entry(req(
                TOKEN,
                pb::DeleteNetworkAclEntryRequest {
                    network_acl_id: acl.into(),
                    rule_number: n,
                    egress,
                },
            ))
        };
        check(
            "entry 0",
            del(id, 0, false).await,
            Code::InvalidArgument,
            "rule_number",
        );
        check(
            "entry bad acl",
            del("acl-x", 100, false).await,
            Code::InvalidArgument,
            "network_acl_id",
        );
        check(
            "absent entry",
            del(id, 200, false).await,
            Code::NotFound,
            "200",
        );
        check(
            "other direction",
            del(id, 1, true).await,
            Code::NotFound,
            "outbound",
        );
        del(id, 1, false).await.unwrap();
        check(
            "deleted twice",
            del(id, 1, false).await,
            Code::NotFound,
            "1",
        );
        e.entry(
            TOKEN,
            id,
            Some(entry(2, "-1", "allow", false, "0.0.0.0/0", 0, 0)),
        )
        .await
        .unwrap();

        // Associations.
        let cases: Vec<(&str, &str, &str, Code, &str)> = vec![
            (
                "bad subnet",
                "subnet-1",
                id,
                Code::InvalidArgument,
                "subnet_id",
            ),
            (
                "bad acl",
                &s1.subnet_id,
                "acl-1",
                Code::InvalidArgument,
                "network_acl_id",
            ),
            (
                "unknown subnet",
                "subnet-0123456789abcdef0",
                id,
                Code::NotFound,
                "subnet-0123456789abcdef0",
            ),
            (
                "unknown acl",
                &s1.subnet_id,
                "acl-0123456789abcdef0",
                Code::NotFound,
                "acl-0123456789abcdef0",
            ),
            (
                "acl of another vpc",
                &s1.subnet_id,
                &far.network_acl_id,
                Code::InvalidArgument,
                "network_acl_id",
            ),
            (
                "subnet of another vpc",
                &far_subnet.subnet_id,
                id,
                Code::InvalidArgument,
                "network_acl_id",
            ),
        ];
        for (case, subnet, acl, code, field) in cases {
            check(case, e.associate(TOKEN, subnet, acl).await, code, field);
        }
        e.associate(TOKEN, &s1.subnet_id, id).await.unwrap();
        assert_eq!(
            e.describe_acl(TOKEN, id).await.unwrap().subnet_ids,
            vec![s1.subnet_id.clone()]
        );
        assert_eq!(
            e.describe_acl(TOKEN, &vpc.default_network_acl_id)
                .await
                .unwrap()
                .subnet_ids,
            vec![s2.subnet_id.clone()]
        );
        let r = pb::DescribeSubnetsRequest {
            subnet_ids: vec![s1.subnet_id.clone()],
            ..Default::default()
        };
        let s = e
            .net
            .describe_subnets(req(TOKEN, r))
            .await
            .unwrap()
            .into_inner()
            .subnets;
        assert_eq!(s[0].network_acl_id, id);
        // By VPC.
        let r = pb::DescribeNetworkAclsRequest {
            vpc_id: vpc.vpc_id.clone(),
            ..Default::default()
        };
        let list = e
            .sec
            .describe_network_acls(req(TOKEN, r))
            .await
            .unwrap()
            .into_inner()
            .network_acls;
        assert_eq!(list.len(), 3);

        // Delete ACLs.
        let del_acl = |acl: &str| {
            e.sec.delete_network_acl(req(
                TOKEN,
                pb::DeleteNetworkAclRequest {
                    network_acl_id: acl.into(),
                },
            ))
        };
        check(
            "default acl",
            del_acl(&vpc.default_network_acl_id).await,
            Code::FailedPrecondition,
            "CannotDelete",
        );
        check(
            "associated",
            del_acl(id).await,
            Code::FailedPrecondition,
            &s1.subnet_id,
        );
        check(
            "bad id",
            del_acl("acl-1").await,
            Code::InvalidArgument,
            "network_acl_id",
        );
        check(
            "unknown",
            del_acl("acl-0123456789abcdef0").await,
            Code::NotFound,
            "acl-0123456789abcdef0",
        );
        e.associate(TOKEN, &s1.subnet_id, &vpc.default_network_acl_id)
            .await
            .unwrap();
        assert!(revision(&del_acl(id).await.unwrap()) > 0);
        check("gone", e.describe_acl(TOKEN, id).await, Code::NotFound, id);
        del_acl(&spare.network_acl_id).await.unwrap();
        // Quota room again.
        e.acl(TOKEN, &vpc.vpc_id).await.unwrap();
    }

    #[tokio::test]
    async fn desired_state_has_the_groups_and_acls() {
        use crate::overlay::statefile::StateFile;
        use crate::policy::model::{AclAction, Protocol};

        let e = env().await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let subnet = e.subnet(TOKEN, &vpc.vpc_id, "10.0.1.0/24").await;
        let web = e.sg(TOKEN, &vpc.vpc_id, "web").await;
        e.authorize(
            TOKEN,
            &web.group_id,
            false,
            vec![
                rule("tcp", 443, 443, "0.0.0.0/0", ""),
                rule("-1", -1, -1, "", &vpc.default_security_group_id),
            ],
        )
        .await
        .unwrap();
        let acl = e.acl(TOKEN, &vpc.vpc_id).await.unwrap();
        e.entry(
            TOKEN,
            &acl.network_acl_id,
            Some(entry(100, "tcp", "allow", false, "0.0.0.0/0", 443, 443)),
        )
        .await
        .unwrap();
        let r = pb::ReplaceNetworkAclAssociationRequest {
            subnet_id: subnet.subnet_id.clone(),
            network_acl_id: acl.network_acl_id.clone(),
        };
        let rev = revision(
            &e.sec
                .replace_network_acl_association(req(TOKEN, r))
                .await
                .unwrap(),
        );

        let mut rx = e.api.desired.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let doc = loop {
            let d = Arc::clone(&rx.borrow_and_update());
            if d.revision >= rev {
                break d;
            }
            assert!(
                tokio::time::timeout_at(deadline, rx.changed())
                    .await
                    .is_ok(),
                "desired state stuck at {} < {rev}",
                d.revision
            );
        };
        let state: StateFile = serde_json::from_slice(&doc.document).unwrap();
        let g = state
            .security_groups
            .iter()
            .find(|g| g.id == web.group_id)
            .expect("web group rendered");
        assert_eq!(g.vpc, vpc.vpc_id);
        assert!(!g.default);
        assert_eq!(g.inbound.len(), 2);
        assert_eq!(
            (
                g.inbound[0].protocol,
                g.inbound[0].from_port,
                g.inbound[0].to_port
            ),
            (Protocol::TCP, Some(443), Some(443))
        );
        assert_eq!(
            g.inbound[1].group.as_deref(),
            Some(vpc.default_security_group_id.as_str())
        );
        assert_eq!(g.outbound, crate::policy::model::allow_all_outbound());
        assert!(
            state
                .security_groups
                .iter()
                .any(|g| g.id == vpc.default_security_group_id && g.default)
        );
        let a = state
            .network_acls
            .iter()
            .find(|a| a.id == acl.network_acl_id)
            .expect("acl rendered");
        assert_eq!(a.inbound.len(), 1);
        assert_eq!(a.inbound[0].action, AclAction::Allow);
        assert!(a.outbound.is_empty());
        let s = state
            .subnets
            .iter()
            .find(|s| s.id == subnet.subnet_id)
            .unwrap();
        assert_eq!(s.network_acl.as_deref(), Some(acl.network_acl_id.as_str()));

        // The policy compiler accepts it.
        let view = state.host_view("h1", |_| None).unwrap();
        let refs = state.policy_refs(&view, "h1");
        crate::policy::compile(&refs.input(
            &state.security_groups,
            &state.network_acls,
            &state.limits,
        ))
        .unwrap();
    }
}
