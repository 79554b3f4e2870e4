//! The C API's Lua-state functions (`include/lunet_mem.h`): installing the tracker on a state
//! the runtime created, reading its live bytes, and the handle on the running coroutine's scope
//! (resuming from C is in `src/bindings/coroutines.rs`).
//!
//! The header's tracked `malloc`/`free`, checkpoints and worker arenas have no Lua: they are the
//! crate `lunet-mem-c` (crates/lunet-mem-c), linked here so that this library exports them too.

use std::ffi::c_int;
use std::ptr;
use std::sync::Arc;

use lunet_mem_c::Account;

use mlua::ffi::{self, lua_State};

// Named so that it is linked: its `#[no_mangle]` functions are exported from this library, which
// uses none of them itself.
extern crate lunet_mem_c;

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

/// The C account of the scope active in `L`'s state now (the innermost scope of the running
/// coroutine), with a new reference for the caller (`lunet_mem_scope_release`); NULL without a
/// scope or without the tracker.
///
/// # Safety
/// `L` a valid state, used on the thread that runs it.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_scope_current(L: *mut lua_State) -> *const Account {
    // SAFETY: valid state.
    let Some(t) = (unsafe { crate::state::tracker(L) }) else {
        return ptr::null();
    };
    match t.active_scope() {
        Some(scope) => Arc::into_raw(scope.account().clone()),
        None => ptr::null(),
    }
}
