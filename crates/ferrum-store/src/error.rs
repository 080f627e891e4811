//! The store's one error type: every failure names what it was doing and on which database.

use std::path::PathBuf;

/// Why a store operation failed.
///
/// URLs in messages have their password replaced by `***`, so an error can be logged or shown
/// to an operator as is.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names no backend this build supports.
    #[error(
        "unsupported database URL `{url}`: expected `sqlite://PATH`, `sqlite::memory:` or \
         `postgres://USER:PASSWORD@HOST/DATABASE`"
    )]
    UnsupportedUrl {
        /// The URL given, password redacted.
        url: String,
    },

    /// The URL has a supported scheme but sqlx cannot parse the rest of it.
    #[error("invalid database URL `{url}`: {source}")]
    InvalidUrl {
        /// The URL given, password redacted.
        url: String,
        #[source]
        source: sqlx::Error,
    },

    /// The directory that should hold the SQLite file could not be created.
    #[error("cannot create the directory {} for the SQLite database: {source}", path.display())]
    CreateDir {
        /// The directory that could not be created.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The SQLite file could not be opened or created (permissions, not a database, ...).
    #[error("cannot open or create the SQLite database {}: {source}", path.display())]
    OpenSqlite {
        /// The database file, as an absolute path.
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },

    /// The database server could not be reached or refused the connection.
    #[error("cannot connect to the database `{url}`: {source}")]
    Connect {
        /// The server's URL, password redacted.
        url: String,
        #[source]
        source: sqlx::Error,
    },

    /// A schema migration failed; its transaction was rolled back.
    #[error("database migration {version} ({name}) failed: {source}")]
    Migration {
        /// The migration's version, its number in `migrations/`.
        version: i64,
        /// The migration's name.
        name: &'static str,
        #[source]
        source: sqlx::Error,
    },

    /// The database was migrated by a newer ferrum than this one, which cannot know its schema.
    #[error(
        "the database schema is at version {found}, newer than this build of ferrum knows \
         (up to {known}); upgrade ferrum or point it at another database"
    )]
    NewerSchema {
        /// The highest migration version recorded in the database.
        found: i64,
        /// The highest migration version this build has.
        known: i64,
    },

    /// A count does not fit the database's signed 64-bit integers (or a stored one is negative).
    #[error("{field} = {value} is out of range for the database (0 ..= 2^63-1)")]
    OutOfRange {
        /// The field, e.g. `prompt_tokens`.
        field: &'static str,
        /// The value that did not fit.
        value: String,
    },

    /// A list's `after` cursor names no row.
    #[error("no object with id `{0}` to list after")]
    UnknownCursor(String),

    /// Any other database failure.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}
