//! The delivery log against the real broker, the real PostgreSQL and loopback receivers: what a
//! row keeps (and never keeps), the limits, a database that cannot take rows, retention, and
//! the operator's test and resend.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use chrono::{Days, Utc};
use hookline_cistate::delivery_log::{
    self, DeliveryLogEntry, DeliveryLogQuery, LogTrigger, StatusFilter,
};
use hookline_cistate::{CiStore, PgPool};
use hookline_consumer::deliver::{AttemptOutcome, DeliverConfig, Deliverer, sha256_hex};
use hookline_consumer::hook_ops::{self, HookOpError};
use hookline_schemas::{BuildStatus, SchemaVersion};
use hookline_tests::world::{WHSEC, World, inline_event};
use hookline_tests::{Answer, Receiver, pg_store, poll_until};
use tokio::net::TcpListener;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

async fn logged(pool: &PgPool, hook_id: i64, at_least: usize) -> Vec<DeliveryLogEntry> {
    poll_until(
        &format!("{at_least} log rows of hook {hook_id}"),
        WAIT,
        || async {
            let rows = delivery_log::recent(
                pool,
                &DeliveryLogQuery {
                    hook_id,
                    ..DeliveryLogQuery::default()
                },
            )
            .await
            .expect("read the log");
            (rows.len() >= at_least).then_some(rows)
        },
    )
    .await
}

fn deliverer_allowing_loopback() -> Deliverer {
    Deliverer::new(DeliverConfig {
        timeout: Duration::from_secs(2),
        allow_cidrs: vec!["127.0.0.0/8".into()],
        ..DeliverConfig::default()
    })
    .expect("deliverer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_attempt_is_logged_with_its_number_and_without_secrets() {
    let world = World::new(1).await;
    let snapshot = world.build(31_000).await;
    let receiver = Receiver::start().await;
    receiver.script([Answer::Status(500), Answer::Status(200)]);
    // Basic-auth credentials in the URL, a token and a signing secret: none may reach the log.
    let url = receiver.url.replacen("http://", "http://ada:pa55word@", 1);
    let hook = world.hook(snapshot.project.id, &url, Some(WHSEC)).await;
    // A second hook the SSRF guard refuses: its attempt is logged too, with the reason.
    let refused = world
        .hook(snapshot.project.id, "http://10.255.255.1:8080/hook", None)
        .await;
    let running = world.start(world.config()).await;

    let event = inline_event(&snapshot, BuildStatus::Running);
    world.send(&event, SchemaVersion::V2).await;
    let pool = world.store.pool();
    let rows = logged(pool, hook.id, 2).await;
    let got = receiver.received();
    assert_eq!(got.len(), 2);

    // Newest first: the retry's 200, then the first attempt's 500.
    let (second, first) = (&rows[0], &rows[1]);
    assert_eq!((first.attempt, first.response_status), (1, Some(500)));
    assert_eq!((second.attempt, second.response_status), (2, Some(200)));
    for row in [first, second] {
        assert_eq!(row.trigger, LogTrigger::Delivery);
        assert_eq!(row.event_id, event.event_id);
        assert_eq!(row.build_id, Some(snapshot.build.id));
        assert_eq!(
            Some(row.idempotency_key.as_str()),
            got[0].header("idempotency-key")
        );
        assert_eq!(
            row.request_body.as_deref().map(str::as_bytes),
            event.payload.as_deref(),
            "the body is kept whole under the limit"
        );
        assert_eq!(
            row.request_body_sha256,
            sha256_hex(event.payload.as_deref().unwrap())
        );
        assert_eq!(row.internal_error, None);
        let h = &row.request_headers;
        assert_eq!(h["x-gitlab-token"], "[REDACTED]");
        assert_eq!(h["webhook-signature"], "[REDACTED]");
        assert_eq!(h["authorization"], "[REDACTED]");
        assert_eq!(h["x-gitlab-event"], "Job Hook");
        assert!(row.url.contains("ada:*****@"), "{}", row.url);
        let text = serde_json::to_string(row).unwrap();
        let signatures = got
            .iter()
            .map(|r| r.header("webhook-signature").unwrap().to_owned());
        for secret in ["s3cret-token", "pa55word", WHSEC]
            .into_iter()
            .map(str::to_owned)
            .chain(signatures)
        {
            assert!(!text.contains(&secret), "{secret} in the log row {text}");
        }
    }
    // The receiver saw the password as Basic auth: the redaction hides something real.
    assert!(
        got[0]
            .header("authorization")
            .unwrap()
            .starts_with("Basic ")
    );

    let failed = delivery_log::recent(
        pool,
        &DeliveryLogQuery {
            hook_id: hook.id,
            failed_only: true,
            ..DeliveryLogQuery::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(failed.iter().map(|r| r.attempt).collect::<Vec<_>>(), [1]);
    let ok = delivery_log::recent(
        pool,
        &DeliveryLogQuery {
            hook_id: hook.id,
            status: Some(StatusFilter::Successful),
            ..DeliveryLogQuery::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ok.iter().map(|r| r.attempt).collect::<Vec<_>>(), [2]);
    let other_event = delivery_log::recent(
        pool,
        &DeliveryLogQuery {
            hook_id: hook.id,
            event_id: Some(Uuid::new_v4()),
            ..DeliveryLogQuery::default()
        },
    )
    .await
    .unwrap();
    assert!(other_event.is_empty());
    let page2 = delivery_log::recent(
        pool,
        &DeliveryLogQuery {
            hook_id: hook.id,
            limit: 1,
            page: 2,
            ..DeliveryLogQuery::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(page2, vec![first.clone()]);
    assert_eq!(
        delivery_log::get(pool, hook.id, first.id).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        delivery_log::get(pool, refused.id, first.id).await.unwrap(),
        None
    );

    let refusal = logged(pool, refused.id, 1).await;
    assert_eq!(refusal[0].response_status, None);
    let error = refusal[0].internal_error.as_deref().unwrap_or_default();
    assert!(error.contains("10.255.255.1"), "{error}");
    assert!(running.metrics.delivery_log_written() >= 3);
    assert_eq!(running.metrics.delivery_log_dropped(), 0);
    running.stop().await;
}

/// A receiver answering 200 with a 20 KB body and 80 headers of 2 KB each.
async fn chatty_receiver() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = Router::new().fallback(|| async {
        let mut response = (StatusCode::OK, "é".repeat(10 * 1024)).into_response();
        for n in 0..80 {
            response.headers_mut().insert(
                HeaderName::try_from(format!("x-chatty-{n:02}")).unwrap(),
                HeaderValue::try_from("v".repeat(2048)).unwrap(),
            );
        }
        response
    });
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_are_cut_to_gitlabs_limits() {
    let world = World::new(1).await;
    let snapshot = world.build(32_000).await;
    let hook = world
        .hook(snapshot.project.id, &chatty_receiver().await, None)
        .await;
    let running = world.start(world.config()).await;
    world
        .send(
            &inline_event(&snapshot, BuildStatus::Success),
            SchemaVersion::V2,
        )
        .await;
    let row = logged(world.store.pool(), hook.id, 1).await.remove(0);
    assert_eq!(row.response_status, Some(200));
    let body = row.response_body.unwrap();
    // 8 KB of two-byte characters, cut on a character boundary.
    assert_eq!(body.len(), 8 * 1024);
    assert!(body.chars().all(|c| c == 'é'));
    let headers = row.response_headers.unwrap();
    let headers = headers.as_object().unwrap();
    assert_eq!(headers.len(), 50, "the first 50 headers");
    for value in headers.values() {
        assert!(value.as_str().unwrap().len() <= 1024);
    }
    assert_eq!(headers["x-chatty-00"].as_str().unwrap().len(), 1024);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_log_the_database_cannot_take_drops_rows_and_delivery_goes_on() {
    let world = World::new(1).await;
    let snapshot = world.build(33_000).await;
    let receiver = Receiver::start().await;
    let hook = world.hook(snapshot.project.id, &receiver.url, None).await;
    // The table locked for the whole run: every write of the log waits on it.
    let mut lock = world.store.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE delivery_log IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let mut config = world.config();
    config.delivery_log.buffer = 2;
    config.delivery_log.batch = 1;
    config.delivery_log.write_timeout = Duration::from_millis(300);
    let running = world.start(config).await;
    for status in [
        BuildStatus::Pending,
        BuildStatus::Running,
        BuildStatus::Success,
    ]
    .into_iter()
    .cycle()
    .take(12)
    {
        world
            .send(&inline_event(&snapshot, status), SchemaVersion::V2)
            .await;
    }
    poll_until("12 deliveries", WAIT, || async {
        (receiver.count() >= 12).then_some(())
    })
    .await;
    poll_until("dropped log rows counted", WAIT, || async {
        (running.metrics.delivery_log_dropped() > 0).then_some(())
    })
    .await;
    assert!(
        running
            .metrics
            .encode()
            .contains("hookline_consumer_delivery_log_dropped_total")
    );
    lock.rollback().await.unwrap();
    // Once the table is free, rows are written again.
    world
        .send(
            &inline_event(&snapshot, BuildStatus::Failed),
            SchemaVersion::V2,
        )
        .await;
    poll_until("a log row after the lock", WAIT, || async {
        let rows = delivery_log::recent(
            world.store.pool(),
            &DeliveryLogQuery {
                hook_id: hook.id,
                limit: 100,
                ..DeliveryLogQuery::default()
            },
        )
        .await
        .unwrap();
        (!rows.is_empty()).then_some(())
    })
    .await;
    running.stop().await;
}

/// A batch that cannot be written in time is cancelled by the server itself (so it is not
/// written later behind the writer's back), and the bound does not stay on the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_waits_too_long_is_cancelled_by_the_server() {
    let store = pg_store().await;
    let pool = store.pool();
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE delivery_log IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let error =
        delivery_log::append_within(pool, &[row_at(Utc::now(), 1)], Duration::from_millis(200))
            .await
            .expect_err("the table is locked");
    // The lock is held until the rollback below: only the server's own cancellation could end
    // the wait, and its error says so. (How long it took is printed, not asserted: a loaded
    // machine stretches it, and the order of the two is what matters.)
    assert!(
        error.to_string().contains("statement timeout"),
        "cancelled by the server: {error}"
    );
    eprintln!(
        "the locked batch was cancelled after {:?} (bound 200 ms)",
        started.elapsed()
    );
    lock.rollback().await.unwrap();
    for _ in 0..pool.size() {
        let bound: String = sqlx::query_scalar("SHOW statement_timeout")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(bound, "0", "the bound is the transaction's only");
    }
    assert_eq!(all_ids(pool).await.len(), 0, "nothing written");
}

/// Looking an entry up by its id (resend) descends an index in each day's partition instead of
/// reading every row kept, and the lookups find their row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_is_found_by_its_id_through_an_index() {
    let store = pg_store().await;
    let pool = store.pool();
    let today = Utc::now().date_naive();
    for back in 0..3 {
        let day = today.checked_sub_days(Days::new(back)).unwrap();
        delivery_log::create_partition(pool, day).await.unwrap();
    }
    // Enough rows that a scan of them all would be the planner's worse choice.
    let now = Utc::now();
    let rows: Vec<DeliveryLogEntry> = (0..30_000i64)
        .map(|n| row_at(now - chrono::Duration::hours(n % 60), 1 + n % 7))
        .collect();
    for batch in rows.chunks(500) {
        delivery_log::append_within(pool, batch, Duration::from_secs(10))
            .await
            .unwrap();
    }
    sqlx::query("ANALYZE delivery_log")
        .execute(pool)
        .await
        .unwrap();
    let (id, hook_id): (i64, i64) =
        sqlx::query_as("SELECT id, hook_id FROM delivery_log ORDER BY random() LIMIT 1")
            .fetch_one(pool)
            .await
            .unwrap();
    for (lookup, query) in [
        (
            "find",
            format!("SELECT * FROM delivery_log WHERE id = {id}"),
        ),
        (
            "get",
            format!("SELECT * FROM delivery_log WHERE hook_id = {hook_id} AND id = {id}"),
        ),
    ] {
        let plan: serde_json::Value =
            sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {query}"))
                .fetch_one(pool)
                .await
                .unwrap();
        // Pages each day's partition was read for: a descent of an index is a handful, a
        // scan of the day (its rows, or all of an index) is tens. The default partition holds
        // only rows written before their day's partition existed.
        let mut days = Vec::new();
        let mut nodes = vec![&plan[0]["Plan"]];
        while let Some(node) = nodes.pop() {
            if let Some(table) = node["Relation Name"].as_str()
                && table.starts_with("delivery_log_p")
            {
                let pages = node["Shared Hit Blocks"].as_u64().unwrap()
                    + node["Shared Read Blocks"].as_u64().unwrap();
                days.push((table.to_owned(), pages));
            }
            nodes.extend(node["Plans"].as_array().into_iter().flatten());
        }
        assert_eq!(days.len(), 3, "{lookup} reads the three days: {plan}");
        for (table, pages) in days {
            assert!(pages <= 10, "{lookup} read {pages} pages of {table}");
        }
    }
    let found = delivery_log::find(pool, id).await.unwrap().expect("found");
    assert_eq!((found.id, found.hook_id), (id, hook_id));
    let got = delivery_log::get(pool, hook_id, id)
        .await
        .unwrap()
        .expect("got");
    assert_eq!(got.id, id);
    assert!(
        delivery_log::get(pool, hook_id + 100, id)
            .await
            .unwrap()
            .is_none(),
        "another hook's entry is not this hook's"
    );
}

fn row_at(at: chrono::DateTime<Utc>, hook_id: i64) -> DeliveryLogEntry {
    DeliveryLogEntry {
        id: 0,
        attempted_at: at,
        hook_id,
        project_id: 1,
        build_id: None,
        event_id: Uuid::new_v4(),
        idempotency_key: Uuid::new_v4().to_string(),
        trigger: LogTrigger::Delivery,
        attempt: 1,
        url: "https://example.com/hook".into(),
        request_headers: serde_json::json!({}),
        request_body: Some("{}".into()),
        request_body_sha256: sha256_hex(b"{}"),
        request_body_size: 2,
        response_status: Some(200),
        internal_error: None,
        response_headers: None,
        response_body: None,
        duration_ms: 1,
    }
}

async fn partition_of(pool: &PgPool, id: i64) -> String {
    sqlx::query_scalar("SELECT tableoid::regclass::text FROM delivery_log WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn all_ids(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM delivery_log ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_old_days_and_keeps_recent_ones() {
    let store = pg_store().await;
    let pool = store.pool();
    let now = Utc::now();
    let today = now.date_naive();
    let old_day = today.checked_sub_days(Days::new(20)).unwrap();
    // An old day's partition, made as the consumer makes them, with rows in it.
    assert!(delivery_log::create_partition(pool, old_day).await.unwrap());
    let old_at = old_day.and_hms_opt(12, 0, 0).unwrap().and_utc();
    let old: Vec<i64> = futures_ids(pool, &[row_at(old_at, 1), row_at(old_at, 1)]).await;
    assert_eq!(
        partition_of(pool, old[0]).await,
        delivery_log::partition_name(old_day)
    );
    // Rows without a partition of their day land in the default partition: an old one, a
    // recent one, and one of today written before today's partition exists.
    let stray_old = futures_ids(pool, &[row_at(now - chrono::Duration::days(19), 1)]).await;
    let recent = futures_ids(pool, &[row_at(now - chrono::Duration::days(3), 1)]).await;
    let today_row = futures_ids(pool, &[row_at(now, 1)]).await;
    assert_eq!(
        partition_of(pool, today_row[0]).await,
        "delivery_log_default"
    );

    let pruned = hookline_consumer::delivery_log::maintain(pool, Duration::from_secs(14 * 86_400))
        .await
        .expect("maintenance");
    assert_eq!(pruned.partitions, 1);
    assert_eq!(pruned.default_rows, 1);
    let ids = all_ids(pool).await;
    assert_eq!(
        ids,
        [recent[0], today_row[0]],
        "old rows gone, recent ones kept"
    );
    assert!(!ids.contains(&stray_old[0]) && !ids.contains(&old[0]));
    // Today's row moved into today's new partition; the coming days have theirs.
    assert_eq!(
        partition_of(pool, today_row[0]).await,
        delivery_log::partition_name(today)
    );
    for ahead in 1..=2 {
        let day = today.checked_add_days(Days::new(ahead)).unwrap();
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(delivery_log::partition_name(day))
            .fetch_one(pool)
            .await
            .unwrap();
        assert!(exists, "partition of {day}");
    }
    // The bodies and headers are compressed with lz4 (migration 0180), in the partitions the
    // keeper makes as in the table they are made like.
    let compression: Vec<(String, String)> = sqlx::query_as(
        "SELECT attrelid::regclass::text, attcompression::text FROM pg_attribute \
         WHERE attname = 'request_body' AND attrelid IN ($1::regclass, $2::regclass, $3::regclass)",
    )
    .bind("delivery_log")
    .bind("delivery_log_default")
    .bind(delivery_log::partition_name(today))
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(compression.len(), 3);
    for (table, method) in compression {
        assert_eq!(method, "l", "request_body of {table} compressed with lz4");
    }
    // Again: nothing to create, nothing to drop, nothing lost.
    let again = hookline_consumer::delivery_log::maintain(pool, Duration::from_secs(14 * 86_400))
        .await
        .unwrap();
    assert_eq!((again.partitions, again.default_rows), (0, 0));
    assert_eq!(all_ids(pool).await, ids);
}

async fn futures_ids(pool: &PgPool, rows: &[DeliveryLogEntry]) -> Vec<i64> {
    let mut ids = Vec::new();
    for row in rows {
        ids.push(delivery_log::insert(pool, row).await.unwrap());
    }
    ids
}

/// The batch write (one `UNNEST` insert) keeps every field as the one-row `INSERT` does: NULLs,
/// non-ASCII text, microseconds, ids past 32 bits, nested JSON, and rows around them intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_keeps_every_field_as_written() {
    let store = pg_store().await;
    let pool = store.pool();
    let at = chrono::DateTime::parse_from_rfc3339("2026-11-30T23:59:59.123456Z")
        .unwrap()
        .with_timezone(&Utc);
    let full = DeliveryLogEntry {
        build_id: Some(9_000_000_000),
        hook_id: 5_000_000_000,
        project_id: 7_000_000_001,
        trigger: LogTrigger::Resend,
        attempt: 17,
        url: "https://h\u{e9}bergeur.example/hook?q=\u{1f680}&x=\"\\".into(),
        request_headers: serde_json::json!({
            "X-Gitlab-Token": "[REDACTED]",
            "Content-Type": "application/json",
            "nested": {"a": [1, 2.5, null, "\u{fc}\t\n"]}
        }),
        request_body: Some("{\"name\":\"caf\u{e9}\",\"tab\":\"\\t\"}\n\r\\N".into()),
        request_body_size: 4_321,
        response_status: None,
        internal_error: Some("connection refused (os error 111)".into()),
        response_headers: Some(serde_json::json!({"retry-after": "30", "x-empty": ""})),
        response_body: Some(String::new()),
        duration_ms: i32::MAX,
        ..row_at(at, 5_000_000_000)
    };
    let sparse = DeliveryLogEntry {
        request_body: None,
        response_status: Some(599),
        ..row_at(at + chrono::Duration::microseconds(1), 5_000_000_000)
    };
    let written = delivery_log::append_within(
        pool,
        &[full.clone(), sparse.clone(), full.clone()],
        Duration::from_secs(5),
    )
    .await
    .expect("append");
    assert_eq!(written, 3);
    // The same entry through the one-row insert, to compare the two paths.
    let by_insert = delivery_log::insert(pool, &full).await.unwrap();

    let mut rows = delivery_log::recent(
        pool,
        &DeliveryLogQuery {
            hook_id: 5_000_000_000,
            ..DeliveryLogQuery::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), 4);
    let single = rows
        .iter()
        .position(|r| r.id == by_insert)
        .expect("the inserted row");
    let single = rows.remove(single);
    let without_id = |mut e: DeliveryLogEntry| {
        e.id = 0;
        e
    };
    assert_eq!(without_id(single), full);
    let mut batch: Vec<_> = rows.into_iter().map(without_id).collect();
    batch.sort_by_key(|e| (e.attempted_at, e.attempt));
    assert_eq!(batch, [full.clone(), full, sparse]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_delivery_answers_with_the_receivers_reply_and_is_logged() {
    let world = World::new(1).await;
    let snapshot = world.build(34_000).await;
    let receiver = Receiver::start().await;
    receiver.script([Answer::Status(201)]);
    let hook = world.hook(snapshot.project.id, &receiver.url, None).await;
    let store: Arc<dyn CiStore> = world.store.clone();

    let tested = hook_ops::test(store.as_ref(), &deliverer_allowing_loopback(), hook.id)
        .await
        .expect("test");
    assert_eq!(tested.status, Some(201));
    assert!(!tested.synthetic);
    let sent = receiver.received();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].json()["build_id"], snapshot.build.id);
    assert_eq!(sent[0].header("x-gitlab-event"), Some("Job Hook"));
    assert!(tested.entry.id > 0);
    let row = delivery_log::get(world.store.pool(), hook.id, tested.entry.id)
        .await
        .unwrap()
        .expect("the test is logged");
    assert_eq!(row.trigger, LogTrigger::Test);
    assert_eq!(row.response_status, Some(201));
    assert_eq!(row.build_id, Some(snapshot.build.id));

    // A project without builds gets the sample build, moved into it.
    let empty = world.build(35_000).await;
    sqlx::query("DELETE FROM builds WHERE project_id = $1")
        .bind(empty.project.id)
        .execute(world.store.pool())
        .await
        .unwrap();
    let other = world.hook(empty.project.id, &receiver.url, None).await;
    let tested = hook_ops::test(store.as_ref(), &deliverer_allowing_loopback(), other.id)
        .await
        .unwrap();
    assert!(tested.synthetic);
    assert_eq!(tested.status, Some(200));
    assert_eq!(
        receiver.received()[1].json()["project_id"],
        empty.project.id
    );

    // The SSRF guard applies to tests too: loopback without the allowlist is refused, logged.
    let guarded = Deliverer::new(DeliverConfig::default()).unwrap();
    let refused = hook_ops::test(store.as_ref(), &guarded, hook.id)
        .await
        .unwrap();
    assert_eq!(refused.status, None);
    assert!(matches!(refused.outcome, AttemptOutcome::Final { .. }));
    assert!(refused.entry.internal_error.is_some());
    assert_eq!(receiver.count(), 2, "nothing sent past the guard");

    assert!(matches!(
        hook_ops::test(store.as_ref(), &guarded, 999_999_999).await,
        Err(HookOpError::NoHook(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resend_goes_through_the_retry_path_with_the_same_idempotency_key() {
    let world = World::new(1).await;
    let snapshot = world.build(36_000).await;
    let receiver = Receiver::start().await;
    let hook = world.hook(snapshot.project.id, &receiver.url, None).await;
    let config = world.config();
    let running = world.start(config.clone()).await;
    let event = inline_event(&snapshot, BuildStatus::Success);
    world.send(&event, SchemaVersion::V2).await;
    let pool = world.store.pool();
    let original = logged(pool, hook.id, 1).await.remove(0);

    let resent =
        hook_ops::resend_with_config(&config, world.store.as_ref(), Some(hook.id), original.id)
            .await
            .expect("resend");
    assert_eq!(resent.event_id, event.event_id);
    poll_until("the resent delivery", WAIT, || async {
        (receiver.count() >= 2).then_some(())
    })
    .await;
    let got = receiver.received();
    assert_eq!(got[1].body, got[0].body, "the same bytes");
    assert_eq!(
        got[1].header("idempotency-key"),
        got[0].header("idempotency-key")
    );
    assert_eq!(
        got[1].header("idempotency-key"),
        Some(resent.idempotency_key.as_str())
    );
    let rows = logged(pool, hook.id, 2).await;
    assert_eq!(rows[0].trigger, LogTrigger::Resend);
    assert_eq!(rows[0].attempt, 1);
    assert_eq!(rows[0].event_id, event.event_id);

    // An entry whose body was not kept cannot be resent.
    let mut big = row_at(Utc::now(), hook.id);
    big.request_body = None;
    big.request_body_size = 20_000;
    let big_id = delivery_log::insert(pool, &big).await.unwrap();
    let refused = hook_ops::resend_with_config(&config, world.store.as_ref(), None, big_id).await;
    assert!(
        matches!(refused, Err(HookOpError::BodyNotKept { size: 20_000, .. })),
        "{refused:?}"
    );
    assert!(matches!(
        hook_ops::resend_with_config(&config, world.store.as_ref(), Some(hook.id), i64::MAX).await,
        Err(HookOpError::NoEntry(_))
    ));
    running.stop().await;
}
