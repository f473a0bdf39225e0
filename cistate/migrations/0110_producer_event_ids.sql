-- The producer's recent event ids, each with a digest of the transition it carried: a retry of
-- the same transition is answered from its first emission, and an id reused for a different
-- transition is refused (409). Rows older than the producer's retention window are pruned.
CREATE TABLE producer_event_ids (
    event_id      UUID PRIMARY KEY,
    digest        BYTEA NOT NULL,
    partition     INT NOT NULL,
    "offset"      BIGINT NOT NULL,
    timing        TEXT NOT NULL,
    payload_bytes INT NOT NULL,
    emitted_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX producer_event_ids_emitted_at ON producer_event_ids (emitted_at);
