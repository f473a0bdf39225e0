-- The transactional outbox: a CI system inserts a row in the same transaction as the build's
-- state change (directly, through hookline_outbox_record(), or through the Rust API
-- `Outbox::record`), so the transition is durable exactly when the state is. `hookline-producer
-- relay` publishes the rows in id order and deletes them once Kafka acknowledged them.
CREATE TABLE hookline_outbox (
    id          BIGSERIAL PRIMARY KEY,
    event_id    UUID NOT NULL DEFAULT gen_random_uuid(),
    build_id    BIGINT NOT NULL,
    status      TEXT NOT NULL
        CHECK (status IN ('created', 'pending', 'running', 'success', 'failed', 'canceled')),
    occurred_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    facts       JSONB,
    -- clock_timestamp(), not now(): now() is the transaction's start, and the relay's
    -- commit-to-ack age should not include how long the CI's transaction ran before this insert.
    created_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
-- The relay's claim looks for older rows of the same build.
CREATE INDEX hookline_outbox_build ON hookline_outbox (build_id, id);

-- Rows the relay cannot publish for good (unknown build, facts that do not parse, an event over
-- --max-event-bytes), each with the reason; later rows of the same build go on.
CREATE TABLE hookline_outbox_dead (
    id          BIGINT PRIMARY KEY,
    event_id    UUID NOT NULL,
    build_id    BIGINT NOT NULL,
    status      TEXT NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    facts       JSONB,
    created_at  TIMESTAMPTZ NOT NULL,
    reason      TEXT NOT NULL,
    dead_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Wakes the relays at commit (NOTIFY is delivered on commit, and identical notifications of one
-- transaction are folded into one); they poll as well, so a lost notification only delays.
CREATE FUNCTION hookline_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hookline_outbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER hookline_outbox_notify AFTER INSERT ON hookline_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION hookline_outbox_notify();

-- The insert a CI system runs inside its transaction, after updating the build row. Without
-- facts, they are read from the build row as this transaction sees it: the facts at the moment
-- of the transition, whatever the build does later. Returns the event id (the event's
-- X-Gitlab-Event-UUID downstream).
CREATE FUNCTION hookline_outbox_record(
    p_build_id    BIGINT,
    p_status      TEXT,
    p_facts       JSONB DEFAULT NULL,
    p_occurred_at TIMESTAMPTZ DEFAULT now()
) RETURNS UUID LANGUAGE sql AS $$
    INSERT INTO hookline_outbox (build_id, status, occurred_at, facts)
    VALUES (p_build_id, p_status, p_occurred_at, COALESCE(p_facts, (
        SELECT jsonb_build_object(
            'started_at', b.started_at, 'finished_at', b.finished_at, 'duration', b.duration,
            'queued_duration', b.queued_duration, 'failure_reason', b.failure_reason)
        FROM builds b WHERE b.id = p_build_id)))
    RETURNING event_id
$$;
