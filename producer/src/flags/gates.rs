//! Gates and their evaluation, as Flipper (under GitLab's `Feature`) does it.
//!
//! A flag is on for an actor when any gate is open: the boolean gate; the actor listed; the
//! actor's bucket under the percentage of actors; a random draw under the percentage of time.
//! An opted-out actor is off whatever the other gates say.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::ProducerError;

/// A percentage with up to three decimals, held as thousandths of a percent (0..=100_000) so
/// that `25.125` compares exactly, as Flipper's `percentage * 1_000` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Percentage(u32);

impl Percentage {
    pub const ZERO: Percentage = Percentage(0);
    pub const FULL: Percentage = Percentage(100_000);

    /// `thousandths` of a percent, at most 100_000.
    pub fn from_thousandths(thousandths: u32) -> Result<Self, ProducerError> {
        if thousandths > 100_000 {
            return Err(ProducerError::Invalid(format!(
                "percentage {} is out of range: expected 0 to 100 with up to 3 decimals",
                Percentage(thousandths)
            )));
        }
        Ok(Percentage(thousandths))
    }

    pub fn whole(percent: u32) -> Result<Self, ProducerError> {
        Self::from_thousandths(percent.saturating_mul(1000))
    }

    pub fn thousandths(self) -> u32 {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

const PERCENTAGE_ACCEPTED: &str =
    "expected a percentage from 0 to 100 with up to 3 decimals, e.g. 25 or 0.5";

impl FromStr for Percentage {
    type Err = ProducerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid =
            || ProducerError::Invalid(format!("invalid percentage {s:?}: {PERCENTAGE_ACCEPTED}"));
        let (whole, fraction) = s.split_once('.').unwrap_or((s, ""));
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        if fraction.len() > 3
            || !fraction.bytes().all(|b| b.is_ascii_digit())
            || (s.contains('.') && fraction.is_empty())
        {
            return Err(invalid());
        }
        // Bounded first so the parse below cannot overflow on "99999999999".
        let whole: u32 = if whole.len() > 4 {
            u32::MAX / 1000
        } else {
            whole.parse().map_err(|_| invalid())?
        };
        let fraction: u32 = format!("{fraction:0<3}").parse().map_err(|_| invalid())?;
        if whole > 100 || (whole == 100 && fraction > 0) {
            return Err(ProducerError::Invalid(format!(
                "percentage {s} is out of range: {PERCENTAGE_ACCEPTED}"
            )));
        }
        Ok(Percentage(whole * 1000 + fraction))
    }
}

impl fmt::Display for Percentage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, fraction) = (self.0 / 1000, self.0 % 1000);
        if fraction == 0 {
            write!(f, "{whole}")
        } else {
            let fraction = format!("{fraction:03}");
            write!(f, "{whole}.{}", fraction.trim_end_matches('0'))
        }
    }
}

impl TryFrom<String> for Percentage {
    type Error = ProducerError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Percentage> for String {
    fn from(p: Percentage) -> String {
        p.to_string()
    }
}

/// The Flipper id of a project: what actor gates list and the percentage of actors hashes.
pub fn project_actor(project_id: i64) -> String {
    format!("Project:{project_id}")
}

/// Flipper's percentage-of-actors bucket: `crc32(flag + actor) % 100_000`, IEEE CRC-32 (Ruby's
/// `Zlib.crc32`), so hookline picks the same projects GitLab would.
pub fn actor_bucket(flag: &str, actor: &str) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(flag.as_bytes());
    hasher.update(actor.as_bytes());
    hasher.finalize() % 100_000
}

/// The stored gates of one flag.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gates {
    pub boolean: bool,
    /// Flipper ids (`Project:<id>`) the flag is on for.
    pub actors: BTreeSet<String>,
    /// Flipper ids the flag is off for, whatever the other gates say.
    pub opt_out_actors: BTreeSet<String>,
    pub percentage_of_actors: Option<Percentage>,
    pub percentage_of_time: Option<Percentage>,
}

/// Which gate decided an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    OptedOut,
    Boolean,
    Actor,
    PercentageOfActors,
    PercentageOfTime,
    NoGateOpen,
}

impl Decision {
    pub fn is_on(self) -> bool {
        matches!(
            self,
            Decision::Boolean
                | Decision::Actor
                | Decision::PercentageOfActors
                | Decision::PercentageOfTime
        )
    }
}

/// One change an operator makes, as the `feature set` command expresses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `true` clears every gate and opens the boolean gate; `false` clears every gate
    /// (Flipper's `disable`): the rollback.
    Boolean(bool),
    /// Adds (`true`) or removes actors.
    Actors { enable: bool, actors: Vec<String> },
    /// Adds (`true`) or removes opt-outs.
    OptOut { enable: bool, actors: Vec<String> },
    /// Sets the percentage of actors; 0 closes the gate.
    PercentageOfActors(Percentage),
    /// Sets the percentage of time; 0 closes the gate.
    PercentageOfTime(Percentage),
}

/// One gate's value before and after a change, for the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateDiff {
    pub gate: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

pub const GATE_NAMES: [&str; 5] = [
    "boolean",
    "actors",
    "opt_out_actors",
    "percentage_of_actors",
    "percentage_of_time",
];

impl Gates {
    /// Evaluates the gates for `actor` (or for no actor: only boolean and time gates apply).
    pub fn evaluate(&self, flag: &str, actor: Option<&str>, rng: &mut impl Rng) -> Decision {
        if let Some(actor) = actor
            && self.opt_out_actors.contains(actor)
        {
            return Decision::OptedOut;
        }
        if self.boolean {
            return Decision::Boolean;
        }
        if let Some(actor) = actor {
            if self.actors.contains(actor) {
                return Decision::Actor;
            }
            if let Some(pct) = self.percentage_of_actors
                && actor_bucket(flag, actor) < pct.thousandths()
            {
                return Decision::PercentageOfActors;
            }
        }
        if let Some(pct) = self.percentage_of_time {
            // `rand < pct / 100`, in the same thousandths as the percentage.
            if rng.random_range(0..100_000) < pct.thousandths() {
                return Decision::PercentageOfTime;
            }
        }
        Decision::NoGateOpen
    }

    /// The gates after `change`.
    pub fn apply(&self, change: &Change) -> Gates {
        let mut next = self.clone();
        match change {
            Change::Boolean(true) => {
                next = Gates::default();
                next.boolean = true;
            }
            Change::Boolean(false) => next = Gates::default(),
            Change::Actors { enable, actors } => edit(&mut next.actors, *enable, actors),
            Change::OptOut { enable, actors } => edit(&mut next.opt_out_actors, *enable, actors),
            Change::PercentageOfActors(p) => {
                next.percentage_of_actors = Some(*p).filter(|p| !p.is_zero())
            }
            Change::PercentageOfTime(p) => {
                next.percentage_of_time = Some(*p).filter(|p| !p.is_zero())
            }
        }
        next
    }

    /// True when no gate is open for anyone.
    pub fn is_closed(&self) -> bool {
        *self == Gates::default()
    }

    /// Each open gate as `(gate name, value)`, one row per actor: the stored form.
    pub fn rows(&self) -> Vec<(&'static str, String)> {
        let mut rows = Vec::new();
        if self.boolean {
            rows.push(("boolean", "true".to_owned()));
        }
        rows.extend(self.actors.iter().map(|a| ("actors", a.clone())));
        rows.extend(
            self.opt_out_actors
                .iter()
                .map(|a| ("opt_out_actors", a.clone())),
        );
        if let Some(p) = self.percentage_of_actors {
            rows.push(("percentage_of_actors", p.to_string()));
        }
        if let Some(p) = self.percentage_of_time {
            rows.push(("percentage_of_time", p.to_string()));
        }
        rows
    }

    /// Rebuilds gates from stored rows; a row with an unknown gate or a bad value is an error,
    /// never silently ignored.
    pub fn from_rows<'a>(
        rows: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Gates, ProducerError> {
        let mut gates = Gates::default();
        for (gate, value) in rows {
            match gate {
                "boolean" => gates.boolean = value == "true",
                "actors" => {
                    gates.actors.insert(value.to_owned());
                }
                "opt_out_actors" => {
                    gates.opt_out_actors.insert(value.to_owned());
                }
                "percentage_of_actors" => gates.percentage_of_actors = Some(value.parse()?),
                "percentage_of_time" => gates.percentage_of_time = Some(value.parse()?),
                other => {
                    return Err(ProducerError::Invalid(format!(
                        "stored gate {other:?} is not a known gate"
                    )));
                }
            }
        }
        Ok(gates)
    }

    /// The value of one gate as the history and `feature get` show it; `None` when closed.
    pub fn gate_value(&self, gate: &str) -> Option<String> {
        let list = |set: &BTreeSet<String>| {
            (!set.is_empty()).then(|| set.iter().cloned().collect::<Vec<_>>().join(","))
        };
        match gate {
            "boolean" => self.boolean.then(|| "true".to_owned()),
            "actors" => list(&self.actors),
            "opt_out_actors" => list(&self.opt_out_actors),
            "percentage_of_actors" => self.percentage_of_actors.map(|p| p.to_string()),
            "percentage_of_time" => self.percentage_of_time.map(|p| p.to_string()),
            _ => None,
        }
    }

    /// The gates that differ between `self` and `next`.
    pub fn diff(&self, next: &Gates) -> Vec<GateDiff> {
        GATE_NAMES
            .iter()
            .filter_map(|gate| {
                let (old, new) = (self.gate_value(gate), next.gate_value(gate));
                (old != new).then(|| GateDiff {
                    gate: (*gate).to_owned(),
                    old,
                    new,
                })
            })
            .collect()
    }

    /// One line: what is open.
    pub fn summary(&self) -> String {
        if self.boolean {
            return "on for everyone".to_owned();
        }
        let mut parts = Vec::new();
        for gate in &GATE_NAMES[1..] {
            if let Some(value) = self.gate_value(gate) {
                let value = if gate.starts_with("percentage") {
                    format!("{value}%")
                } else {
                    value
                };
                parts.push(format!("{gate}={value}"));
            }
        }
        if parts.is_empty() {
            "off".to_owned()
        } else {
            parts.join(" ")
        }
    }
}

fn edit(set: &mut BTreeSet<String>, enable: bool, actors: &[String]) {
    for actor in actors {
        if enable {
            set.insert(actor.clone());
        } else {
            set.remove(actor);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::INLINE_FLAG;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn pct(s: &str) -> Percentage {
        s.parse().unwrap()
    }

    fn on(gates: &Gates, project: i64) -> bool {
        gates
            .evaluate(INLINE_FLAG, Some(&project_actor(project)), &mut rng())
            .is_on()
    }

    #[test]
    fn percentages_parse_with_up_to_three_decimals() {
        assert_eq!(pct("25").thousandths(), 25_000);
        assert_eq!(pct("0.125").thousandths(), 125);
        assert_eq!(pct("99.5").thousandths(), 99_500);
        assert_eq!(pct("100").thousandths(), 100_000);
        assert_eq!(pct("0").thousandths(), 0);
        assert_eq!(pct("12.50").to_string(), "12.5");
        for bad in [
            "150",
            "100.001",
            "abc",
            "-1",
            "",
            "1.2345",
            "1.",
            ".5",
            "1e2",
            "99999999999",
        ] {
            let err = bad.parse::<Percentage>().unwrap_err().to_string();
            assert!(err.contains("0 to 100"), "{bad}: {err}");
        }
    }

    /// Buckets computed independently with Python's `zlib.crc32` (same as Ruby's `Zlib.crc32`).
    #[test]
    fn buckets_match_the_flipper_formula_on_known_crc32_values() {
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        let known = [
            (1, 82_204),
            (2, 86_694),
            (3, 94_672),
            (42, 37_494),
            (1000, 4_892),
            (278_964, 33_004),
        ];
        for (project, bucket) in known {
            assert_eq!(
                actor_bucket(INLINE_FLAG, &project_actor(project)),
                bucket,
                "project {project}"
            );
        }
        // Project 1000 (bucket 4892) is in at 4.893% and out at 4.892%: the comparison is strict
        // and exact to the thousandth.
        let mut gates = Gates {
            percentage_of_actors: Some(pct("4.893")),
            ..Gates::default()
        };
        assert!(on(&gates, 1000));
        gates.percentage_of_actors = Some(pct("4.892"));
        assert!(!on(&gates, 1000));
        gates.percentage_of_actors = Some(pct("37.495"));
        assert!(on(&gates, 42) && !on(&gates, 1));
    }

    #[test]
    fn raising_the_percentage_never_turns_a_project_off() {
        let projects: Vec<i64> = (1..=2000).collect();
        let mut previous: Vec<bool> = vec![false; projects.len()];
        for step in (0..=100_000).step_by(2_500) {
            let gates = Gates {
                percentage_of_actors: Some(Percentage::from_thousandths(step).unwrap()),
                ..Gates::default()
            };
            let now: Vec<bool> = projects.iter().map(|p| on(&gates, *p)).collect();
            for (i, (was, is)) in previous.iter().zip(&now).enumerate() {
                assert!(
                    !was || *is,
                    "project {} turned off at {step} thousandths",
                    projects[i]
                );
            }
            previous = now;
        }
        assert!(previous.iter().all(|on| *on), "100% enables every project");
        // And the share is roughly the percentage.
        let quarter = Gates {
            percentage_of_actors: Some(pct("25")),
            ..Gates::default()
        };
        let share = projects.iter().filter(|p| on(&quarter, **p)).count();
        assert!(
            (400..600).contains(&share),
            "25% of 2000 projects gave {share}"
        );
    }

    #[test]
    fn each_gate_opens_the_flag() {
        assert!(!on(&Gates::default(), 1));
        assert!(on(
            &Gates {
                boolean: true,
                ..Gates::default()
            },
            1
        ));
        let actors = Gates::default().apply(&Change::Actors {
            enable: true,
            actors: vec![project_actor(5)],
        });
        assert!(on(&actors, 5) && !on(&actors, 6));
        let always = Gates {
            percentage_of_time: Some(Percentage::FULL),
            ..Gates::default()
        };
        assert_eq!(
            always.evaluate(INLINE_FLAG, None, &mut rng()),
            Decision::PercentageOfTime
        );
        let never = Gates {
            percentage_of_time: Some(pct("0.001")),
            ..Gates::default()
        };
        let mut r = rng();
        let hits = (0..10_000)
            .filter(|_| never.evaluate(INLINE_FLAG, None, &mut r).is_on())
            .count();
        assert!(hits < 10, "0.001% of time opened {hits} of 10000");
        let half = Gates {
            percentage_of_time: Some(pct("50")),
            ..Gates::default()
        };
        let hits = (0..10_000)
            .filter(|_| half.evaluate(INLINE_FLAG, None, &mut r).is_on())
            .count();
        assert!(
            (4_000..6_000).contains(&hits),
            "50% of time opened {hits} of 10000"
        );
    }

    #[test]
    fn opt_out_beats_every_other_gate() {
        let gates = Gates {
            boolean: true,
            actors: [project_actor(1)].into(),
            percentage_of_actors: Some(Percentage::FULL),
            percentage_of_time: Some(Percentage::FULL),
            ..Gates::default()
        }
        .apply(&Change::OptOut {
            enable: true,
            actors: vec![project_actor(1)],
        });
        assert_eq!(
            gates.evaluate(INLINE_FLAG, Some("Project:1"), &mut rng()),
            Decision::OptedOut
        );
        assert!(on(&gates, 2));
    }

    #[test]
    fn false_clears_every_gate_and_true_replaces_them() {
        let gates = Gates::default()
            .apply(&Change::PercentageOfActors(pct("25")))
            .apply(&Change::Actors {
                enable: true,
                actors: vec!["Project:9".into()],
            })
            .apply(&Change::PercentageOfTime(pct("1")));
        assert!(gates.apply(&Change::Boolean(false)).is_closed());
        assert_eq!(
            gates.apply(&Change::Boolean(true)),
            Gates {
                boolean: true,
                ..Gates::default()
            }
        );
        assert_eq!(
            gates
                .apply(&Change::PercentageOfActors(Percentage::ZERO))
                .percentage_of_actors,
            None
        );
    }

    #[test]
    fn rows_round_trip_and_diffs_name_each_changed_gate() {
        let gates = Gates::default()
            .apply(&Change::Actors {
                enable: true,
                actors: vec!["Project:1".into(), "Project:2".into()],
            })
            .apply(&Change::PercentageOfActors(pct("12.5")));
        let rows = gates.rows();
        let back = Gates::from_rows(rows.iter().map(|(g, v)| (*g, v.as_str()))).unwrap();
        assert_eq!(back, gates);
        let diff = gates.diff(&gates.apply(&Change::Boolean(false)));
        assert_eq!(
            diff,
            vec![
                GateDiff {
                    gate: "actors".into(),
                    old: Some("Project:1,Project:2".into()),
                    new: None
                },
                GateDiff {
                    gate: "percentage_of_actors".into(),
                    old: Some("12.5".into()),
                    new: None
                },
            ]
        );
        assert!(Gates::from_rows([("colour", "red")]).is_err());
    }
}
