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
    async_trait, Context, Error, FailurePolicy, Filter, Partition, Projection, ProjectionOptions,
    Result, StoredEvent, UnknownEvents,
};
use std::collections::BTreeMap;

/// Name (and checkpoint key) of the balances projection.
pub const ACCOUNT_BALANCES: &str = "account_balances";
/// Name (and checkpoint key) of the notifier.
pub const LARGE_WITHDRAWAL_NOTIFIER: &str = "large_withdrawal_notifier";
/// Withdrawals of at least this many cents are reported.
pub const LARGE_WITHDRAWAL_CENTS: i64 = 100_000;

/// `account_balances(account_id, owner, balance, event_count)` — and from
/// version 2 on `deposit_count` — the balance (deposits − withdrawals, in
/// cents) and the number of events of every account.
///
/// Readers query `account_balances`, a view the engine points at the live
/// version's table (`account_balances_v1`, `account_balances_v2`, …):
/// version 2 (`BANK_BALANCES_VERSION=2`) is built beside version 1 and
/// readers switch with `bank promote account_balances`.
///
/// Two modes, with identical results:
/// - batch (the default): [`Projection::handle_batch`] folds the whole page
///   into one change per account in Rust and sends a single
///   `INSERT … SELECT FROM unnest(arrays) ON CONFLICT DO UPDATE` per batch;
/// - per event (`BANK_PER_EVENT=1`): one prepared upsert per event.
pub struct AccountBalances {
    batch: bool,
    version: i32,
}

/// What one event does to its account's row.
struct Change {
    owner: Option<String>,
    delta: i64,
    deposit: bool,
}

/// A whole batch's effect on one account.
#[derive(Default)]
struct Folded {
    owner: Option<String>,
    delta: i64,
    count: i64,
    deposits: i64,
}

impl AccountBalances {
    /// `batch`: set-based SQL per batch (true) or one upsert per event;
    /// `version`: 1 (the original table) or 2 and up (adds
    /// `deposit_count`).
    pub fn new(batch: bool, version: i32) -> AccountBalances {
        AccountBalances { batch, version }
    }

    /// Whether set-based batch mode is on.
    pub fn is_batch(&self) -> bool {
        self.batch
    }

    /// Whether this version keeps `deposit_count`.
    fn counts_deposits(&self) -> bool {
        self.version >= 2
    }

    /// The effect of one event, decoded as a [`BankEvent`] (the store's
    /// registry has brought older shapes up to date).
    fn change(event: &StoredEvent) -> Result<Change> {
        let (owner, delta, deposit) = match event.typed::<BankEvent>()? {
            BankEvent::Opened(opened) => (Some(opened.owner), 0, false),
            BankEvent::Deposited(deposited) => (None, deposited.cents, true),
            BankEvent::Withdrawn(withdrawn) => {
                let cents = withdrawn.cents;
                let delta = cents.checked_neg().ok_or_else(|| {
                    Error::handler_msg(format!(
                        "MoneyWithdrawn at global position {} has an amount out of range: {cents}",
                        event.global_position
                    ))
                })?;
                (None, delta, false)
            }
        };
        Ok(Change {
            owner,
            delta,
            deposit,
        })
    }

    /// The upsert of one row per account from five parallel arrays (ids,
    /// owners, balance deltas, event counts, deposit counts): `balance +=
    /// delta`, `event_count += count`, the owner if an `AccountOpened` was
    /// seen. Upserts of this shape commute, so a deposit that arrives
    /// before its account's `AccountOpened` is fine.
    fn upsert_sql(&self, table: &str) -> String {
        let (column, value, set) = if self.counts_deposits() {
            (
                ", deposit_count",
                ", d",
                ", deposit_count = t.deposit_count + excluded.deposit_count",
            )
        } else {
            ("", "", "")
        };
        format!(
            "INSERT INTO {table} AS t (account_id, owner, balance, event_count{column}) \
             SELECT id, owner, delta, n{value} \
             FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[]) AS u(id, owner, delta, n, d) \
             ON CONFLICT (account_id) DO UPDATE SET \
               balance = t.balance + excluded.balance, \
               event_count = t.event_count + excluded.event_count, \
               owner = coalesce(excluded.owner, t.owner){set}"
        )
    }

    /// Folds `events` into one change per account and upserts them; with
    /// `batch` false, one statement per event.
    async fn upsert(&self, events: &[StoredEvent], ctx: &Context<'_>) -> Result<()> {
        let stmt = ctx
            .prepare_cached(&self.upsert_sql(ctx.table(ACCOUNT_BALANCES)))
            .await?;
        if !self.batch {
            for event in events {
                let c = Self::change(event)?;
                ctx.execute(
                    &stmt,
                    &[
                        &vec![event.aggregate_id.as_str()],
                        &vec![c.owner],
                        &vec![c.delta],
                        &vec![1i64],
                        &vec![i64::from(c.deposit)],
                    ],
                )
                .await?;
            }
            return Ok(());
        }
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
            f.deposits += i64::from(change.deposit);
            if change.owner.is_some() {
                f.owner = change.owner;
            }
        }
        let mut ids = Vec::with_capacity(folded.len());
        let mut owners = Vec::with_capacity(folded.len());
        let mut deltas = Vec::with_capacity(folded.len());
        let mut counts = Vec::with_capacity(folded.len());
        let mut deposits = Vec::with_capacity(folded.len());
        for (id, f) in folded {
            ids.push(id);
            owners.push(f.owner);
            deltas.push(f.delta);
            counts.push(f.count);
            deposits.push(f.deposits);
        }
        ctx.execute(&stmt, &[&ids, &owners, &deltas, &counts, &deposits])
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Projection for AccountBalances {
    fn options(&self) -> ProjectionOptions {
        ProjectionOptions::new(ACCOUNT_BALANCES)
            .version(self.version)
            .tables([ACCOUNT_BALANCES])
            .filter(Filter::all().aggregate_types([ACCOUNT]))
            // A handler error sets the event aside; the others go on.
            .failure_policy(FailurePolicy::dead_letter())
            // An event type from a newer release stops the slot until a
            // binary that knows it runs.
            .unknown_events(UnknownEvents::StopOnUnknownType)
    }

    /// The version's table (the engine runs this at start under its
    /// migration lock, and makes `account_balances` a view of the live
    /// version's table).
    async fn migrate(&self, ctx: &Context<'_>) -> Result<()> {
        let deposit_count = if self.counts_deposits() {
            ", deposit_count bigint NOT NULL DEFAULT 0"
        } else {
            ""
        };
        ctx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} ( \
               account_id  text PRIMARY KEY, \
               owner       text, \
               balance     bigint NOT NULL DEFAULT 0, \
               event_count bigint NOT NULL DEFAULT 0{deposit_count})",
            ctx.table(ACCOUNT_BALANCES)
        ))
        .await?;
        Ok(())
    }

    async fn handle(&self, event: &StoredEvent, ctx: &Context<'_>) -> Result<()> {
        self.upsert(std::slice::from_ref(event), ctx).await
    }

    async fn handle_batch(&self, events: &[StoredEvent], ctx: &Context<'_>) -> Result<()> {
        self.upsert(events, ctx).await
    }

    async fn reset(&self, ctx: &Context<'_>, partition: Option<Partition>) -> Result<()> {
        // `reset` runs this hook in its transaction with the projectionist
        // schema put in front of the connection's own search_path (for this
        // transaction only), so `projectionist_partition` resolves and the
        // table is still found where `migrate` created it: on the
        // connection's search_path, `public` by default. Appending `public`
        // only matters for a role or DATABASE_URL whose search_path leaves
        // it out.
        ctx.batch_execute(
            "SELECT set_config('search_path', current_setting('search_path') || ', public', true)",
        )
        .await?;
        let table = ctx.table(ACCOUNT_BALANCES);
        let sql = match partition {
            None => format!("DELETE FROM {table}"),
            Some(p) => format!(
                "DELETE FROM {table} WHERE {}",
                p.sql_condition("account_id")
            ),
        };
        let deleted = ctx.execute(sql.as_str(), &[]).await?;
        tracing::info!(rows = deleted, ?partition, table, "read model cleared");
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

#[async_trait]
impl Projection for LargeWithdrawalNotifier {
    fn options(&self) -> ProjectionOptions {
        ProjectionOptions::new(LARGE_WITHDRAWAL_NOTIFIER)
            .filter(Filter::all().event_types([MONEY_WITHDRAWN]))
            // It resends to a sink that drops duplicates by event id, so an
            // operator may `rewind` it to send again.
            .rewindable(true)
    }

    async fn handle(&self, event: &StoredEvent, ctx: &Context<'_>) -> Result<()> {
        let BankEvent::Withdrawn(withdrawn) = event.typed::<BankEvent>()? else {
            return Ok(());
        };
        if withdrawn.cents >= self.threshold && ctx.is_replay(event) {
            // History appended before this version first started (a new
            // version rebuilding): compliance heard about it already.
            tracing::debug!(idempotency_key = %event.event_id, "large withdrawal in replayed history: not notifying again");
        } else if withdrawn.cents >= self.threshold {
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
