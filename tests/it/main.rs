//! Integration tests against a real PostgreSQL: `DATABASE_URL` when set,
//! otherwise a throwaway cluster started once for this test binary (see
//! `projectionist::testing`). Every test gets a database of its own.

mod catalogue;
mod cli;
mod commands;
mod common;
mod crash;
mod engine;
mod events;
mod failure;
mod lifecycle;
mod ops;
mod outage;
mod parallel;
mod partitions;
mod rebalance;
mod status;
mod store;
mod tls;
#[cfg(feature = "otel")]
mod traces;
mod two_schemas;
mod wait;
mod worker;
