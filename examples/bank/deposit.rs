//! `deposit`: appends one `MoneyDeposited` to an account and, with
//! `--wait`, waits until `account_balances` has handled it and prints the
//! balance read from it (read-your-writes: what a web handler does after
//! placing an order, before showing it).

use crate::events::{BankEvent, MoneyDeposited, ACCOUNT, EUR};
use crate::projections::ACCOUNT_BALANCES;
use clap::Args;
use projectionist::{Error, EventStore, ExpectedVersion, NewEvent, Result, Waiter};
use std::io::Write;

/// Options of `deposit`.
#[derive(Args, Debug, Clone)]
pub struct DepositArgs {
    /// The account, e.g. acct-1 (need not be opened: the balance counts it anyway).
    #[arg(long)]
    pub account: String,
    /// The amount in cents (positive).
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    pub cents: i64,
    /// Wait until account_balances has handled the deposit, then print the account's balance in
    /// cents, read from it, as the last number of the output.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (e.g. 500ms, 5s).
    #[arg(long, env = "WAIT_TIMEOUT", default_value = "5s")]
    pub timeout: String,
}

/// Ordering conflicts (a concurrent writer's newer transaction wrote the
/// stream's head) tolerated before giving up.
const MAX_ATTEMPTS: u32 = 50;

/// Appends the deposit (retrying conflicts: it expects any version), then
/// optionally waits for `account_balances` and prints the balance.
pub async fn run(store: &EventStore, args: &DepositArgs) -> Result<()> {
    let timeout = projectionist::cli::parse_duration("--timeout", &args.timeout)?;
    let event = NewEvent::typed(&BankEvent::Deposited(MoneyDeposited {
        cents: args.cents,
        currency: EUR.to_owned(),
    }))?;
    let mut attempt = 1;
    let appended = loop {
        match store
            .append(
                ACCOUNT,
                &args.account,
                ExpectedVersion::Any,
                std::slice::from_ref(&event),
            )
            .await
        {
            Ok(r) => break r,
            Err(e) if e.is_conflict() && attempt < MAX_ATTEMPTS => attempt += 1,
            Err(e) => return Err(e),
        }
    };
    let _ = writeln!(
        std::io::stdout(),
        "deposited {} cents to {} at global position {} (transaction {})",
        args.cents,
        args.account,
        appended.last_position,
        appended.transaction_id
    );
    if !args.wait {
        return Ok(());
    }
    Waiter::new(store)
        .wait(ACCOUNT_BALANCES, &appended, timeout)
        .await?;
    let client = store.pool().get().await?;
    let row = client
        .query_opt(
            "SELECT balance FROM account_balances WHERE account_id = $1",
            &[&args.account],
        )
        .await?;
    let balance: i64 = row
        .ok_or_else(|| {
            Error::config(format!(
                "{ACCOUNT_BALANCES} has handled the deposit but has no row for {}: was the read model \
                 reset meanwhile?",
                args.account
            ))
        })?
        .try_get(0)?;
    let _ = writeln!(std::io::stdout(), "balance of {}: {balance}", args.account);
    Ok(())
}
