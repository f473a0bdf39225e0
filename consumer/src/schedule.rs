//! The retry schedule: how long to wait after a failed attempt, as a pure function.
//!
//! After the attempt that just failed (1 = the first attempt), wait `delays[attempt - 1]` with
//! ±`jitter` (so a burst of failures does not come back as a burst); once the list is used up the
//! delivery is exhausted. A receiver's `Retry-After` can lengthen the wait (it asked to be left
//! alone that long) but only up to `retry_after_max`, and it never shortens it: a receiver cannot
//! make us retry faster than the schedule, so one misbehaving endpoint cannot turn into a hammer.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::Rng;

/// Delays between attempts, with jitter and a bound on `Retry-After`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySchedule {
    /// Wait before attempt n + 1 after attempt n failed; the length is the number of retries.
    pub delays: Vec<Duration>,
    /// Relative jitter, 0.2 = ±20 %. Clamped to [0, 1].
    pub jitter: f64,
    /// The longest `Retry-After` honoured; longer requests are cut to this.
    pub retry_after_max: Duration,
}

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;

/// The default delays after the first attempt (GitLab-like, over about a day and a half).
pub const DEFAULT_RETRY_SCHEDULE: &str = "5s,5m,30m,2h,5h,10h,10h";

impl Default for RetrySchedule {
    /// [`DEFAULT_RETRY_SCHEDULE`]; ±20 %; `Retry-After` up to a day.
    fn default() -> RetrySchedule {
        // Parsed item by item: `with_delays` (and so `from_str`) fills the rest from here.
        let delays = DEFAULT_RETRY_SCHEDULE
            .split(',')
            .map(|d| hookline_shell::parse_duration(d).expect("the default schedule parses"))
            .collect();
        RetrySchedule {
            delays,
            jitter: 0.2,
            retry_after_max: Duration::from_secs(24 * HOUR),
        }
    }
}

impl RetrySchedule {
    /// A schedule with these delays and the default jitter and `Retry-After` bound.
    pub fn with_delays(delays: Vec<Duration>) -> RetrySchedule {
        RetrySchedule {
            delays,
            ..RetrySchedule::default()
        }
    }

    /// Attempts in all, the first one included.
    pub fn max_attempts(&self) -> u32 {
        u32::try_from(self.delays.len())
            .unwrap_or(u32::MAX - 1)
            .saturating_add(1)
    }

    /// The wait before the next attempt, or `None` when `attempt_just_failed` was the last one.
    pub fn next_delay(
        &self,
        attempt_just_failed: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Option<Duration> {
        // Attempts count from 1; treat a 0 as the first so a caller's off-by-one cannot skip tiers.
        let index = attempt_just_failed.max(1) as usize - 1;
        let base = *self.delays.get(index)?;
        let jitter = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let factor = if jitter > 0.0 {
            1.0 + rng.random_range(-jitter..=jitter)
        } else {
            1.0
        };
        let scheduled = base.mul_f64(factor);
        let asked = retry_after.map(|ra| ra.min(self.retry_after_max));
        Some(asked.map_or(scheduled, |asked| asked.max(scheduled)))
    }
}

/// A schedule or a duration that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid retry schedule {input:?}: {reason}")]
pub struct ScheduleError {
    pub input: String,
    pub reason: String,
}

impl FromStr for RetrySchedule {
    type Err = ScheduleError;

    /// `"5s,5m,30m,2h,5h,10h,10h"`; `""` or `"none"` means no retries. Jitter and the
    /// `Retry-After` bound keep their defaults.
    fn from_str(input: &str) -> Result<RetrySchedule, ScheduleError> {
        let s = input.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("none") {
            return Ok(RetrySchedule::with_delays(Vec::new()));
        }
        let delays = s
            .split(',')
            .map(|d| {
                if d.trim().is_empty() {
                    Err("an empty delay".to_owned())
                } else {
                    hookline_shell::parse_duration(d)
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|reason| ScheduleError {
                input: input.to_owned(),
                reason,
            })?;
        Ok(RetrySchedule::with_delays(delays))
    }
}

/// Writes the delays back in the form [`FromStr`] reads (for `--help` defaults and logs).
impl fmt::Display for RetrySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.delays.is_empty() {
            return f.write_str("none");
        }
        for (i, d) in self.delays.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write_duration(f, *d)?;
        }
        Ok(())
    }
}

fn write_duration(f: &mut fmt::Formatter<'_>, d: Duration) -> fmt::Result {
    if d.subsec_millis() != 0 || d.as_secs() == 0 {
        return write!(f, "{}ms", d.as_millis());
    }
    let secs = d.as_secs();
    for (unit, per) in [("d", 24 * HOUR), ("h", HOUR), ("m", MINUTE)] {
        if secs.is_multiple_of(per) {
            return write!(f, "{}{unit}", secs / per);
        }
    }
    write!(f, "{secs}s")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn no_jitter(delays: &str) -> RetrySchedule {
        RetrySchedule {
            jitter: 0.0,
            ..delays.parse().unwrap()
        }
    }

    #[test]
    fn default_is_the_documented_schedule() {
        let s = RetrySchedule::default();
        assert_eq!(s.to_string(), "5s,5m,30m,2h,5h,10h,10h");
        assert_eq!(
            s,
            "5s,5m,30m,2h,5h,10h,10h".parse::<RetrySchedule>().unwrap()
        );
        assert_eq!(s.max_attempts(), 8);
        assert_eq!(s.jitter, 0.2);
    }

    #[test]
    fn walks_the_tiers_then_gives_up() {
        let s = no_jitter("5s,5m,30m");
        let rng = &mut StdRng::seed_from_u64(1);
        assert_eq!(s.next_delay(1, None, rng), Some(secs(5)));
        assert_eq!(s.next_delay(2, None, rng), Some(secs(300)));
        assert_eq!(s.next_delay(3, None, rng), Some(secs(1800)));
        assert_eq!(s.next_delay(4, None, rng), None);
        assert_eq!(
            s.next_delay(0, None, rng),
            Some(secs(5)),
            "0 is treated as the first"
        );
        assert_eq!(no_jitter("none").next_delay(1, None, rng), None);
    }

    #[test]
    fn jitter_stays_within_twenty_percent_and_varies() {
        let s = RetrySchedule::default();
        let rng = &mut StdRng::seed_from_u64(7);
        let draws: Vec<Duration> = (0..1000)
            .map(|_| s.next_delay(2, None, rng).unwrap())
            .collect();
        assert!(
            draws.iter().all(|d| *d >= secs(240) && *d <= secs(360)),
            "±20 % of 5 min"
        );
        let min = draws.iter().min().unwrap();
        let max = draws.iter().max().unwrap();
        assert!(
            *min < secs(260) && *max > secs(340),
            "spread {min:?}..{max:?}"
        );
    }

    #[test]
    fn retry_after_lengthens_up_to_the_bound_and_never_shortens() {
        let s = RetrySchedule {
            retry_after_max: secs(3600),
            ..no_jitter("5s,5m")
        };
        let rng = &mut StdRng::seed_from_u64(1);
        assert_eq!(
            s.next_delay(1, Some(secs(120)), rng),
            Some(secs(120)),
            "asked longer"
        );
        assert_eq!(
            s.next_delay(1, Some(secs(1)), rng),
            Some(secs(5)),
            "never shorter"
        );
        assert_eq!(s.next_delay(1, Some(Duration::ZERO), rng), Some(secs(5)));
        assert_eq!(
            s.next_delay(2, Some(secs(86400)), rng),
            Some(secs(3600)),
            "capped"
        );
        assert_eq!(
            s.next_delay(3, Some(secs(10)), rng),
            None,
            "exhausted anyway"
        );
    }

    #[test]
    fn parses_milliseconds_for_tests() {
        let s: RetrySchedule = "10ms, 20ms,1s".parse().unwrap();
        assert_eq!(
            s.delays,
            vec![
                Duration::from_millis(10),
                Duration::from_millis(20),
                secs(1)
            ]
        );
        assert_eq!(s.to_string(), "10ms,20ms,1s");
        assert_eq!(
            "1d".parse::<RetrySchedule>().unwrap().delays,
            vec![secs(86400)]
        );
        assert_eq!("90s".parse::<RetrySchedule>().unwrap().to_string(), "90s");
    }

    #[test]
    fn refuses_nonsense() {
        for bad in ["s", "5x", "-5s", "5s,,5m", "5s;5m", "99999999999999999999h"] {
            assert!(
                bad.parse::<RetrySchedule>().is_err(),
                "{bad:?} should not parse"
            );
        }
    }
}
