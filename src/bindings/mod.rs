//! The C functions behind the Lua API (`core` in `lua/lunet/mem.lua`).
//!
//! They are raw `lua_CFunction`s rather than mlua callbacks because several of them must not
//! allocate before they have read the counters (`stats`, `checkpoint`, `live`), and the
//! coroutine hooks run on every resume. Errors are raised with `lua_error`, which does not unwind
//! Rust frames: every function here raises only when no value with a destructor is alive, and
//! only through the helpers of `errors.rs`.
//!
//! One file per concept of the Lua API, each with its `open` adding its functions to the `core`
//! table (as luasystem's `time.c` and `term.c` each have their `*_open`); [`push_core`] makes the
//! table and calls them. Shared: `errors.rs` (the one way to raise, and argument checks),
//! `crate::udata` (the module's typed userdata) and the small helpers below.

mod arenas;
mod budgets;
mod checkpoints;
pub mod coroutines;
mod errors;
mod jit;
mod metrics;
#[cfg(c_scope)]
mod scope_c;
#[cfg(not(c_scope))]
mod scope_lua;
mod scopes;
mod stats;
mod tracing;

use std::ffi::{c_int, CStr};

use mlua::ffi::{self, lua_State};

pub(crate) use errors::rethrow;
pub(crate) use scopes::thread_scopes;

use crate::scope::ThreadScopes;
use crate::udata;
use errors::check_tracker;

/// Registry key of the table of functions mem.lua replaced (`coroutine.resume`, ...).
const SAVED_KEY: &CStr = c"lunet.mem.saved";

/// Pushes the `core` table used by `lua/lunet/mem.lua`.
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
        errors::register_protected(L);
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
        budgets::open(L);
        arenas::open(L);
        stats::open(L);
        checkpoints::open(L);
        scopes::open(L);
        register(
            L,
            &[(c"version", l_version), (c"address_name", l_address_name)],
        );
        #[cfg(c_scope)]
        scope_c::open(L);
        #[cfg(not(c_scope))]
        scope_lua::open(L);
        jit::open(L);
        metrics::open(L);
        tracing::open(L);
        coroutines::open(L);
        ffi::lua_pushvalue(L, saved);
        ffi::lua_setfield(L, -2, c"saved".as_ptr());
        ffi::lua_remove(L, saved);
        arenas::start_gc_ticks(L, t);
        // The loading thread (usually the main one) gets its scope table now, so that its first
        // scope does not allocate one inside somebody's measurement.
        thread_scopes(L, t, 0, true);
    }
}

/// Adds `functions` to the table on top (as `luaL_setfuncs` with no upvalues).
///
/// # Safety
/// `L` valid with 2 free slots, a table on top. May raise (memory).
unsafe fn register(L: *mut lua_State, functions: &[(&CStr, ffi::lua_CFunction)]) {
    // SAFETY: valid state, table on top.
    unsafe {
        for &(name, f) in functions {
            ffi::lua_pushcfunction(L, f);
            ffi::lua_setfield(L, -2, name.as_ptr());
        }
    }
}

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
pub(super) unsafe fn to_string(L: *mut lua_State, idx: c_int) -> Option<String> {
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
