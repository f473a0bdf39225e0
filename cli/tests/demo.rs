//! `hookline demo` as a newcomer runs it: the built binary, no services.

use std::process::{Command, Output};

fn hookline(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hookline"))
        .args(args)
        .output()
        .expect("run the hookline binary")
}

fn count(v: &serde_json::Value, path: &[&str]) -> u64 {
    let mut at = v;
    for key in path {
        at = &at[*key];
    }
    at.as_u64()
        .unwrap_or_else(|| panic!("{} is not a count in {v}", path.join(".")))
}

#[test]
fn inline_payloads_are_never_stale_deferred_ones_are_when_the_consumer_trails_and_nothing_is_missing()
 {
    let out = hookline(&[
        "demo",
        "--projects",
        "8",
        "--builds",
        "80",
        "--inline-percent",
        "50",
        "--consumer-lag-ms",
        "1000",
        "--seed",
        "7",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });

    // Both timings are in play: the 50 % rollout picked some projects, not all.
    assert!(
        count(&report, &["by_timing", "inline", "events"]) > 0,
        "{report}"
    );
    assert!(
        count(&report, &["by_timing", "deferred", "events"]) > 0,
        "{report}"
    );

    assert_eq!(count(&report, &["missing"]), 0, "{report}");
    assert_eq!(
        count(&report, &["by_timing", "inline", "stale"]),
        0,
        "{report}"
    );
    assert!(
        count(&report, &["by_timing", "deferred", "stale"]) > 0,
        "{report}"
    );
    let events = count(&report, &["events"]);
    assert_eq!(
        events,
        count(&report, &["by_timing", "inline", "events"])
            + count(&report, &["by_timing", "deferred", "events"])
    );
    // One hook per project: every event is delivered at least once.
    assert!(count(&report, &["deliveries"]) >= events, "{report}");
    assert_eq!(
        count(&report, &["deliveries"]),
        events + count(&report, &["duplicates"]),
        "{report}"
    );
    assert_eq!(count(&report, &["bad_signatures"]), 0, "{report}");
    assert_eq!(count(&report, &["unexpected"]), 0, "{report}");
    // Progress went to stderr, not into the JSON.
    assert!(stderr.contains("simulation done"), "{stderr}");
}

#[test]
fn a_percentage_over_100_is_refused_with_a_clear_message() {
    let out = hookline(&["demo", "--inline-percent", "150"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--inline-percent"), "{stderr}");
    assert!(stderr.contains("0 to 100"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn zero_projects_is_refused() {
    let out = hookline(&["demo", "--projects", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--projects"));
}
