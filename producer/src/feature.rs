//! `hookline-producer feature ...`: the rollout commands GitLab operators know from ChatOps.
//!
//! ```text
//! feature set NAME true|false|<pct> [--actors | --random] [--project ID[,ID...]] [--opt-out]
//! feature get NAME | list | delete NAME | history NAME | enabled NAME --project ID[,ID...]
//! ```

use std::fmt::Write as _;

use crate::config::StoreOptions;
use crate::error::ProducerError;
use crate::flags::gates::{Change, Percentage, project_actor};
use crate::flags::{DEFINITIONS, FlagStore, lookup};

/// Options of every `feature` command.
#[derive(clap::Args, Debug, Clone)]
pub struct FeatureArgs {
    #[command(flatten)]
    pub store: StoreOptions,
    /// Who makes the change, for the history (default: the USER environment variable).
    #[arg(long, env = "HOOKLINE_ACTOR", global = true)]
    pub actor: Option<String>,
    #[command(subcommand)]
    pub command: FeatureCommand,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum FeatureCommand {
    /// Opens or closes a gate. `true`/`false` is the boolean gate (`false` clears every gate: the
    /// rollback); a percentage needs --actors (percentage of projects) or --random (percentage of
    /// time); with --project, `true`/`false` adds or removes those projects (or their opt-out).
    Set {
        name: String,
        /// true, false, or a percentage from 0 to 100 with up to 3 decimals.
        value: String,
        /// The percentage is of projects (Flipper's percentage of actors).
        #[arg(long, conflicts_with = "random")]
        actors: bool,
        /// The percentage is of evaluations (Flipper's percentage of time).
        #[arg(long)]
        random: bool,
        /// Project ids to enable or disable the flag for.
        #[arg(long, value_delimiter = ',')]
        project: Vec<i64>,
        /// With --project: `true` opts the projects out (off whatever other gates say), `false`
        /// removes the opt-out.
        #[arg(long, requires = "project")]
        opt_out: bool,
    },
    /// Shows a flag's gates.
    Get { name: String },
    /// Lists every defined flag with its state.
    List,
    /// Forgets a flag's gates: it falls back to its default.
    Delete { name: String },
    /// Shows every change of a flag: when, who, gate, old -> new.
    History { name: String },
    /// Prints `<id> true|false` for each project: what the producer would decide now.
    Enabled {
        name: String,
        #[arg(long, value_delimiter = ',', required = true)]
        project: Vec<i64>,
    },
}

const VALUE_ACCEPTED: &str = "expected true, false, or a percentage from 0 to 100 with up to 3 decimals (with --actors or --random)";

/// Turns `feature set` arguments into a change, refusing combinations Flipper has no meaning for.
pub fn parse_set(
    value: &str,
    actors: bool,
    random: bool,
    projects: &[i64],
    opt_out: bool,
) -> Result<Change, ProducerError> {
    let invalid = |m: String| Err(ProducerError::Invalid(m));
    let boolean = match value {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    };
    if let Some(enable) = boolean {
        if actors || random {
            return invalid(format!(
                "--actors and --random take a percentage (0 to 100, up to 3 decimals), not {value}; use `{value}` alone for the boolean gate"
            ));
        }
        let actors: Vec<String> = projects.iter().map(|p| project_actor(*p)).collect();
        return Ok(match (actors.is_empty(), opt_out) {
            (true, _) => Change::Boolean(enable),
            (false, false) => Change::Actors { enable, actors },
            (false, true) => Change::OptOut { enable, actors },
        });
    }
    let looks_numeric = value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit() || c == '-' || c == '.');
    if !looks_numeric {
        return invalid(format!("invalid value {value:?}: {VALUE_ACCEPTED}"));
    }
    let percentage: Percentage = value.parse()?;
    if !projects.is_empty() || opt_out {
        return invalid(
            "--project takes true or false (enable or disable those projects), not a percentage"
                .into(),
        );
    }
    match (actors, random) {
        (true, _) => Ok(Change::PercentageOfActors(percentage)),
        (_, true) => Ok(Change::PercentageOfTime(percentage)),
        _ => invalid(format!(
            "a percentage needs --actors (percentage of projects) or --random (percentage of time): {VALUE_ACCEPTED}"
        )),
    }
}

/// Runs one `feature` command and returns what to print.
pub async fn run(args: &FeatureArgs) -> Result<String, ProducerError> {
    let store = args.store.flag_store(None).await?;
    let who = args
        .actor
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".to_owned());
    execute(store.as_ref(), &who, &args.command).await
}

/// Runs `command` against `store`.
pub async fn execute(
    store: &dyn FlagStore,
    who: &str,
    command: &FeatureCommand,
) -> Result<String, ProducerError> {
    let mut out = String::new();
    match command {
        FeatureCommand::Set {
            name,
            value,
            actors,
            random,
            project,
            opt_out,
        } => {
            lookup(name)?;
            let change = parse_set(value, *actors, *random, project, *opt_out)?;
            let gates = store.update(name, who, &change).await?;
            let _ = writeln!(out, "{name}: {}", gates.summary());
        }
        FeatureCommand::Get { name } => {
            let definition = lookup(name)?;
            let all = store.load().await?;
            let _ = writeln!(
                out,
                "{name}: {}",
                state_line(definition.default, all.get(name))
            );
            let _ = writeln!(out, "  description: {}", definition.description);
            let _ = writeln!(out, "  default: {}", definition.default);
            if let Some(gates) = all.get(name) {
                for gate in crate::flags::gates::GATE_NAMES {
                    let value = gates.gate_value(gate).unwrap_or_else(|| "-".to_owned());
                    let _ = writeln!(out, "  {gate}: {value}");
                }
            }
        }
        FeatureCommand::List => {
            let all = store.load().await?;
            for definition in DEFINITIONS {
                let _ = writeln!(
                    out,
                    "{}: {}",
                    definition.name,
                    state_line(definition.default, all.get(definition.name))
                );
            }
            for stored in all.keys().filter(|k| lookup(k).is_err()) {
                let _ = writeln!(
                    out,
                    "{stored}: stored but not defined in this version (ignored)"
                );
            }
        }
        FeatureCommand::Delete { name } => {
            let definition = lookup(name)?;
            let deleted = store.delete(name, who).await?;
            let _ = writeln!(
                out,
                "{name}: {} (default {})",
                if deleted { "deleted" } else { "nothing stored" },
                definition.default
            );
        }
        FeatureCommand::History { name } => {
            lookup(name)?;
            for h in store.history(name).await? {
                let _ = writeln!(
                    out,
                    "{} {} {} {} -> {}",
                    h.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    h.who,
                    h.gate,
                    h.old.as_deref().unwrap_or("-"),
                    h.new.as_deref().unwrap_or("-")
                );
            }
        }
        FeatureCommand::Enabled { name, project } => {
            let definition = lookup(name)?;
            let all = store.load().await?;
            for id in project {
                // The same evaluation the producer runs on its cached copy of these gates.
                let on = all.get(name).map_or(definition.default, |gates| {
                    gates
                        .evaluate(name, Some(&project_actor(*id)), &mut rand::rng())
                        .is_on()
                });
                let _ = writeln!(out, "{id} {on}");
            }
        }
    }
    Ok(out)
}

fn state_line(default: bool, gates: Option<&crate::flags::Gates>) -> String {
    match gates {
        None => format!("{} (default)", if default { "on" } else { "off" }),
        Some(g) => g.summary(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::{INLINE_FLAG, MemoryFlagStore};

    fn set(
        value: &str,
        actors: bool,
        random: bool,
        projects: &[i64],
        opt_out: bool,
    ) -> Result<Change, String> {
        parse_set(value, actors, random, projects, opt_out).map_err(|e| e.to_string())
    }

    #[test]
    fn set_values_map_to_flipper_changes() {
        assert_eq!(
            set("true", false, false, &[], false),
            Ok(Change::Boolean(true))
        );
        assert_eq!(
            set("false", false, false, &[], false),
            Ok(Change::Boolean(false))
        );
        assert_eq!(
            set("25", true, false, &[], false),
            Ok(Change::PercentageOfActors("25".parse().unwrap()))
        );
        assert_eq!(
            set("0.5", false, true, &[], false),
            Ok(Change::PercentageOfTime("0.5".parse().unwrap()))
        );
        assert_eq!(
            set("true", false, false, &[1, 2], false),
            Ok(Change::Actors {
                enable: true,
                actors: vec!["Project:1".into(), "Project:2".into()]
            })
        );
        assert_eq!(
            set("true", false, false, &[3], true),
            Ok(Change::OptOut {
                enable: true,
                actors: vec!["Project:3".into()]
            })
        );
    }

    #[test]
    fn invalid_values_are_refused_saying_what_is_accepted() {
        let cases = [
            (set("150", true, false, &[], false), "0 to 100"),
            (
                set("abc", false, false, &[], false),
                "true, false, or a percentage",
            ),
            (set("true", true, false, &[], false), "take a percentage"),
            (set("25", false, false, &[], false), "--actors"),
            (
                set("25", true, false, &[4], false),
                "--project takes true or false",
            ),
            (set("-5", true, false, &[], false), "0 to 100"),
        ];
        for (result, expected) in cases {
            let message = result.unwrap_err();
            assert!(
                message.contains(expected),
                "{message:?} should mention {expected:?}"
            );
        }
    }

    #[tokio::test]
    async fn enabled_prints_one_line_per_project() {
        let store = MemoryFlagStore::new();
        let store = &store;
        let run = |command| async move { execute(store, "t", &command).await.unwrap() };
        run(FeatureCommand::Set {
            name: INLINE_FLAG.into(),
            value: "true".into(),
            actors: false,
            random: false,
            project: vec![42],
            opt_out: false,
        })
        .await;
        let out = run(FeatureCommand::Enabled {
            name: INLINE_FLAG.into(),
            project: vec![42, 43],
        })
        .await;
        assert_eq!(out, "42 true\n43 false\n");
    }
}
