//! Files, batches and stored completions, run once per backend (see `common`): paging, the
//! batch life cycle, and the claims that keep concurrent workers from running a line twice.

mod common;

use std::collections::HashSet;

use common::databases;
use ferrum_store::{
    BatchRecord, BatchStatus, CompletionFilter, FileRecord, LineResult, NewLine, Order, Page,
    Store, StoredCompletion, UsageRecord,
};

fn file(id: &str, purpose: &str) -> FileRecord {
    FileRecord {
        id: id.into(),
        created_at: 1_700_000_000,
        filename: format!("{id}.jsonl"),
        purpose: purpose.into(),
        bytes: 42,
        expires_at: None,
    }
}

fn page(after: Option<&str>, limit: usize, order: Order) -> Page {
    Page {
        after: after.map(str::to_string),
        limit,
        order,
    }
}

fn new_batch(id: &str) -> BatchRecord {
    BatchRecord {
        id: id.into(),
        created_at: 1_700_000_000,
        endpoint: "/v1/chat/completions".into(),
        input_file_id: "file-in".into(),
        completion_window: "24h".into(),
        status: BatchStatus::Validating,
        metadata: Some(r#"{"k":"v"}"#.into()),
        model: None,
        errors: None,
        output_file_id: None,
        error_file_id: None,
        in_progress_at: None,
        expires_at: 1_700_086_400,
        finalizing_at: None,
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
    }
}

fn lines(n: usize) -> Vec<NewLine> {
    (0..n)
        .map(|i| NewLine {
            custom_id: format!("req-{i}"),
            body: format!(r#"{{"i":{i}}}"#),
        })
        .collect()
}

fn ok_result(line: i64) -> LineResult {
    LineResult {
        result: format!(r#"{{"line":{line}}}"#),
        failed: false,
        input_tokens: 10,
        cached_tokens: 2,
        output_tokens: 5,
        usage: None,
    }
}

/// A batch that passed validation: `in_progress` with `n` pending lines.
async fn started(store: &Store, id: &str, n: usize) {
    store.create_batch(&new_batch(id)).await.unwrap();
    let claimed = store.claim_validation("w0", 1_000, 60_000).await.unwrap();
    assert_eq!(claimed.map(|b| b.id), Some(id.to_string()));
    assert!(store
        .start_batch(id, "w0", Some("gpt-4.1-nano"), &lines(n), 1_700_000_001)
        .await
        .unwrap());
}

#[tokio::test]
async fn files_page_by_cursor_in_both_orders_and_filter_by_purpose() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        for i in 0..5 {
            let purpose = if i % 2 == 0 { "batch" } else { "user_data" };
            store
                .insert_file(&file(&format!("file-{i}"), purpose))
                .await
                .unwrap();
        }
        // Inserting the same id again changes nothing (finalization may be retried).
        store.insert_file(&file("file-0", "batch")).await.unwrap();

        let first = store
            .list_files(None, &page(None, 2, Order::Desc), 0)
            .await
            .unwrap();
        let ids: Vec<_> = first.items.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, ["file-4", "file-3"], "{:?}", db.backend);
        assert!(first.has_more);
        let next = store
            .list_files(None, &page(Some("file-3"), 10, Order::Desc), 0)
            .await
            .unwrap();
        let ids: Vec<_> = next.items.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, ["file-2", "file-1", "file-0"]);
        assert!(!next.has_more);

        let asc = store
            .list_files(Some("batch"), &page(None, 10, Order::Asc), 0)
            .await
            .unwrap();
        let ids: Vec<_> = asc.items.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, ["file-0", "file-2", "file-4"]);

        assert_eq!(
            store.get_file("file-1").await.unwrap(),
            Some(file("file-1", "user_data"))
        );
        assert!(store.delete_file("file-1").await.unwrap());
        assert!(!store.delete_file("file-1").await.unwrap());
        assert_eq!(store.get_file("file-1").await.unwrap(), None);
        let err = store
            .list_files(None, &page(Some("file-1"), 10, Order::Desc), 0)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("file-1"), "{err}");
    }
}

#[tokio::test]
async fn expired_files_are_listed_for_deletion_and_hidden_from_lists() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        for (id, expires_at) in [
            ("f-a", Some(100)),
            ("f-b", Some(50)),
            ("f-c", Some(500)),
            ("f-d", None),
        ] {
            store
                .insert_file(&FileRecord {
                    expires_at,
                    ..file(id, "user_data")
                })
                .await
                .unwrap();
        }
        // At 100: a and b have expired, oldest expiry first; c and d have not.
        assert_eq!(store.expired_files(100, 10).await.unwrap(), ["f-b", "f-a"]);
        assert_eq!(store.expired_files(100, 1).await.unwrap(), ["f-b"]);
        let listed = store
            .list_files(None, &page(None, 10, Order::Asc), 100)
            .await
            .unwrap();
        let ids: Vec<&str> = listed.items.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, ["f-c", "f-d"]);
        for id in ["f-b", "f-a"] {
            assert!(store.delete_file(id).await.unwrap());
        }
        assert!(store.expired_files(100, 10).await.unwrap().is_empty());
        assert_eq!(store.expired_files(1000, 10).await.unwrap(), ["f-c"]);
    }
}

#[tokio::test]
async fn a_batch_runs_from_validation_to_completion() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        started(&store, "batch_a", 3).await;
        // Validated once: nothing more to validate.
        assert!(store
            .claim_validation("w1", 2_000, 60_000)
            .await
            .unwrap()
            .is_none());
        let b = store.get_batch("batch_a").await.unwrap().unwrap();
        assert_eq!(b.status, BatchStatus::InProgress);
        assert_eq!(b.model.as_deref(), Some("gpt-4.1-nano"));

        let claimed = store.claim_lines("w1", 2_000, 60_000, 10).await.unwrap();
        assert_eq!(
            claimed.iter().map(|l| l.line).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(claimed[1].custom_id, "req-1");
        assert_eq!(claimed[1].body, r#"{"i":1}"#);
        // Not ready to finalize while lines run.
        assert!(store
            .claim_finalization("w1", 2_000, 60_000, 1_700_000_002)
            .await
            .unwrap()
            .is_none());
        for l in &claimed {
            let mut r = ok_result(l.line);
            r.failed = l.line == 2;
            r.usage = Some(UsageRecord {
                id: format!("{}:{}", l.batch_id, l.line),
                created: 1_700_000_002,
                model: "gpt-4.1-nano".into(),
                endpoint: "batch.chat.completions".into(),
                prompt_tokens: 10,
                cached_tokens: 2,
                completion_tokens: 5,
                cost_usd: 0.5,
                batch: true,
            });
            assert!(store.finish_line("w1", l, &r).await.unwrap());
            // A second result for the same line is refused.
            assert!(!store.finish_line("w1", l, &r).await.unwrap());
        }
        let counts = store.batch_counts("batch_a").await.unwrap();
        assert_eq!((counts.total, counts.completed, counts.failed), (3, 2, 1));
        assert_eq!(
            (
                counts.input_tokens,
                counts.cached_tokens,
                counts.output_tokens
            ),
            (30, 6, 15)
        );
        let totals = store.usage_totals(None).await.unwrap();
        assert_eq!(totals[0].requests, 3, "one usage record per line");

        let fin = store
            .claim_finalization("w2", 3_000, 60_000, 1_700_000_003)
            .await
            .unwrap()
            .expect("ready to finalize");
        assert_eq!(fin.status, BatchStatus::Finalizing);
        assert_eq!(fin.finalizing_at, Some(1_700_000_003));
        let done = store.done_lines("batch_a").await.unwrap();
        assert_eq!(
            done.iter().map(|d| d.failed).collect::<Vec<_>>(),
            [false, true, false]
        );
        let (out, err) = (
            file("file-out", "batch_output"),
            file("file-err", "batch_output"),
        );
        // Only the finalizer may complete it.
        assert!(!store
            .complete_batch(
                "batch_a",
                "w1",
                BatchStatus::Completed,
                Some(&out),
                Some(&err),
                5
            )
            .await
            .unwrap());
        assert!(store
            .complete_batch(
                "batch_a",
                "w2",
                BatchStatus::Completed,
                Some(&out),
                Some(&err),
                5
            )
            .await
            .unwrap());
        let b = store.get_batch("batch_a").await.unwrap().unwrap();
        assert_eq!(b.status, BatchStatus::Completed);
        assert_eq!(b.output_file_id.as_deref(), Some("file-out"));
        assert_eq!(b.completed_at, Some(5));
        assert!(store.get_file("file-err").await.unwrap().is_some());
        assert!(store
            .claim_finalization("w2", 4_000, 60_000, 6)
            .await
            .unwrap()
            .is_none());
    }
}

#[tokio::test]
async fn a_dead_workers_lines_are_taken_over_and_its_late_results_refused() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        started(&store, "batch_b", 2).await;
        let dead = store.claim_lines("dead", 1_000, 5_000, 10).await.unwrap();
        assert_eq!(dead.len(), 2);
        // Within the lease nobody else gets them; a renewed lease lasts longer.
        assert!(store
            .claim_lines("w", 5_999, 5_000, 10)
            .await
            .unwrap()
            .is_empty());
        store.renew_leases("dead", 5_000, 5_000).await.unwrap();
        assert!(store
            .claim_lines("w", 9_000, 5_000, 10)
            .await
            .unwrap()
            .is_empty());
        // Once it runs out, another worker takes the lines over.
        let taken = store.claim_lines("w", 10_001, 5_000, 10).await.unwrap();
        assert_eq!(taken, dead);
        assert!(!store
            .finish_line("dead", &dead[0], &ok_result(1))
            .await
            .unwrap());
        assert!(store
            .finish_line("w", &taken[0], &ok_result(1))
            .await
            .unwrap());
        // A clean shutdown hands lines back at once.
        assert_eq!(store.release_lines("w").await.unwrap(), 1);
        let again = store.claim_lines("w2", 10_002, 5_000, 10).await.unwrap();
        assert_eq!(again.iter().map(|l| l.line).collect::<Vec<_>>(), [2]);
    }
}

#[tokio::test]
async fn cancelling_stops_claims_and_finalizes_once_running_lines_end() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        started(&store, "batch_c", 3).await;
        let running = store.claim_lines("w", 1_000, 60_000, 1).await.unwrap();
        let (changed, b) = store.cancel_batch("batch_c", 7).await.unwrap().unwrap();
        assert!(changed);
        assert_eq!(
            (b.status, b.cancelling_at),
            (BatchStatus::Cancelling, Some(7))
        );
        assert!(!store.cancel_batch("batch_c", 8).await.unwrap().unwrap().0);
        assert!(store.cancel_batch("batch_nope", 8).await.unwrap().is_none());
        assert!(store
            .claim_lines("w", 1_000, 60_000, 10)
            .await
            .unwrap()
            .is_empty());
        // The running line is still owned: no finalization until it ends.
        assert!(store
            .claim_finalization("f", 2_000, 60_000, 9)
            .await
            .unwrap()
            .is_none());
        assert!(store
            .finish_line("w", &running[0], &ok_result(1))
            .await
            .unwrap());
        let fin = store
            .claim_finalization("f", 2_000, 60_000, 9)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(fin.status, BatchStatus::Cancelling);
        assert!(store
            .complete_batch("batch_c", "f", BatchStatus::Cancelled, None, None, 10)
            .await
            .unwrap());
        let b = store.get_batch("batch_c").await.unwrap().unwrap();
        assert_eq!(
            (b.status, b.cancelled_at),
            (BatchStatus::Cancelled, Some(10))
        );
        assert_eq!(store.batch_counts("batch_c").await.unwrap().completed, 1);
    }
}

#[tokio::test]
async fn validation_failures_and_cancellation_during_validation() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        store.create_batch(&new_batch("batch_f")).await.unwrap();
        store
            .claim_validation("w", 1_000, 60_000)
            .await
            .unwrap()
            .unwrap();
        assert!(store.fail_batch("batch_f", "w", "[]", 3).await.unwrap());
        let b = store.get_batch("batch_f").await.unwrap().unwrap();
        assert_eq!(
            (b.status, b.failed_at, b.errors.as_deref()),
            (BatchStatus::Failed, Some(3), Some("[]"))
        );

        store.create_batch(&new_batch("batch_v")).await.unwrap();
        store
            .claim_validation("w", 1_000, 60_000)
            .await
            .unwrap()
            .unwrap();
        store.cancel_batch("batch_v", 4).await.unwrap();
        // The validator finds it cancelled: nothing is started, its claim is given up.
        assert!(!store
            .start_batch("batch_v", "w", None, &lines(2), 5)
            .await
            .unwrap());
        let fin = store
            .claim_finalization("f", 1_001, 60_000, 6)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(fin.id, "batch_v");
        assert_eq!(store.batch_counts("batch_v").await.unwrap().total, 0);
    }
}

#[tokio::test]
async fn expired_batches_finalize_with_their_unfinished_lines() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        started(&store, "batch_e", 2).await;
        // Before the expiry nothing is ready; after it the batch finalizes with lines pending.
        let expires = 1_700_086_400;
        assert!(store
            .claim_finalization("f", 1, 60_000, expires)
            .await
            .unwrap()
            .is_none());
        let fin = store
            .claim_finalization("f", 1, 60_000, expires + 1)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(fin.status, BatchStatus::Finalizing);
        let left = store.unfinished_lines("batch_e").await.unwrap();
        assert_eq!(left, [(1, "req-0".to_string()), (2, "req-1".to_string())]);
        for (line, _) in left {
            store.end_line("batch_e", line, "{}").await.unwrap();
        }
        let c = store.batch_counts("batch_e").await.unwrap();
        assert_eq!((c.completed, c.failed), (0, 2));
    }
}

/// Two stores on one database (two servers) with several workers each: every line is claimed
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_workers_never_claim_a_line_twice() {
    for db in databases().await.into_iter().filter(|d| d.persistent) {
        let a = Store::connect(&db.url).await.unwrap();
        let b = Store::connect(&db.url).await.unwrap();
        started(&a, "batch_x", 120).await;
        let mut tasks = Vec::new();
        for w in 0..8 {
            let store = if w % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                let name = format!("w{w}");
                let mut mine = Vec::new();
                loop {
                    let got = store.claim_lines(&name, 1_000, 60_000, 3).await.unwrap();
                    if got.is_empty() {
                        break;
                    }
                    for l in got {
                        assert!(store
                            .finish_line(&name, &l, &ok_result(l.line))
                            .await
                            .unwrap());
                        mine.push(l.line);
                    }
                }
                mine
            }));
        }
        let mut seen = HashSet::new();
        let mut total = 0;
        for t in tasks {
            for line in t.await.unwrap() {
                total += 1;
                assert!(
                    seen.insert(line),
                    "line {line} claimed twice on {:?}",
                    db.backend
                );
            }
        }
        assert_eq!(total, 120);
        assert_eq!(a.batch_counts("batch_x").await.unwrap().completed, 120);
    }
}

fn stored(id: &str, model: &str, metadata: &[(&str, &str)]) -> StoredCompletion {
    StoredCompletion {
        id: id.into(),
        created: 1_700_000_000,
        model: model.into(),
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        request: r#"{"messages":[]}"#.into(),
        response: r#"{"id":"x"}"#.into(),
    }
}

#[tokio::test]
async fn stored_completions_filter_by_model_and_metadata() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        store
            .insert_completion(&stored("c1", "nano", &[("team", "a"), ("k", "1")]))
            .await
            .unwrap();
        store
            .insert_completion(&stored("c2", "mini", &[("team", "a")]))
            .await
            .unwrap();
        store
            .insert_completion(&stored("c3", "nano", &[("team", "b")]))
            .await
            .unwrap();
        let ids = |l: ferrum_store::Listed<StoredCompletion>| {
            l.items.into_iter().map(|c| c.id).collect::<Vec<_>>()
        };
        let all = page(None, 20, Order::Asc);
        let team_a = CompletionFilter {
            model: None,
            metadata: vec![("team".into(), "a".into())],
        };
        assert_eq!(
            ids(store.list_completions(&team_a, &all).await.unwrap()),
            ["c1", "c2"]
        );
        let nano_a = CompletionFilter {
            model: Some("nano".into()),
            ..team_a.clone()
        };
        assert_eq!(
            ids(store.list_completions(&nano_a, &all).await.unwrap()),
            ["c1"]
        );
        let got = store.get_completion("c1").await.unwrap().unwrap();
        assert_eq!(got, stored("c1", "nano", &[("k", "1"), ("team", "a")]));

        assert!(store
            .update_completion_metadata("c1", &[("team".into(), "b".into())])
            .await
            .unwrap());
        assert_eq!(
            ids(store.list_completions(&team_a, &all).await.unwrap()),
            ["c2"]
        );
        assert!(!store.update_completion_metadata("nope", &[]).await.unwrap());
        assert!(store.delete_completion("c2").await.unwrap());
        assert!(!store.delete_completion("c2").await.unwrap());
        let everything = CompletionFilter::default();
        let desc = page(None, 1, Order::Desc);
        let first = store.list_completions(&everything, &desc).await.unwrap();
        assert!(first.has_more);
        assert_eq!(ids(first), ["c3"]);
    }
}
