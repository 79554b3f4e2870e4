//! Tracked allocation: `lunet_malloc`, `lunet_realloc` and `lunet_free` (the functions behind
//! the header's macros), with the ownership check that names a bad free.

use std::ffi::{c_char, c_int, c_void};
use std::ptr;
use std::sync::atomic::Ordering::Relaxed;

use libmimalloc_sys as mi;

use crate::block::{magic, Header, ENDED, FREED, HEADER, LIVE, MAX_SIZE, PAGE};
use crate::fatal::{at, fatal};
use crate::site::{SiteCounts, SiteSlot};
use crate::thread_state::{state, ThreadState, STATE};

/// A block of `size` bytes counted in `counts` (one of this thread's): from the innermost open
/// arena, else from the heap; null if out of memory.
#[inline(always)]
fn alloc(l: &mut ThreadState, size: usize, counts: *const SiteCounts) -> *mut c_void {
    if size > MAX_SIZE {
        return ptr::null_mut();
    }
    let arena = l.top;
    let h: *mut Header = if arena.is_null() {
        l.heap.heap_block(HEADER + size)
    } else {
        // SAFETY: this thread's innermost open arena; no other reference to it while this runs.
        unsafe { (*arena).alloc_charged(&mut l.spare_chunks, size) }
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
    } else if let Some(request) = readable
        .then(|| {
            // SAFETY: an address; only mimalloc's memory is read.
            unsafe { crate::request_arena::describe(p) }
        })
        .flatten()
    {
        fatal(&format!("{what} of {p:p} at {}: {request}", at(file, line)))
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
        l.heap.quarantine(h, size);
    } else {
        // SAFETY: the block was made by this thread (its counts are this thread's), so its arena
        // is this thread's; an arena outlives its live blocks' headers (ending it marks them).
        unsafe { (*arena).freed(size) };
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
    l.heap.quarantine(h, size);
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
                l.heap.quarantine(h, size);
            } else {
                // SAFETY: as in `free_block`.
                unsafe { (*arena).freed(size) };
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
