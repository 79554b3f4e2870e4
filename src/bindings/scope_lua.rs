//! `mem.scope` on LuaJIT: Lua, so that `fn` can yield inside the scope, around four C
//! functions (see lua/lunet/mem.lua):
//!
//! ```lua
//! local token = scope_prepare(name, arena, limit)    -- the scope, not active yet
//! return finish(token, on_exit, pcall(run, token, fn, ...))
//! -- run(token, fn, ...): scope_activate(token); return fn(...)
//! -- finish(token, on_exit, ok, ...): if ok, scope_finish(token, on_exit,
//! --   pcall(scope_close_ok, token, ...)), else scope_finish(token, on_exit, ok, ...)
//! ```
//!
//! The scope becomes active inside the protected call, so no error can leave it open:
//! whatever fails after the activation is caught by `pcall`, and `scope_finish` closes what is
//! still open; a close that fails (an overdrawn scope) fails in a protected call too. On
//! LuaJIT nothing between `pcall`'s return and the close can be refused by the scope's budget
//! (stack growth and debug hooks are admitted, see `Tracker::scope_for_call`).
//!
//! Three of them have a form that compiled code can call through the FFI
//! (`core.jit_scope_calls`), without the Lua API: a trace that calls a C function through the
//! Lua API ends there (LuaJIT stitches a new one after it), and every request ran through the
//! interpreter's C-call path four times. The FFI forms do the common case only, for the running
//! thread whose record the tracker has cached (`Tracker::thread_cached`), and answer 0 for
//! anything else (no record cached, a budget, an overdrawn scope, an `on_exit`, an error, the
//! GC cycle counter in doubt): mem.lua then calls the Lua C functions, which do it all. A
//! token is the scope's address as a number, the same for both forms.

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::ptr;
use std::rc::Rc;

use mlua::ffi::{self, lua_State};

use super::budgets::memory_error;
use super::errors::{check_tracker, raise, rethrow, type_error};
use super::register;
use super::scopes::{
    arena_chunk, arena_option, count_option, make_scope, new_scope, pop_scope, push_scope,
    push_stats_of, thread_scopes,
};
use crate::hook::Tracker;
use crate::scope::{Guard, Scope, ThreadScopes};

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
                (c"jit_scope_calls", l_jit_scope_calls),
            ],
        )
    }
}

/// The scope `token` names (a number: the scope's address), or null for anything else.
///
/// # Safety
/// `L` valid, `idx` acceptable.
unsafe fn token_at(L: *mut lua_State, idx: c_int) -> *const Scope {
    // SAFETY: valid state and index.
    unsafe {
        if ffi::lua_type(L, idx) == ffi::LUA_TNUMBER {
            ffi::lua_tonumber(L, idx) as usize as *const Scope
        } else {
            ptr::null()
        }
    }
}

/// The token of `scope`, as mem.lua holds it.
fn token_of(scope: *const Scope) -> f64 {
    scope as usize as f64
}

/// What the FFI functions get first: the tracker's handle (`Tracker::jit_handle`).
type Handle = Cell<*const Tracker>;

/// `core.jit_scope_calls()`: the tracker's handle, then the addresses of [`jit_prepare`],
/// [`jit_activate`] and [`jit_close`], as light userdata for `ffi.cast`.
unsafe extern "C-unwind" fn l_jit_scope_calls(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let t = check_tracker(L);
        if t.jit_handle.get().is_null() {
            let handle: &'static Handle = Box::leak(Box::new(Cell::new(ptr::from_ref(t))));
            t.jit_handle.set(handle);
        }
        let entries: [*mut c_void; 3] = [
            jit_prepare as *mut c_void,
            jit_activate as *mut c_void,
            jit_close as *mut c_void,
        ];
        ffi::luaL_checkstack(L, 4, ptr::null());
        ffi::lua_pushlightuserdata(L, t.jit_handle.get().cast_mut().cast());
        for entry in entries {
            ffi::lua_pushlightuserdata(L, entry);
        }
    }
    4
}

/// The tracker behind `handle` (none once it was dropped) and the running thread's record, when
/// the tracker has it cached: the only one the FFI forms use (finding another takes the Lua
/// API). Clears the bookkeeping flag as every call into the module does (see
/// `Tracker::exempt`).
///
/// # Safety
/// `handle` the handle of the state whose Lua code calls, through the FFI (see
/// `Tracker::jit_handle`).
unsafe fn cached_record<'a>(handle: *const Handle) -> Option<(&'a Tracker, &'a mut ThreadScopes)> {
    // SAFETY: the handle is never freed; it holds the live tracker or null.
    let t = unsafe { (*handle).get().as_ref() }?;
    if t.exempt_calls.get() == 0 {
        t.exempt.set(false);
    }
    let running = t.vm.get()?.current_thread();
    if t.thread_cached.get() != running as usize {
        return None;
    }
    // SAFETY: a cached record is live while its thread is the cached one (see
    // `Tracker::thread_cached`).
    let ts = unsafe { &mut *(t.thread_record.get() as *mut ThreadScopes) };
    Some((t, ts))
}

/// FFI form of `scope_prepare(name, arena)` for a scope without a budget: `name` is the scope
/// name's `len` bytes (a Lua string's, alive during the call), `arena` the arena option's
/// bytes or -1 for none. Returns the token, or 0 where `scope_prepare` must do it.
///
/// # Safety
/// As for [`cached_record`]; `name` valid for `len` bytes.
unsafe extern "C" fn jit_prepare(
    handle: *const Handle,
    name: *const u8,
    len: usize,
    arena: f64,
) -> f64 {
    // SAFETY: forwarded contract.
    unsafe {
        let Some((t, ts)) = cached_record(handle) else {
            return 0.0;
        };
        if !t.gc_ticking.get() || t.tick_in_doubt.get() || name.is_null() {
            return 0.0; // (arming a GC cycle counter takes the Lua API)
        }
        let arena = (arena >= 0.0).then(|| arena_chunk(arena as usize));
        let name = t.scope_name(name as usize, std::slice::from_raw_parts(name, len));
        let scope = new_scope(t, name, arena, Guard::default());
        let token = Rc::as_ptr(&scope);
        ts.pending = Some(scope); // (drops one that an error kept from starting)
        token_of(token)
    }
}

/// FFI form of `scope_activate(token)`: 1, or 0 where `scope_activate` must do it.
///
/// # Safety
/// As for [`jit_prepare`].
unsafe extern "C" fn jit_activate(handle: *const Handle, token: f64) -> c_int {
    // SAFETY: forwarded contract.
    unsafe {
        let Some((t, ts)) = cached_record(handle) else {
            return 0;
        };
        match ts.pending.take() {
            Some(scope) if token_of(Rc::as_ptr(&scope)) == token => {
                push_scope(t, ts, scope);
                1
            }
            other => {
                ts.pending = other;
                0
            }
        }
    }
}

/// FFI form of `scope_close_ok(token)` then `scope_finish(token, nil, true)`, after `fn`
/// returned: closes the running thread's innermost scope `token`, unless it is overdrawn (which
/// must fail), and drops it. 1, or 0 where the Lua C functions must do it.
///
/// # Safety
/// As for [`jit_prepare`].
unsafe extern "C" fn jit_close(handle: *const Handle, token: f64) -> c_int {
    // SAFETY: forwarded contract; the innermost scope is live (the record holds it).
    unsafe {
        let Some((t, ts)) = cached_record(handle) else {
            return 0;
        };
        let Some(top) = ts.stack.last() else { return 0 };
        let top = Rc::as_ptr(top);
        if token_of(top) != token || (*top).fails_overdrawn() {
            return 0;
        }
        drop(pop_scope(t, ts, top));
        1
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
        ffi::lua_pushnumber(L, token_of(token));
    }
    1
}

/// `core.scope_activate(token)`: the pending scope `token` becomes the running thread's
/// innermost scope, and the active one. Allocates nothing.
unsafe extern "C-unwind" fn l_scope_activate(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let t = check_tracker(L);
        let token = token_at(L, 1);
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
        let token = token_at(L, 1);
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
        if ffi::lua_type(L, 1) != ffi::LUA_TNUMBER {
            type_error(L, 1, c"scope_finish", c"scope token"); // (only a call by hand)
        }
        if ffi::lua_type(L, 3) != ffi::LUA_TBOOLEAN {
            type_error(L, 3, c"scope_finish", c"boolean"); // (only a call by hand)
        }
        let token = token_at(L, 1);
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
