//! The organization usage and costs APIs (`/v1/organization/usage/{completions, embeddings,
//! moderations}`, `/v1/organization/costs`): the usage ledger summed per time bucket and per the
//! fields asked in `group_by`, in OpenAI's `page` of `bucket`s.
//!
//! Everything is computed from the ledger's rows (`ferrum_store::UsageQuery`): token counts as
//! recorded, costs as billed (the batch discount and the cached-input price are already in each
//! row's `cost_usd`). A cost split into line items (input, cached input, output) divides each
//! row group's billed cost in proportion to its tier's prices, so the items add up to the
//! ledger exactly.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use ferrum_protocol::ApiError;
use ferrum_store::{UsageGroup, UsageQuery};
use serde_json::{json, Map, Value};

use crate::{now, App, ServerError};

type Pairs = Query<Vec<(String, String)>>;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/organization/usage/completions", get(completions))
        .route("/v1/organization/usage/embeddings", get(embeddings))
        .route("/v1/organization/usage/moderations", get(moderations))
        .route("/v1/organization/costs", get(costs))
}

/// Which usage API: its ledger endpoints, result object and the fields it groups by.
struct Kind {
    endpoints: &'static [&'static str],
    object: &'static str,
    group_fields: &'static [&'static str],
}

const COMPLETIONS: Kind = Kind {
    endpoints: &[
        "chat.completions",
        "responses",
        "batch.chat.completions",
        "batch.responses",
        "batch.evals",
    ],
    object: "organization.usage.completions.result",
    group_fields: &[
        "project_id",
        "user_id",
        "api_key_id",
        "model",
        "batch",
        "service_tier",
    ],
};

const EMBEDDINGS: Kind = Kind {
    endpoints: &["embeddings", "batch.embeddings"],
    object: "organization.usage.embeddings.result",
    group_fields: &["project_id", "user_id", "api_key_id", "model"],
};

const MODERATIONS: Kind = Kind {
    endpoints: &["moderations", "batch.moderations"],
    object: "organization.usage.moderations.result",
    group_fields: &["project_id", "user_id", "api_key_id", "model"],
};

const COSTS_GROUPS: &[&str] = &["project_id", "line_item", "api_key_id"];

/// The parsed query of a usage or costs request.
struct Params {
    query: UsageQuery,
    group_by: Vec<String>,
    /// Buckets per page.
    limit: i64,
    line_items: Vec<String>,
}

/// The values of `name` (`name=a&name=b`, `name[]=a`, or `name=a,b`).
fn values(pairs: &[(String, String)], name: &str) -> Vec<String> {
    let bracketed = format!("{name}[]");
    pairs
        .iter()
        .filter(|(k, _)| *k == name || *k == bracketed)
        .flat_map(|(_, v)| v.split(',').map(str::to_string).collect::<Vec<_>>())
        .filter(|v| !v.is_empty())
        .collect()
}

fn one<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn int(pairs: &[(String, String)], name: &str) -> Result<Option<i64>, ApiError> {
    one(pairs, name)
        .map(|v| {
            v.parse::<i64>().map_err(|_| {
                ApiError::invalid_param(
                    name,
                    "invalid_value",
                    format!("Invalid '{name}': expected an integer, got {v:?}."),
                )
            })
        })
        .transpose()
}

/// Reads the query: time range, bucket width (`allowed` widths), filters, grouping, paging.
fn params(
    pairs: &[(String, String)],
    allowed: &[&str],
    groups: &[&str],
) -> Result<Params, ApiError> {
    let start = int(pairs, "start_time")?.ok_or_else(|| {
        ApiError::invalid_param(
            "start_time",
            "missing_required_parameter",
            "Missing required parameter: 'start_time'.",
        )
    })?;
    let end = int(pairs, "end_time")?.unwrap_or_else(|| now() + 1);
    if end <= start {
        return Err(ApiError::invalid_param(
            "end_time",
            "invalid_value",
            "Invalid 'end_time': must be after 'start_time'.",
        ));
    }
    let width_name = one(pairs, "bucket_width").unwrap_or("1d");
    if !allowed.contains(&width_name) {
        return Err(ApiError::invalid_param(
            "bucket_width",
            "invalid_value",
            format!(
                "Invalid 'bucket_width': expected one of {}, got {width_name:?}.",
                allowed.join(", ")
            ),
        ));
    }
    let (width, default_limit, max_limit) = match width_name {
        "1m" => (60, 60, 1440),
        "1h" => (3600, 24, 168),
        _ if allowed.len() == 1 => (86_400, 7, 180),
        _ => (86_400, 7, 31),
    };
    let limit = match int(pairs, "limit")? {
        None => default_limit,
        Some(n) if (1..=max_limit).contains(&n) => n,
        Some(n) => {
            return Err(ApiError::invalid_param(
                "limit",
                "invalid_value",
                format!("Invalid 'limit': expected 1 to {max_limit}, got {n}."),
            ))
        }
    };
    // `page` is the start of the page's first bucket, as `next_page` wrote it.
    let page_start = match one(pairs, "page") {
        None | Some("") => start,
        Some(p) => p
            .strip_prefix("page_")
            .and_then(|t| t.parse::<i64>().ok())
            .filter(|t| *t >= start && (*t - start) % width == 0)
            .ok_or_else(|| {
                ApiError::invalid_param("page", "invalid_value", "Invalid 'page' cursor.")
            })?,
    };
    let group_by = values(pairs, "group_by");
    if let Some(bad) = group_by.iter().find(|g| !groups.contains(&g.as_str())) {
        return Err(ApiError::invalid_param(
            "group_by",
            "invalid_value",
            format!(
                "Invalid 'group_by': expected some of {}, got {bad:?}.",
                groups.join(", ")
            ),
        ));
    }
    let batch = match one(pairs, "batch") {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(v) => {
            return Err(ApiError::invalid_param(
                "batch",
                "invalid_value",
                format!("Invalid 'batch': expected true or false, got {v:?}."),
            ))
        }
    };
    Ok(Params {
        query: UsageQuery {
            start: page_start,
            end,
            width,
            endpoints: Vec::new(),
            project_ids: values(pairs, "project_ids"),
            api_key_ids: values(pairs, "api_key_ids"),
            models: values(pairs, "models"),
            batch,
        },
        group_by,
        limit,
        line_items: values(pairs, "line_items"),
    })
}

/// The page's bucket starts, and the next page's cursor if buckets remain.
fn buckets(q: &UsageQuery, limit: i64) -> (Vec<i64>, Option<String>) {
    let mut starts = Vec::new();
    let mut t = q.start;
    while t < q.end && (starts.len() as i64) < limit {
        starts.push(t);
        t += q.width;
    }
    let next = (t < q.end).then(|| format!("page_{t}"));
    (starts, next)
}

/// Runs the ledger query for one page: the bucket starts and the groups in them.
async fn fetch(
    app: &App,
    p: &mut Params,
    endpoints: &[&str],
) -> Result<(Vec<i64>, Option<String>, Vec<UsageGroup>), ServerError> {
    let (starts, next) = buckets(&p.query, p.limit);
    if let Some(last) = starts.last() {
        p.query.end = p.query.end.min(last + p.query.width);
    }
    p.query.endpoints = endpoints.iter().map(|e| e.to_string()).collect();
    let groups = app.store.usage_groups(&p.query).await?;
    Ok((starts, next, groups))
}

/// The page object: one bucket per start, each with its results.
fn page(
    starts: &[i64],
    width: i64,
    next: Option<String>,
    mut results: BTreeMap<i64, Vec<Value>>,
) -> Value {
    let data: Vec<Value> = starts
        .iter()
        .map(|s| {
            json!({
                "object": "bucket",
                "start_time": s,
                "end_time": s + width,
                "results": results.remove(s).unwrap_or_default(),
            })
        })
        .collect();
    json!({
        "object": "page",
        "data": data,
        "has_more": next.is_some(),
        "next_page": next,
    })
}

/// The value of a grouping field of `g` (null when the results are not grouped by it).
fn field(g: &UsageGroup, name: &str) -> Value {
    match name {
        "project_id" => json!(g.project_id),
        "api_key_id" => json!(g.api_key_id),
        "model" => json!(g.model),
        "batch" => json!(g.batch),
        "service_tier" => json!(g.service_tier),
        _ => Value::Null,
    }
}

/// Sums of the groups sharing the asked grouping fields' values, per bucket.
#[derive(Default)]
struct Sums {
    requests: u64,
    prompt: u64,
    cached: u64,
    completion: u64,
}

async fn usage(app: &App, pairs: &[(String, String)], kind: Kind) -> Result<Value, ServerError> {
    let mut p = params(pairs, &["1m", "1h", "1d"], kind.group_fields)?;
    let (starts, next, groups) = fetch(app, &mut p, kind.endpoints).await?;
    // (bucket, grouping values) -> sums, in a stable order.
    let mut sums: BTreeMap<(i64, String), (Map<String, Value>, Sums)> = BTreeMap::new();
    for g in &groups {
        let keys: Map<String, Value> = kind
            .group_fields
            .iter()
            .map(|f| {
                let v = if p.group_by.iter().any(|x| x == f) {
                    field(g, f)
                } else {
                    Value::Null
                };
                (f.to_string(), v)
            })
            .collect();
        let id = (g.bucket_start, Value::Object(keys.clone()).to_string());
        let s = &mut sums.entry(id).or_insert_with(|| (keys, Sums::default())).1;
        s.requests += g.requests;
        s.prompt += g.prompt_tokens;
        s.cached += g.cached_tokens;
        s.completion += g.completion_tokens;
    }
    let mut results: BTreeMap<i64, Vec<Value>> = BTreeMap::new();
    for ((bucket, _), (keys, s)) in sums {
        let mut r = Map::new();
        r.insert("object".into(), json!(kind.object));
        r.insert("input_tokens".into(), json!(s.prompt));
        if kind.object == COMPLETIONS.object {
            r.insert("input_cached_tokens".into(), json!(s.cached));
            r.insert("input_uncached_tokens".into(), json!(s.prompt - s.cached));
            r.insert("output_tokens".into(), json!(s.completion));
            r.insert("input_audio_tokens".into(), json!(0));
            r.insert("output_audio_tokens".into(), json!(0));
        }
        r.insert("num_model_requests".into(), json!(s.requests));
        r.extend(keys);
        results.entry(bucket).or_default().push(Value::Object(r));
    }
    Ok(page(&starts, p.query.width, next, results))
}

async fn completions(
    State(app): State<Arc<App>>,
    Query(pairs): Pairs,
) -> Result<Json<Value>, ServerError> {
    Ok(Json(usage(&app, &pairs, COMPLETIONS).await?))
}

async fn embeddings(
    State(app): State<Arc<App>>,
    Query(pairs): Pairs,
) -> Result<Json<Value>, ServerError> {
    Ok(Json(usage(&app, &pairs, EMBEDDINGS).await?))
}

async fn moderations(
    State(app): State<Arc<App>>,
    Query(pairs): Pairs,
) -> Result<Json<Value>, ServerError> {
    Ok(Json(usage(&app, &pairs, MODERATIONS).await?))
}

/// A group's billed cost split into line items in proportion to its tier's prices (the whole
/// cost under the model's name when its prices are unknown or zero).
fn line_items(app: &App, g: &UsageGroup) -> Vec<(String, f64)> {
    let suffix = if g.batch { " (batch)" } else { "" };
    let parts = match app.models.resolve(&g.model) {
        Ok(tier) => {
            let uncached = g.prompt_tokens.saturating_sub(g.cached_tokens) as f64;
            vec![
                ("input", uncached * tier.price.input),
                (
                    "cached input",
                    g.cached_tokens as f64 * tier.price.cached_input,
                ),
                ("output", g.completion_tokens as f64 * tier.price.output),
            ]
        }
        Err(_) => Vec::new(),
    };
    let total: f64 = parts.iter().map(|(_, v)| v).sum();
    if total <= 0.0 {
        return vec![(format!("{}{suffix}", g.model), g.cost_usd)];
    }
    parts
        .into_iter()
        .filter(|(_, v)| *v > 0.0)
        .map(|(name, v)| {
            (
                format!("{}, {name}{suffix}", g.model),
                g.cost_usd * v / total,
            )
        })
        .collect()
}

async fn costs(
    State(app): State<Arc<App>>,
    Query(pairs): Pairs,
) -> Result<Json<Value>, ServerError> {
    let mut p = params(&pairs, &["1d"], COSTS_GROUPS)?;
    let (starts, next, groups) = fetch(&app, &mut p, &[]).await?;
    let by = |f: &str| p.group_by.iter().any(|x| x == f);
    let mut sums: BTreeMap<(i64, String), (Map<String, Value>, f64)> = BTreeMap::new();
    for g in &groups {
        let items = if by("line_item") || !p.line_items.is_empty() {
            line_items(&app, g)
        } else {
            vec![(String::new(), g.cost_usd)]
        };
        for (item, value) in items {
            if !p.line_items.is_empty() && !p.line_items.contains(&item) {
                continue;
            }
            let mut keys = Map::new();
            let line = if by("line_item") {
                json!(item)
            } else {
                Value::Null
            };
            keys.insert("line_item".into(), line);
            let project = by("project_id").then(|| json!(g.project_id));
            keys.insert("project_id".into(), project.unwrap_or(Value::Null));
            let key = by("api_key_id").then(|| json!(g.api_key_id));
            keys.insert("api_key_id".into(), key.unwrap_or(Value::Null));
            let id = (g.bucket_start, Value::Object(keys.clone()).to_string());
            sums.entry(id).or_insert_with(|| (keys, 0.0)).1 += value;
        }
    }
    let mut results: BTreeMap<i64, Vec<Value>> = BTreeMap::new();
    for ((bucket, _), (keys, value)) in sums {
        let mut r = Map::new();
        r.insert("object".into(), json!("organization.costs.result"));
        r.insert("amount".into(), json!({"value": value, "currency": "usd"}));
        r.extend(keys);
        results.entry(bucket).or_default().push(Value::Object(r));
    }
    Ok(Json(page(&starts, p.query.width, next, results)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn buckets_page_through_the_range() {
        let p = params(
            &pairs(&[
                ("start_time", "1000"),
                ("end_time", "1000000"),
                ("bucket_width", "1h"),
                ("limit", "3"),
                ("group_by[]", "model"),
                ("group_by", "project_id,batch"),
            ]),
            &["1m", "1h", "1d"],
            COMPLETIONS.group_fields,
        )
        .unwrap();
        assert_eq!(p.group_by, ["model", "project_id", "batch"]);
        let (starts, next) = buckets(&p.query, p.limit);
        assert_eq!(starts, [1000, 4600, 8200]);
        assert_eq!(next.as_deref(), Some("page_11800"));
        let again = params(
            &pairs(&[
                ("start_time", "1000"),
                ("end_time", "12000"),
                ("bucket_width", "1h"),
                ("limit", "3"),
                ("page", "page_11800"),
            ]),
            &["1m", "1h", "1d"],
            COMPLETIONS.group_fields,
        )
        .unwrap();
        let (starts, next) = buckets(&again.query, again.limit);
        assert_eq!((starts, next), (vec![11800], None));
    }

    #[test]
    fn bad_parameters_name_themselves() {
        let bad = |q: &[(&str, &str)], param: &str| {
            let e = params(&pairs(q), &["1d"], COSTS_GROUPS).err().unwrap();
            assert_eq!(e.param.as_deref(), Some(param), "{q:?}: {e:?}");
        };
        bad(&[], "start_time");
        bad(&[("start_time", "5"), ("end_time", "5")], "end_time");
        bad(
            &[("start_time", "5"), ("bucket_width", "1h")],
            "bucket_width",
        );
        bad(&[("start_time", "5"), ("group_by", "model")], "group_by");
        bad(&[("start_time", "5"), ("page", "page_7")], "page");
    }
}
