//! The query parameters and response shape every paged list shares (`after`, `limit`,
//! `order`; `data`, `first_id`, `last_id`, `has_more`).

use ferrum_protocol::ApiError;
use ferrum_store::{Listed, Order, Page, StoreError};
use serde::Serialize;

use crate::ServerError;

/// A list endpoint's paging rules.
pub struct Rules {
    pub default_limit: usize,
    pub max_limit: usize,
    pub default_order: Order,
    /// Whether `order` may be given (the batch list has no such parameter).
    pub has_order: bool,
}

impl Rules {
    /// Lists of an object's parts and of stored completions: 20 per page (at most 100).
    pub const fn of(default_order: Order) -> Rules {
        Rules {
            default_limit: 20,
            max_limit: 100,
            default_order,
            has_order: true,
        }
    }
}

/// Reads `after`, `limit` and `order` from query pairs; other pairs are left to the caller.
pub fn page(pairs: &[(String, String)], rules: &Rules) -> Result<Page, ApiError> {
    let mut page = Page {
        after: None,
        limit: rules.default_limit,
        order: rules.default_order,
    };
    for (k, v) in pairs {
        match k.as_str() {
            "after" if !v.is_empty() => page.after = Some(v.clone()),
            "limit" => {
                page.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=rules.max_limit).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid_param(
                            "limit",
                            "invalid_value",
                            format!(
                                "Invalid 'limit': expected an integer from 1 to {}, got {v:?}.",
                                rules.max_limit
                            ),
                        )
                    })?
            }
            "order" if rules.has_order => {
                page.order = match v.as_str() {
                    "asc" => Order::Asc,
                    "desc" => Order::Desc,
                    _ => {
                        return Err(ApiError::invalid_param(
                            "order",
                            "invalid_value",
                            format!("Invalid 'order': expected 'asc' or 'desc', got {v:?}."),
                        ))
                    }
                }
            }
            _ => {}
        }
    }
    Ok(page)
}

/// A page of objects as the API returns it. The spec's list objects require `first_id` and
/// `last_id` as strings, so an empty page has empty ones (never null).
#[derive(Serialize)]
pub struct ListOut<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub first_id: String,
    pub last_id: String,
    pub has_more: bool,
}

impl<T> ListOut<T> {
    pub fn new(listed: Listed<T>, id: impl Fn(&T) -> &str) -> ListOut<T> {
        ListOut {
            object: "list",
            first_id: listed
                .items
                .first()
                .map(|x| id(x).to_string())
                .unwrap_or_default(),
            last_id: listed
                .items
                .last()
                .map(|x| id(x).to_string())
                .unwrap_or_default(),
            has_more: listed.has_more,
            data: listed.items,
        }
    }
}

/// A page of a list held in memory (the items of one object), in stored order for `asc`.
pub fn in_memory<T>(
    mut all: Vec<T>,
    page: &Page,
    id: impl Fn(&T) -> &str,
) -> Result<ListOut<T>, ServerError> {
    if page.order == Order::Desc {
        all.reverse();
    }
    let start = match &page.after {
        Some(after) => match all.iter().position(|x| id(x) == after) {
            Some(i) => i + 1,
            None => return Err(StoreError::UnknownCursor(after.clone()).into()),
        },
        None => 0,
    };
    let rest: Vec<T> = all.into_iter().skip(start).collect();
    let has_more = rest.len() > page.limit;
    let items: Vec<T> = rest.into_iter().take(page.limit).collect();
    Ok(ListOut::new(Listed { items, has_more }, id))
}
