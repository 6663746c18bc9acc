-- projectionist projection versions: a projection declares a version, and
-- each version keeps its own checkpoints (key `name` for version 1,
-- `name@v<N>` above), dead letters and read-model tables (`<table>_v<N>`).
-- Readers query the stable name, a view over the live version's table that
-- `promote` swaps in one transaction.
--
-- state: live     - readers see this version (one per projection);
--        building - started beside the live one, catching up;
--        previous - was live before the last promotion (can be promoted
--                   back while its tables exist);
--        retired  - its checkpoints, dead letters and tables were dropped;
--                   a binary that still runs it is refused at start.
CREATE TABLE projection_versions (
    projection_name    text        NOT NULL,
    version            integer     NOT NULL CHECK (version >= 1),
    state              text        NOT NULL
                       CHECK (state IN ('live', 'building', 'previous', 'retired')),
    -- The stable names of the read-model tables the version declared.
    tables             text[]      NOT NULL DEFAULT '{}',
    -- The highest global position when the version was first started:
    -- events up to it are history the version rebuilds (replay).
    live_from_position bigint      NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    promoted_at        timestamptz,
    PRIMARY KEY (projection_name, version)
);
CREATE UNIQUE INDEX projection_versions_one_live
    ON projection_versions (projection_name) WHERE state = 'live';

-- The slots each worker's binary can run, as [[key, partition, total], …]:
-- with binaries of different projection versions in one worker pool, the
-- leader hands a slot only to workers that have it. NULL: a worker from
-- before this column (it is trusted with every slot the leader knows).
ALTER TABLE worker_nodes ADD COLUMN slots jsonb;

-- Events per second the slot handles, a moving average over about the last
-- 10 s of batches (status shows it with an ETA; NULL before the first
-- batch).
ALTER TABLE projection_checkpoints ADD COLUMN handle_rate double precision;
-- When handle_rate was last updated (the wall clock of the update), and the
-- weight the average has gathered (it approaches 1 after about 10 s).
ALTER TABLE projection_checkpoints ADD COLUMN rate_at timestamptz;
ALTER TABLE projection_checkpoints ADD COLUMN rate_weight double precision;
