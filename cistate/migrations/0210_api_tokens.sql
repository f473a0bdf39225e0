-- Tokens of the consumer's hooks API scoped to one project or one root namespace (the operator's
-- admin token, from a file, sees everything; these see only their scope). Only the SHA-256
-- digest of a token is kept: it is shown once, when created, and cannot be read back.
CREATE TABLE api_tokens (
    id           BIGSERIAL PRIMARY KEY,
    name         TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
    scope        TEXT NOT NULL CHECK (scope IN ('project', 'namespace')),
    scope_id     BIGINT NOT NULL,
    digest       BYTEA NOT NULL UNIQUE CHECK (octet_length(digest) = 32),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at   TIMESTAMPTZ CHECK (expires_at IS NULL OR isfinite(expires_at)),
    revoked_at   TIMESTAMPTZ CHECK (revoked_at IS NULL OR isfinite(revoked_at)),
    last_used_at TIMESTAMPTZ CHECK (last_used_at IS NULL OR isfinite(last_used_at))
);
CREATE INDEX api_tokens_scope ON api_tokens (scope, scope_id);

-- Each hook's test bucket (GitLab: 5 tests a minute per hook), shared by every consumer
-- instance, as GCRA's theoretical arrival time. UNLOGGED: a crash only refills the buckets.
CREATE UNLOGGED TABLE hook_test_buckets (
    hook_id BIGINT PRIMARY KEY,
    tat     TIMESTAMPTZ NOT NULL CHECK (isfinite(tat))
);
