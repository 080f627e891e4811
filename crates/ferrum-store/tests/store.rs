//! The store's behaviour, run once per backend: an in-memory SQLite, a SQLite file, and
//! Postgres when `FERRUM_TEST_POSTGRES_URL` is set (`eval "$(scripts/postgres.sh)"` starts one).

mod common;

use common::databases;
use ferrum_store::{Backend, Store, StoreError, UsageRecord, UsageTotal};
use sqlx::{AnyConnection, Connection, Executor};
use tempfile::TempDir;

fn rec(id: &str, created: i64, model: &str, tokens: [u64; 3], cost_usd: f64) -> UsageRecord {
    UsageRecord {
        id: id.into(),
        created,
        model: model.into(),
        endpoint: "chat.completions".into(),
        prompt_tokens: tokens[0],
        cached_tokens: tokens[1],
        completion_tokens: tokens[2],
        cost_usd,
        batch: false,
    }
}

fn total(model: &str, requests: u64, tokens: [u64; 3], cost_usd: f64) -> UsageTotal {
    UsageTotal {
        model: model.into(),
        requests,
        prompt_tokens: tokens[0],
        cached_tokens: tokens[1],
        completion_tokens: tokens[2],
        cost_usd,
    }
}

/// Records, then checks the totals (costs are exact binary fractions, so sums compare exactly).
async fn check(store: &Store, records: &[UsageRecord], since: Option<i64>, expect: &[UsageTotal]) {
    for r in records {
        store.record_usage(r).await.unwrap();
    }
    assert_eq!(
        store.usage_totals(since).await.unwrap(),
        expect,
        "since {since:?}"
    );
}

#[tokio::test]
async fn records_and_totals_per_model() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        assert_eq!(store.backend(), db.backend);
        assert_eq!(store.usage_totals(None).await.unwrap(), []);
        let mut batch_line = rec("batch_req_1", 12, "ferrum-small", [7, 0, 3], 0.125);
        batch_line.batch = true;
        // Models are deliberately recorded out of order and with mixed case: the result is
        // in byte order on every backend.
        let records = [
            rec("chatcmpl-1", 10, "ferrum-small", [100, 20, 5], 0.5),
            rec("chatcmpl-2", 11, "Ferrum-big", [1, 0, 1], 0.25),
            rec("chatcmpl-3", 11, "ferrum-small", [50, 50, 50], 1.0),
            batch_line,
        ];
        let expect = [
            total("Ferrum-big", 1, [1, 0, 1], 0.25),
            total("ferrum-small", 3, [157, 70, 58], 1.625),
        ];
        check(&store, &records, None, &expect).await;
    }
}

#[tokio::test]
async fn recording_the_same_id_twice_counts_once() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        let first = rec("chatcmpl-x", 1, "m", [10, 0, 10], 0.5);
        // A retry carries the same id; even if its numbers differ, the first write stands.
        let retry = rec("chatcmpl-x", 2, "m", [99, 9, 99], 9.0);
        let expect = [total("m", 1, [10, 0, 10], 0.5)];
        check(&store, &[first.clone(), retry, first], None, &expect).await;
    }
}

#[tokio::test]
async fn since_keeps_records_created_at_or_after_it() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        let records = [
            rec("a", 100, "m", [1, 0, 0], 0.5),
            rec("b", 200, "m", [2, 0, 0], 0.25),
            rec("c", 300, "n", [4, 0, 0], 0.125),
        ];
        check(
            &store,
            &records,
            Some(200),
            &[
                total("m", 1, [2, 0, 0], 0.25),
                total("n", 1, [4, 0, 0], 0.125),
            ],
        )
        .await;
        check(&store, &[], Some(301), &[]).await;
        check(
            &store,
            &[],
            Some(i64::MIN),
            &[
                total("m", 2, [3, 0, 0], 0.75),
                total("n", 1, [4, 0, 0], 0.125),
            ],
        )
        .await;
    }
}

#[tokio::test]
async fn data_survives_reopening() {
    for db in databases().await.into_iter().filter(|db| db.persistent) {
        let store = Store::connect(&db.url).await.unwrap();
        store
            .record_usage(&rec("r1", 1, "m", [3, 2, 1], 0.5))
            .await
            .unwrap();
        drop(store);
        let store = Store::connect(&db.url).await.unwrap();
        let expect = [total("m", 1, [3, 2, 1], 0.5)];
        assert_eq!(store.usage_totals(None).await.unwrap(), expect);
    }
}

#[tokio::test]
async fn migrations_apply_once_even_when_processes_race() {
    for db in databases().await.into_iter().filter(|db| db.persistent) {
        // Several stores opening a fresh database at once stand for several processes
        // starting together: each has its own pool, so they race as separate processes would.
        let opens = (0..6).map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { Store::connect(&url).await })
        });
        for open in opens.collect::<Vec<_>>() {
            open.await.unwrap().unwrap();
        }
        // And opening it again later is a no-op.
        let store = Store::connect(&db.url).await.unwrap();
        store
            .record_usage(&rec("r1", 1, "m", [1, 1, 1], 0.5))
            .await
            .unwrap();

        let mut conn = AnyConnection::connect(&db.url).await.unwrap();
        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM ferrum_migrations ORDER BY version")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        assert_eq!(versions, [1, 2, 3, 4, 5, 6, 7, 8], "{}", db.url);
        conn.close().await.unwrap();
    }
}

#[tokio::test]
async fn a_schema_from_a_newer_ferrum_is_refused() {
    for db in databases().await.into_iter().filter(|db| db.persistent) {
        drop(Store::connect(&db.url).await.unwrap());
        let mut conn = AnyConnection::connect(&db.url).await.unwrap();
        conn.execute(
            "INSERT INTO ferrum_migrations (version, name, applied_at) VALUES (999, 'future', 0)",
        )
        .await
        .unwrap();
        conn.close().await.unwrap();
        let err = Store::connect(&db.url).await.unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::NewerSchema {
                    found: 999,
                    known: 8
                }
            ),
            "{err}"
        );
    }
}

#[tokio::test]
async fn concurrent_writers_lose_nothing() {
    const TASKS: u64 = 16;
    const PER_TASK: u64 = 25;
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        let tasks = (0..TASKS).map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..PER_TASK {
                    let model = if i % 2 == 0 { "even" } else { "odd" };
                    let r = rec(&format!("req-{t}-{i}"), 1, model, [1, 0, 2], 0.5);
                    store.record_usage(&r).await.unwrap();
                    // Every record is also retried, concurrently with other writers.
                    store.record_usage(&r).await.unwrap();
                }
            })
        });
        for task in tasks.collect::<Vec<_>>() {
            task.await.unwrap();
        }
        let evens = TASKS * PER_TASK.div_ceil(2);
        let odds = TASKS * (PER_TASK / 2);
        let expect = [
            total("even", evens, [evens, 0, 2 * evens], evens as f64 * 0.5),
            total("odd", odds, [odds, 0, 2 * odds], odds as f64 * 0.5),
        ];
        assert_eq!(
            store.usage_totals(None).await.unwrap(),
            expect,
            "{}",
            db.url
        );
    }
}

#[tokio::test]
async fn counts_beyond_i64_are_refused() {
    let store = Store::connect("sqlite::memory:").await.unwrap();
    let err = store
        .record_usage(&rec("big", 1, "m", [u64::MAX, 0, 0], 0.0))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::OutOfRange {
                field: "prompt_tokens",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(store.usage_totals(None).await.unwrap(), []);
}

#[tokio::test]
async fn bad_urls_give_clear_errors() {
    let err = Store::connect("mysql://root:hunter2@localhost/db")
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::UnsupportedUrl { .. }), "{msg}");
    assert!(
        msg.contains("unsupported database URL") && !msg.contains("hunter2"),
        "{msg}"
    );

    // A parent "directory" that is a file cannot be created.
    let dir = TempDir::new().unwrap();
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let url = format!("sqlite://{}/ferrum.db", blocker.display());
    let err = Store::connect(&url).await.unwrap_err();
    assert!(matches!(err, StoreError::CreateDir { .. }), "{err}");
    assert!(
        err.to_string().contains(&blocker.display().to_string()),
        "{err}"
    );

    // A file that is not a database names the file.
    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![b'x'; 4096]).unwrap();
    let err = Store::connect(&format!("sqlite://{}", garbage.display()))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::OpenSqlite { .. }), "{err}");
    assert!(err.to_string().contains("garbage.db"), "{err}");

    // A server that hangs up at once fails the connection, and the password stays out of
    // the message. (A refused connection would be retried until the pool's 30 s acquire
    // timeout, as a Postgres that is still starting up should be.)
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let err = Store::connect(&format!(
        "postgres://ferrum:hunter2@127.0.0.1:{port}/ferrum"
    ))
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Connect { .. }), "{msg}");
    assert!(
        msg.contains("ferrum:***@127.0.0.1") && !msg.contains("hunter2"),
        "{msg}"
    );
}

#[tokio::test]
async fn sqlite_takes_numbered_placeholders_through_any() {
    // The store's SQL uses Postgres-style `$n` placeholders on both backends. SQLite reads
    // `$2` as a parameter *named* "$2"; sqlx binds it by that number, not by position.
    sqlx::any::install_default_drivers();
    let mut conn = AnyConnection::connect("sqlite::memory:").await.unwrap();
    let (diff, again): (i64, i64) = sqlx::query_as("SELECT $2 - $1, $1")
        .bind(1_i64)
        .bind(10_i64)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!((diff, again), (9, 1));
}

#[tokio::test]
async fn sqlite_files_use_wal() {
    let dir = TempDir::new().unwrap();
    let url = format!("sqlite://{}", dir.path().join("w.db").display());
    let store = Store::connect(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    let mut conn = AnyConnection::connect(&url).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn default_url_lives_in_ferrum_home() {
    // Nothing else in this test binary reads FERRUM_HOME, so changing it here is safe.
    std::env::set_var("FERRUM_HOME", "/srv/ferrum data");
    assert_eq!(Store::default_url(), "sqlite:///srv/ferrum data/ferrum.db");
    std::env::set_var("FERRUM_HOME", "");
    let url = Store::default_url();
    assert!(
        url.starts_with("sqlite://") && url.ends_with("/.cache/ferrum/ferrum.db"),
        "{url}"
    );
    std::env::remove_var("FERRUM_HOME");
    assert_eq!(Store::default_url(), url);
}

#[tokio::test]
async fn futures_are_send() {
    // The server awaits these inside spawned tasks and axum handlers, which need `Send`;
    // sqlx futures lose it easily (higher-ranked `Executor` bounds), so it is pinned here.
    fn assert_send<T: Send>(_: &T) {}
    let store = Store::connect("sqlite::memory:").await.unwrap();
    assert_send(&Store::connect("sqlite::memory:"));
    assert_send(&store.record_usage(&rec("a", 1, "m", [0, 0, 0], 0.0)));
    assert_send(&store.usage_totals(None));
}
