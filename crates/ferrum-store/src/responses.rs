//! Stored responses of the Responses API: their input and output items and the response
//! object, all as JSON text (the store does not interpret them).

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::page::{listed, new_seq, Sql};
use crate::{Listed, Page, Store, StoreError};

/// One stored response.
#[derive(Clone, Debug, PartialEq)]
pub struct ResponseRecord {
    pub id: String,
    pub created_at: i64,
    pub model: String,
    /// `queued`, `in_progress`, `completed`, `incomplete`, `failed` or `cancelled`.
    pub status: String,
    pub previous_response_id: Option<String>,
    /// JSON array of this request's own input items.
    pub input_items: String,
    /// JSON array of the output items.
    pub output: String,
    /// The response object as JSON.
    pub object: String,
}

impl Store {
    pub async fn insert_response(&self, r: &ResponseRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO responses (id, seq, created_at, model, status, previous_response_id,
                input_items, output, object)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&r.id)
        .bind(new_seq())
        .bind(r.created_at)
        .bind(&r.model)
        .bind(&r.status)
        .bind(r.previous_response_id.clone())
        .bind(&r.input_items)
        .bind(&r.output)
        .bind(&r.object)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Replaces a response's status, output and object, unless it was already finished (a
    /// cancelled background response stays cancelled). Returns whether it changed.
    pub async fn finish_response(
        &self,
        id: &str,
        status: &str,
        output: &str,
        object: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE responses SET status = $1, output = $2, object = $3
             WHERE id = $4 AND status IN ('queued', 'in_progress')",
        )
        .bind(status)
        .bind(output)
        .bind(object)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn get_response(&self, id: &str) -> Result<Option<ResponseRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, created_at, model, status, previous_response_id, input_items, output,
                object FROM responses WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(response).transpose()
    }

    /// Finished responses (completed, or cut short as incomplete), in the page's order,
    /// optionally of one model: what an eval
    /// run's `responses` source reads (its other filters look inside the response object).
    pub async fn list_finished_responses(
        &self,
        model: Option<&str>,
        page: &Page,
    ) -> Result<Listed<ResponseRecord>, StoreError> {
        let mut q = Sql::new(
            "SELECT id, created_at, model, status, previous_response_id, input_items, output,
                object FROM responses WHERE status IN ('completed', 'incomplete')",
        );
        if let Some(model) = model {
            q.push(" AND model = ").bind(model.to_string());
        }
        self.push_page(&mut q, "responses", page).await?;
        let rows = q.query().fetch_all(&self.pool).await?;
        let items = rows.iter().map(response).collect::<Result<Vec<_>, _>>()?;
        Ok(listed(items, page.limit))
    }

    /// Deletes a response; returns whether it existed. Later responses that name it as their
    /// previous one can no longer be continued from.
    pub async fn delete_response(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM responses WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

fn response(row: &AnyRow) -> Result<ResponseRecord, StoreError> {
    Ok(ResponseRecord {
        id: row.try_get("id")?,
        created_at: row.try_get("created_at")?,
        model: row.try_get("model")?,
        status: row.try_get("status")?,
        previous_response_id: row.try_get("previous_response_id")?,
        input_items: row.try_get("input_items")?,
        output: row.try_get("output")?,
        object: row.try_get("object")?,
    })
}
