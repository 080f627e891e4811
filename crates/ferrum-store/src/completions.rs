//! Stored chat completions (`store: true`): the request and response of each, with metadata
//! that lists filter on. They are the source of distillation data (`ferrum export`).

use sqlx::any::AnyRow;
use sqlx::{Any, Connection, Row};

use crate::page::{listed, new_seq, Sql};
use crate::{Listed, Page, Store, StoreError};

/// One stored completion.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredCompletion {
    pub id: String,
    pub created: i64,
    pub model: String,
    /// Metadata pairs, in key order.
    pub metadata: Vec<(String, String)>,
    /// The request body, as JSON.
    pub request: String,
    /// The `chat.completion` response, as JSON.
    pub response: String,
}

/// Which stored completions a list returns.
#[derive(Clone, Debug, Default)]
pub struct CompletionFilter {
    pub model: Option<String>,
    /// Every pair must match.
    pub metadata: Vec<(String, String)>,
}

impl Store {
    pub async fn insert_completion(&self, c: &StoredCompletion) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::query(
            "INSERT INTO chat_completions (id, seq, created, model, metadata, request, response)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&c.id)
        .bind(new_seq())
        .bind(c.created)
        .bind(&c.model)
        .bind(metadata_json(&c.metadata))
        .bind(&c.request)
        .bind(&c.response)
        .execute(&mut *tx)
        .await?;
        insert_metadata(&mut tx, &c.id, &c.metadata).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_completion(&self, id: &str) -> Result<Option<StoredCompletion>, StoreError> {
        let row = sqlx::query(
            "SELECT id, created, model, metadata, request, response FROM chat_completions
             WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(completion).transpose()
    }

    pub async fn list_completions(
        &self,
        filter: &CompletionFilter,
        page: &Page,
    ) -> Result<Listed<StoredCompletion>, StoreError> {
        let mut q = Sql::new(
            "SELECT id, created, model, metadata, request, response FROM chat_completions
             WHERE 1 = 1",
        );
        if let Some(model) = &filter.model {
            q.push(" AND model = ").bind(model.clone());
        }
        for (k, v) in &filter.metadata {
            q.push(
                " AND EXISTS (SELECT 1 FROM chat_completion_metadata m
                   WHERE m.completion_id = chat_completions.id AND m.key = ",
            )
            .bind(k.clone())
            .push(" AND m.value = ")
            .bind(v.clone())
            .push(")");
        }
        self.push_page(&mut q, "chat_completions", page).await?;
        let rows = q.query().fetch_all(&self.pool).await?;
        let items = rows.iter().map(completion).collect::<Result<Vec<_>, _>>()?;
        Ok(listed(items, page.limit))
    }

    /// Replaces a stored completion's metadata; returns whether it exists.
    pub async fn update_completion_metadata(
        &self,
        id: &str,
        metadata: &[(String, String)],
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let found = sqlx::query("UPDATE chat_completions SET metadata = $1 WHERE id = $2")
            .bind(metadata_json(metadata))
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        if !found {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query("DELETE FROM chat_completion_metadata WHERE completion_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        insert_metadata(&mut tx, id, metadata).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Deletes a stored completion; returns whether it existed.
    pub async fn delete_completion(&self, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let found = sqlx::query("DELETE FROM chat_completions WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        sqlx::query("DELETE FROM chat_completion_metadata WHERE completion_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(found)
    }
}

async fn insert_metadata(
    tx: &mut sqlx::Transaction<'_, Any>,
    id: &str,
    metadata: &[(String, String)],
) -> Result<(), StoreError> {
    for (k, v) in metadata {
        sqlx::query(
            "INSERT INTO chat_completion_metadata (completion_id, key, value) VALUES ($1, $2, $3)",
        )
        .bind(id)
        .bind(k)
        .bind(v)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Metadata as a JSON object, keys in order.
fn metadata_json(metadata: &[(String, String)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::Value::Object(map).to_string()
}

fn completion(row: &AnyRow) -> Result<StoredCompletion, StoreError> {
    let text: String = row.try_get("metadata")?;
    let mut metadata: Vec<(String, String)> = match serde_json::from_str::<serde_json::Value>(&text)
    {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string()))
            .collect(),
        _ => {
            return Err(StoreError::OutOfRange {
                field: "chat_completions.metadata",
                value: text,
            })
        }
    };
    // Key order whatever map type serde_json was built with (`preserve_order` or not).
    metadata.sort();
    Ok(StoredCompletion {
        id: row.try_get("id")?,
        created: row.try_get("created")?,
        model: row.try_get("model")?,
        metadata,
        request: row.try_get("request")?,
        response: row.try_get("response")?,
    })
}
