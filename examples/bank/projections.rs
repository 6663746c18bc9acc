//! The bank's two consumers of the event log.
//!
//! - [`AccountBalances`] (`account_balances`) is a *transactional* read
//!   model: every write goes through the batch transaction the engine hands
//!   it, so the rows commit together with the projection's checkpoint and
//!   each event is applied exactly once, even across crashes and restarts.
//! - [`LargeWithdrawalNotifier`] (`large_withdrawal_notifier`) is a
//!   *non-transactional* consumer: its side effect (here a log line, in real
//!   life an e-mail or an HTTP call) happens outside the database, so it is
//!   at-least-once.

use crate::events::{BankEvent, ACCOUNT, MONEY_WITHDRAWN};
use projectionist::{
    Error, FailurePolicy, Filter, Partition, Result, StoredEvent, Transaction, UnknownEvents,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio_postgres::GenericClient;

/// Name (and checkpoint key) of the balances projection.
pub const ACCOUNT_BALANCES: &str = "account_balances";
/// Name (and checkpoint key) of the notifier.
pub const LARGE_WITHDRAWAL_NOTIFIER: &str = "large_withdrawal_notifier";
/// Withdrawals of at least this many cents are reported.
pub const LARGE_WITHDRAWAL_CENTS: i64 = 100_000;

/// Advisory-lock key serialising concurrent creations of the read-model
/// table (two concurrent `CREATE TABLE IF NOT EXISTS` can otherwise fail
/// with a unique violation in the catalog).
const SCHEMA_LOCK_KEY: i64 = 0x6261_6e6b_5f72_6d31; // "bank_rm1"

/// Creates the read model if it is missing, on the connection's
/// `search_path` (the `public` schema by default). Cheap when the table
/// exists: one statement, no lock. Works both inside a transaction and on
/// its own (the `DO` block is then its own transaction, which releases the
/// lock).
pub async fn ensure_schema<C: GenericClient + Sync>(client: &C) -> Result<()> {
    client
        .batch_execute(&format!(
            "DO $$ BEGIN \
               IF to_regclass('account_balances') IS NULL THEN \
                 PERFORM pg_advisory_xact_lock({SCHEMA_LOCK_KEY}); \
                 CREATE TABLE IF NOT EXISTS account_balances ( \
                   account_id  text PRIMARY KEY, \
                   owner       text, \
                   balance     bigint NOT NULL DEFAULT 0, \
                   event_count bigint NOT NULL DEFAULT 0 \
                 ); \
               END IF; \
             END $$"
        ))
        .await?;
    Ok(())
}

/// The conflict clause shared by both upserts: `balance += delta`,
/// `event_count += count`, and the owner if an `AccountOpened` was seen.
/// Upserts of this shape commute, so a deposit that arrives before its
/// account's `AccountOpened` is fine.
macro_rules! upsert_tail {
    () => {
        " ON CONFLICT (account_id) DO UPDATE SET \
          balance = account_balances.balance + excluded.balance, \
          event_count = account_balances.event_count + excluded.event_count, \
          owner = coalesce(excluded.owner, account_balances.owner)"
    };
}

/// Per-event mode: one row per statement.
const UPSERT_ONE: &str = concat!(
    "INSERT INTO account_balances (account_id, owner, balance, event_count) \
     VALUES ($1, $2, $3, 1)",
    upsert_tail!()
);

/// Batch mode: one row per account of the batch, from four parallel arrays.
const UPSERT_MANY: &str = concat!(
    "INSERT INTO account_balances (account_id, owner, balance, event_count) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[])",
    upsert_tail!()
);

/// `account_balances(account_id, owner, balance, event_count)`: the balance
/// (deposits − withdrawals, in cents) and the number of events of every
/// account.
///
/// Two modes, with identical results:
/// - batch (the default): [`Projection::handle_batch`] folds the whole page
///   into one change per account in Rust and sends a single
///   `INSERT … SELECT FROM unnest(arrays) ON CONFLICT DO UPDATE` per batch;
/// - per event (`BANK_PER_EVENT=1`): one prepared upsert per event.
pub struct AccountBalances {
    batch: bool,
    /// Whether this process has made sure the table exists.
    schema_ready: AtomicBool,
}

/// What one event does to its account's row.
struct Change {
    owner: Option<String>,
    delta: i64,
}

/// A whole batch's effect on one account.
#[derive(Default)]
struct Folded {
    owner: Option<String>,
    delta: i64,
    count: i64,
}

impl AccountBalances {
    /// `batch`: set-based SQL per batch (true) or one upsert per event.
    pub fn new(batch: bool) -> AccountBalances {
        AccountBalances {
            batch,
            schema_ready: AtomicBool::new(false),
        }
    }

    /// Whether set-based batch mode is on.
    pub fn is_batch(&self) -> bool {
        self.batch
    }

    /// The effect of one event, decoded as a [`BankEvent`] (the store's
    /// registry has brought older shapes up to date).
    fn change(event: &StoredEvent) -> Result<Change> {
        let (owner, delta) = match event.typed::<BankEvent>()? {
            BankEvent::Opened(opened) => (Some(opened.owner), 0),
            BankEvent::Deposited(deposited) => (None, deposited.cents),
            BankEvent::Withdrawn(withdrawn) => {
                let cents = withdrawn.cents;
                let delta = cents.checked_neg().ok_or_else(|| {
                    Error::handler_msg(format!(
                        "MoneyWithdrawn at global position {} has an amount out of range: {cents}",
                        event.global_position
                    ))
                })?;
                (None, delta)
            }
        };
        Ok(Change { owner, delta })
    }

    /// Creates the table on first use in this process (a no-op afterwards).
    async fn ensure_table(&self, tx: &Transaction<'_>) -> Result<()> {
        if !self.schema_ready.load(Ordering::Acquire) {
            ensure_schema(&**tx).await?;
            self.schema_ready.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// After an "undefined table" error (the batch that created the table
    /// rolled back, or someone dropped it), check again next time.
    fn note_error(&self, e: Error) -> Error {
        if e.db_code() == Some("42P01") {
            self.schema_ready.store(false, Ordering::Release);
        }
        e
    }

    async fn upsert_one(&self, event: &StoredEvent, tx: &Transaction<'_>) -> Result<()> {
        let change = Self::change(event)?;
        let stmt = tx.prepare_cached(UPSERT_ONE).await?;
        tx.execute(&stmt, &[&event.aggregate_id, &change.owner, &change.delta])
            .await?;
        Ok(())
    }

    async fn upsert_batch(&self, events: &[StoredEvent], tx: &Transaction<'_>) -> Result<()> {
        // Sorted by account id: concurrent batches lock rows in one order.
        let mut folded: BTreeMap<&str, Folded> = BTreeMap::new();
        for event in events {
            let change = Self::change(event)?;
            let f = folded.entry(event.aggregate_id.as_str()).or_default();
            f.delta = f.delta.checked_add(change.delta).ok_or_else(|| {
                Error::handler_msg(format!(
                    "the balance change of account {} overflows in the batch ending at global position {}",
                    event.aggregate_id, event.global_position
                ))
            })?;
            f.count += 1;
            if change.owner.is_some() {
                f.owner = change.owner;
            }
        }
        let mut ids = Vec::with_capacity(folded.len());
        let mut owners = Vec::with_capacity(folded.len());
        let mut deltas = Vec::with_capacity(folded.len());
        let mut counts = Vec::with_capacity(folded.len());
        for (id, f) in folded {
            ids.push(id);
            owners.push(f.owner);
            deltas.push(f.delta);
            counts.push(f.count);
        }
        let stmt = tx.prepare_cached(UPSERT_MANY).await?;
        tx.execute(&stmt, &[&ids, &owners, &deltas, &counts])
            .await?;
        Ok(())
    }
}

#[projectionist::async_trait]
impl projectionist::Projection for AccountBalances {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new(ACCOUNT_BALANCES)
            .filter(Filter::all().aggregate_types([ACCOUNT]))
            .failure_policy(FailurePolicy::dead_letter())
            .unknown_events(UnknownEvents::StopOnUnknownType)
    }

    async fn handle(&self, event: &StoredEvent, tx: &projectionist::Context<'_>) -> Result<()> {
        self.ensure_table(tx).await?;
        self.upsert_one(event, tx)
            .await
            .map_err(|e| self.note_error(e))
    }

    async fn handle_batch(
        &self,
        events: &[StoredEvent],
        tx: &projectionist::Context<'_>,
    ) -> Result<()> {
        self.ensure_table(tx).await?;
        let result = if self.batch {
            self.upsert_batch(events, tx).await
        } else {
            let mut result = Ok(());
            for event in events {
                result = self.upsert_one(event, tx).await;
                if result.is_err() {
                    break;
                }
            }
            result
        };
        result.map_err(|e| self.note_error(e))
    }

    async fn reset(
        &self,
        tx: &projectionist::Context<'_>,
        partition: Option<Partition>,
    ) -> Result<()> {
        // `reset` runs this hook in its transaction with the projectionist
        // schema put in front of the connection's own search_path (for this
        // transaction only), so `projectionist_partition` resolves and
        // `account_balances` is still found where `migrate` created it: on
        // the connection's search_path, `public` by default. Appending
        // `public` only matters for a role or DATABASE_URL whose search_path
        // leaves it out.
        tx.batch_execute(
            "SELECT set_config('search_path', current_setting('search_path') || ', public', true)",
        )
        .await?;
        let exists: bool = tx
            .query_one("SELECT to_regclass('account_balances') IS NOT NULL", &[])
            .await?
            .try_get(0)?;
        if !exists {
            tracing::info!("account_balances does not exist yet: nothing to clear");
            return Ok(());
        }
        let sql = match partition {
            None => "DELETE FROM account_balances".to_owned(),
            Some(p) => format!(
                "DELETE FROM account_balances WHERE {}",
                p.sql_condition("account_id")
            ),
        };
        let deleted = tx.execute(sql.as_str(), &[]).await?;
        tracing::info!(rows = deleted, ?partition, "account_balances cleared");
        Ok(())
    }
}

/// Reports withdrawals of at least [`LARGE_WITHDRAWAL_CENTS`] (a log line
/// standing in for an e-mail to compliance or a call to a fraud service).
///
/// Delivery is **at least once**, not exactly once: the side effect does not
/// go through the batch transaction, so if the process crashes (or the
/// batch's commit fails) after the notification went out but before the
/// checkpoint committed, the batch is handled again and the notification
/// repeats. Every notification therefore carries the event's `event_id` as
/// its idempotency key, so that the receiver can drop duplicates.
pub struct LargeWithdrawalNotifier {
    threshold: i64,
}

impl LargeWithdrawalNotifier {
    /// Reports withdrawals of `threshold` cents or more.
    pub fn new(threshold: i64) -> LargeWithdrawalNotifier {
        LargeWithdrawalNotifier { threshold }
    }
}

#[projectionist::async_trait]
impl projectionist::Projection for LargeWithdrawalNotifier {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new(LARGE_WITHDRAWAL_NOTIFIER)
            .filter(Filter::all().event_types([MONEY_WITHDRAWN]))
    }

    async fn handle(&self, event: &StoredEvent, _tx: &projectionist::Context<'_>) -> Result<()> {
        let BankEvent::Withdrawn(withdrawn) = event.typed::<BankEvent>()? else {
            return Ok(());
        };
        if withdrawn.cents >= self.threshold {
            tracing::info!(
                idempotency_key = %event.event_id,
                account_id = %event.aggregate_id,
                amount_cents = withdrawn.cents,
                global_position = event.global_position,
                "large withdrawal: notifying compliance"
            );
        }
        Ok(())
    }
}
