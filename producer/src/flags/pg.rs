//! Gates in PostgreSQL (`cistate/migrations/0100_feature_flags.sql`): Flipper's shape, one row per
//! open gate value, plus a history table. Updates lock the flag's row so concurrent operators
//! serialise and the history reads as the sequence of changes that happened.

use std::collections::BTreeMap;

use async_trait::async_trait;
use sqlx::{PgPool, Row};

use super::gates::{Change, Gates};
use super::store::{FlagStore, HistoryEntry};
use crate::error::ProducerError;

#[derive(Debug, Clone)]
pub struct PgFlagStore {
    pool: PgPool,
}

impl PgFlagStore {
    /// Uses a pool whose database has the migrations applied (`PgStore::connect` does that).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

async fn gates_of(conn: &mut sqlx::PgConnection, flag: &str) -> Result<Gates, ProducerError> {
    let rows = sqlx::query("SELECT key, value FROM feature_gates WHERE feature_key = $1")
        .bind(flag)
        .fetch_all(&mut *conn)
        .await?;
    let pairs: Vec<(String, String)> = rows
        .iter()
        .map(|r| Ok((r.try_get("key")?, r.try_get("value")?)))
        .collect::<Result<_, sqlx::Error>>()?;
    Gates::from_rows(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

async fn replace(
    tx: &mut sqlx::PgConnection,
    flag: &str,
    who: &str,
    old: &Gates,
    new: &Gates,
) -> Result<(), ProducerError> {
    sqlx::query("DELETE FROM feature_gates WHERE feature_key = $1")
        .bind(flag)
        .execute(&mut *tx)
        .await?;
    for (gate, value) in new.rows() {
        sqlx::query("INSERT INTO feature_gates (feature_key, key, value) VALUES ($1, $2, $3)")
            .bind(flag)
            .bind(gate)
            .bind(value)
            .execute(&mut *tx)
            .await?;
    }
    for diff in old.diff(new) {
        sqlx::query(
            "INSERT INTO feature_flag_history (feature_key, changed_by, gate, old_value, new_value) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(flag)
        .bind(who)
        .bind(&diff.gate)
        .bind(&diff.old)
        .bind(&diff.new)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

#[async_trait]
impl FlagStore for PgFlagStore {
    async fn load(&self) -> Result<BTreeMap<String, Gates>, ProducerError> {
        let rows = sqlx::query(
            "SELECT f.key AS flag, g.key AS gate, g.value FROM feature_flags f \
             LEFT JOIN feature_gates g ON g.feature_key = f.key",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut by_flag: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for row in rows {
            let flag: String = row.try_get("flag")?;
            let entry = by_flag.entry(flag).or_default();
            let gate: Option<String> = row.try_get("gate")?;
            let value: Option<String> = row.try_get("value")?;
            if let (Some(gate), Some(value)) = (gate, value) {
                entry.push((gate, value));
            }
        }
        by_flag
            .into_iter()
            .map(|(flag, rows)| {
                let gates = Gates::from_rows(rows.iter().map(|(g, v)| (g.as_str(), v.as_str())))?;
                Ok((flag, gates))
            })
            .collect()
    }

    async fn update(&self, flag: &str, who: &str, change: &Change) -> Result<Gates, ProducerError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO feature_flags (key) VALUES ($1) ON CONFLICT (key) DO NOTHING")
            .bind(flag)
            .execute(&mut *tx)
            .await?;
        sqlx::query("SELECT key FROM feature_flags WHERE key = $1 FOR UPDATE")
            .bind(flag)
            .execute(&mut *tx)
            .await?;
        let old = gates_of(&mut tx, flag).await?;
        let new = old.apply(change);
        replace(&mut tx, flag, who, &old, &new).await?;
        tx.commit().await?;
        Ok(new)
    }

    async fn delete(&self, flag: &str, who: &str) -> Result<bool, ProducerError> {
        let mut tx = self.pool.begin().await?;
        let exists = sqlx::query("SELECT key FROM feature_flags WHERE key = $1 FOR UPDATE")
            .bind(flag)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if !exists {
            return Ok(false);
        }
        let old = gates_of(&mut tx, flag).await?;
        replace(&mut tx, flag, who, &old, &Gates::default()).await?;
        sqlx::query("DELETE FROM feature_flags WHERE key = $1")
            .bind(flag)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn history(&self, flag: &str) -> Result<Vec<HistoryEntry>, ProducerError> {
        let rows = sqlx::query(
            "SELECT changed_by, changed_at, gate, old_value, new_value FROM feature_flag_history \
             WHERE feature_key = $1 ORDER BY id",
        )
        .bind(flag)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(HistoryEntry {
                    flag: flag.to_owned(),
                    who: r.try_get("changed_by")?,
                    at: r
                        .try_get::<hookline_cistate::StoredTime, _>("changed_at")?
                        .saturating(),
                    gate: r.try_get("gate")?,
                    old: r.try_get("old_value")?,
                    new: r.try_get("new_value")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }
}
