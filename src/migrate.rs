//! Schema migrations: the plain SQL files in `migrations/`, embedded at
//! build time and applied by refinery on a dedicated connection, under a
//! session advisory lock so that many replicas starting at once apply each
//! migration exactly once.
//!
//! The SQL files hold unqualified names; the target schema is selected with
//! `search_path` on the migration connection, so the same files can be
//! applied by other tools.

use crate::db;
use crate::error::{Error, Kind, Result};
use crate::ident::Ident;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The table in which refinery records applied migrations (in the target
/// schema).
pub const HISTORY_TABLE: &str = "projectionist_migrations";

/// Advisory-lock key space for migrations: a fixed constant mixed with the
/// schema name, so different schemas migrate independently.
pub(crate) fn lock_key(schema: &Ident) -> i64 {
    // FNV-1a, stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"projectionist:migrate:"
        .iter()
        .chain(schema.as_str().as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// What [`migrate`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Names of the migrations applied by this call, e.g. `V1__events`.
    pub applied: Vec<String>,
}

/// Applies every pending migration to `schema` (created if missing),
/// holding an advisory lock so that concurrent callers apply each
/// migration once. Requires PostgreSQL 13 or newer.
pub async fn migrate(config: &tokio_postgres::Config, schema: &str) -> Result<MigrationReport> {
    migrate_with(config, &db::default_connector(config)?, schema).await
}

/// [`migrate`] with the TLS connector of a store.
pub(crate) async fn migrate_with(
    config: &tokio_postgres::Config,
    tls: &crate::tls::MakeRustlsConnect,
    schema: &str,
) -> Result<MigrationReport> {
    let schema = Ident::new("schema", schema)?;
    let mut client = db::connect_dedicated(config, tls).await?;
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .try_get(0)?;
    if version < 130000 {
        return Err(Error::config(format!(
            "PostgreSQL {} is too old: projectionist needs 13 or newer (xid8, pg_current_xact_id)",
            version / 10000
        )));
    }
    client
        .execute("SELECT pg_advisory_lock($1)", &[&lock_key(&schema)])
        .await?;
    // The lock belongs to this dedicated connection; dropping the client
    // closes it and releases the lock on every path, including errors.
    // CREATE SCHEMA needs CREATE on the database even when the schema
    // exists: only create it when it is missing.
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_namespace WHERE nspname = $1",
            &[&schema.as_str()],
        )
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!("CREATE SCHEMA {}", schema.quoted()))
            .await?;
    }
    client
        .batch_execute(&format!(
            "SET client_min_messages TO warning; SET search_path TO {}",
            schema.quoted()
        ))
        .await?;
    let report = embedded::migrations::runner()
        .set_migration_table_name(HISTORY_TABLE)
        .run_async(&mut client)
        .await
        .map_err(|e| Error::new(Kind::Database, format!("migration failed: {e}")))?;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&lock_key(&schema)])
        .await?;
    Ok(MigrationReport {
        applied: report
            .applied_migrations()
            .iter()
            .map(|m| m.to_string())
            .collect(),
    })
}

/// The migrations embedded in this build, as `V<n>__<name>`.
pub fn embedded_migrations() -> Vec<String> {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect()
}
