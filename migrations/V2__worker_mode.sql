-- projectionist worker mode: live workers and who runs which slot.

-- One row per running worker process; heartbeat_at is refreshed every
-- HEARTBEAT_INTERVAL and rows older than HEARTBEAT_TIMEOUT are removed by
-- the leader.
CREATE TABLE worker_nodes (
    worker_id    text        PRIMARY KEY,
    hostname     text        NOT NULL,
    pid          integer     NOT NULL,
    version      text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- One row per slot (projection, partition). worker_id NULL means unassigned.
-- generation grows on every change of owner: a worker commits a batch only
-- while the row still names it with the generation it started with.
CREATE TABLE consumer_assignments (
    projection_name  text        NOT NULL,
    partition_key    integer     NOT NULL CHECK (partition_key >= 0),
    total_partitions integer     NOT NULL CHECK (total_partitions > 0 AND partition_key < total_partitions),
    worker_id        text,
    generation       bigint      NOT NULL DEFAULT 0,
    assigned_at      timestamptz NOT NULL DEFAULT now(),
    -- Failure budget: the worker that released the slot after too many
    -- failed batches, how often it was released, and until when it rests.
    released_by      text,
    release_count    integer     NOT NULL DEFAULT 0,
    released_until   timestamptz,
    last_error       text,
    PRIMARY KEY (projection_name, partition_key)
);

CREATE INDEX consumer_assignments_worker_idx ON consumer_assignments (worker_id);
