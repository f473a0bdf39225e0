-- The CI state hookline renders Job Hooks from. A CI system (or `hookline simulate`) writes it;
-- hookline reads it. Ids are the CI system's own.

CREATE TABLE namespaces (
    id   BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    path TEXT NOT NULL
);

CREATE TABLE projects (
    id               BIGINT PRIMARY KEY,
    namespace_id     BIGINT NOT NULL REFERENCES namespaces (id),
    name             TEXT NOT NULL,
    path             TEXT NOT NULL,
    description      TEXT,
    web_url          TEXT NOT NULL,
    avatar_url       TEXT,
    git_ssh_url      TEXT NOT NULL,
    git_http_url     TEXT NOT NULL,
    visibility_level INT NOT NULL DEFAULT 0,
    default_branch   TEXT NOT NULL DEFAULT 'main'
);

CREATE TABLE users (
    id           BIGINT PRIMARY KEY,
    name         TEXT NOT NULL,
    username     TEXT NOT NULL,
    avatar_url   TEXT,
    public_email TEXT,
    blocked      BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE runners (
    id          BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    runner_type TEXT NOT NULL,
    active      BOOLEAN NOT NULL DEFAULT TRUE,
    is_shared   BOOLEAN NOT NULL DEFAULT FALSE,
    tags        TEXT[] NOT NULL DEFAULT '{}'
);

CREATE TABLE pipelines (
    id                  BIGINT PRIMARY KEY,
    project_id          BIGINT NOT NULL REFERENCES projects (id),
    user_id             BIGINT NOT NULL REFERENCES users (id),
    name                TEXT,
    ref                 TEXT NOT NULL,
    tag                 BOOLEAN NOT NULL DEFAULT FALSE,
    sha                 TEXT NOT NULL,
    before_sha          TEXT NOT NULL,
    status              TEXT NOT NULL,
    started_at          TIMESTAMPTZ,
    finished_at         TIMESTAMPTZ,
    duration            BIGINT,
    commit_message      TEXT NOT NULL,
    commit_author_name  TEXT NOT NULL,
    commit_author_email TEXT NOT NULL,
    -- The upstream pipeline, when another pipeline triggered this one.
    source_project_id   BIGINT,
    source_project_web_url TEXT,
    source_project_path TEXT,
    source_pipeline_id  BIGINT,
    source_job_id       BIGINT
);

CREATE TABLE builds (
    id               BIGINT PRIMARY KEY,
    project_id       BIGINT NOT NULL REFERENCES projects (id),
    pipeline_id      BIGINT NOT NULL REFERENCES pipelines (id),
    user_id          BIGINT NOT NULL REFERENCES users (id),
    runner_id        BIGINT REFERENCES runners (id),
    name             TEXT NOT NULL,
    stage            TEXT NOT NULL,
    status           TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    queued_at        TIMESTAMPTZ,
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,
    duration         DOUBLE PRECISION,
    queued_duration  DOUBLE PRECISION,
    allow_failure    BOOLEAN NOT NULL DEFAULT FALSE,
    failure_reason   TEXT,
    retries_count    INT NOT NULL DEFAULT 0,
    environment_name TEXT,
    environment_action TEXT,
    environment_tier TEXT
);
CREATE INDEX builds_pipeline_id ON builds (pipeline_id);

-- Project webhooks. Health follows GitLab's auto-disable rule (see cistate::model::Hook).
CREATE TABLE web_hooks (
    id              BIGSERIAL PRIMARY KEY,
    uuid            UUID NOT NULL UNIQUE,
    project_id      BIGINT NOT NULL,
    url             TEXT NOT NULL,
    token           TEXT,
    signing_secret  TEXT,
    job_events      BOOLEAN NOT NULL DEFAULT TRUE,
    recent_failures INT NOT NULL DEFAULT 0,
    disabled_until  TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX web_hooks_project_id ON web_hooks (project_id);
