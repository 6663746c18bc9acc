//! The crate's error type: opaque, with predicates instead of a public enum.
//!
//! Every error a user can cause carries a message that names the cause and
//! the fix. Callers branch on predicates (`is_conflict()`, `is_retryable()`,
//! …) so that new failure kinds can be added without breaking them.

use std::error::Error as StdError;
use std::fmt;

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The error type of every fallible projectionist operation.
pub struct Error {
    kind: Kind,
    message: String,
    source: Option<BoxError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Expected-version mismatch or per-stream order violation on append.
    Conflict,
    /// An event with this event_id already exists.
    DuplicateEvent,
    /// Bad configuration or input (usage error).
    Config,
    /// The schema has not been migrated.
    NotMigrated,
    /// A payload could not be encoded or decoded.
    Payload,
    /// A projection handler failed.
    Handler,
    /// The checkpoint moved under us: another runner owns this slot.
    Fenced,
    /// A projection stopped on an event (failure policy Stop).
    Failed,
    /// The database refused or failed a statement.
    Database,
    /// The database could not be reached (connection refused, closed, pool).
    Connection,
    /// A wait (read-your-writes) ran out of time.
    Timeout,
    /// Anything else (I/O, signals).
    Other,
}

impl Error {
    pub(crate) fn new(kind: Kind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }

    pub(crate) fn with_source(mut self, source: impl Into<BoxError>) -> Error {
        self.source = Some(source.into());
        self
    }

    /// A configuration or input error (exit code 2 on the command line):
    /// the message should name what was wrong and how to fix it.
    pub fn config(message: impl Into<String>) -> Error {
        Error::new(Kind::Config, message)
    }

    pub(crate) fn fenced(message: impl Into<String>) -> Error {
        Error::new(Kind::Fenced, message)
    }

    /// Wraps an error raised by a projection handler (or any code a user
    /// runs inside the engine) so that it can be returned from a handler.
    pub fn handler(error: impl Into<BoxError>) -> Error {
        let source: BoxError = error.into();
        Error {
            kind: Kind::Handler,
            message: source.to_string(),
            source: Some(source),
        }
    }

    /// A handler error from a message alone.
    pub fn handler_msg(message: impl Into<String>) -> Error {
        Error::new(Kind::Handler, message)
    }

    /// Prefixes the message with context (e.g. which projection failed).
    pub fn context(mut self, context: impl fmt::Display) -> Error {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// An append found the stream at another version than expected, or the
    /// stream's head was written by a newer transaction (see DESIGN §2.2).
    /// Re-read the stream and retry.
    pub fn is_conflict(&self) -> bool {
        self.kind == Kind::Conflict
    }

    /// An event with the same `event_id` is already stored.
    pub fn is_duplicate_event(&self) -> bool {
        self.kind == Kind::DuplicateEvent
    }

    /// Bad configuration or input: fix the input, retrying will not help.
    pub fn is_config(&self) -> bool {
        matches!(self.kind, Kind::Config | Kind::NotMigrated)
    }

    /// The tables do not exist: run `migrate` first.
    pub fn is_not_migrated(&self) -> bool {
        self.kind == Kind::NotMigrated
    }

    /// A payload could not be (de)serialised.
    pub fn is_payload(&self) -> bool {
        self.kind == Kind::Payload
    }

    /// A projection handler returned this error.
    pub fn is_handler(&self) -> bool {
        self.kind == Kind::Handler
    }

    /// The checkpoint compare-and-set failed: another runner advanced this
    /// projection's cursor; this runner must stop processing the slot.
    pub fn is_fenced(&self) -> bool {
        self.kind == Kind::Fenced
    }

    /// A projection slot stopped on a failing event (failure policy
    /// `Stop`): it stays stopped until `resume` or a restart.
    pub fn is_failed(&self) -> bool {
        self.kind == Kind::Failed
    }

    /// The database could not be reached.
    pub fn is_connection(&self) -> bool {
        self.kind == Kind::Connection
    }

    /// A [`crate::Waiter`] wait ran out of time before the projection
    /// handled the target (the message names its cursor and the target).
    pub fn is_timeout(&self) -> bool {
        self.kind == Kind::Timeout
    }

    /// Retrying the same operation later may succeed (conflicts,
    /// serialization failures, deadlocks, lost connections).
    pub fn is_retryable(&self) -> bool {
        match self.kind {
            Kind::Conflict | Kind::Connection => true,
            Kind::Database => self
                .db_code()
                .map(|c| {
                    matches!(c, "40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03")
                        || c.starts_with("08")
                })
                .unwrap_or(false),
            _ => false,
        }
    }

    /// The SQLSTATE of the underlying database error, if any.
    pub fn db_code(&self) -> Option<&str> {
        let mut cur: Option<&(dyn StdError + 'static)> = self.source.as_deref().map(|e| e as _);
        while let Some(e) = cur {
            if let Some(pg) = e.downcast_ref::<tokio_postgres::Error>() {
                return pg.code().map(|c| c.code());
            }
            cur = e.source();
        }
        None
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

/// Whether a "does not exist" error is about projectionist's own objects
/// (then `migrate` is the fix) rather than, say, a read model's table.
fn names_our_objects(e: &tokio_postgres::Error) -> bool {
    let message = e.as_db_error().map(|d| d.message()).unwrap_or_default();
    [
        "\"events\"",
        "projection_checkpoints",
        "consumer_assignments",
        "worker_nodes",
        "projectionist_partition",
        "schema \"",
    ]
    .iter()
    .any(|name| message.contains(name))
}

/// Describes a database error with its server message, detail and hint.
fn describe_db(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!("; detail: {d}"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            if let Some(src) = e.source() {
                s.push_str(&format!(": {src}"));
            }
            s
        }
    }
}

/// Whether a tokio-postgres error without a server error is about the
/// connection itself: closed, an I/O error (refused, reset, EOF; parse and
/// encode errors of the protocol stream carry one too), or a failed
/// connection set-up (timeout, TLS handshake, a protocol violation). Client
/// mistakes (row count, type conversions, parameter count) are not.
fn is_transport(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    let mut cur: Option<&(dyn StdError + 'static)> = e.source();
    while let Some(s) = cur {
        if s.is::<std::io::Error>() {
            return true;
        }
        cur = s.source();
    }
    // tokio-postgres exposes no predicate for these set-up failures, which
    // carry no I/O source; its messages for them are fixed strings.
    let text = e.to_string();
    [
        "timeout waiting for server",
        "error performing TLS handshake",
        "error connecting to server",
        "unexpected message from server",
        "error communicating with the server",
    ]
    .iter()
    .any(|m| text.starts_with(m))
}

/// Describes a client-side tokio-postgres error with its likely fix.
fn describe_client(e: &tokio_postgres::Error) -> String {
    let base = describe_db(e);
    let text = e.to_string();
    let fix = if text.starts_with("query returned an unexpected number of rows") {
        "a query run with query_one returned no row or more than one; use query_opt when the row may be \
         missing, or fix the query or the data"
    } else if text.starts_with("error deserializing column") {
        "a column was read as a Rust type that does not match its SQL type; read it as the matching type \
         (e.g. i64 for int8, i32 for int4) or cast it in the query"
    } else if text.starts_with("error serializing parameter") {
        "a parameter's Rust value does not match the SQL type of its placeholder; bind the matching type \
         or cast the placeholder"
    } else if text.starts_with("expected ") && text.contains(" parameters but got ") {
        "the statement's placeholders ($1, $2, ...) and the parameters passed differ in number"
    } else if text.starts_with("invalid column") {
        "the row has no column of that name; check the query's column list"
    } else {
        "check the statement and the Rust types it is used with"
    };
    format!("{base}: {fix}")
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Error {
        let code = e.code().map(|c| c.code().to_owned());
        let (kind, message) = match code.as_deref() {
            Some("42P01") | Some("3F000") | Some("42883") if names_our_objects(&e) => (
                Kind::NotMigrated,
                format!(
                    "the projectionist tables are missing ({}): run `migrate` first",
                    describe_db(&e)
                ),
            ),
            Some("22021") | Some("22P05") => (
                Kind::Payload,
                format!(
                    "the database rejected a text or JSON value ({}): remove NUL bytes (\\u0000) from event fields and payloads",
                    describe_db(&e)
                ),
            ),
            Some(c) if c.starts_with("08") || c.starts_with("57P") => {
                (Kind::Connection, format!("database connection lost: {}", describe_db(&e)))
            }
            None if is_transport(&e) => (
                Kind::Connection,
                format!("database connection failed: {}", describe_db(&e)),
            ),
            // Not a server error and not the connection: the caller's use of
            // the client (`query_one` without exactly one row, a column read
            // as the wrong Rust type, a parameter that cannot be encoded).
            // Retrying the same statement cannot fix it, so it is a plain
            // failure (in a handler: the failure policy's business).
            None => (
                Kind::Database,
                format!("database client error: {}", describe_client(&e)),
            ),
            _ => (Kind::Database, format!("database error: {}", describe_db(&e))),
        };
        Error::new(kind, message).with_source(e)
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Error {
        match e {
            // Getting a connection failed without a server error: whatever
            // the client says (a set-up timeout, an authentication step it
            // could not do), no connection was made.
            deadpool_postgres::PoolError::Backend(pg) if pg.as_db_error().is_none() => Error::new(
                Kind::Connection,
                format!("database connection failed: {}", describe_db(&pg)),
            )
            .with_source(pg),
            deadpool_postgres::PoolError::Backend(pg) => Error::from(pg),
            other => Error::new(
                Kind::Connection,
                format!("could not get a database connection from the pool: {other}"),
            )
            .with_source(other),
        }
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Error {
        Error::new(Kind::Payload, format!("JSON error: {e}")).with_source(e)
    }
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
