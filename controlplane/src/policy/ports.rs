//! Port ranges: aligned power-of-two blocks, range sets and first-match partitions.
//!
//! The port stage of the datapath stores port ranges as LPM prefixes, that is as aligned
//! blocks of `2^bits` ports starting at a multiple of `2^bits`. Everything here is pure.
//!
//! Port spaces: TCP and UDP match the destination port (`0..=65535`), ICMP the type
//! (`0..=255`, [`port_max`]), every other protocol the single value 0.

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// The largest port value the datapath looks up for `proto`: 65535 for TCP and UDP, 255 (the
/// ICMP type) for ICMP, 0 for every other protocol.
pub const fn port_max(proto: u8) -> u16 {
    match proto {
        PROTO_TCP | PROTO_UDP => u16::MAX,
        PROTO_ICMP => 255,
        _ => 0,
    }
}

/// An inclusive port range `(first, last)`, `first <= last`.
pub type PortRange = (u16, u16);

/// The aligned blocks `(start, bits)` covering `lo..=hi` exactly, fewest possible, in
/// ascending order. Empty when `lo > hi`.
///
/// Greedy: from the left, the largest block aligned at the current start that does not pass
/// `hi` (optimal: any exact cover must contain a block starting at `lo`, and a larger one is
/// never worse).
pub fn aligned_blocks(lo: u16, hi: u16) -> AlignedBlocks {
    AlignedBlocks {
        next: u32::from(lo),
        hi: u32::from(hi),
    }
}

/// Iterator of [`aligned_blocks`].
#[derive(Clone, Debug)]
pub struct AlignedBlocks {
    next: u32,
    hi: u32,
}

impl Iterator for AlignedBlocks {
    type Item = (u16, u8);

    fn next(&mut self) -> Option<(u16, u8)> {
        if self.next > self.hi {
            return None;
        }
        let start = self.next;
        let align = start.trailing_zeros().min(16);
        // `ilog2` of a positive number; the remaining length is at least 1.
        let fit = (self.hi - start + 1).ilog2();
        let bits = align.min(fit);
        self.next = start + (1 << bits);
        // `start <= hi <= 65535` and `bits <= 16`.
        Some((start as u16, bits as u8))
    }
}

/// The number of blocks [`aligned_blocks`] yields.
pub fn block_count(lo: u16, hi: u16) -> usize {
    aligned_blocks(lo, hi).count()
}

/// Sorts `ranges` and merges overlapping and adjacent ranges, so equal sets of ports have
/// equal lists. Ranges with `first > last` are dropped.
pub fn normalize(ranges: &mut Vec<PortRange>) {
    ranges.retain(|&(lo, hi)| lo <= hi);
    ranges.sort_unstable();
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for &(lo, hi) in ranges.iter() {
        match out.last_mut() {
            Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    *ranges = out;
}

/// The union of two normalized range lists, normalized.
pub fn union(a: &[PortRange], b: &[PortRange]) -> Vec<PortRange> {
    let mut all = Vec::with_capacity(a.len() + b.len());
    all.extend_from_slice(a);
    all.extend_from_slice(b);
    normalize(&mut all);
    all
}

/// A partition of a port space `0..=max`: `(start, value)` pairs with strictly increasing
/// starts, the first at 0; each value holds from its start to the next start - 1 (the last
/// to `max`). Normalized partitions never repeat a value in adjacent pairs.
pub type Partition<V> = Vec<(u16, V)>;

/// The partition that is `inside` on `lo..=hi` and `outside` elsewhere in `0..=max`,
/// normalized.
pub fn partition_range<V: Copy + Eq>(
    lo: u16,
    hi: u16,
    max: u16,
    inside: V,
    outside: V,
) -> Partition<V> {
    let mut p = Vec::with_capacity(3);
    if lo > 0 {
        p.push((0, outside));
    }
    p.push((lo, inside));
    if hi < max {
        p.push((hi + 1, outside));
    }
    merge_adjacent(&mut p);
    p
}

/// Merges adjacent pairs with equal values.
pub fn merge_adjacent<V: Eq>(p: &mut Partition<V>) {
    p.dedup_by(|next, prev| next.1 == prev.1);
}

/// The pointwise minimum of two partitions of the same space, normalized. With values
/// ordered by rule number this is "first match wins" across the two.
pub fn partition_min<V: Copy + Ord>(a: &[(u16, V)], b: &[(u16, V)]) -> Partition<V> {
    let mut out: Partition<V> = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let start = a[i].0.max(b[j].0);
        let v = a[i].1.min(b[j].1);
        if out.last().is_none_or(|last| last.1 != v) {
            out.push((start, v));
        }
        match (a.get(i + 1), b.get(j + 1)) {
            (None, None) => break,
            (Some(_), None) => i += 1,
            (None, Some(_)) => j += 1,
            (Some(x), Some(y)) => {
                if x.0 <= y.0 {
                    i += 1;
                }
                if y.0 <= x.0 {
                    j += 1;
                }
            }
        }
    }
    out
}

/// The intervals `(first, last, value)` of a partition of `0..=max`.
pub fn intervals<V: Copy>(p: &[(u16, V)], max: u16) -> impl Iterator<Item = (u16, u16, V)> + '_ {
    p.iter().enumerate().map(move |(i, &(start, v))| {
        let last = p.get(i + 1).map_or(max, |next| next.0.saturating_sub(1));
        (start, last, v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(lo: u16, hi: u16) -> Vec<(u16, u8)> {
        aligned_blocks(lo, hi).collect()
    }

    #[test]
    fn blocks_examples() {
        assert_eq!(blocks(0, u16::MAX), [(0, 16)]);
        assert_eq!(blocks(80, 80), [(80, 0)]);
        assert_eq!(blocks(1, 0), []);
        assert_eq!(blocks(u16::MAX, u16::MAX), [(u16::MAX, 0)]);
        // AWS's ephemeral range: 32768-65535 is one block.
        assert_eq!(blocks(32768, u16::MAX), [(32768, 15)]);
        // 1024-65535: 1024, 2048, 4096, ..., 32768.
        assert_eq!(blocks(1024, u16::MAX).len(), 6);
        assert_eq!(blocks(0, 255), [(0, 8)]);
        assert_eq!(blocks(1, 6), [(1, 0), (2, 1), (4, 1), (6, 0)]);
        assert_eq!(block_count(1, u16::MAX), 16);
    }

    /// Exhaustive on a 7-bit space: the blocks are aligned, disjoint, cover the range exactly
    /// and are as few as a dynamic program over all aligned blocks finds.
    #[test]
    fn blocks_exact_and_minimal_exhaustive() {
        const N: usize = 128;
        // best[lo][hi]: fewest aligned blocks covering lo..=hi exactly (usize::MAX: none).
        let mut best = vec![[usize::MAX; N]; N + 1];
        for lo in (0..N).rev() {
            let mut row = [usize::MAX; N];
            for (hi, slot) in row.iter_mut().enumerate().skip(lo) {
                let mut size = 1;
                while size <= N && lo % size == 0 && lo + size - 1 <= hi {
                    let end = lo + size;
                    let rest = if end > hi { 0 } else { best[end][hi] };
                    *slot = (*slot).min(rest.saturating_add(1));
                    size *= 2;
                }
            }
            best[lo] = row;
        }
        for (lo, row) in best.iter().enumerate().take(N) {
            for (hi, &fewest) in row.iter().enumerate().skip(lo) {
                let bl = blocks(lo as u16, hi as u16);
                let mut next = lo;
                for &(start, bits) in &bl {
                    assert_eq!(usize::from(start), next, "{lo}..={hi}: {bl:?}");
                    assert_eq!(usize::from(start) % (1 << bits), 0);
                    next += 1 << bits;
                }
                assert_eq!(next, hi + 1, "{lo}..={hi}: {bl:?}");
                assert_eq!(bl.len(), fewest, "{lo}..={hi}: {bl:?}");
            }
        }
    }

    #[test]
    fn blocks_exact_at_the_top_of_the_space() {
        for lo in [0u16, 1, 255, 256, 1023, 32767, 32768, 65534, 65535] {
            for hi in [lo, 65534, 65535] {
                if hi < lo {
                    continue;
                }
                let mut next = u32::from(lo);
                for (start, bits) in aligned_blocks(lo, hi) {
                    assert_eq!(u32::from(start), next);
                    next += 1 << bits;
                }
                assert_eq!(next, u32::from(hi) + 1);
            }
        }
    }

    /// Exhaustive on small sets: normalize keeps exactly the covered ports, sorted, disjoint,
    /// non-adjacent; union is the union.
    #[test]
    fn normalize_and_union_exhaustive() {
        let space = 10u16;
        let ranges: Vec<PortRange> = (0..space)
            .flat_map(|lo| (lo..space).map(move |hi| (lo, hi)))
            .collect();
        let covered = |rs: &[PortRange]| -> Vec<bool> {
            (0..space)
                .map(|p| rs.iter().any(|&(lo, hi)| lo <= p && p <= hi))
                .collect()
        };
        for (i, &a) in ranges.iter().enumerate() {
            for &b in &ranges[i..] {
                for &c in &ranges[..4] {
                    let input = vec![c, b, a];
                    let mut n = input.clone();
                    normalize(&mut n);
                    assert_eq!(covered(&n), covered(&input), "{input:?} -> {n:?}");
                    for w in n.windows(2) {
                        assert!(u32::from(w[0].1) + 1 < u32::from(w[1].0), "{n:?}");
                    }
                    let u = union(&n, &[c]);
                    assert_eq!(covered(&u), covered(&input));
                    assert_eq!(u, n);
                }
            }
        }
        let mut top = vec![(65535, 65535), (0, 65534)];
        normalize(&mut top);
        assert_eq!(top, [(0, 65535)]);
    }

    fn eval(p: &[(u16, u8)], max: u16, port: u16) -> u8 {
        intervals(p, max)
            .find(|&(lo, hi, _)| lo <= port && port <= hi)
            .map(|(_, _, v)| v)
            .unwrap()
    }

    /// Exhaustive on a small space: the minimum of two range partitions is pointwise.
    #[test]
    fn partition_min_exhaustive() {
        let max = 7u16;
        for lo1 in 0..=max {
            for hi1 in lo1..=max {
                for lo2 in 0..=max {
                    for hi2 in lo2..=max {
                        let a = partition_range(lo1, hi1, max, 1u8, 9);
                        let b = partition_range(lo2, hi2, max, 2u8, 5);
                        let m = partition_min(&a, &b);
                        assert_eq!(m[0].0, 0);
                        for w in m.windows(2) {
                            assert!(w[0].0 < w[1].0 && w[0].1 != w[1].1, "{m:?}");
                        }
                        for port in 0..=max {
                            assert_eq!(
                                eval(&m, max, port),
                                eval(&a, max, port).min(eval(&b, max, port)),
                                "{a:?} {b:?} {m:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn partitions_of_the_full_space() {
        assert_eq!(partition_range(0, u16::MAX, u16::MAX, 1, 2), [(0, 1)]);
        assert_eq!(
            partition_range(80, 80, u16::MAX, 1, 2),
            [(0, 2), (80, 1), (81, 2)]
        );
        assert_eq!(partition_range(3, 3, 3, 1, 1), [(0, 1)]);
        let p = partition_range(1, 65535, u16::MAX, 1, 2);
        assert_eq!(
            intervals(&p, u16::MAX).collect::<Vec<_>>(),
            [(0, 0, 2), (1, 65535, 1)]
        );
    }
}
