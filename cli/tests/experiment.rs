//! `hookline experiment` on a tiny grid: the built binary writes a well-formed SVG chart with a
//! line per inline percentage, and figures that say what the rollout is about (inline removes
//! stale deliveries, deferred has no render cost).

use std::process::Command;

#[test]
fn a_tiny_grid_draws_a_valid_svg_chart_and_writes_every_point() {
    let out_dir = std::env::temp_dir().join(format!("hookline-experiment-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = Command::new(env!("CARGO_BIN_EXE_hookline"))
        .args(["experiment", "--out"])
        .arg(&out_dir)
        .args(["--lags-ms", "0,1200", "--inline-percents", "0,100"])
        .args(["--projects", "4", "--builds", "40", "--seed", "3"])
        .output()
        .expect("run the hookline binary");
    assert!(
        out.status.success(),
        "experiment failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let svg = std::fs::read_to_string(out_dir.join("rollout.svg")).expect("rollout.svg");
    let doc = roxmltree::Document::parse(&svg).expect("the chart is well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    let texts: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .collect();
    for label in ["inline 0 %", "inline 100 %", "1.2 s", "0 ms"] {
        assert!(
            texts.iter().any(|t| t.trim() == label),
            "no {label:?} in the chart's text: {texts:?}"
        );
    }
    // Two lines in the stale panel and one in the cost panel.
    let lines = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .count();
    assert!(lines >= 3, "{lines} polylines in the chart");

    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("rollout.json")).expect("rollout.json"))
            .expect("rollout.json is JSON");
    let points = figures["points"].as_array().expect("points");
    assert_eq!(points.len(), 4, "{figures}");
    for p in points {
        assert_eq!(p["missing"], 0, "{p}");
        assert!(p["deliveries"].as_u64().unwrap() > 0, "{p}");
        let pct = p["inline_percent"].as_f64().unwrap();
        let render = p["render_us_per_event"].as_f64().unwrap();
        if pct == 100.0 {
            assert_eq!(p["stale"], 0, "every payload inline, none stale: {p}");
            assert!(render > 0.0, "inline renders cost something: {p}");
        } else {
            assert_eq!(
                render, 0.0,
                "deferred rendering costs the producer nothing: {p}"
            );
        }
    }
    let deferred_lagging = points
        .iter()
        .find(|p| p["inline_percent"] == 0.0 && p["consumer_lag_ms"] == 1200)
        .expect("the lagging deferred point");
    assert!(
        deferred_lagging["stale"].as_u64().unwrap() > 0,
        "a consumer 1.2 s behind renders some deferred payloads after the build moved on: {deferred_lagging}"
    );
    let _ = std::fs::remove_dir_all(&out_dir);
}
