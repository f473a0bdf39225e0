-- The producer's rollout flags, in Flipper's shape: a flag row once anything was stored for it
-- (a flag without a row has its coded default), one row per open gate value (one per actor), and
-- every change kept as history (who, when, which gate, old and new value).

CREATE TABLE feature_flags (
    key        TEXT PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE feature_gates (
    feature_key TEXT NOT NULL REFERENCES feature_flags (key) ON DELETE CASCADE,
    key         TEXT NOT NULL CHECK (key IN ('boolean', 'actors', 'opt_out_actors',
                                             'percentage_of_actors', 'percentage_of_time')),
    value       TEXT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (feature_key, key, value)
);

CREATE TABLE feature_flag_history (
    id          BIGSERIAL PRIMARY KEY,
    feature_key TEXT NOT NULL,
    changed_by  TEXT NOT NULL,
    changed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    gate        TEXT NOT NULL,
    old_value   TEXT,
    new_value   TEXT
);
CREATE INDEX feature_flag_history_feature_key ON feature_flag_history (feature_key, id);
