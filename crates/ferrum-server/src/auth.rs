//! Who is calling, and whether they may: the middleware in front of every route.
//!
//! Four kinds of callers ([`Principal`]): nobody on an open server (no key of any kind was
//! ever configured: the server stays open as it always was), the single `--api-key`, a project
//! key (`sk-proj-...`, created with a project's service account), and an admin key
//! (`sk-admin-...`, from `--admin-key` or `ferrum admin init` or the admin API). The
//! `/v1/organization` routes take admin keys only; the operator routes (`/admin`) take an admin
//! key or the `--api-key`; the rest of the API takes project keys and the `--api-key`.
//!
//! Keys are looked up by their SHA-256 on every request, so a deleted key or an archived
//! project is refused at once, on every server sharing the database. A fast unsalted hash is
//! right for these keys: they are 64 random characters (over 380 bits), so no dictionary or
//! brute force applies, and a slow password hash (argon2, bcrypt) would only add milliseconds
//! to every request; the hash is what makes a leaked database useless for calling the API.
//!
//! The caller (and its rate-limit admission, see `ratelimit`) is put in a task-local for the
//! handler, which copies it into what outlives the handler (a stream's state) so the response's
//! usage is billed to its project and key.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ferrum_protocol::ApiError;
use ferrum_store::{Attribution, KeyScope, NewKey, Store};
use sha2::{Digest, Sha256};

use crate::ratelimit::{self, Admitted};
use crate::{now, App, ServerError};

/// How long a key's `last_used_at` may lag: a key used many times a second is written to at
/// most once per this many seconds.
const LAST_USED_RESOLUTION_S: i64 = 10;

/// The server's key configuration.
pub struct Auth {
    /// The single `--api-key`, accepted on the API and operator routes.
    legacy: Option<String>,
    /// SHA-256 of `--admin-key`.
    admin_hash: Option<String>,
    /// Whether requests need a key: set when a key is configured, or once the database is seen
    /// to hold one (it never goes back: keys are never removed, only revoked).
    secured: AtomicBool,
}

impl Auth {
    pub fn new(legacy: Option<String>, admin_key: Option<String>) -> Auth {
        let secured = legacy.is_some() || admin_key.is_some();
        Auth {
            legacy,
            admin_hash: admin_key.as_deref().map(hash_key),
            secured: AtomicBool::new(secured),
        }
    }

    /// Whether this server refuses requests without a key.
    async fn secured(&self, store: &Store) -> Result<bool, ServerError> {
        if self.secured.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let any = store.any_keys().await?;
        if any {
            self.secured.store(true, Ordering::Relaxed);
        }
        Ok(any)
    }

    /// Notes that a key now exists (created on this server).
    pub(crate) fn mark_secured(&self) {
        self.secured.store(true, Ordering::Relaxed);
    }
}

/// Who made a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Principal {
    /// Nobody in particular: the server has no keys.
    #[default]
    Open,
    /// The single `--api-key`.
    Legacy,
    Project {
        project_id: String,
        key_id: String,
    },
    /// An admin key; `None` for `--admin-key`, which has no row.
    Admin {
        key_id: Option<String>,
    },
}

/// The caller of the request being handled, and what its admission counted.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    pub principal: Principal,
    pub admission: Option<Arc<Admitted>>,
}

tokio::task_local! {
    static CALLER: Caller;
}

impl Caller {
    /// The caller of the request this task handles (nobody outside a request).
    pub fn current() -> Caller {
        CALLER.try_with(Caller::clone).unwrap_or_default()
    }

    /// Who the ledger bills.
    pub fn attribution(&self) -> Attribution {
        match &self.principal {
            Principal::Project { project_id, key_id } => Attribution {
                project_id: Some(project_id.clone()),
                api_key_id: Some(key_id.clone()),
                service_tier: None,
            },
            Principal::Open | Principal::Legacy | Principal::Admin { .. } => Attribution::default(),
        }
    }
}

/// Which kind of key a route takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Area {
    /// `/v1/organization/...`: admin keys.
    Organization,
    /// `/admin/...`: an admin key or the `--api-key`.
    Operator,
    /// Everything else: project keys and the `--api-key`.
    Api,
}

impl Area {
    fn of(path: &str) -> Area {
        if path.starts_with("/v1/organization/") || path == "/v1/organization" {
            Area::Organization
        } else if path.starts_with("/admin/") {
            Area::Operator
        } else {
            Area::Api
        }
    }
}

/// The middleware: authenticates, checks the route's area, admits rate-limited requests of
/// project keys, runs the handler with the caller in scope, and puts the rate-limit headers on
/// the response.
pub async fn gate(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let area = Area::of(req.uri().path());
    let token = bearer(&req);
    let principal = match identify(&app, token.as_deref()).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = allowed(area, &principal, req.method()) {
        return ServerError::from(e).into_response();
    }
    let (req, admission) = match (&principal, area) {
        (Principal::Project { project_id, .. }, Area::Api) => {
            match ratelimit::admit(&app, project_id, req).await {
                Ok(admitted) => admitted,
                Err(refusal) => return refusal,
            }
        }
        _ => (req, None),
    };
    let admission = admission.map(Arc::new);
    let caller = Caller {
        principal,
        admission: admission.clone(),
    };
    let mut response = CALLER.scope(caller, next.run(req)).await;
    if let Some(a) = admission {
        ratelimit::set_headers(response.headers_mut(), &a.headers);
    }
    response
}

/// The bearer token of a request, if any.
fn bearer(req: &Request) -> Option<String> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Who `token` is, or the 401 that refuses it.
async fn identify(app: &App, token: Option<&str>) -> Result<Principal, ServerError> {
    let auth = &app.auth;
    let Some(token) = token else {
        return if auth.secured(&app.store).await? {
            Err(ApiError::missing_api_key().into())
        } else {
            Ok(Principal::Open)
        };
    };
    if let Some(legacy) = &auth.legacy {
        if constant_time_eq(token.as_bytes(), legacy.as_bytes()) {
            return Ok(Principal::Legacy);
        }
    }
    let hash = hash_key(token);
    if auth.admin_hash.as_deref() == Some(hash.as_str()) {
        return Ok(Principal::Admin { key_id: None });
    }
    let now = now();
    let found = app.store.find_key(&hash).await?;
    let usable = found.filter(|f| {
        f.key.deleted_at.is_none()
            && f.key.expires_at.is_none_or(|t| t > now)
            && f.project_archived_at.is_none()
    });
    let Some(found) = usable else {
        return if auth.secured(&app.store).await? {
            Err(ApiError::invalid_api_key(&redact(token)).into())
        } else {
            // An open server takes any key (the SDKs insist on sending one).
            Ok(Principal::Open)
        };
    };
    auth.mark_secured();
    let key = found.key;
    if key
        .last_used_at
        .is_none_or(|t| now - t >= LAST_USED_RESOLUTION_S)
    {
        if let Err(e) = app.store.touch_key(&key.id, now).await {
            tracing::warn!(error = %e, key = %key.id, "could not note a key's last use");
        }
    }
    Ok(match key.scope {
        KeyScope::Project { project_id, .. } => Principal::Project {
            project_id,
            key_id: key.id,
        },
        KeyScope::Admin => Principal::Admin {
            key_id: Some(key.id),
        },
    })
}

/// Whether `who` may use a route of `area`: the error in OpenAI's words if not.
fn allowed(area: Area, who: &Principal, method: &Method) -> Result<(), ApiError> {
    let scope = if method == Method::GET {
        "api.management.read"
    } else {
        "api.management.write"
    };
    match (area, who) {
        (Area::Organization, Principal::Admin { .. }) => Ok(()),
        (Area::Organization, Principal::Project { .. } | Principal::Legacy) => {
            Err(ApiError::missing_scope(scope))
        }
        (Area::Organization, Principal::Open) => {
            let mut e = ApiError::missing_api_key();
            e.message = "This server has no admin key: start it with --admin-key (or \
                         FERRUM_ADMIN_KEY), or create one with `ferrum admin init`, to use the \
                         organization API."
                .into();
            Err(e)
        }
        (Area::Operator, Principal::Open | Principal::Legacy | Principal::Admin { .. }) => Ok(()),
        (Area::Operator, Principal::Project { .. }) => Err(ApiError::missing_scope(scope)),
        (Area::Api, Principal::Open | Principal::Legacy | Principal::Project { .. }) => Ok(()),
        (Area::Api, Principal::Admin { .. }) => Err(admin_key_on_api()),
    }
}

fn admin_key_on_api() -> ApiError {
    ApiError::permission_denied(
        "Admin API keys can only be used with the organization API (/v1/organization). Use a \
         project API key (sk-proj-...) for this request.",
    )
}

/// SHA-256 of a key, hex: what the database keeps instead of the key.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new key with `prefix` (`sk-proj-`, `sk-admin-`): 64 random letters and digits.
pub fn new_key_value(prefix: &str) -> String {
    use rand::distributions::Alphanumeric;
    use rand::Rng;
    let tail: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(64)
        .map(char::from)
        .collect();
    format!("{prefix}{tail}")
}

/// How lists show a key: its prefix and last four characters (`sk-proj-...wxyz`).
pub fn redacted_value(key: &str) -> String {
    let prefix = if key.starts_with("sk-admin-") {
        "sk-admin"
    } else if key.starts_with("sk-proj-") {
        "sk-proj"
    } else {
        "sk"
    };
    let tail: String = key
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("{prefix}-...{tail}")
}

/// Creates an admin key in `store` (what `ferrum admin init` and the admin API do): the key's
/// row, and the key itself, which is never shown again.
pub async fn create_admin_key(
    store: &Store,
    name: &str,
    expires_at: Option<i64>,
) -> Result<(ferrum_store::KeyRecord, String), ServerError> {
    let value = new_key_value("sk-admin-");
    let created_at = now();
    let key = NewKey {
        id: crate::random_id("key_"),
        scope: KeyScope::Admin,
        name: name.to_string(),
        hash: hash_key(&value),
        redacted: redacted_value(&value),
        created_at,
        expires_at,
    };
    store.create_key(&key).await?;
    tracing::info!(key = %key.id, name, "admin key created");
    let record = ferrum_store::KeyRecord {
        id: key.id,
        scope: KeyScope::Admin,
        name: key.name,
        redacted: key.redacted,
        created_at,
        expires_at,
        last_used_at: None,
        deleted_at: None,
    };
    Ok((record, value))
}

/// Compares without an early exit, so response times do not reveal how much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `sk-ab****wxyz`, as OpenAI shows a wrong key.
fn redact(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_and_hashed() {
        let a = new_key_value("sk-proj-");
        let b = new_key_value("sk-proj-");
        assert_ne!(a, b);
        assert_eq!(a.len(), "sk-proj-".len() + 64);
        assert_eq!(hash_key(&a).len(), 64);
        assert_ne!(hash_key(&a), hash_key(&b));
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let shown = redacted_value(&a);
        assert!(
            shown.starts_with("sk-proj-...") && a.ends_with(&shown[11..]),
            "{shown}"
        );
    }

    #[test]
    fn routes_fall_in_their_areas() {
        assert!(Area::of("/v1/organization/projects") == Area::Organization);
        assert!(Area::of("/admin/models") == Area::Operator);
        assert!(Area::of("/v1/chat/completions") == Area::Api);
        assert!(Area::of("/v1/organizations") == Area::Api);
    }
}
