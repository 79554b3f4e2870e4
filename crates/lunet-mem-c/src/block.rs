//! The header in front of every tracked block: its size, the allocating thread's counts of its
//! site, its worker arena (if any) and a magic word that tells a live block from a freed one and
//! from a pointer this library never made.

use crate::site::SiteCounts;
use crate::worker_arena::WorkerArena;

/// The header in front of every tracked block. 32 bytes, so the block keeps 16-byte alignment.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Header {
    /// `LIVE` while the block is allocated, `FREED` after, `ENDED` once it escaped an arena that
    /// ended; always XORed with the header's own address (see [`magic`]).
    pub(crate) magic: u64,
    pub(crate) size: usize,
    /// The allocating thread's counts of the block's site (they live as long as the program).
    pub(crate) counts: *const SiteCounts,
    /// The worker arena the block lives in, or null for the heap. A heap block in its thread's
    /// cache of freed blocks (magic `FREED`) keeps there the next cached block of its size
    /// class instead (see [`crate::heap_cache::HeapCache`]).
    pub(crate) arena: *mut WorkerArena,
}

pub(crate) const HEADER: usize = std::mem::size_of::<Header>();
pub(crate) const ALIGN: usize = 16;
pub(crate) const LIVE: u64 = 0x4c55_4e45_544d_454d; // "LUNETMEM"
pub(crate) const FREED: u64 = !LIVE;
/// Marks the blocks of a worker arena that ended while they were live (escaped).
pub(crate) const ENDED: u64 = LIVE ^ 1;
/// The largest block size served: the header and the rounding to `ALIGN` never overflow.
pub(crate) const MAX_SIZE: usize = isize::MAX as usize / 2;
/// The smallest page size of the platforms we run on: a header in the same page as its block's
/// first byte can be read without a fault whatever the pointer is.
pub(crate) const PAGE: usize = 4096;

/// The magic word of a header at `h` in state `kind`: bound to the address, so that a header's
/// bytes copied elsewhere, or stale bytes at another address, never pass for a live block.
#[inline(always)]
pub(crate) fn magic(kind: u64, h: *const Header) -> u64 {
    kind ^ h as usize as u64
}

/// Rounds `size` up to a multiple of `ALIGN` (`size <= MAX_SIZE`).
#[inline(always)]
pub(crate) const fn round_up(size: usize) -> usize {
    (size + ALIGN - 1) & !(ALIGN - 1)
}

const _: () = assert!(
    HEADER % ALIGN == 0,
    "the header must keep the block aligned"
);
