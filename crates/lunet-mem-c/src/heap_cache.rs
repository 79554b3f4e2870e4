//! A thread's heap blocks between `lunet_free` and their reuse: the quarantine (a ring of the
//! last 256 frees, still marked freed, so that a double free is caught), then, for small ones, a
//! cache by size class (still marked freed) where `lunet_malloc` takes them back, so that most
//! calls reach neither mimalloc nor anything shared. Used only by its thread.

use std::ptr;

use libmimalloc_sys as mi;

use crate::block::{magic, Header, ALIGN, FREED, HEADER};

/// How many freed blocks a thread keeps back (a power of two).
const QUARANTINE_BLOCKS: usize = 256;
/// Heap blocks of up to this many bytes (header included) are served from mimalloc's small
/// size classes, and recycled in the thread's cache.
const CACHED_MAX: usize = 1024;
const CACHE_CLASSES: usize = CACHED_MAX / ALIGN + 1;
/// The most bytes of freed blocks a thread's cache holds (beyond the quarantine's).
const CACHE_BYTES: usize = 64 * 1024;

const _: () = assert!(QUARANTINE_BLOCKS.is_power_of_two());
// `mi_malloc_small` serves up to `MI_SMALL_SIZE_MAX`, 128 words.
const _: () = assert!(CACHED_MAX <= 128 * std::mem::size_of::<usize>());

/// The size class of a heap block of `total` bytes, header included (`total <= CACHED_MAX`).
#[inline(always)]
fn size_class(total: usize) -> usize {
    // A shift rather than `div_ceil`: the compiler then sees that the class is in range.
    (total + ALIGN - 1) >> ALIGN.trailing_zeros()
}

/// One thread's quarantine and cache of freed heap blocks.
pub(crate) struct HeapCache {
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

impl HeapCache {
    pub(crate) fn new() -> HeapCache {
        HeapCache {
            quarantine: Box::new([(ptr::null_mut(), 0); QUARANTINE_BLOCKS]),
            quarantine_next: 0,
            cache: [ptr::null_mut(); CACHE_CLASSES],
            cached_bytes: 0,
        }
    }

    /// Keeps the freed heap block `h` of `size` bytes back, and lets the oldest kept one go.
    #[inline(always)]
    pub(crate) fn quarantine(&mut self, h: *mut Header, size: usize) {
        // SAFETY: a heap block its thread just marked freed; nothing else holds it.
        debug_assert!(unsafe { (*h).magic == magic(FREED, h) && (*h).size == size });
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
    /// `h` is a heap block made by `lunet_malloc` (on any thread), freed, and held by nothing
    /// else.
    #[inline(always)]
    unsafe fn recycle(&mut self, h: *mut Header, class: usize) {
        // SAFETY: as above: a freed block's header, still marked freed (the quarantine kept it).
        debug_assert!(unsafe { (*h).magic } == magic(FREED, h));
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

    /// A block for `size` bytes from the cache, with no call; null when the size is too big
    /// for it or it has none of its class (then [`HeapCache::heap_block`]).
    #[inline(always)]
    pub(crate) fn cached_block_for(&mut self, size: usize) -> *mut Header {
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
            // SAFETY: a cached block (only this thread's cache holds it), still marked freed.
            debug_assert!(unsafe { (*h).magic } == magic(FREED, h));
            // SAFETY: as above; its header links to the next.
            self.cache[class] = unsafe { (*h).arena }.cast();
            self.cached_bytes -= class * ALIGN;
        }
        h
    }

    /// A heap block of `total` bytes (header included, `total <= MAX_SIZE + HEADER`), from the
    /// cache or mimalloc; null if out of memory.
    #[inline(always)]
    pub(crate) fn heap_block(&mut self, total: usize) -> *mut Header {
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

impl Drop for HeapCache {
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
    }
}
