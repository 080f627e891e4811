//! Schema migrations: an ordered list of SQL files embedded in the binary, each applied once, in
//! its own transaction, and recorded in `ferrum_migrations`.
//!
//! sqlx's `migrate!` macro is not used: it needs the `macros` feature, which costs compile time,
//! and its bookkeeping differs between backends. Here the same SQL runs on SQLite and Postgres.
//!
//! Two processes may start at once on the same database. Each migration's transaction first
//! claims its version with `INSERT ... ON CONFLICT (version) DO NOTHING`; the loser of that race
//! inserts nothing, rolls back and moves on, so nothing is applied twice. On Postgres a session
//! advisory lock also serialises the whole run, because concurrent `CREATE TABLE IF NOT EXISTS`
//! can fail there with a unique violation in the catalog. On SQLite the claim is the
//! transaction's first statement, so the write lock is taken before any read and the busy
//! timeout (not an immediate `SQLITE_BUSY`) handles the wait.

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{AnyConnection, AnyPool, Connection, Executor};

use crate::{Backend, StoreError};

/// One schema change. Versions are positive, increasing and never reused.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, in order. Append only: an applied migration's SQL must never change.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "usage",
        sql: include_str!("../migrations/0001_usage.sql"),
    },
    Migration {
        version: 2,
        name: "files_batches_completions",
        sql: include_str!("../migrations/0002_files_batches_completions.sql"),
    },
    Migration {
        version: 3,
        name: "responses",
        sql: include_str!("../migrations/0003_responses.sql"),
    },
    Migration {
        version: 4,
        name: "fine_tuning",
        sql: include_str!("../migrations/0004_fine_tuning.sql"),
    },
    Migration {
        version: 5,
        name: "evals",
        sql: include_str!("../migrations/0005_evals.sql"),
    },
    Migration {
        version: 6,
        name: "projects",
        sql: include_str!("../migrations/0006_projects.sql"),
    },
    Migration {
        version: 7,
        name: "service_tier",
        sql: include_str!("../migrations/0007_service_tier.sql"),
    },
    Migration {
        version: 8,
        name: "reserved_capacity",
        sql: include_str!("../migrations/0008_reserved_capacity.sql"),
    },
];

/// The key of the Postgres advisory lock held while migrating (arbitrary, "ferrum" in ASCII).
const PG_LOCK_KEY: i64 = 0x6665_7272_756d;

/// Brings the schema up to date; a no-op when it already is.
pub(crate) async fn run(pool: &AnyPool, backend: Backend) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await?;
    if backend == Backend::Postgres {
        // The lock belongs to this session: closing the connection afterwards (rather than
        // returning it to the pool) releases it on every path, errors included.
        conn.close_on_drop();
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(PG_LOCK_KEY)
            .execute(&mut *conn)
            .await?;
    }
    conn.execute(
        "CREATE TABLE IF NOT EXISTS ferrum_migrations (
            version BIGINT PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at BIGINT NOT NULL
        )",
    )
    .await?;

    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM ferrum_migrations ORDER BY version")
            .fetch_all(&mut *conn)
            .await?;
    let known = MIGRATIONS.last().map_or(0, |m| m.version);
    if let Some(&found) = applied.last().filter(|&&v| v > known) {
        return Err(StoreError::NewerSchema { found, known });
    }

    let mut count = 0;
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        if apply(&mut conn, migration).await? {
            count += 1;
        }
    }
    tracing::debug!(
        applied = count,
        schema_version = known,
        "database migrations up to date"
    );
    Ok(())
}

/// Applies one migration unless another process claims it first. Returns whether it applied it.
async fn apply(conn: &mut AnyConnection, migration: &Migration) -> Result<bool, StoreError> {
    let failed = |source| StoreError::Migration {
        version: migration.version,
        name: migration.name,
        source,
    };
    let mut tx = conn.begin().await.map_err(failed)?;
    let claimed = sqlx::query(
        "INSERT INTO ferrum_migrations (version, name, applied_at) VALUES ($1, $2, $3)
         ON CONFLICT (version) DO NOTHING",
    )
    .bind(migration.version)
    .bind(migration.name)
    .bind(unix_now())
    .execute(&mut *tx)
    .await
    .map_err(failed)?
    .rows_affected()
        == 1;
    if !claimed {
        tx.rollback().await.map_err(failed)?;
        tracing::debug!(
            version = migration.version,
            name = migration.name,
            "migration already applied by another process"
        );
        return Ok(false);
    }
    // Executed as plain text without arguments because a migration file may hold several
    // statements, which a prepared statement cannot (Postgres runs it through the simple query
    // protocol).
    tx.execute(migration.sql).await.map_err(failed)?;
    tx.commit().await.map_err(failed)?;
    tracing::info!(
        version = migration.version,
        name = migration.name,
        "applied database migration"
    );
    Ok(true)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::MIGRATIONS;

    #[test]
    fn versions_increase_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "migration {}", m.name);
        }
    }
}
