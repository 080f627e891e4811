//! Test databases: one fresh database of every kind this run can reach.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

use ferrum_store::Backend;
use sqlx::{AnyConnection, Connection, Executor};
use tempfile::TempDir;

/// A fresh, empty database. Postgres ones are a new schema in the test database, so tests
/// running in parallel never see each other's rows.
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    /// Whether the data outlives the store (false for `sqlite::memory:`).
    pub persistent: bool,
    _dir: Option<TempDir>,
    /// The Postgres schema to drop afterwards, with the URL of its database.
    pg_schema: Option<(String, String)>,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((base, schema)) = self.pg_schema.take() else {
            return;
        };
        // Drop runs outside async code (possibly while a test panics), so the schema is
        // dropped on a thread with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut conn = AnyConnection::connect(&base).await?;
                conn.execute(format!("DROP SCHEMA {schema} CASCADE").as_str())
                    .await?;
                conn.close().await
            })
            .map_err(std::io::Error::other)
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("note: could not drop a Postgres test schema: {dropped:?}");
        }
    }
}

/// One fresh database of every kind this run can reach.
pub async fn databases() -> Vec<TestDb> {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("nested/dirs/ferrum.db");
    let mut dbs = vec![
        TestDb {
            url: "sqlite::memory:".into(),
            backend: Backend::Sqlite,
            persistent: false,
            _dir: None,
            pg_schema: None,
        },
        TestDb {
            url: format!("sqlite://{}", file.display()),
            backend: Backend::Sqlite,
            persistent: true,
            _dir: Some(dir),
            pg_schema: None,
        },
    ];
    match std::env::var("FERRUM_TEST_POSTGRES_URL") {
        Ok(base) if !base.is_empty() => dbs.push(postgres_schema(&base).await),
        _ => eprintln!("note: FERRUM_TEST_POSTGRES_URL is not set; skipping Postgres"),
    }
    dbs
}

async fn postgres_schema(base: &str) -> TestDb {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    sqlx::any::install_default_drivers();
    let schema = format!(
        "ferrum_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut conn = AnyConnection::connect(base).await.unwrap();
    conn.execute(
        format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}").as_str(),
    )
    .await
    .unwrap();
    conn.close().await.unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    TestDb {
        url: format!("{base}{sep}options=-c%20search_path%3D{schema}"),
        backend: Backend::Postgres,
        persistent: true,
        _dir: None,
        pg_schema: Some((base.to_owned(), schema)),
    }
}
