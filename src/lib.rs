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

/// Turns transparent huge pages off for this process (Linux; elsewhere nothing to do).
/// mimalloc asks for them, and each first touch of a 2 MiB page has the kernel zero all of
/// it: state that grows and snapshots that come and go spent 3-4 times the system time (Nexmark
/// q18: 4-5 s against 1.3 s) and more memory (q0's peak 159 -> 124 MiB) for a few percent
/// fewer TLB misses. Databases commonly ask for the same (Redis, MongoDB, TiKV).
pub fn without_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes one integer argument and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
