//! The C API for the runtime's own C code (`include/lunet_mem.h`): tracked `malloc`/`free` with
//! per-site and per-thread counters, neutrality checkpoints, and worker-thread arenas.
//!
//! Every block made by [`lunet_mem_malloc_at`] carries a [`Header`] in front of it: its size, its
//! allocation site, its arena (if any) and a magic word that tells a live block from a freed one
//! and from a pointer this library never made. Counters are atomics: per thread (written only by
//! their thread, read by reports) and per site (shared).

use std::cell::{Cell, RefCell, UnsafeCell};
use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::io::Write;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use bumpalo::Bump;
use mlua::ffi::{self, lua_State};

/// The header in front of every tracked block. 32 bytes, so the block keeps 16-byte alignment.
#[repr(C)]
struct Header {
    /// `LIVE` while the block is allocated, `FREED` after.
    magic: u64,
    size: usize,
    site: *const Site,
    /// The worker arena the block lives in, or null for the heap.
    arena: *const Arena,
}

const HEADER: usize = std::mem::size_of::<Header>();
const ALIGN: usize = 16;
const LIVE: u64 = 0x4c55_4e45_544d_454d; // "LUNETMEM"
const FREED: u64 = !LIVE;
/// Marks the blocks of a worker arena that ended while they were live (escaped).
const ENDED: u64 = LIVE ^ 1;
/// Byte written over an arena's memory when it is released, if poisoning is on.
const POISON: u8 = 0xde;

/// One allocation site (`file:line` of the call). Its counts are kept per thread (each thread
/// writes only its own, with no atomic read-modify-write) and summed when reported.
pub struct Site {
    file: *const c_char,
    line: c_int,
    locals: Mutex<Vec<Arc<LocalCounts>>>,
}

/// One thread's counts of one site (or of all its sites, in `ThreadState::counters`).
#[derive(Default)]
pub struct LocalCounts {
    allocs: AtomicU64,
    frees: AtomicU64,
    bytes_allocated: AtomicU64,
    bytes_freed: AtomicU64,
}

// SAFETY: `file` points to a string literal (`__FILE__`) that lives as long as the program; the
// counts are behind a mutex and atomics.
unsafe impl Sync for Site {}
// SAFETY: as above.
unsafe impl Send for Site {}

impl LocalCounts {
    /// Counts a block of `size` bytes made (or freed) by the owning thread.
    fn count(&self, size: usize, made: bool) {
        if made {
            bump(&self.allocs, 1);
            bump(&self.bytes_allocated, size as u64);
        } else {
            bump(&self.frees, 1);
            bump(&self.bytes_freed, size as u64);
        }
    }
}

/// `(allocs, frees, live blocks, live bytes)` of a site.
type SiteTotals = (u64, u64, i64, i64);

impl Site {
    /// The site's figures over every thread.
    fn totals(&self) -> SiteTotals {
        let locals = self.locals.lock().unwrap_or_else(|e| e.into_inner());
        let (mut a, mut f, mut ba, mut bf) = (0u64, 0u64, 0u64, 0u64);
        for l in locals.iter() {
            a += l.allocs.load(Relaxed);
            f += l.frees.load(Relaxed);
            ba += l.bytes_allocated.load(Relaxed);
            bf += l.bytes_freed.load(Relaxed);
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

/// Counters of one thread, written only by it.
#[derive(Default)]
pub struct ThreadCounters {
    counts: LocalCounts,
    peak_bytes: AtomicI64,
}

fn bump(counter: &AtomicU64, by: u64) {
    // Only the owning thread writes: a plain load and store is enough (no read-modify-write).
    counter.store(counter.load(Relaxed) + by, Relaxed);
}

fn threads() -> &'static Mutex<Vec<Arc<ThreadCounters>>> {
    static THREADS: OnceLock<Mutex<Vec<Arc<ThreadCounters>>>> = OnceLock::new();
    THREADS.get_or_init(Default::default)
}

/// What one thread keeps: its counters, its view of the site table, its open worker arenas,
/// released bump allocators for the next arena, and its quarantine of freed blocks.
///
/// Boxed behind one small thread-local: a module's static TLS must stay small, or `dlopen` of
/// the Lua module fails ("cannot allocate memory in static TLS block").
struct ThreadState {
    counters: Arc<ThreadCounters>,
    /// This thread's counts of the sites it used, direct-mapped by `(file, line)`: no lock, no
    /// hashing after a site's first use here, unless two hot sites collide.
    site_cache: Vec<Option<(&'static Site, Arc<LocalCounts>)>>,
    /// Open worker arenas, innermost last.
    arenas: Vec<Arc<Arena>>,
    bump_pool: Vec<Bump>,
    /// Heap blocks freed last on this thread, kept (marked freed) before they go back to
    /// mimalloc, so that a double free of one of them is seen rather than freeing whatever
    /// reused the memory.
    quarantine: Quarantine,
}

thread_local! {
    static LOCAL: RefCell<Option<Box<ThreadState>>> = const { RefCell::new(None) };
}

/// Runs `f` on this thread's state (made on first use). `f` must not call back into this.
fn with_local<R>(f: impl FnOnce(&mut ThreadState) -> R) -> R {
    LOCAL.with(|cell| {
        let mut local = cell.borrow_mut();
        let state = local.get_or_insert_with(|| {
            let counters = Arc::new(ThreadCounters::default());
            threads()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(counters.clone());
            Box::new(ThreadState {
                counters,
                site_cache: vec![None; SITE_CACHE_SLOTS],
                arenas: Vec::new(),
                bump_pool: Vec::new(),
                quarantine: Quarantine::default(),
            })
        });
        f(state)
    })
}

/// How many freed blocks a thread keeps back.
const QUARANTINE_BLOCKS: usize = 256;

#[derive(Default)]
struct Quarantine(VecDeque<*mut Header>);

impl Quarantine {
    fn push(&mut self, h: *mut Header) {
        if self.0.len() == QUARANTINE_BLOCKS {
            if let Some(old) = self.0.pop_front() {
                // SAFETY: a heap block made by `mi_malloc_aligned`, freed by the C code already.
                unsafe { libmimalloc_sys::mi_free(old as *mut c_void) };
            }
        }
        self.0.push_back(h);
    }
}

impl Drop for Quarantine {
    fn drop(&mut self) {
        for h in self.0.drain(..) {
            // SAFETY: as in `push`.
            unsafe { libmimalloc_sys::mi_free(h as *mut c_void) };
        }
    }
}

const SITE_CACHE_SLOTS: usize = 256;

static POISONING: AtomicBool = AtomicBool::new(cfg!(debug_assertions));

fn site_slot(file: *const c_char, line: c_int) -> usize {
    ((file as usize >> 3) ^ (line as usize).wrapping_mul(31)) % SITE_CACHE_SLOTS
}

impl ThreadState {
    /// The site `file:line` and this thread's counts of it.
    fn site(&mut self, file: *const c_char, line: c_int) -> (&'static Site, &LocalCounts) {
        let slot = site_slot(file, line);
        let hit =
            matches!(&self.site_cache[slot], Some((s, _)) if s.file == file && s.line == line);
        if !hit {
            let site = *sites()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry((file as usize, line))
                .or_insert_with(|| {
                    Box::leak(Box::new(Site {
                        file,
                        line,
                        locals: Mutex::new(Vec::new()),
                    }))
                });
            let local = Arc::new(LocalCounts::default());
            site.locals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(local.clone());
            self.site_cache[slot] = Some((site, local));
        }
        let (site, local) = self.site_cache[slot].as_ref().expect("filled");
        (site, local)
    }

    /// This thread's counts of `site` (a site seen before, maybe on another thread).
    fn counts_of(&mut self, site: &'static Site) -> &LocalCounts {
        self.site(site.file, site.line).1
    }
}

/// Process totals: `(allocs, frees, bytes_allocated, bytes_freed, peak of any thread)`.
fn totals() -> (u64, u64, u64, u64, i64) {
    let threads = threads().lock().unwrap_or_else(|e| e.into_inner());
    threads
        .iter()
        .fold((0, 0, 0, 0, 0), |(a, f, ba, bf, p), t| {
            let c = &t.counts;
            (
                a + c.allocs.load(Relaxed),
                f + c.frees.load(Relaxed),
                ba + c.bytes_allocated.load(Relaxed),
                bf + c.bytes_freed.load(Relaxed),
                p.max(t.peak_bytes.load(Relaxed)),
            )
        })
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

/// A worker thread's arena: blocks are bump-allocated and released all at once when it ends.
pub struct Arena {
    bump: UnsafeCell<Bump>,
    /// Every block made in the arena (to name the ones that escape).
    blocks: UnsafeCell<Vec<*mut Header>>,
    live_blocks: Cell<i64>,
    live_bytes: Cell<i64>,
    /// The state of the thread that opened it (its identity: only it may use the arena).
    owner: *const ThreadState,
    begin_file: *const c_char,
    begin_line: c_int,
}

// SAFETY: everything but the reference count is used only by the thread that opened the arena:
// `lunet_free` of an arena block on another thread aborts before touching it.
unsafe impl Sync for Arena {}
// SAFETY: as above.
unsafe impl Send for Arena {}

/// Opens a worker arena on this thread; `lunet_malloc` on this thread is served from it until
/// the matching [`lunet_mem_arena_end`]. Arenas nest.
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`);
/// pointer arguments are NULL or what the header says they are.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_arena_begin(size_hint: usize, file: *const c_char, line: c_int) {
    with_local(|l| {
        let bump = l
            .bump_pool
            .pop()
            .unwrap_or_else(|| Bump::with_capacity(size_hint));
        let owner: *const ThreadState = l;
        l.arenas.push(Arc::new(Arena {
            bump: UnsafeCell::new(bump),
            blocks: UnsafeCell::new(Vec::new()),
            live_blocks: Cell::new(0),
            live_bytes: Cell::new(0),
            owner,
            begin_file: file,
            begin_line: line,
        }));
    });
}

/// Ends this thread's innermost worker arena. Returns the number of its blocks still live
/// (escaped: allocated in the arena, not freed before its end); reports them, and aborts unless
/// `allow_escape` is set. The arena's memory is then released at once (poisoned first if
/// poisoning is on, so that a pointer that escaped reads garbage rather than stale data).
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`);
/// pointer arguments are NULL or what the header says they are.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_arena_end_at(
    allow_escape: c_int,
    file: *const c_char,
    line: c_int,
) -> i64 {
    let Some(arena) = with_local(|l| l.arenas.pop()) else {
        fatal(&format!(
            "worker arena end without begin at {}",
            at(file, line)
        ));
    };
    let escaped = arena.live_blocks.get();
    if escaped != 0 {
        let mut msg = format!(
            "worker arena begun at {} and ended at {}: {} block(s), {} byte(s) escaped",
            at(arena.begin_file, arena.begin_line),
            at(file, line),
            escaped,
            arena.live_bytes.get()
        );
        // SAFETY: only this thread allocated in the arena.
        let blocks = unsafe { &*arena.blocks.get() };
        for &h in blocks {
            // SAFETY: headers in the arena's own, still unreleased memory; sites live forever.
            let (magic, size, site) = unsafe { ((*h).magic, (*h).size, &*(*h).site) };
            if magic == LIVE {
                msg.push_str(&format!(
                    "\n  {size} bytes allocated at {}:{}",
                    site.file(),
                    site.line
                ));
            }
        }
        if allow_escape == 0 {
            fatal(&msg);
        }
        let _ = writeln!(std::io::stderr(), "lunet_mem: {msg}");
    }
    // SAFETY: the arena was opened on this thread and no other thread allocates in it.
    let (mut bump, blocks) = unsafe {
        (
            std::mem::take(&mut *arena.bump.get()),
            std::mem::take(&mut *arena.blocks.get()),
        )
    };
    for h in blocks {
        // SAFETY: headers in the arena's memory; escaped ones are marked so a later free says so.
        unsafe {
            if (*h).magic == LIVE {
                (*h).magic = ENDED;
            }
        }
    }
    if POISONING.load(Relaxed) {
        // SAFETY: the chunks are the arena's own memory, no longer handed out.
        unsafe {
            for chunk in bump.iter_allocated_chunks_raw() {
                ptr::write_bytes(chunk.0, POISON, chunk.1);
            }
        }
    }
    bump.reset();
    with_local(|l| {
        if l.bump_pool.len() < 4 {
            l.bump_pool.push(bump);
        }
    });
    escaped
}

/// Turns poisoning of released arena memory on or off (on by default in debug builds).
#[no_mangle]
pub extern "C" fn lunet_mem_set_poisoning(on: c_int) {
    POISONING.store(on != 0, Relaxed);
}

// ---------------------------------------------------------------------------------------------
// Tracked allocation

/// `lunet_malloc(size)` in tracing builds: a block of `size` bytes (16-byte aligned), from this
/// thread's worker arena if one is open, else from the heap; NULL if out of memory.
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`);
/// pointer arguments are NULL or what the header says they are.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_malloc_at(
    size: usize,
    file: *const c_char,
    line: c_int,
) -> *mut c_void {
    let Some(total) = size.checked_add(HEADER) else {
        return ptr::null_mut();
    };
    with_local(|l| {
        let (header, arena) = match l.arenas.last() {
            Some(arena) => {
                let Ok(layout) = std::alloc::Layout::from_size_align(total, ALIGN) else {
                    return ptr::null_mut();
                };
                // SAFETY: only this thread (the owner) allocates in its arena.
                let bump = unsafe { &*arena.bump.get() };
                let Ok(mem) = bump.try_alloc_layout(layout) else {
                    return ptr::null_mut();
                };
                let h = mem.as_ptr() as *mut Header;
                // SAFETY: as above.
                unsafe { (*arena.blocks.get()).push(h) };
                arena.live_blocks.set(arena.live_blocks.get() + 1);
                arena.live_bytes.set(arena.live_bytes.get() + size as i64);
                (h, Arc::as_ptr(arena))
            }
            None => {
                // SAFETY: plain allocation; mimalloc aligns blocks of 16 bytes and more to 16.
                let mem = unsafe { libmimalloc_sys::mi_malloc(total) };
                if mem.is_null() {
                    return ptr::null_mut();
                }
                (mem as *mut Header, ptr::null())
            }
        };
        let (site, counts) = l.site(file, line);
        counts.count(size, true);
        l.counters.counts.count(size, true);
        let c = &l.counters.counts;
        let live = c.bytes_allocated.load(Relaxed) as i64 - c.bytes_freed.load(Relaxed) as i64;
        if live > l.counters.peak_bytes.load(Relaxed) {
            l.counters.peak_bytes.store(live, Relaxed);
        }
        // SAFETY: `header` points to at least HEADER writable bytes.
        unsafe {
            header.write(Header {
                magic: LIVE,
                size,
                site,
                arena,
            })
        };
        // SAFETY: the payload follows the header inside the block.
        unsafe { (header as *mut u8).add(HEADER) as *mut c_void }
    })
}

/// The header of a block given to C, checked: aborts with a clear message for a double free or a
/// pointer this library did not make.
///
/// # Safety
/// `p` is non-null.
unsafe fn header_of(p: *mut c_void, what: &str, file: *const c_char, line: c_int) -> *mut Header {
    // Blocks on the heap come from mimalloc: anything else is foreign (and is not read).
    // SAFETY: checking an address, reading nothing.
    let on_heap = unsafe { libmimalloc_sys::mi_is_in_heap_region(p) };
    // SAFETY: our blocks have a header in front; for a foreign pointer inside mimalloc's region
    // (an arena chunk or another library's block) the magic check below catches it.
    let h = unsafe { (p as *mut u8).sub(HEADER) } as *mut Header;
    // SAFETY: `h` is inside mimalloc's memory (arena chunks come from it too).
    let magic = if on_heap { unsafe { (*h).magic } } else { 0 };
    match magic {
        LIVE => h,
        FREED => {
            // SAFETY: a freed header keeps its site.
            let site = unsafe { &*(*h).site };
            fatal(&format!(
                "{what} of {p:p} at {}: already freed (allocated at {}:{})",
                at(file, line),
                site.file(),
                site.line
            ))
        }
        ENDED => fatal(&format!(
            "{what} of {p:p} at {}: the block escaped a worker arena that has ended",
            at(file, line)
        )),
        _ => fatal(&format!(
            "{what} of {p:p} at {}: not a block from lunet_malloc (or from a released arena)",
            at(file, line)
        )),
    }
}

/// `lunet_free(p)` in tracing builds. NULL is ignored.
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`);
/// pointer arguments are NULL or what the header says they are.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_free_at(p: *mut c_void, file: *const c_char, line: c_int) {
    if p.is_null() {
        return;
    }
    // SAFETY: `p` is not null.
    let h = unsafe { header_of(p, "free", file, line) };
    // SAFETY: a live header (checked).
    let (size, site, arena) = unsafe { ((*h).size, &*(*h).site, (*h).arena) };
    with_local(|l| {
        if !arena.is_null() {
            // SAFETY: an arena outlives its live blocks' headers (they are checked LIVE above).
            let arena = unsafe { &*arena };
            if !ptr::eq(arena.owner, &*l) {
                fatal(&format!(
                    "free of {p:p} at {}: a worker arena's block, freed on another thread",
                    at(file, line)
                ));
            }
            arena.live_blocks.set(arena.live_blocks.get() - 1);
            arena.live_bytes.set(arena.live_bytes.get() - size as i64);
        }
        // SAFETY: as above.
        unsafe { (*h).magic = FREED };
        l.counts_of(site).count(size, false);
        l.counters.counts.count(size, false);
        if arena.is_null() {
            l.quarantine.push(h);
        }
    });
}

/// `lunet_realloc(p, size)` in tracing builds (`p` NULL: malloc; `size` 0: free, returns NULL).
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`);
/// pointer arguments are NULL or what the header says they are.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_realloc_at(
    p: *mut c_void,
    size: usize,
    file: *const c_char,
    line: c_int,
) -> *mut c_void {
    if p.is_null() {
        // SAFETY: forwarded contract.
        return unsafe { lunet_mem_malloc_at(size, file, line) };
    }
    if size == 0 {
        // SAFETY: forwarded contract.
        unsafe { lunet_mem_free_at(p, file, line) };
        return ptr::null_mut();
    }
    // SAFETY: `p` is not null.
    let old = unsafe { (*header_of(p, "realloc", file, line)).size };
    // SAFETY: forwarded contract.
    let new = unsafe { lunet_mem_malloc_at(size, file, line) };
    if !new.is_null() {
        // SAFETY: both blocks are at least `min(old, size)` bytes; `p` is live (checked).
        unsafe {
            ptr::copy_nonoverlapping(p as *const u8, new as *mut u8, old.min(size));
            lunet_mem_free_at(p, file, line);
        }
    }
    new
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
