//! SIGTERM the real `hookline-consumer serve` mid-run: it finishes its in-flight deliveries,
//! commits, and exits 0 within the drain bound; started again it delivers the rest, and unlike
//! after SIGKILL (`consumer_crash.rs`) nothing is delivered twice. Under a receiver that never
//! answers it still exits within the drain bound, and the abandoned deliveries come again. While it runs, its
//! `/metrics`, `/healthz` and `/readyz` answer as documented.

use std::process::Stdio;
use std::time::{Duration, Instant};

use hookline_schemas::{BuildStatus, SchemaVersion};
use hookline_tests::process::{ConsumerProcess, Logs};
use hookline_tests::world::{SlowReceiver, Tally, World, inline_event, mixed_events};
use hookline_tests::{Answer, Receiver, free_port, poll_until, unique_name};
use tokio::process::{Child, Command};

const MAX_IN_FLIGHT: usize = 16;
const HOOKS: usize = 2;
/// The drain bound given to the binary.
const DRAIN: Duration = Duration::from_secs(10);
/// After the drain, the binary still commits and leaves its groups before it exits.
const CLOSE_SLACK: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(60);

/// A running `hookline-consumer serve` and its stderr, line by line.
struct Serving {
    child: Child,
    base: String,
    logs: Logs,
    /// Its `--drain-timeout`.
    drain: Duration,
}

fn start(world: &World, group: &str, schema: &str) -> Serving {
    start_with(world, group, schema, DRAIN, &[])
}

fn start_with(world: &World, group: &str, schema: &str, drain: Duration, more: &[&str]) -> Serving {
    let in_flight = MAX_IN_FLIGHT.to_string();
    let drain_arg = format!("{}ms", drain.as_millis());
    let process = ConsumerProcess::new(
        env!("CARGO_BIN_EXE_hookline-consumer"),
        world,
        group,
        schema,
    )
    .args(["--retry-schedule", "10ms,20ms", "--retry-hold", "200ms"])
    .args(["--max-in-flight", &in_flight, "--poll-batch", &in_flight])
    .args(["--drain-timeout", &drain_arg])
    .args(["--kafka-option", "session.timeout.ms=6000"])
    .args(more.iter().copied());
    let base = process.base_url();
    let (child, logs) = process.spawn_logged();
    Serving {
        child,
        base,
        logs,
        drain,
    }
}

impl Serving {
    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let response = reqwest::get(format!("{}{path}", self.base)).await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    /// Sends SIGTERM and waits for the exit; returns how long it took. Panics if the process
    /// outlives the drain bound (plus the time to commit and leave the group) or exits non-zero.
    async fn terminate(&mut self) -> Duration {
        let pid = self.child.id().expect("still running");
        let sent = Instant::now();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
        let drain = self.drain;
        let exit = tokio::time::timeout(drain + CLOSE_SLACK, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "still running {:?} after SIGTERM (drain bound {drain:?}); logs:\n{}",
                    drain + CLOSE_SLACK,
                    self.logs.lock().unwrap().join("\n")
                )
            })
            .expect("wait for the consumer");
        assert!(
            exit.success(),
            "exit after SIGTERM: {exit}; logs:\n{}",
            self.logs.lock().unwrap().join("\n")
        );
        sent.elapsed()
    }

    /// Records the binary reported abandoning at the drain bound (`left=N` per path).
    fn abandoned(&self) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("abandoning in-flight work"))
            .filter_map(|l| {
                let n = l.split("left=").nth(1)?;
                n.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .sum()
    }
}

/// The metric families the consumer documents (`consumer/src/metrics.rs`), as OpenMetrics
/// `# TYPE` lines: deliveries by outcome, delivery latency, stale renders, retries scheduled,
/// dead letters, hook disables, in-flight, consumer lag.
const FAMILIES: [(&str, &str); 9] = [
    ("hookline_consumer_deliveries", "counter"),
    ("hookline_consumer_delivery_attempt_seconds", "histogram"),
    ("hookline_consumer_event_to_delivery_seconds", "histogram"),
    ("hookline_consumer_stale_renders", "counter"),
    ("hookline_consumer_retries_scheduled", "counter"),
    ("hookline_consumer_dead_letters", "counter"),
    ("hookline_consumer_hook_disables", "counter"),
    ("hookline_consumer_in_flight", "gauge"),
    ("hookline_consumer_consumer_lag", "gauge"),
];

/// The value of the sample line starting with `series` (name plus labels), if any.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_work_exits_zero_and_a_restart_delivers_the_rest_without_duplicates()
 {
    let world = World::new(2).await;
    let schema = world.store_schema().await;
    let builds = world.builds(14_000, 20).await;
    let project = builds[0].project.id;
    // Slow answers keep deliveries in flight whenever SIGTERM lands.
    let receiver = SlowReceiver::start(Duration::from_millis(200)).await;
    world
        .hook(project, &format!("{}?a", receiver.url), None)
        .await;
    world
        .hook(project, &format!("{}?b", receiver.url), None)
        .await;
    let events = mixed_events(&builds, 16);
    let pairs = events.len() * HOOKS;
    // A first part while the endpoints are checked, the rest when SIGTERM is due, so that it
    // lands mid-run whatever the checks took.
    let (early, late) = events.split_at(events.len() / 4);
    for (event, version) in early {
        world.send(event, *version).await;
    }

    let group = unique_name("shutdown");
    let mut first = start(&world, &group, &schema);
    poll_until("/healthz", WAIT, || async {
        first.get("/healthz").await.filter(|(s, _)| *s == 200)
    })
    .await;
    // The operational endpoints of the running binary. The lag gauge comes from librdkafka's
    // statistics (every second), so wait for it.
    let lag_series = format!(
        "hookline_consumer_consumer_lag{{partition=\"0\",topic=\"{}\"}}",
        world.topic
    );
    let lag_series_other_order = format!(
        "hookline_consumer_consumer_lag{{topic=\"{}\",partition=\"0\"}}",
        world.topic
    );
    let metrics = poll_until("the lag of the main topic in /metrics", WAIT, || async {
        let (status, text) = first.get("/metrics").await?;
        assert_eq!(status, 200);
        (text.contains(&lag_series) || text.contains(&lag_series_other_order)).then_some(text)
    })
    .await;
    for (name, kind) in FAMILIES {
        assert!(
            metrics.contains(&format!("# TYPE {name} {kind}")),
            "/metrics lacks {name} ({kind}):\n{metrics}"
        );
    }
    assert!(
        sample(
            &metrics,
            "hookline_consumer_deliveries_total{outcome=\"delivered\"}"
        ) > Some(0.0),
        "{metrics}"
    );
    assert!(
        sample(&metrics, "hookline_consumer_stale_renders_total") > Some(0.0),
        "legacy events of builds that moved on are counted stale:\n{metrics}"
    );
    assert_eq!(first.get("/readyz").await.map(|(s, _)| s), Some(200));

    for (event, version) in late {
        world.send(event, *version).await;
    }
    poll_until("the first part and some of the rest", WAIT, || async {
        (receiver.count() >= (early.len() + late.len() / 6) * HOOKS).then_some(())
    })
    .await;

    let at_term = receiver.count();
    let in_flight_at_term = receiver.begun() - at_term;
    let took = first.terminate().await;
    let (at_exit, begun_at_exit) = (receiver.count(), receiver.begun());
    assert!(
        at_term < pairs && in_flight_at_term > 0,
        "SIGTERM landed with nothing in flight ({at_term} of {pairs} answered); nothing was tested"
    );
    // Every answer takes 200 ms, far inside the drain bound: the deliveries in flight at SIGTERM
    // can finish, so they must, and none may be abandoned.
    assert_eq!(
        first.abandoned(),
        0,
        "work abandoned though it could finish within {DRAIN:?}"
    );
    assert_eq!(
        begun_at_exit, at_exit,
        "the consumer exited with deliveries it had begun still unanswered"
    );
    let mut second = start(&world, &group, &schema);
    // Its signal handler is in place once it serves.
    poll_until("/healthz of the restarted consumer", WAIT, || async {
        second.get("/healthz").await.filter(|(s, _)| *s == 200)
    })
    .await;
    let tally = poll_until("every (event, hook) pair", WAIT, || async {
        let tally = Tally::of(&receiver.received());
        (tally.pairs == pairs).then_some(tally)
    })
    .await;
    second.terminate().await;
    eprintln!(
        "sigterm: {pairs} pairs; SIGTERM after {at_term} answers with {in_flight_at_term} requests in flight at the receiver; \
         exited 0 after {took:?} (drain bound {DRAIN:?}) with {at_exit} answers; \
         after the restart {} arrivals, {} duplicates",
        tally.arrivals, tally.duplicates
    );
    // A clean stop that finished its in-flight work stored the offset of every record it
    // delivered: nothing comes again.
    assert_eq!(
        tally.duplicates, 0,
        "duplicates after a clean stop that abandoned nothing"
    );
}

/// A receiver that never answers: SIGTERM still ends the process within `--drain-timeout` (plus
/// the time to commit and leave the group), long before its deliveries would time out (10
/// minutes here); the hanging deliveries are abandoned without storing their offsets, so a
/// restarted instance sends every one of them again and every pair arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_a_hanging_receiver_exits_within_the_drain_bound_and_loses_nothing() {
    let world = World::new(2).await;
    let schema = world.store_schema().await;
    let builds = world.builds(15_000, 4).await;
    let receiver = Receiver::start().await;
    receiver.answer_always(Answer::Hang);
    world.hook(builds[0].project.id, &receiver.url, None).await;
    let events: Vec<_> = builds
        .iter()
        .map(|b| inline_event(b, BuildStatus::Running))
        .collect();
    for event in &events {
        world.send(event, SchemaVersion::V2).await;
    }
    let group = unique_name("hanging");
    let drain = Duration::from_secs(3);
    let mut first = start_with(
        &world,
        &group,
        &schema,
        drain,
        &["--delivery-timeout", "10m"],
    );
    poll_until("every delivery hanging at the receiver", WAIT, || async {
        (receiver.count() == events.len()).then_some(())
    })
    .await;
    // Panics unless it exits 0 within the drain bound plus the time to close.
    let took = first.terminate().await;
    assert_eq!(receiver.count(), events.len(), "nothing new while draining");

    // The receiver recovers; the group's next instance finds the abandoned records uncommitted.
    receiver.answer_always(Answer::Status(200));
    let mut second = start(&world, &group, &schema);
    let delivered = poll_until("every event answered 200", WAIT, || async {
        let ok: std::collections::HashSet<String> = receiver
            .received()
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.header("x-gitlab-event-uuid").unwrap().to_owned())
            .collect();
        (ok.len() == events.len()).then_some(ok)
    })
    .await;
    second.terminate().await;
    for event in &events {
        assert!(delivered.contains(&event.event_id.to_string()));
    }
    eprintln!(
        "hanging receiver: SIGTERM to exit {took:?} (drain bound {drain:?}, delivery timeout 10 min); {} requests in all",
        receiver.count()
    );
}

/// `/readyz` says "not ready" while Kafka does not answer (and says why), while `/healthz`, the
/// liveness probe, stays 200: an orchestrator keeps the process but sends it no traffic.
#[tokio::test]
async fn readyz_is_503_while_kafka_is_unreachable_and_healthz_stays_200() {
    let port = free_port();
    let unreachable = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_hookline-consumer"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--brokers", &unreachable, "--database-url", "memory"])
        .args(["--group-id", &unique_name("unready")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start hookline-consumer");
    let base = format!("http://127.0.0.1:{port}");
    let (status, body) = poll_until("/readyz answers", WAIT, || async {
        let response = reqwest::get(format!("{base}/readyz")).await.ok()?;
        Some((response.status().as_u16(), response.text().await.ok()?))
    })
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("kafka:"),
        "the answer names what is missing: {body}"
    );
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    child.kill().await.unwrap();
}

/// Proxies are never used for deliveries, whatever the environment says: a proxy would resolve
/// and connect on the consumer's behalf, past the SSRF guard. With every proxy variable pointing
/// at a receiver of its own, the hook's receiver gets the delivery and the "proxy" nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_variables_are_ignored() {
    let world = World::new(1).await;
    let schema = world.store_schema().await;
    let snapshot = world.build(15_000).await;
    let receiver = hookline_tests::Receiver::start().await;
    let proxy = hookline_tests::Receiver::start().await;
    world.hook(snapshot.project.id, &receiver.url, None).await;
    let proxy_url = proxy.url.trim_end_matches("/hook").to_owned();
    let mut process = ConsumerProcess::new(
        env!("CARGO_BIN_EXE_hookline-consumer"),
        &world,
        &unique_name("proxy"),
        &schema,
    );
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        process = process.env(var, &proxy_url);
    }
    let mut child = process.env("NO_PROXY", "").spawn();
    world
        .send(
            &hookline_tests::world::inline_event(&snapshot, hookline_schemas::BuildStatus::Running),
            hookline_schemas::SchemaVersion::V2,
        )
        .await;
    poll_until("the delivery", WAIT, || async {
        (receiver.count() == 1).then_some(())
    })
    .await;
    assert_eq!(proxy.count(), 0, "a request went through the proxy");
    child.kill().await.unwrap();
}
