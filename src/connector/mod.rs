//! Connectors: where table rows come from and go to.
//!
//! Today: Weir's own table log (tables without a connector), and the WITH-option
//! specifications every named connector is validated against.

pub mod connector_table;
pub mod factory;
pub mod io;
pub mod log_table;
pub mod options;
