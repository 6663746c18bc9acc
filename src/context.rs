//! What the engine hands a handler besides the events: the batch
//! transaction ([`Context`], which derefs to it) and the [`Scope`] of the
//! version being run — its number, the physical names of its read-model
//! tables, and whether an event is history being rebuilt or a live one.

use crate::event::StoredEvent;
use crate::projection::Transaction;
use std::sync::atomic::{AtomicI64, Ordering};

/// What a handler knows about the projection version it runs in.
#[derive(Debug)]
pub struct Scope {
    pub(crate) version: i32,
    /// (stable name, this version's physical name).
    pub(crate) tables: Vec<(String, String)>,
    /// The highest global position when this version was first started
    /// (`-1` until the engine registered the version).
    pub(crate) live_from: AtomicI64,
    pub(crate) pipelined: bool,
}

impl Scope {
    pub(crate) fn new(version: i32, tables: &[String], pipelined: bool) -> Scope {
        Scope {
            version,
            tables: tables
                .iter()
                .map(|t| (t.clone(), physical_table(t, version)))
                .collect(),
            live_from: AtomicI64::new(-1),
            pipelined,
        }
    }

    /// The projection version being run.
    pub fn version(&self) -> i32 {
        self.version
    }

    /// This version's physical table for the stable name `table` declared
    /// in [`ProjectionOptions::tables`](crate::ProjectionOptions::tables):
    /// `account_balances` → `account_balances_v2`. A name that was not
    /// declared is returned unchanged (a table shared by every version).
    pub fn table<'a>(&'a self, table: &'a str) -> &'a str {
        self.tables
            .iter()
            .find(|(stable, _)| stable == table)
            .map_or(table, |(_, physical)| physical.as_str())
    }

    /// Whether `event` is history this version is rebuilding — it was
    /// appended before the version first started — rather than a live
    /// event. A notifier can skip e-mails for replayed events while a new
    /// version catches up. `false` when the engine did not register the
    /// version (tests calling handlers directly).
    pub fn is_replay(&self, event: &StoredEvent) -> bool {
        let from = self.live_from.load(Ordering::Relaxed);
        from >= 0 && event.global_position <= from
    }

    /// A scope for calling handlers directly in tests: `version`, the
    /// tables it declares, and events up to `live_from` counted as replay.
    pub fn for_tests(version: i32, tables: &[&str], live_from: Option<i64>) -> Scope {
        let tables: Vec<String> = tables.iter().map(|t| (*t).to_owned()).collect();
        let scope = Scope::new(version, &tables, false);
        scope
            .live_from
            .store(live_from.unwrap_or(-1), Ordering::Relaxed);
        scope
    }
}

/// The physical table of `table` in `version`.
pub(crate) fn physical_table(table: &str, version: i32) -> String {
    format!("{table}_v{version}")
}

/// The batch transaction and the version's [`Scope`], handed to
/// [`Projection`](crate::Projection) handlers. Derefs to the
/// [`Transaction`], so `ctx.execute(...)` runs in the batch transaction and
/// commits with the checkpoint.
pub struct Context<'a> {
    tx: &'a Transaction<'a>,
    scope: &'a Scope,
}

impl<'a> Context<'a> {
    /// A context over `tx` and `scope` (for calling handlers directly in
    /// tests; the engine builds its own).
    pub fn new(tx: &'a Transaction<'a>, scope: &'a Scope) -> Context<'a> {
        Context { tx, scope }
    }

    /// The batch transaction.
    pub fn transaction(&self) -> &'a Transaction<'a> {
        self.tx
    }

    /// The version's scope.
    pub fn scope(&self) -> &'a Scope {
        self.scope
    }

    /// This version's physical table for a declared stable name (see
    /// [`Scope::table`]).
    pub fn table(&self, table: &'a str) -> &'a str {
        self.scope.table(table)
    }

    /// Whether `event` is history being rebuilt (see [`Scope::is_replay`]).
    pub fn is_replay(&self, event: &StoredEvent) -> bool {
        self.scope.is_replay(event)
    }

    /// The projection version being run.
    pub fn version(&self) -> i32 {
        self.scope.version
    }
}

impl<'a> std::ops::Deref for Context<'a> {
    type Target = Transaction<'a>;

    fn deref(&self) -> &Transaction<'a> {
        self.tx
    }
}
