//! The command line of the user's binary: `migrate`, `run-projections`,
//! `status`, `reset`, `dlq`, `pause`/`resume`, `rebase-cursors`. Every
//! option has a flag and an environment variable; the database URL's value
//! is never shown in `--help` or logs.
//!
//! A user's `main` is a few lines:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use projectionist::{App, Projection};
//! # fn my_projection() -> Arc<dyn Projection> { unimplemented!() }
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     App::new("bank").projection(my_projection()).run().await
//! }
//! ```
//!
//! To add subcommands of your own, flatten [`Command`] into your clap enum
//! and call [`App::execute`].

use crate::dispatcher::DispatcherKind;
use crate::error::{Error, Result};
use crate::projection::{ConcurrentProjection, Projection};
use crate::registered::Registered;
use crate::runner::{Runner, RunnerConfig, DEFAULT_BATCH_SIZE};
use crate::store::{EventStore, StoreConfig, DEFAULT_NOTIFY_CHANNEL};
use clap::{Args, Parser, Subcommand};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Options shared by every subcommand.
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// PostgreSQL URL, e.g. postgres://user:password@host:5432/db (required).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
    /// Schema holding the projectionist tables.
    #[arg(
        long,
        env = "PROJECTIONIST_SCHEMA",
        default_value = "public",
        global = true
    )]
    pub schema: String,
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", global = true, value_parser = ["text", "json"])]
    pub log_format: String,
    /// Log level (RUST_LOG, when set, takes precedence): error, warn, info, debug, trace.
    #[arg(long, env = "LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
    /// Maximum pooled database connections.
    #[arg(long, env = "POOL_SIZE", default_value_t = crate::db::DEFAULT_POOL_SIZE, global = true)]
    pub pool_size: usize,
    /// PEM file of CA certificates for TLS verification (sslmode=verify-ca/verify-full, or require)
    /// when DATABASE_URL names no sslrootcert.
    #[arg(long, env = "DATABASE_CA_FILE", global = true)]
    pub ca_file: Option<std::path::PathBuf>,
    /// How long to keep retrying when the database cannot be reached at start-up.
    #[arg(long, env = "CONNECT_TIMEOUT", default_value = "30s", global = true)]
    pub connect_timeout: String,
    /// Channel that appends NOTIFY and the notify dispatcher LISTENs on.
    #[arg(long, env = "NOTIFY_CHANNEL", default_value = DEFAULT_NOTIFY_CHANNEL, global = true)]
    pub notify_channel: String,
}

/// The engine's subcommands. New subcommands may be added in minor
/// releases: match with a wildcard arm.
#[derive(Subcommand, Debug, Clone)]
#[non_exhaustive]
pub enum Command {
    /// Create or upgrade the projectionist tables (safe to run from many replicas at once).
    Migrate,
    /// Run the projections until SIGTERM/SIGINT (or, with --once, until caught up).
    RunProjections(Box<RunArgs>),
    /// Show each projection's cursor, lag and state (lag estimated unless --exact).
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Count each slot's lag exactly instead of estimating it, up to --exact-limit events per
        /// slot (a scan of the lag: slow when far behind).
        #[arg(long)]
        exact: bool,
        /// With --exact: the most events counted per slot; a slot further behind shows >N.
        #[arg(long, env = "STATUS_EXACT_LIMIT", default_value_t = crate::admin::DEFAULT_EXACT_LAG_LIMIT)]
        exact_limit: i64,
        /// How long the status queries may take; they are cancelled on the server after that.
        #[arg(long, env = "STATUS_TIMEOUT", default_value = "30s")]
        timeout: String,
        /// Workers without a heartbeat for this long are gone: slots still assigned to them show
        /// the worker as stale (use run-projections' HEARTBEAT_TIMEOUT).
        #[arg(long, env = "HEARTBEAT_TIMEOUT", default_value = "30s")]
        heartbeat_timeout: String,
    },
    /// Dead letters: events projections gave up on (failure policy DeadLetter).
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Put a failed or paused projection back to running (processes pick it up within a second).
    Resume {
        /// The projection's name.
        name: String,
        /// Only this partition.
        #[arg(long)]
        partition: Option<i32>,
    },
    /// Pause a projection (state stopped): processes stop running it until `resume`.
    Pause {
        /// The projection's name.
        name: String,
        /// Only this partition.
        #[arg(long)]
        partition: Option<i32>,
    },
    /// Wait until a projection has handled an append (read-your-writes); exit 1 on timeout.
    Wait(WaitArgs),
    /// After restoring the database into another PostgreSQL cluster: re-derive every cursor from
    /// global positions (stop all projection processes first).
    RebaseCursors {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// List each projection's versions: live (readers see it), building, previous, retired.
    Versions {
        /// Only this projection.
        name: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Switch readers to a projection's newest version (or --version) once it has caught up;
    /// refused with the remaining lag otherwise.
    Promote {
        /// The projection's name.
        name: String,
        /// The version to promote (default: the newest one, counting the one this binary runs).
        #[arg(long)]
        version: Option<i32>,
        /// The most events the version may still have to handle and count as caught up.
        #[arg(long, default_value_t = crate::versions::DEFAULT_PROMOTE_MAX_LAG)]
        max_lag: i64,
    },
    /// Drop an old (not live) version's tables, checkpoints and dead letters; prints what it
    /// drops and needs --yes.
    Retire {
        /// The projection's name.
        name: String,
        /// The version to drop.
        #[arg(long)]
        version: i32,
        /// Drop it (without: only print what would be dropped).
        #[arg(long)]
        yes: bool,
    },
    /// Remove everything stored for a projection that is no longer in this binary (every
    /// version's checkpoints, dead letters, tables and views); prints what it drops and needs --yes.
    Forget {
        /// The projection's name.
        name: String,
        /// Drop it (without: only print what would be dropped).
        #[arg(long)]
        yes: bool,
    },
    /// Move a rewindable projection's cursors back to a global position or a time, so that the
    /// events from there are handled again (prints how many first; needs --yes).
    Rewind {
        /// The projection's name.
        name: String,
        /// Handle again every event from this global position on.
        #[arg(long, required_unless_present = "to_time", conflicts_with = "to_time")]
        to_position: Option<i64>,
        /// Handle again every event appended at or after this time (RFC 3339, e.g.
        /// 2026-12-03T10:00:00Z).
        #[arg(long)]
        to_time: Option<String>,
        /// Move the cursors (without: only print how many events would be handled again).
        #[arg(long)]
        yes: bool,
    },
    /// Clear a projection's read model and checkpoints so the next run rebuilds it.
    Reset {
        /// The projection's name.
        name: String,
        /// Reset only this partition's checkpoint (and its part of the read model).
        #[arg(long)]
        partition: Option<i32>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// Options of `wait`.
#[derive(Args, Debug, Clone)]
pub struct WaitArgs {
    /// The projection's name.
    pub name: String,
    /// The appending transaction's id (an append returns it).
    #[arg(long)]
    pub transaction_id: u64,
    /// The global position of the event to wait for. Unset: the transaction's last event (the
    /// whole transaction).
    #[arg(long)]
    pub position: Option<i64>,
    /// Wait for this partition only. Unset: the partitions that hold the events waited for.
    #[arg(long)]
    pub partition: Option<i32>,
    /// How long to wait (e.g. 500ms, 5s).
    #[arg(long, env = "WAIT_TIMEOUT", default_value = "5s")]
    pub timeout: String,
}

/// `dlq` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum DlqCommand {
    /// List dead letters.
    List {
        /// Only this projection's.
        #[arg(long)]
        projection: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its event.
    Show {
        /// The dead letter's id (from `dlq list`).
        id: i64,
    },
    /// Run the handler again on dead letters; on success they go away.
    Retry {
        /// The dead letter's id (or use --all).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Retry every dead letter (of --projection, if given).
        #[arg(long)]
        all: bool,
        /// With --all: only this projection's.
        #[arg(long)]
        projection: Option<String>,
    },
    /// Delete dead letters.
    Purge {
        /// Only this projection's.
        #[arg(long)]
        projection: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// Options of `run-projections`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// This process's partition, 0..TOTAL_PARTITIONS. Unset: taken from a hostname ending in -N
    /// (a StatefulSet pod), else 0.
    #[arg(long, env = "PARTITION_KEY", allow_negative_numbers = true)]
    pub partition_key: Option<i32>,
    /// Number of static partitions.
    #[arg(
        long,
        env = "TOTAL_PARTITIONS",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    pub total_partitions: i32,
    /// Events per batch transaction.
    #[arg(long, env = "BATCH_SIZE", default_value_t = DEFAULT_BATCH_SIZE, allow_negative_numbers = true)]
    pub batch_size: i64,
    /// Wake-ups: poll or notify.
    #[arg(long, env = "DISPATCHER", default_value = "poll")]
    pub dispatcher: String,
    /// Poll interval of the poll dispatcher (e.g. 200ms, 5s).
    #[arg(long, env = "POLL_INTERVAL", default_value = "200ms")]
    pub poll_interval: String,
    /// Ceiling of the retry backoff after errors.
    #[arg(long, env = "MAX_BACKOFF", default_value = "30s")]
    pub max_backoff: String,
    /// Time allowed for in-flight batches to commit on shutdown.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "30s")]
    pub shutdown_timeout: String,
    /// Run only these projections (repeatable). Default: all.
    #[arg(long = "projection", env = "PROJECTIONS", value_delimiter = ',')]
    pub projections: Vec<String>,
    /// Address of the admin HTTP server (/metrics /healthz /readyz /status), or off.
    #[arg(long, env = "ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: String,
    /// /readyz fails while a slot lags by more than this many events (unset: no lag limit).
    #[arg(long, env = "READY_MAX_LAG")]
    pub ready_max_lag: Option<i64>,
    /// Catch up with every readable event, then exit 0 (static mode only).
    #[arg(long)]
    pub once: bool,
    /// Promote each projection version this process builds beside the live one as soon as it
    /// has caught up (readers switch to it without `promote`). Default: off.
    #[arg(long, env = "PROMOTE_WHEN_CAUGHT_UP")]
    pub promote_when_caught_up: bool,
    /// static: this process runs PARTITION_KEY of TOTAL_PARTITIONS; worker: join the worker pool
    /// and run the slots the leader assigns.
    #[arg(long, env = "RUN_MODE", default_value = "static", value_parser = ["static", "worker"])]
    pub mode: String,
    /// Worker mode: how often a worker refreshes its heartbeat.
    #[arg(long, env = "HEARTBEAT_INTERVAL", default_value = "5s")]
    pub heartbeat_interval: String,
    /// Worker mode: after how long without a heartbeat a worker's slots move elsewhere.
    #[arg(long, env = "HEARTBEAT_TIMEOUT", default_value = "30s")]
    pub heartbeat_timeout: String,
    /// Worker mode: how often the leader rebalances and workers re-read their assignments.
    #[arg(long, env = "REBALANCE_INTERVAL", default_value = "5s")]
    pub rebalance_interval: String,
    /// Worker mode: failed batches in a row after which a slot is released to another worker.
    #[arg(long, env = "MAX_CONSECUTIVE_FAILURES", default_value_t = crate::worker::DEFAULT_MAX_CONSECUTIVE_FAILURES)]
    pub max_consecutive_failures: u32,
    /// Worker mode: partition counts overriding the projections' own, e.g. account_balances=4,notifier=1.
    #[arg(long, env = "PROJECTION_PARTITIONS", default_value = "")]
    pub projection_partitions: String,
}

#[derive(Parser, Debug)]
struct EngineCli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Parses a duration such as `200ms`, `5s`, `1m`; `what` names the option.
pub fn parse_duration(what: &str, value: &str) -> Result<Duration> {
    humantime::parse_duration(value.trim()).map_err(|e| {
        Error::config(format!(
            "{what} {value:?} is not a duration ({e}): write it like 200ms, 5s or 1m"
        ))
    })
}

/// Set once a write to stdout failed with `BrokenPipe`: the reader is gone
/// (`status --json | head -1`), so the rest of the output is dropped.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes one line of command output to stdout. When the reader has gone
/// (`BrokenPipe`), the line and every later one are dropped silently and
/// the command finishes with its own exit code, as if the output had been
/// read; any other write error ends the command with that error.
fn out(line: std::fmt::Arguments<'_>) -> Result<()> {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => Err(Error::new(
            crate::error::Kind::Other,
            format!("cannot write the output to stdout ({e}): check where stdout is redirected"),
        )
        .with_source(e)),
    }
}

/// `println!` through [`out`]: `outln!(...)` is `out(format_args!(...))?`.
macro_rules! outln {
    ($($arg:tt)*) => {
        out(format_args!($($arg)*))?
    };
}

/// The partition a StatefulSet pod should run: the numeric suffix of a
/// hostname like `projections-3`.
pub fn ordinal_from_hostname(hostname: &str) -> Option<i32> {
    let (_, suffix) = hostname.trim().rsplit_once('-')?;
    if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    suffix.parse().ok()
}

fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
}

/// Installs the tracing subscriber for `LOG_FORMAT` / `LOG_LEVEL` /
/// `RUST_LOG`. Safe to call more than once (later calls do nothing).
///
/// With the cargo feature `otel` and `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, it also installs an
/// OpenTelemetry layer that exports spans over OTLP/HTTP (protobuf) with a
/// batch processor, configured by the standard `OTEL_*` variables; call
/// [`flush_traces`] before the process exits ([`App::execute`] does).
/// Unset, nothing is exported and the engine creates no spans.
pub fn init_logging(format: &str, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    #[cfg(feature = "otel")]
    {
        match crate::otel::install() {
            Ok(Some(tracer)) => return init_with_otel(format, filter, tracer),
            Ok(None) => {}
            // Logging is not up yet: say it on stderr, and log without traces.
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "warning: traces are not exported: {e}");
            }
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// The subscriber with an OpenTelemetry layer beside the log lines: log
/// lines keep `filter` (`LOG_LEVEL` / `RUST_LOG`); spans at `info` and above
/// of every target are exported, whatever the log level.
#[cfg(feature = "otel")]
fn init_with_otel(
    format: &str,
    filter: tracing_subscriber::EnvFilter,
    tracer: opentelemetry_sdk::trace::Tracer,
) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if format == "json" {
        fmt.json().flatten_event(true).boxed()
    } else {
        fmt.boxed()
    };
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
}

/// Exports the spans ended so far, when [`init_logging`] installed the
/// OTLP exporter (feature `otel`); otherwise does nothing. Call it before
/// the process exits: the batch processor exports every few seconds, and
/// what it still holds at exit is lost. Waits for the exporter (at most its
/// timeout, `OTEL_EXPORTER_OTLP_TIMEOUT`, 10 s by default) on a blocking
/// thread.
pub async fn flush_traces() {
    #[cfg(feature = "otel")]
    {
        if crate::otel::active() {
            let _ = tokio::task::spawn_blocking(crate::otel::flush).await;
        }
    }
}

/// The user's binary: its name and projections.
pub struct App {
    name: String,
    projections: Vec<Registered>,
    registry: Option<crate::Registry>,
    /// Projections refused at registration, reported by [`App::run`].
    refused: Vec<Error>,
}

impl App {
    /// An app called `name` (used in help and logs).
    pub fn new(name: impl Into<String>) -> App {
        App {
            name: name.into(),
            projections: Vec::new(),
            registry: None,
            refused: Vec::new(),
        }
    }

    /// The application's event types and upcasters, carried by every store
    /// the app opens (see [`StoreConfig::registry`]). Default: none.
    pub fn registry(mut self, registry: crate::Registry) -> App {
        self.registry = Some(registry);
        self
    }

    /// Registers a transactional projection. Invalid options are reported
    /// when the app runs (exit code 2).
    pub fn projection(self, projection: Arc<dyn Projection>) -> App {
        self.registered(Registered::new(projection))
    }

    /// Registers a concurrent projection (see [`ConcurrentProjection`]).
    /// Invalid options are reported when the app runs (exit code 2).
    pub fn concurrent_projection(self, projection: Arc<dyn ConcurrentProjection>) -> App {
        self.registered(Registered::concurrent(projection))
    }

    fn registered(mut self, projection: Result<Registered>) -> App {
        match projection {
            Ok(p) => self.projections.push(p),
            Err(e) => self.refused.push(e),
        }
        self
    }

    /// The registered projections.
    pub fn projections(&self) -> &[Registered] {
        &self.projections
    }

    /// Parses the process's arguments and runs the command. Exit codes: 0
    /// success, 1 runtime error, 2 usage error.
    pub async fn run(self) -> ExitCode {
        use clap::CommandFactory;
        let name: &'static str = Box::leak(self.name.clone().into_boxed_str());
        let cmd = EngineCli::command().name(name).bin_name(name);
        let matches = match cmd.try_get_matches() {
            Ok(m) => m,
            Err(e) => {
                let _ = e.print();
                return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
            }
        };
        use clap::FromArgMatches;
        match EngineCli::from_arg_matches(&matches) {
            Ok(cli) => self.execute(&cli.global, cli.command).await,
            Err(e) => {
                let _ = e.print();
                ExitCode::from(2)
            }
        }
    }

    /// Runs one command; prints errors (cause and fix) to stderr and maps
    /// them to exit codes: 2 for usage/configuration errors, 1 otherwise.
    pub async fn execute(&self, global: &GlobalArgs, command: Command) -> ExitCode {
        init_logging(&global.log_format, &global.log_level);
        let result = self.execute_inner(global, command).await;
        flush_traces().await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // A closed stderr is no reason to panic either.
                let _ = writeln!(std::io::stderr(), "error: {e}");
                ExitCode::from(if e.is_config() && !e.is_not_migrated() {
                    2
                } else {
                    1
                })
            }
        }
    }

    /// Opens the event store the global options describe.
    pub fn store(&self, global: &GlobalArgs) -> Result<EventStore> {
        let url = global.database_url.as_deref().ok_or_else(|| {
            Error::config("DATABASE_URL is not set: pass --database-url or set DATABASE_URL=postgres://user:password@host:5432/db")
        })?;
        let config = StoreConfig::default()
            .schema(&global.schema)?
            .notify_channel(Some(&global.notify_channel))?
            .pool_size(global.pool_size)
            .ca_file(global.ca_file.as_deref());
        let config = match &self.registry {
            Some(r) => config.registry(r.clone())?,
            None => config,
        };
        EventStore::connect_with(url, config)
    }

    /// Opens the event store and waits (up to `CONNECT_TIMEOUT`) until the
    /// database answers.
    pub async fn connect(&self, global: &GlobalArgs) -> Result<EventStore> {
        let timeout = parse_duration("CONNECT_TIMEOUT", &global.connect_timeout)?;
        let store = self.store(global)?;
        crate::db::wait_until_reachable(store.pool(), store.pg_config(), timeout).await?;
        Ok(store)
    }

    fn selected(&self, names: &[String]) -> Result<Vec<Registered>> {
        if names.is_empty() {
            return Ok(self.projections.clone());
        }
        names.iter().map(|n| self.find(n)).collect()
    }

    fn find(&self, name: &str) -> Result<Registered> {
        self.projections
            .iter()
            .find(|p| p.name() == name || p.key() == name)
            .cloned()
            .ok_or_else(|| {
                let known: Vec<&str> = self.projections.iter().map(|p| p.name()).collect();
                Error::config(format!(
                    "unknown projection {name:?}: this binary has {}",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ))
            })
    }

    async fn execute_inner(&self, global: &GlobalArgs, command: Command) -> Result<()> {
        if let Some(e) = self.refused.first() {
            return Err(Error::config(e.to_string()));
        }
        match command {
            Command::Migrate => {
                let store = self.connect(global).await?;
                let report =
                    crate::migrate::migrate_with(store.pg_config(), store.tls(), &global.schema)
                        .await?;
                if report.applied.is_empty() {
                    outln!("schema {} is up to date", global.schema);
                } else {
                    outln!(
                        "applied {} to schema {}",
                        report.applied.join(", "),
                        global.schema
                    );
                }
                // Each projection's version and read model (its migrate
                // hook), as run-projections would at start.
                crate::versions::prepare(&store, &self.projections).await?;
                for p in &self.projections {
                    if !p.tables().is_empty() {
                        outln!(
                            "read model of {} version {} is ready: {}",
                            p.name(),
                            p.version(),
                            p.tables().join(", ")
                        );
                    }
                }
                Ok(())
            }
            Command::RunProjections(args) => self.run_projections(global, *args).await,
            Command::Dlq(cmd) => self.dlq(global, cmd).await,
            Command::RebaseCursors { yes } => {
                if !yes
                    && !confirm(
                        "rebase every cursor to a global position (all projection processes must be stopped)?",
                    )?
                {
                    outln!("rebase cancelled");
                    return Ok(());
                }
                let store = self.connect(global).await?;
                let rebased = crate::admin::rebase_cursors(&store, &self.projections).await?;
                let mut again = 0;
                for r in &rebased {
                    again += r.handled_again;
                    outln!(
                        "{} partition {}: resumes after global position {}; {} event(s) at the boundary will be handled again",
                        r.projection, r.partition, r.resume_after_position, r.handled_again
                    );
                }
                outln!(
                    "rebased {} checkpoint(s); {again} event(s) in all will be handled again (make their side effects idempotent)",
                    rebased.len()
                );
                Ok(())
            }
            Command::Wait(args) => {
                self.find(&args.name)?;
                let timeout = parse_duration("--timeout", &args.timeout)?;
                let store = self.connect(global).await?;
                crate::wait::run_cli(&store, &args, timeout).await
            }
            Command::Resume { name, partition } => {
                self.find(&name)?;
                let store = self.connect(global).await?;
                let n = crate::dead_letter::resume(&store, &name, partition).await?;
                if n == 0 {
                    outln!("{name} has no failed or paused partition: nothing to resume");
                } else {
                    outln!("resumed {n} failed or paused partition(s) of {name}");
                }
                Ok(())
            }
            Command::Pause { name, partition } => {
                self.find(&name)?;
                let store = self.connect(global).await?;
                let n = crate::dead_letter::pause(&store, &name, partition).await?;
                let what = partition
                    .map(|p| format!("partition {p} of {name}"))
                    .unwrap_or_else(|| name.clone());
                if n == 0 {
                    outln!("{what} is already paused: nothing to do");
                } else {
                    outln!(
                        "paused {n} partition(s) of {name}: processes stop running it after their current \
                         batch; `resume {name}{}` continues it",
                        partition
                            .map(|p| format!(" --partition {p}"))
                            .unwrap_or_default()
                    );
                }
                Ok(())
            }
            Command::Status {
                json,
                exact,
                exact_limit,
                timeout,
                heartbeat_timeout,
            } => {
                let mut options = crate::admin::StatusOptions::default()
                    .timeout(parse_duration("STATUS_TIMEOUT", &timeout)?)?
                    .heartbeat_timeout(parse_duration("HEARTBEAT_TIMEOUT", &heartbeat_timeout)?);
                if exact {
                    options = options
                        .exact(exact_limit)
                        .map_err(|e| e.context("STATUS_EXACT_LIMIT (--exact-limit)"))?;
                }
                let store = self.connect(global).await?;
                let report = crate::admin::report_with(&store, &self.projections, &options).await?;
                if json {
                    outln!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print_status_table(&report.projections)?;
                    print_workers_table(&report.workers)?;
                    if let Some(h) = &report.watermark_held_by {
                        if h.open_seconds >= 1.0 {
                            outln!(
                                "watermark held back by pid {} ({} on database {}, {}) open for {:.0}s: {}",
                                h.pid,
                                h.user.as_deref().unwrap_or("?"),
                                h.database.as_deref().unwrap_or("?"),
                                h.state.as_deref().unwrap_or("?"),
                                h.open_seconds,
                                h.query
                            );
                        }
                    }
                    for (p, n) in &report.dead_letters {
                        let more = if report.dead_letters_capped.get(p) == Some(&true) {
                            "+"
                        } else {
                            ""
                        };
                        outln!("{p}: {n}{more} dead letter(s): see `dlq list --projection {p}`");
                    }
                }
                Ok(())
            }
            Command::Versions { name, json } => {
                let store = self.connect(global).await?;
                let rows = crate::versions::list(&store, name.as_deref()).await?;
                if json {
                    outln!("{}", serde_json::to_string_pretty(&rows)?);
                } else if rows.is_empty() {
                    outln!("no versions recorded (they are recorded when run-projections starts)");
                } else {
                    let mut table = comfy_table::Table::new();
                    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
                    table.set_header([
                        "projection",
                        "version",
                        "state",
                        "tables",
                        "live from position",
                    ]);
                    for r in &rows {
                        table.add_row([
                            r.name.clone(),
                            r.version.to_string(),
                            r.state.clone(),
                            r.tables.join(", "),
                            r.live_from_position.to_string(),
                        ]);
                    }
                    outln!("{table}");
                }
                Ok(())
            }
            Command::Promote {
                name,
                version,
                max_lag,
            } => {
                let store = self.connect(global).await?;
                let p =
                    crate::versions::promote(&store, &self.projections, &name, version, max_lag)
                        .await?;
                if p.already_live {
                    outln!("version {} of {name} is already live", p.version);
                } else {
                    outln!(
                        "promoted version {} of {name} (was {}): readers of {} now see it",
                        p.version,
                        p.previous
                            .map_or_else(|| "none".to_owned(), |v| v.to_string()),
                        if p.tables.is_empty() {
                            "its tables".to_owned()
                        } else {
                            p.tables.join(", ")
                        }
                    );
                }
                Ok(())
            }
            Command::Retire { name, version, yes } => {
                let store = self.connect(global).await?;
                let r = crate::versions::retire(&store, &name, version, yes).await?;
                let what = format!(
                    "version {version} of {name}: tables [{}], {} checkpoint(s), {} dead letter(s)",
                    r.tables.join(", "),
                    r.checkpoints,
                    r.dead_letters
                );
                if !yes {
                    outln!("would retire {what}");
                    return Err(Error::config("nothing dropped: pass --yes to retire it"));
                }
                outln!("retired {what}");
                Ok(())
            }
            Command::Forget { name, yes } => {
                let store = self.connect(global).await?;
                let f = crate::versions::forget(&store, &self.projections, &name, yes).await?;
                let what = format!(
                    "{name}: checkpoint keys [{}], versions {:?}, tables and views [{}], {} checkpoint(s), \
                     {} dead letter(s)",
                    f.keys.join(", "),
                    f.versions,
                    f.relations.join(", "),
                    f.checkpoints,
                    f.dead_letters
                );
                if !yes {
                    outln!("would forget {what}");
                    return Err(Error::config("nothing dropped: pass --yes to forget it"));
                }
                outln!("forgot {what}");
                Ok(())
            }
            Command::Rewind {
                name,
                to_position,
                to_time,
                yes,
            } => {
                let projection = self.find(&name)?;
                let target = match (to_position, to_time) {
                    (Some(p), _) => crate::rewind::RewindTo::Position(p),
                    (None, Some(t)) => crate::rewind::RewindTo::Time(t),
                    (None, None) => {
                        return Err(Error::config("rewind needs --to-position P or --to-time T"))
                    }
                };
                let store = self.connect(global).await?;
                let r = crate::rewind::rewind(&store, &projection, &target, yes).await?;
                let what = format!(
                    "{}: {} event(s) will be handled again in {} partition(s)",
                    projection.key(),
                    r.events,
                    r.moved
                );
                if !yes {
                    outln!("rewinding {what}");
                    return Err(Error::config("nothing moved: pass --yes to rewind"));
                }
                outln!("rewound {what}; running processes continue from the new cursors");
                Ok(())
            }
            Command::Reset {
                name,
                partition,
                yes,
            } => {
                let projection = self.find(&name)?;
                let what = format!(
                    "reset {name}{}: clear its read model and checkpoints?",
                    partition
                        .map(|p| format!(" partition {p}"))
                        .unwrap_or_default()
                );
                if !yes && !confirm(&what)? {
                    outln!("reset cancelled");
                    return Ok(());
                }
                let store = self.connect(global).await?;
                let n = crate::admin::reset(&store, &projection, partition).await?;
                outln!("reset {name}: {n} checkpoint(s) cleared; the next run rebuilds it");
                Ok(())
            }
        }
    }

    async fn dlq(&self, global: &GlobalArgs, cmd: DlqCommand) -> Result<()> {
        let store = self.connect(global).await?;
        match cmd {
            DlqCommand::List { projection, json } => {
                if let Some(p) = &projection {
                    self.find(p)?;
                }
                let rows = crate::dead_letter::list(&store, projection.as_deref()).await?;
                if json {
                    outln!("{}", serde_json::to_string_pretty(&rows)?);
                } else if rows.is_empty() {
                    outln!("no dead letters");
                } else {
                    let mut table = comfy_table::Table::new();
                    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
                    table.set_header([
                        "id",
                        "projection",
                        "partition",
                        "position",
                        "event",
                        "stream",
                        "attempts",
                        "error",
                    ]);
                    for d in &rows {
                        let mut error = d.error.clone();
                        if error.chars().count() > 120 {
                            error = error.chars().take(117).collect::<String>() + "...";
                        }
                        table.add_row([
                            d.id.to_string(),
                            d.projection.clone(),
                            d.partition.to_string(),
                            d.global_position.to_string(),
                            d.event_type.clone(),
                            format!("{}/{}", d.aggregate_type, d.aggregate_id),
                            d.attempts.to_string(),
                            error,
                        ]);
                    }
                    outln!("{table}");
                }
                Ok(())
            }
            DlqCommand::Show { id } => {
                let (dl, event) = crate::dead_letter::show(&store, id).await?;
                let event = event.map(|e| {
                    serde_json::json!({
                        "global_position": e.global_position,
                        "transaction_id": e.transaction_id,
                        "event_id": e.event_id,
                        "aggregate_type": e.aggregate_type,
                        "aggregate_id": e.aggregate_id,
                        "aggregate_version": e.aggregate_version,
                        "event_type": e.event_type,
                        "event_version": e.event_version,
                        "created_at": e.created_at.to_rfc3339(),
                        "payload": serde_json::from_str::<serde_json::Value>(e.payload_json()).unwrap_or_default(),
                        "metadata": serde_json::from_str::<serde_json::Value>(e.metadata_json()).unwrap_or_default(),
                    })
                });
                outln!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({ "dead_letter": dl, "event": event })
                    )?
                );
                Ok(())
            }
            DlqCommand::Retry {
                id,
                all,
                projection,
            } => {
                let ids: Vec<i64> = match (id, all) {
                    (Some(id), _) => vec![id],
                    (None, _) => {
                        if let Some(p) = &projection {
                            self.find(p)?;
                        }
                        crate::dead_letter::list(&store, projection.as_deref())
                            .await?
                            .iter()
                            .map(|d| d.id)
                            .collect()
                    }
                };
                let (mut ok, mut failed) = (0, 0);
                for id in ids {
                    let r = crate::dead_letter::retry(&store, &self.projections, id).await?;
                    if r.succeeded {
                        ok += 1;
                        outln!("dead letter {id}: handled; removed");
                    } else {
                        failed += 1;
                        outln!(
                            "dead letter {id}: failed again: {}",
                            r.error.unwrap_or_default()
                        );
                    }
                }
                outln!(
                    "retried {}: {ok} succeeded, {failed} still failing",
                    ok + failed
                );
                if failed > 0 {
                    return Err(Error::new(
                        crate::error::Kind::Handler,
                        format!("{failed} dead letter(s) still fail; fix the handler or the data and retry"),
                    ));
                }
                Ok(())
            }
            DlqCommand::Purge { projection, yes } => {
                if let Some(p) = &projection {
                    self.find(p)?;
                }
                let what = projection
                    .as_deref()
                    .map(|p| format!("the dead letters of {p}"))
                    .unwrap_or_else(|| "every dead letter".to_owned());
                if !yes && !confirm(&format!("delete {what}?"))? {
                    outln!("purge cancelled");
                    return Ok(());
                }
                let n = crate::dead_letter::purge(&store, projection.as_deref()).await?;
                outln!("purged {n} dead letter(s)");
                Ok(())
            }
        }
    }

    async fn run_projections(&self, global: &GlobalArgs, args: RunArgs) -> Result<()> {
        // Handlers first: a SIGTERM during start-up must still be graceful.
        let shutdown = shutdown_signal();
        crate::runner::check_unique(self.projections.iter())?;
        let projections = self.selected(&args.projections)?;
        let dispatcher: DispatcherKind = args.dispatcher.parse()?;
        let partition_key = match args.partition_key {
            Some(k) => k,
            None => match hostname().as_deref().and_then(ordinal_from_hostname) {
                Some(k) if args.total_partitions > 1 && args.mode == "static" => {
                    tracing::info!(
                        partition_key = k,
                        "PARTITION_KEY unset: using the ordinal of hostname {}",
                        hostname().unwrap_or_default()
                    );
                    k
                }
                _ => 0,
            },
        };
        let config = RunnerConfig::default()
            .batch_size(args.batch_size)?
            .poll_interval(parse_duration("POLL_INTERVAL", &args.poll_interval)?)?
            .max_backoff(parse_duration("MAX_BACKOFF", &args.max_backoff)?)
            .shutdown_timeout(parse_duration("SHUTDOWN_TIMEOUT", &args.shutdown_timeout)?)
            .dispatcher(dispatcher)
            .notify_channel(&global.notify_channel)?
            .partition(partition_key, args.total_partitions)?
            .promote_when_caught_up(args.promote_when_caught_up);
        let admin_addr = crate::server::parse_admin_addr(&args.admin_addr)?;
        let store = self.connect(global).await?;
        let runner = Runner::new(store.clone(), config).with_projections(&projections)?;
        let (admin_stop, admin_stop_rx) = tokio::sync::watch::channel(false);
        if let (Some(addr), false) = (admin_addr, args.once) {
            let poll = parse_duration("POLL_INTERVAL", &args.poll_interval)?;
            let window = (poll * 3).clamp(Duration::from_secs(15), Duration::from_secs(120));
            let state = std::sync::Arc::new(
                crate::server::AdminState::new(
                    store.clone(),
                    self.projections.clone(),
                    args.ready_max_lag,
                    window,
                )
                .heartbeat_timeout(parse_duration(
                    "HEARTBEAT_TIMEOUT",
                    &args.heartbeat_timeout,
                )?),
            );
            crate::server::serve(addr, state, admin_stop_rx).await?;
        }
        crate::metrics::with(|m| m.worker_up.set(1));
        let result = self.run_with(&store, &runner, args, shutdown).await;
        crate::metrics::with(|m| m.worker_up.set(0));
        let _ = admin_stop.send(true);
        result
    }

    async fn run_with(
        &self,
        store: &EventStore,
        runner: &Runner,
        args: RunArgs,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        if args.mode == "worker" {
            if args.once {
                return Err(Error::config(
                    "--once runs static partitions only: drop --once, or use --mode static",
                ));
            }
            if args.partition_key.is_some() || args.total_partitions != 1 {
                return Err(Error::config(
                    "PARTITION_KEY/TOTAL_PARTITIONS belong to static mode: in worker mode set partition \
                     counts with PROJECTION_PARTITIONS (e.g. account_balances=4) and unset them",
                ));
            }
            let worker = crate::worker::WorkerConfig::default()
                .heartbeat_interval(parse_duration(
                    "HEARTBEAT_INTERVAL",
                    &args.heartbeat_interval,
                )?)?
                .heartbeat_timeout(parse_duration(
                    "HEARTBEAT_TIMEOUT",
                    &args.heartbeat_timeout,
                )?)?
                .rebalance_interval(parse_duration(
                    "REBALANCE_INTERVAL",
                    &args.rebalance_interval,
                )?)?
                .max_consecutive_failures(args.max_consecutive_failures)?
                .partitions_from_spec(&args.projection_partitions)?;
            return runner.run_workers_until(worker, shutdown).await;
        }
        if args.once {
            return tokio::select! {
                r = run_once_with_progress(store, runner, args.partition_key) => r,
                _ = shutdown => Err(Error::new(
                    crate::error::Kind::Other,
                    "interrupted: batches in flight were rolled back; run again to finish",
                )),
            };
        }
        runner.run_until(shutdown).await
    }
}

/// What `--once` has to do: the lag of every slot this process runs (the
/// log head for a projection version without checkpoints yet).
async fn remaining_for(
    store: &EventStore,
    projections: &[Registered],
    partition: Option<i32>,
) -> Result<u64> {
    let slots = crate::admin::status(store, projections).await?;
    let (head, _) = store.head().await?;
    let mut total: u64 = 0;
    for p in projections {
        let mine: Vec<_> = slots
            .iter()
            .filter(|s| s.projection == p.key() && partition.is_none_or(|k| s.partition == k))
            .collect();
        total += if mine.is_empty() {
            head.max(0) as u64
        } else {
            mine.iter().map(|s| s.lag_events.max(0) as u64).sum()
        };
    }
    Ok(total)
}

async fn run_once_with_progress(
    store: &EventStore,
    runner: &Runner,
    partition: Option<i32>,
) -> Result<()> {
    let progress = runner.progress();
    let bar = if std::io::stderr().is_terminal() {
        // The bar runs to the events remaining (status's estimate), with
        // the rate and an ETA, like `status` shows for a rebuilding version.
        let remaining = remaining_for(store, runner.projections(), partition).await?;
        let bar = indicatif::ProgressBar::new(remaining.max(1));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {wide_bar} {human_pos}/~{human_len} events ({per_sec}, eta {eta}) {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        Some(bar)
    } else {
        None
    };
    let ticker = bar.clone().map(|bar| {
        let progress = progress.clone();
        tokio::spawn(async move {
            loop {
                bar.set_position(progress.events_handled());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let result = runner.run_once().await;
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = bar {
        bar.set_position(progress.events_handled());
        bar.finish();
    }
    result?;
    outln!(
        "caught up: {} events handled in {} batches",
        progress.events_handled(),
        progress.batches()
    );
    Ok(())
}

/// Asks `question` on a terminal; without one, refuses with a message
/// asking for `--yes`.
fn confirm(question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        return Err(Error::config(format!(
            "{question} This needs confirmation and stdin is not a terminal: pass --yes to confirm"
        )));
    }
    let _ = write!(std::io::stderr(), "{question} [y/N] ");
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .map_err(|e| Error::config(format!("cannot read the answer: {e}")))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

/// Installs SIGTERM/SIGINT handlers at once (call it inside the runtime,
/// before starting work) and returns a future that completes on the first
/// signal; a second one exits the process at once (code 130).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move { wait_for_signals(handlers).await }
}

async fn wait_for_signals(
    handlers: (
        std::io::Result<tokio::signal::unix::Signal>,
        std::io::Result<tokio::signal::unix::Signal>,
    ),
) {
    let (mut term, mut int) = match handlers {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutdown requested; a second SIGTERM/SIGINT exits at once");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = writeln!(
            std::io::stderr(),
            "second signal: exiting without waiting for in-flight batches (they roll back)"
        );
        std::process::exit(130);
    });
}

fn print_workers_table(workers: &[crate::admin::WorkerStatus]) -> Result<()> {
    if workers.is_empty() {
        return Ok(());
    }
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header([
        "worker",
        "host",
        "pid",
        "heartbeat age (s)",
        "leader",
        "slots",
    ]);
    for w in workers {
        table.add_row([
            w.worker_id.clone(),
            w.hostname.clone(),
            w.pid.to_string(),
            format!("{:.1}", w.heartbeat_age_seconds),
            if w.is_leader {
                "yes".into()
            } else {
                String::new()
            },
            w.slots.to_string(),
        ]);
    }
    outln!("{table}");
    Ok(())
}

/// `eta_seconds` as `45s`, `12m05s`, `3h20m`.
fn format_eta(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn print_status_table(rows: &[crate::admin::SlotStatus]) -> Result<()> {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header([
        "projection",
        "version",
        "partition",
        "position",
        "lag (events)",
        "lag (s)",
        "rate (ev/s)",
        "eta",
        "state",
        "worker",
        "last error",
        "updated at",
    ]);
    for r in rows {
        table.add_row([
            r.name.clone(),
            match &r.version_state {
                Some(state) => format!("{} ({state})", r.version),
                None => r.version.to_string(),
            },
            format!("{}/{}", r.partition, r.total_partitions),
            r.cursor_position
                .map(|p| p.to_string())
                .unwrap_or_else(|| format!("watermark (tx {})", r.cursor_transaction_id)),
            lag_cell(r),
            format!(
                "{}{:.1}",
                if r.lag_exact || r.lag_capped { "" } else { "~" },
                r.lag_seconds
            ),
            r.rate.map(|v| format!("{v:.0}")).unwrap_or_default(),
            r.eta_seconds.map(format_eta).unwrap_or_default(),
            match (r.registered, r.skipped_events) {
                (false, _) => format!("{} (not in this binary)", r.state),
                (true, 0) => r.state.clone(),
                (true, n) => format!("{} ({n} SKIPPED)", r.state),
            },
            match (&r.worker_id, &r.stale_worker_id) {
                (Some(w), _) => w.clone(),
                (None, Some(w)) => format!("{w} (stale)"),
                (None, None) => String::new(),
            },
            r.last_error.clone().unwrap_or_default(),
            r.updated_at.clone(),
        ]);
    }
    if rows.is_empty() {
        outln!("no checkpoints yet: run `run-projections` first");
        return Ok(());
    }
    outln!("{table}");
    if rows.iter().any(|r| !r.lag_exact && !r.lag_capped) {
        outln!(
            "~ estimated: the first {} events after each cursor are counted, the rest extrapolated from \
             global positions; `status --exact` counts",
            crate::admin::LAG_SAMPLE_EVENTS
        );
    }
    if rows.iter().any(|r| r.lag_capped) {
        outln!("> the exact count stopped at --exact-limit (STATUS_EXACT_LIMIT)");
    }
    for r in rows.iter().filter(|r| r.skipped_events > 0) {
        outln!(
            "SKIPPED: projection {} partition {} has {} event(s) below its cursor that it never handled (written \
             after the cursor passed them: transaction ids reused after lost commits). Fix: with its processes \
             running, UPDATE projection_checkpoints SET epoch = NULL WHERE projection_name = '{}' — the engine \
             then moves the cursor back to the last handled event within seconds; or `reset {} --yes`",
            r.projection, r.partition, r.skipped_events, r.projection, r.projection
        );
    }
    if rows.iter().any(|r| !r.registered) {
        outln!(
            "not in this binary: no projection of that name is registered here, so nothing started from \
             this binary runs it and its lag ignores its filter; `reset NAME` from a binary that has it \
             removes it"
        );
    }
    if rows.iter().any(|r| r.stale_worker_id.is_some()) {
        outln!(
            "stale: assigned to a worker without a heartbeat for HEARTBEAT_TIMEOUT; no worker runs the slot \
             (a static-mode process may)"
        );
    }
    Ok(())
}

/// The lag column: exact, `~` estimated, or `>` over the exact limit.
fn lag_cell(r: &crate::admin::SlotStatus) -> String {
    if r.lag_capped {
        format!(">{}", r.lag_events)
    } else if r.lag_exact {
        r.lag_events.to_string()
    } else {
        format!("~{}", r.lag_events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statefulset_ordinals() {
        assert_eq!(ordinal_from_hostname("projections-3"), Some(3));
        assert_eq!(ordinal_from_hostname("bank-worker-12\n"), Some(12));
        assert_eq!(ordinal_from_hostname("laptop"), None);
        assert_eq!(ordinal_from_hostname("web-abc"), None);
        assert_eq!(ordinal_from_hostname("web-"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("POLL_INTERVAL", "200ms").unwrap(),
            Duration::from_millis(200)
        );
        assert_eq!(
            parse_duration("POLL_INTERVAL", "5s").unwrap(),
            Duration::from_secs(5)
        );
        let e = parse_duration("POLL_INTERVAL", "soon").unwrap_err();
        assert!(e.is_config() && e.to_string().contains("POLL_INTERVAL"));
    }
}
