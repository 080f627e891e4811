//! Database URLs: which backend a URL names, the SQLite file behind it, and the default location.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;

use crate::StoreError;

/// The database engine behind a [`Store`](crate::Store).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database URL, checked and normalised into the URL handed to sqlx's `Any` driver.
#[derive(Debug)]
pub(crate) enum Target {
    /// A SQLite file. `url` names it by absolute path and, unless the caller chose a `mode`,
    /// with `mode=rwc` so that the file is created when missing.
    SqliteFile {
        path: PathBuf,
        url: String,
    },
    /// A private in-memory SQLite database, gone when its last connection closes.
    SqliteMemory {
        url: String,
    },
    Postgres {
        url: String,
    },
}

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Target, StoreError> {
        let url = url.trim();
        if url.starts_with("sqlite:") {
            parse_sqlite(url)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            PgConnectOptions::from_str(url).map_err(|source| StoreError::InvalidUrl {
                url: redact(url),
                source,
            })?;
            Ok(Target::Postgres {
                url: url.to_owned(),
            })
        } else {
            Err(StoreError::UnsupportedUrl { url: redact(url) })
        }
    }

    pub(crate) fn backend(&self) -> Backend {
        match self {
            Target::SqliteFile { .. } | Target::SqliteMemory { .. } => Backend::Sqlite,
            Target::Postgres { .. } => Backend::Postgres,
        }
    }

    /// The URL for sqlx, which may carry a password: log [`Target::redacted`] instead.
    pub(crate) fn sqlx_url(&self) -> &str {
        match self {
            Target::SqliteFile { url, .. }
            | Target::SqliteMemory { url }
            | Target::Postgres { url } => url,
        }
    }

    /// The URL with its password hidden, for logs and error messages.
    pub(crate) fn redacted(&self) -> String {
        redact(self.sqlx_url())
    }
}

fn parse_sqlite(url: &str) -> Result<Target, StoreError> {
    let invalid = |source| StoreError::InvalidUrl {
        url: url.to_owned(),
        source,
    };
    // sqlx's own parser checks the URL and decodes the file name, so that `sqlite://x.db`,
    // `sqlite:x.db` and percent-encoded names mean here exactly what they mean to the driver.
    let options = SqliteConnectOptions::from_str(url).map_err(invalid)?;
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let (database, query) = rest.split_once('?').unwrap_or((rest, ""));
    let params: Vec<(&str, &str)> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .collect();
    if database == ":memory:" || params.contains(&("mode", "memory")) {
        return Ok(Target::SqliteMemory {
            url: url.to_owned(),
        });
    }
    // An absolute path keeps the database where it was meant to be even if the process later
    // changes directory, and makes logs unambiguous.
    let path = std::path::absolute(options.get_filename())
        .map_err(|e| invalid(sqlx::Error::Configuration(e.into())))?;
    // The URL is rebuilt by hand: sqlx's `to_url_lossy` panics on some file names.
    let mut normalised = sqlite_url(&path);
    let mut sep = '?';
    for (key, value) in &params {
        normalised.push_str(&format!("{sep}{key}={value}"));
        sep = '&';
    }
    if !params.iter().any(|(key, _)| *key == "mode") {
        normalised.push_str(&format!("{sep}mode=rwc"));
    }
    Ok(Target::SqliteFile {
        path,
        url: normalised,
    })
}

/// Replaces the password in `scheme://user:password@host/...` by `***`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
        None => url.to_owned(),
    }
}

/// The default database: `ferrum.db` in the ferrum data directory, the same directory
/// ferrum-registry keeps weights in (`$FERRUM_HOME`, else `~/.cache/ferrum`).
pub(crate) fn default_url() -> String {
    sqlite_url(&ferrum_home().join("ferrum.db"))
}

/// `$FERRUM_HOME`, else `~/.cache/ferrum`.
fn ferrum_home() -> PathBuf {
    match std::env::var("FERRUM_HOME") {
        // An empty value counts as unset, as shells often export empty variables.
        Ok(home) if !home.trim().is_empty() => PathBuf::from(home),
        _ => dirs::home_dir()
            .unwrap_or_else(|| PathBuf::from("."))
            .join(".cache/ferrum"),
    }
}

/// The default blob directory for a database: `files/` beside a SQLite file (so a database
/// and its files move together), else `files/` in the ferrum data directory.
pub(crate) fn default_blob_dir(database_url: &str) -> PathBuf {
    match Target::parse(database_url) {
        Ok(Target::SqliteFile { path, .. }) => path
            .parent()
            .map_or_else(|| PathBuf::from("files"), |d| d.join("files")),
        _ => ferrum_home().join("files"),
    }
}

/// A `sqlite://` URL for a path. sqlx percent-decodes the path, so the characters that would
/// otherwise end it or be decoded are encoded.
pub(crate) fn sqlite_url(path: &Path) -> String {
    let mut url = String::from("sqlite://");
    for c in path.to_string_lossy().chars() {
        match c {
            '%' => url.push_str("%25"),
            '?' => url.push_str("%3F"),
            '#' => url.push_str("%23"),
            c => url.push(c),
        }
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db?sslmode=disable"),
            "postgres://u:***@h:5432/db?sslmode=disable"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
        assert_eq!(redact("sqlite:///a/b.db"), "sqlite:///a/b.db");
    }

    #[test]
    fn sqlite_urls_become_absolute_and_creatable() {
        let Target::SqliteFile { path, url } = Target::parse("sqlite://rel/x.db").unwrap() else {
            panic!("expected a file")
        };
        assert!(path.is_absolute());
        assert!(path.ends_with("rel/x.db"));
        assert!(url.contains("mode=rwc"), "{url}");

        let Target::SqliteFile { url, .. } = Target::parse("sqlite:///a/b.db?mode=ro").unwrap()
        else {
            panic!("expected a file")
        };
        assert!(url.contains("mode=ro"), "{url}");
    }

    #[test]
    fn memory_and_odd_paths() {
        assert!(matches!(
            Target::parse("sqlite::memory:").unwrap(),
            Target::SqliteMemory { .. }
        ));
        let odd = Path::new("/tmp/a b/c?d#e%f.db");
        let Target::SqliteFile { path, .. } = Target::parse(&sqlite_url(odd)).unwrap() else {
            panic!("expected a file")
        };
        assert_eq!(path, odd);
    }

    #[test]
    fn unsupported_schemes() {
        for url in ["mysql://u:p@h/db", "ferrum.db", ""] {
            let err = Target::parse(url).unwrap_err();
            assert!(matches!(err, StoreError::UnsupportedUrl { .. }), "{err}");
        }
        let err = Target::parse("mysql://u:p@h/db").unwrap_err().to_string();
        assert!(!err.contains(":p@"), "{err}");
    }
}
