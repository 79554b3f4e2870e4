//! The C functions behind the Lua API (`core` in `src/lua/mem.lua`).
//!
//! They are raw `lua_CFunction`s rather than mlua callbacks because several of them must not
//! allocate before they have read the counters (`stats`, `checkpoint`, `live`), and the
//! coroutine hooks run on every resume. Errors are raised with `lua_error`, which does not unwind
//! Rust frames: every function below raises only when no value with a destructor is alive.

use std::cell::Cell;
use std::ffi::{c_int, c_void, CStr};

use std::ptr;
use std::rc::Rc;

use mlua::ffi::{self, lua_State};

use crate::arena;
use crate::hook::{Tracker, TYPE_SLOTS};
use crate::scope::{Guard, Scope, ThreadScopes};
use crate::state;
use crate::udata;

/// Registry key of the table of functions mem.lua replaced (`coroutine.resume`, ...).
const SAVED_KEY: &CStr = c"lunet.mem.saved";

/// What a checkpoint remembers.
pub struct Checkpoint {
    pub name: Option<String>,
    pub live_bytes: u64,
    pub net_blocks: i64,
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Raises `msg`, prefixed with the position of the calling Lua code (like `luaL_error`).
///
/// # Safety
/// `L` valid; no value with a destructor may be alive in the caller's frames (the error does not
/// unwind them). `msg` is dropped here, before raising.
pub(crate) unsafe fn raise(L: *mut lua_State, msg: &CStr) -> ! {
    // SAFETY: valid state; the message is static, nothing of Rust's is alive.
    unsafe {
        ffi::luaL_where(L, 1);
        ffi::lua_pushstring(L, msg.as_ptr());
        ffi::lua_concat(L, 2);
        ffi::lua_error(L)
    }
}

/// Runs `push` in protected mode: it may raise (a memory error while it builds Lua values from
/// Rust ones it borrows), and the error is caught. Returns true with the one value `push` left
/// on top, or false with the error object on top: the caller then drops what `push` borrowed
/// and raises it with `lua_error`, so that no Rust value is alive when the error propagates.
///
/// # Safety
/// `L` valid with 3 free slots; `push` pushes exactly one value and owns no Rust value itself.
pub(crate) unsafe fn protected(L: *mut lua_State, push: &mut dyn FnMut()) -> bool {
    let mut push = push;
    // SAFETY: a protected call of `protected_trampoline` with a pointer to `push`. The function
    // is taken from the registry, where `push_core` put it: pushing a C function allocates a
    // closure on 5.1 and LuaJIT, which may fail before the protected call starts.
    unsafe {
        ffi::lua_getfield(L, ffi::LUA_REGISTRYINDEX, PROTECTED_KEY.as_ptr());
        let ours: ffi::lua_CFunction = protected_trampoline;
        if !ffi::lua_tocfunction(L, -1).is_some_and(|f| std::ptr::fn_addr_eq(f, ours)) {
            ffi::lua_pop(L, 1);
            ffi::lua_pushcfunction(L, protected_trampoline);
        }
        let current = &mut push as *mut &mut dyn FnMut() as *mut c_void;
        let outer = PROTECTED_CLOSURE.replace(current);
        ffi::lua_pushlightuserdata(L, current);
        let ok = ffi::lua_pcall(L, 1, 1, 0) == ffi::LUA_OK;
        PROTECTED_CLOSURE.set(outer);
        ok
    }
}

thread_local! {
    /// The closure [`protected`] is about to run, until [`protected_trampoline`] takes it: a
    /// call of the trampoline by hand (the registry is reachable from Lua), even with a copy of
    /// its argument, finds nothing to run.
    static PROTECTED_CLOSURE: Cell<*mut c_void> = const { Cell::new(ptr::null_mut()) };
}

/// The C function [`protected`] calls: runs the closure its argument points to.
unsafe extern "C-unwind" fn protected_trampoline(L: *mut lua_State) -> c_int {
    // SAFETY: called by `protected` only (a call by hand passes no light userdata and gets an
    // error): argument 1 points to its closure, alive in its frame for the duration of the call.
    unsafe {
        let expected = PROTECTED_CLOSURE.replace(ptr::null_mut());
        if expected.is_null() || ffi::lua_touserdata(L, 1) != expected {
            raise(L, c"lunet.mem: internal function called by hand");
        }
        let push = &mut **(expected as *mut &mut dyn FnMut());
        ffi::lua_settop(L, 0);
        push();
    }
    1
}

/// Registry key of [`protected_trampoline`].
const PROTECTED_KEY: &CStr = c"lunet.mem.protected";

/// Puts [`protected_trampoline`] in the registry.
///
/// # Safety
/// `L` valid with 2 free slots. May raise (memory).
unsafe fn register_protected(L: *mut lua_State) {
    // SAFETY: valid state.
    unsafe {
        ffi::lua_pushcfunction(L, protected_trampoline);
        ffi::lua_setfield(L, ffi::LUA_REGISTRYINDEX, PROTECTED_KEY.as_ptr());
    }
}

/// The name of the type of the value at `idx`, naming this library's objects.
///
/// # Safety
/// `L` valid with 2 free slots, `idx` acceptable.
unsafe fn type_name<'a>(L: *mut lua_State, idx: c_int) -> &'a CStr {
    // SAFETY: valid state and index; `lua_typename` returns a static string.
    unsafe {
        if udata::test::<Checkpoint>(L, idx).is_some() {
            return c"checkpoint";
        }
        if udata::test::<Rc<Scope>>(L, idx).is_some() {
            return c"scope";
        }
        if udata::test::<crate::trace::Snapshot>(L, idx).is_some() {
            return c"snapshot";
        }
        CStr::from_ptr(ffi::lua_typename(L, ffi::lua_type(L, idx)))
    }
}

/// Raises `bad argument #n to 'fname' (expected expected, got <type>)`, formatted by Lua (no
/// Rust value is alive when it raises).
///
/// # Safety
/// As for [`raise`].
pub(crate) unsafe fn type_error(L: *mut lua_State, n: c_int, fname: &CStr, expected: &CStr) -> ! {
    // SAFETY: forwarded contract.
    unsafe {
        let got = type_name(L, n);
        ffi::luaL_where(L, 1);
        ffi::lua_pushfstring(
            L,
            c"bad argument #%d to '%s' (%s expected, got %s)".as_ptr(),
            n,
            fname.as_ptr(),
            expected.as_ptr(),
            got.as_ptr(),
        );
        ffi::lua_concat(L, 2);
        ffi::lua_error(L)
    }
}

/// The state's tracker, or an error if the hook is gone (removed at close, or wrapped by another
/// allocator installed later).
///
/// # Safety
/// `L` valid; as for [`raise`].
unsafe fn check_tracker<'a>(L: *mut lua_State) -> &'a Tracker {
    // SAFETY: valid state.
    match unsafe { state::tracker(L) } {
        Some(t) => {
            if t.exempt_calls.get() == 0 {
                t.exempt.set(false); // (see its doc)
            }
            t
        }
        // SAFETY: nothing with a destructor is alive here.
        None => unsafe {
            raise(
                L,
                c"lunet.mem: the tracking allocator is not installed on this state",
            )
        },
    }
}

// ---------------------------------------------------------------------------------------------
// The module's userdata (see crate::udata)

impl udata::Boxed for Checkpoint {
    const METATABLE: &'static CStr = c"lunet.mem.checkpoint";
    const NAME: &'static CStr = c"checkpoint";
    const TAG: u64 = 0x6c75_6e65_7463_7031;
}

impl udata::Boxed for Rc<Scope> {
    const METATABLE: &'static CStr = c"lunet.mem.scope";
    const NAME: &'static CStr = c"scope";
    const TAG: u64 = 0x6c75_6e65_7473_6331;
}

impl udata::Boxed for ThreadScopes {
    const METATABLE: &'static CStr = c"lunet.mem.thread_scopes";
    const NAME: &'static CStr = c"thread record";
    const TAG: u64 = 0x6c75_6e65_7474_7331;

    /// A thread's record is finalized when the thread was collected (suspended inside its
    /// scopes) or the state closes: nothing can close the scopes it has open any more, so they
    /// end now, whatever else holds them. Left to their last holder, a scope object whose
    /// finalizer Lua dropped kept such a scope and its arena running for good: PUC Lua drops a
    /// finalizer whose call fails, and a budget active when the collector calls one may refuse
    /// the stack or `CallInfo` the call needs. A record finalized by hand (the debug library
    /// reaches it) whose thread still runs, or waits in a resume, keeps its scopes: one of them
    /// is then the active scope or the running thread's `base`, or was opened in one of those.
    unsafe fn finalize(&mut self, L: *mut lua_State) {
        // SAFETY: `L` is a thread of a state whose tracker is found by checking its allocator;
        // `thread_scopes` without `create` neither allocates nor raises.
        unsafe {
            let Some(t) = state::tracker(L) else { return };
            let resumer_scope = thread_scopes(L, t, 0, false).and_then(|ts| ts.base.clone());
            if self.in_chain_of(t.active_scope().as_ref())
                || self.in_chain_of(resumer_scope.as_ref())
            {
                return;
            }
            self.end_open_scopes();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/// # Safety
/// `L` valid with a table at the top and a free slot.
unsafe fn set_int(L: *mut lua_State, key: &CStr, value: i64) {
    // SAFETY: valid state, table on top.
    unsafe {
        ffi::lua_pushinteger(L, value as ffi::lua_Integer);
        ffi::lua_setfield(L, -2, key.as_ptr());
    }
}

/// # Safety
/// `L` valid with a free slot.
unsafe fn push_str(L: *mut lua_State, s: &str) {
    // SAFETY: valid state; Lua copies the bytes.
    unsafe { ffi::lua_pushlstring(L, s.as_ptr().cast(), s.len()) };
}

/// The string at `idx` (any bytes, lossily as UTF-8), or None if it is not a string.
///
/// # Safety
/// `L` valid, `idx` acceptable.
unsafe fn to_string(L: *mut lua_State, idx: c_int) -> Option<String> {
    // SAFETY: valid state; only real strings are read (numbers are not converted in place).
    unsafe {
        if ffi::lua_type(L, idx) != ffi::LUA_TSTRING {
            return None;
        }
        let mut len = 0usize;
        let p = ffi::lua_tolstring(L, idx, &mut len);
        let bytes = std::slice::from_raw_parts(p as *const u8, len);
        Some(String::from_utf8_lossy(bytes).into_owned())
    }
}

// ---------------------------------------------------------------------------------------------
// Stats

/// A copy of the tracker's counters, taken before anything is allocated for the result.
#[cfg_attr(not(type_tags), allow(dead_code))]
struct Snapshot {
    live_bytes: u64,
    peak_bytes: u64,
    allocs: u64,
    frees: u64,
    reallocs: u64,
    bytes_allocated: u64,
    bytes_freed: u64,
    baseline_bytes: u64,
    type_allocs: [u64; TYPE_SLOTS],
    type_bytes: [u64; TYPE_SLOTS],
    arena_bytes: u64,
    arena_live_bytes: u64,
    arena_live_blocks: u64,
    arena_pool_bytes: u64,
    arenas: u64,
    arenas_reclaimed: u64,
    gc_cycles: u64,
    buffer_bytes: u64,
    buffer_blocks: u64,
}

impl Snapshot {
    fn of(t: &Tracker) -> Snapshot {
        Snapshot {
            live_bytes: t.live_bytes.get(),
            peak_bytes: t.peak_bytes.get(),
            allocs: t.allocs.get(),
            frees: t.frees.get(),
            reallocs: t.reallocs.get(),
            bytes_allocated: t.bytes_allocated.get(),
            bytes_freed: t.bytes_freed.get(),
            baseline_bytes: t.baseline_bytes,
            type_allocs: t.type_allocs.each_ref().map(|c| c.get()),
            type_bytes: t.type_bytes.each_ref().map(|c| c.get()),
            arena_bytes: t.arenas.reserved_bytes.get(),
            arena_live_bytes: t.arenas.live_bytes.get(),
            arena_live_blocks: t.arenas.live_blocks.get(),
            arena_pool_bytes: t.arenas.pool_bytes.get(),
            arenas: t.arenas.count.get(),
            arenas_reclaimed: t.arenas.reclaimed.get(),
            gc_cycles: t.gc_cycles.get(),
            #[cfg(aux_buffers)]
            buffer_bytes: t.aux.bytes.get(),
            #[cfg(aux_buffers)]
            buffer_blocks: t.aux.blocks() as u64,
            #[cfg(not(aux_buffers))]
            buffer_bytes: 0,
            #[cfg(not(aux_buffers))]
            buffer_blocks: 0,
        }
    }
}

/// Names of the type slots (the low 4 bits of Lua 5.2+'s tag; slot 0 is memory that is not an
/// object: arrays, buffers, stacks).
#[cfg(type_tags)]
fn type_slot_name(slot: usize) -> Option<&'static CStr> {
    let lua54_order = cfg!(lua54_gc);
    Some(match slot {
        0 => c"other",
        4 => c"string",
        5 => c"table",
        6 => c"function",
        7 => c"userdata",
        8 => c"thread",
        9 if lua54_order => c"upvalue",
        9 => c"proto",
        10 if lua54_order => c"proto",
        10 => c"upvalue",
        _ => return None,
    })
}

/// `mem.stats()`: a fresh table of the state's counters.
unsafe extern "C-unwind" fn l_stats(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; nothing with a destructor is alive when it may raise.
    unsafe {
        let t = check_tracker(L);
        no_arguments(L, c"stats");
        let s = Snapshot::of(t);
        ffi::lua_createtable(L, 0, 20);
        set_int(L, c"live_bytes", s.live_bytes as i64);
        set_int(L, c"peak_bytes", s.peak_bytes as i64);
        set_int(L, c"allocs", s.allocs as i64);
        set_int(L, c"frees", s.frees as i64);
        set_int(L, c"reallocs", s.reallocs as i64);
        set_int(L, c"bytes_allocated", s.bytes_allocated as i64);
        set_int(L, c"bytes_freed", s.bytes_freed as i64);
        set_int(L, c"baseline_bytes", s.baseline_bytes as i64);
        set_int(L, c"net_blocks", s.allocs as i64 - s.frees as i64);
        set_int(L, c"arena_bytes", s.arena_bytes as i64);
        set_int(L, c"arena_live_bytes", s.arena_live_bytes as i64);
        set_int(L, c"arena_live_blocks", s.arena_live_blocks as i64);
        set_int(L, c"arena_pool_bytes", s.arena_pool_bytes as i64);
        set_int(L, c"arenas", s.arenas as i64);
        set_int(L, c"arenas_reclaimed", s.arenas_reclaimed as i64);
        set_int(L, c"gc_cycles", s.gc_cycles as i64);
        set_int(L, c"buffer_bytes", s.buffer_bytes as i64);
        set_int(L, c"buffer_blocks", s.buffer_blocks as i64);
        #[cfg(type_tags)]
        {
            ffi::lua_createtable(L, 0, 8);
            ffi::lua_createtable(L, 0, 8);
            for slot in 0..TYPE_SLOTS {
                if let Some(name) = type_slot_name(slot) {
                    set_int(L, name, s.type_bytes[slot] as i64);
                    ffi::lua_pushinteger(L, s.type_allocs[slot] as ffi::lua_Integer);
                    ffi::lua_setfield(L, -3, name.as_ptr());
                }
            }
            ffi::lua_setfield(L, -3, c"bytes_by_type".as_ptr());
            ffi::lua_setfield(L, -2, c"allocs_by_type".as_ptr());
        }
    }
    1
}

/// `mem.reset_peak()`.
unsafe extern "C-unwind" fn l_reset_peak(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let t = check_tracker(L);
        no_arguments(L, c"reset_peak");
        t.reset_peak();
    }
    0
}

/// `core.live()`: `live_bytes, net_blocks` as two numbers (allocates nothing).
unsafe extern "C-unwind" fn l_live(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let t = check_tracker(L);
        let (bytes, blocks) = (t.live_bytes.get(), t.net_blocks());
        ffi::lua_pushinteger(L, bytes as ffi::lua_Integer);
        ffi::lua_pushinteger(L, blocks as ffi::lua_Integer);
    }
    2
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

/// `core.checkpoint([name])`: a checkpoint of the counters as they are after its own object
/// has been allocated.
unsafe extern "C-unwind" fn l_checkpoint(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; the counters are read once the checkpoint's own userdata exists.
    unsafe {
        let t = check_tracker(L);
        let cp = udata::push(L, || Checkpoint {
            name: to_string(L, 1),
            live_bytes: 0,
            net_blocks: 0,
        });
        cp.live_bytes = t.live_bytes.get();
        cp.net_blocks = t.net_blocks();
    }
    1
}

/// # Safety
/// Called from a Lua C function; raises a `bad argument` error naming `fname` if arg 1 is not a
/// checkpoint.
unsafe fn check_checkpoint<'a>(L: *mut lua_State, fname: &CStr) -> &'a Checkpoint {
    // SAFETY: forwarded contract.
    unsafe { udata::check::<Checkpoint>(L, 1, fname) }
}

/// `cp:delta()`: `{bytes = n, blocks = n}` since the checkpoint, read before the table is made.
unsafe extern "C-unwind" fn l_cp_delta(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let cp = check_checkpoint(L, c"delta");
        let t = check_tracker(L);
        let bytes = t.live_bytes.get() as i64 - cp.live_bytes as i64;
        let blocks = t.net_blocks() - cp.net_blocks;
        ffi::lua_createtable(L, 0, 2);
        set_int(L, c"bytes", bytes);
        set_int(L, c"blocks", blocks);
    }
    1
}

/// `core.cp_values(cp, fname)`: `bytes, blocks` since the checkpoint as numbers, no table.
unsafe extern "C-unwind" fn l_cp_values(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua (from mem.lua, which passes the public method's name); the name is
    // read from Lua's string, so nothing with a destructor is alive if `check` raises.
    unsafe {
        let fname = if ffi::lua_type(L, 2) == ffi::LUA_TSTRING {
            CStr::from_ptr(ffi::lua_tolstring(L, 2, ptr::null_mut()))
        } else {
            c"is_neutral"
        };
        let cp = udata::check::<Checkpoint>(L, 1, fname);
        let t = check_tracker(L);
        ffi::lua_pushinteger(L, (t.live_bytes.get() as i64 - cp.live_bytes as i64) as _);
        ffi::lua_pushinteger(L, (t.net_blocks() - cp.net_blocks) as _);
    }
    2
}

/// Raises `bad argument #1 to 'fname' (no argument expected, got <type>)` if the function got
/// any argument.
///
/// # Safety
/// Called from a Lua C function; nothing with a destructor alive in the caller.
pub(crate) unsafe fn no_arguments(L: *mut lua_State, fname: &CStr) {
    // SAFETY: forwarded contract.
    unsafe {
        if ffi::lua_gettop(L) > 0 {
            type_error(L, 1, fname, c"no argument");
        }
    }
}

/// `core.cp_name(cp)`: the checkpoint's name or nil.
unsafe extern "C-unwind" fn l_cp_name(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        match udata::test::<Checkpoint>(L, 1).and_then(|cp| cp.name.as_deref()) {
            Some(name) => push_str(L, name),
            None => ffi::lua_pushnil(L),
        }
    }
    1
}

/// `core.cp_attach(cp, t)`: keeps the table `t` with the checkpoint (its user value; setting it
/// allocates nothing, so it can follow the checkpoint's reading). mem.lua keeps the heap
/// snapshot of `mem.checkpoint{holders = true}` there.
unsafe extern "C-unwind" fn l_cp_attach(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; only this module's checkpoints and tables are accepted.
    unsafe {
        if udata::test::<Checkpoint>(L, 1).is_some() && ffi::lua_type(L, 2) == ffi::LUA_TTABLE {
            ffi::lua_settop(L, 2);
            ffi::lua_setuservalue(L, 1);
        }
    }
    0
}

/// `core.cp_attached(cp)`: what `cp_attach` kept (on 5.1 and LuaJIT, a userdata's environment,
/// the globals when nothing was kept).
unsafe extern "C-unwind" fn l_cp_attached(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        if udata::test::<Checkpoint>(L, 1).is_some() {
            ffi::lua_getuservalue(L, 1);
        } else {
            ffi::lua_pushnil(L);
        }
    }
    1
}

/// `core.is_checkpoint(v)`.
unsafe extern "C-unwind" fn l_is_checkpoint(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let yes = udata::test::<Checkpoint>(L, 1).is_some();
        ffi::lua_pushboolean(L, yes as c_int);
    }
    1
}

// ---------------------------------------------------------------------------------------------
// Scopes and coroutines

/// The `ThreadScopes` of the thread at stack index `idx` (the running thread if `idx` is 0),
/// created if `create` is set.
///
/// The table of thread records sits in the registry, where `debug.getregistry` can reach it: its
/// type and each record's metatable are checked, so that a script that replaced them gets no
/// scopes (and an error when it opens one), never a crash.
///
/// # Safety
/// `L` valid with 3 free slots (4 with `create`), `t` its tracker. Allocates and may raise
/// (memory, or a replaced table) only when `create` is set; the allocations are the module's
/// bookkeeping, not charged to or refused by the active scope.
pub(crate) unsafe fn thread_scopes<'a>(
    L: *mut lua_State,
    t: &Tracker,
    idx: c_int,
    create: bool,
) -> Option<&'a mut ThreadScopes> {
    // SAFETY: valid state; the registry table is made at load (`push_core`).
    unsafe {
        let idx = if idx == 0 {
            0
        } else {
            ffi::lua_absindex(L, idx)
        };
        ffi::lua_rawgeti(L, ffi::LUA_REGISTRYINDEX, t.threads_ref.get() as _);
        if ffi::lua_type(L, -1) != ffi::LUA_TTABLE {
            ffi::lua_pop(L, 1);
            if create {
                raise(L, c"lunet.mem: the table of scopes by thread was replaced");
            }
            return None;
        }
        if idx == 0 {
            ffi::lua_pushthread(L);
        } else {
            ffi::lua_pushvalue(L, idx);
        }
        ffi::lua_pushvalue(L, -1);
        ffi::lua_rawget(L, -3);
        if let Some(ts) = udata::test::<ThreadScopes>(L, -1) {
            ffi::lua_pop(L, 3);
            return Some(ts);
        }
        ffi::lua_pop(L, 1);
        if !create {
            ffi::lua_pop(L, 2);
            return None;
        }
        let was = t.exempt.replace(true);
        let ts = udata::push(L, ThreadScopes::default);
        ffi::lua_rawset(L, -3);
        t.exempt.set(was);
        ffi::lua_pop(L, 1);
        Some(ts)
    }
}

/// The arena option at `idx` as `core` gets it from mem.lua: nil or false for none, else the
/// first chunk's size in bytes (0: the default), already checked.
///
/// # Safety
/// `L` valid, `idx` acceptable.
unsafe fn arena_option(L: *mut lua_State, idx: c_int) -> Option<usize> {
    // SAFETY: valid state and index.
    unsafe {
        if ffi::lua_type(L, idx) != ffi::LUA_TNUMBER {
            return None;
        }
        let bytes = ffi::lua_tointeger(L, idx).max(0) as usize;
        Some(if bytes == 0 {
            arena::DEFAULT_CHUNK
        } else {
            bytes.clamp(arena::DEFAULT_CHUNK, arena::MAX_CHUNK)
        })
    }
}

/// A non-negative integer option at `idx` (checked by mem.lua), or `None` for nil.
///
/// # Safety
/// `L` valid, `idx` acceptable.
unsafe fn count_option(L: *mut lua_State, idx: c_int) -> Option<u64> {
    // SAFETY: valid state and index.
    unsafe {
        (ffi::lua_type(L, idx) == ffi::LUA_TNUMBER)
            .then(|| ffi::lua_tonumber(L, idx).clamp(0.0, u64::MAX as f64) as u64)
    }
}

/// Makes a scope named by the string at `name_idx` (or "scope"), opened inside the active scope,
/// with an arena of its own if `arena` says so (see [`arena_option`]), bounded by `guard`. It is
/// not active yet: [`push_scope`] makes it so.
///
/// # Safety
/// `L` valid with 4 free slots, `t` its tracker. May raise (memory) before anything changes;
/// the module's allocations here are not charged to the active scope.
unsafe fn make_scope(
    L: *mut lua_State,
    t: &Tracker,
    name_idx: c_int,
    arena: Option<usize>,
    guard: Guard,
) -> Rc<Scope> {
    // SAFETY: forwarded contract.
    unsafe {
        if !t.gc_ticking.get() {
            arm_gc_tick(L, t); // (its finalizer could not arm the next one: out of memory)
        }
        let name = if ffi::lua_type(L, name_idx) == ffi::LUA_TSTRING {
            let mut len = 0usize;
            let p = ffi::lua_tolstring(L, name_idx, &mut len);
            t.scope_name(p as usize, std::slice::from_raw_parts(p as *const u8, len))
        } else {
            Rc::from("scope")
        };
        let scope = Scope::guarded(name, t.active_scope(), arena, &t.arenas, guard);
        // SAFETY (both): the tracker, and its counts and ledger, outlive every scope of its
        // state.
        if scope.has_budget() {
            scope.count_in(&t.budgeted_scopes);
        }
        if scope.tracks_kept() {
            scope.use_ledger(&t.ledger);
        }
        scope
    }
}

/// Makes `scope` (made by [`make_scope`] in this thread, with the active scope as its parent)
/// the running thread's innermost scope and the active one; returns its token (its address).
/// Allocates nothing, raises nothing: the thread's record exists (`make_thread_record`).
///
/// # Safety
/// `L` valid with 3 free slots, `t` its tracker, `ts` the running thread's record.
unsafe fn push_scope(t: &Tracker, ts: &mut ThreadScopes, scope: Rc<Scope>) -> *const Scope {
    if ts.stack.is_empty() {
        ts.base = scope.parent().cloned();
    }
    let token = Rc::as_ptr(&scope);
    ts.stack.push(scope.clone());
    t.set_active_scope(Some(scope));
    token
}

/// Opens a scope in the running thread and makes it active: [`make_scope`] then [`push_scope`].
/// Returns its token.
///
/// # Safety
/// As for [`make_scope`]; the switch itself allocates nothing.
#[cfg(c_scope)]
unsafe fn open_scope(
    L: *mut lua_State,
    t: &Tracker,
    name_idx: c_int,
    arena: Option<usize>,
    guard: Guard,
) -> *const Scope {
    // SAFETY: forwarded contract.
    unsafe {
        let ts = thread_scopes(L, t, 0, true).expect("created");
        let scope = make_scope(L, t, name_idx, arena, guard);
        push_scope(t, ts, scope)
    }
}

/// Closes the scope `token` of the running thread, and the scopes above it (left open by an
/// error between their open and the call they guard), and makes the scope it inherits active
/// again; returns it, or `None` if `token` is not an open scope of the thread. Allocates
/// nothing, raises nothing.
///
/// # Safety
/// `t` the tracker, `ts` the running thread's record.
unsafe fn pop_scope(t: &Tracker, ts: &mut ThreadScopes, token: *const Scope) -> Option<Rc<Scope>> {
    if !ts.stack.iter().any(|s| Rc::as_ptr(s) == token) {
        return None;
    }
    loop {
        let top = ts.stack.pop().expect("token is below");
        top.close();
        if Rc::as_ptr(&top) == token {
            t.set_active_scope(ts.effective());
            return Some(top);
        }
    }
}

/// Closes the running thread's innermost scope, which must be `token`, and makes the scope it
/// inherits active again; pushes the scope's stats table if `want_stats`.
///
/// # Safety
/// `L` valid with 4 free slots, `t` its tracker. Raises if `token` is not an open scope of the
/// thread (a bug of this module) or, with `want_stats`, on a memory error (leaking that one
/// scope, never freeing it early).
unsafe fn close_scope(L: *mut lua_State, t: &Tracker, token: *const Scope, want_stats: bool) {
    // SAFETY: forwarded contract.
    unsafe {
        let mut closed = match thread_scopes(L, t, 0, false) {
            Some(ts) => pop_scope(t, ts, token),
            None => None,
        };
        if closed.is_none() {
            // The thread's record is gone (its finalizer called by hand): the scope still ends,
            // and the scope it was opened in is active again.
            if let Some(active) = t.active_scope().filter(|a| Rc::as_ptr(a) == token) {
                active.close();
                t.set_active_scope(active.parent().cloned());
                closed = Some(active);
            }
        }
        let Some(scope) = closed else {
            raise(L, c"lunet.mem: scope closed out of order")
        };
        if want_stats {
            push_stats_of(L, scope);
        } else {
            drop(scope);
        }
    }
}

/// Pushes the stats table of `scope` and drops it.
///
/// # Safety
/// `L` valid with 3 free slots.
unsafe fn push_stats_of(L: *mut lua_State, scope: Rc<Scope>) {
    // SAFETY: the table is built in protected mode; a memory error is raised once the scope is
    // dropped.
    unsafe {
        let ok = protected(L, &mut || push_scope_stats(L, &scope));
        drop(scope);
        if !ok {
            ffi::lua_error(L);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// mem.scope on LuaJIT (and 5.2): Lua, so that `fn` can yield inside the scope, around four C
// functions (see src/lua/mem.lua):
//
//     local token = scope_prepare(name, arena, limit)    -- the scope, not active yet
//     return scope_finish(token, on_exit, pcall(run, token, fn, ...))
//     -- run(token, fn, ...): scope_activate(token); return scope_close_ok(token, fn(...))
//
// The scope is active only inside the protected call, so no error can leave it open: whatever
// fails between the activation and `scope_close_ok` is caught by `pcall`, and `scope_finish`
// closes what is still open. On LuaJIT nothing between `pcall`'s return and `scope_finish` can
// be refused by the scope's budget (stack growth and debug hooks are admitted, see
// `Tracker::scope_for_call`).

/// `core.scope_prepare(name, arena, limit)`: makes the scope a `mem.scope` call will run `fn`
/// in, kept as the running thread's pending scope until `scope_activate`; returns its token.
#[cfg(not(c_scope))]
unsafe extern "C-unwind" fn l_scope_prepare(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; may raise (memory) before anything is pending.
    unsafe {
        let t = check_tracker(L);
        let arena = arena_option(L, 2);
        let guard = Guard {
            limit: count_option(L, 3),
            allowance: None,
        };
        thread_scopes(L, t, 0, true);
        let scope = make_scope(L, t, 1, arena, guard);
        let token = Rc::as_ptr(&scope);
        let ts = thread_scopes(L, t, 0, false).expect("made above");
        ts.pending = Some(scope); // (drops one that an error kept from starting)
        ffi::lua_pushlightuserdata(L, token as *mut c_void);
    }
    1
}

/// `core.scope_activate(token)`: the pending scope `token` becomes the running thread's
/// innermost scope, and the active one. Allocates nothing.
#[cfg(not(c_scope))]
unsafe extern "C-unwind" fn l_scope_activate(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let t = check_tracker(L);
        let token = ffi::lua_touserdata(L, 1) as *const Scope;
        if let Some(ts) = thread_scopes(L, t, 0, false) {
            match ts.pending.take() {
                Some(scope) if Rc::as_ptr(&scope) == token => {
                    push_scope(t, ts, scope);
                    return 0;
                }
                other => ts.pending = other,
            }
        }
        raise(L, c"lunet.mem: scope_activate without scope_prepare")
    }
}

/// `core.scope_close_ok(token, ...)`: closes the scope `token` (its stats are kept for
/// `scope_finish`) and returns `...`. Allocates nothing.
#[cfg(not(c_scope))]
unsafe extern "C-unwind" fn l_scope_close_ok(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let t = check_tracker(L);
        let token = ffi::lua_touserdata(L, 1) as *const Scope;
        let mut overdrawn = false;
        if let Some(ts) = thread_scopes(L, t, 0, false) {
            if ts.stack.iter().any(|s| Rc::as_ptr(s) == token) {
                // (read while it is open: its chain's budgets)
                overdrawn = (*token).fails_overdrawn();
            }
            if let Some(scope) = pop_scope(t, ts, token) {
                ts.closed = Some(scope);
            }
        }
        if overdrawn {
            memory_error(L, t);
        }
        (ffi::lua_gettop(L) - 1).max(0)
    }
}

/// Raises Lua's memory error for a scope that closed overdrawn (see `Scope::overdrawn`), after
/// [`flush_overdraft`].
///
/// # Safety
/// `L` valid with 2 free slots; nothing with a destructor alive in the caller.
#[cfg(not(c_scope))]
unsafe fn memory_error(L: *mut lua_State, t: &Tracker) -> ! {
    // SAFETY: valid state.
    unsafe {
        flush_overdraft(L, t);
        ffi::lua_pushstring(L, c"not enough memory".as_ptr());
        ffi::lua_error(L)
    }
}

/// If compiled code overdrew a budget (LuaJIT 2.1 betas), flushes the traces, so that the code
/// runs interpreted, where a budget fails at once, next time. Not inside a finalizer (then, or
/// if the flush fails, a later call flushes them).
///
/// # Safety
/// `L` the running thread, with 2 free slots; called from a C function of the module.
unsafe fn flush_overdraft(L: *mut lua_State, t: &Tracker) {
    #[cfg(feature = "luajit")]
    if let Some(vm) = t.vm.get() {
        // SAFETY: the caller's contract; `may_switch_jit` checked first.
        if t.jit_overdraft.get() && vm.may_switch_jit() && unsafe { vm.flush(L) } {
            t.jit_overdraft.set(false);
        }
    }
    #[cfg(not(feature = "luajit"))]
    let _ = (L, t);
}

/// `core.scope_finish(token, on_exit, ok, ...)`: closes the scope `token` if it is still open
/// (`fn` failed), runs `on_exit(stats)` (its error, after a failure of `fn`, is dropped: `fn`'s
/// wins), then returns `...` or raises `fn`'s error object unchanged.
#[cfg(not(c_scope))]
unsafe extern "C-unwind" fn l_scope_finish(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe { scope_finish_lua(L) }
}

/// The body of `scope_finish`.
///
/// # Safety
/// Called by Lua with the arguments of `scope_finish`.
#[cfg(not(c_scope))]
unsafe fn scope_finish_lua(L: *mut lua_State) -> c_int {
    // SAFETY: the scope is closed before anything can allocate or raise.
    unsafe {
        let t = check_tracker(L);
        if ffi::lua_type(L, 1) != ffi::LUA_TLIGHTUSERDATA {
            type_error(L, 1, c"scope_finish", c"scope token"); // (only a call by hand)
        }
        if ffi::lua_type(L, 3) != ffi::LUA_TBOOLEAN {
            type_error(L, 3, c"scope_finish", c"boolean"); // (only a call by hand)
        }
        let token = ffi::lua_touserdata(L, 1) as *const Scope;
        let ok = ffi::lua_toboolean(L, 3) != 0;
        let closed = match thread_scopes(L, t, 0, false) {
            Some(ts) => match ts.closed.take() {
                Some(scope) if Rc::as_ptr(&scope) == token => Some(scope),
                other => {
                    ts.closed = other;
                    pop_scope(t, ts, token)
                }
            },
            None => None,
        };
        if ffi::lua_type(L, 2) != ffi::LUA_TNIL {
            if let Some(scope) = closed {
                ffi::luaL_checkstack(L, 4, ptr::null());
                ffi::lua_pushvalue(L, 2);
                push_stats_of(L, scope);
                if ok {
                    ffi::lua_call(L, 1, 0);
                } else if ffi::lua_pcall(L, 1, 0, 0) != ffi::LUA_OK {
                    ffi::lua_pop(L, 1); // fn's error wins over on_exit's
                }
            }
        } else {
            drop(closed);
        }
        if ok {
            return ffi::lua_gettop(L) - 3;
        }
        ffi::lua_settop(L, 4);
        ffi::lua_error(L)
    }
}

/// `core.address_name(v)`: `"<type>: <address>"`, what `tostring` says of a table or function
/// without a `__tostring` metamethod, without running one.
unsafe extern "C-unwind" fn l_address_name(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let kind = ffi::lua_typename(L, ffi::lua_type(L, 1));
        let p = ffi::lua_topointer(L, 1);
        ffi::lua_pushfstring(L, c"%s: %p".as_ptr(), kind, p);
    }
    1
}

/// `core.jit_can_switch()`: whether LuaJIT's compiler may be turned on, off or flushed now: not
/// inside a `__gc` finalizer, where LuaJIT refuses it with an error that 2.1.0-beta3 does not
/// survive everywhere, nor inside a `jit.attach` handler. (Always true on PUC Lua, which has no
/// compiler to switch.)
unsafe extern "C-unwind" fn l_jit_can_switch(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        #[cfg(feature = "luajit")]
        let can = {
            let t = check_tracker(L);
            match t.vm.get() {
                Some(vm) => vm.may_switch_jit(),
                None => probe_jit_mode(L),
            }
        };
        #[cfg(not(feature = "luajit"))]
        let can = true;
        ffi::lua_pushboolean(L, can as c_int);
    }
    1
}

/// `core.jit_hold(reason, held)`: adds or removes a reason LuaJIT's compiler is kept off
/// (`Tracker::hold_jit`; reasons 2 = tracing, 4 = a neutrality check). Nothing on PUC Lua.
unsafe extern "C-unwind" fn l_jit_hold(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let t = check_tracker(L);
        let reason = ffi::luaL_checkinteger(L, 1);
        let held = ffi::lua_toboolean(L, 2) != 0;
        #[cfg(feature = "luajit")]
        {
            use crate::hook::{JIT_HELD_BY_CHECK, JIT_HELD_BY_TRACE};
            if reason == JIT_HELD_BY_TRACE as ffi::lua_Integer
                || reason == JIT_HELD_BY_CHECK as ffi::lua_Integer
            {
                t.hold_jit(reason as u8, held);
            }
        }
        #[cfg(not(feature = "luajit"))]
        let _ = (t, reason, held);
    }
    0
}

#[cfg(feature = "luajit")]
extern "C-unwind" {
    fn luaJIT_setmode(L: *mut lua_State, idx: c_int, mode: c_int) -> c_int;
}

/// Whether LuaJIT accepts a mode change now: a protected `luaJIT_setmode` with a mode that
/// does not exist (it changes nothing, but raises inside a `__gc` finalizer).
///
/// # Safety
/// `L` valid with 2 free slots.
#[cfg(feature = "luajit")]
unsafe fn probe_jit_mode(L: *mut lua_State) -> bool {
    unsafe extern "C-unwind" fn probe(L: *mut lua_State) -> c_int {
        // SAFETY: an unknown mode is refused with 0 after the finalizer check.
        unsafe { luaJIT_setmode(L, 0, 0xff) };
        0
    }
    // SAFETY: a protected call of `probe`.
    unsafe {
        ffi::lua_pushcfunction(L, probe);
        if ffi::lua_pcall(L, 0, 0, 0) == ffi::LUA_OK {
            true
        } else {
            ffi::lua_pop(L, 1);
            false
        }
    }
}

/// `core.exempt_call(f, ...)`: calls `f(...)` as the module's own bookkeeping: what it
/// allocates is not charged to the active scope, refused by its budget or placed in its arena
/// (mem.lua's cache of default scope names, which lives longer than any request).
unsafe extern "C-unwind" fn l_exempt_call(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; the flag is restored before anything is raised.
    unsafe {
        let t = check_tracker(L);
        ffi::luaL_checkany(L, 1);
        let was = t.exempt.replace(true);
        t.exempt_calls.set(t.exempt_calls.get() + 1);
        let status = ffi::lua_pcall(L, ffi::lua_gettop(L) - 1, ffi::LUA_MULTRET, 0);
        t.exempt_calls.set(t.exempt_calls.get() - 1);
        t.exempt.set(was);
        if status != ffi::LUA_OK {
            ffi::lua_error(L);
        }
        ffi::lua_gettop(L)
    }
}

/// `core.cpcall(f, ...)`: `pcall` through C, so that `f` cannot yield past it (LuaJIT's `pcall`
/// lets a coroutine yield across: a check that turned the compiler off must not be left
/// suspended, or abandoned, with it off).
unsafe extern "C-unwind" fn l_cpcall(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; `lua_pcall` gets at least the function (checked).
    unsafe {
        ffi::luaL_checkany(L, 1);
        let status = ffi::lua_pcall(L, ffi::lua_gettop(L) - 1, ffi::LUA_MULTRET, 0);
        ffi::luaL_checkstack(L, 1, ptr::null());
        ffi::lua_pushboolean(L, (status == ffi::LUA_OK) as c_int);
        ffi::lua_insert(L, 1);
        ffi::lua_gettop(L)
    }
}

/// Pushes the stats table of `scope`.
///
/// # Safety
/// `L` valid with 3 free slots. May raise (memory): the caller must hold no destructors.
unsafe fn push_scope_stats(L: *mut lua_State, scope: &Scope) {
    let counters = [
        (c"allocs", scope.allocs.get() as i64),
        (c"frees", scope.frees.get() as i64),
        (c"reallocs", scope.reallocs.get() as i64),
        (c"allocated_bytes", scope.allocated_bytes.get() as i64),
        (c"freed_bytes", scope.freed_bytes.get() as i64),
        (c"net_bytes", scope.net_bytes.get()),
        (c"peak_bytes", scope.peak_bytes.get()),
        (c"jit_traces", scope.jit_traces.get() as i64),
        (c"kept_bytes", scope.kept_bytes.get()),
    ];
    // SAFETY: valid state.
    unsafe {
        ffi::lua_createtable(L, 0, 11);
        for (key, value) in counters {
            set_int(L, key, value);
        }
        push_str(L, &scope.name);
        ffi::lua_setfield(L, -2, c"name".as_ptr());
        ffi::lua_pushboolean(L, scope.closed.get() as c_int);
        ffi::lua_setfield(L, -2, c"closed".as_ptr());
        if let Some(a) = scope.own_arena() {
            ffi::lua_createtable(L, 0, 4);
            set_int(L, c"live_bytes", a.live_bytes.get() as i64);
            set_int(L, c"live_blocks", a.live_blocks.get() as i64);
            set_int(L, c"blocks", a.blocks.get() as i64);
            set_int(L, c"reserved_bytes", a.reserved_bytes.get() as i64);
            ffi::lua_setfield(L, -2, c"arena".as_ptr());
        }
    }
}

/// `core.current()`: the active scope as a scope object, or nil.
unsafe extern "C-unwind" fn l_current(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let t = check_tracker(L);
        no_arguments(L, c"current");
        if t.active_scope().is_some() {
            udata::push(L, || t.active_scope().expect("checked"));
        } else {
            ffi::lua_pushnil(L);
        }
    }
    1
}

/// # Safety
/// Called from a Lua C function; raises a `bad argument` error naming `fname` if arg 1 is not a
/// scope object.
unsafe fn check_scope<'a>(L: *mut lua_State, fname: &CStr) -> &'a Scope {
    // SAFETY: forwarded contract.
    unsafe { udata::check::<Rc<Scope>>(L, 1, fname) }
}

/// `scope:stats()`.
unsafe extern "C-unwind" fn l_scope_stats(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; the scope is kept alive by its userdata at index 1.
    unsafe { push_scope_stats(L, check_scope(L, c"stats")) };
    1
}

/// `core.scope_name(scope)`.
unsafe extern "C-unwind" fn l_scope_name(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; the scope is kept alive by its userdata at index 1.
    unsafe { push_str(L, &check_scope(L, c"name").name) };
    1
}

/// `core.is_scope(v)`.
unsafe extern "C-unwind" fn l_is_scope(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let yes = udata::test::<Rc<Scope>>(L, 1).is_some();
        ffi::lua_pushboolean(L, yes as c_int);
    }
    1
}

// ---------------------------------------------------------------------------------------------
// Registration

/// Pushes the `core` table used by `src/lua/mem.lua`.
///
/// # Safety
/// `L` valid with 8 free slots and the tracker installed. May raise (memory).
pub unsafe fn push_core(L: *mut lua_State) {
    // SAFETY: valid state.
    unsafe {
        let t = check_tracker(L);
        if t.threads_ref.get() == 0 {
            ffi::lua_createtable(L, 0, 4);
            ffi::lua_createtable(L, 0, 1);
            push_str(L, "k");
            ffi::lua_setfield(L, -2, c"__mode".as_ptr());
            ffi::lua_setmetatable(L, -2);
            t.threads_ref.set(ffi::luaL_ref(L, ffi::LUA_REGISTRYINDEX));
        }
        udata::new_metatable::<ThreadScopes>(L);
        ffi::lua_pop(L, 1);
        register_protected(L);
        #[cfg(feature = "luajit")]
        crate::luajit::register_flush(L);
        // Originals of the functions mem.lua wraps, kept across loads so that nothing is wrapped
        // twice.
        ffi::lua_getfield(L, ffi::LUA_REGISTRYINDEX, SAVED_KEY.as_ptr());
        if ffi::lua_type(L, -1) != ffi::LUA_TTABLE {
            ffi::lua_pop(L, 1);
            ffi::lua_createtable(L, 0, 2);
            ffi::lua_pushvalue(L, -1);
            ffi::lua_setfield(L, ffi::LUA_REGISTRYINDEX, SAVED_KEY.as_ptr());
        }
        let saved = ffi::lua_gettop(L);

        ffi::lua_createtable(L, 0, 24);
        let functions: [(&CStr, ffi::lua_CFunction); 21] = [
            (c"fail_run", l_fail_run),
            (c"cp_attach", l_cp_attach),
            (c"cp_attached", l_cp_attached),
            (c"arenas", l_arenas),
            (c"arena_of", l_arena_of),
            (c"stats", l_stats),
            (c"reset_peak", l_reset_peak),
            (c"live", l_live),
            (c"checkpoint", l_checkpoint),
            (c"cp_delta", l_cp_delta),
            (c"cp_values", l_cp_values),
            (c"cp_name", l_cp_name),
            (c"is_checkpoint", l_is_checkpoint),
            (c"current", l_current),
            (c"scope_stats", l_scope_stats),
            (c"scope_name", l_scope_name),
            (c"is_scope", l_is_scope),
            (c"gc_count_bytes", l_gc_count_bytes),
            (c"version", l_version),
            (c"stretch", l_stretch),
            (c"measured", l_measured),
        ];
        for (name, f) in functions {
            ffi::lua_pushcfunction(L, f);
            ffi::lua_setfield(L, -2, name.as_ptr());
        }
        #[cfg(c_scope)]
        {
            ffi::lua_pushcfunction(L, l_make_scope);
            ffi::lua_setfield(L, -2, c"make_scope".as_ptr());
        }
        #[cfg(not(c_scope))]
        for (name, f) in [
            (c"scope_prepare", l_scope_prepare as ffi::lua_CFunction),
            (c"scope_activate", l_scope_activate),
            (c"scope_close_ok", l_scope_close_ok),
            (c"scope_finish", l_scope_finish),
        ] {
            ffi::lua_pushcfunction(L, f);
            ffi::lua_setfield(L, -2, name.as_ptr());
        }
        for (name, f) in [
            (c"address_name", l_address_name as ffi::lua_CFunction),
            (c"jit_can_switch", l_jit_can_switch),
            (c"jit_hold", l_jit_hold),
            (c"cpcall", l_cpcall),
            (c"exempt_call", l_exempt_call),
        ] {
            ffi::lua_pushcfunction(L, f);
            ffi::lua_setfield(L, -2, name.as_ptr());
        }
        crate::trace::push_functions(L); // core.trace_* (src/trace.rs)
        crate::coroutine::push_functions(L); // core.co_* (src/coroutine.rs)
        ffi::lua_pushvalue(L, saved);
        ffi::lua_setfield(L, -2, c"saved".as_ptr());
        ffi::lua_remove(L, saved);
        udata::new_metatable::<Checkpoint>(L);
        ffi::lua_setfield(L, -2, c"checkpoint_mt".as_ptr());
        udata::new_metatable::<Rc<Scope>>(L);
        ffi::lua_setfield(L, -2, c"scope_mt".as_ptr());
        if !t.gc_ticking.get() {
            ffi::lua_createtable(L, 0, 1);
            ffi::lua_pushcfunction(L, l_gc_tick);
            ffi::lua_setfield(L, -2, c"__gc".as_ptr());
            ffi::lua_setfield(L, ffi::LUA_REGISTRYINDEX, GC_TICK_MT.as_ptr());
            arm_gc_tick(L, t);
        }
        // The loading thread (usually the main one) gets its scope table now, so that its first
        // scope does not allocate one inside somebody's measurement.
        thread_scopes(L, t, 0, true);
    }
}

/// `core.arenas()`: an array of the arenas not reclaimed, newest first, each a table with
/// `name`, `live_bytes`, `live_blocks`, `live_objects`, `blocks`, `reserved_bytes`, `running`
/// (its scope has not ended), `age` (GC cycles since the scope ended, 0 while it runs) and
/// `pinned` (age >= 2 and objects live: a whole cycle began and ended after the scope did, and
/// objects the scope made are still alive).
unsafe extern "C-unwind" fn l_arenas(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua. The list is copied first: building the tables may run the
    // collector, which frees blocks and reclaims arenas. The tables are built in protected mode
    // and a memory error is raised once the copy is dropped.
    unsafe {
        let t = check_tracker(L);
        no_arguments(L, c"arenas");
        let list = t.arenas.list();
        let ok = protected(L, &mut || push_arena_list(L, &list));
        drop(list);
        if !ok {
            ffi::lua_error(L);
        }
    }
    1
}

/// Pushes the array of tables `l_arenas` returns.
///
/// # Safety
/// `L` valid with 3 free slots. May raise (memory).
unsafe fn push_arena_list(L: *mut lua_State, list: &[arena::ArenaInfo]) {
    // SAFETY: valid state.
    unsafe {
        ffi::lua_createtable(L, list.len().min(1 << 20) as c_int, 0);
        for (i, a) in list.iter().enumerate() {
            ffi::lua_createtable(L, 0, 9);
            push_str(L, &a.name);
            ffi::lua_setfield(L, -2, c"name".as_ptr());
            set_int(L, c"live_bytes", a.live_bytes as i64);
            set_int(L, c"live_blocks", a.live_blocks as i64);
            set_int(L, c"live_objects", a.live_objects as i64);
            set_int(L, c"blocks", a.blocks as i64);
            set_int(L, c"reserved_bytes", a.reserved_bytes as i64);
            set_int(L, c"age", a.age.unwrap_or(0) as i64);
            ffi::lua_pushboolean(L, a.age.is_none() as c_int);
            ffi::lua_setfield(L, -2, c"running".as_ptr());
            let pinned = a.age.is_some_and(|age| age >= 2) && a.live_objects > 0;
            ffi::lua_pushboolean(L, pinned as c_int);
            ffi::lua_setfield(L, -2, c"pinned".as_ptr());
            ffi::lua_rawseti(L, -2, (i + 1) as _);
        }
    }
}

/// `mem.arena_of(v)`: the name of the arena that holds the object `v` (a table, function,
/// thread or full userdata; a string on Lua 5.4 and LuaJIT, where `lua_topointer` sees strings),
/// or nil. Raises if the object is in reclaimed arena memory, which the arenas never allow: a
/// check for the tests, and for users who doubt.
unsafe extern "C-unwind" fn l_arena_of(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; only blocks of live objects are looked at (light userdata, which
    // can point anywhere, are not).
    unsafe {
        check_tracker(L);
        if ffi::lua_type(L, 1) == ffi::LUA_TNONE {
            raise(L, c"bad argument #1 to 'arena_of' (value expected)");
        }
        let p = match ffi::lua_type(L, 1) {
            ffi::LUA_TTABLE | ffi::LUA_TFUNCTION | ffi::LUA_TTHREAD | ffi::LUA_TSTRING => {
                ffi::lua_topointer(L, 1) as *const u8
            }
            // A full userdata's pointer is its payload, after the header in the same block: for
            // an empty payload that is the block's end, possibly the next chunk's start. The
            // header's last byte is always in the block.
            ffi::LUA_TUSERDATA => (ffi::lua_topointer(L, 1) as *const u8).wrapping_sub(1),
            _ => ptr::null(),
        };
        if p.is_null() {
            ffi::lua_pushnil(L);
            return 1;
        }
        match arena::owner(p.cast()) {
            arena::Owner::Elsewhere => ffi::lua_pushnil(L),
            arena::Owner::Arena(a) => {
                // (the name is held while the string is made, which may run the collector and
                // reclaim the arena; a memory error is raised once it is dropped)
                let name = a.name.clone();
                let ok = protected(L, &mut || push_str(L, &name));
                drop(name);
                if !ok {
                    ffi::lua_error(L);
                }
            }
            arena::Owner::Reclaimed => raise(
                L,
                c"lunet.mem: a live object is in reclaimed arena memory (a bug: please report it)",
            ),
        }
    }
    1
}

/// `core.fail_run(n, fn, ...)`: `mem.fail_after`'s run, in C so that nothing can allocate
/// between the end of the protected call and the close of its scope (a Lua frame in between may
/// need to grow the stack, which the exhausted allowance would refuse). Opens a scope that
/// admits `n` allocations, calls `fn(...)` in protected mode inside it, closes it, and returns
/// `true, results...` or `false, err`.
unsafe extern "C-unwind" fn l_fail_run(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua. Nothing with a destructor is alive when a call may raise; between
    // the protected call and the close of the scope nothing allocates.
    unsafe {
        let t = check_tracker(L);
        let n = ffi::luaL_checknumber(L, 1).clamp(0.0, u64::MAX as f64) as u64;
        ffi::luaL_checkany(L, 2);
        let nargs = ffi::lua_gettop(L) - 2;
        ffi::luaL_checkstack(L, 8, c"too many arguments".as_ptr());
        ffi::lua_pushstring(L, c"fail_after".as_ptr());
        ffi::lua_replace(L, 1); // the name, at 1
        let guard = Guard {
            limit: None,
            allowance: Some(n),
        };
        let ts = thread_scopes(L, t, 0, true).expect("created");
        let scope = make_scope(L, t, 1, None, guard);
        let token = push_scope(t, ts, scope);
        let mut status = ffi::lua_pcall(L, nargs, ffi::LUA_MULTRET, 0);
        // (an allocation admitted past the allowance where failing was unsafe: the run fails)
        if (*token).fails_overdrawn() && status == ffi::LUA_OK {
            ffi::lua_settop(L, 1);
            ffi::lua_pushstring(L, c"not enough memory".as_ptr());
            status = ffi::LUA_ERRMEM;
        }
        close_scope(L, t, token, false);
        // the stack: name, then fn's results or its error (the scope is closed: growing the
        // stack for the flush's call and the status may allocate now)
        ffi::luaL_checkstack(L, 2, c"too many results".as_ptr());
        flush_overdraft(L, t);
        ffi::lua_pushboolean(L, (status == ffi::LUA_OK) as c_int);
        ffi::lua_replace(L, 1);
        ffi::lua_gettop(L)
    }
}

/// Registry key of the metatable of the GC cycle counter.
const GC_TICK_MT: &CStr = c"lunet.mem.gc_tick";

/// Makes a new unreachable userdata whose finalizer is [`l_gc_tick`].
///
/// # Safety
/// `L` valid with 2 free slots, the metatable registered. May raise (memory).
unsafe fn arm_gc_tick(L: *mut lua_State, t: &Tracker) {
    // SAFETY: valid state; the metatable's type is checked (the registry is reachable from Lua).
    unsafe {
        let was = t.exempt.replace(true); // (the module's bookkeeping)
        ffi::lua_newuserdata(L, 0);
        ffi::lua_getfield(L, ffi::LUA_REGISTRYINDEX, GC_TICK_MT.as_ptr());
        let armed = ffi::lua_type(L, -1) == ffi::LUA_TTABLE;
        if armed {
            ffi::lua_setmetatable(L, -2);
        } else {
            ffi::lua_pop(L, 1);
        }
        ffi::lua_pop(L, 1);
        t.exempt.set(was);
        t.gc_ticking.set(armed);
    }
}

/// Finalizer of the GC cycle counter: a cycle ended (the counter was unreachable in it); counts
/// it and arms a new counter for the next cycle. Arenas measure their age with it.
unsafe extern "C-unwind" fn l_gc_tick(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua as a finalizer (or by hand: then only for a counter).
    unsafe {
        if !is_gc_tick(L) {
            return 0;
        }
        if let Some(t) = state::tracker(L) {
            t.gc_cycles.set(t.gc_cycles.get() + 1);
            // Not armed until the new counter exists: if making it fails (out of memory), the
            // next scope opened arms one.
            t.gc_ticking.set(false);
            if t.closing.get().is_null() {
                ffi::luaL_checkstack(L, 2, ptr::null());
                // (The new counter is nobody's: not counted for, nor placed in the arena of,
                // the scope that happens to be active during the collection.)
                arm_gc_tick(L, t);
            }
        }
    }
    0
}

/// Whether argument 1 is a GC cycle counter (a zero-size userdata with its metatable).
///
/// # Safety
/// `L` valid with 2 free slots.
unsafe fn is_gc_tick(L: *mut lua_State) -> bool {
    // SAFETY: valid state.
    unsafe {
        if ffi::lua_type(L, 1) != ffi::LUA_TUSERDATA
            || ffi::lua_rawlen(L, 1) != 0
            || ffi::lua_getmetatable(L, 1) == 0
        {
            return false;
        }
        ffi::lua_getfield(L, ffi::LUA_REGISTRYINDEX, GC_TICK_MT.as_ptr());
        let same = ffi::lua_rawequal(L, -1, -2) != 0;
        ffi::lua_pop(L, 2);
        same
    }
}

/// `core.gc_count_bytes()`: the state's own count, read in the same call (for tests).
unsafe extern "C-unwind" fn l_gc_count_bytes(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let t = check_tracker(L);
        let live = t.live_bytes.get();
        let counted = state::gc_count_bytes(L);
        ffi::lua_pushinteger(L, counted as ffi::lua_Integer);
        ffi::lua_pushinteger(L, live as ffi::lua_Integer);
    }
    2
}

/// `core.version()`: the Lua flavour this library was built for.
unsafe extern "C-unwind" fn l_version(L: *mut lua_State) -> c_int {
    let v = if cfg!(feature = "luajit") {
        "luajit"
    } else if cfg!(feature = "lua51") {
        "lua51"
    } else if cfg!(feature = "lua52") {
        "lua52"
    } else if cfg!(feature = "lua53") {
        "lua53"
    } else if cfg!(feature = "lua54") {
        "lua54"
    } else {
        "lua55"
    };
    // SAFETY: called by Lua.
    unsafe { push_str(L, v) };
    1
}

// ---------------------------------------------------------------------------------------------
// Measuring at a reproducible point

/// `core.stretch()`: grows the running thread's stack so that the collection that follows
/// shrinks it to a size that depends only on what is in use, not on its history.
///
/// Live memory includes the stacks of threads, and Lua 5.4 shrinks a stack only when it is
/// more than 3 times what is in use (then to 2 times), so two readings at the same depth could
/// differ by a stack that grew in between. Growing it past that first makes the collection
/// shrink it to twice the use. Lua 5.3 always shrinks to a size computed from the use; 5.1 and
/// LuaJIT halve a stack used below 1/4, which no growth can make canonical: nothing is done.
unsafe extern "C-unwind" fn l_stretch(L: *mut lua_State) -> c_int {
    #[cfg(lua54_gc)]
    // SAFETY: called by Lua; `lua_checkstack` reports failure instead of raising.
    unsafe {
        let mut ar: ffi::lua_Debug = std::mem::zeroed();
        let mut depth = 0;
        while depth < 2000 && ffi::lua_getstack(L, depth, &mut ar) != 0 {
            depth += 1;
        }
        // A frame uses at most 255 slots (Lua) or its values + LUA_MINSTACK (C).
        ffi::lua_checkstack(L, (depth + 2) * 3 * 256);
    }
    #[cfg(not(lua54_gc))]
    let _ = L;
    0
}

/// `core.measured(check, settle, finish)`: a C function that calls `check(a, b)`, then
/// `settle()` if `check` returned true, then returns `finish(a, b)`.
///
/// Every function made this way calls `settle` with the same stack layout, whatever Lua
/// function it stands for, so that readings taken through them (a checkpoint and its check)
/// see the caller's thread at the same depth and size.
unsafe extern "C-unwind" fn l_measured(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua with three functions; the closure holds them as upvalues.
    unsafe {
        ffi::lua_settop(L, 3);
        ffi::lua_pushcclosure(L, l_measured_call, 3);
    }
    1
}

unsafe extern "C-unwind" fn l_measured_call(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; errors from the three calls propagate (no destructors alive).
    unsafe {
        ffi::lua_settop(L, 2);
        ffi::lua_pushvalue(L, ffi::lua_upvalueindex(1));
        ffi::lua_pushvalue(L, 1);
        ffi::lua_pushvalue(L, 2);
        ffi::lua_call(L, 2, 1);
        let settle = ffi::lua_toboolean(L, -1) != 0;
        ffi::lua_pop(L, 1);
        if settle {
            ffi::lua_pushvalue(L, ffi::lua_upvalueindex(2));
            ffi::lua_call(L, 0, 0);
        }
        ffi::lua_pushvalue(L, ffi::lua_upvalueindex(3));
        ffi::lua_pushvalue(L, 1);
        ffi::lua_pushvalue(L, 2);
        ffi::lua_call(L, 2, ffi::LUA_MULTRET);
        ffi::lua_gettop(L) - 2
    }
}

// ---------------------------------------------------------------------------------------------
// mem.scope in C (PUC Lua 5.1, 5.3, 5.4, 5.5)
//
// The Lua version in mem.lua costs a few thousand VM instructions per call (varargs, pcall,
// select); this one calls `fn` with `lua_pcallk` and a continuation, so that `fn` can still
// yield inside the scope (5.3+). LuaJIT keeps the Lua version: it cannot yield across a C
// function, but can across its own `pcall`.

/// The error Lua 5.1 raises when `fn` yields inside the scope.
#[cfg(feature = "lua51")]
const YIELD_ERROR: &[u8] = b"attempt to yield across metamethod/C-call boundary";

/// `core.make_scope(prepare, names)`: the C `mem.scope`, with the Lua function that checks the
/// arguments of the general forms (`prepare(a, b)` returns `name, on_exit, arena, limit,
/// fn_index`) and the
/// weak table of default names by function.
#[cfg(c_scope)]
unsafe extern "C-unwind" fn l_make_scope(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua with two values, kept as upvalues.
    unsafe {
        ffi::lua_settop(L, 2);
        ffi::lua_pushcclosure(L, l_scope, 2);
    }
    1
}

/// `mem.scope([name or opts,] fn, ...)`.
///
/// Stack while `fn` runs, from `base` (the number of arguments): `base+1` name, `base+2`
/// on_exit (or nil), `base+3` token, then `fn`'s call; its results follow `base+3`.
#[cfg(c_scope)]
unsafe extern "C-unwind" fn l_scope(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; errors raised before the scope opens leave nothing behind.
    unsafe {
        let t = check_tracker(L);
        let base = ffi::lua_gettop(L);
        ffi::luaL_checkstack(L, base + 8, c"too many arguments".as_ptr());
        let mut arena = None;
        let mut guard = Guard::default();
        let quick = match (ffi::lua_type(L, 1), ffi::lua_type(L, 2)) {
            (ffi::LUA_TTABLE, ffi::LUA_TFUNCTION) => quick_options(L),
            _ => None,
        };
        let fn_at = match (ffi::lua_type(L, 1), ffi::lua_type(L, 2)) {
            (ffi::LUA_TSTRING, ffi::LUA_TFUNCTION) => {
                ffi::lua_pushvalue(L, 1);
                ffi::lua_pushnil(L);
                2
            }
            _ if quick.is_some() => {
                (arena, guard.limit) = quick.expect("checked");
                2
            }
            (first, _) => {
                // A function whose default name is known already.
                if first == ffi::LUA_TFUNCTION
                    && ffi::lua_type(L, ffi::lua_upvalueindex(2)) == ffi::LUA_TTABLE
                {
                    ffi::lua_pushvalue(L, 1);
                    ffi::lua_rawget(L, ffi::lua_upvalueindex(2));
                } else {
                    ffi::lua_pushnil(L);
                }
                if ffi::lua_type(L, -1) == ffi::LUA_TSTRING {
                    ffi::lua_pushnil(L);
                    1
                } else {
                    ffi::lua_pop(L, 1);
                    ffi::lua_pushvalue(L, ffi::lua_upvalueindex(1));
                    for i in 1..=2 {
                        if i <= base {
                            ffi::lua_pushvalue(L, i);
                        } else {
                            ffi::lua_pushnil(L);
                        }
                    }
                    ffi::lua_call(L, 2, 5);
                    let at = ffi::lua_tointeger(L, -1) as c_int;
                    if !(1..=2).contains(&at) || at > base {
                        // (only a replaced `prepare` upvalue can say so)
                        raise(L, c"lunet.mem: mem.scope's argument check failed");
                    }
                    guard.limit = count_option(L, -2);
                    arena = arena_option(L, -3);
                    ffi::lua_pop(L, 3);
                    at
                }
            }
        };
        let token = open_scope(L, t, base + 1, arena, guard);
        ffi::lua_pushlightuserdata(L, token as *mut c_void);
        for i in fn_at..=base {
            ffi::lua_pushvalue(L, i);
        }
        let nargs = base - fn_at;
        #[cfg(feature = "lua51")]
        let status = ffi::lua_pcall(L, nargs, ffi::LUA_MULTRET, 0);
        #[cfg(not(feature = "lua51"))]
        let status = ffi::lua_pcallk(
            L,
            nargs,
            ffi::LUA_MULTRET,
            0,
            base as ffi::lua_KContext,
            Some(scope_k),
        );
        scope_finish(L, status, base)
    }
}

/// The fast path of `l_scope` for `mem.scope(opts, fn, ...)`: when every field of `opts` is one
/// mem.lua's check accepts at sight (`name` a string, `on_exit` a function, `arena` a boolean,
/// `limit` an integer from 0 to 2^53)
/// and the name is known, pushes the name and `on_exit` (or nil) and returns the arena and
/// limit options.
/// Otherwise pushes nothing and returns `None`: the Lua `prepare` checks (and raises).
///
/// # Safety
/// Called from `l_scope` with `opts` at 1, `fn` at 2, and 4 free slots.
#[cfg(c_scope)]
unsafe fn quick_options(L: *mut lua_State) -> Option<(Option<usize>, Option<u64>)> {
    // SAFETY: valid state; only string keys are read as strings; the stack is balanced on
    // every return.
    unsafe {
        if ffi::lua_getmetatable(L, 1) != 0 {
            ffi::lua_pop(L, 1); // __index or __pairs could change what mem.lua would see
            return None;
        }
        let (mut has_name, mut has_on_exit, mut arena, mut limit) = (false, false, None, None);
        let top = ffi::lua_gettop(L);
        ffi::lua_pushnil(L);
        while ffi::lua_next(L, 1) != 0 {
            let key = if ffi::lua_type(L, -2) == ffi::LUA_TSTRING {
                let mut len = 0usize;
                let p = ffi::lua_tolstring(L, -2, &mut len);
                std::slice::from_raw_parts(p as *const u8, len)
            } else {
                b""
            };
            let value_type = ffi::lua_type(L, -1);
            match (key, value_type) {
                (b"name", ffi::LUA_TSTRING) => has_name = true,
                (b"on_exit", ffi::LUA_TFUNCTION) => has_on_exit = true,
                (b"arena", ffi::LUA_TBOOLEAN) => {
                    arena = (ffi::lua_toboolean(L, -1) != 0).then_some(arena::DEFAULT_CHUNK)
                }
                (b"limit", ffi::LUA_TNUMBER) => {
                    let n = ffi::lua_tonumber(L, -1);
                    if !(0.0..=MAX_EXACT).contains(&n) || n.fract() != 0.0 {
                        ffi::lua_settop(L, top);
                        return None;
                    }
                    limit = Some(n as u64);
                }
                _ => {
                    ffi::lua_settop(L, top);
                    return None;
                }
            }
            ffi::lua_pop(L, 1);
        }
        if has_name {
            ffi::lua_getfield(L, 1, c"name".as_ptr());
        } else {
            ffi::lua_pushvalue(L, 2);
            ffi::lua_rawget(L, ffi::lua_upvalueindex(2));
            if ffi::lua_type(L, -1) != ffi::LUA_TSTRING {
                ffi::lua_settop(L, top);
                return None;
            }
        }
        if has_on_exit {
            ffi::lua_getfield(L, 1, c"on_exit".as_ptr());
        } else {
            ffi::lua_pushnil(L);
        }
        Some((arena, limit))
    }
}

/// The largest integer mem.lua accepts for byte counts (2^53, exact in a double).
#[cfg(c_scope)]
const MAX_EXACT: f64 = 9007199254740992.0;

/// Continuation of `l_scope` after `fn` yielded (5.3+).
#[cfg(all(c_scope, not(feature = "lua51")))]
unsafe extern "C-unwind" fn scope_k(
    L: *mut lua_State,
    status: c_int,
    ctx: ffi::lua_KContext,
) -> c_int {
    // SAFETY: called by Lua with the stack `l_scope` left.
    unsafe { scope_finish(L, status, ctx as c_int) }
}

/// Closes the scope, runs `on_exit`, and returns `fn`'s results or raises its error unchanged.
///
/// # Safety
/// The stack as `l_scope` describes it, `status` the outcome of the protected call.
#[cfg(c_scope)]
unsafe fn scope_finish(L: *mut lua_State, status: c_int, base: c_int) -> c_int {
    // SAFETY: forwarded contract.
    unsafe {
        let ok = status == ffi::LUA_OK || status == ffi::LUA_YIELD;
        let t = check_tracker(L);
        let token = ffi::lua_touserdata(L, base + 3) as *const Scope;
        let on_exit = ffi::lua_type(L, base + 2) != ffi::LUA_TNIL;
        ffi::luaL_checkstack(L, 6, ptr::null());
        if on_exit {
            ffi::lua_pushvalue(L, base + 2);
            close_scope(L, t, token, true);
            if ok {
                ffi::lua_call(L, 1, 0);
            } else if ffi::lua_pcall(L, 1, 0, 0) != ffi::LUA_OK {
                ffi::lua_pop(L, 1); // fn's error wins over on_exit's
            }
        } else {
            close_scope(L, t, token, false);
        }
        if ok {
            return ffi::lua_gettop(L) - (base + 3);
        }
        #[cfg(feature = "lua51")]
        if let Some(msg) = to_bytes(L, -1) {
            if msg == YIELD_ERROR {
                ffi::lua_pushstring(
                    L,
                    c" (Lua 5.1 cannot yield inside mem.scope; use LuaJIT or Lua 5.2+)".as_ptr(),
                );
                ffi::lua_concat(L, 2);
            }
        }
        ffi::lua_error(L)
    }
}

/// The bytes of the string at `idx`, if it is a string.
///
/// # Safety
/// `L` valid, `idx` acceptable; the slice lives while the value stays on the stack.
#[cfg(feature = "lua51")]
unsafe fn to_bytes<'a>(L: *mut lua_State, idx: c_int) -> Option<&'a [u8]> {
    // SAFETY: valid state; only real strings are read.
    unsafe {
        if ffi::lua_type(L, idx) != ffi::LUA_TSTRING {
            return None;
        }
        let mut len = 0usize;
        let p = ffi::lua_tolstring(L, idx, &mut len);
        Some(std::slice::from_raw_parts(p as *const u8, len))
    }
}
