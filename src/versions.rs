//! Projection versions: the `projection_versions` rows (migration V7), each
//! version's read-model tables (`<table>_v<N>`) and the reader views that
//! keep one stable name per table.
//!
//! At start, `prepare` registers every projection's version under the
//! migration lock, in one transaction: the first version of a name is live,
//! a later one is `building` beside it; a plain table left by a binary
//! before versions is adopted as version 1's (`ALTER TABLE … RENAME`); the
//! projection's `migrate` hook runs; the live version's tables get their
//! views. [`promote`] swaps the views to another version in one transaction
//! (a reader never sees a missing, empty or partial relation: PostgreSQL
//! makes a query that waited for the swap look the name up again),
//! [`retire`] drops an old version, [`forget`] a projection no longer in the
//! binary.

use crate::context::physical_table;
use crate::error::{Error, Kind, Result};
use crate::ident::Ident;
use crate::projection::Transaction;
use crate::registered::{slot_key, Registered};
use crate::store::EventStore;
use serde::Serialize;
use std::sync::atomic::Ordering;

/// One version of a projection, as `projection_versions` records it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VersionInfo {
    /// The projection's name.
    pub name: String,
    /// The version number.
    pub version: i32,
    /// `live` (readers see it), `building` (started beside the live one),
    /// `previous` (was live before the last promotion) or `retired`.
    pub state: String,
    /// The stable names of the tables the version writes.
    pub tables: Vec<String>,
    /// The highest global position when the version first started: events
    /// up to it are history it rebuilds.
    pub live_from_position: i64,
    /// When the version first started (seconds since the Unix epoch).
    pub created_at: f64,
    /// When the version was last promoted, if ever.
    pub promoted_at: Option<f64>,
}

impl VersionInfo {
    /// The checkpoint key of the version.
    pub fn key(&self) -> String {
        slot_key(&self.name, self.version)
    }
}

const COLUMNS: &str = "projection_name, version, state, tables, live_from_position, \
    extract(epoch FROM created_at)::float8, extract(epoch FROM promoted_at)::float8";

fn info(row: &tokio_postgres::Row) -> Result<VersionInfo> {
    Ok(VersionInfo {
        name: row.try_get(0)?,
        version: row.try_get(1)?,
        state: row.try_get(2)?,
        tables: row.try_get(3)?,
        live_from_position: row.try_get(4)?,
        created_at: row.try_get(5)?,
        promoted_at: row.try_get(6)?,
    })
}

/// Every version of `name` (all projections when `None`), oldest first.
pub async fn list(store: &EventStore, name: Option<&str>) -> Result<Vec<VersionInfo>> {
    let client = store.pool().get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM {} WHERE $1::text IS NULL OR projection_name = $1 \
                 ORDER BY projection_name, version",
                store.statements().versions
            ),
            &[&name],
        )
        .await?;
    rows.iter().map(info).collect()
}

async fn versions_of(tx: &Transaction<'_>, table: &str, name: &str) -> Result<Vec<VersionInfo>> {
    let rows = tx
        .query(
            &format!(
                "SELECT {COLUMNS} FROM {table} WHERE projection_name = $1 ORDER BY version FOR UPDATE"
            ),
            &[&name],
        )
        .await?;
    rows.iter().map(info).collect()
}

/// A transaction holding the migration lock: read-model DDL and version
/// states change only under it.
async fn locked(client: &mut deadpool_postgres::Object, key: i64) -> Result<Transaction<'_>> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&key])
        .await?;
    Ok(tx)
}

/// The kind of the relation `name` resolves to on the search path
/// (`r` table, `v` view, …), if any.
async fn relkind(tx: &Transaction<'_>, name: &str) -> Result<Option<String>> {
    let quoted = Ident::new("table", name)?.quoted();
    Ok(tx
        .query_opt(
            "SELECT c.relkind::text FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&quoted],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()?)
}

fn quoted(name: &str) -> Result<String> {
    Ok(Ident::new("table", name)?.quoted())
}

/// Registers every projection's version and runs its `migrate` hook (see
/// the module documentation). Sets each scope's replay boundary.
pub(crate) async fn prepare(store: &EventStore, projections: &[Registered]) -> Result<()> {
    for p in projections {
        prepare_one(store, p).await.map_err(|e| {
            if e.is_not_migrated() {
                e
            } else {
                Error::new(
                    e.kind(),
                    format!(
                        "preparing projection {} version {}: {e}",
                        p.name(),
                        p.version()
                    ),
                )
            }
        })?;
    }
    Ok(())
}

async fn prepare_one(store: &EventStore, p: &Registered) -> Result<()> {
    let sql = store.statements();
    let mut client = store.pool().get().await?;
    let tx = locked(&mut client, sql.migration_lock).await?;
    let name = p.name();
    let version = p.version();
    let tables: Vec<String> = p.tables().to_vec();
    let mut versions = versions_of(&tx, &sql.versions, name).await?;
    let insert = format!(
        "INSERT INTO {} (projection_name, version, state, tables, live_from_position) \
         VALUES ($1, $2, $3, $4, $5) RETURNING {COLUMNS}",
        sql.versions
    );
    if versions.is_empty() && version > 1 {
        // Checkpoints of version 1 from before versions existed: that
        // version is live, and this one is built beside it.
        let legacy = tx
            .query_opt(
                &format!(
                    "SELECT 1 FROM {} WHERE projection_name = $1 LIMIT 1",
                    sql.checkpoints
                ),
                &[&name],
            )
            .await?
            .is_some();
        if legacy {
            let row = tx
                .query_one(&insert, &[&name, &1i32, &"live", &tables, &0i64])
                .await?;
            versions.push(info(&row)?);
        }
    }
    let live_from = match versions.iter().find(|v| v.version == version) {
        Some(v) if v.state == "retired" => {
            return Err(Error::new(
                Kind::Failed,
                format!(
                    "version {version} of projection {name} was retired (its checkpoints and tables were \
                     dropped): deploy a binary with a newer version, or run `forget {name} --yes` to \
                     start the projection over"
                ),
            ));
        }
        Some(v) => v.live_from_position,
        None => {
            let head: i64 = tx
                .query_one(
                    &format!(
                        "SELECT coalesce(max(global_position), 0) FROM {}",
                        sql.events
                    ),
                    &[],
                )
                .await?
                .try_get(0)?;
            let state = if versions.iter().any(|v| v.state == "live") {
                "building"
            } else {
                "live"
            };
            let row = tx
                .query_one(&insert, &[&name, &version, &state, &tables, &head])
                .await?;
            tracing::info!(
                projection = name,
                version,
                state,
                live_from = head,
                "projection version registered"
            );
            versions.push(info(&row)?);
            head
        }
    };
    tx.execute(
        &format!(
            "UPDATE {} SET tables = $3 WHERE projection_name = $1 AND version = $2 AND tables <> $3",
            sql.versions
        ),
        &[&name, &version, &tables],
    )
    .await?;
    let is_live = versions
        .iter()
        .any(|v| v.version == version && v.state == "live");
    if is_live {
        for t in &tables {
            let physical = physical_table(t, version);
            if relkind(&tx, t).await?.as_deref() == Some("r")
                && relkind(&tx, &physical).await?.is_none()
            {
                tx.batch_execute(&format!(
                    "ALTER TABLE {} RENAME TO {}",
                    quoted(t)?,
                    quoted(&physical)?
                ))
                .await?;
                tracing::info!(projection = name, version, table = %t, physical = %physical,
                    "adopted the table as this version's (readers keep its name through a view)");
            }
        }
    }
    p.migrate(&tx).await.map_err(|e| {
        Error::new(
            e.kind(),
            format!("its migrate hook failed: {e} (the hook must be idempotent: CREATE … IF NOT EXISTS)"),
        )
    })?;
    for t in &tables {
        let physical = physical_table(t, version);
        if relkind(&tx, &physical).await?.is_none() {
            return Err(Error::config(format!(
                "it declares table {t} but {physical} does not exist after its migrate hook: create it \
                 there under the name ctx.table(\"{t}\")"
            )));
        }
        if is_live && relkind(&tx, t).await?.is_none() {
            tx.batch_execute(&format!(
                "CREATE VIEW {} AS SELECT * FROM {}",
                quoted(t)?,
                quoted(&physical)?
            ))
            .await?;
        }
    }
    tx.commit().await?;
    p.scope().live_from.store(live_from, Ordering::Relaxed);
    Ok(())
}

/// Whether a checkpoint key belongs to a retired version (the processor
/// refuses to rebuild one).
pub(crate) async fn is_retired<C: tokio_postgres::GenericClient>(
    client: &C,
    versions_table: &str,
    name: &str,
    version: i32,
) -> Result<bool> {
    Ok(client
        .query_opt(
            &format!(
                "SELECT 1 FROM {versions_table} WHERE projection_name = $1 AND version = $2 AND state = 'retired'"
            ),
            &[&name, &version],
        )
        .await?
        .is_some())
}

/// What [`promote`] did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Promoted {
    /// The projection.
    pub name: String,
    /// The version readers now see.
    pub version: i32,
    /// The version that was live before (now `previous`), if any.
    pub previous: Option<i32>,
    /// The views swapped (stable table names).
    pub tables: Vec<String>,
    /// The version was live already: nothing changed.
    pub already_live: bool,
}

/// The most events a version may still have to handle and count as caught
/// up for [`promote`] by default: about one batch, the same distance the
/// live version runs behind a busy log.
pub const DEFAULT_PROMOTE_MAX_LAG: i64 = 1000;

/// Switches readers to `version` of `name` (default: the newest version,
/// counting the one this binary runs), once every slot of it has caught up to
/// within `max_lag` events and none is failed or paused: in one
/// transaction, each of its tables' views now reads its physical table, it
/// becomes `live` and the live version `previous`. Refused, with the
/// remaining lag, otherwise. `projections` supply the filters for the lag
/// (a version this binary does not run is measured against every event,
/// which is stricter).
pub async fn promote(
    store: &EventStore,
    projections: &[Registered],
    name: &str,
    version: Option<i32>,
    max_lag: i64,
) -> Result<Promoted> {
    let rows = list(store, Some(name)).await?;
    // By default the newest version: of those recorded, and the one this
    // binary runs (which may not have started yet).
    let mine = projections
        .iter()
        .find(|p| p.name() == name)
        .map(|p| p.version());
    let version = version.or_else(|| {
        let newest = rows
            .iter()
            .filter(|r| r.state != "retired")
            .map(|r| r.version)
            .max();
        match (mine, newest) {
            (Some(m), Some(n)) if m > n => Some(m),
            (Some(m), None) => Some(m),
            _ => None,
        }
    });
    if let (Some(v), None) = (version, rows.iter().find(|r| Some(r.version) == version)) {
        if mine == Some(v) {
            return Err(Error::config(format!(
                "version {v} of {name} has not started: run `run-projections` with this binary, then promote \
                 once it has caught up"
            )));
        }
    }
    if rows.is_empty() {
        return Err(Error::config(format!(
            "projection {name} has no versions recorded: start `run-projections` with a binary that has it first"
        )));
    }
    let target = match version {
        Some(v) => rows.iter().find(|r| r.version == v).ok_or_else(|| {
            let known: Vec<String> = rows
                .iter()
                .map(|r| format!("{} ({})", r.version, r.state))
                .collect();
            Error::config(format!(
                "projection {name} has no version {v}: its versions are {}",
                known.join(", ")
            ))
        })?,
        // Going back to an older version takes --version.
        None => rows
            .iter()
            .filter(|r| r.state != "retired")
            .max_by_key(|r| r.version)
            .ok_or_else(|| Error::config(format!("projection {name} has no version to promote")))?,
    }
    .clone();
    if target.state == "retired" {
        return Err(Error::config(format!(
            "version {} of {name} was retired: deploy it again as a new version number",
            target.version
        )));
    }
    let previous = rows.iter().find(|r| r.state == "live").map(|r| r.version);
    if target.state == "live" {
        return Ok(Promoted {
            name: name.to_owned(),
            version: target.version,
            previous,
            tables: target.tables.clone(),
            already_live: true,
        });
    }
    check_caught_up(store, projections, &target, max_lag).await?;
    let sql = store.statements();
    let mut client = store.pool().get().await?;
    let mut tx = locked(&mut client, sql.migration_lock).await?;
    let now = versions_of(&tx, &sql.versions, name).await?;
    let still = now.iter().find(|r| r.version == target.version);
    if still.map(|r| r.state.as_str()) != Some(target.state.as_str()) {
        return Err(Error::config(format!(
            "version {} of {name} changed state while promoting (another promote or retire ran): try again",
            target.version
        )));
    }
    let previous = now.iter().find(|r| r.state == "live").map(|r| r.version);
    if let Some(live) = previous {
        overtake(&tx, store, name, live, &target).await?;
    }
    for t in &target.tables {
        let physical = physical_table(t, target.version);
        if relkind(&tx, &physical).await?.is_none() {
            return Err(Error::config(format!(
                "cannot promote version {} of {name}: its table {physical} does not exist",
                target.version
            )));
        }
        match relkind(&tx, t).await?.as_deref() {
            Some("v") => {
                // Replaced in place when the new table keeps the old
                // columns in order (added ones at the end): the view keeps
                // its grants. Otherwise dropped and created again.
                let sp = tx.savepoint("replace_view").await?;
                let replaced = sp
                    .batch_execute(&format!(
                        "CREATE OR REPLACE VIEW {} AS SELECT * FROM {}",
                        quoted(t)?,
                        quoted(&physical)?
                    ))
                    .await;
                if replaced.is_ok() {
                    sp.commit().await?;
                    continue;
                }
                sp.rollback().await?;
                tx.batch_execute(&format!("DROP VIEW {}", quoted(t)?))
                    .await?;
            }
            Some("r") => {
                // A table from before versions that no versions-aware binary
                // adopted yet: it becomes the live version's.
                let Some(old) = previous else {
                    return Err(Error::config(format!(
                        "{t} is a table, not a view, and {name} has no live version to keep it: rename or drop it"
                    )));
                };
                let old_physical = physical_table(t, old);
                if relkind(&tx, &old_physical).await?.is_some() {
                    return Err(Error::config(format!(
                        "{t} is a table and {old_physical} exists too: drop or rename one of them"
                    )));
                }
                tx.batch_execute(&format!(
                    "ALTER TABLE {} RENAME TO {}",
                    quoted(t)?,
                    quoted(&old_physical)?
                ))
                .await?;
            }
            Some(other) => {
                return Err(Error::config(format!(
                    "{t} is a relation of kind {other:?}, not a view the engine manages: rename it"
                )));
            }
            None => {}
        }
        tx.batch_execute(&format!(
            "CREATE VIEW {} AS SELECT * FROM {}",
            quoted(t)?,
            quoted(&physical)?
        ))
        .await?;
    }
    tx.execute(
        &format!(
            "UPDATE {} SET state = 'previous' WHERE projection_name = $1 AND state = 'live'",
            sql.versions
        ),
        &[&name],
    )
    .await?;
    tx.execute(
        &format!(
            "UPDATE {} SET state = 'live', promoted_at = now() WHERE projection_name = $1 AND version = $2",
            sql.versions
        ),
        &[&name, &target.version],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(
        projection = name,
        version = target.version,
        ?previous,
        "projection version promoted"
    );
    Ok(Promoted {
        name: name.to_owned(),
        version: target.version,
        previous,
        tables: target.tables.clone(),
        already_live: false,
    })
}

/// How long [`promote`] holds the live version's batches while the new
/// version's last batches commit.
const OVERTAKE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// In the promoting transaction: holds the live version's checkpoints (its
/// batches wait, so it stops advancing) and waits until every slot of
/// `target` has a cursor at or past every live slot's. Readers then never
/// see the read model go back: the new version has handled everything the
/// live one had. Refused when `target` does not get there within
/// [`OVERTAKE_WAIT`].
async fn overtake(
    tx: &Transaction<'_>,
    store: &EventStore,
    name: &str,
    live: i32,
    target: &VersionInfo,
) -> Result<()> {
    let sql = store.statements();
    tx.execute(
        "SELECT set_config('lock_timeout', $1, true)",
        &[&format!("{}ms", OVERTAKE_WAIT.as_millis())],
    )
    .await?;
    let live_key = slot_key(name, live);
    let live_max: Option<(u64, i64)> = {
        let rows = tx
            .query(
                &format!(
                    "SELECT last_transaction_id, last_global_position FROM {} WHERE projection_name = $1 \
                     FOR UPDATE",
                    sql.checkpoints
                ),
                &[&live_key],
            )
            .await?;
        let mut max = None;
        for r in &rows {
            let c = (
                r.try_get::<_, crate::event::Xid8>(0)?.0,
                r.try_get::<_, i64>(1)?,
            );
            max = max.max(Some(c));
        }
        max
    };
    let Some(live_max) = live_max else {
        return Ok(());
    };
    let key = target.key();
    let deadline = tokio::time::Instant::now() + OVERTAKE_WAIT;
    // A slot is behind while an event of its partition sorts after its
    // cursor and at or before the live version's furthest cursor.
    let behind_sql = format!(
        "SELECT count(*) FILTER (WHERE EXISTS ( \
             SELECT 1 FROM {ev} e \
             WHERE (e.transaction_id, e.global_position) > (c.last_transaction_id, c.last_global_position) \
               AND (e.transaction_id, e.global_position) <= ($2::xid8, $3::int8) \
               AND (c.total_partitions = 1 OR e.aggregate_hash % c.total_partitions = c.partition_key))), \
                count(*) \
         FROM {cp} c WHERE c.projection_name = $1",
        ev = sql.events,
        cp = sql.checkpoints
    );
    let live_tx = crate::event::Xid8(live_max.0);
    loop {
        let row = tx
            .query_one(&behind_sql, &[&key, &live_tx, &live_max.1])
            .await?;
        let (behind, slots): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        if behind == 0 && slots > 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::config(format!(
                "version {} of {name} did not reach the live version {live}'s position within {:?} \
                 ({behind} of its {slots} slot(s) behind): promote again",
                target.version, OVERTAKE_WAIT,
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Refuses unless every slot of `target` has started, none is failed or
/// paused, and together they have at most `max_lag` events left.
async fn check_caught_up(
    store: &EventStore,
    projections: &[Registered],
    target: &VersionInfo,
    max_lag: i64,
) -> Result<()> {
    let key = target.key();
    let slots: Vec<_> = crate::admin::status(store, projections)
        .await?
        .into_iter()
        .filter(|s| s.projection == key)
        .collect();
    let name = &target.name;
    let v = target.version;
    if slots.is_empty() {
        return Err(Error::config(format!(
            "version {v} of {name} has not started: run `run-projections` with the binary that has it, \
             then promote once it has caught up"
        )));
    }
    if let Some(s) = slots.iter().find(|s| s.state != "running") {
        return Err(Error::config(format!(
            "version {v} of {name} is not ready: partition {} is {}{}; fix it and `resume {key}` first",
            s.partition,
            s.state,
            s.last_error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        )));
    }
    let remaining: i64 = slots.iter().map(|s| s.lag_events).sum();
    if remaining > max_lag {
        let seconds = slots.iter().map(|s| s.lag_seconds).fold(0.0, f64::max);
        return Err(Error::config(format!(
            "version {v} of {name} has not caught up: {remaining} events remaining ({:.0} s behind; at most \
             {max_lag} allowed): promote again later, or run the processes with --promote-when-caught-up",
            seconds
        )));
    }
    Ok(())
}

/// What [`retire`] drops (or dropped).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Retirement {
    /// The projection.
    pub name: String,
    /// The version.
    pub version: i32,
    /// Physical tables dropped.
    pub tables: Vec<String>,
    /// Checkpoint rows deleted.
    pub checkpoints: i64,
    /// Dead letters deleted.
    pub dead_letters: i64,
}

/// Drops version `version` of `name`: its tables, checkpoints, dead letters
/// and worker assignments; the version row stays as `retired` so a binary
/// still running it is refused instead of rebuilding it. A live version is
/// refused (promote another first). With `apply` false, only reports what
/// would be dropped.
pub async fn retire(
    store: &EventStore,
    name: &str,
    version: i32,
    apply: bool,
) -> Result<Retirement> {
    let sql = store.statements();
    let mut client = store.pool().get().await?;
    let tx = locked(&mut client, sql.migration_lock).await?;
    let rows = versions_of(&tx, &sql.versions, name).await?;
    let row = rows.iter().find(|r| r.version == version).ok_or_else(|| {
        Error::config(format!(
            "projection {name} has no version {version} (see `versions {name}`)"
        ))
    })?;
    if row.state == "live" {
        return Err(Error::config(format!(
            "version {version} of {name} is live (readers use it): promote another version first"
        )));
    }
    let key = row.key();
    let mut tables = Vec::new();
    for t in &row.tables {
        let physical = physical_table(t, version);
        if relkind(&tx, &physical).await?.is_some() {
            tables.push(physical);
        }
    }
    let count = |table: &str| format!("SELECT count(*) FROM {table} WHERE projection_name = $1");
    let checkpoints: i64 = tx
        .query_one(&count(&sql.checkpoints), &[&key])
        .await?
        .try_get(0)?;
    let dead_letters: i64 = tx
        .query_one(&count(&sql.dead_letters), &[&key])
        .await?
        .try_get(0)?;
    let plan = Retirement {
        name: name.to_owned(),
        version,
        tables,
        checkpoints,
        dead_letters,
    };
    if !apply {
        return Ok(plan);
    }
    for t in &plan.tables {
        tx.batch_execute(&format!("DROP TABLE {}", quoted(t)?))
            .await?;
    }
    for table in [&sql.checkpoints, &sql.dead_letters, &sql.assignments] {
        tx.execute(
            &format!("DELETE FROM {table} WHERE projection_name = $1"),
            &[&key],
        )
        .await?;
    }
    tx.execute(
        &format!(
            "UPDATE {} SET state = 'retired' WHERE projection_name = $1 AND version = $2",
            sql.versions
        ),
        &[&name, &version],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(projection = name, version, "projection version retired");
    Ok(plan)
}

/// What [`forget`] removes (or removed).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Forgotten {
    /// The projection.
    pub name: String,
    /// Checkpoint keys found (`name`, `name@v2`, …).
    pub keys: Vec<String>,
    /// Versions recorded.
    pub versions: Vec<i32>,
    /// Tables and views dropped.
    pub relations: Vec<String>,
    /// Checkpoint rows deleted.
    pub checkpoints: i64,
    /// Dead letters deleted.
    pub dead_letters: i64,
}

/// Removes everything stored for `name`, a projection no longer in the
/// binary: every version's checkpoints, dead letters, assignments, version
/// rows, tables and reader views. Refused while `projections` (this
/// binary's) still has it. With `apply` false, only reports.
pub async fn forget(
    store: &EventStore,
    projections: &[Registered],
    name: &str,
    apply: bool,
) -> Result<Forgotten> {
    if projections.iter().any(|p| p.name() == name) {
        return Err(Error::config(format!(
            "projection {name} is still in this binary: remove it from the code first, or use `reset {name}` \
             to rebuild it"
        )));
    }
    let sql = store.statements();
    let mut client = store.pool().get().await?;
    let tx = locked(&mut client, sql.migration_lock).await?;
    let rows = versions_of(&tx, &sql.versions, name).await?;
    let owns = "(projection_name = $1 OR starts_with(projection_name, $1 || '@v'))";
    let keys: Vec<String> = tx
        .query(
            &format!(
                "SELECT DISTINCT projection_name FROM {} WHERE {owns} ORDER BY 1",
                sql.checkpoints
            ),
            &[&name],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()?;
    let mut relations = Vec::new();
    let mut stable: Vec<&String> = Vec::new();
    for r in &rows {
        for t in &r.tables {
            if !stable.contains(&t) {
                stable.push(t);
            }
            let physical = physical_table(t, r.version);
            if relkind(&tx, &physical).await?.is_some() {
                relations.push(physical);
            }
        }
    }
    let mut views = Vec::new();
    for t in stable {
        if relkind(&tx, t).await?.as_deref() == Some("v") {
            views.push(t.clone());
        }
    }
    let count = |table: &str| format!("SELECT count(*) FROM {table} WHERE {owns}");
    let checkpoints: i64 = tx
        .query_one(&count(&sql.checkpoints), &[&name])
        .await?
        .try_get(0)?;
    let dead_letters: i64 = tx
        .query_one(&count(&sql.dead_letters), &[&name])
        .await?
        .try_get(0)?;
    if rows.is_empty() && keys.is_empty() && dead_letters == 0 {
        return Err(Error::config(format!(
            "nothing is stored for a projection named {name:?} (check the name with `status`)"
        )));
    }
    let mut plan = Forgotten {
        name: name.to_owned(),
        keys,
        versions: rows.iter().map(|r| r.version).collect(),
        relations: views
            .iter()
            .cloned()
            .chain(relations.iter().cloned())
            .collect(),
        checkpoints,
        dead_letters,
    };
    if !apply {
        return Ok(plan);
    }
    for v in &views {
        tx.batch_execute(&format!("DROP VIEW {}", quoted(v)?))
            .await?;
    }
    for t in &relations {
        tx.batch_execute(&format!("DROP TABLE {}", quoted(t)?))
            .await?;
    }
    for table in [&sql.checkpoints, &sql.dead_letters, &sql.assignments] {
        tx.execute(&format!("DELETE FROM {table} WHERE {owns}"), &[&name])
            .await?;
    }
    tx.execute(
        &format!("DELETE FROM {} WHERE projection_name = $1", sql.versions),
        &[&name],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(projection = name, "projection forgotten");
    plan.relations.sort();
    Ok(plan)
}

/// With `--promote-when-caught-up`: every second, tries to promote each
/// version of `projections` that is `building`, until none is left or
/// `stop`. A refusal (not caught up yet) is quiet; other errors are logged.
pub(crate) async fn promote_when_caught_up(
    store: EventStore,
    projections: Vec<Registered>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut pending: Vec<Registered> = projections;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    while !pending.is_empty() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let rows = match list(&store, None).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "promote-when-caught-up: cannot read the versions; trying again");
                continue;
            }
        };
        let mut still = Vec::new();
        for p in pending {
            let state = rows
                .iter()
                .find(|r| r.name == p.name() && r.version == p.version())
                .map(|r| r.state.as_str());
            match state {
                // Registered at start; not yet seen if the start is racing.
                None | Some("building") => {}
                // Live, previous or retired: nothing to do automatically.
                Some(_) => continue,
            }
            match promote(
                &store,
                &projections_of(&p),
                p.name(),
                Some(p.version()),
                DEFAULT_PROMOTE_MAX_LAG,
            )
            .await
            {
                Ok(done) => {
                    tracing::info!(projection = p.name(), version = done.version, previous = ?done.previous,
                        "promoted automatically: the version caught up (--promote-when-caught-up)");
                }
                Err(e) if e.is_config() => still.push(p),
                Err(e) => {
                    tracing::warn!(projection = p.name(), version = p.version(), error = %e,
                        "promote-when-caught-up: promotion failed; trying again");
                    still.push(p);
                }
            }
        }
        pending = still;
    }
}

fn projections_of(p: &Registered) -> Vec<Registered> {
    vec![p.clone()]
}
