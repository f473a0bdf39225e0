//! The hooks API: GitLab's project hooks REST API (`/api/v4/projects/{id}/hooks...`) where it
//! applies, so that a script written for GitLab works with a changed base URL, and its OpenAPI
//! 3.1 document (`/openapi.json`), generated from the handlers below.
//!
//! # Layout
//!
//! - [`AdminToken`]: the token every API request must carry (`Authorization: Bearer` or
//!   GitLab's `PRIVATE-TOKEN`), read once from `--admin-token-file`, compared in constant time.
//! - [`HookView`], [`HookInput`]: a hook as GitLab names its fields, out and in. The secrets
//!   (`token`, `signing_secret`) are write-only: no response carries them.
//! - The handlers: thin, over [`HookAdmin`] (the implementation the `hooks` commands use too),
//!   so the API refuses what the CLI refuses, with the same reasons.
//! - [`router`]: the routes and the document, built from one list so they cannot drift apart;
//!   without a token only the document is served (never an open admin API).
//!
//! Errors are GitLab's shapes: `{"message": ...}` (401, 404, 422) or `{"error": ...}` (400).

use std::path::Path as FsPath;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use hookline_cistate::{Hook, HookEdit, HookState};
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
use crate::hook_admin::{AdminError, HookAdmin, HookSpec};
use crate::hooks::masked_url;

/// The admin token, kept only as its SHA-256 digest: comparing digests in constant time
/// (`subtle`) leaks neither the token's bytes nor its length through timing.
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken([redacted])")
    }
}

impl AdminToken {
    /// A token from its text (trimmed); an empty one is refused.
    pub fn new(token: &str) -> Result<Self, ConsumerError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(ConsumerError::Config("the admin token is empty".into()));
        }
        Ok(Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// Reads the token from a file, once at start. A file others may read is refused: the
    /// token opens every hook's settings.
    pub fn read(path: &FsPath) -> Result<Self, ConsumerError> {
        let refused = |why: String| ConsumerError::Config(format!("--admin-token-file: {why}"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(|e| refused(format!("{}: {e}", path.display())))?
                .permissions()
                .mode();
            if mode & 0o004 != 0 {
                return Err(refused(format!(
                    "{} is readable by every user (mode {:o}); chmod o-r it",
                    path.display(),
                    mode & 0o777
                )));
            }
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| refused(format!("{}: {e}", path.display())))?;
        Self::new(&text).map_err(|_| refused(format!("{} is empty", path.display())))
    }

    /// Whether `presented` is the token.
    pub fn matches(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        self.digest.ct_eq(&presented).into()
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub admin: HookAdmin,
    pub token: AdminToken,
}

/// A hook as GitLab's API returns it. Of GitLab's event flags only `job_events` means anything
/// here (hookline delivers Job Hooks); the others are always false.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HookView {
    pub id: i64,
    /// The receiver's URL, its Basic-auth password masked.
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
    /// 404 `{"message": "404 <what> Not Found"}`.
    NotFound(&'static str),
    /// 422 `{"message": ...}`: the values are refused (URL, token, secret).
    Unprocessable(String),
    /// 500; the cause is logged, not shown.
    Internal,
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
            ApiError::NotFound(what) => {
                message(StatusCode::NOT_FOUND, format!("404 {what} Not Found"))
            }
            ApiError::Unprocessable(m) => message(StatusCode::UNPROCESSABLE_ENTITY, m),
            ApiError::Internal => message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "500 Internal Server Error".into(),
            ),
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
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn list_hooks(
    State(state): State<ApiState>,
    Path(path): Path<ProjectPath>,
) -> Result<Json<Vec<HookView>>, ApiError> {
    let project = project_id(&path.id)?;
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
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn get_hook(
    State(state): State<ApiState>,
    Path(path): Path<HookPath>,
) -> Result<Json<HookView>, ApiError> {
    let hook = state
        .admin
        .get(Some(project_id(&path.id)?), path.hook_id)
        .await?;
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
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn add_hook(
    State(state): State<ApiState>,
    Path(path): Path<ProjectPath>,
    Params(input): Params<HookInput>,
) -> Result<(StatusCode, Json<HookView>), ApiError> {
    let project = project_id(&path.id)?;
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
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn edit_hook(
    State(state): State<ApiState>,
    Path(path): Path<HookPath>,
    Params(input): Params<HookInput>,
) -> Result<Json<HookView>, ApiError> {
    let project = project_id(&path.id)?;
    ssl_verification(&input)?;
    let edit = HookEdit {
        url: input.url,
        token: secret_edit(input.token),
        signing_secret: secret_edit(input.signing_secret),
        job_events: input.job_events,
        collapse: input.collapse,
    };
    let hook = state.admin.edit(Some(project), path.hook_id, edit).await?;
    Ok(Json(HookView::of(&hook, Utc::now())))
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
    ),
    security(("bearer" = []), ("private_token" = []))
)]
async fn delete_hook(
    State(state): State<ApiState>,
    Path(path): Path<HookPath>,
) -> Result<StatusCode, ApiError> {
    state
        .admin
        .remove(Some(project_id(&path.id)?), path.hook_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The API's routes and their document, from one list.
fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_hooks, add_hook))
        .routes(routes!(get_hook, edit_hook, delete_hook))
}

/// The OpenAPI 3.1 document of the hooks API, as `/openapi.json` serves it.
pub fn openapi() -> OpenApi {
    let mut doc = routes().into_openapi();
    doc.info.title = "hookline hooks API".into();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc.info.description = Some(
        "GitLab's project hooks REST API where it applies; authenticate with \
         `Authorization: Bearer <token>` or `PRIVATE-TOKEN: <token>`."
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

/// Refuses a request without the token (`Authorization: Bearer` or `PRIVATE-TOKEN`).
async fn require_token(
    State(token): State<AdminToken>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    // The scheme is case-insensitive (RFC 9110), as the producer's API reads it.
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .and_then(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer").then_some(token));
    let private = headers.get("private-token").and_then(|v| v.to_str().ok());
    match bearer.or(private) {
        Some(presented) if token.matches(presented) => next.run(request).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

/// `/openapi.json` (no token needed: it holds no secret), and with `state` the hooks API behind
/// its token. Without `state` the API's routes are not served at all.
pub fn router(state: Option<ApiState>) -> axum::Router {
    let document = axum::Router::new().route("/openapi.json", get(|| async { Json(openapi()) }));
    let Some(state) = state else {
        return document;
    };
    let (api, _) = routes().split_for_parts();
    let api = api
        .layer(middleware::from_fn_with_state(
            state.token.clone(),
            require_token,
        ))
        .with_state(state);
    document.merge(api)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_matches_only_itself_trimmed() {
        let token = AdminToken::new("  s3cret\n").unwrap();
        assert!(token.matches("s3cret"));
        assert!(!token.matches("s3cre"));
        assert!(!token.matches("s3cret2"));
        assert!(!token.matches(""));
        assert!(AdminToken::new(" \n").is_err());
        assert_eq!(format!("{token:?}"), "AdminToken([redacted])");
    }

    #[test]
    fn a_token_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("hookline-token-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = AdminToken::read(&file).unwrap_err();
        assert!(
            error.to_string().contains("readable by every user"),
            "{error}"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(AdminToken::read(&file).unwrap().matches("s3cret"));
        std::fs::write(&file, "\n").unwrap();
        assert!(
            AdminToken::read(&file)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
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
