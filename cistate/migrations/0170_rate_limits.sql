-- Rate limits per root namespace (the consumer's `--rate-limit-per-minute`, see
-- consumer::rate_limit). Overrides are the operator's (`hookline-consumer rate-limits`);
-- buckets are the consumers' shared token buckets.

-- A namespace's own limit, over the consumer's default: deliveries per minute, or NULL for none.
-- No foreign key: an override may be set before the CI writes the namespace.
CREATE TABLE namespace_rate_limits (
    namespace_id BIGINT PRIMARY KEY,
    per_minute   INT CHECK (per_minute IS NULL OR per_minute > 0),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One token bucket per limited root namespace, as GCRA's theoretical arrival time: the bucket is
-- full when `tat` is in the past. Every consumer instance takes its tokens here, one atomic
-- UPDATE per delivery. UNLOGGED: losing it in a crash only refills the buckets, which is not
-- worth a WAL write per delivery.
CREATE UNLOGGED TABLE rate_limit_buckets (
    namespace_id BIGINT PRIMARY KEY,
    tat          TIMESTAMPTZ NOT NULL
);
