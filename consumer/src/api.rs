//! The hooks API: GitLab's project hooks REST API (`/api/v4/projects/{id}/hooks...`) where it
//! applies, so that a script written for GitLab works with a changed base URL, and its OpenAPI
//! 3.1 document (`/openapi.json`), generated from the handlers below.
//!
//! # Layout
//!
//! - [`AdminToken`]: the operator's token (`Authorization: Bearer` or GitLab's
//!   `PRIVATE-TOKEN`), from `--admin-token-file` (at least [`MIN_ADMIN_TOKEN_LEN`] bytes, a file
//!   only its owner may read, re-read when it changes or on SIGHUP), compared in constant time.
//!   Tokens scoped to a project or a namespace ([`crate::access`]) are looked up by digest; every
//!   route calls [`crate::access::authorize`].
//! - The scoped tokens' routes, GitLab's access tokens API (`/projects/{id}/access_tokens`,
//!   `/groups/{id}/access_tokens`), for the operator only.
//! - [`HookView`], [`HookInput`]: a hook as GitLab names its fields, out and in. The secrets
//!   (`token`, `signing_secret`) are write-only: no response carries them.
//! - The handlers: thin, over [`HookAdmin`] (the implementation the `hooks` commands use too),
//!   so the API refuses what the CLI refuses, with the same reasons; the events listing reads
//!   the delivery log ([`hookline_cistate::delivery_log::recent`]); test and resend call
//!   [`HookOps`] (as `hooks test|resend` do).
//! - [`HookEventView`], [`TestAnswer`], [`ResendAnswer`]: a logged attempt as GitLab's events
//!   API shows it, and what test and resend answer.
//! - [`router`]: the routes and the document, built from one list so they cannot drift apart;
//!   without a token only the document is served (never an open admin API).
//!
//! Errors are GitLab's shapes: `{"message": ...}` (401, 403, 404, 422, 429) or `{"error": ...}`
//! (400).

use std::path::Path as FsPath;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use hookline_cistate::api_tokens::{self, ApiToken, TokenScope};
use hookline_cistate::delivery_log::{self, DeliveryLogEntry, DeliveryLogQuery, StatusFilter};
use hookline_cistate::{Hook, HookEdit, HookState, StoreError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::warn;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::ConsumerError;
use crate::access::{self, Denied, Principal, Wanted};
use crate::hook_admin::{AdminError, HookAdmin, HookSpec};
use crate::hook_ops::{HookOpError, HookOps};
use crate::hooks::masked_url;

/// The shortest admin token accepted, in bytes: it opens every project's hooks, so it must not
/// be guessable (`openssl rand -base64 32` makes a good one).
pub const MIN_ADMIN_TOKEN_LEN: usize = 32;

/// How often the admin token file is looked at for a change (SIGHUP re-reads it at once).
pub const TOKEN_FILE_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// The admin token, an operator credential, kept only as its SHA-256 digest: comparing digests
/// in constant time (`subtle`) leaks neither the token's bytes nor its length through timing.
/// Clones share the digest, so a reload reaches every one.
#[derive(Clone)]
pub struct AdminToken {
    digest: std::sync::Arc<std::sync::RwLock<[u8; 32]>>,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken([redacted])")
    }
}

impl AdminToken {
    fn digest_of(token: &str) -> Result<[u8; 32], ConsumerError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(ConsumerError::Config("the admin token is empty".into()));
        }
        if token.len() < MIN_ADMIN_TOKEN_LEN {
            return Err(ConsumerError::Config(format!(
                "the admin token is {} bytes; it must be at least {MIN_ADMIN_TOKEN_LEN} (make one with `openssl rand -base64 32`)",
                token.len()
            )));
        }
        Ok(Sha256::digest(token.as_bytes()).into())
    }

    /// A token from its text (trimmed); one shorter than [`MIN_ADMIN_TOKEN_LEN`] is refused.
    pub fn new(token: &str) -> Result<Self, ConsumerError> {
        Ok(Self {
            digest: std::sync::Arc::new(std::sync::RwLock::new(Self::digest_of(token)?)),
        })
    }

    fn read_file(path: &FsPath) -> Result<[u8; 32], ConsumerError> {
        let text = hookline_shell::secret_file::read_secret(path, "--admin-token-file")
            .map_err(ConsumerError::Config)?;
        Self::digest_of(&text).map_err(|e| {
            ConsumerError::Config(format!("--admin-token-file: {}: {e}", path.display()))
        })
    }

    /// Reads the token from a file. A file group or others may read (or write) is refused, as
    /// ssh refuses such a key: the token opens every hook's settings.
    pub fn read(path: &FsPath) -> Result<Self, ConsumerError> {
        Ok(Self {
            digest: std::sync::Arc::new(std::sync::RwLock::new(Self::read_file(path)?)),
        })
    }

    /// Reads the file again; on any refusal the token in use stays (and the error says why).
    pub fn reload(&self, path: &FsPath) -> Result<(), ConsumerError> {
        let fresh = Self::read_file(path)?;
        *self.digest.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// Re-reads `path` whenever it changes or the process gets SIGHUP, until `stop`: a rotated
    /// token takes effect without a restart.
    pub fn watch(
        &self,
        path: std::path::PathBuf,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let token = self.clone();
        let file = path.clone();
        hookline_shell::secret_file::watch(path, TOKEN_FILE_CHECK, stop, move || {
            match token.reload(&file) {
                Ok(()) => tracing::info!(file = %file.display(), "admin token re-read"),
                Err(error) => {
                    tracing::error!(%error, "admin token file not re-read; the previous token stays in use")
                }
            }
        })
    }

    /// Whether `presented` is the token.
    pub fn matches(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        let digest = *self.digest.read().unwrap_or_else(|e| e.into_inner());
        digest.ct_eq(&presented).into()
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub admin: HookAdmin,
    /// Test and resend: the consumer's store, HTTP stage and retry topic
    /// ([`crate::Consumer::hook_ops`]).
    pub ops: HookOps,
    pub token: AdminToken,
}

/// A hook as GitLab's API returns it. Of GitLab's event flags only `job_events` means anything
/// here (hookline delivers Job Hooks); the others are always false.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HookView {
    pub id: i64,
    /// The receiver's URL, its credentials masked (`*****`): the Basic-auth password (or a
    /// user name alone) and every query value. Given back in an edit, a mask keeps the stored
    /// value (on the same scheme, host and port only).
    pub url: String,
    pub project_id: i64,
    pub job_events: bool,
    /// Always true: hookline verifies TLS certificates on every delivery.
    pub enable_ssl_verification: bool,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub created_at: Option<DateTime<Utc>>,
    /// `executable`, `temporarily_disabled` (until `disabled_until`) or `disabled`.
    pub alert_status: String,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub disabled_until: Option<DateTime<Utc>>,
    /// hookline's: under strict ordering, send only a build's latest queued event.
    pub collapse: bool,
    pub push_events: bool,
    pub tag_push_events: bool,
    pub merge_requests_events: bool,
    pub repository_update_events: bool,
    pub issues_events: bool,
    pub confidential_issues_events: bool,
    pub note_events: bool,
    pub confidential_note_events: bool,
    pub pipeline_events: bool,
    pub wiki_page_events: bool,
    pub deployment_events: bool,
    pub releases_events: bool,
    pub feature_flag_events: bool,
    /// hookline's, on an edit only: the secrets cleared because the URL changed and the request
    /// did not give them again (`token`, `signing_secret`), as GitLab clears the token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hookline_reset: Vec<String>,
}

impl HookView {
    fn of(hook: &Hook, now: DateTime<Utc>) -> Self {
        let (alert_status, disabled_until) = match hook.state(now) {
            HookState::Executable => ("executable", None),
            HookState::TemporarilyDisabled(until) => ("temporarily_disabled", Some(until)),
            HookState::PermanentlyDisabled => ("disabled", None),
        };
        Self {
            id: hook.id,
            url: masked_url(&hook.url),
            project_id: hook.project_id,
            job_events: hook.job_events,
            enable_ssl_verification: true,
            created_at: hook.created_at,
            alert_status: alert_status.into(),
            disabled_until,
            collapse: hook.collapse,
            push_events: false,
            tag_push_events: false,
            merge_requests_events: false,
            repository_update_events: false,
            issues_events: false,
            confidential_issues_events: false,
            note_events: false,
            confidential_note_events: false,
            pipeline_events: false,
            wiki_page_events: false,
            deployment_events: false,
            releases_events: false,
            feature_flag_events: false,
            hookline_reset: Vec::new(),
        }
    }
}

/// A hook's settings as a request gives them: a JSON body, a form body, or query parameters
/// (GitLab accepts all three). Absent fields keep their value on edit. GitLab's other event
/// flags (`push_events`, ...) and fields are accepted and ignored.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct HookInput {
    /// Required on create.
    pub url: Option<String>,
    /// Sent as `X-Gitlab-Token`; write-only. An empty string clears it.
    pub token: Option<String>,
    /// Standard Webhooks secret (`whsec_<base64>`); write-only. An empty string clears it.
    pub signing_secret: Option<String>,
    /// Default true on create (unlike GitLab: Job Hooks are all hookline sends).
    pub job_events: Option<bool>,
    /// Only true is accepted: hookline always verifies certificates.
    pub enable_ssl_verification: Option<bool>,
    pub collapse: Option<bool>,
}

/// GitLab's error bodies.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiMessage {
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiErrorBody {
    pub error: String,
}

/// A refused request, rendered as GitLab renders it.
#[derive(Debug)]
pub enum ApiError {
    /// 400 `{"error": ...}`: a missing or malformed parameter.
    BadRequest(String),
    /// 401 `{"message": "401 Unauthorized"}`.
    Unauthorized,
    /// 403 `{"message": "403 Forbidden - ..."}`: an operator route with a scoped token.
    Forbidden(String),
    /// 429 `{"message": ...}` with `Retry-After`: too many tests, or the namespace over its
    /// rate limit.
    TooManyRequests(String, std::time::Duration),
    /// 404 `{"message": "404 <what> Not Found"}`.
    NotFound(&'static str),
    /// 422 `{"message": ...}`: the values are refused (URL, token, secret).
    Unprocessable(String),
    /// 500; the cause is logged, not shown.
    Internal,
    /// 503 `{"message": ...}`: the store or Kafka did not answer; try again.
    Unavailable(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = |status: StatusCode, message: String| {
            (status, Json(ApiMessage { message })).into_response()
        };
        match self {
            ApiError::BadRequest(error) => {
                (StatusCode::BAD_REQUEST, Json(ApiErrorBody { error })).into_response()
            }
            ApiError::Unauthorized => message(StatusCode::UNAUTHORIZED, "401 Unauthorized".into()),
            ApiError::Forbidden(why) => {
                message(StatusCode::FORBIDDEN, format!("403 Forbidden - {why}"))
            }
            ApiError::TooManyRequests(m, retry_after) => (
                StatusCode::TOO_MANY_REQUESTS,
                [(
                    header::RETRY_AFTER,
                    retry_after.as_secs().max(1).to_string(),
                )],
                Json(ApiMessage { message: m }),
            )
                .into_response(),
            ApiError::NotFound(what) => {
                message(StatusCode::NOT_FOUND, format!("404 {what} Not Found"))
            }
            ApiError::Unprocessable(m) => message(StatusCode::UNPROCESSABLE_ENTITY, m),
            ApiError::Internal => message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "500 Internal Server Error".into(),
            ),
            ApiError::Unavailable(m) => message(StatusCode::SERVICE_UNAVAILABLE, m),
        }
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Refused(reason) => ApiError::Unprocessable(reason),
            AdminError::UnknownProject(_) => ApiError::NotFound("Project"),
            AdminError::NoHook(_) => ApiError::NotFound("Hook"),
            AdminError::Store(error) => {
                warn!(%error, "hooks API: store error");
                ApiError::Internal
            }
        }
    }
}

impl From<HookOpError> for ApiError {
    fn from(e: HookOpError) -> Self {
        match e {
            HookOpError::NoHook(_) => ApiError::NotFound("Hook"),
            HookOpError::NoEntry(_) => ApiError::NotFound("Hook Log"),
            HookOpError::BodyNotKept { .. } | HookOpError::BodyMismatch(_) | HookOpError::NoLog => {
                ApiError::Unprocessable(e.to_string())
            }
            HookOpError::Throttled { retry_after, .. } => {
                ApiError::TooManyRequests(e.to_string(), retry_after)
            }
            HookOpError::Store(_) | HookOpError::Kafka(_) => {
                warn!(error = %e, "hooks API: hook operation failed");
                ApiError::Unavailable(e.to_string())
            }
        }
    }
}

impl From<Denied> for ApiError {
    fn from(denied: Denied) -> Self {
        match denied {
            Denied::NotFound(what) => ApiError::NotFound(what),
            Denied::OperatorOnly => {
                ApiError::Forbidden("this route takes the operator's admin token".into())
            }
            Denied::Store(error) => {
                warn!(%error, "hooks API: store error while authorizing");
                ApiError::Unavailable("the store did not answer; try again".into())
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Invalid(m) => ApiError::Unprocessable(m),
            other => {
                warn!(error = %other, "hooks API: store error");
                ApiError::Unavailable("the store did not answer; try again".into())
            }
        }
    }
}

/// The one check every route makes: [`access::authorize`] over the admin's store.
async fn authorize(
    state: &ApiState,
    principal: &Principal,
    wanted: Wanted,
) -> Result<(), ApiError> {
    access::authorize(principal, wanted, state.admin.store().as_ref())
        .await
        .map_err(ApiError::from)
}

/// A request's parameters from its JSON or form body, or else its query string.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        let uri = req.uri().clone();
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        let bad = |e: &dyn std::fmt::Display| ApiError::BadRequest(e.to_string());
        if body.is_empty() {
            return match uri.query() {
                Some(_) => Query::<T>::try_from_uri(&uri)
                    .map(|Query(t)| Params(t))
                    .map_err(|e| bad(&e.body_text())),
                None => serde_json::from_slice(b"{}")
                    .map(Params)
                    .map_err(|e| bad(&e)),
            };
        }
        if form {
            let Query(t) = Query::<T>::try_from_uri(
                &format!("/?{}", String::from_utf8_lossy(&body))
                    .parse()
                    .map_err(|e| bad(&e))?,
            )
            .map_err(|e| bad(&e.body_text()))?;
            return Ok(Params(t));
        }
        serde_json::from_slice(&body)
            .map(Params)
            .map_err(|e| bad(&e))
    }
}

/// GitLab's `:id` is a number or a URL-encoded path; only numbers name projects here.
fn project_id(id: &str) -> Result<i64, ApiError> {
    id.parse().map_err(|_| ApiError::NotFound("Project"))
}

fn ssl_verification(input: &HookInput) -> Result<(), ApiError> {
    if input.enable_ssl_verification == Some(false) {
        return Err(ApiError::Unprocessable(
            "enable_ssl_verification=false is not supported: hookline always verifies TLS certificates"
                .into(),
        ));
    }
    Ok(())
}

/// An empty secret clears it; a present one is set.
fn secret_edit(value: Option<String>) -> Option<Option<String>> {
    value.map(|v| Some(v).filter(|v| !v.is_empty()))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ProjectPath {
    /// The project's numeric id.
    pub id: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct HookPath {
    /// The project's numeric id.
    pub id: String,
    /// The hook's id.
    pub hook_id: i64,
}

/// List a project's hooks.
#[utoipa::path(
    get,
    path = "/api/v4/projects/{id}/hooks",
    tag = "hooks",
    params(ProjectPath),
    responses(
        (status = 200, description = "The project's hooks, by id", body = [HookView]),
        (status = 401, description = "No or a wrong token", body = ApiMessage),
        (status = 404, description = "No such project", body = ApiMessage),
        (status = 503, description = "The store did not answer", body = ApiMessage),
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn list_hooks(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(path): Path<ProjectPath>,
) -> Result<Json<Vec<HookView>>, ApiError> {
    let project = project_id(&path.id)?;
    authorize(&state, &principal, Wanted::Project(project)).await?;
    let hooks = state.admin.list(Some(project)).await?;
    if hooks.is_empty() && !state.admin.project_exists(project).await? {
        return Err(ApiError::NotFound("Project"));
    }
    let now = Utc::now();
    Ok(Json(hooks.iter().map(|h| HookView::of(h, now)).collect()))
}

/// Get one hook of a project.
#[utoipa::path(
    get,
    path = "/api/v4/projects/{id}/hooks/{hook_id}",
    tag = "hooks",
    params(HookPath),
    responses(
        (status = 200, description = "The hook", body = HookView),
        (status = 401, description = "No or a wrong token", body = ApiMessage),
        (status = 404, description = "No such hook in this project", body = ApiMessage),
        (status = 503, description = "The store did not answer", body = ApiMessage),
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn get_hook(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(path): Path<HookPath>,
) -> Result<Json<HookView>, ApiError> {
    let project = project_id(&path.id)?;
    authorize(&state, &principal, Wanted::Project(project)).await?;
    let hook = state.admin.get(Some(project), path.hook_id).await?;
    Ok(Json(HookView::of(&hook, Utc::now())))
}

/// Add a hook to a project (checked as `hooks add` checks it).
#[utoipa::path(
    post,
    path = "/api/v4/projects/{id}/hooks",
    tag = "hooks",
    params(ProjectPath),
    request_body = HookInput,
    responses(
        (status = 201, description = "The new hook", body = HookView),
        (status = 400, description = "`url` is missing or the body is malformed", body = ApiErrorBody),
        (status = 401, description = "No or a wrong token", body = ApiMessage),
        (status = 404, description = "No such project", body = ApiMessage),
        (status = 422, description = "A refused URL, token or signing secret", body = ApiMessage),
        (status = 503, description = "The store did not answer", body = ApiMessage),
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn add_hook(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(path): Path<ProjectPath>,
    Params(input): Params<HookInput>,
) -> Result<(StatusCode, Json<HookView>), ApiError> {
    let project = project_id(&path.id)?;
    authorize(&state, &principal, Wanted::Project(project)).await?;
    let url = input
        .url
        .clone()
        .ok_or_else(|| ApiError::BadRequest("url is missing".into()))?;
    ssl_verification(&input)?;
    let spec = HookSpec {
        url,
        token: input.token.filter(|t| !t.is_empty()),
        signing_secret: input.signing_secret.filter(|s| !s.is_empty()),
        job_events: input.job_events.unwrap_or(true),
        collapse: input.collapse.unwrap_or(false),
    };
    let hook = state.admin.add(project, spec, false).await?;
    Ok((StatusCode::CREATED, Json(HookView::of(&hook, Utc::now()))))
}

/// Edit a hook: the fields given change, the others stay.
#[utoipa::path(
    put,
    path = "/api/v4/projects/{id}/hooks/{hook_id}",
    tag = "hooks",
    params(HookPath),
    request_body = HookInput,
    responses(
        (status = 200, description = "The edited hook", body = HookView),
        (status = 400, description = "A malformed body", body = ApiErrorBody),
        (status = 401, description = "No or a wrong token", body = ApiMessage),
        (status = 404, description = "No such hook in this project", body = ApiMessage),
        (status = 422, description = "A refused URL, token or signing secret", body = ApiMessage),
        (status = 503, description = "The store did not answer", body = ApiMessage),
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn edit_hook(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(path): Path<HookPath>,
    Params(input): Params<HookInput>,
) -> Result<Json<HookView>, ApiError> {
    let project = project_id(&path.id)?;
    authorize(&state, &principal, Wanted::Project(project)).await?;
    ssl_verification(&input)?;
    let edit = HookEdit {
        url: input.url,
        token: secret_edit(input.token),
        signing_secret: secret_edit(input.signing_secret),
        job_events: input.job_events,
        collapse: input.collapse,
    };
    let edited = state.admin.edit(Some(project), path.hook_id, edit).await?;
    let mut view = HookView::of(&edited.hook, Utc::now());
    view.hookline_reset = edited.reset.iter().map(|r| (*r).to_owned()).collect();
    Ok(Json(view))
}

/// Delete a hook.
#[utoipa::path(
    delete,
    path = "/api/v4/projects/{id}/hooks/{hook_id}",
    tag = "hooks",
    params(HookPath),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No or a wrong token", body = ApiMessage),
        (status = 404, description = "No such hook in this project", body = ApiMessage),
        (status = 503, description = "The store did not answer", body = ApiMessage),
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn delete_hook(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(path): Path<HookPath>,
) -> Result<StatusCode, ApiError> {
    let project = project_id(&path.id)?;
    authorize(&state, &principal, Wanted::Project(project)).await?;
    state.admin.remove(Some(project), path.hook_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One logged attempt, as GitLab's "List project webhook events" shows it, with hookline's
/// own fields after GitLab's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HookEventView {
    /// The log entry's id (`hook_log_id` of resend).
    pub id: i64,
    /// The URL called, credentials masked.
    pub url: String,
    /// Always `job_hooks` (GitLab's name of the trigger of Job Hooks).
    pub trigger: String,
    /// Secrets redacted.
    #[schema(value_type = Object)]
    pub request_headers: serde_json::Value,
    /// The body sent (parsed JSON); `null` past the size the log keeps.
    #[schema(value_type = Option<Object>)]
    pub request_data: Option<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    pub response_headers: Option<serde_json::Value>,
    pub response_body: Option<String>,
    /// Seconds, as GitLab gives it.
    pub execution_duration: f64,
    /// The status as a string, or `internal error` when no answer came (as GitLab).
    pub response_status: String,
    pub internal_error_message: Option<String>,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    /// hookline's: `delivery`, `test` or `resend`.
    pub hookline_trigger: String,
    pub event_id: uuid::Uuid,
    pub idempotency_key: String,
    /// 1 for an event's first attempt.
    pub attempt: i32,
    pub build_id: Option<i64>,
}

impl HookEventView {
    fn of(e: DeliveryLogEntry) -> Self {
        Self {
            id: e.id,
            url: e.url,
            trigger: "job_hooks".into(),
            request_headers: e.request_headers,
            request_data: e
                .request_body
                .map(|b| serde_json::from_str(&b).unwrap_or(serde_json::Value::String(b))),
            response_headers: e.response_headers,
            response_body: e.response_body,
            execution_duration: f64::from(e.duration_ms) / 1000.0,
            response_status: e
                .response_status
                .map_or_else(|| "internal error".to_owned(), |s| s.to_string()),
            internal_error_message: e.internal_error,
            created_at: e.attempted_at,
            hookline_trigger: e.trigger.as_str().into(),
            event_id: e.event_id,
            idempotency_key: e.idempotency_key,
            attempt: e.attempt,
            build_id: e.build_id,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Response statuses: codes (`200`, `500`) or one of `successful` (2xx), `client_failure`
    /// (4xx), `server_failure` (5xx); repeat it (`status[]=...`) or separate with commas.
    #[param(value_type = Option<String>)]
    pub status: Option<String>,
    /// Entries per page (default 20, at most 100).
    pub per_page: Option<u32>,
    /// 1-based page, newest first.
    pub page: Option<u32>,
}

/// GitLab's `status` filter: codes, or one category.
fn status_filter(query: Option<&str>) -> Result<Option<StatusFilter>, ApiError> {
    let values: Vec<String> = query
        .map(|q| {
            url_pairs(q)
                .filter(|(k, _)| k == "status" || k == "status[]")
                .flat_map(|(_, v)| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .unwrap_or_default();
    if values.is_empty() {
        return Ok(None);
    }
    let invalid = || ApiError::BadRequest("status does not have a valid value".into());
    if let [one] = values.as_slice() {
        match one.as_str() {
            "successful" => return Ok(Some(StatusFilter::Successful)),
            "client_failure" => return Ok(Some(StatusFilter::ClientFailure)),
            "server_failure" => return Ok(Some(StatusFilter::ServerFailure)),
            _ => {}
        }
    }
    let codes = values
        .iter()
        .map(|v| v.parse::<i32>().ok().filter(|c| (100..600).contains(c)))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(invalid)?;
    Ok(Some(StatusFilter::Codes(codes)))
}

/// The decoded `key=value` pairs of a query string.
fn url_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            reqwest::Url::parse(&format!("http://x/?a={s}"))
                .ok()
                .and_then(|u| u.query_pairs().next().map(|(_, v)| v.into_owned()))
                .unwrap_or_default()
        };
        (decode(k), decode(v))
    })
}

/// List a hook's recent events (delivery log entries), newest first.
#[utoipa::path(
    get,
    path = "/api/v4/projects/{id}/hooks/{hook_id}/events",
    tag = "hooks",
    params(HookPath, EventsQuery),
    responses(
        (status = 200, description = "A page of the hook's logged attempts, newest first", body = [HookEventView]),
        (status = 400, description = "An invalid `status`, `page` or `per_page`", body = ApiErrorBody),
        (status = 401, description = "No or a wrong token", body = ApiMessage),
        (status = 404, description = "No such hook in this project", body = ApiMessage),
        (status = 422, description = "The store is not PostgreSQL: there is no delivery log", body = ApiMessage),
        (status = 503, description = "The store did not answer", body = ApiMessage),
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn list_events(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(path): Path<HookPath>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let project = project_id(&path.id)?;
    authorize(&state, &principal, Wanted::Project(project)).await?;
    let Query(query) = Query::<EventsQuery>::try_from_uri(&uri)
        .map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let status = status_filter(uri.query())?;
    let hook = state.admin.get(Some(project), path.hook_id).await?;
    let pool = state
        .ops
        .store
        .pg_pool()
        .ok_or_else(|| ApiError::from(HookOpError::NoLog))?;
    let per_page = query
        .per_page
        .unwrap_or(delivery_log::DEFAULT_LIMIT)
        .clamp(1, delivery_log::MAX_LIMIT);
    let page = query.page.unwrap_or(1).max(1);
    let entries = delivery_log::recent(
        pool,
        &DeliveryLogQuery {
            hook_id: hook.id,
            status,
            page,
            limit: per_page,
            ..DeliveryLogQuery::default()
        },
    )
    .await
    .map_err(|e| ApiError::from(HookOpError::Store(e)))?;
    let events: Vec<HookEventView> = entries.into_iter().map(HookEventView::of).collect();
    Ok((
        [
            ("x-page", page.to_string()),
            ("x-per-page", per_page.to_string()),
        ],
        Json(events),
    )
        .into_response())
}

/// What a test answers: the receiver's answer to a sample Job Hook sent now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TestAnswer {
    /// `201 Created`, as GitLab answers a test it ran (whatever the receiver said).
    pub message: String,
    /// The receiver's status; `null` when no answer came.
    pub response_status: Option<u16>,
    /// The receiver's body, its first 8 KB.
    pub response_body: Option<String>,
    /// Why no answer came, or why the attempt counts as failed.
    pub internal_error_message: Option<String>,
    /// Seconds.
    pub execution_duration: f64,
    /// The test's delivery log entry (`null` when it could not be written).
    pub hook_log_id: Option<i64>,
    /// The project has no build: the sample build was sent.
    pub synthetic: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct TestPath {
    /// The project's numeric id.
    pub id: String,
    /// The hook's id.
    pub hook_id: i64,
    /// GitLab's trigger name; only `job_events` is known here.
    pub trigger: String,
}

/// Send the hook a Job Hook for the project's most recent build now (GitLab's "Test").
#[utoipa::path(
    post,
    path = "/api/v4/projects/{id}/hooks/{hook_id}/test/{trigger}",
    tag = "hooks",
    params(TestPath),
    responses(
        (status = 201, description = "The test ran; the receiver's answer", body = TestAnswer),
        (status = 401, description = "No or a wrong token", body = ApiMessage),
        (status = 429, description = "The hook was tested 5 times within a minute, or its namespace is over its rate limit; nothing was sent (see Retry-After)", body = ApiMessage),
        (status = 404, description = "No such hook in this project", body = ApiMessage),
        (status = 422, description = "A trigger other than `job_events`", body = ApiMessage),
        (status = 503, description = "The store did not answer", body = ApiMessage),
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn test_hook(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(path): Path<TestPath>,
) -> Result<(StatusCode, Json<TestAnswer>), ApiError> {
    let project = project_id(&path.id)?;
    authorize(&state, &principal, Wanted::Project(project)).await?;
    let hook = state.admin.get(Some(project), path.hook_id).await?;
    if path.trigger != "job_events" {
        return Err(ApiError::Unprocessable(format!(
            "trigger {} is not supported: hookline sends Job Hooks only (job_events)",
            path.trigger
        )));
    }
    let tested = state.ops.test(hook.id).await?;
    let internal_error_message = match &tested.outcome {
        crate::deliver::AttemptOutcome::Delivered { .. } => None,
        _ => tested.entry.internal_error.clone().or_else(|| {
            tested
                .status
                .is_none()
                .then(|| tested.outcome.label().to_owned())
        }),
    };
    Ok((
        StatusCode::CREATED,
        Json(TestAnswer {
            message: "201 Created".into(),
            response_status: tested.status,
            response_body: tested.body,
            internal_error_message,
            execution_duration: tested.duration.as_secs_f64(),
            hook_log_id: (tested.entry.id != 0).then_some(tested.entry.id),
            synthetic: tested.synthetic,
        }),
    ))
}

/// What a resend answers: the logged delivery is on the retry topic, due now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResendAnswer {
    /// `202 Accepted`: the delivery goes out through the retry path (logged with the trigger
    /// `resend`), not within this request.
    pub message: String,
    pub hook_log_id: i64,
    pub event_id: uuid::Uuid,
    /// The same as the logged attempt's: receivers deduplicate on it.
    pub idempotency_key: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct EventPath {
    /// The project's numeric id.
    pub id: String,
    /// The hook's id.
    pub hook_id: i64,
    /// The delivery log entry's id (an event's `id`).
    pub hook_log_id: i64,
}

/// Resend one logged event through the retry path, with its `Idempotency-Key`.
#[utoipa::path(
    post,
    path = "/api/v4/projects/{id}/hooks/{hook_id}/events/{hook_log_id}/resend",
    tag = "hooks",
    params(EventPath),
    responses(
        (status = 202, description = "Queued on the retry topic, due now", body = ResendAnswer),
        (status = 401, description = "No or a wrong token", body = ApiMessage),
        (status = 404, description = "No such hook in this project, or no such event of it", body = ApiMessage),
        (status = 422, description = "The log kept no body for this event (too large), or no log", body = ApiMessage),
        (status = 503, description = "The store or Kafka did not answer", body = ApiMessage),
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn resend_event(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(path): Path<EventPath>,
) -> Result<(StatusCode, Json<ResendAnswer>), ApiError> {
    let project = project_id(&path.id)?;
    authorize(&state, &principal, Wanted::Project(project)).await?;
    let hook = state.admin.get(Some(project), path.hook_id).await?;
    let resent = state.ops.resend(Some(hook.id), path.hook_log_id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ResendAnswer {
            message: "202 Accepted".into(),
            hook_log_id: resent.log_id,
            event_id: resent.event_id,
            idempotency_key: resent.idempotency_key,
        }),
    ))
}

/// A scoped token as the access tokens API shows it (GitLab's field names where they apply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AccessTokenView {
    pub id: i64,
    pub name: String,
    /// `project` or `namespace`.
    pub scope: String,
    pub scope_id: i64,
    /// Always `["api"]`: a scoped token manages its scope's hooks through this API.
    pub scopes: Vec<String>,
    pub revoked: bool,
    /// Neither revoked nor expired.
    pub active: bool,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<DateTime<Utc>>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<DateTime<Utc>>,
    /// Only in the answer that created it: the token itself, shown this once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl AccessTokenView {
    fn of(t: &ApiToken, token: Option<String>) -> Self {
        let (scope, scope_id) = match t.scope {
            TokenScope::Project(id) => ("project", id),
            TokenScope::Namespace(id) => ("namespace", id),
        };
        Self {
            id: t.id,
            name: t.name.clone(),
            scope: scope.into(),
            scope_id,
            scopes: vec!["api".into()],
            revoked: t.revoked_at.is_some(),
            active: t.active(Utc::now()),
            created_at: t.created_at,
            expires_at: t.expires_at,
            last_used_at: t.last_used_at,
            token,
        }
    }
}

/// A token to create.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct AccessTokenInput {
    /// What it is for (shown in listings).
    pub name: Option<String>,
    /// A date (`2027-01-31`, expiring at its start, UTC) or an RFC 3339 time; none: no expiry.
    pub expires_at: Option<String>,
    /// Accepted for GitLab's clients; only `api` is meaningful.
    pub scopes: Option<Vec<String>>,
}

fn expiry(input: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    let Some(text) = input.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(Some(at.with_timezone(&Utc)));
    }
    chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| Some(t.and_utc()))
        .ok_or_else(|| {
            ApiError::BadRequest(
                "expires_at is invalid: give a date (YYYY-MM-DD) or an RFC 3339 time".into(),
            )
        })
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct TokenPath {
    /// The project's (or group's: root namespace's) numeric id.
    pub id: String,
    /// The token's id.
    pub token_id: i64,
}

/// The scope a token route names: a project, or a group (hookline's root namespace).
fn token_scope(kind: &str, id: &str) -> Result<TokenScope, ApiError> {
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::NotFound(if kind == "groups" { "Group" } else { "Project" }))?;
    Ok(if kind == "groups" {
        TokenScope::Namespace(id)
    } else {
        TokenScope::Project(id)
    })
}

async fn token_pool(
    state: &ApiState,
    principal: &Principal,
) -> Result<hookline_cistate::PgPool, ApiError> {
    authorize(state, principal, Wanted::Operator).await?;
    state
        .admin
        .store()
        .pg_pool()
        .cloned()
        .ok_or_else(|| ApiError::Unprocessable("scoped tokens need a PostgreSQL store".into()))
}

async fn list_tokens(
    state: &ApiState,
    principal: &Principal,
    scope: TokenScope,
) -> Result<Json<Vec<AccessTokenView>>, ApiError> {
    let pool = token_pool(state, principal).await?;
    let tokens = api_tokens::list(&pool, Some(scope)).await?;
    Ok(Json(
        tokens
            .iter()
            .map(|t| AccessTokenView::of(t, None))
            .collect(),
    ))
}

async fn create_token(
    state: &ApiState,
    principal: &Principal,
    scope: TokenScope,
    input: AccessTokenInput,
) -> Result<(StatusCode, Json<AccessTokenView>), ApiError> {
    let pool = token_pool(state, principal).await?;
    let name = input
        .name
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| ApiError::BadRequest("name is missing".into()))?;
    if let Some(scopes) = &input.scopes
        && scopes.iter().any(|s| s != "api")
    {
        return Err(ApiError::BadRequest(
            "scopes does not have a valid value: hookline's tokens have the api scope only".into(),
        ));
    }
    let exists = match scope {
        TokenScope::Project(id) => state.admin.project_exists(id).await?,
        // A namespace is known through its projects; a token for an empty one is allowed.
        TokenScope::Namespace(_) => true,
    };
    if !exists {
        return Err(ApiError::NotFound("Project"));
    }
    let created =
        api_tokens::create(&pool, &name, scope, expiry(input.expires_at.as_deref())?).await?;
    tracing::info!(token_id = created.row.id, %scope, "scoped API token created");
    Ok((
        StatusCode::CREATED,
        Json(AccessTokenView::of(&created.row, Some(created.token))),
    ))
}

async fn revoke_token(
    state: &ApiState,
    principal: &Principal,
    scope: TokenScope,
    token_id: i64,
) -> Result<StatusCode, ApiError> {
    let pool = token_pool(state, principal).await?;
    if !api_tokens::revoke(&pool, token_id, Some(scope)).await? {
        return Err(ApiError::NotFound("Token"));
    }
    tracing::info!(token_id, %scope, "scoped API token revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// List a project's scoped tokens (operator only).
#[utoipa::path(
    get,
    path = "/api/v4/projects/{id}/access_tokens",
    tag = "tokens",
    params(ProjectPath),
    responses(
        (status = 200, description = "The project's tokens, revoked ones too, without their text", body = [AccessTokenView]),
        (status = 401, description = "No or a wrong token", body = ApiMessage),
        (status = 403, description = "A scoped token: this route takes the admin token", body = ApiMessage),
        (status = 404, description = "Not a project id", body = ApiMessage),
        (status = 422, description = "The store is not PostgreSQL", body = ApiMessage),
        (status = 503, description = "The store did not answer", body = ApiMessage),
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn list_project_tokens(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(path): Path<ProjectPath>,
) -> Result<Json<Vec<AccessTokenView>>, ApiError> {
    list_tokens(&state, &principal, token_scope("projects", &path.id)?).await
}

/// Create a token scoped to a project (operator only); the answer is the only place its text
/// appears.
#[utoipa::path(
    post,
    path = "/api/v4/projects/{id}/access_tokens",
    tag = "tokens",
    params(ProjectPath),
    request_body = AccessTokenInput,
    responses(
        (status = 201, description = "The new token, its text included this once", body = AccessTokenView),
        (status = 400, description = "No name, a bad expires_at or scopes", body = ApiErrorBody),
        (status = 401, description = "No or a wrong token", body = ApiMessage),
        (status = 403, description = "A scoped token: this route takes the admin token", body = ApiMessage),
        (status = 404, description = "No such project", body = ApiMessage),
        (status = 422, description = "The store is not PostgreSQL, or expires_at is past", body = ApiMessage),
        (status = 503, description = "The store did not answer", body = ApiMessage),
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn create_project_token(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(path): Path<ProjectPath>,
    Params(input): Params<AccessTokenInput>,
) -> Result<(StatusCode, Json<AccessTokenView>), ApiError> {
    create_token(
        &state,
        &principal,
        token_scope("projects", &path.id)?,
        input,
    )
    .await
}

/// Revoke a project's token (operator only).
#[utoipa::path(
    delete,
    path = "/api/v4/projects/{id}/access_tokens/{token_id}",
    tag = "tokens",
    params(TokenPath),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "No or a wrong token", body = ApiMessage),
        (status = 403, description = "A scoped token: this route takes the admin token", body = ApiMessage),
        (status = 404, description = "No such active token of this project", body = ApiMessage),
        (status = 422, description = "The store is not PostgreSQL", body = ApiMessage),
        (status = 503, description = "The store did not answer", body = ApiMessage),
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn revoke_project_token(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(path): Path<TokenPath>,
) -> Result<StatusCode, ApiError> {
    revoke_token(
        &state,
        &principal,
        token_scope("projects", &path.id)?,
        path.token_id,
    )
    .await
}

/// List a group's (root namespace's) scoped tokens (operator only).
#[utoipa::path(
    get,
    path = "/api/v4/groups/{id}/access_tokens",
    tag = "tokens",
    params(ProjectPath),
    responses(
        (status = 200, description = "The namespace's tokens, revoked ones too, without their text", body = [AccessTokenView]),
        (status = 401, description = "No or a wrong token", body = ApiMessage),
        (status = 403, description = "A scoped token: this route takes the admin token", body = ApiMessage),
        (status = 404, description = "Not a namespace id", body = ApiMessage),
        (status = 422, description = "The store is not PostgreSQL", body = ApiMessage),
        (status = 503, description = "The store did not answer", body = ApiMessage),
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn list_group_tokens(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(path): Path<ProjectPath>,
) -> Result<Json<Vec<AccessTokenView>>, ApiError> {
    list_tokens(&state, &principal, token_scope("groups", &path.id)?).await
}

/// Create a token scoped to a group (a root namespace: every project in it; operator only).
#[utoipa::path(
    post,
    path = "/api/v4/groups/{id}/access_tokens",
    tag = "tokens",
    params(ProjectPath),
    request_body = AccessTokenInput,
    responses(
        (status = 201, description = "The new token, its text included this once", body = AccessTokenView),
        (status = 400, description = "No name, a bad expires_at or scopes", body = ApiErrorBody),
        (status = 401, description = "No or a wrong token", body = ApiMessage),
        (status = 403, description = "A scoped token: this route takes the admin token", body = ApiMessage),
        (status = 404, description = "Not a namespace id", body = ApiMessage),
        (status = 422, description = "The store is not PostgreSQL, or expires_at is past", body = ApiMessage),
        (status = 503, description = "The store did not answer", body = ApiMessage),
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn create_group_token(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(path): Path<ProjectPath>,
    Params(input): Params<AccessTokenInput>,
) -> Result<(StatusCode, Json<AccessTokenView>), ApiError> {
    create_token(&state, &principal, token_scope("groups", &path.id)?, input).await
}

/// Revoke a group's token (operator only).
#[utoipa::path(
    delete,
    path = "/api/v4/groups/{id}/access_tokens/{token_id}",
    tag = "tokens",
    params(TokenPath),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "No or a wrong token", body = ApiMessage),
        (status = 403, description = "A scoped token: this route takes the admin token", body = ApiMessage),
        (status = 404, description = "No such active token of this namespace", body = ApiMessage),
        (status = 422, description = "The store is not PostgreSQL", body = ApiMessage),
        (status = 503, description = "The store did not answer", body = ApiMessage),
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn revoke_group_token(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(path): Path<TokenPath>,
) -> Result<StatusCode, ApiError> {
    revoke_token(
        &state,
        &principal,
        token_scope("groups", &path.id)?,
        path.token_id,
    )
    .await
}

/// The API's routes and their document, from one list.
fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_hooks, add_hook))
        .routes(routes!(get_hook, edit_hook, delete_hook))
        .routes(routes!(list_events))
        .routes(routes!(test_hook))
        .routes(routes!(resend_event))
        .routes(routes!(list_project_tokens, create_project_token))
        .routes(routes!(revoke_project_token))
        .routes(routes!(list_group_tokens, create_group_token))
        .routes(routes!(revoke_group_token))
}

/// The OpenAPI 3.1 document of the hooks API, as `/openapi.json` serves it.
pub fn openapi() -> OpenApi {
    let mut doc = routes().into_openapi();
    doc.info.title = "hookline hooks API".into();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc.info.description = Some(
        "GitLab's project hooks REST API where it applies; authenticate with \
         `Authorization: Bearer <token>` or `PRIVATE-TOKEN: <token>`. The admin token is an \
         operator credential (every project, and the token routes); a scoped token (`hlpat_...`) \
         sees one project's or one namespace's hooks, and others' answer 404."
            .into(),
    );
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    components.add_security_scheme(
        "private_token",
        SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("PRIVATE-TOKEN"))),
    );
    doc
}

/// Who a request comes from: the admin token, or an active scoped token; `None` for neither.
pub async fn authenticate(
    state: &ApiState,
    presented: &str,
) -> Result<Option<Principal>, StoreError> {
    if state.token.matches(presented) {
        return Ok(Some(Principal::Operator));
    }
    let Some(pool) = state.admin.store().pg_pool() else {
        return Ok(None);
    };
    Ok(api_tokens::authenticate(pool, presented)
        .await?
        .map(|(token_id, scope)| Principal::Scoped { token_id, scope }))
}

/// Refuses a request without an accepted token (`Authorization: Bearer` or `PRIVATE-TOKEN`);
/// hands the handlers who made it ([`Principal`]).
async fn require_token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    mut request: Request,
    next: Next,
) -> Response {
    // The scheme is case-insensitive (RFC 9110), as the producer's API reads it.
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .and_then(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer").then_some(token));
    let private = headers.get("private-token").and_then(|v| v.to_str().ok());
    let Some(presented) = bearer.or(private) else {
        return ApiError::Unauthorized.into_response();
    };
    match authenticate(&state, presented).await {
        Ok(Some(principal)) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Ok(None) => ApiError::Unauthorized.into_response(),
        Err(error) => ApiError::from(error).into_response(),
    }
}

/// `/openapi.json` (no token needed: it holds no secret), and with `state` the hooks API behind
/// its tokens. Without `state` the API's routes are not served at all.
pub fn router(state: Option<ApiState>) -> axum::Router {
    let document = axum::Router::new().route("/openapi.json", get(|| async { Json(openapi()) }));
    let Some(state) = state else {
        return document;
    };
    let (api, _) = routes().split_for_parts();
    let api = api
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state);
    document.merge(api)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: &str = "s3cret-s3cret-s3cret-s3cret-s3cret";

    #[test]
    fn the_token_matches_only_itself_trimmed() {
        let token = AdminToken::new(&format!("  {LONG}\n")).unwrap();
        assert!(token.matches(LONG));
        assert!(!token.matches(&LONG[1..]));
        assert!(!token.matches(&format!("{LONG}2")));
        assert!(!token.matches(""));
        assert!(AdminToken::new(" \n").is_err());
        assert_eq!(format!("{token:?}"), "AdminToken([redacted])");
    }

    #[test]
    fn a_short_admin_token_is_refused_with_how_to_make_one() {
        let error = AdminToken::new("admin-s3cret").unwrap_err().to_string();
        assert!(
            error.contains("12 bytes")
                && error.contains("at least 32")
                && error.contains("openssl"),
            "{error}"
        );
        assert!(!error.contains("admin-s3cret"));
        assert!(AdminToken::new(&"x".repeat(32)).is_ok());
    }

    #[test]
    fn a_token_file_group_or_others_can_read_is_refused_and_a_reload_keeps_the_old_on_failure() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("hookline-token-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, format!("{LONG}\n")).unwrap();
        for mode in [0o644, 0o640] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            let error = AdminToken::read(&file).unwrap_err();
            assert!(error.to_string().contains("chmod 600"), "{error}");
        }
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let token = AdminToken::read(&file).unwrap();
        assert!(token.matches(LONG));
        std::fs::write(&file, "\n").unwrap();
        assert!(
            token
                .reload(&file)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        assert!(token.matches(LONG), "a broken file keeps the token in use");
        let rotated = format!("{LONG}-rotated");
        std::fs::write(&file, &rotated).unwrap();
        token.reload(&file).unwrap();
        assert!(token.matches(&rotated) && !token.matches(LONG));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_document_is_openapi_3_1_with_both_ways_to_authenticate() {
        let doc = serde_json::to_value(openapi()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["bearer"]["scheme"], "bearer");
        assert_eq!(schemes["private_token"]["name"], "PRIVATE-TOKEN");
        assert!(doc["paths"]["/api/v4/projects/{id}/hooks"]["post"].is_object());
    }
}
