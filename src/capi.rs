//! The C API for the runtime's own C code (`include/lunet_mem.h`): tracked `malloc`/`free` with
//! per-site and per-thread counters, neutrality checkpoints, and worker-thread arenas.
//!
//! Every block made by `lunet_malloc` carries a [`Header`] in front of it: its size, the
//! allocating thread's counts of its site, its arena (if any) and a magic word that tells a live
//! block from a freed one and from a pointer this library never made.
//!
//! The hot paths (`lunet_malloc`, `lunet_free`) take no lock, look nothing up and allocate
//! nothing besides the block itself:
//! - the thread's state is one thread-local pointer;
//! - the call site is found through a per-call-site slot the header's macro passes (a `static`
//!   in the caller), holding the site's number: an index into the thread's table of its counts;
//! - a block's header points to the counts it was counted in, so that `free` counts it back
//!   there without a look-up (unless another thread frees it);
//! - the magic word is XORed with the header's address: reading it is the ownership check, and
//!   mimalloc is asked only when that check fails (to say what the pointer is);
//! - counters are written only by their own thread (plain loads and stores, no read-modify-write)
//!   and summed when reported;
//! - a freed heap block waits in the thread's quarantine (a ring of the last 256 frees, still
//!   marked freed, so that a double free is caught), then small ones wait in a per-thread cache
//!   by size class (still marked freed) where `lunet_malloc` takes them back: most calls reach
//!   neither mimalloc nor anything shared;
//! - a worker arena is a bump pointer in chunks kept from one arena to the next.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::io::Write;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};

use libmimalloc_sys as mi;
use mlua::ffi::{self, lua_State};

/// The header in front of every tracked block. 32 bytes, so the block keeps 16-byte alignment.
#[repr(C)]
#[derive(Clone, Copy)]
struct Header {
    /// `LIVE` while the block is allocated, `FREED` after, `ENDED` once it escaped an arena that
    /// ended; always XORed with the header's own address (see [`magic`]).
    magic: u64,
    size: usize,
    /// The allocating thread's counts of the block's site (they live as long as the program).
    counts: *const SiteCounts,
    /// The worker arena the block lives in, or null for the heap. A heap block in its thread's
    /// cache of freed blocks (magic `FREED`) keeps there the next cached block of its size
    /// class instead (see [`ThreadState::recycle`]).
    arena: *mut Arena,
}

const HEADER: usize = std::mem::size_of::<Header>();
const ALIGN: usize = 16;
const LIVE: u64 = 0x4c55_4e45_544d_454d; // "LUNETMEM"
const FREED: u64 = !LIVE;
/// Marks the blocks of a worker arena that ended while they were live (escaped).
const ENDED: u64 = LIVE ^ 1;
/// Byte written over an arena's memory when it is released, if poisoning is on.
const POISON: u8 = 0xde;
/// The largest block size served: the header and the rounding to `ALIGN` never overflow.
const MAX_SIZE: usize = isize::MAX as usize / 2;
/// The smallest page size of the platforms we run on: a header in the same page as its block's
/// first byte can be read without a fault whatever the pointer is.
const PAGE: usize = 4096;

/// The magic word of a header at `h` in state `kind`: bound to the address, so that a header's
/// bytes copied elsewhere, or stale bytes at another address, never pass for a live block.
#[inline(always)]
fn magic(kind: u64, h: *const Header) -> u64 {
    kind ^ h as usize as u64
}

/// Rounds `size` up to a multiple of `ALIGN` (`size <= MAX_SIZE`).
#[inline(always)]
fn round_up(size: usize) -> usize {
    (size + ALIGN - 1) & !(ALIGN - 1)
}

// ---------------------------------------------------------------------------------------------
// Counters and sites

/// Allocation counts written by one thread only (plain load and store: no read-modify-write)
/// and read by reports from any thread.
#[derive(Default)]
struct Counts {
    allocs: AtomicU64,
    frees: AtomicU64,
    bytes_allocated: AtomicU64,
    bytes_freed: AtomicU64,
}

impl Counts {
    /// Counts a block of `size` bytes made by the owning thread.
    #[inline(always)]
    fn made(&self, size: usize) {
        bump(&self.allocs, 1);
        bump(&self.bytes_allocated, size as u64);
    }

    /// Counts a block of `size` bytes freed by the owning thread.
    #[inline(always)]
    fn freed(&self, size: usize) {
        bump(&self.frees, 1);
        bump(&self.bytes_freed, size as u64);
    }
}

#[inline(always)]
fn bump(counter: &AtomicU64, by: u64) {
    // Only the owning thread writes: a plain load and store is enough (no read-modify-write).
    counter.store(counter.load(Relaxed).wrapping_add(by), Relaxed);
}

/// One allocation site (`file:line` of the call). Its counts are kept per thread (each thread
/// writes only its own) and summed when reported.
pub struct Site {
    file: *const c_char,
    line: c_int,
    /// The site's number, from 1: its index in each thread's table of its counts, and what a
    /// call site's [`SiteSlot`] holds.
    id: usize,
    /// Every thread's counts of this site.
    locals: Mutex<Vec<&'static SiteCounts>>,
}

// SAFETY: `file` points to a string literal (`__FILE__`) that lives as long as the program; the
// counts are behind a mutex and atomics.
unsafe impl Sync for Site {}
// SAFETY: as above.
unsafe impl Send for Site {}

/// One thread's counts of one site. Aligned to a cache line: other threads' counts never share
/// it. Never freed: block headers point to them, and reports sum them after the thread ended.
#[repr(align(64))]
pub struct SiteCounts {
    counts: Counts,
    /// The serial number of the thread that writes these counts.
    owner: u64,
    site: &'static Site,
}

/// `(allocs, frees, live blocks, live bytes)` of a site.
type SiteTotals = (u64, u64, i64, i64);

impl Site {
    /// The site's figures over every thread.
    fn totals(&self) -> SiteTotals {
        let locals = self.locals.lock().unwrap_or_else(|e| e.into_inner());
        let (mut a, mut f, mut ba, mut bf) = (0u64, 0u64, 0u64, 0u64);
        for l in locals.iter() {
            a += l.counts.allocs.load(Relaxed);
            f += l.counts.frees.load(Relaxed);
            ba += l.counts.bytes_allocated.load(Relaxed);
            bf += l.counts.bytes_freed.load(Relaxed);
        }
        (a, f, a as i64 - f as i64, ba as i64 - bf as i64)
    }

    fn file(&self) -> String {
        if self.file.is_null() {
            return "?".into();
        }
        // SAFETY: a NUL-terminated string literal (see `Sync`).
        unsafe { CStr::from_ptr(self.file) }
            .to_string_lossy()
            .into_owned()
    }
}

/// Every site seen, by `(file pointer, line)`. Sites are never freed (there are as many as call
/// sites in the program).
fn sites() -> &'static Mutex<HashMap<(usize, c_int), &'static Site>> {
    static SITES: OnceLock<Mutex<HashMap<(usize, c_int), &'static Site>>> = OnceLock::new();
    SITES.get_or_init(Default::default)
}

/// The site `file:line`, made on first use.
fn site_at(file: *const c_char, line: c_int) -> &'static Site {
    let mut sites = sites().lock().unwrap_or_else(|e| e.into_inner());
    let id = sites.len() + 1;
    sites.entry((file as usize, line)).or_insert_with(|| {
        Box::leak(Box::new(Site {
            file,
            line,
            id,
            locals: Mutex::new(Vec::new()),
        }))
    })
}

/// `lunet_mem_site_t`: a call site's slot, a zero-initialised `static` in the caller that
/// remembers the site's number after the first call (0: not known yet).
#[repr(C)]
pub struct SiteSlot {
    id: AtomicUsize,
}

/// Each thread's peak of live bytes (written only by its thread; never freed: reports read them
/// after the thread ended). A thread's other totals are the sums of its counts of each site.
fn peaks() -> &'static Mutex<Vec<&'static AtomicI64>> {
    static PEAKS: OnceLock<Mutex<Vec<&'static AtomicI64>>> = OnceLock::new();
    PEAKS.get_or_init(Default::default)
}

// ---------------------------------------------------------------------------------------------
// Thread state

/// What one thread keeps: its counts of each site, its live bytes and their peak, its worker
/// arenas, spare arena chunks, its quarantine of freed blocks and its cache of blocks to reuse.
///
/// Reached through one pointer-sized thread-local ([`STATE`]): a module's static TLS must stay
/// small, or `dlopen` of the Lua module fails ("cannot allocate memory in static TLS block").
struct ThreadState {
    /// The thread's identity in [`SiteCounts::owner`]: never reused, unlike this state's address.
    serial: u64,
    /// Bytes this thread allocated minus bytes it freed, and the highest that reached (also
    /// published in `published_peak`, for reports).
    live_bytes: i64,
    peak_bytes: i64,
    published_peak: &'static AtomicI64,
    /// This thread's counts of each site, by site number; null where it has none yet (and at
    /// 0, the number of no site).
    site_counts: Vec<*const SiteCounts>,
    /// For callers that pass no slot (`lunet_mem_malloc_at`): counts direct-mapped by
    /// `(file, line)`. Null or one of this thread's counts.
    site_cache: Box<[*const SiteCounts; SITE_CACHE_SLOTS]>,
    /// The innermost open arena (`arenas[depth - 1]`), or null.
    top: *mut Arena,
    /// Arenas made by this thread (from `Box::into_raw`, freed with the state): `[..depth]` are
    /// open, innermost last; the rest wait for reuse.
    arenas: Vec<*mut Arena>,
    depth: usize,
    /// Chunks of ended arenas, kept for the next ones (at most `SPARE_CHUNKS`).
    spare_chunks: Vec<*mut Chunk>,
    /// Heap blocks freed last on this thread (a ring; null where empty), kept, marked freed,
    /// before they go back to the cache or mimalloc, so that a double free of one of them is
    /// seen rather than freeing whatever reused the memory. With each, its size class (0 if it
    /// is too big for the cache), so that letting it go reads nothing from the block.
    quarantine: Box<[(*mut Header, usize); QUARANTINE_BLOCKS]>,
    /// The ring's oldest entry: the next to leave.
    quarantine_next: usize,
    /// Heap blocks out of the quarantine, kept for reuse by size class (a block of class `c`
    /// has `16 * c` bytes, header included): linked through their headers' `arena` field,
    /// still marked freed, `cached_bytes` in all. Reusing them here saves a call into mimalloc
    /// for each `lunet_malloc` and `lunet_free`.
    cache: [*mut Header; CACHE_CLASSES],
    cached_bytes: usize,
}

/// How many freed blocks a thread keeps back (a power of two).
const QUARANTINE_BLOCKS: usize = 256;
const SITE_CACHE_SLOTS: usize = 256;
/// How many chunks of ended arenas a thread keeps for its next arenas.
const SPARE_CHUNKS: usize = 4;
/// Heap blocks of up to this many bytes (header included) are served from mimalloc's small
/// size classes, and recycled in the thread's cache.
const CACHED_MAX: usize = 1024;
const CACHE_CLASSES: usize = CACHED_MAX / ALIGN + 1;
/// The most bytes of freed blocks a thread's cache holds (beyond the quarantine's).
const CACHE_BYTES: usize = 64 * 1024;

/// The size class of a heap block of `total` bytes, header included (`total <= CACHED_MAX`).
#[inline(always)]
fn size_class(total: usize) -> usize {
    // A shift rather than `div_ceil`: the compiler then sees that the class is in range.
    (total + ALIGN - 1) >> ALIGN.trailing_zeros()
}

const _: () = assert!(QUARANTINE_BLOCKS.is_power_of_two() && SITE_CACHE_SLOTS.is_power_of_two());
// `mi_malloc_small` serves up to `MI_SMALL_SIZE_MAX`, 128 words.
const _: () = assert!(CACHED_MAX <= 128 * std::mem::size_of::<usize>());

thread_local! {
    /// This thread's state (from `Box::into_raw`), or null before its first use (and after the
    /// thread's destructors freed it). No destructor of its own: reading it is one load.
    static STATE: Cell<*mut ThreadState> = const { Cell::new(ptr::null_mut()) };
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
fn state() -> *mut ThreadState {
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
    let published_peak: &'static AtomicI64 = Box::leak(Box::default());
    peaks()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(published_peak);
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
        quarantine: Box::new([(ptr::null_mut(), 0); QUARANTINE_BLOCKS]),
        quarantine_next: 0,
        cache: [ptr::null_mut(); CACHE_CLASSES],
        cached_bytes: 0,
    }));
    STATE.set(state);
    // Registers the destructor. It fails only while the thread's destructors run: the state
    // made then is never freed (its counts stay right).
    let _ = STATE_OWNER.try_with(|_| ());
    state
}

impl Drop for ThreadState {
    fn drop(&mut self) {
        for &(h, _) in self.quarantine.iter() {
            if !h.is_null() {
                // SAFETY: a heap block from mimalloc, freed by the C code already.
                unsafe { mi::mi_free(h.cast()) };
            }
        }
        for &first in &self.cache {
            let mut h = first;
            while !h.is_null() {
                // SAFETY: a cached heap block from mimalloc, freed by the C code already; its
                // header links to the next.
                unsafe {
                    let next = (*h).arena.cast::<Header>();
                    mi::mi_free(h.cast());
                    h = next;
                }
            }
        }
        for arena in std::mem::take(&mut self.arenas) {
            // SAFETY: made by `Box::into_raw` in `lunet_mem_arena_begin`, used by nothing else
            // now. The chunks of an arena left open are freed with it.
            let mut arena = unsafe { Box::from_raw(arena) };
            arena.release(&mut self.spare_chunks);
        }
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
    fn counts_of(&mut self, site: &'static Site) -> *const SiteCounts {
        match self.site_counts.get(site.id) {
            Some(&counts) if !counts.is_null() => counts,
            _ => self.new_counts(site),
        }
    }

    #[cold]
    #[inline(never)]
    fn new_counts(&mut self, site: &'static Site) -> *const SiteCounts {
        let counts: &'static SiteCounts = Box::leak(Box::new(SiteCounts {
            counts: Counts::default(),
            owner: self.serial,
            site,
        }));
        site.locals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(counts);
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
    /// `slot` is NULL or a valid slot; `file` as in [`lunet_mem_malloc_at`].
    #[inline(always)]
    unsafe fn counts_in_slot(
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
    fn counts_at(&mut self, file: *const c_char, line: c_int) -> *const SiteCounts {
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
    fn count_made(&mut self, counts: *const SiteCounts, size: usize) {
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
    fn count_freed(&mut self, counts: *const SiteCounts, size: usize) {
        // SAFETY: this thread's counts, never freed.
        unsafe { (*counts).counts.freed(size) };
        self.live_bytes -= size as i64;
    }

    /// Keeps the freed heap block `h` of `size` bytes back, and lets the oldest kept one go.
    #[inline(always)]
    fn quarantine(&mut self, h: *mut Header, size: usize) {
        let class = if size <= CACHED_MAX - HEADER {
            size_class(HEADER + size)
        } else {
            0
        };
        let next = self.quarantine_next & (QUARANTINE_BLOCKS - 1);
        let (oldest, oldest_class) = std::mem::replace(&mut self.quarantine[next], (h, class));
        self.quarantine_next = (next + 1) & (QUARANTINE_BLOCKS - 1);
        if !oldest.is_null() {
            // SAFETY: a heap block of that class, freed by the C code `QUARANTINE_BLOCKS` frees
            // ago on this thread.
            unsafe { self.recycle(oldest, oldest_class) };
        }
    }

    /// Puts the freed heap block `h` of size class `class` (0: too big), out of the
    /// quarantine, in the cache, or gives it to mimalloc if it is too big or the cache is full.
    /// Its header is left as it is (marked freed, naming its site) but for the link to the
    /// next cached block.
    ///
    /// # Safety
    /// `h` is a heap block made by [`alloc`] (on any thread), freed, and held by nothing else.
    #[inline(always)]
    unsafe fn recycle(&mut self, h: *mut Header, class: usize) {
        if class != 0 && class < CACHE_CLASSES && self.cached_bytes + class * ALIGN <= CACHE_BYTES {
            // SAFETY: as above; the block is the cache's now.
            unsafe { (*h).arena = self.cache[class].cast() };
            self.cache[class] = h;
            self.cached_bytes += class * ALIGN;
        } else {
            // SAFETY: a block from mimalloc, held by nothing else.
            unsafe { mi::mi_free(h.cast()) };
        }
    }

    /// A block for `size` bytes with no call and no growth: from the cache, or from the
    /// innermost arena's current chunk; null when that is not enough (then [`alloc`]).
    #[inline(always)]
    fn block_fast(&mut self, size: usize) -> *mut Header {
        let arena = self.top;
        if !arena.is_null() {
            // SAFETY: this thread's innermost open arena; no other reference to it while this
            // runs.
            return unsafe { (*arena).alloc_fast(size) };
        }
        if size > CACHED_MAX - HEADER {
            return ptr::null_mut();
        }
        self.cached_block(size_class(HEADER + size))
    }

    /// A block of size class `class` from the cache, or null if it has none.
    #[inline(always)]
    fn cached_block(&mut self, class: usize) -> *mut Header {
        let h = self.cache[class];
        if !h.is_null() {
            // SAFETY: a cached block (only this thread's cache holds it); its header links to
            // the next.
            self.cache[class] = unsafe { (*h).arena }.cast();
            self.cached_bytes -= class * ALIGN;
        }
        h
    }

    /// A heap block of `total` bytes (header included, `total <= MAX_SIZE + HEADER`), from the
    /// cache or mimalloc; null if out of memory.
    #[inline(always)]
    fn heap_block(&mut self, total: usize) -> *mut Header {
        if total > CACHED_MAX {
            // SAFETY: plain allocation; mimalloc aligns blocks of 16 bytes and more to 16.
            return unsafe { mi::mi_malloc(total) }.cast();
        }
        let class = size_class(total);
        let h = self.cached_block(class);
        if !h.is_null() {
            return h;
        }
        // SAFETY: as above. The block gets its class's whole size, so that it can serve any
        // size of the class when it is reused.
        unsafe { mi::mi_malloc_small(class * ALIGN) }.cast()
    }
}

/// Process totals: `(allocs, frees, bytes_allocated, bytes_freed, peak of any thread)`.
fn totals() -> (u64, u64, u64, u64, i64) {
    let (mut a, mut f, mut ba, mut bf) = (0u64, 0u64, 0u64, 0u64);
    for site in sites().lock().unwrap_or_else(|e| e.into_inner()).values() {
        for l in site.locals.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            a += l.counts.allocs.load(Relaxed);
            f += l.counts.frees.load(Relaxed);
            ba += l.counts.bytes_allocated.load(Relaxed);
            bf += l.counts.bytes_freed.load(Relaxed);
        }
    }
    let peaks = peaks().lock().unwrap_or_else(|e| e.into_inner());
    let peak = peaks.iter().map(|p| p.load(Relaxed)).max().unwrap_or(0);
    (a, f, ba, bf, peak)
}

/// Prints `msg` prefixed with the library's name and aborts: bad use is never silent.
fn fatal(msg: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "lunet_mem: {msg}");
    std::process::abort()
}

fn at(file: *const c_char, line: c_int) -> String {
    if file.is_null() {
        return "?".into();
    }
    // SAFETY: `__FILE__` literals.
    let file = unsafe { CStr::from_ptr(file) }.to_string_lossy();
    format!("{file}:{line}")
}

// ---------------------------------------------------------------------------------------------
// Worker arenas

/// A worker thread's arena: blocks are bump-allocated, back to back (header, then the size
/// rounded up to `ALIGN`), in chunks from mimalloc, and released all at once when it ends.
/// Used only by the thread that opened it.
pub struct Arena {
    /// The next block's place in the current chunk, and the chunk's end (null before the
    /// arena's first block).
    cur: *mut u8,
    end: *mut u8,
    /// The current chunk (null before the first block); older chunks follow `prev`.
    chunk: *mut Chunk,
    /// The least capacity of the arena's first chunk.
    size_hint: usize,
    /// Blocks made in the arena and not freed yet.
    live_blocks: i64,
    begin_file: *const c_char,
    begin_line: c_int,
}

/// The start of an arena chunk (a block from `mi_malloc_aligned`); its blocks follow.
#[repr(C)]
pub struct Chunk {
    prev: *mut Chunk,
    /// Bytes after this header.
    capacity: usize,
    /// The end of the blocks made in it, once the arena moved on to a newer chunk.
    used_end: *mut u8,
    _pad: usize,
}

const CHUNK_HEADER: usize = std::mem::size_of::<Chunk>();

impl Chunk {
    /// Where the chunk's blocks start.
    fn data(chunk: *mut Chunk) -> *mut u8 {
        chunk.cast::<u8>().wrapping_add(CHUNK_HEADER)
    }

    /// Bytes for blocks in `chunk` (one of this thread's chunks).
    fn capacity(chunk: *mut Chunk) -> usize {
        // SAFETY: this thread's chunks are used only by this thread, and live until released.
        unsafe { (*chunk).capacity }
    }
}

impl Arena {
    /// Room for a block of `need` bytes (header included) in a chunk of at least `need` bytes;
    /// false if out of memory.
    #[cold]
    #[inline(never)]
    fn grow(&mut self, spare: &mut Vec<*mut Chunk>, need: usize) -> bool {
        let want = if self.chunk.is_null() {
            round_up(self.size_hint.min(MAX_SIZE)).max(need)
        } else {
            Chunk::capacity(self.chunk)
                .saturating_mul(2)
                .min(MAX_SIZE)
                .max(need)
        };
        let chunk = match spare.iter().position(|&c| Chunk::capacity(c) >= want) {
            Some(i) => spare.swap_remove(i),
            None => {
                // SAFETY: plain allocation (`want <= MAX_SIZE`, so the sum does not overflow).
                let mem = unsafe { mi::mi_malloc_aligned(CHUNK_HEADER + want, ALIGN) };
                if mem.is_null() {
                    return false;
                }
                let chunk = mem.cast::<Chunk>();
                // SAFETY: a fresh block of at least CHUNK_HEADER bytes.
                unsafe { (*chunk).capacity = want };
                chunk
            }
        };
        if !self.chunk.is_null() {
            // SAFETY: the current chunk is the arena's own.
            unsafe { (*self.chunk).used_end = self.cur };
        }
        // SAFETY: `chunk` is now the arena's own.
        unsafe {
            (*chunk).prev = self.chunk;
            (*chunk).used_end = ptr::null_mut();
            self.cur = Chunk::data(chunk);
            self.end = self.cur.add((*chunk).capacity);
        }
        self.chunk = chunk;
        true
    }

    /// The header of a new block of `size` bytes in the current chunk, or null if it has no
    /// room (or there is none).
    #[inline(always)]
    fn alloc_fast(&mut self, size: usize) -> *mut Header {
        let room = (self.end as usize) - (self.cur as usize);
        // `size < room` first: then the sum cannot overflow.
        if size >= room || HEADER + round_up(size) > room {
            return ptr::null_mut();
        }
        let h = self.cur;
        // SAFETY: the block is inside the current chunk (checked above).
        self.cur = unsafe { h.add(HEADER + round_up(size)) };
        self.live_blocks += 1;
        h.cast()
    }

    /// The header of a new block of `size` bytes (`size <= MAX_SIZE`), or null if out of
    /// memory.
    #[inline(always)]
    fn alloc(&mut self, spare: &mut Vec<*mut Chunk>, size: usize) -> *mut Header {
        let h = self.alloc_fast(size);
        if !h.is_null() || !self.grow(spare, HEADER + round_up(size)) {
            return h;
        }
        self.alloc_fast(size)
    }

    /// Calls `f` on each block's header, in allocation order.
    fn for_each_block(&self, mut f: impl FnMut(*mut Header)) {
        let mut chunks = Vec::new();
        let mut chunk = self.chunk;
        while !chunk.is_null() {
            chunks.push(chunk);
            // SAFETY: the arena's own chunks.
            chunk = unsafe { (*chunk).prev };
        }
        for &chunk in chunks.iter().rev() {
            let end = if chunk == self.chunk {
                self.cur
            } else {
                // SAFETY: as above.
                unsafe { (*chunk).used_end }
            };
            let mut at = Chunk::data(chunk);
            while at < end {
                let h = at.cast::<Header>();
                // SAFETY: blocks are back to back up to `end`, each a header and its size
                // rounded up (read before `f`, which may poison the header).
                let next = unsafe { at.add(HEADER + round_up((*h).size)) };
                f(h);
                at = next;
            }
        }
    }

    /// Gives the arena's chunks to `spare` (the largest `SPARE_CHUNKS`; the rest to mimalloc)
    /// and empties it.
    fn release(&mut self, spare: &mut Vec<*mut Chunk>) {
        let mut chunk = self.chunk;
        while !chunk.is_null() {
            // SAFETY: the arena's own chunks, from `mi_malloc_aligned`.
            let prev = unsafe { (*chunk).prev };
            let unkept = if spare.len() < SPARE_CHUNKS {
                spare.push(chunk);
                ptr::null_mut()
            } else {
                let smallest = (0..spare.len())
                    .min_by_key(|&i| Chunk::capacity(spare[i]))
                    .expect("SPARE_CHUNKS > 0");
                if Chunk::capacity(spare[smallest]) < Chunk::capacity(chunk) {
                    std::mem::replace(&mut spare[smallest], chunk)
                } else {
                    chunk
                }
            };
            if !unkept.is_null() {
                // SAFETY: a chunk from `mi_malloc_aligned`, used by no arena any more.
                unsafe { mi::mi_free(unkept.cast()) };
            }
            chunk = prev;
        }
        self.chunk = ptr::null_mut();
        self.cur = ptr::null_mut();
        self.end = ptr::null_mut();
    }
}

/// Opens a worker arena on this thread; `lunet_malloc` on this thread is served from it until
/// the matching [`lunet_mem_arena_end_at`]. Arenas nest.
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`).
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_arena_begin(size_hint: usize, file: *const c_char, line: c_int) {
    // SAFETY: this thread's state, and no other reference to it (see `state`).
    let l = unsafe { &mut *state() };
    if l.depth == l.arenas.len() {
        l.arenas.push(Box::into_raw(Box::new(Arena {
            cur: ptr::null_mut(),
            end: ptr::null_mut(),
            chunk: ptr::null_mut(),
            size_hint: 0,
            live_blocks: 0,
            begin_file: ptr::null(),
            begin_line: 0,
        })));
    }
    let arena = l.arenas[l.depth];
    // SAFETY: one of this thread's arenas, not open (so empty: `release` ran or it is new).
    unsafe {
        (*arena).size_hint = size_hint;
        (*arena).live_blocks = 0;
        (*arena).begin_file = file;
        (*arena).begin_line = line;
    }
    l.depth += 1;
    l.top = arena;
}

/// Ends this thread's innermost worker arena. Returns the number of its blocks still live
/// (escaped: allocated in the arena, not freed before its end); reports them, and aborts unless
/// `allow_escape` is set. The arena's memory is then released at once (poisoned first if
/// poisoning is on, so that a pointer that escaped reads garbage rather than stale data).
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`).
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_arena_end_at(
    allow_escape: c_int,
    file: *const c_char,
    line: c_int,
) -> i64 {
    // SAFETY: this thread's state, and no other reference to it (see `state`).
    let l = unsafe { &mut *state() };
    if l.depth == 0 {
        fatal(&format!(
            "worker arena end without begin at {}",
            at(file, line)
        ));
    }
    // SAFETY: an open arena of this thread; no other reference to it while this runs.
    let arena = unsafe { &mut *l.arenas[l.depth - 1] };
    let escaped = arena.live_blocks;
    if escaped != 0 {
        let (mut bytes, mut blocks) = (0, String::new());
        arena.for_each_block(|h| {
            // SAFETY: a header in the arena's memory; its counts and site live forever.
            let (head, site) = unsafe { (*h, (*(*h).counts).site) };
            if head.magic == magic(LIVE, h) {
                bytes += head.size;
                blocks.push_str(&format!(
                    "\n  {} bytes allocated at {}:{}",
                    head.size,
                    site.file(),
                    site.line
                ));
            }
        });
        let msg = format!(
            "worker arena begun at {} and ended at {}: {escaped} block(s), {bytes} byte(s) \
             escaped{blocks}",
            at(arena.begin_file, arena.begin_line),
            at(file, line),
        );
        if allow_escape == 0 {
            fatal(&msg);
        }
        let _ = writeln!(std::io::stderr(), "lunet_mem: {msg}");
    }
    let poison = POISONING.load(Relaxed);
    if escaped != 0 || poison {
        arena.for_each_block(|h| {
            // SAFETY: a header in the arena's memory, and the block after it.
            unsafe {
                let size = (*h).size;
                if (*h).magic == magic(LIVE, h) {
                    // Escaped: a later free of it says so (until the memory is reused).
                    (*h).magic = magic(ENDED, h);
                    if poison {
                        ptr::write_bytes(h.add(1).cast::<u8>(), POISON, size);
                    }
                } else if poison {
                    ptr::write_bytes(h.cast::<u8>(), POISON, HEADER + size);
                }
            }
        });
    }
    arena.release(&mut l.spare_chunks);
    l.depth -= 1;
    l.top = if l.depth == 0 {
        ptr::null_mut()
    } else {
        l.arenas[l.depth - 1]
    };
    escaped
}

static POISONING: AtomicBool = AtomicBool::new(cfg!(debug_assertions));

/// Turns poisoning of released arena memory on or off (on by default in debug builds).
#[no_mangle]
pub extern "C" fn lunet_mem_set_poisoning(on: c_int) {
    POISONING.store(on != 0, Relaxed);
}

// ---------------------------------------------------------------------------------------------
// Tracked allocation

/// A block of `size` bytes counted in `counts` (one of this thread's): from the innermost open
/// arena, else from the heap; null if out of memory.
#[inline(always)]
fn alloc(l: &mut ThreadState, size: usize, counts: *const SiteCounts) -> *mut c_void {
    if size > MAX_SIZE {
        return ptr::null_mut();
    }
    let arena = l.top;
    let h: *mut Header = if arena.is_null() {
        l.heap_block(HEADER + size)
    } else {
        // SAFETY: this thread's innermost open arena; no other reference to it while this runs.
        unsafe { (*arena).alloc(&mut l.spare_chunks, size) }
    };
    if h.is_null() {
        return ptr::null_mut();
    }
    finish(l, h, size, counts)
}

/// Counts the new block `h` of `size` bytes in `counts` (one of this thread's), writes its
/// header and returns it.
#[inline(always)]
fn finish(
    l: &mut ThreadState,
    h: *mut Header,
    size: usize,
    counts: *const SiteCounts,
) -> *mut c_void {
    l.count_made(counts, size);
    // SAFETY: `h` points to at least HEADER + size writable bytes, aligned to 16, from the
    // innermost arena if there is one, else from the heap.
    unsafe {
        h.write(Header {
            magic: magic(LIVE, h),
            size,
            counts,
            arena: l.top,
        });
        h.add(1).cast()
    }
}

/// The header of `p`, a live block: aborts with a clear message for a double free, a block that
/// escaped an ended arena, or a pointer this library did not make.
///
/// # Safety
/// `p` is not null, and points into memory the caller may read (any pointer the C code holds to
/// a block of its own, whoever made it).
#[inline(always)]
unsafe fn live_header(p: *mut c_void, what: &str, file: *const c_char, line: c_int) -> *mut Header {
    let h = p.cast::<u8>().wrapping_sub(HEADER).cast::<Header>();
    // Reading a word in the page of `p` (the C code's pointer to its block) cannot fault:
    // that is all the fast path reads of a pointer that may not be ours.
    // SAFETY: as just said; a stranger's bytes there are only compared.
    if (p as usize) & (PAGE - 1) >= HEADER && unsafe { (*h).magic } == magic(LIVE, h) {
        return h;
    }
    // SAFETY: forwarded contract.
    unsafe { checked_header(p, what, file, line) }
}

/// [`live_header`] when the fast check failed: asks mimalloc before reading a header that may be
/// in another page, then says what the pointer is.
///
/// # Safety
/// As for [`live_header`].
#[cold]
#[inline(never)]
unsafe fn checked_header(
    p: *mut c_void,
    what: &str,
    file: *const c_char,
    line: c_int,
) -> *mut Header {
    let h = p.cast::<u8>().wrapping_sub(HEADER).cast::<Header>();
    // Our blocks (heap blocks and arena chunks) are all inside mimalloc's memory.
    let readable = (p as usize) & (PAGE - 1) >= HEADER
        // SAFETY: checking an address, reading nothing.
        || unsafe { mi::mi_is_in_heap_region(h.cast()) };
    // SAFETY: on the page of `p`, or inside mimalloc's memory (checked).
    let m = if readable { unsafe { (*h).magic } } else { 0 };
    if m == magic(LIVE, h) {
        h
    } else if m == magic(FREED, h) {
        // SAFETY: a freed header keeps its counts, and those their site.
        let site = unsafe { (*(*h).counts).site };
        fatal(&format!(
            "{what} of {p:p} at {}: already freed (allocated at {}:{})",
            at(file, line),
            site.file(),
            site.line
        ))
    } else if m == magic(ENDED, h) {
        fatal(&format!(
            "{what} of {p:p} at {}: the block escaped a worker arena that has ended",
            at(file, line)
        ))
    } else {
        fatal(&format!(
            "{what} of {p:p} at {}: not a block from lunet_malloc (or from a released arena)",
            at(file, line)
        ))
    }
}

/// Frees the live block `h`.
///
/// # Safety
/// `h` is from [`live_header`], and nothing freed it since.
#[inline(always)]
unsafe fn free_block(l: &mut ThreadState, h: *mut Header, file: *const c_char, line: c_int) {
    // SAFETY: a live header (checked).
    let Header {
        size,
        counts,
        arena,
        ..
    } = unsafe { *h };
    // SAFETY: counts live forever.
    if unsafe { (*counts).owner } != l.serial {
        // SAFETY: forwarded contract.
        return unsafe { free_foreign_block(l, h, file, line) };
    }
    // SAFETY: a live header (checked).
    unsafe { (*h).magic = magic(FREED, h) };
    l.count_freed(counts, size);
    if arena.is_null() {
        l.quarantine(h, size);
    } else {
        // SAFETY: the block was made by this thread (its counts are this thread's), so its arena
        // is this thread's; an arena outlives its live blocks' headers (ending it marks them).
        unsafe { (*arena).live_blocks -= 1 };
    }
}

/// [`free_block`] of a block another thread made: counted in this thread's counts of its site.
///
/// # Safety
/// As for [`free_block`].
#[cold]
#[inline(never)]
unsafe fn free_foreign_block(
    l: &mut ThreadState,
    h: *mut Header,
    file: *const c_char,
    line: c_int,
) {
    // SAFETY: a live header (checked).
    let Header {
        size,
        counts,
        arena,
        ..
    } = unsafe { *h };
    if !arena.is_null() {
        fatal(&format!(
            "free of {:p} at {}: a worker arena's block, freed on another thread",
            h.wrapping_add(1),
            at(file, line)
        ));
    }
    // SAFETY: a live header (checked).
    unsafe { (*h).magic = magic(FREED, h) };
    // SAFETY: counts live forever, and their site.
    let mine = l.counts_of(unsafe { (*counts).site });
    l.count_freed(mine, size);
    l.quarantine(h, size);
}

/// `lunet_malloc(size)` in tracing builds without a call-site slot: a block of `size` bytes
/// (16-byte aligned), from this thread's worker arena if one is open, else from the heap; NULL
/// if out of memory.
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`).
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_malloc_at(
    size: usize,
    file: *const c_char,
    line: c_int,
) -> *mut c_void {
    // SAFETY: this thread's state, and no other reference to it (see `state`).
    let l = unsafe { &mut *state() };
    let counts = l.counts_at(file, line);
    alloc(l, size, counts)
}

/// `lunet_malloc(size)` in tracing builds: [`lunet_mem_malloc_at`], with the call site's slot.
///
/// # Safety
/// `slot` is NULL or a slot used only for this `file:line` (a `static` at the call site);
/// `file` as in [`lunet_mem_malloc_at`].
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_malloc_site(
    size: usize,
    slot: *const SiteSlot,
    file: *const c_char,
    line: c_int,
) -> *mut c_void {
    // The fast path: no call, nothing to save. Whatever it does not cover (the thread's or the
    // site's first use here, a cache miss, a new arena chunk) goes to `malloc_site_slow`.
    let state = STATE.get();
    if !state.is_null() && !slot.is_null() {
        // SAFETY: this thread's state, and no other reference to it (see `state`).
        let l = unsafe { &mut *state };
        // SAFETY: a valid slot (the contract).
        let id = unsafe { (*slot).id.load(Relaxed) };
        if let Some(&counts) = l.site_counts.get(id) {
            if !counts.is_null() {
                let h = l.block_fast(size);
                if !h.is_null() {
                    return finish(l, h, size, counts);
                }
            }
        }
    }
    // SAFETY: forwarded contract.
    unsafe { malloc_site_slow(size, slot, file, line) }
}

/// [`lunet_mem_malloc_site`] past its fast path. `extern "C"`, so that the compiler knows it
/// does not unwind and can tail-call it (with nothing saved on the fast path).
///
/// # Safety
/// As for [`lunet_mem_malloc_site`].
#[cold]
#[inline(never)]
unsafe extern "C" fn malloc_site_slow(
    size: usize,
    slot: *const SiteSlot,
    file: *const c_char,
    line: c_int,
) -> *mut c_void {
    // SAFETY: this thread's state, and no other reference to it (see `state`).
    let l = unsafe { &mut *state() };
    // SAFETY: forwarded contract.
    let counts = unsafe { l.counts_in_slot(slot, file, line) };
    alloc(l, size, counts)
}

/// `lunet_free(p)` in tracing builds. NULL is ignored.
///
/// # Safety
/// `p` is NULL or a pointer the C code holds (a bad one is reported, see [`live_header`]);
/// `file` as in [`lunet_mem_malloc_at`].
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_free_at(p: *mut c_void, file: *const c_char, line: c_int) {
    // The fast path (as `live_header` then `free_block`, with no call but mimalloc's): a live
    // block this thread made. Anything else (NULL too: its page offset is 0) goes to
    // `free_slow`, which says what is wrong if something is.
    let h = p.cast::<u8>().wrapping_sub(HEADER).cast::<Header>();
    let state = STATE.get();
    let live = (p as usize) & (PAGE - 1) >= HEADER
        && !state.is_null()
        // SAFETY: the header is read only when it is in the page of `p` (see `live_header`).
        && unsafe { (*h).magic } == magic(LIVE, h);
    if live {
        // SAFETY: this thread's state, and no other reference to it (see `state`).
        let l = unsafe { &mut *state };
        // SAFETY: a live header (checked).
        let Header {
            size,
            counts,
            arena,
            ..
        } = unsafe { *h };
        // SAFETY: counts live forever.
        if unsafe { (*counts).owner } == l.serial {
            // SAFETY: a live header (checked).
            unsafe { (*h).magic = magic(FREED, h) };
            l.count_freed(counts, size);
            if arena.is_null() {
                l.quarantine(h, size);
            } else {
                // SAFETY: as in `free_block`.
                unsafe { (*arena).live_blocks -= 1 };
            }
            return;
        }
    }
    // SAFETY: forwarded contract.
    unsafe { free_slow(p, file, line) }
}

/// [`lunet_mem_free_at`] past its fast path (`extern "C"`: see [`malloc_site_slow`]).
///
/// # Safety
/// As for [`lunet_mem_free_at`].
#[cold]
#[inline(never)]
unsafe extern "C" fn free_slow(p: *mut c_void, file: *const c_char, line: c_int) {
    if p.is_null() {
        return;
    }
    // SAFETY: a non-null pointer the C code holds (the contract).
    let h = unsafe { live_header(p, "free", file, line) };
    // SAFETY: this thread's state, and no other reference to it (see `state`).
    let l = unsafe { &mut *state() };
    // SAFETY: checked just now.
    unsafe { free_block(l, h, file, line) };
}

/// `realloc`, with the new block counted in `counts(l)` (one of this thread's; looked up only
/// when a block is made, so that a site that only frees gets no entry).
///
/// # Safety
/// `p` as in [`lunet_mem_free_at`].
unsafe fn realloc(
    l: &mut ThreadState,
    p: *mut c_void,
    size: usize,
    counts: impl FnOnce(&mut ThreadState) -> *const SiteCounts,
    file: *const c_char,
    line: c_int,
) -> *mut c_void {
    if p.is_null() {
        let counts = counts(l);
        return alloc(l, size, counts);
    }
    // SAFETY: a non-null pointer the C code holds (the contract).
    let h = unsafe { live_header(p, "realloc", file, line) };
    if size == 0 {
        // SAFETY: checked just now.
        unsafe { free_block(l, h, file, line) };
        return ptr::null_mut();
    }
    // SAFETY: a live header (checked).
    let old = unsafe { (*h).size };
    let counts = counts(l);
    let new = alloc(l, size, counts);
    if !new.is_null() {
        // SAFETY: both blocks are at least `min(old, size)` bytes; `p` is live (checked).
        unsafe { ptr::copy_nonoverlapping(p.cast::<u8>(), new.cast::<u8>(), old.min(size)) };
        // SAFETY: checked above; making `new` did not free it.
        unsafe { free_block(l, h, file, line) };
    }
    new
}

/// `lunet_realloc(p, size)` in tracing builds without a call-site slot (`p` NULL: malloc;
/// `size` 0: free, returns NULL).
///
/// # Safety
/// `p` as in [`lunet_mem_free_at`]; `file` as in [`lunet_mem_malloc_at`].
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_realloc_at(
    p: *mut c_void,
    size: usize,
    file: *const c_char,
    line: c_int,
) -> *mut c_void {
    // SAFETY: this thread's state, and no other reference to it (see `state`).
    let l = unsafe { &mut *state() };
    let counts = |l: &mut ThreadState| l.counts_at(file, line);
    // SAFETY: forwarded contract.
    unsafe { realloc(l, p, size, counts, file, line) }
}

/// `lunet_realloc(p, size)` in tracing builds: [`lunet_mem_realloc_at`], with the call site's
/// slot.
///
/// # Safety
/// `slot` as in [`lunet_mem_malloc_site`]; `p` as in [`lunet_mem_free_at`]; `file` as in
/// [`lunet_mem_malloc_at`].
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_realloc_site(
    p: *mut c_void,
    size: usize,
    slot: *const SiteSlot,
    file: *const c_char,
    line: c_int,
) -> *mut c_void {
    // SAFETY: this thread's state, and no other reference to it (see `state`).
    let l = unsafe { &mut *state() };
    // SAFETY: forwarded contract.
    let counts = |l: &mut ThreadState| unsafe { l.counts_in_slot(slot, file, line) };
    // SAFETY: forwarded contract.
    unsafe { realloc(l, p, size, counts, file, line) }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints and reports

/// `lunet_mem_checkpoint_t`: the process counters at a point, and which checkpoint it was.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Checkpoint {
    pub allocs: u64,
    pub frees: u64,
    pub bytes_allocated: u64,
    pub bytes_freed: u64,
    pub id: u64,
}

/// Live blocks per site at recent checkpoints, to name the sites that leak.
type SiteSnapshot = Vec<(&'static Site, i64, i64)>;

fn snapshots() -> &'static Mutex<VecDeque<(u64, SiteSnapshot)>> {
    static SNAPSHOTS: OnceLock<Mutex<VecDeque<(u64, SiteSnapshot)>>> = OnceLock::new();
    SNAPSHOTS.get_or_init(Default::default)
}

/// How many checkpoints keep their per-site snapshot.
const SNAPSHOTS_KEPT: usize = 64;

/// `lunet_mem_checkpoint()`: marks a point; compare with [`lunet_mem_check_neutral`].
#[no_mangle]
pub extern "C" fn lunet_mem_checkpoint_take() -> Checkpoint {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, Relaxed);
    let snapshot: SiteSnapshot = sites()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .map(|s| {
            let (_, _, blocks, bytes) = s.totals();
            (*s, blocks, bytes)
        })
        .collect();
    {
        let mut kept = snapshots().lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() == SNAPSHOTS_KEPT {
            kept.pop_front();
        }
        kept.push_back((id, snapshot));
    }
    let (allocs, frees, bytes_allocated, bytes_freed, _) = totals();
    Checkpoint {
        allocs,
        frees,
        bytes_allocated,
        bytes_freed,
        id,
    }
}

/// The leak report for `cp`, or None if neutral (as many frees as allocations since, and the
/// same live bytes).
fn leak_report(cp: &Checkpoint, ctx: &str) -> Option<String> {
    let (allocs, frees, bytes_allocated, bytes_freed, _) = totals();
    let (da, df) = (allocs - cp.allocs, frees - cp.frees);
    let (dba, dbf) = (
        bytes_allocated - cp.bytes_allocated,
        bytes_freed - cp.bytes_freed,
    );
    if da == df && dba == dbf {
        return None;
    }
    let mut msg = format!(
        "MEMORY LEAK at {ctx}: allocs={da} frees={df} bytes_allocated={dba} bytes_freed={dbf} \
         (live {:+} bytes in {:+} blocks)",
        dba as i64 - dbf as i64,
        da as i64 - df as i64
    );
    let kept = snapshots().lock().unwrap_or_else(|e| e.into_inner());
    match kept.iter().find(|(id, _)| *id == cp.id) {
        Some((_, snapshot)) => {
            let before: HashMap<usize, (i64, i64)> = snapshot
                .iter()
                .map(|(s, b, n)| (*s as *const Site as usize, (*b, *n)))
                .collect();
            for site in sites().lock().unwrap_or_else(|e| e.into_inner()).values() {
                let (b0, n0) = before
                    .get(&(*site as *const Site as usize))
                    .copied()
                    .unwrap_or((0, 0));
                let (_, _, b1, n1) = site.totals();
                if b1 > b0 {
                    msg.push_str(&format!(
                        "\n  {}:{}: +{} block(s), {:+} bytes live",
                        site.file(),
                        site.line,
                        b1 - b0,
                        n1 - n0
                    ));
                }
            }
        }
        None => msg.push_str("\n  (per-site figures of this checkpoint are no longer kept)"),
    }
    Some(msg)
}

/// Whether nothing leaked since `cp`; if not and `report` is set, prints the report to stderr.
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`);
/// pointer arguments are NULL or what the header says they are.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_check_neutral(
    cp: *const Checkpoint,
    ctx: *const c_char,
    report: c_int,
) -> c_int {
    // SAFETY: the caller passes a checkpoint it took (or NULL).
    let Some(cp) = (unsafe { cp.as_ref() }) else {
        return 0;
    };
    let ctx = if ctx.is_null() {
        "?".into()
    } else {
        // SAFETY: a C string from the caller.
        unsafe { CStr::from_ptr(ctx) }.to_string_lossy()
    };
    match leak_report(cp, &ctx) {
        None => 1,
        Some(msg) => {
            if report != 0 {
                let _ = writeln!(std::io::stderr(), "lunet_mem: {msg}");
            }
            0
        }
    }
}

/// `lunet_mem_assert_neutral(&cp, ctx)`: prints the report and aborts if something leaked.
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`);
/// pointer arguments are NULL or what the header says they are.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_assert_neutral_at(
    cp: *const Checkpoint,
    ctx: *const c_char,
    file: *const c_char,
    line: c_int,
) {
    // SAFETY: forwarded contract.
    if unsafe { lunet_mem_check_neutral(cp, ctx, 1) } == 0 {
        fatal(&format!(
            "assertion of memory neutrality failed at {}",
            at(file, line)
        ));
    }
}

/// `lunet_mem_stats_t`: process totals of the tracked C allocations.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct CStats {
    pub allocs: u64,
    pub frees: u64,
    pub bytes_allocated: u64,
    pub bytes_freed: u64,
    pub live_bytes: i64,
    pub peak_bytes: i64,
}

/// Fills `out` with the process totals (peak: the highest of any thread's own live bytes).
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`);
/// pointer arguments are NULL or what the header says they are.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_c_stats(out: *mut CStats) {
    let (allocs, frees, bytes_allocated, bytes_freed, peak_bytes) = totals();
    let live_bytes = bytes_allocated as i64 - bytes_freed as i64;
    // SAFETY: the caller passes a writable struct (or NULL).
    if let Some(out) = unsafe { out.as_mut() } {
        *out = CStats {
            allocs,
            frees,
            bytes_allocated,
            bytes_freed,
            live_bytes,
            peak_bytes,
        };
    }
}

/// `lunet_mem_report(FILE *)`: allocs, frees and live bytes by allocation site.
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`);
/// pointer arguments are NULL or what the header says they are.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_report(out: *mut libc_file) {
    let (allocs, frees, bytes_allocated, bytes_freed, peak) = totals();
    let mut text = format!(
        "lunet_mem: {allocs} allocs, {frees} frees, {bytes_allocated} bytes allocated, \
         {bytes_freed} bytes freed, {} live, peak {peak} (largest of one thread)\n",
        bytes_allocated as i64 - bytes_freed as i64
    );
    let sites: Vec<&Site> = sites()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .copied()
        .collect();
    let mut rows: Vec<(&Site, SiteTotals)> = sites.into_iter().map(|s| (s, s.totals())).collect();
    rows.sort_by_key(|(s, t)| (std::cmp::Reverse(t.3), s.file(), s.line));
    for (s, (allocs, frees, blocks, bytes)) in rows {
        text.push_str(&format!(
            "  {}:{}: {allocs} allocs, {frees} frees, {bytes} live bytes in {blocks} blocks\n",
            s.file(),
            s.line,
        ));
    }
    write_to(out, &text);
}

/// C's `FILE`, only passed through.
#[allow(non_camel_case_types)]
pub type libc_file = c_void;

extern "C" {
    fn fwrite(p: *const c_void, size: usize, n: usize, f: *mut libc_file) -> usize;
    fn fflush(f: *mut libc_file) -> c_int;
}

fn write_to(out: *mut libc_file, text: &str) {
    if out.is_null() {
        let _ = std::io::stderr().write_all(text.as_bytes());
        return;
    }
    // SAFETY: `out` is a FILE* from the caller.
    unsafe {
        fwrite(text.as_ptr().cast(), 1, text.len(), out);
        fflush(out);
    }
}

// ---------------------------------------------------------------------------------------------
// Lua states

/// Installs the tracking allocator on a state the runtime created and preloads the module, so
/// that `require "lunet.mem"` in that state gets the same tracker. Call after `luaL_openlibs`.
/// Returns 0, or -1 if the state has no `package` library.
///
/// # Safety
/// `L` a valid state, not running (called from C, outside any Lua call) or with stack room.
#[no_mangle]
pub unsafe extern "C-unwind" fn lunet_mem_install(L: *mut lua_State) -> c_int {
    // SAFETY: valid state; may raise only on memory errors (unprotected, like any API call).
    unsafe {
        ffi::luaL_checkstack(L, 8, ptr::null());
        crate::state::install(L, crate::state::default_serve());
        ffi::lua_getglobal(L, c"package".as_ptr());
        if ffi::lua_type(L, -1) != ffi::LUA_TTABLE {
            ffi::lua_pop(L, 1);
            return -1;
        }
        ffi::lua_getfield(L, -1, c"preload".as_ptr());
        if ffi::lua_type(L, -1) != ffi::LUA_TTABLE {
            ffi::lua_pop(L, 2);
            return -1;
        }
        ffi::lua_pushcfunction(L, crate::open);
        ffi::lua_setfield(L, -2, c"lunet.mem".as_ptr());
        ffi::lua_pop(L, 2);
    }
    0
}

/// The state's tracked bytes (what `mem.stats().live_bytes` says), or -1 without the tracker.
///
/// # Safety
/// `L` a valid state.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_live_bytes(L: *mut lua_State) -> i64 {
    // SAFETY: valid state.
    match unsafe { crate::state::tracker(L) } {
        Some(t) => t.live_bytes.get() as i64,
        None => -1,
    }
}

const _: () = assert!(
    HEADER % ALIGN == 0,
    "the header must keep the block aligned"
);
