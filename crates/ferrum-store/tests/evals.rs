//! Evals in the store, run once per backend (in-memory SQLite, a SQLite file, and Postgres when
//! `FERRUM_TEST_POSTGRES_URL` is set): a run through its claims (data source read once, each
//! item claimed by one worker, a dead worker's items taken over when their lease runs out, a
//! result written only by the item's owner, once), the sums a run reports, output item paging
//! and filters, cancel, and deleting a run or an eval with everything under it.

mod common;

use common::databases;
use ferrum_store::{
    EvalRecord, ItemOutcome, ItemResult, ModelUsage, NewItem, Order, OutputFilter, Page, RunRecord,
    RunStatus, Store, UsageRecord,
};

const LEASE_MS: i64 = 60_000;

fn eval(id: &str) -> EvalRecord {
    EvalRecord {
        id: id.into(),
        created_at: 1,
        name: "e".into(),
        metadata: None,
        data_source_config: r#"{"type":"custom"}"#.into(),
        testing_criteria: "[]".into(),
    }
}

fn run(id: &str, eval_id: &str) -> RunRecord {
    RunRecord {
        id: id.into(),
        eval_id: eval_id.into(),
        created_at: 2,
        name: "r".into(),
        model: "gpt-4.1-nano".into(),
        status: RunStatus::Queued,
        data_source: r#"{"type":"jsonl"}"#.into(),
        metadata: None,
        error: None,
    }
}

fn items(n: usize) -> Vec<NewItem> {
    (0..n)
        .map(|i| NewItem {
            item: format!(r#"{{"i":{i}}}"#),
            given: None,
        })
        .collect()
}

fn result(run: &str, index: i64, outcome: ItemOutcome) -> ItemResult {
    let passed = outcome == ItemOutcome::Pass;
    ItemResult {
        outcome,
        created_at: 3,
        results: "[]".into(),
        sample: "{}".into(),
        usage: vec![ModelUsage {
            model: "gpt-4.1-nano".into(),
            invocations: 2,
            prompt_tokens: 10,
            cached_tokens: 4,
            completion_tokens: 5,
        }],
        criteria: if outcome == ItemOutcome::Error {
            vec![]
        } else {
            vec![("c1".into(), passed), ("c2".into(), true)]
        },
        ledger: vec![UsageRecord {
            id: format!("{run}-{index}-0"),
            created: 3,
            model: "gpt-4.1-nano".into(),
            endpoint: "batch.evals".into(),
            prompt_tokens: 10,
            cached_tokens: 4,
            completion_tokens: 5,
            cost_usd: 0.5,
            batch: true,
        }],
    }
}

fn page(after: Option<&str>, limit: usize, order: Order) -> Page {
    Page {
        after: after.map(String::from),
        limit,
        order,
    }
}

#[tokio::test]
async fn a_run_through_its_claims_on_every_backend() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        check_run(&store).await;
        check_delete(&store).await;
    }
}

async fn check_run(store: &Store) {
    store.create_eval(&eval("eval_a")).await.unwrap();
    store.create_run(&run("evalrun_a", "eval_a")).await.unwrap();
    // The data source is read by one worker at a time.
    let claimed = store
        .claim_run("w1", 1_000, LEASE_MS)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.id, "evalrun_a");
    assert!(store
        .claim_run("w2", 1_000, LEASE_MS)
        .await
        .unwrap()
        .is_none());
    assert!(!store.start_run("evalrun_a", "w2", &items(5)).await.unwrap());
    assert!(store.start_run("evalrun_a", "w1", &items(5)).await.unwrap());
    let r = store.find_run("evalrun_a").await.unwrap().unwrap();
    assert_eq!(r.status, RunStatus::InProgress);

    // Items are claimed once; a dead worker's are taken over when its lease runs out.
    let w1 = store.claim_items("w1", 1_000, LEASE_MS, 3).await.unwrap();
    assert_eq!(w1.iter().map(|i| i.index).collect::<Vec<_>>(), [0, 1, 2]);
    let mid = 1_000 + LEASE_MS / 2;
    let w2 = store.claim_items("w2", mid, LEASE_MS, 10).await.unwrap();
    assert_eq!(w2.iter().map(|i| i.index).collect::<Vec<_>>(), [3, 4]);
    assert!(store
        .claim_items("w2", mid, LEASE_MS, 10)
        .await
        .unwrap()
        .is_empty());
    let late = 1_000 + LEASE_MS + 1;
    let taken = store.claim_items("w2", late, LEASE_MS, 10).await.unwrap();
    assert_eq!(taken.iter().map(|i| i.index).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(taken[0].id, w1[0].id, "an item keeps its output item id");
    // The dead worker's write is refused; the owner's lands once.
    assert!(!store
        .finish_item("w1", &w1[0], &result("evalrun_a", 0, ItemOutcome::Pass))
        .await
        .unwrap());
    let outcomes = [
        ItemOutcome::Pass,
        ItemOutcome::Fail,
        ItemOutcome::Error,
        ItemOutcome::Pass,
    ];
    for (item, outcome) in taken.iter().chain(&w2[..1]).zip(outcomes) {
        assert!(store
            .finish_item("w2", item, &result("evalrun_a", item.index, outcome))
            .await
            .unwrap());
        assert!(!store
            .finish_item("w2", item, &result("evalrun_a", item.index, outcome))
            .await
            .unwrap());
    }
    assert!(
        store.complete_runs().await.unwrap().is_empty(),
        "item 4 is still running"
    );
    let counts = store.run_counts("evalrun_a").await.unwrap();
    assert_eq!(
        (counts.total, counts.passed, counts.failed, counts.errored),
        (5, 2, 1, 1)
    );
    assert!(store
        .finish_item("w2", &w2[1], &result("evalrun_a", 4, ItemOutcome::Fail))
        .await
        .unwrap());
    assert_eq!(store.complete_runs().await.unwrap(), ["evalrun_a"]);
    assert_eq!(
        store.find_run("evalrun_a").await.unwrap().unwrap().status,
        RunStatus::Completed
    );

    // The sums a run reports, and the ledger billed once per item.
    let usage = store.run_usage("evalrun_a").await.unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(
        (
            usage[0].invocations,
            usage[0].prompt_tokens,
            usage[0].cached_tokens,
            usage[0].completion_tokens
        ),
        (10, 50, 20, 25)
    );
    let criteria = store.run_criteria("evalrun_a").await.unwrap();
    let c1 = criteria.iter().find(|c| c.criterion == "c1").unwrap();
    assert_eq!((c1.passed, c1.failed), (2, 2));
    let totals = store.usage_totals(None).await.unwrap();
    assert_eq!(totals[0].requests, 5);

    // Output items: data source order, paging, filters.
    let all = store
        .list_output_items("evalrun_a", OutputFilter::All, &page(None, 2, Order::Asc))
        .await
        .unwrap();
    assert_eq!(
        all.items.iter().map(|o| o.index).collect::<Vec<_>>(),
        [0, 1]
    );
    assert!(all.has_more);
    let rest = store
        .list_output_items(
            "evalrun_a",
            OutputFilter::All,
            &page(Some(&all.items[1].id), 10, Order::Asc),
        )
        .await
        .unwrap();
    assert_eq!(
        rest.items.iter().map(|o| o.index).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    let failed = store
        .list_output_items(
            "evalrun_a",
            OutputFilter::Failed,
            &page(None, 10, Order::Desc),
        )
        .await
        .unwrap();
    assert_eq!(
        failed.items.iter().map(|o| o.index).collect::<Vec<_>>(),
        [4, 2, 1]
    );
    let one = store
        .get_output_item("evalrun_a", &all.items[0].id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (one.outcome, one.item.as_str()),
        (ItemOutcome::Pass, r#"{"i":0}"#)
    );

    // Cancel: a queued run stops, a finished one stays.
    store.create_run(&run("evalrun_b", "eval_a")).await.unwrap();
    let (changed, b) = store
        .cancel_run("eval_a", "evalrun_b")
        .await
        .unwrap()
        .unwrap();
    assert!(changed && b.status == RunStatus::Canceled);
    assert!(store
        .claim_run("w1", late, LEASE_MS)
        .await
        .unwrap()
        .is_none());
    let (changed, a) = store
        .cancel_run("eval_a", "evalrun_a")
        .await
        .unwrap()
        .unwrap();
    assert!(!changed && a.status == RunStatus::Completed);
    let runs = store
        .list_runs(
            "eval_a",
            Some(RunStatus::Canceled),
            &page(None, 10, Order::Asc),
        )
        .await
        .unwrap();
    assert_eq!(
        runs.items.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["evalrun_b"]
    );
}

async fn check_delete(store: &Store) {
    store.create_eval(&eval("eval_d")).await.unwrap();
    store.create_run(&run("evalrun_d", "eval_d")).await.unwrap();
    store
        .claim_run("w1", 1_000, LEASE_MS)
        .await
        .unwrap()
        .unwrap();
    assert!(store.start_run("evalrun_d", "w1", &items(2)).await.unwrap());
    let claimed = store.claim_items("w1", 1_000, LEASE_MS, 10).await.unwrap();
    assert!(store.delete_run("eval_d", "evalrun_d").await.unwrap());
    assert!(!store.delete_run("eval_d", "evalrun_d").await.unwrap());
    // A worker grading an item of a deleted run writes nothing.
    assert!(!store
        .finish_item(
            "w1",
            &claimed[0],
            &result("evalrun_d", 0, ItemOutcome::Pass)
        )
        .await
        .unwrap());
    let updated = store
        .update_eval("eval_d", Some("renamed"), Some(Some(r#"{"k":"v"}"#.into())))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (updated.name.as_str(), updated.metadata.as_deref()),
        ("renamed", Some(r#"{"k":"v"}"#))
    );
    assert!(store.delete_eval("eval_a").await.unwrap());
    assert!(store.get_eval("eval_a").await.unwrap().is_none());
    assert!(store.find_run("evalrun_a").await.unwrap().is_none());
    assert!(store.run_usage("evalrun_a").await.unwrap().is_empty());
    let left = store.list_evals(&page(None, 10, Order::Asc)).await.unwrap();
    assert_eq!(
        left.items.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["eval_d"]
    );
}
