//! The streaming runtime: messages, operators, tasks and exchanges.

pub mod exchange;
pub mod graph;
pub mod job;
pub mod manager;
pub mod message;
pub mod mv;
pub mod operator;
pub mod ops;
pub mod sink;
pub mod source;
pub mod window;
