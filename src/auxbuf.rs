//! lauxlib's string buffers: memory that C code allocates through `lua_getallocf`, which Lua's
//! own count leaves out.
//!
//! From Lua 5.3 on, a `luaL_Buffer` that outgrows its space on the C stack moves into a "box": a
//! userdata (Lua's, counted) whose contents lauxlib allocates, grows and frees by calling the
//! state's allocator itself (`lua_getallocf`), not through Lua's memory manager. So
//! `collectgarbage("count")` omits those blocks, and a tracker that counted them in `live_bytes`
//! would disagree with Lua inside a `string.gsub` callback, or after an error abandons a buffer
//! until the collector frees its box. `live_bytes` is Lua's count; these blocks are counted apart
//! (`buffer_bytes`, `buffer_blocks`), outside scopes, budgets and arenas.
//!
//! They are told apart by who calls: the allocator's entry passes the address its caller returns
//! to (the hook's entries, in `crate::state`), and the places in lauxlib that make a box are
//! learnt when the module is opened ([`calibrate`]: each lauxlib function that can make one is
//! called once with a size nothing else asks for). A box's later resizes and its free are known
//! by its address. The hook serves a box's calls and reports them here ([`AuxBuffers::served`]).
//!
//! Lua 5.5: `luaL_pushresult` hands a box's block over to Lua as the body of an external string
//! (`lua_pushexternalstring`, with the state's allocator as the string's own to free it): only
//! the string's header is Lua's memory. The body is counted apart too (`external_bytes`,
//! `external_blocks`) from the handover (`luaL_pushresult` shrinks the box to its content:
//! lauxlib shrinks a box nowhere else) until the collector frees it through the allocator, from
//! the place in the collector that the calibration learns (its own strings are collected
//! once). A body handed over at exactly its box's size (no shrink to see) stays counted as a
//! buffer until it is freed.

use std::cell::{Cell, UnsafeCell};
use std::ffi::{c_char, c_int, c_void};

use mlua::ffi::{self, lua_State};

/// How many places in lauxlib that make a box are remembered.
const SITES: usize = 6;
/// The buffer size the calibration asks for: larger than every `LUAL_BUFFERSIZE`, and one no
/// other allocation of the calibration has.
const CALIBRATION_SIZE: usize = 20011;
/// An empty site slot (no return address is `usize::MAX`).
const NO_SITE: usize = usize::MAX;

/// The boxes of one state. Single-threaded, like the state.
pub struct AuxBuffers {
    /// Return addresses of lauxlib's calls that make a box.
    sites: [Cell<usize>; SITES],
    /// While the module calibrates: new blocks of [`CALIBRATION_SIZE`] are boxes.
    calibrating: Cell<bool>,
    /// Live boxes: address and size.
    live: UnsafeCell<Vec<(usize, usize)>>,
    /// `live.len()`, readable without touching the list.
    live_count: Cell<usize>,
    /// Bytes in live boxes.
    pub bytes: Cell<u64>,
    /// Lua 5.5: external string bodies lauxlib made, by address, with their sizes.
    #[cfg(feature = "lua55")]
    external: UnsafeCell<crate::fxhash::FxMap<usize, usize>>,
    /// `external.len()`, readable without touching the map.
    #[cfg(feature = "lua55")]
    external_count: Cell<usize>,
    /// Bytes in external string bodies.
    #[cfg(feature = "lua55")]
    pub external_bytes: Cell<u64>,
    /// Where the collector frees an external string's body.
    #[cfg(feature = "lua55")]
    external_free_site: Cell<usize>,
}

impl Default for AuxBuffers {
    fn default() -> Self {
        AuxBuffers {
            sites: std::array::from_fn(|_| Cell::new(NO_SITE)),
            calibrating: Cell::new(false),
            live: UnsafeCell::new(Vec::new()),
            live_count: Cell::new(0),
            bytes: Cell::new(0),
            #[cfg(feature = "lua55")]
            external: Default::default(),
            #[cfg(feature = "lua55")]
            external_count: Cell::new(0),
            #[cfg(feature = "lua55")]
            external_bytes: Cell::new(0),
            #[cfg(feature = "lua55")]
            external_free_site: Cell::new(NO_SITE),
        }
    }
}

impl AuxBuffers {
    /// Whether a new block of `nsize` bytes asked for by `caller` is a box.
    #[inline(always)]
    pub fn is_buffer_site(&self, caller: usize, nsize: usize) -> bool {
        let s = &self.sites;
        caller == s[0].get()
            || caller == s[1].get()
            || caller == s[2].get()
            || (s[3].get() != NO_SITE && self.is_later_site(caller))
            || (self.calibrating.get()
                && (nsize == CALIBRATION_SIZE || nsize == CALIBRATION_SIZE + 1)
                && self.learn(caller))
    }

    #[cold]
    fn is_later_site(&self, caller: usize) -> bool {
        self.sites[3..].iter().any(|s| s.get() == caller)
    }

    /// Remembers `caller` as a place that makes boxes (calibration).
    #[cold]
    fn learn(&self, caller: usize) -> bool {
        if caller == 0 || caller == NO_SITE {
            return false; // (the entries cannot tell who calls on this target)
        }
        if self.sites.iter().any(|s| s.get() == caller) {
            return true;
        }
        match self.sites.iter().find(|s| s.get() == NO_SITE) {
            Some(slot) => {
                slot.set(caller);
                true
            }
            None => false,
        }
    }

    /// Whether a place that makes boxes is known (calibration ran).
    pub fn calibrated(&self) -> bool {
        self.sites[0].get() != NO_SITE
    }

    /// Whether `block` is a live box (or, on 5.5, an external string body that the collector
    /// frees: `caller` is the hook's caller).
    #[inline(always)]
    pub fn is_live_buffer(&self, block: *mut c_void, caller: usize) -> bool {
        #[cfg(feature = "lua55")]
        if self.external_count.get() != 0
            && (caller == self.external_free_site.get() || self.calibrating.get())
            && self.externals().contains_key(&(block as usize))
        {
            return true;
        }
        let _ = caller;
        self.live_count.get() != 0 && self.index_of(block as usize).is_some()
    }

    /// The number of external string bodies (5.5).
    #[cfg(feature = "lua55")]
    pub fn external_blocks(&self) -> usize {
        self.external_count.get()
    }

    #[cfg(feature = "lua55")]
    #[allow(clippy::mut_from_ref)]
    fn externals(&self) -> &mut crate::fxhash::FxMap<usize, usize> {
        // SAFETY: reached only through these methods, which never call out while holding it.
        unsafe { &mut *self.external.get() }
    }

    /// The number of live boxes.
    pub fn blocks(&self) -> usize {
        self.live_count.get()
    }

    #[allow(clippy::mut_from_ref)]
    fn list(&self) -> &mut Vec<(usize, usize)> {
        // SAFETY: reached only through these methods, which never call out while holding it.
        unsafe { &mut *self.live.get() }
    }

    #[cold]
    fn index_of(&self, addr: usize) -> Option<usize> {
        self.list().iter().position(|&(a, _)| a == addr)
    }

    fn changed(&self) {
        self.live_count.set(self.list().len());
    }

    /// Counts a call of the hook for a box once it is served (by `crate::hook`): a new box
    /// (`block` null), a resize or a free of the live box `block`; `result` is what serving
    /// returned.
    #[inline]
    pub fn served(
        &self,
        block: *mut c_void,
        result: *mut c_void,
        osize: usize,
        nsize: usize,
        caller: usize,
    ) {
        #[cfg(feature = "lua55")]
        if !block.is_null() && self.external_freed(block as usize, nsize, caller) {
            return;
        }
        let _ = caller;
        if block.is_null() {
            if !result.is_null() {
                self.list().push((result as usize, nsize));
                self.bytes.set(self.bytes.get() + nsize as u64);
                self.changed();
            }
            return;
        }
        let Some(i) = self.index_of(block as usize) else {
            return; // (unreachable: the hook checked)
        };
        if nsize == 0 {
            self.list().swap_remove(i);
            self.bytes.set(self.bytes.get() - osize as u64);
            self.changed();
        } else if !result.is_null() {
            self.list()[i] = (result as usize, nsize);
            self.bytes
                .set(self.bytes.get() + nsize as u64 - osize as u64);
            #[cfg(feature = "lua55")]
            self.maybe_handed_over(i, osize, nsize);
        }
    }

    /// 5.5: after a box was resized from `osize` to `nsize`: a shrink (not to 0) is
    /// `luaL_pushresult` fitting the block to its content to hand it over as an external
    /// string's body (lauxlib shrinks a box nowhere else; its calls to the allocator may all
    /// come from one place, so the place cannot tell): the block is that body from now on.
    #[cfg(feature = "lua55")]
    fn maybe_handed_over(&self, i: usize, osize: usize, nsize: usize) {
        if nsize >= osize {
            return;
        }
        let (addr, size) = self.list().swap_remove(i);
        self.bytes.set(self.bytes.get() - size as u64);
        self.changed();
        self.externals().insert(addr, size);
        self.external_count.set(self.externals().len());
        self.external_bytes
            .set(self.external_bytes.get() + size as u64);
    }

    /// 5.5: counts the free of an external string's body by the collector (its place learnt
    /// while calibrating); returns whether `block` was one.
    #[cfg(feature = "lua55")]
    fn external_freed(&self, block: usize, nsize: usize, caller: usize) -> bool {
        if nsize != 0 || self.external_count.get() == 0 {
            return false;
        }
        let Some(size) = self.externals().remove(&block) else {
            return false;
        };
        if self.calibrating.get() && self.external_free_site.get() == NO_SITE {
            self.external_free_site.set(caller);
        }
        self.external_count.set(self.externals().len());
        self.external_bytes
            .set(self.external_bytes.get() - size as u64);
        true
    }
}

/// Lua 5.3+'s `luaL_Buffer`, with more room in `init` than any `LUAL_BUFFERSIZE` lauxlib was
/// built with (it writes at most that much there; the other fields are at the same offsets in
/// every build).
#[repr(C)]
struct Buffer {
    b: *mut c_char,
    size: usize,
    n: usize,
    L: *mut lua_State,
    init: [u64; 8192],
}

extern "C-unwind" {
    fn luaL_buffinit(L: *mut lua_State, b: *mut Buffer);
    fn luaL_buffinitsize(L: *mut lua_State, b: *mut Buffer, sz: usize) -> *mut c_char;
    fn luaL_prepbuffsize(b: *mut Buffer, sz: usize) -> *mut c_char;
    fn luaL_addlstring(b: *mut Buffer, s: *const c_char, l: usize);
    fn luaL_addvalue(b: *mut Buffer);
    fn luaL_pushresult(b: *mut Buffer);
}

/// Learns where lauxlib makes boxes: each of its functions that can make one is called with a
/// buffer of [`CALIBRATION_SIZE`] bytes, in a protected call (a memory error only leaves fewer
/// places known). Called once per state, when the module is opened.
///
/// # Safety
/// `L` valid with 4 free slots, `aux` the boxes of its tracker.
pub unsafe fn calibrate(L: *mut lua_State, aux: &AuxBuffers) {
    static BYTES: [u8; CALIBRATION_SIZE] = [b'x'; CALIBRATION_SIZE];
    unsafe extern "C-unwind" fn run(L: *mut lua_State) -> c_int {
        // SAFETY: called through lua_pcall; the buffer lives in this frame until its result is
        // pushed (the box is a userdata on the stack meanwhile, as lauxlib requires). Nothing
        // here owns Rust memory, so a memory error leaves nothing behind.
        unsafe {
            let bytes = &BYTES;
            let mut buffer = std::mem::MaybeUninit::<Buffer>::uninit();
            let b = buffer.as_mut_ptr();
            luaL_buffinit(L, b);
            luaL_prepbuffsize(b, CALIBRATION_SIZE);
            luaL_pushresult(b);
            luaL_buffinit(L, b);
            luaL_addlstring(b, bytes.as_ptr().cast(), bytes.len());
            luaL_pushresult(b);
            luaL_buffinitsize(L, b, CALIBRATION_SIZE);
            luaL_pushresult(b);
            luaL_buffinit(L, b);
            ffi::lua_pushlstring(L, bytes.as_ptr().cast(), bytes.len());
            luaL_addvalue(b);
            luaL_pushresult(b);
        }
        0
    }
    // SAFETY: a protected call of `run`.
    unsafe {
        aux.calibrating.set(true);
        ffi::lua_pushcfunction(L, run);
        if ffi::lua_pcall(L, 0, 0, 0) != ffi::LUA_OK {
            ffi::lua_pop(L, 1);
        }
        // (5.5: the strings `run` made own their bodies; their collection shows where the
        // collector frees such a body)
        #[cfg(feature = "lua55")]
        if aux.external_count.get() != 0 {
            ffi::lua_gc(L, ffi::LUA_GCCOLLECT);
        }
        aux.calibrating.set(false);
    }
}
