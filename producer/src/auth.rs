//! Who may call the ingestion API: bearer tokens, and JSON bodies only.
//!
//! Tokens come from a file (`--api-token-file`), one per line, so several can be valid at once
//! while clients move from an old token to a new one. Only SHA-256 digests are kept, and a
//! presented token is compared with every digest in constant time (`subtle`), so neither timing
//! nor the number of tokens tells an attacker how close a guess was. Tokens are never logged:
//! [`ApiTokens`]' `Debug` shows how many there are, nothing else.
//!
//! The token file must be private (group and others may not read it, as ssh refuses such a
//! key) and is re-read when it changes or on SIGHUP ([`ApiTokens::watch`]): adding a new token
//! and later removing the old one rotates tokens without a restart. A file that is broken when
//! re-read (empty, a short token, readable by others) keeps the tokens in use and says why.
//!
//! A body must be declared `Content-Type: application/json`: a browser cannot send that
//! cross-site without a CORS preflight (which this API never answers), so a web page cannot
//! make a visitor's browser post transitions.
//!
//! Without tokens (`--no-auth`, loopback only) a request must name a loopback host
//! ([`require_loopback_host`]): otherwise a web page whose name was re-pointed at 127.0.0.1 (DNS
//! rebinding) could make a visitor's browser reach the open API as "its own" origin.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ProducerError;
use std::sync::Arc;

use crate::api::ApiError;

/// The shortest token accepted: shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// How often the token file is looked at for a change (SIGHUP re-reads it at once).
pub const TOKEN_FILE_CHECK: Duration = Duration::from_secs(2);

/// The bearer tokens the API accepts, as digests. Clones share them, so a reload reaches all.
#[derive(Clone)]
pub struct ApiTokens {
    digests: Arc<RwLock<Vec<[u8; 32]>>>,
}

impl fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiTokens({} tokens, redacted)", self.len())
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl ApiTokens {
    /// Tokens from a list; each must be at least [`MIN_TOKEN_LEN`] visible ASCII characters.
    pub fn new<S: AsRef<str>>(tokens: &[S]) -> Result<ApiTokens, ProducerError> {
        Ok(ApiTokens {
            digests: Arc::new(RwLock::new(Self::digests(tokens)?)),
        })
    }

    fn digests<S: AsRef<str>>(tokens: &[S]) -> Result<Vec<[u8; 32]>, ProducerError> {
        if tokens.is_empty() {
            return Err(ProducerError::Invalid("no API token given".into()));
        }
        let mut digests = Vec::with_capacity(tokens.len());
        for (i, token) in tokens.iter().enumerate() {
            let token = token.as_ref();
            // The error names the position, never the token.
            if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ProducerError::Invalid(format!(
                    "API token {} is not at least {MIN_TOKEN_LEN} visible ASCII characters",
                    i + 1
                )));
            }
            digests.push(digest(token));
        }
        Ok(digests)
    }

    /// Reads a token file: one token per line; blank lines and lines starting with `#` are
    /// skipped; surrounding whitespace is trimmed. A file group or others may read is refused.
    pub fn from_file(path: &Path) -> Result<ApiTokens, ProducerError> {
        Ok(ApiTokens {
            digests: Arc::new(RwLock::new(Self::file_digests(path)?)),
        })
    }

    fn file_digests(path: &Path) -> Result<Vec<[u8; 32]>, ProducerError> {
        hookline_shell::secret_file::check_private(path, "--api-token-file")
            .map_err(ProducerError::Invalid)?;
        let text = std::fs::read_to_string(path).map_err(|e| {
            ProducerError::io(format!("reading the API token file {}", path.display()), e)
        })?;
        let tokens: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        if tokens.is_empty() {
            return Err(ProducerError::Invalid(format!(
                "the API token file {} holds no token",
                path.display()
            )));
        }
        Self::digests(&tokens)
    }

    /// Reads `path` again; on any refusal the tokens in use stay (the error says why).
    pub fn reload(&self, path: &Path) -> Result<(), ProducerError> {
        let fresh = Self::file_digests(path)?;
        *self.digests.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// Re-reads `path` whenever it changes or the process gets SIGHUP, until `stop`.
    pub fn watch(
        &self,
        path: PathBuf,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let tokens = self.clone();
        let file = path.clone();
        hookline_shell::secret_file::watch(path, TOKEN_FILE_CHECK, stop, move || {
            match tokens.reload(&file) {
                Ok(()) => {
                    tracing::info!(file = %file.display(), tokens = tokens.len(), "API tokens re-read")
                }
                Err(error) => {
                    tracing::error!(%error, "API token file not re-read; the tokens in use stay")
                }
            }
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<[u8; 32]>> {
        self.digests.read().unwrap_or_else(|e| e.into_inner())
    }

    /// How many tokens are accepted.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Whether `presented` is one of the tokens. Every digest is compared, whatever matched.
    pub fn accepts(&self, presented: &str) -> bool {
        let presented = digest(presented);
        let mut found = subtle::Choice::from(0);
        for known in self.read().iter() {
            found |= known.ct_eq(&presented);
        }
        found.into()
    }
}

/// Whether a `Host` header names this machine's loopback: `localhost` (or a name under
/// `.localhost`, which resolves to loopback by RFC 6761), an address in 127.0.0.0/8, or `[::1]`;
/// with or without a port.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((addr, _port)) => addr,
            None => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                name
            } else {
                host
            }
        })
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    name.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Middleware for `--no-auth`: `421 Misdirected Request` when the request's `Host` names
/// anything but loopback. A browser tricked by DNS rebinding always sends the attacker's name as
/// `Host`; a request without one (HTTP/1.0, a test's in-process call) is no browser's and passes.
pub async fn require_loopback_host(request: Request, next: Next) -> Response {
    let host = match request.headers().get(header::HOST) {
        Some(value) => Some(value.to_str().unwrap_or("(not text)")),
        None => request.uri().authority().map(|a| a.as_str()),
    };
    match host {
        None => next.run(request).await,
        Some(host) if is_loopback_host(host) => next.run(request).await,
        Some(host) => ApiError::MisdirectedHost(format!(
            "without authentication (--no-auth) only requests to localhost, 127.0.0.1 or [::1] are served, not Host {:?}",
            host.chars().take(100).collect::<String>()
        ))
        .into_response(),
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive).
fn bearer(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Middleware: `401` with `WWW-Authenticate: Bearer` unless the request carries an accepted
/// token; a no-op when the state has no tokens (`--no-auth`).
pub async fn require_token(
    State(tokens): State<Option<Arc<ApiTokens>>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(tokens) = &tokens else {
        return next.run(request).await;
    };
    match bearer(&request) {
        Some(token) if tokens.accepts(token) => next.run(request).await,
        Some(_) => ApiError::Unauthorized("the bearer token is not valid".into()).into_response(),
        None => ApiError::Unauthorized(
            "authentication required: send Authorization: Bearer <token>".into(),
        )
        .into_response(),
    }
}

/// Middleware: `415` unless the body is declared `application/json` (parameters such as
/// `charset=utf-8` allowed).
pub async fn require_json(request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim());
    match declared {
        Some(essence) if essence.eq_ignore_ascii_case("application/json") => {
            next.run(request).await
        }
        other => ApiError::UnsupportedMediaType(format!(
            "send the body as Content-Type: application/json, not {}",
            other.map_or("nothing".to_owned(), |t| format!("{t:?}"))
        ))
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_token_is_accepted_and_nothing_else() {
        let tokens = ApiTokens::new(&["old-token-0123456789", "new-token-0123456789"]).unwrap();
        assert!(tokens.accepts("old-token-0123456789"));
        assert!(tokens.accepts("new-token-0123456789"));
        for wrong in [
            "",
            "old-token-012345678",
            "old-token-01234567890",
            "OLD-TOKEN-0123456789",
        ] {
            assert!(!tokens.accepts(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn short_or_invisible_tokens_and_empty_files_are_refused_without_echoing_them() {
        let error = ApiTokens::new(&["short"]).unwrap_err().to_string();
        assert!(
            error.contains("token 1") && !error.contains("short"),
            "{error}"
        );
        assert!(ApiTokens::new(&["with a space in it 0123"]).is_err());
        let empty: [&str; 0] = [];
        assert!(ApiTokens::new(&empty).is_err());

        let dir = std::env::temp_dir().join(format!("hookline-tokens-{}", uuid::Uuid::new_v4()));
        std::fs::write(
            &dir,
            "# rotation: old first\n\n  old-token-0123456789  \nnew-token-0123456789\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = ApiTokens::from_file(&dir).unwrap_err().to_string();
        assert!(error.contains("chmod 600"), "{error}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o600)).unwrap();
        let tokens = ApiTokens::from_file(&dir).unwrap();
        assert_eq!(tokens.len(), 2);
        assert!(tokens.accepts("old-token-0123456789"));
        assert_eq!(format!("{tokens:?}"), "ApiTokens(2 tokens, redacted)");
        std::fs::write(&dir, "# nothing\n\n").unwrap();
        assert!(ApiTokens::from_file(&dir).is_err());
        // A reload of a broken file keeps the tokens in use; a good one replaces them.
        assert!(tokens.reload(&dir).is_err());
        assert!(tokens.accepts("old-token-0123456789"));
        std::fs::write(&dir, "rotated-token-0123456789\n").unwrap();
        tokens.reload(&dir).unwrap();
        assert!(tokens.accepts("rotated-token-0123456789"));
        assert!(!tokens.accepts("old-token-0123456789"));
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn only_loopback_hosts_pass_without_authentication() {
        for host in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.",
            "app.localhost:80",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.1.2.3:9",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "attacker.example",
            "attacker.example:8080",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
            "10.0.0.1:8080",
            "[::2]:80",
            "[::1",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
