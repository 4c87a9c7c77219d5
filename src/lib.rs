//! Weir: a streaming SQL engine server speaking the Postgres wire protocol.

pub mod connector;
pub mod plan;
pub mod server;
pub mod sql;
pub mod stream;
