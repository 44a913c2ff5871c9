//! Target health with AWS NLB semantics: consecutive successes and failures against the
//! target group's thresholds decide a target's state; the agent feeds in probe results
//! (`super::probe`) and turns states into the Maglev tables (`super::compile`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A target's state, as AWS names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetState {
    /// Registered; health checks have not decided yet.
    Initial,
    /// Passed `healthy_threshold` consecutive checks.
    Healthy,
    /// Failed `unhealthy_threshold` consecutive checks.
    Unhealthy,
    /// Registered, but no listener uses its group (or its instance is gone).
    Unused,
    /// Deregistered: existing flows continue until the deregistration delay ends; no new
    /// ones.
    Draining,
}

impl TargetState {
    /// Lower-case name.
    pub const fn name(self) -> &'static str {
        match self {
            TargetState::Initial => "initial",
            TargetState::Healthy => "healthy",
            TargetState::Unhealthy => "unhealthy",
            TargetState::Unused => "unused",
            TargetState::Draining => "draining",
        }
    }
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The health-check record of one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracker {
    /// Initial, healthy or unhealthy.
    pub state: TargetState,
    /// Consecutive successes.
    pub successes: u32,
    /// Consecutive failures.
    pub failures: u32,
    /// Why the last check failed.
    pub last_failure: Option<String>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            state: TargetState::Initial,
            successes: 0,
            failures: 0,
            last_failure: None,
        }
    }
}

impl Tracker {
    /// Records one check (`Err(reason)`: failed); returns whether the state changed.
    pub fn record(&mut self, result: Result<(), String>, healthy: u32, unhealthy: u32) -> bool {
        let before = self.state;
        match result {
            Ok(()) => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                if self.successes >= healthy {
                    self.state = TargetState::Healthy;
                }
            }
            Err(reason) => {
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                self.last_failure = Some(reason);
                if self.failures >= unhealthy {
                    self.state = TargetState::Unhealthy;
                }
            }
        }
        self.state != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tr: &mut Tracker, results: &[bool]) -> Vec<TargetState> {
        results
            .iter()
            .map(|ok| {
                tr.record(if *ok { Ok(()) } else { Err("refused".into()) }, 3, 2);
                tr.state
            })
            .collect()
    }

    #[test]
    fn thresholds_decide_transitions() {
        use TargetState::*;
        let mut t = Tracker::default();
        assert_eq!(
            run(&mut t, &[true, true, true]),
            [Initial, Initial, Healthy]
        );
        // One failure is not enough; a success resets the count.
        assert_eq!(
            run(&mut t, &[false, true, false]),
            [Healthy, Healthy, Healthy]
        );
        assert_eq!(run(&mut t, &[false]), [Unhealthy]);
        assert_eq!(t.last_failure.as_deref(), Some("refused"));
        // Back to healthy only after the healthy threshold.
        assert_eq!(
            run(&mut t, &[true, true, false, true, true, true]),
            [
                Unhealthy, Unhealthy, Unhealthy, Unhealthy, Unhealthy, Healthy
            ]
        );
        let mut fresh = Tracker::default();
        assert_eq!(run(&mut fresh, &[false, false]), [Initial, Unhealthy]);
    }

    #[test]
    fn record_reports_changes_only() {
        let mut t = Tracker::default();
        assert!(!t.record(Ok(()), 2, 2));
        assert!(t.record(Ok(()), 2, 2));
        assert!(!t.record(Ok(()), 2, 2));
    }
}
