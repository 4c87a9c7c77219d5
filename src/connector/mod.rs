//! Connectors: where table rows come from and go to.
//!
//! Weir's own table log (tables without a connector), the WITH-option specifications
//! every named connector is validated against, and the built-in connectors' readers and
//! writers, opened through [`factory`].

pub mod connector_table;
pub mod datagen;
pub mod debezium;
pub mod factory;
pub mod filesystem;
pub mod format;
pub mod io;
pub mod kafka;
pub mod log_table;
pub mod nexmark;
pub mod options;
pub mod print;
pub mod share;

pub use factory::{is_bounded, open_sink, open_split};
