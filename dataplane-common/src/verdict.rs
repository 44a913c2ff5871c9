//! The pass/drop decision for a parsed packet.

use crate::{
    DropReason,
    filter::{FilterAction, FilterKey, FilterValue},
    parse::Parsed,
};

/// Lookup in the filter map (the kernel map, or a host table in tests).
pub trait FilterTable {
    /// The entry for `key`, if any.
    fn get(&self, key: &FilterKey) -> Option<FilterValue>;
}

/// What a hook should do with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand the packet on.
    Pass,
    /// Drop it, counted under this reason.
    Drop(DropReason),
}

/// Decides a packet's fate from its parse result and the filter table.
///
/// Malformed packets are dropped with the parser's reason; non-IP frames pass; IP packets
/// are matched on their destination, exact address first, then the wildcard address. Packets
/// without an L4 header (non-first fragments, other protocols) match port 0 entries.
#[inline(always)]
pub fn decide<T: FilterTable>(parsed: Result<Parsed, DropReason>, table: &T) -> Verdict {
    let ip = match parsed {
        Err(reason) => return Verdict::Drop(reason),
        Ok(Parsed::NonIp { .. }) => return Verdict::Pass,
        Ok(Parsed::Ip(ip)) => ip,
    };
    let port = if ip.has_l4 { ip.dst_port } else { 0 };
    let key = FilterKey::new(ip.dst, ip.proto, port);
    let hit = match table.get(&key) {
        Some(v) => Some(v),
        None => table.get(&key.any_addr()),
    };
    match hit.map(|v| v.action()) {
        Some(FilterAction::Drop) => Verdict::Drop(DropReason::FilterRule),
        Some(FilterAction::Pass) | None => Verdict::Pass,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{filter::ipv4_mapped, packet::SlicePacket, parse::parse, testpkt::*};

    struct Table(HashMap<FilterKey, FilterValue>);

    impl FilterTable for Table {
        fn get(&self, key: &FilterKey) -> Option<FilterValue> {
            self.0.get(key).copied()
        }
    }

    fn table(entries: &[(FilterKey, FilterAction)]) -> Table {
        Table(
            entries
                .iter()
                .map(|(k, a)| (*k, FilterValue::new(*a)))
                .collect(),
        )
    }

    fn verdict(frame: &[u8], t: &Table) -> Verdict {
        decide(parse(&SlicePacket(frame)), t)
    }

    const A: [u8; 4] = [198, 18, 0, 1];
    const B: [u8; 4] = [198, 18, 0, 2];
    const C: [u8; 4] = [198, 18, 0, 3];

    #[test]
    fn filter_decisions() {
        let any_udp_9999 = FilterKey::new([0; 16], 17, 9999);
        let b_udp_9999 = FilterKey::new(ipv4_mapped(B), 17, 9999);
        let b_tcp_80 = FilterKey::new(ipv4_mapped(B), 6, 80);
        let t = table(&[
            (any_udp_9999, FilterAction::Drop),
            (b_udp_9999, FilterAction::Pass),
            (b_tcp_80, FilterAction::Drop),
        ]);
        let drop = Verdict::Drop(DropReason::FilterRule);
        let cases = [
            ("no entry", udp(v4(A, B), 1, 53, b""), Verdict::Pass),
            ("wildcard drop", udp(v4(A, C), 1, 9999, b""), drop),
            (
                "exact pass beats wildcard drop",
                udp(v4(A, B), 1, 9999, b""),
                Verdict::Pass,
            ),
            ("exact drop", tcp_syn(v4(A, B), 1, 80), drop),
            (
                "same port other proto",
                udp(v4(A, B), 1, 80, b""),
                Verdict::Pass,
            ),
            (
                "same port other host",
                tcp_syn(v4(A, C), 1, 80),
                Verdict::Pass,
            ),
            ("arp passes", arp_request(A.into(), B.into()), Verdict::Pass),
            (
                "truncated drops",
                udp(v4(A, B), 1, 53, b"")[..20].to_vec(),
                Verdict::Drop(DropReason::Truncated),
            ),
        ];
        for (name, frame, want) in cases {
            assert_eq!(verdict(&frame, &t), want, "{name}");
        }
    }

    #[test]
    fn unknown_action_numbers_fail_closed() {
        let mut t = table(&[]);
        t.0.insert(FilterKey::new([0; 16], 17, 7), FilterValue { action: 42 });
        assert_eq!(
            verdict(&udp(v4(A, B), 1, 7, b""), &t),
            Verdict::Drop(DropReason::FilterRule)
        );
    }

    #[test]
    fn ipv6_and_fragments_match_their_keys() {
        let dst: std::net::Ipv6Addr = "fd00::2".parse().unwrap();
        let t = table(&[
            (FilterKey::new(dst.octets(), 6, 22), FilterAction::Drop),
            (FilterKey::new([0; 16], 17, 0), FilterAction::Drop),
        ]);
        assert_eq!(
            verdict(&tcp_syn(v6("fd00::1", "fd00::2"), 1, 22), &t),
            Verdict::Drop(DropReason::FilterRule)
        );
        assert_eq!(
            verdict(&tcp_syn(v6("fd00::1", "fd00::3"), 1, 22), &t),
            Verdict::Pass
        );
        let mut frag = udp(v4(A, B), 1, 2, b"abcdefgh");
        frag[20..22].copy_from_slice(&0x0001u16.to_be_bytes());
        assert_eq!(verdict(&frag, &t), Verdict::Drop(DropReason::FilterRule));
    }
}
