//! Connections: parsing `DATABASE_URL`, building the connection pool, and
//! opening the few dedicated (non-pooled) connections the engine needs
//! (migration lock, LISTEN). Passwords never leave this module in any
//! message: use [`describe`] to name a database in logs.

use crate::error::{Error, Kind, Result};
use crate::tls::MakeRustlsConnect;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::config::Host;
use tokio_postgres::Client;

/// Default maximum number of pooled connections (see docs/performance.md).
pub const DEFAULT_POOL_SIZE: usize = 16;

/// Parses a `postgres://…` URL or a `key=value` connection string.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config> {
    Ok(parse_target(url, None)?.0)
}

/// Parses a connection string and builds its TLS connector (see
/// `crate::tls`): `sslmode` (disable, prefer, require, verify-ca,
/// verify-full) and `sslrootcert`, or `ca_file` when it names none.
pub(crate) fn parse_target(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<(tokio_postgres::Config, MakeRustlsConnect)> {
    let (rest, tls) = crate::tls::split_options(url)?;
    let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| {
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
    config.ssl_mode(crate::tls::pg_ssl_mode(tls.mode));
    let connector = crate::tls::connector(&tls, ca_file)?;
    Ok((config, connector))
}

/// The connector for a configuration built elsewhere (its own `sslmode`,
/// no CA file: encrypted when the server offers TLS, unverified).
pub(crate) fn default_connector(config: &tokio_postgres::Config) -> Result<MakeRustlsConnect> {
    let mode = match config.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => crate::tls::SslMode::Disable,
        tokio_postgres::config::SslMode::Require => crate::tls::SslMode::Require,
        _ => crate::tls::SslMode::Prefer,
    };
    crate::tls::connector(
        &crate::tls::TlsOptions {
            mode,
            root_cert: None,
        },
        None,
    )
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
/// lazily, on first use, and handed out last returned first: a lone user
/// keeps one warm connection (and one server process) instead of rotating
/// through every connection the pool ever opened.
pub fn pool(config: &tokio_postgres::Config, tls: &MakeRustlsConnect, size: usize) -> Result<Pool> {
    let manager = Manager::from_config(
        config.clone(),
        tls.clone(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .queue_mode(deadpool_postgres::QueueMode::Lifo)
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
pub async fn connect_dedicated(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
) -> Result<Client> {
    let (client, connection) = config
        .connect(tls.clone())
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
        // A connection the pool hands out was opened (or checked, when
        // recycled) just now: a `SELECT 1` on it would cost a round trip and
        // prove nothing more.
        let outcome = pool.get().await.map(drop).map_err(Error::from);
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
    let target = describe(config);
    let text = format!("{e:?}");
    if text.contains("does not support TLS") {
        return Some(Error::new(
            Kind::Connection,
            format!(
                "the server at {target} does not offer TLS, but DATABASE_URL asks for it (sslmode): enable ssl \
                 on the server, or lower sslmode"
            ),
        ));
    }
    if text.contains("InvalidCertificate") || text.contains("certificate") {
        return Some(Error::new(
            Kind::Connection,
            format!(
                "the TLS certificate of {target} was refused ({e}): give the CA that signed it with \
                 sslrootcert in DATABASE_URL or DATABASE_CA_FILE, and connect with the host name the \
                 certificate names (verify-full)"
            ),
        ));
    }
    let code = e.db_code()?;
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

/// Masks passwords in text shown to operators (a query from
/// `pg_stat_activity`, an error message): the password of a URL's user
/// info (`postgres://user:***@host`), the value after `password=` or
/// `password:` (libpq key/value strings, JSON, environment variables such
/// as `PGPASSWORD=`), and a SQL literal after `PASSWORD` (`CREATE ROLE …
/// PASSWORD '***'`). A literal cut off by a truncated query is masked to
/// the end of the text.
pub(crate) fn redact(text: &str) -> String {
    redact_keyword(&redact_urls(text))
}

/// `scheme://user:secret@host` → `scheme://user:***@host`.
fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || "/?#'\"<>`".contains(c))
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(at), Some(colon)) if colon < at => {
                out.push_str(&authority[..=colon]);
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// The value after a `password` key (`=`, `:`) or the SQL literal after
/// the `PASSWORD` keyword.
fn redact_keyword(text: &str) -> String {
    const KEY: &str = "password";
    let lower = text.to_ascii_lowercase();
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut search = 0;
    while let Some(found) = lower[search..].find(KEY) {
        let mut i = search + found + KEY.len();
        search = i;
        // A quoted key (`"password": …`) ends with its quote.
        if i < bytes.len() && (bytes[i] == b'"' || bytes[i] == b'\'') {
            i += 1;
        }
        let spaced = i < bytes.len() && bytes[i].is_ascii_whitespace();
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let keyed = i < bytes.len() && (bytes[i] == b'=' || bytes[i] == b':');
        if keyed {
            i += 1;
            while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                i += 1;
            }
        } else if !(spaced && i < bytes.len() && bytes[i] == b'\'') {
            continue;
        }
        if i >= bytes.len() {
            break;
        }
        let (start, end) = if bytes[i] == b'\'' || bytes[i] == b'"' {
            // A quoted value; a doubled quote is an escaped one (SQL).
            let quote = bytes[i];
            let mut j = i + 1;
            loop {
                match bytes.get(j) {
                    None => break (i + 1, j),
                    Some(&b) if b == quote && bytes.get(j + 1) == Some(&quote) => j += 2,
                    Some(&b) if b == quote => break (i + 1, j),
                    Some(_) => j += 1,
                }
            }
        } else {
            let end = text[i..]
                .find(|c: char| c.is_whitespace() || "&;,)}]\"'".contains(c))
                .map(|n| i + n)
                .unwrap_or(text.len());
            (i, end)
        };
        if end > start {
            out.push_str(&text[copied..start]);
            out.push_str("***");
            copied = end;
        }
        search = end.max(search);
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_masks_passwords_and_keeps_the_rest() {
        for (text, want) in [
            (
                "postgres://app:s3cr3t@db:5432/bank?sslmode=require",
                "postgres://app:***@db:5432/bank?sslmode=require",
            ),
            ("postgres://app@db/bank", "postgres://app@db/bank"),
            (
                "see https://example.com/a:b@c",
                "see https://example.com/a:b@c",
            ),
            (
                "host=db user=app password=s3cr3t dbname=bank",
                "host=db user=app password=*** dbname=bank",
            ),
            ("password = 'it''s secret' x", "password = '***' x"),
            ("PGPASSWORD=s3cr3t psql", "PGPASSWORD=*** psql"),
            (
                r#"{"password": "s3cr3t", "u": 1}"#,
                r#"{"password": "***", "u": 1}"#,
            ),
            (
                "ALTER ROLE app WITH ENCRYPTED PASSWORD 'it''s s3cr3t' VALID UNTIL 'x'",
                "ALTER ROLE app WITH ENCRYPTED PASSWORD '***' VALID UNTIL 'x'",
            ),
            (
                "CREATE ROLE a PASSWORD 'cut off by left(query, 2",
                "CREATE ROLE a PASSWORD '***",
            ),
            ("CREATE ROLE a PASSWORD NULL", "CREATE ROLE a PASSWORD NULL"),
            (
                "password authentication failed for user \"app\"",
                "password authentication failed for user \"app\"",
            ),
            (
                "url postgres://u:p@h/db and password=x",
                "url postgres://u:***@h/db and password=***",
            ),
            ("PASSWORD", "PASSWORD"),
            ("password=", "password="),
            ("ünïcode password=ß€ rest", "ünïcode password=*** rest"),
        ] {
            assert_eq!(redact(text), want, "{text}");
        }
    }
}
