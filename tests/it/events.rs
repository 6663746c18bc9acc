//! Evolving events: typed events, upcasters on every read path, unknown
//! events from a newer release, validation at append, and unit tests of
//! handlers and upcasters without a server.

use crate::cli::{assert_read_model_exact, run, text};
use crate::common::{env, wait_until, Env};
use projectionist::{
    dead_letter, Concurrency, EventStore, ExpectedVersion, FailurePolicy, Filter, Metadata,
    NewEvent, Registered, Registry, Runner, RunnerConfig, StoredEvent, UnknownEvents,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The bank example's event definitions and registry, as the bank binary
/// uses them.
#[allow(dead_code)]
#[path = "../../examples/bank/events.rs"]
mod bank_events;

use bank_events::{BankEvent, MoneyDeposited, MoneyWithdrawn};

/// How a [`Balances`] projection runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Sequential,
    Pipelined,
    Concurrent,
}

/// `balance` and `n` per account in a table of its own, decoding each
/// event as a [`BankEvent`]: it only knows the current shapes. Receives
/// deposits and withdrawals only (a filter with current type names).
struct Balances {
    name: String,
    mode: Mode,
    pool: projectionist::Pool,
    /// Fail (and so dead-letter) events of streams starting `old-` while set.
    fail_old: Arc<AtomicBool>,
    policy: FailurePolicy,
}

impl Balances {
    async fn new(env: &Env, name: &str, mode: Mode) -> Arc<Balances> {
        env.client()
            .await
            .batch_execute(&format!(
                "CREATE TABLE {name} (account_id text PRIMARY KEY, balance bigint NOT NULL, n bigint NOT NULL)"
            ))
            .await
            .unwrap();
        Arc::new(Balances {
            name: name.to_owned(),
            mode,
            pool: env.store.pool().clone(),
            fail_old: Arc::new(AtomicBool::new(false)),
            policy: FailurePolicy::stop(),
        })
    }

    /// Registered through the trait its mode asks for.
    fn registered(self: &Arc<Self>) -> Registered {
        if self.mode == Mode::Concurrent {
            Registered::concurrent(self.clone()).unwrap()
        } else {
            Registered::new(self.clone()).unwrap()
        }
    }

    fn upsert(&self) -> String {
        format!(
            "INSERT INTO {t} (account_id, balance, n) VALUES ($1, $2, 1) ON CONFLICT (account_id) \
             DO UPDATE SET balance = {t}.balance + excluded.balance, n = {t}.n + 1",
            t = self.name
        )
    }

    fn delta(&self, event: &StoredEvent) -> projectionist::Result<i64> {
        if self.fail_old.load(Ordering::SeqCst) && event.aggregate_id.starts_with("old-") {
            return Err(projectionist::Error::handler_msg("old streams are failing"));
        }
        Ok(match event.typed::<BankEvent>()? {
            BankEvent::Deposited(d) => d.cents,
            BankEvent::Withdrawn(w) => -w.cents,
            BankEvent::Opened(_) => 0,
        })
    }
}

#[projectionist::async_trait]
impl projectionist::Projection for Balances {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new(&self.name)
            .filter(Filter::all().event_types(["MoneyDeposited", "MoneyWithdrawn"]))
            .failure_policy(self.policy)
            .pipelined(self.mode == Mode::Pipelined)
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        tx: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        let delta = self.delta(event)?;
        let stmt = tx.prepare_cached(&self.upsert()).await?;
        tx.execute(&stmt, &[&event.aggregate_id, &delta]).await?;
        Ok(())
    }
}

#[projectionist::async_trait]
impl projectionist::ConcurrentProjection for Balances {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new(&self.name)
            .filter(Filter::all().event_types(["MoneyDeposited", "MoneyWithdrawn"]))
            .failure_policy(self.policy)
    }

    fn concurrency(&self) -> projectionist::Concurrency {
        Concurrency::new(8)
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        _scope: &projectionist::Scope,
    ) -> projectionist::Result<()> {
        let delta = self.delta(event)?;
        let client = self.pool.get().await?;
        client
            .execute(&self.upsert(), &[&event.aggregate_id, &delta])
            .await?;
        Ok(())
    }
}

/// The amounts of account `i`'s history: (kind, cents), kind 0 a
/// deposit, 1 a withdrawal, 2 a deposit under the old name.
fn history(i: i64) -> Vec<(u8, i64)> {
    vec![
        (0, 1000 + i),
        (2, 250 + i),
        (1, 300),
        (0, 40 * i + 7),
        (2, 5),
        (1, 11 + i),
    ]
}

const ACCOUNTS: i64 = 6;

/// Appends every account's history twice: `new-i` through the store in the
/// current shape (typed, version 2), and `old-i` with raw SQL in every old
/// shape — version 1 `{"amount"}`, the old name `FundsDeposited` — mixed
/// with version 2 in each stream, all old streams in one transaction (so
/// one batch holds every shape).
async fn seed_both_shapes(env: &Env, store: &EventStore) {
    for i in 0..ACCOUNTS {
        let events: Vec<NewEvent> = history(i)
            .into_iter()
            .map(|(kind, cents)| {
                let currency = "EUR".to_owned();
                NewEvent::typed(&match kind {
                    1 => BankEvent::Withdrawn(MoneyWithdrawn { cents, currency }),
                    _ => BankEvent::Deposited(MoneyDeposited { cents, currency }),
                })
                .unwrap()
            })
            .collect();
        store
            .append(
                "Account",
                &format!("new-{i}"),
                ExpectedVersion::NoStream,
                &events,
            )
            .await
            .unwrap();
    }
    let mut rows = Vec::new();
    for i in 0..ACCOUNTS {
        for (n, (kind, cents)) in history(i).into_iter().enumerate() {
            // Alternate old and current shapes inside each stream.
            let (event_type, version, payload) = match (kind, n % 2) {
                (2, _) => ("FundsDeposited", 1, json!({ "amount": cents })),
                (0, 0) => ("MoneyDeposited", 1, json!({ "amount": cents })),
                (1, 0) => ("MoneyWithdrawn", 1, json!({ "amount": cents })),
                (0, _) => (
                    "MoneyDeposited",
                    2,
                    json!({ "cents": cents, "currency": "EUR" }),
                ),
                _ => (
                    "MoneyWithdrawn",
                    2,
                    json!({ "cents": cents, "currency": "EUR" }),
                ),
            };
            rows.push(format!(
                "('Account', 'old-{i}', {}, '{event_type}', {version}, '{payload}')",
                n + 1
            ));
        }
    }
    env.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, event_version, payload) \
             VALUES {}",
            rows.join(", ")
        ))
        .await
        .unwrap();
}

/// `(balance, n)` per account of a [`Balances`] table.
async fn balances(env: &Env, table: &str) -> BTreeMap<String, (i64, i64)> {
    env.client()
        .await
        .query(&format!("SELECT account_id, balance, n FROM {table}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// Every `old-i` row equals its `new-i` twin, and the twins are what the
/// history says.
fn assert_twins(table: &str, got: &BTreeMap<String, (i64, i64)>) {
    for i in 0..ACCOUNTS {
        let want: i64 = history(i)
            .iter()
            .map(|(k, c)| if *k == 1 { -c } else { *c })
            .sum();
        let n = history(i).len() as i64;
        assert_eq!(
            got.get(&format!("new-{i}")),
            Some(&(want, n)),
            "{table}: new-{i} in the current shape: {got:?}"
        );
        assert_eq!(
            got.get(&format!("old-{i}")),
            Some(&(want, n)),
            "{table}: old-{i} in the old shapes must project like new-{i}: {got:?}"
        );
    }
}

fn bank_store(env: &Env) -> EventStore {
    env.store
        .clone()
        .with_registry(bank_events::registry())
        .expect("the bank registry is consistent")
}

#[tokio::test]
async fn old_shapes_project_like_current_ones_in_every_mode() {
    let env = env().await;
    let store = bank_store(&env);
    seed_both_shapes(&env, &store).await;
    let total = (ACCOUNTS * history(0).len() as i64 * 2) as usize;
    let mut projections: Vec<Registered> = Vec::new();
    for (name, mode) in [
        ("seq_balances", Mode::Sequential),
        ("pipe_balances", Mode::Pipelined),
        ("conc_balances", Mode::Concurrent),
    ] {
        projections.push(Balances::new(&env, name, mode).await.registered());
    }
    let runner = Runner::new(store.clone(), RunnerConfig::default())
        .with_projections(&projections)
        .unwrap();
    let tables = ["seq_balances", "pipe_balances", "conc_balances"];
    wait_until(Duration::from_secs(30), "every event projected", || async {
        runner.run_once().await.unwrap();
        let mut all = true;
        for t in tables {
            let n: i64 = balances(&env, t).await.values().map(|(_, n)| n).sum();
            all &= n as usize == total;
        }
        all
    })
    .await;
    for t in tables {
        assert_twins(t, &balances(&env, t).await);
    }

    // Stream reads upcast too: the old stream reads as the new one does.
    let read = |id: &'static str| {
        let store = store.clone();
        async move {
            store
                .read_stream("Account", id, 1, 100)
                .await
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e.event_type.clone(),
                        e.event_version,
                        e.typed::<BankEvent>().unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(read("old-3").await, read("new-3").await);
    // Without the registry the stored shapes are read as they are.
    let raw = env
        .store
        .read_stream("Account", "old-3", 1, 100)
        .await
        .unwrap();
    assert_eq!(
        (raw[0].event_type.as_str(), raw[0].event_version),
        ("MoneyDeposited", 1)
    );
    assert_eq!(raw[1].event_type, "FundsDeposited");
}

#[tokio::test]
async fn dlq_retry_and_show_upcast_old_shapes() {
    let env = env().await;
    let store = bank_store(&env);
    seed_both_shapes(&env, &store).await;
    let mut projection = Balances::new(&env, "dl_balances", Mode::Sequential).await;
    Arc::get_mut(&mut projection).unwrap().policy = FailurePolicy::dead_letter()
        .attempts(1)
        .backoff(Duration::from_millis(1), Duration::from_millis(2));
    projection.fail_old.store(true, Ordering::SeqCst);
    let runner = Runner::new(store.clone(), RunnerConfig::default())
        .with_projection(projection.clone())
        .unwrap();
    let per_account = history(0).len();
    let old_events = ACCOUNTS as usize * per_account;
    wait_until(
        Duration::from_secs(30),
        "old events dead-lettered",
        || async {
            runner.run_once().await.unwrap();
            dead_letter::list(&store, Some("dl_balances"))
                .await
                .unwrap()
                .len()
                == old_events
        },
    )
    .await;
    let letters = dead_letter::list(&store, Some("dl_balances"))
        .await
        .unwrap();
    // `dlq show` (and the dead letter) show the handler's view: an event
    // stored as FundsDeposited v1 as MoneyDeposited v2.
    let stored_as_old_name = env
        .scalar_i64("SELECT min(global_position) FROM events WHERE event_type = 'FundsDeposited'")
        .await;
    let renamed = letters
        .iter()
        .find(|d| d.global_position == stored_as_old_name)
        .expect("the FundsDeposited event is dead-lettered");
    assert_eq!(renamed.event_type, "MoneyDeposited");
    let (_, shown) = dead_letter::show(&store, renamed.id).await.unwrap();
    let shown = shown.expect("the event");
    assert_eq!(
        (shown.event_type.as_str(), shown.event_version),
        ("MoneyDeposited", 2)
    );
    assert!(matches!(
        shown.typed::<BankEvent>().unwrap(),
        BankEvent::Deposited(MoneyDeposited { currency, .. }) if currency == "EUR"
    ));
    // Retried once fixed: the old shapes reach the handler upcast.
    projection.fail_old.store(false, Ordering::SeqCst);
    let projections = vec![projection.registered()];
    for d in &letters {
        let r = dead_letter::retry(&store, &projections, d.id)
            .await
            .unwrap();
        assert!(r.succeeded, "{r:?}");
    }
    assert!(dead_letter::list(&store, None).await.unwrap().is_empty());
    assert_twins("dl_balances", &balances(&env, "dl_balances").await);
}

/// Reads `cents` from any payload: the "newer binary" of the unknown-event
/// test knows version 3 without a typed enum.
struct Cents {
    name: String,
    unknown: UnknownEvents,
    concurrent: Option<projectionist::Pool>,
}

impl Cents {
    async fn new(env: &Env, name: &str, unknown: UnknownEvents, concurrent: bool) -> Arc<Cents> {
        env.client()
            .await
            .batch_execute(&format!(
                "CREATE TABLE {name} (global_position bigint PRIMARY KEY, cents bigint NOT NULL)"
            ))
            .await
            .unwrap();
        Arc::new(Cents {
            name: name.to_owned(),
            unknown,
            concurrent: concurrent.then(|| env.store.pool().clone()),
        })
    }

    /// Registered through the trait its mode asks for.
    fn registered(self: &Arc<Self>) -> Registered {
        if self.concurrent.is_some() {
            Registered::concurrent(self.clone()).unwrap()
        } else {
            Registered::new(self.clone()).unwrap()
        }
    }

    fn insert(&self) -> String {
        format!(
            "INSERT INTO {} (global_position, cents) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            self.name
        )
    }

    fn cents(event: &StoredEvent) -> projectionist::Result<i64> {
        let p = event.payload_value()?;
        p.get("cents").and_then(|c| c.as_i64()).ok_or_else(|| {
            projectionist::Error::handler_msg(format!("no cents in {}", event.payload_json()))
        })
    }
}

#[projectionist::async_trait]
impl projectionist::Projection for Cents {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new(&self.name)
            .failure_policy(FailurePolicy::dead_letter().attempts(1))
            .unknown_events(self.unknown)
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        tx: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        tx.execute(
            &self.insert(),
            &[&event.global_position, &Self::cents(event)?],
        )
        .await?;
        Ok(())
    }
}

#[projectionist::async_trait]
impl projectionist::ConcurrentProjection for Cents {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new(&self.name)
            .failure_policy(FailurePolicy::dead_letter().attempts(1))
            .unknown_events(self.unknown)
    }

    fn concurrency(&self) -> projectionist::Concurrency {
        (self.concurrent.as_ref().map(|_| Concurrency::new(4))).unwrap_or_default()
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        _scope: &projectionist::Scope,
    ) -> projectionist::Result<()> {
        let pool = self.concurrent.as_ref().expect("concurrency mode");
        pool.get()
            .await?
            .execute(
                &self.insert(),
                &[&event.global_position, &Self::cents(event)?],
            )
            .await?;
        Ok(())
    }
}

/// A newer release's registry: `MoneyDeposited` version 3 adds a `memo`.
fn newer_registry() -> Registry {
    Registry::new()
        .event_type::<serde_json::Value>("AccountOpened", 1)
        .event_type::<serde_json::Value>("MoneyDeposited", 3)
        .event_type::<serde_json::Value>("MoneyWithdrawn", 2)
        .upcaster("MoneyDeposited", 1, bank_events::amount_to_cents)
        .upcaster("MoneyDeposited", 2, |mut v2| {
            v2["memo"] = json!("");
            Ok(v2)
        })
        .upcaster("MoneyWithdrawn", 1, bank_events::amount_to_cents)
        .rename("FundsDeposited", 1, "MoneyDeposited")
}

async fn deposit(store: &EventStore, stream: &str, cents: i64) {
    let e = NewEvent::typed(&BankEvent::Deposited(MoneyDeposited {
        cents,
        currency: "EUR".into(),
    }))
    .unwrap();
    store
        .append("Account", stream, ExpectedVersion::Any, &[e])
        .await
        .unwrap();
}

async fn positions(env: &Env, table: &str) -> Vec<i64> {
    env.client()
        .await
        .query(
            &format!("SELECT global_position FROM {table} ORDER BY 1"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn an_event_from_a_newer_release_stops_the_slot_until_a_newer_binary_resumes() {
    let env = env().await;
    let store = bank_store(&env);
    for cents in [1, 2, 3] {
        deposit(&store, "a", cents).await;
    }
    // A newer release wrote MoneyDeposited version 3.
    let future: i64 = env
        .client()
        .await
        .query_one(
            "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, event_version, payload) \
             VALUES ('Account', 'a', 4, 'MoneyDeposited', 3, '{\"cents\": 4, \"currency\": \"EUR\", \"memo\": \"x\"}') \
             RETURNING global_position",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for cents in [5, 6] {
        deposit(&store, "a", cents).await;
        deposit(&store, "b", cents).await;
    }
    let before: Vec<i64> = positions_below(&env, future).await;
    let sequential = Cents::new(&env, "seq_cents", UnknownEvents::default(), false).await;
    let concurrent = Cents::new(&env, "conc_cents", UnknownEvents::default(), true).await;
    let ignoring = Cents::new(&env, "lax_cents", UnknownEvents::Ignore, false).await;
    let old = vec![
        sequential.registered(),
        concurrent.registered(),
        ignoring.registered(),
    ];
    let runner = Runner::new(store.clone(), RunnerConfig::default())
        .with_projections(&old)
        .unwrap();
    // Both stopping projections stop at the event, whatever their
    // dead-letter policy; the ignoring one passes over it.
    wait_until(Duration::from_secs(30), "both slots failed", || async {
        let _ = runner.run_once().await;
        let s = projectionist::status(&store, &old).await.unwrap();
        s.iter().filter(|s| s.state == "failed").count() == 2
            && positions(&env, "lax_cents").await.len() == 7
    })
    .await;
    let c = env.client().await;
    for name in ["seq_cents", "conc_cents"] {
        let row = c
            .query_one(
                "SELECT status, failed_position, last_error, last_global_position \
                 FROM projection_checkpoints WHERE projection_name = $1",
                &[&name],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "failed", "{name}");
        assert_eq!(row.get::<_, Option<i64>>(1), Some(future), "{name}");
        let error: String = row.get(2);
        for needle in [
            "MoneyDeposited version 3".to_owned(),
            format!("global position {future}"),
            "deploy the newer binary".to_owned(),
            format!("resume {name}"),
        ] {
            assert!(error.contains(&needle), "{name}: {needle:?} not in {error}");
        }
        // The checkpoint stays before it; nothing after it was handled.
        assert!(row.get::<_, i64>(3) < future, "{name}");
        assert_eq!(positions(&env, name).await, before, "{name}");
    }
    assert!(dead_letter::list(&store, None).await.unwrap().is_empty());
    let lax = positions(&env, "lax_cents").await;
    assert!(!lax.contains(&future) && lax.len() == 7, "{lax:?}");

    // The newer binary: its registry knows version 3. Still failed until
    // `resume`; then the event and everything after it are handled.
    let newer = env.store.clone().with_registry(newer_registry()).unwrap();
    let upgraded = vec![sequential.registered(), concurrent.registered()];
    let runner = Runner::new(newer.clone(), RunnerConfig::default())
        .with_projections(&upgraded)
        .unwrap();
    let e = runner.run_once().await.unwrap_err();
    assert!(e.is_failed(), "{e}");
    for name in ["seq_cents", "conc_cents"] {
        assert_eq!(dead_letter::resume(&newer, name, None).await.unwrap(), 1);
    }
    wait_until(
        Duration::from_secs(30),
        "every event after resume",
        || async {
            runner.run_once().await.unwrap();
            positions(&env, "seq_cents").await.len() == 8
                && positions(&env, "conc_cents").await.len() == 8
        },
    )
    .await;
    assert!(positions(&env, "seq_cents").await.contains(&future));
    let s = projectionist::status(&newer, &upgraded).await.unwrap();
    assert!(s.iter().all(|s| s.state == "running"), "{s:?}");
}

async fn positions_below(env: &Env, position: i64) -> Vec<i64> {
    env.client()
        .await
        .query(
            "SELECT global_position FROM events WHERE global_position < $1 ORDER BY 1",
            &[&position],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn projections_of_registered_types_only_stop_at_an_unregistered_type() {
    let env = env().await;
    let store = bank_store(&env);
    deposit(&store, "a", 1).await;
    env.client()
        .await
        .batch_execute(
            "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
             VALUES ('Account', 'a', 2, 'AccountFrozen', '{\"cents\": 0}')",
        )
        .await
        .unwrap();
    deposit(&store, "a", 3).await;
    let strict = Cents::new(
        &env,
        "strict_cents",
        UnknownEvents::StopOnUnknownType,
        false,
    )
    .await;
    let default = Cents::new(&env, "default_cents", UnknownEvents::default(), false).await;
    let projections = vec![strict.registered(), default.registered()];
    let runner = Runner::new(store.clone(), RunnerConfig::default())
        .with_projections(&projections)
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the strict slot failed",
        || async {
            let _ = runner.run_once().await;
            positions(&env, "default_cents").await.len() == 3
                && env
                    .scalar_i64(
                        "SELECT count(*) FROM projection_checkpoints WHERE status = 'failed'",
                    )
                    .await
                    == 1
        },
    )
    .await;
    assert_eq!(positions(&env, "strict_cents").await.len(), 1);
    let error: String = env
        .client()
        .await
        .query_one(
            "SELECT last_error FROM projection_checkpoints WHERE projection_name = 'strict_cents' AND status = 'failed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        error.contains("AccountFrozen") && error.contains("does not know"),
        "{error}"
    );
}

#[tokio::test]
async fn appends_through_a_registry_are_validated_and_nothing_is_written() {
    let env = env().await;
    let store = bank_store(&env);
    let unregistered = NewEvent::new("MoneyBurned", &json!({ "cents": 1 })).unwrap();
    let e = store
        .append("Account", "a", ExpectedVersion::Any, &[unregistered])
        .await
        .unwrap_err();
    assert!(e.is_config(), "{e}");
    assert!(
        e.to_string().contains("MoneyBurned") && e.to_string().contains("register it"),
        "{e}"
    );
    let old_shape = NewEvent::new("MoneyDeposited", &json!({ "amount": 1 }))
        .unwrap()
        .with_event_version(2);
    let good = NewEvent::typed(&BankEvent::Deposited(MoneyDeposited {
        cents: 1,
        currency: "EUR".into(),
    }))
    .unwrap();
    // One bad event refuses the whole append.
    let e = store
        .append(
            "Account",
            "a",
            ExpectedVersion::Any,
            &[good.clone(), old_shape],
        )
        .await
        .unwrap_err();
    assert!(e.is_payload(), "{e}");
    assert!(
        e.to_string().contains("does not decode") && e.to_string().contains("cents"),
        "{e}"
    );
    let stale = NewEvent::new("MoneyDeposited", &json!({ "amount": 1 })).unwrap();
    let e = store
        .append("Account", "a", ExpectedVersion::Any, &[stale])
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("current version of MoneyDeposited is 2"),
        "{e}"
    );
    assert_eq!(env.scalar_i64("SELECT count(*) FROM events").await, 0);
    store
        .append("Account", "a", ExpectedVersion::NoStream, &[good])
        .await
        .unwrap();
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM events WHERE event_version = 2")
            .await,
        1
    );
}

/// Handlers and upcasters tested as plain functions: no server.
#[test]
fn typed_events_and_upcasters_without_a_server() {
    let registry = bank_events::registry();
    registry.check().unwrap();
    let metadata = Metadata::new()
        .with_correlation_id("c-1")
        .with_field("user", json!("ann"));
    // The old name at version 1, as a raw-SQL writer stored it.
    let mut old = StoredEvent::from_new(
        &NewEvent::new("FundsDeposited", &json!({ "amount": 250 }))
            .unwrap()
            .with_metadata(&metadata),
        "Account",
        "acct-1",
        3,
    )
    .with_position(42, 7);
    registry.upcast(&mut old).unwrap();
    assert_eq!(
        old.typed::<BankEvent>().unwrap(),
        BankEvent::Deposited(MoneyDeposited {
            cents: 250,
            currency: "EUR".into()
        })
    );
    assert_eq!(old.global_position, 42);
    assert_eq!(old.metadata().unwrap(), metadata);
    // A version this binary does not know: typed decoding says so.
    let newer = StoredEvent::from_new(
        &NewEvent::new("MoneyDeposited", &json!({ "cents": 1 }))
            .unwrap()
            .with_event_version(3),
        "Account",
        "acct-1",
        4,
    );
    let e = newer.typed::<BankEvent>().unwrap_err().to_string();
    assert!(e.contains("newer") && e.contains("deploy"), "{e}");
    // A type the enum does not declare: try_typed passes it over.
    let other = StoredEvent::from_new(
        &NewEvent::new("AccountFrozen", &json!({})).unwrap(),
        "Account",
        "acct-1",
        5,
    );
    assert!(other.try_typed::<BankEvent>().unwrap().is_none());
    assert!(other.typed::<BankEvent>().is_err());
    // A broken old payload: the upcaster's error names the event.
    let mut broken = StoredEvent::from_new(
        &NewEvent::new("MoneyWithdrawn", &json!({ "amt": 1 })).unwrap(),
        "Account",
        "acct-1",
        6,
    );
    let e = registry.upcast(&mut broken).unwrap_err().to_string();
    assert!(
        e.contains("MoneyWithdrawn version 1") && e.contains("\"amount\""),
        "{e}"
    );
}

/// The bank binary projects every old shape, and `simulate` writes
/// version 2.
#[tokio::test]
async fn bank_projects_old_shapes_and_simulate_writes_version_2() {
    let db = projectionist::testing::TestDatabase::create()
        .await
        .unwrap();
    let o = run(&db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(
        &db,
        &[
            "simulate",
            "--accounts",
            "3",
            "--events",
            "60",
            "--writers",
            "1",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let c = db.connect().await.unwrap();
    let versions: Vec<(String, i32)> = c
        .query(
            "SELECT DISTINCT event_type, event_version FROM events ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (t, v) in &versions {
        let want = if t == "AccountOpened" { 1 } else { 2 };
        assert_eq!(*v, want, "simulate wrote {t} version {v}: {versions:?}");
    }
    // Old shapes appended by raw SQL (another service, an old release):
    // onto the simulated accounts and a fresh one.
    c.batch_execute(
        "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, event_version, payload) \
         SELECT 'Account', 'acct-0', (SELECT max(aggregate_version) FROM events WHERE aggregate_id = 'acct-0') + g, \
                CASE g WHEN 1 THEN 'FundsDeposited' ELSE 'MoneyDeposited' END, 1, jsonb_build_object('amount', 100 * g) \
         FROM generate_series(1, 3) g; \
         INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) VALUES \
           ('Account', 'legacy', 1, 'AccountOpened', '{\"owner\": \"lee\"}'), \
           ('Account', 'legacy', 2, 'FundsDeposited', '{\"amount\": 900}'), \
           ('Account', 'legacy', 3, 'MoneyWithdrawn', '{\"amount\": 400}')",
    )
    .await
    .unwrap();
    wait_until(Duration::from_secs(30), "every event projected", || async {
        let o = run(&db, &["run-projections", "--once"], &[]);
        assert!(o.status.success(), "{}", text(&o));
        let r = c
            .query_one(
                "SELECT (SELECT count(*) FROM events WHERE aggregate_type = 'Account') \
                      = (SELECT coalesce(sum(event_count), 0) FROM account_balances)",
                &[],
            )
            .await
            .unwrap();
        r.get::<_, bool>(0)
    })
    .await;
    // The helper sums coalesce(cents, amount), renames included by
    // counting FundsDeposited as a deposit.
    c.batch_execute(
        "UPDATE events SET event_type = 'MoneyDeposited' WHERE event_type = 'FundsDeposited'",
    )
    .await
    .unwrap();
    assert_read_model_exact(&db).await;
    let legacy: i64 = c
        .query_one(
            "SELECT balance FROM account_balances WHERE account_id = 'legacy'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(legacy, 500);
}

/// `status` with a registry: events passed over (`Ignore`) are not
/// "skipped", and a filter's lag counts events stored under old names.
#[tokio::test]
async fn status_counts_passed_over_and_renamed_events_right() {
    let env = env().await;
    let store = bank_store(&env);
    deposit(&store, "a", 1).await;
    let renamed = Balances::new(&env, "renamed_balances", Mode::Sequential).await;
    let ignoring_seq = Cents::new(&env, "lax_seq", UnknownEvents::Ignore, false).await;
    let ignoring_conc = Cents::new(&env, "lax_conc", UnknownEvents::Ignore, true).await;
    let projections = vec![
        renamed.registered(),
        ignoring_seq.registered(),
        ignoring_conc.registered(),
    ];
    let runner = Runner::new(store.clone(), RunnerConfig::default())
        .with_projections(&projections)
        .unwrap();
    wait_until(Duration::from_secs(30), "the first deposit", || async {
        runner.run_once().await.unwrap();
        balances(&env, "renamed_balances").await.len() == 1
            && positions(&env, "lax_seq").await.len() == 1
            && positions(&env, "lax_conc").await.len() == 1
    })
    .await;
    // An old-name deposit and, last, a type this registry does not know.
    env.client()
        .await
        .batch_execute(
            "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
             VALUES ('Account', 'a', 2, 'FundsDeposited', '{\"amount\": 2}')",
        )
        .await
        .unwrap();
    env.client()
        .await
        .batch_execute(
            "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
             VALUES ('Account', 'a', 3, 'AccountFrozen', '{}')",
        )
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the lag of the old name",
        || async {
            let s = projectionist::status(&store, &projections).await.unwrap();
            s.iter()
                .any(|s| s.projection == "renamed_balances" && s.lag_events == 1)
        },
    )
    .await;
    wait_until(
        Duration::from_secs(30),
        "every event dealt with",
        || async {
            runner.run_once().await.unwrap();
            let s = projectionist::status(&store, &projections).await.unwrap();
            s.iter().all(|s| s.lag_events == 0)
        },
    )
    .await;
    assert_eq!(positions(&env, "lax_seq").await.len(), 2);
    assert_eq!(positions(&env, "lax_conc").await.len(), 2);
    assert_eq!(balances(&env, "renamed_balances").await["a"], (3, 2));
    let s = projectionist::status(&store, &projections).await.unwrap();
    assert!(
        s.iter()
            .all(|s| s.skipped_events == 0 && s.state == "running"),
        "{s:?}"
    );
}

/// Stores `MoneyDeposited` version 1 without its `amount`: the bank's
/// upcaster fails on it.
async fn broken_v1_deposit(env: &Env, stream: &str) -> i64 {
    env.client()
        .await
        .query_one(
            "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, event_version, payload) \
             VALUES ('Account', $1, (SELECT coalesce(max(aggregate_version), 0) + 1 FROM events WHERE aggregate_id = $1), \
                     'MoneyDeposited', 1, '{\"currency\": \"EUR\"}') \
             RETURNING global_position",
            &[&stream],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn an_event_its_upcaster_fails_on_is_dead_lettered_and_the_rest_are_handled() {
    let env = env().await;
    let store = bank_store(&env);
    // Pages of 3: a broken event heads the third page (position 7) and
    // sits inside the second (position 5), between handled events.
    let mut broken = Vec::new();
    for i in 1..=10 {
        if i == 5 || i == 7 {
            broken.push(broken_v1_deposit(&env, "a").await);
        } else {
            deposit(&store, if i % 2 == 0 { "a" } else { "b" }, i).await;
        }
    }
    let all: Vec<i64> = positions_below(&env, i64::MAX).await;
    let good: Vec<i64> = all
        .iter()
        .copied()
        .filter(|p| !broken.contains(p))
        .collect();
    let sequential = Cents::new(&env, "seq_upcast_cents", UnknownEvents::default(), false).await;
    let concurrent = Cents::new(&env, "conc_upcast_cents", UnknownEvents::default(), true).await;
    let projections = vec![sequential.registered(), concurrent.registered()];
    let runner = Runner::new(
        store.clone(),
        RunnerConfig::default().batch_size(3).unwrap(),
    )
    .with_projections(&projections)
    .unwrap();
    wait_until(
        Duration::from_secs(30),
        "every good event handled",
        || async {
            runner.run_once().await.unwrap();
            positions(&env, "seq_upcast_cents").await == good
                && positions(&env, "conc_upcast_cents").await == good
        },
    )
    .await;
    for name in ["seq_upcast_cents", "conc_upcast_cents"] {
        let letters = dead_letter::list(&store, Some(name)).await.unwrap();
        let at: Vec<i64> = letters.iter().map(|d| d.global_position).collect();
        assert_eq!(at, broken, "{name}");
        for d in &letters {
            assert!(d.error.contains("\"amount\""), "{name}: {}", d.error);
        }
    }
    let s = projectionist::status(&store, &projections).await.unwrap();
    assert!(
        s.iter().all(|s| s.state == "running" && s.lag_events == 0),
        "{s:?}"
    );
    // `read_all` upcasts as well: the events before the first broken one
    // read in their current shape; a read reaching it fails, naming why.
    let ahead = good.iter().filter(|p| **p < broken[0]).count();
    let page = store
        .read_all(projectionist::Cursor::START, ahead as i64)
        .await
        .unwrap();
    assert_eq!(page.events.len(), ahead);
    for e in &page.events {
        e.typed::<BankEvent>()
            .unwrap_or_else(|err| panic!("event {} not upcast: {err}", e.global_position));
    }
    let err = store
        .read_all(projectionist::Cursor::START, 100)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("\"amount\""), "{err}");
}
