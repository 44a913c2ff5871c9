//! Security groups and network ACLs, compiled into the datapath's policy maps.
//!
//! - [`model`]: groups, ACLs and quotas as users write them (serde, JSON).
//! - [`mod@compile`]: validation, and the pure function from groups, ACLs and the endpoints of
//!   the cluster to the tables this host's endpoints need.
//! - [`tables`]: the compiled tables and their kernel map entries, both ways.
//! - [`ports`]: port ranges as aligned blocks.
//!
//! # Two stages, no rule scans
//!
//! The datapath (`dataplane_common::policy`) decides with two LPM lookups per policy and
//! direction, whatever the number of rules:
//!
//! 1. **Address stage**: (id, direction, remote address) -> class. A trie returns the class
//!    of the *longest* stored prefix covering the address, so the class of a stored prefix
//!    `P` must stand for every rule whose CIDR contains `P`, not only `P`'s own: an
//!    address's matching rules are exactly those containing the longest stored prefix that
//!    contains it. The compiler processes prefixes shortest first and gives each the merge of
//!    its own rules and the content of its longest stored covering prefix, found by probing
//!    the (at most 32) shorter prefix lengths that occur in a hash map: no pairwise
//!    comparison of prefixes. A prefix whose content equals its cover's is not stored.
//!    Classes are interned by *content* (what the port stage answers), so prefixes with
//!    equal effect share a class, in both directions.
//! 2. **Port stage**: (class, protocol, port) -> answer. Port ranges are aligned
//!    power-of-two blocks (prefixes of the port), a whole protocol is the protocol alone,
//!    everything is the class alone.
//!    - Security groups are an allow-only union: any entry allows. The compiler stores the
//!      normalized union (ranges merged, nothing under an all-ports or all-protocols entry).
//!    - ACLs are "first match wins" with an implicit deny, but a trie answers the longest
//!      match. Per class the compiler evaluates the rules instead: first match is the
//!      minimum rule number, so merging two rule sets is a pointwise minimum. For every
//!      protocol a covering rule names, it computes the partition of the port space into
//!      intervals with the winning rule's verdict; the class alone carries the first
//!      all-protocols rule (absent: no match, deny). Each protocol's entries are disjoint
//!      blocks, plus at most one all-ports entry for the protocol's most common verdict, so
//!      the longest match is always the right interval's verdict. Intervals with the
//!      verdict of the entry below them (all-ports, else all-protocols) are not stored.
//!
//! # Determinism and id reuse
//!
//! Tables are independent of the id they are installed under, ordered (BTree) and
//! compared with `==`. Class numbers follow the sorted order of class contents and nothing
//! depends on input order, so equal policy gives equal tables: the agent reads an installed
//! id back (`from_entries`) and keeps it when it equals the fresh compile, and otherwise
//! installs a new id beside it and switches endpoints over in one map update.
//!
//! # Semantics (AWS)
//!
//! Security groups: stateful (conntrack is the datapath's), allow-only, inbound and
//! outbound lists, rules for a CIDR or the addresses of every endpoint having a group (of
//! the same VPC); the groups of an endpoint are a union; an endpoint without groups has its
//! VPC's default group (the one marked `default`, else an implicit `<vpc-id>/default` that
//! allows all inbound traffic from its members and all outbound traffic). ACLs: per subnet
//! (named, else the VPC's default ACL, else none = allow all), stateless, numbered rules,
//! first match wins, implicit deny; an ACL without rules denies everything. Rule ports match
//! the destination port in both directions; for ICMP they are the type range (codes are
//! not matched, a simplification).

pub mod compile;
pub mod model;
pub mod ports;
pub mod rules;
pub mod tables;

mod classes;

pub use compile::{
    CompiledPolicy, EndpointPolicy, EndpointRef, Kind, PolicyError, PolicyInput, RuleProblem,
    SgSetKey, SubnetRef, compile,
};
pub use model::{AclAction, AclRule, NetworkAcl, PolicyLimits, Protocol, SecurityGroup, SgRule};
pub use rules::{RuleRemote, SgRuleIndex, SgRuleInfo};
pub use tables::{AclTables, PortMatch, SgTables};

#[cfg(test)]
mod tests;
