//! The `hookline-producer` binary end to end: the `feature` commands against a flags file and
//! PostgreSQL, refusals of invalid values, and a running `serve` that follows `feature set`
//! without a restart and exits cleanly on SIGTERM. The PostgreSQL and Kafka tests need
//! `HOOKLINE_TEST_DATABASE_URL` and `HOOKLINE_TEST_KAFKA` (set by `scripts/test`).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_hookline-producer");
const FLAG: &str = "execute_build_hooks_inline";

fn cli(env: &[(&str, String)], args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    for var in [
        "HOOKLINE_DATABASE_URL",
        "HOOKLINE_DATABASE_SCHEMA",
        "HOOKLINE_FLAGS_FILE",
        "HOOKLINE_ACTOR",
    ] {
        command.env_remove(var);
    }
    command
        .env("USER", "tester")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args);
    command.output().expect("run hookline-producer")
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}: {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn refused(output: Output) -> String {
    assert!(
        !output.status.success(),
        "should fail: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stderr).unwrap()
}

fn flags_file() -> (PathBuf, Vec<(&'static str, String)>) {
    let path = std::env::temp_dir().join(format!("hookline-cli-{}.json", uuid::Uuid::new_v4()));
    let env = vec![("HOOKLINE_FLAGS_FILE", path.display().to_string())];
    (path, env)
}

#[test]
fn feature_commands_roll_out_and_back_with_a_flags_file() {
    let (path, env) = flags_file();
    assert_eq!(
        ok(cli(&env, &["feature", "list"])),
        format!("{FLAG}: off (default)\n")
    );
    assert!(
        ok(cli(&env, &["feature", "set", FLAG, "25", "--actors"]))
            .contains("percentage_of_actors=25%")
    );
    ok(cli(
        &env,
        &["feature", "set", FLAG, "true", "--project", "3,7"],
    ));
    ok(cli(
        &env,
        &[
            "feature",
            "set",
            FLAG,
            "true",
            "--project",
            "7",
            "--opt-out",
        ],
    ));
    // 3 is listed; 7 is listed but opted out; 42's bucket (37494) is above 25%; 1000's (4892) below.
    assert_eq!(
        ok(cli(
            &env,
            &["feature", "enabled", FLAG, "--project", "3,7,42,1000"]
        )),
        "3 true\n7 false\n42 false\n1000 true\n"
    );
    let get = ok(cli(&env, &["feature", "get", FLAG]));
    assert!(
        get.contains("actors: Project:3,Project:7") && get.contains("opt_out_actors: Project:7"),
        "{get}"
    );
    ok(cli(
        &env,
        &["feature", "set", FLAG, "false", "--actor", "oncall"],
    ));
    assert_eq!(
        ok(cli(
            &env,
            &["feature", "enabled", FLAG, "--project", "3,1000"]
        )),
        "3 false\n1000 false\n"
    );
    let history = ok(cli(&env, &["feature", "history", FLAG]));
    let lines: Vec<&str> = history.lines().collect();
    assert!(
        lines[0].ends_with("tester percentage_of_actors - -> 25"),
        "{history}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with("oncall percentage_of_actors 25 -> -")),
        "{history}"
    );
    assert!(ok(cli(&env, &["feature", "delete", FLAG])).contains("deleted"));
    assert_eq!(
        ok(cli(&env, &["feature", "list"])),
        format!("{FLAG}: off (default)\n")
    );
    std::fs::remove_file(path).ok();
}

#[test]
fn invalid_values_are_refused_saying_what_is_accepted() {
    let (path, env) = flags_file();
    for (args, expected) in [
        (vec!["feature", "set", FLAG, "150", "--actors"], "0 to 100"),
        (
            vec!["feature", "set", FLAG, "abc"],
            "expected true, false, or a percentage",
        ),
        (
            vec!["feature", "set", FLAG, "true", "--actors"],
            "take a percentage",
        ),
        (vec!["feature", "set", FLAG, "30"], "--actors"),
        (vec!["feature", "get", "no_such_flag"], FLAG),
    ] {
        let stderr = refused(cli(&env, &args));
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    assert!(!path.exists(), "nothing was written");
    let stderr = refused(cli(&[], &["feature", "list"]));
    assert!(
        stderr.contains("HOOKLINE_DATABASE_URL") && stderr.contains("HOOKLINE_FLAGS_FILE"),
        "{stderr}"
    );
}

#[test]
fn help_documents_every_option_and_its_variable() {
    let help = ok(cli(&[], &["serve", "--help"]));
    for var in [
        "HOOKLINE_KAFKA_BROKERS",
        "HOOKLINE_TOPIC",
        "HOOKLINE_KAFKA_OPTIONS",
        "HOOKLINE_WRITER_SCHEMA",
        "HOOKLINE_DELIVERY_TIMEOUT",
        "HOOKLINE_DATABASE_URL",
        "HOOKLINE_FLAGS_FILE",
        "HOOKLINE_LISTEN",
        "HOOKLINE_BODY_LIMIT",
        "HOOKLINE_FLAGS_RELOAD_INTERVAL",
        "HOOKLINE_SHUTDOWN_TIMEOUT",
        "HOOKLINE_API_TOKEN_FILE",
        "HOOKLINE_NO_AUTH",
        "HOOKLINE_METRICS_PUBLIC",
        "HOOKLINE_MAX_EVENT_BYTES",
        "HOOKLINE_HEADER_TIMEOUT",
        "HOOKLINE_BODY_TIMEOUT",
        "HOOKLINE_IDLE_TIMEOUT",
        "HOOKLINE_MAX_CONNECTIONS",
    ] {
        assert!(help.contains(var), "serve --help lacks {var}");
    }
}

/// Checked before anything connects, so no services are needed.
#[test]
fn serve_refuses_to_run_without_authentication_unless_on_loopback() {
    let env = [(
        "HOOKLINE_DATABASE_URL",
        "postgres://nowhere.invalid/x".to_owned(),
    )];
    let stderr = refused(cli(&env, &["serve", "--listen", "127.0.0.1:0"]));
    assert!(stderr.contains("--api-token-file"), "{stderr}");
    let stderr = refused(cli(&env, &["serve", "--listen", "0.0.0.0:0", "--no-auth"]));
    assert!(
        stderr.contains("--no-auth is allowed only on a loopback address"),
        "{stderr}"
    );
    let stderr = refused(cli(
        &env,
        &[
            "serve",
            "--no-auth",
            "--kafka-option",
            "message.max.bytes=5000000",
        ],
    ));
    assert!(stderr.contains("--max-event-bytes"), "{stderr}");
    // A 202 means idempotent and acknowledged by every in-sync replica: no pass-through option
    // may weaken that, by flag or by variable.
    for option in [
        "enable.idempotence=false",
        "acks=1",
        "request.required.acks=0",
    ] {
        let key = option.split('=').next().unwrap();
        let expected = format!("--kafka-option {option} is refused: hookline sets {key} itself");
        let stderr = refused(cli(&env, &["serve", "--no-auth", "--kafka-option", option]));
        assert!(stderr.contains(&expected), "{stderr}");
        let mut with_var = env.to_vec();
        with_var.push(("HOOKLINE_KAFKA_OPTIONS", format!("linger.ms=1,{option}")));
        let stderr = refused(cli(&with_var, &["serve", "--no-auth"]));
        assert!(stderr.contains(&expected), "{stderr}");
    }
    let tokens = std::env::temp_dir().join(format!("hookline-cli-{}", uuid::Uuid::new_v4()));
    std::fs::write(&tokens, "short\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let stderr = refused(cli(
        &env,
        &["serve", "--api-token-file", tokens.to_str().unwrap()],
    ));
    assert!(
        stderr.contains("token 1") && !stderr.contains("short"),
        "the error names the token's line, never the token: {stderr}"
    );
    std::fs::remove_file(&tokens).unwrap();
}

fn database() -> Option<(String, String)> {
    let url = std::env::var("HOOKLINE_TEST_DATABASE_URL").ok()?;
    Some((
        url,
        format!("cli_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
    ))
}

#[test]
fn feature_commands_against_postgres() {
    let (url, schema) =
        database().expect("HOOKLINE_TEST_DATABASE_URL is not set: run scripts/test");
    let env = [
        ("HOOKLINE_DATABASE_URL", url),
        ("HOOKLINE_DATABASE_SCHEMA", schema),
    ];
    ok(cli(&env, &["feature", "set", FLAG, "100", "--actors"]));
    assert_eq!(
        ok(cli(&env, &["feature", "enabled", FLAG, "--project", "42"])),
        "42 true\n"
    );
    ok(cli(&env, &["feature", "set", FLAG, "0.5", "--random"]));
    ok(cli(&env, &["feature", "set", FLAG, "false"]));
    assert_eq!(
        ok(cli(&env, &["feature", "enabled", FLAG, "--project", "42"])),
        "42 false\n"
    );
    let history = ok(cli(&env, &["feature", "history", FLAG]));
    assert_eq!(history.lines().count(), 4, "{history}");
    assert!(history.lines().all(|l| l.contains(" tester ")), "{history}");
}

/// `feature set 100 --actors` then `feature set false`, from the CLI, switch the timing of a
/// running `serve`'s next events within its reload interval; SIGTERM stops it cleanly.
#[tokio::test]
async fn a_running_serve_follows_feature_set_and_stops_on_sigterm() {
    let (url, schema) =
        database().expect("HOOKLINE_TEST_DATABASE_URL is not set: run scripts/test");
    let brokers = std::env::var("HOOKLINE_TEST_KAFKA")
        .expect("HOOKLINE_TEST_KAFKA is not set: run scripts/test");
    let store =
        hookline_cistate::PgStore::connect(&hookline_cistate::PgOptions::new(&url).schema(&schema))
            .await
            .unwrap();
    let snapshot = hookline_cistate::fixtures::sample(0);
    hookline_cistate::fixtures::write_snapshot(&store, &snapshot)
        .await
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = [
        ("HOOKLINE_DATABASE_URL", url.clone()),
        ("HOOKLINE_DATABASE_SCHEMA", schema.clone()),
    ];
    let token = "cli-token-0123456789abcdef";
    let token_file = std::env::temp_dir().join(format!("hookline-cli-{schema}"));
    std::fs::write(&token_file, format!("# the test's token\n{token}\n")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut serve = Command::new(BIN);
    serve
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("HOOKLINE_FLAGS_FILE")
        .args(["serve", "--api-token-file", token_file.to_str().unwrap()])
        .args([
            "--brokers",
            &brokers,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--topic", &format!("cli_{}", uuid::Uuid::new_v4().simple())])
        .args([
            "--create-topic-partitions",
            "1",
            "--flags-reload-interval",
            "200ms",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = serve.spawn().expect("start serve");

    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let body = serde_json::json!({"build_id": snapshot.build.id, "status": "running"}).to_string();
    let next_timing = || async {
        let response = client
            .post(format!("{base}/v1/transitions"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .ok()?;
        let json: serde_json::Value = response.json().await.ok()?;
        json["timing"].as_str().map(str::to_owned)
    };
    let wait_for = |want: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if next_timing().await.as_deref() == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {want} events"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    wait_for("deferred").await;
    ok(cli(&env, &["feature", "set", FLAG, "100", "--actors"]));
    wait_for("inline").await;
    ok(cli(&env, &["feature", "set", FLAG, "false"]));
    wait_for("deferred").await;

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not stop after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "serve exited with {status:?}");
    std::fs::remove_file(&token_file).unwrap();
}

/// A `serve` of the binary on a free port with `args`, once `/healthz` answers.
async fn serve_with(args: &[&str]) -> (std::process::Child, String) {
    let (url, schema) =
        database().expect("HOOKLINE_TEST_DATABASE_URL is not set: run scripts/test");
    let brokers = std::env::var("HOOKLINE_TEST_KAFKA")
        .expect("HOOKLINE_TEST_KAFKA is not set: run scripts/test");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(BIN)
        .env("HOOKLINE_DATABASE_URL", url)
        .env("HOOKLINE_DATABASE_SCHEMA", schema)
        .env_remove("HOOKLINE_FLAGS_FILE")
        .arg("serve")
        .args(args)
        .args([
            "--brokers",
            &brokers,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--topic", &format!("cli_{}", uuid::Uuid::new_v4().simple())])
        .args(["--create-topic-partitions", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start serve");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while reqwest::get(format!("{base}/healthz")).await.is_err() {
        assert!(Instant::now() < deadline, "serve did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (child, base)
}

async fn metrics_status(base: &str, token: &str) -> u16 {
    reqwest::Client::new()
        .get(format!("{base}/metrics"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A rotated token file takes effect without a restart (on change, and on SIGHUP); a file
/// others may read is refused at start.
#[tokio::test]
async fn the_token_file_is_private_and_re_read_when_it_changes() {
    use std::os::unix::fs::PermissionsExt;
    let file = std::env::temp_dir().join(format!("hookline-tokens-{}", uuid::Uuid::new_v4()));
    std::fs::write(&file, "first-token-0123456789\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (url, schema) =
        database().expect("HOOKLINE_TEST_DATABASE_URL is not set: run scripts/test");
    let env = [
        ("HOOKLINE_DATABASE_URL", url),
        ("HOOKLINE_DATABASE_SCHEMA", schema),
    ];
    // Bounded: a serve that took the file would go on to wait for its broker.
    let mut refusing = Command::new(BIN)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["serve", "--brokers", "127.0.0.1:9"])
        .args(["--api-token-file", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while refusing.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            refusing.kill().unwrap();
            panic!("serve took a token file others may read");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let stderr = refused(refusing.wait_with_output().unwrap());
    assert!(stderr.contains("chmod 600"), "{stderr}");
    assert!(!stderr.contains("first-token"), "{stderr}");

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (mut child, base) = serve_with(&["--api-token-file", file.to_str().unwrap()]).await;
    assert_eq!(metrics_status(&base, "first-token-0123456789").await, 200);
    std::fs::write(&file, "second-token-0123456789\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while metrics_status(&base, "second-token-0123456789").await != 200 {
        assert!(
            Instant::now() < deadline,
            "the changed file was not re-read"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metrics_status(&base, "first-token-0123456789").await, 401);
    // SIGHUP re-reads at once (the file's size and time may not have moved).
    std::fs::write(&file, "third-token--0123456789\n").unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while metrics_status(&base, "third-token--0123456789").await != 200 {
        assert!(Instant::now() < deadline, "SIGHUP did not re-read the file");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP stopped serve");
    child.kill().unwrap();
    let _ = child.wait();
    std::fs::remove_file(&file).unwrap();
}

/// Without authentication, a request that names another host (a page whose name was re-pointed
/// at 127.0.0.1: DNS rebinding) is refused; loopback names pass.
#[tokio::test]
async fn without_auth_only_loopback_host_names_are_served() {
    let (mut child, base) = serve_with(&["--no-auth"]).await;
    let port = base.rsplit(':').next().unwrap().to_owned();
    let client = reqwest::Client::new();
    let with_host = |host: String| {
        client
            .post(format!("{base}/v1/transitions"))
            .header("host", host)
            .header("content-type", "application/json")
            .body("{}")
            .send()
    };
    for host in [format!("attacker.example:{port}"), "rebind.example".into()] {
        let answer = with_host(host.clone()).await.unwrap();
        assert_eq!(answer.status().as_u16(), 421, "{host}");
        let body = answer.text().await.unwrap();
        assert!(body.contains("--no-auth"), "{body}");
    }
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let answer = with_host(host.clone()).await.unwrap();
        assert_eq!(
            answer.status().as_u16(),
            422,
            "{host}: reached the API (and its checks)"
        );
    }
    child.kill().unwrap();
    let _ = child.wait();
}
