//! Throwaway PostgreSQL servers and databases for tests.
//!
//! This module (enabled by the cargo feature `testing`) gives every test its own
//! fresh, empty PostgreSQL database, so tests of event stores and projections can
//! run in parallel without seeing each other's data. It is used by projectionist's
//! own integration tests and is offered to users for testing their projections,
//! most simply through [`ProjectionTest`]: given these events, when these
//! projections have run to the end, then query the read model.
//!
//! # Which server: `PROJECTIONIST_TEST_DATABASE_URL`, never `DATABASE_URL`
//!
//! Test databases are created and dropped on the server named by the
//! environment variable [`PROJECTIONIST_TEST_DATABASE_URL`](TEST_DATABASE_URL),
//! or, when it is unset or empty, on a throwaway cluster this module starts
//! itself. `DATABASE_URL` is **never** read here: it is the application's
//! server (the command line reads it), and `cargo test` in a shell set up to run
//! the application must not create or drop databases there. To run the tests
//! against a server of your own, point the test variable at it explicitly,
//! e.g. `PROJECTIONIST_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres
//! cargo test`. projectionist's own tests follow the same rule (its CI script
//! passes a `DATABASE_URL` it is given on as `PROJECTIONIST_TEST_DATABASE_URL`).
//!
//! # What it owns
//!
//! * A [`TestServer`]: the PostgreSQL server that test databases are created on.
//!   - If the environment variable `PROJECTIONIST_TEST_DATABASE_URL` is set (and
//!     not empty), that server is used, e.g. `postgres://postgres@127.0.0.1:5432/postgres`. The URL
//!     must name a role that may create and drop databases. Before the first
//!     database is created, databases left behind by earlier test processes that
//!     are no longer alive (`projectionist_test_{pid}_…` where `/proc/{pid}` is
//!     gone) are dropped.
//!   - Otherwise a throwaway cluster is started once per test process
//!     ([`TestServer::shared`]): `initdb` into a fresh directory under the
//!     system temporary directory (`TMPDIR`), tuned for speed (`fsync`, full page
//!     writes and, on the shared cluster, synchronous commit off), listening only
//!     on a Unix socket inside that directory. The server binaries (`initdb`, `pg_ctl`, `postgres`) are
//!     taken from the directory in `PG_BIN`, else from `PATH`, else from the
//!     newest `/usr/lib/postgresql/*/bin` (or `/usr/pgsql-*/bin`). When the tests
//!     run as root, the cluster is run as the `postgres` OS user, because
//!     PostgreSQL refuses to run as root.
//! * A [`TestDatabase`]: a uniquely named database on a server, with its
//!   connection settings ([`TestDatabase::config`], [`TestDatabase::url`]) and a
//!   way to connect ([`TestDatabase::connect`]).
//! * Private servers ([`TestServer::start_private`]): a cluster of its own for a
//!   test that stops and restarts the server ([`TestServer::stop`],
//!   [`TestServer::start`]); a stop is an immediate shutdown, like a crash,
//!   and committed transactions survive it. [`TestServer::kill_backend`]
//!   crashes it in place instead (one server process killed with SIGKILL:
//!   crash recovery without a restart of the postmaster), and
//!   [`TestServer::start_private_with`] adds settings such as
//!   `wal_writer_delay`. It is removed when the [`TestServer`] is dropped.
//!
//! # Cleanup
//!
//! Rust test binaries have no global teardown, so every throwaway cluster is
//! watched by a small detached `sh` process: when the test process exits (even
//! when it is killed, or `cargo test` is interrupted with Ctrl-C), it stops the
//! server (immediate shutdown) and deletes the cluster's directory. Databases on a
//! `PROJECTIONIST_TEST_DATABASE_URL` server are dropped by [`TestDatabase::drop_database`], or by the
//! leftover cleanup of a later test process.
//!
//! # Example
//!
//! ```no_run
//! use projectionist::testing::TestDatabase;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! // In a `#[tokio::test]`:
//! let db = TestDatabase::create().await?;
//! let client = db.connect().await?;
//! let row = client.query_one("SELECT 1::INT4", &[]).await?;
//! assert_eq!(row.get::<_, i32>(0), 1);
//!
//! // A child process (e.g. the projectionist CLI) can be pointed at the same
//! // database with `DATABASE_URL`:
//! let url = db.url();
//! # let _ = url;
//! # Ok(())
//! # }
//! ```
//!
//! A test that restarts the server uses a private one:
//!
//! ```no_run
//! use projectionist::testing::TestServer;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let server = TestServer::start_private().await?;
//! let db = server.create_database().await?;
//! server.stop()?;
//! // ... assert that the code under test notices the outage ...
//! server.start()?;
//! let client = db.connect().await?;
//! # let _ = client;
//! # Ok(())
//! # }
//! ```

use std::env;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{self, Command, Output, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

/// The environment variable naming an existing server to create test
/// databases on: `PROJECTIONIST_TEST_DATABASE_URL`. `DATABASE_URL` is never
/// read by this module (see the [module documentation](self)).
pub const TEST_DATABASE_URL: &str = "PROJECTIONIST_TEST_DATABASE_URL";

/// Where the shared server comes from.
#[derive(Debug, PartialEq, Eq)]
enum ServerSource {
    /// An existing server, from [`TEST_DATABASE_URL`].
    Url(String),
    /// A throwaway cluster.
    Throwaway,
}

/// Decides where the shared server comes from, given a way to read the
/// environment: [`TEST_DATABASE_URL`] when set and not blank, otherwise a
/// throwaway cluster. `DATABASE_URL` (the application's server) is not
/// consulted.
fn server_source(
    var: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<ServerSource, TestingError> {
    match var(TEST_DATABASE_URL) {
        None => Ok(ServerSource::Throwaway),
        Some(value) => match value.into_string() {
            Ok(url) if url.trim().is_empty() => Ok(ServerSource::Throwaway),
            Ok(url) => Ok(ServerSource::Url(url.trim().to_owned())),
            Err(_) => Err(TestingError::new(format!(
                "{TEST_DATABASE_URL} is not valid UTF-8: set it to a connection URL like \
                 postgres://postgres@127.0.0.1:5432/postgres, or unset it to use a throwaway cluster"
            ))),
        },
    }
}

/// Port of the throwaway clusters. They only listen on a Unix socket in their
/// own directory, so a fixed port never clashes.
const PORT: u16 = 5432;
/// Superuser created by `initdb` in the throwaway clusters.
const ADMIN_USER: &str = "postgres";
/// Database the admin connection of a throwaway cluster uses.
const ADMIN_DB: &str = "postgres";
/// Prefix of every test database name.
const DB_PREFIX: &str = "projectionist_test_";
/// Seconds `pg_ctl` waits for the server to start or stop.
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// How often `CREATE DATABASE` is retried when the template is in use.
const CREATE_RETRIES: u64 = 20;

/// Settings appended to the throwaway cluster's `postgresql.conf`
/// (`port`, `unix_socket_directories` and `synchronous_commit` are added
/// separately). `fsync` and `full_page_writes` off only risk data on an OS
/// crash, which a throwaway cluster does not survive anyway.
const SERVER_SETTINGS: &str = "\
listen_addresses = ''
fsync = off
full_page_writes = off
max_connections = 400
shared_buffers = 128MB
";

/// Watches the test process (`$1`); when it is gone, stops the postmaster of the
/// data directory `$2` (immediate shutdown, then SIGKILL after 5 s) and
/// removes the cluster directory `$3`. The postmaster's PID is read from
/// `postmaster.pid` at that moment (a private server may have been restarted)
/// and only signalled if its working directory is that data directory, so a
/// recycled PID is never hit. A zombie counts as gone: some containers' PID 1
/// reaps orphans only every second or two.
const REAPER_SCRIPT: &str = r#"
nap() { sleep "$1" 2>/dev/null || sleep 1; }
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  [ -r "/proc/$1/status" ] || return 0
  while read -r key value rest; do
    if [ "$key" = "State:" ]; then
      case "$value" in Z*|X*) return 1 ;; esac
      return 0
    fi
  done < "/proc/$1/status"
  return 0
}
while alive "$1"; do nap 0.2; done
pm=
if [ -f "$2/postmaster.pid" ]; then
  read -r pm < "$2/postmaster.pid" 2>/dev/null
fi
case "$pm" in
  ''|*[!0-9]*) pm= ;;
esac
if [ -n "$pm" ] && { [ ! -d /proc/self ] || [ "/proc/$pm/cwd" -ef "$2" ]; }; then
  kill -QUIT "$pm" 2>/dev/null
  i=0
  while alive "$pm" && [ "$i" -lt 100 ]; do nap 0.05; i=$((i + 1)); done
  if alive "$pm"; then
    kill -KILL "$pm" 2>/dev/null
    nap 0.2
  fi
fi
rm -rf "$3"
"#;

static NEXT_DATABASE: AtomicU64 = AtomicU64::new(0);
static NEXT_CLUSTER: AtomicU64 = AtomicU64::new(0);

/// Error of the test harness.
///
/// The message names what went wrong and how to fix it (for example which
/// package to install or which environment variable to set).
#[derive(Clone, PartialEq, Eq)]
pub struct TestingError {
    message: String,
}

impl TestingError {
    /// Creates an error with the given message.
    pub fn new(message: impl Into<String>) -> Self {
        TestingError {
            message: message.into(),
        }
    }

    /// The message: the cause and, where known, the fix.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for TestingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

// Debug prints the message as is, so that a test returning
// `Result<(), Box<dyn Error>>` shows a readable failure (including log tails).
impl fmt::Debug for TestingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TestingError: {}", self.message)
    }
}

impl std::error::Error for TestingError {}

/// A PostgreSQL server to create test databases on.
///
/// Get the process-wide one with [`TestServer::shared`] (a
/// `PROJECTIONIST_TEST_DATABASE_URL` server or a throwaway cluster started on first use), or a cluster for one
/// test with [`TestServer::start_private`].
#[derive(Debug)]
pub struct TestServer {
    admin: Config,
    /// The throwaway cluster; `None` for an existing server.
    cluster: Option<Cluster>,
    private: bool,
    /// Set once leftover databases of dead test processes have been dropped
    /// (only for an existing server).
    leftovers_dropped: tokio::sync::OnceCell<()>,
}

impl TestServer {
    /// The server shared by all tests of this process.
    ///
    /// If `PROJECTIONIST_TEST_DATABASE_URL` is set (and not empty), that
    /// server is used; `DATABASE_URL` is ignored. Nothing is connected
    /// here: connection problems surface in [`TestServer::create_database`].
    /// Otherwise a throwaway cluster is started on the first call, which blocks
    /// for a second or two; concurrent callers wait for it. If starting fails,
    /// every call returns the same error.
    pub fn shared() -> Result<&'static TestServer, TestingError> {
        static SHARED: OnceLock<Result<TestServer, TestingError>> = OnceLock::new();
        SHARED
            .get_or_init(TestServer::init_shared)
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Starts a throwaway cluster for one test, regardless of
    /// `PROJECTIONIST_TEST_DATABASE_URL`.
    ///
    /// Unlike the shared server it may be stopped and started again
    /// ([`TestServer::stop`], [`TestServer::start`]). It is stopped and its
    /// directory removed when the returned value is dropped, and in any case
    /// when the test process exits. Needs the PostgreSQL server binaries (see
    /// the [module documentation](self)).
    ///
    /// Unlike the shared cluster it keeps `synchronous_commit` on, so a
    /// transaction that committed before [`TestServer::stop`] is still there
    /// after [`TestServer::start`].
    pub async fn start_private() -> Result<TestServer, TestingError> {
        TestServer::start_private_with("").await
    }

    /// [`TestServer::start_private`] with extra lines for `postgresql.conf`,
    /// e.g. `"wal_writer_delay = '10s'\nautovacuum = off"` (they come after
    /// the harness's own settings, so they may override them).
    pub async fn start_private_with(settings: &str) -> Result<TestServer, TestingError> {
        let settings = settings.to_owned();
        let start = move || {
            Cluster::create(true, &settings).map(|cluster| TestServer::from_cluster(cluster, true))
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => handle.spawn_blocking(start).await.map_err(|e| {
                TestingError::new(format!(
                    "starting a private PostgreSQL cluster did not finish ({e}); \
                     this is a bug in projectionist::testing, please report it"
                ))
            })?,
            Err(_) => start(),
        }
    }

    /// Connection settings of the admin connection (a superuser, or the
    /// URL's role, on the URL's database).
    pub fn admin_config(&self) -> Config {
        self.admin.clone()
    }

    /// The data directory of a throwaway cluster (`None` for an existing
    /// server), e.g. to edit `pg_hba.conf` in a test.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self.cluster.as_ref().map(|c| c.data.as_path())
    }

    /// Whether this server came from [`TestServer::start_private`].
    pub fn is_private(&self) -> bool {
        self.private
    }

    /// Stops a private server immediately (`pg_ctl stop -m immediate`), blocking
    /// until it is down. Open connections fail from then on.
    ///
    /// Fails for the shared server, which other tests are using.
    pub fn stop(&self) -> Result<(), TestingError> {
        self.private_cluster("stop")?.stop()
    }

    /// Starts a private server stopped by [`TestServer::stop`] again, on the
    /// same data directory and socket, blocking until it accepts connections.
    /// Existing [`TestDatabase`] values stay valid.
    ///
    /// Fails for the shared server.
    pub fn start(&self) -> Result<(), TestingError> {
        self.private_cluster("start")?.start()
    }

    /// The process id of a private server's postmaster, from its
    /// `postmaster.pid`.
    ///
    /// Fails for the shared server and when the server is not running.
    pub fn postmaster_pid(&self) -> Result<u32, TestingError> {
        self.private_cluster("postmaster_pid")?.postmaster_pid()
    }

    /// Sends `signal` (a name `kill` knows: `KILL`, `STOP`, `CONT`, `TERM`…)
    /// to one server process of a private server: a backend or an auxiliary
    /// process such as the WAL writer (the `pid` column of
    /// `pg_stat_activity`), never the postmaster.
    ///
    /// `KILL` is a crash: the postmaster ends every session, runs crash
    /// recovery in place (commits whose WAL was not yet written are lost and
    /// their transaction ids are handed out again) and accepts connections
    /// again, with `pg_postmaster_start_time()` unchanged.
    ///
    /// Refuses a process that is not a child of this server's postmaster, so
    /// a stale or mistyped pid never hits an unrelated process. Fails for the
    /// shared server, which other tests are using.
    pub fn signal_backend(&self, pid: i32, signal: &str) -> Result<(), TestingError> {
        let cluster = self.private_cluster("signal_backend")?;
        let postmaster = cluster.postmaster_pid()?;
        let parent = u32::try_from(pid).ok().and_then(parent_pid);
        if parent != Some(postmaster) {
            return Err(TestingError::new(format!(
                "process {pid} is not a server process of this cluster (its parent is \
                 {parent:?}, the postmaster is {postmaster}): take the pid from \
                 pg_stat_activity of this server"
            )));
        }
        let output = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| TestingError::new(format!("could not run kill: {e}")))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(TestingError::new(format!(
                "kill -{signal} {pid} failed ({}): {}",
                output.status,
                output_text(&output)
            )))
        }
    }

    /// `signal_backend(pid, "KILL")`: crashes a private server in place by
    /// killing one of its processes with SIGKILL, like the OOM killer does.
    pub fn kill_backend(&self, pid: i32) -> Result<(), TestingError> {
        self.signal_backend(pid, "KILL")
    }

    /// Creates a fresh, empty database named
    /// `projectionist_test_{pid}_{counter}_{random}` on this server.
    ///
    /// Must be called from within a Tokio runtime (e.g. in a `#[tokio::test]`).
    pub async fn create_database(&self) -> Result<TestDatabase, TestingError> {
        if self.cluster.is_none() {
            self.leftovers_dropped
                .get_or_init(|| drop_leftover_databases(&self.admin, self.connect_hint()))
                .await;
        }
        let random = uuid::Uuid::new_v4().simple().to_string();
        let name = format!(
            "{DB_PREFIX}{}_{}_{}",
            process::id(),
            NEXT_DATABASE.fetch_add(1, Ordering::Relaxed),
            random.get(..8).unwrap_or(&random)
        );
        let client = connect_to(&self.admin, "the admin database", &self.connect_hint()).await?;
        let sql = format!("CREATE DATABASE {}", quote_ident(&name));
        let mut attempt = 0;
        loop {
            match client.batch_execute(&sql).await {
                Ok(()) => break,
                // "source database "template1" is being accessed by other users"
                Err(e)
                    if e.code() == Some(&SqlState::OBJECT_IN_USE) && attempt < CREATE_RETRIES =>
                {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                }
                Err(e) => {
                    return Err(TestingError::new(format!(
                        "could not create test database {name} on {}: {}; the role needs the \
                         CREATEDB privilege and template1 must not be in use by other sessions",
                        describe_target(&self.admin),
                        describe_pg_error(&e)
                    )))
                }
            }
        }
        let mut config = self.admin.clone();
        config.dbname(&name);
        Ok(TestDatabase {
            url: conninfo(&config),
            name,
            config,
            admin: self.admin.clone(),
            connect_hint: self.connect_hint(),
        })
    }

    fn init_shared() -> Result<TestServer, TestingError> {
        match server_source(|name| env::var_os(name))? {
            ServerSource::Url(url) => TestServer::from_url(&url),
            ServerSource::Throwaway => {
                Cluster::create(false, "").map(|cluster| TestServer::from_cluster(cluster, false))
            }
        }
    }

    /// A server at `url` (e.g. `postgres://postgres@127.0.0.1:5432/postgres`)
    /// to create test databases on, named explicitly rather than read from
    /// the environment. The URL's role must be allowed to create and drop
    /// databases: the first [`TestServer::create_database`] also drops the
    /// `projectionist_test_{pid}_…` databases of test processes that are
    /// gone. Nothing is connected here.
    pub fn at_url(url: &str) -> Result<TestServer, TestingError> {
        TestServer::from_url_named(url.trim(), "the URL")
    }

    fn from_url(url: &str) -> Result<TestServer, TestingError> {
        TestServer::from_url_named(url, TEST_DATABASE_URL)
    }

    fn from_url_named(url: &str, what: &str) -> Result<TestServer, TestingError> {
        let admin = Config::from_str(url).map_err(|e| {
            TestingError::new(format!(
                "{what} is not a valid PostgreSQL connection string ({}): set it to a URL \
                 like postgres://postgres@127.0.0.1:5432/postgres (a server on which test \
                 databases may be created and dropped), or unset it to use a throwaway cluster",
                describe_pg_error(&e)
            ))
        })?;
        tracing::debug!(server = %describe_target(&admin), "testing: using an existing server for test databases");
        Ok(TestServer {
            admin,
            cluster: None,
            private: false,
            leftovers_dropped: tokio::sync::OnceCell::new(),
        })
    }

    fn from_cluster(cluster: Cluster, private: bool) -> TestServer {
        let mut admin = Config::new();
        admin
            .host_path(&cluster.root)
            .port(PORT)
            .user(ADMIN_USER)
            .dbname(ADMIN_DB);
        TestServer {
            admin,
            cluster: Some(cluster),
            private,
            leftovers_dropped: tokio::sync::OnceCell::new(),
        }
    }

    fn private_cluster(&self, what: &str) -> Result<&Cluster, TestingError> {
        match &self.cluster {
            Some(cluster) if self.private => Ok(cluster),
            _ => Err(TestingError::new(format!(
                "TestServer::{what} only works on a server from TestServer::start_private(): \
                 the shared server is used by other tests at the same time"
            ))),
        }
    }

    fn connect_hint(&self) -> String {
        match &self.cluster {
            None => format!(
                "check that the server in {TEST_DATABASE_URL} is running and reachable and \
                 that the URL's user and password are right (or unset {TEST_DATABASE_URL} to \
                 use a throwaway cluster)"
            ),
            Some(cluster) => format!(
                "the throwaway cluster may have been stopped; its log is {}",
                cluster.log.display()
            ),
        }
    }
}

/// A fresh database for one test, on a [`TestServer`].
///
/// It is not dropped automatically: on a throwaway cluster it disappears with
/// the cluster when the test process exits; on an existing server call
/// [`TestDatabase::drop_database`], or a later test process drops it.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    config: Config,
    admin: Config,
    url: String,
    connect_hint: String,
}

impl TestDatabase {
    /// Creates a fresh database on the shared server ([`TestServer::shared`]).
    ///
    /// Must be called from within a Tokio runtime (e.g. in a `#[tokio::test]`).
    pub async fn create() -> Result<TestDatabase, TestingError> {
        TestServer::shared()?.create_database().await
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connection settings for this database (the server's admin settings with
    /// this database's name).
    pub fn config(&self) -> Config {
        self.config.clone()
    }

    /// A connection string for this database in libpq's `key=value` form, e.g.
    /// `host=/tmp/projectionist-pg-… port=5432 user=postgres dbname=…`.
    ///
    /// It can be handed to a child process as `DATABASE_URL` and is parsed by
    /// `tokio_postgres::Config::from_str` and by libpq (`psql`). It contains the
    /// password, if the server needs one.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Opens a connection to this database (without TLS). The connection is
    /// driven by a task spawned on the current Tokio runtime, so it must be
    /// called from within one.
    pub async fn connect(&self) -> Result<Client, TestingError> {
        connect_to(
            &self.config,
            &format!("test database {}", self.name),
            &self.connect_hint,
        )
        .await
    }

    /// Drops the database, disconnecting any sessions still using it
    /// (`DROP DATABASE … WITH (FORCE)` on PostgreSQL 13 and later).
    pub async fn drop_database(self) -> Result<(), TestingError> {
        let client = connect_to(&self.admin, "the admin database", &self.connect_hint).await?;
        drop_database_sql(&client, &self.name).await.map_err(|e| {
            TestingError::new(format!(
                "could not drop test database {}: {}; close the connections to it first \
                 (PostgreSQL before 13 cannot force them closed)",
                self.name,
                describe_pg_error(&e)
            ))
        })
    }
}

/// An event [`ProjectionTest::given`] can append: a [`NewEvent`](crate::NewEvent),
/// or a value of a typed event enum (an [`Event`](crate::Event), e.g. one
/// declared with [`events!`](crate::events)).
pub trait GivenEvent {
    /// The event to append.
    fn into_new_event(self) -> crate::Result<crate::NewEvent>;
}

impl GivenEvent for crate::NewEvent {
    fn into_new_event(self) -> crate::Result<crate::NewEvent> {
        Ok(self)
    }
}

impl<E: crate::Event> GivenEvent for E {
    fn into_new_event(self) -> crate::Result<crate::NewEvent> {
        crate::NewEvent::typed(&self)
    }
}

/// Default of [`ProjectionTest::timeout`]: 30 s.
pub const DEFAULT_WHEN_TIMEOUT: Duration = Duration::from_secs(30);

/// A given-when-then test of projections on a throwaway database: **given**
/// these events, **when** these projections have run to the end, **then**
/// the read model holds these rows.
///
/// ```no_run
/// use projectionist::testing::ProjectionTest;
/// use projectionist::{async_trait, Context, NewEvent, Projection, ProjectionOptions, StoredEvent};
/// use std::sync::Arc;
///
/// struct Counter;
///
/// #[async_trait]
/// impl Projection for Counter {
///     fn options(&self) -> ProjectionOptions {
///         ProjectionOptions::new("counter").tables(["counts"])
///     }
///     async fn migrate(&self, ctx: &Context<'_>) -> projectionist::Result<()> {
///         let sql = format!(
///             "CREATE TABLE IF NOT EXISTS {} (id text PRIMARY KEY, n bigint NOT NULL)",
///             ctx.table("counts")
///         );
///         ctx.batch_execute(&sql).await?;
///         Ok(())
///     }
///     async fn handle(&self, event: &StoredEvent, ctx: &Context<'_>) -> projectionist::Result<()> {
///         let sql = format!(
///             "INSERT INTO {} VALUES ($1, 1) ON CONFLICT (id) DO UPDATE SET n = {0}.n + 1",
///             ctx.table("counts")
///         );
///         ctx.execute(&sql, &[&event.aggregate_id]).await?;
///         Ok(())
///     }
/// }
///
/// # async fn example() -> projectionist::Result<()> {
/// // In a `#[tokio::test]`:
/// let test = ProjectionTest::new()
///     .await?
///     .given("Door", "front", [NewEvent::from_json("Opened", "{}"), NewEvent::from_json("Closed", "{}")])
///     .await?
///     .when(Arc::new(Counter))
///     .await?;
/// let row = test.query_one("SELECT n FROM counts WHERE id = $1", &[&"front"]).await?;
/// assert_eq!(row.get::<_, i64>("n"), 2);
/// # Ok(())
/// # }
/// ```
///
/// # Defaults
///
/// * **Server**: [`TestServer::shared`] — the server in
///   `PROJECTIONIST_TEST_DATABASE_URL`, else a throwaway cluster; never
///   `DATABASE_URL` (see the [module documentation](self)). Use
///   [`ProjectionTest::on`] for another server.
/// * **Database**: a fresh one per test, migrated (the engine's tables in
///   schema `public`). On a throwaway cluster it vanishes with the cluster;
///   on an existing server call [`ProjectionTest::drop_database`] at the
///   end, or a later test process drops it.
/// * **Store**: [`StoreConfig::default`](crate::StoreConfig) (no
///   [`Registry`](crate::Registry): add one with
///   [`ProjectionTest::registry`]).
/// * **Runner**: [`RunnerConfig::default`](crate::RunnerConfig) (static
///   mode, one partition, the default batch size), changed with
///   [`ProjectionTest::runner_config`].
/// * **Time limit** of [`ProjectionTest::when`]: [`DEFAULT_WHEN_TIMEOUT`]
///   (30 s), changed with [`ProjectionTest::timeout`].
///
/// `given` and `when` may alternate: a second `when` continues each
/// projection from its checkpoint, as a restarted process would.
pub struct ProjectionTest {
    db: TestDatabase,
    store: crate::EventStore,
    runner_config: crate::RunnerConfig,
    timeout: Duration,
}

impl std::fmt::Debug for ProjectionTest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionTest")
            .field("database", &self.db.name)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn harness_error(e: TestingError) -> crate::Error {
    crate::Error::config(e.message)
}

impl ProjectionTest {
    /// A fresh, migrated database on the shared test server
    /// ([`TestServer::shared`]). Must be called from within a Tokio runtime
    /// (e.g. in a `#[tokio::test]`).
    pub async fn new() -> crate::Result<ProjectionTest> {
        let server = TestServer::shared().map_err(harness_error)?;
        ProjectionTest::on(server).await
    }

    /// A fresh, migrated database on `server` (e.g. one from
    /// [`TestServer::at_url`] or [`TestServer::start_private`]).
    pub async fn on(server: &TestServer) -> crate::Result<ProjectionTest> {
        let db = server.create_database().await.map_err(harness_error)?;
        crate::migrate(&db.config(), "public").await?;
        let store = crate::EventStore::connect_config(db.config(), crate::StoreConfig::default())?;
        Ok(ProjectionTest {
            db,
            store,
            runner_config: crate::RunnerConfig::default(),
            timeout: DEFAULT_WHEN_TIMEOUT,
        })
    }

    /// Puts `registry` on the store: appends are validated against it and
    /// every event the projections read is upcast by it, as in an
    /// [`App`](crate::App) with the same registry. Default: none.
    pub fn registry(mut self, registry: crate::Registry) -> crate::Result<ProjectionTest> {
        self.store = self.store.with_registry(registry)?;
        Ok(self)
    }

    /// The runner configuration [`ProjectionTest::when`] uses (default
    /// [`RunnerConfig::default`](crate::RunnerConfig)).
    pub fn runner_config(mut self, config: crate::RunnerConfig) -> ProjectionTest {
        self.runner_config = config;
        self
    }

    /// How long [`ProjectionTest::when`] may take to catch up (default
    /// [`DEFAULT_WHEN_TIMEOUT`], 30 s).
    pub fn timeout(mut self, timeout: Duration) -> ProjectionTest {
        self.timeout = timeout;
        self
    }

    /// Given: appends `events`, in order, to the stream
    /// (`aggregate_type`, `aggregate_id`) in one transaction, after
    /// whatever the stream already holds (no expected version). Events
    /// are [`NewEvent`](crate::NewEvent)s or typed [`Event`](crate::Event)
    /// values; with a registry, an unregistered type or a payload that
    /// does not decode is refused. An empty `events` appends nothing.
    ///
    /// For rows no append would write (old versions, old type names),
    /// insert into `events` with [`ProjectionTest::execute`].
    pub async fn given<I>(
        self,
        aggregate_type: &str,
        aggregate_id: &str,
        events: I,
    ) -> crate::Result<ProjectionTest>
    where
        I: IntoIterator,
        I::Item: GivenEvent,
    {
        let events = events
            .into_iter()
            .map(GivenEvent::into_new_event)
            .collect::<crate::Result<Vec<_>>>()?;
        if !events.is_empty() {
            self.store
                .append(
                    aggregate_type,
                    aggregate_id,
                    crate::ExpectedVersion::Any,
                    &events,
                )
                .await?;
        }
        Ok(self)
    }

    /// When: runs `projection` until it has handled every event in the
    /// log — first its [`migrate`](crate::Projection::migrate) hook (under
    /// the migration lock, creating the views of its declared tables), then
    /// batches until its lag is zero. See [`ProjectionTest::when_all`].
    pub async fn when(
        self,
        projection: std::sync::Arc<dyn crate::Projection>,
    ) -> crate::Result<ProjectionTest> {
        let registered = crate::Registered::new(projection)?;
        self.when_all(std::slice::from_ref(&registered)).await
    }

    /// When: runs `projections` (e.g. [`App::projections`](crate::App::projections))
    /// together, as `run-projections --once` would, until every one of them
    /// has passed every event committed so far: its exact lag is zero.
    /// Events held back by a transaction still open elsewhere on the server
    /// are waited for.
    ///
    /// Fails with the engine's error when a projection stops (a handler
    /// that keeps failing under [`FailurePolicy::stop`](crate::FailurePolicy::stop),
    /// an event the registry does not know: [`Error::is_failed`](crate::Error::is_failed)),
    /// and with [`Error::is_timeout`](crate::Error::is_timeout) after the
    /// [timeout](ProjectionTest::timeout). Dead-lettered events do not fail
    /// it: query `dead_letters`.
    pub async fn when_all(
        self,
        projections: &[crate::Registered],
    ) -> crate::Result<ProjectionTest> {
        let runner = crate::Runner::new(self.store.clone(), self.runner_config.clone())
            .with_projections(projections)?;
        let options = crate::StatusOptions::default().exact(crate::DEFAULT_EXACT_LAG_LIMIT)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            runner.run_once().await?;
            let slots = crate::status_with(&self.store, projections, &options).await?;
            let behind: Vec<String> = slots
                .iter()
                .filter(|s| s.registered && s.lag_events > 0)
                .map(|s| format!("{} is {} event(s) behind", s.projection, s.lag_events))
                .collect();
            if behind.is_empty() {
                return Ok(self);
            }
            if Instant::now() >= deadline {
                let holder = match crate::watermark_holder(&self.store).await {
                    Ok(Some(h)) => format!(
                        "; backend {} (database {}, {}, open {:.1} s) holds the watermark back: \
                         a transaction left open elsewhere on the server delays every projection",
                        h.pid,
                        h.database.as_deref().unwrap_or("?"),
                        h.state.as_deref().unwrap_or("?"),
                        h.open_seconds
                    ),
                    _ => String::new(),
                };
                return Err(crate::Error::new(
                    crate::error::Kind::Timeout,
                    format!(
                        "ProjectionTest::when did not catch up within {:?}: {}{holder}",
                        self.timeout,
                        behind.join(", ")
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Then: the rows of `sql` with `params`, on a connection to the test
    /// database (read models are found by the names readers use: the views
    /// of the declared tables).
    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> crate::Result<Vec<tokio_postgres::Row>> {
        let client = self.store.pool().get().await?;
        Ok(client.query(sql, params).await?)
    }

    /// Then: the one row of `sql` with `params` (an error when there is not
    /// exactly one).
    pub async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> crate::Result<tokio_postgres::Row> {
        let client = self.store.pool().get().await?;
        Ok(client.query_one(sql, params).await?)
    }

    /// Runs a statement on the test database and returns the number of rows
    /// it changed: e.g. to insert events of old shapes with plain SQL.
    pub async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> crate::Result<u64> {
        let client = self.store.pool().get().await?;
        Ok(client.execute(sql, params).await?)
    }

    /// The event store on the test database (with the registry, if any).
    pub fn store(&self) -> &crate::EventStore {
        &self.store
    }

    /// The test database (its name, connection settings and URL).
    pub fn database(&self) -> &TestDatabase {
        &self.db
    }

    /// Drops the test database (see [`TestDatabase::drop_database`]): worth
    /// calling at the end of a test on an existing server.
    pub async fn drop_database(self) -> crate::Result<()> {
        let ProjectionTest { db, store, .. } = self;
        store.pool().close();
        db.drop_database().await.map_err(harness_error)
    }
}

/// A throwaway cluster: a directory holding the data directory, the server log
/// and the Unix socket.
#[derive(Debug)]
struct Cluster {
    /// Directory with the server binaries.
    bin: PathBuf,
    /// The cluster's directory; also the socket directory.
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
    /// `(uid, gid)` to run the server binaries as, when running as root.
    run_as: Option<(u32, u32)>,
    /// Whether commits wait for their WAL to be written (private clusters).
    synchronous_commit: bool,
    /// Extra `postgresql.conf` lines (private clusters).
    extra_settings: String,
}

impl Cluster {
    /// Creates, configures and starts a cluster (blocking).
    ///
    /// A private cluster keeps `synchronous_commit` on: [`TestServer::stop`]
    /// is an immediate shutdown, and with it off the last commits (up to
    /// ~0.6 s) would be lost by a stop/start, which tests would misread as
    /// bugs of the code under test.
    fn create(private: bool, extra_settings: &str) -> Result<Cluster, TestingError> {
        let bin = find_server_binaries()?;
        let run_as = if effective_uid() == Some(0) {
            Some(lookup_user(ADMIN_USER).ok_or_else(|| {
                TestingError::new(
                    "the tests run as root and PostgreSQL refuses to run as root, but there is \
                     no `postgres` OS user to run the throwaway cluster as: create one \
                     (useradd --system postgres), run the tests as a normal user, or set \
                     PROJECTIONIST_TEST_DATABASE_URL to use an existing server",
                )
            })?)
        } else {
            None
        };
        let root = create_root_dir()?;
        // From here on, dropping `cluster` (e.g. on an error below) cleans up.
        let cluster = Cluster {
            bin,
            data: root.join("data"),
            log: root.join("postgres.log"),
            root,
            run_as,
            synchronous_commit: private,
            extra_settings: extra_settings.to_owned(),
        };
        cluster.spawn_reaper()?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&cluster.root, Some(uid), Some(gid)).map_err(|e| {
                TestingError::new(format!(
                    "could not hand {} to the postgres OS user (uid {uid}): {e}",
                    cluster.root.display()
                ))
            })?;
        }
        cluster.initdb()?;
        cluster.configure()?;
        cluster.start()?;
        tracing::debug!(dir = %cluster.root.display(), "testing: throwaway PostgreSQL cluster started");
        Ok(cluster)
    }

    /// A command for one of the server binaries, run as the right OS user.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGOPTIONS")
            .env_remove("PGCTLTIMEOUT");
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }

    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<Output, TestingError> {
        self.command(program).args(args).output().map_err(|e| {
            let path = self.bin.join(program);
            TestingError::new(match self.run_as {
                Some((uid, _)) => format!(
                    "could not run {} in {} as the postgres OS user (uid {uid}): {e}; the tests \
                     run as root, so the throwaway cluster runs as that user, which must be able \
                     to reach the temporary directory (set TMPDIR to e.g. /tmp) and execute the \
                     server binaries (set PG_BIN), or set PROJECTIONIST_TEST_DATABASE_URL to use an existing server",
                    path.display(),
                    self.root.display()
                ),
                None => format!(
                    "could not run {}: {e}; check the PostgreSQL server installation (or set \
                     PG_BIN to the directory holding initdb, pg_ctl and postgres)",
                    path.display()
                ),
            })
        })
    }

    fn initdb(&self) -> Result<(), TestingError> {
        let output = self.run(
            "initdb",
            &[
                "-D".as_ref(),
                self.data.as_os_str(),
                "-U".as_ref(),
                ADMIN_USER.as_ref(),
                "--auth=trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
                // --no-sync; the short form also works on old versions
                "-N".as_ref(),
            ],
        )?;
        if output.status.success() {
            return Ok(());
        }
        let mut message = format!(
            "initdb failed ({}) for {}:\n{}",
            output.status,
            self.data.display(),
            output_text(&output)
        );
        if self.run_as.is_some() {
            message.push_str(
                "\nthe tests run as root, so initdb runs as the postgres OS user: every parent \
                 directory of the temporary directory must be accessible to it (set TMPDIR to \
                 e.g. /tmp), or set PROJECTIONIST_TEST_DATABASE_URL to use an existing server",
            );
        }
        Err(TestingError::new(message))
    }

    fn configure(&self) -> Result<(), TestingError> {
        let socket_dir = self.root.to_string_lossy().replace('\'', "''");
        let synchronous_commit = if self.synchronous_commit { "on" } else { "off" };
        let settings = format!(
            "\n# added by projectionist::testing\n{SERVER_SETTINGS}port = {PORT}\n\
             unix_socket_directories = '{socket_dir}'\n\
             synchronous_commit = {synchronous_commit}\n{}\n",
            self.extra_settings
        );
        let path = self.data.join("postgresql.conf");
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(settings.as_bytes()))
            .map_err(|e| {
                TestingError::new(format!(
                    "could not write the test server settings to {}: {e}",
                    path.display()
                ))
            })
    }

    /// Starts the server and waits until it accepts connections (blocking).
    fn start(&self) -> Result<(), TestingError> {
        let output = self.run(
            "pg_ctl",
            &[
                "start".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                PG_CTL_TIMEOUT_SECS.as_ref(),
                "-D".as_ref(),
                self.data.as_os_str(),
                "-l".as_ref(),
                self.log.as_os_str(),
            ],
        )?;
        if !output.status.success() {
            return Err(TestingError::new(format!(
                "the throwaway PostgreSQL server did not start (pg_ctl start: {}):\n{}\n\
                 --- server log {} ---\n{}\n\
                 check the log above (e.g. not enough shared memory, or the server \
                 binaries do not match the data directory); or set PROJECTIONIST_TEST_DATABASE_URL to use an \
                 existing server",
                output.status,
                output_text(&output),
                self.log.display(),
                self.log_tail()
            )));
        }
        // pg_ctl -w already waited for "ready"; make sure the socket answers.
        let socket = self.root.join(format!(".s.PGSQL.{PORT}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match UnixStream::connect(&socket) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(TestingError::new(format!(
                        "the throwaway PostgreSQL server started but its socket {} does not \
                         accept connections ({e}):\n--- server log {} ---\n{}",
                        socket.display(),
                        self.log.display(),
                        self.log_tail()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Stops the server in immediate mode (blocking).
    fn stop(&self) -> Result<(), TestingError> {
        let output = self.run(
            "pg_ctl",
            &[
                "stop".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                PG_CTL_TIMEOUT_SECS.as_ref(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "-D".as_ref(),
                self.data.as_os_str(),
            ],
        )?;
        if output.status.success() {
            Ok(())
        } else {
            Err(TestingError::new(format!(
                "could not stop the throwaway PostgreSQL server (pg_ctl stop: {}):\n{}\n\
                 is it running? (TestServer::start starts it again)",
                output.status,
                output_text(&output)
            )))
        }
    }

    /// The postmaster's pid, from the first line of `postmaster.pid`.
    fn postmaster_pid(&self) -> Result<u32, TestingError> {
        let path = self.data.join("postmaster.pid");
        fs::read_to_string(&path)
            .ok()
            .and_then(|text| text.lines().next().and_then(|l| l.trim().parse().ok()))
            .ok_or_else(|| {
                TestingError::new(format!(
                    "cannot read the postmaster's pid from {}: is the server running?",
                    path.display()
                ))
            })
    }

    /// Starts the watcher that stops the server and removes the directory when
    /// the test process is gone.
    fn spawn_reaper(&self) -> Result<(), TestingError> {
        Command::new("/bin/sh")
            .arg("-c")
            .arg(REAPER_SCRIPT)
            .arg("projectionist-testing-reaper")
            .arg(process::id().to_string())
            .arg(&self.data)
            .arg(&self.root)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own process group: Ctrl-C of `cargo test` must not kill it.
            .process_group(0)
            .spawn()
            .map(drop)
            .map_err(|e| {
                TestingError::new(format!(
                    "could not start /bin/sh to clean up the throwaway cluster after the tests \
                     ({e}): a POSIX shell is needed, or set PROJECTIONIST_TEST_DATABASE_URL to use an existing server"
                ))
            })
    }

    fn log_tail(&self) -> String {
        match fs::read(&self.log) {
            Ok(bytes) => tail(&String::from_utf8_lossy(&bytes), 40),
            Err(e) => format!("(could not read the log: {e})"),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            if let Err(e) = self.stop() {
                // Leave the directory to the reaper, which kills the server.
                tracing::warn!(error = %e, "testing: could not stop a throwaway PostgreSQL cluster");
                return;
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.root) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(
                    error = %e,
                    dir = %self.root.display(),
                    "testing: could not remove a throwaway PostgreSQL cluster"
                );
            }
        }
    }
}

/// Creates the cluster directory `$TMPDIR/projectionist-pg-{pid}-{nanos}-{n}`
/// (mode 0700) and returns its canonical path.
fn create_root_dir() -> Result<PathBuf, TestingError> {
    let temp = env::temp_dir();
    let temp = fs::canonicalize(&temp).map_err(|e| {
        TestingError::new(format!(
            "the temporary directory {} is not usable ({e}): create it or set TMPDIR to a \
             writable directory such as /tmp",
            temp.display()
        ))
    })?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let root = temp.join(format!(
        "projectionist-pg-{}-{nanos}-{}",
        process::id(),
        NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed)
    ));
    let text = root.to_str().unwrap_or_default();
    // The path ends up in pg_ctl's shell command, postgresql.conf and
    // connection strings: keep it to characters that need no quoting anywhere.
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+@~".contains(c);
    if text.is_empty() || !text.chars().all(plain) {
        return Err(TestingError::new(format!(
            "the temporary directory {} contains characters that PostgreSQL's tools do not \
             handle (spaces, quotes, commas, non-ASCII...): set TMPDIR to a plain path such as /tmp",
            temp.display()
        )));
    }
    // Unix socket paths are limited to about 107 bytes.
    if text.len() + "/.s.PGSQL.5432.lock".len() > 100 {
        return Err(TestingError::new(format!(
            "the temporary directory {} is too long for a PostgreSQL Unix socket path: \
             set TMPDIR to a short directory such as /tmp",
            temp.display()
        )));
    }
    fs::create_dir(&root)
        .and_then(|()| fs::set_permissions(&root, fs::Permissions::from_mode(0o700)))
        .map_err(|e| {
            TestingError::new(format!(
                "could not create {} ({e}): set TMPDIR to a writable directory such as /tmp",
                root.display()
            ))
        })?;
    Ok(root)
}

/// Finds the directory holding `initdb`, `pg_ctl` and `postgres`.
fn find_server_binaries() -> Result<PathBuf, TestingError> {
    if let Some(dir) = env::var_os("PG_BIN").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if has_server_binaries(&dir) {
            return Ok(dir);
        }
        return Err(TestingError::new(format!(
            "PG_BIN={} does not contain initdb, pg_ctl and postgres: point PG_BIN at the bin \
             directory of a PostgreSQL server installation (e.g. /usr/lib/postgresql/16/bin), \
             or unset it",
            dir.display()
        )));
    }
    if let Some(path) = env::var_os("PATH") {
        if let Some(dir) = env::split_paths(&path).find(|dir| has_server_binaries(dir)) {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<(Vec<u64>, PathBuf)> = Vec::new();
    for (parent, prefix) in [("/usr/lib/postgresql", ""), ("/usr", "pgsql-")] {
        let Ok(entries) = fs::read_dir(parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(version) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
                continue;
            };
            let Ok(version) = version
                .split('.')
                .map(str::parse::<u64>)
                .collect::<Result<Vec<_>, _>>()
            else {
                continue;
            };
            let dir = entry.path().join("bin");
            if has_server_binaries(&dir) {
                candidates.push((version, dir));
            }
        }
    }
    candidates
        .into_iter()
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, dir)| dir)
        .ok_or_else(|| {
            TestingError::new(
                "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in PG_BIN, PATH \
                 or /usr/lib/postgresql/*/bin: install them (e.g. apt-get install postgresql), \
                 set PG_BIN to their directory, or set PROJECTIONIST_TEST_DATABASE_URL to use an existing server",
            )
        })
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"].iter().all(|name| {
        fs::metadata(dir.join(name))
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// The effective uid of this process.
fn effective_uid() -> Option<u32> {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        if let Some(rest) = status.lines().find_map(|l| l.strip_prefix("Uid:")) {
            // real, effective, saved, filesystem
            return rest.split_whitespace().nth(1).and_then(|v| v.parse().ok());
        }
    }
    id_number(&["-u"])
}

/// `(uid, gid)` of an OS user, from /etc/passwd or `id`.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    if let Ok(passwd) = fs::read_to_string("/etc/passwd") {
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() >= 4 && fields[0] == name {
                if let (Ok(uid), Ok(gid)) = (fields[2].parse(), fields[3].parse()) {
                    return Some((uid, gid));
                }
            }
        }
    }
    Some((id_number(&["-u", name])?, id_number(&["-g", name])?))
}

fn id_number(args: &[&str]) -> Option<u32> {
    let output = Command::new("id")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

/// Connects without TLS and spawns the connection on the current runtime.
async fn connect_to(config: &Config, what: &str, hint: &str) -> Result<Client, TestingError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
        TestingError::new(
            "projectionist::testing must be used from within a Tokio runtime: use #[tokio::test]",
        )
    })?;
    let (client, connection) = config.connect(NoTls).await.map_err(|e| {
        TestingError::new(format!(
            "could not connect to {what} ({}): {}; {hint}",
            describe_target(config),
            describe_pg_error(&e)
        ))
    })?;
    runtime.spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "testing: a test database connection ended with an error");
        }
    });
    Ok(client)
}

/// Drops the databases of test processes that are gone (their pid in the
/// name has no /proc entry). Problems are logged, not returned: leftovers must
/// not fail the tests.
async fn drop_leftover_databases(admin: &Config, hint: String) {
    if !Path::new("/proc/self").exists() {
        return; // no way to tell which test processes are alive
    }
    let client = match connect_to(admin, "the admin database", &hint).await {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(error = %e, "testing: could not look for leftover test databases");
            return;
        }
    };
    let rows = match client
        .query(
            "SELECT datname::text FROM pg_database WHERE datname LIKE 'projectionist\\_test\\_%'",
            &[],
        )
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %describe_pg_error(&e), "testing: could not list leftover test databases");
            return;
        }
    };
    let me = process::id();
    for row in rows {
        let Ok(name) = row.try_get::<_, String>(0) else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(DB_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match drop_database_sql(&client, &name).await {
            Ok(()) => {
                tracing::debug!(database = %name, "testing: dropped a leftover test database")
            }
            Err(e) => tracing::warn!(
                database = %name,
                error = %describe_pg_error(&e),
                "testing: could not drop a leftover test database"
            ),
        }
    }
}

async fn drop_database_sql(client: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
    let name = quote_ident(name);
    match client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
    {
        // PostgreSQL before 13 has no WITH (FORCE).
        Err(e) if e.code() == Some(&SqlState::SYNTAX_ERROR) => {
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
                .await
        }
        result => result,
    }
}

fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Renders a config as a libpq `key=value` connection string.
fn conninfo(config: &Config) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut push = |key: &str, value: &str| {
        parts.push(format!("{key}={}", conninfo_value(value)));
    };
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|host| match host {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.to_string_lossy().into_owned(),
        })
        .collect();
    if !hosts.is_empty() {
        push("host", &hosts.join(","));
    }
    let hostaddrs: Vec<String> = config
        .get_hostaddrs()
        .iter()
        .map(|a| a.to_string())
        .collect();
    if !hostaddrs.is_empty() {
        push("hostaddr", &hostaddrs.join(","));
    }
    let ports: Vec<String> = config.get_ports().iter().map(|p| p.to_string()).collect();
    if !ports.is_empty() {
        push("port", &ports.join(","));
    }
    if let Some(user) = config.get_user() {
        push("user", user);
    }
    if let Some(password) = config.get_password() {
        push("password", &String::from_utf8_lossy(password));
    }
    if let Some(dbname) = config.get_dbname() {
        push("dbname", dbname);
    }
    if let Some(options) = config.get_options() {
        push("options", options);
    }
    if let Some(name) = config.get_application_name() {
        push("application_name", name);
    }
    if let Some(timeout) = config.get_connect_timeout() {
        push("connect_timeout", &timeout.as_secs().max(1).to_string());
    }
    match config.get_ssl_mode() {
        SslMode::Disable => push("sslmode", "disable"),
        SslMode::Require => push("sslmode", "require"),
        _ => {} // prefer is the default
    }
    parts.join(" ")
}

/// Quotes a connection string value when needed.
fn conninfo_value(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\' || c == '=');
    if plain {
        return value.to_string();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('\'');
    quoted
}

/// Where a config points, without the password.
fn describe_target(config: &Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|host| match host {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(|p| p.to_string()).collect();
    format!(
        "host={} port={} user={} dbname={}",
        if hosts.is_empty() {
            "(default)".to_string()
        } else {
            hosts.join(",")
        },
        if ports.is_empty() {
            "5432".to_string()
        } else {
            ports.join(",")
        },
        config.get_user().unwrap_or("(none)"),
        config.get_dbname().unwrap_or("(default)")
    )
}

/// A tokio-postgres error with its cause (its `Display` alone says e.g. only
/// "db error").
fn describe_pg_error(error: &tokio_postgres::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The parent of process `pid`, from `/proc/{pid}/stat`.
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid …; comm may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn output_text(output: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    tail(text.trim_end(), 40)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| {
            vars.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn database_url_alone_is_ignored() {
        let source = server_source(env(&[("DATABASE_URL", "postgres://app@prod/app")])).unwrap();
        assert_eq!(source, ServerSource::Throwaway);
    }

    #[test]
    fn the_test_variable_names_the_server() {
        let source = server_source(env(&[
            ("DATABASE_URL", "postgres://app@prod/app"),
            (
                TEST_DATABASE_URL,
                " postgres://postgres@127.0.0.1:5432/postgres ",
            ),
        ]))
        .unwrap();
        assert_eq!(
            source,
            ServerSource::Url("postgres://postgres@127.0.0.1:5432/postgres".to_owned())
        );
    }

    #[test]
    fn an_empty_test_variable_means_a_throwaway_cluster() {
        let source = server_source(env(&[(TEST_DATABASE_URL, "  ")])).unwrap();
        assert_eq!(source, ServerSource::Throwaway);
        assert_eq!(server_source(env(&[])).unwrap(), ServerSource::Throwaway);
    }

    #[test]
    fn a_bad_url_names_the_variable() {
        let e = TestServer::from_url("postgres://[bad").unwrap_err();
        assert!(e.message().contains(TEST_DATABASE_URL), "{e}");
        assert!(!e.message().contains(" DATABASE_URL"), "{e}");
    }
}
