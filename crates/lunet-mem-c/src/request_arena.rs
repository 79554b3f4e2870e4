//! Request arenas (`lunet_request_arena_*`), in every build: a request's C buffers bump-allocated
//! in chunks from a per-thread pool, released all at once when the request ends, and charged to
//! the request's scope (see `account.rs`).
//!
//! Layout. Every chunk is `CHUNK` bytes aligned to `CHUNK` (a block bigger than `BIG` gets a
//! chunk of its own, also aligned to `CHUNK`), so that the chunk of any block is its address
//! rounded down: that is how `lunet_free` names a pointer from a request arena, with no table.
//! A chunk starts with a [`Chunk`] header; the arena's own struct and a copy of its name live in
//! its first chunk (creating an arena allocates nothing else). Each block has a 16-byte
//! [`BlockHeader`] (its size, for the realloc form, and the arena's serial) and is aligned to 16.
//!
//! Why not bumpalo: its chunks come from the global allocator one by one and go back to it, with
//! no pool, no alignment of chunks to their size and no per-block size; the pool (destroy and
//! create reuse chunks), the chunk lookup from a pointer and the charging are the point here.

use std::ffi::{c_char, c_void, CStr};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use libmimalloc_sys as mi;

use crate::account::{self, Account};
use crate::block::{round_up, ALIGN, MAX_SIZE};
use crate::fatal::fatal;
use crate::thread_state::state;
use crate::worker_arena::poisoning;

/// Bytes of a pooled chunk, and the alignment of every chunk.
const CHUNK: usize = 64 * 1024;
/// Blocks bigger than this get a chunk of their own (so that a chunk wastes at most a quarter).
const BIG: usize = CHUNK / 4;
/// How many free chunks a thread keeps for its next arenas.
pub(crate) const POOL_CHUNKS: usize = 16;
/// The longest name kept (longer names are cut).
const NAME_MAX: usize = 127;
const POISON: u8 = 0xde;

const CHUNK_MAGIC: u64 = 0x4c55_4e45_5452_4551; // "LUNETREQ"
const BLOCK_LIVE: u64 = 0x4c55_4e45_5452_424c; // "LUNETRBL"
const BLOCK_FREED: u64 = !BLOCK_LIVE;
/// Bits of `BlockHeader::meta` that hold the size; the rest hold the low bits of the serial.
const SIZE_BITS: u32 = 48;

/// The start of every chunk. `owner` is the serial of the arena that holds the chunk, 0 while
/// it is in a pool; `arena` is that arena (valid only while `owner` is not 0).
#[repr(C)]
pub(crate) struct Chunk {
    magic: u64,
    owner: AtomicU64,
    arena: *const RequestArena,
    /// The arena's next older chunk (a list, newest first), or null.
    next: *mut Chunk,
    /// Bytes of the chunk, header included.
    size: usize,
    /// Where its used part ends, once the arena moved on to a newer chunk.
    used_end: *mut u8,
}

const CHUNK_HEADER: usize = round_up(std::mem::size_of::<Chunk>());

/// The 16 bytes before every block.
#[repr(C)]
struct BlockHeader {
    /// `BLOCK_LIVE` (or `BLOCK_FREED` once the realloc form freed or moved it) XORed with the
    /// header's address.
    tag: u64,
    /// The block's size (low `SIZE_BITS`) and the low bits of its arena's serial.
    meta: u64,
}

const BLOCK_HEADER: usize = std::mem::size_of::<BlockHeader>();
const _: () = assert!(BLOCK_HEADER == ALIGN && CHUNK_HEADER % ALIGN == 0);

/// `lunet_request_arena_stats_t`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct RequestArenaStats {
    /// Bytes of the live blocks (the sizes asked for), blocks, chunks held and their bytes,
    /// and the highest `bytes` seen.
    pub bytes: u64,
    pub blocks: u64,
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub peak_bytes: u64,
}

/// `lunet_request_arena_t`: lives in its first chunk. Used by one thread at a time.
#[repr(C)]
pub struct RequestArena {
    /// The next block's place in the current chunk, and the current chunk's end.
    cur: *mut u8,
    end: *mut u8,
    /// The newest chunk (the current one, or a big block's), then older ones through `next`.
    chunks: *mut Chunk,
    /// The chunk `cur` is in.
    current: *mut Chunk,
    /// The last block made in the current chunk (it can grow in place), or null.
    last: *mut BlockHeader,
    /// The account charged (a reference the arena owns), or null.
    account: *const Account,
    serial: u64,
    stats: RequestArenaStats,
    /// NUL-terminated, in the first chunk.
    name: *const c_char,
}

static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

#[inline(always)]
fn tag(kind: u64, h: *const BlockHeader) -> u64 {
    kind ^ h as usize as u64
}

fn serial_bits(serial: u64) -> u64 {
    serial << SIZE_BITS
}

/// The bits of `serial` a block header keeps.
fn serial_low(serial: u64) -> u64 {
    serial & ((1 << (64 - SIZE_BITS)) - 1)
}

/// A chunk of `size` bytes (`CHUNK` from this thread's pool if it is that size), aligned to
/// `CHUNK`, owned by `arena`; null if out of memory.
fn new_chunk(size: usize, arena: *const RequestArena, serial: u64) -> *mut Chunk {
    let mut chunk = ptr::null_mut();
    if size == CHUNK {
        // SAFETY: this thread's state, and no other reference to it (see `state`).
        chunk = unsafe { (*state()).request_chunks.pop() }.unwrap_or(ptr::null_mut());
    }
    if chunk.is_null() {
        // SAFETY: plain allocation (`size <= MAX_SIZE + CHUNK`).
        chunk = unsafe { mi::mi_malloc_aligned(size, CHUNK) }.cast();
        if chunk.is_null() {
            return chunk;
        }
    }
    // SAFETY: a chunk no arena holds (from the pool or new), `size` bytes.
    unsafe {
        chunk.write(Chunk {
            magic: CHUNK_MAGIC ^ chunk as usize as u64,
            owner: AtomicU64::new(serial),
            arena,
            next: ptr::null_mut(),
            size,
            used_end: ptr::null_mut(),
        })
    };
    chunk
}

/// Gives `chunk` (which no arena holds any more) to this thread's pool, or to mimalloc.
///
/// # Safety
/// `chunk` is from `new_chunk`, and nothing uses it.
unsafe fn drop_chunk(chunk: *mut Chunk) {
    // SAFETY: the caller's contract.
    unsafe {
        (*chunk).owner.store(0, Relaxed);
        let size = (*chunk).size;
        // SAFETY: this thread's state, and no other reference to it (see `state`).
        let pool = &mut (*state()).request_chunks;
        if size == CHUNK && pool.len() < POOL_CHUNKS {
            pool.push(chunk);
        } else {
            mi::mi_free(chunk.cast());
        }
    }
}

fn data(chunk: *mut Chunk) -> *mut u8 {
    chunk.cast::<u8>().wrapping_add(CHUNK_HEADER)
}

impl RequestArena {
    /// Room for a block of `size` bytes, placed: its header written, the stats moved. Null if
    /// out of memory. Charges nothing.
    #[inline(always)]
    fn place(&mut self, size: usize) -> *mut u8 {
        let need = BLOCK_HEADER + round_up(size);
        let room = self.end as usize - self.cur as usize;
        let h = if need <= room {
            let h = self.cur;
            // SAFETY: inside the current chunk (checked).
            self.cur = unsafe { h.add(need) };
            self.last = h.cast();
            h
        } else {
            let h = self.place_slow(size);
            if h.is_null() {
                return h;
            }
            h
        };
        let h = h.cast::<BlockHeader>();
        // SAFETY: `need` bytes at `h`, in a chunk of this arena.
        unsafe {
            h.write(BlockHeader {
                tag: tag(BLOCK_LIVE, h),
                meta: size as u64 | serial_bits(self.serial),
            })
        };
        self.stats.bytes += size as u64;
        self.stats.blocks += 1;
        h.wrapping_add(1).cast()
    }

    /// Takes back the block `p` of `size` bytes that [`RequestArena::place`] just made (its
    /// charge was refused): the room is reused if it is the last block, else abandoned.
    #[cold]
    fn unplace(&mut self, p: *mut u8, size: usize) {
        let h = p.cast::<BlockHeader>().wrapping_sub(1);
        if h == self.last {
            self.cur = h.cast();
            self.last = ptr::null_mut();
        }
        // SAFETY: the header `place` just wrote.
        unsafe { (*h).tag = tag(BLOCK_FREED, h) };
        self.stats.bytes -= size as u64;
        self.stats.blocks -= 1;
    }

    #[inline(always)]
    fn note_peak(&mut self) {
        if self.stats.bytes > self.stats.peak_bytes {
            self.stats.peak_bytes = self.stats.bytes;
        }
    }

    /// [`RequestArena::place`] when the current chunk has no room: a new chunk for the block
    /// (its own if it is big); returns where its header goes, or null.
    #[cold]
    #[inline(never)]
    fn place_slow(&mut self, size: usize) -> *mut u8 {
        let need = BLOCK_HEADER + round_up(size);
        let big = size > BIG;
        let chunk_size = if big {
            round_up(CHUNK_HEADER + need)
        } else {
            CHUNK
        };
        let chunk = new_chunk(chunk_size, self, self.serial);
        if chunk.is_null() {
            return ptr::null_mut();
        }
        // SAFETY: the arena's chunks; `chunk` is new and `chunk_size` bytes.
        unsafe {
            (*chunk).next = self.chunks;
            self.chunks = chunk;
            self.stats.chunks += 1;
            self.stats.chunk_bytes += chunk_size as u64;
            let h = data(chunk);
            if !big {
                if !self.current.is_null() {
                    (*self.current).used_end = self.cur;
                }
                self.current = chunk;
                self.cur = h.add(need);
                self.end = chunk.cast::<u8>().add(CHUNK);
                self.last = h.cast();
            } else {
                (*chunk).used_end = h.add(need);
            }
            h
        }
    }

    /// The header of `p` if it is a live block of this arena; else aborts naming `what`.
    fn header_of(&self, p: *mut c_void, what: &str) -> *mut BlockHeader {
        let h = p.cast::<BlockHeader>().wrapping_sub(1);
        let chunk = (p as usize & !(CHUNK - 1)) as *mut Chunk;
        let mut at = self.chunks;
        let mut ours = false;
        while !at.is_null() {
            if at == chunk {
                ours = (p as usize) >= data(chunk) as usize + BLOCK_HEADER;
                break;
            }
            // SAFETY: the arena's chunks.
            at = unsafe { (*at).next };
        }
        // SAFETY: read only when `h` is in one of the arena's chunks (checked), which are
        // readable.
        let live = ours
            && unsafe {
                (*h).tag == tag(BLOCK_LIVE, h) && (*h).meta >> SIZE_BITS == serial_low(self.serial)
            };
        if !live {
            fatal(&format!(
                "{what} of {p:p}: not a live block of request arena '{}'",
                self.name()
            ));
        }
        h
    }

    fn name(&self) -> String {
        // SAFETY: a NUL-terminated copy in the first chunk.
        unsafe { CStr::from_ptr(self.name) }
            .to_string_lossy()
            .into_owned()
    }
}

/// Creates a request arena charged to the scope `s` (NULL: none; the arena takes a reference of
/// its own), named `name` (NULL: ""; copied, cut at 127 bytes). NULL if out of memory.
///
/// # Safety
/// `s` is NULL or a live scope handle; `name` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn lunet_request_arena_create(
    s: *const Account,
    name: *const c_char,
) -> *mut RequestArena {
    let serial = NEXT_SERIAL.fetch_add(1, Relaxed);
    let chunk = new_chunk(CHUNK, ptr::null(), serial);
    if chunk.is_null() {
        return ptr::null_mut();
    }
    let name = if name.is_null() {
        &[][..]
    } else {
        // SAFETY: the caller's contract.
        let bytes = unsafe { CStr::from_ptr(name) }.to_bytes();
        &bytes[..bytes.len().min(NAME_MAX)]
    };
    // SAFETY: the new chunk has room for the arena, its name, and more (`CHUNK` bytes).
    unsafe {
        let arena = data(chunk).cast::<RequestArena>();
        let name_at = arena
            .cast::<u8>()
            .add(round_up(std::mem::size_of::<RequestArena>()));
        ptr::copy_nonoverlapping(name.as_ptr(), name_at, name.len());
        *name_at.add(name.len()) = 0;
        let cur = name_at.add(round_up(name.len() + 1));
        arena.write(RequestArena {
            cur,
            end: chunk.cast::<u8>().add(CHUNK),
            chunks: chunk,
            current: chunk,
            last: ptr::null_mut(),
            account: if s.is_null() {
                ptr::null()
            } else {
                account::retain(s)
            },
            serial,
            stats: RequestArenaStats {
                chunks: 1,
                chunk_bytes: CHUNK as u64,
                ..Default::default()
            },
            name: name_at.cast(),
        });
        (*chunk).arena = arena;
        arena
    }
}

/// A block of `n` bytes (16-byte aligned) in the arena `a`, charged to its scope; NULL if the
/// scope's budget refuses it or out of memory.
///
/// # Safety
/// `a` is a live arena (not destroyed), used by no other thread during the call.
#[no_mangle]
pub unsafe extern "C" fn lunet_request_alloc(a: *mut RequestArena, n: usize) -> *mut c_void {
    // SAFETY: the caller's contract.
    let a = unsafe { &mut *a };
    if n > MAX_SIZE {
        return ptr::null_mut();
    }
    // SAFETY: the arena holds a reference to its account.
    let account = unsafe { a.account.as_ref() };
    // (a block the budget refuses gets no chunk: checked before placing, then charged)
    if account.is_some_and(|account| !account.admits(n as u64)) {
        return ptr::null_mut();
    }
    let p = a.place(n);
    if p.is_null() {
        return p.cast();
    }
    if let Some(account) = account {
        if !account.charge(n as u64, 1) {
            a.unplace(p, n);
            return ptr::null_mut();
        }
    }
    a.note_peak();
    p.cast()
}

/// The realloc form: `p` (NULL, or a live block of `a`) resized to `n` bytes, in place when it is
/// the arena's last block and there is room, else moved (its bytes copied) and the old block
/// abandoned until the arena is destroyed. `n == 0` releases `p` and returns NULL. NULL if the
/// budget refuses the growth or out of memory (then `p` is untouched). Counted as one block freed
/// and one made. A pointer that is not a live block of `a` aborts with a message.
///
/// # Safety
/// As for [`lunet_request_alloc`]; `p` is NULL or a pointer the C code holds.
#[no_mangle]
pub unsafe extern "C" fn lunet_request_realloc(
    a: *mut RequestArena,
    p: *mut c_void,
    n: usize,
) -> *mut c_void {
    if p.is_null() {
        // SAFETY: forwarded contract.
        return unsafe { lunet_request_alloc(a, n) };
    }
    // SAFETY: the caller's contract.
    let a = unsafe { &mut *a };
    let h = a.header_of(p, "lunet_request_realloc");
    // SAFETY: a live block's header (checked).
    let old = unsafe { (*h).meta } & ((1 << SIZE_BITS) - 1);
    // SAFETY: the arena holds a reference to its account.
    let account = unsafe { a.account.as_ref() };
    if n == 0 {
        if let Some(account) = account {
            account.release(old, 1);
        }
        // SAFETY: as above.
        unsafe { (*h).tag = tag(BLOCK_FREED, h) };
        a.stats.bytes -= old;
        a.stats.blocks -= 1;
        return ptr::null_mut();
    }
    if n > MAX_SIZE {
        return ptr::null_mut();
    }
    let p_at = p.cast::<u8>();
    // In place: the last block of the current chunk, with room after it.
    if h == a.last && (a.end as usize - p_at as usize) >= round_up(n) {
        if let Some(account) = account {
            if !account.resize(old, n as u64) {
                return ptr::null_mut();
            }
        }
        // SAFETY: inside the current chunk (checked).
        a.cur = unsafe { p_at.add(round_up(n)) };
        // SAFETY: a live block's header.
        unsafe { (*h).meta = n as u64 | serial_bits(a.serial) };
        a.stats.bytes = a.stats.bytes - old + n as u64;
        a.note_peak();
        return p;
    }
    if account.is_some_and(|account| n as u64 > old && !account.admits(n as u64 - old)) {
        return ptr::null_mut();
    }
    let new = a.place(n);
    if new.is_null() {
        return ptr::null_mut();
    }
    if let Some(account) = account {
        account.resize_unchecked(old, n as u64);
    }
    // SAFETY: both blocks hold at least `min(old, n)` bytes; different places in the arena.
    unsafe {
        ptr::copy_nonoverlapping(p_at, new, (old as usize).min(n));
        (*h).tag = tag(BLOCK_FREED, h);
    }
    a.stats.bytes -= old;
    a.stats.blocks -= 1;
    a.note_peak();
    new.cast()
}

/// Fills `out` with the arena's figures.
///
/// # Safety
/// `a` is a live arena; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn lunet_request_arena_stats(
    a: *const RequestArena,
    out: *mut RequestArenaStats,
) {
    // SAFETY: the caller's contract.
    if let (Some(a), Some(out)) = unsafe { (a.as_ref(), out.as_mut()) } {
        *out = a.stats;
    }
}

/// Destroys the arena: its blocks are released at once (their bytes and count released from
/// its scope's account in one charge), its chunks go to this thread's pool (poisoned with 0xde
/// first if poisoning is on), and its reference to the scope is dropped. NULL: nothing.
///
/// # Safety
/// `a` is NULL or a live arena that no other thread uses; no block of it is used afterwards.
#[no_mangle]
pub unsafe extern "C" fn lunet_request_arena_destroy(a: *mut RequestArena) {
    if a.is_null() {
        return;
    }
    // SAFETY: the caller's contract; read before the arena's memory goes.
    let (account, stats, mut chunk, current, cur) = unsafe {
        let r = &*a;
        (r.account, r.stats, r.chunks, r.current, r.cur)
    };
    if !account.is_null() {
        // SAFETY: the arena's reference to its account, dropped here.
        unsafe {
            (*account).release(stats.bytes, stats.blocks);
            account::drop_ref(account);
        }
    }
    let poison = poisoning();
    while !chunk.is_null() {
        // SAFETY: the arena's chunks; nothing uses them now.
        unsafe {
            let next = (*chunk).next;
            if poison {
                let end = if chunk == current {
                    cur
                } else {
                    (*chunk).used_end
                };
                let start = data(chunk);
                ptr::write_bytes(start, POISON, end as usize - start as usize);
            }
            drop_chunk(chunk);
            chunk = next;
        }
    }
}

/// What `p` is, if it points into a request arena's chunk: for the messages of `lunet_free`.
///
/// # Safety
/// None beyond `p` being an address (only mimalloc's memory is read).
pub(crate) unsafe fn describe(p: *mut c_void) -> Option<String> {
    let chunk = (p as usize & !(CHUNK - 1)) as *mut Chunk;
    // SAFETY: an address check, reading nothing.
    if chunk.is_null() || !unsafe { mi::mi_is_in_heap_region(chunk.cast()) } {
        return None;
    }
    // SAFETY: inside mimalloc's memory (checked): readable.
    if unsafe { (*chunk).magic } != CHUNK_MAGIC ^ chunk as usize as u64
        || (p as usize) < data(chunk) as usize + BLOCK_HEADER
    {
        return None;
    }
    // SAFETY: a chunk's header and the 16 bytes before `p`, inside the chunk.
    let (owner, arena, h) = unsafe {
        (
            (*chunk).owner.load(Relaxed),
            (*chunk).arena,
            p.cast::<BlockHeader>().wrapping_sub(1),
        )
    };
    // SAFETY: as above.
    let (t, meta) = unsafe { ((*h).tag, (*h).meta) };
    let live = owner != 0 && t == tag(BLOCK_LIVE, h) && meta >> SIZE_BITS == serial_low(owner);
    Some(if live && !arena.is_null() {
        format!(
            "a block of request arena '{}': its blocks are released with the arena \
             (lunet_request_arena_destroy), never by lunet_free",
            // SAFETY: the arena that holds the chunk (owner not 0).
            unsafe { (*arena).name() }
        )
    } else {
        "a block of a request arena that was destroyed (the pointer outlived its arena)".into()
    })
}

/// Frees a thread's pooled chunks (when the thread ends).
///
/// # Safety
/// The chunks are from `new_chunk` and in no arena.
pub(crate) unsafe fn free_pool(pool: &mut Vec<*mut Chunk>) {
    for chunk in pool.drain(..) {
        // SAFETY: the caller's contract.
        unsafe { mi::mi_free(chunk.cast()) };
    }
}
