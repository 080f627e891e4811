//! Opening a store: parse the URL, prepare the SQLite file, build the connection pool, migrate.

use std::path::Path;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor};

use crate::target::Target;
use crate::{migrate, Store, StoreError};

/// Connections to a SQLite file. SQLite runs one writer at a time however many there are; a
/// few let readers (WAL) proceed beside a writer without starving the async callers.
const SQLITE_CONNECTIONS: u32 = 4;

/// Connections to Postgres, which runs queries truly in parallel.
const POSTGRES_CONNECTIONS: u32 = 10;

/// How long (10 s) a SQLite connection waits for another's write lock before giving up with
/// `SQLITE_BUSY`. Writes here are single small rows, so a wait this long means something is
/// wrong rather than busy.
const SQLITE_BUSY_TIMEOUT: &str = "PRAGMA busy_timeout = 10000";

pub(crate) async fn connect(url: &str) -> Result<Store, StoreError> {
    // Idempotent: registers the SQLite and Postgres drivers with `Any` once per process.
    sqlx::any::install_default_drivers();
    let target = Target::parse(url)?;
    let backend = target.backend();
    tracing::debug!(?backend, url = %target.redacted(), "connecting to the database");

    if let Target::SqliteFile { path, .. } = &target {
        create_parent_dir(path)?;
    }
    let open_failed = |source| match &target {
        Target::SqliteFile { path, .. } => StoreError::OpenSqlite {
            path: path.clone(),
            source,
        },
        Target::SqliteMemory { .. } | Target::Postgres { .. } => StoreError::Connect {
            url: target.redacted(),
            source,
        },
    };
    // `connect` opens one connection straight away, so a bad path or an unreachable server
    // fails here rather than on the first query.
    let pool = pool_options(&target)
        .connect(target.sqlx_url())
        .await
        .map_err(open_failed)?;
    if let Target::SqliteFile { .. } = &target {
        enable_wal(&pool).await.map_err(open_failed)?;
    }
    migrate::run(&pool, backend).await?;
    tracing::info!(?backend, url = %target.redacted(), "database ready");
    Ok(Store { pool, backend })
}

fn pool_options(target: &Target) -> AnyPoolOptions {
    match target {
        // Every new connection to `sqlite::memory:` opens a new, empty database, so the pool
        // holds exactly one connection and never closes it.
        Target::SqliteMemory { .. } => AnyPoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None),
        Target::SqliteFile { .. } => AnyPoolOptions::new()
            .max_connections(SQLITE_CONNECTIONS)
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute(SQLITE_BUSY_TIMEOUT).await?;
                    Ok(())
                })
            }),
        Target::Postgres { .. } => AnyPoolOptions::new().max_connections(POSTGRES_CONNECTIONS),
    }
}

fn create_parent_dir(path: &Path) -> Result<(), StoreError> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_owned(),
                source,
            })
        }
        _ => Ok(()),
    }
}

/// Puts the database in WAL mode, so readers never block the writer nor the writer readers.
///
/// The mode is stored in the file, so this only changes anything the first time. Changing it
/// takes an exclusive lock that SQLite does not wait for through the busy timeout; two processes
/// creating the database at the same moment can collide, so a busy failure is retried briefly.
async fn enable_wal(pool: &AnyPool) -> Result<(), sqlx::Error> {
    const ATTEMPTS: u32 = 50;
    let mut attempt = 1;
    loop {
        let mode = sqlx::query_scalar::<_, String>("PRAGMA journal_mode = WAL")
            .fetch_one(pool)
            .await;
        match mode {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(mode) => {
                let msg = format!("SQLite kept journal mode `{mode}` instead of switching to WAL");
                return Err(sqlx::Error::Configuration(msg.into()));
            }
            Err(sqlx::Error::Database(e)) if attempt < ATTEMPTS && is_busy(&*e) => {
                tracing::debug!(attempt, error = %e, "retrying the switch to WAL mode");
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether SQLite failed for want of a lock (`SQLITE_BUSY` or `SQLITE_LOCKED`, including
/// their extended codes), which is worth retrying, unlike, say, a file that is no database.
fn is_busy(e: &dyn sqlx::error::DatabaseError) -> bool {
    const SQLITE_BUSY: u32 = 5;
    const SQLITE_LOCKED: u32 = 6;
    e.code()
        .and_then(|code| code.parse::<u32>().ok())
        .is_some_and(|code| matches!(code & 0xff, SQLITE_BUSY | SQLITE_LOCKED))
}
