-- Hooks that want only a build's latest state when deliveries queued behind a failure go out.
ALTER TABLE web_hooks ADD COLUMN collapse BOOLEAN NOT NULL DEFAULT FALSE;

-- The consumer's per-(hook, build) order queue under strict ordering: a delivery waiting for a
-- retry and the later events of the same build queued behind it. The bodies travel on the retry
-- topic; this table only says whose turn it is. Settled rows are kept a while (pruned by the
-- consumer) so that a record read again after a crash is known as done.
CREATE TABLE delivery_order (
    hook_id     BIGINT NOT NULL,
    build_id    BIGINT NOT NULL,
    event_id    UUID NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    seq         BIGSERIAL NOT NULL,
    settled_at  TIMESTAMPTZ,
    PRIMARY KEY (hook_id, build_id, event_id)
);
-- The main path asks, once per batch, which of the batch's builds have a queue at all.
CREATE INDEX delivery_order_build_id ON delivery_order (build_id);
CREATE INDEX delivery_order_settled_at ON delivery_order (settled_at) WHERE settled_at IS NOT NULL;
