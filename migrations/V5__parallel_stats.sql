-- Key-ordered concurrency: the in-flight window as of the last checkpoint
-- (in_flight, gaps, blocking position and for how long, fetch paused), for
-- `status` and /status.
ALTER TABLE projection_checkpoints ADD COLUMN parallel_stats jsonb;
