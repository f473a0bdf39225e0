-- The outbox refuses values no event can carry, so a CI system hears of them at its own insert
-- instead of the relay setting the row aside later: a time of infinity (no event time, and a
-- value chrono cannot hold), facts that are not a JSON object, and facts whose known keys hold
-- the wrong JSON type or a number no f64 holds (JSONB numbers are arbitrary precision: 1e400
-- is valid JSONB). The relay still sets aside, row by row, any row it cannot publish.
--
-- NOT VALID: rows waiting from before this migration are not checked (a check failing on one
-- would stop the upgrade); the relay moves such rows to hookline_outbox_dead with the reason.

-- What is wrong with `facts` for an event, or NULL when nothing is. IMMUTABLE: it reads only
-- its argument, so a CHECK constraint may call it.
CREATE FUNCTION hookline_outbox_facts_problem(facts JSONB) RETURNS TEXT
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    key  TEXT;
    kind TEXT;
BEGIN
    IF facts IS NULL OR jsonb_typeof(facts) = 'null' THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(facts) <> 'object' THEN
        RETURN format('facts must be a JSON object or NULL, not a JSON %s', jsonb_typeof(facts));
    END IF;
    FOREACH key IN ARRAY ARRAY['duration', 'queued_duration'] LOOP
        kind := jsonb_typeof(facts -> key);
        IF kind IS NULL OR kind = 'null' THEN
            CONTINUE;
        END IF;
        IF kind <> 'number' THEN
            RETURN format('facts.%s must be a number of seconds or null, not a JSON %s', key, kind);
        END IF;
        -- The largest finite f64; JSONB numbers compare as numeric, without rounding.
        IF abs((facts -> key)::numeric) > 1.7976931348623157e308 THEN
            RETURN format('facts.%s is out of range for a 64-bit float', key);
        END IF;
    END LOOP;
    FOREACH key IN ARRAY ARRAY['started_at', 'finished_at', 'failure_reason'] LOOP
        kind := jsonb_typeof(facts -> key);
        IF kind IS NOT NULL AND kind NOT IN ('null', 'string') THEN
            RETURN format('facts.%s must be a string or null, not a JSON %s', key, kind);
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

ALTER TABLE hookline_outbox
    ADD CONSTRAINT hookline_outbox_occurred_at_is_finite CHECK (isfinite(occurred_at)) NOT VALID,
    ADD CONSTRAINT hookline_outbox_created_at_is_finite CHECK (isfinite(created_at)) NOT VALID,
    ADD CONSTRAINT hookline_outbox_facts_are_readable
        CHECK (hookline_outbox_facts_problem(facts) IS NULL) NOT VALID;

-- The same insert as before (0120), checked first so the error says what is wrong and what to
-- send instead of naming a constraint.
CREATE OR REPLACE FUNCTION hookline_outbox_record(
    p_build_id    BIGINT,
    p_status      TEXT,
    p_facts       JSONB DEFAULT NULL,
    p_occurred_at TIMESTAMPTZ DEFAULT now()
) RETURNS UUID LANGUAGE plpgsql AS $$
DECLARE
    v_facts   JSONB;
    v_problem TEXT;
    v_id      UUID;
BEGIN
    IF p_occurred_at IS NOT NULL AND NOT isfinite(p_occurred_at) THEN
        RAISE EXCEPTION 'hookline_outbox_record: occurred_at must be a finite time, not %',
            p_occurred_at
            USING ERRCODE = 'check_violation',
                  HINT = 'Pass the moment the build reached the status, or leave it out for now().';
    END IF;
    v_facts := COALESCE(p_facts, (
        SELECT jsonb_build_object(
            'started_at', b.started_at, 'finished_at', b.finished_at, 'duration', b.duration,
            'queued_duration', b.queued_duration, 'failure_reason', b.failure_reason)
        FROM builds b WHERE b.id = p_build_id));
    v_problem := hookline_outbox_facts_problem(v_facts);
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'hookline_outbox_record: %', v_problem
            USING ERRCODE = 'check_violation',
                  HINT = CASE WHEN p_facts IS NULL
                      THEN 'The facts were read from the build row: correct its value.'
                      ELSE 'Send facts as documented: times as strings, durations as seconds.'
                  END;
    END IF;
    INSERT INTO hookline_outbox (build_id, status, occurred_at, facts)
    VALUES (p_build_id, p_status, p_occurred_at, v_facts)
    RETURNING event_id INTO v_id;
    RETURN v_id;
END
$$;
