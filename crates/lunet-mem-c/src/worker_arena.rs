//! Worker arenas: a worker thread's blocks bump-allocated in chunks kept from one arena to the
//! next, and released all at once when the arena ends (`lunet_worker_arena_begin`/`_end`). The
//! end releases the blocks still live (counted freed, marked so that a later `lunet_free` of one
//! says it escaped), or, in its strict form, aborts on them. An arena begun in a scope
//! (`lunet_worker_arena_begin_in`) charges its blocks to the scope's account while they live.

use std::ffi::{c_char, c_int};
use std::io::Write;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use libmimalloc_sys as mi;

use crate::account::{self, Account};
use crate::block::{magic, round_up, Header, ALIGN, ENDED, HEADER, LIVE, MAX_SIZE};
use crate::fatal::{at, fatal};
use crate::thread_state::{state, STATE};

/// How many chunks of ended arenas a thread keeps for its next arenas.
pub(crate) const SPARE_CHUNKS: usize = 4;
/// Byte written over an arena's memory when it is released, if poisoning is on.
const POISON: u8 = 0xde;

/// A worker thread's arena: blocks are bump-allocated, back to back (header, then the size
/// rounded up to `ALIGN`), in chunks from mimalloc, and released all at once when it ends.
/// Used only by the thread that opened it.
pub(crate) struct WorkerArena {
    /// The next block's place in the current chunk, and the chunk's end (null before the
    /// arena's first block).
    cur: *mut u8,
    end: *mut u8,
    /// The current chunk (null before the first block); older chunks follow `prev`.
    chunk: *mut Chunk,
    /// The least capacity of the arena's first chunk.
    size_hint: usize,
    /// Blocks made in the arena and not freed yet.
    pub(crate) live_blocks: i64,
    /// The scope account its blocks are charged to (a reference the arena owns), or null.
    pub(crate) account: *const Account,
    begin_file: *const c_char,
    begin_line: c_int,
}

/// The start of an arena chunk (a block from `mi_malloc_aligned`); its blocks follow.
#[repr(C)]
pub(crate) struct Chunk {
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

impl WorkerArena {
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
    pub(crate) fn alloc_fast(&mut self, size: usize) -> *mut Header {
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
    pub(crate) fn alloc(&mut self, spare: &mut Vec<*mut Chunk>, size: usize) -> *mut Header {
        let h = self.alloc_fast(size);
        if !h.is_null() || !self.grow(spare, HEADER + round_up(size)) {
            return h;
        }
        self.alloc_fast(size)
    }

    /// [`WorkerArena::alloc`], charged to the arena's account if it has one: null if the
    /// account's budget refuses the block.
    #[inline(always)]
    pub(crate) fn alloc_charged(
        &mut self,
        spare: &mut Vec<*mut Chunk>,
        size: usize,
    ) -> *mut Header {
        let h = self.alloc(spare, size);
        // SAFETY: the arena holds a reference to its account.
        if let (false, Some(account)) = (h.is_null(), unsafe { self.account.as_ref() }) {
            if !account.charge(size as u64, 1) {
                // (the block was the last bump: its room is taken back)
                self.cur = h.cast();
                self.live_blocks -= 1;
                return ptr::null_mut();
            }
        }
        h
    }

    /// One of the arena's blocks, of `size` bytes, was freed.
    #[inline(always)]
    pub(crate) fn freed(&mut self, size: usize) {
        self.live_blocks -= 1;
        // SAFETY: the arena holds a reference to its account.
        if let Some(account) = unsafe { self.account.as_ref() } {
            account.release(size as u64, 1);
        }
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
    pub(crate) fn release(&mut self, spare: &mut Vec<*mut Chunk>) {
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

/// Opens a worker arena on this thread, charged to `account` (a reference it takes over, or
/// null).
fn begin(account: *const Account, size_hint: usize, file: *const c_char, line: c_int) {
    // SAFETY: this thread's state, and no other reference to it (see `state`).
    let l = unsafe { &mut *state() };
    if l.depth == l.arenas.len() {
        l.arenas.push(Box::into_raw(Box::new(WorkerArena {
            cur: ptr::null_mut(),
            end: ptr::null_mut(),
            chunk: ptr::null_mut(),
            size_hint: 0,
            live_blocks: 0,
            account: ptr::null(),
            begin_file: ptr::null(),
            begin_line: 0,
        })));
    }
    let arena = l.arenas[l.depth];
    // SAFETY: one of this thread's arenas, not open (so empty: `release` ran or it is new).
    unsafe {
        (*arena).size_hint = size_hint;
        (*arena).live_blocks = 0;
        (*arena).account = account;
        (*arena).begin_file = file;
        (*arena).begin_line = line;
    }
    l.depth += 1;
    l.top = arena;
}

/// Opens a worker arena on this thread; `lunet_malloc` on this thread is served from it until
/// the matching [`lunet_mem_arena_end_at`]. Arenas nest; a nested arena charges the scope its
/// enclosing arena charges, if any.
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`).
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_arena_begin(size_hint: usize, file: *const c_char, line: c_int) {
    let top = STATE.get();
    let mut account = ptr::null();
    // SAFETY: this thread's state if it has one, and its innermost open arena.
    if let Some(l) = unsafe { top.as_ref() } {
        if !l.top.is_null() {
            // SAFETY: an open arena's account is a live reference.
            let enclosing = unsafe { (*l.top).account };
            if !enclosing.is_null() {
                // SAFETY: as above.
                account = unsafe { account::retain(enclosing) };
            }
        }
    }
    begin(account, size_hint, file, line);
}

/// [`lunet_mem_arena_begin`], with the arena's blocks charged to the scope handle `s` (NULL:
/// none) while they live: a block its budget refuses is NULL. The arena holds a reference to `s`
/// until it ends.
///
/// # Safety
/// `s` is NULL or a live scope handle; `file` as in [`lunet_mem_arena_begin`].
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_arena_begin_in(
    s: *const Account,
    size_hint: usize,
    file: *const c_char,
    line: c_int,
) {
    let account = if s.is_null() {
        ptr::null()
    } else {
        // SAFETY: the caller's contract.
        unsafe { account::retain(s) }
    };
    begin(account, size_hint, file, line);
}

/// `lunet_mem_arena_end_at`'s modes: abort on a block still live (strict), report such blocks
/// on stderr then release them, release them silently (the reset).
pub const ARENA_NEUTRAL: c_int = 0;
pub const ARENA_REPORT: c_int = 1;
pub const ARENA_RESET: c_int = 2;

/// Ends this thread's innermost worker arena. Returns the number of its blocks still live
/// (escaped: allocated in the arena, not freed before its end). `mode` [`ARENA_NEUTRAL`]
/// reports them and aborts; [`ARENA_REPORT`] reports them on stderr; [`ARENA_RESET`] (and any
/// other value) says nothing. Then they are released: counted freed at their sites and released
/// from the arena's scope account, their headers marked so that a later `lunet_free` of one
/// aborts ("escaped"), and the arena's memory is released at once (poisoned first if poisoning
/// is on, so that a pointer that escaped reads garbage rather than stale data).
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`).
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_arena_end_at(
    mode: c_int,
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
    let arena_ptr = l.arenas[l.depth - 1];
    // SAFETY: an open arena of this thread; no other reference to it while this runs.
    let arena = unsafe { &mut *arena_ptr };
    let escaped = arena.live_blocks;
    if escaped != 0 && mode != ARENA_RESET {
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
        if mode == ARENA_NEUTRAL {
            fatal(&msg);
        }
        let _ = writeln!(std::io::stderr(), "lunet_mem: {msg}");
    }
    let poison = POISONING.load(Relaxed);
    let mut released_bytes = 0u64;
    if escaped != 0 || poison {
        arena.for_each_block(|h| {
            // SAFETY: a header in the arena's memory, and the block after it; its counts are
            // this thread's (the arena's blocks are made by its thread).
            unsafe {
                let size = (*h).size;
                if (*h).magic == magic(LIVE, h) {
                    // Released by the end: counted freed; a later free of it says it escaped
                    // (until the memory is reused).
                    l.count_freed((*h).counts, size);
                    released_bytes += size as u64;
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
    let account = std::mem::replace(&mut arena.account, ptr::null());
    if !account.is_null() {
        // SAFETY: the arena's reference to its account, dropped here.
        unsafe {
            if escaped != 0 {
                (*account).release(released_bytes, escaped as u64);
            }
            account::drop_ref(account);
        }
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

/// Whether released arena memory (worker and request arenas) is poisoned.
#[inline(always)]
pub(crate) fn poisoning() -> bool {
    POISONING.load(Relaxed)
}

/// Turns poisoning of released arena memory on or off (on by default in debug builds).
#[no_mangle]
pub extern "C" fn lunet_mem_set_poisoning(on: c_int) {
    POISONING.store(on != 0, Relaxed);
}
