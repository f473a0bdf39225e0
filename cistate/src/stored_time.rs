//! A `timestamptz` read from PostgreSQL as whatever the column holds, `infinity` and
//! `-infinity` included.
//!
//! sqlx decodes `timestamptz` into `chrono::DateTime` by adding the stored microseconds to its
//! epoch, which panics for `infinity` (stored as `i64::MAX`) and for finite times past chrono's
//! range (PostgreSQL goes to the year 294276, chrono to 262143). A panic in a decode ended the
//! task that read the row; so every timestamp the services read goes through [`StoredTime`],
//! and each reader says what an infinite value means where it reads it (see
//! [`StoredTime::saturating`], [`StoredTime::finite`]).

use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgTypeInfo, PgValueFormat, PgValueRef};
use sqlx::{Decode, Postgres, Type};

/// A stored `timestamptz` (or `timestamp`, read as UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StoredTime {
    /// `-infinity`, or a time before chrono's range.
    MinusInfinity,
    At(DateTime<Utc>),
    /// `infinity`, or a time past chrono's range.
    Infinity,
}

impl StoredTime {
    /// The time; an infinite one as the earliest or latest time there is
    /// ([`DateTime::<Utc>::MIN_UTC`], [`DateTime::<Utc>::MAX_UTC`]), so order is kept.
    pub fn saturating(self) -> DateTime<Utc> {
        match self {
            StoredTime::MinusInfinity => DateTime::<Utc>::MIN_UTC,
            StoredTime::At(at) => at,
            StoredTime::Infinity => DateTime::<Utc>::MAX_UTC,
        }
    }

    /// The time when it is one; `None` for an infinite one.
    pub fn finite(self) -> Option<DateTime<Utc>> {
        match self {
            StoredTime::At(at) => Some(at),
            _ => None,
        }
    }

    /// The value of PostgreSQL's binary form: microseconds since 2000-01-01 00:00 UTC, with
    /// `i64::MAX` and `i64::MIN` for `infinity` and `-infinity`.
    pub fn from_pg_micros(micros: i64) -> Self {
        match micros {
            i64::MAX => StoredTime::Infinity,
            i64::MIN => StoredTime::MinusInfinity,
            _ => {
                let epoch = DateTime::<Utc>::from_timestamp(946_684_800, 0)
                    .expect("2000-01-01 is in chrono's range");
                match epoch.checked_add_signed(TimeDelta::microseconds(micros)) {
                    Some(at) => StoredTime::At(at),
                    None if micros > 0 => StoredTime::Infinity,
                    None => StoredTime::MinusInfinity,
                }
            }
        }
    }

    fn from_text(text: &str) -> Result<Self, BoxDynError> {
        match text {
            "infinity" => return Ok(StoredTime::Infinity),
            "-infinity" => return Ok(StoredTime::MinusInfinity),
            _ => {}
        }
        // The text form PostgreSQL sends with an ISO DateStyle, e.g. `2026-12-01 10:00:00.5+00`;
        // years past 9999 and BC dates are outside what hookline handles as a time.
        let naive = if text.contains('+') || text.rfind('-').is_some_and(|i| i > 10) {
            DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
                .map(|t| t.naive_utc())
                .map_err(|e| format!("timestamp {text:?}: {e}"))?
        } else {
            NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
                .map_err(|e| format!("timestamp {text:?}: {e}"))?
        };
        Ok(StoredTime::At(naive.and_utc()))
    }
}

impl From<DateTime<Utc>> for StoredTime {
    fn from(at: DateTime<Utc>) -> Self {
        StoredTime::At(at)
    }
}

impl Type<Postgres> for StoredTime {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_name("timestamptz")
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        *ty == PgTypeInfo::with_name("timestamptz") || *ty == PgTypeInfo::with_name("timestamp")
    }
}

impl<'r> Decode<'r, Postgres> for StoredTime {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        match value.format() {
            PgValueFormat::Binary => {
                let bytes: [u8; 8] = value
                    .as_bytes()?
                    .try_into()
                    .map_err(|_| "a timestamp is 8 bytes in PostgreSQL's binary form")?;
                Ok(StoredTime::from_pg_micros(i64::from_be_bytes(bytes)))
            }
            PgValueFormat::Text => StoredTime::from_text(value.as_str()?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_postgres_can_send_reads_without_a_panic() {
        assert_eq!(StoredTime::from_pg_micros(i64::MAX), StoredTime::Infinity);
        assert_eq!(
            StoredTime::from_pg_micros(i64::MIN),
            StoredTime::MinusInfinity
        );
        assert_eq!(
            StoredTime::from_pg_micros(0).finite(),
            DateTime::<Utc>::from_timestamp(946_684_800, 0)
        );
        // About the year 287000: PostgreSQL holds it (up to 294276), chrono does not (262143).
        let far = 9_000_000_000_000_000_000;
        assert_eq!(StoredTime::from_pg_micros(far), StoredTime::Infinity);
        assert_eq!(StoredTime::from_pg_micros(-far), StoredTime::MinusInfinity);
        assert_eq!(StoredTime::Infinity.saturating(), DateTime::<Utc>::MAX_UTC);
        assert_eq!(StoredTime::Infinity.finite(), None);
        assert!(StoredTime::MinusInfinity < StoredTime::At(Utc::now()));
    }

    #[test]
    fn the_text_form_reads_too() {
        assert_eq!(
            StoredTime::from_text("infinity").unwrap(),
            StoredTime::Infinity
        );
        assert_eq!(
            StoredTime::from_text("2026-12-01 10:00:00.5+00")
                .unwrap()
                .finite()
                .unwrap()
                .to_rfc3339(),
            "2026-12-01T10:00:00.500+00:00"
        );
        assert!(StoredTime::from_text("soon").is_err());
    }
}
