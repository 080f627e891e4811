//! `ferrum evals`: the evals in the database and their runs with their scores, read from the
//! store as `ferrum usage` reads the ledger (no server needed).

use anyhow::Context;
use clap::Args;
use ferrum_store::{EvalRecord, Order, Page, RunRecord, Store};

#[derive(Args)]
pub struct EvalsArgs {
    /// Database URL (as for `serve`).
    #[arg(long, env = "FERRUM_DATABASE_URL")]
    pub database: Option<String>,
    /// Only this eval.
    #[arg(long)]
    pub eval: Option<String>,
}

pub fn evals(args: EvalsArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let url = args.database.unwrap_or_else(Store::default_url);
        let store = Store::connect(&url)
            .await
            .with_context(|| format!("opening the database {url}"))?;
        let evals = match &args.eval {
            Some(id) => vec![store
                .get_eval(id)
                .await?
                .with_context(|| format!("no eval {id} in {url}"))?],
            None => all_evals(&store).await?,
        };
        if evals.is_empty() {
            println!("no evals");
        }
        for e in &evals {
            print_eval(&store, e).await?;
        }
        Ok(())
    })
}

/// The first page of a list and each page after it, oldest first.
fn first_page() -> Page {
    Page {
        after: None,
        limit: 100,
        order: Order::Asc,
    }
}

async fn all_evals(store: &Store) -> anyhow::Result<Vec<EvalRecord>> {
    let mut page = first_page();
    let mut out = Vec::new();
    loop {
        let listed = store.list_evals(&page).await?;
        page.after = listed.items.last().map(|e| e.id.clone());
        out.extend(listed.items);
        if !listed.has_more {
            return Ok(out);
        }
    }
}

async fn all_runs(store: &Store, eval_id: &str) -> anyhow::Result<Vec<RunRecord>> {
    let mut page = first_page();
    let mut out = Vec::new();
    loop {
        let listed = store.list_runs(eval_id, None, &page).await?;
        page.after = listed.items.last().map(|r| r.id.clone());
        out.extend(listed.items);
        if !listed.has_more {
            return Ok(out);
        }
    }
}

async fn print_eval(store: &Store, e: &EvalRecord) -> anyhow::Result<()> {
    let criteria: serde_json::Value = serde_json::from_str(&e.testing_criteria)?;
    let criteria = criteria.as_array().cloned().unwrap_or_default();
    println!(
        "{}  {}  ({} testing criteria)",
        e.id,
        e.name,
        criteria.len()
    );
    let runs = all_runs(store, &e.id).await?;
    if runs.is_empty() {
        println!("    no runs");
    }
    for r in &runs {
        let c = store.run_counts(&r.id).await?;
        let graded = c.passed + c.failed + c.errored;
        let score = if graded > 0 {
            format!("{:.1}%", 100.0 * c.passed as f64 / graded as f64)
        } else {
            "-".into()
        };
        println!(
            "    {:<40} {:<24} {:<12} passed {:>5}  failed {:>5}  errored {:>5}  of {:>5}  score {}",
            r.id,
            if r.model.is_empty() { &r.name } else { &r.model },
            r.status.as_str(),
            c.passed,
            c.failed,
            c.errored,
            c.total,
            score
        );
        for p in store.run_criteria(&r.id).await? {
            let n = p.passed + p.failed;
            println!(
                "        {:<60} {:>5}/{:<5} passed",
                p.criterion, p.passed, n
            );
        }
    }
    Ok(())
}
