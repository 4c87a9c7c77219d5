//! Weir: a streaming SQL engine server speaking the Postgres wire protocol.

pub mod connector;
pub mod plan;
pub mod server;
pub mod sql;
pub mod stream;

/// Every program linking Weir (the server, its tests and benchmarks) allocates with
/// mimalloc, which reuses freed memory instead of returning large blocks to the kernel.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
