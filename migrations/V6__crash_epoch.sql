-- projectionist crash detection: a sentinel that crash recovery erases, and
-- per checkpoint the epoch it was written in and the last event it handled.
--
-- When any backend dies by a signal, PostgreSQL reinitialises in place
-- (pg_postmaster_start_time() does not change): commits whose WAL was not
-- flushed are lost and their transaction ids are handed out again. A cursor
-- that had moved past those ids would skip the events that now reuse them.
-- Crash recovery (also an immediate shutdown, a promoted standby, a restored
-- base backup) empties UNLOGGED tables, so an empty sentinel proves that
-- recent commits may have been lost. Processors read the sentinel with every
-- page; the first to find it empty writes a new epoch, and every checkpoint
-- written in an older epoch is moved back to its last handled event (every
-- event after that one in cursor order was written after the crash).

CREATE UNLOGGED TABLE projectionist_epoch (
    id    integer PRIMARY KEY CHECK (id = 1),
    epoch uuid    NOT NULL
);
INSERT INTO projectionist_epoch (id, epoch) VALUES (1, gen_random_uuid());

-- The epoch the checkpoint was last written in (NULL: before this migration).
ALTER TABLE projection_checkpoints ADD COLUMN epoch uuid;
-- The cursor of the last event the projection handled (or dead-lettered):
-- the cursor moves past events only by handling them or by reading a page
-- that had none, so after a crash it can safely go back here.
ALTER TABLE projection_checkpoints ADD COLUMN last_event_transaction_id xid8;
ALTER TABLE projection_checkpoints ADD COLUMN last_event_position bigint;
UPDATE projection_checkpoints
   SET last_event_transaction_id = last_transaction_id,
       last_event_position = last_global_position;
ALTER TABLE projection_checkpoints
    ALTER COLUMN last_event_transaction_id SET DEFAULT '0'::xid8,
    ALTER COLUMN last_event_transaction_id SET NOT NULL,
    ALTER COLUMN last_event_position SET DEFAULT 0,
    ALTER COLUMN last_event_position SET NOT NULL;
