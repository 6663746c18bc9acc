//! `simulate`: opens accounts and lets concurrent writers append random
//! deposits and withdrawals, the way command handlers would: load the
//! stream, decide, append with the expected version, and on a conflict
//! reload and decide again.

use crate::events::{AccountOpened, BankEvent, MoneyDeposited, MoneyWithdrawn, ACCOUNT, EUR};
use clap::Args;
use projectionist::{Error, EventStore, ExpectedVersion, NewEvent, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// Options of `simulate`.
#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Accounts to open: acct-0 … acct-{N-1} (existing ones are reused).
    #[arg(long, env = "SIM_ACCOUNTS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub accounts: u32,
    /// Deposits and withdrawals to append in total (AccountOpened events come on top).
    #[arg(long, env = "SIM_EVENTS", default_value_t = 10_000)]
    pub events: u64,
    /// Concurrent writer tasks; each owns every W-th account (at most one writer per account).
    #[arg(long, env = "SIM_WRITERS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub writers: u32,
    /// Seed of the random amounts (default: a random seed).
    #[arg(long, env = "SIM_SEED")]
    pub seed: Option<u64>,
}

/// Largest single amount, in cents.
const MAX_AMOUNT: i64 = 50_000;
/// Events per append (one stream per append), drawn from 1 to this.
const MAX_EVENTS_PER_APPEND: u64 = 5;
/// Stream page size when loading an account.
const READ_PAGE: i64 = 1_000;
/// Conflicts tolerated on one append before giving up.
const MAX_ATTEMPTS: u32 = 50;

/// What a writer did.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    opened: u64,
    existed: u64,
    deposits: u64,
    withdrawals: u64,
    deposited: i64,
    withdrawn: i64,
    conflicts: u64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.opened += o.opened;
        self.existed += o.existed;
        self.deposits += o.deposits;
        self.withdrawals += o.withdrawals;
        self.deposited += o.deposited;
        self.withdrawn += o.withdrawn;
        self.conflicts += o.conflicts;
    }
}

/// An account as its writer knows it: the stream version and the balance.
struct Account {
    id: String,
    version: i64,
    balance: i64,
}

impl Account {
    /// Applies the stream's events after `self.version` (rehydration).
    async fn catch_up(&mut self, store: &EventStore) -> Result<()> {
        loop {
            let page = store
                .read_stream(ACCOUNT, &self.id, self.version + 1, READ_PAGE)
                .await?;
            for event in &page {
                // Stream reads upcast: older shapes arrive as version 2.
                match event.typed::<BankEvent>()? {
                    BankEvent::Deposited(d) => self.balance += d.cents,
                    BankEvent::Withdrawn(w) => self.balance -= w.cents,
                    BankEvent::Opened(_) => {}
                }
                self.version = event.aggregate_version;
            }
            if (page.len() as i64) < READ_PAGE {
                return Ok(());
            }
        }
    }
}

/// Opens `acct-i`, or loads it if it already exists. Returns whether this
/// call opened it.
async fn open_or_load(store: &EventStore, i: u32) -> Result<(Account, bool)> {
    let mut account = Account {
        id: format!("acct-{i}"),
        version: 0,
        balance: 0,
    };
    let opened = NewEvent::typed(&BankEvent::Opened(AccountOpened {
        owner: format!("owner-{i}"),
    }))?;
    match store
        .append(ACCOUNT, &account.id, ExpectedVersion::NoStream, &[opened])
        .await
    {
        Ok(r) => {
            account.version = r.stream_version;
            Ok((account, true))
        }
        // NoStream refused: the account exists (an earlier run, or another
        // writer); load its version and balance.
        Err(e) if e.is_conflict() => {
            account.catch_up(store).await?;
            Ok((account, false))
        }
        Err(e) => Err(e),
    }
}

/// Draws `n` events for an account holding `balance`: deposits, and
/// withdrawals only when the balance covers them. Returns the events, the
/// balance after them, and the (deposits, withdrawals, deposited, withdrawn)
/// figures.
fn draw(rng: &mut StdRng, n: u64, mut balance: i64) -> Result<(Vec<NewEvent>, i64, Totals)> {
    let mut events = Vec::with_capacity(n as usize);
    let mut t = Totals::default();
    for _ in 0..n {
        let amount = rng.gen_range(1..=MAX_AMOUNT);
        if rng.gen_bool(0.5) && amount <= balance {
            events.push(NewEvent::typed(&BankEvent::Withdrawn(MoneyWithdrawn {
                cents: amount,
                currency: EUR.to_owned(),
            }))?);
            balance -= amount;
            t.withdrawals += 1;
            t.withdrawn += amount;
        } else {
            events.push(NewEvent::typed(&BankEvent::Deposited(MoneyDeposited {
                cents: amount,
                currency: EUR.to_owned(),
            }))?);
            balance += amount;
            t.deposits += 1;
            t.deposited += amount;
        }
    }
    Ok((events, balance, t))
}

/// One writer: opens its accounts (every `writers`-th from `w`), then
/// appends `quota` events in batches of 1–5 to randomly chosen ones.
async fn writer(
    store: EventStore,
    w: u32,
    writers: u32,
    accounts: u32,
    quota: u64,
    seed: u64,
) -> Result<Totals> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut totals = Totals::default();
    let mut owned = Vec::new();
    for i in (w..accounts).step_by(writers as usize) {
        let (account, opened) = open_or_load(&store, i).await?;
        if opened {
            totals.opened += 1;
        } else {
            totals.existed += 1;
        }
        owned.push(account);
    }
    if owned.is_empty() {
        return Ok(totals);
    }
    let mut remaining = quota;
    while remaining > 0 {
        let n = rng.gen_range(1..=MAX_EVENTS_PER_APPEND).min(remaining);
        let idx = rng.gen_range(0..owned.len());
        let account = &mut owned[idx];
        let mut attempt = 1;
        loop {
            // Decide on the state we know; on a conflict, reload and decide again.
            let (events, balance, drawn) = draw(&mut rng, n, account.balance)?;
            match store
                .append(
                    ACCOUNT,
                    &account.id,
                    ExpectedVersion::Exact(account.version),
                    &events,
                )
                .await
            {
                Ok(r) => {
                    account.version = r.stream_version;
                    account.balance = balance;
                    totals.add(&drawn);
                    break;
                }
                Err(e) if e.is_conflict() && attempt < MAX_ATTEMPTS => {
                    tracing::debug!(account = %account.id, attempt, error = %e, "conflict; reloading the stream");
                    totals.conflicts += 1;
                    attempt += 1;
                    account.catch_up(&store).await?;
                }
                Err(e) => return Err(e),
            }
        }
        remaining -= n;
    }
    Ok(totals)
}

/// Runs the simulation and prints its totals.
pub async fn run(store: &EventStore, args: &SimulateArgs) -> Result<()> {
    let writers = args.writers.min(args.accounts);
    if writers < args.writers {
        tracing::info!(
            writers,
            "fewer accounts than writers: using one writer per account"
        );
    }
    let seed = args.seed.unwrap_or_else(|| rand::thread_rng().gen());
    tracing::info!(
        accounts = args.accounts,
        events = args.events,
        writers,
        seed,
        "simulating"
    );
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let quota = args.events / u64::from(writers)
            + u64::from(u64::from(w) < args.events % u64::from(writers));
        tasks.spawn(writer(
            store.clone(),
            w,
            writers,
            args.accounts,
            quota,
            seed.wrapping_add(u64::from(w)),
        ));
    }
    let mut totals = Totals::default();
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined.map_err(|e| Error::handler_msg(format!("a writer task failed: {e}"))) {
            Ok(Ok(t)) => totals.add(&t),
            Ok(Err(e)) | Err(e) => {
                if first_error.is_none() {
                    // Stop the other writers: the totals would be incomplete anyway.
                    tasks.abort_all();
                    first_error = Some(e);
                }
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e.context("simulate"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let written = totals.opened + totals.deposits + totals.withdrawals;
    let net = totals.deposited - totals.withdrawn;
    tracing::info!(
        conflicts = totals.conflicts,
        events_per_second = (written as f64 / elapsed.max(1e-9)) as u64,
        "simulation finished"
    );
    let mut report = format!(
        "simulate: wrote {written} events ({} AccountOpened, {} deposits, {} withdrawals); net amount {net} cents; elapsed {elapsed:.2}s\n",
        totals.opened, totals.deposits, totals.withdrawals
    );
    if totals.existed > 0 {
        report.push_str(&format!(
            "note: {} of {} accounts already existed (from an earlier run), so the sums in account_balances \
             also include the events of earlier runs\n",
            totals.existed, args.accounts
        ));
    } else {
        report.push_str(&format!(
            "expect: once run-projections has caught up, sum(balance) = {net} and sum(event_count) = {written} \
             (if the log held no other Account events before this run)\n"
        ));
    }
    report.push_str("check: SELECT sum(balance), sum(event_count) FROM account_balances\n");
    // A closed stdout (`simulate | head -1`) is not an error of the simulation.
    use std::io::Write;
    let _ = std::io::stdout().write_all(report.as_bytes());
    Ok(())
}
