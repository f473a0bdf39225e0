//! The HTTP delivery stage against real HTTP servers on loopback: what a receiver sees, and how
//! each kind of answer is classified. No Kafka or PostgreSQL needed.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hookline_cistate::Hook;
use hookline_consumer::deliver::{
    AttemptOutcome, DeliverConfig, Deliverer, DeliveryRequest, idempotency_key,
};
use hookline_consumer::sign::{self, SigningSecret};
use tokio::net::TcpListener;
use uuid::Uuid;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const INSTANCE: &str = "https://ci.example.com";

/// How the test server answers one request.
#[derive(Clone)]
enum Reply {
    Status(u16),
    /// A status with one extra response header.
    WithHeader(u16, &'static str, String),
    /// Never answer.
    Hang,
}

/// One request the server got.
#[derive(Clone)]
struct Got {
    headers: HeaderMap,
    body: Bytes,
    peer: SocketAddr,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

#[derive(Default)]
struct Log {
    got: Vec<Got>,
    script: VecDeque<Reply>,
}

/// A real HTTP server on 127.0.0.1 that records requests and answers from a script (then 200).
struct Server {
    port: u16,
    log: Arc<Mutex<Log>>,
}

impl Server {
    async fn start(script: impl IntoIterator<Item = Reply>) -> Server {
        let log = Arc::new(Mutex::new(Log {
            got: Vec::new(),
            script: script.into_iter().collect(),
        }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = Router::new().fallback(answer).with_state(log.clone());
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .ok();
        });
        Server { port, log }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn got(&self) -> Vec<Got> {
        self.log.lock().unwrap().got.clone()
    }
}

async fn answer(
    State(log): State<Arc<Mutex<Log>>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let reply = {
        let mut log = log.lock().unwrap();
        log.got.push(Got {
            headers,
            body,
            peer,
        });
        log.script.pop_front().unwrap_or(Reply::Status(200))
    };
    match reply {
        Reply::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Reply::WithHeader(code, name, value) => {
            (StatusCode::from_u16(code).unwrap(), [(name, value)]).into_response()
        }
        Reply::Hang => std::future::pending().await,
    }
}

fn hook(url: &str) -> Hook {
    Hook {
        id: 7,
        uuid: Uuid::new_v4(),
        project_id: 42,
        url: url.to_owned(),
        token: None,
        signing_secret: None,
        job_events: true,
        recent_failures: 0,
        disabled_until: None,
        collapse: false,
        created_at: None,
    }
}

/// The guard on, loopback allowed, as in tests and the demo.
fn deliverer() -> Deliverer {
    deliverer_with(config_default())
}

fn deliverer_with(config: DeliverConfig) -> Deliverer {
    Deliverer::new(config).unwrap()
}

/// The guard on with nothing allowed: production defaults.
fn strict_deliverer() -> Deliverer {
    deliverer_with(DeliverConfig {
        allow_cidrs: Vec::new(),
        ..config_default()
    })
}

fn config_default() -> DeliverConfig {
    DeliverConfig {
        timeout: Duration::from_secs(5),
        instance_url: INSTANCE.into(),
        allow_cidrs: vec!["127.0.0.0/8".into()],
        ..DeliverConfig::default()
    }
}

const BODY: &[u8] = br#"{"object_kind":"build","build_id":1,"build_status":"running"}"#;

async fn attempt(deliverer: &Deliverer, hook: &Hook, event_id: Uuid, n: u32) -> AttemptOutcome {
    deliverer
        .attempt(&DeliveryRequest {
            hook,
            event_id,
            body: Bytes::from_static(BODY),
            attempt: n,
        })
        .await
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn assert_signed(got: &Got) {
    let secret = SigningSecret::parse(SECRET).unwrap();
    let verified = sign::verify(
        &secret,
        got.header("webhook-id").expect("webhook-id"),
        got.header("webhook-timestamp").expect("webhook-timestamp"),
        got.header("webhook-signature").expect("webhook-signature"),
        &got.body,
        unix_now(),
    );
    assert_eq!(verified, Ok(()));
}

fn assert_final_blocked(outcome: &AttemptOutcome) {
    match outcome {
        AttemptOutcome::Final {
            status: None,
            reason,
            disable_hook: false,
        } => assert!(
            reason.contains("SSRF"),
            "reason should name the guard: {reason}"
        ),
        other => panic!("expected a final SSRF refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn sends_the_job_hook_headers_and_the_exact_body() {
    let server = Server::start([]).await;
    let mut hook = hook(&server.url());
    hook.token = Some("s3cr3t-token".into());
    hook.signing_secret = Some(SECRET.into());
    let event_id = Uuid::new_v4();

    let outcome = attempt(&deliverer(), &hook, event_id, 1).await;
    assert!(
        matches!(outcome, AttemptOutcome::Delivered { status: 200, .. }),
        "{outcome:?}"
    );

    let got = server.got();
    assert_eq!(got.len(), 1);
    let got = &got[0];
    assert_eq!(&got.body[..], BODY, "the body is sent byte for byte");
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(
        got.header("user-agent"),
        Some(concat!("hookline/", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(got.header("x-gitlab-event"), Some("Job Hook"));
    assert_eq!(got.header("x-gitlab-instance"), Some(INSTANCE));
    assert_eq!(got.header("x-gitlab-token"), Some("s3cr3t-token"));
    assert_eq!(
        got.header("x-gitlab-event-uuid"),
        Some(event_id.to_string().as_str())
    );
    let webhook_uuid = Uuid::parse_str(got.header("x-gitlab-webhook-uuid").unwrap()).unwrap();
    assert_eq!(webhook_uuid.get_version_num(), 4);
    assert_ne!(webhook_uuid, event_id);
    let key = idempotency_key(event_id, &hook);
    assert_eq!(got.header("idempotency-key"), Some(key.as_str()));
    assert_eq!(
        got.header("webhook-id"),
        Some(key.as_str()),
        "webhook-id is the idempotency key"
    );
    let ts: i64 = got.header("webhook-timestamp").unwrap().parse().unwrap();
    assert!((ts - unix_now()).abs() <= 5, "timestamp {ts} is now");
    assert_signed(got);
    assert!(
        got.headers.get("authorization").is_none(),
        "no credentials in the URL, no Authorization"
    );
}

#[tokio::test]
async fn token_and_signature_are_sent_only_when_the_hook_has_them() {
    let server = Server::start([]).await;
    let hook = hook(&server.url());

    let outcome = attempt(&deliverer(), &hook, Uuid::new_v4(), 1).await;
    assert_eq!(outcome.label(), "delivered");
    let got = &server.got()[0];
    for absent in [
        "x-gitlab-token",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    ] {
        assert!(got.headers.get(absent).is_none(), "{absent} was sent");
    }
    assert!(got.headers.get("idempotency-key").is_some());
}

#[tokio::test]
async fn retries_keep_the_idempotency_key_and_change_the_webhook_uuid() {
    let server = Server::start([Reply::Status(500), Reply::Status(500)]).await;
    let mut hook = hook(&server.url());
    hook.signing_secret = Some(SECRET.into());
    let event_id = Uuid::new_v4();
    let deliverer = deliverer();

    let outcomes = [
        attempt(&deliverer, &hook, event_id, 1).await,
        attempt(&deliverer, &hook, event_id, 2).await,
        attempt(&deliverer, &hook, event_id, 3).await,
    ];
    assert!(
        matches!(
            outcomes[0],
            AttemptOutcome::Retry {
                status: Some(500),
                retry_after: None,
                ..
            }
        ),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1].label(), "retry");
    assert!(matches!(
        outcomes[2],
        AttemptOutcome::Delivered { status: 200, .. }
    ));

    let got = server.got();
    assert_eq!(got.len(), 3);
    let keys: Vec<_> = got.iter().map(|g| g.header("idempotency-key")).collect();
    assert!(
        keys.iter().all(|k| *k == keys[0] && k.is_some()),
        "{keys:?}"
    );
    let mut uuids: Vec<_> = got
        .iter()
        .map(|g| g.header("x-gitlab-webhook-uuid").unwrap().to_owned())
        .collect();
    uuids.sort();
    uuids.dedup();
    assert_eq!(uuids.len(), 3, "a new webhook uuid for every attempt");
    got.iter().for_each(assert_signed);

    // Another hook gets a different key for the same event.
    let other = self::hook(&server.url());
    attempt(&deliverer, &other, event_id, 1).await;
    assert_ne!(server.got()[3].header("idempotency-key"), keys[0]);
}

#[tokio::test]
async fn the_pool_keeps_the_connection_alive() {
    let server = Server::start([]).await;
    let hook = hook(&server.url());
    let deliverer = deliverer();
    for n in 1..=3 {
        assert_eq!(
            attempt(&deliverer, &hook, Uuid::new_v4(), n).await.label(),
            "delivered"
        );
    }
    let peers: Vec<SocketAddr> = server.got().iter().map(|g| g.peer).collect();
    assert!(
        peers.iter().all(|p| *p == peers[0]),
        "one connection reused: {peers:?}"
    );
}

#[tokio::test]
async fn too_many_requests_is_retried_after_what_the_receiver_asked() {
    let in_90s = httpdate(SystemTime::now() + Duration::from_secs(90));
    let server = Server::start([
        Reply::WithHeader(429, "retry-after", "7".into()),
        Reply::WithHeader(503, "retry-after", in_90s),
        Reply::Status(408),
        Reply::Status(425),
    ])
    .await;
    let hook = hook(&server.url());
    let deliverer = deliverer();

    assert!(matches!(
        attempt(&deliverer, &hook, Uuid::new_v4(), 1).await,
        AttemptOutcome::Retry { status: Some(429), retry_after: Some(d), .. } if d == Duration::from_secs(7)
    ));
    match attempt(&deliverer, &hook, Uuid::new_v4(), 1).await {
        AttemptOutcome::Retry {
            status: Some(503),
            retry_after: Some(d),
            ..
        } => assert!(
            d > Duration::from_secs(80) && d <= Duration::from_secs(90),
            "HTTP-date Retry-After: {d:?}"
        ),
        other => panic!("{other:?}"),
    }
    for code in [408, 425] {
        assert!(matches!(
            attempt(&deliverer, &hook, Uuid::new_v4(), 1).await,
            AttemptOutcome::Retry { status: Some(c), retry_after: None, .. } if c == code
        ));
    }
}

/// IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`.
fn httpdate(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t)
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

#[tokio::test]
async fn client_errors_are_final_and_gone_disables_the_hook() {
    let server = Server::start([Reply::Status(404), Reply::Status(410), Reply::Status(400)]).await;
    let hook = hook(&server.url());
    let deliverer = deliverer();

    assert!(matches!(
        attempt(&deliverer, &hook, Uuid::new_v4(), 1).await,
        AttemptOutcome::Final {
            status: Some(404),
            disable_hook: false,
            ..
        }
    ));
    assert!(matches!(
        attempt(&deliverer, &hook, Uuid::new_v4(), 1).await,
        AttemptOutcome::Final {
            status: Some(410),
            disable_hook: true,
            ..
        }
    ));
    assert!(matches!(
        attempt(&deliverer, &hook, Uuid::new_v4(), 1).await,
        AttemptOutcome::Final {
            status: Some(400),
            disable_hook: false,
            ..
        }
    ));
}

#[tokio::test]
async fn redirects_are_final_and_never_followed() {
    let target = Server::start([]).await;
    let server = Server::start([Reply::WithHeader(302, "location", target.url())]).await;
    let hook = hook(&server.url());

    let outcome = attempt(&deliverer(), &hook, Uuid::new_v4(), 1).await;
    match &outcome {
        AttemptOutcome::Final {
            status: Some(302),
            reason,
            disable_hook: false,
        } => assert!(reason.contains("redirect"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(server.got().len(), 1);
    assert_eq!(
        target.got().len(),
        0,
        "the redirect target must receive nothing"
    );
}

#[tokio::test]
async fn a_hanging_receiver_is_retried_after_the_timeout() {
    let server = Server::start([Reply::Hang]).await;
    let hook = hook(&server.url());
    let deliverer = deliverer_with(DeliverConfig {
        timeout: Duration::from_millis(300),
        ..config_default()
    });

    match attempt(&deliverer, &hook, Uuid::new_v4(), 1).await {
        AttemptOutcome::Retry {
            status: None,
            reason,
            ..
        } => assert!(reason.contains("timed out"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(server.got().len(), 1, "the request did reach the receiver");
}

#[tokio::test]
async fn a_closed_port_is_retried() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let hook = hook(&format!("http://127.0.0.1:{port}/hook"));
    match attempt(&deliverer(), &hook, Uuid::new_v4(), 1).await {
        AttemptOutcome::Retry {
            status: None,
            reason,
            ..
        } => assert!(reason.contains("connect"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn loopback_is_blocked_unless_allowlisted() {
    let server = Server::start([]).await;
    let hook = hook(&server.url());

    assert_final_blocked(&attempt(&strict_deliverer(), &hook, Uuid::new_v4(), 1).await);
    assert_eq!(server.got().len(), 0, "nothing was sent");

    assert_eq!(
        attempt(&deliverer(), &hook, Uuid::new_v4(), 1)
            .await
            .label(),
        "delivered"
    );
    let unguarded = deliverer_with(DeliverConfig {
        allow_cidrs: Vec::new(),
        ssrf_guard: false,
        ..config_default()
    });
    assert_eq!(
        attempt(&unguarded, &hook, Uuid::new_v4(), 1).await.label(),
        "delivered"
    );
    assert_eq!(server.got().len(), 2);
}

#[tokio::test]
async fn local_ip_spellings_are_blocked_without_sending() {
    let server = Server::start([]).await;
    let strict = strict_deliverer();
    // Every one of these would reach the server on this machine if the guard let it through.
    for url in [
        format!("http://[::ffff:127.0.0.1]:{}/hook", server.port),
        format!("http://0.0.0.0:{}/hook", server.port),
        format!("http://2130706433:{}/hook", server.port),
        format!("http://127.1:{}/hook", server.port),
    ] {
        let outcome = attempt(&strict, &hook(&url), Uuid::new_v4(), 1).await;
        assert_final_blocked(&outcome);
    }
    assert_eq!(server.got().len(), 0, "nothing was sent");
}

#[tokio::test]
async fn a_hostname_resolving_to_loopback_is_blocked_unless_allowlisted() {
    let server = Server::start([]).await;
    let hook = hook(&format!("http://localhost:{}/hook", server.port));

    assert_final_blocked(&attempt(&strict_deliverer(), &hook, Uuid::new_v4(), 1).await);
    assert_eq!(server.got().len(), 0, "nothing was sent");

    // localhost may also resolve to ::1; the guard refuses a name if any address is blocked.
    let open = deliverer_with(DeliverConfig {
        allow_cidrs: vec!["127.0.0.0/8".into(), "::1/128".into()],
        ..config_default()
    });
    assert_eq!(
        attempt(&open, &hook, Uuid::new_v4(), 1).await.label(),
        "delivered"
    );
    let got = server.got();
    assert_eq!(got.len(), 1);
    assert!(
        got[0].header("host").unwrap().starts_with("localhost:"),
        "the hostname stays in Host"
    );
}

#[tokio::test]
async fn internal_addresses_are_refused_by_the_guard() {
    // Checked with the guard alone: these must never be connected to from a test.
    let guard = hookline_consumer::ssrf::SsrfGuard::new(&["127.0.0.0/8"]).unwrap();
    for url in [
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00::1]/hook",
        "http://100.64.0.1/hook",
        "http://[::ffff:10.0.0.1]/hook",
    ] {
        assert!(
            guard.check_url(url).is_err(),
            "{url} must be refused even with loopback allowed"
        );
    }
}

#[tokio::test]
async fn malformed_urls_and_secrets_are_final_with_a_reason() {
    let server = Server::start([]).await;
    let deliverer = deliverer();
    for (url, expect) in [
        ("ftp://127.0.0.1/hook".to_owned(), "not http or https"),
        (format!("{}\r\nX-Evil: 1", server.url()), "CR or LF"),
        ("http//nope".to_owned(), "invalid hook URL"),
    ] {
        match attempt(&deliverer, &hook(&url), Uuid::new_v4(), 1).await {
            AttemptOutcome::Final {
                status: None,
                reason,
                ..
            } => assert!(reason.contains(expect), "{url:?}: {reason}"),
            other => panic!("{url:?}: {other:?}"),
        }
    }

    let mut bad_secret = hook(&server.url());
    bad_secret.signing_secret = Some("whsec_***not base64***".into());
    match attempt(&deliverer, &bad_secret, Uuid::new_v4(), 1).await {
        AttemptOutcome::Final {
            status: None,
            reason,
            ..
        } => {
            assert!(reason.contains("malformed signing secret"), "{reason}");
            assert!(
                !reason.contains("not base64***"),
                "the secret is not echoed"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.got().len(), 0, "nothing was sent");
}

#[tokio::test]
async fn userinfo_in_the_url_becomes_basic_auth() {
    let server = Server::start([]).await;
    let hook = hook(&format!(
        "http://deploy:p%40ss@127.0.0.1:{}/hook",
        server.port
    ));

    assert_eq!(
        attempt(&deliverer(), &hook, Uuid::new_v4(), 1)
            .await
            .label(),
        "delivered"
    );
    let got = &server.got()[0];
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("deploy:p@ss")
    );
    assert_eq!(got.header("authorization"), Some(expected.as_str()));
    assert!(!got.header("host").unwrap().contains('@'));
}

/// Before the port rule, a hook could reach any local service port the allowlist opened.
#[tokio::test]
async fn a_port_below_1024_outside_the_allowed_list_is_refused_naming_the_rule() {
    let deliverer = deliverer();
    for port in [22, 25, 1023] {
        let outcome = attempt(
            &deliverer,
            &hook(&format!("http://127.0.0.1:{port}/hook")),
            Uuid::new_v4(),
            1,
        )
        .await;
        assert_final_blocked(&outcome);
        let AttemptOutcome::Final { reason, .. } = outcome else {
            unreachable!()
        };
        assert!(reason.contains("rule: port"), "{reason}");
        assert!(reason.contains(&format!("port {port}")), "{reason}");
    }
}

/// A name that does not resolve now may resolve later (DNS outage, a record being created): the
/// delivery is retried, not given up (`.invalid` never resolves, RFC 6761).
#[tokio::test]
async fn an_unresolvable_host_is_retried() {
    let hook = hook("http://hookline-unresolvable.invalid:8080/hook");
    match attempt(&strict_deliverer(), &hook, Uuid::new_v4(), 1).await {
        AttemptOutcome::Retry {
            status: None,
            reason,
            ..
        } => assert!(!reason.is_empty()),
        other => panic!("an unresolvable host must be retried, got {other:?}"),
    }
}
