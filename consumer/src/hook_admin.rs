//! Managing hooks, the one implementation behind the `hooks` commands and the hooks API
//! ([`crate::api`]): what a hook must look like before it is stored (the same checks and the
//! same reasons on both), and add, edit, list, get, remove, enable.
//!
//! The consumer reads hooks through a short cache ([`crate::hooks::HookRegistry`]), so a change
//! made here reaches deliveries within `--hook-cache-ttl`.
//!
//! What is refused on save, besides the shape of each value: a URL the SSRF guard refuses
//! (its host resolved now, with the allowlist; the guard checks again on every delivery, so a
//! name that does not resolve yet is accepted). What an edit resets, as GitLab's
//! `WebHook#reset_token` does: when the URL changes, the token and the signing secret are
//! cleared unless the same request gives them, so whoever may edit a hook cannot point it at
//! their own server and receive the secrets the receiver trusts; masked URL parts
//! ([`crate::hooks::MASK`]) keep their stored values only on the same scheme, host and port.

use std::sync::Arc;
use std::time::Duration;

use hookline_cistate::{CiStore, Hook, HookEdit, NewHook, StoreError};

use crate::hooks::{MASK, same_url, unmask_url, validate_token, validate_url};
use crate::sign::SigningSecret;
use crate::ssrf::{Refusal, SsrfGuard};

/// How long a save waits for the hook's host to resolve; past it the name counts as not
/// resolving (accepted; the delivery checks it again).
pub const SAVE_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The shortest and longest signing key (decoded), as Standard Webhooks requires.
pub const SIGNING_KEY_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// Why a hook operation was refused, grouped by what the caller does about it.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request itself is wrong: fix it and ask again (the API's 422).
    #[error("hook refused: {0}")]
    Refused(String),
    /// The project is not in the CI state store: add it first (the API's 404).
    #[error(
        "hook refused: project {0} is not in the CI state store (add it first, or pass --force if the store is filled later)"
    )]
    UnknownProject(i64),
    /// No such hook (in that project): check the id (the API's 404).
    #[error("no hook {0}")]
    NoHook(i64),
    /// The store failed: try again later (the API's 500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A hook's settings as an operator gives them.
#[derive(Debug, Clone, PartialEq)]
pub struct HookSpec {
    pub url: String,
    /// Sent as `X-Gitlab-Token`.
    pub token: Option<String>,
    /// Standard Webhooks secret, `whsec_<base64>`.
    pub signing_secret: Option<String>,
    pub job_events: bool,
    pub collapse: bool,
}

/// Checks a signing secret before it is stored: `whsec_` and base64 of a 24 to 64 byte key
/// (the reason never quotes the secret).
pub fn validate_signing_secret(secret: &str) -> Result<(), String> {
    let key = SigningSecret::parse(secret).map_err(|e| {
        format!("{e}: a signing secret is whsec_ followed by the base64 of a 24 to 64 byte key")
    })?;
    if !SIGNING_KEY_BYTES.contains(&key.key_len()) {
        return Err(format!(
            "a signing secret's key is 24 to 64 bytes; this one is {} (make one with `openssl rand -base64 32`)",
            key.key_len()
        ));
    }
    Ok(())
}

/// Checks settings before anything touches the store, so a bad value is refused on its own.
pub fn check(
    url: Option<&str>,
    token: Option<&str>,
    signing_secret: Option<&str>,
) -> Result<(), AdminError> {
    if let Some(Err(message)) = url.map(validate_url) {
        return Err(AdminError::Refused(message));
    }
    if let Some(Err(message)) = token.map(validate_token) {
        return Err(AdminError::Refused(message));
    }
    if let Some(Err(message)) = signing_secret.map(validate_signing_secret) {
        return Err(AdminError::Refused(message));
    }
    Ok(())
}

/// What an edit did besides what it was asked: the secrets it cleared because the URL changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Edited {
    pub hook: Hook,
    /// `token`, `signing_secret`: cleared because the URL changed and the request did not give
    /// them again.
    pub reset: Vec<&'static str>,
}

/// The one hook operation surface; cheap to clone.
#[derive(Debug, Clone)]
pub struct HookAdmin {
    store: Arc<dyn CiStore>,
    /// Checks URLs on save as deliveries check them; `None` (`--no-ssrf-guard`, or unit tests)
    /// checks only their shape.
    guard: Option<SsrfGuard>,
}

impl HookAdmin {
    /// Without the SSRF guard on save; see [`HookAdmin::with_guard`].
    pub fn new(store: Arc<dyn CiStore>) -> Self {
        Self { store, guard: None }
    }

    /// The store the hooks live in.
    pub fn store(&self) -> &Arc<dyn CiStore> {
        &self.store
    }

    /// Refuses on save the URLs `guard` refuses (the same guard as deliveries use).
    pub fn with_guard(mut self, guard: Option<SsrfGuard>) -> Self {
        self.guard = guard;
        self
    }

    /// The SSRF guard's view of a URL about to be stored: its port, an IP-literal host, and the
    /// addresses a host name resolves to now. A name that does not resolve (yet) passes: every
    /// delivery resolves and checks it again.
    pub async fn check_destination(&self, url: &str) -> Result<(), AdminError> {
        let Some(guard) = &self.guard else {
            return Ok(());
        };
        let refused = |r: Refusal| AdminError::Refused(r.to_string());
        let parsed = guard.check_url(url).map_err(refused)?;
        let Some(host) = parsed.host_str() else {
            return Ok(());
        };
        match tokio::time::timeout(SAVE_RESOLVE_TIMEOUT, guard.resolve_checked(host)).await {
            Ok(Ok(_)) | Err(_) => Ok(()),
            Ok(Err(r)) if r.is_transient() => Ok(()),
            Ok(Err(r)) => Err(refused(r)),
        }
    }

    /// Adds a hook to `project_id`; unless `force`, the project must be in the store.
    pub async fn add(
        &self,
        project_id: i64,
        spec: HookSpec,
        force: bool,
    ) -> Result<Hook, AdminError> {
        check(
            Some(&spec.url),
            spec.token.as_deref(),
            spec.signing_secret.as_deref(),
        )?;
        if spec.url.contains(MASK) {
            return Err(AdminError::Refused(format!(
                "the URL holds the mask {MASK}: give the credentials in full"
            )));
        }
        self.check_destination(&spec.url).await?;
        if !force && !self.store.project_exists(project_id).await? {
            return Err(AdminError::UnknownProject(project_id));
        }
        Ok(self
            .store
            .add_hook(&NewHook {
                project_id,
                url: spec.url,
                token: spec.token,
                signing_secret: spec.signing_secret,
                job_events: spec.job_events,
                collapse: spec.collapse,
            })
            .await?)
    }

    /// All hooks, or a project's, ordered by id.
    pub async fn list(&self, project_id: Option<i64>) -> Result<Vec<Hook>, AdminError> {
        Ok(self.store.list_hooks(project_id).await?)
    }

    /// Whether the project is in the store.
    pub async fn project_exists(&self, project_id: i64) -> Result<bool, AdminError> {
        Ok(self.store.project_exists(project_id).await?)
    }

    /// One hook; with `project_id`, only if it belongs to that project (a hook of another
    /// project is "not found", as on GitLab).
    pub async fn get(&self, project_id: Option<i64>, id: i64) -> Result<Hook, AdminError> {
        match self.store.hook(id).await? {
            Some(h) if project_id.is_none_or(|p| p == h.project_id) => Ok(h),
            _ => Err(AdminError::NoHook(id)),
        }
    }

    /// Changes the given settings of a hook (checked as on add). A URL that changes clears the
    /// token and the signing secret unless `edit` gives them too (see the module docs); a
    /// masked URL part keeps its stored value; a token or secret given as the mask is no change.
    pub async fn edit(
        &self,
        project_id: Option<i64>,
        id: i64,
        mut edit: HookEdit,
    ) -> Result<Edited, AdminError> {
        let is_mask = |v: &Option<Option<String>>| matches!(v, Some(Some(s)) if s == MASK);
        if is_mask(&edit.token) {
            edit.token = None;
        }
        if is_mask(&edit.signing_secret) {
            edit.signing_secret = None;
        }
        check(
            None,
            edit.token.as_ref().and_then(Option::as_deref),
            edit.signing_secret.as_ref().and_then(Option::as_deref),
        )?;
        let current = self.get(project_id, id).await?;
        let mut reset = Vec::new();
        if let Some(given) = edit.url.take() {
            let url = unmask_url(&given, &current.url).map_err(AdminError::Refused)?;
            check(Some(&url), None, None)?;
            if !same_url(&url, &current.url) {
                self.check_destination(&url).await?;
                if edit.token.is_none() && current.token.is_some() {
                    edit.token = Some(None);
                    reset.push("token");
                }
                if edit.signing_secret.is_none() && current.signing_secret.is_some() {
                    edit.signing_secret = Some(None);
                    reset.push("signing_secret");
                }
                edit.url = Some(url);
            }
        }
        let hook = self
            .store
            .update_hook(id, &edit)
            .await?
            .ok_or(AdminError::NoHook(id))?;
        if !reset.is_empty() {
            tracing::info!(hook_id = id, reset = ?reset, "hook URL changed: secrets not given again were cleared");
        }
        Ok(Edited { hook, reset })
    }

    /// Removes a hook.
    pub async fn remove(&self, project_id: Option<i64>, id: i64) -> Result<(), AdminError> {
        self.get(project_id, id).await?;
        if !self.store.remove_hook(id).await? {
            return Err(AdminError::NoHook(id));
        }
        Ok(())
    }

    /// Clears a hook's failures (re-enables it).
    pub async fn enable(&self, id: i64) -> Result<(), AdminError> {
        if !self.store.enable_hook(id).await? {
            return Err(AdminError::NoHook(id));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookline_cistate::MemoryStore;

    fn spec(url: &str) -> HookSpec {
        HookSpec {
            url: url.into(),
            token: None,
            signing_secret: None,
            job_events: true,
            collapse: false,
        }
    }

    #[tokio::test]
    async fn a_new_url_clears_the_secrets_not_given_with_it() {
        let admin = HookAdmin::new(Arc::new(MemoryStore::new()));
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let mut first = spec("https://u:pw@x.test/a?k=v");
        first.token = Some("t".into());
        first.signing_secret = Some(secret.into());
        let hook = admin.add(1, first, true).await.unwrap();
        let url = |u: &str| HookEdit {
            url: Some(u.into()),
            ..HookEdit::default()
        };
        // The masked URL given back (GET -> PUT): nothing changes.
        let same = admin
            .edit(Some(1), hook.id, url(&crate::hooks::masked_url(&hook.url)))
            .await
            .unwrap();
        assert_eq!(same.hook.url, hook.url);
        assert!(same.reset.is_empty());
        // Another URL, the token given again: only the signing secret is cleared.
        let mut edit = url("https://other.test/b");
        edit.token = Some(Some("t2".into()));
        let moved = admin.edit(Some(1), hook.id, edit).await.unwrap();
        assert_eq!(moved.reset, ["signing_secret"]);
        assert_eq!(moved.hook.token.as_deref(), Some("t2"));
        assert_eq!(moved.hook.signing_secret, None);
        // Another URL alone: the token goes too.
        let moved = admin
            .edit(Some(1), hook.id, url("https://third.test/c"))
            .await
            .unwrap();
        assert_eq!(moved.reset, ["token"]);
        assert_eq!(moved.hook.token, None);
    }

    #[test]
    fn signing_secrets_must_be_base64_of_24_to_64_bytes() {
        assert!(validate_signing_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
        for bad in [
            "whsec_!!!",
            "whsec_",
            "whsec_c2hvcnQ=",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            &format!("whsec_{}", "QUFB".repeat(30)),
        ] {
            let error = validate_signing_secret(bad).unwrap_err();
            assert!(!error.contains("!!!") && !error.contains("c2hv"), "{error}");
        }
    }

    #[tokio::test]
    async fn bad_settings_are_refused_before_the_store_is_asked() {
        let admin = HookAdmin::new(Arc::new(MemoryStore::new()));
        let refused = admin.add(1, spec("ftp://x/y"), true).await.unwrap_err();
        assert!(matches!(refused, AdminError::Refused(ref m) if m.contains("only http")));
        let mut with_token = spec("http://x/y");
        with_token.token = Some("a\r\nX: 1".into());
        assert!(matches!(
            admin.add(1, with_token, true).await,
            Err(AdminError::Refused(_))
        ));
        assert!(matches!(
            admin.add(1, spec("http://x/y"), false).await,
            Err(AdminError::UnknownProject(1))
        ));
        assert!(admin.list(None).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn edits_change_only_what_they_name_and_stay_in_the_project() {
        let admin = HookAdmin::new(Arc::new(MemoryStore::new()));
        let mut first = spec("http://x/a");
        first.token = Some("t".into());
        let hook = admin.add(1, first, true).await.unwrap();
        let edited = admin
            .edit(
                Some(1),
                hook.id,
                HookEdit {
                    collapse: Some(true),
                    url: Some("http://x/a".into()),
                    ..HookEdit::default()
                },
            )
            .await
            .unwrap();
        assert!(edited.hook.collapse);
        assert_eq!(
            edited.hook.token.as_deref(),
            Some("t"),
            "the URL did not change"
        );
        assert!(edited.reset.is_empty());
        let cleared = HookEdit {
            token: Some(None),
            ..HookEdit::default()
        };
        assert_eq!(
            admin
                .edit(Some(1), hook.id, cleared)
                .await
                .unwrap()
                .hook
                .token,
            None
        );
        assert!(matches!(
            admin.get(Some(2), hook.id).await,
            Err(AdminError::NoHook(_))
        ));
        assert!(matches!(
            admin.remove(Some(2), hook.id).await,
            Err(AdminError::NoHook(_))
        ));
        admin.remove(Some(1), hook.id).await.unwrap();
        assert!(matches!(
            admin.get(None, hook.id).await,
            Err(AdminError::NoHook(_))
        ));
    }
}
