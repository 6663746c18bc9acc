//! Shared set-up for the integration tests.

use projectionist::testing::TestDatabase;
use projectionist::{EventStore, StoreConfig};
use std::future::Future;
use std::time::{Duration, Instant};

/// A fresh, migrated database and a store on it.
pub struct Env {
    pub db: TestDatabase,
    pub store: EventStore,
}

pub async fn env() -> Env {
    // RUST_LOG=projectionist=debug shows the engine's logs of a failing test.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let db = TestDatabase::create().await.expect("create test database");
    projectionist::migrate(&db.config(), "public")
        .await
        .expect("migrate");
    let store = EventStore::connect_config(db.config(), StoreConfig::default()).expect("store");
    Env { db, store }
}

/// Like [`env`], on a PostgreSQL server of its own: for tests that hold
/// the cluster-wide watermark back (long seeding transactions, held
/// transactions) or whose timing others' transactions would disturb. Keep
/// the server alive as long as the database.
pub async fn private_env() -> (projectionist::testing::TestServer, Env) {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let server = projectionist::testing::TestServer::start_private()
        .await
        .expect("start a private server");
    let db = server
        .create_database()
        .await
        .expect("create test database");
    projectionist::migrate(&db.config(), "public")
        .await
        .expect("migrate");
    let store = EventStore::connect_config(db.config(), StoreConfig::default()).expect("store");
    (server, Env { db, store })
}

impl Env {
    pub async fn client(&self) -> tokio_postgres::Client {
        self.db.connect().await.expect("connect")
    }

    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        let c = self.client().await;
        c.query_one(sql, &[]).await.expect(sql).get(0)
    }
}

/// Waits until `check` returns true, polling every 20 ms, failing after
/// `timeout` with `what`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads the whole log gap-safely from the start until `n` events have
/// arrived (transactions of parallel tests on the same server may hold the
/// watermark back for a moment).
pub async fn read_all_events(
    store: &projectionist::EventStore,
    n: usize,
) -> Vec<projectionist::StoredEvent> {
    let mut cursor = projectionist::Cursor::START;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page = store.read_all(cursor, 1000).await.expect("read_all");
        let full = page.events.len() == 1000;
        seen.extend(page.events);
        cursor = page.next_cursor;
        if seen.len() >= n {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} events became readable",
            seen.len()
        );
        if !full {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
