//! One HTTP attempt of one Job Hook to one webhook: headers, signing, the SSRF guard, and the
//! classification of the answer into what the pipeline does next.
//!
//! CONTRACT (used by the consume/retry pipeline; keep these signatures):
//!
//! ```ignore
//! let deliverer = Deliverer::new(DeliverConfig { .. })?;
//! let outcome: AttemptOutcome = deliverer.attempt(&DeliveryRequest { hook: &hook, event_id, body, attempt }).await;
//! ```
//!
//! An attempt never fails as a Rust error: everything that can happen to it (an answer, a timeout,
//! a refused URL, a malformed secret) is an [`AttemptOutcome`] that says what to do next. The
//! retry delay itself is [`crate::schedule::RetrySchedule`]'s business.
//!
//! With the delivery log on, [`Deliverer::attempt_captured`] also returns the [`Exchange`]: the
//! request as sent (URL credentials masked, secrets redacted) and the answer cut to GitLab's log
//! limits, which [`Exchange::log_entry`] turns into a delivery-log row.

use std::error::Error as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use hookline_cistate::Hook;
use hookline_cistate::delivery_log::{DeliveryLogEntry, LogTrigger};
use reqwest::header::{
    AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT,
};
use reqwest::{Client, StatusCode, Url, redirect};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};
use uuid::Uuid;

use crate::sign::{self, SigningSecret};
use crate::ssrf::{self, Refusal, SsrfGuard};

/// Options of the HTTP stage.
#[derive(Debug, Clone)]
pub struct DeliverConfig {
    /// Whole-request timeout (GitLab: 10 s).
    pub timeout: Duration,
    /// `X-Gitlab-Instance`: the CI instance's base URL.
    pub instance_url: String,
    /// CIDRs the SSRF guard lets through (tests and the demo allow 127.0.0.0/8).
    pub allow_cidrs: Vec<String>,
    /// Turn the SSRF guard off entirely (never in production).
    pub ssrf_guard: bool,
    /// Ports below 1024 the SSRF guard lets through (GitLab: 80 and 443).
    pub allow_ports: Vec<u16>,
}

impl Default for DeliverConfig {
    /// 10 s timeout, guard on with an empty allowlist.
    fn default() -> DeliverConfig {
        DeliverConfig {
            timeout: Duration::from_secs(10),
            instance_url: "http://localhost".into(),
            allow_cidrs: Vec::new(),
            ssrf_guard: true,
            allow_ports: ssrf::DEFAULT_ALLOWED_PORTS.to_vec(),
        }
    }
}

/// One attempt to make.
#[derive(Debug, Clone)]
pub struct DeliveryRequest<'a> {
    pub hook: &'a Hook,
    /// The event's id: `X-Gitlab-Event-UUID`, and with the hook's uuid the `Idempotency-Key`.
    pub event_id: Uuid,
    /// The exact body to POST.
    pub body: Bytes,
    /// 1 for the first attempt.
    pub attempt: u32,
}

/// What the delivery log keeps of one attempt: the request as sent, redacted, and the answer cut
/// to GitLab's limits ([`RESPONSE_BODY_LIMIT`], [`RESPONSE_HEADERS_LIMIT`],
/// [`HEADER_VALUE_LIMIT`]); the request body only up to [`REQUEST_BODY_LIMIT`].
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    pub attempted_at: DateTime<Utc>,
    /// The hook's URL with a Basic-auth password masked.
    pub url: String,
    /// Header name to value; `X-Gitlab-Token`, `Authorization` and `webhook-signature` redacted.
    /// Empty when the request was refused before its headers were made.
    pub request_headers: serde_json::Value,
    /// `None` past [`REQUEST_BODY_LIMIT`] (or not UTF-8): only the digest and size are kept.
    pub request_body: Option<String>,
    /// Lower-case hex SHA-256 of the whole body.
    pub request_body_sha256: String,
    pub request_body_size: usize,
    /// `None` when no answer came.
    pub response_status: Option<u16>,
    pub response_headers: Option<serde_json::Value>,
    pub response_body: Option<String>,
    /// From the start of the request to the end of reading the kept part of the answer.
    pub duration: Duration,
}

/// GitLab's `WebHookService` keeps the first 8 KB of a response body in its log.
pub const RESPONSE_BODY_LIMIT: usize = 8 * 1024;
/// GitLab keeps the first 50 response headers...
pub const RESPONSE_HEADERS_LIMIT: usize = 50;
/// ...each value cut at 1 KB.
pub const HEADER_VALUE_LIMIT: usize = 1024;
/// Request bodies up to this size are kept whole (and can be resent from the log); past it only
/// their SHA-256 and size. GitLab keeps up to 25 MB; a Job Hook is a few KB, so 16 KB keeps
/// every ordinary one while bounding a row.
pub const REQUEST_BODY_LIMIT: usize = 16 * 1024;
/// What redacted values read as.
pub const REDACTED: &str = "[REDACTED]";

impl Exchange {
    fn start(request: &DeliveryRequest<'_>) -> Exchange {
        let body = &request.body;
        Exchange {
            attempted_at: Utc::now(),
            url: crate::hooks::masked_url(&request.hook.url),
            request_headers: serde_json::Value::Object(Default::default()),
            request_body: std::str::from_utf8(body)
                .ok()
                .filter(|_| body.len() <= REQUEST_BODY_LIMIT)
                .map(str::to_owned),
            request_body_sha256: sha256_hex(body),
            request_body_size: body.len(),
            response_status: None,
            response_headers: None,
            response_body: None,
            duration: Duration::ZERO,
        }
    }

    /// The delivery-log row of this exchange: `request` made it, `outcome` is what it came to
    /// (its reason is the row's internal error when no answer came).
    pub fn log_entry(
        &self,
        request: &DeliveryRequest<'_>,
        build_id: Option<i64>,
        trigger: LogTrigger,
        outcome: &AttemptOutcome,
    ) -> DeliveryLogEntry {
        let internal_error = match (self.response_status, outcome) {
            (Some(_), _) | (None, AttemptOutcome::Delivered { .. }) => None,
            (None, AttemptOutcome::Retry { reason, .. } | AttemptOutcome::Final { reason, .. }) => {
                Some(reason.clone())
            }
        };
        DeliveryLogEntry {
            id: 0,
            attempted_at: self.attempted_at,
            hook_id: request.hook.id,
            project_id: request.hook.project_id,
            build_id,
            event_id: request.event_id,
            idempotency_key: idempotency_key(request.event_id, request.hook),
            trigger,
            attempt: i32::try_from(request.attempt).unwrap_or(i32::MAX),
            url: self.url.clone(),
            request_headers: self.request_headers.clone(),
            request_body: self.request_body.clone(),
            request_body_sha256: self.request_body_sha256.clone(),
            request_body_size: i32::try_from(self.request_body_size).unwrap_or(i32::MAX),
            response_status: self.response_status.map(i32::from),
            internal_error,
            response_headers: self.response_headers.clone(),
            response_body: self.response_body.clone(),
            duration_ms: i32::try_from(self.duration.as_millis()).unwrap_or(i32::MAX),
        }
    }
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The request headers as the log keeps them: secrets replaced by [`REDACTED`]; Basic auth
/// (from URL credentials, added by the client) shown as a redacted `authorization`.
fn logged_request_headers(headers: &HeaderMap, basic_auth: bool) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (name, value) in headers {
        let shown = if [X_GITLAB_TOKEN, AUTHORIZATION, WEBHOOK_SIGNATURE].contains(name) {
            REDACTED.to_owned()
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        map.insert(name.as_str().to_owned(), serde_json::Value::String(shown));
    }
    if basic_auth {
        map.insert(
            AUTHORIZATION.as_str().to_owned(),
            serde_json::Value::String(REDACTED.to_owned()),
        );
    }
    serde_json::Value::Object(map)
}

/// The first [`RESPONSE_HEADERS_LIMIT`] response headers, each value cut at
/// [`HEADER_VALUE_LIMIT`]; a repeated name keeps its values joined by `, `.
fn logged_response_headers(headers: &HeaderMap) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (name, value) in headers.iter().take(RESPONSE_HEADERS_LIMIT) {
        let value = cut(
            &String::from_utf8_lossy(value.as_bytes()),
            HEADER_VALUE_LIMIT,
        );
        match map.get_mut(name.as_str()) {
            Some(serde_json::Value::String(seen)) => {
                seen.push_str(", ");
                seen.push_str(&value);
            }
            _ => {
                map.insert(name.as_str().to_owned(), serde_json::Value::String(value));
            }
        }
    }
    serde_json::Value::Object(map)
}

/// `text` cut to at most `limit` bytes, on a character boundary.
fn cut(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptOutcome {
    /// 2xx.
    Delivered { status: u16, latency: Duration },
    /// Worth trying again later (5xx, 408/425/429, timeouts, connection errors).
    Retry {
        status: Option<u16>,
        /// The receiver's `Retry-After`, if it sent one (seconds or HTTP date).
        retry_after: Option<Duration>,
        reason: String,
    },
    /// Will not succeed by retrying: 4xx other than 408/425/429, 3xx (redirects are never
    /// followed), a URL the SSRF guard refuses, a malformed URL.
    Final {
        status: Option<u16>,
        reason: String,
        /// 410 Gone: the receiver asks to disable the hook.
        disable_hook: bool,
    },
}

impl AttemptOutcome {
    /// A short label for metrics and logs: `delivered`, `retry` or `final`.
    pub fn label(&self) -> &'static str {
        match self {
            AttemptOutcome::Delivered { .. } => "delivered",
            AttemptOutcome::Retry { .. } => "retry",
            AttemptOutcome::Final { .. } => "final",
        }
    }

    fn refused(reason: impl Into<String>) -> AttemptOutcome {
        AttemptOutcome::Final {
            status: None,
            reason: reason.into(),
            disable_hook: false,
        }
    }
}

/// Why the HTTP stage cannot start: the configuration is wrong.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("invalid SSRF allowlist: {0}")]
    AllowList(#[from] ssrf::CidrError),
    #[error("instance URL {0:?} is not a valid header value")]
    InstanceUrl(String),
    #[error("timeout must be above zero")]
    ZeroTimeout,
    #[error("could not build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

const X_GITLAB_EVENT: HeaderName = HeaderName::from_static("x-gitlab-event");
const X_GITLAB_INSTANCE: HeaderName = HeaderName::from_static("x-gitlab-instance");
const X_GITLAB_TOKEN: HeaderName = HeaderName::from_static("x-gitlab-token");
const X_GITLAB_EVENT_UUID: HeaderName = HeaderName::from_static("x-gitlab-event-uuid");
const X_GITLAB_WEBHOOK_UUID: HeaderName = HeaderName::from_static("x-gitlab-webhook-uuid");
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

/// How much of a response body is read (and thrown away) so the connection can go back to the
/// pool; a longer body closes the connection instead.
const DRAIN_LIMIT: usize = 64 * 1024;

/// Sends Job Hooks. Cheap to share: one client with one kept-alive connection pool.
#[derive(Debug, Clone)]
pub struct Deliverer {
    client: Client,
    /// `None` when the guard is switched off.
    guard: Option<SsrfGuard>,
    instance: HeaderValue,
    timeout: Duration,
}

impl Deliverer {
    pub fn new(config: DeliverConfig) -> Result<Deliverer, DeliverError> {
        if config.timeout.is_zero() {
            return Err(DeliverError::ZeroTimeout);
        }
        let instance = HeaderValue::from_str(&config.instance_url)
            .map_err(|_| DeliverError::InstanceUrl(config.instance_url.clone()))?;
        let guard = if config.ssrf_guard {
            Some(SsrfGuard::new(&config.allow_cidrs)?.with_allowed_ports(&config.allow_ports))
        } else {
            None
        };
        let mut builder = Client::builder()
            .user_agent(concat!("hookline/", env!("CARGO_PKG_VERSION")))
            .timeout(config.timeout)
            .redirect(redirect::Policy::none())
            // A proxy would resolve and connect on our behalf, past the guard.
            .no_proxy()
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_keepalive(Duration::from_secs(60))
            .tcp_nodelay(true);
        if let Some(guard) = &guard {
            // Resolution goes through the guard, and the connector uses exactly the addresses it
            // returned: what was checked is what is connected to.
            builder = builder.dns_resolver(std::sync::Arc::new(guard.clone()));
        }
        let client = builder.build().map_err(DeliverError::Client)?;
        Ok(Deliverer {
            client,
            guard,
            instance,
            timeout: config.timeout,
        })
    }

    /// The SSRF guard deliveries go through; `None` when it is switched off. Saving a hook
    /// checks its URL with the same guard.
    pub fn guard(&self) -> Option<&SsrfGuard> {
        self.guard.as_ref()
    }

    /// Makes one attempt and says what it came to.
    pub async fn attempt(&self, request: &DeliveryRequest<'_>) -> AttemptOutcome {
        self.attempt_inner(request, None).await
    }

    /// Makes one attempt, and also says what was sent and what came back (for the delivery
    /// log). Costs a digest of the body and keeping up to 8 KB of the answer.
    pub async fn attempt_captured(
        &self,
        request: &DeliveryRequest<'_>,
    ) -> (AttemptOutcome, Exchange) {
        let mut exchange = Exchange::start(request);
        let outcome = self.attempt_inner(request, Some(&mut exchange)).await;
        (outcome, exchange)
    }

    async fn attempt_inner(
        &self,
        request: &DeliveryRequest<'_>,
        capture: Option<&mut Exchange>,
    ) -> AttemptOutcome {
        let hook = request.hook;
        let outcome = self.send(request, capture).await;
        match &outcome {
            AttemptOutcome::Delivered { status, latency } => debug!(
                hook_id = hook.id,
                event_id = %request.event_id,
                attempt = request.attempt,
                status,
                latency_ms = latency.as_millis() as u64,
                "hook delivered"
            ),
            AttemptOutcome::Retry {
                status,
                reason,
                retry_after,
            } => warn!(
                hook_id = hook.id,
                event_id = %request.event_id,
                attempt = request.attempt,
                status,
                retry_after_ms = retry_after.map(|d| d.as_millis() as u64),
                reason,
                "hook delivery failed, will retry"
            ),
            AttemptOutcome::Final {
                status,
                reason,
                disable_hook,
            } => warn!(
                hook_id = hook.id,
                event_id = %request.event_id,
                attempt = request.attempt,
                status,
                disable_hook,
                reason,
                "hook delivery failed for good"
            ),
        }
        outcome
    }

    async fn send(
        &self,
        request: &DeliveryRequest<'_>,
        mut capture: Option<&mut Exchange>,
    ) -> AttemptOutcome {
        let hook = request.hook;
        let started = Instant::now();
        let checked = match &self.guard {
            Some(guard) => guard.check_url(&hook.url),
            None => ssrf::parse_hook_url(&hook.url),
        };
        let mut url = match checked {
            Ok(url) => url,
            Err(refusal) => return AttemptOutcome::refused(refusal.to_string()),
        };
        let credentials = take_userinfo(&mut url);
        let headers = match self.headers(request) {
            Ok(headers) => headers,
            Err(reason) => return AttemptOutcome::refused(reason),
        };
        if let Some(exchange) = capture.as_deref_mut() {
            exchange.request_headers = logged_request_headers(&headers, credentials.is_some());
        }

        let mut builder = self
            .client
            .post(url)
            .headers(headers)
            .body(request.body.clone());
        if let Some((user, password)) = credentials {
            builder = builder.basic_auth(user, password);
        }
        let response = match builder.send().await {
            Ok(response) => response,
            Err(error) => {
                if let Some(exchange) = capture {
                    exchange.duration = started.elapsed();
                }
                return self.classify_error(error);
            }
        };
        let latency = started.elapsed();
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        match capture {
            None => {
                drain(response, 0).await;
            }
            Some(exchange) => {
                exchange.response_status = Some(status.as_u16());
                exchange.response_headers = Some(logged_response_headers(response.headers()));
                let kept = drain(response, RESPONSE_BODY_LIMIT).await;
                exchange.response_body =
                    Some(cut(&String::from_utf8_lossy(&kept), RESPONSE_BODY_LIMIT));
                exchange.duration = started.elapsed();
            }
        }
        classify_status(status, retry_after, latency)
    }

    /// Every header of the request; `Err` carries a reason when the hook's own settings make the
    /// request impossible (a malformed signing secret, a token that is no valid header value).
    fn headers(&self, request: &DeliveryRequest<'_>) -> Result<HeaderMap, String> {
        let hook = request.hook;
        let key = idempotency_key(request.event_id, hook);
        let mut h = HeaderMap::with_capacity(12);
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("hookline/", env!("CARGO_PKG_VERSION"))),
        );
        h.insert(X_GITLAB_EVENT, HeaderValue::from_static("Job Hook"));
        h.insert(X_GITLAB_INSTANCE, self.instance.clone());
        if let Some(token) = &hook.token {
            let mut value = HeaderValue::from_str(token)
                .map_err(|_| "the hook's token is not a valid header value".to_owned())?;
            // Keeps it out of any debug dump of the request.
            value.set_sensitive(true);
            h.insert(X_GITLAB_TOKEN, value);
        }
        h.insert(X_GITLAB_EVENT_UUID, uuid_value(request.event_id));
        h.insert(X_GITLAB_WEBHOOK_UUID, uuid_value(Uuid::new_v4()));
        h.insert(IDEMPOTENCY_KEY, header_value(&key));
        if let Some(secret) = &hook.signing_secret {
            let secret = SigningSecret::parse(secret).map_err(|e| e.to_string())?;
            let timestamp = unix_now();
            let signature = sign::sign(&secret, &key, timestamp, &request.body);
            h.insert(WEBHOOK_ID, header_value(&key));
            h.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp));
            h.insert(WEBHOOK_SIGNATURE, header_value(&signature));
        }
        Ok(h)
    }

    fn classify_error(&self, error: reqwest::Error) -> AttemptOutcome {
        // The guard's refusal travels up from the resolver inside reqwest's error chain.
        let mut source = error.source();
        while let Some(cause) = source {
            if let Some(refusal) = cause.downcast_ref::<Refusal>() {
                return if refusal.is_transient() {
                    AttemptOutcome::Retry {
                        status: None,
                        retry_after: None,
                        reason: format!("{refusal} (nothing was sent)"),
                    }
                } else {
                    AttemptOutcome::refused(refusal.to_string())
                };
            }
            source = cause.source();
        }
        // Without the URL: its query string may carry a secret.
        let error = error.without_url();
        if error.is_timeout() {
            AttemptOutcome::Retry {
                status: None,
                retry_after: None,
                reason: format!("timed out after {:?}", self.timeout),
            }
        } else if error.is_builder() {
            AttemptOutcome::refused(format!("could not build the request: {}", chain(&error)))
        } else {
            // Connection refused or reset, TLS failures, a body cut short: the receiver may be
            // back later.
            let what = if error.is_connect() {
                "connection failed"
            } else {
                "request failed"
            };
            AttemptOutcome::Retry {
                status: None,
                retry_after: None,
                reason: format!("{what}: {}", chain(&error)),
            }
        }
    }
}

/// What an HTTP answer means for the delivery.
pub fn classify_status(
    status: StatusCode,
    retry_after: Option<Duration>,
    latency: Duration,
) -> AttemptOutcome {
    let code = status.as_u16();
    if status.is_success() {
        return AttemptOutcome::Delivered {
            status: code,
            latency,
        };
    }
    let retry = |what: &str| AttemptOutcome::Retry {
        status: Some(code),
        retry_after,
        reason: format!("receiver answered {status}: {what}"),
    };
    let fail = |what: &str, disable_hook| AttemptOutcome::Final {
        status: Some(code),
        reason: format!("receiver answered {status}: {what}"),
        disable_hook,
    };
    match code {
        410 => fail("gone, the hook will be disabled", true),
        408 | 425 | 429 => retry("asked to try again later"),
        500..=599 => retry("server error"),
        300..=399 => fail("redirects are not followed", false),
        400..=499 => fail("client error, retrying would not help", false),
        // 1xx cannot reach here as a final answer; anything else is nonstandard.
        _ => fail("unexpected status", false),
    }
}

/// `Idempotency-Key` (and Standard Webhooks `webhook-id`) for one (event, hook): the same for every
/// retry and replay of that pair, different for another hook or event. A UUID v5 in the hook's
/// uuid as namespace over the event id, so it needs no storage.
pub fn idempotency_key(event_id: Uuid, hook: &Hook) -> String {
    Uuid::new_v5(&hook.uuid, event_id.as_bytes()).to_string()
}

/// Parses a `Retry-After` value: delta-seconds, or an HTTP date (IMF-fixdate, RFC 850 or asctime,
/// all three of which recipients must accept). A date in the past means "now": `Duration::ZERO`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = parse_http_date(value)?;
    let at = UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(at).ok()?))?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Unix seconds of an HTTP date.
fn parse_http_date(value: &str) -> Option<i64> {
    use chrono::{DateTime, NaiveDateTime};
    if let Ok(t) = DateTime::parse_from_rfc2822(value) {
        return Some(t.timestamp());
    }
    // RFC 850: "Sunday, 06-Nov-94 08:49:37 GMT"; asctime: "Sun Nov  6 08:49:37 1994".
    for format in ["%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(value, format) {
            return Some(t.and_utc().timestamp());
        }
    }
    None
}

/// Removes `user:password@` from the URL and returns it percent-decoded, for Basic auth (as
/// GitLab does: credentials never travel in the request line, and never in logs).
fn take_userinfo(url: &mut Url) -> Option<(String, Option<String>)> {
    if url.username().is_empty() && url.password().is_none() {
        return None;
    }
    let user = percent_decode(url.username());
    let password = url.password().map(percent_decode);
    // http(s) URLs always have a host, so clearing the userinfo cannot fail.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Some((user, password))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).and_then(|b| hex(*b)),
                bytes.get(i + 2).and_then(|b| hex(*b)),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads a little of the body so the kept-alive connection can be reused, and returns its first
/// `keep` bytes (the delivery log's part); errors here do not change the outcome (the status
/// already decided it). The log being on reads no more of the body than it being off.
async fn drain(mut response: reqwest::Response, keep: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut read = 0;
    while read < DRAIN_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                read += chunk.len();
                if kept.len() < keep {
                    let room = keep - kept.len();
                    kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    kept
}

fn uuid_value(id: Uuid) -> HeaderValue {
    header_value(&id.to_string())
}

/// For values built here from UUIDs, digits and base64, which are always valid header values.
fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// An error and its causes, `a: b: c`.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(uuid: Uuid) -> Hook {
        Hook {
            id: 1,
            uuid,
            project_id: 1,
            url: "https://example.com/hook".into(),
            token: None,
            signing_secret: None,
            job_events: true,
            recent_failures: 0,
            disabled_until: None,
            collapse: false,
            created_at: None,
        }
    }

    #[test]
    fn idempotency_key_is_stable_per_event_and_hook() {
        let a = hook(Uuid::from_u128(1));
        let b = hook(Uuid::from_u128(2));
        let e1 = Uuid::from_u128(10);
        let e2 = Uuid::from_u128(11);
        assert_eq!(idempotency_key(e1, &a), idempotency_key(e1, &a.clone()));
        assert_ne!(idempotency_key(e1, &a), idempotency_key(e2, &a));
        assert_ne!(idempotency_key(e1, &a), idempotency_key(e1, &b));
        // Pinned: a replay months later, by another build of hookline, must send the same key.
        // The literals are RFC 4122 UUID v5 (SHA-1 of the hook uuid's 16 bytes followed by the
        // event id's 16 bytes), computed outside hookline (Python's hashlib and uuid modules).
        for (hook_uuid, event_id, key) in [
            (1, 10, "742c5553-49c4-57ff-af3c-0d1659bc153f"),
            (2, 10, "511c8903-d7fa-5ac9-9112-4009292f5c7c"),
            (1, 11, "d96fbb34-4dc4-50a9-ad33-fde258759ea7"),
        ] {
            let got = idempotency_key(Uuid::from_u128(event_id), &hook(Uuid::from_u128(hook_uuid)));
            assert_eq!(got, key, "hook {hook_uuid}, event {event_id}");
        }
        let readme = hook(Uuid::parse_str("2edb8bef-21f1-41f9-baa1-17d5e2b12294").unwrap());
        let event = Uuid::parse_str("27bcb10d-0532-42a9-b19d-ca480b4f4910").unwrap();
        assert_eq!(
            idempotency_key(event, &readme),
            "5419d181-0f10-51de-8a10-fa9c8ed6290f"
        );
        assert_eq!(
            Uuid::parse_str(&idempotency_key(e1, &a))
                .unwrap()
                .get_version_num(),
            5
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_all_http_date_forms() {
        // 1994-11-06T08:49:37Z
        let base = UNIX_EPOCH + Duration::from_secs(784_111_777);
        let now = base - Duration::from_secs(120);
        assert_eq!(parse_retry_after("30", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        for date in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(
                parse_retry_after(date, now),
                Some(Duration::from_secs(120)),
                "{date}"
            );
        }
        let later = base + Duration::from_secs(5);
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", later),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        for bad in ["", "soon", "-5", "1.5", "Sun, 99 Nov 1994 08:49:37 GMT"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn statuses_are_classified() {
        let l = Duration::from_millis(3);
        let s = |c| StatusCode::from_u16(c).unwrap();
        assert_eq!(
            classify_status(s(204), None, l),
            AttemptOutcome::Delivered {
                status: 204,
                latency: l
            }
        );
        for retry in [408, 425, 429, 500, 502, 503, 504, 599] {
            assert_eq!(
                classify_status(s(retry), None, l).label(),
                "retry",
                "{retry}"
            );
        }
        for fin in [300, 301, 302, 307, 308, 400, 401, 403, 404, 409, 422] {
            let out = classify_status(s(fin), None, l);
            assert!(
                matches!(
                    out,
                    AttemptOutcome::Final {
                        disable_hook: false,
                        ..
                    }
                ),
                "{fin}: {out:?}"
            );
        }
        assert!(matches!(
            classify_status(s(410), None, l),
            AttemptOutcome::Final {
                status: Some(410),
                disable_hook: true,
                ..
            }
        ));
        let ra = Some(Duration::from_secs(7));
        assert!(matches!(
            classify_status(s(503), ra, l),
            AttemptOutcome::Retry { status: Some(503), retry_after, .. } if retry_after == ra
        ));
    }

    #[test]
    fn logged_headers_hide_secrets_and_keep_gitlabs_limits() {
        let mut sent = HeaderMap::new();
        sent.insert(X_GITLAB_TOKEN, HeaderValue::from_static("t0ken"));
        sent.insert(WEBHOOK_SIGNATURE, HeaderValue::from_static("v1,c2ln"));
        sent.insert(X_GITLAB_EVENT, HeaderValue::from_static("Job Hook"));
        let logged = logged_request_headers(&sent, true);
        assert_eq!(logged["x-gitlab-token"], REDACTED);
        assert_eq!(logged["webhook-signature"], REDACTED);
        assert_eq!(logged["authorization"], REDACTED);
        assert_eq!(logged["x-gitlab-event"], "Job Hook");
        assert!(
            logged_request_headers(&sent, false)
                .get("authorization")
                .is_none()
        );

        let mut answer = HeaderMap::new();
        for n in 0..60 {
            let name = HeaderName::try_from(format!("x-h{n:02}")).unwrap();
            answer.insert(name, HeaderValue::try_from("é".repeat(700)).unwrap());
        }
        let logged = logged_response_headers(&answer);
        let logged = logged.as_object().unwrap();
        assert_eq!(logged.len(), RESPONSE_HEADERS_LIMIT);
        for value in logged.values() {
            // 1400 bytes of two-byte characters, cut on a boundary below 1 KB.
            assert_eq!(value.as_str().unwrap().len(), 1024);
        }
        assert_eq!(cut("aé", 2), "a");
        assert_eq!(cut("abc", 8), "abc");
    }

    #[test]
    fn userinfo_becomes_credentials_and_leaves_the_url() {
        let mut url = Url::parse("https://al%40ice:p%3Ass@example.com/hook?x=1").unwrap();
        assert_eq!(
            take_userinfo(&mut url),
            Some(("al@ice".into(), Some("p:ss".into())))
        );
        assert_eq!(url.as_str(), "https://example.com/hook?x=1");
        let mut plain = Url::parse("https://example.com/").unwrap();
        assert_eq!(take_userinfo(&mut plain), None);
    }

    #[test]
    fn config_errors_are_reported() {
        let bad_cidr = DeliverConfig {
            allow_cidrs: vec!["127.0.0.0/40".into()],
            ..DeliverConfig::default()
        };
        assert!(matches!(
            Deliverer::new(bad_cidr),
            Err(DeliverError::AllowList(_))
        ));
        let zero = DeliverConfig {
            timeout: Duration::ZERO,
            ..DeliverConfig::default()
        };
        assert!(matches!(
            Deliverer::new(zero),
            Err(DeliverError::ZeroTimeout)
        ));
        let newline = DeliverConfig {
            instance_url: "http://x\n".into(),
            ..DeliverConfig::default()
        };
        assert!(matches!(
            Deliverer::new(newline),
            Err(DeliverError::InstanceUrl(_))
        ));
    }
}
