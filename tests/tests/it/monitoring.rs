//! The monitoring contract, checked by a real Prometheus: Debian's `/usr/bin/prometheus` scrapes
//! `hookline-producer serve`, `hookline-producer relay` and `hookline-consumer serve` (the built
//! binaries, on the shared Kafka and PostgreSQL) every second after a short run (transitions
//! POSTed and written to the outbox, delivered to a loopback receiver), with
//! `deploy/prometheus/alerts.yml` loaded. Through its HTTP API the test checks that
//!
//! - every target is up;
//! - every metric of the tables in `docs/operating.md` ("Metrics and what to alert on") is
//!   stored, with exactly the label names the table gives, and every label value it lists (the
//!   services present known label values at 0 from the start, so none of them is an "event-only"
//!   series; the lag appears per assigned partition, flag results with the first evaluation,
//!   which the run makes);
//! - every rule of `alerts.yml` loads and evaluates with health `ok`;
//! - every metric `deploy/grafana/hookline.json` queries is one Prometheus stored, and every panel
//!   expression runs without error.
//!
//! It skips (with a line on stderr) where `/usr/bin/prometheus` is missing, but fails under
//! `CI=true`: `scripts/test` installs Debian's `prometheus` package. It needs the two service
//! binaries (`target/<profile>/`, or `HOOKLINE_TEST_BIN_DIR`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hookline_cistate::fixtures::{sample, write_snapshot};
use hookline_cistate::{CiStore, NewHook};
use hookline_tests::{Receiver, database_url, free_port, kafka_brokers, pg_store, poll_until};
use hookline_tests::{service_bin, unique_name};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const PROMETHEUS: &str = "/usr/bin/prometheus";
/// The page whose tables document every metric ("Metrics and what to alert on").
const METRICS_PAGE: &str = "docs/operating.md";
/// Transitions per build, POSTed in order.
const STATUSES: [&str; 4] = ["created", "pending", "running", "success"];
/// What the documented tables say about one metric.
#[derive(Debug, Clone, PartialEq)]
struct Documented {
    name: String,
    kind: String,
    /// Label name -> the values the table lists for it (empty: any).
    labels: BTreeMap<String, Vec<String>>,
}

/// The repository's root (this crate is one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The metrics of [`METRICS_PAGE`]'s tables in "Metrics and what to alert on": rows whose first
/// cell is a backticked `hookline_*` name; the second cell is the type, then label names in
/// backticks, each optionally followed by `=` and its values separated by `\|`.
fn documented_metrics(page: &str) -> Vec<Documented> {
    let page = format!("\n{page}");
    let section = page
        .split("\n## ")
        .find(|s| s.starts_with("Metrics and what to alert on"))
        .expect("docs/operating.md's section \"Metrics and what to alert on\"");
    let mut metrics = Vec::new();
    for line in section.lines() {
        let Some(rest) = line.strip_prefix("| `hookline_") else {
            continue;
        };
        let (name, rest) = rest.split_once('`').expect("a closing backtick");
        let cell = rest
            .trim_start_matches([' ', '|'])
            .split(" | ")
            .next()
            .unwrap_or("")
            .trim();
        let kind = cell.split_whitespace().next().unwrap_or("").to_owned();
        let mut labels: BTreeMap<String, Vec<String>> = BTreeMap::new();
        // Tokens in order; a token right after `=` or `\|` is a value of the last label.
        let mut last: Option<String> = None;
        let mut after = String::new();
        let mut parts = cell.split('`');
        // Text before the first backtick (the type).
        if let Some(head) = parts.next() {
            after = head.to_owned();
        }
        while let (Some(token), Some(next)) = (parts.next(), parts.next().or(Some(""))) {
            let is_value = after.ends_with('=') || after.ends_with("\\|");
            match (&last, is_value) {
                (Some(label), true) => labels
                    .entry(label.clone())
                    .or_default()
                    .push(token.to_owned()),
                _ => {
                    labels.insert(token.to_owned(), Vec::new());
                    last = Some(token.to_owned());
                }
            }
            after = next.to_owned();
        }
        metrics.push(Documented {
            name: format!("hookline_{name}"),
            kind,
            labels,
        });
    }
    metrics
}

#[test]
fn the_metric_tables_parse_into_names_types_labels_and_values() {
    let table = "## Metrics and what to alert on\n\n\
        | metric | type, labels | what |\n|---|---|---|\n\
        | `hookline_a_total` | counter `timing`=`inline`\\|`deferred` | x |\n\
        | `hookline_b_seconds` | histogram | y |\n\
        | `hookline_c_total` | counter `flag`, `result`=`on`\\|`off` | flag `x` |\n\
        | alert | `hookline_not_a_metric` | z |\n\n## Next\n| `hookline_d` | gauge | after |\n";
    let parsed = documented_metrics(table);
    let labels = |pairs: &[(&str, &[&str])]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(
        parsed,
        vec![
            Documented {
                name: "hookline_a_total".into(),
                kind: "counter".into(),
                labels: labels(&[("timing", &["inline", "deferred"])]),
            },
            Documented {
                name: "hookline_b_seconds".into(),
                kind: "histogram".into(),
                labels: labels(&[]),
            },
            Documented {
                name: "hookline_c_total".into(),
                kind: "counter".into(),
                labels: labels(&[("flag", &[]), ("result", &["on", "off"])]),
            },
        ]
    );
}

/// A port in 47000-47999 that is free now (Prometheus binds it itself).
fn free_port_in_range() -> u16 {
    // Started from the process id, so concurrent runs try different ports first.
    let offset = u16::try_from(std::process::id() % 1000).unwrap_or(0);
    (0..1000)
        .map(|i| 47000 + (offset + i) % 1000)
        .find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free port in 47000-47999")
}

/// A child whose stderr goes to `log` (read back when something fails).
fn spawn(command: &mut Command, log: &Path) -> Child {
    let file = std::fs::File::create(log).expect("log file");
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {command:?}: {e}"))
}

async fn get_json(client: &reqwest::Client, url: &str) -> Option<Value> {
    client.get(url).send().await.ok()?.json().await.ok()
}

/// Waits until `url` answers 200.
async fn ready(client: &reqwest::Client, what: &str, url: String) {
    poll_until(what, Duration::from_secs(90), || {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let ok = client.get(url).send().await.ok()?.status().is_success();
            if !ok {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            ok.then_some(())
        }
    })
    .await;
}

/// Prometheus's answer to an instant query; `Err` with its error.
async fn query(client: &reqwest::Client, base: &str, expr: &str) -> Result<Value, String> {
    let answer: Value = client
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    if answer["status"] == "success" {
        Ok(answer["data"].clone())
    } else {
        Err(format!("{}: {}", answer["errorType"], answer["error"]))
    }
}

/// The label sets of every stored series named `name`.
async fn series(client: &reqwest::Client, base: &str, name: &str) -> Vec<BTreeMap<String, String>> {
    let answer = client
        .get(format!("{base}/api/v1/series"))
        .query(&[("match[]", name)])
        .send()
        .await
        .expect("GET /api/v1/series")
        .json::<Value>()
        .await
        .expect("series JSON");
    serde_json::from_value(answer["data"].clone()).unwrap_or_default()
}

/// The series name Prometheus stores for a documented metric (a histogram by its `_count`).
fn stored_name(metric: &Documented) -> String {
    match metric.kind.as_str() {
        "histogram" => format!("{}_count", metric.name),
        _ => metric.name.clone(),
    }
}

/// What is wrong with `metric` in the stored `found` series (`None`: nothing).
fn mismatch(metric: &Documented, found: &[BTreeMap<String, String>]) -> Option<String> {
    if found.is_empty() {
        return Some(format!("{}: no series", metric.name));
    }
    let ours: BTreeSet<&str> = metric.labels.keys().map(String::as_str).collect();
    for labels in found {
        let theirs: BTreeSet<&str> = labels
            .keys()
            .map(String::as_str)
            .filter(|k| !["__name__", "job", "instance"].contains(k))
            .collect();
        if theirs != ours {
            return Some(format!(
                "{}: labels {theirs:?}, {METRICS_PAGE} says {ours:?}",
                metric.name
            ));
        }
    }
    for (label, values) in &metric.labels {
        for value in values {
            if !found.iter().any(|l| l.get(label) == Some(value)) {
                return Some(format!(
                    "{}: no series with {label}=\"{value}\"",
                    metric.name
                ));
            }
        }
    }
    None
}

/// Every `expr` of the dashboard's panels (rows included).
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    fn walk(panels: &Value, out: &mut Vec<String>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(expr.to_owned());
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The `hookline_*` names an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("hookline_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_documented_metric_and_loads_the_rules_and_dashboard() {
    if !Path::new(PROMETHEUS).exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{PROMETHEUS} is missing: install Debian's prometheus package (scripts/test does)"
        );
        eprintln!("skipped: {PROMETHEUS} is missing (apt-get install prometheus)");
        return;
    }
    let root = root();
    let page = std::fs::read_to_string(root.join(METRICS_PAGE)).expect(METRICS_PAGE);
    let documented = documented_metrics(&page);
    assert!(
        documented.len() > 20,
        "{METRICS_PAGE}'s metric tables parsed to only {} metrics",
        documented.len()
    );
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/hookline.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let work = std::env::temp_dir().join(unique_name("hookline-prometheus"));
    std::fs::create_dir_all(&work).unwrap();

    // The world: two projects with a build each and a hook to one receiver; inline rendering on
    // for the first project, so both payload timings are measured.
    let store = pg_store().await;
    let schema: String = sqlx::query_scalar("SELECT current_schema()::text")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let receiver = Receiver::start().await;
    let mut builds = Vec::new();
    for p in 0..2 {
        let snapshot = sample(7_000_000 * (p + 1));
        write_snapshot(&store, &snapshot).await.unwrap();
        store
            .add_hook(&NewHook {
                project_id: snapshot.project.id,
                url: receiver.url.clone(),
                token: None,
                signing_secret: None,
                job_events: true,
                collapse: false,
            })
            .await
            .unwrap();
        builds.push((snapshot.project.id, snapshot.build.id));
    }
    // A receiver that answers, but takes its time, for the second project: what
    // `slow_answers_total` counts (it has a series only once a hook answered slowly).
    let slow = hookline_tests::world::SlowReceiver::start(Duration::from_millis(1_500)).await;
    store
        .add_hook(&NewHook {
            project_id: builds[1].0,
            url: slow.url.clone(),
            token: None,
            signing_secret: None,
            job_events: true,
            collapse: false,
        })
        .await
        .unwrap();
    let status = std::process::Command::new(service_bin("hookline-producer"))
        .args(["feature", "set", "execute_build_hooks_inline", "true"])
        .args(["--project", &builds[0].0.to_string()])
        .env("HOOKLINE_DATABASE_URL", database_url())
        .env("HOOKLINE_DATABASE_SCHEMA", &schema)
        .stdout(Stdio::null())
        .status()
        .expect("run feature set");
    assert!(status.success(), "feature set failed");

    // The services.
    let topic = unique_name("events");
    let brokers = kafka_brokers();
    let (producer_port, relay_port, consumer_port) = (free_port(), free_port(), free_port());
    let service = |bin: &str, args: &[&str]| {
        let mut command = Command::new(service_bin(bin));
        command
            .args(args)
            .args(["--brokers", &brokers, "--topic", &topic])
            .env("HOOKLINE_DATABASE_URL", database_url())
            .env("HOOKLINE_DATABASE_SCHEMA", &schema)
            .env("RUST_LOG", "warn");
        command
    };
    let producer_listen = format!("127.0.0.1:{producer_port}");
    let _producer = spawn(
        service(
            "hookline-producer",
            &["serve", "--no-auth", "--listen", &producer_listen],
        )
        .args(["--create-topic-partitions", "2"]),
        &work.join("producer.log"),
    );
    let client = reqwest::Client::new();
    let producer_url = format!("http://{producer_listen}");
    ready(&client, "the producer", format!("{producer_url}/readyz")).await;
    let relay_listen = format!("127.0.0.1:{relay_port}");
    let _relay = spawn(
        &mut service(
            "hookline-producer",
            &["relay", "--listen", &relay_listen, "--depth-interval", "1s"],
        ),
        &work.join("relay.log"),
    );
    // After the producer created the main topic: the consumer sizes its own from it.
    let consumer_listen = format!("127.0.0.1:{consumer_port}");
    let group = unique_name("group");
    let _consumer = spawn(
        service(
            "hookline-consumer",
            &["serve", "--listen", &consumer_listen, "--group-id", &group],
        )
        .args(["--allow-cidr", "127.0.0.0/8"]),
        &work.join("consumer.log"),
    );
    ready(
        &client,
        "the relay",
        format!("http://{relay_listen}/readyz"),
    )
    .await;
    ready(
        &client,
        "the consumer",
        format!("http://{consumer_listen}/readyz"),
    )
    .await;

    // Prometheus, scraping the three every second, with the rules loaded.
    let prometheus_port = free_port_in_range();
    let prometheus_url = format!("http://127.0.0.1:{prometheus_port}");
    let config = json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [root.join("deploy/prometheus/alerts.yml")],
        "scrape_configs": [
            {"job_name": "hookline-producer", "static_configs": [{"targets": [producer_listen]}]},
            {"job_name": "hookline-relay", "static_configs": [{"targets": [relay_listen]}]},
            {"job_name": "hookline-consumer", "static_configs": [{"targets": [consumer_listen]}]},
        ],
    });
    // JSON is YAML.
    std::fs::write(work.join("prometheus.yml"), config.to_string()).unwrap();
    let mut command = Command::new(PROMETHEUS);
    command
        .arg(format!(
            "--config.file={}",
            work.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            work.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"));
    let _prometheus = spawn(&mut command, &work.join("prometheus.log"));
    ready(&client, "Prometheus", format!("{prometheus_url}/-/ready")).await;

    // The run: every transition of both builds over HTTP, and one through the outbox.
    for status in STATUSES {
        for (_, build) in &builds {
            let answer = client
                .post(format!("{producer_url}/v1/transitions"))
                .json(&json!({"build_id": build, "status": status}))
                .send()
                .await
                .expect("POST /v1/transitions");
            assert_eq!(
                answer.status().as_u16(),
                202,
                "{}",
                answer.text().await.unwrap()
            );
        }
    }
    sqlx::query("SELECT hookline_outbox_record($1, 'failed')")
        .bind(builds[1].1)
        .execute(store.pool())
        .await
        .expect("an outbox row");
    let owed = STATUSES.len() * builds.len() + 1;
    poll_until(
        "every transition delivered",
        Duration::from_secs(90),
        || {
            let n = receiver.count();
            async move { (n >= owed).then_some(()) }
        },
    )
    .await;

    // Every target up.
    let targets_url = format!("{prometheus_url}/api/v1/targets");
    poll_until("every target up", Duration::from_secs(30), || {
        let (client, url) = (client.clone(), targets_url.clone());
        async move {
            let answer = get_json(&client, &url).await?;
            let active = answer["data"]["activeTargets"].as_array()?.clone();
            let up = active.len() == 3 && active.iter().all(|t| t["health"] == "up");
            if !up {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            up.then_some(())
        }
    })
    .await;

    // Every documented metric stored with its labels: polled, since the lag appears with the
    // first statistics after the assignment, and a scrape is up to a second away.
    let mut wrong = Vec::new();
    for attempt in 0..60 {
        wrong.clear();
        for metric in &documented {
            let found = series(&client, &prometheus_url, &stored_name(metric)).await;
            if let Some(problem) = mismatch(metric, &found) {
                wrong.push(problem);
            }
        }
        if wrong.is_empty() || attempt == 59 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        wrong.is_empty(),
        "documented metrics missing or labelled otherwise in Prometheus (logs in {}):\n{}",
        work.display(),
        wrong.join("\n")
    );

    // Every rule loaded and evaluated without error.
    let rules_url = format!("{prometheus_url}/api/v1/rules");
    let rules = poll_until("every rule evaluated", Duration::from_secs(30), || {
        let (client, url) = (client.clone(), rules_url.clone());
        async move {
            let answer = get_json(&client, &url).await?;
            let rules: Vec<Value> = answer["data"]["groups"]
                .as_array()?
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let evaluated = !rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown");
            if !evaluated {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            evaluated.then_some(rules)
        }
    })
    .await;
    let in_file = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap();
    let expected = in_file
        .lines()
        .filter(|l| {
            l.trim_start().starts_with("- alert:") || l.trim_start().starts_with("- record:")
        })
        .count();
    assert_eq!(rules.len(), expected, "rules loaded: {rules:#?}");
    let unhealthy: Vec<String> = rules
        .iter()
        .filter(|r| r["health"] != "ok")
        .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
        .collect();
    assert!(unhealthy.is_empty(), "rules that fail: {unhealthy:#?}");

    // The dashboard reads only stored metrics, and each of its expressions runs.
    let names: BTreeSet<String> = serde_json::from_value(
        get_json(
            &client,
            &format!("{prometheus_url}/api/v1/label/__name__/values"),
        )
        .await
        .expect("metric names")["data"]
            .clone(),
    )
    .expect("a list of names");
    let exprs = dashboard_exprs(&dashboard);
    assert!(
        exprs.len() >= 10,
        "the dashboard has {} queries",
        exprs.len()
    );
    for expr in &exprs {
        for name in metric_names(expr) {
            assert!(
                names.contains(&name),
                "the dashboard queries {name}, which Prometheus did not store ({expr})"
            );
        }
        let runnable = expr.replace("$__rate_interval", "30s");
        if let Err(error) = query(&client, &prometheus_url, &runnable).await {
            panic!("the dashboard's {expr} fails: {error}");
        }
    }
    eprintln!(
        "checked {} documented metrics, {} rules, {} dashboard queries",
        documented.len(),
        rules.len(),
        exprs.len()
    );
    let _ = std::fs::remove_dir_all(&work);
}
