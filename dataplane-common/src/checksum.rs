//! The Internet checksum (RFC 1071) over fixed-size headers.
//!
//! Sizes are compile-time constants so the kernel's verifier sees bounded loops.

/// One's-complement sum of `bytes` as big-endian 16-bit words (odd `N` pads with zero),
/// added to `initial`, not yet folded.
#[inline(always)]
pub fn sum<const N: usize>(bytes: &[u8; N], initial: u32) -> u32 {
    let mut acc = initial;
    let mut i = 0;
    while i + 1 < N {
        acc += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    if N % 2 == 1 {
        acc += u32::from(bytes[N - 1]) << 8;
    }
    acc
}

/// Folds a 32-bit one's-complement sum and complements it: the checksum field value.
#[inline(always)]
pub fn finish(mut acc: u32) -> [u8; 2] {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    (!(acc as u16)).to_be_bytes()
}

/// The checksum of `bytes` (with its checksum field zeroed).
#[inline(always)]
pub fn checksum<const N: usize>(bytes: &[u8; N]) -> [u8; 2] {
    finish(sum(bytes, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example_and_ipv4_header() {
        // A known-good IPv4 header (checksum 0xb861 over the header with the field zeroed).
        let hdr: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&hdr), [0xb8, 0x61]);
        // A header including its correct checksum sums to zero.
        let mut with = hdr;
        with[10..12].copy_from_slice(&checksum(&hdr));
        assert_eq!(checksum(&with), [0, 0]);
        // Odd lengths pad with a zero byte.
        assert_eq!(checksum(&[0x01u8, 0x02, 0x03]), finish(0x0102 + 0x0300));
    }
}
