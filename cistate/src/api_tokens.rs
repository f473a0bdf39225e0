//! Tokens of the consumer's hooks API scoped to a project or a root namespace (table
//! `api_tokens`, migration `0210_api_tokens.sql`). The operator creates and revokes them (CLI
//! `hookline-consumer tokens`, or the API with the admin token); each is shown once, when
//! created, and only its SHA-256 digest is stored, so the table cannot hand tokens out.
//!
//! A token is `hlpat_` and 43 characters of base64url (32 random bytes): long enough that a
//! plain digest (no salt, no slow hash) is safe, and looked up by that digest in one indexed
//! query. The prefix lets secret scanners recognise a leaked one.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use rand::TryRngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};

use crate::store::StoreError;

/// What every scoped token starts with.
pub const TOKEN_PREFIX: &str = "hlpat_";

/// What a scoped token may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "scope", content = "scope_id", rename_all = "snake_case")]
pub enum TokenScope {
    /// One project's hooks.
    Project(i64),
    /// The hooks of every project in one root namespace.
    Namespace(i64),
}

impl TokenScope {
    fn parts(self) -> (&'static str, i64) {
        match self {
            TokenScope::Project(id) => ("project", id),
            TokenScope::Namespace(id) => ("namespace", id),
        }
    }

    fn from_parts(kind: &str, id: i64) -> Result<TokenScope, StoreError> {
        match kind {
            "project" => Ok(TokenScope::Project(id)),
            "namespace" => Ok(TokenScope::Namespace(id)),
            other => Err(StoreError::Invalid(format!(
                "unknown token scope {other:?}"
            ))),
        }
    }
}

impl std::fmt::Display for TokenScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, id) = self.parts();
        write!(f, "{kind} {id}")
    }
}

/// A stored token, without any secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiToken {
    pub id: i64,
    pub name: String,
    pub scope: TokenScope,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl ApiToken {
    /// Neither revoked nor expired at `now`.
    pub fn active(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

/// A token just created: the only time its text exists outside the caller's hands.
#[derive(Debug, Clone)]
pub struct CreatedToken {
    pub token: String,
    pub row: ApiToken,
}

fn digest(token: &str) -> Vec<u8> {
    Sha256::digest(token.trim().as_bytes()).to_vec()
}

const COLUMNS: &str = "id, name, scope, scope_id, created_at, expires_at, revoked_at, last_used_at";

fn from_row(row: &sqlx::postgres::PgRow) -> Result<ApiToken, StoreError> {
    Ok(ApiToken {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        scope: TokenScope::from_parts(row.try_get("scope")?, row.try_get("scope_id")?)?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        last_used_at: row.try_get("last_used_at")?,
    })
}

/// Creates a token for `scope`; its text is in the answer and nowhere else.
pub async fn create(
    pool: &PgPool,
    name: &str,
    scope: TokenScope,
    expires_at: Option<DateTime<Utc>>,
) -> Result<CreatedToken, StoreError> {
    let name = name.trim();
    if name.is_empty() || name.len() > 255 {
        return Err(StoreError::Invalid(
            "a token's name is 1 to 255 characters".into(),
        ));
    }
    if expires_at.is_some_and(|e| e <= Utc::now()) {
        return Err(StoreError::Invalid("expires_at is in the past".into()));
    }
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| StoreError::Unavailable(format!("no random bytes: {e}")))?;
    let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let (kind, id) = scope.parts();
    let row = sqlx::query(&format!(
        "INSERT INTO api_tokens (name, scope, scope_id, digest, expires_at)
         VALUES ($1, $2, $3, $4, $5) RETURNING {COLUMNS}"
    ))
    .bind(name)
    .bind(kind)
    .bind(id)
    .bind(digest(&token))
    .bind(expires_at)
    .fetch_one(pool)
    .await?;
    Ok(CreatedToken {
        token,
        row: from_row(&row)?,
    })
}

/// Every token, or those of one scope, by id.
pub async fn list(pool: &PgPool, scope: Option<TokenScope>) -> Result<Vec<ApiToken>, StoreError> {
    let (kind, id) = scope.map(TokenScope::parts).unzip();
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM api_tokens
         WHERE $1::TEXT IS NULL OR (scope = $1 AND scope_id = $2) ORDER BY id"
    ))
    .bind(kind)
    .bind(id)
    .fetch_all(pool)
    .await?;
    rows.iter().map(from_row).collect()
}

/// Revokes token `id` (of `scope`, when given). False when there is no such active token.
pub async fn revoke(pool: &PgPool, id: i64, scope: Option<TokenScope>) -> Result<bool, StoreError> {
    let (kind, scope_id) = scope.map(TokenScope::parts).unzip();
    let done = sqlx::query(
        "UPDATE api_tokens SET revoked_at = now()
         WHERE id = $1 AND revoked_at IS NULL
           AND ($2::TEXT IS NULL OR (scope = $2 AND scope_id = $3))",
    )
    .bind(id)
    .bind(kind)
    .bind(scope_id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// The scope of an active token, or `None` (unknown, revoked or expired). Notes when it was last
/// used (at most once a minute, so a busy client does not write on every request).
pub async fn authenticate(
    pool: &PgPool,
    presented: &str,
) -> Result<Option<(i64, TokenScope)>, StoreError> {
    if !presented.trim().starts_with(TOKEN_PREFIX) {
        return Ok(None);
    }
    let digest = digest(presented);
    let row = sqlx::query(
        "SELECT id, scope, scope_id FROM api_tokens
         WHERE digest = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
    )
    .bind(&digest)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let id: i64 = row.try_get("id")?;
    let scope = TokenScope::from_parts(row.try_get("scope")?, row.try_get("scope_id")?)?;
    sqlx::query(
        "UPDATE api_tokens SET last_used_at = now()
         WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(Some((id, scope)))
}
