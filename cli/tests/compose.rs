//! The compose stack cannot be started here (no Docker engine), so its file and the Dockerfile
//! are checked statically by scripts/check-compose, run as part of the test suite. The schema
//! check is required: without a Compose implementation (`.ci/run` installs Debian's
//! `docker-compose`) these tests fail instead of passing on the other checks alone.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn check_compose(file: &std::path::Path) -> std::process::Output {
    Command::new(repo().join("scripts/check-compose"))
        .arg("--no-install")
        .arg("--require-schema")
        .arg("--file")
        .arg(file)
        .output()
        .expect("run scripts/check-compose (needs python3)")
}

#[test]
fn the_compose_file_and_the_dockerfile_pass_the_static_check() {
    let out = check_compose(&repo().join("docker-compose.yml"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("schema checked with"), "{stdout}");
}

/// A file Compose itself refuses (an unknown key) fails the schema check, not only ours.
#[test]
fn a_file_compose_refuses_fails_the_schema_check() {
    let original = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let broken = original.replacen("services:", "services:\n  receiver-typo:\n    imagee: x", 1);
    assert_ne!(broken, original);
    let dir = std::env::temp_dir().join(format!("hookline-compose-schema-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("docker-compose.yml");
    std::fs::write(&file, broken).unwrap();
    let out = check_compose(&file);
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("config:"), "{stdout}");
}

#[test]
fn a_misspelt_variable_and_a_wrong_port_are_caught() {
    let original = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let broken = original
        .replace("HOOKLINE_GROUP_ID", "HOOKLINE_GROUPID")
        .replace("http://producer:8080", "http://producer:8081");
    assert_ne!(broken, original);
    let dir = std::env::temp_dir().join(format!("hookline-compose-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("docker-compose.yml");
    std::fs::write(&file, broken).unwrap();
    let out = check_compose(&file);
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("HOOKLINE_GROUPID"), "{stdout}");
    assert!(stdout.contains("producer:8081"), "{stdout}");
}

#[test]
fn a_producer_or_simulator_without_api_tokens_is_caught() {
    let original = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let broken = original.replace("HOOKLINE_API_TOKEN_FILE", "HOOKLINE_NOT_A_TOKEN_FILE");
    assert_ne!(broken, original);
    let dir = std::env::temp_dir().join(format!("hookline-compose-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("docker-compose.yml");
    std::fs::write(&file, broken).unwrap();
    let out = check_compose(&file);
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("producer: no HOOKLINE_API_TOKEN_FILE"),
        "{stdout}"
    );
    assert!(
        stdout.contains("simulator: posts to the producer without an API token"),
        "{stdout}"
    );
}

/// The demo publishes its database (a fixed password), broker (no authentication) and producer
/// (a committed token): on loopback only, and the check refuses a port on every interface.
#[test]
fn a_port_published_on_every_interface_is_caught() {
    let original = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    for published in ["29092:29092", "55432:5432", "8080:8080"] {
        assert!(
            original.contains(&format!("\"127.0.0.1:{published}\"")),
            "{published} on loopback"
        );
    }
    let broken = original.replace("\"127.0.0.1:55432:5432\"", "\"55432:5432\"");
    let dir = std::env::temp_dir().join(format!("hookline-compose-ports-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("docker-compose.yml");
    std::fs::write(&file, broken).unwrap();
    let out = check_compose(&file);
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("postgres: publishes host port 55432 on every interface"),
        "{stdout}"
    );
}
