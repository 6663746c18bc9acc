//! Integration tests against a real PostgreSQL: `DATABASE_URL` when set,
//! otherwise a throwaway cluster started once for this test binary (see
//! `projectionist::testing`). Every test gets a database of its own.

mod catalogue;
mod cli;
mod commands;
mod common;
mod engine;
mod failure;
mod ops;
mod outage;
mod parallel;
mod store;
mod tls;
mod worker;
