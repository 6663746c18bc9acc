-- projectionist failure handling: dead letters, the failed state's position,
-- and the cluster a checkpoint's transaction ids belong to.

-- Events a projection gave up on (failure policy DeadLetter). Retried with
-- `dlq retry`, removed on success.
CREATE TABLE dead_letters (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection_name  text        NOT NULL,
    partition_key    integer     NOT NULL,
    global_position  bigint      NOT NULL,
    transaction_id   xid8        NOT NULL,
    event_id         uuid        NOT NULL,
    aggregate_type   text        NOT NULL,
    aggregate_id     text        NOT NULL,
    event_type       text        NOT NULL,
    error            text        NOT NULL,
    attempts         integer     NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dead_letters_projection_event_key UNIQUE (projection_name, event_id)
);

CREATE INDEX dead_letters_projection_idx ON dead_letters (projection_name, global_position);

-- Failure policy Stop: the position of the event the projection stopped at.
ALTER TABLE projection_checkpoints ADD COLUMN failed_position bigint;
-- pg_control_system().system_identifier of the cluster whose transaction
-- ids the cursor holds (NULL where it could not be read).
ALTER TABLE projection_checkpoints ADD COLUMN system_identifier text;
