//! Cursor pagination shared by every list (`after`, `limit`, `order`), as the OpenAI lists do.
//!
//! Rows are ordered by `seq` (creation time in nanoseconds) and then `id`, so the order is total
//! and stable on both backends; `after` names the last id of the previous page.

use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::Any;

use crate::{Store, StoreError};

/// Sort direction of a list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

/// Which slice of a list to return.
#[derive(Clone, Debug)]
pub struct Page {
    /// Start after the row with this id (exclusive).
    pub after: Option<String>,
    /// At most this many rows.
    pub limit: usize,
    pub order: Order,
}

/// A page of rows and whether more follow it.
#[derive(Clone, Debug)]
pub struct Listed<T> {
    pub items: Vec<T>,
    pub has_more: bool,
}

impl<T> Listed<T> {
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Listed<U> {
        Listed {
            items: self.items.into_iter().map(f).collect(),
            has_more: self.has_more,
        }
    }
}

/// The ordering key of a new row: nanoseconds since the epoch, strictly increasing within the
/// process (rows written in one burst, such as a job's events, keep the order they were made in
/// even when the clock's resolution is coarser than a nanosecond).
pub(crate) fn new_seq() -> i64 {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

impl Store {
    /// Appends the cursor condition and the ORDER BY / LIMIT of `page` to a query over `table`
    /// whose WHERE clause is already open (`... WHERE <conditions>`). Fetches one row more than
    /// the limit, to tell whether more follow.
    pub(crate) async fn push_page(
        &self,
        q: &mut Sql,
        table: &str,
        page: &Page,
    ) -> Result<(), StoreError> {
        let (cmp, dir) = match page.order {
            Order::Asc => (">", "ASC"),
            Order::Desc => ("<", "DESC"),
        };
        if let Some(after) = &page.after {
            let seq: Option<i64> =
                sqlx::query_scalar(&format!("SELECT seq FROM {table} WHERE id = $1"))
                    .bind(after)
                    .fetch_optional(&self.pool)
                    .await?;
            let seq = seq.ok_or_else(|| StoreError::UnknownCursor(after.clone()))?;
            q.push(&format!(" AND (seq {cmp} "))
                .bind(seq)
                .push(" OR (seq = ")
                .bind(seq)
                .push(&format!(" AND id {cmp} "))
                .bind(after.clone())
                .push("))");
        }
        q.push(&format!(" ORDER BY seq {dir}, id {dir} LIMIT "))
            .bind(page.limit as i64 + 1);
        Ok(())
    }
}

/// Cuts the extra row `push_page` fetched.
pub(crate) fn listed<T>(mut items: Vec<T>, limit: usize) -> Listed<T> {
    let has_more = items.len() > limit;
    items.truncate(limit);
    Listed { items, has_more }
}

/// A query assembled piece by piece, with `$n` placeholders numbered as values are bound.
/// (sqlx's `QueryBuilder` writes `?` for the `Any` driver, which Postgres does not accept.)
pub(crate) struct Sql {
    text: String,
    args: Vec<Arg>,
}

pub(crate) enum Arg {
    Int(i64),
    Text(String),
}

impl From<i64> for Arg {
    fn from(v: i64) -> Arg {
        Arg::Int(v)
    }
}

impl From<String> for Arg {
    fn from(v: String) -> Arg {
        Arg::Text(v)
    }
}

impl Sql {
    pub(crate) fn new(text: &str) -> Sql {
        Sql {
            text: text.to_string(),
            args: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, text: &str) -> &mut Sql {
        self.text.push_str(text);
        self
    }

    pub(crate) fn bind(&mut self, value: impl Into<Arg>) -> &mut Sql {
        self.args.push(value.into());
        self.text.push_str(&format!("${}", self.args.len()));
        self
    }

    pub(crate) fn query(&self) -> Query<'_, Any, AnyArguments<'_>> {
        let mut q = sqlx::query(&self.text);
        for a in &self.args {
            q = match a {
                Arg::Int(v) => q.bind(*v),
                Arg::Text(v) => q.bind(v.as_str()),
            };
        }
        q
    }
}
