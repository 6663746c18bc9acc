//! The projections under test: a no-op (the engine's own cost), the
//! balances read model per event and per batch, a wake-up stamp, the
//! I/O-bound handlers of the concurrency case, and the light projections of
//! the RSS child.

use projectionist::{Concurrency, Filter, StoredEvent};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// One event's balance upsert (`BalancesPerEvent` and its raw twin).
pub const UPSERT_ONE: &str = "INSERT INTO bench_balances (account_id, balance, event_count) \
     VALUES ($1, $2, 1) ON CONFLICT (account_id) DO UPDATE SET \
     balance = bench_balances.balance + excluded.balance, \
     event_count = bench_balances.event_count + 1";
/// A batch's balance upsert over `unnest` arrays (`BalancesBatch`).
const UPSERT_BATCH: &str = "INSERT INTO bench_balances (account_id, balance, event_count) \
     SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[]) \
     ON CONFLICT (account_id) DO UPDATE SET \
     balance = bench_balances.balance + excluded.balance, \
     event_count = bench_balances.event_count + excluded.event_count";

#[derive(serde::Deserialize)]
pub struct Amount {
    pub amount: i64,
}

/// Does nothing, batch-wise (the engine's own cost).
pub struct Noop {
    pub name: String,
}

#[projectionist::async_trait]
impl projectionist::Projection for Noop {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new(&self.name)
    }

    async fn handle(
        &self,
        _: &StoredEvent,
        _: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        Ok(())
    }

    async fn handle_batch(
        &self,
        _: &[StoredEvent],
        _: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        Ok(())
    }
}

/// Decodes every payload and sums the amounts in memory (the RSS child).
pub struct Light {
    pub name: String,
    pub sum: AtomicI64,
}

#[projectionist::async_trait]
impl projectionist::Projection for Light {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new(&self.name)
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        _: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        let a: Amount = event.decode()?;
        self.sum.fetch_add(a.amount, Ordering::Relaxed);
        Ok(())
    }
}

/// `bench_balances` via one upsert per event.
pub struct BalancesPerEvent;

#[projectionist::async_trait]
impl projectionist::Projection for BalancesPerEvent {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new("bench_balances_per_event").pipelined(true)
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        tx: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        let a: Amount = event.decode()?;
        let stmt = tx.prepare_cached(UPSERT_ONE).await?;
        tx.execute(&stmt, &[&event.aggregate_id, &a.amount]).await?;
        Ok(())
    }
}

/// `bench_balances` via one set-based upsert per batch.
pub struct BalancesBatch;

#[projectionist::async_trait]
impl projectionist::Projection for BalancesBatch {
    fn options(&self) -> projectionist::ProjectionOptions {
        // Like the raw one-statement baseline, it never looks at metadata.
        projectionist::ProjectionOptions::new("bench_balances_batch").reads_metadata(false)
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        tx: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        self.handle_batch(std::slice::from_ref(event), tx).await
    }

    async fn handle_batch(
        &self,
        events: &[StoredEvent],
        tx: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        let mut acc: HashMap<&str, (i64, i64)> = HashMap::with_capacity(events.len());
        for e in events {
            let a: Amount = e.decode()?;
            let slot = acc.entry(e.aggregate_id.as_str()).or_default();
            slot.0 += a.amount;
            slot.1 += 1;
        }
        let mut ids = Vec::with_capacity(acc.len());
        let mut balances = Vec::with_capacity(acc.len());
        let mut counts = Vec::with_capacity(acc.len());
        for (id, (b, c)) in acc {
            ids.push(id);
            balances.push(b);
            counts.push(c);
        }
        let stmt = tx.prepare_cached(UPSERT_BATCH).await?;
        tx.execute(&stmt, &[&ids, &balances, &counts]).await?;
        Ok(())
    }
}

/// Records when the handler starts on each event.
pub struct Stamp {
    pub name: String,
    pub seen: mpsc::UnboundedSender<(i64, Instant)>,
}

#[projectionist::async_trait]
impl projectionist::Projection for Stamp {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new(&self.name)
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        _: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        let _ = self.seen.send((event.global_position, Instant::now()));
        Ok(())
    }
}

/// Aggregate type of the `parallel_io` case's sequential-mode events.
pub const IO_SEQ_TYPE: &str = "IoSeq";
/// Aggregate type of the `parallel_io` case's concurrency-mode events.
pub const IO_PAR_TYPE: &str = "IoPar";
/// The simulated I/O wait per event.
pub const IO_SLEEP: Duration = Duration::from_millis(10);

/// Waits `IO_SLEEP` per event inside the batch transaction (sequential mode).
pub struct SleepSequential;

#[projectionist::async_trait]
impl projectionist::Projection for SleepSequential {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new("bench_io_sequential")
            .filter(Filter::all().aggregate_types([IO_SEQ_TYPE]))
    }

    async fn handle(
        &self,
        _: &StoredEvent,
        _: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        tokio::time::sleep(IO_SLEEP).await;
        Ok(())
    }
}

/// Waits `IO_SLEEP` per event in concurrency mode, and checks the mode's
/// contract as it goes: how many handlers run at once, that every event
/// arrives, and that each aggregate's events arrive in version order.
#[derive(Default)]
pub struct SleepConcurrent {
    pub max_in_flight: usize,
    pub running: AtomicUsize,
    pub peak: AtomicUsize,
    /// Per aggregate: the last version handled.
    pub versions: Mutex<HashMap<String, i64>>,
    /// Handlers that started on an aggregate's event before the previous
    /// one of the same aggregate (or twice on one event).
    pub out_of_order: AtomicUsize,
    /// Two handlers of one aggregate running at the same time.
    pub overlapping: AtomicUsize,
    pub busy: Mutex<HashSet<String>>,
    pub calls: AtomicUsize,
}

#[projectionist::async_trait]
impl projectionist::ConcurrentProjection for SleepConcurrent {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new("bench_io_concurrent")
            .filter(Filter::all().aggregate_types([IO_PAR_TYPE]))
    }

    fn concurrency(&self) -> projectionist::Concurrency {
        Concurrency::new(self.max_in_flight)
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        _scope: &projectionist::Scope,
    ) -> projectionist::Result<()> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::Relaxed);
        {
            let mut v = self.versions.lock().expect("poisoned");
            let last = v.entry(event.aggregate_id.clone()).or_insert(0);
            if event.aggregate_version != *last + 1 {
                self.out_of_order.fetch_add(1, Ordering::Relaxed);
            }
            *last = (*last).max(event.aggregate_version);
        }
        if !self
            .busy
            .lock()
            .expect("poisoned")
            .insert(event.aggregate_id.clone())
        {
            self.overlapping.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(IO_SLEEP).await;
        self.busy
            .lock()
            .expect("poisoned")
            .remove(&event.aggregate_id);
        self.running.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}
