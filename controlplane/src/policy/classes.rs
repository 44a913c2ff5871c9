//! Class contents (what the port stage answers for one class), their interning, and the
//! address stage that gives each stored prefix the class of all rules covering it.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{BuildHasherDefault, Hash, Hasher},
};

use dataplane_common::policy::{ACL_ALLOW, ACL_DENY, AclVerdict};

use super::{
    ports::{
        Partition, aligned_blocks, block_count, intervals, partition_min, partition_range, port_max,
    },
    tables::{IMPLICIT_DENY_RULE, PortMatch},
};

/// A small, fast, deterministic hasher (FxHash) for the compiler's internal maps, keyed by
/// integers and class contents.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FxHasher(u64);

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        for &b in chunks.remainder() {
            self.add(u64::from(b));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_u128(&mut self, i: u128) {
        self.add(i as u64);
        self.add((i >> 64) as u64);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` with [`FxHasher`].
pub(crate) type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// The content of a class: a function from (protocol, port) to a port-stage answer, with a
/// merge that combines the rules of two prefixes (union for security groups, first match
/// for ACLs). `Default` is the content of no rules at all (no entry, which denies).
pub(crate) trait Content: Clone + Eq + Hash + Ord + Default {
    /// The content of the rules of both (commutative, associative, idempotent).
    fn merge(&self, other: &Self) -> Self;
}

/// The port entries of `lo..=hi` of `proto`: all ports as one entry, else aligned blocks.
fn range_matches(proto: u8, lo: u16, hi: u16) -> impl Iterator<Item = PortMatch> {
    let all = lo == 0 && hi == port_max(proto);
    let blocks = if all {
        // None: the all-ports entry covers the range.
        aligned_blocks(1, 0)
    } else {
        aligned_blocks(lo, hi)
    };
    all.then_some(PortMatch::all_ports(proto))
        .into_iter()
        .chain(blocks.map(move |(port, bits)| PortMatch {
            proto: Some(proto),
            port,
            bits,
        }))
}

/// The number of entries [`range_matches`] yields.
fn range_cost(proto: u8, lo: u16, hi: u16) -> usize {
    if lo == 0 && hi == port_max(proto) {
        1
    } else {
        block_count(lo, hi)
    }
}

/// [`SgClass`]: no rule allows (ports of such a value get no entry, or a 0 entry where a
/// broader entry must be overridden).
pub(crate) const NO_RULE: u32 = u32::MAX;

/// What a security-group class allows, and by which rule: per protocol a partition of the
/// port space into the smallest rule reference allowing each port (security groups are a
/// union: any allowing rule decides; the smallest is reported), and the reference of the
/// first all-protocols rule for the others. Same shape as [`AclClass`], with references
/// for verdicts and [`NO_RULE`] for the implicit deny. Normalized: partition values are
/// already at most `all`, and no protocol's partition is `all` everywhere.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SgClass {
    /// Reference of the smallest all-protocols rule; [`NO_RULE`] if none.
    pub all: u32,
    /// Protocol -> partition of `0..=port_max(proto)` into rule references.
    pub protos: BTreeMap<u8, Partition<u32>>,
}

impl Default for SgClass {
    fn default() -> Self {
        SgClass {
            all: NO_RULE,
            protos: BTreeMap::new(),
        }
    }
}

impl SgClass {
    /// The class of one rule with reference `r` (nonzero): `proto` `None` for all
    /// protocols (ports ignored).
    pub fn rule(proto: Option<u8>, lo: u16, hi: u16, r: u32) -> SgClass {
        match proto {
            None => SgClass {
                all: r,
                protos: BTreeMap::new(),
            },
            Some(p) => SgClass {
                all: NO_RULE,
                protos: BTreeMap::from([(p, partition_range(lo, hi, port_max(p), r, NO_RULE))]),
            },
        }
    }

    /// Its `SG_PORT` entries (value: the rule reference, 0 where a broader entry's rule must
    /// not apply), fewest blocks as for ACLs.
    pub fn port_entries(&self) -> Vec<(PortMatch, u32)> {
        partition_entries(self.all, NO_RULE, &self.protos)
            .into_iter()
            .map(|(m, r)| (m, if r == NO_RULE { 0 } else { r }))
            .collect()
    }
}

impl Content for SgClass {
    fn merge(&self, other: &SgClass) -> SgClass {
        let all = self.all.min(other.all);
        SgClass {
            all,
            protos: merge_protos(&self.protos, self.all, &other.protos, other.all, all),
        }
    }
}

/// The per-protocol partitions of the merge of two classes (`fa`, `fb`: their fallbacks,
/// `fallback`: the merge's): pointwise minimum, protocols equal to the fallback dropped.
fn merge_protos<V: Copy + Ord>(
    a: &BTreeMap<u8, Partition<V>>,
    fa: V,
    b: &BTreeMap<u8, Partition<V>>,
    fb: V,
    fallback: V,
) -> BTreeMap<u8, Partition<V>> {
    let mut protos = BTreeMap::new();
    for &p in a.keys().chain(b.keys()) {
        if protos.contains_key(&p) {
            continue;
        }
        let own = |m: &BTreeMap<u8, Partition<V>>, f: V| {
            m.get(&p).cloned().unwrap_or_else(|| vec![(0, f)])
        };
        let merged = partition_min(&own(a, fa), &own(b, fb));
        if merged != [(0, fallback)] {
            protos.insert(p, merged);
        }
    }
    protos
}

/// The port-stage entries of a class: `fallback` for all protocols (no entry if it is
/// `none`, what no entry means), and per protocol one value `d` as the protocol's all-ports
/// entry (none if it is the fallback) with the port ranges of other values as blocks; `d`
/// is chosen for the fewest entries. Blocks of one protocol are disjoint, so the longest
/// match is the value of the port's range.
fn partition_entries<V: Copy + Ord>(
    fallback: V,
    none: V,
    protos: &BTreeMap<u8, Partition<V>>,
) -> Vec<(PortMatch, V)> {
    let mut out = Vec::new();
    if fallback != none {
        out.push((PortMatch::ALL, fallback));
    }
    for (&p, part) in protos {
        let max = port_max(p);
        let mut candidates: Vec<V> = part.iter().map(|&(_, v)| v).collect();
        candidates.push(fallback);
        candidates.sort_unstable();
        candidates.dedup();
        let cost = |d: V| -> (usize, bool, V) {
            let blocks: usize = intervals(part, max)
                .filter(|&(_, _, v)| v != d)
                .map(|(lo, hi, _)| range_cost(p, lo, hi))
                .sum();
            let own = d != fallback;
            (blocks + usize::from(own), own, d)
        };
        let best = candidates
            .into_iter()
            .min_by_key(|&d| cost(d))
            .unwrap_or(fallback);
        if best != fallback {
            out.push((PortMatch::all_ports(p), best));
        }
        for (lo, hi, v) in intervals(part, max) {
            if v != best {
                out.extend(range_matches(p, lo, hi).map(|m| (m, v)));
            }
        }
    }
    out
}

/// The verdict of an ACL rule, ordered by rule number (first match = minimum).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Verdict {
    /// Rule number; [`IMPLICIT_DENY_RULE`] for the implicit deny.
    pub rule: u16,
    /// Allow or deny.
    pub allow: bool,
}

/// AWS's final `*` rule.
pub(crate) const IMPLICIT: Verdict = Verdict {
    rule: IMPLICIT_DENY_RULE,
    allow: false,
};

impl Verdict {
    /// As the map value.
    pub fn value(self) -> AclVerdict {
        AclVerdict {
            action: if self.allow { ACL_ALLOW } else { ACL_DENY },
            rule: u32::from(self.rule),
        }
    }
}

/// What an ACL class decides: per protocol a partition of its port space into verdicts, and
/// a fallback verdict for the other protocols. Normalized: no protocol whose partition is
/// the fallback everywhere.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct AclClass {
    /// The verdict of protocols not in `protos` (the first all-protocols rule, else the
    /// implicit deny).
    pub fallback: Verdict,
    /// Protocol -> partition of `0..=port_max(proto)`.
    pub protos: BTreeMap<u8, Partition<Verdict>>,
}

impl Default for AclClass {
    fn default() -> Self {
        AclClass {
            fallback: IMPLICIT,
            protos: BTreeMap::new(),
        }
    }
}

impl AclClass {
    /// The class of one rule.
    pub fn rule(proto: Option<u8>, lo: u16, hi: u16, v: Verdict) -> AclClass {
        match proto {
            None => AclClass {
                fallback: v,
                protos: BTreeMap::new(),
            },
            Some(p) => AclClass {
                fallback: IMPLICIT,
                protos: BTreeMap::from([(p, partition_range(lo, hi, port_max(p), v, IMPLICIT))]),
            },
        }
    }

    /// Its `ACL_PORT` entries (see [`partition_entries`]; the implicit deny needs no
    /// entry: no match denies).
    pub fn port_entries(&self) -> Vec<(PortMatch, AclVerdict)> {
        partition_entries(self.fallback, IMPLICIT, &self.protos)
            .into_iter()
            .map(|(m, v)| (m, v.value()))
            .collect()
    }
}

impl Content for AclClass {
    fn merge(&self, other: &AclClass) -> AclClass {
        let fallback = self.fallback.min(other.fallback);
        AclClass {
            fallback,
            protos: merge_protos(
                &self.protos,
                self.fallback,
                &other.protos,
                other.fallback,
                fallback,
            ),
        }
    }
}

/// Interned class contents (id 0 is the empty content) with memoized merges.
#[derive(Debug)]
pub(crate) struct Classes<C> {
    items: Vec<C>,
    index: FxMap<C, u32>,
    memo: FxMap<(u32, u32), u32>,
}

/// The id of the empty content.
pub(crate) const EMPTY: u32 = 0;

impl<C: Content> Classes<C> {
    /// Only the empty content.
    pub fn new() -> Self {
        let mut index = FxMap::default();
        index.insert(C::default(), EMPTY);
        Classes {
            items: vec![C::default()],
            index,
            memo: FxMap::default(),
        }
    }

    /// The id of `c`.
    pub fn intern(&mut self, c: C) -> u32 {
        if let Some(&id) = self.index.get(&c) {
            return id;
        }
        let id = self.items.len() as u32;
        self.items.push(c.clone());
        self.index.insert(c, id);
        id
    }

    /// The content of `id` (an id this interner returned).
    pub fn get(&self, id: u32) -> &C {
        &self.items[id as usize]
    }

    /// The id of the merge of `a` and `b`.
    pub fn merge(&mut self, a: u32, b: u32) -> u32 {
        if a == b || b == EMPTY {
            return a;
        }
        if a == EMPTY {
            return b;
        }
        let key = (a.min(b), a.max(b));
        if let Some(&m) = self.memo.get(&key) {
            return m;
        }
        let merged = self.get(a).merge(self.get(b));
        let m = self.intern(merged);
        self.memo.insert(key, m);
        m
    }
}

/// A remote prefix of a rule: (prefix length, network address, content id of the rule).
pub(crate) type AddrItem = (u8, u32, u32);

fn mask(len: u32) -> u32 {
    u32::MAX.checked_shl(32 - len).unwrap_or(0)
}

/// The address stage of one direction: for each distinct prefix of `items` (canonical), the
/// content of every rule whose prefix covers it, that is its own rules merged with the
/// content of its longest covering prefix. Found by probing the shorter prefix lengths that
/// occur (at most 32 hash lookups per prefix, no pairwise comparison). Prefixes whose
/// content equals that of their longest covering prefix are left out: the lookup falls back
/// to the covering prefix and gets the same answer. Sorts `items`.
pub(crate) fn address_stage<C: Content>(
    classes: &mut Classes<C>,
    items: &mut [AddrItem],
) -> Vec<AddrItem> {
    items.sort_unstable();
    let mut effective: FxMap<(u32, u8), u32> = FxMap::default();
    effective.reserve(items.len());
    let mut lens = 0u64;
    let mut out = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let (len, addr, _) = items[i];
        let mut own = EMPTY;
        while let Some(&(l, a, c)) = items.get(i) {
            if (l, a) != (len, addr) {
                break;
            }
            own = classes.merge(own, c);
            i += 1;
        }
        let mut parent = EMPTY;
        let mut shorter = lens & ((1u64 << len) - 1);
        while shorter != 0 {
            let l = 63 - shorter.leading_zeros();
            if let Some(&c) = effective.get(&(addr & mask(l), l as u8)) {
                parent = c;
                break;
            }
            shorter &= !(1u64 << l);
        }
        let c = classes.merge(parent, own);
        effective.insert((addr, len), c);
        lens |= 1 << len;
        if c != parent {
            out.push((len, addr, c));
        }
    }
    out
}
