//! Connections: parsing `DATABASE_URL`, building the connection pool, and
//! opening the few dedicated (non-pooled) connections the engine needs
//! (migration lock, LISTEN). Passwords never leave this module in any
//! message: use [`describe`] to name a database in logs.

use crate::error::{Error, Kind, Result};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};

/// Default maximum number of pooled connections (see docs/performance.md).
pub const DEFAULT_POOL_SIZE: usize = 16;

/// Parses a `postgres://…` URL or a `key=value` connection string.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config> {
    let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
        // The parser's message never echoes the URL, so no password leaks.
        Error::config(format!(
            "invalid DATABASE_URL ({e}): expected postgres://USER:PASSWORD@HOST:5432/DBNAME \
             or key=value form such as \"host=localhost user=postgres dbname=app\""
        ))
    })?;
    if config.get_hosts().is_empty() {
        return Err(Error::config(
            "DATABASE_URL names no host: add one, e.g. postgres://postgres@localhost:5432/app",
        ));
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_application_name().is_none() {
        config.application_name("projectionist");
    }
    Ok(config)
}

/// Names a database for messages and logs: `user@host:port/dbname`, never
/// the password.
pub fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "?".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{}:{}/{}",
        config.get_user().unwrap_or("?"),
        host,
        port,
        config.get_dbname().unwrap_or("?")
    )
}

/// Builds a pool of at most `size` connections. Connections are opened
/// lazily, on first use.
pub fn pool(config: &tokio_postgres::Config, size: usize) -> Result<Pool> {
    let manager = Manager::from_config(
        config.clone(),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| {
            Error::new(
                Kind::Other,
                format!("cannot build the connection pool: {e}"),
            )
        })
}

/// Opens a dedicated connection and drives it on a background task. The
/// task ends when the returned client is dropped.
pub async fn connect_dedicated(config: &tokio_postgres::Config) -> Result<Client> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| Error::from(e).context(format!("cannot connect to {}", describe(config))))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "dedicated connection closed");
        }
    });
    Ok(client)
}

/// The connection settings for batch transactions: generic plans,
/// `synchronous_commit` off unless `synchronous` (see
/// `RunnerConfig::synchronous_commit`), and an `application_name` when given.
pub(crate) fn batch_config(
    config: &tokio_postgres::Config,
    synchronous: bool,
    application_name: Option<&str>,
) -> tokio_postgres::Config {
    let mut pg = config.clone();
    // Generic plans: the page query is otherwise re-planned on every page,
    // and partitioned reads get a sequential-scan plan for their first pages.
    let mut settings = "-c plan_cache_mode=force_generic_plan".to_owned();
    if !synchronous {
        settings.push_str(" -c synchronous_commit=off");
    }
    let options = match pg.get_options() {
        Some(o) if !o.is_empty() => format!("{o} {settings}"),
        _ => settings,
    };
    pg.options(&options);
    if let Some(name) = application_name {
        pg.application_name(name);
    }
    pg
}

/// Waits until the database answers, retrying connection failures with
/// backoff (0.5 s doubling to 5 s) and logging each attempt, for at most
/// `timeout`. Errors that retrying cannot fix (authentication, a missing
/// database) fail at once with the fix named.
pub(crate) async fn wait_until_reachable(
    pool: &Pool,
    config: &tokio_postgres::Config,
    timeout: Duration,
) -> Result<()> {
    let start = std::time::Instant::now();
    let mut delay = Duration::from_millis(500);
    let mut attempt = 1u32;
    loop {
        let outcome = async {
            let client = pool.get().await?;
            client.simple_query("SELECT 1").await?;
            Ok::<_, Error>(())
        }
        .await;
        let e = match outcome {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if let Some(fatal) = explain_fatal(&e, config) {
            return Err(fatal);
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return Err(Error::new(
                Kind::Connection,
                format!(
                    "could not connect to {} within {:?} ({attempt} attempts): {e}. Check that DATABASE_URL \
                     names the right host and port and that the server is running and reachable; raise \
                     CONNECT_TIMEOUT to wait longer",
                    describe(config),
                    timeout
                ),
            ));
        }
        let delay_now = delay.min(timeout - elapsed);
        tracing::warn!(database = %describe(config), attempt, retry_in_ms = delay_now.as_millis() as u64,
            error = %e, "database unreachable; retrying");
        tokio::time::sleep(delay_now).await;
        delay = (delay * 2).min(Duration::from_secs(5));
        attempt += 1;
    }
}

/// Connection errors that waiting will not fix, with their fix.
fn explain_fatal(e: &Error, config: &tokio_postgres::Config) -> Option<Error> {
    let code = e.db_code()?;
    let target = describe(config);
    let message = match code {
        "28P01" | "28000" => format!(
            "the server refused the login for {target} ({e}): check the user and password in DATABASE_URL"
        ),
        "3D000" => format!(
            "the database in DATABASE_URL does not exist on the server ({target}): create it \
             (createdb) or fix the database name"
        ),
        "42501" => format!("permission denied connecting to {target} ({e}): grant the role CONNECT on the database"),
        _ => return None,
    };
    Some(Error::new(Kind::Connection, message))
}
