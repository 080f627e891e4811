//! Projects, keys, rate-limit windows and the usage report, run once per backend (see
//! `common`): key lookup by hash and revocation, limits held by concurrent admissions from
//! separate stores (as two servers on one database), and bucket sums equal to the ledger.

mod common;

use common::databases;
use ferrum_store::{
    Admission, Attribution, DefaultLimits, KeyScope, LimitKind, NewKey, Order, Page, ProjectRecord,
    RateLimitRecord, ServiceAccountRecord, Store, UsageQuery, UsageRecord, Window,
};

fn project(id: &str) -> ProjectRecord {
    ProjectRecord {
        id: id.into(),
        name: format!("name of {id}"),
        created_at: 1_700_000_000,
        archived_at: None,
        external_key_id: None,
    }
}

fn key(id: &str, project_id: &str, hash: &str) -> NewKey {
    NewKey {
        id: id.into(),
        scope: KeyScope::Project {
            project_id: project_id.into(),
            service_account_id: format!("sa-{id}"),
        },
        name: "Secret Key".into(),
        hash: hash.into(),
        redacted: "sk-proj-...abcd".into(),
        created_at: 1_700_000_001,
        expires_at: None,
    }
}

fn account(id: &str, project_id: &str) -> ServiceAccountRecord {
    ServiceAccountRecord {
        id: id.into(),
        project_id: project_id.into(),
        name: "bot".into(),
        role: "member".into(),
        created_at: 1_700_000_001,
    }
}

fn page(limit: usize) -> Page {
    Page {
        after: None,
        limit,
        order: Order::Asc,
    }
}

#[tokio::test]
async fn projects_accounts_and_keys_live_and_die() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        assert!(!store.any_keys().await.unwrap(), "{}", db.url);
        for id in ["proj_a", "proj_b", "proj_c"] {
            store.create_project(&project(id)).await.unwrap();
        }
        store.archive_project("proj_b", 5).await.unwrap();
        let live = store.list_projects(false, &page(10)).await.unwrap();
        let ids: Vec<_> = live.items.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["proj_a", "proj_c"]);
        let all = store.list_projects(true, &page(2)).await.unwrap();
        assert_eq!((all.items.len(), all.has_more), (2, true));
        // Archiving again keeps the first time; renaming keeps the other fields.
        let b = store.archive_project("proj_b", 9).await.unwrap().unwrap();
        assert_eq!(b.archived_at, Some(5));
        let a = store
            .update_project("proj_a", Some("renamed"), None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((a.name.as_str(), a.created_at), ("renamed", 1_700_000_000));

        let k = key("key_1", "proj_a", "hash-1");
        store
            .create_service_account(&account("sa-key_1", "proj_a"), Some(&k))
            .await
            .unwrap();
        assert!(store.any_keys().await.unwrap());
        let found = store.find_key("hash-1").await.unwrap().unwrap();
        assert_eq!(found.key.scope, k.scope);
        assert_eq!(
            (found.key.last_used_at, found.project_archived_at),
            (None, None)
        );
        store.touch_key("key_1", 77).await.unwrap();
        let listed = store.list_keys(Some("proj_a"), &page(10)).await.unwrap();
        assert_eq!(listed.items.len(), 1);
        assert_eq!(listed.items[0].last_used_at, Some(77));
        assert!(store.find_key("hash-unknown").await.unwrap().is_none());

        // Revoked: found (so told apart from unknown) but marked, and gone from lists.
        assert!(store.delete_key("key_1", 80).await.unwrap());
        assert!(!store.delete_key("key_1", 81).await.unwrap());
        let found = store.find_key("hash-1").await.unwrap().unwrap();
        assert_eq!(found.key.deleted_at, Some(80));
        assert!(store.get_key("key_1").await.unwrap().is_none());
        assert!(
            store.any_keys().await.unwrap(),
            "revoked keys still secure the server"
        );

        // Deleting a service account revokes its keys; an archived project shows on its keys.
        let k2 = key("key_2", "proj_b", "hash-2");
        store
            .create_service_account(&account("sa-key_2", "proj_b"), Some(&k2))
            .await
            .unwrap();
        let found = store.find_key("hash-2").await.unwrap().unwrap();
        assert_eq!(found.project_archived_at, Some(5));
        assert!(store
            .delete_service_account("proj_b", "sa-key_2", 90)
            .await
            .unwrap());
        let found = store.find_key("hash-2").await.unwrap().unwrap();
        assert_eq!(found.key.deleted_at, Some(90));

        // Admin keys list apart from project keys.
        let admin = NewKey {
            scope: KeyScope::Admin,
            ..key("key_admin", "", "hash-admin")
        };
        store.create_key(&admin).await.unwrap();
        let admins = store.list_keys(None, &page(10)).await.unwrap();
        let ids: Vec<_> = admins.items.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(ids, ["key_admin"]);
    }
}

fn window(project: &str, start: i64) -> Window {
    Window {
        project_id: project.into(),
        model: "m".into(),
        kind: LimitKind::Minute,
        start,
    }
}

const DEFAULTS: DefaultLimits = DefaultLimits {
    requests: 1000,
    tokens: 1_000_000,
};

#[tokio::test]
async fn admissions_count_against_the_project_limits() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        store
            .set_rate_limit(&RateLimitRecord {
                project_id: "p".into(),
                model: "m".into(),
                max_requests_per_1_minute: 3,
                max_tokens_per_1_minute: 100,
                batch_1_day_max_input_tokens: 50,
                reserved_tokens_per_1_minute: 40,
            })
            .await
            .unwrap();
        assert_eq!(store.reserved_tokens("p", "m").await.unwrap(), 40);
        assert_eq!(store.reserved_tokens("p", "other").await.unwrap(), 0);
        let w = window("p", 60);
        let admitted = |requests, tokens| {
            Admission::Admitted(ferrum_store::WindowState {
                requests,
                tokens,
                max_requests: 3,
                max_tokens: 100,
            })
        };
        assert_eq!(
            store.admit(&w, 40, DEFAULTS).await.unwrap(),
            admitted(1, 40)
        );
        // Too many tokens: refused and not counted.
        let refused = store.admit(&w, 70, DEFAULTS).await.unwrap();
        assert!(matches!(refused, Admission::Refused(s) if s.requests == 1 && s.tokens == 40));
        // The estimate of the first request was 40, it used 10.
        store.correct_window(&w, -30).await.unwrap();
        assert_eq!(
            store.admit(&w, 70, DEFAULTS).await.unwrap(),
            admitted(2, 80)
        );
        assert_eq!(store.admit(&w, 0, DEFAULTS).await.unwrap(), admitted(3, 80));
        let refused = store.admit(&w, 0, DEFAULTS).await.unwrap();
        assert!(matches!(refused, Admission::Refused(s) if s.requests == 3));
        // A new minute starts from zero; another project has the defaults.
        assert_eq!(
            store.admit(&window("p", 120), 1, DEFAULTS).await.unwrap(),
            admitted(1, 1)
        );
        let other = store.admit(&window("q", 60), 500, DEFAULTS).await.unwrap();
        assert!(matches!(other, Admission::Admitted(s) if s.max_requests == 1000));
        // A request larger than the limit alone never gets a row.
        let huge = store.admit(&window("p", 180), 101, DEFAULTS).await.unwrap();
        assert!(matches!(huge, Admission::Refused(s) if s.requests == 0 && s.max_tokens == 100));
        // Batch days count against the batch limit only.
        let day = Window {
            kind: LimitKind::BatchDay,
            ..window("p", 0)
        };
        assert!(matches!(
            store.admit(&day, 50, DEFAULTS).await.unwrap(),
            Admission::Admitted(s) if s.tokens == 50 && s.max_tokens == 50
        ));
        assert!(matches!(
            store.admit(&day, 1, DEFAULTS).await.unwrap(),
            Admission::Refused(_)
        ));
        assert_eq!(store.prune_windows(120).await.unwrap(), 3, "{}", db.url);
    }
}

/// Two stores on one database (two servers) admitting at once never pass the limit together.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_servers_share_one_limit() {
    for db in databases().await.into_iter().filter(|d| d.persistent) {
        let a = Store::connect(&db.url).await.unwrap();
        let b = Store::connect(&db.url).await.unwrap();
        a.set_rate_limit(&RateLimitRecord {
            project_id: "p".into(),
            model: "m".into(),
            max_requests_per_1_minute: 25,
            max_tokens_per_1_minute: 1_000_000,
            batch_1_day_max_input_tokens: 1,
            reserved_tokens_per_1_minute: 0,
        })
        .await
        .unwrap();
        let mut tasks = Vec::new();
        for i in 0..60 {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                store.admit(&window("p", 600), 10, DEFAULTS).await.unwrap()
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            if let Admission::Admitted(_) = t.await.unwrap() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 25, "{}", db.url);
        let last = a.admit(&window("p", 600), 0, DEFAULTS).await.unwrap();
        assert!(matches!(last, Admission::Refused(s) if s.requests == 25 && s.tokens == 250));
    }
}

fn usage(id: &str, created: i64, model: &str, batch: bool, tokens: [u64; 3]) -> UsageRecord {
    UsageRecord {
        id: id.into(),
        created,
        model: model.into(),
        endpoint: if batch {
            "batch.chat.completions"
        } else {
            "chat.completions"
        }
        .into(),
        prompt_tokens: tokens[0],
        cached_tokens: tokens[1],
        completion_tokens: tokens[2],
        cost_usd: (tokens[0] + tokens[2]) as f64 * 0.25,
        batch,
    }
}

#[tokio::test]
async fn usage_groups_sum_the_ledger_per_bucket() {
    for db in databases().await {
        let store = Store::connect(&db.url).await.unwrap();
        let p = |project: &str, key: &str| Attribution {
            project_id: Some(project.into()),
            api_key_id: Some(key.into()),
            service_tier: None,
        };
        let rows = [
            (usage("r1", 1000, "m", false, [10, 2, 5]), p("pa", "ka")),
            (usage("r2", 1010, "m", false, [20, 0, 5]), p("pa", "ka")),
            (usage("r3", 1070, "m", true, [30, 0, 1]), p("pa", "ka")),
            (usage("r4", 1010, "n", false, [1, 0, 1]), p("pb", "kb")),
            (
                usage("r5", 1010, "m", false, [7, 0, 0]),
                Attribution::default(),
            ),
            (usage("r6", 999, "m", false, [100, 0, 0]), p("pa", "ka")),
        ];
        for (r, by) in &rows {
            store.record_usage_as(r, by).await.unwrap();
        }
        let mut emb = usage("e1", 1000, "emb", false, [9, 0, 0]);
        emb.endpoint = "embeddings".into();
        store.record_usage(&emb).await.unwrap();

        let q = UsageQuery {
            start: 1000,
            end: 1120,
            width: 60,
            endpoints: vec!["chat.completions".into(), "batch.chat.completions".into()],
            ..UsageQuery::default()
        };
        let groups = store.usage_groups(&q).await.unwrap();
        let summary: Vec<_> = groups
            .iter()
            .map(|g| {
                (
                    g.bucket_start,
                    g.project_id.as_deref(),
                    g.model.as_str(),
                    g.batch,
                    g.requests,
                    [g.prompt_tokens, g.cached_tokens, g.completion_tokens],
                    g.cost_usd,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (1000, None, "m", false, 1, [7, 0, 0], 1.75),
                (1000, Some("pa"), "m", false, 2, [30, 2, 10], 10.0),
                (1000, Some("pb"), "n", false, 1, [1, 0, 1], 0.5),
                (1060, Some("pa"), "m", true, 1, [30, 0, 1], 7.75),
            ],
            "{}",
            db.url
        );
        let only = UsageQuery {
            project_ids: vec!["pb".into()],
            batch: Some(false),
            endpoints: Vec::new(),
            ..q.clone()
        };
        let groups = store.usage_groups(&only).await.unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].api_key_id.as_deref(), Some("kb"));
    }
}
