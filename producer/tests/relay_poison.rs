//! One row the relay cannot publish costs only itself, against the real PostgreSQL and Kafka
//! and the real `hookline-producer relay` process:
//!
//! - rows written before migration 0201 (which refuses such values from then on): a time of
//!   `infinity` and facts holding `1e400` (valid JSONB, no f64) are each moved to
//!   `hookline_outbox_dead` with the reason, while the valid rows behind them, of another build
//!   and of the same build, are published, in order; the relay stays up and ready, and the
//!   upgrade left every waiting row as it was;
//! - from 0201 on, `hookline_outbox_record` refuses those values with an error that says what
//!   is wrong, and so does a plain `INSERT` (by a constraint's name).
//!
//! (A worker that dies making `/readyz` answer 503 and the process exit non-zero is tested
//! in `relay.rs`: no row can make a worker die any more.)

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use hookline_cistate::fixtures::{sample, write_snapshot};
use hookline_cistate::pg::connect_pool;
use hookline_cistate::{PgOptions, PgStore};
use hookline_schemas::{BuildStatus, Codec};
use hookline_tests::{create_topic, database_url, free_port, kafka_brokers, unique_name};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::process::{Child, Command};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_hookline-producer");
/// The first migration that refuses poison values; rows written before it may hold them.
const REFUSING_MIGRATION: i64 = 201;

/// A schema migrated as a database was before 0201, with its pool.
async fn schema_before_the_checks() -> (String, PgPool) {
    let schema = unique_name("poison");
    let pool = connect_pool(&PgOptions {
        max_connections: 3,
        ..PgOptions::new(database_url()).schema(schema.clone())
    })
    .await
    .expect("database");
    let all = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cistate/migrations");
    let older = tempdir();
    for entry in std::fs::read_dir(&all).expect("migrations") {
        let path = entry.expect("migration").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let version: i64 = name.split('_').next().unwrap().parse().expect("a version");
        if version < REFUSING_MIGRATION {
            std::fs::copy(&path, older.join(&name)).expect("copy migration");
        }
    }
    sqlx::migrate::Migrator::new(older.as_path())
        .await
        .expect("older migrations")
        .run(&pool)
        .await
        .expect("migrated as before 0201");
    std::fs::remove_dir_all(&older).ok();
    (schema, pool)
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique_name("hookline_migrations"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Upgrades the schema to every migration (as a relay or producer does at start) and writes
/// the sample worlds of builds `a` (base 0) and `b` (base 1,000,000).
async fn upgrade(schema: &str) -> PgStore {
    let store = PgStore::connect(&PgOptions {
        max_connections: 3,
        ..PgOptions::new(database_url()).schema(schema)
    })
    .await
    .expect("the upgrade applies with poison rows waiting");
    write_snapshot(&store, &sample(0)).await.unwrap();
    write_snapshot(&store, &sample(1_000_000)).await.unwrap();
    store
}

async fn record(pool: &PgPool, sql: &str, build: i64) -> Uuid {
    sqlx::query_scalar(sql)
        .bind(build)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

struct Relay {
    child: Child,
    port: u16,
}

impl Relay {
    fn start(topic: &str, schema: &str) -> Relay {
        let port = free_port();
        let log = std::env::var("CHILD_LOG").ok();
        let child = Command::new(BIN)
            .args(["relay", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--poll-interval", "200ms", "--depth-interval", "200ms"])
            .env("HOOKLINE_KAFKA_BROKERS", kafka_brokers())
            .env("HOOKLINE_TOPIC", topic)
            .env("HOOKLINE_DATABASE_URL", database_url())
            .env("HOOKLINE_DATABASE_SCHEMA", schema)
            .env("RUST_LOG", log.as_deref().unwrap_or("error"))
            .stdout(Stdio::null())
            .stderr(if log.is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true)
            .spawn()
            .expect("start hookline-producer relay");
        Relay { child, port }
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let r = reqwest::get(format!("http://127.0.0.1:{}{path}", self.port))
            .await
            .ok()?;
        Some((r.status().as_u16(), r.text().await.unwrap_or_default()))
    }

    /// How it is doing, for a failure's message: its `/readyz` and whether it still runs.
    async fn state(&mut self) -> String {
        let exited = self.child.try_wait().expect("relay status");
        format!(
            "relay process {}, /readyz {:?}",
            exited.map_or("running".to_owned(), |s| format!("exited ({s})")),
            self.get("/readyz").await
        )
    }
}

/// (event id, build id, status) of every record read from `topic`'s one partition until
/// `want` is among them or `timeout` passes.
async fn read_until(
    topic: &str,
    want: Uuid,
    timeout: Duration,
) -> Result<Vec<(Uuid, i64, BuildStatus)>, Vec<(Uuid, i64, BuildStatus)>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique_name("reader"))
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let codec = Codec::embedded();
    let mut read: Vec<(Uuid, i64, BuildStatus)> = Vec::new();
    let deadline = Instant::now() + timeout;
    while !read.iter().any(|(id, ..)| *id == want) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(message) = tokio::time::timeout(left, consumer.recv()).await else {
            return Err(read);
        };
        let message = message.expect("consume");
        let event = codec
            .decode(message.payload().unwrap())
            .await
            .expect("decode")
            .event;
        read.push((event.event_id, event.build_id, event.status));
    }
    Ok(read)
}

async fn dead_rows(pool: &PgPool) -> Vec<(Uuid, String)> {
    sqlx::query_as("SELECT event_id, reason FROM hookline_outbox_dead ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Rows `poison` (for build a) and then, behind it, a valid row of build b and a valid row of
/// build a, all written before 0201; after the upgrade the relay publishes b's and a's valid
/// rows in order and moves the poison row aside with a reason matching `reason`.
async fn one_poison_row_costs_only_itself(poison: &str, reason: &str) {
    let topic = unique_name("poison");
    create_topic(&topic, 1).await;
    let (schema, pool) = schema_before_the_checks().await;
    let (a, b) = (sample(0).build.id, sample(1_000_000).build.id);
    let bad = record(&pool, poison, a).await;
    let other = record(&pool, "SELECT hookline_outbox_record($1, 'running')", b).await;
    let later = record(&pool, "SELECT hookline_outbox_record($1, 'success')", a).await;
    let before: Vec<(i64, Uuid, String)> =
        sqlx::query_as("SELECT id, event_id, occurred_at::text FROM hookline_outbox ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let store = upgrade(&schema).await;
    let after: Vec<(i64, Uuid, String)> =
        sqlx::query_as("SELECT id, event_id, occurred_at::text FROM hookline_outbox ORDER BY id")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(
        after, before,
        "the upgrade leaves waiting rows as they were"
    );

    let mut relay = Relay::start(&topic, &schema);
    let read = match read_until(&topic, later, Duration::from_secs(30)).await {
        Ok(read) => read,
        Err(read) => panic!(
            "the valid rows behind the poison row were not all published within 30 s (read: {read:?}); {}",
            relay.state().await
        ),
    };
    assert_eq!(
        read,
        vec![
            (other, b, BuildStatus::Running),
            (later, a, BuildStatus::Success)
        ],
        "the valid rows, each once, in commit order; nothing of the poison row"
    );
    hookline_tests::poll_until("the outbox to be empty", Duration::from_secs(10), || {
        let pool = store.pool().clone();
        async move {
            let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM hookline_outbox")
                .fetch_one(&pool)
                .await
                .ok()?;
            (rows == 0).then_some(())
        }
    })
    .await;
    let dead = dead_rows(store.pool()).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, bad);
    assert!(
        dead[0].1.contains(reason),
        "the reason names the value: {dead:?}"
    );
    assert_eq!(
        relay.get("/readyz").await.map(|(status, _)| status),
        Some(200),
        "{}",
        relay.state().await
    );
    let (_, metrics) = relay.get("/metrics").await.expect("metrics");
    assert!(
        metrics.contains("hookline_relay_rows_dead_total{kind=\"invalid\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("hookline_relay_workers_running 2"),
        "{metrics}"
    );
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "the relay still runs"
    );
}

#[tokio::test]
async fn an_infinity_time_is_set_aside_and_the_rows_behind_it_are_published() {
    one_poison_row_costs_only_itself(
        "SELECT hookline_outbox_record($1, 'running', NULL, 'infinity')",
        "occurred_at: infinity",
    )
    .await;
}

#[tokio::test]
async fn facts_no_f64_can_hold_are_set_aside_and_the_rows_behind_them_are_published() {
    one_poison_row_costs_only_itself(
        r#"SELECT hookline_outbox_record($1, 'running', '{"duration": 1e400}')"#,
        "facts",
    )
    .await;
}

#[tokio::test]
async fn the_outbox_refuses_values_no_event_can_carry() {
    let store = hookline_tests::pg_store().await;
    let pool = store.pool().clone();
    let build = sample(0).build.id;
    write_snapshot(&store, &sample(0)).await.unwrap();
    let refused = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query(sql)
                .bind(build)
                .execute(&pool)
                .await
                .map(|_| ())
                .expect_err(sql)
                .to_string()
        }
    };
    for (sql, says) in [
        (
            "SELECT hookline_outbox_record($1, 'running', NULL, 'infinity')",
            "occurred_at must be a finite time, not infinity",
        ),
        (
            "SELECT hookline_outbox_record($1, 'running', NULL, '-infinity')",
            "occurred_at must be a finite time, not -infinity",
        ),
        (
            r#"SELECT hookline_outbox_record($1, 'running', '{"duration": 1e400}')"#,
            "facts.duration is out of range",
        ),
        (
            r#"SELECT hookline_outbox_record($1, 'running', '{"queued_duration": "3"}')"#,
            "facts.queued_duration must be a number of seconds or null, not a JSON string",
        ),
        (
            r#"SELECT hookline_outbox_record($1, 'running', '{"started_at": 17}')"#,
            "facts.started_at must be a string or null, not a JSON number",
        ),
        (
            r#"SELECT hookline_outbox_record($1, 'running', '[1, 2]')"#,
            "facts must be a JSON object or NULL, not a JSON array",
        ),
        (
            "INSERT INTO hookline_outbox (build_id, status, occurred_at) VALUES ($1, 'running', 'infinity')",
            "hookline_outbox_occurred_at_is_finite",
        ),
        (
            "INSERT INTO hookline_outbox (build_id, status, created_at) VALUES ($1, 'running', '-infinity')",
            "hookline_outbox_created_at_is_finite",
        ),
        (
            r#"INSERT INTO hookline_outbox (build_id, status, facts) VALUES ($1, 'running', '{"duration": -1e309}')"#,
            "hookline_outbox_facts_are_readable",
        ),
    ] {
        let error = refused(sql).await;
        assert!(error.contains(says), "{sql}: {error}");
    }
    // The builds table refuses an infinite duration itself (migration 0191)...
    let error = refused("UPDATE builds SET duration = 'Infinity' WHERE id = $1").await;
    assert!(error.contains("builds_duration_finite"), "{error}");
    // ...but a row written before 0191 may hold one (its constraints skip rows they cannot
    // validate): such a build row gives facts no event can carry, and the outbox refuses them.
    sqlx::query("ALTER TABLE builds DROP CONSTRAINT builds_duration_finite")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE builds SET duration = 'Infinity' WHERE id = $1")
        .bind(build)
        .execute(&pool)
        .await
        .unwrap();
    let error = refused("SELECT hookline_outbox_record($1, 'success')").await;
    assert!(error.contains("facts.duration"), "{error}");
    sqlx::query("UPDATE builds SET duration = 3.5 WHERE id = $1")
        .bind(build)
        .execute(&pool)
        .await
        .unwrap();

    // What an event can carry still goes in, the extremes included.
    for sql in [
        "SELECT hookline_outbox_record($1, 'success')",
        "SELECT hookline_outbox_record($1, 'running', NULL, '1970-01-01T00:00:00Z')",
        r#"SELECT hookline_outbox_record($1, 'running', '{"duration": 1.7976931348623157e308, "started_at": null}')"#,
    ] {
        sqlx::query(sql)
            .bind(build)
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM hookline_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 3, "only the refused rows are missing");
}
