//! Integration tests against a real PostgreSQL: the server in
//! `PROJECTIONIST_TEST_DATABASE_URL` when set (never `DATABASE_URL`),
//! otherwise a throwaway cluster started once for this test binary (see
//! `projectionist::testing`). Every test gets a database of its own.

mod catalogue;
mod cli;
mod combine;
mod commands;
mod common;
mod console;
mod crash;
mod crash_window;
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
mod testing_helper;
mod tls;
#[cfg(feature = "otel")]
mod traces;
mod two_schemas;
mod versions;
mod wait;
mod worker;
