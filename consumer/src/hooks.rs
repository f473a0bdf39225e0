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

/// Checks a hook URL before it is stored: absolute, http or https, with a host, no CR/LF. The
/// reasons never quote the URL: it may carry credentials.
pub fn validate_url(url: &str) -> Result<(), String> {
    if url.contains(['\r', '\n']) {
        return Err("a hook URL must not contain CR or LF".into());
    }
    let parsed =
        reqwest::Url::parse(url).map_err(|e| format!("the hook URL is not a valid URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "only http and https hook URLs are allowed, not {}",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("the hook URL has no host".into());
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
    if hookline_cistate::secrets::is_sealed(token) {
        return Err(format!(
            "a hook token must not start with {} (the form of a sealed secret)",
            hookline_cistate::secrets::SEALED_PREFIX
        ));
    }
    Ok(())
}

/// What a secret part of a URL reads as in listings, API answers and the delivery log; given
/// back in an edit, it stands for the stored value ([`unmask_url`]).
pub const MASK: &str = "*****";

/// The URL with everything that may be a credential replaced by [`MASK`]: the Basic-auth
/// password (or, without one, the user name, which is then often a token:
/// `https://TOKEN@host/`), and the value of every query parameter (`?token=`, `?sig=`, `?k=`:
/// names do not tell which carry secrets). Path segments are shown: a secret there (as some
/// chat services put it) is not recognisable; prefer the hook's token or the query string.
pub fn masked_url(url: &str) -> String {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        // Stored URLs were validated; should one not parse, show nothing that may be a secret.
        return "[unparsable URL]".into();
    };
    let masked_userinfo = if parsed.password().is_some() {
        parsed.set_password(Some(MASK)).is_ok()
    } else if !parsed.username().is_empty() {
        parsed.set_username(MASK).is_ok()
    } else {
        true
    };
    if !masked_userinfo {
        return "[unprintable URL with credentials]".into();
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let masked = if v.is_empty() { "" } else { MASK };
                (k.into_owned(), masked.to_owned())
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// The URL an edit means when it gives back masked parts (a GET, changed, then PUT): each
/// [`MASK`] where the stored URL has a user name, password or query value takes the stored
/// value. Allowed only while the scheme, host and port stay the same: stored credentials never
/// follow a hook to another server (give them in full there). A URL without a mask is returned
/// as given.
pub fn unmask_url(given: &str, stored: &str) -> Result<String, String> {
    if !given.contains(MASK) && !given.contains("%2A%2A%2A%2A%2A") {
        return Ok(given.to_owned());
    }
    let refused = |why: &str| {
        Err(format!(
            "the URL holds the mask {MASK} {why}; give the credentials in full"
        ))
    };
    let mut url =
        reqwest::Url::parse(given).map_err(|e| format!("the hook URL is not a valid URL: {e}"))?;
    let Ok(old) = reqwest::Url::parse(stored) else {
        return refused("but the stored URL cannot be read");
    };
    if url.scheme() != old.scheme()
        || url.host_str() != old.host_str()
        || url.port_or_known_default() != old.port_or_known_default()
    {
        return refused(
            "but its scheme, host or port changed (stored credentials stay with their server)",
        );
    }
    let is_mask = |s: &str| s == MASK || s == "%2A%2A%2A%2A%2A";
    if is_mask(url.username()) {
        if old.username().is_empty() {
            return refused("as its user, where the stored URL has none");
        }
        let _ = url.set_username(old.username());
    }
    if url.password().is_some_and(is_mask) {
        match old.password() {
            Some(p) => {
                let _ = url.set_password(Some(p));
            }
            None => return refused("as its password, where the stored URL has none"),
        }
    }
    if url.query().is_some() {
        let stored_pairs: Vec<(String, String)> = old
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let mut seen: std::collections::HashMap<String, usize> = Default::default();
        let mut pairs = Vec::new();
        for (k, v) in url.query_pairs() {
            let nth = seen.entry(k.to_string()).or_default();
            let value = if v == MASK {
                match stored_pairs.iter().filter(|(sk, _)| *sk == k).nth(*nth) {
                    Some((_, stored)) => stored.clone(),
                    None => {
                        return refused(&format!(
                            "as the value of {k:?}, where the stored URL has none"
                        ));
                    }
                }
            } else {
                v.into_owned()
            };
            *nth += 1;
            pairs.push((k.into_owned(), value));
        }
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    if url.as_str().contains(MASK) {
        return refused("where the stored URL has no secret to keep");
    }
    Ok(url.to_string())
}

/// Whether two URLs name the same thing once parsed (`HTTP://Host:80/` is `http://host/`, and
/// `?flag` is `?flag=`), so a GET -> PUT round trip is no change.
pub fn same_url(a: &str, b: &str) -> bool {
    let (Ok(a), Ok(b)) = (reqwest::Url::parse(a), reqwest::Url::parse(b)) else {
        return a == b;
    };
    let pairs = |u: &reqwest::Url| u.query_pairs().into_owned().collect::<Vec<_>>();
    a.scheme() == b.scheme()
        && a.username() == b.username()
        && a.password() == b.password()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
        && a.path() == b.path()
        && pairs(&a) == pairs(&b)
        && a.fragment() == b.fragment()
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
    fn listed_urls_hide_every_credential() {
        assert_eq!(
            masked_url("http://hookuser:secret@hooks.example.com:8080/ci?x=1"),
            "http://hookuser:*****@hooks.example.com:8080/ci?x=*****"
        );
        assert_eq!(
            masked_url("https://:p%40ss@example.com/"),
            "https://:*****@example.com/"
        );
        // A user without a password is often a token (`https://TOKEN@host/`).
        assert_eq!(
            masked_url("http://glpat-abcdef@example.com/"),
            "http://*****@example.com/"
        );
        assert_eq!(
            masked_url("https://example.com/h?token=s3cret&sig=abc&empty=&flag"),
            "https://example.com/h?token=*****&sig=*****&empty=&flag="
        );
        assert_eq!(masked_url("http://example.com/x"), "http://example.com/x");
        assert!(!masked_url("http://u:secret@exa mple.com/").contains("secret"));
        assert!(!masked_url("https://h/?a%20b=s3cret").contains("s3cret"));
    }

    #[test]
    fn masks_given_back_keep_the_stored_values_on_the_same_server_only() {
        let stored = "https://user:pw@hooks.example.com/ci?token=t0k&channel=builds";
        let masked = masked_url(stored);
        // The GET -> PUT round trip: the stored URL, not the mask.
        assert!(same_url(&unmask_url(&masked, stored).unwrap(), stored));
        // A path changed on the same server keeps the credentials.
        let moved = masked.replace("/ci", "/ci2");
        let unmasked = unmask_url(&moved, stored).unwrap();
        assert!(
            unmasked.contains("user:pw@") && unmasked.contains("token=t0k"),
            "{unmasked}"
        );
        assert!(unmasked.contains("/ci2"));
        // Another host: refused, never carried over.
        let error =
            unmask_url(&masked.replace("hooks.example.com", "evil.test"), stored).unwrap_err();
        assert!(error.contains("host"), "{error}");
        // A mask where nothing is stored: refused, not written as a password.
        let error = unmask_url(
            "https://user:*****@hooks.example.com/",
            "https://user@hooks.example.com/",
        )
        .unwrap_err();
        assert!(error.contains("password"), "{error}");
        let error = unmask_url("https://hooks.example.com/?new=*****", stored).unwrap_err();
        assert!(error.contains("\"new\""), "{error}");
        // No mask: as given.
        assert_eq!(
            unmask_url("https://a.test/x", stored).unwrap(),
            "https://a.test/x"
        );
    }

    #[test]
    fn validation_errors_do_not_echo_the_url() {
        for bad in [
            "ftp://user:s3cret@example.com/",
            "http://user:s3cret@/",
            "not a url with s3cret",
        ] {
            let error = validate_url(bad).unwrap_err();
            assert!(!error.contains("s3cret"), "{error}");
        }
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
