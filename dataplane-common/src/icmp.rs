//! ICMP errors the VPC router sends itself: "fragmentation needed" (RFC 792/1191) when an
//! instance sends a packet with DF set that would not fit the underlay once encapsulated.

use crate::{checksum, parse::ETH_P_IP, parse::IPPROTO_ICMP};

/// ICMP type "destination unreachable".
pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMP code "fragmentation needed and DF set".
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// Bytes of the offending packet quoted: its IPv4 header (no options) and 8 bytes of L4.
pub const QUOTE_LEN: usize = 28;
/// Length of the whole reply frame.
pub const FRAG_NEEDED_FRAME_LEN: usize = 14 + 20 + 8 + QUOTE_LEN;

/// A "fragmentation needed" reply frame, as written on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragNeededFrame {
    /// Ethernet destination, source, EtherType.
    pub eth: [u8; 14],
    /// IPv4 header.
    pub ip: [u8; 20],
    /// ICMP header: type, code, checksum, unused, next-hop MTU.
    pub icmp: [u8; 8],
    /// The offending packet's first bytes.
    pub quote: [u8; QUOTE_LEN],
}

const _: () = assert!(core::mem::size_of::<FragNeededFrame>() == FRAG_NEEDED_FRAME_LEN);

/// The reply to a packet starting with `quote` (its IP header): from `router` (the subnet
/// gateway, MAC `router_mac`) to the sender (`dst_mac`, `quote`'s source), telling it the
/// largest IP packet that fits is `mtu`.
#[inline(always)]
pub fn frag_needed(
    quote: &[u8; QUOTE_LEN],
    dst_mac: [u8; 6],
    router_mac: [u8; 6],
    router: [u8; 4],
    mtu: u16,
) -> FragNeededFrame {
    let mut eth = [0u8; 14];
    eth[0..6].copy_from_slice(&dst_mac);
    eth[6..12].copy_from_slice(&router_mac);
    eth[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());

    let len = (FRAG_NEEDED_FRAME_LEN as u16 - 14).to_be_bytes();
    let r = router;
    // The sender is the quoted packet's source address (bytes 12..16 of its header).
    let mut ip = [
        0x45,
        0xc0, // precedence "internetwork control", as routers send ICMP errors
        len[0],
        len[1],
        0,
        0,
        0,
        0,
        64,
        IPPROTO_ICMP,
        0,
        0,
        r[0],
        r[1],
        r[2],
        r[3],
        quote[12],
        quote[13],
        quote[14],
        quote[15],
    ];
    let c = checksum::checksum(&ip);
    ip[10] = c[0];
    ip[11] = c[1];

    let m = mtu.to_be_bytes();
    let mut icmp = [ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, 0, 0, m[0], m[1]];
    let c = checksum::finish(checksum::sum(quote, checksum::sum(&icmp, 0)));
    icmp[2] = c[0];
    icmp[3] = c[1];

    FragNeededFrame {
        eth,
        ip,
        icmp,
        quote: *quote,
    }
}

#[cfg(test)]
mod tests {
    use pnet_packet::{
        Packet,
        icmp::{self, IcmpPacket, IcmpTypes},
        ipv4::{self, Ipv4Packet},
    };

    use super::*;

    #[test]
    fn reply_is_valid_icmp_with_mtu() {
        let mut quote = [0u8; QUOTE_LEN];
        quote[0] = 0x45;
        quote[12..16].copy_from_slice(&[10, 0, 1, 10]);
        quote[16..20].copy_from_slice(&[10, 0, 2, 20]);
        let f = frag_needed(
            &quote,
            [2, 0, 0, 0, 0, 9],
            [2, 0, 0, 0, 0, 1],
            [10, 0, 1, 1],
            1450,
        );
        // SAFETY: `FragNeededFrame` is `#[repr(C)]` of byte arrays, no padding.
        let bytes: [u8; FRAG_NEEDED_FRAME_LEN] = unsafe { core::mem::transmute(f) };
        let ip = Ipv4Packet::new(&bytes[14..]).unwrap();
        assert_eq!(ip.get_checksum(), ipv4::checksum(&ip));
        assert_eq!(ip.get_destination().octets(), [10, 0, 1, 10]);
        assert_eq!(ip.get_source().octets(), [10, 0, 1, 1]);
        assert_eq!(
            usize::from(ip.get_total_length()),
            FRAG_NEEDED_FRAME_LEN - 14
        );
        let ic = IcmpPacket::new(ip.payload()).unwrap();
        assert_eq!(ic.get_icmp_type(), IcmpTypes::DestinationUnreachable);
        assert_eq!(ic.get_icmp_code().0, ICMP_FRAG_NEEDED);
        assert_eq!(ic.get_checksum(), icmp::checksum(&ic));
        assert_eq!(u16::from_be_bytes([bytes[40], bytes[41]]), 1450);
        assert_eq!(&bytes[42..], &quote);
    }
}
