//! Weir's durable metadata and storage.
//!
//! Everything Weir persists lives in one [`StateStore`] keyspace (sled by default):
//! the catalog of tables and views, and the built-in table log that backs tables
//! declared without a connector. Keeping both in one keyspace lets a DDL statement and
//! the data it touches change in one atomic batch.

mod catalog;
mod error;
mod keyed;
mod keys;
mod store;
mod table_def;
mod table_log;
mod types;
mod value_files;

pub use catalog::Catalog;
pub use error::{CatalogError, Result};
pub use store::{MemoryStore, SledStore, StateStore, WriteBatch};
pub use table_def::{
    quote_ident, ColumnDef, ComputedColumn, JobDef, TableDef, TableId, ViewDef, WatermarkDef,
};
pub use table_log::{decode as decode_changes, encode as encode_changes};
pub use table_log::{op, Changes, LogEntry, Offset, TableLog};
pub use types::{
    SqlType, DEFAULT_DECIMAL_PARTS, DEFAULT_TIMESTAMP_PRECISION, DEFAULT_TIME_PRECISION,
};
