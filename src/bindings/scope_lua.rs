//! `mem.scope` on LuaJIT: Lua, so that `fn` can yield inside the scope, around four C
//! functions (see lua/lunet/mem.lua):
//!
//! ```lua
//! local token = scope_prepare(name, arena, limit)    -- the scope, not active yet
//! return scope_finish(token, on_exit, pcall(run, token, fn, ...))
//! -- run(token, fn, ...): scope_activate(token); return scope_close_ok(token, fn(...))
//! ```
//!
//! The scope is active only inside the protected call, so no error can leave it open: whatever
//! fails between the activation and `scope_close_ok` is caught by `pcall`, and `scope_finish`
//! closes what is still open. On LuaJIT nothing between `pcall`'s return and `scope_finish` can
//! be refused by the scope's budget (stack growth and debug hooks are admitted, see
//! `Tracker::scope_for_call`).

use std::ffi::{c_int, c_void};
use std::ptr;
use std::rc::Rc;

use mlua::ffi::{self, lua_State};

use super::budgets::memory_error;
use super::errors::{check_tracker, raise, rethrow, type_error};
use super::register;
use super::scopes::{
    arena_option, count_option, make_scope, pop_scope, push_scope, push_stats_of, thread_scopes,
};
use crate::scope::{Guard, Scope};

/// Adds the four functions of the Lua `mem.scope` to the `core` table on top.
///
/// # Safety
/// `L` valid with 2 free slots, the core table on top. May raise (memory).
pub(super) unsafe fn open(L: *mut lua_State) {
    // SAFETY: forwarded contract.
    unsafe {
        register(
            L,
            &[
                (c"scope_prepare", l_scope_prepare),
                (c"scope_activate", l_scope_activate),
                (c"scope_close_ok", l_scope_close_ok),
                (c"scope_finish", l_scope_finish),
            ],
        )
    }
}

/// `core.scope_prepare(name, arena, limit)`: makes the scope a `mem.scope` call will run `fn`
/// in, kept as the running thread's pending scope until `scope_activate`; returns its token.
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
                if overdrawn {
                    Scope::count_refusal(token);
                }
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

/// `core.scope_finish(token, on_exit, ok, ...)`: closes the scope `token` if it is still open
/// (`fn` failed), runs `on_exit(stats)` (its error, after a failure of `fn`, is dropped: `fn`'s
/// wins), then returns `...` or raises `fn`'s error object unchanged.
unsafe extern "C-unwind" fn l_scope_finish(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe { scope_finish_lua(L) }
}

/// The body of `scope_finish`.
///
/// # Safety
/// Called by Lua with the arguments of `scope_finish`.
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
        rethrow(L)
    }
}
