//! `hookline-consumer hooks add|list` against the real PostgreSQL: what `add` refuses, and what
//! `list` never prints.

use std::process::Output;

use hookline_cistate::fixtures::{sample, write_snapshot};
use hookline_cistate::{PgOptions, PgStore};
use hookline_tests::{database_url, unique_name};

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
