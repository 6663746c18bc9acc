//! Worker mode: many identical processes share the slots (projection,
//! partition) of every projection, with no per-process configuration.
//!
//! - Each worker registers in `worker_nodes` and heartbeats.
//! - The leader is whichever worker holds a session advisory lock on its own
//!   dedicated connection; it removes workers whose heartbeat is too old and
//!   assigns slots in `consumer_assignments` stickily (only orphans and the
//!   excess over a fair share move, see [`crate::assign`]), bumping a
//!   slot's generation on every change of owner, then NOTIFYs the workers
//!   channel.
//! - Every worker follows its assignments (on NOTIFY and at least every
//!   rebalance interval): it starts new slots and stops lost ones after their
//!   in-flight batch.
//! - Fencing: every batch's checkpoint compare-and-set share-locks the
//!   slot's assignment row and requires this worker and generation, so a
//!   paused or cut-off worker whose slot moved can never commit for it.
//!
//! Architecture invariant: the leader's advisory lock lives only on the
//! dedicated connection opened in [`lead`]; leadership ends the moment that
//! connection ends.

use crate::dispatcher::{self, Route, Watermarks};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::ident::Ident;
use crate::processor::{Fence, Processor, Slot};
use crate::registered::Registered;
use crate::slot::{LoopExit, LoopLimits, Signals};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The channel on which workers announce joins, departures and new
/// assignments.
pub const WORKERS_CHANNEL: &str = "projectionist_workers";
/// Default heartbeat interval.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Default age after which a silent worker is removed.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default interval between rebalances (and assignment re-reads).
pub const DEFAULT_REBALANCE_INTERVAL: Duration = Duration::from_secs(5);
/// Default number of failed batches in a row after which a slot is released.
pub const DEFAULT_MAX_CONSECUTIVE_FAILURES: u32 = 10;

/// Options of worker mode, each with a documented default.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub(crate) heartbeat_interval: Duration,
    pub(crate) heartbeat_timeout: Duration,
    pub(crate) rebalance_interval: Duration,
    pub(crate) max_consecutive_failures: u32,
    pub(crate) partitions: HashMap<String, i32>,
}

impl Default for WorkerConfig {
    fn default() -> WorkerConfig {
        WorkerConfig {
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            rebalance_interval: DEFAULT_REBALANCE_INTERVAL,
            max_consecutive_failures: DEFAULT_MAX_CONSECUTIVE_FAILURES,
            partitions: HashMap::new(),
        }
    }
}

impl WorkerConfig {
    /// How often a worker refreshes its `worker_nodes` row. Default: 5 s.
    pub fn heartbeat_interval(mut self, d: Duration) -> Result<WorkerConfig> {
        if d.is_zero() {
            return Err(Error::config(
                "HEARTBEAT_INTERVAL must be greater than zero (default 5s)",
            ));
        }
        self.heartbeat_interval = d;
        Ok(self)
    }

    /// After how long without a heartbeat the leader removes a worker and
    /// moves its slots. Must exceed the heartbeat interval. Default: 30 s.
    pub fn heartbeat_timeout(mut self, d: Duration) -> Result<WorkerConfig> {
        if d <= self.heartbeat_interval {
            return Err(Error::config(format!(
                "HEARTBEAT_TIMEOUT ({d:?}) must be longer than HEARTBEAT_INTERVAL ({:?}); \
                 use at least three intervals (default 30s with a 5s interval)",
                self.heartbeat_interval
            )));
        }
        self.heartbeat_timeout = d;
        Ok(self)
    }

    /// How often the leader rebalances and workers re-read their
    /// assignments. Default: 5 s.
    pub fn rebalance_interval(mut self, d: Duration) -> Result<WorkerConfig> {
        if d.is_zero() {
            return Err(Error::config(
                "REBALANCE_INTERVAL must be greater than zero (default 5s)",
            ));
        }
        self.rebalance_interval = d;
        Ok(self)
    }

    /// Failed batches in a row after which a worker releases a slot for
    /// another worker to try (with a growing rest period). Default: 10.
    pub fn max_consecutive_failures(mut self, n: u32) -> Result<WorkerConfig> {
        if n == 0 {
            return Err(Error::config(
                "MAX_CONSECUTIVE_FAILURES must be at least 1 (default 10)",
            ));
        }
        self.max_consecutive_failures = n;
        Ok(self)
    }

    /// Overrides the partition count a projection declares
    /// ([`ProjectionOptions::partitions`](crate::ProjectionOptions::partitions)).
    pub fn partitions(mut self, projection: &str, count: i32) -> Result<WorkerConfig> {
        if count < 1 {
            return Err(Error::config(format!(
                "partition count {count} for projection {projection} is invalid: use 1 or more"
            )));
        }
        self.partitions.insert(projection.to_owned(), count);
        Ok(self)
    }

    /// Parses `PROJECTION_PARTITIONS`: `name=count` pairs separated by commas.
    pub fn partitions_from_spec(mut self, spec: &str) -> Result<WorkerConfig> {
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, count) = part.split_once('=').ok_or_else(|| {
                Error::config(format!(
                    "PROJECTION_PARTITIONS entry {part:?} is not name=count: write e.g. account_balances=4,notifier=1"
                ))
            })?;
            let count: i32 = count.trim().parse().map_err(|_| {
                Error::config(format!(
                    "PROJECTION_PARTITIONS entry {part:?}: {count:?} is not a number; write e.g. account_balances=4"
                ))
            })?;
            self = self.partitions(name.trim(), count)?;
        }
        Ok(self)
    }
}

/// The `application_name` of a worker's batch connections.
fn worker_application_name(worker_id: &str) -> String {
    format!("projectionist-worker:{worker_id}")
}

/// The leader's advisory-lock key: one per schema (FNV-1a of
/// `projectionist:leader:<schema>`), so that deployments in different
/// schemas of one database elect their leaders independently. Advisory
/// locks are per database, so the database needs no part in it.
fn lock_key(schema: &Ident) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"projectionist:leader:"
        .iter()
        .chain(schema.as_str().as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// A slot the leader hands out.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct SlotSpec {
    projection: String,
    partition: i32,
    total: i32,
}

/// Runs this process as a worker until `shutdown` completes.
pub(crate) async fn run(
    engine: &Engine,
    wc: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let store = engine.store.clone();
    let sql = store.statements().clone();
    let schema = store.config().schema.clone();
    let channel = Ident::new("NOTIFY channel", WORKERS_CHANNEL)?;

    // Versions registered and read models migrated before any slot runs.
    crate::versions::prepare(&store, &engine.projections).await?;
    // The slots, validated against stored checkpoints before joining.
    let mut slots = Vec::new();
    {
        let client = store.pool().get().await?;
        let checkpoints = crate::checkpoint::Checkpoints::new(&sql.checkpoints);
        checkpoints.check_cluster(&**client).await?;
        for p in &engine.projections {
            let total = wc
                .partitions
                .get(p.name())
                .copied()
                .unwrap_or_else(|| p.partitions());
            if total < 1 {
                return Err(Error::config(format!(
                    "projection {} declares {total} partitions: use 1 or more",
                    p.name()
                )));
            }
            checkpoints.check_total(&**client, p.key(), total).await?;
            for partition in 0..total {
                slots.push(SlotSpec {
                    projection: p.key().to_owned(),
                    partition,
                    total,
                });
            }
        }
        for name in wc.partitions.keys() {
            if !engine.projections.iter().any(|p| p.name() == name) {
                return Err(Error::config(format!(
                    "PROJECTION_PARTITIONS names unknown projection {name:?}: check the spelling"
                )));
            }
        }
    }
    slots.sort();
    let mut totals: Vec<i32> = slots.iter().map(|s| s.total).collect();
    totals.dedup();
    totals.sort_unstable();
    totals.dedup();
    for total in totals {
        crate::partition_index::ensure(&store, total).await?;
    }

    let worker_id = uuid::Uuid::now_v7().to_string();
    let hostname = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    // Batch connections carry the worker id, so that the leader can end the
    // sessions of a worker it declared dead (a paused process may hold a
    // batch transaction open, and with it locks and the watermark).
    let batch_pool = crate::db::pool(
        &crate::db::batch_config(
            store.pg_config(),
            engine.config.synchronous_commit,
            Some(&worker_application_name(&worker_id)),
        ),
        store.tls(),
        store.config().pool_size,
    )?;
    // The slots this binary can run: with binaries of different projection
    // versions in one pool, the leader hands each slot only to workers
    // that have it.
    let advertised = serde_json::Value::Array(
        slots
            .iter()
            .map(|s| serde_json::json!([s.projection, s.partition, s.total]))
            .collect(),
    );
    register(&store, &sql.workers, &worker_id, &hostname, &advertised).await?;
    notify_workers(&store, "joined").await;
    tracing::info!(worker_id = %worker_id, slots = slots.len(), "worker registered");

    let (stop_tx, stop_rx) = watch::channel(false);
    let (leader_stop_tx, leader_stop_rx) = watch::channel(false);
    let (wake, _) = watch::channel(0u64);
    let (workers_wake, _) = watch::channel(0u64);
    let marks = Arc::new(Watermarks::default());
    let is_leader = Arc::new(AtomicBool::new(false));
    let mut background = tokio::task::JoinSet::new();
    engine.spawn_background(
        &mut background,
        &wake,
        &marks,
        vec![(
            channel.clone(),
            Route::Workers {
                wake: workers_wake.clone(),
            },
        )],
        &stop_rx,
    );
    background.spawn(heartbeat_loop(
        store.clone(),
        sql.workers.clone(),
        worker_id.clone(),
        hostname.clone(),
        advertised.clone(),
        wc.heartbeat_interval,
        stop_rx.clone(),
    ));
    let leader = tokio::spawn(lead(
        store.clone(),
        worker_id.clone(),
        lock_key(&schema),
        slots.clone(),
        wc.clone(),
        workers_wake.subscribe(),
        is_leader.clone(),
        leader_stop_rx,
    ));

    // Follow the assignments until shutdown.
    let mut follower = Follower {
        engine,
        batch_pool,
        worker_id: worker_id.clone(),
        wc: wc.clone(),
        marks: marks.clone(),
        wake: wake.clone(),
        running: HashMap::new(),
    };
    let mut workers_rx = workers_wake.subscribe();
    tokio::pin!(shutdown);
    let mut last_read = Instant::now();
    loop {
        crate::server::tick();
        match follower.read_assignments().await {
            Ok(assigned) => {
                last_read = Instant::now();
                follower.reconcile(assigned).await;
                crate::metrics::with(|m| m.slots_held.set(follower.running.len() as i64));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read assignments");
                if last_read.elapsed() > wc.heartbeat_timeout && !follower.running.is_empty() {
                    tracing::warn!("cannot prove slot ownership for longer than HEARTBEAT_TIMEOUT; stopping all slots");
                    follower.reconcile(Vec::new()).await;
                }
            }
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = workers_rx.changed() => {}
            _ = tokio::time::sleep(wc.rebalance_interval) => {}
        }
    }

    // Leave: finish batches, deregister, release leadership, tell the others.
    tracing::info!(worker_id = %worker_id, "worker leaving: letting in-flight batches commit");
    let _ = stop_tx.send(true);
    let drained = follower.stop_all(engine.config.shutdown_timeout).await;
    let _ = leader_stop_tx.send(true);
    let _ = leader.await;
    if let Ok(client) = store.pool().get().await {
        let _ = client
            .execute(
                &format!("DELETE FROM {} WHERE worker_id = $1", sql.workers),
                &[&worker_id],
            )
            .await;
    }
    notify_workers(&store, "left").await;
    background.abort_all();
    if drained {
        Ok(())
    } else {
        Err(engine.shutdown_timeout_error())
    }
}

async fn register(
    store: &crate::EventStore,
    workers: &str,
    worker_id: &str,
    hostname: &str,
    slots: &serde_json::Value,
) -> Result<()> {
    let client = store.pool().get().await?;
    client
        .execute(
            &format!(
                "INSERT INTO {workers} (worker_id, hostname, pid, version, slots) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (worker_id) DO UPDATE SET heartbeat_at = now(), slots = excluded.slots"
            ),
            &[
                &worker_id,
                &hostname,
                &(std::process::id() as i32),
                &env!("CARGO_PKG_VERSION"),
                slots,
            ],
        )
        .await?;
    Ok(())
}

async fn notify_workers(store: &crate::EventStore, what: &str) {
    if let Ok(client) = store.pool().get().await {
        let _ = client
            .execute("SELECT pg_notify($1, $2)", &[&WORKERS_CHANNEL, &what])
            .await;
    }
}

async fn heartbeat_loop(
    store: crate::EventStore,
    workers: String,
    worker_id: String,
    hostname: String,
    slots: serde_json::Value,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        let beat = async {
            let client = store.pool().get().await?;
            let n = client
                .execute(
                    &format!("UPDATE {workers} SET heartbeat_at = now() WHERE worker_id = $1"),
                    &[&worker_id],
                )
                .await?;
            Ok::<_, Error>(n)
        }
        .await;
        match beat {
            Ok(1) => {}
            Ok(_) => {
                tracing::warn!(worker_id = %worker_id, "this worker was removed (heartbeat timed out); registering again");
                if register(&store, &workers, &worker_id, &hostname, &slots)
                    .await
                    .is_ok()
                {
                    notify_workers(&store, "joined").await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}

/// Tries for the leader lock on a dedicated connection and, while holding
/// it, rebalances every interval and whenever the workers channel speaks.
#[allow(clippy::too_many_arguments)]
async fn lead(
    store: crate::EventStore,
    worker_id: String,
    key: i64,
    slots: Vec<SlotSpec>,
    wc: WorkerConfig,
    mut wake: watch::Receiver<u64>,
    is_leader: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let sql = store.statements().clone();
    let key_high = i64::from(((key as u64) >> 32) as u32);
    let key_low = i64::from((key as u64) as u32);
    let mut config = store.pg_config().clone();
    // `status` finds the leader by this name and the advisory lock it holds.
    config.application_name(format!("projectionist-leader:{worker_id}"));
    loop {
        if *stop.borrow() {
            return;
        }
        let (mut client, connection) = match config.connect(store.tls().clone()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %Error::from(e), "leader candidate cannot connect; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wc.rebalance_interval) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        let (closed_tx, mut closed) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = connection.await;
            let _ = closed_tx.send(());
        });
        // Candidate: try the lock until it is ours or the connection ends.
        let mut leading = false;
        loop {
            match client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                .await
            {
                Ok(row) if row.get::<_, bool>(0) => {
                    leading = true;
                    break;
                }
                Ok(_) => {
                    // A leader whose worker stopped heartbeating (a paused
                    // or hung process) still holds the lock: end its session.
                    // Found by the lock itself, not by a name (another
                    // deployment in another schema of this database has
                    // leaders of its own): pg_locks shows a bigint advisory
                    // key as classid (high 32 bits), objid (low 32 bits),
                    // objsubid 1. Ended only when its worker, named in the
                    // session's application_name, has no live heartbeat in
                    // this schema's worker_nodes.
                    let timeout_s = wc.heartbeat_timeout.as_secs_f64();
                    let deposed = client
                        .query(
                            &format!(
                                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l \
                                 JOIN pg_stat_activity s ON s.pid = l.pid \
                                 WHERE l.locktype = 'advisory' AND l.granted \
                                   AND l.database = (SELECT oid FROM pg_database \
                                                     WHERE datname = current_database()) \
                                   AND l.classid = $2::int8::oid AND l.objid = $3::int8::oid \
                                   AND l.objsubid = 1 \
                                   AND l.pid <> pg_backend_pid() \
                                   AND s.application_name LIKE 'projectionist-leader:%' \
                                   AND NOT EXISTS (SELECT 1 FROM {} w \
                                       WHERE s.application_name = 'projectionist-leader:' || w.worker_id \
                                         AND w.heartbeat_at > now() - make_interval(secs => $1))",
                                sql.workers
                            ),
                            &[&timeout_s, &key_high, &key_low],
                        )
                        .await;
                    match deposed {
                        Ok(rows) if !rows.is_empty() => {
                            tracing::warn!(
                                "ended the session of a leader whose heartbeat timed out"
                            );
                            continue;
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                Err(_) => break,
            }
            tokio::select! {
                _ = tokio::time::sleep(wc.rebalance_interval) => {}
                _ = wake.changed() => {}
                _ = &mut closed => break,
                _ = stop.changed() => return,
            }
        }
        if leading {
            is_leader.store(true, Ordering::SeqCst);
            crate::metrics::with(|m| m.is_leader.set(1));
            tracing::info!("this worker is now the leader");
            loop {
                if let Err(e) = rebalance(&mut client, &sql, &slots, &wc).await {
                    tracing::warn!(error = %e, "rebalance failed; giving up leadership");
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(wc.rebalance_interval) => {}
                    _ = wake.changed() => {}
                    _ = &mut closed => {
                        tracing::warn!("leader connection lost; no longer leader");
                        break;
                    }
                    _ = stop.changed() => break,
                }
            }
            is_leader.store(false, Ordering::SeqCst);
            crate::metrics::with(|m| m.is_leader.set(0));
        }
        // Dropping the client closes the connection and releases the lock.
        drop(client);
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// A slot's assignment as the leader finds it: owner, the worker that
/// released it (failure budget), and whether it is resting.
type Current = (Option<String>, Option<String>, bool);

/// The slots a worker advertised (`worker_nodes.slots`).
fn parse_advertised(v: &serde_json::Value) -> Vec<SlotSpec> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| {
                    Some(SlotSpec {
                        projection: s.get(0)?.as_str()?.to_owned(),
                        partition: i32::try_from(s.get(1)?.as_i64()?).ok()?,
                        total: i32::try_from(s.get(2)?.as_i64()?).ok()?,
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The leader's own slots and every live worker's, each (projection,
/// partition) once (the leader's partition count wins a disagreement; the
/// checkpoints refuse the other anyway).
fn union_of_slots(own: &[SlotSpec], advertised: &[Option<Vec<SlotSpec>>]) -> Vec<SlotSpec> {
    let mut all: Vec<SlotSpec> = own.to_vec();
    for s in advertised.iter().flatten().flatten() {
        if !all
            .iter()
            .any(|o| o.projection == s.projection && o.partition == s.partition)
        {
            all.push(s.clone());
        }
    }
    all.sort();
    all
}

/// [`crate::assign::assign`] per group of slots that the same workers can
/// run: a worker of a binary without a slot's projection version never gets
/// it. A worker that advertised nothing (from before `worker_nodes.slots`)
/// counts as able to run every slot. When every worker runs one binary
/// there is one group, and this is `assign` itself.
fn assign_by_eligibility(
    slots: &[SlotSpec],
    states: &[crate::assign::SlotState],
    live: &[String],
    advertised: &[Option<Vec<SlotSpec>>],
) -> Vec<Option<String>> {
    let mut groups: BTreeMap<Vec<usize>, Vec<usize>> = BTreeMap::new();
    for (i, slot) in slots.iter().enumerate() {
        let eligible: Vec<usize> = (0..live.len())
            .filter(|&w| match &advertised[w] {
                None => true,
                Some(list) => list
                    .iter()
                    .any(|s| s.projection == slot.projection && s.partition == slot.partition),
            })
            .collect();
        groups.entry(eligible).or_default().push(i);
    }
    let mut desired = vec![None; slots.len()];
    for (eligible, members) in groups {
        let workers: Vec<String> = eligible.iter().map(|&w| live[w].clone()).collect();
        let group_states: Vec<crate::assign::SlotState> =
            members.iter().map(|&i| states[i].clone()).collect();
        for (&i, owner) in members
            .iter()
            .zip(crate::assign::assign(&group_states, &workers))
        {
            desired[i] = owner;
        }
    }
    desired
}

/// One rebalance, in one transaction on the leader's connection.
async fn rebalance(
    client: &mut tokio_postgres::Client,
    sql: &crate::store::Statements,
    slots: &[SlotSpec],
    wc: &WorkerConfig,
) -> Result<()> {
    let mut tx = client.transaction().await?;
    // A batch holding a slot's assignment row (a paused worker) must not
    // stall the leader for ever: give up this round and retry.
    tx.execute(
        "SELECT set_config('lock_timeout', $1, true)",
        &[&format!("{}ms", wc.rebalance_interval.as_millis().max(100))],
    )
    .await?;
    let timeout_s = wc.heartbeat_timeout.as_secs_f64();
    let removed = tx
        .query(
            &format!(
                "DELETE FROM {} WHERE heartbeat_at < now() - make_interval(secs => $1) RETURNING worker_id",
                sql.workers
            ),
            &[&timeout_s],
        )
        .await?;
    let mut dead_sessions = Vec::new();
    for r in &removed {
        let id: String = r.get(0);
        tracing::warn!(worker_id = %id, "removed a worker whose heartbeat timed out");
        dead_sessions.push(worker_application_name(&id));
    }
    if !dead_sessions.is_empty() {
        // End the dead worker's sessions: an open batch transaction of a
        // paused process would otherwise hold its slot's lock and the
        // watermark. (Its commits are fenced anyway.)
        // Best effort: a role that may not signal those sessions (workers
        // running as different roles without pg_signal_backend) must not
        // stop the rebalance.
        let sp = tx.savepoint("end_dead_sessions").await?;
        match sp
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ANY($1)",
                &[&dead_sessions],
            )
            .await
        {
            Ok(_) => sp.commit().await?,
            Err(e) => {
                tracing::warn!(error = %Error::from(e), "cannot end the sessions of a dead worker; \
                    grant pg_signal_backend to the worker role");
                sp.rollback().await?;
            }
        }
    }
    let workers = tx
        .query(
            &format!(
                "SELECT worker_id, slots FROM {} ORDER BY worker_id",
                sql.workers
            ),
            &[],
        )
        .await?;
    let mut live: Vec<String> = Vec::new();
    let mut advertised: Vec<Option<Vec<SlotSpec>>> = Vec::new();
    for r in &workers {
        live.push(r.try_get(0)?);
        let slots: Option<serde_json::Value> = r.try_get(1)?;
        advertised.push(slots.map(|v| parse_advertised(&v)));
    }
    let slots = &union_of_slots(slots, &advertised);
    let rows = tx
        .query(
            &format!(
                "SELECT projection_name, partition_key, worker_id, released_by, \
                        coalesce(released_until > now(), false) FROM {}",
                sql.assignments
            ),
            &[],
        )
        .await?;
    let mut current: BTreeMap<(String, i32), Current> = BTreeMap::new();
    for r in &rows {
        current.insert((r.get(0), r.get(1)), (r.get(2), r.get(3), r.get(4)));
    }
    // Sticky: only orphans and the excess over a fair share move (see
    // `assign`).
    let states: Vec<crate::assign::SlotState> = slots
        .iter()
        .map(|slot| {
            let (owner, released_by, resting) = current
                .get(&(slot.projection.clone(), slot.partition))
                .cloned()
                .unwrap_or((None, None, false));
            crate::assign::SlotState {
                owner,
                released_by,
                resting,
            }
        })
        .collect();
    let desired = assign_by_eligibility(slots, &states, &live, &advertised);
    let mut names = Vec::new();
    let mut partitions = Vec::new();
    let mut totals = Vec::new();
    let mut owners: Vec<Option<String>> = Vec::new();
    for ((slot, state), desired) in slots.iter().zip(&states).zip(desired) {
        if desired != state.owner
            || !current.contains_key(&(slot.projection.clone(), slot.partition))
        {
            names.push(slot.projection.clone());
            partitions.push(slot.partition);
            totals.push(slot.total);
            owners.push(desired);
        }
    }
    let changed = if names.is_empty() {
        0
    } else {
        tx.execute(
            &format!(
                "INSERT INTO {a} AS a (projection_name, partition_key, total_partitions, worker_id) \
                 SELECT * FROM unnest($1::text[], $2::int4[], $3::int4[], $4::text[]) \
                 ON CONFLICT (projection_name, partition_key) DO UPDATE \
                 SET worker_id = excluded.worker_id, total_partitions = excluded.total_partitions, \
                     generation = a.generation + 1, assigned_at = now() \
                 WHERE a.worker_id IS DISTINCT FROM excluded.worker_id \
                    OR a.total_partitions <> excluded.total_partitions",
                a = sql.assignments
            ),
            &[&names, &partitions, &totals, &owners],
        )
        .await?
    };
    if changed > 0 {
        tx.execute("SELECT pg_notify($1, 'rebalanced')", &[&WORKERS_CHANNEL])
            .await?;
        tracing::info!(slots_moved = changed, workers = live.len(), "rebalanced");
    }
    tx.commit().await?;
    Ok(())
}

/// A slot this worker runs.
struct Running {
    generation: i64,
    stop: watch::Sender<bool>,
    task: crate::slot::SlotTask<LoopExit>,
}

struct Follower<'r> {
    engine: &'r Engine,
    batch_pool: deadpool_postgres::Pool,
    worker_id: String,
    wc: WorkerConfig,
    marks: Arc<Watermarks>,
    wake: dispatcher::Wake,
    running: HashMap<(String, i32), Running>,
}

impl Follower<'_> {
    async fn read_assignments(&self) -> Result<Vec<(String, i32, i32, i64)>> {
        let sql = self.engine.store.statements();
        let client = self.engine.store.pool().get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT projection_name, partition_key, total_partitions, generation FROM {} \
                     WHERE worker_id = $1",
                    sql.assignments
                ),
                &[&self.worker_id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    /// Starts slots newly assigned, stops lost ones (after their in-flight
    /// batch), and restarts ones whose task ended.
    async fn reconcile(&mut self, assigned: Vec<(String, i32, i32, i64)>) {
        let wanted: HashMap<(String, i32), (i32, i64)> = assigned
            .into_iter()
            .map(|(n, p, t, g)| ((n, p), (t, g)))
            .collect();
        let keys: Vec<(String, i32)> = self.running.keys().cloned().collect();
        for key in keys {
            let keep = matches!(wanted.get(&key), Some((_, g)) if self.running.get(&key).is_some_and(|r| r.generation == *g))
                && self
                    .running
                    .get(&key)
                    .is_some_and(|r| !r.task.0.is_finished());
            if !keep {
                if let Some(r) = self.running.remove(&key) {
                    let exit = stop_slot(r, self.engine.config.shutdown_timeout).await;
                    tracing::info!(projection = %key.0, partition = key.1, exit = %exit, "slot stopped");
                }
            }
        }
        for (key, (total, generation)) in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            let Some(projection) = self
                .engine
                .projections
                .iter()
                .find(|p| p.key() == key.0)
                .cloned()
            else {
                tracing::warn!(projection = %key.0, "assigned a projection this binary does not have; ignoring it");
                continue;
            };
            match self.start(projection, key.1, total, generation).await {
                Ok(r) => {
                    tracing::info!(projection = %key.0, partition = key.1, generation, "slot started");
                    self.running.insert(key, r);
                }
                Err(e) => {
                    tracing::error!(projection = %key.0, partition = key.1, error = %e, "cannot start slot")
                }
            }
        }
    }

    async fn start(
        &self,
        projection: Registered,
        partition: i32,
        total: i32,
        generation: i64,
    ) -> Result<Running> {
        let fence = Fence {
            worker_id: self.worker_id.clone(),
            generation,
        };
        let p = Processor::start(
            projection.clone(),
            self.batch_pool.clone(),
            self.engine.store.statements(),
            Slot { partition, total },
            self.engine.config.batch_size,
            Some(fence.clone()),
        )
        .await?;
        // Stopped by `reconcile` when lost, or by `stop_all` on shutdown.
        let (stop_tx, stop_rx) = watch::channel(false);
        let limits = LoopLimits {
            max_backoff: self.engine.config.max_backoff,
            max_failures: Some(self.wc.max_consecutive_failures),
            once: false,
        };
        let signals = Signals {
            marks: self.marks.clone(),
            wake: self.wake.subscribe(),
            stop: stop_rx,
            progress: self.engine.progress.clone(),
        };
        let store = self.engine.store.clone();
        let name = projection.key().to_owned();
        let task = tokio::spawn(async move {
            let exit = crate::slot::run(p, signals, limits).await;
            if let LoopExit::GaveUp(e) = &exit {
                release(&store, &name, partition, &fence, e).await;
            }
            exit
        });
        Ok(Running {
            generation,
            stop: stop_tx,
            task: crate::slot::SlotTask(task),
        })
    }

    /// Stops every slot, letting in-flight batches commit within
    /// `timeout`; slots still running then are aborted (their batches roll
    /// back), so no slot task outlives the worker. Returns whether all
    /// stopped in time.
    async fn stop_all(&mut self, timeout: Duration) -> bool {
        let running: Vec<Running> = self.running.drain().map(|(_, r)| r).collect();
        for r in &running {
            let _ = r.stop.send(true);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut in_time = true;
        for mut r in running {
            if tokio::time::timeout_at(deadline, &mut r.task.0)
                .await
                .is_err()
            {
                r.task.0.abort();
                let _ = (&mut r.task.0).await;
                in_time = false;
            }
        }
        in_time
    }
}

/// Stops one slot: asks it to stop, waits up to `timeout` for its
/// in-flight batch (a hung handler is aborted after that), and describes
/// how it ended.
async fn stop_slot(mut r: Running, timeout: Duration) -> String {
    let _ = r.stop.send(true);
    match tokio::time::timeout(timeout, &mut r.task.0).await {
        Ok(Ok(exit)) => format!("{exit:?}"),
        Ok(Err(e)) => format!("the slot task died: {e}"),
        Err(_) => {
            r.task.0.abort();
            let _ = (&mut r.task.0).await;
            format!("did not stop within {timeout:?}; aborted (its batch rolled back)")
        }
    }
}

/// Gives a slot up after too many failed batches: unassigned, resting for a
/// growing while (1 s, 2 s, 4 s … up to 5 min), then handed to another
/// worker when there is one.
async fn release(
    store: &crate::EventStore,
    name: &str,
    partition: i32,
    fence: &Fence,
    error: &Error,
) {
    let sql = store.statements();
    let result = async {
        let client = store.pool().get().await?;
        client
            .execute(
                &format!(
                    "UPDATE {} SET worker_id = NULL, generation = generation + 1, released_by = $3, \
                     release_count = release_count + 1, \
                     released_until = now() + least(make_interval(secs => power(2, least(release_count, 20))), \
                                                    interval '5 minutes'), \
                     last_error = $5 \
                     WHERE projection_name = $1 AND partition_key = $2 AND worker_id = $3 AND generation = $4",
                    sql.assignments
                ),
                &[&name, &partition, &fence.worker_id, &fence.generation, &error.to_string()],
            )
            .await?;
        client
            .execute("SELECT pg_notify($1, 'released')", &[&WORKERS_CHANNEL])
            .await?;
        Ok::<_, Error>(())
    }
    .await;
    match result {
        Ok(()) => tracing::error!(projection = name, partition, error = %error,
            "too many failed batches in a row; released the slot for another worker"),
        Err(e) => {
            tracing::error!(projection = name, partition, error = %e, "could not release the slot")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(p: &str, partition: i32) -> SlotSpec {
        SlotSpec {
            projection: p.to_owned(),
            partition,
            total: 2,
        }
    }

    #[test]
    fn slots_go_only_to_workers_whose_binary_has_them() {
        let v1 = vec![spec("b", 0), spec("b", 1), spec("n", 0)];
        let v2 = vec![spec("b@v2", 0), spec("b@v2", 1), spec("n", 0)];
        let advertised = vec![Some(v1.clone()), Some(v2.clone()), Some(v2.clone()), None];
        let workers: Vec<String> = ["a", "c", "d", "old"]
            .iter()
            .map(|w| w.to_string())
            .collect();
        let json = serde_json::json!([["b@v2", 0, 2], ["b@v2", 1, 2], ["n", 0, 2]]);
        assert_eq!(parse_advertised(&json), v2);
        let slots = union_of_slots(&v1, &advertised);
        assert_eq!(slots.len(), 5);
        let states = vec![crate::assign::SlotState::default(); slots.len()];
        let desired = assign_by_eligibility(&slots, &states, &workers, &advertised);
        for (slot, owner) in slots.iter().zip(&desired) {
            let owner = owner.as_deref().expect("every slot has an owner");
            let ok = match slot.projection.as_str() {
                // Only the version-1 binary and the worker that advertised
                // nothing (from before versions).
                "b" => owner == "a" || owner == "old",
                "b@v2" => owner == "c" || owner == "d",
                _ => true,
            };
            assert!(ok, "{slot:?} went to {owner}");
        }
        // Two version-2 workers share version 2's slots.
        let v2_owners: std::collections::BTreeSet<_> = slots
            .iter()
            .zip(&desired)
            .filter(|(s, _)| s.projection == "b@v2")
            .map(|(_, o)| o.clone())
            .collect();
        assert_eq!(v2_owners.len(), 2, "{desired:?}");
        // One binary everywhere: one group, the plain assignment.
        let same = vec![Some(v1.clone()), Some(v1.clone())];
        let two: Vec<String> = vec!["a".into(), "c".into()];
        let states = vec![crate::assign::SlotState::default(); v1.len()];
        assert_eq!(
            assign_by_eligibility(&v1, &states, &two, &same),
            crate::assign::assign(&states, &two)
        );
    }

    #[test]
    fn partition_spec() {
        let wc = WorkerConfig::default()
            .partitions_from_spec("account_balances=4, notifier=1")
            .unwrap();
        assert_eq!(wc.partitions.get("account_balances"), Some(&4));
        assert_eq!(wc.partitions.get("notifier"), Some(&1));
        for bad in ["x", "x=y", "x=0"] {
            let e = WorkerConfig::default()
                .partitions_from_spec(bad)
                .unwrap_err();
            assert!(e.is_config(), "{bad}");
        }
    }

    #[test]
    fn timeout_must_exceed_interval() {
        let e = WorkerConfig::default()
            .heartbeat_interval(Duration::from_secs(5))
            .unwrap()
            .heartbeat_timeout(Duration::from_secs(5))
            .unwrap_err();
        assert!(e.to_string().contains("HEARTBEAT_TIMEOUT"));
    }
}
