-- Times the services read are finite: `infinity` and `-infinity` are refused where they mean
-- nothing (a build started at infinity), as are durations that are not a number of seconds
-- (NaN, Infinity, negative). The services read every timestamp tolerantly anyway
-- (cistate::stored_time), so rows written before these constraints still read; these stop new
-- ones at the door, with an error naming the constraint, in the writer's own transaction.
--
-- Not refused: web_hooks.disabled_until = 'infinity', which disables a hook for good (how the
-- services read it), and the outbox's columns, which the outbox relay checks itself.
--
-- Each constraint is added NOT VALID (new and updated rows are checked, existing rows are not
-- read), then validated where the existing rows allow it: a database that already holds such a
-- value still migrates, and the constraint stays unvalidated there until the rows are fixed
-- (`ALTER TABLE ... VALIDATE CONSTRAINT ...` then checks it).

ALTER TABLE builds
    ADD CONSTRAINT builds_created_at_finite CHECK (isfinite(created_at)) NOT VALID,
    ADD CONSTRAINT builds_queued_at_finite CHECK (isfinite(queued_at)) NOT VALID,
    ADD CONSTRAINT builds_started_at_finite CHECK (isfinite(started_at)) NOT VALID,
    ADD CONSTRAINT builds_finished_at_finite CHECK (isfinite(finished_at)) NOT VALID,
    -- NaN compares above every number in PostgreSQL, so `< 'Infinity'` refuses it too.
    ADD CONSTRAINT builds_duration_finite
        CHECK (duration >= 0 AND duration < 'Infinity') NOT VALID,
    ADD CONSTRAINT builds_queued_duration_finite
        CHECK (queued_duration >= 0 AND queued_duration < 'Infinity') NOT VALID;

ALTER TABLE pipelines
    ADD CONSTRAINT pipelines_started_at_finite CHECK (isfinite(started_at)) NOT VALID,
    ADD CONSTRAINT pipelines_finished_at_finite CHECK (isfinite(finished_at)) NOT VALID;

ALTER TABLE web_hooks
    ADD CONSTRAINT web_hooks_created_at_finite CHECK (isfinite(created_at)) NOT VALID;

ALTER TABLE delivery_order
    ADD CONSTRAINT delivery_order_occurred_at_finite CHECK (isfinite(occurred_at)) NOT VALID,
    ADD CONSTRAINT delivery_order_settled_at_finite CHECK (isfinite(settled_at)) NOT VALID;

ALTER TABLE feature_flag_history
    ADD CONSTRAINT feature_flag_history_changed_at_finite CHECK (isfinite(changed_at)) NOT VALID;

ALTER TABLE rate_limit_buckets
    ADD CONSTRAINT rate_limit_buckets_tat_finite CHECK (isfinite(tat)) NOT VALID;

DO $$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT conrelid::regclass AS tbl, conname
        FROM pg_constraint
        WHERE connamespace = current_schema()::regnamespace
          AND contype = 'c' AND NOT convalidated AND conname LIKE '%\_finite'
    LOOP
        BEGIN
            EXECUTE format('ALTER TABLE %s VALIDATE CONSTRAINT %I', c.tbl, c.conname);
        EXCEPTION WHEN check_violation THEN
            RAISE WARNING '% holds rows that % refuses; they are read as unknown times (or for a hook''s disable, as written), and new ones are refused',
                c.tbl, c.conname;
        END;
    END LOOP;
END
$$;
