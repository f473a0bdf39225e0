//! Who may do what through the consumer's HTTP surface (the hooks API now, the console later):
//! the credential model in one place.
//!
//! - The **admin token** (`--admin-token-file`) is an operator credential: it sees and changes
//!   every project's hooks, manages the scoped tokens, and alone reaches the operator routes
//!   (dead letters, rollout, tokens). Keep it with whoever runs hookline.
//! - A **scoped token** (`hlpat_...`, [`hookline_cistate::api_tokens`]) belongs to one project
//!   or one root namespace: it manages that scope's hooks and sees nothing else. Another
//!   project's hooks answer 404, exactly as hooks that do not exist, so ids cannot be probed.
//!
//! Every route calls [`authorize`] with what it touches ([`Wanted`]); nothing else decides.

use hookline_cistate::api_tokens::TokenScope;
use hookline_cistate::{CiStore, StoreError};

/// Who made a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    /// The admin token: everything.
    Operator,
    /// A scoped token (its id, for the logs) and what it may see.
    Scoped { token_id: i64, scope: TokenScope },
}

/// What a route touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// A project's hooks (and their events, tests, resends).
    Project(i64),
    /// Operator routes: scoped tokens, dead letters, rollout.
    Operator,
}

/// Why a request is refused.
#[derive(Debug)]
pub enum Denied {
    /// Outside the principal's scope, answered as if it did not exist (404): `what` names the
    /// resource, as GitLab's "404 Project Not Found".
    NotFound(&'static str),
    /// An operator route with a scoped token (403).
    OperatorOnly,
    /// The store did not answer (503).
    Store(StoreError),
}

/// The one authorization check: may `principal` touch `wanted`?
pub async fn authorize(
    principal: &Principal,
    wanted: Wanted,
    store: &dyn CiStore,
) -> Result<(), Denied> {
    let scope = match principal {
        Principal::Operator => return Ok(()),
        Principal::Scoped { scope, .. } => *scope,
    };
    let project = match wanted {
        Wanted::Operator => return Err(Denied::OperatorOnly),
        Wanted::Project(project) => project,
    };
    let allowed = match scope {
        TokenScope::Project(own) => own == project,
        TokenScope::Namespace(namespace) => {
            store
                .project_namespace(project)
                .await
                .map_err(Denied::Store)?
                == Some(namespace)
        }
    };
    if allowed {
        Ok(())
    } else {
        Err(Denied::NotFound("Project"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookline_cistate::MemoryStore;
    use hookline_cistate::fixtures::{sample, write_snapshot};

    #[tokio::test]
    async fn scoped_principals_see_their_scope_only() {
        let store = MemoryStore::new();
        let world = sample(0);
        write_snapshot(&store, &world).await.unwrap();
        let project = world.project.id;
        let namespace = world.project.namespace_id;
        let by = |scope| Principal::Scoped { token_id: 1, scope };
        let ok = |r: Result<(), Denied>| r.is_ok();
        assert!(ok(authorize(
            &Principal::Operator,
            Wanted::Operator,
            &store
        )
        .await));
        assert!(ok(authorize(
            &Principal::Operator,
            Wanted::Project(9),
            &store
        )
        .await));
        let own = by(TokenScope::Project(project));
        assert!(ok(authorize(&own, Wanted::Project(project), &store).await));
        assert!(matches!(
            authorize(&own, Wanted::Project(project + 1), &store).await,
            Err(Denied::NotFound("Project"))
        ));
        assert!(matches!(
            authorize(&own, Wanted::Operator, &store).await,
            Err(Denied::OperatorOnly)
        ));
        let group = by(TokenScope::Namespace(namespace));
        assert!(ok(authorize(&group, Wanted::Project(project), &store).await));
        let other = by(TokenScope::Namespace(namespace + 1));
        assert!(matches!(
            authorize(&other, Wanted::Project(project), &store).await,
            Err(Denied::NotFound(_))
        ));
        // A project the store does not know is in no namespace.
        assert!(
            authorize(&group, Wanted::Project(123_456), &store)
                .await
                .is_err()
        );
    }
}
