use thiserror::Error;

/// Failures of the catalog and the stores below it.
#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("{kind} \"{name}\" already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("{kind} \"{name}\" does not exist")]
    NotFound { kind: &'static str, name: String },
    #[error("cannot drop {kind} \"{name}\" because {dependents} depend on it; drop them first")]
    HasDependents {
        kind: &'static str,
        name: String,
        dependents: String,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("storage error: {0}")]
    Storage(String),
    #[error("corrupt catalog entry {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("arrow error: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

impl From<sled::Error> for CatalogError {
    fn from(e: sled::Error) -> Self {
        CatalogError::Storage(e.to_string())
    }
}

pub type Result<T, E = CatalogError> = std::result::Result<T, E>;
