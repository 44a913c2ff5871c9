//! The datapath stamps events with `bpf_ktime_get_ns` (CLOCK_MONOTONIC); records carry Unix
//! seconds. The offset between the two clocks is sampled (and re-sampled at each window, so
//! a stepped wall clock is followed).

use nix::time::{ClockId, clock_gettime};

/// Nanoseconds to add to a CLOCK_MONOTONIC time to get Unix time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MonoToWall {
    offset_ns: i128,
}

fn ns(t: nix::sys::time::TimeSpec) -> i128 {
    i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec())
}

impl MonoToWall {
    /// From an explicit pair of readings (tests).
    pub fn from_pair(monotonic_ns: u64, unix_ns: i128) -> Self {
        MonoToWall {
            offset_ns: unix_ns - i128::from(monotonic_ns),
        }
    }

    /// Samples both clocks now (monotonic read twice around the wall clock, midpoint).
    pub fn sample() -> Self {
        let a = clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, ns);
        let w = clock_gettime(ClockId::CLOCK_REALTIME).map_or(0, ns);
        let b = clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, ns);
        MonoToWall {
            offset_ns: w - (a + b) / 2,
        }
    }

    /// Unix seconds (floor) of a CLOCK_MONOTONIC time.
    pub fn unix_secs(&self, monotonic_ns: u64) -> i64 {
        let t = i128::from(monotonic_ns) + self.offset_ns;
        t.div_euclid(1_000_000_000) as i64
    }
}

/// CLOCK_MONOTONIC now, in ns (what `bpf_ktime_get_ns` returns).
pub fn monotonic_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map_or(0, ns)
        .try_into()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_with_the_offset_and_floors() {
        let c = MonoToWall::from_pair(5_000_000_000, 1_700_000_000_000_000_000);
        assert_eq!(c.unix_secs(5_000_000_000), 1_700_000_000);
        assert_eq!(c.unix_secs(5_999_999_999), 1_700_000_000);
        assert_eq!(c.unix_secs(6_000_000_000), 1_700_000_001);
        assert_eq!(c.unix_secs(4_999_999_999), 1_699_999_999);
    }

    #[test]
    fn sampled_offset_matches_the_system_clocks() {
        let c = MonoToWall::sample();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let got = c.unix_secs(monotonic_ns());
        assert!((got - now).abs() <= 1, "{got} vs {now}");
    }
}
