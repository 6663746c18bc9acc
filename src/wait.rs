//! Read-your-writes: wait until a projection has handled an append.
//!
//! Every checkpoint advance NOTIFYs [`CHECKPOINTS_CHANNEL`] in the batch
//! transaction that moves the cursor (`checkpoint.rs`), so the notification
//! arrives when the cursor is committed, in every process. A [`Waiter`]
//! LISTENs on a dedicated connection (driven by `dispatcher::listen_loop`;
//! pooled connections never deliver notifications), reads the projection's
//! checkpoint rows once after LISTEN took effect (so no advance is missed
//! between the two), and again on each notification for the projection,
//! until every partition that could hold the target has its cursor at or
//! past it, or the timeout passes. It never polls.
//!
//! "Handled" means the slot's cursor is at or past the target in
//! `(transaction_id, global_position)` order. A slot's cursor also moves
//! past events its filter or partition excludes (the processor writes the
//! cursor whenever a page passed over any event), so a projection that does
//! not want the event counts as done once it has read past it.

use crate::checkpoint::CHECKPOINTS_CHANNEL;
use crate::dispatcher::{listen_loop, Route};
use crate::error::{Error, Kind, Result};
use crate::event::{Cursor, Xid8};
use crate::ident::Ident;
use crate::store::{AppendResult, EventStore};
use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Ceiling of the reconnect backoff of a [`Waiter`]'s LISTEN connection.
const LISTEN_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What to wait for: one event (and everything before it in cursor order),
/// or every event of one transaction; in the partitions that hold it, or in
/// one given partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitTarget {
    transaction_id: u64,
    /// `None`: the transaction's last event.
    position: Option<i64>,
    partition: Option<i32>,
}

impl WaitTarget {
    /// The event at `cursor` (its transaction id and global position, as
    /// an append returns them).
    pub fn event(cursor: Cursor) -> WaitTarget {
        WaitTarget {
            transaction_id: cursor.transaction_id,
            position: Some(cursor.global_position),
            partition: None,
        }
    }

    /// Every event appended by transaction `transaction_id` (several
    /// appends in one transaction of yours).
    pub fn transaction(transaction_id: u64) -> WaitTarget {
        WaitTarget {
            transaction_id,
            position: None,
            partition: None,
        }
    }

    /// Waits for this partition of the projection only. Default: every
    /// partition that holds one of the target's events (computed from the
    /// events' `aggregate_hash`), which for one append is one partition.
    pub fn in_partition(mut self, partition: i32) -> WaitTarget {
        self.partition = Some(partition);
        self
    }
}

impl From<Cursor> for WaitTarget {
    fn from(cursor: Cursor) -> WaitTarget {
        WaitTarget::event(cursor)
    }
}

impl From<&AppendResult> for WaitTarget {
    /// The append's last event.
    fn from(r: &AppendResult) -> WaitTarget {
        WaitTarget::event(Cursor::new(r.transaction_id, r.last_position))
    }
}

impl From<AppendResult> for WaitTarget {
    fn from(r: AppendResult) -> WaitTarget {
        WaitTarget::from(&r)
    }
}

/// The wake-ups a [`Waiter`]'s listener hands out: one generation counter
/// per projection being waited for, and one for the connection itself.
#[derive(Debug)]
pub(crate) struct Hub {
    /// Bumped after every successful LISTEN (0: never listened yet).
    listening: watch::Sender<u64>,
    names: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Hub {
    fn new() -> Hub {
        Hub {
            listening: watch::Sender::new(0),
            names: Mutex::new(HashMap::new()),
        }
    }

    fn names(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A checkpoint of `name` advanced.
    pub(crate) fn advanced(&self, name: &str) {
        if let Some(s) = self.names().get(name) {
            s.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// LISTEN took effect (first connect or reconnect): anything may have
    /// moved meanwhile, so every waiter looks again.
    pub(crate) fn listening(&self) {
        self.listening.send_modify(|g| *g = g.wrapping_add(1));
        for s in self.names().values() {
            s.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    fn subscribe(&self, name: &str) -> watch::Receiver<u64> {
        self.names()
            .entry(name.to_owned())
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe()
    }

    /// Forgets `name` once nobody waits for it any more.
    fn release(&self, name: &str) {
        let mut names = self.names();
        if names.get(name).is_some_and(|s| s.receiver_count() == 0) {
            names.remove(name);
        }
    }
}

struct Inner {
    store: EventStore,
    hub: Arc<Hub>,
    /// Dropped with the last clone of the waiter: ends the listener.
    stop: watch::Sender<bool>,
    started: OnceLock<()>,
}

/// Waits until projections have handled appends (read-your-writes): after
/// an append, a web handler waits for the read model it is about to query.
///
/// One `Waiter` keeps one dedicated LISTEN connection (opened on the first
/// wait that has to wait, reconnected with backoff, closed when the last
/// clone is dropped) and serves any number of concurrent waits: make one
/// per process and clone it. Each wait reads the projection's checkpoint
/// rows (one indexed query) when it starts and on each checkpoint
/// notification of that projection. Works in any process that reaches the
/// database: the projections may run elsewhere.
///
/// ```no_run
/// # async fn f(store: projectionist::EventStore, events: Vec<projectionist::NewEvent>) -> projectionist::Result<()> {
/// use projectionist::{ExpectedVersion, Waiter};
/// use std::time::Duration;
/// let waiter = Waiter::new(&store);
/// let appended = store.append("Account", "A", ExpectedVersion::Any, &events).await?;
/// waiter.wait("account_balances", &appended, Duration::from_secs(5)).await?;
/// // account_balances now reflects the append.
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Waiter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter")
            .field("store", &self.inner.store)
            .finish()
    }
}

/// One checkpoint row, as a wait sees it.
#[derive(Clone, Debug)]
struct SlotState {
    partition: i32,
    total: i32,
    cursor: Cursor,
    status: String,
    last_error: Option<String>,
    updated_seconds_ago: f64,
}

/// Where a wait stands.
enum Verdict {
    Done,
    Pending(String),
    Failed(Error),
}

/// A target resolved against the log: the cursor to reach and the
/// partition hashes of its events.
struct Resolved {
    cursor: Cursor,
    hashes: Vec<i64>,
    partition: Option<i32>,
    what: String,
}

impl Waiter {
    /// A waiter on `store`'s database and schema. Opens nothing yet: the
    /// LISTEN connection opens on the first wait that has to wait.
    pub fn new(store: &EventStore) -> Waiter {
        Waiter {
            inner: Arc::new(Inner {
                store: store.clone(),
                hub: Arc::new(Hub::new()),
                stop: watch::Sender::new(false),
                started: OnceLock::new(),
            }),
        }
    }

    /// Starts the listener (once).
    fn start(&self) -> Result<()> {
        if self.inner.started.get().is_some() {
            return Ok(());
        }
        let channel = Ident::new("NOTIFY channel", CHECKPOINTS_CHANNEL)?;
        self.inner.started.get_or_init(|| {
            let mut config = self.inner.store.pg_config().clone();
            config.application_name("projectionist-waiter");
            tokio::spawn(listen_loop(
                config,
                self.inner.store.tls().clone(),
                vec![(channel, Route::Checkpoints(self.inner.hub.clone()))],
                LISTEN_MAX_BACKOFF,
                self.inner.stop.subscribe(),
            ));
        });
        Ok(())
    }

    /// Waits until projection `projection` has handled `target` (an
    /// [`AppendResult`], a [`Cursor`] or a [`WaitTarget`]) in every
    /// partition that holds the target's events, for at most `timeout`.
    ///
    /// Call it after the appending transaction committed. Fails with
    /// [`Error::is_timeout`] when the timeout passes (the message names
    /// each partition's cursor and the target), with [`Error::is_failed`]
    /// at once when a partition it needs has failed before the target, and
    /// with [`Error::is_config`] when the target names no committed event
    /// or a partition out of range.
    pub async fn wait(
        &self,
        projection: &str,
        target: impl Into<WaitTarget>,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let target = target.into();
        let mut last = String::from("no checkpoint read yet");
        let waited =
            tokio::time::timeout_at(deadline, self.wait_inner(projection, target, &mut last)).await;
        match waited {
            Ok(r) => r,
            Err(_) => {
                let listening = *self.inner.hub.listening.borrow() > 0;
                let connection = if listening || self.inner.started.get().is_none() {
                    String::new()
                } else {
                    format!(
                        " (the LISTEN connection to {} is not up: see the log for why)",
                        crate::db::describe(self.inner.store.pg_config())
                    )
                };
                Err(Error::new(
                    Kind::Timeout,
                    format!(
                        "timed out after {timeout:?} waiting for projection {projection} to handle {last}{connection}. \
                         Check that run-projections runs {projection} (`status` shows its cursor and lag), or \
                         wait longer"
                    ),
                ))
            }
        }
    }

    async fn wait_inner(
        &self,
        projection: &str,
        target: WaitTarget,
        last: &mut String,
    ) -> Result<()> {
        let resolved = self.resolve(&target).await?;
        *last = format!("{}: no checkpoint read yet", resolved.what);
        // Already there: no connection needed.
        match self.check(projection, &resolved, last).await? {
            Verdict::Done => return Ok(()),
            Verdict::Failed(e) => return Err(e),
            Verdict::Pending(_) => {}
        }
        self.start()?;
        let mut listening = self.inner.hub.listening.subscribe();
        while *listening.borrow_and_update() == 0 {
            if listening.changed().await.is_err() {
                return Err(Error::new(
                    Kind::Other,
                    "the waiter's listener ended: create a new Waiter",
                ));
            }
        }
        // Subscribed and LISTENing before reading: an advance committed
        // after this read wakes us; one committed before it, the read sees.
        let mut woken = self.inner.hub.subscribe(projection);
        let result = async {
            loop {
                woken.borrow_and_update();
                match self.check(projection, &resolved, last).await? {
                    Verdict::Done => return Ok(()),
                    Verdict::Failed(e) => return Err(e),
                    Verdict::Pending(_) => {}
                }
                if woken.changed().await.is_err() {
                    return Err(Error::new(
                        Kind::Other,
                        "the waiter's listener ended: create a new Waiter",
                    ));
                }
            }
        }
        .await;
        drop(woken);
        self.inner.hub.release(projection);
        result
    }

    /// Finds the target's events: its cursor and partition hashes.
    async fn resolve(&self, target: &WaitTarget) -> Result<Resolved> {
        let events = &self.inner.store.statements().events;
        let client = self.inner.store.pool().get().await?;
        let tx = Xid8(target.transaction_id);
        let (cursor, hashes, what) = match target.position {
            Some(position) => {
                let row = client
                    .query_opt(
                        &format!(
                            "SELECT aggregate_hash FROM {events} \
                             WHERE global_position = $1 AND transaction_id = $2"
                        ),
                        &[&position, &tx],
                    )
                    .await?;
                let Some(row) = row else {
                    return Err(Error::config(format!(
                        "no committed event at global position {position} of transaction {}: wait after the \
                         appending transaction committed (an append in your own transaction is invisible \
                         until you commit), with the transaction id and position the append returned",
                        target.transaction_id
                    )));
                };
                (
                    Cursor::new(target.transaction_id, position),
                    vec![row.try_get::<_, i64>(0)?],
                    format!(
                        "global position {position} (transaction {})",
                        target.transaction_id
                    ),
                )
            }
            None => {
                let row = client
                    .query_one(
                        &format!(
                            "SELECT max(global_position), coalesce(array_agg(DISTINCT aggregate_hash), '{{}}') \
                             FROM {events} WHERE transaction_id = $1"
                        ),
                        &[&tx],
                    )
                    .await?;
                let Some(position) = row.try_get::<_, Option<i64>>(0)? else {
                    return Err(Error::config(format!(
                        "transaction {} appended no committed event: wait after it committed, with the \
                         transaction id an append returned",
                        target.transaction_id
                    )));
                };
                (
                    Cursor::new(target.transaction_id, position),
                    row.try_get::<_, Vec<i64>>(1)?,
                    format!(
                        "transaction {} (up to global position {position})",
                        target.transaction_id
                    ),
                )
            }
        };
        Ok(Resolved {
            cursor,
            hashes,
            partition: target.partition,
            what,
        })
    }

    /// Reads the projection's checkpoint rows and judges them.
    async fn check(
        &self,
        projection: &str,
        resolved: &Resolved,
        last: &mut String,
    ) -> Result<Verdict> {
        let client = self.inner.store.pool().get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT partition_key, total_partitions, last_transaction_id, last_global_position, status, \
                     last_error, extract(epoch FROM now() - updated_at)::float8 \
                     FROM {} WHERE projection_name = $1 ORDER BY partition_key",
                    self.inner.store.statements().checkpoints
                ),
                &[&projection],
            )
            .await?;
        let slots = rows
            .iter()
            .map(|r| {
                Ok(SlotState {
                    partition: r.try_get(0)?,
                    total: r.try_get(1)?,
                    cursor: Cursor::new(r.try_get::<_, Xid8>(2)?.0, r.try_get(3)?),
                    status: r.try_get(4)?,
                    last_error: r.try_get(5)?,
                    updated_seconds_ago: r.try_get(6)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let verdict = judge(projection, resolved, &slots)?;
        if let Verdict::Pending(why) = &verdict {
            *last = format!("{}: {why}", resolved.what);
        }
        Ok(verdict)
    }
}

/// Whether the slots have all passed the target.
fn judge(projection: &str, target: &Resolved, slots: &[SlotState]) -> Result<Verdict> {
    let Some(total) = slots.first().map(|s| s.total) else {
        return Ok(Verdict::Pending(format!(
            "projection {projection} has no checkpoint yet (check the name, and that run-projections runs it)"
        )));
    };
    let needed: BTreeSet<i32> = match target.partition {
        Some(k) if k < 0 || k >= total => {
            return Err(Error::config(format!(
                "partition {k} is out of range: projection {projection} runs with {total} partition(s), \
                 0..{total}"
            )))
        }
        Some(k) => BTreeSet::from([k]),
        None => target
            .hashes
            .iter()
            .map(|h| h.rem_euclid(i64::from(total)) as i32)
            .collect(),
    };
    let mut behind = Vec::new();
    for k in needed {
        let Some(s) = slots.iter().find(|s| s.partition == k) else {
            behind.push(format!(
                "partition {k} of {total} has no checkpoint yet (is a process running it?)"
            ));
            continue;
        };
        if s.cursor >= target.cursor {
            continue;
        }
        if s.status == "failed" {
            return Ok(Verdict::Failed(Error::new(
                Kind::Failed,
                format!(
                    "projection {projection} partition {k} has failed at cursor {} before reaching {} ({}); \
                     it will not get there until the cause is fixed and it is resumed (`resume {projection}`)",
                    s.cursor,
                    target.what,
                    s.last_error.as_deref().unwrap_or("no error recorded")
                ),
            )));
        }
        let state = if s.status == "stopped" {
            "paused: `resume` it".to_owned()
        } else {
            s.status.clone()
        };
        behind.push(format!(
            "partition {k} of {total} is at cursor {} ({state}, last moved {:.1}s ago)",
            s.cursor, s.updated_seconds_ago
        ));
    }
    if behind.is_empty() {
        Ok(Verdict::Done)
    } else {
        Ok(Verdict::Pending(format!(
            "target cursor {}; {}",
            target.cursor,
            behind.join("; ")
        )))
    }
}

impl EventStore {
    /// Waits until `projection` has handled `target`, for at most
    /// `timeout`: [`Waiter::wait`] on a waiter of its own (one LISTEN
    /// connection for this call, when it has to wait). Code that waits
    /// often (a web server) keeps one [`Waiter`] instead.
    pub async fn wait_for(
        &self,
        projection: &str,
        target: impl Into<WaitTarget>,
        timeout: Duration,
    ) -> Result<()> {
        Waiter::new(self).wait(projection, target, timeout).await
    }
}

/// The `wait` subcommand: waits, then prints what was handled.
pub(crate) async fn run_cli(
    store: &EventStore,
    args: &crate::cli::WaitArgs,
    timeout: Duration,
) -> Result<()> {
    let mut target = match args.position {
        Some(p) => WaitTarget::event(Cursor::new(args.transaction_id, p)),
        None => WaitTarget::transaction(args.transaction_id),
    };
    if let Some(k) = args.partition {
        target = target.in_partition(k);
    }
    let started = std::time::Instant::now();
    store.wait_for(&args.name, target, timeout).await?;
    let _ = writeln!(
        std::io::stdout(),
        "{} has handled {} (waited {} ms)",
        args.name,
        match args.position {
            Some(p) => format!("global position {p} of transaction {}", args.transaction_id),
            None => format!("transaction {}", args.transaction_id),
        },
        started.elapsed().as_millis()
    );
    Ok(())
}

/// The longest wait the admin server's `/wait` accepts.
pub(crate) const HTTP_MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// Decodes one `application/x-www-form-urlencoded` value.
fn form_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The admin server's `GET /wait?projection=NAME&transaction_id=T
/// [&position=P][&partition=K][&timeout_ms=MS]` (timeout default 5000,
/// at most 60000): `(200, JSON)` once handled, 400 on bad input, 504 on
/// timeout, 409 when a partition it needs has failed, 503 when the
/// database fails. Read-only: a LISTEN and SELECTs.
pub(crate) async fn http(waiter: &Waiter, query: Option<&str>) -> (u16, String) {
    let bad = |m: String| (400, serde_json::json!({ "error": m }).to_string());
    let mut params: HashMap<String, String> = HashMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match (form_decode(k), form_decode(v)) {
            (Some(k), Some(v)) => {
                params.insert(k, v);
            }
            _ => {
                return bad(format!(
                    "malformed query parameter {pair:?}: percent-encode it"
                ))
            }
        }
    }
    let usage =
        "use /wait?projection=NAME&transaction_id=T[&position=P][&partition=K][&timeout_ms=MS]";
    let Some(projection) = params.get("projection").filter(|p| !p.is_empty()) else {
        return bad(format!("projection is missing: {usage}"));
    };
    fn number<T: std::str::FromStr>(
        params: &HashMap<String, String>,
        key: &str,
    ) -> std::result::Result<Option<T>, String> {
        params
            .get(key)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|_| format!("{key}={v:?} is not a number"))
            })
            .transpose()
    }
    let parsed = (|| {
        let tx = number::<u64>(&params, "transaction_id")?
            .ok_or_else(|| format!("transaction_id is missing: {usage}"))?;
        let position = number::<i64>(&params, "position")?;
        let partition = number::<i32>(&params, "partition")?;
        let timeout_ms = number::<u64>(&params, "timeout_ms")?.unwrap_or(5000);
        Ok::<_, String>((tx, position, partition, timeout_ms))
    })();
    let (tx, position, partition, timeout_ms) = match parsed {
        Ok(p) => p,
        Err(m) => return bad(m),
    };
    let timeout = Duration::from_millis(timeout_ms);
    if timeout > HTTP_MAX_TIMEOUT {
        return bad(format!(
            "timeout_ms={timeout_ms} is over the limit of {} ms: wait again instead",
            HTTP_MAX_TIMEOUT.as_millis()
        ));
    }
    let mut target = match position {
        Some(p) => WaitTarget::event(Cursor::new(tx, p)),
        None => WaitTarget::transaction(tx),
    };
    if let Some(k) = partition {
        target = target.in_partition(k);
    }
    let started = std::time::Instant::now();
    match waiter.wait(projection, target, timeout).await {
        Ok(()) => (
            200,
            serde_json::json!({
                "handled": true,
                "projection": projection,
                "transaction_id": tx,
                "position": position,
                "waited_ms": started.elapsed().as_millis() as u64,
            })
            .to_string(),
        ),
        Err(e) => {
            let status = if e.is_config() {
                400
            } else if e.is_timeout() {
                504
            } else if e.is_failed() {
                409
            } else {
                503
            };
            (
                status,
                serde_json::json!({ "handled": false, "error": e.to_string() }).to_string(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(partition: i32, total: i32, tx: u64, pos: i64, status: &str) -> SlotState {
        SlotState {
            partition,
            total,
            cursor: Cursor::new(tx, pos),
            status: status.to_owned(),
            last_error: Some("boom".to_owned()),
            updated_seconds_ago: 0.5,
        }
    }

    fn target(hashes: Vec<i64>, partition: Option<i32>) -> Resolved {
        Resolved {
            cursor: Cursor::new(100, 7),
            hashes,
            partition,
            what: "global position 7 (transaction 100)".to_owned(),
        }
    }

    #[test]
    fn decodes_form_values() {
        assert_eq!(form_decode("a%20b+c").as_deref(), Some("a b c"));
        assert_eq!(
            form_decode("account_balances").as_deref(),
            Some("account_balances")
        );
        assert_eq!(form_decode("%zz"), None);
        assert_eq!(form_decode("%4"), None);
    }

    #[test]
    fn only_the_partitions_holding_the_target_count() {
        // hash 5 of 2 partitions: partition 1.
        let slots = [slot(0, 2, 1, 1, "running"), slot(1, 2, 100, 7, "running")];
        assert!(matches!(
            judge("p", &target(vec![5], None), &slots).unwrap(),
            Verdict::Done
        ));
        let Verdict::Pending(why) = judge("p", &target(vec![4, 5], None), &slots).unwrap() else {
            panic!("partition 0 is behind")
        };
        assert!(
            why.contains("partition 0 of 2 is at cursor (1, 1)"),
            "{why}"
        );
        assert!(matches!(
            judge("p", &target(vec![4], Some(1)), &slots).unwrap(),
            Verdict::Done
        ));
    }

    #[test]
    fn a_cursor_past_the_target_in_a_later_transaction_counts() {
        let slots = [slot(0, 1, 101, 3, "running")];
        assert!(matches!(
            judge("p", &target(vec![9], None), &slots).unwrap(),
            Verdict::Done
        ));
    }

    #[test]
    fn missing_failed_and_out_of_range() {
        let Verdict::Pending(why) = judge("p", &target(vec![1], None), &[]).unwrap() else {
            panic!()
        };
        assert!(why.contains("no checkpoint yet"), "{why}");
        let Verdict::Failed(e) =
            judge("p", &target(vec![0], None), &[slot(0, 1, 1, 1, "failed")]).unwrap()
        else {
            panic!()
        };
        assert!(
            e.is_failed() && e.to_string().contains("resume p") && e.to_string().contains("boom")
        );
        let e = judge(
            "p",
            &target(vec![0], Some(3)),
            &[slot(0, 2, 1, 1, "running")],
        )
        .err()
        .unwrap();
        assert!(e.is_config() && e.to_string().contains("0..2"), "{e}");
        let Verdict::Pending(why) =
            judge("p", &target(vec![0], None), &[slot(0, 1, 1, 1, "stopped")]).unwrap()
        else {
            panic!()
        };
        assert!(why.contains("paused"), "{why}");
    }
}
