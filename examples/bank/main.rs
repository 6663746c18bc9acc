//! # bank: a complete projectionist application
//!
//! A tiny bank on the event store: every account is an `Account` stream of
//! `AccountOpened {"owner"}`, `MoneyDeposited {"cents", "currency"}` and
//! `MoneyWithdrawn {"cents", "currency"}` events (amounts in integer cents),
//! declared once as a typed enum with a registry that upcasts their older
//! shapes (`{"amount"}`, the old name `FundsDeposited`). It shows
//!
//! - a binary that adds its own subcommands (`simulate`, `deposit`) to the engine's
//!   `migrate`, `run-projections`, `status` and `reset`, by flattening
//!   [`projectionist::cli::Command`] into its clap enum and calling
//!   [`App::execute`];
//! - a transactional projection, `account_balances`, that maintains a read
//!   model exactly once, either with one upsert per event or with one
//!   set-based statement per batch (`handle_batch` over `unnest` arrays);
//! - a non-transactional consumer, `large_withdrawal_notifier`, with
//!   at-least-once side effects keyed by `event_id`;
//! - writers that append with expected versions and retry on conflicts;
//! - read-your-writes: `deposit --account A --cents N --wait` appends, waits
//!   until `account_balances` has handled the deposit (a [`projectionist::Waiter`],
//!   woken by the checkpoint's NOTIFY), and prints the balance read from it;
//! - traces (the cargo feature `otel`, which this example requires): with
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` set, `deposit` runs in a `bank.deposit`
//!   span whose `traceparent` its append stores, and `run-projections`
//!   exports batch and event spans that continue that trace.
//!
//! ## Running it
//!
//! ```sh
//! createdb bank && export DATABASE_URL=postgres://postgres@localhost/bank
//! cargo run --features otel --example bank -- migrate        # engine tables + the account_balances table
//! cargo run --features otel --example bank -- run-projections &   # DISPATCHER=notify for instant wake-ups
//! cargo run --features otel --example bank -- simulate --accounts 100 --events 20000 --writers 4
//! cargo run --features otel --example bank -- deposit --account acct-1 --cents 500 --wait   # prints the new balance
//! cargo run --features otel --example bank -- status         # until the lag is 0
//! psql "$DATABASE_URL" -c 'SELECT sum(balance), sum(event_count) FROM account_balances'
//! cargo run --features otel --example bank -- run-projections --once   # catch up, then exit
//! ```
//!
//! The two sums equal the `net amount` and the event count `simulate`
//! printed (on a fresh database).
//!
//! Environment: everything the engine reads (`DATABASE_URL`,
//! `PROJECTIONIST_SCHEMA`, `DISPATCHER`, `BATCH_SIZE`, …, see `--help`),
//! plus
//! - `BANK_PER_EVENT=1`: run `account_balances` with one upsert per event
//!   instead of one set-based statement per batch (the default);
//! - `BANK_LARGE_WITHDRAWAL_CENTS`: the notifier's threshold (default
//!   100000);
//! - `SIM_ACCOUNTS`, `SIM_EVENTS`, `SIM_WRITERS`, `SIM_SEED`: defaults of
//!   `simulate`'s options.
//!
//! Exit codes: 0 success, 1 runtime error, 2 usage or configuration error.

mod deposit;
mod events;
mod projections;
mod simulate;

use clap::{Parser, Subcommand};
use deposit::DepositArgs;
use projectionist::cli::{Command, GlobalArgs};
use projectionist::{App, Error};
use projections::{AccountBalances, LargeWithdrawalNotifier, LARGE_WITHDRAWAL_CENTS};
use simulate::SimulateArgs;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use tracing::Instrument;

/// An event-sourced bank on PostgreSQL (a projectionist example).
#[derive(Parser, Debug)]
#[command(name = "bank", version)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: BankCommand,
}

#[derive(Subcommand, Debug)]
enum BankCommand {
    #[command(flatten)]
    Engine(Command),
    /// Open accounts and append random deposits and withdrawals from concurrent writers.
    Simulate(SimulateArgs),
    /// Deposit cents to an account; with --wait, print its balance once account_balances has it.
    Deposit(DepositArgs),
}

/// Reads a boolean switch from the environment (unset: `false`).
fn env_flag(name: &str) -> Result<bool, String> {
    match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => Ok(false),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(format!("{name} is not valid UTF-8: set it to 1 or 0"))
        }
        Ok(v) => match v.trim() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "" | "0" | "false" | "no" | "off" => Ok(false),
            other => Err(format!(
                "{name}={other:?} is not a switch: set it to 1 or 0"
            )),
        },
    }
}

/// Reads a non-negative amount in cents from the environment.
fn env_cents(name: &str, default: i64) -> Result<i64, String> {
    match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!(
            "{name} is not valid UTF-8: set it to a number of cents"
        )),
        Ok(v) => v
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|c| *c >= 0)
            .ok_or_else(|| {
                format!(
                    "{name}={v:?} is not an amount: set it to a number of cents, e.g. {default}"
                )
            }),
    }
}

/// The app and its projections, configured from the environment.
fn build_app() -> Result<(App, bool), String> {
    let version = match std::env::var("BANK_BALANCES_VERSION") {
        Err(_) => 1,
        Ok(v) => v
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|v| *v >= 1)
            .ok_or_else(|| {
                format!("BANK_BALANCES_VERSION={v:?} is not a version: set it to 1, 2, 3, …")
            })?,
    };
    let balances = AccountBalances::new(!env_flag("BANK_PER_EVENT")?, version);
    let threshold = env_cents("BANK_LARGE_WITHDRAWAL_CENTS", LARGE_WITHDRAWAL_CENTS)?;
    let batch = balances.is_batch();
    let app = App::new("bank")
        .registry(events::registry())
        .projection(Arc::new(balances))
        .projection(Arc::new(LargeWithdrawalNotifier::new(threshold)));
    Ok((app, batch))
}

/// Prints `e` and maps it to an exit code, as [`App::execute`] does.
fn fail(e: &Error) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "error: {e}");
    ExitCode::from(if e.is_config() && !e.is_not_migrated() {
        2
    } else {
        1
    })
}

/// `migrate`: the engine's tables first, then the bank's read model.
async fn migrate(app: &App, global: &GlobalArgs) -> ExitCode {
    let code = app.execute(global, Command::Migrate).await;
    if code != ExitCode::SUCCESS {
        return code;
    }
    ExitCode::SUCCESS
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version print to stdout and are not errors.
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let (app, batch) = match build_app() {
        Ok(built) => built,
        Err(message) => {
            let _ = writeln!(std::io::stderr(), "error: {message}");
            return ExitCode::from(2);
        }
    };
    let global = cli.global;
    match cli.command {
        BankCommand::Engine(Command::Migrate) => migrate(&app, &global).await,
        BankCommand::Engine(command) => {
            if let Command::RunProjections(_) = &command {
                projectionist::cli::init_logging(&global.log_format, &global.log_level);
                tracing::info!(
                    mode = if batch {
                        "batch (one statement per batch)"
                    } else {
                        "per event (BANK_PER_EVENT=1)"
                    },
                    "account_balances"
                );
            }
            app.execute(&global, command).await
        }
        BankCommand::Deposit(args) => {
            projectionist::cli::init_logging(&global.log_format, &global.log_level);
            // With OTEL_EXPORTER_OTLP_ENDPOINT set, the deposit is a traced
            // request: its append stores the span's traceparent, and the
            // projections' spans continue that trace.
            let span =
                tracing::info_span!("bank.deposit", account = %args.account, cents = args.cents);
            let result = match app.store(&global) {
                Ok(store) => deposit::run(&store, &args).instrument(span).await,
                Err(e) => Err(e),
            };
            projectionist::cli::flush_traces().await;
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        BankCommand::Simulate(args) => {
            projectionist::cli::init_logging(&global.log_format, &global.log_level);
            let result = match app.store(&global) {
                Ok(store) => simulate::run(&store, &args).await,
                Err(e) => Err(e),
            };
            projectionist::cli::flush_traces().await;
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
    }
}
