//! Who may call the ingestion API: bearer tokens, and JSON bodies only.
//!
//! Tokens come from a file (`--api-token-file`), one per line, so several can be valid at once
//! while clients move from an old token to a new one. Only SHA-256 digests are kept, and a
//! presented token is compared with every digest in constant time (`subtle`), so neither timing
//! nor the number of tokens tells an attacker how close a guess was. Tokens are never logged:
//! [`ApiTokens`]' `Debug` shows how many there are, nothing else.
//!
//! A body must be declared `Content-Type: application/json`: a browser cannot send that
//! cross-site without a CORS preflight (which this API never answers), so a web page cannot
//! make a visitor's browser post transitions.

use std::fmt;
use std::path::Path;

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

/// The bearer tokens the API accepts, as digests.
#[derive(Clone)]
pub struct ApiTokens {
    digests: Vec<[u8; 32]>,
}

impl fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiTokens({} tokens, redacted)", self.digests.len())
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl ApiTokens {
    /// Tokens from a list; each must be at least [`MIN_TOKEN_LEN`] visible ASCII characters.
    pub fn new<S: AsRef<str>>(tokens: &[S]) -> Result<ApiTokens, ProducerError> {
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
        Ok(ApiTokens { digests })
    }

    /// Reads a token file: one token per line; blank lines and lines starting with `#` are
    /// skipped; surrounding whitespace is trimmed.
    pub fn from_file(path: &Path) -> Result<ApiTokens, ProducerError> {
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
        ApiTokens::new(&tokens)
    }

    /// How many tokens are accepted.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `presented` is one of the tokens. Every digest is compared, whatever matched.
    pub fn accepts(&self, presented: &str) -> bool {
        let presented = digest(presented);
        let mut found = subtle::Choice::from(0);
        for known in &self.digests {
            found |= known.ct_eq(&presented);
        }
        found.into()
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
        let tokens = ApiTokens::from_file(&dir).unwrap();
        assert_eq!(tokens.len(), 2);
        assert!(tokens.accepts("old-token-0123456789"));
        assert_eq!(format!("{tokens:?}"), "ApiTokens(2 tokens, redacted)");
        std::fs::write(&dir, "# nothing\n\n").unwrap();
        assert!(ApiTokens::from_file(&dir).is_err());
        std::fs::remove_file(&dir).unwrap();
    }
}
