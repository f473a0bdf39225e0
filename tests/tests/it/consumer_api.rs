//! The hooks API (`/api/v4/projects/{id}/hooks...`) on a loopback listener, over the real
//! PostgreSQL store, with the real consumer delivering to loopback receivers: its token, its
//! GitLab field names, its refusals (the CLI's), the delivery log's events, test and resend, and
//! its OpenAPI document against what it serves.

use std::sync::Arc;
use std::time::Duration;

use hookline_cistate::CiStore;
use hookline_consumer::Consumer;
use hookline_consumer::api::{self, AdminToken, ApiState};
use hookline_consumer::hook_admin::{self, HookAdmin};
use hookline_consumer::sign::{SigningSecret, verify};
use hookline_schemas::Codec;
use hookline_schemas::{BuildStatus, SchemaVersion};
use hookline_tests::world::{Running, WHSEC, World, inline_event};
use hookline_tests::{Answer, Receiver, poll_until};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "admin-s3cret-admin-s3cret-admin-s3cret";

/// The API served on a loopback port, and a client that checks every answer against the
/// OpenAPI document the API serves.
struct Api {
    base: String,
    http: reqwest::Client,
    doc: Value,
}

impl Api {
    /// The world's consumer (running) and, as `serve` builds it, the API over its store and
    /// its hook operations; without `with_token` only the document is served.
    async fn start(world: &World, with_token: bool) -> (Api, Running) {
        let consumer = Consumer::new(world.config(), world.store.clone(), Codec::embedded())
            .await
            .expect("consumer");
        let store: Arc<dyn CiStore> = world.store.clone();
        let state = with_token.then(|| ApiState {
            admin: HookAdmin::new(store),
            ops: consumer.hook_ops(),
            token: AdminToken::new(TOKEN).unwrap(),
        });
        let metrics = consumer.metrics();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(consumer.run(shutdown.clone()));
        let running = Running {
            metrics,
            shutdown,
            handle,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, api::router(state)).await.ok() });
        let http = reqwest::Client::new();
        let doc = http
            .get(format!("{base}/openapi.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (Api { base, http, doc }, running)
    }

    /// Sends a request with the token; `template` is the route as the document names it,
    /// `path` the concrete one. Checks the answer against the document and returns it.
    async fn call(
        &self,
        method: Method,
        template: &str,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value, String) {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.checked(method, template, request).await
    }

    async fn checked(
        &self,
        method: Method,
        template: &str,
        request: reqwest::RequestBuilder,
    ) -> (StatusCode, Value, String) {
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let body: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"))
        };
        conforms(&self.doc, &method, template, status, &body);
        (status, body, text)
    }
}

/// The answer is one the document lists for the operation, and its body has every field the
/// document requires (items of an array too).
fn conforms(doc: &Value, method: &Method, template: &str, status: StatusCode, body: &Value) {
    let operation = &doc["paths"][template][method.as_str().to_lowercase()];
    assert!(
        operation.is_object(),
        "{method} {template} not in the document"
    );
    let response = &operation["responses"][status.as_str()];
    assert!(
        response.is_object(),
        "{method} {template} answered {status}, which the document does not list: {body}"
    );
    let Some(schema) = response["content"]["application/json"].get("schema") else {
        return;
    };
    check_required(doc, schema, body, &format!("{method} {template} {status}"));
}

fn check_required(doc: &Value, schema: &Value, body: &Value, what: &str) {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.rsplit('/').next().unwrap();
        return check_required(doc, &doc["components"]["schemas"][name], body, what);
    }
    if schema["type"] == "array" {
        let items = body
            .as_array()
            .unwrap_or_else(|| panic!("{what}: not an array"));
        for item in items {
            check_required(doc, &schema["items"], item, what);
        }
        return;
    }
    for field in schema["required"].as_array().into_iter().flatten() {
        let field = field.as_str().unwrap();
        assert!(
            body.get(field).is_some(),
            "{what}: required field {field} missing from {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_token_the_api_answers_401_and_without_the_option_it_is_not_served() {
    let world = World::new(1).await;
    let snapshot = world.build(61_000).await;
    let (api, running) = Api::start(&world, true).await;
    let hooks = format!("/api/v4/projects/{}/hooks", snapshot.project.id);
    let template = "/api/v4/projects/{id}/hooks";
    let url = format!("{}{hooks}", api.base);
    for request in [
        api.http.get(&url),
        api.http.get(&url).bearer_auth("wrong"),
        api.http.get(&url).header("PRIVATE-TOKEN", "wrong"),
        api.http.get(&url).header("Authorization", TOKEN),
        api.http
            .post(&url)
            .json(&json!({"url": "http://example.com/x"})),
    ] {
        let (status, body, _) = api.checked(Method::GET, template, request).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body, json!({"message": "401 Unauthorized"}));
    }
    assert!(
        world
            .store
            .list_hooks(Some(snapshot.project.id))
            .await
            .unwrap()
            .is_empty()
    );
    // Either header of GitLab's opens it.
    let by_private_token = api.http.get(&url).header("PRIVATE-TOKEN", TOKEN);
    let (status, body, _) = api.checked(Method::GET, template, by_private_token).await;
    assert_eq!((status, body), (StatusCode::OK, json!([])));
    let (status, _, _) = api.call(Method::GET, template, &hooks, None).await;
    assert_eq!(status, StatusCode::OK);

    // No token configured: the document is there, the API is not.
    let (closed, closed_running) = Api::start(&world, false).await;
    let answer = closed
        .http
        .get(format!("{}{hooks}", closed.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::NOT_FOUND);
    assert_eq!(closed.doc, api.doc);
    closed_running.stop().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_round_trip_with_gitlab_field_names_and_the_secrets_never_come_back() {
    let world = World::new(1).await;
    let snapshot = world.build(62_000).await;
    let project = snapshot.project.id;
    let (api, running) = Api::start(&world, true).await;
    let list = "/api/v4/projects/{id}/hooks";
    let one = "/api/v4/projects/{id}/hooks/{hook_id}";
    let hooks = format!("/api/v4/projects/{project}/hooks");

    let (status, created, text) = api
        .call(
            Method::POST,
            list,
            &hooks,
            Some(json!({
                "url": "http://hookuser:pa55word@127.0.0.1:9/first",
                "token": "tok-s3cret",
                "signing_secret": WHSEC,
                "job_events": true,
                "push_events": true,
                "enable_ssl_verification": true,
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    for secret in [
        "tok-s3cret",
        WHSEC,
        "pa55word",
        "\"token\"",
        "signing_secret",
    ] {
        assert!(!text.contains(secret), "{secret} returned: {text}");
    }
    assert_eq!(created["url"], "http://hookuser:*****@127.0.0.1:9/first");
    assert_eq!(created["project_id"], project);
    assert_eq!(created["job_events"], true);
    assert_eq!(
        created["push_events"], false,
        "other event kinds are not sent"
    );
    assert_eq!(created["enable_ssl_verification"], true);
    assert_eq!(created["alert_status"], "executable");
    assert_eq!(created["disabled_until"], Value::Null);
    assert!(
        created["created_at"]
            .as_str()
            .is_some_and(|t| t.len() >= 20)
    );
    let id = created["id"].as_i64().unwrap();
    // The secrets are stored, only never shown.
    let stored = world.store.hook(id).await.unwrap().unwrap();
    assert_eq!(stored.token.as_deref(), Some("tok-s3cret"));
    assert_eq!(stored.signing_secret.as_deref(), Some(WHSEC));

    // GitLab's other ways to give parameters: a form body, and the query string.
    let form = api
        .http
        .post(format!("{}{hooks}", api.base))
        .bearer_auth(TOKEN)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("url=http%3A%2F%2F127.0.0.1%3A9%2Fsecond&job_events=false");
    let (status, second, _) = api.checked(Method::POST, list, form).await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    assert_eq!(second["job_events"], false);
    let query = api
        .http
        .post(format!("{}{hooks}?url=http://127.0.0.1:9/third", api.base))
        .bearer_auth(TOKEN);
    let (status, third, _) = api.checked(Method::POST, list, query).await;
    assert_eq!(status, StatusCode::CREATED, "{third}");

    let (status, listed, text) = api.call(Method::GET, list, &hooks, None).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<_> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].clone())
        .collect();
    assert_eq!(
        ids,
        [
            created["id"].clone(),
            second["id"].clone(),
            third["id"].clone()
        ]
    );
    assert!(!text.contains("tok-s3cret") && !text.contains(WHSEC));

    let path = format!("{hooks}/{id}");
    let (status, got, _) = api.call(Method::GET, one, &path, None).await;
    assert_eq!((status, &got), (StatusCode::OK, &created));

    // An edit changes what it names; an empty token clears it. The URL changed and the
    // signing secret was not given again: it is cleared too (GitLab's reset), and said so.
    let (status, mut edited, _) = api
        .call(
            Method::PUT,
            one,
            &path,
            Some(json!({"url": "http://127.0.0.1:9/moved", "token": "", "collapse": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{edited}");
    assert_eq!(edited["url"], "http://127.0.0.1:9/moved");
    assert_eq!(edited["collapse"], true);
    assert_eq!(edited["hookline_reset"], json!(["signing_secret"]));
    let stored = world.store.hook(id).await.unwrap().unwrap();
    assert_eq!(stored.token, None);
    assert_eq!(stored.signing_secret, None, "reset with the URL change");
    let (_, got, _) = api.call(Method::GET, one, &path, None).await;
    edited.as_object_mut().unwrap().remove("hookline_reset");
    assert_eq!(got, edited);

    // Refusals, GitLab's shapes.
    let (status, body, _) = api
        .call(Method::POST, list, &hooks, Some(json!({"token": "x"})))
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::BAD_REQUEST, json!({"error": "url is missing"}))
    );
    let (status, body, _) = api
        .call(
            Method::PUT,
            one,
            &path,
            Some(json!({"enable_ssl_verification": false})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("always verifies")
    );
    let other_project = format!("/api/v4/projects/{}/hooks/{id}", project + 1);
    let (status, body, _) = api.call(Method::GET, one, &other_project, None).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::NOT_FOUND,
            json!({"message": "404 Hook Not Found"})
        )
    );
    let unknown = "/api/v4/projects/987654321/hooks";
    let (status, body, _) = api
        .call(
            Method::POST,
            list,
            unknown,
            Some(json!({"url": "http://127.0.0.1:9/x"})),
        )
        .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::NOT_FOUND,
            json!({"message": "404 Project Not Found"})
        )
    );
    let (status, _, _) = api.call(Method::GET, list, unknown, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, _, _) = api.call(Method::DELETE, one, &path, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body, _) = api.call(Method::GET, one, &path, None).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::NOT_FOUND,
            json!({"message": "404 Hook Not Found"})
        )
    );
    let (status, _, _) = api.call(Method::DELETE, one, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(world.store.hook(id).await.unwrap().is_none());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_urls_and_tokens_get_the_same_reasons_as_the_cli() {
    let world = World::new(1).await;
    let snapshot = world.build(63_000).await;
    let (api, running) = Api::start(&world, true).await;
    let hooks = format!("/api/v4/projects/{}/hooks", snapshot.project.id);
    let template = "/api/v4/projects/{id}/hooks";
    let cases = [
        json!({"url": "ftp://example.com/x"}),
        json!({"url": "javascript:alert(1)"}),
        json!({"url": "not a url"}),
        json!({"url": "http://"}),
        json!({"url": "http://a/\nx"}),
        json!({"url": "http://example.com/x", "token": "a\r\nX-Injected: 1"}),
        json!({"url": "http://example.com/x", "signing_secret": "plain"}),
    ];
    for case in cases {
        let (status, body, _) = api
            .call(Method::POST, template, &hooks, Some(case.clone()))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{case}: {body}");
        // `hooks add` prints this error (the same function refuses it there).
        let cli = hook_admin::check(
            case["url"].as_str(),
            case["token"].as_str(),
            case["signing_secret"].as_str(),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            format!("hook refused: {}", body["message"].as_str().unwrap()),
            cli,
            "{case}"
        );
    }
    assert!(
        world
            .store
            .list_hooks(Some(snapshot.project.id))
            .await
            .unwrap()
            .is_empty()
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hook_added_through_the_api_receives_signed_deliveries() {
    let world = World::new(1).await;
    let snapshot = world.build(64_000).await;
    let receiver = Receiver::start().await;
    let (api, running) = Api::start(&world, true).await;
    let hooks = format!("/api/v4/projects/{}/hooks", snapshot.project.id);
    let (status, created, _) = api
        .call(
            Method::POST,
            "/api/v4/projects/{id}/hooks",
            &hooks,
            Some(json!({"url": receiver.url, "token": "via-api", "signing_secret": WHSEC})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let event = inline_event(&snapshot, BuildStatus::Running);
    world.send(&event, SchemaVersion::V2).await;
    poll_until("the delivery", WAIT, || async {
        (receiver.count() >= 1).then_some(())
    })
    .await;
    let got = &receiver.received()[0];
    assert_eq!(got.header("x-gitlab-token"), Some("via-api"));
    assert_eq!(got.body.as_ref(), event.payload.as_deref().unwrap());
    let secret = SigningSecret::parse(WHSEC).unwrap();
    verify(
        &secret,
        got.header("webhook-id").unwrap(),
        got.header("webhook-timestamp").unwrap(),
        got.header("webhook-signature").unwrap(),
        &got.body,
        chrono::Utc::now().timestamp(),
    )
    .expect("signed with the secret given to the API");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_served_is_documented_and_every_documented_route_is_served() {
    let world = World::new(1).await;
    let (api, running) = Api::start(&world, true).await;
    let methods = [Method::GET, Method::POST, Method::PUT, Method::DELETE];
    // GitLab's project hooks routes this API implements.
    let expected = [
        (
            "/api/v4/projects/{id}/hooks",
            vec![Method::GET, Method::POST],
        ),
        (
            "/api/v4/projects/{id}/hooks/{hook_id}",
            vec![Method::GET, Method::PUT, Method::DELETE],
        ),
        (
            "/api/v4/projects/{id}/hooks/{hook_id}/events",
            vec![Method::GET],
        ),
        (
            "/api/v4/projects/{id}/hooks/{hook_id}/test/{trigger}",
            vec![Method::POST],
        ),
        (
            "/api/v4/projects/{id}/hooks/{hook_id}/events/{hook_log_id}/resend",
            vec![Method::POST],
        ),
        // GitLab's access tokens API, for tokens scoped to a project or a group (operator only).
        (
            "/api/v4/projects/{id}/access_tokens",
            vec![Method::GET, Method::POST],
        ),
        (
            "/api/v4/projects/{id}/access_tokens/{token_id}",
            vec![Method::DELETE],
        ),
        (
            "/api/v4/groups/{id}/access_tokens",
            vec![Method::GET, Method::POST],
        ),
        (
            "/api/v4/groups/{id}/access_tokens/{token_id}",
            vec![Method::DELETE],
        ),
    ];
    let paths = api.doc["paths"].as_object().unwrap();
    let documented: Vec<(String, Method)> = paths
        .iter()
        .flat_map(|(path, item)| {
            methods
                .iter()
                .filter(|m| item.get(m.as_str().to_lowercase()).is_some())
                .map(|m| (path.clone(), m.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut wanted: Vec<(String, Method)> = expected
        .iter()
        .flat_map(|(p, ms)| ms.iter().map(|m| (p.to_string(), m.clone())))
        .collect();
    let key = |(p, m): &(String, Method)| format!("{m} {p}");
    wanted.sort_by_key(key);
    let mut got = documented.clone();
    got.sort_by_key(key);
    assert_eq!(got, wanted, "the document's operations");
    // Every documented path answers its methods from a handler (a handler's 404 names what is
    // missing; the router's own would be empty), and no other method.
    for (template, item) in paths {
        let concrete = template
            .replace("{id}", "1")
            .replace("{hook_id}", "1")
            .replace("{hook_log_id}", "1")
            .replace("{token_id}", "1")
            .replace("{trigger}", "job_events");
        for method in &methods {
            let response = api
                .http
                .request(method.clone(), format!("{}{concrete}", api.base))
                .bearer_auth(TOKEN)
                .json(&json!({"url": "http://127.0.0.1:9/x"}))
                .send()
                .await
                .unwrap();
            let status = response.status();
            let text = response.text().await.unwrap();
            if item.get(method.as_str().to_lowercase()).is_some() {
                assert!(
                    status != StatusCode::METHOD_NOT_ALLOWED && !text.is_empty(),
                    "{method} {template} is documented but not served: {status}"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {template} is served but not documented"
                );
            }
        }
    }
    // Nothing is served under /api/v4 outside the document.
    let stray = api
        .http
        .get(format!("{}/api/v4/projects/1/hooks/1/unknown", api.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(stray.status(), StatusCode::NOT_FOUND);
    assert!(stray.text().await.unwrap().is_empty());
    running.stop().await;
}

/// A receiver that answers every request with 202 and a body of its own, and counts them.
async fn talking_receiver() -> (String, Arc<std::sync::Mutex<Vec<axum::http::HeaderMap>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        let record = record.clone();
        async move {
            record.lock().unwrap().push(headers);
            (axum::http::StatusCode::ACCEPTED, "queued by the receiver")
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/talk", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_list_the_delivery_log_and_test_and_resend_go_through_the_real_paths() {
    let world = World::new(1).await;
    let snapshot = world.build(65_000).await;
    let receiver = Receiver::start().await;
    receiver.script([Answer::Status(500), Answer::Status(200)]);
    let (api, running) = Api::start(&world, true).await;
    let project = snapshot.project.id;
    let hooks = format!("/api/v4/projects/{project}/hooks");
    let (_, created, _) = api
        .call(
            Method::POST,
            "/api/v4/projects/{id}/hooks",
            &hooks,
            Some(json!({"url": receiver.url, "token": "evt-s3cret"})),
        )
        .await;
    let id = created["id"].as_i64().unwrap();
    let events_template = "/api/v4/projects/{id}/hooks/{hook_id}/events";
    let events = format!("{hooks}/{id}/events");

    // One event: a 500, then the retry's 200; both attempts are listed, newest first.
    let event = inline_event(&snapshot, BuildStatus::Running);
    world.send(&event, SchemaVersion::V2).await;
    let listed = poll_until("two logged attempts", WAIT, || async {
        let (_, body, _) = api.call(Method::GET, events_template, &events, None).await;
        (body.as_array().map_or(0, Vec::len) >= 2).then_some(body)
    })
    .await;
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["response_status"], "200");
    assert_eq!(listed[1]["response_status"], "500");
    assert_eq!(
        (listed[0]["attempt"].clone(), listed[1]["attempt"].clone()),
        (json!(2), json!(1))
    );
    for e in listed {
        assert_eq!(e["trigger"], "job_hooks");
        assert_eq!(e["hookline_trigger"], "delivery");
        assert_eq!(e["event_id"], event.event_id.to_string());
        assert!(
            !e.to_string().contains("evt-s3cret"),
            "a secret in the log: {e}"
        );
    }
    assert_eq!(
        listed[0]["request_data"],
        serde_json::from_slice::<Value>(event.payload.as_deref().unwrap()).unwrap()
    );
    // GitLab's filters and pages.
    for (query, statuses) in [
        ("?status=server_failure", vec!["500"]),
        ("?status=successful", vec!["200"]),
        ("?status=200,500", vec!["200", "500"]),
        ("?status[]=500", vec!["500"]),
        ("?status=client_failure", vec![]),
        ("?per_page=1&page=2", vec!["500"]),
        ("?per_page=1&page=3", vec![]),
    ] {
        let (status, body, _) = api
            .call(
                Method::GET,
                events_template,
                &format!("{events}{query}"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{query}: {body}");
        let got: Vec<_> = body
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["response_status"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(got, statuses, "{query}");
    }
    let (status, body, _) = api
        .call(
            Method::GET,
            events_template,
            &format!("{events}?status=teapots"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Resend the first attempt: the retry path delivers it again with the same key.
    let first_attempt = listed[1]["id"].as_i64().unwrap();
    let resend_template = "/api/v4/projects/{id}/hooks/{hook_id}/events/{hook_log_id}/resend";
    let (status, resent, _) = api
        .call(
            Method::POST,
            resend_template,
            &format!("{events}/{first_attempt}/resend"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resent}");
    poll_until("the resent delivery", WAIT, || async {
        (receiver.count() >= 3).then_some(())
    })
    .await;
    let got = receiver.received();
    assert_eq!(
        got[2].header("idempotency-key"),
        got[0].header("idempotency-key")
    );
    assert_eq!(
        got[2].header("idempotency-key"),
        resent["idempotency_key"].as_str()
    );
    assert_eq!(got[2].body, got[0].body);
    let (status, _, _) = api
        .call(
            Method::POST,
            resend_template,
            &format!("{events}/{}/resend", i64::MAX),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Test: a receiver with something to say; its status and body come back, and the test is
    // logged like any attempt.
    let (talker, seen) = talking_receiver().await;
    let (_, tested_hook, _) = api
        .call(
            Method::POST,
            "/api/v4/projects/{id}/hooks",
            &hooks,
            Some(json!({"url": talker})),
        )
        .await;
    let tested_id = tested_hook["id"].as_i64().unwrap();
    let test_template = "/api/v4/projects/{id}/hooks/{hook_id}/test/{trigger}";
    let (status, answer, _) = api
        .call(
            Method::POST,
            test_template,
            &format!("{hooks}/{tested_id}/test/job_events"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["response_status"], 202);
    assert_eq!(answer["response_body"], "queued by the receiver");
    assert_eq!(answer["synthetic"], false, "the project has a build");
    assert_eq!(seen.lock().unwrap().len(), 1);
    let (_, logged, _) = api
        .call(
            Method::GET,
            events_template,
            &format!("{hooks}/{tested_id}/events"),
            None,
        )
        .await;
    assert_eq!(logged[0]["id"], answer["hook_log_id"]);
    assert_eq!(logged[0]["hookline_trigger"], "test");
    assert_eq!(logged[0]["response_body"], "queued by the receiver");
    let (status, body, _) = api
        .call(
            Method::POST,
            test_template,
            &format!("{hooks}/{tested_id}/test/push_events"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "an unknown trigger sends nothing"
    );
    // Another project's hook is not found through this project.
    let (status, _, _) = api
        .call(
            Method::POST,
            test_template,
            &format!(
                "/api/v4/projects/{}/hooks/{tested_id}/test/job_events",
                project + 1
            ),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    running.stop().await;
}
