//! A projection as the engine holds it: its [`ProjectionOptions`] read once
//! and validated, the key of its checkpoints (`name` for version 1,
//! `name@v<N>` above), its [`Scope`], and its handler — transactional
//! ([`Projection`]) or concurrent ([`ConcurrentProjection`]). Everything
//! downstream (runner, worker mode, status, dead letters, commands) works on
//! [`Registered`], so the concurrency mode is decided by the trait a user
//! implements, not at run time.

use crate::context::{Context, Scope};
use crate::error::Result;
use crate::event::StoredEvent;
use crate::policy::FailurePolicy;
use crate::projection::{
    Concurrency, ConcurrentProjection, Filter, Partition, Projection, ProjectionOptions,
    Transaction, UnknownEvents,
};
use std::sync::Arc;

enum Handler {
    Transactional(Arc<dyn Projection>),
    Concurrent(Arc<dyn ConcurrentProjection>, Concurrency),
}

struct Inner {
    options: ProjectionOptions,
    key: String,
    scope: Scope,
    handler: Handler,
}

/// A registered projection (either trait), as runners, the command line and
/// the status functions take it. Cheap to clone.
#[derive(Clone)]
pub struct Registered(Arc<Inner>);

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered")
            .field("name", &self.0.options.name)
            .field("version", &self.0.options.version)
            .finish()
    }
}

/// The checkpoint key of `name` at `version`.
pub(crate) fn slot_key(name: &str, version: i32) -> String {
    if version == 1 {
        name.to_owned()
    } else {
        format!("{name}@v{version}")
    }
}

/// Splits a checkpoint key into name and version.
pub(crate) fn split_key(key: &str) -> (&str, i32) {
    match key.rsplit_once("@v") {
        Some((name, v)) => match v.parse() {
            Ok(v) => (name, v),
            Err(_) => (key, 1),
        },
        None => (key, 1),
    }
}

impl Registered {
    fn build(options: ProjectionOptions, handler: Handler) -> Result<Registered> {
        options.validate()?;
        let key = slot_key(&options.name, options.version);
        let scope = Scope::new(options.version, &options.tables, options.pipelined);
        Ok(Registered(Arc::new(Inner {
            options,
            key,
            scope,
            handler,
        })))
    }

    /// Registers a transactional projection, reading and validating its
    /// options.
    pub fn new(projection: Arc<dyn Projection>) -> Result<Registered> {
        Registered::build(projection.options(), Handler::Transactional(projection))
    }

    /// Registers a concurrent projection, reading and validating its
    /// options.
    pub fn concurrent(projection: Arc<dyn ConcurrentProjection>) -> Result<Registered> {
        let c = projection.concurrency();
        Registered::build(projection.options(), Handler::Concurrent(projection, c))
    }

    /// The projection's name (the same for every version).
    pub fn name(&self) -> &str {
        &self.0.options.name
    }

    /// The version this binary runs.
    pub fn version(&self) -> i32 {
        self.0.options.version
    }

    /// The options as declared.
    pub fn options(&self) -> &ProjectionOptions {
        &self.0.options
    }

    /// The checkpoint key: `name` for version 1, `name@v<N>` above.
    pub(crate) fn key(&self) -> &str {
        &self.0.key
    }

    pub(crate) fn scope(&self) -> &Scope {
        &self.0.scope
    }

    pub(crate) fn filter(&self) -> Filter {
        self.0.options.filter.clone()
    }

    pub(crate) fn partitions(&self) -> i32 {
        self.0.options.partitions
    }

    pub(crate) fn failure_policy(&self) -> FailurePolicy {
        self.0.options.failure_policy
    }

    pub(crate) fn unknown_events(&self) -> UnknownEvents {
        self.0.options.unknown_events
    }

    pub(crate) fn tables(&self) -> &[String] {
        &self.0.options.tables
    }

    pub(crate) fn rewindable(&self) -> bool {
        self.0.options.rewindable
    }

    pub(crate) fn reads_metadata(&self) -> bool {
        self.0.options.reads_metadata
    }

    /// `Some` for a concurrent projection.
    pub(crate) fn concurrency(&self) -> Option<Concurrency> {
        match &self.0.handler {
            Handler::Concurrent(_, c) => Some(*c),
            Handler::Transactional(_) => None,
        }
    }

    /// Runs the batch handler (a concurrent projection's handler, one event
    /// after the other, for dead-letter retries).
    pub(crate) async fn handle_batch(
        &self,
        events: &[StoredEvent],
        tx: &Transaction<'_>,
    ) -> Result<()> {
        match &self.0.handler {
            Handler::Transactional(p) => {
                p.handle_batch(events, &Context::new(tx, &self.0.scope))
                    .await
            }
            Handler::Concurrent(p, _) => {
                for event in events {
                    p.handle(event, &self.0.scope).await?;
                }
                Ok(())
            }
        }
    }

    /// Runs a concurrent projection's handler; a transactional projection
    /// is never run this way.
    pub(crate) async fn handle_concurrent(&self, event: &StoredEvent) -> Result<()> {
        match &self.0.handler {
            Handler::Concurrent(p, _) => p.handle(event, &self.0.scope).await,
            Handler::Transactional(_) => Err(crate::Error::config(format!(
                "projection {} is transactional; it has no concurrent handler",
                self.name()
            ))),
        }
    }

    pub(crate) async fn migrate(&self, tx: &Transaction<'_>) -> Result<()> {
        let ctx = Context::new(tx, &self.0.scope);
        match &self.0.handler {
            Handler::Transactional(p) => p.migrate(&ctx).await,
            Handler::Concurrent(p, _) => p.migrate(&ctx).await,
        }
    }

    pub(crate) async fn reset(
        &self,
        tx: &Transaction<'_>,
        partition: Option<Partition>,
    ) -> Result<()> {
        let ctx = Context::new(tx, &self.0.scope);
        match &self.0.handler {
            Handler::Transactional(p) => p.reset(&ctx, partition).await,
            Handler::Concurrent(p, _) => p.reset(&ctx, partition).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_versions_and_split_back() {
        assert_eq!(slot_key("balances", 1), "balances");
        assert_eq!(slot_key("balances", 2), "balances@v2");
        assert_eq!(split_key("balances@v2"), ("balances", 2));
        assert_eq!(split_key("balances"), ("balances", 1));
        assert_eq!(split_key("odd@vx"), ("odd@vx", 1));
    }
}
