//! Failure policies: poison events isolated, dead-lettered or stopping the
//! slot; dead-letter retry; resume.

use crate::cli::{bank, run, text};
use crate::common::{env, wait_until, Env};
use projectionist::{
    dead_letter, ExpectedVersion, FailurePolicy, NewEvent, Registered, Runner, RunnerConfig,
    StoredEvent,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Sums `amount` per aggregate; fails on a non-numeric amount until fixed.
struct Picky {
    name: String,
    policy: FailurePolicy,
    fixed: Arc<AtomicBool>,
}

impl Picky {
    fn new(name: &str, policy: FailurePolicy) -> Picky {
        Picky {
            name: name.to_owned(),
            policy: policy.backoff(Duration::from_millis(5), Duration::from_millis(20)),
            fixed: Arc::new(AtomicBool::new(false)),
        }
    }

    async fn create_table(&self, env: &Env) {
        env.client()
            .await
            .batch_execute(&format!(
                "CREATE TABLE {} (aggregate_id text PRIMARY KEY, n bigint NOT NULL, total bigint NOT NULL)",
                self.name
            ))
            .await
            .unwrap();
    }
}

#[projectionist::async_trait]
impl projectionist::Projection for Picky {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new(&self.name).failure_policy(self.policy)
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        tx: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        let payload = event.payload_value()?;
        let amount = match payload.get("amount") {
            Some(serde_json::Value::Number(n)) => n.as_i64().unwrap_or(0),
            _ if self.fixed.load(Ordering::SeqCst) => 0,
            other => {
                return Err(projectionist::Error::handler_msg(format!(
                    "amount is not a number: {other:?}"
                )))
            }
        };
        tx.execute(
            &format!(
                "INSERT INTO {t} (aggregate_id, n, total) VALUES ($1, 1, $2) \
                 ON CONFLICT (aggregate_id) DO UPDATE SET n = {t}.n + 1, total = {t}.total + excluded.total",
                t = self.name
            ),
            &[&event.aggregate_id, &amount],
        )
        .await?;
        Ok(())
    }
}

fn good(amount: i64) -> NewEvent {
    NewEvent::new("MoneyDeposited", &serde_json::json!({ "amount": amount })).unwrap()
}

/// 10 good events, a raw-SQL poison event, 10 more good events (in one
/// stream, so they share a batch). Returns the poison's position.
async fn seed_with_poison(env: &Env) -> i64 {
    let r = env
        .store
        .append(
            "Account",
            "p",
            ExpectedVersion::NoStream,
            &(1..=10).map(good).collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    let c = env.client().await;
    let poison: i64 = c
        .query_one(
            "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
             VALUES ('Account', 'p', 11, 'MoneyDeposited', '{\"amount\": \"ten\"}') RETURNING global_position",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(poison > r.last_position);
    env.store
        .append(
            "Account",
            "p",
            ExpectedVersion::Exact(11),
            &(11..=20).map(good).collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    poison
}

async fn tally(env: &Env, table: &str) -> (i64, i64) {
    let r = env
        .client()
        .await
        .query_one(
            &format!(
                "SELECT coalesce(sum(n), 0)::int8, coalesce(sum(total), 0)::int8 FROM {table}"
            ),
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

#[tokio::test]
async fn poison_event_is_dead_lettered_and_the_good_ones_around_it_applied() {
    let env = env().await;
    let poison = seed_with_poison(&env).await;
    let picky = Arc::new(Picky::new(
        "dl_model",
        FailurePolicy::dead_letter().attempts(2),
    ));
    picky.create_table(&env).await;
    let runner = Runner::new(env.store.clone(), RunnerConfig::default())
        .with_projection(picky.clone())
        .unwrap();
    let good_sum: i64 = (1..=20).sum();
    wait_until(Duration::from_secs(30), "the 20 good events", || async {
        runner.run_once().await.unwrap();
        tally(&env, "dl_model").await == (20, good_sum)
    })
    .await;

    let letters = dead_letter::list(&env.store, Some("dl_model"))
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "exactly the poison event: {letters:?}");
    assert_eq!(letters[0].global_position, poison);
    assert_eq!(letters[0].attempts, 2);
    assert!(
        letters[0].error.contains("amount is not a number"),
        "{}",
        letters[0].error
    );

    // Retried while the cause persists: it stays, its attempt count raised.
    let projections = vec![Registered::new(picky.clone()).unwrap()];
    let r = dead_letter::retry(&env.store, &projections, letters[0].id)
        .await
        .unwrap();
    assert!(!r.succeeded);
    let after = dead_letter::list(&env.store, None).await.unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].attempts, 3);
    assert_eq!(
        tally(&env, "dl_model").await,
        (20, good_sum),
        "a failed retry changes nothing"
    );

    // Once the handler is fixed, the retry applies it and removes the entry.
    picky.fixed.store(true, Ordering::SeqCst);
    let r = dead_letter::retry(&env.store, &projections, letters[0].id)
        .await
        .unwrap();
    assert!(r.succeeded, "{r:?}");
    assert!(dead_letter::list(&env.store, None)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(tally(&env, "dl_model").await, (21, good_sum));
}

#[tokio::test]
async fn stop_policy_fails_the_slot_others_go_on_and_resume_continues() {
    let env = env().await;
    let poison = seed_with_poison(&env).await;
    let stopper = Arc::new(Picky::new("stop_model", FailurePolicy::stop().attempts(2)));
    stopper.create_table(&env).await;
    let healthy = Arc::new(Picky::new("healthy_model", FailurePolicy::stop()));
    healthy.fixed.store(true, Ordering::SeqCst);
    healthy.create_table(&env).await;
    let runner = Runner::new(
        env.store.clone(),
        RunnerConfig::default()
            .poll_interval(Duration::from_millis(20))
            .unwrap(),
    )
    .with_projection(stopper.clone())
    .unwrap()
    .with_projection(healthy.clone())
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        runner
            .run_until(async {
                let _ = stopped.await;
            })
            .await
    });
    let projections = vec![
        Registered::new(stopper.clone()).unwrap(),
        Registered::new(healthy.clone()).unwrap(),
    ];
    wait_until(Duration::from_secs(30), "stop_model to fail", || async {
        projectionist::status(&env.store, &projections)
            .await
            .unwrap()
            .iter()
            .any(|s| s.projection == "stop_model" && s.state == "failed")
    })
    .await;
    let c = env.client().await;
    let row = c
        .query_one(
            "SELECT failed_position, last_error FROM projection_checkpoints WHERE projection_name = 'stop_model'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<i64>>(0), Some(poison));
    let error: String = row.get(1);
    assert!(
        error.contains("amount is not a number") && error.contains("resume stop_model"),
        "{error}"
    );
    // The good events before the poison were applied; nothing after it.
    assert_eq!(tally(&env, "stop_model").await, (10, (1..=10).sum()));
    // The other projection went on.
    wait_until(
        Duration::from_secs(30),
        "healthy_model complete",
        || async { tally(&env, "healthy_model").await.0 == 21 },
    )
    .await;
    // Fix, resume: the slot continues from the poison event.
    stopper.fixed.store(true, Ordering::SeqCst);
    assert_eq!(
        dead_letter::resume(&env.store, "stop_model", None)
            .await
            .unwrap(),
        1
    );
    wait_until(
        Duration::from_secs(30),
        "stop_model complete after resume",
        || async { tally(&env, "stop_model").await.0 == 21 },
    )
    .await;
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
    let s = projectionist::status(&env.store, &projections)
        .await
        .unwrap();
    assert!(
        s.iter().all(|s| s.state == "running" && s.lag_events == 0),
        "{s:?}"
    );
}

#[tokio::test]
async fn bank_dead_letters_a_raw_sql_poison_deposit() {
    let db = projectionist::testing::TestDatabase::create()
        .await
        .unwrap();
    let o = run(&db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let c = db.connect().await.unwrap();
    c.batch_execute(
        "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) VALUES \
           ('Account', 'a', 1, 'AccountOpened', '{\"owner\": \"ann\"}'), \
           ('Account', 'a', 2, 'MoneyDeposited', '{\"amount\": 500}'), \
           ('Account', 'a', 3, 'MoneyDeposited', '{\"amount\": \"lots\"}'), \
           ('Account', 'a', 4, 'MoneyWithdrawn', '{\"amount\": 200}'), \
           ('Account', 'b', 1, 'MoneyDeposited', '{\"amount\": 7}')",
    )
    .await
    .unwrap();
    let poison: i64 = c
        .query_one(
            "SELECT global_position FROM events WHERE payload->>'amount' = 'lots'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let env = [("LOG_LEVEL", "error")];
    wait_until(Duration::from_secs(30), "the good events applied", || async {
        let o = run(&db, &["run-projections", "--once", "--projection", "account_balances"], &env);
        assert!(o.status.success(), "{}", text(&o));
        let r = c
            .query_one(
                "SELECT coalesce(sum(balance), 0)::int8, coalesce(sum(event_count), 0)::int8 FROM account_balances",
                &[],
            )
            .await
            .unwrap();
        (r.get::<_, i64>(0), r.get::<_, i64>(1)) == (307, 4)
    })
    .await;
    let o = run(&db, &["dlq", "list", "--json"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["global_position"], poison);
    assert_eq!(list[0]["projection"], "account_balances");
    assert!(
        list[0]["error"]
            .as_str()
            .unwrap()
            .contains("MoneyDeposited"),
        "{}",
        list[0]["error"]
    );
    let attempts = list[0]["attempts"].as_i64().unwrap();
    let id = list[0]["id"].as_i64().unwrap().to_string();
    // The cause persists: the retry fails (exit 1), the entry stays with one more attempt.
    let o = run(&db, &["dlq", "retry", &id], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = run(&db, &["dlq", "show", &id], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        shown["dead_letter"]["attempts"].as_i64().unwrap(),
        attempts + 1
    );
    // `dlq show` shows the event as the handler sees it: upcast to version 2.
    assert_eq!(shown["event"]["payload"]["cents"], "lots");
    assert_eq!(shown["event"]["event_version"], 2);
    // Fix the data, retry: applied and gone.
    c.execute(
        "UPDATE events SET payload = '{\"amount\": 1000}' WHERE global_position = $1",
        &[&poison],
    )
    .await
    .unwrap();
    let o = run(&db, &["dlq", "retry", "--all"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let r = c
        .query_one(
            "SELECT sum(balance)::int8, sum(event_count)::int8 FROM account_balances",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (1307, 5));
    // Purge needs --yes without a terminal.
    let mut cmd = bank();
    cmd.env("DATABASE_URL", db.url())
        .args(["dlq", "purge"])
        .stdin(std::process::Stdio::null());
    let o = cmd.output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = run(&db, &["dlq", "purge", "--yes"], &[]);
    assert!(o.status.success(), "{}", text(&o));
}

/// A dump restored into another cluster: detected, refused with the fix
/// named, and `rebase-cursors` makes the projections exact again. (The
/// restore is simulated: the checkpoints carry another cluster's identifier
/// and the old events and cursors sit in a transaction-id range far above
/// this cluster's, as after restoring into a younger cluster.)
#[tokio::test]
async fn restore_into_another_cluster_is_refused_until_rebased() {
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
            "10",
            "--events",
            "300",
            "--writers",
            "2",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let c = db.connect().await.unwrap();
    crate::cli::catch_up(&db, &[], &[]).await;
    c.batch_execute(
        "UPDATE projection_checkpoints SET system_identifier = '1234567890', \
                last_transaction_id = (last_transaction_id::text::int8 + 1000000000)::text::xid8; \
         UPDATE events SET transaction_id = (transaction_id::text::int8 + 1000000000)::text::xid8;",
    )
    .await
    .unwrap();
    let snapshot = "SELECT string_agg(projection_name || last_transaction_id::text || last_global_position, ',') FROM projection_checkpoints";
    let before: String = c.query_one(snapshot, &[]).await.unwrap().get(0);
    let o = run(&db, &["run-projections", "--once"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("another PostgreSQL cluster") && err.contains("rebase-cursors --yes"),
        "{err}"
    );
    assert_eq!(
        c.query_one(snapshot, &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        before
    );

    // An event written in the "new" cluster sorts below the old cursors…
    c.batch_execute(
        "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
         VALUES ('Account', 'after-restore', 1, 'MoneyDeposited', '{\"amount\": 42}')",
    )
    .await
    .unwrap();
    // …and appends to old streams are refused, naming the cause.
    let sim: &[&str] = &[
        "simulate",
        "--accounts",
        "10",
        "--events",
        "100",
        "--writers",
        "1",
    ];
    let o = run(&db, sim, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("rebase-cursors"),
        "{}",
        text(&o)
    );
    // The rebase fixes both.
    let o = run(&db, &["rebase-cursors", "--yes"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("0 event(s) in all will be handled again"),
        "{out}"
    );
    crate::cli::catch_up(&db, &[], &[]).await;
    crate::cli::assert_read_model_exact(&db).await;
}

/// Counts events per aggregate; on a `Lookup` event it reads a row that
/// does not exist (`query_one` finds none), on a `Mistyped` event it reads
/// an int8 column as `i32`. Neither is a lost connection: the failure
/// policy must handle them like any other handler error.
struct ClientMistakes;

#[projectionist::async_trait]
impl projectionist::Projection for ClientMistakes {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new("client_mistakes").failure_policy(
            FailurePolicy::dead_letter()
                .attempts(2)
                .backoff(Duration::from_millis(5), Duration::from_millis(20)),
        )
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        tx: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        match event.event_type.as_str() {
            "Lookup" => {
                tx.query_one(
                    "SELECT n FROM client_mistakes WHERE aggregate_id = 'no such row'",
                    &[],
                )
                .await?;
            }
            "Mistyped" => {
                let row = tx.query_one("SELECT 1::int8", &[]).await?;
                row.try_get::<_, i32>(0)?;
            }
            _ => {}
        }
        tx.execute(
            "INSERT INTO client_mistakes (aggregate_id, n, total) VALUES ($1, 1, 0) \
             ON CONFLICT (aggregate_id) DO UPDATE SET n = client_mistakes.n + 1",
            &[&event.aggregate_id],
        )
        .await?;
        Ok(())
    }
}

/// Client-side errors of tokio-postgres (no row for `query_one`, a column
/// read with the wrong type) are handler failures, not lost connections:
/// the poison events are dead-lettered and the events after them applied.
#[tokio::test]
async fn query_one_without_a_row_and_a_type_mismatch_are_dead_lettered() {
    let env = env().await;
    env.client()
        .await
        .batch_execute(
            "CREATE TABLE client_mistakes (aggregate_id text PRIMARY KEY, n bigint NOT NULL, total bigint NOT NULL)",
        )
        .await
        .unwrap();
    let mut events: Vec<NewEvent> = (1..=5).map(good).collect();
    events.push(NewEvent::new("Lookup", &serde_json::json!({})).unwrap());
    events.extend((6..=10).map(good));
    events.push(NewEvent::new("Mistyped", &serde_json::json!({})).unwrap());
    events.extend((11..=15).map(good));
    env.store
        .append("Account", "m", ExpectedVersion::NoStream, &events)
        .await
        .unwrap();
    let runner = Runner::new(env.store.clone(), RunnerConfig::default())
        .with_projection(Arc::new(ClientMistakes))
        .unwrap();
    wait_until(Duration::from_secs(30), "the 15 good events", || async {
        runner
            .run_once()
            .await
            .expect("a handler's client-side error must go to the failure policy");
        tally(&env, "client_mistakes").await.0 == 15
    })
    .await;
    let letters = dead_letter::list(&env.store, Some("client_mistakes"))
        .await
        .unwrap();
    let types: Vec<&str> = letters.iter().map(|l| l.event_type.as_str()).collect();
    assert_eq!(types, ["Lookup", "Mistyped"], "{letters:?}");
    assert!(
        letters.iter().all(|l| l.attempts == 2),
        "retried per the policy, then dead-lettered: {letters:?}"
    );
    assert!(
        letters[0].error.contains("query_one") && letters[1].error.contains("i32"),
        "the errors name the cause: {letters:?}"
    );
}

/// A concurrency-mode projection: `handle_concurrent` records the events it
/// handled and fails on `Poison` until fixed; `handle` must never be called.
struct Notifier {
    fixed: AtomicBool,
    handled: std::sync::Mutex<Vec<i64>>,
}

#[projectionist::async_trait]
impl projectionist::ConcurrentProjection for Notifier {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new("notifier").failure_policy(
            FailurePolicy::dead_letter()
                .attempts(2)
                .backoff(Duration::from_millis(5), Duration::from_millis(20)),
        )
    }

    fn concurrency(&self) -> projectionist::Concurrency {
        projectionist::Concurrency::new(4)
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        _scope: &projectionist::Scope,
    ) -> projectionist::Result<()> {
        if event.event_type == "Poison" && !self.fixed.load(Ordering::SeqCst) {
            return Err(projectionist::Error::handler_msg("the mail server said no"));
        }
        self.handled.lock().unwrap().push(event.global_position);
        Ok(())
    }
}

/// `dlq retry` of a concurrency-mode projection runs `handle_concurrent`
/// (the handler the engine ran), not the transactional `handle`.
#[tokio::test]
async fn dead_letter_retry_of_a_concurrent_projection_calls_handle_concurrent() {
    let env = env().await;
    let mut events: Vec<NewEvent> = (1..=3).map(good).collect();
    events.push(NewEvent::new("Poison", &serde_json::json!({})).unwrap());
    events.extend((4..=6).map(good));
    let r = env
        .store
        .append("Account", "n", ExpectedVersion::NoStream, &events)
        .await
        .unwrap();
    let notifier = Arc::new(Notifier {
        fixed: AtomicBool::new(false),
        handled: std::sync::Mutex::new(Vec::new()),
    });
    let runner = Runner::new(env.store.clone(), RunnerConfig::default())
        .with_concurrent_projection(notifier.clone())
        .unwrap();
    wait_until(Duration::from_secs(30), "the 6 good events", || async {
        runner.run_once().await.unwrap();
        notifier.handled.lock().unwrap().len() == 6
    })
    .await;
    let letters = dead_letter::list(&env.store, Some("notifier"))
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let poison = letters[0].global_position;
    assert_eq!(poison, r.last_position - 3);

    let projections = vec![Registered::concurrent(notifier.clone()).unwrap()];
    let again = dead_letter::retry(&env.store, &projections, letters[0].id)
        .await
        .unwrap();
    assert!(!again.succeeded);
    assert!(
        again
            .error
            .as_deref()
            .is_some_and(|e| e.contains("the mail server said no")),
        "the retry ran handle_concurrent: {again:?}"
    );

    notifier.fixed.store(true, Ordering::SeqCst);
    let ok = dead_letter::retry(&env.store, &projections, letters[0].id)
        .await
        .unwrap();
    assert!(ok.succeeded, "{ok:?}");
    assert_eq!(notifier.handled.lock().unwrap().last(), Some(&poison));
    assert!(dead_letter::list(&env.store, None)
        .await
        .unwrap()
        .is_empty());
}
