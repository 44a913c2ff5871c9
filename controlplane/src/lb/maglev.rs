//! Maglev consistent-hashing tables for the load balancers' backends.
//!
//! The datapath picks the target of a new flow with
//! `LB_MAGLEV[table_offset + flow_hash % table_size]`: each slot of a service's table holds a
//! backend. [`table`] computes that table in user space; the kernel only indexes it.
//!
//! # Algorithm (Maglev, Eisenbud et al., NSDI 2016)
//!
//! The table has `M` slots, `M` prime. Every backend has its own *preference list*, a
//! permutation of the slots derived from its name alone:
//! `offset = h1(name) % M`, `skip = h2(name) % (M - 1) + 1`, and its `j`-th preferred slot is
//! `(offset + j * skip) % M` (a permutation because `M` is prime and `0 < skip < M`). The
//! backends then take turns: at its turn a backend walks its preference list to the next
//! slot that is still free and takes it, until every slot is taken. Every turn takes exactly
//! one slot, so with equal weights the backends' slot counts differ by at most one.
//!
//! Because a backend's preferences do not depend on the other backends, adding or removing
//! one backend of `N` changes little besides the slots it gains or loses: about `1/(N + 1)`
//! of the table moves to a new backend (plus a small fraction of reshuffles between the
//! others, see the tests), and a flow moves only if its slot does. Flows already bound
//! to a target are not affected at all (`LB_FLOWS` pins them).
//!
//! # Weights
//!
//! A backend of weight `w` gets `w / sum(w)` of the slots (to within one slot). Turns are
//! scheduled in virtual time, like weighted fair queueing: backend `i`'s `k`-th turn
//! happens at time `k / w_i`, and turns run in time order, ties in the order of the
//! backends' names. With equal weights this is exactly the paper's round-robin; in
//! general it is the exact form of the credit scheme of Katran and Cilium (each round, a
//! backend accrues its weight and takes a turn per `max(w)` of credit), without its
//! rounding to whole rounds and independent of the largest weight, so changing one
//! backend's weight does not reorder the turns of the others. The next turn is found
//! with a binary heap: building a table costs `O(M log N)` heap work plus the
//! preference-list walks (`O(M log M)` probes in total, each one add and compare); no
//! allocation per slot.
//!
//! # Determinism
//!
//! Every host of the cluster (and every agent version) must compute the same table for the
//! same backends, or flows of one service would land on different targets depending on
//! which client host they start from, and a restarted agent would reshuffle its services.
//! So the name hash is fixed (FNV-1a 64 finalized with MurmurHash3's `fmix64`, two seeds),
//! never std's randomized hasher, and the result does not depend on the order of the
//! input: backends are sorted by name internally (names must be unique) and the indices
//! mapped back to the caller's order.

use crate::fnv::fnv1a64;

/// Default number of slots of a table: a prime, at least [`MIN_SLOTS_PER_BACKEND`] slots per
/// backend up to 655 backends.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;

/// Minimum number of slots per backend: below this the shares (and the disruption on
/// changes) get coarse, so [`table`] refuses smaller tables.
pub const MIN_SLOTS_PER_BACKEND: u32 = 100;

/// Slot not yet taken (no backend has this index: there are fewer than `u32::MAX / 100`).
const EMPTY: u32 = u32::MAX;

/// Seeds of the two name hashes (offset, skip): arbitrary, fixed forever.
const SEED_OFFSET: u64 = 0x6d61_676c_6576_6f66; // "maglevof"
const SEED_SKIP: u64 = 0x6d61_676c_6576_736b; // "maglevsk"

/// One backend as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend<'a> {
    /// Stable identity of the backend, e.g. `"10.0.1.5:8080"`: its preference list is a
    /// function of the name, so the name must not change while the backend exists.
    pub name: &'a str,
    /// Relative weight (> 0): the backend gets `weight / sum(weights)` of the slots.
    pub weight: u32,
}

/// Why a table cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    /// The table size is not a prime (preference lists would not be permutations).
    #[error("Maglev table size {size} is not a prime")]
    SizeNotPrime {
        /// The requested size.
        size: u32,
    },
    /// The table has fewer than [`MIN_SLOTS_PER_BACKEND`] slots per backend.
    #[error(
        "Maglev table size {size} is too small for {backends} backends: \
         it needs at least {MIN_SLOTS_PER_BACKEND} x {backends} = {min} slots"
    )]
    SizeTooSmall {
        /// The requested size.
        size: u32,
        /// Number of backends.
        backends: usize,
        /// The minimum size for that many backends.
        min: u64,
    },
    /// A backend has weight 0 (leave it out of the table instead).
    #[error("Maglev backend {name:?} has weight 0")]
    ZeroWeight {
        /// The backend's name.
        name: String,
    },
    /// Two backends have the same name.
    #[error("duplicate Maglev backend name {name:?}")]
    DuplicateName {
        /// The duplicated name.
        name: String,
    },
}

/// Whether `n` is a prime: deterministic trial division by 2, 3 and `6k ± 1` up to
/// `sqrt(n)` (at most about 22 000 divisions for any `u32`).
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = u64::from(n);
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// The smallest prime `>= n` (e.g. to size a table from a slot count).
///
/// # Panics
///
/// If there is none in `u32`: `n > 4_294_967_291`, the largest `u32` prime.
pub fn next_prime(n: u32) -> u32 {
    (n..=u32::MAX)
        .find(|&c| is_prime(c))
        .unwrap_or_else(|| panic!("no u32 prime >= {n}"))
}

/// The 64-bit finalizer of MurmurHash3: every input bit affects every output bit.
const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// The fixed, seeded hash of a backend name the preference lists derive from.
fn name_hash(name: &str, seed: u64) -> u64 {
    fmix64(fnv1a64(name.as_bytes()) ^ seed)
}

/// A backend's preference list: `(first slot, skip)`, for a prime `size >= 2`.
fn preference(name: &str, size: u32) -> (u32, u32) {
    let m = u64::from(size);
    let offset = name_hash(name, SEED_OFFSET) % m;
    let skip = name_hash(name, SEED_SKIP) % (m - 1) + 1;
    // Both < size, so they fit.
    (offset as u32, skip as u32)
}

/// A backend's next turn in virtual time: turn `k` (from 1) of a backend of weight `w`
/// happens at time `k / w`. Ordered so that [`std::collections::BinaryHeap`] (a max-heap)
/// pops the earliest turn first, ties to the lowest (name-sorted) index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Turn {
    k: u64,
    weight: u64,
    index: u32,
}

impl Ord for Turn {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // k / w < k' / w'  <=>  k * w' < k' * w; k <= size + 1 and w < 2^32: no overflow.
        let this = self.k * other.weight;
        let that = other.k * self.weight;
        that.cmp(&this).then(other.index.cmp(&self.index))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The Maglev table of `backends`: `size` slots, each the index in `backends` of the
/// backend the slot sends new flows to. Empty `backends` gives an empty table (the
/// datapath's `table_size` 0: no target), whatever `size`.
///
/// `size` must be a prime of at least [`MIN_SLOTS_PER_BACKEND`] slots per backend, weights
/// must be positive and names unique. The result depends only on the set of backends
/// (name, weight) and `size`, not on their order in `backends`, and is the same on every
/// host.
pub fn table(backends: &[MaglevBackend<'_>], size: u32) -> Result<Vec<u32>, MaglevError> {
    if backends.is_empty() {
        return Ok(Vec::new());
    }
    if !is_prime(size) {
        return Err(MaglevError::SizeNotPrime { size });
    }
    let n = backends.len();
    let min = u64::from(MIN_SLOTS_PER_BACKEND) * n as u64;
    if u64::from(size) < min {
        return Err(MaglevError::SizeTooSmall {
            size,
            backends: n,
            min,
        });
    }
    // Name order: the result must not depend on the caller's order. size >= 100 * n, so
    // indices fit a u32 (and never equal EMPTY).
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_unstable_by_key(|&i| backends[i as usize].name);
    for pair in order.windows(2) {
        let name = backends[pair[0] as usize].name;
        if name == backends[pair[1] as usize].name {
            return Err(MaglevError::DuplicateName { name: name.into() });
        }
    }
    if let Some(&i) = order.iter().find(|&&i| backends[i as usize].weight == 0) {
        return Err(MaglevError::ZeroWeight {
            name: backends[i as usize].name.into(),
        });
    }

    // Per backend (name order): the next slot of its preference list, and its skip.
    let mut next = Vec::with_capacity(n);
    let mut skip = Vec::with_capacity(n);
    for &i in &order {
        let (o, s) = preference(backends[i as usize].name, size);
        next.push(o);
        skip.push(s);
    }
    let mut turns: std::collections::BinaryHeap<Turn> = order
        .iter()
        .enumerate()
        .map(|(sorted, &i)| Turn {
            k: 1,
            weight: u64::from(backends[i as usize].weight),
            index: sorted as u32,
        })
        .collect();

    let mut slots = vec![EMPTY; size as usize];
    let mut filled = 0u32;
    while filled < size {
        // The heap always holds all n backends; n > 0.
        let Some(mut turn) = turns.peek_mut() else {
            unreachable!("the heap holds every backend")
        };
        let b = turn.index as usize;
        let mut slot = next[b];
        while slots[slot as usize] != EMPTY {
            slot = advance(slot, skip[b], size);
        }
        slots[slot as usize] = order[b];
        next[b] = advance(slot, skip[b], size);
        filled += 1;
        // Reordered when the PeekMut drops (one sift-down, no pop and push).
        turn.k += 1;
    }
    Ok(slots)
}

/// The slot after `slot` in a preference list: `(slot + skip) % size`, both `< size`.
#[inline]
fn advance(slot: u32, skip: u32, size: u32) -> u32 {
    let s = u64::from(slot) + u64::from(skip);
    let m = u64::from(size);
    (if s >= m { s - m } else { s }) as u32
}

#[cfg(test)]
mod tests {
    use dataplane_common::{filter::ipv4_mapped, lb::flow_hash};

    use super::*;

    /// Small deterministic PRNG (xorshift64).
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// 100 000 random TCP flows of random clients (10.0.0.0/8, random ephemeral ports) to
    /// one VIP and listener, as their `flow_hash`: what a service's table is indexed with.
    fn flow_hashes() -> Vec<u32> {
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let vip = ipv4_mapped([10, 0, 0, 100]);
        (0..100_000)
            .map(|_| {
                let r = rng.next();
                let src = ipv4_mapped([10, (r >> 8) as u8, (r >> 16) as u8, (r >> 24) as u8]);
                let sport = 1024 + ((r >> 32) % (65_536 - 1024)) as u16;
                flow_hash(&src, &vip, sport, 443, 6)
            })
            .collect()
    }

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:8080", i / 250, i % 250 + 1))
            .collect()
    }

    fn equal(names: &[String]) -> Vec<MaglevBackend<'_>> {
        names
            .iter()
            .map(|name| MaglevBackend { name, weight: 1 })
            .collect()
    }

    /// Builds the table and checks it is complete (every slot a valid index).
    fn build(backends: &[MaglevBackend<'_>], size: u32) -> Vec<u32> {
        let t = table(backends, size).unwrap();
        assert_eq!(t.len(), size as usize);
        assert!(t.iter().all(|&b| (b as usize) < backends.len()));
        t
    }

    /// The table as backend names, to compare tables of different backend lists.
    fn by_name<'a>(backends: &[MaglevBackend<'a>], t: &[u32]) -> Vec<&'a str> {
        t.iter().map(|&b| backends[b as usize].name).collect()
    }

    fn counts(t: &[u32], n: usize) -> Vec<u64> {
        let mut c = vec![0u64; n];
        for &b in t {
            c[b as usize] += 1;
        }
        c
    }

    /// Counts of the flows per backend (`slot = hash % size`, as the datapath does).
    fn flow_counts(t: &[u32], n: usize, flows: &[u32]) -> Vec<u64> {
        let mut c = vec![0u64; n];
        for &h in flows {
            c[t[(h % t.len() as u32) as usize] as usize] += 1;
        }
        c
    }

    /// Largest relative deviation of `counts` from `expected` (same length).
    fn max_dev(counts: &[u64], expected: &[f64]) -> f64 {
        counts
            .iter()
            .zip(expected)
            .map(|(&c, &e)| (c as f64 - e).abs() / e)
            .fold(0.0, f64::max)
    }

    /// Changes between two tables (as names): `(moved to the added/changed backend, moved
    /// from the removed/changed backend, moved between other backends)`, as fractions of
    /// the slots, and the fraction of `flows` whose backend changed.
    fn disruption(old: &[&str], new: &[&str], focus: &str, flows: &[u32]) -> (f64, f64, f64, f64) {
        let m = old.len() as f64;
        let (mut to, mut from, mut other) = (0u32, 0u32, 0u32);
        for (o, n) in old.iter().zip(new) {
            if o != n {
                if *n == focus {
                    to += 1;
                } else if *o == focus {
                    from += 1;
                } else {
                    other += 1;
                }
            }
        }
        let size = old.len() as u32;
        let moved = flows
            .iter()
            .filter(|&&h| old[(h % size) as usize] != new[(h % size) as usize])
            .count();
        (
            f64::from(to) / m,
            f64::from(from) / m,
            f64::from(other) / m,
            moved as f64 / flows.len() as f64,
        )
    }

    #[test]
    fn primes() {
        for n in [
            0,
            1,
            4,
            6,
            9,
            25,
            49,
            65_536,
            1_000_000,
            1_000_001,
            u32::MAX,
        ] {
            assert!(!is_prime(n), "{n}");
        }
        for n in [
            2,
            3,
            5,
            7,
            11,
            65_537,
            1_000_003,
            2_147_483_647,
            4_294_967_291,
        ] {
            assert!(is_prime(n), "{n}");
        }
        // 65_521 * 65_519: a product of two primes near the trial-division limit.
        assert!(!is_prime(4_292_870_399));
        // Against a sieve.
        let limit = 100_000usize;
        let mut composite = vec![false; limit];
        for i in 2..limit {
            if !composite[i] {
                for j in (i * i..limit).step_by(i) {
                    composite[j] = true;
                }
            }
            assert_eq!(is_prime(i as u32), !composite[i], "{i}");
        }
        assert_eq!(next_prime(0), 2);
        assert_eq!(next_prime(2), 2);
        assert_eq!(next_prime(8), 11);
        assert_eq!(next_prime(65_536), 65_537);
        assert_eq!(next_prime(65_537), 65_537);
        assert_eq!(next_prime(1_000_000), 1_000_003);
        assert_eq!(next_prime(4_294_967_280), 4_294_967_291);
        assert!(is_prime(DEFAULT_TABLE_SIZE));
    }

    #[test]
    fn name_hash_is_fixed() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        // Pinned outputs: every host and agent version must compute the same tables, so a
        // change here is a breaking change of the cluster's flow placement.
        let pinned = [
            preference("10.0.1.5:8080", DEFAULT_TABLE_SIZE),
            preference("10.0.1.6:8080", DEFAULT_TABLE_SIZE),
        ];
        println!("pinned preferences: {pinned:?}");
        assert_eq!(pinned, PINNED_PREFERENCES);
        let names = ["10.0.1.5:8080", "10.0.1.6:8080", "10.0.1.7:8080"];
        let backends: Vec<_> = names
            .iter()
            .map(|name| MaglevBackend { name, weight: 1 })
            .collect();
        let t = build(&backends, 307);
        println!("first slots: {:?}", &t[..16]);
        assert_eq!(&t[..16], PINNED_SLOTS);
        // The whole of a weighted table (the turn schedule), as a digest.
        let weighted: Vec<_> = names
            .iter()
            .zip(1..)
            .map(|(name, weight)| MaglevBackend { name, weight })
            .collect();
        let bytes: Vec<u8> = build(&weighted, 1_009)
            .iter()
            .flat_map(|b| b.to_le_bytes())
            .collect();
        let digest = fnv1a64(&bytes);
        println!("weighted table digest: {digest:#x}");
        assert_eq!(digest, PINNED_WEIGHTED_DIGEST);
    }

    const PINNED_PREFERENCES: [(u32, u32); 2] = [(22_328, 41_584), (34_566, 6_687)];
    const PINNED_SLOTS: &[u32] = &[0, 2, 2, 0, 2, 2, 1, 1, 2, 1, 0, 2, 0, 0, 2, 0];
    const PINNED_WEIGHTED_DIGEST: u64 = 0xd1e8_8230_dc70_aa07;

    #[test]
    fn errors() {
        let names = names(3);
        let backends = equal(&names);
        assert_eq!(
            table(&backends, 65_536),
            Err(MaglevError::SizeNotPrime { size: 65_536 })
        );
        assert_eq!(
            table(&backends, 1),
            Err(MaglevError::SizeNotPrime { size: 1 })
        );
        let err = table(&backends, 293).unwrap_err();
        assert_eq!(
            err,
            MaglevError::SizeTooSmall {
                size: 293,
                backends: 3,
                min: 300
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains("293") && msg.contains("300") && msg.contains("3 backends"),
            "{msg}"
        );
        assert!(table(&backends, 307).is_ok());

        let mut weighted = backends.clone();
        weighted[1].weight = 0;
        assert_eq!(
            table(&weighted, 307),
            Err(MaglevError::ZeroWeight {
                name: names[1].clone()
            })
        );
        let dup = [
            MaglevBackend {
                name: "a",
                weight: 1,
            },
            MaglevBackend {
                name: "b",
                weight: 1,
            },
            MaglevBackend {
                name: "a",
                weight: 2,
            },
        ];
        assert_eq!(
            table(&dup, 307),
            Err(MaglevError::DuplicateName { name: "a".into() })
        );
        // No backends: an empty table whatever the size.
        assert_eq!(table(&[], 65_537), Ok(Vec::new()));
        assert_eq!(table(&[], 0), Ok(Vec::new()));
    }

    #[test]
    fn single_backend_fills_all_slots() {
        let one = [MaglevBackend {
            name: "10.0.1.5:8080",
            weight: 7,
        }];
        for size in [101, 65_537] {
            let t = build(&one, size);
            assert!(t.iter().all(|&b| b == 0));
        }
    }

    /// The classic formulation of the paper (equal weights, round-robin over the backends
    /// in name order, preference lists by multiplication): the heap must reproduce it.
    #[test]
    fn matches_paper_round_robin() {
        for (n, size) in [(2, 211), (7, 701), (10, 65_537), (33, 4_099)] {
            let names = names(n);
            let backends = equal(&names);
            let mut sorted: Vec<usize> = (0..n).collect();
            sorted.sort_by_key(|&i| &names[i]);
            let m = u64::from(size);
            let mut reference = vec![EMPTY; size as usize];
            let mut j = vec![0u64; n];
            let mut filled = 0;
            'fill: loop {
                for &i in &sorted {
                    let (o, s) = preference(&names[i], size);
                    loop {
                        let slot = ((u64::from(o) + j[i] * u64::from(s)) % m) as usize;
                        j[i] += 1;
                        if reference[slot] == EMPTY {
                            reference[slot] = i as u32;
                            filled += 1;
                            break;
                        }
                    }
                    if filled == size {
                        break 'fill;
                    }
                }
            }
            assert_eq!(build(&backends, size), reference, "n = {n}");
        }
    }

    #[test]
    fn balance() {
        let flows = flow_hashes();
        let m = DEFAULT_TABLE_SIZE;
        for n in [3, 10, 100] {
            let names = names(n);
            let backends = equal(&names);
            let t = build(&backends, m);
            let slots = counts(&t, n);
            let slot_dev = max_dev(&slots, &vec![f64::from(m) / n as f64; n]);
            let per_flow = flows.len() as f64 / n as f64;
            let fc = flow_counts(&t, n, &flows);
            let flow_dev = max_dev(&fc, &vec![per_flow; n]);
            println!(
                "balance N={n}: slots per backend {}..{} (ideal {:.1}, max dev {:.3}%), \
                 flows per backend {}..{} (ideal {per_flow:.0}, max dev {:.2}%)",
                slots.iter().min().unwrap(),
                slots.iter().max().unwrap(),
                f64::from(m) / n as f64,
                slot_dev * 100.0,
                fc.iter().min().unwrap(),
                fc.iter().max().unwrap(),
                flow_dev * 100.0
            );
            // Every turn takes one slot: equal weights differ by at most one slot.
            assert!(slots.iter().max().unwrap() - slots.iter().min().unwrap() <= 1);
            assert!(slot_dev < 0.01);
            if n <= 10 {
                assert!(flow_dev < 0.05, "N={n}: {fc:?}");
            } else {
                // 1000 flows per backend: sampling noise alone is ~3%.
                assert!(flow_dev < 0.15, "N={n}: {fc:?}");
            }
        }
    }

    #[test]
    fn adding_a_backend_moves_about_one_in_n_plus_one() {
        let flows = flow_hashes();
        let m = DEFAULT_TABLE_SIZE;
        let names = names(11);
        let before = equal(&names[..10]);
        let after = equal(&names);
        let old = build(&before, m);
        let new = build(&after, m);
        let (to, from, other, flows_moved) = disruption(
            &by_name(&before, &old),
            &by_name(&after, &new),
            &names[10],
            &flows,
        );
        println!(
            "add 1 to 10: {:.2}% slots to the new backend, {:.2}% between others, \
             total {:.2}% (ideal {:.2}%), flows moved {:.2}%",
            to * 100.0,
            other * 100.0,
            (to + other) * 100.0,
            100.0 / 11.0,
            flows_moved * 100.0
        );
        assert_eq!(from, 0.0);
        assert!((to - 1.0 / 11.0).abs() < 0.001, "{to}");
        assert!(other < 0.02, "{other}");
        assert!(to + other <= 1.2 / 11.0);
        assert!(flows_moved <= 1.2 / 11.0 + 0.005, "{flows_moved}");
        assert!(flows_moved >= 1.0 / 11.0 - 0.005, "{flows_moved}");
    }

    #[test]
    fn removing_a_backend_moves_about_one_in_n() {
        let flows = flow_hashes();
        let m = DEFAULT_TABLE_SIZE;
        let names = names(10);
        let before = equal(&names);
        let old = build(&before, m);
        for gone in [0, 4, 9] {
            let after: Vec<_> = before
                .iter()
                .filter(|b| b.name != names[gone])
                .copied()
                .collect();
            let new = build(&after, m);
            let (to, from, other, flows_moved) = disruption(
                &by_name(&before, &old),
                &by_name(&after, &new),
                &names[gone],
                &flows,
            );
            println!(
                "remove {} of 10: {:.2}% slots from the removed backend, {:.2}% between \
                 others, total {:.2}% (ideal 10%), flows moved {:.2}%",
                names[gone],
                from * 100.0,
                other * 100.0,
                (from + other) * 100.0,
                flows_moved * 100.0
            );
            assert_eq!(to, 0.0);
            assert!((from - 0.1).abs() < 0.001, "{from}");
            assert!(other < 0.02, "{other}");
            assert!(from + other <= 1.2 / 10.0);
            assert!(flows_moved <= 0.12 + 0.005, "{flows_moved}");
        }
    }

    #[test]
    fn weights_give_proportional_shares() {
        let m = DEFAULT_TABLE_SIZE;
        let w123 = [
            MaglevBackend {
                name: "a",
                weight: 1,
            },
            MaglevBackend {
                name: "b",
                weight: 2,
            },
            MaglevBackend {
                name: "c",
                weight: 3,
            },
        ];
        let c = counts(&build(&w123, m), 3);
        let shares: Vec<f64> = c.iter().map(|&c| c as f64 / f64::from(m)).collect();
        println!("weights 1,2,3: slot shares {shares:.5?} (ideal 0.16667, 0.33333, 0.50000)");
        for (i, share) in shares.iter().enumerate() {
            assert!((share - (i + 1) as f64 / 6.0).abs() < 0.01, "{shares:?}");
        }

        // 100 backends of weights 1..=100: within one slot of the exact share... give or take.
        let names = names(100);
        let backends: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, name)| MaglevBackend {
                name,
                weight: i as u32 + 1,
            })
            .collect();
        let size = 1_000_003;
        let c = counts(&build(&backends, size), 100);
        let total: u64 = (1..=100).sum();
        let worst = c
            .iter()
            .enumerate()
            .map(|(i, &c)| (c as f64 - f64::from(size) * (i + 1) as f64 / total as f64).abs())
            .fold(0.0, f64::max);
        println!("weights 1..=100, M={size}: worst slot count off the exact share by {worst:.2}");
        assert!(worst <= 2.0, "{worst}");

        // A dominant weight.
        let skewed = [
            MaglevBackend {
                name: "big",
                weight: 1000,
            },
            MaglevBackend {
                name: "small",
                weight: 1,
            },
        ];
        let c = counts(&build(&skewed, 65_537), 2);
        println!("weights 1000,1: slots {c:?}");
        assert!((c[1] as f64 - 65_537.0 / 1001.0).abs() <= 1.0, "{c:?}");
    }

    #[test]
    fn weight_change_moves_few_other_slots() {
        let flows = flow_hashes();
        let m = DEFAULT_TABLE_SIZE;
        let names = names(10);
        let before = equal(&names);
        let old = build(&before, m);
        for new_weight in [2, 3, 10] {
            let mut after = before.clone();
            after[3].weight = new_weight;
            let new = build(&after, m);
            let (to, from, other, flows_moved) = disruption(
                &by_name(&before, &old),
                &by_name(&after, &new),
                &names[3],
                &flows,
            );
            let gain = f64::from(new_weight) / f64::from(new_weight + 9) - 0.1;
            println!(
                "weight 1 -> {new_weight} (1 of 10): {:.2}% slots to it (share gain {:.2}%), \
                 {:.2}% from it, {:.2}% between others, flows moved {:.2}%",
                to * 100.0,
                gain * 100.0,
                from * 100.0,
                other * 100.0,
                flows_moved * 100.0
            );
            assert!(to <= gain * 1.2, "{to}");
            assert!(from < 0.01, "{from}");
            assert!(other < 0.02, "{other}");
            // And back: the old table exactly.
            assert_eq!(build(&before, m), old);
        }
        // Lowering a weight: 10 backends of weight 2, one goes to 1.
        let before: Vec<_> = before
            .iter()
            .map(|b| MaglevBackend { weight: 2, ..*b })
            .collect();
        let old = build(&before, m);
        let mut after = before.clone();
        after[3].weight = 1;
        let new = build(&after, m);
        let (to, from, other, flows_moved) = disruption(
            &by_name(&before, &old),
            &by_name(&after, &new),
            &names[3],
            &flows,
        );
        let loss = 0.1 - 1.0 / 19.0;
        println!(
            "weight 2 -> 1 (1 of 10): {:.2}% slots from it (share loss {:.2}%), {:.2}% to it, \
             {:.2}% between others, flows moved {:.2}%",
            from * 100.0,
            loss * 100.0,
            to * 100.0,
            other * 100.0,
            flows_moved * 100.0
        );
        assert!(from <= loss * 1.2, "{from}");
        assert!(to < 0.01, "{to}");
        assert!(other < 0.02, "{other}");
    }

    #[test]
    fn order_independent_and_deterministic() {
        let names = names(50);
        let backends: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, name)| MaglevBackend {
                name,
                weight: (i % 4) as u32 + 1,
            })
            .collect();
        let size = 10_007;
        let t = build(&backends, size);
        assert_eq!(build(&backends, size), t);
        let reference = by_name(&backends, &t);
        let mut rng = XorShift(42);
        for _ in 0..5 {
            let mut shuffled = backends.clone();
            for i in (1..shuffled.len()).rev() {
                shuffled.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            assert_ne!(shuffled, backends);
            let s = build(&shuffled, size);
            assert_ne!(s, t);
            assert_eq!(by_name(&shuffled, &s), reference);
        }
        let mut reversed = backends.clone();
        reversed.reverse();
        assert_eq!(by_name(&reversed, &build(&reversed, size)), reference);
    }
}
