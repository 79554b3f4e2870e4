//! Tracked `malloc`/`free` for C code (`include/lunet_mem.h`), with no Lua: per-site and
//! per-thread counters, neutrality checkpoints, and worker-thread arenas. The `lunet.mem` Lua
//! module links this crate and exports its functions too, beside its own Lua-state functions.
//!
//! Every block made by `lunet_malloc` carries a header in front of it (`block.rs`): its size,
//! the allocating thread's counts of its site, its arena (if any) and a magic word that tells a
//! live block from a freed one and from a pointer this library never made.
//!
//! The hot paths (`lunet_malloc`, `lunet_free`, in `malloc.rs`) take no lock, look nothing up
//! and allocate nothing besides the block itself:
//! - the thread's state is one thread-local pointer (`thread_state.rs`);
//! - the call site is found through a per-call-site slot the header's macro passes (a `static`
//!   in the caller), holding the site's number: an index into the thread's table of its counts
//!   (`site.rs`);
//! - a block's header points to the counts it was counted in, so that `free` counts it back
//!   there without a look-up (unless another thread frees it);
//! - the magic word is XORed with the header's address: reading it is the ownership check, and
//!   mimalloc is asked only when that check fails (to say what the pointer is);
//! - counters are written only by their own thread (plain loads and stores, no read-modify-write)
//!   and summed when reported (`checkpoint.rs`, `report.rs`);
//! - a freed heap block waits in the thread's quarantine (a ring of the last 256 frees, still
//!   marked freed, so that a double free is caught), then small ones wait in a per-thread cache
//!   by size class (still marked freed) where `lunet_malloc` takes them back: most calls reach
//!   neither mimalloc nor anything shared (`heap_cache.rs`);
//! - a worker arena is a bump pointer in chunks kept from one arena to the next
//!   (`worker_arena.rs`).
//!
//! Two parts work in every build, tracked or not: request arenas (`request_arena.rs`: a
//! request's C buffers, bump-allocated in pooled chunks, released at once) and scope accounts
//! (`account.rs`: `lunet_mem_scope_t`, the C side of a Lua scope's ledger, charged with atomics
//! from any thread).
//!
//! Bad use (a double free, a pointer this library did not make, an arena end without begin, a
//! block that escaped its arena) prints what happened and where, then aborts (`fatal.rs`).

mod account;
mod block;
mod checkpoint;
mod fatal;
mod heap_cache;
mod malloc;
mod report;
mod request_arena;
mod site;
mod tally;
mod thread_state;
mod worker_arena;

pub use account::{
    lunet_mem_charge, lunet_mem_scope_release, lunet_mem_scope_retain, lunet_mem_scope_stats,
    Account, AccountStats,
};
pub use checkpoint::{
    lunet_mem_assert_neutral_at, lunet_mem_check_neutral, lunet_mem_checkpoint_take, Checkpoint,
};
pub use malloc::{
    lunet_mem_free_at, lunet_mem_malloc_at, lunet_mem_malloc_site, lunet_mem_realloc_at,
    lunet_mem_realloc_site,
};
pub use report::{libc_file, lunet_mem_c_stats, lunet_mem_report, CStats};
pub use request_arena::{
    lunet_request_alloc, lunet_request_arena_create, lunet_request_arena_destroy,
    lunet_request_arena_stats, lunet_request_realloc, RequestArena, RequestArenaStats,
};
pub use site::SiteSlot;
pub use worker_arena::{
    lunet_mem_arena_begin, lunet_mem_arena_begin_in, lunet_mem_arena_end_at,
    lunet_mem_set_poisoning, ARENA_NEUTRAL, ARENA_REPORT, ARENA_RESET,
};
