//! FNV-1a, 64 bits: a hash fixed forever. Everything derived from it must stay the same
//! across versions and hosts (Maglev tables, instance interface names, client-token
//! records), which std's hasher does not promise.

/// FNV-1a of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
