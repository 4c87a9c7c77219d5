//! SQL: parsing Weir's dialect, running statements, and the session they run in.

mod catalog_statements;
pub mod column_names;
pub mod cursor;
pub(crate) mod ddl;
mod dml;
pub mod engine;
pub mod error;
pub mod expr;
mod flink_functions;
/// For the micro benchmarks.
pub use flink_functions::GroupFinder;
mod flink_syntax;
mod functions;
mod information_schema;
mod insert;
pub(crate) mod names;
pub mod parser;
mod rescale;
mod rewrite;
mod savepoints;
mod schema;
pub mod session;
mod show;
mod streaming;
pub mod subscribe;
pub mod subscribe_syntax;
mod types;

pub use engine::{Engine, Outcome};

/// A command completion tag ("CREATE TABLE", "INSERT 0 3").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandTag {
    pub command: String,
    pub rows: Option<usize>,
}

impl CommandTag {
    pub fn new(command: &str) -> Self {
        Self {
            command: command.to_string(),
            rows: None,
        }
    }

    pub fn with_rows(mut self, rows: usize) -> Self {
        self.rows = Some(rows);
        self
    }
}
