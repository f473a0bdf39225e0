//! The consumer's security promises, against `serve` (in-process) with the real PostgreSQL and
//! Kafka and receivers on loopback: what a URL change resets, what Test may do and how often,
//! what is sealed at rest and masked in sight, what the SSRF guard refuses on save, and what a
//! scoped token may see.

use std::path::PathBuf;
use std::time::Duration;

use hookline_cistate::CiStore;
use hookline_cistate::SecretKeys;
use hookline_consumer::ServeConfig;
use hookline_tests::world::{WHSEC, World};
use hookline_tests::{Receiver, database_url, free_port, poll_until, unique_name};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const ADMIN: &str = "operator-token-0123456789abcdef0123456789";

/// A private file (mode 0600) holding `text`.
fn secret_file(text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::temp_dir().join(unique_name("hookline-secret"));
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// `hookline-consumer serve` in-process over `world`'s schema and topics, with the hooks API.
struct Serving {
    base: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), hookline_consumer::ConsumerError>>,
    token_file: PathBuf,
}

impl Serving {
    async fn start(world: &World, keys: Option<&str>) -> Serving {
        Self::start_with(world, keys, |_| {}).await
    }

    async fn start_with(
        world: &World,
        keys: Option<&str>,
        change: impl FnOnce(&mut ServeConfig),
    ) -> Serving {
        let token_file = secret_file(ADMIN);
        let port = free_port();
        let mut config = ServeConfig {
            consumer: world.config(),
            database_url: database_url(),
            database_schema: Some(world.store_schema().await),
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            schema_registry_url: None,
            admin_token: Some(hookline_consumer::api::AdminToken::read(&token_file).unwrap()),
            admin_token_file: Some(token_file.clone()),
            secrets: keys.map(|k| std::sync::Arc::new(SecretKeys::parse(k).unwrap())),
            listener: Default::default(),
            max_event_bytes: hookline_schemas::codec::DEFAULT_MAX_EVENT_BYTES,
        };
        change(&mut config);
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(hookline_consumer::serve(config, shutdown.clone()));
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        poll_until("serve answers /readyz", WAIT, || async {
            let answer = http.get(format!("{base}/readyz")).send().await.ok()?;
            (answer.status() == StatusCode::OK).then_some(())
        })
        .await;
        Serving {
            base,
            http,
            shutdown,
            handle,
            token_file,
        }
    }

    async fn call(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value, headers)
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (status, body, _) = self.call(ADMIN, method, path, body).await;
        (status, body)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
        let _ = std::fs::remove_file(&self.token_file);
    }
}

use reqwest::Method;

/// The raw columns of a hook, as a copy of the database would show them.
async fn raw_hook(world: &World, id: i64) -> (String, Option<String>, Option<String>) {
    sqlx::query_as("SELECT url, token, signing_secret FROM web_hooks WHERE id = $1")
        .bind(id)
        .fetch_one(world.store.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_url_without_a_new_token_does_not_receive_the_old_token_or_secret() {
    let world = World::new(1).await;
    let snapshot = world.build(71_000).await;
    let project = snapshot.project.id;
    let (old, new) = (Receiver::start().await, Receiver::start().await);
    let serving = Serving::start(&world, None).await;
    let hooks = format!("/api/v4/projects/{project}/hooks");
    let (status, created) = serving
        .admin(
            Method::POST,
            &hooks,
            Some(json!({"url": old.url, "token": "receivers-s3cret", "signing_secret": WHSEC})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let hook = format!("{hooks}/{}", created["id"]);

    // Only the URL changes: the token and the signing secret go with the old URL.
    let (status, edited) = serving
        .admin(Method::PUT, &hook, Some(json!({"url": new.url})))
        .await;
    assert_eq!(status, StatusCode::OK, "{edited}");
    assert_eq!(edited["hookline_reset"], json!(["token", "signing_secret"]));
    let (status, tested) = serving
        .admin(Method::POST, &format!("{hook}/test/job_events"), None)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{tested}");
    let got = &new.received()[0];
    assert_eq!(
        got.header("x-gitlab-token"),
        None,
        "the old token followed the URL"
    );
    assert_eq!(
        got.header("webhook-signature"),
        None,
        "the old secret followed the URL"
    );
    assert_eq!(old.count(), 0);

    // The token given with a new URL is kept; an edit that leaves the URL alone resets nothing.
    let (status, edited) = serving
        .admin(
            Method::PUT,
            &hook,
            Some(json!({"url": old.url, "token": "second-s3cret"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{edited}");
    assert_eq!(edited.get("hookline_reset"), None);
    let (status, _) = serving
        .admin(
            Method::PUT,
            &hook,
            Some(json!({"url": old.url, "collapse": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    serving
        .admin(Method::POST, &format!("{hook}/test/job_events"), None)
        .await;
    assert_eq!(
        old.received()[0].header("x-gitlab-token"),
        Some("second-s3cret")
    );
    serving.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_masked_url_given_back_keeps_the_credentials_and_never_carries_them_elsewhere() {
    let world = World::new(1).await;
    let snapshot = world.build(72_000).await;
    let receiver = Receiver::start().await;
    let serving = Serving::start(&world, None).await;
    let hooks = format!("/api/v4/projects/{}/hooks", snapshot.project.id);
    let secret_url = receiver.url.replace("http://", "http://hookuser:pa55word@")
        + "?token=query-s3cret&channel=ci";
    let (status, created) = serving
        .admin(Method::POST, &hooks, Some(json!({"url": secret_url})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let shown = created["url"].as_str().unwrap().to_owned();
    for secret in ["pa55word", "query-s3cret"] {
        assert!(!shown.contains(secret), "{shown}");
    }
    let hook = format!("{hooks}/{}", created["id"]);
    // GET -> PUT with the URL as shown: the stored credentials stay, not the mask.
    let (status, _) = serving
        .admin(
            Method::PUT,
            &hook,
            Some(json!({"url": shown, "collapse": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let stored = world
        .store
        .hook(created["id"].as_i64().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(stored.url.contains("hookuser:pa55word@"), "{}", stored.url);
    assert!(stored.url.contains("token=query-s3cret"), "{}", stored.url);
    serving
        .admin(Method::POST, &format!("{hook}/test/job_events"), None)
        .await;
    let got = &receiver.received()[0];
    assert_eq!(
        got.header("authorization"),
        Some("Basic aG9va3VzZXI6cGE1NXdvcmQ="),
        "hookuser:pa55word, not the mask"
    );
    // The masked credentials pointed at another host: refused, and the refusal quotes neither.
    let elsewhere = shown.replace("127.0.0.1", "localhost");
    let (status, body) = serving
        .admin(Method::PUT, &hook, Some(json!({"url": elsewhere})))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    // The delivery log's events show the URL masked too.
    let (_, events) = serving
        .admin(Method::GET, &format!("{hook}/events"), None)
        .await;
    let text = events.to_string();
    assert!(
        !text.contains("pa55word") && !text.contains("query-s3cret"),
        "{text}"
    );
    serving.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_is_throttled_per_hook_and_counts_against_the_namespace_limit() {
    let world = World::new(1).await;
    let snapshot = world.build(73_000).await;
    // Another project, in a namespace limited to one delivery a minute.
    let limited = world.build(73_500).await;
    assert_ne!(snapshot.project.namespace_id, limited.project.namespace_id);
    world
        .store
        .set_rate_limit(limited.project.namespace_id, Some(1))
        .await
        .unwrap();
    let receiver = Receiver::start().await;
    let serving = Serving::start(&world, None).await;
    let hooks = format!("/api/v4/projects/{}/hooks", snapshot.project.id);
    let (_, created) = serving
        .admin(Method::POST, &hooks, Some(json!({"url": receiver.url})))
        .await;
    let test = format!("{hooks}/{}/test/job_events", created["id"]);
    for n in 1..=5 {
        let (status, body) = serving.admin(Method::POST, &test, None).await;
        assert_eq!(status, StatusCode::CREATED, "test {n}: {body}");
    }
    let (status, body, headers) = serving.call(ADMIN, Method::POST, &test, None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("tested 5 times within a minute"),
        "{message}"
    );
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(receiver.count(), 5, "the refused test sent nothing");

    // A test counts as a delivery of its namespace: the second within the minute is refused.
    let hooks = format!("/api/v4/projects/{}/hooks", limited.project.id);
    let (_, created) = serving
        .admin(Method::POST, &hooks, Some(json!({"url": receiver.url})))
        .await;
    let test = format!("{hooks}/{}/test/job_events", created["id"]);
    let (status, body) = serving.admin(Method::POST, &test, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = serving.admin(Method::POST, &test, None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("namespace is over its rate limit"),
        "{body}"
    );
    assert_eq!(receiver.count(), 6);
    serving.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_are_sealed_at_rest_old_plaintext_still_works_and_is_sealed_on_write() {
    let world = World::new(1).await;
    let snapshot = world.build(74_000).await;
    let project = snapshot.project.id;
    let receiver = Receiver::start().await;
    // A hook written before any key: plaintext.
    let legacy = world.hook(project, &receiver.url, Some(WHSEC)).await;
    let key = SecretKeys::new_key_line("k1").unwrap();
    let serving = Serving::start(&world, Some(&key)).await;
    let hooks = format!("/api/v4/projects/{project}/hooks");
    let url = receiver.url.replace("http://", "http://user:url-s3cret@");
    let (status, created) = serving
        .admin(
            Method::POST,
            &hooks,
            Some(json!({"url": url, "token": "tok-s3cret", "signing_secret": WHSEC})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_i64().unwrap();
    let (raw_url, raw_token, raw_secret) = raw_hook(&world, id).await;
    for (column, value) in [
        ("url", Some(raw_url)),
        ("token", raw_token),
        ("signing_secret", raw_secret),
    ] {
        let value = value.unwrap();
        assert!(
            value.starts_with("hlsec:v1:k1:"),
            "{column} is not sealed: {value}"
        );
        for plain in ["url-s3cret", "tok-s3cret", "MfKQ9r8G", "127.0.0.1"] {
            assert!(!value.contains(plain), "{column} shows {plain}");
        }
    }
    // Both hooks deliver with their secrets: the sealed one opened, the plaintext one as it is.
    for hook in [id, legacy.id] {
        let (status, body) = serving
            .admin(
                Method::POST,
                &format!("{hooks}/{hook}/test/job_events"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["response_status"], 200, "{body}");
    }
    let got = receiver.received();
    assert_eq!(got[0].header("x-gitlab-token"), Some("tok-s3cret"));
    assert_eq!(got[1].header("x-gitlab-token"), Some("s3cret-token"));
    // An edit of the plaintext hook seals all of its secrets.
    let (status, _) = serving
        .admin(
            Method::PUT,
            &format!("{hooks}/{}", legacy.id),
            Some(json!({"collapse": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (url, token, secret) = raw_hook(&world, legacy.id).await;
    assert!(url.starts_with("hlsec:v1:k1:"));
    assert!(token.unwrap().starts_with("hlsec:v1:k1:"));
    assert!(secret.unwrap().starts_with("hlsec:v1:k1:"));
    serving.stop().await;

    // Sealed values cannot be read without the key: serve refuses to start, and says why.
    let port = free_port();
    let refused = hookline_consumer::serve(
        ServeConfig {
            consumer: world.config(),
            database_url: database_url(),
            database_schema: Some(world.store_schema().await),
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            schema_registry_url: None,
            admin_token: None,
            admin_token_file: None,
            secrets: None,
            listener: Default::default(),
            max_event_bytes: hookline_schemas::codec::DEFAULT_MAX_EVENT_BYTES,
        },
        CancellationToken::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("sealed (key ids: k1)") && refused.contains("--secrets-key-file"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_guard_refuses_on_save_without_naming_what_a_name_resolves_to() {
    let world = World::new(1).await;
    let snapshot = world.build(75_000).await;
    let serving = Serving::start(&world, None).await;
    let hooks = format!("/api/v4/projects/{}/hooks", snapshot.project.id);
    for (url, says) in [
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://168.63.129.16/machine", "Azure WireServer"),
        ("http://[fd00:ec2::254]/latest", "AWS IMDS"),
        ("http://[2001::1]:8080/", "Teredo"),
        ("http://10.1.2.3:8080/x", "private"),
    ] {
        let (status, body) = serving
            .admin(Method::POST, &hooks, Some(json!({"url": url})))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("SSRF guard") && message.contains(says),
            "{message}"
        );
    }
    let (status, body) = serving
        .admin(
            Method::POST,
            &hooks,
            Some(json!({"url": "http://127.0.0.1:19999/x", "signing_secret": "whsec_!!!"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("not base64"),
        "{body}"
    );
    assert!(world.store.list_hooks(None).await.unwrap().is_empty());
    serving.stop().await;

    // A name: refused as resolving to a blocked address, the address kept to the server's log.
    let serving = Serving::start_with(&world, None, |config| {
        config.consumer.deliver.allow_cidrs.clear();
    })
    .await;
    let (status, body) = serving
        .admin(
            Method::POST,
            &hooks,
            Some(json!({"url": "http://localhost:8080/x"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("localhost resolves to a blocked address"),
        "{message}"
    );
    assert!(
        !message.contains("127.0.0.1") && !message.contains("loopback"),
        "{message}"
    );
    serving.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scoped_tokens_see_their_scope_and_nothing_else() {
    let world = World::new(1).await;
    let mine = world.build(76_000).await;
    let theirs = world.build(77_000).await;
    assert_ne!(mine.project.namespace_id, theirs.project.namespace_id);
    let serving = Serving::start(&world, None).await;
    let hooks = |p: i64| format!("/api/v4/projects/{p}/hooks");
    let (_, their_hook) = serving
        .admin(
            Method::POST,
            &hooks(theirs.project.id),
            Some(json!({"url": "http://127.0.0.1:19999/theirs"})),
        )
        .await;
    let their_id = their_hook["id"].as_i64().unwrap();

    // The operator creates a token for one project; it is shown once.
    let tokens = format!("/api/v4/projects/{}/access_tokens", mine.project.id);
    let (status, created) = serving
        .admin(Method::POST, &tokens, Some(json!({"name": "team ci"})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let token = created["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("hlpat_") && token.len() > 40);
    let (_, listed) = serving.admin(Method::GET, &tokens, None).await;
    assert!(
        !listed.to_string().contains(&token),
        "listed with its text: {listed}"
    );
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT digest FROM api_tokens")
        .fetch_all(world.store.pool())
        .await
        .unwrap();
    assert!(
        !stored.is_empty() && stored.iter().all(|d| d.len() == 32),
        "digests only"
    );

    // Its own project: the hooks API as the operator has it.
    let (status, body, _) = serving
        .call(
            &token,
            Method::POST,
            &hooks(mine.project.id),
            Some(json!({"url": "http://127.0.0.1:19999/mine"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body, _) = serving
        .call(&token, Method::GET, &hooks(mine.project.id), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_array().unwrap().len(), 1);

    // Another project: 404, the same answer as for hooks that do not exist.
    let not_found = json!({"message": "404 Project Not Found"});
    for (method, path) in [
        (Method::GET, hooks(theirs.project.id)),
        (
            Method::GET,
            format!("{}/{their_id}", hooks(theirs.project.id)),
        ),
        (
            Method::DELETE,
            format!("{}/{their_id}", hooks(theirs.project.id)),
        ),
        (
            Method::GET,
            format!("{}/{their_id}/events", hooks(theirs.project.id)),
        ),
        (
            Method::POST,
            format!("{}/{their_id}/test/job_events", hooks(theirs.project.id)),
        ),
        (Method::GET, hooks(987_654_321)),
    ] {
        let (status, body, _) = serving.call(&token, method.clone(), &path, None).await;
        assert_eq!(
            (status, &body),
            (StatusCode::NOT_FOUND, &not_found),
            "{method} {path}"
        );
    }
    // Their hook through our project's path: the hook is not ours, 404 too.
    let (status, _, _) = serving
        .call(
            &token,
            Method::GET,
            &format!("{}/{their_id}", hooks(mine.project.id)),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(world.store.hook(their_id).await.unwrap().is_some());

    // Operator routes: 403.
    let (status, _, _) = serving.call(&token, Method::GET, &tokens, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // A namespace token sees the namespace's projects only.
    let group = format!(
        "/api/v4/groups/{}/access_tokens",
        theirs.project.namespace_id
    );
    let (status, created) = serving
        .admin(Method::POST, &group, Some(json!({"name": "their group"})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let group_token = created["token"].as_str().unwrap().to_owned();
    let (status, _, _) = serving
        .call(&group_token, Method::GET, &hooks(theirs.project.id), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = serving
        .call(&group_token, Method::GET, &hooks(mine.project.id), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Revoked: 401 at once.
    let token_id = listed[0]["id"].as_i64().unwrap();
    let (status, _) = serving
        .admin(Method::DELETE, &format!("{tokens}/{token_id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, _) = serving
        .call(&token, Method::GET, &hooks(mine.project.id), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    serving.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_token_file_is_re_read_when_it_changes() {
    let world = World::new(1).await;
    let snapshot = world.build(78_000).await;
    let serving = Serving::start(&world, None).await;
    let hooks = format!("/api/v4/projects/{}/hooks", snapshot.project.id);
    let (status, _) = serving.admin(Method::GET, &hooks, None).await;
    assert_eq!(status, StatusCode::OK);
    let rotated = "rotated-operator-token-0123456789abcdef";
    std::fs::write(&serving.token_file, rotated).unwrap();
    poll_until("the rotated token is accepted", WAIT, || async {
        let (status, _, _) = serving.call(rotated, Method::GET, &hooks, None).await;
        (status == StatusCode::OK).then_some(())
    })
    .await;
    let (status, _) = serving.admin(Method::GET, &hooks, None).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the old token still works"
    );
    // A broken file (too short) is not taken: the rotated token stays.
    std::fs::write(&serving.token_file, "short").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, _, _) = serving.call(rotated, Method::GET, &hooks, None).await;
    assert_eq!(status, StatusCode::OK);
    serving.stop().await;
}

/// The metric's value in a scrape.
fn scraped(metrics: &hookline_consumer::ConsumerMetrics, name: &str) -> f64 {
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not scraped"))
}

/// The largest row the log keeps: 16 KB of request body, 8 KB of answer, 50 headers of 1 KB.
fn largest_row(hook_id: i64) -> hookline_cistate::delivery_log::DeliveryLogEntry {
    let headers: serde_json::Map<String, Value> = (0..50)
        .map(|i| (format!("x-header-{i}"), Value::String("h".repeat(1024))))
        .collect();
    hookline_cistate::delivery_log::DeliveryLogEntry {
        id: 0,
        attempted_at: chrono::Utc::now(),
        hook_id,
        project_id: 1,
        build_id: Some(1),
        event_id: uuid::Uuid::new_v4(),
        idempotency_key: uuid::Uuid::new_v4().to_string(),
        trigger: hookline_cistate::delivery_log::LogTrigger::Delivery,
        attempt: 1,
        url: "http://127.0.0.1:19999/hook".into(),
        request_headers: json!({"content-type": "application/json"}),
        request_body: Some(format!("\"{}\"", "b".repeat(16 * 1024 - 2))),
        request_body_sha256: "0".repeat(64),
        request_body_size: 16 * 1024,
        response_status: Some(500),
        internal_error: None,
        response_headers: Some(Value::Object(headers)),
        response_body: Some("a".repeat(8 * 1024)),
        duration_ms: 1,
    }
}

/// Rows recorded while the writer cannot take them (the database slow, here: not yet polled)
/// stop at the byte bound; the rest are dropped and counted, and what was kept is written.
#[tokio::test(flavor = "current_thread")]
async fn the_delivery_log_buffer_is_bounded_by_bytes_and_counts_what_it_drops() {
    use hookline_consumer::delivery_log::{DeliveryLog, DeliveryLogConfig, approx_bytes};
    let store = hookline_tests::pg_store().await;
    let metrics = std::sync::Arc::new(hookline_consumer::ConsumerMetrics::new());
    let row = approx_bytes(&largest_row(1));
    assert!(row > 70 * 1024, "a largest row is counted as {row} bytes");
    let config = DeliveryLogConfig {
        buffer_bytes: 10 * row + row / 2,
        ..DeliveryLogConfig::default()
    };
    let supervisor = hookline_shell::supervise::Supervisor::new(CancellationToken::new());
    let (log, tasks) =
        DeliveryLog::start(store.pool().clone(), &config, metrics.clone(), &supervisor);
    let hook_id = 424_242;
    // No await in between: on this single-threaded runtime the writer takes nothing meanwhile.
    for _ in 0..40 {
        log.record(largest_row(hook_id));
    }
    assert!(log.queued_bytes() <= config.buffer_bytes);
    let dropped = scraped(&metrics, "hookline_consumer_delivery_log_dropped_total");
    assert_eq!(
        dropped, 30.0,
        "10 rows fit in the bytes, 30 are dropped and counted"
    );
    tasks.stop().await;
    assert_eq!(log.queued_bytes(), 0, "the writer gave the bytes back");
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM delivery_log WHERE hook_id = $1")
        .bind(hook_id)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(written, 10);
}

const BIN: &str = env!("CARGO_BIN_EXE_hookline-consumer");

fn consumer_cli(schema: &str, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(BIN)
        .env_clear()
        .env("HOOKLINE_DATABASE_URL", database_url())
        .env("HOOKLINE_DATABASE_SCHEMA", schema)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(output: &std::process::Output) -> (bool, String, String) {
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_takes_secrets_off_the_command_line_seals_them_and_makes_scoped_tokens() {
    let world = World::new(1).await;
    let snapshot = world.build(79_000).await;
    let schema = world.store_schema().await;
    let project = snapshot.project.id.to_string();
    let key = SecretKeys::new_key_line("cli").unwrap();
    let key_file = secret_file(&key);
    let key_path = key_file.to_str().unwrap();

    // A token on the command line works, with a warning; one from a file or stdin, without.
    let (ok, _, stderr) = text(&consumer_cli(
        &schema,
        &[
            "hooks",
            "add",
            "--project",
            &project,
            "--url",
            "http://127.0.0.1:19999/a",
            "--allow-cidr",
            "127.0.0.0/8",
            "--token",
            "argv-s3cret",
        ],
        None,
    ));
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("--token was given on the command line") && stderr.contains("--token-file"),
        "{stderr}"
    );
    let token_file = secret_file("file-s3cret\n");
    let (ok, _, stderr) = text(&consumer_cli(
        &schema,
        &[
            "hooks",
            "add",
            "--project",
            &project,
            "--url",
            "http://127.0.0.1:19999/b",
            "--allow-cidr",
            "127.0.0.0/8",
            "--token-file",
            token_file.to_str().unwrap(),
            "--secrets-key-file",
            key_path,
        ],
        None,
    ));
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("command line"), "{stderr}");
    let (ok, _, stderr) = text(&consumer_cli(
        &schema,
        &[
            "hooks",
            "add",
            "--project",
            &project,
            "--url",
            "http://127.0.0.1:19999/c",
            "--allow-cidr",
            "127.0.0.0/8",
            "--signing-secret-file",
            "-",
        ],
        Some(WHSEC),
    ));
    assert!(ok, "{stderr}");
    // The SSRF guard on save, with the allowlist as deliveries have it.
    let (ok, _, stderr) = text(&consumer_cli(
        &schema,
        &[
            "hooks",
            "add",
            "--project",
            &project,
            "--url",
            "http://127.0.0.1:19999/d",
        ],
        None,
    ));
    assert!(!ok && stderr.contains("SSRF guard"), "{stderr}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM web_hooks")
        .fetch_one(world.store.pool())
        .await
        .unwrap();
    assert_eq!(stored, 3, "the refused one was not stored");
    // `secrets reencrypt` seals the plaintext ones; `status` tells.
    let (ok, stdout, stderr) = text(&consumer_cli(
        &schema,
        &["secrets", "reencrypt", "--secrets-key-file", key_path],
        None,
    ));
    assert!(
        ok && stdout.contains("re-sealed the secrets of 2 hooks"),
        "{stdout}{stderr}"
    );
    let (ok, stdout, stderr) = text(&consumer_cli(
        &schema,
        &["secrets", "status", "--secrets-key-file", key_path],
        None,
    ));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("plaintext\t0") && stdout.contains("sealed:cli\t"),
        "{stdout}"
    );
    let plaintext: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM web_hooks WHERE url NOT LIKE 'hlsec:%' OR token NOT LIKE 'hlsec:%'",
    )
    .fetch_one(world.store.pool())
    .await
    .unwrap();
    assert_eq!(plaintext, 0);
    // Listed with the key: every token set, nothing secret printed.
    let (ok, stdout, stderr) = text(&consumer_cli(
        &schema,
        &["hooks", "list", "--secrets-key-file", key_path],
        None,
    ));
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    for secret in ["argv-s3cret", "file-s3cret", "MfKQ9r8G"] {
        assert!(!stdout.contains(secret), "{stdout}");
    }
    // Without it: refused with the reason.
    let (ok, _, stderr) = text(&consumer_cli(&schema, &["hooks", "list"], None));
    assert!(!ok && stderr.contains("--secrets-key-file"), "{stderr}");

    // A scoped token, printed once.
    let (ok, stdout, stderr) = text(&consumer_cli(
        &schema,
        &["tokens", "create", "--project", &project, "--name", "team"],
        None,
    ));
    assert!(
        ok && stdout.trim().starts_with("hlpat_"),
        "{stdout}{stderr}"
    );
    let (ok, listed, _) = text(&consumer_cli(&schema, &["tokens", "list"], None));
    assert!(
        ok && listed.contains("active") && !listed.contains(stdout.trim()),
        "{listed}"
    );
    std::fs::remove_file(key_file).unwrap();
    std::fs::remove_file(token_file).unwrap();
}

#[tokio::test]
async fn kafka_secrets_on_the_command_line_are_warned_of_and_a_readable_option_file_refused() {
    let world = World::new(1).await;
    let schema = world.store_schema().await;
    let run = |extra: &[&str]| {
        let mut args = vec![
            "dlq",
            "list",
            "--brokers",
            &world.brokers,
            "--topic",
            &world.topic,
        ];
        args.extend_from_slice(extra);
        text(&consumer_cli(&schema, &args, None))
    };
    let (ok, _, stderr) = run(&["--kafka-option", "sasl.password=hunter2"]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("--kafka-option sasl.password=... was given on the command line")
            && stderr.contains("--kafka-option-file"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    let file = secret_file("# SASL\nsasl.password=hunter2\n");
    let (ok, _, stderr) = run(&["--kafka-option-file", file.to_str().unwrap()]);
    assert!(ok && !stderr.contains("command line"), "{stderr}");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (ok, _, stderr) = run(&["--kafka-option-file", file.to_str().unwrap()]);
    assert!(
        !ok && stderr.contains("chmod 600") && !stderr.contains("hunter2"),
        "{stderr}"
    );
    std::fs::remove_file(file).unwrap();
}
