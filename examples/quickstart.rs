//! Quickstart: migrate, append a few events, read them back, run a
//! projection to completion and print its read model.
//!
//! ```sh
//! cargo run --example quickstart                      # a throwaway PostgreSQL, removed on exit
//! DATABASE_URL=postgres://postgres@localhost/app cargo run --example quickstart
//! ```

use projectionist::testing::TestDatabase;
use projectionist::{
    async_trait, Context, Cursor, EventStore, ExpectedVersion, Filter, Metadata, NewEvent,
    Partition, Projection, ProjectionOptions, Registered, Runner, RunnerConfig, StoreConfig,
    StoredEvent,
};
use serde::{Deserialize, Serialize};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Serialize, Deserialize)]
struct AccountOpened {
    owner: String,
}

#[derive(Serialize, Deserialize)]
struct MoneyDeposited {
    amount: i64,
}

/// Keeps `quickstart_balances(account_id, owner, balance, event_count)`.
struct Balances;

#[async_trait]
impl Projection for Balances {
    fn options(&self) -> ProjectionOptions {
        ProjectionOptions::new("quickstart_balances")
            .filter(Filter::all().aggregate_types(["Account"]))
            // Readers query `quickstart_balances`; this version writes
            // `ctx.table("quickstart_balances")` (`quickstart_balances_v1`).
            .tables(["quickstart_balances"])
    }

    async fn migrate(&self, ctx: &Context<'_>) -> projectionist::Result<()> {
        ctx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} (account_id text PRIMARY KEY, owner text, \
             balance bigint NOT NULL DEFAULT 0, event_count bigint NOT NULL DEFAULT 0)",
            ctx.table("quickstart_balances")
        ))
        .await?;
        Ok(())
    }

    async fn handle(&self, event: &StoredEvent, tx: &Context<'_>) -> projectionist::Result<()> {
        let (owner, delta): (Option<String>, i64) = match event.event_type.as_str() {
            "AccountOpened" => (Some(event.decode::<AccountOpened>()?.owner), 0),
            "MoneyDeposited" => (None, event.decode::<MoneyDeposited>()?.amount),
            "MoneyWithdrawn" => (None, -event.decode::<MoneyDeposited>()?.amount),
            _ => (None, 0),
        };
        let stmt = tx
            .prepare_cached(&format!(
                "INSERT INTO {} AS b (account_id, owner, balance, event_count) VALUES ($1, $2, $3, 1) \
                 ON CONFLICT (account_id) DO UPDATE SET owner = coalesce(excluded.owner, b.owner), \
                 balance = b.balance + excluded.balance, event_count = b.event_count + 1",
                tx.table("quickstart_balances")
            ))
            .await?;
        tx.execute(&stmt, &[&event.aggregate_id, &owner, &delta])
            .await?;
        Ok(())
    }

    async fn reset(&self, tx: &Context<'_>, _: Option<Partition>) -> projectionist::Result<()> {
        tx.execute(
            &format!("DELETE FROM {}", tx.table("quickstart_balances")),
            &[],
        )
        .await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    // 1. A database: DATABASE_URL, or a throwaway cluster of our own.
    let (_throwaway, config) = match std::env::var("DATABASE_URL") {
        Ok(url) => {
            let config = projectionist::parse_url(&url)?;
            println!(
                "using DATABASE_URL: {}",
                projectionist::describe_database(&config)
            );
            (None, config)
        }
        Err(_) => {
            // A database on the testing module's server: a throwaway cluster
            // (or the server in PROJECTIONIST_TEST_DATABASE_URL).
            let db = TestDatabase::create().await?;
            println!(
                "started a throwaway PostgreSQL; database {} at {} (removed when this program exits)",
                db.name(),
                projectionist::describe_database(&db.config())
            );
            let config = db.config();
            (Some(db), config)
        }
    };

    // 2. Tables.
    let report = projectionist::migrate(&config, "public").await?;
    println!(
        "migrated: {}",
        if report.applied.is_empty() {
            "already up to date".to_owned()
        } else {
            report.applied.join(", ")
        }
    );
    // The read model's table comes from the projection's `migrate` hook,
    // which the runner runs at start.
    let store = EventStore::connect_config(config.clone(), StoreConfig::default())?;

    // 3. Append: one stream per account, with an expected version.
    let account = format!("acct-{}", uuid::Uuid::new_v4().simple());
    let metadata = Metadata {
        correlation_id: Some("quickstart".into()),
        ..Metadata::default()
    };
    let events = vec![
        NewEvent::new(
            "AccountOpened",
            &AccountOpened {
                owner: "Ada".into(),
            },
        )?
        .with_metadata(&metadata),
        NewEvent::new("MoneyDeposited", &MoneyDeposited { amount: 10_000 })?
            .with_metadata(&metadata),
        NewEvent::new("MoneyDeposited", &MoneyDeposited { amount: 2_500 })?
            .with_metadata(&metadata),
    ];
    let r = store
        .append("Account", &account, ExpectedVersion::NoStream, &events)
        .await?;
    println!(
        "appended {} events to Account/{account}: positions {}..{}, stream version {}",
        events.len(),
        r.first_position,
        r.last_position,
        r.stream_version
    );
    let r = store
        .append(
            "Account",
            &account,
            ExpectedVersion::Exact(r.stream_version),
            &[NewEvent::new(
                "MoneyWithdrawn",
                &MoneyDeposited { amount: 1_200 },
            )?],
        )
        .await?;
    println!(
        "appended a withdrawal at stream version {}",
        r.stream_version
    );

    // 4. Read the stream back.
    for e in store.read_stream("Account", &account, 1, 100).await? {
        println!(
            "  v{} {} {} (position {}, transaction {})",
            e.aggregate_version,
            e.event_type,
            e.payload_json(),
            e.global_position,
            e.transaction_id
        );
    }
    let page = store.read_all(Cursor::START, 10).await?;
    println!(
        "gap-safe read of the log: {} event(s), next cursor {}",
        page.events.len(),
        page.next_cursor
    );

    // 5. Run the projection until it has caught up, and print the read model.
    let balances = Registered::new(Arc::new(Balances))?;
    let runner =
        Runner::new(store.clone(), RunnerConfig::default()).with_registered(balances.clone())?;
    loop {
        runner.run_once().await?;
        let status = projectionist::status(&store, std::slice::from_ref(&balances)).await?;
        if status.iter().all(|s| s.lag_events == 0) {
            break;
        }
        // An open transaction elsewhere on the server holds the watermark back.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    println!("read model quickstart_balances:");
    let client = store.pool().get().await?;
    for row in client
        .query(
            "SELECT account_id, owner, balance, event_count FROM quickstart_balances ORDER BY account_id",
            &[],
        )
        .await?
    {
        let (id, owner, balance, count): (String, Option<String>, i64, i64) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?);
        println!("  {id}  owner={}  balance={balance}  events={count}", owner.unwrap_or_default());
    }
    Ok(())
}
