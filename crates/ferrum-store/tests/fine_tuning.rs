//! Fine-tuning jobs in the store, run once per backend (in-memory SQLite, a SQLite file, and
//! Postgres when `FERRUM_TEST_POSTGRES_URL` is set): the life of a job through its claims,
//! events written once per step even when a resumed job replays it, checkpoints, a dead
//! worker's job taken over, cancel / pause / resume, paging, and fine-tuned models.

mod common;

use common::databases;
use ferrum_store::{
    CheckpointRecord, FileRecord, FineTunedModel, JobFilter, JobRecord, JobStatus, JobSuccess,
    NewEvent, Order, Page, Store, UsageRecord,
};

const LEASE_MS: i64 = 60_000;

fn new_job(id: &str, metadata: Option<&[(&str, &str)]>) -> JobRecord {
    JobRecord {
        id: id.into(),
        created_at: 100,
        model: "gpt-4.1-nano-2025-04-14".into(),
        base_tier: "gpt-4.1-nano".into(),
        training_file: "file-train".into(),
        validation_file: None,
        status: JobStatus::ValidatingFiles,
        hyperparameters: r#"{"n_epochs":"auto"}"#.into(),
        method: r#"{"type":"supervised"}"#.into(),
        seed: 42,
        suffix: Some("custom".into()),
        metadata: metadata.map(|m| {
            m.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        }),
        error: None,
        fine_tuned_model: None,
        trained_tokens: None,
        estimated_finish: None,
        finished_at: None,
        result_files: Vec::new(),
    }
}

fn page(after: Option<&str>, limit: usize) -> Page {
    Page {
        after: after.map(String::from),
        limit,
        order: Order::Desc,
    }
}

fn step_event(step: u64) -> NewEvent {
    NewEvent {
        level: "info",
        kind: "metrics",
        message: format!("Step {step}/4: training loss=1.00"),
        data: format!(r#"{{"step":{step}}}"#),
        dedup: Some(format!("step-{step}")),
    }
}

fn ckpt(job: &str, step: u64) -> CheckpointRecord {
    CheckpointRecord {
        id: format!("ftckpt_{job}{step}"),
        job_id: job.into(),
        created_at: 200 + step as i64,
        step_number: step,
        epoch: step / 2,
        metrics: format!(r#"{{"step":{step}}}"#),
        fine_tuned_model_checkpoint: format!("ft:m:ferrum::x:ckpt-step-{step}"),
        adapter_blob: format!("ftckpt-{job}-{step}-adapter"),
        state_blob: format!("ftckpt-{job}-{step}-state"),
    }
}

fn ckpt_event(step: u64) -> NewEvent {
    NewEvent::info(format!("Checkpoint created at step {step}")).once(format!("checkpoint-{step}"))
}

async fn messages(store: &Store, job: &str) -> Vec<String> {
    let listed = store
        .list_fine_tuning_events(job, &page(None, 100))
        .await
        .unwrap();
    // Oldest first, for reading.
    listed.items.into_iter().rev().map(|e| e.message).collect()
}

/// Claims `id` for validation and queues it.
async fn validated(store: &Store, id: &str, worker: &str) {
    let claimed = store
        .claim_fine_tuning_validation(worker, 1_000, LEASE_MS)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.id, id);
    assert!(store
        .queue_fine_tuning_job(
            id,
            worker,
            r#"{"n_epochs":2,"batch_size":1,"learning_rate_multiplier":2.0}"#,
            r#"{"type":"supervised"}"#,
            &NewEvent::info("Files validated, moving job to queued state").once("validated"),
            101,
        )
        .await
        .unwrap());
}

#[tokio::test]
async fn a_job_runs_from_validation_to_a_fine_tuned_model() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        let job = new_job("ftjob-a", Some(&[("team", "x")]));
        store
            .create_fine_tuning_job(
                &job,
                &NewEvent::info("Created fine-tuning job").once("created"),
            )
            .await
            .unwrap();
        assert_eq!(
            store.get_fine_tuning_job("ftjob-a").await.unwrap(),
            Some(job)
        );
        // Nothing to train before validation.
        assert!(store
            .claim_fine_tuning_run("w1", 1_000, LEASE_MS)
            .await
            .unwrap()
            .is_none());
        validated(&store, "ftjob-a", "w1").await;
        let running = store
            .claim_fine_tuning_run("w1", 2_000, LEASE_MS)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(running.status, JobStatus::Running);
        assert!(running.hyperparameters.contains("\"n_epochs\":2"));
        // Another worker finds nothing while the lease holds.
        assert!(store
            .claim_fine_tuning_run("w2", 3_000, LEASE_MS)
            .await
            .unwrap()
            .is_none());
        for step in 1..=2 {
            assert!(store
                .record_fine_tuning_step(
                    "ftjob-a",
                    "w1",
                    step * 10,
                    Some(500),
                    &step_event(step),
                    150
                )
                .await
                .unwrap());
        }
        assert!(store
            .record_fine_tuning_checkpoint("w1", &ckpt("ftjob-a", 2), 20, &ckpt_event(2))
            .await
            .unwrap());
        let job = store.get_fine_tuning_job("ftjob-a").await.unwrap().unwrap();
        assert_eq!(job.trained_tokens, Some(20));
        assert_eq!(job.estimated_finish, Some(500));
        for step in 3..=4 {
            assert!(store
                .record_fine_tuning_step("ftjob-a", "w1", step * 10, None, &step_event(step), 150)
                .await
                .unwrap());
        }
        assert!(store
            .record_fine_tuning_checkpoint("w1", &ckpt("ftjob-a", 4), 40, &ckpt_event(4))
            .await
            .unwrap());
        assert_eq!(
            store
                .last_fine_tuning_checkpoint("ftjob-a")
                .await
                .unwrap()
                .unwrap()
                .step_number,
            4
        );
        let model = FineTunedModel {
            id: "ft:gpt-4.1-nano-2025-04-14:ferrum:custom:a".into(),
            created: 300,
            base_tier: "gpt-4.1-nano".into(),
            job_id: "ftjob-a".into(),
            adapter_blob: "ftmodel-a".into(),
            deleted: false,
        };
        let success = JobSuccess {
            model: model.clone(),
            result_file: Some(FileRecord {
                id: "file-results".into(),
                created_at: 300,
                filename: "step_metrics.csv".into(),
                purpose: "fine-tune-results".into(),
                bytes: 10,
                expires_at: None,
            }),
            trained_tokens: 40,
            usage: Some(UsageRecord {
                id: "ftjob-a".into(),
                created: 300,
                model: model.id.clone(),
                endpoint: "fine_tuning.jobs".into(),
                prompt_tokens: 40,
                cached_tokens: 0,
                completion_tokens: 0,
                cost_usd: 0.5,
                batch: false,
            }),
            events: vec![
                NewEvent::info("New fine-tuned model created").once("model"),
                NewEvent::info("The job has successfully completed").once("succeeded"),
            ],
            now: 300,
        };
        // Only the owner finishes it.
        assert!(!store
            .succeed_fine_tuning_job("ftjob-a", "w2", &success)
            .await
            .unwrap());
        assert!(store
            .succeed_fine_tuning_job("ftjob-a", "w1", &success)
            .await
            .unwrap());
        let job = store.get_fine_tuning_job("ftjob-a").await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Succeeded);
        assert_eq!(job.fine_tuned_model.as_deref(), Some(model.id.as_str()));
        assert_eq!(job.result_files, ["file-results"]);
        assert_eq!(job.finished_at, Some(300));
        assert_eq!(job.estimated_finish, None);
        assert!(store.get_file("file-results").await.unwrap().is_some());
        assert_eq!(store.usage_totals(None).await.unwrap()[0].prompt_tokens, 40);
        assert_eq!(
            messages(&store, "ftjob-a").await,
            [
                "Created fine-tuning job",
                "Files validated, moving job to queued state",
                "Step 1/4: training loss=1.00",
                "Step 2/4: training loss=1.00",
                "Checkpoint created at step 2",
                "Step 3/4: training loss=1.00",
                "Step 4/4: training loss=1.00",
                "Checkpoint created at step 4",
                "New fine-tuned model created",
                "The job has successfully completed",
            ]
        );
        let metrics = store.fine_tuning_metrics("ftjob-a").await.unwrap();
        assert_eq!(metrics.len(), 4);
        assert_eq!(metrics[0].data, r#"{"step":1}"#);
        assert!(metrics.iter().all(|e| e.id.starts_with("ftevent-")));

        // Checkpoints page newest first; one is found by the name it is served under.
        let first = store
            .list_fine_tuning_checkpoints("ftjob-a", &page(None, 1))
            .await
            .unwrap();
        assert_eq!(first.items[0].step_number, 4);
        assert!(first.has_more);
        let rest = store
            .list_fine_tuning_checkpoints("ftjob-a", &page(Some(&first.items[0].id), 1))
            .await
            .unwrap();
        assert_eq!(rest.items[0].step_number, 2);
        assert!(!rest.has_more);
        let named = store
            .fine_tuning_checkpoint_by_name("ft:m:ferrum::x:ckpt-step-2")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(named.state_blob, "ftckpt-ftjob-a-2-state");

        // The model is listed until deleted, and stays known (flagged) afterwards.
        assert_eq!(
            store.list_fine_tuned_models().await.unwrap(),
            vec![model.clone()]
        );
        assert!(store.delete_fine_tuned_model(&model.id).await.unwrap());
        assert!(!store.delete_fine_tuned_model(&model.id).await.unwrap());
        assert!(store.list_fine_tuned_models().await.unwrap().is_empty());
        assert!(
            store
                .get_fine_tuned_model(&model.id)
                .await
                .unwrap()
                .unwrap()
                .deleted
        );
        assert!(store
            .get_fine_tuned_model("ft:nope")
            .await
            .unwrap()
            .is_none());
    }
}

#[tokio::test]
async fn a_dead_workers_job_resumes_elsewhere_without_doubled_events_or_checkpoints() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        store
            .create_fine_tuning_job(&new_job("ftjob-b", None), &NewEvent::info("Created"))
            .await
            .unwrap();
        validated(&store, "ftjob-b", "w1").await;
        store
            .claim_fine_tuning_run("w1", 2_000, LEASE_MS)
            .await
            .unwrap()
            .unwrap();
        for step in 1..=2 {
            store
                .record_fine_tuning_step("ftjob-b", "w1", step, None, &step_event(step), 150)
                .await
                .unwrap();
        }
        store
            .record_fine_tuning_checkpoint("w1", &ckpt("ftjob-b", 2), 2, &ckpt_event(2))
            .await
            .unwrap();
        store
            .record_fine_tuning_step("ftjob-b", "w1", 3, None, &step_event(3), 150)
            .await
            .unwrap();
        // w1 dies (kill -9): its lease runs out and w2 takes the job over.
        assert!(store
            .claim_fine_tuning_run("w2", 2_000 + LEASE_MS - 1, LEASE_MS)
            .await
            .unwrap()
            .is_none());
        let taken = store
            .claim_fine_tuning_run("w2", 2_001 + LEASE_MS, LEASE_MS)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(taken.id, "ftjob-b");
        assert_eq!(taken.status, JobStatus::Running);
        // w1 stalled rather than died: whatever it writes now is refused.
        assert!(!store
            .record_fine_tuning_step("ftjob-b", "w1", 4, None, &step_event(4), 150)
            .await
            .unwrap());
        assert!(!store
            .renew_fine_tuning_lease("ftjob-b", "w1", 70_000, LEASE_MS)
            .await
            .unwrap());
        assert!(store
            .renew_fine_tuning_lease("ftjob-b", "w2", 70_000, LEASE_MS)
            .await
            .unwrap());
        // w2 resumes from the checkpoint at step 2 and replays steps 3 and 4.
        let resume = store
            .last_fine_tuning_checkpoint("ftjob-b")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resume.step_number, 2);
        for step in 3..=4 {
            assert!(store
                .record_fine_tuning_step("ftjob-b", "w2", step, None, &step_event(step), 150)
                .await
                .unwrap());
        }
        // A checkpoint recorded twice (the same step again) stays one.
        for _ in 0..2 {
            assert!(store
                .record_fine_tuning_checkpoint("w2", &ckpt("ftjob-b", 4), 4, &ckpt_event(4))
                .await
                .unwrap());
        }
        assert_eq!(
            messages(&store, "ftjob-b").await,
            [
                "Created",
                "Files validated, moving job to queued state",
                "Step 1/4: training loss=1.00",
                "Step 2/4: training loss=1.00",
                "Checkpoint created at step 2",
                "Step 3/4: training loss=1.00",
                "Step 4/4: training loss=1.00",
                "Checkpoint created at step 4",
            ]
        );
        assert_eq!(
            store
                .fine_tuning_checkpoints("ftjob-b")
                .await
                .unwrap()
                .len(),
            2
        );
        // A clean shutdown hands the job back at once.
        store
            .release_fine_tuning_job("ftjob-b", "w2")
            .await
            .unwrap();
        let again = store
            .claim_fine_tuning_run("w3", 71_000, LEASE_MS)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.id, "ftjob-b");
    }
}

#[tokio::test]
async fn cancel_pause_resume_and_failure() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        for id in ["ftjob-c1", "ftjob-c2", "ftjob-c3"] {
            store
                .create_fine_tuning_job(&new_job(id, None), &NewEvent::info("Created"))
                .await
                .unwrap();
        }
        // Cancelling a job waiting for validation: nobody claims it any more.
        let (changed, job) = store
            .cancel_fine_tuning_job("ftjob-c1", 120)
            .await
            .unwrap()
            .unwrap();
        assert!(changed);
        assert_eq!(job.status, JobStatus::Cancelled);
        assert_eq!(job.finished_at, Some(120));
        let (again, _) = store
            .cancel_fine_tuning_job("ftjob-c1", 121)
            .await
            .unwrap()
            .unwrap();
        assert!(!again);
        assert!(store
            .cancel_fine_tuning_job("ftjob-none", 1)
            .await
            .unwrap()
            .is_none());
        validated(&store, "ftjob-c2", "w1").await;

        // A running job paused: its worker's writes are refused; resumed, it is claimable.
        store
            .claim_fine_tuning_run("w1", 2_000, LEASE_MS)
            .await
            .unwrap()
            .unwrap();
        let (paused, job) = store
            .pause_fine_tuning_job("ftjob-c2", 130)
            .await
            .unwrap()
            .unwrap();
        assert!(paused);
        assert_eq!(job.status, JobStatus::Paused);
        assert!(!store
            .record_fine_tuning_step("ftjob-c2", "w1", 1, None, &step_event(1), 131)
            .await
            .unwrap());
        assert!(!store
            .renew_fine_tuning_lease("ftjob-c2", "w1", 3_000, LEASE_MS)
            .await
            .unwrap());
        let (resumed, job) = store
            .resume_fine_tuning_job("ftjob-c2", 140)
            .await
            .unwrap()
            .unwrap();
        assert!(resumed);
        assert_eq!(job.status, JobStatus::Queued);
        assert!(
            !store
                .resume_fine_tuning_job("ftjob-c2", 141)
                .await
                .unwrap()
                .unwrap()
                .0
        );
        let claimed = store
            .claim_fine_tuning_run("w2", 3_000, LEASE_MS)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claimed.id, "ftjob-c2");
        assert!(store
            .fail_fine_tuning_job(
                "ftjob-c2",
                "w2",
                r#"{"code":"x","message":"y","param":null}"#,
                &NewEvent::info("failed").once("failed"),
                150,
            )
            .await
            .unwrap());
        let job = store
            .get_fine_tuning_job("ftjob-c2")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(job.status, JobStatus::Failed);
        assert!(job.error.unwrap().contains("\"code\":\"x\""));
        // Ended jobs are neither cancelled nor paused.
        assert!(
            !store
                .cancel_fine_tuning_job("ftjob-c2", 160)
                .await
                .unwrap()
                .unwrap()
                .0
        );
        assert!(
            !store
                .pause_fine_tuning_job("ftjob-c2", 160)
                .await
                .unwrap()
                .unwrap()
                .0
        );
        assert_eq!(
            messages(&store, "ftjob-c2")
                .await
                .last()
                .map(String::as_str),
            Some("failed")
        );
        // A validation failure ends a job in validating_files.
        store
            .claim_fine_tuning_validation("w3", 4_000, LEASE_MS)
            .await
            .unwrap()
            .unwrap();
        assert!(store
            .fail_fine_tuning_job("ftjob-c3", "w3", "{}", &NewEvent::info("bad file"), 170)
            .await
            .unwrap());
    }
}

#[tokio::test]
async fn jobs_and_events_page_newest_first_and_filter_by_metadata() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        for (i, team) in ["a", "b", "a"].iter().enumerate() {
            store
                .create_fine_tuning_job(
                    &new_job(&format!("ftjob-{i}"), Some(&[("team", team), ("n", "1")])),
                    &NewEvent::info("Created"),
                )
                .await
                .unwrap();
        }
        store
            .create_fine_tuning_job(&new_job("ftjob-3", None), &NewEvent::info("Created"))
            .await
            .unwrap();
        let all = store
            .list_fine_tuning_jobs(&JobFilter::default(), &page(None, 2))
            .await
            .unwrap();
        let ids: Vec<&str> = all.items.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["ftjob-3", "ftjob-2"]);
        assert!(all.has_more);
        let rest = store
            .list_fine_tuning_jobs(&JobFilter::default(), &page(Some("ftjob-2"), 10))
            .await
            .unwrap();
        let ids: Vec<&str> = rest.items.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["ftjob-1", "ftjob-0"]);
        assert!(!rest.has_more);
        let filter = JobFilter {
            metadata: vec![("team".into(), "a".into()), ("n".into(), "1".into())],
        };
        let team_a = store
            .list_fine_tuning_jobs(&filter, &page(None, 10))
            .await
            .unwrap();
        let ids: Vec<&str> = team_a.items.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["ftjob-2", "ftjob-0"]);
        assert_eq!(
            team_a.items[0].metadata,
            Some(vec![("n".into(), "1".into()), ("team".into(), "a".into())])
        );

        for i in 0..5 {
            store
                .add_fine_tuning_event("ftjob-0", &NewEvent::info(format!("e{i}")), 200)
                .await
                .unwrap();
        }
        // Once-only events are skipped when recorded again.
        assert!(store
            .add_fine_tuning_event("ftjob-0", &NewEvent::info("once").once("k"), 200)
            .await
            .unwrap());
        assert!(!store
            .add_fine_tuning_event("ftjob-0", &NewEvent::info("once").once("k"), 200)
            .await
            .unwrap());
        let first = store
            .list_fine_tuning_events("ftjob-0", &page(None, 3))
            .await
            .unwrap();
        let msgs: Vec<&str> = first.items.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(msgs, ["once", "e4", "e3"]);
        assert!(first.has_more);
        let next = store
            .list_fine_tuning_events("ftjob-0", &page(Some(&first.items[2].id), 10))
            .await
            .unwrap();
        let msgs: Vec<&str> = next.items.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(msgs, ["e2", "e1", "e0", "Created"]);
        assert!(!next.has_more);
        // Another job's events stay its own.
        assert_eq!(
            store
                .list_fine_tuning_events("ftjob-1", &page(None, 10))
                .await
                .unwrap()
                .items
                .len(),
            1
        );
    }
}
