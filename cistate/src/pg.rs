//! The PostgreSQL store. Migrations (`cistate/migrations`, also holding the producer's flag
//! tables and the consumer's delivery tables) are applied on connect.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPoolOptions, PgRow};
use sqlx::{Executor, PgPool, Row};
use uuid::Uuid;

use crate::model::{
    Build, Environment, Hook, HookEdit, HookFailure, Namespace, NewHook, OrderEntry,
    ParkedDelivery, ParkedEntry, Pipeline, Project, RenderSnapshot, Runner, SourcePipeline, User,
};
use crate::rate_limit::{Bucket, RateLimitOverride};
use crate::secrets::{SecretError, SecretKeys, open_stored, to_stored};
use crate::store::{CiStore, StoreError};
use crate::stored_time::StoredTime;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How many times a starting service asks for a database that cannot be reached before it
/// gives up ([`PgStore::connect_patiently`]): about 20 s in all, long enough for a database
/// started beside the service, short enough that a wrong address fails the start visibly.
pub const CONNECT_ATTEMPTS: usize = 8;

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Seals hook secrets on write and opens them on read ([`crate::secrets`]); without keys
    /// they are written in plaintext and only plaintext ones can be read.
    secrets: Option<Arc<SecretKeys>>,
}

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct PgOptions {
    pub url: String,
    /// A schema to create and use instead of `public`: tests give each test its own.
    pub schema: Option<String>,
    pub max_connections: u32,
}

impl PgOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: None,
            max_connections: 10,
        }
    }

    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }
}

impl PgStore {
    /// Connects, creates the schema if one is named, and applies pending migrations.
    pub async fn connect(options: &PgOptions) -> Result<Self, StoreError> {
        let pool = connect_pool(options).await?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Migrate(e.to_string()))?;
        Ok(Self {
            pool,
            secrets: None,
        })
    }

    /// [`connect`](Self::connect) for a service starting: a database that cannot be reached
    /// (not yet up, restarting, a network not yet routed) is asked again with a growing pause,
    /// `attempts` times in all (each failure logged), before its error is returned. A refusal
    /// that asking again would not cure (a role, password or database the server refuses, a bad
    /// schema name, a failed migration) returns at once.
    pub async fn connect_patiently(
        options: &PgOptions,
        attempts: usize,
    ) -> Result<Self, StoreError> {
        use backon::{ExponentialBuilder, Retryable};
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(attempts.saturating_sub(1))
            .with_jitter();
        (|| Self::connect(options))
            .retry(backoff)
            .when(|error| matches!(error, StoreError::Unavailable(_)))
            .notify(|error, wait| {
                tracing::warn!(%error, ?wait, "PostgreSQL unavailable at start; asking again")
            })
            .await
    }

    pub async fn connect_url(url: &str) -> Result<Self, StoreError> {
        Self::connect(&PgOptions::new(url)).await
    }

    /// The pool, for the services' own tables (flags, delivery log).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Hook secrets (URL, token, signing secret) sealed with `keys` on every write from now on,
    /// and opened with them on read; `None` writes plaintext, as without a key file.
    pub fn with_secrets(mut self, keys: Option<Arc<SecretKeys>>) -> Self {
        self.secrets = keys;
        self
    }

    /// The keys hook secrets are sealed with, if any.
    pub fn secrets(&self) -> Option<&SecretKeys> {
        self.secrets.as_deref()
    }

    /// How the stored hook secrets stand: plaintext values, and sealed ones by key id.
    pub async fn secrets_census(&self) -> Result<SecretsCensus, StoreError> {
        let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
            "SELECT CASE WHEN v LIKE 'hlsec:v1:%' THEN split_part(v, ':', 3) END AS key_id,
                    count(*)
             FROM web_hooks, LATERAL (VALUES (url), (token), (signing_secret)) AS c(v)
             WHERE v IS NOT NULL
             GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut census = SecretsCensus::default();
        for (key, n) in rows {
            match key {
                Some(key) => census.sealed.push((key, n as u64)),
                None => census.plaintext += n as u64,
            }
        }
        Ok(census)
    }

    /// Rewrites every hook secret not sealed with the current key (plaintext, or an older
    /// key) under the current key, a row at a time; returns how many hooks were rewritten.
    pub async fn reseal_hooks(&self) -> Result<u64, StoreError> {
        let Some(keys) = self.secrets.clone() else {
            return Err(StoreError::Secret(SecretError::NoKeys.to_string()));
        };
        let pattern = format!("{}{}:%", crate::secrets::SEALED_PREFIX, keys.current_id());
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM web_hooks
             WHERE url NOT LIKE $1 OR token NOT LIKE $1 OR signing_secret NOT LIKE $1
             ORDER BY id",
        )
        .bind(&pattern)
        .fetch_all(&self.pool)
        .await?;
        let mut rewritten = 0;
        for id in ids {
            // An empty edit rewrites the row's secrets under the current key.
            if self.update_hook(id, &HookEdit::default()).await?.is_some() {
                rewritten += 1;
            }
        }
        Ok(rewritten)
    }

    fn open_secret(
        &self,
        id: i64,
        uuid: Uuid,
        column: &str,
        stored: String,
    ) -> Result<String, StoreError> {
        open_stored(self.secrets.as_deref(), stored, &secret_aad(column, uuid))
            .map_err(|e| StoreError::Secret(format!("hook {id}'s {column}: {e}")))
    }

    fn seal_secret(&self, uuid: Uuid, column: &str, plain: &str) -> String {
        to_stored(self.secrets.as_deref(), plain, &secret_aad(column, uuid))
    }

    fn hook_from_row(&self, row: &PgRow) -> Result<Hook, StoreError> {
        let id: i64 = row.try_get("id")?;
        let uuid: Uuid = row.try_get("uuid")?;
        let open = |column: &str, stored: Option<String>| {
            stored
                .map(|v| self.open_secret(id, uuid, column, v))
                .transpose()
        };
        Ok(Hook {
            id,
            uuid,
            project_id: row.try_get("project_id")?,
            url: self.open_secret(id, uuid, "url", row.try_get("url")?)?,
            token: open("token", row.try_get("token")?)?,
            signing_secret: open("signing_secret", row.try_get("signing_secret")?)?,
            job_events: row.try_get("job_events")?,
            recent_failures: row.try_get("recent_failures")?,
            disabled_until: row
                .try_get::<Option<StoredTime>, _>("disabled_until")?
                .map(StoredTime::saturating),
            collapse: row.try_get("collapse")?,
            created_at: row.try_get::<StoredTime, _>("created_at")?.finite(),
        })
    }
}

/// How the stored hook secrets stand ([`PgStore::secrets_census`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretsCensus {
    /// Values stored in plaintext (URLs, tokens, signing secrets).
    pub plaintext: u64,
    /// Sealed values by the id of their key.
    pub sealed: Vec<(String, u64)>,
}

/// What binds a sealed hook secret to its row and column.
fn secret_aad(column: &str, uuid: Uuid) -> String {
    format!("web_hooks.{column}:{uuid}")
}

/// A pool whose connections all use `options.schema` (created if missing).
pub async fn connect_pool(options: &PgOptions) -> Result<PgPool, StoreError> {
    let mut pool_options = PgPoolOptions::new()
        .max_connections(options.max_connections)
        .acquire_timeout(Duration::from_secs(10));
    if let Some(schema) = &options.schema {
        if schema.is_empty()
            || !schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(StoreError::Invalid(format!(
                "schema name {schema:?}: use letters, digits and underscores"
            )));
        }
        let setup = PgPoolOptions::new()
            .max_connections(1)
            .connect(&options.url)
            .await
            .map_err(connect_error)?;
        setup
            .execute(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"").as_str())
            .await
            .map_err(connect_error)?;
        setup.close().await;
        let set_path = format!("SET search_path TO \"{schema}\"");
        pool_options = pool_options.after_connect(move |conn, _meta| {
            let set_path = set_path.clone();
            Box::pin(async move {
                conn.execute(set_path.as_str()).await?;
                Ok(())
            })
        });
    }
    pool_options
        .connect(&options.url)
        .await
        .map_err(connect_error)
}

/// A failure to connect that asking again would not cure is a refusal ([`StoreError::Invalid`]:
/// a malformed URL, a role or password the server refuses, a database that does not exist, a
/// schema it may not create); anything else (no answer, "the database system is starting up")
/// may pass, and stays [`StoreError::Unavailable`] for [`PgStore::connect_patiently`] to retry.
fn connect_error(error: sqlx::Error) -> StoreError {
    let refused = match &error {
        sqlx::Error::Configuration(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("28") || code == "3D000" || code == "42501"),
        _ => false,
    };
    if refused {
        StoreError::Invalid(format!("PostgreSQL refused the connection: {error}"))
    } else {
        error.into()
    }
}

const SNAPSHOT_SQL: &str = r#"
SELECT b.id AS b_id, b.project_id AS b_project_id, b.pipeline_id AS b_pipeline_id,
       b.user_id AS b_user_id, b.runner_id AS b_runner_id, b.name AS b_name, b.stage AS b_stage,
       b.status AS b_status, b.created_at AS b_created_at, b.queued_at AS b_queued_at,
       b.started_at AS b_started_at, b.finished_at AS b_finished_at, b.duration AS b_duration,
       b.queued_duration AS b_queued_duration, b.allow_failure AS b_allow_failure,
       b.failure_reason AS b_failure_reason, b.retries_count AS b_retries_count,
       b.environment_name, b.environment_action, b.environment_tier,
       p.id AS p_id, p.project_id AS p_project_id, p.user_id AS p_user_id, p.name AS p_name,
       p.ref AS p_ref, p.tag AS p_tag, p.sha AS p_sha, p.before_sha AS p_before_sha,
       p.status AS p_status, p.started_at AS p_started_at, p.finished_at AS p_finished_at,
       p.duration AS p_duration, p.commit_message, p.commit_author_name, p.commit_author_email,
       p.source_project_id, p.source_project_web_url, p.source_project_path,
       p.source_pipeline_id, p.source_job_id,
       pr.id AS pr_id, pr.namespace_id AS pr_namespace_id, pr.name AS pr_name, pr.path AS pr_path,
       pr.description AS pr_description, pr.web_url AS pr_web_url, pr.avatar_url AS pr_avatar_url,
       pr.git_ssh_url AS pr_git_ssh_url, pr.git_http_url AS pr_git_http_url,
       pr.visibility_level AS pr_visibility_level, pr.default_branch AS pr_default_branch,
       n.id AS n_id, n.name AS n_name, n.path AS n_path,
       u.id AS u_id, u.name AS u_name, u.username AS u_username, u.avatar_url AS u_avatar_url,
       u.public_email AS u_public_email, u.blocked AS u_blocked,
       r.id AS r_id, r.description AS r_description, r.runner_type AS r_runner_type,
       r.active AS r_active, r.is_shared AS r_is_shared, r.tags AS r_tags
FROM builds b
JOIN pipelines p ON p.id = b.pipeline_id
JOIN projects pr ON pr.id = b.project_id
JOIN namespaces n ON n.id = pr.namespace_id
JOIN users u ON u.id = b.user_id
LEFT JOIN runners r ON r.id = b.runner_id
WHERE b.id = ANY($1)
"#;

fn snapshot_from_row(row: &PgRow) -> Result<RenderSnapshot, sqlx::Error> {
    let environment = match row.try_get::<Option<String>, _>("environment_name")? {
        Some(name) => Some(Environment {
            name,
            action: row
                .try_get::<Option<String>, _>("environment_action")?
                .unwrap_or_default(),
            deployment_tier: row
                .try_get::<Option<String>, _>("environment_tier")?
                .unwrap_or_default(),
        }),
        None => None,
    };
    let source = match row.try_get::<Option<i64>, _>("source_pipeline_id")? {
        Some(pipeline_id) => Some(SourcePipeline {
            project_id: row
                .try_get::<Option<i64>, _>("source_project_id")?
                .unwrap_or_default(),
            project_web_url: row
                .try_get::<Option<String>, _>("source_project_web_url")?
                .unwrap_or_default(),
            project_path_with_namespace: row
                .try_get::<Option<String>, _>("source_project_path")?
                .unwrap_or_default(),
            pipeline_id,
            job_id: row
                .try_get::<Option<i64>, _>("source_job_id")?
                .unwrap_or_default(),
        }),
        None => None,
    };
    let runner = match row.try_get::<Option<i64>, _>("r_id")? {
        Some(id) => Some(Runner {
            id,
            description: row.try_get("r_description")?,
            runner_type: row.try_get("r_runner_type")?,
            active: row.try_get("r_active")?,
            is_shared: row.try_get("r_is_shared")?,
            tags: row.try_get("r_tags")?,
        }),
        None => None,
    };
    Ok(RenderSnapshot {
        build: Build {
            id: row.try_get("b_id")?,
            project_id: row.try_get("b_project_id")?,
            pipeline_id: row.try_get("b_pipeline_id")?,
            user_id: row.try_get("b_user_id")?,
            runner_id: row.try_get("b_runner_id")?,
            name: row.try_get("b_name")?,
            stage: row.try_get("b_stage")?,
            status: row.try_get("b_status")?,
            created_at: row.try_get::<StoredTime, _>("b_created_at")?.saturating(),
            queued_at: optional_time(row, "b_queued_at")?,
            started_at: optional_time(row, "b_started_at")?,
            finished_at: optional_time(row, "b_finished_at")?,
            duration: row.try_get("b_duration")?,
            queued_duration: row.try_get("b_queued_duration")?,
            allow_failure: row.try_get("b_allow_failure")?,
            failure_reason: row.try_get("b_failure_reason")?,
            retries_count: row.try_get("b_retries_count")?,
            environment,
        },
        pipeline: Pipeline {
            id: row.try_get("p_id")?,
            project_id: row.try_get("p_project_id")?,
            user_id: row.try_get("p_user_id")?,
            name: row.try_get("p_name")?,
            git_ref: row.try_get("p_ref")?,
            tag: row.try_get("p_tag")?,
            sha: row.try_get("p_sha")?,
            before_sha: row.try_get("p_before_sha")?,
            status: row.try_get("p_status")?,
            started_at: optional_time(row, "p_started_at")?,
            finished_at: optional_time(row, "p_finished_at")?,
            duration: row.try_get("p_duration")?,
            commit_message: row.try_get("commit_message")?,
            commit_author_name: row.try_get("commit_author_name")?,
            commit_author_email: row.try_get("commit_author_email")?,
            source,
        },
        project: Project {
            id: row.try_get("pr_id")?,
            namespace_id: row.try_get("pr_namespace_id")?,
            name: row.try_get("pr_name")?,
            path: row.try_get("pr_path")?,
            description: row.try_get("pr_description")?,
            web_url: row.try_get("pr_web_url")?,
            avatar_url: row.try_get("pr_avatar_url")?,
            git_ssh_url: row.try_get("pr_git_ssh_url")?,
            git_http_url: row.try_get("pr_git_http_url")?,
            visibility_level: row.try_get("pr_visibility_level")?,
            default_branch: row.try_get("pr_default_branch")?,
        },
        namespace: Namespace {
            id: row.try_get("n_id")?,
            name: row.try_get("n_name")?,
            path: row.try_get("n_path")?,
        },
        user: User {
            id: row.try_get("u_id")?,
            name: row.try_get("u_name")?,
            username: row.try_get("u_username")?,
            avatar_url: row.try_get("u_avatar_url")?,
            public_email: row.try_get("u_public_email")?,
            blocked: row.try_get("u_blocked")?,
        },
        runner,
    })
}

/// A nullable time of the CI state (a build's or pipeline's start, finish, queue): `infinity` or
/// `-infinity` (refused by the CHECK constraints since migration 0191, but possibly written
/// before) reads as unknown, which is what a Job Hook can say about it.
fn optional_time(row: &PgRow, column: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    Ok(row
        .try_get::<Option<StoredTime>, _>(column)?
        .and_then(StoredTime::finite))
}

const HOOK_COLUMNS: &str = "id, uuid, project_id, url, token, signing_secret, job_events, \
     recent_failures, disabled_until, collapse, created_at";

#[async_trait]
impl CiStore for PgStore {
    async fn snapshots(
        &self,
        build_ids: &[i64],
    ) -> Result<HashMap<i64, RenderSnapshot>, StoreError> {
        if build_ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = sqlx::query(SNAPSHOT_SQL)
            .bind(build_ids)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let snapshot = snapshot_from_row(row)?;
                Ok((snapshot.build.id, snapshot))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    async fn upsert_namespace(&self, n: &Namespace) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO namespaces (id, name, path) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, path = EXCLUDED.path",
        )
        .bind(n.id)
        .bind(&n.name)
        .bind(&n.path)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn upsert_project(&self, p: &Project) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO projects (id, namespace_id, name, path, description, web_url, avatar_url,
                                   git_ssh_url, git_http_url, visibility_level, default_branch)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (id) DO UPDATE SET namespace_id = EXCLUDED.namespace_id,
                name = EXCLUDED.name, path = EXCLUDED.path, description = EXCLUDED.description,
                web_url = EXCLUDED.web_url, avatar_url = EXCLUDED.avatar_url,
                git_ssh_url = EXCLUDED.git_ssh_url, git_http_url = EXCLUDED.git_http_url,
                visibility_level = EXCLUDED.visibility_level,
                default_branch = EXCLUDED.default_branch",
        )
        .bind(p.id)
        .bind(p.namespace_id)
        .bind(&p.name)
        .bind(&p.path)
        .bind(&p.description)
        .bind(&p.web_url)
        .bind(&p.avatar_url)
        .bind(&p.git_ssh_url)
        .bind(&p.git_http_url)
        .bind(p.visibility_level)
        .bind(&p.default_branch)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn upsert_user(&self, u: &User) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO users (id, name, username, avatar_url, public_email, blocked)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, username = EXCLUDED.username,
                avatar_url = EXCLUDED.avatar_url, public_email = EXCLUDED.public_email,
                blocked = EXCLUDED.blocked",
        )
        .bind(u.id)
        .bind(&u.name)
        .bind(&u.username)
        .bind(&u.avatar_url)
        .bind(&u.public_email)
        .bind(u.blocked)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn upsert_runner(&self, r: &Runner) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO runners (id, description, runner_type, active, is_shared, tags)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET description = EXCLUDED.description,
                runner_type = EXCLUDED.runner_type, active = EXCLUDED.active,
                is_shared = EXCLUDED.is_shared, tags = EXCLUDED.tags",
        )
        .bind(r.id)
        .bind(&r.description)
        .bind(&r.runner_type)
        .bind(r.active)
        .bind(r.is_shared)
        .bind(&r.tags)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn upsert_pipeline(&self, p: &Pipeline) -> Result<(), StoreError> {
        write_pipeline(&self.pool, p).await
    }

    async fn upsert_build(&self, b: &Build) -> Result<(), StoreError> {
        write_build(&self.pool, b).await
    }

    async fn add_hook(&self, h: &NewHook) -> Result<Hook, StoreError> {
        // The uuid is made here, not by the database: it binds the sealed secrets to the row.
        let uuid = Uuid::new_v4();
        let row = sqlx::query(&format!(
            "INSERT INTO web_hooks (uuid, project_id, url, token, signing_secret, job_events, collapse)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {HOOK_COLUMNS}"
        ))
        .bind(uuid)
        .bind(h.project_id)
        .bind(self.seal_secret(uuid, "url", &h.url))
        .bind(h.token.as_deref().map(|t| self.seal_secret(uuid, "token", t)))
        .bind(
            h.signing_secret
                .as_deref()
                .map(|t| self.seal_secret(uuid, "signing_secret", t)),
        )
        .bind(h.job_events)
        .bind(h.collapse)
        .fetch_one(&self.pool)
        .await?;
        self.hook_from_row(&row)
    }

    async fn hook(&self, id: i64) -> Result<Option<Hook>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {HOOK_COLUMNS} FROM web_hooks WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(|r| self.hook_from_row(r)).transpose()
    }

    async fn list_hooks(&self, project_id: Option<i64>) -> Result<Vec<Hook>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {HOOK_COLUMNS} FROM web_hooks
             WHERE $1::BIGINT IS NULL OR project_id = $1 ORDER BY id"
        ))
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| self.hook_from_row(r)).collect()
    }

    async fn job_hooks(&self, project_id: i64) -> Result<Vec<Hook>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {HOOK_COLUMNS} FROM web_hooks WHERE project_id = $1 AND job_events ORDER BY id"
        ))
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| self.hook_from_row(r)).collect()
    }

    async fn update_hook(&self, id: i64, edit: &HookEdit) -> Result<Option<Hook>, StoreError> {
        // Read, change, write back in one transaction, the row locked: every secret of the row
        // is written sealed with the current key (a plaintext or older value is re-sealed on
        // any edit), which SQL alone cannot do.
        let mut tx = self.pool.begin().await?;
        let Some(row) = sqlx::query(&format!(
            "SELECT {HOOK_COLUMNS} FROM web_hooks WHERE id = $1 FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let current = self.hook_from_row(&row)?;
        let url = edit.url.clone().unwrap_or(current.url);
        let token = edit.token.clone().unwrap_or(current.token);
        let signing_secret = edit
            .signing_secret
            .clone()
            .unwrap_or(current.signing_secret);
        let uuid = current.uuid;
        let row = sqlx::query(&format!(
            "UPDATE web_hooks SET url = $2, token = $3, signing_secret = $4,
                job_events = COALESCE($5, job_events), collapse = COALESCE($6, collapse)
             WHERE id = $1 RETURNING {HOOK_COLUMNS}"
        ))
        .bind(id)
        .bind(self.seal_secret(uuid, "url", &url))
        .bind(token.as_deref().map(|t| self.seal_secret(uuid, "token", t)))
        .bind(
            signing_secret
                .as_deref()
                .map(|t| self.seal_secret(uuid, "signing_secret", t)),
        )
        .bind(edit.job_events)
        .bind(edit.collapse)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(self.hook_from_row(&row)?))
    }

    async fn remove_hook(&self, id: i64) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM web_hooks WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn enable_hook(&self, id: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE web_hooks SET recent_failures = 0, disabled_until = NULL WHERE id = $1",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn disable_hook(&self, id: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE web_hooks SET recent_failures = $2, disabled_until = NULL WHERE id = $1",
        )
        .bind(id)
        .bind(crate::model::PERMANENT_FAILURES)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn record_hook_failure(
        &self,
        id: i64,
        now: DateTime<Utc>,
    ) -> Result<HookFailure, StoreError> {
        // One conditional row update: only an executable hook counts the failure, and the row
        // lock the UPDATE takes serialises concurrent consumers. The arithmetic is
        // `Hook::health_after_failure` in SQL (the two are checked against each other in the
        // tests): at most 40 failures; from the 4th on, a back-off of 1 min * 2^(failures before
        // this one - 3), clamped to [1 min, 1 day].
        let counted = sqlx::query(&format!(
            "UPDATE web_hooks SET
                 recent_failures = LEAST(recent_failures + 1, {permanent}),
                 disabled_until = CASE WHEN recent_failures + 1 > {threshold}
                     THEN $2 + LEAST(
                         interval '1 minute'
                             * power(2, LEAST(GREATEST(recent_failures - {threshold}, 0), 20)),
                         interval '1 day')
                     ELSE NULL END
             WHERE id = $1
               AND recent_failures < {permanent}
               AND (disabled_until IS NULL OR disabled_until <= $2)
             RETURNING {HOOK_COLUMNS}",
            permanent = crate::model::PERMANENT_FAILURES,
            threshold = crate::model::FAILURE_THRESHOLD,
        ))
        .bind(id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = counted {
            return Ok(HookFailure::Counted(self.hook_from_row(&row)?));
        }
        Ok(match self.hook(id).await? {
            Some(hook) => HookFailure::NotExecutable(hook),
            None => HookFailure::Gone,
        })
    }

    async fn record_hook_success(&self, id: i64) -> Result<(), StoreError> {
        // Skip the write when already healthy: the common case on a busy hook.
        sqlx::query(
            "UPDATE web_hooks SET recent_failures = 0, disabled_until = NULL
             WHERE id = $1 AND (recent_failures <> 0 OR disabled_until IS NOT NULL)",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn order_entries(
        &self,
        hook_id: i64,
        build_id: i64,
    ) -> Result<Vec<OrderEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT event_id, occurred_at, seq, settled_at IS NOT NULL AS settled
             FROM delivery_order WHERE hook_id = $1 AND build_id = $2
             ORDER BY occurred_at, seq",
        )
        .bind(hook_id)
        .bind(build_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(OrderEntry {
                    event_id: row.try_get("event_id")?,
                    occurred_at: row.try_get::<StoredTime, _>("occurred_at")?.saturating(),
                    seq: row.try_get("seq")?,
                    settled: row.try_get("settled")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    async fn order_queued_pairs(&self, build_ids: &[i64]) -> Result<Vec<(i64, i64)>, StoreError> {
        if build_ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT DISTINCT hook_id, build_id FROM delivery_order WHERE build_id = ANY($1)",
        )
        .bind(build_ids)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("hook_id")?, row.try_get("build_id")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    async fn order_hold(
        &self,
        hook_id: i64,
        build_id: i64,
        event_id: Uuid,
        occurred_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO delivery_order (hook_id, build_id, event_id, occurred_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(hook_id)
        .bind(build_id)
        .bind(event_id)
        .bind(occurred_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn order_settle(
        &self,
        hook_id: i64,
        build_id: i64,
        event_id: Uuid,
    ) -> Result<Option<ParkedEntry>, StoreError> {
        let mut tx = self.pool.begin().await?;
        lock_order_queue(&mut tx, hook_id, build_id).await?;
        let first: Option<Uuid> = sqlx::query_scalar(
            "SELECT event_id FROM delivery_order
             WHERE hook_id = $1 AND build_id = $2 AND settled_at IS NULL
             ORDER BY occurred_at, seq LIMIT 1",
        )
        .bind(hook_id)
        .bind(build_id)
        .fetch_optional(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE delivery_order
             SET settled_at = now(), parked_keys = NULL, parked_values = NULL, parked_body = NULL
             WHERE hook_id = $1 AND build_id = $2 AND event_id = $3 AND settled_at IS NULL",
        )
        .bind(hook_id)
        .bind(build_id)
        .bind(event_id)
        .execute(&mut *tx)
        .await?;
        let next = if first == Some(event_id) {
            sqlx::query(
                "SELECT hook_id, build_id, event_id, parked_keys, parked_values, parked_body
                 FROM delivery_order
                 WHERE hook_id = $1 AND build_id = $2 AND settled_at IS NULL
                 ORDER BY occurred_at, seq LIMIT 1",
            )
            .bind(hook_id)
            .bind(build_id)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| parked_entry(&row))
            .transpose()?
            .flatten()
        } else {
            None
        };
        tx.commit().await?;
        Ok(next)
    }

    async fn order_park(
        &self,
        hook_id: i64,
        build_id: i64,
        event_id: Uuid,
        delivery: &ParkedDelivery,
    ) -> Result<bool, StoreError> {
        let (keys, values): (Vec<String>, Vec<String>) = delivery.headers.iter().cloned().unzip();
        let mut tx = self.pool.begin().await?;
        lock_order_queue(&mut tx, hook_id, build_id).await?;
        let parked = sqlx::query(
            "UPDATE delivery_order d
             SET parked_keys = $4, parked_values = $5, parked_body = $6
             WHERE hook_id = $1 AND build_id = $2 AND event_id = $3 AND settled_at IS NULL
               AND EXISTS (
                   SELECT 1 FROM delivery_order e
                   WHERE e.hook_id = $1 AND e.build_id = $2 AND e.settled_at IS NULL
                     AND (e.occurred_at, e.seq) < (d.occurred_at, d.seq))",
        )
        .bind(hook_id)
        .bind(build_id)
        .bind(event_id)
        .bind(keys)
        .bind(values)
        .bind(&delivery.body)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        tx.commit().await?;
        Ok(parked)
    }

    async fn order_unpark(
        &self,
        hook_id: i64,
        build_id: i64,
        event_id: Uuid,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE delivery_order
             SET parked_keys = NULL, parked_values = NULL, parked_body = NULL
             WHERE hook_id = $1 AND build_id = $2 AND event_id = $3",
        )
        .bind(hook_id)
        .bind(build_id)
        .bind(event_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn order_stranded(
        &self,
        quiet_since: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<ParkedEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT d.hook_id, d.build_id, d.event_id, d.parked_keys, d.parked_values, d.parked_body
             FROM delivery_order d
             WHERE d.parked_body IS NOT NULL AND d.settled_at IS NULL
               AND NOT EXISTS (
                   SELECT 1 FROM delivery_order e
                   WHERE e.hook_id = d.hook_id AND e.build_id = d.build_id
                     AND e.settled_at IS NULL AND (e.occurred_at, e.seq) < (d.occurred_at, d.seq))
               AND NOT EXISTS (
                   SELECT 1 FROM delivery_order s
                   WHERE s.hook_id = d.hook_id AND s.build_id = d.build_id
                     AND s.settled_at >= $1)
             LIMIT $2",
        )
        .bind(quiet_since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut stranded = Vec::with_capacity(rows.len());
        for row in &rows {
            stranded.extend(parked_entry(row)?);
        }
        Ok(stranded)
    }

    async fn order_prune(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM delivery_order
             WHERE settled_at < $1
                OR (parked_body IS NULL
                    AND NOT EXISTS (SELECT 1 FROM web_hooks h WHERE h.id = delivery_order.hook_id))",
        )
        .bind(before)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn latest_build(&self, project_id: i64) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT max(id) FROM builds WHERE project_id = $1")
                .bind(project_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    fn pg_pool(&self) -> Option<&PgPool> {
        Some(&self.pool)
    }

    async fn project_exists(&self, project_id: i64) -> Result<bool, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM projects WHERE id = $1)")
                .bind(project_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }
    async fn project_namespace(&self, project_id: i64) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT namespace_id FROM projects WHERE id = $1")
                .bind(project_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn rate_limit_overrides(&self) -> Result<Vec<RateLimitOverride>, StoreError> {
        let rows: Vec<(i64, Option<i32>)> = sqlx::query_as(
            "SELECT namespace_id, per_minute FROM namespace_rate_limits ORDER BY namespace_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(namespace_id, per_minute)| RateLimitOverride {
                namespace_id,
                per_minute: per_minute.map(|n| n.max(1) as u32),
            })
            .collect())
    }

    async fn set_rate_limit(
        &self,
        namespace_id: i64,
        per_minute: Option<u32>,
    ) -> Result<(), StoreError> {
        let per_minute = per_minute
            .map(|n| i32::try_from(n).map_err(|_| StoreError::Invalid(format!("{n} is too large"))))
            .transpose()?;
        sqlx::query(
            "INSERT INTO namespace_rate_limits (namespace_id, per_minute) VALUES ($1, $2) \
             ON CONFLICT (namespace_id) DO UPDATE \
             SET per_minute = EXCLUDED.per_minute, updated_at = now()",
        )
        .bind(namespace_id)
        .bind(per_minute)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn clear_rate_limit(&self, namespace_id: i64) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM namespace_rate_limits WHERE namespace_id = $1")
            .bind(namespace_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn take_rate_token(
        &self,
        namespace_id: i64,
        bucket: Bucket,
    ) -> Result<Duration, StoreError> {
        // `rate_limit::gcra` in one statement, on the database's clock (one clock for every
        // instance); the row lock serialises the instances taking from one namespace.
        let wait: f64 = sqlx::query_scalar(
            "INSERT INTO rate_limit_buckets AS b (namespace_id, tat) \
             VALUES ($1, now() + make_interval(secs => $2)) \
             ON CONFLICT (namespace_id) DO UPDATE \
             SET tat = GREATEST(CASE WHEN isfinite(b.tat) THEN b.tat END, now()) \
                 + make_interval(secs => $2) \
             RETURNING GREATEST(EXTRACT(EPOCH FROM (b.tat - now())) - $3, 0)::float8",
        )
        .bind(namespace_id)
        .bind(bucket.interval.as_secs_f64())
        .bind(bucket.depth.as_secs_f64())
        .fetch_one(&self.pool)
        .await?;
        // A wait no clock can reach (a bucket written by hand) is no reason to panic: the token
        // is taken now and the bucket starts over from it.
        Ok(Duration::try_from_secs_f64(wait).unwrap_or(Duration::ZERO))
    }

    async fn try_take_rate_token(
        &self,
        namespace_id: i64,
        bucket: Bucket,
    ) -> Result<Duration, StoreError> {
        take_now(
            &self.pool,
            "rate_limit_buckets",
            "namespace_id",
            namespace_id,
            bucket,
        )
        .await
    }

    async fn take_hook_test_token(
        &self,
        hook_id: i64,
        bucket: Bucket,
    ) -> Result<Duration, StoreError> {
        take_now(&self.pool, "hook_test_buckets", "hook_id", hook_id, bucket).await
    }
}

/// `rate_limit::gcra_now` on a bucket table (`table`, keyed by `key`): the token is taken only
/// if it is there now; otherwise nothing changes and the wait is returned.
async fn take_now(
    pool: &PgPool,
    table: &str,
    key: &str,
    id: i64,
    bucket: Bucket,
) -> Result<Duration, StoreError> {
    let taken = sqlx::query(&format!(
        "INSERT INTO {table} AS b ({key}, tat) VALUES ($1, now() + make_interval(secs => $2))
         ON CONFLICT ({key}) DO UPDATE SET tat = GREATEST(b.tat, now()) + make_interval(secs => $2)
         WHERE GREATEST(b.tat, now()) + make_interval(secs => $2) - make_interval(secs => $3) <= now()
         RETURNING 1"
    ))
    .bind(id)
    .bind(bucket.interval.as_secs_f64())
    .bind(bucket.depth.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    if taken.is_some() {
        return Ok(Duration::ZERO);
    }
    let wait: Option<f64> = sqlx::query_scalar(&format!(
        "SELECT EXTRACT(EPOCH FROM (GREATEST(tat, now()) + make_interval(secs => $2)
                - make_interval(secs => $3) - now()))::float8
         FROM {table} WHERE {key} = $1"
    ))
    .bind(id)
    .bind(bucket.interval.as_secs_f64())
    .bind(bucket.depth.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    // A bucket gone meanwhile is full again: a token is there, just ask again.
    Ok(Duration::from_secs_f64(wait.unwrap_or(0.0).max(0.001)))
}

/// Upserts a pipeline through any executor: a CI's own transaction writes the pipeline and
/// its outbox row together (`write_pipeline(&mut *tx, ..)`).
pub async fn write_pipeline<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    p: &Pipeline,
) -> Result<(), StoreError> {
    let s = p.source.as_ref();
    sqlx::query(
        "INSERT INTO pipelines (id, project_id, user_id, name, ref, tag, sha, before_sha, status,
            started_at, finished_at, duration, commit_message, commit_author_name,
            commit_author_email, source_project_id, source_project_web_url,
            source_project_path, source_pipeline_id, source_job_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                 $18, $19, $20)
         ON CONFLICT (id) DO UPDATE SET project_id = EXCLUDED.project_id,
            user_id = EXCLUDED.user_id, name = EXCLUDED.name, ref = EXCLUDED.ref,
            tag = EXCLUDED.tag, sha = EXCLUDED.sha, before_sha = EXCLUDED.before_sha,
            status = EXCLUDED.status, started_at = EXCLUDED.started_at,
            finished_at = EXCLUDED.finished_at, duration = EXCLUDED.duration,
            commit_message = EXCLUDED.commit_message,
            commit_author_name = EXCLUDED.commit_author_name,
            commit_author_email = EXCLUDED.commit_author_email,
            source_project_id = EXCLUDED.source_project_id,
            source_project_web_url = EXCLUDED.source_project_web_url,
            source_project_path = EXCLUDED.source_project_path,
            source_pipeline_id = EXCLUDED.source_pipeline_id,
            source_job_id = EXCLUDED.source_job_id",
    )
    .bind(p.id)
    .bind(p.project_id)
    .bind(p.user_id)
    .bind(&p.name)
    .bind(&p.git_ref)
    .bind(p.tag)
    .bind(&p.sha)
    .bind(&p.before_sha)
    .bind(&p.status)
    .bind(p.started_at)
    .bind(p.finished_at)
    .bind(p.duration)
    .bind(&p.commit_message)
    .bind(&p.commit_author_name)
    .bind(&p.commit_author_email)
    .bind(s.map(|s| s.project_id))
    .bind(s.map(|s| s.project_web_url.clone()))
    .bind(s.map(|s| s.project_path_with_namespace.clone()))
    .bind(s.map(|s| s.pipeline_id))
    .bind(s.map(|s| s.job_id))
    .execute(executor)
    .await?;
    Ok(())
}

/// Upserts a build through any executor: a CI's own transaction writes the build and
/// its outbox row together (`write_build(&mut *tx, ..)`).
pub async fn write_build<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    b: &Build,
) -> Result<(), StoreError> {
    let e = b.environment.as_ref();
    sqlx::query(
        "INSERT INTO builds (id, project_id, pipeline_id, user_id, runner_id, name, stage, status,
            created_at, queued_at, started_at, finished_at, duration, queued_duration,
            allow_failure, failure_reason, retries_count, environment_name,
            environment_action, environment_tier)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                 $18, $19, $20)
         ON CONFLICT (id) DO UPDATE SET project_id = EXCLUDED.project_id,
            pipeline_id = EXCLUDED.pipeline_id, user_id = EXCLUDED.user_id,
            runner_id = EXCLUDED.runner_id, name = EXCLUDED.name, stage = EXCLUDED.stage,
            status = EXCLUDED.status, created_at = EXCLUDED.created_at,
            queued_at = EXCLUDED.queued_at, started_at = EXCLUDED.started_at,
            finished_at = EXCLUDED.finished_at, duration = EXCLUDED.duration,
            queued_duration = EXCLUDED.queued_duration,
            allow_failure = EXCLUDED.allow_failure, failure_reason = EXCLUDED.failure_reason,
            retries_count = EXCLUDED.retries_count,
            environment_name = EXCLUDED.environment_name,
            environment_action = EXCLUDED.environment_action,
            environment_tier = EXCLUDED.environment_tier",
    )
    .bind(b.id)
    .bind(b.project_id)
    .bind(b.pipeline_id)
    .bind(b.user_id)
    .bind(b.runner_id)
    .bind(&b.name)
    .bind(&b.stage)
    .bind(&b.status)
    .bind(b.created_at)
    .bind(b.queued_at)
    .bind(b.started_at)
    .bind(b.finished_at)
    .bind(b.duration)
    .bind(b.queued_duration)
    .bind(b.allow_failure)
    .bind(&b.failure_reason)
    .bind(b.retries_count)
    .bind(e.map(|e| e.name.clone()))
    .bind(e.map(|e| e.action.clone()))
    .bind(e.map(|e| e.deployment_tier.clone()))
    .execute(executor)
    .await?;
    Ok(())
}

/// Serialises the settlements and parkings of one (hook, build) order queue for the rest of
/// `tx`: a record parks only while an earlier entry is pending, and that entry's settlement then
/// sees it (without the lock, each could miss the other and the parked record would wait for
/// the sweep). Ids hash into one advisory-lock key; a collision only serialises two queues.
async fn lock_order_queue(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    hook_id: i64,
    build_id: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 0))")
        .bind(hook_id.to_string())
        .bind(build_id.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The parked entry of a `delivery_order` row; `None` when nothing is parked on it.
fn parked_entry(row: &PgRow) -> Result<Option<ParkedEntry>, sqlx::Error> {
    let Some(body) = row.try_get::<Option<Vec<u8>>, _>("parked_body")? else {
        return Ok(None);
    };
    let keys: Vec<String> = row
        .try_get::<Option<_>, _>("parked_keys")?
        .unwrap_or_default();
    let values: Vec<String> = row
        .try_get::<Option<_>, _>("parked_values")?
        .unwrap_or_default();
    Ok(Some(ParkedEntry {
        hook_id: row.try_get("hook_id")?,
        build_id: row.try_get("build_id")?,
        event_id: row.try_get("event_id")?,
        delivery: ParkedDelivery {
            headers: keys.into_iter().zip(values).collect(),
            body,
        },
    }))
}
