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
