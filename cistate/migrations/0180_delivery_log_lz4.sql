-- The delivery log's bodies and headers are a few KB of JSON, past the 2 KB at which PostgreSQL
-- compresses a row. Its default compressor (pglz) was the largest single cost of writing the log
-- in a profile of the consumer's benchmark; lz4 compresses such text several times faster for a
-- little less saving. A server built without lz4 keeps pglz: the log works the same, only
-- slower to write.
DO $$
DECLARE
    part regclass;
BEGIN
    FOR part IN
        SELECT 'delivery_log'::regclass
        UNION ALL
        SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'delivery_log'::regclass
    LOOP
        EXECUTE format(
            'ALTER TABLE ONLY %s ALTER COLUMN request_headers SET COMPRESSION lz4, '
            'ALTER COLUMN request_body SET COMPRESSION lz4, '
            'ALTER COLUMN response_headers SET COMPRESSION lz4, '
            'ALTER COLUMN response_body SET COMPRESSION lz4', part);
    END LOOP;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'this server has no lz4; the delivery log keeps pglz';
END
$$;
