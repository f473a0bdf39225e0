//! Flags are declared here, in code: a name that is not defined is an error, not a silent "off".

use crate::error::ProducerError;

/// A flag the producer knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlagDefinition {
    pub name: &'static str,
    pub description: &'static str,
    /// The value while no gate was ever stored for the flag.
    pub default: bool,
}

/// Render the Job Hook at the transition and embed it in the event (GitLab 15.3's flag of the
/// same name, default off).
pub const INLINE_FLAG: &str = "execute_build_hooks_inline";

pub const DEFINITIONS: &[FlagDefinition] = &[FlagDefinition {
    name: INLINE_FLAG,
    description: "Render the Job Hook payload at the transition (inline) instead of at delivery (deferred)",
    default: false,
}];

/// The definition of `name`, or an error listing the defined flags.
pub fn lookup(name: &str) -> Result<&'static FlagDefinition, ProducerError> {
    DEFINITIONS
        .iter()
        .find(|d| d.name == name)
        .ok_or_else(|| ProducerError::UnknownFlag {
            name: name.to_owned(),
            defined: DEFINITIONS
                .iter()
                .map(|d| d.name)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inline_flag_is_defined_and_off_by_default() {
        let def = lookup(INLINE_FLAG).unwrap();
        assert!(!def.default);
    }

    #[test]
    fn an_unknown_name_is_an_error_naming_the_defined_flags() {
        let err = lookup("execute_build_hooks_inlin").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("execute_build_hooks_inlin\""), "{message}");
        assert!(message.contains(INLINE_FLAG), "{message}");
    }
}
