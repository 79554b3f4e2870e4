//! What one thread keeps, reached through one thread-local pointer: its counts of each site, its
//! live bytes and their peak, its worker arenas and spare chunks, and its freed heap blocks
//! ([`HeapCache`]).

use std::cell::Cell;
use std::ffi::{c_char, c_int};
use std::ptr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use libmimalloc_sys as mi;

use crate::block::Header;
use crate::heap_cache::HeapCache;
use crate::request_arena;
use crate::site::{new_published_peak, site_at, Site, SiteCounts, SiteSlot};
use crate::worker_arena::{Chunk, WorkerArena, SPARE_CHUNKS};

/// One thread's state.
///
/// Reached through one pointer-sized thread-local ([`STATE`]): a module's static TLS must stay
/// small, or `dlopen` of the Lua module fails ("cannot allocate memory in static TLS block").
pub(crate) struct ThreadState {
    /// The thread's identity in [`SiteCounts::owner`]: never reused, unlike this state's address.
    pub(crate) serial: u64,
    /// Bytes this thread allocated minus bytes it freed, and the highest that reached (also
    /// published in `published_peak`, for reports).
    live_bytes: i64,
    peak_bytes: i64,
    published_peak: &'static AtomicI64,
    /// This thread's counts of each site, by site number; null where it has none yet (and at
    /// 0, the number of no site).
    pub(crate) site_counts: Vec<*const SiteCounts>,
    /// For callers that pass no slot (`lunet_mem_malloc_at`): counts direct-mapped by
    /// `(file, line)`. Null or one of this thread's counts.
    site_cache: Box<[*const SiteCounts; SITE_CACHE_SLOTS]>,
    /// The innermost open arena (`arenas[depth - 1]`), or null.
    pub(crate) top: *mut WorkerArena,
    /// Arenas made by this thread (from `Box::into_raw`, freed with the state): `[..depth]` are
    /// open, innermost last; the rest wait for reuse.
    pub(crate) arenas: Vec<*mut WorkerArena>,
    pub(crate) depth: usize,
    /// Chunks of ended arenas, kept for the next ones (at most `SPARE_CHUNKS`).
    pub(crate) spare_chunks: Vec<*mut Chunk>,
    /// Freed heap blocks: the quarantine, then the cache they are reused from.
    pub(crate) heap: HeapCache,
    /// Chunks of destroyed request arenas, kept for the next ones (at most `POOL_CHUNKS`).
    pub(crate) request_chunks: Vec<*mut request_arena::Chunk>,
}

const SITE_CACHE_SLOTS: usize = 256;

const _: () = assert!(SITE_CACHE_SLOTS.is_power_of_two());

thread_local! {
    /// This thread's state (from `Box::into_raw`), or null before its first use (and after the
    /// thread's destructors freed it). No destructor of its own: reading it is one load.
    pub(crate) static STATE: Cell<*mut ThreadState> = const { Cell::new(ptr::null_mut()) };
    /// Zero-sized: frees the state when the thread ends (registered when the state is made).
    static STATE_OWNER: StateOwner = const { StateOwner };
}

struct StateOwner;

impl Drop for StateOwner {
    fn drop(&mut self) {
        let state = STATE.replace(ptr::null_mut());
        if !state.is_null() {
            // SAFETY: made by `Box::into_raw` in `new_state`, and no longer reachable.
            drop(unsafe { Box::from_raw(state) });
        }
    }
}

static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

/// This thread's state, made on first use. The callers turn it into the only reference to the
/// state while they run: nothing they call comes back into this API.
#[inline(always)]
pub(crate) fn state() -> *mut ThreadState {
    let state = STATE.get();
    if state.is_null() {
        new_state()
    } else {
        state
    }
}

#[cold]
#[inline(never)]
fn new_state() -> *mut ThreadState {
    let published_peak = new_published_peak();
    let state = Box::into_raw(Box::new(ThreadState {
        serial: NEXT_SERIAL.fetch_add(1, Relaxed),
        live_bytes: 0,
        peak_bytes: 0,
        published_peak,
        site_counts: vec![ptr::null(); 64],
        site_cache: Box::new([ptr::null(); SITE_CACHE_SLOTS]),
        top: ptr::null_mut(),
        arenas: Vec::new(),
        depth: 0,
        spare_chunks: Vec::with_capacity(SPARE_CHUNKS),
        heap: HeapCache::new(),
        request_chunks: Vec::with_capacity(request_arena::POOL_CHUNKS),
    }));
    STATE.set(state);
    // Registers the destructor. It fails only while the thread's destructors run: the state
    // made then is never freed (its counts stay right).
    let _ = STATE_OWNER.try_with(|_| ());
    state
}

impl Drop for ThreadState {
    fn drop(&mut self) {
        // The freed heap blocks go back to mimalloc when `heap` drops.
        for arena in std::mem::take(&mut self.arenas) {
            // SAFETY: made by `Box::into_raw` in `lunet_mem_arena_begin`, used by nothing else
            // now. The chunks of an arena left open are freed with it.
            let mut arena = unsafe { Box::from_raw(arena) };
            arena.release(&mut self.spare_chunks);
            if !arena.account.is_null() {
                // SAFETY: an arena left open holds a reference to its account.
                unsafe { crate::account::drop_ref(arena.account) };
            }
        }
        // SAFETY: pooled chunks are in no arena.
        unsafe { request_arena::free_pool(&mut self.request_chunks) };
        for &chunk in &self.spare_chunks {
            // SAFETY: a spare chunk from `mi_malloc_aligned`, used by no arena.
            unsafe { mi::mi_free(chunk.cast()) };
        }
    }
}

fn site_cache_slot(file: *const c_char, line: c_int) -> usize {
    ((file as usize >> 3) ^ (line as usize).wrapping_mul(31)) & (SITE_CACHE_SLOTS - 1)
}

impl ThreadState {
    /// This thread's counts of `site`.
    #[inline(always)]
    pub(crate) fn counts_of(&mut self, site: &'static Site) -> *const SiteCounts {
        match self.site_counts.get(site.id) {
            Some(&counts) if !counts.is_null() => counts,
            _ => self.new_counts(site),
        }
    }

    #[cold]
    #[inline(never)]
    fn new_counts(&mut self, site: &'static Site) -> *const SiteCounts {
        let counts = site.new_counts(self.serial);
        if self.site_counts.len() <= site.id {
            self.site_counts
                .resize((site.id + 1).next_power_of_two(), ptr::null());
        }
        self.site_counts[site.id] = counts;
        counts
    }

    /// This thread's counts of the call site that owns `slot` (`file:line`).
    ///
    /// # Safety
    /// `slot` is NULL or a valid slot; `file` as in `lunet_mem_malloc_at`.
    #[inline(always)]
    pub(crate) unsafe fn counts_in_slot(
        &mut self,
        slot: *const SiteSlot,
        file: *const c_char,
        line: c_int,
    ) -> *const SiteCounts {
        // SAFETY: a valid slot or NULL (the caller's contract).
        match unsafe { slot.as_ref() } {
            Some(slot) => match self.site_counts.get(slot.id.load(Relaxed)) {
                Some(&counts) if !counts.is_null() => counts,
                _ => {
                    let site = site_at(file, line);
                    slot.id.store(site.id, Relaxed);
                    self.counts_of(site)
                }
            },
            None => self.counts_at(file, line),
        }
    }

    /// This thread's counts of the site `file:line`, for callers without a slot.
    #[inline(always)]
    pub(crate) fn counts_at(&mut self, file: *const c_char, line: c_int) -> *const SiteCounts {
        let slot = site_cache_slot(file, line);
        // SAFETY: a non-null cache entry is one of this thread's counts (never freed).
        if let Some(cached) = unsafe { self.site_cache[slot].as_ref() } {
            if ptr::eq(cached.site.file, file) && cached.site.line == line {
                return cached;
            }
        }
        let counts = self.counts_of(site_at(file, line));
        self.site_cache[slot] = counts;
        counts
    }

    /// Counts a block of `size` bytes made in `counts` (one of this thread's).
    #[inline(always)]
    pub(crate) fn count_made(&mut self, counts: *const SiteCounts, size: usize) {
        // SAFETY: this thread's counts, never freed.
        unsafe { (*counts).counts.made(size) };
        self.live_bytes += size as i64;
        if self.live_bytes > self.peak_bytes {
            self.peak_bytes = self.live_bytes;
            self.published_peak.store(self.live_bytes, Relaxed);
        }
    }

    /// Counts a block of `size` bytes freed in `counts` (one of this thread's).
    #[inline(always)]
    pub(crate) fn count_freed(&mut self, counts: *const SiteCounts, size: usize) {
        // SAFETY: this thread's counts, never freed.
        unsafe { (*counts).counts.freed(size) };
        self.live_bytes -= size as i64;
    }

    /// A block for `size` bytes with no call and no growth: from the cache, or from the
    /// innermost arena's current chunk; null when that is not enough (then `alloc`).
    #[inline(always)]
    pub(crate) fn block_fast(&mut self, size: usize) -> *mut Header {
        let arena = self.top;
        if !arena.is_null() {
            // SAFETY: this thread's innermost open arena; no other reference to it while this
            // runs. (An arena that charges a scope goes the slow way: `alloc_charged`.)
            return unsafe {
                if (*arena).account.is_null() {
                    (*arena).alloc_fast(size)
                } else {
                    ptr::null_mut()
                }
            };
        }
        self.heap.cached_block_for(size)
    }
}
