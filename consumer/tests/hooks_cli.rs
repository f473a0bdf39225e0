//! The operator's commands, run as the `hookline-consumer` binary against the real PostgreSQL and
//! Kafka: what `hooks add` refuses and `hooks list` never prints; `hooks remove` dead-lettering
//! pending retries; `hooks enable` after a permanent disable, then `dlq replay`; `dlq replay` of
//! undecodable records to their source topic and its `--since` filter; and the Kafka options
//! every command refuses; `hooks test` and `hooks log` (the delivery log, redacted); a
//! successful `hooks test` re-enabling a disabled hook.

use std::process::Output;
use std::time::Duration;

use hookline_cistate::fixtures::{sample, write_snapshot};
use hookline_cistate::{CiStore, PgOptions, PgStore};
use hookline_consumer::config::ConsumerConfig;
use hookline_consumer::dead_letter::{self, DeadLetterKind};
use hookline_consumer::schedule::RetrySchedule;
use hookline_schemas::{BuildStatus, SchemaVersion};
use hookline_tests::world::{World, inline_event};
use hookline_tests::{Answer, Receiver, database_url, poll_until, unique_name};

const WAIT: Duration = Duration::from_secs(30);

fn hooks(schema: &str, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_hookline-consumer"))
        .env_clear()
        .env("HOOKLINE_DATABASE_URL", database_url())
        .env("HOOKLINE_DATABASE_SCHEMA", schema)
        .arg("hooks")
        .args(args)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn refused(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "accepted: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn add_refuses_unknown_projects_and_broken_tokens_and_list_masks_passwords() {
    let schema = unique_name("hooks_cli");
    let store = PgStore::connect(&PgOptions::new(database_url()).schema(schema.clone()))
        .await
        .unwrap();
    let world = sample(0);
    write_snapshot(&store, &world).await.unwrap();
    let project = world.project.id.to_string();

    // A project the store does not have: refused, unless --force.
    let error = refused(&hooks(
        &schema,
        &[
            "add",
            "--project",
            "987654",
            "--url",
            "https://hooks.example.com/ci",
        ],
    ));
    assert!(
        error.contains("project 987654 is not in the CI state store") && error.contains("--force"),
        "{error}"
    );
    stdout(&hooks(
        &schema,
        &[
            "add",
            "--project",
            "987654",
            "--url",
            "https://hooks.example.com/ci",
            "--force",
        ],
    ));

    // A token with a line break would break every delivery at send time: refused at add.
    for token in ["s3cret\r\nX-Injected: 1", "s3cret\n", "s\rcret"] {
        let error = refused(&hooks(
            &schema,
            &[
                "add",
                "--project",
                &project,
                "--url",
                "https://hooks.example.com/ci",
                "--token",
                token,
            ],
        ));
        assert!(error.contains("must not contain CR or LF"), "{error}");
    }

    stdout(&hooks(
        &schema,
        &[
            "add",
            "--project",
            &project,
            "--url",
            "http://hookuser:secret-password@hooks.example.com:8080/ci",
            "--token",
            "tok3n-value",
        ],
    ));
    let listed = stdout(&hooks(&schema, &["list", "--project", &project]));
    assert!(
        listed.contains("http://hookuser:*****@hooks.example.com:8080/ci"),
        "{listed}"
    );
    assert!(!listed.contains("secret-password"), "{listed}");
    assert!(
        !listed.contains("tok3n-value") && listed.contains("token=[set]"),
        "{listed}"
    );
    assert_eq!(
        listed.lines().count(),
        1,
        "the refused hooks were not stored: {listed}"
    );
}

/// Runs `hookline-consumer ARGS` and waits at most 30 s for it to end on its own (a command that
/// accepted a hostile option would go on running: killed, and the test fails).
fn refused_within_bound(args: &[&str]) -> String {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hookline-consumer"))
        .env_clear()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("`{}` accepted the option and kept running", args.join(" "));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    refused(&child.wait_with_output().unwrap())
}

/// At-least-once rests on offsets stored only for finished records, committed by librdkafka, and
/// on idempotent hand-offs acked by every replica: no pass-through option may change that, for
/// `serve` or for the `dlq` commands (which read and produce with the same settings).
#[test]
fn kafka_options_that_at_least_once_rests_on_are_refused() {
    let base = ["--brokers", "127.0.0.1:9", "--group-id", "hostile"];
    for option in [
        "enable.auto.commit=false",
        "enable.auto.offset.store=true",
        "enable.idempotence=false",
        "acks=1",
        "request.required.acks=0",
    ] {
        let key = option.split('=').next().unwrap();
        let mut serve = vec!["serve", "--database-url", "memory"];
        serve.extend(base);
        serve.extend(["--kafka-option", option]);
        let mut list = vec!["dlq", "list"];
        list.extend(base);
        list.extend(["--kafka-option", option]);
        let mut replay = vec!["dlq", "replay"];
        replay.extend(base);
        replay.extend(["--kafka-option", option]);
        for args in [serve, list, replay] {
            let error = refused_within_bound(&args);
            assert!(
                error.contains(&format!("--kafka-option {option} is refused"))
                    && error.contains(&format!("hookline sets {key} itself")),
                "{}: {error}",
                args.join(" ")
            );
        }
    }
}

/// `hookline-consumer dlq ARGS` on `config`'s broker, group and topics.
fn dlq(config: &ConsumerConfig, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_hookline-consumer"))
        .env_clear()
        .env("HOOKLINE_KAFKA_BROKERS", &config.brokers)
        .env("HOOKLINE_GROUP_ID", &config.group_id)
        .env("HOOKLINE_TOPIC", &config.topic)
        .arg("dlq")
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_a_hook_dead_letters_its_pending_retries_as_hook_removed() {
    let world = World::new(1).await;
    let schema = world.store_schema().await;
    let snapshot = world.build(61_000).await;
    let receiver = Receiver::start().await;
    receiver.answer_always(Answer::Status(503));
    let hook = world.hook(snapshot.project.id, &receiver.url, None).await;
    let mut config = world.config();
    // Long enough for the removal to land while the retry waits.
    config.retry_schedule = RetrySchedule {
        jitter: 0.0,
        ..RetrySchedule::with_delays(vec![Duration::from_secs(3)])
    };
    let running = world.start(config.clone()).await;
    world
        .send(
            &inline_event(&snapshot, BuildStatus::Running),
            SchemaVersion::V2,
        )
        .await;
    poll_until("the first attempt", WAIT, || async {
        (receiver.count() == 1).then_some(())
    })
    .await;
    assert_eq!(
        stdout(&hooks(&schema, &["remove", &hook.id.to_string()])).trim(),
        format!("removed hook {}", hook.id)
    );
    poll_until("the hook_removed dead letter", WAIT, || async {
        (running.metrics.dead_letters(Some("hook_removed")) == 1).then_some(())
    })
    .await;
    assert_eq!(receiver.count(), 1, "a removed hook is never called again");
    let listed = stdout(&dlq(&config, &["list"]));
    let line = listed
        .lines()
        .find(|l| l.contains("\thook_removed\t"))
        .unwrap_or_else(|| panic!("no hook_removed line in: {listed}"));
    assert!(
        line.contains(&format!("delivery hook={} ", hook.id)),
        "{line}"
    );
    assert!(
        stdout(&hooks(&schema, &["list"])).trim().is_empty(),
        "the hook is gone"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enable_after_a_permanent_disable_then_replay_delivers() {
    let world = World::new(1).await;
    let schema = world.store_schema().await;
    let snapshot = world.build(62_000).await;
    let receiver = Receiver::start().await;
    receiver.script([Answer::Status(410)]);
    let hook = world.hook(snapshot.project.id, &receiver.url, None).await;
    let config = world.config();
    let running = world.start(config.clone()).await;

    let gone = inline_event(&snapshot, BuildStatus::Running);
    world.send(&gone, SchemaVersion::V2).await;
    poll_until("the gone dead letter", WAIT, || async {
        (running.metrics.dead_letters(Some("gone")) == 1).then_some(())
    })
    .await;
    let later = inline_event(&snapshot, BuildStatus::Success);
    world.send(&later, SchemaVersion::V2).await;
    poll_until("the disabled hook's dead letter", WAIT, || async {
        (running.metrics.dead_letters(Some("hook_disabled")) == 1).then_some(())
    })
    .await;
    assert_eq!(receiver.count(), 1, "a disabled hook is not called");
    let id = hook.id.to_string();
    let listed = stdout(&hooks(&schema, &["list"]));
    assert!(listed.contains("\tdisabled\t"), "{listed}");

    assert_eq!(
        stdout(&hooks(&schema, &["enable", &id])).trim(),
        format!("enabled hook {id}")
    );
    let listed = stdout(&hooks(&schema, &["list"]));
    assert!(
        listed.contains("\tactive\tfailures=0\t"),
        "enable clears the failures and the disable: {listed}"
    );
    let replayed = stdout(&dlq(&config, &["replay", "--hook", &id]));
    assert!(
        replayed.starts_with("replayed 2 deliveries, 0 records"),
        "{replayed}"
    );
    for event in [&gone, &later] {
        let event_id = event.event_id.to_string();
        let delivered = poll_until("the replayed delivery", WAIT, || async {
            receiver
                .received()
                .into_iter()
                .find(|r| r.status == 200 && r.header("x-gitlab-event-uuid") == Some(&event_id))
        })
        .await;
        assert_eq!(delivered.body.as_ref(), event.payload.as_deref().unwrap());
    }
    let keys: Vec<_> = receiver
        .received()
        .iter()
        .filter(|r| r.header("x-gitlab-event-uuid") == Some(&gone.event_id.to_string()))
        .map(|r| r.header("idempotency-key").unwrap().to_owned())
        .collect();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1], "the replay keeps the Idempotency-Key");

    // The other road to a permanent disable: forty failures in a row (each recorded while the
    // hook may be called, two days apart, past any back-off).
    for day in 1..=40 {
        let at = chrono::Utc::now() + chrono::Duration::days(2 * day);
        world.store.record_hook_failure(hook.id, at).await.unwrap();
    }
    let listed = stdout(&hooks(&schema, &["list"]));
    assert!(listed.contains("\tdisabled\tfailures=40\t"), "{listed}");
    stdout(&hooks(&schema, &["enable", &id]));
    let listed = stdout(&hooks(&schema, &["list"]));
    assert!(listed.contains("\tactive\tfailures=0\t"), "{listed}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_sends_undecodable_records_back_to_their_topic_and_since_filters() {
    let world = World::new(1).await;
    let config = world.config();
    let running = world.start(config.clone()).await;

    world.send_raw("poison-1", b"\x07 first poison").await;
    poll_until("the first dead letter", WAIT, || async {
        (running.metrics.dead_letters(Some("bad_magic")) == 1).then_some(())
    })
    .await;
    // A dead letter's time is its record's (milliseconds): step past the first one's.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let since = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    world.send_raw("poison-2", b"\x07 second poison").await;
    poll_until("the second dead letter", WAIT, || async {
        (running.metrics.dead_letters(Some("bad_magic")) == 2).then_some(())
    })
    .await;

    let replayed = stdout(&dlq(
        &config,
        &[
            "replay",
            "--since",
            &since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ],
    ));
    assert!(
        replayed.starts_with("replayed 0 deliveries, 1 records")
            && replayed.trim_end().ends_with("1 left out by the filter"),
        "{replayed}"
    );
    // Back on the main topic, the record is read (and refused) again.
    poll_until("the replayed record dead-lettered again", WAIT, || async {
        (running.metrics.dead_letters(Some("bad_magic")) == 3).then_some(())
    })
    .await;
    let letters = dead_letter::list(&config).await.unwrap();
    let values: Vec<&[u8]> = letters.iter().map(|l| l.value.as_slice()).collect();
    assert_eq!(
        values,
        [
            &b"\x07 first poison"[..],
            b"\x07 second poison",
            b"\x07 second poison"
        ]
    );
    for letter in &letters {
        assert!(
            matches!(&letter.kind, DeadLetterKind::Record { source_topic } if *source_topic == world.topic),
            "{letter:?}"
        );
    }
    running.stop().await;
}

// Multi-threaded: the receiver answers while the test blocks on the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sends_now_and_log_shows_it_without_the_token() {
    let schema = unique_name("hooks_cli");
    let store = PgStore::connect(&PgOptions::new(database_url()).schema(schema.clone()))
        .await
        .unwrap();
    let world = sample(0);
    write_snapshot(&store, &world).await.unwrap();
    let receiver = Receiver::start().await;
    let id = stdout(&hooks(
        &schema,
        &[
            "add",
            "--project",
            &world.project.id.to_string(),
            "--url",
            &receiver.url,
            // The SSRF guard checks the URL on save too: the receiver is on loopback.
            "--allow-cidr",
            "127.0.0.0/8",
            "--token",
            "cli-s3cret",
        ],
    ))
    .split('\t')
    .next()
    .unwrap()
    .to_owned();

    let tested = stdout(&hooks(
        &schema,
        &["test", &id, "--allow-cidr", "127.0.0.0/8"],
    ));
    assert!(tested.starts_with("200\t"), "{tested}");
    assert_eq!(receiver.count(), 1);
    assert_eq!(receiver.received()[0].json()["build_id"], world.build.id);
    // Without the allowlist the SSRF guard refuses loopback: a failed test, logged too.
    let error = refused(&hooks(&schema, &["test", &id]));
    assert!(error.contains("the test delivery failed"), "{error}");
    assert_eq!(receiver.count(), 1);

    let log = stdout(&hooks(&schema, &["log", &id]));
    let lines: Vec<_> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert!(
        lines[0].contains("\ttest\t") && lines[0].contains("error: "),
        "{log}"
    );
    assert!(
        lines[1].contains("\ttest\t") && lines[1].ends_with("\t200"),
        "{log}"
    );
    let failed = stdout(&hooks(&schema, &["log", &id, "--failed", "--json"]));
    assert_eq!(failed.lines().count(), 1, "{failed}");
    let entry: serde_json::Value = serde_json::from_str(failed.trim()).unwrap();
    assert_eq!(entry["trigger"], "test");
    assert_eq!(entry["response_status"], serde_json::Value::Null);
    let all = stdout(&hooks(&schema, &["log", &id, "--json"]));
    assert!(
        all.contains("[REDACTED]") && !all.contains("cli-s3cret"),
        "{all}"
    );

    let error = refused(&hooks(&schema, &["log", "987654321"]));
    assert!(error.contains("no hook 987654321"), "{error}");
    let error = refused(&hooks(
        &schema,
        &[
            "resend",
            "987654321",
            "--brokers",
            &hookline_tests::kafka_brokers(),
        ],
    ));
    assert!(error.contains("no delivery log entry 987654321"), "{error}");
}

/// `hooks test` that succeeds re-enables a disabled hook, as GitLab's forced test delivery does,
/// whether it was backing off or disabled for good; one that fails leaves it disabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_test_re_enables_a_disabled_hook_and_a_failed_one_does_not() {
    use hookline_cistate::HookState;
    let schema = unique_name("hooks_cli");
    let store = PgStore::connect(&PgOptions::new(database_url()).schema(schema.clone()))
        .await
        .unwrap();
    let world = sample(0);
    write_snapshot(&store, &world).await.unwrap();
    let receiver = Receiver::start().await;
    let add = |store_url: &str| {
        stdout(&hooks(
            &schema,
            &[
                "add",
                "--project",
                &world.project.id.to_string(),
                "--url",
                store_url,
                // The SSRF guard checks the URL on save too: the receiver is on loopback.
                "--allow-cidr",
                "127.0.0.0/8",
            ],
        ))
        .split('\t')
        .next()
        .unwrap()
        .parse::<i64>()
        .unwrap()
    };
    let test = |id: i64| {
        hooks(
            &schema,
            &["test", &id.to_string(), "--allow-cidr", "127.0.0.0/8"],
        )
    };
    let state = |hook: &hookline_cistate::Hook| hook.state(chrono::Utc::now());

    // Disabled for good (a 410, or its 40th failure).
    let permanent = add(&receiver.url);
    assert!(store.disable_hook(permanent).await.unwrap());
    receiver.script([Answer::Status(500)]);
    let error = refused(&test(permanent));
    assert!(error.contains("the test delivery failed"), "{error}");
    let hook = store.hook(permanent).await.unwrap().unwrap();
    assert_eq!(state(&hook), HookState::PermanentlyDisabled);
    let tested = stdout(&test(permanent));
    assert!(tested.starts_with("200\t"), "{tested}");
    let hook = store.hook(permanent).await.unwrap().unwrap();
    assert_eq!(state(&hook), HookState::Executable);
    assert_eq!((hook.recent_failures, hook.disabled_until), (0, None));

    // Backing off after its 4th failure in a row.
    let backing_off = add(&format!("{}?second", receiver.url));
    for _ in 0..4 {
        store
            .record_hook_failure(backing_off, chrono::Utc::now())
            .await
            .unwrap();
    }
    let hook = store.hook(backing_off).await.unwrap().unwrap();
    assert!(
        matches!(state(&hook), HookState::TemporarilyDisabled(_)),
        "{hook:?}"
    );
    let tested = stdout(&test(backing_off));
    assert!(tested.starts_with("200\t"), "{tested}");
    let hook = store.hook(backing_off).await.unwrap().unwrap();
    assert_eq!(state(&hook), HookState::Executable);
    assert_eq!((hook.recent_failures, hook.disabled_until), (0, None));
    // The failed test and the two that succeeded.
    assert_eq!(
        receiver
            .received()
            .iter()
            .map(|r| r.status.as_u16())
            .collect::<Vec<_>>(),
        [500, 200, 200]
    );
}
