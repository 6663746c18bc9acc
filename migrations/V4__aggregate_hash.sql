-- The partition hash of each event's aggregate_id, computed once at insert
-- time, so that partitioned readers filter with a modulo instead of an md5
-- per row and partition. Same function as projectionist_partition():
-- projectionist_partition(aggregate_id, n) = aggregate_hash % n.
ALTER TABLE events
    ADD COLUMN aggregate_hash bigint NOT NULL
    GENERATED ALWAYS AS (('x' || lpad(left(md5(aggregate_id), 8), 16, '0'))::bit(64)::bigint) STORED;
