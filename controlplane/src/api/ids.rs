//! AWS-style ids (a prefix and 17 hex digits) and instance MACs.

/// A fresh id: `prefix-` and 17 random hex digits.
pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 9];
    fill(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{prefix}-{}", &hex[..17])
}

/// A random VNI in 1..=2^24-1.
pub fn random_vni() -> u32 {
    let mut b = [0u8; 4];
    fill(&mut b);
    (u32::from_le_bytes(b) % 0x00ff_ffff) + 1
}

/// A random token-like secret (32 hex digits).
pub fn secret() -> String {
    let mut b = [0u8; 16];
    fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A locally administered unicast MAC derived from the instance id (`02:` + 5 bytes of
/// its hash), stable so a re-created endpoint keeps its MAC.
pub fn instance_mac(instance_id: &str) -> String {
    let h = crate::fnv::fnv1a64(instance_id.as_bytes()).to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        h[0], h[1], h[2], h[3], h[4]
    )
}

/// Whether `id` looks like `prefix-` + 17 lowercase hex digits.
pub fn is_id(prefix: &str, id: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|h| h.len() == 17 && h.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
}

fn fill(buf: &mut [u8]) {
    // The OS RNG does not fail on Linux once booted; a failure is a broken system.
    if let Err(e) = getrandom::fill(buf) {
        panic!("the OS random number generator failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_aws_shape() {
        let id = new_id("vpc");
        assert!(is_id("vpc", &id), "{id}");
        assert_eq!(id.len(), 4 + 17);
        assert_ne!(new_id("vpc"), new_id("vpc"));
        assert!(!is_id("vpc", "vpc-123"));
        assert!(!is_id("vpc", "subnet-0123456789abcdef0"));
        assert!(!is_id("vpc", "vpc-0123456789ABCDEF0"));
    }

    #[test]
    fn macs_are_stable_local_unicast() {
        let m = instance_mac("i-0123456789abcdef0");
        assert_eq!(m, instance_mac("i-0123456789abcdef0"));
        assert!(m.starts_with("02:"));
        assert_eq!(m.len(), 17);
    }

    #[test]
    fn vnis_in_range() {
        for _ in 0..1000 {
            let v = random_vni();
            assert!((1..=0x00ff_ffff).contains(&v));
        }
    }
}
