//! Projects, their service accounts, and API keys (project keys and admin keys).
//!
//! Keys are stored as their SHA-256 (`hash`, hex) and a redacted form for display; the store
//! never sees a key in clear, and looks keys up by hash. Deleting a key or a service account
//! marks it deleted rather than removing the row, so a revoked key is told apart from an
//! unknown one and a database that ever had keys never reads as an open server.

use sqlx::any::AnyRow;
use sqlx::{Connection, Row};

use crate::page::{listed, new_seq, Sql};
use crate::{Attribution, Listed, Page, Store, StoreError};

/// One project.
#[derive(Clone, Debug, PartialEq)]
pub struct ProjectRecord {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    pub archived_at: Option<i64>,
    pub external_key_id: Option<String>,
}

/// One service account of a project (the owner of the project's keys).
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceAccountRecord {
    pub id: String,
    pub project_id: String,
    pub name: String,
    /// `member` (the only role a service account takes here).
    pub role: String,
    pub created_at: i64,
}

/// What a key may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyScope {
    /// A project key (`sk-proj-...`), owned by one of the project's service accounts.
    Project {
        project_id: String,
        service_account_id: String,
    },
    /// An admin key (`sk-admin-...`): the organization's admin routes.
    Admin,
}

/// A key to store: its hash, never its value.
#[derive(Clone, Debug)]
pub struct NewKey {
    pub id: String,
    pub scope: KeyScope,
    pub name: String,
    /// SHA-256 of the key, hex.
    pub hash: String,
    /// What lists show instead of the key (`sk-proj-ab...wxyz`).
    pub redacted: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

/// A stored key.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyRecord {
    pub id: String,
    pub scope: KeyScope,
    pub name: String,
    pub redacted: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub deleted_at: Option<i64>,
}

/// A key found by its hash, with what decides whether it still authenticates.
#[derive(Clone, Debug, PartialEq)]
pub struct FoundKey {
    pub key: KeyRecord,
    /// When its project was archived (project keys only).
    pub project_archived_at: Option<i64>,
}

const PROJECT_COLUMNS: &str = "id, name, created_at, archived_at, external_key_id";
const ACCOUNT_COLUMNS: &str = "id, project_id, name, role, created_at";
const KEY_COLUMNS: &str = "k.id, k.kind, k.project_id, k.service_account_id, k.name, k.redacted, \
                           k.created_at, k.expires_at, k.last_used_at, k.deleted_at";

impl Store {
    pub async fn create_project(&self, p: &ProjectRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO projects (id, seq, name, created_at, archived_at, external_key_id)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&p.id)
        .bind(new_seq())
        .bind(&p.name)
        .bind(p.created_at)
        .bind(p.archived_at)
        .bind(&p.external_key_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_project(&self, id: &str) -> Result<Option<ProjectRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(project).transpose()
    }

    /// Projects in creation order, archived ones only when asked.
    pub async fn list_projects(
        &self,
        include_archived: bool,
        page: &Page,
    ) -> Result<Listed<ProjectRecord>, StoreError> {
        let mut q = Sql::new(&format!("SELECT {PROJECT_COLUMNS} FROM projects WHERE "));
        q.push(if include_archived {
            "1 = 1"
        } else {
            "archived_at IS NULL"
        });
        self.push_page(&mut q, "projects", page).await?;
        let rows = q.query().fetch_all(&self.pool).await?;
        let items = rows.iter().map(project).collect::<Result<Vec<_>, _>>()?;
        Ok(listed(items, page.limit))
    }

    /// Renames a project and/or sets its external key id; `None` leaves a field as it is.
    /// Returns the project as it is now, or `None` if there is none with this id.
    pub async fn update_project(
        &self,
        id: &str,
        name: Option<&str>,
        external_key_id: Option<&str>,
    ) -> Result<Option<ProjectRecord>, StoreError> {
        sqlx::query(
            "UPDATE projects SET name = COALESCE($1, name),
                external_key_id = COALESCE($2, external_key_id)
             WHERE id = $3",
        )
        .bind(name)
        .bind(external_key_id)
        .bind(id)
        .execute(&self.pool)
        .await?;
        self.get_project(id).await
    }

    /// Archives a project (once: archiving again keeps the first time). Its keys stop working
    /// at once, since every authentication reads the project's state.
    pub async fn archive_project(
        &self,
        id: &str,
        now: i64,
    ) -> Result<Option<ProjectRecord>, StoreError> {
        sqlx::query("UPDATE projects SET archived_at = $1 WHERE id = $2 AND archived_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.get_project(id).await
    }

    /// Creates a service account, and its first key when given, in one transaction.
    pub async fn create_service_account(
        &self,
        account: &ServiceAccountRecord,
        key: Option<&NewKey>,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::query(
            "INSERT INTO service_accounts (id, seq, project_id, name, role, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&account.id)
        .bind(new_seq())
        .bind(&account.project_id)
        .bind(&account.name)
        .bind(&account.role)
        .bind(account.created_at)
        .execute(&mut *tx)
        .await?;
        if let Some(key) = key {
            insert_key(&mut *tx, key).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A project's service account, unless deleted.
    pub async fn get_service_account(
        &self,
        project_id: &str,
        id: &str,
    ) -> Result<Option<ServiceAccountRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM service_accounts
             WHERE project_id = $1 AND id = $2 AND deleted_at IS NULL"
        ))
        .bind(project_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(account).transpose()
    }

    pub async fn list_service_accounts(
        &self,
        project_id: &str,
        page: &Page,
    ) -> Result<Listed<ServiceAccountRecord>, StoreError> {
        let mut q = Sql::new(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM service_accounts WHERE deleted_at IS NULL \
             AND project_id = "
        ));
        q.bind(project_id.to_string());
        self.push_page(&mut q, "service_accounts", page).await?;
        let rows = q.query().fetch_all(&self.pool).await?;
        let items = rows.iter().map(account).collect::<Result<Vec<_>, _>>()?;
        Ok(listed(items, page.limit))
    }

    /// Deletes a service account and revokes its keys. Returns false if there was none.
    pub async fn delete_service_account(
        &self,
        project_id: &str,
        id: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let deleted = sqlx::query(
            "UPDATE service_accounts SET deleted_at = $1
             WHERE project_id = $2 AND id = $3 AND deleted_at IS NULL",
        )
        .bind(now)
        .bind(project_id)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        sqlx::query(
            "UPDATE api_keys SET deleted_at = $1
             WHERE service_account_id = $2 AND deleted_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    /// Stores a key (admin keys; a project key comes with its service account).
    pub async fn create_key(&self, key: &NewKey) -> Result<(), StoreError> {
        insert_key(&self.pool, key).await
    }

    /// A key by id, unless deleted.
    pub async fn get_key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.id = $1 AND k.deleted_at IS NULL"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(key).transpose()
    }

    /// Live keys of one project (`Some(project_id)`) or the admin keys (`None`).
    pub async fn list_keys(
        &self,
        project_id: Option<&str>,
        page: &Page,
    ) -> Result<Listed<KeyRecord>, StoreError> {
        let mut q = Sql::new(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.deleted_at IS NULL AND "
        ));
        match project_id {
            Some(p) => q
                .push("k.kind = 'project' AND k.project_id = ")
                .bind(p.to_string()),
            None => q.push("k.kind = 'admin'"),
        };
        // `push_page` compares the bare columns `seq` and `id`, which the alias leaves
        // unambiguous (one table).
        self.push_page(&mut q, "api_keys", page).await?;
        let rows = q.query().fetch_all(&self.pool).await?;
        let items = rows.iter().map(key).collect::<Result<Vec<_>, _>>()?;
        Ok(listed(items, page.limit))
    }

    /// Revokes a key at once. Returns false if there was no live key with this id.
    pub async fn delete_key(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE api_keys SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL")
                .bind(now)
                .bind(id)
                .execute(&self.pool)
                .await?
                .rows_affected();
        Ok(done == 1)
    }

    /// The key with this hash (deleted or not) and its project's archive time.
    pub async fn find_key(&self, hash: &str) -> Result<Option<FoundKey>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS}, p.archived_at AS project_archived_at
             FROM api_keys k LEFT JOIN projects p ON p.id = k.project_id
             WHERE k.hash = $1"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(FoundKey {
                key: key(&r)?,
                project_archived_at: r.try_get("project_archived_at")?,
            })
        })
        .transpose()
    }

    /// Notes that a key was used at `now`.
    pub async fn touch_key(&self, id: &str, now: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records which project and key created a batch: its lines are billed to them.
    pub async fn set_batch_owner(
        &self,
        batch_id: &str,
        by: &Attribution,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE batches SET project_id = $1, api_key_id = $2 WHERE id = $3")
            .bind(&by.project_id)
            .bind(&by.api_key_id)
            .bind(batch_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether any key, live or deleted, was ever created: then the API needs one.
    pub async fn any_keys(&self) -> Result<bool, StoreError> {
        let found: Option<String> = sqlx::query_scalar("SELECT id FROM api_keys LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }
}

async fn insert_key<'e>(
    exec: impl sqlx::Executor<'e, Database = sqlx::Any>,
    k: &NewKey,
) -> Result<(), StoreError> {
    let (kind, project, account) = match &k.scope {
        KeyScope::Project {
            project_id,
            service_account_id,
        } => ("project", Some(project_id), Some(service_account_id)),
        KeyScope::Admin => ("admin", None, None),
    };
    sqlx::query(
        "INSERT INTO api_keys (id, seq, kind, project_id, service_account_id, name, hash,
            redacted, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&k.id)
    .bind(new_seq())
    .bind(kind)
    .bind(project)
    .bind(account)
    .bind(&k.name)
    .bind(&k.hash)
    .bind(&k.redacted)
    .bind(k.created_at)
    .bind(k.expires_at)
    .execute(exec)
    .await?;
    Ok(())
}

/// The project and key a batch's lines are billed to (none for an unknown batch).
pub(crate) async fn batch_owner<'e>(
    exec: impl sqlx::Executor<'e, Database = sqlx::Any>,
    batch_id: &str,
) -> Result<Attribution, StoreError> {
    let row = sqlx::query("SELECT project_id, api_key_id FROM batches WHERE id = $1")
        .bind(batch_id)
        .fetch_optional(exec)
        .await?;
    match row {
        Some(r) => Ok(Attribution {
            project_id: r.try_get("project_id")?,
            api_key_id: r.try_get("api_key_id")?,
            service_tier: None,
        }),
        None => Ok(Attribution::default()),
    }
}

fn project(row: &AnyRow) -> Result<ProjectRecord, StoreError> {
    Ok(ProjectRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
        archived_at: row.try_get("archived_at")?,
        external_key_id: row.try_get("external_key_id")?,
    })
}

fn account(row: &AnyRow) -> Result<ServiceAccountRecord, StoreError> {
    Ok(ServiceAccountRecord {
        id: row.try_get("id")?,
        project_id: row.try_get("project_id")?,
        name: row.try_get("name")?,
        role: row.try_get("role")?,
        created_at: row.try_get("created_at")?,
    })
}

fn key(row: &AnyRow) -> Result<KeyRecord, StoreError> {
    let kind: String = row.try_get("kind")?;
    let scope = match kind.as_str() {
        "admin" => KeyScope::Admin,
        _ => KeyScope::Project {
            project_id: row
                .try_get::<Option<String>, _>("project_id")?
                .unwrap_or_default(),
            service_account_id: row
                .try_get::<Option<String>, _>("service_account_id")?
                .unwrap_or_default(),
        },
    };
    Ok(KeyRecord {
        id: row.try_get("id")?,
        scope,
        name: row.try_get("name")?,
        redacted: row.try_get("redacted")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        last_used_at: row.try_get("last_used_at")?,
        deleted_at: row.try_get("deleted_at")?,
    })
}
