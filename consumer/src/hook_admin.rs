//! Managing hooks, the one implementation behind the `hooks` commands and the hooks API
//! ([`crate::api`]): what a hook must look like before it is stored (the same checks and the
//! same reasons on both), and add, edit, list, get, remove, enable.
//!
//! The consumer reads hooks through a short cache ([`crate::hooks::HookRegistry`]), so a change
//! made here reaches deliveries within `--hook-cache-ttl`.

use std::sync::Arc;

use hookline_cistate::{CiStore, Hook, HookEdit, NewHook, StoreError};

use crate::hooks::{validate_token, validate_url};

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
    if let Some(secret) = signing_secret
        && !secret.starts_with("whsec_")
    {
        return Err(AdminError::Refused(
            "a signing secret must look like whsec_<base64>".into(),
        ));
    }
    Ok(())
}

/// The one hook operation surface; cheap to clone.
#[derive(Debug, Clone)]
pub struct HookAdmin {
    store: Arc<dyn CiStore>,
}

impl HookAdmin {
    pub fn new(store: Arc<dyn CiStore>) -> Self {
        Self { store }
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

    /// Changes the given settings of a hook (checked as on add).
    pub async fn edit(
        &self,
        project_id: Option<i64>,
        id: i64,
        edit: HookEdit,
    ) -> Result<Hook, AdminError> {
        check(
            edit.url.as_deref(),
            edit.token.as_ref().and_then(Option::as_deref),
            edit.signing_secret.as_ref().and_then(Option::as_deref),
        )?;
        self.get(project_id, id).await?;
        self.store
            .update_hook(id, &edit)
            .await?
            .ok_or(AdminError::NoHook(id))
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
                    url: Some("http://x/b".into()),
                    ..HookEdit::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(edited.url, "http://x/b");
        assert_eq!(edited.token.as_deref(), Some("t"));
        let cleared = HookEdit {
            token: Some(None),
            ..HookEdit::default()
        };
        assert_eq!(
            admin.edit(Some(1), hook.id, cleared).await.unwrap().token,
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
