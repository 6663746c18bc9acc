-- projectionist: the event log and the projection checkpoints.
-- Plain SQL, applied by `migrate` (refinery) in the configured schema through
-- `search_path`; other migration tools may apply it as it is.
-- Requires PostgreSQL 13 or newer (xid8, pg_current_xact_id, gen_random_uuid).

CREATE TABLE events (
    -- Order of insertion (not commit order).
    global_position   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The appending transaction; readers only read rows whose transaction is
    -- older than every running one, ordered by (transaction_id, global_position).
    transaction_id    xid8        NOT NULL DEFAULT pg_current_xact_id(),
    -- Idempotency key.
    event_id          uuid        NOT NULL DEFAULT gen_random_uuid(),
    aggregate_type    text        NOT NULL,
    aggregate_id      text        NOT NULL,
    -- 1, 2, 3 ... per (aggregate_type, aggregate_id).
    aggregate_version bigint      NOT NULL CHECK (aggregate_version > 0),
    event_type        text        NOT NULL,
    -- Schema version of the payload, for upcasting.
    event_version     integer     NOT NULL DEFAULT 1,
    payload           jsonb       NOT NULL,
    -- correlation_id, causation_id, traceparent and user fields.
    metadata          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_key UNIQUE (aggregate_type, aggregate_id, aggregate_version)
);

-- The gap-safe read path: WHERE (transaction_id, global_position) > cursor
-- AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY both.
CREATE INDEX events_transaction_position_idx ON events (transaction_id, global_position);

-- The partition of an aggregate for static partitioning and worker-mode slots:
-- the first 32 bits of md5(aggregate_id), read as an unsigned big-endian
-- integer, modulo the partition count. Documented in docs/concepts.md so that
-- any language can compute it.
CREATE FUNCTION projectionist_partition(aggregate_id text, total_partitions integer)
RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT (('x' || lpad(left(md5(aggregate_id), 8), 16, '0'))::bit(64)::bigint
            % total_partitions)::integer
$$;

CREATE TABLE projection_checkpoints (
    projection_name      text        NOT NULL,
    partition_key        integer     NOT NULL CHECK (partition_key >= 0),
    total_partitions     integer     NOT NULL CHECK (total_partitions > 0 AND partition_key < total_partitions),
    -- The cursor: the last (transaction_id, global_position) handled or skipped.
    last_transaction_id  xid8        NOT NULL DEFAULT '0'::xid8,
    last_global_position bigint      NOT NULL DEFAULT 0,
    -- Events handed to the handler so far (skipped ones not counted).
    events_handled       bigint      NOT NULL DEFAULT 0,
    status               text        NOT NULL DEFAULT 'running'
                         CHECK (status IN ('running', 'stopped', 'failed')),
    last_error           text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection_name, partition_key)
);
