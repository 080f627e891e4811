//! File records (uploads and batch outputs); their bytes are in a [`crate::BlobStore`].

use sqlx::any::AnyRow;
use sqlx::{Any, Row};

use crate::page::{listed, new_seq, Sql};
use crate::{Listed, Page, Store, StoreError};

/// One file's metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct FileRecord {
    pub id: String,
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
    pub bytes: u64,
    pub expires_at: Option<i64>,
}

const COLUMNS: &str = "id, created_at, filename, purpose, bytes, expires_at";

impl Store {
    /// Records a file. Idempotent on the id, so a retried finalization never doubles a file.
    pub async fn insert_file(&self, f: &FileRecord) -> Result<(), StoreError> {
        insert_file(&self.pool, f).await
    }

    pub async fn get_file(&self, id: &str) -> Result<Option<FileRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM files WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(file).transpose()
    }

    /// Files, optionally of one purpose, one page at a time; files expired at `now` (Unix
    /// seconds) are left out.
    pub async fn list_files(
        &self,
        purpose: Option<&str>,
        page: &Page,
        now: i64,
    ) -> Result<Listed<FileRecord>, StoreError> {
        let mut q = Sql::new(&format!(
            "SELECT {COLUMNS} FROM files WHERE (expires_at IS NULL OR expires_at > "
        ));
        q.bind(now).push(")");
        if let Some(p) = purpose {
            q.push(" AND purpose = ").bind(p.to_string());
        }
        self.push_page(&mut q, "files", page).await?;
        let rows = q.query().fetch_all(&self.pool).await?;
        let items = rows.iter().map(file).collect::<Result<Vec<_>, _>>()?;
        Ok(listed(items, page.limit))
    }

    /// The ids of up to `limit` files whose `expires_at` is at or before `now`, oldest expiry
    /// first: the server deletes them (record, then content).
    pub async fn expired_files(&self, now: i64, limit: i64) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= $1
             ORDER BY expires_at LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get("id").map_err(StoreError::from))
            .collect()
    }

    /// Deletes a file's record; returns whether it existed.
    pub async fn delete_file(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM files WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

pub(crate) async fn insert_file<'e>(
    exec: impl sqlx::Executor<'e, Database = Any>,
    f: &FileRecord,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO files (id, seq, created_at, filename, purpose, bytes, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&f.id)
    .bind(new_seq())
    .bind(f.created_at)
    .bind(&f.filename)
    .bind(&f.purpose)
    .bind(crate::usage::to_i64("bytes", f.bytes)?)
    .bind(f.expires_at)
    .execute(exec)
    .await?;
    Ok(())
}

fn file(row: &AnyRow) -> Result<FileRecord, StoreError> {
    Ok(FileRecord {
        id: row.try_get("id")?,
        created_at: row.try_get("created_at")?,
        filename: row.try_get("filename")?,
        purpose: row.try_get("purpose")?,
        bytes: crate::usage::to_u64("bytes", row.try_get("bytes")?)?,
        expires_at: row.try_get("expires_at")?,
    })
}
