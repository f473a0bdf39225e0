-- The delivery log: one row per attempt to deliver to a hook (GitLab's web_hook_logs), written
-- in batches by the consumer off the delivery path. Range-partitioned by day on attempted_at so
-- that retention drops whole partitions instead of deleting rows; the consumer creates the
-- coming days' partitions and drops those past --delivery-log-retention. Rows that fall outside
-- every daily partition land in the default partition (never lost, pruned with the oldest day).
CREATE TABLE delivery_log (
    id                  BIGSERIAL NOT NULL,
    attempted_at        TIMESTAMPTZ NOT NULL,
    hook_id             BIGINT NOT NULL,
    project_id          BIGINT NOT NULL,
    build_id            BIGINT,
    event_id            UUID NOT NULL,
    idempotency_key     TEXT NOT NULL,
    -- 'delivery' (main or retry path), 'test' (the hooks API's test), 'resend'
    trigger             TEXT NOT NULL,
    attempt             INT NOT NULL,
    -- credentials masked
    url                 TEXT NOT NULL,
    -- secrets redacted: X-Gitlab-Token, Authorization, webhook-signature
    request_headers     JSONB NOT NULL,
    -- NULL past the size limit; the digest and size are always kept
    request_body        TEXT,
    request_body_sha256 TEXT NOT NULL,
    request_body_size   INT NOT NULL,
    -- NULL when no response came (internal_error says why)
    response_status     INT,
    internal_error      TEXT,
    -- at most 50 headers, each value cut at 1 KB
    response_headers    JSONB,
    -- cut at 8 KB
    response_body       TEXT,
    duration_ms         INT NOT NULL,
    PRIMARY KEY (attempted_at, id)
) PARTITION BY RANGE (attempted_at);
CREATE TABLE delivery_log_default PARTITION OF delivery_log DEFAULT;
CREATE INDEX delivery_log_hook ON delivery_log (hook_id, attempted_at DESC);
CREATE INDEX delivery_log_event ON delivery_log (event_id);
