//! Allocation tracing (`mem.trace`): live blocks by the Lua stack that allocated them, modelled
//! on Python's tracemalloc, with byte sampling as in tcmalloc and memray.
//!
//! # Where the site comes from
//!
//! The allocator gets no `lua_State`. The tracker follows the thread that runs (set by
//! `trace.start` to the calling thread, by `crate::lua_api::enter` to the coroutine being
//! resumed and by `leave` back to the resumer: the same points that make scopes follow
//! coroutines). When a new block is recorded, the stack of that thread is read with
//! `lua_getstack` and `lua_getinfo("Sl")` (`"Sln"` on 5.2+ and LuaJIT).
//!
//! Why that is safe inside an allocation (read in each version's `ldebug.c` / `lj_debug.c`):
//! `lua_getstack` walks the `CallInfo` list (5.1: the `CallInfo` array; LuaJIT: the frame links
//! from `L->base`); `lua_getinfo` with `S`, `l` and `n` writes only into the `lua_Debug` (the
//! short source is copied by `luaO_chunkid` / `lj_debug_shortname` into its buffer) and reads
//! prototypes and bytecode: no allocation, no call into Lua. Only `f` and `L` push values (not
//! used). `n` reads the calling frame's saved pc, which every call saves; on 5.1 it runs
//! `symbexec` over the caller's code (no allocation, but slow), so 5.1 frames have no name.
//! Frees and reallocations never read a stack: Lua 5.4.6+ turns the stack's pointers into
//! offsets while it reallocates the stack (`luaD_reallocstack`), and 5.1 reallocates its
//! `CallInfo` array in place; a reallocation moves the record of its block (the site is where
//! the block was first made), a free removes it.
//!
//! Phases:
//! - The collector runs finalizers as ordinary calls on the running thread: consistent stacks.
//! - LuaJIT: compiled code neither keeps `L->base` nor frames up to date (a trace inlines calls
//!   and writes frames back only when it exits), and a fast function may overwrite its own
//!   frame's function slot with a result before it allocates. The tracer reads LuaJIT's VM state
//!   (`crate::luajit`): it reads a stack only in the interpreter or a C function, from the VM's
//!   current thread, skipping frames whose function slot holds no function; allocations of
//!   compiled code, of the trace compiler and of the collector are recorded under
//!   `(JIT-compiled code)`, `(JIT compiler)` and `(garbage collector)`. `mem.trace.start` turns
//!   the compiler off and flushes the traces (`stop` turns it back on), so that code is
//!   interpreted and its sites read.
//! - A thread whose block is freed while it is the running one (resumed by a path that does not
//!   go through the wrappers, then collected) is forgotten: the main thread (or no thread,
//!   `(unknown thread)`) takes its place.
//!
//! Lines: 5.3 and LuaJIT save the pc before any allocation; 5.1 and 5.4 do not save it before
//! a table constructor (`OP_NEWTABLE`, and 5.1's `OP_CLOSURE`), so such a block is given the
//! line of the last call, concatenation or closure of the same function.
//!
//! # Cost
//!
//! With tracing off the hook does not test anything: `mem.trace.start` installs the traced
//! twin of the hook (`lunet_mem_alloc_*_traced`, same tracker) and `stop` puts the plain one
//! back. The records live in Rust memory (mimalloc, the global allocator), never in Lua's.

use std::cell::{Cell, UnsafeCell};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::Write;
use std::mem;
use std::ptr;

use mlua::ffi::{self, lua_State};

use crate::hook::Tracker;
use crate::state;

/// What the tracer knows of the VM: LuaJIT's checked view of its own state, if any.
#[cfg(feature = "luajit")]
type Vm = Option<crate::luajit::Vm>;
#[cfg(not(feature = "luajit"))]
type Vm = ();

/// Deepest traceback recorded (`opts.depth`).
pub const MAX_DEPTH: usize = 64;
/// Traceback depth when `opts.depth` is not given.
pub const DEFAULT_DEPTH: usize = 8;

// ---------------------------------------------------------------------------------------------
// Hashing

/// A multiply-rotate hasher (rustc's Fx with the rotation of rustc-hash 2): fast on the
/// addresses and small integer keys used here. The rotation brings the well-mixed high bits of
/// the product down, so that 16-byte-aligned addresses spread over the buckets.
#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

const FX_K: u64 = 0xf135_7aea_2e62_a9c5;

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.hash = (self.hash ^ n).wrapping_mul(FX_K);
    }
    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.write_u64(n as u64);
    }
    #[inline]
    fn write_i32(&mut self, n: i32) {
        self.write_u64(n as u32 as u64);
    }
    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.hash.rotate_left(26)
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

// ---------------------------------------------------------------------------------------------
// Frames and sites

/// One frame of a recorded stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// `short_src`: `file.lua`, `[C]`, `[string "..."]`.
    pub src: Box<str>,
    /// The line running in that frame (-1 for a C function).
    pub line: i32,
    /// The line where the function was defined (0 for a main chunk, -1 for C).
    pub defined: i32,
    /// The name the caller knows the function by, if any.
    pub name: Option<Box<str>>,
    /// `what`: `b'L'` (Lua function), `b'm'` (main chunk), `b'C'` (C function).
    pub what: u8,
}

impl Frame {
    fn special(label: &str) -> Frame {
        Frame {
            src: label.into(),
            line: -1,
            defined: -1,
            name: None,
            what: b'?',
        }
    }

    /// The `"line"` key: `file.lua:12` (`[C] name` for C functions).
    pub fn line_label(&self) -> String {
        match self.what {
            b'?' => self.src.to_string(),
            b'C' => self.function_label(),
            _ => format!("{}:{}", self.src, self.line),
        }
    }

    /// The `"function"` key: `name (file.lua:10)`, `function <file.lua:10>`, `main chunk
    /// (file.lua)`, `[C] name`.
    pub fn function_label(&self) -> String {
        match (self.what, &self.name) {
            (b'?', _) => self.src.to_string(),
            (b'C', Some(name)) => format!("[C] {name}"),
            (b'C', None) => "[C]".into(),
            (b'm', _) => format!("main chunk ({})", self.src),
            (_, Some(name)) => format!("{name} ({}:{})", self.src, self.defined),
            (_, None) => format!("function <{}:{}>", self.src, self.defined),
        }
    }

    /// A frame of a traceback: `file.lua:12 in name (file.lua:10)`.
    pub fn traceback_label(&self) -> String {
        match self.what {
            b'?' | b'C' => self.function_label(),
            _ => format!("{}:{} in {}", self.src, self.line, self.function_label()),
        }
    }

    /// A frame of a folded stack or flame graph: `name (file.lua:12)`, with no `;`.
    pub fn folded_label(&self) -> String {
        let label = match (self.what, &self.name) {
            (b'?', _) | (b'C', _) => self.function_label(),
            (b'm', _) => format!("main chunk ({}:{})", self.src, self.line),
            (_, Some(name)) => format!("{name} ({}:{})", self.src, self.line),
            (_, None) => format!(
                "function <{}:{}> ({}:{})",
                self.src, self.defined, self.src, self.line
            ),
        };
        label.replace([';', '\n'], "_")
    }
}

/// What identifies a frame cheaply: the addresses of the source and name strings (checked
/// against the bytes on use: an address may be reused by another string) and the lines.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct FrameKey {
    source: usize,
    name: usize,
    defined: i32,
    line: i32,
}

/// A live recorded block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveBlock {
    pub size: usize,
    pub site: u32,
}

/// Everything recorded since `trace.start`. Rust memory only.
pub struct Recorder {
    /// Frames read per allocation (1..=MAX_DEPTH).
    depth: usize,
    /// Mean bytes between samples; 0 records every allocation.
    sample_bytes: u64,
    /// Bytes to allocate before the next sample (sampling only).
    bytes_left: i64,
    /// xorshift64* state.
    rng: u64,
    frame_ids: FxMap<FrameKey, u32>,
    frames: Vec<Frame>,
    site_ids: FxMap<Box<[u32]>, u32>,
    sites: Vec<Box<[u32]>>,
    /// Recorded live blocks by address.
    live: FxMap<usize, LiveBlock>,
    /// A filter of the addresses in `live`: a clear bit means "not recorded", so that the free of
    /// an unrecorded block (almost every free when sampling) looks nothing up. Bits are never
    /// cleared (several addresses share one), so a set bit only means "maybe".
    maybe: Box<[u64]>,
}

/// Bits in [`Recorder::maybe`] (2^16: 8 KiB).
const FILTER_BITS: usize = 1 << 16;

/// The filter bit of the block at `addr` (blocks are 16-byte aligned; high bits folded in).
#[inline(always)]
fn filter_bit(addr: usize) -> usize {
    ((addr >> 4) ^ (addr >> 20)) & (FILTER_BITS - 1)
}

impl Recorder {
    pub fn new(depth: usize, sample_bytes: u64, seed: u64) -> Recorder {
        let mut rec = Recorder {
            depth: depth.clamp(1, MAX_DEPTH),
            sample_bytes,
            bytes_left: 0,
            rng: seed | 1,
            frame_ids: FxMap::default(),
            frames: Vec::new(),
            site_ids: FxMap::default(),
            sites: Vec::new(),
            live: FxMap::default(),
            maybe: vec![0u64; FILTER_BITS / 64].into_boxed_slice(),
        };
        if sample_bytes > 0 {
            rec.bytes_left = rec.next_interval();
        }
        rec
    }

    /// An exponentially distributed number of bytes with mean `sample_bytes` (at least 1).
    fn next_interval(&mut self) -> i64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        let bits = x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11; // 53 random bits
        let u = (bits as f64 + 1.0) / (1u64 << 53) as f64; // in (0, 1]
        ((-u.ln() * self.sample_bytes as f64) as i64).max(1)
    }

    /// Whether a new block of `size` bytes is to be recorded: always without sampling; with
    /// sampling, when one of the sample points of the byte stream falls in it (each byte is a
    /// point with probability 1/N, gaps drawn from the exponential distribution).
    #[inline]
    pub fn sample(&mut self, size: usize) -> bool {
        if self.sample_bytes == 0 {
            return true;
        }
        self.bytes_left -= size as i64;
        if self.bytes_left > 0 {
            return false;
        }
        // Memoryless: the next point is an exponential draw past the end of this block.
        self.bytes_left = self.next_interval();
        true
    }

    /// How many blocks one recorded block of `size` bytes stands for: 1 without sampling, else
    /// 1 / P(sampled) = 1 / (1 - exp(-size / N)).
    pub fn weight(sample_bytes: u64, size: usize) -> f64 {
        if sample_bytes == 0 {
            return 1.0;
        }
        let p = -(-(size as f64) / sample_bytes as f64).exp_m1();
        if p > 0.0 {
            1.0 / p
        } else {
            sample_bytes as f64
        }
    }

    fn special_site(&mut self, label: &str) -> u32 {
        let frame = match self
            .frames
            .iter()
            .position(|f| f.what == b'?' && &*f.src == label)
        {
            Some(i) => i as u32,
            None => {
                self.frames.push(Frame::special(label));
                (self.frames.len() - 1) as u32
            }
        };
        self.site_id(&[frame])
    }

    /// The id of the site with these frames (leaf first), made if new.
    pub fn site_id(&mut self, frames: &[u32]) -> u32 {
        if let Some(&id) = self.site_ids.get(frames) {
            return id;
        }
        let id = self.sites.len() as u32;
        self.sites.push(frames.into());
        self.site_ids.insert(frames.into(), id);
        id
    }

    /// The id of the frame `ar` describes.
    ///
    /// # Safety
    /// `ar` was filled by `lua_getinfo` with `S` and `l` (and `n` where asked): its `source`,
    /// `name` and `short_src` are valid C strings or null.
    unsafe fn frame_id(&mut self, ar: &ffi::lua_Debug) -> u32 {
        let key = FrameKey {
            source: ar.source as usize,
            name: ar.name as usize,
            defined: ar.linedefined,
            line: ar.currentline,
        };
        // SAFETY: `short_src` is NUL-terminated by lua_getinfo; `name` is a C string or null.
        let (src, name) = unsafe {
            (
                CStr::from_ptr(ar.short_src.as_ptr()).to_bytes(),
                if ar.name.is_null() {
                    None
                } else {
                    Some(CStr::from_ptr(ar.name).to_bytes())
                },
            )
        };
        if let Some(&id) = self.frame_ids.get(&key) {
            let f = &self.frames[id as usize];
            if f.src.as_bytes() == src && f.name.as_deref().map(str::as_bytes) == name {
                return id;
            }
        }
        let what = if ar.what.is_null() {
            b'?'
        } else {
            // SAFETY: `what` is a static C string set by lua_getinfo's `S`.
            unsafe { *ar.what as u8 }
        };
        let frame = Frame {
            src: String::from_utf8_lossy(src).into(),
            line: ar.currentline,
            defined: ar.linedefined,
            name: name.map(|n| String::from_utf8_lossy(n).into()),
            what: if what == b'm' || what == b'C' {
                what
            } else {
                b'L'
            },
        };
        let id = self.frames.len() as u32;
        self.frames.push(frame);
        self.frame_ids.insert(key, id);
        id
    }

    /// Records the new block `addr` of `size` bytes made at `site`.
    #[inline]
    pub fn insert(&mut self, addr: usize, size: usize, site: u32) {
        let bit = filter_bit(addr);
        self.maybe[bit / 64] |= 1 << (bit % 64);
        self.live.insert(addr, LiveBlock { size, site });
    }

    /// Whether `addr` may be recorded (false: surely not).
    #[inline(always)]
    fn may_have(&self, addr: usize) -> bool {
        let bit = filter_bit(addr);
        self.maybe[bit / 64] & (1 << (bit % 64)) != 0
    }

    /// Forgets the block `addr` (freed).
    #[inline]
    pub fn remove(&mut self, addr: usize) -> Option<LiveBlock> {
        if !self.may_have(addr) {
            return None;
        }
        self.live.remove(&addr)
    }

    /// The block `old` is now `new`, of `size` bytes: its record (if any) follows.
    #[inline]
    pub fn moved(&mut self, old: usize, new: usize, size: usize) {
        if !self.may_have(old) {
            return;
        }
        if old == new {
            if let Some(b) = self.live.get_mut(&old) {
                b.size = size;
            }
        } else if let Some(b) = self.live.remove(&old) {
            self.insert(new, size, b.site);
        }
    }

    /// Recorded live blocks.
    pub fn live(&self) -> &FxMap<usize, LiveBlock> {
        &self.live
    }

    /// Live bytes and blocks by site, estimated (scaled up) when sampling.
    pub fn snapshot(&self) -> Snapshot {
        let mut totals: FxMap<u32, (f64, f64)> = FxMap::default();
        for b in self.live.values() {
            let w = Recorder::weight(self.sample_bytes, b.size);
            let t = totals.entry(b.site).or_insert((0.0, 0.0));
            t.0 += w * b.size as f64;
            t.1 += w;
        }
        let mut sites: Vec<SiteTotal> = totals
            .into_iter()
            .map(|(site, (bytes, blocks))| SiteTotal {
                frames: self.sites[site as usize].clone(),
                bytes,
                blocks,
            })
            .collect();
        sites.sort_by(|a, b| a.frames.cmp(&b.frames));
        Snapshot {
            frames: self.frames.clone(),
            sites,
            sample_bytes: self.sample_bytes,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots

/// The live bytes and blocks of one site in a snapshot.
#[derive(Clone, Debug)]
pub struct SiteTotal {
    /// Frame ids, leaf first.
    pub frames: Box<[u32]>,
    pub bytes: f64,
    pub blocks: f64,
}

/// What `mem.trace.snapshot()` returns: a copy, unaffected by later recording or `stop`.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub frames: Vec<Frame>,
    pub sites: Vec<SiteTotal>,
    pub sample_bytes: u64,
}

/// How `top` groups sites.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Key {
    Line,
    Function,
    Traceback,
}

/// One row of `top`.
#[derive(Clone, Debug, PartialEq)]
pub struct Stat {
    pub site: String,
    pub traceback: Vec<String>,
    pub bytes: f64,
    pub blocks: f64,
}

impl Snapshot {
    fn frame(&self, id: u32) -> &Frame {
        &self.frames[id as usize]
    }

    /// Live bytes and blocks grouped by `key`, biggest first (then most blocks, then by name).
    pub fn top(&self, key: Key) -> Vec<Stat> {
        let mut groups: HashMap<String, Stat> = HashMap::new();
        for s in &self.sites {
            // The line and function keys name the innermost Lua frame (a string made by
            // `string.rep` belongs to the Lua line that called it), the traceback every frame.
            let leaf = s
                .frames
                .iter()
                .map(|&f| self.frame(f))
                .find(|f| f.what == b'L' || f.what == b'm')
                .unwrap_or_else(|| self.frame(s.frames[0]));
            let (site, traceback) = match key {
                Key::Line => (leaf.line_label(), Vec::new()),
                Key::Function => (leaf.function_label(), Vec::new()),
                Key::Traceback => {
                    let tb: Vec<String> = s
                        .frames
                        .iter()
                        .map(|&f| self.frame(f).traceback_label())
                        .collect();
                    (tb.join(" <- "), tb)
                }
            };
            let g = groups.entry(site.clone()).or_insert(Stat {
                site,
                traceback,
                bytes: 0.0,
                blocks: 0.0,
            });
            g.bytes += s.bytes;
            g.blocks += s.blocks;
        }
        let mut stats: Vec<Stat> = groups.into_values().collect();
        stats.sort_by(|a, b| {
            b.bytes
                .total_cmp(&a.bytes)
                .then(b.blocks.total_cmp(&a.blocks))
                .then(a.site.cmp(&b.site))
        });
        stats
    }

    /// Folded stacks (`root;...;leaf bytes`), one line per stack, sorted.
    pub fn folded(&self) -> Vec<String> {
        let mut lines: HashMap<String, f64> = HashMap::new();
        for s in &self.sites {
            let stack: Vec<String> = s
                .frames
                .iter()
                .rev()
                .map(|&f| self.frame(f).folded_label())
                .collect();
            *lines.entry(stack.join(";")).or_insert(0.0) += s.bytes;
        }
        let mut out: Vec<String> = lines
            .into_iter()
            .filter(|(_, bytes)| bytes.round() >= 1.0)
            .map(|(stack, bytes)| format!("{stack} {}", bytes.round() as u64))
            .collect();
        out.sort();
        out
    }

    /// Writes the folded stacks to `path`.
    pub fn dump(&self, path: &str) -> std::io::Result<()> {
        let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
        for line in self.folded() {
            writeln!(file, "{line}")?;
        }
        file.flush()
    }

    /// Writes an interactive SVG flame graph of live bytes by stack to `path`.
    pub fn flamegraph(&self, path: &str, title: &str) -> std::io::Result<()> {
        let lines = self.folded();
        if lines.is_empty() {
            return Err(std::io::Error::other("no live traced allocation to draw"));
        }
        let mut opts = inferno::flamegraph::Options::default();
        opts.title = title.to_string();
        opts.count_name = if self.sample_bytes > 0 {
            "bytes (estimated)".into()
        } else {
            "bytes".into()
        };
        opts.name_type = "Lua:".into();
        opts.colors = inferno::flamegraph::color::Palette::Basic(
            inferno::flamegraph::color::BasicPalette::Mem,
        );
        let file = std::io::BufWriter::new(std::fs::File::create(path)?);
        inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), file)
    }
}

// ---------------------------------------------------------------------------------------------
// The tracer in the tracker

/// The tracing state of one Lua state (a field of [`Tracker`]).
pub struct Trace {
    /// Whether allocations are recorded (the traced hook is installed while it is set).
    pub on: Cell<bool>,
    /// The thread whose stack is read (see the module doc). Invariant while `on`: null or a
    /// live thread of the state (a thread whose block is freed is replaced by `main`).
    running: Cell<*mut lua_State>,
    /// The main thread if known (always on 5.2+), else null.
    main: Cell<*mut lua_State>,
    /// Set while the recorder is borrowed (see [`Busy`]): the hook leaves it alone then.
    busy: Cell<bool>,
    /// Set while the tracer builds its own Lua objects (snapshots, `top` lists): new blocks are
    /// not recorded then. (Reset by the next such call if a memory error skipped the reset.)
    paused: Cell<bool>,
    /// Some while `on`.
    recorder: UnsafeCell<Option<Box<Recorder>>>,
}

impl Default for Trace {
    fn default() -> Trace {
        Trace {
            on: Cell::new(false),
            running: Cell::new(ptr::null_mut()),
            main: Cell::new(ptr::null_mut()),
            busy: Cell::new(false),
            paused: Cell::new(false),
            recorder: UnsafeCell::new(None),
        }
    }
}

/// Re-entrancy guard: while one is alive, new blocks are not recorded and the recorder is not
/// touched by the hook. Must be held whenever the tracer calls into Lua or borrows the
/// recorder; `Drop` clears the flag even if what it guards panics.
struct Busy<'a>(&'a Cell<bool>);

impl<'a> Busy<'a> {
    fn enter(flag: &'a Cell<bool>) -> Option<Busy<'a>> {
        if flag.replace(true) {
            None
        } else {
            Some(Busy(flag))
        }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

impl Trace {
    /// The resume machinery says `L` runs now.
    #[inline]
    pub fn set_running(&self, L: *mut lua_State) {
        self.running.set(L);
    }

    /// The recorder, while `busy` is held.
    #[allow(clippy::mut_from_ref)]
    fn recorder(&self, _busy: &Busy<'_>) -> Option<&mut Recorder> {
        // SAFETY: the recorder is only reached through `Busy`, which one holder at a time has
        // (the state is single-threaded and the flag refuses a second one).
        unsafe { (*self.recorder.get()).as_deref_mut() }
    }

    fn start(&self, L: *mut lua_State, main: *mut lua_State, depth: usize, sample_bytes: u64) {
        let Some(busy) = Busy::enter(&self.busy) else {
            return;
        };
        let seed = (L as u64)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
        let rec = Box::new(Recorder::new(depth, sample_bytes, seed));
        // SAFETY: held `busy`: nobody else touches the recorder.
        unsafe { *self.recorder.get() = Some(rec) };
        drop(busy);
        self.running.set(L);
        self.main.set(main);
        self.on.set(true);
    }

    fn stop(&self) {
        self.on.set(false);
        let Some(_busy) = Busy::enter(&self.busy) else {
            return;
        };
        // SAFETY: held `busy`.
        drop(unsafe { (*self.recorder.get()).take() });
    }

    /// Reads the stack of the running thread and returns its site.
    ///
    /// # Safety
    /// Called from the hook for a new block, with `busy` held; `running` per its invariant.
    unsafe fn capture(&self, rec: &mut Recorder, vm: Vm) -> u32 {
        // LuaJIT: only the interpreter and C functions keep frames a reader can follow; the
        // running thread is the VM's own idea of it (see `crate::luajit`).
        #[cfg(feature = "luajit")]
        let L = {
            use crate::luajit::Doing;
            let Some(vm) = vm else {
                return rec.special_site("(unknown LuaJIT layout)");
            };
            match vm.doing() {
                Doing::Running => vm.current_thread(),
                Doing::Collecting => return rec.special_site("(garbage collector)"),
                Doing::Compiled => return rec.special_site("(JIT-compiled code)"),
                Doing::Compiling => return rec.special_site("(JIT compiler)"),
            }
        };
        #[cfg(not(feature = "luajit"))]
        let L = {
            #[allow(clippy::let_unit_value)]
            let () = vm;
            self.running.get()
        };
        if L.is_null() {
            return rec.special_site("(unknown thread)");
        }
        const WHAT: &CStr = if cfg!(feature = "lua51") {
            c"Sl"
        } else {
            c"Sln"
        };
        let mut ids = [0u32; MAX_DEPTH];
        let mut n = 0;
        let mut level = 0;
        // SAFETY: lua_Debug is plain data; zero is a valid starting value.
        let mut ar: ffi::lua_Debug = unsafe { mem::zeroed() };
        while n < rec.depth {
            // SAFETY: `L` is a live thread (invariant of `running`, or LuaJIT's current one);
            // neither call allocates nor calls into Lua with these options (see the module
            // doc); on LuaJIT a frame whose function slot holds no function (a fast function
            // that wrote a result there) is skipped, not read.
            unsafe {
                if ffi::lua_getstack(L, level, &mut ar) == 0 {
                    break;
                }
                level += 1;
                #[cfg(feature = "luajit")]
                if !crate::luajit::frame_has_function(L, &ar) {
                    continue;
                }
                if ffi::lua_getinfo(L, WHAT.as_ptr(), &mut ar) == 0 {
                    break;
                }
                ar.name = if cfg!(feature = "lua51") {
                    ptr::null()
                } else {
                    ar.name
                };
                ids[n] = rec.frame_id(&ar);
            }
            n += 1;
        }
        if n == 0 {
            return rec.special_site("(no Lua frame)");
        }
        rec.site_id(&ids[..n])
    }

    /// Before the hook serves a new block of `nsize` bytes: its site, if it is to be recorded.
    ///
    /// # Safety
    /// Called from the hook, before the block is served.
    unsafe fn before_new(&self, nsize: usize, vm: Vm) -> Option<u32> {
        if self.paused.get() {
            return None;
        }
        let busy = Busy::enter(&self.busy)?;
        let rec = self.recorder(&busy)?;
        if !rec.sample(nsize) {
            return None;
        }
        // SAFETY: forwarded.
        Some(unsafe { self.capture(rec, vm) })
    }

    fn after_new(&self, block: *mut c_void, nsize: usize, site: u32) {
        let Some(busy) = Busy::enter(&self.busy) else {
            return;
        };
        if let Some(rec) = self.recorder(&busy) {
            rec.insert(block as usize, nsize, site);
        }
    }

    /// Before the block `block` of `osize` bytes is freed.
    fn before_free(&self, block: *mut c_void, osize: usize) {
        let running = self.running.get() as usize;
        if running.wrapping_sub(block as usize) < osize {
            self.running.set(self.main.get());
        }
        let Some(busy) = Busy::enter(&self.busy) else {
            return;
        };
        if let Some(rec) = self.recorder(&busy) {
            rec.remove(block as usize);
        }
    }

    fn after_move(&self, old: *mut c_void, new: *mut c_void, nsize: usize) {
        let Some(busy) = Busy::enter(&self.busy) else {
            return;
        };
        if let Some(rec) = self.recorder(&busy) {
            rec.moved(old as usize, new as usize, nsize);
        }
    }
}

/// The hook while tracing: the untraced hook ([`crate::hook::counted`]) plus the records.
/// Called by the traced hooks, which `mem.trace.start` installs in place of the plain ones.
///
/// # Safety
/// As for the hook: `ud` is the live tracker `t`, and the call follows the `lua_Alloc` contract.
#[cold]
#[inline(never)]
pub unsafe fn traced<const MIMALLOC: bool>(
    t: &Tracker,
    ud: *mut c_void,
    block: *mut c_void,
    osize: usize,
    nsize: usize,
    caller: usize,
) -> *mut c_void {
    // (lauxlib's string buffers are not Lua's memory: not recorded, see `crate::auxbuf`)
    #[cfg(aux_buffers)]
    if (block.is_null() && osize == 0 && t.aux.is_buffer_site(caller, nsize))
        || t.aux.is_live_buffer(block)
    {
        // SAFETY: forwarded contract.
        return unsafe { crate::hook::counted::<MIMALLOC>(t, ud, block, osize, nsize, caller) };
    }
    // SAFETY: forwarded contract. The stack is read before the block is served, the records
    // are updated after; a free may end the tracker, so its record goes first.
    unsafe {
        if block.is_null() {
            #[cfg(feature = "luajit")]
            let vm = t.vm.get();
            #[cfg(not(feature = "luajit"))]
            let vm = ();
            let site = if nsize > 0 {
                t.trace.before_new(nsize, vm)
            } else {
                None
            };
            let result = crate::hook::counted::<MIMALLOC>(t, ud, block, osize, nsize, caller);
            if let (Some(site), false) = (site, result.is_null()) {
                t.trace.after_new(result, nsize, site);
            }
            return result;
        }
        if nsize == 0 {
            t.trace.before_free(block, osize);
            return crate::hook::counted::<MIMALLOC>(t, ud, block, osize, nsize, caller);
        }
        let result = crate::hook::counted::<MIMALLOC>(t, ud, block, osize, nsize, caller);
        if !result.is_null() {
            t.trace.after_move(block, result, nsize);
        }
        result
    }
}

// ---------------------------------------------------------------------------------------------
// The Lua side (`core.trace_*`, wrapped by `mem.trace` in src/lua/mem.lua, which checks the
// arguments). None of these raises: failures return `nil, message`.

/// # Safety
/// `L` valid.
unsafe fn tracker_of<'a>(L: *mut lua_State) -> Option<&'a Tracker> {
    // SAFETY: valid state.
    unsafe { state::tracker(L) }
}

/// # Safety
/// `L` valid with a free slot.
unsafe fn push_str(L: *mut lua_State, s: &str) {
    // SAFETY: Lua copies the bytes.
    unsafe { ffi::lua_pushlstring(L, s.as_ptr() as *const c_char, s.len()) };
}

/// # Safety
/// `L` valid with 2 free slots; pushes `nil, msg` and returns 2.
unsafe fn fail(L: *mut lua_State, msg: &str) -> c_int {
    // SAFETY: valid state.
    unsafe {
        ffi::lua_pushnil(L);
        push_str(L, msg);
    }
    2
}

/// The main thread of `L`'s state if it can be known.
///
/// # Safety
/// `L` valid with 2 free slots.
unsafe fn main_thread(L: *mut lua_State) -> *mut lua_State {
    // SAFETY: valid state; pushes one value and pops it.
    unsafe {
        #[cfg(any(feature = "lua51", feature = "luajit"))]
        {
            let is_main = ffi::lua_pushthread(L) == 1;
            ffi::lua_pop(L, 1);
            if is_main {
                L
            } else {
                ptr::null_mut()
            }
        }
        #[cfg(not(any(feature = "lua51", feature = "luajit")))]
        {
            ffi::lua_rawgeti(L, ffi::LUA_REGISTRYINDEX, ffi::LUA_RIDX_MAINTHREAD);
            let main = ffi::lua_tothread(L, -1);
            ffi::lua_pop(L, 1);
            main
        }
    }
}

/// `core.trace_start(depth, sample_bytes)`: true, or false if tracing was on already.
unsafe extern "C-unwind" fn l_start(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua with two integers (checked by mem.lua).
    unsafe {
        let Some(t) = tracker_of(L) else {
            return fail(L, "lunet.mem: the tracking allocator is not installed");
        };
        if t.trace.on.get() {
            ffi::lua_pushboolean(L, 0);
            return 1;
        }
        let depth = ffi::lua_tointeger(L, 1).clamp(1, MAX_DEPTH as _) as usize;
        let sample = ffi::lua_tointeger(L, 2).max(0) as u64;
        #[cfg(feature = "luajit")]
        if t.vm.get().is_none() {
            return fail(
                L,
                "mem.trace cannot read this LuaJIT's stacks safely (unknown internal layout)",
            );
        }
        let main = main_thread(L);
        t.trace.paused.set(false);
        t.trace.start(L, main, depth, sample);
        crate::state::set_traced(L, true);
        ffi::lua_pushboolean(L, 1);
        1
    }
}

/// `core.trace_stop()`: ends recording and drops the records.
unsafe extern "C-unwind" fn l_stop(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        if let Some(t) = tracker_of(L) {
            crate::state::set_traced(L, false);
            t.trace.stop();
        }
    }
    0
}

/// `core.trace_is_on()`.
unsafe extern "C-unwind" fn l_is_on(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let on = tracker_of(L).is_some_and(|t| t.trace.on.get());
        ffi::lua_pushboolean(L, on as c_int);
    }
    1
}

/// `core.trace_snapshot()`: a snapshot userdata, or `nil, msg` when not tracing.
unsafe extern "C-unwind" fn l_snapshot(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua. The snapshot is built (Rust memory) while `busy` is held, which
    // ends before anything can raise; the userdata's own allocation is not recorded (`paused`).
    unsafe {
        let Some(t) = tracker_of(L) else {
            return fail(L, "lunet.mem: the tracking allocator is not installed");
        };
        if !t.trace.on.get() {
            return fail(L, "not tracing (call mem.trace.start() first)");
        }
        let ready = match Busy::enter(&t.trace.busy) {
            Some(busy) => t.trace.recorder(&busy).is_some(),
            None => false,
        };
        if !ready {
            return fail(L, "the tracer is busy");
        }
        t.trace.paused.set(true);
        // (the snapshot is made once its userdata exists: nothing is lost if that raises)
        crate::udata::push(L, || {
            let busy = Busy::enter(&t.trace.busy).expect("not busy: checked above");
            t.trace.recorder(&busy).expect("checked above").snapshot()
        });
        t.trace.paused.set(false);
    }
    1
}

impl crate::udata::Boxed for Snapshot {
    const METATABLE: &'static CStr = c"lunet.mem.trace_snapshot";
    const NAME: &'static CStr = c"snapshot";
    const TAG: u64 = 0x6c75_6e65_7473_6e31;
}

/// The snapshot at `idx`, if it is one.
///
/// # Safety
/// `L` valid with 2 free slots.
unsafe fn to_snapshot<'a>(L: *mut lua_State, idx: c_int) -> Option<&'a Snapshot> {
    // SAFETY: forwarded contract.
    unsafe { crate::udata::test::<Snapshot>(L, idx).map(|s| &*s) }
}

/// `core.trace_is_snapshot(v)`.
unsafe extern "C-unwind" fn l_is_snapshot(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let is = to_snapshot(L, 1).is_some();
        ffi::lua_pushboolean(L, is as c_int);
    }
    1
}

/// `core.trace_top(snap, n, key)`: a list of `{site=, bytes=, blocks=}` (and `traceback=` for
/// the traceback key), biggest first, at most `n` (n < 0: all).
unsafe extern "C-unwind" fn l_top(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua with a snapshot, an integer and "line" | "function" | "traceback"
    // (checked by mem.lua). Rust values are dropped before anything that can raise.
    unsafe {
        let Some(snap) = to_snapshot(L, 1) else {
            return fail(L, "snapshot expected");
        };
        let n = ffi::lua_tointeger(L, 2);
        let mut len = 0;
        let key = ffi::lua_tolstring(L, 3, &mut len);
        let key = if key.is_null() {
            Key::Line
        } else {
            match std::slice::from_raw_parts(key as *const u8, len) {
                b"function" => Key::Function,
                b"traceback" => Key::Traceback,
                _ => Key::Line,
            }
        };
        let mut stats = snap.top(key);
        if n >= 0 && (n as usize) < stats.len() {
            stats.truncate(n as usize);
        }
        // Built in protected mode: a memory error is raised once `stats` is dropped.
        let tracker = tracker_of(L);
        if let Some(t) = tracker {
            t.trace.paused.set(true);
        }
        let ok = crate::lua_api::protected(L, &mut || push_stats(L, &stats, key));
        if let Some(t) = tracker {
            t.trace.paused.set(false);
        }
        drop(stats);
        if !ok {
            ffi::lua_error(L);
        }
    }
    1
}

/// Pushes the list `l_top` returns.
///
/// # Safety
/// `L` valid with 3 free slots. May raise (memory).
unsafe fn push_stats(L: *mut lua_State, stats: &[Stat], key: Key) {
    // SAFETY: valid state.
    unsafe {
        ffi::luaL_checkstack(L, 6, ptr::null());
        ffi::lua_createtable(L, stats.len() as c_int, 0);
        for (i, s) in stats.iter().enumerate() {
            ffi::lua_createtable(L, 0, 4);
            push_str(L, &s.site);
            ffi::lua_setfield(L, -2, c"site".as_ptr());
            ffi::lua_pushinteger(L, s.bytes.round() as ffi::lua_Integer);
            ffi::lua_setfield(L, -2, c"bytes".as_ptr());
            ffi::lua_pushinteger(L, s.blocks.round() as ffi::lua_Integer);
            ffi::lua_setfield(L, -2, c"blocks".as_ptr());
            if key == Key::Traceback {
                ffi::lua_createtable(L, s.traceback.len() as c_int, 0);
                for (j, f) in s.traceback.iter().enumerate() {
                    push_str(L, f);
                    ffi::lua_rawseti(L, -2, (j + 1) as _);
                }
                ffi::lua_setfield(L, -2, c"traceback".as_ptr());
            }
            ffi::lua_rawseti(L, -2, (i + 1) as _);
        }
    }
}

/// `core.trace_dump(snap, path)` / `core.trace_flamegraph(snap, path, title)`: true, or
/// `nil, msg`.
unsafe fn write_out(L: *mut lua_State, flame: bool) -> c_int {
    // SAFETY: called by Lua with a snapshot and strings (checked by mem.lua); the Rust strings
    // are dropped before anything can raise.
    unsafe {
        let Some(snap) = to_snapshot(L, 1) else {
            return fail(L, "snapshot expected");
        };
        let path = lua_str(L, 2);
        let result = if flame {
            let title = lua_str(L, 3);
            let title = if title.is_empty() {
                "Live bytes by Lua stack".to_string()
            } else {
                title
            };
            snap.flamegraph(&path, &title)
        } else {
            snap.dump(&path)
        };
        let error = result.err().map(|e| format!("{path}: {e}"));
        drop(path);
        match error {
            None => {
                ffi::lua_pushboolean(L, 1);
                1
            }
            Some(msg) => {
                // (a memory error is raised once `msg` is dropped)
                let ok = crate::lua_api::protected(L, &mut || push_str(L, &msg));
                drop(msg);
                if !ok {
                    ffi::lua_error(L);
                }
                ffi::lua_pushnil(L);
                ffi::lua_insert(L, -2);
                2
            }
        }
    }
}

/// # Safety
/// `L` valid, `idx` acceptable.
unsafe fn lua_str(L: *mut lua_State, idx: c_int) -> String {
    // SAFETY: valid state; only real strings are read.
    unsafe {
        if ffi::lua_type(L, idx) != ffi::LUA_TSTRING {
            return String::new();
        }
        let mut len = 0;
        let s = ffi::lua_tolstring(L, idx, &mut len);
        String::from_utf8_lossy(std::slice::from_raw_parts(s as *const u8, len)).into_owned()
    }
}

unsafe extern "C-unwind" fn l_dump(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe { write_out(L, false) }
}

unsafe extern "C-unwind" fn l_flamegraph(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe { write_out(L, true) }
}

impl Recorder {
    /// The line that made the recorded live block at `addr` (its innermost Lua frame), if any.
    fn line_of(&self, addr: usize) -> Option<String> {
        let block = self.live.get(&addr)?;
        let frames = &self.sites[block.site as usize];
        let leaf = frames
            .iter()
            .map(|&f| &self.frames[f as usize])
            .find(|f| f.what == b'L' || f.what == b'm')
            .or_else(|| frames.first().map(|&f| &self.frames[f as usize]))?;
        // (Lua 5.1 may not have saved the pc of a frame yet: no line to tell)
        (leaf.what == b'C' || leaf.line >= 0).then(|| leaf.line_label())
    }
}

/// `core.trace_site_of(v)`: the line that allocated the object `v` (a table, function or
/// thread: `lua_topointer` gives their block), if tracing recorded it; else nil. The leak report
/// uses it to name the allocating line of what a leaking function left alive.
unsafe extern "C-unwind" fn l_site_of(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; only the recorder's map is read, under `busy`.
    unsafe {
        let addr = match ffi::lua_type(L, 1) {
            ffi::LUA_TTABLE | ffi::LUA_TFUNCTION | ffi::LUA_TTHREAD => {
                ffi::lua_topointer(L, 1) as usize
            }
            _ => 0,
        };
        let line = match tracker_of(L) {
            Some(t) if addr != 0 && t.trace.on.get() => match Busy::enter(&t.trace.busy) {
                Some(busy) => t.trace.recorder(&busy).and_then(|rec| rec.line_of(addr)),
                None => None,
            },
            _ => None,
        };
        match line {
            // (a memory error while the string is made is raised once `line` is dropped)
            Some(line) => {
                let ok = crate::lua_api::protected(L, &mut || push_str(L, &line));
                drop(line);
                if !ok {
                    ffi::lua_error(L);
                }
            }
            None => ffi::lua_pushnil(L),
        }
    }
    1
}

/// Adds the `trace_*` functions and `trace_snapshot_mt` to the `core` table on top of the stack.
///
/// # Safety
/// `L` valid with 4 free slots, the core table on top. May raise (memory).
pub unsafe fn push_functions(L: *mut lua_State) {
    // SAFETY: valid state, table on top.
    unsafe {
        let functions: [(&CStr, ffi::lua_CFunction); 9] = [
            (c"trace_site_of", l_site_of),
            (c"trace_start", l_start),
            (c"trace_stop", l_stop),
            (c"trace_is_on", l_is_on),
            (c"trace_snapshot", l_snapshot),
            (c"trace_is_snapshot", l_is_snapshot),
            (c"trace_top", l_top),
            (c"trace_dump", l_dump),
            (c"trace_flamegraph", l_flamegraph),
        ];
        for (name, f) in functions {
            ffi::lua_pushcfunction(L, f);
            ffi::lua_setfield(L, -2, name.as_ptr());
        }
        crate::udata::new_metatable::<Snapshot>(L);
        ffi::lua_setfield(L, -2, c"trace_snapshot_mt".as_ptr());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(usize, u32),
        Free(usize),
        Realloc(usize, usize, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let addr = (1usize..64).prop_map(|a| a * 16);
        prop_oneof![
            (addr.clone(), 0u32..4).prop_map(|(a, s)| Op::Alloc(a, s)),
            addr.clone().prop_map(Op::Free),
            (addr.clone(), addr, 1usize..512).prop_map(|(a, b, n)| Op::Realloc(a, b, n)),
        ]
    }

    proptest! {
        /// The live map holds exactly the blocks a simple model says are live, with their
        /// latest size and their first site, whatever the sequence of allocations, frees and
        /// (moving) reallocations.
        #[test]
        fn live_map_matches_the_model(ops in proptest::collection::vec(op(), 0..200)) {
            let mut rec = Recorder::new(8, 0, 1);
            let mut model: HashMap<usize, LiveBlock> = HashMap::new();
            for op in ops {
                match op {
                    Op::Alloc(a, site) => {
                        if model.contains_key(&a) { continue; } // an address is live once
                        rec.insert(a, 32, site);
                        model.insert(a, LiveBlock { size: 32, site });
                    }
                    Op::Free(a) => {
                        prop_assert_eq!(rec.remove(a), model.remove(&a));
                    }
                    Op::Realloc(a, b, n) => {
                        if a != b && model.contains_key(&b) { continue; }
                        rec.moved(a, b, n);
                        if let Some(old) = model.remove(&a) {
                            model.insert(b, LiveBlock { size: n, site: old.site });
                        }
                    }
                }
            }
            let got: HashMap<usize, LiveBlock> = rec.live().iter().map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(got, model);
        }
    }

    #[test]
    fn exact_mode_records_every_allocation() {
        let mut rec = Recorder::new(8, 0, 1);
        assert!((0..1000).all(|_| rec.sample(1)));
        assert_eq!(Recorder::weight(0, 100), 1.0);
    }

    #[test]
    fn sampling_estimates_are_unbiased() {
        // 200k blocks of 64 bytes, sampled every 4096 bytes on average: the scaled estimate is
        // within 5% of the truth.
        let n = 200_000usize;
        let mut rec = Recorder::new(8, 4096, 12345);
        let site = rec.special_site("x");
        for i in 0..n {
            if rec.sample(64) {
                rec.insert(i * 16 + 16, 64, site);
            }
        }
        let snap = rec.snapshot();
        let bytes = snap.sites[0].bytes;
        let truth = (n * 64) as f64;
        assert!((bytes - truth).abs() / truth < 0.05, "{bytes} vs {truth}");
    }

    #[test]
    fn top_groups_and_sorts() {
        let mut rec = Recorder::new(8, 0, 1);
        rec.frames.push(Frame {
            src: "a.lua".into(),
            line: 3,
            defined: 1,
            name: Some("f".into()),
            what: b'L',
        });
        rec.frames.push(Frame {
            src: "a.lua".into(),
            line: 4,
            defined: 1,
            name: Some("f".into()),
            what: b'L',
        });
        rec.frames.push(Frame {
            src: "a.lua".into(),
            line: 9,
            defined: 0,
            name: None,
            what: b'm',
        });
        let s1 = rec.site_id(&[0, 2]);
        let s2 = rec.site_id(&[1, 2]);
        rec.insert(16, 100, s1);
        rec.insert(32, 300, s2);
        rec.insert(48, 100, s2);
        let snap = rec.snapshot();
        let lines = snap.top(Key::Line);
        assert_eq!(lines[0].site, "a.lua:4");
        assert_eq!((lines[0].bytes, lines[0].blocks), (400.0, 2.0));
        assert_eq!(lines[1].site, "a.lua:3");
        let funcs = snap.top(Key::Function);
        assert_eq!(funcs.len(), 1);
        assert_eq!(funcs[0].site, "f (a.lua:1)");
        assert_eq!(funcs[0].bytes, 500.0);
        let tb = snap.top(Key::Traceback);
        assert_eq!(
            tb[0].site,
            "a.lua:4 in f (a.lua:1) <- a.lua:9 in main chunk (a.lua)"
        );
        assert_eq!(
            snap.folded(),
            vec![
                "main chunk (a.lua:9);f (a.lua:3) 100".to_string(),
                "main chunk (a.lua:9);f (a.lua:4) 400".to_string(),
            ]
        );
    }
}
