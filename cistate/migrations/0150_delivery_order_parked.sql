-- Strict ordering: a delivery queued behind an earlier one of its (hook, build) waits here, not
-- in a consumer's memory. Its retry record (headers as key/value pairs, and the exact body) is
-- parked on its queue entry and its Kafka offset done; when the entry ahead of it is settled,
-- the settling instance writes it back to the retry topic and clears these columns.
ALTER TABLE delivery_order
    ADD COLUMN parked_keys   TEXT[],
    ADD COLUMN parked_values TEXT[],
    ADD COLUMN parked_body   BYTEA;
-- The sweep looks for parked entries left first in their queue by an instance that crashed.
CREATE INDEX delivery_order_parked ON delivery_order (hook_id, build_id) WHERE parked_body IS NOT NULL;
