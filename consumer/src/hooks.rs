//! The hook registry as the pipeline sees it: each project's job hooks, cached briefly; whether
//! a hook may be called now; and its health after an attempt (GitLab's auto-disable rule, kept
//! by the store so every consumer instance agrees). Also what `hooks add` checks before a hook
//! is stored ([`validate_url`], [`validate_token`]) and how `hooks list` shows a URL without
//! its Basic-auth password ([`masked_url`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hookline_cistate::{CiStore, Hook, HookFailure, HookState, StoreError};

/// Whether to call a hook now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Call,
    /// Backing off after repeated failures: deliver when this time has come (GitLab drops).
    DeferUntil(DateTime<Utc>),
    /// Disabled for good (40 failures in a row, or 410 Gone) until someone enables it.
    Disabled,
}

pub fn gate(hook: &Hook, now: DateTime<Utc>) -> Gate {
    match hook.state(now) {
        HookState::Executable => Gate::Call,
        HookState::TemporarilyDisabled(until) => Gate::DeferUntil(until),
        HookState::PermanentlyDisabled => Gate::Disabled,
    }
}

/// A project's job hooks and when they were read.
type CachedHooks = HashMap<i64, (Instant, Arc<Vec<Hook>>)>;

/// Job hooks per project, read through a short cache.
#[derive(Debug)]
pub struct HookRegistry {
    store: Arc<dyn CiStore>,
    ttl: Duration,
    cache: Mutex<CachedHooks>,
}

impl HookRegistry {
    pub fn new(store: Arc<dyn CiStore>, ttl: Duration) -> Self {
        Self {
            store,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, CachedHooks> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The job hooks of each project in `project_ids`, from the cache when fresh.
    pub async fn for_projects(
        &self,
        project_ids: impl IntoIterator<Item = i64>,
    ) -> Result<HashMap<i64, Arc<Vec<Hook>>>, StoreError> {
        let now = Instant::now();
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        {
            let cache = self.cache();
            for id in project_ids {
                if out.contains_key(&id) || missing.contains(&id) {
                    continue;
                }
                match cache.get(&id) {
                    Some((at, hooks)) if now.duration_since(*at) < self.ttl => {
                        out.insert(id, hooks.clone());
                    }
                    _ => missing.push(id),
                }
            }
        }
        for id in missing {
            let hooks = Arc::new(self.store.job_hooks(id).await?);
            self.cache().insert(id, (Instant::now(), hooks.clone()));
            out.insert(id, hooks);
        }
        Ok(out)
    }

    /// One hook, fresh from the store (retries must see its current health and settings).
    pub async fn hook(&self, id: i64) -> Result<Option<Hook>, StoreError> {
        self.store.hook(id).await
    }

    /// Puts the hook's new health into the cached list of its project, so the next events of
    /// the project see a back-off at once rather than after the cache expires.
    fn refresh(&self, hook: &Hook) {
        let mut cache = self.cache();
        if let Some((_, hooks)) = cache.get_mut(&hook.project_id) {
            let mut list: Vec<Hook> = hooks.as_ref().clone();
            if let Some(h) = list.iter_mut().find(|h| h.id == hook.id) {
                *h = hook.clone();
                *hooks = Arc::new(list);
            }
        }
    }

    /// Records a success: resets the hook's failures.
    ///
    /// Only a hook seen failing needs the write. Nearly every delivery goes to a healthy hook,
    /// and a store round trip per delivery capped throughput at the pool's round-trip rate.
    /// `hook` is the cached copy on the main path (refreshed on every failure this instance
    /// records) and a fresh one on the retry path; a failure recorded by another instance since
    /// the cache was loaded is reset by the first success after the cache expires.
    pub async fn succeeded(&self, hook: &Hook) -> Result<(), StoreError> {
        if hook.recent_failures == 0 && hook.disabled_until.is_none() {
            return Ok(());
        }
        self.store.record_hook_success(hook.id).await?;
        let mut healthy = hook.clone();
        healthy.recent_failures = 0;
        healthy.disabled_until = None;
        self.refresh(&healthy);
        Ok(())
    }

    /// Records a failed delivery that ended at `now` (counted only if the hook was executable
    /// then, as in GitLab), and keeps the cached copy of the hook in step with the store.
    pub async fn failed(&self, hook: &Hook, now: DateTime<Utc>) -> Result<HookFailure, StoreError> {
        let recorded = self.store.record_hook_failure(hook.id, now).await?;
        match &recorded {
            HookFailure::Counted(h) | HookFailure::NotExecutable(h) => self.refresh(h),
            HookFailure::Gone => {}
        }
        Ok(recorded)
    }

    /// Disables the hook for good (the receiver answered 410 Gone).
    pub async fn disable(&self, hook: &Hook) -> Result<(), StoreError> {
        self.store.disable_hook(hook.id).await?;
        self.cache().remove(&hook.project_id);
        Ok(())
    }
}

/// Checks a hook URL before it is stored: absolute, http or https, with a host, no CR/LF.
pub fn validate_url(url: &str) -> Result<(), String> {
    if url.contains(['\r', '\n']) {
        return Err("a hook URL must not contain CR or LF".into());
    }
    let parsed =
        reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a valid URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "{url:?}: only http and https hook URLs are allowed, not {}",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    Ok(())
}

/// Checks a hook's token before it is stored: it is sent verbatim as `X-Gitlab-Token`, so a
/// CR or LF (or any other control character) would make every delivery fail at send time, or
/// worse, split the header.
pub fn validate_token(token: &str) -> Result<(), String> {
    if token.contains(['\r', '\n']) {
        return Err("a hook token must not contain CR or LF".into());
    }
    if token.chars().any(|c| c.is_control() && c != '\t') {
        return Err("a hook token must not contain control characters".into());
    }
    Ok(())
}

/// The URL with its Basic-auth password replaced by `*****`, for listings and logs.
pub fn masked_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            if parsed.set_password(Some("*****")).is_ok() {
                parsed.to_string()
            } else {
                "[unprintable URL with a password]".into()
            }
        }
        Ok(_) => url.to_owned(),
        // Stored URLs were validated; should one not parse, show nothing that may be a secret.
        Err(_) if url.contains('@') => "[unparsable URL with userinfo]".into(),
        Err(_) => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookline_cistate::{MemoryStore, NewHook};

    #[test]
    fn only_http_urls_with_a_host_are_accepted() {
        assert!(validate_url("https://hooks.example.com/ci").is_ok());
        assert!(validate_url("http://127.0.0.1:8080/hook").is_ok());
        for bad in [
            "ftp://example.com/x",
            "not a url",
            "/relative",
            "http://",
            "javascript:alert(1)",
            "http://a/\nx",
        ] {
            assert!(validate_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn tokens_with_line_breaks_or_control_characters_are_refused() {
        assert!(validate_token("s3cret").is_ok());
        assert!(validate_token("with space and\ttab").is_ok());
        for bad in ["a\r\nX-Injected: 1", "a\n", "\rb", "nul\0"] {
            assert!(validate_token(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn listed_urls_hide_the_basic_auth_password() {
        assert_eq!(
            masked_url("http://hookuser:secret@hooks.example.com:8080/ci?x=1"),
            "http://hookuser:*****@hooks.example.com:8080/ci?x=1"
        );
        assert_eq!(
            masked_url("https://:p%40ss@example.com/"),
            "https://:*****@example.com/"
        );
        // A user without a password is not a secret; a plain URL is left as it is.
        assert_eq!(
            masked_url("http://hookuser@example.com/"),
            "http://hookuser@example.com/"
        );
        assert_eq!(masked_url("http://example.com/x"), "http://example.com/x");
        assert!(!masked_url("http://u:secret@exa mple.com/").contains("secret"));
    }

    #[tokio::test]
    async fn cached_hooks_see_their_own_back_off_at_once() {
        let store = Arc::new(MemoryStore::new());
        let hook = store
            .add_hook(&NewHook {
                project_id: 1,
                url: "http://x".into(),
                job_events: true,
                ..NewHook::default()
            })
            .await
            .unwrap();
        let registry = HookRegistry::new(store.clone(), Duration::from_secs(3600));
        let now = Utc::now();
        let mut current = registry.for_projects([1]).await.unwrap()[&1][0].clone();
        for _ in 0..4 {
            let HookFailure::Counted(after) = registry.failed(&current, now).await.unwrap() else {
                panic!("an executable hook counts its failures");
            };
            current = after;
        }
        let cached = registry.for_projects([1]).await.unwrap()[&1][0].clone();
        assert_eq!(cached, current);
        assert!(matches!(gate(&cached, now), Gate::DeferUntil(_)));
        // A failure that ends while the hook backs off is not counted, and the cache agrees.
        let HookFailure::NotExecutable(unchanged) = registry.failed(&cached, now).await.unwrap()
        else {
            panic!("a backing-off hook counted a failure");
        };
        assert_eq!(unchanged.recent_failures, 4);
        registry.succeeded(&cached).await.unwrap();
        let cached = registry.for_projects([1]).await.unwrap()[&1][0].clone();
        assert_eq!(gate(&cached, now), Gate::Call);
        assert_eq!(hook.id, cached.id);
    }
}
